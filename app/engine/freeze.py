"""Read-only views of cached outputs, so a consumer can never change what a cached node made.

Containers become immutable (dict -> FrozenDict, list -> tuple, set -> frozenset, bytearray ->
bytes), numpy arrays become read-only views, and objects that know how to protect themselves
(model handles that patch adapters in only while a consumer runs) implement `__freeze__`.
"""

from __future__ import annotations

from typing import Any


class FrozenDict(dict):
    """A dict whose mutators raise: isinstance(x, dict) still holds for consumers that read it."""

    def _readonly(self, *args, **kwargs):
        raise TypeError("this is a cached output of another node and is read-only; copy it (dict(x)) to change it")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _readonly
    __ior__ = _readonly

    def __reduce__(self):
        return (FrozenDict, (dict(self),))

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


def freeze(value: Any, _depth: int = 0) -> Any:
    if _depth > 200:
        return value
    if isinstance(value, (str, bytes, int, float, bool, type(None), frozenset, FrozenDict)):
        return value
    hook = getattr(value, "__freeze__", None)
    if hook is not None and not isinstance(value, type):
        return hook()
    if isinstance(value, dict):
        return FrozenDict({k: freeze(v, _depth + 1) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        items = tuple(freeze(v, _depth + 1) for v in value)
        if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
            return type(value)(*items)
        return items
    if isinstance(value, set):
        return frozenset(value)
    if isinstance(value, bytearray):
        return bytes(value)
    if type(value).__module__ == "numpy" and type(value).__name__ == "ndarray":
        view = value.view()
        view.flags.writeable = False
        return view
    return value
