"""One verdict from several detectors (the rule docs/commands/scan.md states).

- The model is **suspected** when any detector's own test flags a class.
- **Targets** come from the reverse-engineering detectors first: a class they flag has a small trigger that
  works on held-out clean images, evidence of its own. A class that only a data-free detector (MM-BD) flags is
  named a target only when no reverse-engineering detector flagged any class, either because none ran (no clean
  data) or because none found anything; otherwise it is listed as `also_flagged`, since MM-BD's largest margin
  can sit on another class than the attack's target (measured: on the kept CIFAR-10 WaNet model it named
  class 3 for target 5, benchmarks/README.md).
- Targets are ordered by how many detectors flag them, then by the strongest evidence (largest anomaly index,
  smallest p-value).
"""

from __future__ import annotations

from typing import Any

from cleanse.scan.detectors.base import DetectorReport

RULE = (
    "suspected if any detector flags a class; targets: the classes a reverse-engineering detector flags, else "
    "those a data-free detector flags"
)


def _strength(report: DetectorReport, c: int) -> float:
    score = float(report.classes[c]["score"])
    return score if report.score_name == "anomaly_index" else -score


def combine(reports: dict[str, DetectorReport], reversal: set[str]) -> dict[str, Any]:
    """The combined verdict over `reports`; `reversal` names the reverse-engineering detectors among them."""
    evidence: dict[int, list[str]] = {}
    for name, report in reports.items():
        for c in report.flagged:
            evidence.setdefault(c, []).append(name)
    by_reversal = [c for c, names in evidence.items() if reversal & set(names)]
    targets = by_reversal or list(evidence)

    def order(c: int) -> tuple[int, float]:
        names = evidence[c]
        return -len(names), -max(_strength(reports[n], c) for n in names)

    targets = sorted(targets, key=order)
    return {
        "backdoored": bool(evidence),
        "suspected_targets": targets,
        "also_flagged": sorted((c for c in evidence if c not in targets), key=order),
        "evidence": {str(c): evidence[c] for c in sorted(evidence)},
        "rule": RULE,
    }
