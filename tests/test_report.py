"""`cleanse report`: JSON holds every figure the HTML shows, the HTML is self-contained, partial inputs still render."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pytest
from typer.testing import CliRunner

from cleanse.cli import app
from cleanse.files import sha256_file
from cleanse.models import save_model
from cleanse.report.build import mark_cleaned_scans, overall_verdict
from cleanse.report.collect import Record
from cleanse.report.render import pct

runner = CliRunner()


class Resources(HTMLParser):
    """Collects every attribute that could load something from outside the file."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href", "srcset", "data", "poster", "action") and value is not None:
                self.refs.append(value)


@pytest.fixture(scope="module")
def runs(badnets_setup, tmp_path_factory):
    """Real records: a (cheap) scan and a short unlearn of the synthetic BadNets model."""
    model, trigger, _ = badnets_setup
    folder = tmp_path_factory.mktemp("report")
    save_model(model, folder / "bd.safetensors")
    trigger.save(folder / "bd.trigger.safetensors")
    scan = runner.invoke(
        app,
        [
            "scan",
            str(folder / "bd.safetensors"),
            "--data",
            "synthetic:test",
            "--budget",
            "fast",
            "--steps",
            "10",
            "--n-clean",
            "100",
            "--detectors",
            "patch,additive",
            "-o",
            str(folder / "scan"),
        ],
    )
    assert scan.exit_code in (0, 1), scan.output
    unlearn = runner.invoke(
        app,
        [
            "unlearn",
            str(folder / "bd.safetensors"),
            "--method",
            "tar-ewc",
            "--data",
            "synthetic",
            "--clean-frac",
            "0.05",
            "--trigger",
            str(folder / "bd.trigger.safetensors"),
            "--test",
            "synthetic:test",
            "-o",
            str(folder / "clean.safetensors"),
        ],
    )
    assert unlearn.exit_code == 0, unlearn.output
    return folder


@pytest.mark.slow
def test_report_json_has_every_figure_the_html_shows_and_the_html_is_self_contained(runs, tmp_path):
    out = tmp_path / "rep"
    result = runner.invoke(
        app,
        ["report", str(runs / "scan"), str(runs / "clean.safetensors.run.json"), "-o", str(out), "--n", "4", "--json"],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "report.json").read_text())
    assert json.loads(result.stdout) == doc
    record = json.loads((runs / "clean.safetensors.run.json").read_text())
    row = doc["summary"][0]
    assert row["method"] == "tar-ewc"
    assert row["before"]["attack_success_rate"] == record["before"]["attack_success_rate"]
    assert row["after"]["clean_accuracy"] == record["after"]["clean_accuracy"]
    assert doc["verdict"] is not None and doc["missing"] == []
    assert set(doc["images"]) >= {"history", "anomaly-patch", "anomaly-additive", "scan-sheet", "gradcam-tar-ewc"}
    assert len(doc["gradcam"]["gradcam-tar-ewc"]["rows"]) == 4

    page = (out / "report.html").read_text()
    parser = Resources()
    parser.feed(page)
    assert parser.refs and all(ref.startswith("data:image/png;base64,") for ref in parser.refs)
    assert "link" not in parser.tags and "script" not in parser.tags
    assert not re.search(r"url\(|@import|https?://", page)
    # every number in the summary table comes from report.json
    for side in ("before", "after"):
        for key in ("clean_accuracy", "attack_success_rate"):
            assert pct(row[side][key]) in page
    for name in ("patch", "additive"):  # each detector's evidence, per class
        for c in doc["scan"][0]["detectors"][name]["classes"]:
            size = f"{c['statistic']:.3g}" if c["reached_success"] else "not reached"
            assert f"{size} (z {c['score']:.2f})" in page
    md = (out / "report.md").read_text()
    assert "| tar-ewc |" in md and "![CA, ASR and TAR over the unlearning history](history.png)" in md
    for name in doc["images"].values():
        assert (out / name).is_file()


@pytest.mark.slow
def test_report_from_only_a_scan_states_the_missing_sections(runs, tmp_path):
    out = tmp_path / "rep"
    result = runner.invoke(app, ["report", str(runs / "scan" / "run.json"), "-o", str(out), "--format", "html"])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "report.json").read_text())
    assert {m["section"] for m in doc["missing"]} == {"unlearning", "gradcam"}
    page = (out / "report.html").read_text()
    assert "Missing: <b>unlearning</b>" in page and "Missing: <b>gradcam</b>" in page
    assert not (out / "report.md").exists()


@pytest.mark.slow
def test_a_scan_record_whose_scan_json_is_gone_still_sets_the_verdict_and_says_what_is_missing(runs, tmp_path):
    (tmp_path / "lost").mkdir()
    (tmp_path / "lost" / "run.json").write_text((runs / "scan" / "run.json").read_text())
    out = tmp_path / "rep"
    result = runner.invoke(app, ["report", str(tmp_path / "lost" / "run.json"), "-o", str(out), "--format", "md"])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "report.json").read_text())
    scanned = json.loads((runs / "scan" / "scan.json").read_text())
    said = (
        f"backdoor suspected, target(s) {', '.join(map(str, scanned['suspected_targets']))}"
        if scanned["backdoored"]
        else "no backdoor found"
    )
    assert doc["verdict"] == said and doc["backdoored"] is scanned["backdoored"]
    reasons = [m["reason"] for m in doc["missing"] if m["section"] == "scan"]
    assert len(reasons) == 1 and reasons[0].startswith(
        f"scan.json is no longer beside {tmp_path / 'lost' / 'run.json'}"
    )
    assert reasons[0].endswith("the verdict line uses the verdict its run record kept")
    assert f"**Verdict:** {said}" in (out / "report.md").read_text()
    # an audit-only scan (no --data) kept no verdict: the reason does not claim one is used
    record = json.loads((runs / "scan" / "run.json").read_text())
    record["verdict"] = {"backdoored": None, "suspected_targets": None}
    (tmp_path / "lost" / "run.json").write_text(json.dumps(record))
    result = runner.invoke(
        app, ["report", str(tmp_path / "lost" / "run.json"), "-o", str(out), "--format", "md", "--force"]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "report.json").read_text())
    assert doc["verdict"] is None and [m["reason"] for m in doc["missing"] if m["section"] == "scan"][0].endswith(
        "need it"
    )


@pytest.mark.slow
def test_report_evaluates_a_model_directly(runs, tmp_path):
    out = tmp_path / "rep"
    result = runner.invoke(
        app,
        [
            "report",
            "--model",
            str(runs / "bd.safetensors"),
            "--data",
            "synthetic:test",
            "--trigger",
            str(runs / "bd.trigger.safetensors"),
            "-o",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    direct = json.loads(result.stdout)["direct"]
    assert direct["metrics"]["attack_success_rate"] > 0.8 and direct["metrics"]["tar"] is not None
    assert "Direct evaluation" in (out / "report.html").read_text()


def _scan(model, backdoored, created, role="audited", sha=None, targets=(0,)):
    return {
        "model": model,
        "model_sha256": sha or model,
        "created": created,
        "role": role,
        "backdoored": backdoored,
        "suspected_targets": list(targets) if backdoored else [],
    }


def test_verdict_is_the_audited_models_and_a_cleaned_models_scan_is_added_after_it():
    before = _scan("bd.safetensors", True, "2026-12-03T10:00:00Z")
    after = _scan("clean.safetensors", False, "2026-12-03T11:00:00Z", role="cleaned by tar-ewc")
    # the cleaned model's scan is the latest, and record order must not matter either
    for scans in ([before, after], [after, before]):
        assert overall_verdict(scans) == (
            "backdoor suspected, target(s) 0; after cleaning (tar-ewc): no backdoor found",
            True,
        )
    still = _scan("clean.safetensors", True, "2026-12-03T11:00:00Z", role="cleaned by ulrl", targets=(0,))
    assert overall_verdict([before, still]) == (
        "backdoor suspected, target(s) 0; after cleaning (ulrl): backdoor suspected, target(s) 0",
        True,
    )
    assert overall_verdict([after]) == ("after cleaning (tar-ewc): no backdoor found", False)
    assert overall_verdict([]) == (None, None)
    assert overall_verdict([{**before, "backdoored": None}]) == (
        None,
        None,
    )  # no verdict recorded (e.g. an audit-only scan)


def test_verdict_takes_the_latest_scan_of_one_model_and_names_each_of_several_models():
    old = _scan("a.safetensors", False, "2026-12-01T09:00:00Z", sha="aaa")
    new = _scan("moved/a.safetensors", True, "2026-12-02T09:00:00Z", sha="aaa", targets=(3,))
    assert overall_verdict([new, old]) == ("backdoor suspected, target(s) 3", True)
    other = _scan("b.safetensors", False, "2026-12-01T09:00:00Z", sha="bbb")
    assert overall_verdict([old, other]) == (
        "a.safetensors: no backdoor found; b.safetensors: no backdoor found",
        False,
    )
    assert overall_verdict([new, other])[1] is True


def test_cleaned_scans_are_matched_by_content_not_by_where_the_path_now_points(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "work").mkdir()
    given, cleaned = tmp_path / "in" / "model.safetensors", tmp_path / "work" / "model.safetensors"
    given.write_bytes(b"backdoored weights")
    cleaned.write_bytes(b"cleaned weights")
    sha_in, sha_out = sha256_file(given), sha256_file(cleaned)

    def record(folder):
        return Record(
            folder / "model.safetensors.run.json",
            {
                "command": "unlearn",
                "parameters": {"method": "tar-ewc"},
                "inputs": {"model": {"path": str(given), "sha256": sha_in}},
                "outputs": {"model": str(cleaned)},
            },
        )

    def scans():
        return [
            {"model": str(cleaned), "model_sha256": sha_in, "role": "audited"},
            {"model": str(cleaned), "model_sha256": sha_out, "role": "audited"},
            {"model": str(cleaned), "model_sha256": None, "role": "audited"},
        ]

    # the input is gone, so the audit's model path now resolves to the cleaned file of the same name: still audited
    given.unlink()
    found = scans()
    mark_cleaned_scans(found, [record(tmp_path / "work")])
    assert [s["role"] for s in found] == ["audited", "cleaned by tar-ewc", "cleaned by tar-ewc"]  # the last by path
    # the whole folder moved: the output is found beside its record and its sha256 still matches
    (tmp_path / "archive").mkdir()
    cleaned.rename(tmp_path / "archive" / "model.safetensors")
    found = scans()
    mark_cleaned_scans(found, [record(tmp_path / "archive")])
    assert [s["role"] for s in found] == ["audited", "cleaned by tar-ewc", "audited"]
    # an older record (no stored sha256) and no output file to hash: nothing is marked cleaned
    found = scans()
    mark_cleaned_scans(found, [record(tmp_path / "elsewhere")])
    assert {s["role"] for s in found} == {"audited"}
    # a record that stored its output's sha256 needs no file to hash
    stored = record(tmp_path / "elsewhere")
    stored.doc["outputs"]["model_sha256"] = sha_out
    found = scans()
    mark_cleaned_scans(found, [stored])
    assert [s["role"] for s in found] == ["audited", "cleaned by tar-ewc", "audited"]


def test_verdict_names_whole_paths_where_file_names_collide():
    a = _scan("run1/model.safetensors", False, "2026-12-01T09:00:00Z", sha="aaa")
    b = _scan("run2/model.safetensors", True, "2026-12-01T09:00:00Z", sha="bbb")
    assert (
        overall_verdict([a, b])[0]
        == "run1/model.safetensors: no backdoor found; run2/model.safetensors: backdoor suspected, target(s) 0"
    )
    c1 = _scan("x/clean.safetensors", False, "2026-12-01T10:00:00Z", role="cleaned by tar-ewc", sha="c1")
    c2 = _scan("y/other.safetensors", True, "2026-12-01T10:00:00Z", role="cleaned by tar-ewc", sha="c2")
    assert overall_verdict([a, c1, c2])[0] == (
        "no backdoor found; after cleaning (tar-ewc, clean.safetensors): no backdoor found; "
        "after cleaning (tar-ewc, other.safetensors): backdoor suspected, target(s) 0"
    )


@pytest.mark.slow
def test_report_with_a_scan_of_the_cleaned_model_keeps_the_audited_verdict(runs, tmp_path):
    rescan = runner.invoke(
        app,
        [
            "scan",
            str(runs / "clean.safetensors"),
            "--data",
            "synthetic:test",
            "--budget",
            "fast",
            "--steps",
            "10",
            "--n-clean",
            "100",
            "--detectors",
            "patch,additive",
            "-o",
            str(tmp_path / "rescan"),
        ],
    )
    assert rescan.exit_code in (0, 1), rescan.output
    out = tmp_path / "rep"
    result = runner.invoke(
        app,
        [
            "report",
            str(runs / "scan"),
            str(tmp_path / "rescan"),
            str(runs / "clean.safetensors.run.json"),
            "-o",
            str(out),
            "--n",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "report.json").read_text())
    assert [s["role"] for s in doc["scan"]] == ["audited", "cleaned by tar-ewc"]
    first = json.loads((runs / "scan" / "scan.json").read_text())
    second = json.loads((tmp_path / "rescan" / "scan.json").read_text())

    def said(r):
        if r["backdoored"]:
            return f"backdoor suspected, target(s) {', '.join(map(str, r['suspected_targets']))}"
        return "no backdoor found"

    assert doc["verdict"] == f"{said(first)}; after cleaning (tar-ewc): {said(second)}"
    assert doc["backdoored"] is first["backdoored"]
    page = (out / "report.html").read_text()
    assert "(cleaned by tar-ewc)</h2>" in page and page.count("Verdict of this scan:") == 2
    assert [s["anomaly_images"] for s in doc["scan"]] == [
        {"patch": "anomaly-patch.png", "additive": "anomaly-additive.png"},
        {"patch": "anomaly-1-patch.png", "additive": "anomaly-1-additive.png"},
    ]
    md = (out / "report.md").read_text()
    assert "![patch detector: anomaly indices](anomaly-patch.png)" in md
    assert "![patch detector: anomaly indices](anomaly-1-patch.png)" in md
    # the unlearn record stores its output's sha256, so the match survives the cleaned checkpoint being gone
    record = json.loads((runs / "clean.safetensors.run.json").read_text())
    assert record["outputs"]["model_sha256"] == sha256_file(runs / "clean.safetensors")
    record["outputs"]["model"] = str(
        tmp_path / "deleted" / "clean.safetensors"
    )  # as if the checkpoint had been deleted
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "clean.safetensors.run.json").write_text(json.dumps(record))
    result = runner.invoke(
        app,
        [
            "report",
            str(runs / "scan"),
            str(tmp_path / "rescan"),
            str(tmp_path / "records" / "clean.safetensors.run.json"),
            "-o",
            str(tmp_path / "rep2"),
            "--format",
            "json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert [s["role"] for s in json.loads((tmp_path / "rep2" / "report.json").read_text())["scan"]] == [
        "audited",
        "cleaned by tar-ewc",
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "give run records or folders (INPUT...), or --model"),
        (["--model", "m.safetensors"], "--model needs --data"),
        (["{runs}/bd.safetensors"], "not a cleanse run record"),
        (["{runs}/scan", "--format", "pdf"], "--format 'pdf': choose from html, md, json"),
    ],
)
@pytest.mark.slow
def test_report_bad_requests_exit_2(runs, tmp_path, args, message):
    result = runner.invoke(app, ["report", *[a.format(runs=runs) for a in args], "-o", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("with_trigger", [True, False])
def test_before_after_sheet_is_labelled_around_the_bare_grid(untrained_files, tmp_path, with_trigger):
    """The Grad-CAM sheet names its columns (as report.json does), labels its rows and keeps every image cell whole."""
    from PIL import Image

    from cleanse.attacks import poison_dataset
    from cleanse.models import load_model
    from cleanse.report.figures import before_after_sheet
    from tests.conftest import synthetic

    model = load_model(untrained_files / "bd.safetensors")
    trigger = poison_dataset(synthetic("test"), "badnets", 0, 0.1, seed=0)[1] if with_trigger else None
    doc = before_after_sheet(model, model, synthetic("test"), trigger, 2, tmp_path / "g.png")
    n_cols = 6 if with_trigger else 3
    assert len(doc["columns"]) == n_cols and len(doc["rows"]) == 2
    with Image.open(tmp_path / "g.png") as sheet:
        width, height = sheet.size
    cell = 32 * 4 + 2
    assert width > n_cols * cell + 2 and height > 2 * cell + 2  # row-label margin; title and heading bands
