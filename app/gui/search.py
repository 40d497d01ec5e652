"""Finding node types by name, description or category, optionally only those that can take a
pin the user is dragging (so a link dropped on empty canvas offers what fits)."""

from __future__ import annotations

from app.graph.types import can_link


def fits_pin(spec, pin_type: str | None, side: str | None) -> bool:
    """side 'out': the drag began on an output, so the new node needs a matching input socket."""
    if not pin_type:
        return True
    if side == "out":
        return any(can_link(pin_type, i.type) for i in spec.sockets)
    return any(can_link(o.type, pin_type) for o in spec.outputs)


def search_specs(registry, query: str = "", pin_type: str | None = None, side: str | None = None) -> list:
    """Specs matching every word of the query, best first: title matches before description ones."""
    words = query.lower().split()
    scored = []
    for spec in registry:
        if not fits_pin(spec, pin_type, side):
            continue
        title = spec.title.lower()
        hay = f"{title} {spec.type.lower()} {spec.category.lower()} {spec.description.lower()}"
        if not all(w in hay for w in words):
            continue
        score = 0
        for w in words:
            if title.startswith(w):
                score -= 3
            elif w in title:
                score -= 2
        scored.append((score, spec.category, spec.title, spec))
    scored.sort(key=lambda t: t[:3])
    return [t[3] for t in scored]


def by_category(registry) -> dict[str, list]:
    out: dict[str, list] = {}
    for spec in registry:
        out.setdefault(spec.category, []).append(spec)
    return out
