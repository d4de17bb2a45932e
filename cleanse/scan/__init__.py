"""Backdoor detectors: Neural-Cleanse trigger reverse-engineering (model) and data audits (spectral, clustering)."""

from cleanse.scan.anomaly import anomaly_index, flag_small
from cleanse.scan.audit import AUDITS, audit_data
from cleanse.scan.neural_cleanse import ModelScan, scan_model
from cleanse.scan.reverse import BUDGETS, Budget, reverse_triggers

__all__ = [
    "AUDITS",
    "BUDGETS",
    "Budget",
    "ModelScan",
    "anomaly_index",
    "audit_data",
    "flag_small",
    "reverse_triggers",
    "scan_model",
]
