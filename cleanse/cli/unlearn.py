"""`cleanse unlearn`: remove a backdoor with a small clean sample, showing CA, ASR and TAR live."""
from __future__ import annotations

import copy
import hashlib
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import torch
import typer
from rich.table import Table

from cleanse.attacks import Trigger, load_trigger
from cleanse.cli.common import (SESSION, DebugOpt, DeviceOpt, ForceOpt, JsonOpt, NoCacheOpt, ParamOpt, PrecisionOpt, QuietOpt,
                                SeedOpt, emit_json, fmt_rate, parse_params, say, start)
from cleanse.cli.model_opts import (ArchArgOpt, ArchOpt, ClassesOpt, InputSizeOpt, MeanOpt, NumClassesOpt, PresetOpt, StdOpt,
                                    load_cli_model)
from cleanse.cli.render import Monitor, float_cell, rate_cell, seconds_cell, show
from cleanse.cli.train import check_classes, check_same_run, load_clean, resume_path
from cleanse.data import Dataset, load_data
from cleanse.data.subset import clean_subset
from cleanse.engine.device import resolve_device, resolve_precision
from cleanse.engine.evaluate import der, evaluate
from cleanse.engine.gradcam import resolve_layer, tar_layer
from cleanse.engine.tar import measure_tar
from cleanse.errors import CleanseError
from cleanse.files import check_output, output_set, sha256_file, write_json_atomic
from cleanse.models import ClassifierModel, save_model
from cleanse.recipes import RECIPES, RecipeContext
from cleanse.recipes.base import NEEDS_TRIGGER
from cleanse.recipes.resume import Checkpoints, RecipeState, load_recipe_state, save_recipe_state
from cleanse.record import describe_input, new_record, record_path, versions

METHOD_HELP = ("Recipe: " + "; ".join(f"{n} ({RECIPES.get(n).summary})" for n in RECIPES.names())
               + "; all (every recipe on the same clean subset, one checkpoint each, one comparison table)")
UNLEARN_COLUMNS = [("phase", "phase", str), ("epoch", "epoch", float_cell), ("loss", "loss", float_cell),
                   ("clean_ce", "clean CE", float_cell), ("ascent", "ascent", float_cell), ("ewc", "EWC", float_cell),
                   ("clean_accuracy", "held CA", rate_cell), ("attack_success_rate", "held ASR", rate_cell),
                   ("tar", "held TAR", float_cell), ("detail", "recipe figures", str),
                   ("elapsed", "elapsed", seconds_cell)]
SUMMARY_KEYS = ("clean_accuracy", "attack_success_rate", "robust_accuracy", "tar", "tar_median", "attention_share", "clean_tar",
                "per_class_accuracy")
SHOWN_CLASS_CHANGES = 3  # the summary names the classes whose clean accuracy changed most


def measure(model: ClassifierModel, data: Dataset, trigger: Trigger | None, layer: str,
            eval_triggers: dict[str, Trigger] | None = None) -> dict[str, Any]:
    """CA/ASR/RA and TAR figures (all keys present, null when undefined), plus reporting-only ASR/RA per --eval-trigger."""
    m = evaluate(model, data, trigger)
    out = {k: m.get(k) for k in SUMMARY_KEYS}
    if eval_triggers:
        out["eval_triggers"] = {}
        for name, extra in eval_triggers.items():
            e = evaluate(model, data, extra)
            out["eval_triggers"][name] = {"attack_success_rate": e["attack_success_rate"], "robust_accuracy": e["robust_accuracy"]}
    if trigger is not None:
        t = measure_tar(model, data.images, data.labels, trigger, layer)
        out.update({"tar": t["tar"], "tar_median": t["tar_median"], "attention_share": t["attention_share"],
                    "clean_tar": t["clean_tar"], "cam_shift": t["cam_shift"]})
    return out


def unlearn_command(
    model_path: Annotated[str, typer.Argument(metavar="MODEL", help="Model to clean (.safetensors, or a raw state dict with --arch ...).")],
    method: Annotated[str, typer.Option("--method", help=METHOD_HELP)] = "tar-ewc",
    data: Annotated[Optional[str], typer.Option("--data", help="DATA to draw the clean subset from (rows marked poisoned are dropped).")] = None,
    clean_frac: Annotated[Optional[float], typer.Option("--clean-frac", help="Fraction of DATA's clean rows to use, e.g. 0.05.")] = None,
    clean_n: Annotated[Optional[int], typer.Option("--clean-n", help="Number of clean images to use in all.")] = None,
    trigger: Annotated[Optional[Path], typer.Option("--trigger", help="Trigger file (true from `poison`, or reversed by `scan`).")] = None,
    test: Annotated[Optional[str], typer.Option("--test", help="Held-out DATA for the before/after report (never used for decisions).")] = None,
    eval_trigger: Annotated[Optional[list[Path]], typer.Option("--eval-trigger", help="Extra trigger file for reporting-only ASR/RA (repeatable), e.g. the true trigger when cleaning with a reversed one.")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="The recipe's main budget (see docs/recipes/).")] = None,
    param: ParamOpt = None,
    layer: Annotated[Optional[str], typer.Option("--layer", help="Layer for TAR (default: deepest block output >= input/8).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Cleaned checkpoint (default <model stem>.<method>.safetensors).")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option("--checkpoint-every", metavar="N",
                                help="Every N passes over the clean subset save a resumable checkpoint to OUT.resume.safetensors "
                                     "(removed at the end; finetune, tar-ewc, ulrl, sau).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run from OUT.resume.safetensors; "
                                         "the rest of the command line must be the interrupted run's.")] = False,
    arch: ArchOpt = None,
    arch_arg: ArchArgOpt = None,
    num_classes: NumClassesOpt = None,
    input_size: InputSizeOpt = None,
    preset: PresetOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    classes: ClassesOpt = None,
    precision: PrecisionOpt = "auto",
    no_cache: NoCacheOpt = False,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Remove a backdoor with a small clean subset; exit 0 when it finishes, whatever the outcome (see the JSON).

    --method all runs every recipe on the same clean subset, writes OUT.<method>.safetensors for each and prints one
    comparison table ({"recipes": {name: summary}} with --json).
    """
    start(debug=debug, quiet=quiet, json_out=json_out)
    started = time.perf_counter()
    run_all = method == "all"
    if not run_all and method not in RECIPES:
        raise CleanseError(f"unknown recipe {method!r}; choose one of: {', '.join(RECIPES.names())}, or all")
    names = RECIPES.names() if run_all else [RECIPES.get(method).name]
    _check_resume_options(names[0] if not run_all else "all", checkpoint_every, resume)
    raw = parse_params(param)
    if epochs is not None:
        raw["epochs"] = str(epochs)
    if data is None:
        raise CleanseError("--data is required: the DATA to draw the clean subset from (e.g. the training folder)")
    if not run_all and RECIPES.get(method).needs_trigger and trigger is None:
        raise CleanseError(NEEDS_TRIGGER.format(name=method))
    skipped = [n for n in names if RECIPES.get(n).needs_trigger and trigger is None]
    names = [n for n in names if n not in skipped]
    params = {n: _params_for(n, raw, run_all) for n in names}
    unknown = sorted(set(raw) - {k for n in names for k in RECIPES.get(n).params})
    if run_all and unknown:
        raise CleanseError(f"no recipe has a parameter {unknown[0]!r}; see docs/recipes/ for each recipe's parameters")
    stem = Path(model_path).stem
    if run_all:
        base = str(output).removesuffix(".safetensors") if output else str(Path(model_path).with_name(stem))
        outputs = {n: Path(f"{base}.{n}.safetensors") for n in names}
    else:
        outputs = {names[0]: output or Path(model_path).with_name(f"{stem}.{names[0]}.safetensors")}
    inputs_given = (model_path, data, test, str(trigger) if trigger else None, *map(str, eval_trigger or []))
    for path in [p for o in outputs.values() for p in (o, record_path(o))]:
        check_output(path, force=force, inputs=inputs_given)
    state_path = resume_path(outputs[names[0]])
    state = _resume_state(names, checkpoint_every, resume, force, state_path)
    if checkpoint_every is None and state is not None:
        checkpoint_every = state.extra.get("checkpoint_every")
    if checkpoint_every is not None:
        check_output(state_path, force=True, inputs=inputs_given)
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    model = load_cli_model(model_path, dev, arch, num_classes, input_size, preset, mean, std, classes, arch_arg)
    channels, height, width = model.spec.input_size
    trig = load_trigger(trigger) if trigger else None
    for name in names:
        RECIPES.get(name).check(params[name], trig)
    extra_triggers = {p.name: load_trigger(p) for p in eval_trigger or []}
    for t in [trig, *extra_triggers.values()]:
        if t is not None:
            t.check_size(channels, height, width, what="the model's inputs")
            t.check_classes(model.spec.num_classes)
    source = load_data(data, cache=not no_cache, image_size=(height, width))
    check_classes(model, source, data)
    split = clean_subset(source, clean_frac, clean_n, seed)
    test_data, test_dropped = load_clean(test, "test", no_cache, (height, width)) if test else (None, 0)
    if test_data is not None:
        check_classes(model, test_data, test)  # type: ignore[arg-type]
    measure_layer = layer or tar_layer(model, model.spec.input_size)
    resolve_layer(model, measure_layer)
    report_on, report_name = (test_data, f"--test {test}") if test_data is not None else (split.held, "the held-back clean images")
    say(f"clean subset: {len(split.train)} images to learn from, {len(split.held)} held back "
        f"({split.filtered} rows dropped as marked poisoned/noise); before/after on {report_name}")
    if skipped:
        say(f"skipped {', '.join(skipped)}: they need a trigger (--trigger from `cleanse poison`, or reversed by `cleanse scan`)")
    before = measure(model, report_on, trig, measure_layer, extra_triggers)  # type: ignore[arg-type]
    start_state = copy.deepcopy(model.net.state_dict())
    inputs = {"model": describe_input(model_path), "data": describe_input(data), "trigger": describe_input(trigger),
              "test": describe_input(test), "eval_triggers": [describe_input(p) for p in eval_trigger or []]}
    subset = {"train_index": split.train_index.tolist(), "held_index": split.held_index.tolist(),
              "filtered_with_ground_truth": split.filtered, "test_rows_dropped": test_dropped}
    facts = {"model": inputs["model"], "data": inputs["data"], "trigger": inputs["trigger"], "method": names[0],
             "params": params[names[0]], "clean_frac": clean_frac, "clean_n": clean_n, "seed": seed, "precision": prec,
             "tar_layer": measure_layer, "subset": _subset_digest(split.train_index, split.held_index)}
    if state is not None:
        check_same_run(state.extra, facts, UNLEARN_RUN_FACTS, state_path)
        say(f"resuming {names[0]} from {state_path} after pass {state.passes} over the clean subset")

    def save_state(snapshot: RecipeState) -> None:
        snapshot.extra = {**facts, "checkpoint_every": checkpoint_every}
        save_recipe_state(state_path, snapshot)

    checkpoints = Checkpoints(checkpoint_every or 0, save_state if checkpoint_every else None, state)
    if checkpoint_every or state is not None:
        if state is None:
            state_path.unlink(missing_ok=True)  # --force: a stale checkpoint of another run must not be offered for --resume
        SESSION.resume_file = state_path
    summaries: dict[str, dict[str, Any]] = {}
    finished: list[tuple[Path, dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]] = []
    for name in names:
        model.net.load_state_dict(start_state)
        recipe_started = time.perf_counter()
        ctx = RecipeContext(model, split, trig, params[name], callback=lambda e: None, precision=prec, seed=seed, tar_layer=measure_layer,
                            checkpoints=checkpoints if not run_all else Checkpoints())
        with Monitor(f"unlearn {name}", UNLEARN_COLUMNS) as monitor:
            ctx.callback = monitor
            result = RECIPES.get(name).run(ctx)
        model.eval()
        after = measure(model, report_on, trig, measure_layer, extra_triggers)  # type: ignore[arg-type]
        wall = time.perf_counter() - (started if not run_all else recipe_started)
        retention = (after["clean_accuracy"] / before["clean_accuracy"]) if before["clean_accuracy"] else None
        summary = {"method": name, "classes": model.spec.classes, "before": before, "after": after, "der": der(before, after),
                   "ca_retention": retention,
                   "wall_seconds": wall, "measured_on": report_name, "output": str(outputs[name]), "kept": result.kept,
                   "extra": result.extra}
        provenance = {"command": "unlearn", "recipe": name, "params": params[name], "seed": seed, "parent_sha256": model.source_sha256,
                      "parent": model_path, "version": versions()["cleanse"]}
        record = new_record("unlearn", inputs=inputs,
                            parameters={"method": name, "params": params[name], "clean_frac": clean_frac, "clean_n": clean_n,
                                        "seed": seed, "tar_layer": measure_layer, "precision": prec, "all": run_all,
                                        "checkpoint_every": checkpoint_every, "resumed_after_pass": state.passes if state else None},
                            clean_subset=subset, before=before, after=after, der=summary["der"], ca_retention=retention,
                            kept=result.kept, history=result.history, notes=result.notes, extra=result.extra,
                            timings={"wall_seconds": wall}, versions=versions(dev), outputs={"model": str(outputs[name])})
        summaries[name] = summary
        finished.append((outputs[name], provenance, record, copy.deepcopy(model.net.state_dict())))
        _show_summary(summary)
        say(f"kept: {result.kept['tag']} ({result.kept['rule']})")
        if result.kept.get("unchanged"):
            say(f"warning: {name} kept none of its own states, so {outputs[name]} has the input model's weights: no state it reached "
                f"met its rule ({result.kept['rule']}); its rows above show what each state cost. Loosen the rule "
                "(--param ca_margin=0.05) or try another recipe (--method all compares them)", style="yellow")
    with output_set() as out:
        for path, provenance, record, state in finished:
            model.net.load_state_dict(state)
            written = out.reserve(path)
            save_model(model, written, provenance)
            record["outputs"]["model_sha256"] = sha256_file(written)  # lets `report` recognise scans of it after the file is gone
            write_json_atomic(out.reserve(record_path(path)), record)
    if checkpoint_every or state is not None:
        SESSION.resume_file = None
        state_path.unlink(missing_ok=True)  # the run is complete: its checkpoint is no longer needed
    wall = time.perf_counter() - started
    if run_all:
        _show_comparison(summaries, before, report_name)
        say(f"wrote {len(finished)} checkpoints ({', '.join(str(p) for p, *_ in finished)}) in {wall:.0f}s")
        if json_out:
            emit_json({"recipes": summaries, "skipped": skipped, "wall_seconds": wall})
    else:
        say(f"wrote {outputs[names[0]]} ({wall:.0f}s)")
        if json_out:
            emit_json(summaries[names[0]])


UNLEARN_RUN_FACTS = (("model", "MODEL"), ("data", "--data"), ("trigger", "--trigger"), ("method", "--method"),
                     ("params", "--param/--epochs"), ("clean_frac", "--clean-frac"), ("clean_n", "--clean-n"), ("seed", "--seed"),
                     ("precision", "--precision"), ("tar_layer", "--layer"), ("subset", "clean subset (DATA changed)"))


def _check_resume_options(method: str, checkpoint_every: int | None, resume: bool) -> None:
    """--checkpoint-every/--resume work for one recipe that makes passes over the clean subset."""
    if checkpoint_every is None and not resume:
        return
    flag = "--resume" if resume else "--checkpoint-every"
    if checkpoint_every is not None and checkpoint_every < 1:
        raise CleanseError(f"--checkpoint-every {checkpoint_every} must be at least 1 (passes over the clean subset between checkpoints)")
    if method == "all":
        raise CleanseError(f"{flag} takes one recipe, not --method all; run the recipes one at a time with --method NAME")
    if not RECIPES.get(method).resumable:
        able = ", ".join(n for n in RECIPES.names() if RECIPES.get(n).resumable)
        raise CleanseError(f"{method} cannot be checkpointed (its work is not a series of passes over the clean subset); "
                           f"drop {flag}, or use one of: {able}")


def _resume_state(names: list[str], checkpoint_every: int | None, resume: bool, force: bool, state_path: Path) -> RecipeState | None:
    """The checkpoint to continue from (--resume), after checking the files present."""
    if checkpoint_every is None and not resume:
        return None
    if not resume:
        if state_path.exists() and not force:
            raise CleanseError(f"{state_path}: a checkpoint of an interrupted run exists; pass --resume to continue it, or --force to start over")
        return None
    if not state_path.is_file():
        raise CleanseError(f"{state_path}: no checkpoint to resume from; run without --resume (with --checkpoint-every N to write one)")
    state = load_recipe_state(state_path)
    if state.recipe != names[0]:
        raise CleanseError(f"{state_path}: the checkpoint is of recipe {state.recipe}, this run is {names[0]}; "
                           f"rerun with --method {state.recipe}, or without --resume")
    return state


def _subset_digest(train_index: torch.Tensor, held_index: torch.Tensor) -> str:
    """Names the clean subset: a DATA folder whose contents changed gives another digest."""
    return hashlib.sha256(train_index.numpy().tobytes() + b"|" + held_index.numpy().tobytes()).hexdigest()[:16]


def _params_for(name: str, raw: dict[str, str], run_all: bool) -> dict[str, Any]:
    """The recipe's parameters; with --method all each recipe takes the --param names it knows."""
    recipe = RECIPES.get(name)
    return recipe.resolve_params({k: v for k, v in raw.items() if k in recipe.params} if run_all else raw)


def _show_comparison(summaries: dict[str, dict[str, Any]], before: dict[str, Any], measured_on: str) -> None:
    table = Table(title=f"all recipes, same clean subset, on {measured_on}", title_justify="left")
    for header in ("recipe", "CA", "ASR", "RA", "TAR", "DER", "wall"):
        table.add_column(header, justify="left" if header == "recipe" else "right")
    num = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    table.add_row("(before)", fmt_rate(before["clean_accuracy"]), fmt_rate(before["attack_success_rate"]),
                  fmt_rate(before["robust_accuracy"]), num(before["tar"]), "", "")
    for name, s in summaries.items():
        a = s["after"]
        table.add_row(name, fmt_rate(a["clean_accuracy"]), fmt_rate(a["attack_success_rate"]), fmt_rate(a["robust_accuracy"]),
                      num(a["tar"]), num(s["der"]), f"{s['wall_seconds']:.0f}s")
    show(table)


def _show_summary(s: dict[str, Any]) -> None:
    table = Table(title=f"{s['method']}: before -> after, on {s['measured_on']}", title_justify="left")
    for header in ("", "CA", "ASR", "RA", "TAR", "clean TAR"):
        table.add_column(header, justify="right" if header else "left")
    num = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for name in ("before", "after"):
        m = s[name]
        table.add_row(name, fmt_rate(m["clean_accuracy"]), fmt_rate(m["attack_success_rate"]), fmt_rate(m["robust_accuracy"]),
                      num(m["tar"]), num(m["clean_tar"]))
    show(table)
    for name in s["before"].get("eval_triggers", {}):
        b, a = s["before"]["eval_triggers"][name], s["after"]["eval_triggers"][name]
        say(f"--eval-trigger {name}: ASR {fmt_rate(b['attack_success_rate'])} -> {fmt_rate(a['attack_success_rate'])}, "
            f"RA {fmt_rate(b['robust_accuracy'])} -> {fmt_rate(a['robust_accuracy'])}")
    say(f"DER {num(s['der'])}, CA retention {num(s['ca_retention'])}, {s['wall_seconds']:.0f}s")
    changes = class_changes(s["before"]["per_class_accuracy"], s["after"]["per_class_accuracy"], s["classes"])
    if changes:
        say("largest per-class CA changes: " + ", ".join(f"{name} {points:+.1f}" for name, points in changes[:SHOWN_CLASS_CHANGES])
            + " points")


def class_changes(before: list[float | None], after: list[float | None], names: list[str]) -> list[tuple[str, float]]:
    """(class name, change of its clean accuracy in points), largest change first; classes without images left out."""
    pairs = [(name, 100 * (a - b)) for name, b, a in zip(names, before, after) if a is not None and b is not None]
    return sorted(pairs, key=lambda p: -abs(p[1]))
