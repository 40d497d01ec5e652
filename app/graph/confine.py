"""What a shared recipe may touch: node ids are plain names, and every path it makes us write lies
inside the run's workspace (or under an output root the user allowed on this machine).

A recipe from a stranger must be as harmless as a picture. It may name any file to *read* (a model,
a dataset), but a node id like ``../../x`` or a Save path like ``~/.bashrc.safetensors`` must not
move our writes, or the deletion of old backups, anywhere else. The check is made on the fully
resolved path (``~``, ``..`` and symlinks followed), when a recipe is validated and again when it
runs. Pure data and the standard library only: the editor and ``validate`` use it without torch.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable

from app.graph.problems import Problem

ALLOW_ENV = "NODETRAINER_ALLOW_OUTPUT"  # os.pathsep-separated folders outside workspaces we may write to
MAX_ID_LENGTH = 64
_SAFE_ID = re.compile(r"^[A-Za-z0-9_.-]+$")
_RENAME_CHARS = re.compile(r"[^A-Za-z0-9_-]+")  # dots go too: "../x" becomes "x", not ".._x"
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # builtin:tiny-sd (two letters at least: not C:)


class OutsideWorkspace(ValueError):
    """A path the program was about to write lies outside the workspace and every allowed root."""


# ---- node ids ----------------------------------------------------------------------------------

def id_problem(node_id: Any) -> str | None:
    """Why ``node_id`` cannot name a node (it becomes part of folder names), or None."""
    if not isinstance(node_id, str) or not node_id:
        return "a node id must be non-empty text"
    if len(node_id) > MAX_ID_LENGTH:
        return f"node id is longer than {MAX_ID_LENGTH} characters"
    if node_id in (".", "..") or not _SAFE_ID.match(node_id):
        return f"node id {node_id!r} may only use letters, digits, '_', '.' and '-' (and not be '.' or '..')"
    return None


def safe_id(node_id: str, taken: set[str]) -> str:
    """A safe id for an old recipe's ``node_id``: runs of other characters (dots included) become
    ``_``; a clash with an id in ``taken`` gets ``_2``, ``_3``..."""
    base = _RENAME_CHARS.sub("_", str(node_id)).strip("_")[:MAX_ID_LENGTH - 8] or "node"
    candidate, n = base, 1
    while candidate in taken or id_problem(candidate):
        n += 1
        candidate = f"{base}_{n}"
    return candidate


def rename_unsafe_ids(data: dict) -> dict[str, str]:
    """Rename, in recipe data (as read from JSON), every node id that is not a plain name, following
    it in links and the ``ui`` section. Returns old id -> new id (empty: the data is untouched, so
    an unchanged valid recipe saves to the same bytes)."""
    nodes = data.get("nodes")
    if not isinstance(nodes, dict) or not any(id_problem(k) for k in nodes):
        return {}
    taken = {k for k in nodes if not id_problem(k)}
    renames: dict[str, str] = {}
    for old in nodes:
        if id_problem(old):
            renames[old] = safe_id(old, taken)
            taken.add(renames[old])
    data["nodes"] = {renames.get(k, k): v for k, v in nodes.items()}
    for link in data.get("links") or []:
        if isinstance(link, dict):
            for end in ("from_node", "to_node"):
                if isinstance(link.get(end), str) and link[end] in renames:
                    link[end] = renames[link[end]]
    ui = data.get("ui")
    if isinstance(ui, dict):
        if isinstance(ui.get("nodes"), dict):
            ui["nodes"] = {renames.get(k, k): v for k, v in ui["nodes"].items()}
        for group in ui.get("groups") or []:
            if isinstance(group, dict) and isinstance(group.get("nodes"), list):
                group["nodes"] = [renames.get(n, n) if isinstance(n, str) else n for n in group["nodes"]]
    return renames


# ---- write paths -------------------------------------------------------------------------------

def allowed_roots(extra: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """Folders outside the workspace the user allowed writes to: ``$NODETRAINER_ALLOW_OUTPUT``
    (separated by ``os.pathsep``) and ``--allow-output DIR``; resolved like the paths they admit."""
    dirs = [d for d in os.environ.get(ALLOW_ENV, "").split(os.pathsep) if d.strip()]
    dirs += [str(d) for d in extra if str(d).strip()]
    out: list[Path] = []
    for d in dirs:
        p = Path(os.path.realpath(os.path.expanduser(d)))
        if p not in out:
            out.append(p)
    return out


def is_inside(path: str | os.PathLike, root: str | os.PathLike, strict: bool = False) -> bool:
    """Whether ``path`` is ``root`` (unless ``strict``) or below it, both fully resolved (``~``,
    ``..``, symlinks)."""
    p = Path(os.path.realpath(os.path.expanduser(str(path))))
    r = Path(os.path.realpath(os.path.expanduser(str(root))))
    return (p == r and not strict) or r in p.parents


def strict_for(inp) -> bool:
    """An output file or folder must lie *below* the root: Save turns ``x`` into ``x.safetensors``
    beside it, and replaces a folder it writes, so the root itself would mean writing beside it."""
    return inp.path_kind.startswith("output")


def writes(inp) -> bool:
    """Does the node write to this param's path? (output kinds, and folders a spec marks ``writes``)"""
    return inp.type == "PATH" and (inp.path_kind.startswith("output") or bool(getattr(inp, "writes", False)))


def resolve_write_path(value: str, inp, recipe_dir: str | os.PathLike | None,
                       workspace: str | os.PathLike | None) -> Path | None:
    """Where a written path param really points (None: unset or a scheme such as ``builtin:``).
    Output kinds are relative to the workspace, other kinds to the recipe, as the executor resolves
    them; the result follows ``~``, ``..`` and symlinks."""
    if not isinstance(value, str) or not value or _SCHEME.match(value):
        return None
    p = Path(value).expanduser()
    base = workspace if inp.path_kind.startswith("output") else recipe_dir
    if not p.is_absolute():
        if base is None:
            return None
        p = Path(base) / p
    return Path(os.path.realpath(p))


def outside(path: str | os.PathLike, workspace: str | os.PathLike, allow: Iterable[str | os.PathLike] = (),
            strict: bool = False) -> bool:
    """True when ``path`` is neither inside ``workspace`` nor inside an allowed output root."""
    return not is_inside(path, workspace, strict) and not any(is_inside(path, r, strict) for r in allowed_roots(allow))


def ensure_inside(path: str | os.PathLike, workspace: str | os.PathLike, allow: Iterable[str | os.PathLike] = (),
                  what: str = "this path", strict: bool = False) -> Path:
    """``path`` resolved, or OutsideWorkspace saying what to do."""
    if outside(path, workspace, allow, strict):
        raise OutsideWorkspace(f"{what} resolves to {os.path.realpath(os.path.expanduser(str(path)))}, outside the "
                               f"workspace {os.path.realpath(workspace)}; a recipe writes only inside its workspace. "
                               f"Use a relative path, or allow the folder with --allow-output DIR or "
                               f"${ALLOW_ENV}")
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def check_graph(graph, registry, *, workspace: str | os.PathLike | None = None,
                recipe_dir: str | os.PathLike | None = None,
                allow: Iterable[str | os.PathLike] = ()) -> list[Problem]:
    """Every node id that is not a plain name and every written path that escapes, as Problems.

    Without a workspace (the editor's live validation), a relative output path must not climb out
    with ``..`` and an absolute one (or ``~``) must lie under an allowed root; with one, the
    resolved path must lie inside it or under an allowed root."""
    problems: list[Problem] = []
    roots = allowed_roots(allow)
    for node in graph.nodes.values():
        why = id_problem(node.id)
        if why:
            problems.append(Problem(node.id, node.label(), why + "; rename the node"))
        spec = registry.get(node.type)
        if spec is None:
            continue
        for inp in spec.params:
            if not writes(inp):
                continue
            value = node.params.get(inp.name, inp.default)
            if not isinstance(value, str) or not value or _SCHEME.match(value):
                continue
            if workspace is None:
                resolved = _lexical_escape(value, inp, recipe_dir)
            else:
                resolved = resolve_write_path(value, inp, recipe_dir, workspace)
                if resolved is not None and is_inside(resolved, workspace, strict_for(inp)):
                    resolved = None
            if resolved is None or any(is_inside(resolved, r, strict_for(inp)) for r in roots):
                continue
            where = f"the workspace {os.path.realpath(workspace)}" if workspace is not None else "the workspace"
            if workspace is not None and resolved in (Path(os.path.realpath(workspace)), *roots):
                problems.append(Problem(node.id, node.label(), f"param {inp.name!r} names the folder {resolved} "
                                        "itself; name a file or folder inside it (e.g. my_lora.safetensors)"))
                continue
            problems.append(Problem(node.id, node.label(),
                                    f"param {inp.name!r} writes to {resolved}, outside {where}; a recipe writes "
                                    f"only inside its workspace. Use a relative path without '..', or allow "
                                    f"that folder with --allow-output DIR or ${ALLOW_ENV}"))
    return problems


def _lexical_escape(value: str, inp, recipe_dir) -> Path | None:
    """Without a workspace: the resolved path of a value that surely leaves it, else None."""
    p = Path(value).expanduser()
    if p.is_absolute() or value.startswith("~"):
        return Path(os.path.realpath(p))
    if not inp.path_kind.startswith("output"):  # relative to the recipe: only the run can tell
        return None
    if os.path.normpath(value).split(os.sep)[0] == os.pardir:
        return Path("<workspace>") / value
    return None
