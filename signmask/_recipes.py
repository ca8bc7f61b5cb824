"""Lottery-search recipes (IMP, LRR, AWS, OMP) and their registry."""

from __future__ import annotations

import dataclasses

from ._checks import check_key

RECIPES: dict[str, "Recipe"] = {}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What a search method does between the user's training rounds.

    Args:
        name: registry key (``signmask.apply(model, method=name)``).
        rewind: default rewind point (``"init"``, ``"500it"``...); ``None`` never rewinds weights.
        interpolate_norms: AWS's normalization interpolation during the search.
        one_shot: prune to the target in a single step (OMP).
        classifier: prune the classifier head by default (open_lth ResNets do; AWS does not).
    """

    name: str
    rewind: str | None
    interpolate_norms: bool = False
    one_shot: bool = False
    classifier: bool = False

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"a recipe needs a non-empty str name, got {self.name!r}")


def register_recipe(recipe: Recipe) -> Recipe:
    """Add ``recipe`` to the registry under its name."""
    RECIPES[recipe.name] = recipe
    return recipe


def get_recipe(name: str) -> Recipe:
    """Look up a recipe; an unknown name raises ``ValueError`` (one that is no str,
    ``TypeError``) listing the valid ones."""
    return RECIPES[check_key(name, RECIPES, "method", "search method")]


# Iterative magnitude pruning, weights rewound each round (Frankle & Carbin; open_lth).
register_recipe(Recipe("imp", rewind="init", classifier=True))
# Learning-rate rewinding: no weight rewind, the optimizer and LR schedule restarted.
register_recipe(Recipe("lrr", rewind=None))
# LRR with normalization-layer interpolation (Find A Winning Sign).
register_recipe(Recipe("aws", rewind=None, interpolate_norms=True))
# One-shot magnitude pruning of the trained dense network, then rewind.
register_recipe(Recipe("omp", rewind="init", one_shot=True, classifier=True))
