"""Resumable unlearning: checkpoints at the end of passes over the clean subset, and the state a resumed run starts
from.

`unlearn --checkpoint-every N` saves a RecipeState every N passes (all phases counted
together); `--resume` hands it back. A recipe rebuilds everything that depends only on
the start weights (held-back start figures, the EWC Fisher and anchor, the frozen copy)
exactly as an uninterrupted run would, then `restore` puts back the weights, optimiser,
random states, state keeper and history, and the recipe continues its loops after
`position`. The result equals an uninterrupted run with the same seed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from cleanse.engine.snapshot import pack_optimizer, pack_rng, restore_optimizer, restore_rng
from cleanse.errors import CleanseError
from cleanse.files import write_safetensors
from cleanse.formats import FileFormat
from cleanse.models import ClassifierModel

RESUME_FORMAT = "cleanse.unlearn-resume"
RESUME_VERSION = 1


@dataclass
class RecipeState:
    """Where a recipe stood after `passes` passes over the clean subset, and everything the rest of the run depends
    on."""

    recipe: str
    passes: int
    position: dict[str, Any]  # the recipe's own loop counters, e.g. {"phase": "recover", "epoch": 1, "step": 140}
    tensors: dict[str, torch.Tensor]  # model.*, optimizer.*, rng.*, keeper.*, recipe.*
    doc: dict[str, Any]  # optimiser JSON, keeper, history/notes/extra, elapsed seconds, the recipe's own values
    extra: dict[str, Any] = field(default_factory=dict)  # the command line's facts, checked on resume


class Checkpoints:
    """What a recipe calls at the end of each pass; saves every `every` passes when a `save` is given."""

    def __init__(
        self, every: int = 0, save: Callable[[RecipeState], None] | None = None, resume: RecipeState | None = None
    ) -> None:
        self.every, self.save, self.resume = every, save, resume
        self.passes = resume.passes if resume is not None else 0

    def passed(self, capture: Callable[[int], RecipeState]) -> None:
        self.passes += 1
        if self.every and self.save is not None and self.passes % self.every == 0:
            self.save(capture(self.passes))


def capture(
    recipe: str,
    passes: int,
    position: dict[str, Any],
    model: ClassifierModel,
    optimizer: torch.optim.Optimizer,
    gen: torch.Generator,
    keeper: Any,
    result: Any,
    elapsed: float,
    tensors: dict[str, torch.Tensor] | None = None,
    values: dict[str, Any] | None = None,
) -> RecipeState:
    """A RecipeState of the run as it stands (keeper: a StateKeeper; result: the RecipeResult so far)."""
    out = {f"model.{k}": v.detach().clone() for k, v in model.net.state_dict().items()}
    optimizer_tensors, optimizer_doc = pack_optimizer(optimizer)
    out.update(optimizer_tensors)
    out.update(pack_rng(gen, model.device))
    out.update({f"keeper.{k}": v.detach().clone() for k, v in keeper.best_state.items()})
    out.update({f"recipe.{k}": v.detach().clone() for k, v in (tensors or {}).items()})
    top = getattr(keeper, "top_ca", None)
    kept = {
        "best": keeper.best,
        "rollbacks": keeper.rollbacks,
        "top_ca": top if top is not None and math.isfinite(top) else None,
    }
    so_far = {"history": result.history, "notes": result.notes, "extra": result.extra}
    doc = {"optimizer": optimizer_doc, "elapsed": elapsed, "values": values or {}, "keeper": kept, "result": so_far}
    return RecipeState(recipe, passes, dict(position), out, copy.deepcopy(doc))  # a copy: the run goes on after it


def restore(
    state: RecipeState,
    model: ClassifierModel,
    optimizer: torch.optim.Optimizer,
    gen: torch.Generator,
    keeper: Any,
    result: Any,
) -> dict[str, torch.Tensor]:
    """Put the weights, optimiser, random states, keeper and history back; returns the recipe's own tensors."""
    try:
        model.net.load_state_dict(
            {k[len("model.") :]: v for k, v in state.tensors.items() if k.startswith("model.")}, strict=True
        )
        restore_optimizer(optimizer, state.tensors, state.doc["optimizer"])
        restore_rng(state.tensors, gen, model.device)
        best_state = {
            k[len("keeper.") :]: v.to(model.device) for k, v in state.tensors.items() if k.startswith("keeper.")
        }
        if set(best_state) != set(keeper.best_state):
            raise KeyError("keeper state")
        kept = state.doc["keeper"]
        keeper.best_state, keeper.best, keeper.rollbacks = best_state, dict(kept["best"]), list(kept["rollbacks"])
        if hasattr(keeper, "top_ca"):
            keeper.top_ca = -math.inf if kept["top_ca"] is None else float(kept["top_ca"])
        saved = state.doc["result"]
        result.history, result.notes, result.extra = list(saved["history"]), list(saved["notes"]), dict(saved["extra"])
    except (KeyError, ValueError, TypeError, RuntimeError, AttributeError) as exc:
        reason = " ".join(str(exc).split())[:160]
        raise CleanseError(
            f"the resume checkpoint does not fit this model or recipe ({type(exc).__name__}: {reason}); "
            "rerun without --resume (or with --force) to start over"
        ) from None
    return {k[len("recipe.") :]: v.to(model.device) for k, v in state.tensors.items() if k.startswith("recipe.")}


_NOT_RESUME = (
    "{path}: not an unlearning checkpoint written by cleanse unlearn --checkpoint-every; rerun without --resume"
)
RESUME_FILE = FileFormat(
    RESUME_FORMAT,
    RESUME_VERSION,
    wrong_format=_NOT_RESUME,
    no_metadata=_NOT_RESUME,
    wrong_version="{path}: checkpoint format version {version} is not supported; rerun without --resume",
)


def save_recipe_state(path: Any, state: RecipeState) -> None:
    """A resumable checkpoint: tensors + JSON metadata in safetensors (never pickle), written atomically."""
    doc = {
        **RESUME_FILE.header(),
        "recipe": state.recipe,
        "passes": state.passes,
        "position": state.position,
        "state": state.doc,
        "extra": state.extra,
    }
    write_safetensors(path, state.tensors, doc)


def load_recipe_state(path: Any) -> RecipeState:
    """Read and check a checkpoint written by save_recipe_state."""
    tensors, doc = RESUME_FILE.read(path)
    passes, position, body, extra = doc.get("passes"), doc.get("position"), doc.get("state"), doc.get("extra", {})
    ok = (
        isinstance(passes, int)
        and not isinstance(passes, bool)
        and passes >= 1
        and isinstance(doc.get("recipe"), str)
        and isinstance(position, dict)
        and isinstance(extra, dict)
        and isinstance(body, dict)
        and isinstance(body.get("elapsed"), (int, float))
        and isinstance(body.get("values"), dict)
        and isinstance(body.get("optimizer"), dict)
        and isinstance(body["optimizer"].get("param_groups"), list)
        and isinstance(body["optimizer"].get("scalars"), dict)
        and isinstance(body.get("keeper"), dict)
        and isinstance(body["keeper"].get("best"), dict)
        and isinstance(body["keeper"].get("rollbacks"), list)
        and isinstance(body.get("result"), dict)
        and isinstance(body["result"].get("history"), list)
        and isinstance(body["result"].get("notes"), list)
        and isinstance(body["result"].get("extra"), dict)
        and "rng.generator" in tensors
        and "rng.torch" in tensors
    )
    if not ok:
        raise CleanseError(
            f"{path}: the unlearning checkpoint is damaged (malformed metadata); rerun without --resume to start over"
        )
    # checked above; indexing again gives the checker the values' types
    return RecipeState(doc["recipe"], doc["passes"], doc["position"], tensors, doc["state"], doc.get("extra", {}))
