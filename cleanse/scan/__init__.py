"""Backdoor detectors: model-level detectors (cleanse/scan/detectors/) and data audits (spectral, clustering)."""

from cleanse.scan.anomaly import anomaly_index, flag_small
from cleanse.scan.audit import AUDITS, audit_data
from cleanse.scan.reverse import BUDGETS, Budget, reverse_triggers

__all__ = [
    "AUDITS",
    "BUDGETS",
    "Budget",
    "anomaly_index",
    "audit_data",
    "flag_small",
    "reverse_triggers",
]
