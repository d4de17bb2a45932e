"""The unlearn job: remove a backdoor with a small clean subset, one recipe or all of them on the same subset."""

from __future__ import annotations

import copy
import hashlib
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from cleanse.attacks import Trigger, load_trigger
from cleanse.data import Dataset, load_data
from cleanse.data.subset import CleanSplit, clean_subset
from cleanse.engine.device import resolve_precision
from cleanse.engine.distributed import (
    SINGLE,
    Ranks,
    current,
    from_rank_0,
    gather_to_rank_0,
    launched,
    sync_batchnorm,
    turns,
)
from cleanse.engine.evaluate import der
from cleanse.engine.measure import measure, unmeasured
from cleanse.engine.memory import MemoryPlan, format_bytes, is_out_of_memory, parse_memory, plan_memory
from cleanse.errors import CleanseError
from cleanse.files import check_output, output_set, sha256_file, write_json_atomic
from cleanse.jobs.inputs import (
    RunSettings,
    check_classes,
    check_resume_file,
    check_same_run,
    close_resume_file,
    load_clean,
    load_job_model,
    open_resume_file,
    resume_path,
    tar_layer_for,
)
from cleanse.jobs.progress import SILENT, Progress
from cleanse.models import ClassifierModel, ModelOptions, save_model
from cleanse.recipes import RECIPES, RecipeContext, RecipeResult
from cleanse.recipes.base import NEEDS_TRIGGER
from cleanse.recipes.resume import Checkpoints, RecipeState, load_recipe_state, save_recipe_state
from cleanse.record import describe_input, new_record, record_path, versions

UNLEARN_RUN_FACTS = (
    ("model", "MODEL"),
    ("data", "--data"),
    ("trigger", "--trigger"),
    ("method", "--method"),
    ("params", "--param/--epochs"),
    ("clean_frac", "--clean-frac"),
    ("clean_n", "--clean-n"),
    ("seed", "--seed"),
    ("precision", "--precision"),
    ("tar_layer", "--layer"),
    ("subset", "clean subset (DATA changed)"),
    ("memory_budget", "--memory-budget"),
)


@dataclass
class UnlearnOptions:
    model_path: str
    data: str | None  # DATA to draw the clean subset from
    method: str = "tar-ewc"  # a recipe name, or "all"
    model: ModelOptions | None = None  # what a raw state dict lacks
    clean_frac: float | None = None
    clean_n: int | None = None
    trigger: Path | None = None
    test: str | None = None
    eval_triggers: list[Path] = field(default_factory=list)  # reporting-only ASR/RA
    epochs: int | None = None  # each recipe's main budget
    params: dict[str, str] = field(default_factory=dict)  # --param NAME=VALUE
    layer: str | None = None  # the TAR layer
    output: Path | None = None  # default <model stem>.<method>.safetensors
    checkpoint_every: int | None = None
    resume: bool = False
    precision: str = "auto"
    no_cache: bool = False
    memory_budget: str | int | None = None  # what one training forward may hold ('1GiB'); default: free memory x 0.5


@dataclass
class RecipeOutcome:
    """One recipe's finished run: what `unlearn` shows and prints for it."""

    summary: dict[str, Any]


@dataclass
class UnlearnResult:
    summaries: dict[str, dict[str, Any]]
    before: dict[str, Any]
    measured_on: str
    skipped: list[str]
    several: bool
    outputs: dict[str, Path]
    wall_seconds: float

    def to_json(self) -> dict[str, Any]:
        if self.several:
            return {"recipes": self.summaries, "skipped": self.skipped, "wall_seconds": self.wall_seconds}
        return next(iter(self.summaries.values()))


@dataclass
class _Plan:
    names: list[str]
    skipped: list[str]
    params: dict[str, dict[str, Any]]
    outputs: dict[str, Path]
    several: bool
    given: set[str]  # the parameters the user set (--param, --epochs): architecture defaults leave them alone
    no_data: list[str] = field(default_factory=list)  # skipped because they need --data and none was given
    memory_budget: int | None = None  # --memory-budget in bytes (None: the device's default)
    skips: bool = False  # --method all skips the recipes that cannot run here; a list of recipes names them instead

    def ranks_split(self, ranks: Ranks) -> str:
        """How torchrun's ranks share the work: "recipes" (--method all: each rank runs whole recipes), "batches"
        (one data-parallel recipe), or "none" (one process)."""
        if not ranks.parallel:
            return "none"
        return "recipes" if self.several else "batches"


def _plan(o: UnlearnOptions) -> _Plan:
    """Which recipes run with which parameters, and where they write: usage errors before any file is read."""
    names = _method_names(o.method)
    skips = o.method == "all"  # all skips the recipes that cannot run here; one recipe or a list names them instead
    several = skips or len(names) > 1
    _check_resume_options(names[0] if not several else "all", o.checkpoint_every, o.resume)
    raw = dict(o.params)
    if o.epochs is not None:
        raw["epochs"] = str(o.epochs)
    no_data: list[str] = []
    if o.data is None:
        free = [n for n in names if not RECIPES.get(n).needs_data]
        if not free or (not skips and len(free) < len(names)):
            data_free = ", ".join(n for n in RECIPES.names() if not RECIPES.get(n).needs_data)
            needs = next(n for n in names if RECIPES.get(n).needs_data)
            raise CleanseError(
                f"--data is required for {needs}: the DATA to draw the clean subset from (e.g. the training "
                f"folder); only the data-free recipes ({data_free}) run without it"
            )
        no_data, names = [n for n in names if n not in free], free
    if not skips and o.trigger is None:
        for name in names:
            if RECIPES.get(name).needs_trigger:
                raise CleanseError(NEEDS_TRIGGER.format(name=name))
    if launched() and not several and not RECIPES.get(names[0]).data_parallel:
        parallel = ", ".join(n for n in RECIPES.names() if RECIPES.get(n).data_parallel)
        raise CleanseError(
            f"{names[0]} does not split its batches over torchrun's ranks (those that do: {parallel}); run it in "
            "one process, or use --method all (or a list of recipes) under torchrun to give each rank whole recipes"
        )
    skipped = [n for n in names if RECIPES.get(n).needs_trigger and o.trigger is None]
    names = [n for n in names if n not in skipped]
    skipped = sorted(no_data + skipped)
    params = {n: _params_for(n, raw, several) for n in names}
    unknown = sorted(set(raw) - {k for n in names for k in RECIPES.get(n).params})
    if several and unknown:
        raise CleanseError(f"no recipe has a parameter {unknown[0]!r}; see docs/recipes/ for each recipe's parameters")
    stem = Path(o.model_path).stem
    if several:
        base = str(o.output).removesuffix(".safetensors") if o.output else str(Path(o.model_path).with_name(stem))
        outputs = {n: Path(f"{base}.{n}.safetensors") for n in names}
    else:
        outputs = {names[0]: o.output or Path(o.model_path).with_name(f"{stem}.{names[0]}.safetensors")}
    budget = None if o.memory_budget is None else parse_memory(o.memory_budget)
    return _Plan(names, skipped, params, outputs, several, set(raw), no_data, budget, skips=skips)


def unlearn(options: UnlearnOptions, settings: RunSettings | None = None, progress: Progress = SILENT) -> UnlearnResult:
    o, s = options, settings or RunSettings()
    started = time.perf_counter()
    plan = _plan(o)
    names, several = plan.names, plan.several
    dev = s.rank_device()  # under torchrun: joins the process group (this rank's device)
    ranks = current()
    if not ranks.main:  # one live table, one set of notes: rank 0's
        progress = SILENT
    guarded = (o.model_path, o.data, o.test, str(o.trigger) if o.trigger else None, *map(str, o.eval_triggers))
    for path in [p for out in plan.outputs.values() for p in (out, record_path(out))]:
        check_output(path, force=s.force, inputs=guarded)
    state_path = resume_path(plan.outputs[names[0]])
    state = _resume_state(names, o, s.force, state_path)
    checkpoint_every = o.checkpoint_every
    if checkpoint_every is None and state is not None:
        checkpoint_every = state.extra.get("checkpoint_every")
    if checkpoint_every is not None:
        check_output(state_path, force=True, inputs=guarded)
    loaded = _load(o, s, dev, plan, progress)
    model, split, trig = loaded.model, loaded.split, loaded.trigger
    split_by = plan.ranks_split(ranks)
    if split_by == "batches":
        model.net = sync_batchnorm(model.net, dev, ranks)  # CUDA: BatchNorm over the global batch
        progress.note(f"{names[0]} splits each batch over {ranks.world} ranks; rank 0 measures and writes")
    mine = [names[i] for i in turns(len(names), ranks)] if split_by == "recipes" else names
    if split_by == "recipes":
        progress.note(f"{len(names)} recipes over {ranks.world} ranks, whole recipes each; rank 0 runs {mine}")
    before = loaded.measure()
    memory = _memory_plan(loaded, plan.memory_budget, ranks if split_by == "batches" else SINGLE, state)
    if memory is not None:
        progress.note(
            f"a training forward holds at most {memory.rows_per_forward()} images "
            f"({format_bytes(memory.forward_budget)}, {format_bytes(memory.per_image)} an image)"
        )
    start_state = copy.deepcopy(model.net.state_dict())
    inputs = {
        "model": describe_input(o.model_path),
        "data": describe_input(o.data),
        "trigger": describe_input(o.trigger),
        "test": describe_input(o.test),
        "eval_triggers": [describe_input(p) for p in o.eval_triggers],
    }
    subset = {
        "train_index": split.train_index.tolist() if split else None,
        "held_index": split.held_index.tolist() if split else None,
        "filtered_with_ground_truth": split.filtered if split else None,
        "test_rows_dropped": loaded.test_dropped,
    }
    facts = {
        "model": inputs["model"],
        "data": inputs["data"],
        "trigger": inputs["trigger"],
        "method": names[0],
        "params": plan.params[names[0]],
        "clean_frac": o.clean_frac,
        "clean_n": o.clean_n,
        "seed": s.seed,
        "precision": loaded.precision,
        "tar_layer": loaded.layer,
        "subset": _subset_digest(split) if split else None,
        "memory_budget": plan.memory_budget,
    }
    if state is not None:
        check_same_run(state.extra, facts, UNLEARN_RUN_FACTS, state_path)
        progress.note(f"resuming {names[0]} from {state_path} after pass {state.passes} over the clean subset")

    def save_state(snapshot: RecipeState) -> None:
        rows = memory.rows_per_forward() if memory is not None else None  # a resumed run cuts its batches alike
        snapshot.extra = {**facts, "checkpoint_every": checkpoint_every, "images_per_forward": rows}
        save_recipe_state(state_path, snapshot)

    checkpoints = Checkpoints(checkpoint_every or 0, save_state if checkpoint_every and ranks.main else None, state)
    resumable = ranks.main and open_resume_file(state_path, checkpoint_every, state is not None, progress)
    shared = _Facts(
        o,
        s,
        plan,
        loaded,
        inputs,
        subset,
        checkpoint_every,
        state,
        ranks.world if split_by == "batches" else 1,
        memory,
    )
    finished: list[_Finished] = []
    for name in mine:
        model.net.load_state_dict(start_state)
        recipe_started = time.perf_counter()
        ctx = RecipeContext(
            model,
            split,
            trig,
            plan.params[name],
            callback=lambda e: None,
            precision=loaded.precision,
            seed=s.seed,
            tar_layer=loaded.layer,
            checkpoints=checkpoints if not several else Checkpoints(),
            ranks=ranks if split_by == "batches" else SINGLE,
            memory=memory,
        )
        with progress.loop("unlearn", f"unlearn {name}") as callback:
            ctx.callback = callback
            result = RECIPES.get(name).run(ctx)
        model.eval()
        after = loaded.measure()
        wall = time.perf_counter() - (started if not several else recipe_started)
        summary, provenance, record = _outcome(shared, name, result, before, after, wall)
        weights = {k: v.detach().to("cpu", copy=True) for k, v in model.net.state_dict().items()}
        finished.append(_Finished(name, summary, provenance, record, weights))
        if split_by != "recipes":
            progress.finished(RecipeOutcome(summary))
    if split_by == "recipes":  # every rank's recipes, to rank 0, in the plan's order
        gathered = gather_to_rank_0(finished, ranks)
        finished = sorted((f for part in gathered or [] for f in part), key=lambda f: names.index(f.name))
        for done in finished:
            progress.finished(RecipeOutcome(done.summary))
    if ranks.main:  # under torchrun the other ranks hold the same weights (batches) or sent theirs (recipes)
        _write(model, plan, finished)
        close_resume_file(state_path, resumable, progress)
    summaries = {f.name: f.summary for f in finished}
    return UnlearnResult(
        summaries, before, loaded.report_name, plan.skipped, several, plan.outputs, time.perf_counter() - started
    )


@dataclass
class _Finished:
    """One recipe's finished run: its summary, checkpoint provenance, run record and weights (on the CPU)."""

    name: str
    summary: dict[str, Any]
    provenance: dict[str, Any]
    record: dict[str, Any]
    weights: dict[str, torch.Tensor]


@dataclass
class _Loaded:
    """What the recipes work on and are measured with: the model, the clean split, the triggers and the report set."""

    model: ClassifierModel
    split: CleanSplit | None  # None without --data (data-free recipes only)
    trigger: Trigger | None
    extra_triggers: dict[str, Trigger]
    report_on: Dataset | None  # None: neither --data nor --test, so no before/after figures
    report_name: str
    test_dropped: int
    layer: str | None  # the TAR layer; None when no trigger is given or the model has no Grad-CAM layer
    device: torch.device
    precision: str

    def measure(self) -> dict[str, Any]:
        """The before/after figures of the model as it stands, on the report set (all null without one)."""
        if self.report_on is None:
            return unmeasured()
        return measure(self.model, self.report_on, self.trigger, self.layer, self.extra_triggers)


def _load(o: UnlearnOptions, s: RunSettings, dev: torch.device, plan: _Plan, progress: Progress) -> _Loaded:
    """Load and check the model, triggers, clean subset and test set; say what the recipes will learn from."""
    prec = resolve_precision(o.precision, dev)
    model = load_job_model(o.model_path, o.model, dev, progress)
    channels, height, width = model.spec.input_size
    trig = load_trigger(o.trigger) if o.trigger else None
    measure_layer = tar_layer_for(model, o.layer, progress) if trig is not None or o.layer is not None else None
    need_trigger = [n for n in plan.skipped if n not in plan.no_data]
    for name in list(plan.names):
        plan.params[name] = RECIPES.get(name).for_model(model, plan.params[name], plan.given)
        RECIPES.get(name).check(plan.params[name], trig)
        try:
            RECIPES.get(name).check_model(model, plan.params[name])
        except CleanseError as refusal:
            if not plan.skips:
                raise
            plan.names.remove(name)  # --method all runs the recipes that apply to this architecture
            plan.skipped.append(name)
            progress.note(f"skipped {name}: {refusal}")
    if not plan.names:
        raise CleanseError(
            f"no recipe applies to this model here ({', '.join(sorted(plan.skipped))} skipped, see above); "
            "give --data and --trigger to run the others"
        )
    extra_triggers = {p.name: load_trigger(p) for p in o.eval_triggers}
    for t in [trig, *extra_triggers.values()]:
        if t is not None:
            t.check_size(channels, height, width, what="the model's inputs")
            t.check_classes(model.spec.num_classes)
    split = None
    if o.data is not None:
        source = load_data(o.data, cache=not o.no_cache, image_size=(height, width), preprocess=model.spec.preprocess)
        check_classes(model, source, o.data)
        split = clean_subset(source, o.clean_frac, o.clean_n, s.seed)
    test_data, test_dropped = (
        load_clean(o.test, "test", o.no_cache, (height, width), model.spec.preprocess) if o.test else (None, 0)
    )
    if test_data is not None and o.test is not None:
        check_classes(model, test_data, o.test)
    report_on: Dataset | None
    if test_data is not None:
        report_on, report_name = test_data, f"--test {o.test}"
    elif split is not None:
        report_on, report_name = split.held, "the held-back clean images"
    else:
        report_on, report_name = None, "no images (no --data or --test given)"
    if split is not None:
        progress.note(
            f"clean subset: {len(split.train)} images to learn from, {len(split.held)} held back "
            f"({split.filtered} rows dropped as marked poisoned/noise); before/after on {report_name}"
        )
    else:
        progress.note(
            f"no --data: no clean subset, so no held-back figures; before/after on {report_name}"
            + (
                f"; only the data-free recipes run ({', '.join(plan.names)}), skipped {', '.join(plan.no_data)}: "
                "they need --data"
                if plan.no_data
                else ""
            )
        )
    if need_trigger:
        progress.note(
            f"skipped {', '.join(need_trigger)}: they need a trigger (--trigger from `cleanse poison`, "
            "or reversed by `cleanse scan`)"
        )
    return _Loaded(model, split, trig, extra_triggers, report_on, report_name, test_dropped, measure_layer, dev, prec)


@dataclass
class _Facts:
    """What every recipe's summary and run record repeat: the options, the plan, the loaded inputs, the resume state."""

    options: UnlearnOptions
    settings: RunSettings
    plan: _Plan
    loaded: _Loaded
    inputs: dict[str, Any]
    subset: dict[str, Any]
    checkpoint_every: int | None
    state: RecipeState | None
    ranks: int  # torchrun processes that split each batch (1: one process, or whole recipes per rank)
    memory: MemoryPlan | None  # what one training forward may hold (None: a data-free run)


def _memory_plan(loaded: _Loaded, budget: int | None, ranks: Ranks, state: RecipeState | None) -> MemoryPlan | None:
    """What one training forward may hold (None without --data): --memory-budget (or half the device's free memory),
    and on a CPU at most CPU_FORWARD_BYTES; the recipes that step in pieces (`RecipeRun.step_pieces`) cut their
    batches to fit. Ranks that split each batch take the smallest rank's plan, so that they cut their shards into
    the same number of pieces; a resumed run takes the interrupted run's images per forward, so that it cuts its
    batches alike whatever memory is free now."""
    if loaded.split is None:
        return None
    try:
        plan = plan_memory(loaded.model.net, loaded.model.spec.input_size, loaded.precision, budget, training=True)
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        raise CleanseError(
            f"out of memory on {loaded.device} before unlearning began (measuring one image's cost); free memory on "
            "the device or choose another --device"
        ) from None
    if ranks.parallel:
        plans = gather_to_rank_0(plan, ranks)
        plan = from_rank_0(min(plans, key=lambda p: p.rows_per_forward()) if plans else plan, ranks)
    kept = state.extra.get("images_per_forward") if state is not None else None
    if kept is not None and kept != plan.rows_per_forward():
        plan = replace(
            plan, budget=kept * plan.per_image, source="the interrupted run's (--resume)", forward_bytes=None
        )
    return plan


def _memory_json(memory: MemoryPlan | None, name: str) -> dict[str, Any] | None:
    """The memory plan as the run record keeps it, with whether this recipe cuts its batches to fit it."""
    if memory is None:
        return None
    pieces = RECIPES.get(name).steps_in_pieces
    return {**memory.to_json(), "images_per_forward": memory.rows_per_forward(), "steps_in_pieces": pieces}


def _outcome(
    facts: _Facts, name: str, result: RecipeResult, before: dict[str, Any], after: dict[str, Any], wall: float
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """One recipe's summary (what --json prints), checkpoint provenance and run record."""
    o, s, plan, loaded, state = facts.options, facts.settings, facts.plan, facts.loaded, facts.state
    model = loaded.model
    retention = (after["clean_accuracy"] / before["clean_accuracy"]) if before["clean_accuracy"] else None
    summary = {
        "method": name,
        "classes": model.spec.classes,
        "before": before,
        "after": after,
        "der": der(before, after),
        "ca_retention": retention,
        "wall_seconds": wall,
        "measured_on": loaded.report_name,
        "output": str(plan.outputs[name]),
        "kept": result.kept,
        "extra": result.extra,
    }
    provenance = {
        "command": "unlearn",
        "recipe": name,
        "params": plan.params[name],
        "seed": s.seed,
        "parent_sha256": model.source_sha256,
        "parent": o.model_path,
        "version": versions()["cleanse"],
    }
    record = new_record(
        "unlearn",
        inputs=facts.inputs,
        parameters={
            "method": name,
            "params": plan.params[name],
            "clean_frac": o.clean_frac,
            "clean_n": o.clean_n,
            "seed": s.seed,
            "tar_layer": loaded.layer,
            "precision": loaded.precision,
            "all": plan.several,
            "checkpoint_every": facts.checkpoint_every,
            "resumed_after_pass": state.passes if state else None,
            "ranks": facts.ranks,
            "memory_budget": plan.memory_budget,
        },
        memory=_memory_json(facts.memory, name),
        clean_subset=facts.subset,
        before=before,
        after=after,
        der=summary["der"],
        ca_retention=retention,
        kept=result.kept,
        history=result.history,
        notes=result.notes,
        extra=result.extra,
        timings={"wall_seconds": wall},
        versions=versions(loaded.device),
        outputs={"model": str(plan.outputs[name])},
    )
    return summary, provenance, record


def _write(model: ClassifierModel, plan: _Plan, finished: list[_Finished]) -> None:
    """Every recipe's checkpoint and run record, all or none."""
    with output_set() as out:
        for done in finished:
            path = plan.outputs[done.name]
            model.net.load_state_dict(done.weights)
            written = out.reserve(path)
            save_model(model, written, done.provenance)
            # lets `report` recognise scans of it after the file is gone
            done.record["outputs"]["model_sha256"] = sha256_file(written)
            write_json_atomic(out.reserve(record_path(path)), done.record)


def _method_names(method: str) -> list[str]:
    """--method: one recipe, a comma-separated list of recipes (registry order, each once), or all."""
    if method == "all":
        return RECIPES.names()
    wanted = [m.strip() for m in method.split(",") if m.strip()]
    for name in wanted or [method]:
        if name not in RECIPES:
            raise CleanseError(
                f"unknown recipe {name!r}; choose one or more (comma-separated) of: {', '.join(RECIPES.names())}, "
                "or all"
            )
    chosen = {RECIPES.get(m).name for m in wanted}
    return [n for n in RECIPES.names() if n in chosen]


def _check_resume_options(method: str, checkpoint_every: int | None, resume: bool) -> None:
    """--checkpoint-every/--resume work for one recipe that makes passes over the clean subset."""
    if checkpoint_every is None and not resume:
        return
    flag = "--resume" if resume else "--checkpoint-every"
    if checkpoint_every is not None and checkpoint_every < 1:
        raise CleanseError(
            f"--checkpoint-every {checkpoint_every} must be at least 1 (passes over the clean subset between "
            "checkpoints)"
        )
    if method == "all":
        raise CleanseError(f"{flag} takes one recipe, not several; run the recipes one at a time with --method NAME")
    if not RECIPES.get(method).resumable:
        able = ", ".join(n for n in RECIPES.names() if RECIPES.get(n).resumable)
        raise CleanseError(
            f"{method} cannot be checkpointed (its work is not a series of passes over the clean subset); "
            f"drop {flag}, or use one of: {able}"
        )


def _resume_state(names: list[str], o: UnlearnOptions, force: bool, state_path: Path) -> RecipeState | None:
    """The checkpoint to continue from (--resume), after checking the files present."""
    check_resume_file(state_path, o.checkpoint_every, o.resume, force)
    if not o.resume:
        return None
    state = load_recipe_state(state_path)
    if state.recipe != names[0]:
        raise CleanseError(
            f"{state_path}: the checkpoint is of recipe {state.recipe}, this run is {names[0]}; "
            f"rerun with --method {state.recipe}, or without --resume"
        )
    return state


def _subset_digest(split: CleanSplit) -> str:
    """Names the clean subset: a DATA folder whose contents changed gives another digest."""
    return hashlib.sha256(split.train_index.numpy().tobytes() + b"|" + split.held_index.numpy().tobytes()).hexdigest()[
        :16
    ]


def _params_for(name: str, raw: dict[str, str], several: bool) -> dict[str, Any]:
    """The recipe's parameters; with --method all each recipe takes the --param names it knows."""
    recipe = RECIPES.get(name)
    return recipe.resolve_params({k: v for k, v in raw.items() if k in recipe.params} if several else raw)
