"""One verdict from several detectors (the rule docs/commands/scan.md states).

- A class a **reverse-engineering** detector flags counts: it comes with a small trigger that works on held-out
  clean images, evidence of its own.
- A class only a **data-free** detector (MM-BD) flags counts alone when no reverse-engineering detector ran (no
  clean data). When they ran, it counts only if one of them corroborates it: places it on the small side with an
  anomaly index of at least CORROBORATION (a lower bar than the flagging threshold: two weaker signals on the same
  class). Otherwise it is reported as `unconfirmed` and does not make the model suspected. Measured on CIFAR-10
  (benchmarks/README.md): MM-BD alone flagged a cleanly trained plain-SGD model (p = 0.0009) and named class 3 of
  the WaNet model whose target is 5; it also found the kept SIG model's target (p = 8e-16), which the additive
  reversal placed smallest (z 2.46).
- The model is **suspected** (exit 1) when some class counts; targets are ordered by how many detectors flag them,
  then by the strongest evidence (largest anomaly index, smallest p-value).
"""

from __future__ import annotations

from typing import Any

from cleanse.scan.detectors.base import DetectorReport

CORROBORATION = 2.0
RULE = (
    "suspected if a reverse-engineering detector flags a class, or a data-free detector flags one that no "
    f"reverse-engineering detector ran for or that one of them places on the small side at z >= {CORROBORATION:g}"
)


def _strength(report: DetectorReport, c: int) -> float:
    score = float(report.classes[c]["score"])
    return score if report.score_name == "anomaly_index" else -score


def corroborates(row: dict[str, Any]) -> bool:
    """A reverse-engineering detector's class row that places the class on the small side at z >= CORROBORATION."""
    return bool(row["small_side"]) and row["score"] >= CORROBORATION


def _corroborated(c: int, reports: dict[str, DetectorReport], reversal: set[str]) -> bool:
    rows = [reports[n].classes[c] for n in reversal]
    return not rows or any(corroborates(r) for r in rows)


def combine(reports: dict[str, DetectorReport], reversal: set[str]) -> dict[str, Any]:
    """The combined verdict over `reports`; `reversal` names the reverse-engineering detectors among them."""
    evidence: dict[int, list[str]] = {}
    for name, report in reports.items():
        for c in report.flagged:
            evidence.setdefault(c, []).append(name)
    counted = [c for c, names in evidence.items() if reversal & set(names) or _corroborated(c, reports, reversal)]

    def order(c: int) -> tuple[int, float]:
        names = evidence[c]
        return -len(names), -max(_strength(reports[n], c) for n in names)

    return {
        "backdoored": bool(counted),
        "suspected_targets": sorted(counted, key=order),
        "unconfirmed": sorted((c for c in evidence if c not in counted), key=order),
        "evidence": {str(c): evidence[c] for c in sorted(evidence)},
        "rule": RULE,
    }
