"""The scan's detectors, registered in one place: import this package to fill `DETECTORS`."""

from cleanse.scan.detectors import mmbd, reversal  # noqa: F401  (registration)
from cleanse.scan.detectors.base import DETECTORS, Detector, DetectorReport, ScanInputs

__all__ = ["DETECTORS", "Detector", "DetectorReport", "ScanInputs"]
