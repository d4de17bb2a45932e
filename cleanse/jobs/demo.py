"""The demo job: the whole story on built-in data: poison -> train -> scan -> unlearn -> explain -> report."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cleanse.attacks import poison_dataset
from cleanse.data import make_synthetic, save_dataset
from cleanse.engine.device import resolve_precision
from cleanse.engine.evaluate import evaluate
from cleanse.engine.train import TrainConfig, train_model
from cleanse.files import atomic_directory, write_json_atomic
from cleanse.jobs.explain import ExplainOptions, explain
from cleanse.jobs.inputs import RunSettings
from cleanse.jobs.progress import SILENT, Figures, Progress
from cleanse.jobs.report import ReportOptions, report
from cleanse.jobs.scan import ScanOptions, scan
from cleanse.jobs.unlearn import UnlearnOptions, unlearn
from cleanse.models import new_model, save_model
from cleanse.record import new_record, versions
from cleanse.training_defaults import data_normalization

QUICK_EPOCHS, QUICK_WIDTH = 6, "32,64,64"
STEPS = 6


@dataclass
class DemoOptions:
    output: Path = Path("cleanse-demo")
    quick: bool = False  # a smaller model, fewer epochs and scan steps (used by the tests)
    epochs: int = 0  # 0: 8, or 6 with quick


@dataclass
class DemoResult:
    verdict: str
    suspected_targets: list[int]
    row: dict[str, Any]  # the report's tar-ewc summary: before, after, der
    output: Path
    wall_seconds: float

    @property
    def report_file(self) -> Path:
        return self.output / "report" / "report.html"

    def to_json(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "suspected_targets": self.suspected_targets,
            "before": self.row["before"],
            "after": self.row["after"],
            "der": self.row["der"],
            "report": str(self.report_file),
            "output": str(self.output),
            "wall_seconds": self.wall_seconds,
        }


def demo(options: DemoOptions, settings: RunSettings | None = None, progress: Progress = SILENT) -> DemoResult:
    o, s = options, settings or RunSettings()
    started = time.perf_counter()
    dev = s.torch_device()
    inner = RunSettings(device=s.device, seed=s.seed)
    with atomic_directory(o.output, force=s.force) as folder:
        train = make_synthetic("train")
        test = make_synthetic("test")
        progress.note(
            f"1/{STEPS} poison: BadNets 3x3 white patch, target 0 ({train.classes[0]}), 10% of {len(train)} "
            "synthetic images"
        )
        poisoned, trigger = poison_dataset(train, "badnets", 0, 0.1, seed=s.seed)
        trigger_path = folder / "poisoned.trigger.safetensors"
        save_dataset(poisoned, folder / "poisoned.safetensors")
        trigger.save(trigger_path)
        n_epochs = o.epochs or (QUICK_EPOCHS if o.quick else 8)
        arch_args = {"width": QUICK_WIDTH} if o.quick else {}
        progress.note(
            f"2/{STEPS} train: cnn{' (quick width ' + QUICK_WIDTH + ')' if o.quick else ''}, {n_epochs} epochs"
        )
        mean, std = data_normalization(poisoned)
        model = new_model("cnn", 10, poisoned.classes, (3, 32, 32), mean, std, arch_args, seed=s.seed).to(dev)
        config = TrainConfig(epochs=n_epochs, precision=resolve_precision("auto", dev), seed=s.seed)
        with progress.loop("train", "train cnn", n_epochs) as callback:
            result = train_model(model, poisoned, config, test=test, trigger=trigger, callback=callback)
        metrics: dict[str, Any] = evaluate(model, test, trigger)
        progress.finished(Figures("backdoored model on synthetic:test", [("cnn", metrics)]))
        model_path = folder / "model.safetensors"
        save_model(model, model_path, {"command": "demo", "seed": s.seed, "epochs": n_epochs})
        write_json_atomic(
            folder / "model.safetensors.run.json",
            new_record(
                "train",
                inputs={"data": {"path": str(folder / "poisoned.safetensors")}},
                parameters={"attack": "badnets", "target": 0, "rate": 0.1, "quick": o.quick, **result["config"]},
                metrics=metrics,
                history=result["history"],
                versions=versions(dev),
                outputs={"model": str(model_path)},
                timings={"train_seconds": result["train_seconds"], "wall_seconds": time.perf_counter() - started},
            ),
        )

        detectors = ["patch"] if o.quick else None  # None: every detector (patch, additive, warp, mmbd)
        progress.note(
            f"3/{STEPS} scan: reverse a trigger of each family for every class, test the sizes"
            + ("" if o.quick else ", and MM-BD's data-free margin test")
        )
        scanned = scan(
            ScanOptions(
                str(model_path), data="synthetic:test", budget="fast", output=folder / "scan", detectors=detectors
            ),
            inner,
            progress,
        )
        progress.finished(scanned)
        found = list(scanned.doc["suspected_targets"])

        progress.note(
            f"4/{STEPS} unlearn: tar-ewc on 5% of the training images, with the true trigger"
            + (f" (scan also flagged class {found[0]} and wrote its reversed trigger)" if found else "")
        )
        cleaned = folder / "model.tar-ewc.safetensors"
        progress.finished(
            unlearn(
                UnlearnOptions(
                    str(model_path),
                    str(folder / "poisoned.safetensors"),
                    "tar-ewc",
                    clean_frac=0.05,
                    trigger=trigger_path,
                    test="synthetic:test",
                    output=cleaned,
                ),
                inner,
                progress,
            )
        )

        progress.note(f"5/{STEPS} explain: Grad-CAM of the same 8 test images before and after, clean and triggered")
        for name, path in (("before", model_path), ("after", cleaned)):
            progress.finished(
                explain(
                    ExplainOptions(
                        str(path), data="synthetic:test", trigger=trigger_path, n=8, output=folder / f"explain-{name}"
                    ),
                    inner,
                    progress,
                )
            )

    progress.note(f"6/{STEPS} report: one HTML file with the verdict, before/after, plots and provenance")
    # after the rename, so the report names the final paths
    reported = report(ReportOptions([str(o.output)], output=o.output / "report"), inner, progress)
    progress.finished(reported)
    row = reported.doc["summary"][0]
    return DemoResult(reported.doc["verdict"] or "not scanned", found, row, o.output, time.perf_counter() - started)
