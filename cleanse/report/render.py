"""report.json -> report.md and a single self-contained report.html (images inlined, no external resource)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from cleanse.report.build import scan_verdict

# Each stylesheet line is split into adjacent literals to fit the line length; every line still ends in \n.
CSS = (
    "\n"
    "body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem auto;max-width:1100px;"
    "color:#222;padding:0 1rem}\n"
    "h1{font-size:1.6rem;margin-bottom:.2rem}h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}\n"
    "table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}"
    "th,td{border:1px solid #ccc;padding:.25rem .6rem;text-align:right}\n"
    "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
    ".verdict{font-size:1.2rem;padding:.6rem 1rem;border-radius:6px;display:inline-block}\n"
    ".bad{background:#fdecea;color:#a61b1b}.good{background:#e8f6ec;color:#1e6b34}.none{background:#eee}\n"
    ".missing{color:#8a6d3b;background:#fcf8e3;padding:.4rem .8rem;border-radius:4px}"
    "img{max-width:100%;border:1px solid #ddd;margin:.4rem 0}\n"
    "code{background:#f5f5f5;padding:0 .2rem}details{margin:.5rem 0}"
    "pre{background:#f7f7f7;padding:.6rem;overflow-x:auto;font-size:.8rem}\n"
)


def pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def num(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}"


def summary_table(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = [
        "method",
        "CA before",
        "CA after",
        "ASR before",
        "ASR after",
        "RA after",
        "TAR before",
        "TAR after",
        "DER",
        "wall",
    ]
    rows = []
    for r in doc["summary"]:
        b, a = r["before"], r["after"]
        rows.append(
            [
                str(r["method"]),
                pct(b["clean_accuracy"]),
                pct(a["clean_accuracy"]),
                pct(b["attack_success_rate"]),
                pct(a["attack_success_rate"]),
                pct(a["robust_accuracy"]),
                num(b["tar"]),
                num(a["tar"]),
                num(r["der"]),
                "-" if r["wall_seconds"] is None else f"{r['wall_seconds']:.0f}s",
            ]
        )
    return header, rows


def _role(scan: dict[str, Any]) -> str:
    return "" if scan.get("role", "audited") == "audited" else f" ({scan['role']})"


def scan_table(scan: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per class, one column per detector: its statistic and score (anomaly index z, or p-value)."""
    detectors = scan.get("detectors") or {}
    header = ["class", *(f"{n} ({d['statistic']})" for n, d in detectors.items()), "flagged by"]
    rows = []
    for c in scan.get("classes") or []:
        cells = []
        for n, d in detectors.items():
            e = c[n]
            score = f"p {e['score']:.2g}" if d["score"] == "p_value" else f"z {e['score']:.2f}"
            value = f"{e['statistic']:.3g}" if e.get("reached", True) else "not reached"
            cells.append(f"{value} ({score}){' *' if e['flagged'] else ''}")
        rows.append([f"{c['index']} {c['name']}", *cells, ", ".join(c.get("flagged_by") or [])])
    return header, rows


def trigger_table(scan: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Each reversed trigger of a flagged class: its family, size, held-out attack success, TAR and file."""
    header = ["class", "family", "size", "anomaly index", "ASR of reversed trigger (held out)", "TAR", "file"]
    rows = []
    for n, d in (scan.get("detectors") or {}).items():
        for c in d["classes"]:
            if c.get("flagged") and "attack_success_rate" in c:
                rows.append(
                    [
                        str(c["index"]),
                        n,
                        f"{c['statistic']:.3g} {d.get('size_unit', '')}".strip(),
                        f"{c['score']:.2f}",
                        pct(c.get("attack_success_rate")),
                        num(c.get("tar")),
                        str(c.get("trigger_file") or "-"),
                    ]
                )
    return header, rows


AUDIT_ALL_CLASSES = 12  # up to this many classes the audit table shows them all; beyond, the flagged ones and
AUDIT_NEAREST = 3  # the unflagged classes with the largest separation


def audit_table(audit: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The data audit's per-class evidence: the split's separation and valley, the spread ratio, the decision, the
    flagged rows (and the file's poisoned rows when it marks them)."""
    classes = audit.get("classes") or []
    if len(classes) > AUDIT_ALL_CLASSES:
        near = sorted(
            (c for c in classes if not c["flagged"] and c["separation"] is not None), key=lambda c: -c["separation"]
        )[:AUDIT_NEAREST]
        keep = {c["index"] for c in classes if c["flagged"]} | {c["index"] for c in near}
        classes = [c for c in classes if c["index"] in keep]
    truth = bool(audit.get("ground_truth"))
    header = [
        "class",
        "rows",
        "separation",
        "valley",
        "spread",
        "split (flagged / kept side)",
        "decision",
        "flagged rows",
    ]
    header += ["poisoned rows (file)"] if truth else []
    rows = []
    for c in classes:
        clusters = c.get("clusters")
        row = [
            f"{c['index']} {c['name']}",
            str(c["rows"]),
            num(c["separation"]),
            num(c["valley"]),
            num(c["spread_ratio"]),
            "-" if not clusters else f"{clusters['poison_side']} / {clusters['kept_side']}",
            c["decision"] + (" *" if c["flagged"] else ""),
            str(c["flagged_rows"]),
        ]
        if truth:
            row.append(f"{c.get('poisoned_rows', 0)} ({c.get('flagged_poisoned', 0)} flagged)")
        rows.append(row)
    return header, rows


def audit_summary(audit: dict[str, Any]) -> str:
    """One sentence: how many rows the audit flagged, where, and (with ground truth) how well."""
    flagged = audit.get("flagged_classes") or []
    text = f"{audit['flagged_rows']} of {audit['n']} rows flagged" + (
        f" in class(es) {', '.join(map(str, flagged))}" if flagged else " (no class split or collapsed)"
    )
    f = audit.get("flagged_set")
    if f:
        text += (
            f"; against the file's {audit['poisoned_rows']} poisoned rows: precision {pct(f['precision'])}, "
            f"recall {pct(f['recall'])}"
        )
    return text + "."


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def to_markdown(doc: dict[str, Any]) -> str:
    out = ["# cleanse report", ""]
    out.append(f"**Verdict:** {doc['verdict'] or 'not scanned'}  ")
    out.append(
        "**Models:** "
        + (", ".join(f"`{m['path']}` (sha256 {str(m['sha256'])[:12]}...)" for m in doc["models"]) or "-")
        + "  "
    )
    out.append("**Methods:** " + (", ".join(map(str, doc["methods"])) or "-"))
    out.append("")
    if doc["summary"]:
        out += ["## Before -> after", "", _md_table(*summary_table(doc)), ""]
    for item in doc["missing"]:
        out.append(f"> missing: **{item['section']}**: {item['reason']}")
    if doc["missing"]:
        out.append("")
    if "history" in doc["images"]:
        caption = "CA, ASR and TAR over the unlearning history"
        out += [f"## {caption}", "", f"![{caption}]({doc['images']['history']})", ""]
    for scan in doc["scan"]:
        if scan.get("audit"):
            out += [
                f"## Data audit with `{scan['model']}`{_role(scan)}",
                "",
                audit_summary(scan["audit"]),
                "",
                _md_table(*audit_table(scan["audit"])),
                "",
            ]
        if scan.get("classes"):
            out += [
                f"## Scan of `{scan['model']}`{_role(scan)}",
                "",
                f"Verdict of this scan: {scan_verdict(scan)}",
                "",
                _md_table(*scan_table(scan)),
                "",
            ]
            triggers = trigger_table(scan)
            if triggers[1]:
                out += ["Reversed triggers of the flagged classes:", "", _md_table(*triggers), ""]
            for name, image in (scan.get("anomaly_images") or {}).items():
                out += [f"![{name} detector: anomaly indices]({image})", ""]
            if scan.get("sheet_image"):
                out += [f"![reversed triggers]({scan['sheet_image']})", ""]
    for key, value in doc["images"].items():
        if key.startswith("gradcam"):
            out += [f"## Grad-CAM before/after ({key})", "", f"![{key}]({value})", ""]
    for key, value in doc["images"].items():
        if key.startswith("explain"):
            out += [f"## {key}", "", f"![{key}]({value})", ""]
    if doc.get("direct"):
        d = doc["direct"]
        out += [
            "## Direct evaluation",
            "",
            f"`{d['model']}` on `{d['data']}`: CA {pct(d['metrics']['clean_accuracy'])}, "
            f"ASR {pct(d['metrics']['attack_success_rate'])}, RA {pct(d['metrics']['robust_accuracy'])}, "
            f"TAR {num(d['metrics']['tar'])}",
            "",
        ]
    out += ["## Provenance", ""]
    for p in doc["provenance"]:
        files = ", ".join(
            f"{k}: `{v.get('path')}` ({str(v.get('sha256', ''))[:12]})"
            for k, v in p["inputs"].items()
            if isinstance(v, dict)
        )
        versions = p.get("versions") or {}
        wall = (p.get("timings") or {}).get("wall_seconds")
        out.append(
            f"- **{p['command']}** ({p['created']}): {files or 'no file inputs'}; torch {versions.get('torch')}, "
            f"device {versions.get('device')}, wall {num(wall)}s; record `{p['record']}`"
        )
    out.append("")
    return "\n".join(out)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(folder: Path, name: str, alt: str) -> str:
    data = base64.b64encode((folder / name).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def to_html(doc: dict[str, Any], folder: Path) -> str:
    e = html.escape
    verdict = doc["verdict"]
    cls = "none" if verdict is None else ("bad" if doc.get("backdoored") else "good")
    parts = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>cleanse report</title>',
        f"<style>{CSS}</style></head><body><h1>cleanse report</h1>",
        f'<p class="verdict {cls}">Verdict: {e(verdict or "not scanned")}</p>',
        "<p><b>Models:</b> "
        + (
            ", ".join(
                f"<code>{e(str(m['path']))}</code> (sha256 {e(str(m['sha256'])[:12])}&hellip;)" for m in doc["models"]
            )
            or "-"
        )
        + "<br><b>Methods:</b> "
        + (e(", ".join(map(str, doc["methods"]))) or "-")
        + "</p>",
    ]
    if doc["summary"]:
        parts += ["<h2>Before &rarr; after</h2>", _html_table(*summary_table(doc))]
    for item in doc["missing"]:
        parts.append(f'<p class="missing">Missing: <b>{e(item["section"])}</b>: {e(item["reason"])}</p>')
    if "history" in doc["images"]:
        parts += [
            "<h2>Unlearning history</h2>",
            _img(folder, doc["images"]["history"], "CA, ASR and TAR over the unlearning history"),
        ]
    for scan in doc["scan"]:
        if scan.get("audit"):
            parts += [
                f"<h2>Data audit with <code>{e(str(scan['model']))}</code>{e(_role(scan))}</h2>",
                f"<p>{e(audit_summary(scan['audit']))}</p>",
                _html_table(*audit_table(scan["audit"])),
            ]
        if scan.get("classes"):
            parts += [
                f"<h2>Scan of <code>{e(str(scan['model']))}</code>{e(_role(scan))}</h2>",
                f"<p>Verdict of this scan: {e(str(scan_verdict(scan)))}</p>",
                _html_table(*scan_table(scan)),
            ]
            triggers = trigger_table(scan)
            if triggers[1]:
                parts += ["<h3>Reversed triggers of the flagged classes</h3>", _html_table(*triggers)]
            for name, image in (scan.get("anomaly_images") or {}).items():
                parts.append(_img(folder, image, f"{name} detector: anomaly indices"))
            if scan.get("sheet_image"):
                parts += [
                    "<h3>Reversed triggers per class and family (labelled in the picture)</h3>",
                    _img(folder, scan["sheet_image"], "reversed triggers"),
                ]
    for key, value in doc["images"].items():
        if key.startswith("gradcam"):
            parts += [
                f"<h2>Grad-CAM before/after: {e(key.removeprefix('gradcam-'))}</h2>",
                "<p>Columns: image, before, after; then the triggered image, before, after. "
                "One colour scale for the sheet.</p>",
                _img(folder, value, key),
            ]
        elif key.startswith("explain"):
            parts += [f"<h2>{e(key)}</h2>", _img(folder, value, key)]
    if doc.get("direct"):
        d = doc["direct"]
        m = d["metrics"]
        parts += [
            "<h2>Direct evaluation</h2>",
            _html_table(
                ["model", "data", "CA", "ASR", "RA", "TAR"],
                [
                    [
                        str(d["model"]),
                        str(d["data"]),
                        pct(m["clean_accuracy"]),
                        pct(m["attack_success_rate"]),
                        pct(m["robust_accuracy"]),
                        num(m["tar"]),
                    ]
                ],
            ),
        ]
    parts.append("<h2>Provenance</h2>")
    for p in doc["provenance"]:
        parts.append(
            f"<details><summary><b>{e(p['command'])}</b> &mdash; {e(str(p['created']))} &mdash; "
            f"<code>{e(p['record'])}</code></summary>"
            f"<pre>{e(json.dumps(p, indent=1, default=str))}</pre></details>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)
