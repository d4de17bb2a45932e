"""Turn run records into one report document: every figure the Markdown and HTML show, as data.

Images are written as PNG files beside the report and referenced by name in the
document (`images`); the HTML inlines them. A section that the records cannot
fill is listed under `missing` with the reason, never silently dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cleanse.files import sha256_file
from cleanse.report.collect import Record

METRICS = ("clean_accuracy", "attack_success_rate", "robust_accuracy", "tar", "attention_share", "clean_tar")


def _input(doc: dict[str, Any], key: str, field: str) -> str | None:
    """One field (`path`, `sha256`) of a record's `inputs[key]`; None when absent or malformed."""
    item = (doc.get("inputs") or {}).get(key)
    return item.get(field) if isinstance(item, dict) else None


def _model_entry(record: Record) -> dict[str, Any] | None:
    item = (record.doc.get("inputs") or {}).get("model")
    if isinstance(item, dict):
        found = locate(record, item.get("path"))  # where the file is now, when its folder was moved
        return {
            "path": str(found) if found else item.get("path"),
            "sha256": item.get("sha256"),
            "seen_by": record.command,
        }
    return None


def summary_rows(unlearn: list[Record]) -> list[dict[str, Any]]:
    rows = []
    for r in unlearn:
        d = r.doc
        method = (d.get("parameters") or {}).get("method")
        rows.append(
            {
                "method": method,
                "model": _input(d, "model", "path"),
                "output": (d.get("outputs") or {}).get("model"),
                "before": {k: (d.get("before") or {}).get(k) for k in METRICS},
                "after": {k: (d.get("after") or {}).get(k) for k in METRICS},
                "der": d.get("der"),
                "ca_retention": d.get("ca_retention"),
                "wall_seconds": (d.get("timings") or {}).get("wall_seconds"),
                "kept": (d.get("kept") or {}).get("tag"),
                "record": str(r.path),
            }
        )
    return rows


def scan_evidence(result: dict[str, Any]) -> tuple[list[dict[str, Any]] | None, dict[str, Any]]:
    """A scan.json's per-class summary rows and per-detector evidence; a scan.json written before scan had several
    detectors (one patch reversal, its fields in the class rows) is read as a patch-only scan."""
    if "detectors" in result or not result.get("classes"):
        return result.get("classes"), result.get("detectors") or {}
    patch = [
        {**c, "statistic": c["mask_l1"], "score": c["anomaly_index"], "flagged": bool(c.get("flagged"))}
        for c in result["classes"]
    ]
    rows = [
        {
            "index": c["index"],
            "name": c["name"],
            "flagged": c["flagged"],
            "flagged_by": ["patch"] if c["flagged"] else [],
            "patch": {"statistic": c["statistic"], "score": c["score"], "flagged": c["flagged"]},
        }
        for c in patch
    ]
    detectors = {
        "patch": {
            "score": "anomaly_index",
            "statistic": "mask_l1",
            "threshold": result.get("threshold"),
            "classes": patch,
        }
    }
    return rows, detectors


def scan_section(scans: list[Record]) -> list[dict[str, Any]]:
    out = []
    for r in scans:
        result = r.result()
        given = _input(r.doc, "model", "path")
        found = locate(r, given)
        entry: dict[str, Any] = {
            "record": str(r.path),
            "model": str(found) if found else given,
            "verdict": r.doc.get("verdict"),
            "model_sha256": _input(r.doc, "model", "sha256"),
            "created": r.doc.get("created"),
            "role": "audited",
            "result_file": str(r.folder / "scan.json"),
        }
        if result is None:
            entry["missing"] = f"scan.json is no longer beside {r.path}"
            kept = r.doc.get(
                "verdict"
            )  # the run record keeps the verdict, so the report's verdict line still counts it
            verdict = kept if isinstance(kept, dict) else {}
        else:
            verdict = result
            classes, detectors = scan_evidence(result)
            entry.update(
                {
                    "threshold": result.get("threshold"),
                    "budget": result.get("budget"),
                    "classes": classes,
                    "detectors": detectors,
                    "audit": result.get("audit"),
                    "wall_seconds": result.get("wall_seconds"),
                }
            )
            sheet = r.folder / "sheet.png"
            entry["sheet"] = str(sheet) if sheet.is_file() else None
        entry.update({"backdoored": verdict.get("backdoored"), "suspected_targets": verdict.get("suspected_targets")})
        out.append(entry)
    return out


def mark_cleaned_scans(scans: list[dict[str, Any]], unlearn: list[Record]) -> None:
    """Set each scan's `role` to "cleaned by METHOD" when the model it scanned is an unlearn record's output.

    Matched by content: the sha256 the scan recorded against the sha256 the unlearn record stored for its output
    (`outputs.model_sha256`; older records lack it, and then the output file is hashed where it is found: as
    written, else beside the record, since folders get moved). A scan whose sha256 is an unlearn record's *input*
    stays "audited" whatever file its path now resolves to. A scan without a recorded sha256 is matched by path."""
    by_sha: dict[str, str] = {}
    by_path: dict[Path, str] = {}
    inputs: set[str] = set()
    for r in unlearn:
        method = str((r.doc.get("parameters") or {}).get("method"))
        given = _input(r.doc, "model", "sha256")
        if given:
            inputs.add(str(given))
        outputs = r.doc.get("outputs") or {}
        found = locate(r, outputs.get("model"))
        if found and not found.is_file():
            found = None
        if found:
            by_path[found.resolve()] = method
        sha = outputs.get("model_sha256") or (sha256_file(found) if found else None)
        if sha:
            by_sha[sha] = method
    for scan in scans:
        sha = scan.get("model_sha256")
        if sha:
            if sha in by_sha and sha not in inputs:
                scan["role"] = f"cleaned by {by_sha[sha]}"
        elif scan.get("model") and Path(scan["model"]).exists():
            cleaner = by_path.get(Path(scan["model"]).resolve())
            if cleaner:
                scan["role"] = f"cleaned by {cleaner}"


def scan_verdict(scan: dict[str, Any]) -> str | None:
    if scan.get("backdoored") is None:
        return None
    return (
        ("backdoor suspected, target(s) " + ", ".join(map(str, scan["suspected_targets"])))
        if scan["backdoored"]
        else "no backdoor found"
    )


def overall_verdict(scans: list[dict[str, Any]]) -> tuple[str | None, bool | None]:
    """The report's verdict line and whether it flags a backdoor, from every scan with a verdict (from its scan.json,
    else, with that gone, from the verdict its run record kept; an audit-only scan has none).

    The verdict is about the audited model(s): a scan of a model that an unlearn record in the same report wrote
    is added after it ("after cleaning by tar-ewc: ..."), never taken for it. A model scanned twice (same sha256,
    else same path) counts once, by its latest record; several audited models are named one by one. `backdoored`
    is true when any audited model is flagged (when only cleaned models were scanned: any of those). Two records
    of one model with the same `created` second: the one found later (records are read in sorted path order) wins."""
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for scan in scans:
        if scan_verdict(scan) is None:
            continue
        key = (scan["role"], str(scan.get("model_sha256") or scan.get("model")))
        if key not in latest or str(scan.get("created") or "") >= str(latest[key].get("created") or ""):
            latest[key] = scan
    audited = [s for (role, _), s in latest.items() if role == "audited"]
    cleaned = [s for (role, _), s in latest.items() if role != "audited"]
    if not audited and not cleaned:
        return None, None
    parts = (
        [scan_verdict(audited[0])]
        if len(audited) == 1
        else [f"{n}: {scan_verdict(s)}" for n, s in zip(_names(audited), audited, strict=True)]
    )
    methods = [s["role"].removeprefix("cleaned by ") for s in cleaned]
    names = _names(cleaned)
    parts += [
        f"after cleaning ({m}{'' if methods.count(m) == 1 else ', ' + n}): {scan_verdict(s)}"
        for m, n, s in zip(methods, names, cleaned, strict=True)
    ]
    return "; ".join(str(p) for p in parts), any(bool(s["backdoored"]) for s in (audited or cleaned))


def _names(scans: list[dict[str, Any]]) -> list[str]:
    """Each scan's model by file name, or by its whole path where two share a name."""
    short = [Path(str(s.get("model"))).name for s in scans]
    return [n if short.count(n) == 1 else str(s.get("model")) for n, s in zip(short, scans, strict=True)]


def history_series(unlearn: list[Record]) -> dict[str, list[dict[str, Any]]]:
    """Per recipe: the held-back CA/ASR/TAR rows behind the live table, in order."""
    series = {}
    for r in unlearn:
        method = str((r.doc.get("parameters") or {}).get("method"))
        rows = [
            {
                "elapsed": h.get("elapsed"),
                "phase": h.get("phase"),
                "epoch": h.get("epoch"),
                **{k: h.get(k) for k in ("clean_accuracy", "attack_success_rate", "tar")},
            }
            for h in r.doc.get("history") or []
            if isinstance(h, dict)
        ]
        series[method if method not in series else f"{method} ({r.path.name})"] = rows
    return series


def provenance(records: list[Record]) -> list[dict[str, Any]]:
    out = []
    for r in records:
        d = r.doc
        out.append(
            {
                "record": str(r.path),
                "command": r.command,
                "argv": d.get("argv"),
                "created": d.get("created"),
                "inputs": {k: v for k, v in (d.get("inputs") or {}).items() if v},
                "parameters": d.get("parameters"),
                "versions": d.get("versions"),
                "timings": d.get("timings"),
                "outputs": d.get("outputs"),
            }
        )
    return out


def build(records: list[Record]) -> dict[str, Any]:
    by = {c: [r for r in records if r.command == c] for c in ("train", "scan", "unlearn", "explain", "demo", "poison")}
    models: dict[str, dict[str, Any]] = {}
    for r in records:
        entry = _model_entry(r)
        if entry and entry["path"]:
            models.setdefault(entry["path"], entry)
    scans = scan_section(by["scan"])
    mark_cleaned_scans(scans, by["unlearn"])
    verdict, backdoored = overall_verdict(scans)
    doc: dict[str, Any] = {
        "models": list(models.values()),
        "verdict": verdict,
        "backdoored": backdoored,
        "methods": [row["method"] for row in summary_rows(by["unlearn"])],
        "summary": summary_rows(by["unlearn"]),
        "training": [
            {
                "record": str(r.path),
                "output": (r.doc.get("outputs") or {}).get("model"),
                "metrics": r.doc.get("metrics"),
                "wall_seconds": (r.doc.get("timings") or {}).get("wall_seconds"),
            }
            for r in by["train"] + by["demo"]
        ],
        "scan": scans,
        "history": history_series(by["unlearn"]),
        "explain": [
            {
                "record": str(r.path),
                "set": (r.result() or {}).get("set"),
                "layer": (r.result() or {}).get("layer"),
                "model": _input(r.doc, "model", "path"),
                "sheet": str(r.folder / "sheet.png") if (r.folder / "sheet.png").is_file() else None,
            }
            for r in by["explain"]
        ],
        "provenance": provenance(records),
        "images": {},
        "missing": [],
    }
    if not by["scan"]:
        doc["missing"].append(
            {"section": "scan", "reason": "no scan record given: the verdict and anomaly plot need `cleanse scan`"}
        )
    for scan in scans:
        if scan.get("missing"):
            used = (
                "; the verdict line uses the verdict its run record kept" if scan.get("backdoored") is not None else ""
            )
            doc["missing"].append(
                {
                    "section": "scan",
                    "reason": f"{scan['missing']}: the per-class table and plots of the scan of "
                    f"{scan['model']} need it{used}",
                }
            )
    if not by["unlearn"]:
        doc["missing"].append(
            {
                "section": "unlearning",
                "reason": "no unlearn record given: before/after figures and history need `cleanse unlearn`",
            }
        )
    if not by["explain"] and not by["unlearn"]:
        doc["missing"].append(
            {"section": "gradcam", "reason": "no explain or unlearn record: Grad-CAM sheets need one"}
        )
    return doc


def locate(record: Record, name: str | None) -> Path | None:
    """A file a record names: as written, else by its name beside the record or its folder (a folder that was moved)."""
    if not name:
        return None
    path = Path(name)
    if path.exists():
        return path
    for folder in (record.folder, record.folder.parent):  # a folder output's record sits one level down
        if (folder / path.name).exists():
            return folder / path.name
    return None


def resolve_sources(record: Record) -> dict[str, Path | str | None]:
    """The files an unlearn record names (parent model, cleaned model, trigger, evaluation data)."""
    d = record.doc
    data = _input(d, "test", "path") or _input(d, "data", "path")
    return {
        "parent": locate(record, _input(d, "model", "path")),
        "cleaned": locate(record, (d.get("outputs") or {}).get("model")),
        "trigger": locate(record, _input(d, "trigger", "path")),
        "data": (locate(record, data) or data) if data else None,
    }
