"""Problems found in a recipe, phrased for the user: which node, what is wrong, what to do."""

from __future__ import annotations

from dataclasses import dataclass


class RecipeError(Exception):
    """The file as a whole cannot be read as a recipe (one clear line, never a traceback)."""


@dataclass(frozen=True)
class Problem:
    node_id: str | None  # None: the recipe as a whole
    title: str | None  # the node's title (or type) when known
    message: str

    def __str__(self) -> str:
        if self.node_id is None:
            return f"recipe: {self.message}"
        name = f" ({self.title})" if self.title else ""
        return f"node {self.node_id}{name}: {self.message}"

    def to_dict(self) -> dict:
        return {"node": self.node_id, "title": self.title, "message": self.message}
