"""Run records -> report.json, report.md and a self-contained report.html, with plots and Grad-CAM sheets."""

from cleanse.report.build import build
from cleanse.report.collect import Record, find_records

__all__ = ["Record", "build", "find_records"]
