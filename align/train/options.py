"""What one full run was asked to do, resolved against the case's recipe."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from align.zoo.recipe import Recipe

DEFAULT_TIMEOUT_S = 1800.0  # every collective; torch's own default for gloo


@dataclass(frozen=True)
class RunOptions:
    """A full run: the case, its effective recipe and where and how to run it.

    `recipe` is the case's recipe with the command line's overrides applied (epochs,
    cards, batch per card, lr, precision); its `cards` counts every rank of every node.
    `documented` is the case's own recipe, unchanged.
    """

    case: str
    recipe: Recipe
    documented: Recipe
    device: str  # "cpu", "cuda" or "npu"
    backend: str  # "gloo", "nccl" or "hccl"
    work_dir: Path
    cards_per_node: int = 1
    data: Path | None = None
    seed: int = 0
    resume: bool = False
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def world_size(self) -> int:
        return self.recipe.cards

    def deviations(self) -> list[str]:
        """How this run's recipe differs from the documented one, in words."""
        run, doc = self.recipe, self.documented
        out = [
            f"{name} {getattr(run, name)} (documented {getattr(doc, name)})"
            for name in ("dataset", "epochs", "precision", "lr", "image_size")
            if getattr(run, name) != getattr(doc, name)
        ]
        batch, doc_batch = run.batch_per_card * run.cards, doc.batch_per_card * doc.cards
        if batch != doc_batch:
            out.append(f"global batch {batch} (documented {doc_batch})")
        return out


def scaled_recipe(
    recipe: Recipe,
    *,
    epochs: int | None,
    cards: int | None,
    batch_per_card: int | None,
    lr: float | None,
    precision: str | None,
) -> Recipe:
    """`recipe` with overrides (`cards`: all ranks); a changed global batch scales the lr
    linearly unless `lr` is given.

    The linear scaling rule (Goyal et al. 2017, mmengine's auto_scale_lr) keeps the
    documented schedule meaningful when fewer cards or smaller batches are at hand.
    """
    cards = recipe.cards if cards is None else cards
    batch_per_card = recipe.batch_per_card if batch_per_card is None else batch_per_card
    if lr is None:
        lr = recipe.lr * (cards * batch_per_card) / (recipe.cards * recipe.batch_per_card)
    return dataclasses.replace(
        recipe,
        epochs=recipe.epochs if epochs is None else epochs,
        cards=cards,
        batch_per_card=batch_per_card,
        lr=lr,
        precision=precision or recipe.precision,
    )
