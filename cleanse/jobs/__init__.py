"""The application layer: one function per job, a typed options object in, a result object out.

The CLI only parses flags into these options, calls the job with a Progress that renders, and
prints the result; `cleanse demo`, `cleanse report` and the benchmarks call the same functions.
See docs/python-api.md.
"""

from cleanse.jobs.demo import DemoOptions, DemoResult, demo
from cleanse.jobs.explain import ExplainOptions, ExplainResult, explain
from cleanse.jobs.inputs import RunSettings
from cleanse.jobs.poison import PoisonOptions, PoisonResult, poison
from cleanse.jobs.progress import SILENT, Figures, Progress
from cleanse.jobs.report import ReportOptions, ReportResult, report
from cleanse.jobs.scan import ScanOptions, ScanResult, scan
from cleanse.jobs.train import TrainOptions, TrainResult, train
from cleanse.jobs.unlearn import RecipeOutcome, UnlearnOptions, UnlearnResult, unlearn

# The jobs that split their work over torchrun's ranks; the CLI refuses every other command under torchrun.
SPLIT_OVER_RANKS = (train, scan, unlearn)

__all__ = [
    "SILENT",
    "SPLIT_OVER_RANKS",
    "DemoOptions",
    "DemoResult",
    "ExplainOptions",
    "ExplainResult",
    "Figures",
    "PoisonOptions",
    "PoisonResult",
    "Progress",
    "RecipeOutcome",
    "ReportOptions",
    "ReportResult",
    "RunSettings",
    "ScanOptions",
    "ScanResult",
    "TrainOptions",
    "TrainResult",
    "UnlearnOptions",
    "UnlearnResult",
    "demo",
    "explain",
    "poison",
    "report",
    "scan",
    "train",
    "unlearn",
]
