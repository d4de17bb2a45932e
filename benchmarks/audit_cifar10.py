"""`scan --audit-data` on real CIFAR-10: cleanse's per-class audit against ART's ActivationDefence and
SpectralSignatureDefense, all three on the same penultimate features.

    python -m benchmarks.audit_cifar10 [--sets badnets:0:0.1,plain-sig:3:0.1] [--no-art] [--no-shares] [--redo]
    python -m benchmarks.audit_cifar10 --table

Each set is ATTACK:TARGET:RATE (TARGET `all` for all-to-all). Its model is the one benchmarks/train_cifar10.py trains
for it (benchmarks/cache/, else the kept copy in benchmarks/models/); `plain-ATTACK:...` takes the `vgg11-bn` that
benchmarks/plain_train.py trained (benchmarks/cache/ only), a second architecture the thresholds were not set on.
This script never trains: a missing model is reported with the command that trains it. The audited set is the
model's own poisoned training set, recreated with `benchmarks.common.poison_for` and the benchmark's seed;
`clean:0:0.1` audits the clean training set with a cleanly trained model (everything flagged there is a false
positive). The features are cleanse's `penultimate()` in fp32 (cached in benchmarks/cache/ by model digest and set).

Methods, on the same (N, D) features:
- cleanse: `cleanse.scan.audit.audit_features`, the per-class split/collapse decision (docs/commands/scan.md);
- ART ActivationDefence, defaults of ART 1.20.1 (PCA to 10 dims, 2-means by MiniBatchKMeans, the smaller cluster of
  every class is poison), numpy seeded 0 for its k-means;
- ART SpectralSignatureDefense, defaults (expected_pp_poison 0.33, eps_multiplier 1.5: the top 49.5% of each class
  by its score are flagged).
ART's defences ask the classifier for activations; a stand-in answers with the same features (ART would otherwise
take the output of the classifier's last layer).

The share test (on by default, `--no-shares` skips it) audits subsets of the 10% BadNets, Blended and WaNet sets
whose target class holds another share of poison: 500 or 2,500 of the poisoned rows kept (about 9% and 33% of the
target class), or all 5,000 with only 3,000, 1,667 or 556 of the target class's clean rows (62.5%, 75%, 90%). The
model is still the one trained at 10%: this varies the audited share, not the training rate.

Each measured set is stored at once as a row of benchmarks/results/audit_cifar10-rows.jsonl (a set already stored is
skipped unless --redo); the table (audit_cifar10-table.md) and audit_cifar10.json are rebuilt from every stored row.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from benchmarks.common import (
    CACHE,
    RESULTS,
    append_row,
    file_digest,
    load_rows,
    machine,
    poison_for,
    require_cifar,
    write_results,
)
from benchmarks.train_cifar10 import model_key
from cleanse.data import load_data
from cleanse.engine.features import penultimate
from cleanse.models import load_model
from cleanse.scan.audit import audit_features, set_precision_recall

DEFAULT_SETS = (
    "badnets:0:0.01,badnets:0:0.05,badnets:0:0.1,blended:1:0.01,blended:1:0.05,blended:1:0.1,"
    "wanet:5:0.1,sig:3:0.1,badnets:all:0.1,clean:0:0.1,"
    "plain-badnets:0:0.1,plain-sig:3:0.1,plain-wanet:5:0.1,plain-clean:0:0.1"
)
ROWS = RESULTS / "audit_cifar10-rows.jsonl"
SHARE_SETS = ("badnets:0:0.1", "blended:1:0.1", "wanet:5:0.1")
KEEP_POISON = (500, 2500)  # poisoned rows kept
KEEP_CLEAN = (3000, 1667, 556)  # clean target-class rows kept, with all 5,000 poisoned ones
SHARE_SEED = 0


def parse_set(text: str) -> tuple[str, int | str, float]:
    attack, target, rate = text.strip().split(":")
    return attack, (target if target == "all" else int(target)), float(rate)


def train_command(attack: str, target: int | str, rate: float) -> str:
    if attack.startswith("plain-"):
        return f"python -m benchmarks.plain_train --attack {attack.removeprefix('plain-')} --target {target} --seed 0"
    return f"python -m benchmarks.train_cifar10 --attack {attack} --target {target} --rate {rate} --seed 0"


def model_path(attack: str, target: int | str, rate: float) -> Path | None:
    """The model this set's benchmark trained, or None when it does not exist (yet)."""
    if attack.startswith("plain-"):  # plain_train's defaults: vgg11-bn at width 0.25, rate 0.1
        if rate != 0.1:
            return None
        found = sorted(CACHE.glob(f"plain-vgg11-bn-w0.25-{attack.removeprefix('plain-')}-t{target}-s0-*.safetensors"))
        found = [f for f in found if not f.name.endswith(".trigger.safetensors")]
        return found[0] if len(found) == 1 else None
    _, _, path = model_key(attack, target, rate, 0)
    return path if path.is_file() else None


class Features:
    """Stands in for an ART classifier: ART's defences ask it for the activations of `x_train`, here the row indices,
    and get cleanse's penultimate features."""

    def __init__(self, features: np.ndarray, nb_classes: int) -> None:
        self.features = features
        self.nb_classes = nb_classes
        self.layer_names = ["penultimate"]

    def get_activations(self, x: np.ndarray, layer: Any = None, batch_size: int = 128, framework: bool = False):
        return self.features[np.asarray(x, dtype=np.int64)]


def art_methods(features: torch.Tensor, labels: torch.Tensor, classes: int) -> dict[str, tuple[torch.Tensor, float]]:
    """Each ART defence's flagged rows and its seconds, on the given features."""
    from art.defences.detector.poison import ActivationDefence, SpectralSignatureDefense

    stand_in = Features(features.double().numpy(), classes)
    rows, y = np.arange(len(labels)), labels.numpy()
    out = {}
    for name, make in (
        ("ART ActivationDefence", lambda: ActivationDefence(stand_in, rows, y)),
        ("ART SpectralSignatureDefense", lambda: SpectralSignatureDefense(stand_in, rows, y)),
    ):
        np.random.seed(0)  # MiniBatchKMeans draws from numpy's global generator
        started = time.perf_counter()
        _, is_clean = make().detect_poison()
        seconds = time.perf_counter() - started
        out[name] = (torch.tensor(is_clean) == 0, seconds)
    return out


def features_for(model_path: Path, data: Any, tag: str) -> tuple[torch.Tensor, float | None]:
    """The set's penultimate features (fp32), from the cache when this model and set were seen before."""
    cached = CACHE / f"audit-features-{file_digest(model_path)}-{tag}.safetensors"
    if cached.is_file():
        return load_file(str(cached))["features"], None
    model = load_model(model_path)
    started = time.perf_counter()
    feats = penultimate(model, data.images, model.spec.num_classes, "fp32")
    seconds = time.perf_counter() - started
    CACHE.mkdir(exist_ok=True)
    save_file({"features": feats.contiguous()}, str(cached))
    return feats, seconds


def measure(
    features: torch.Tensor, labels: torch.Tensor, truth: torch.Tensor, classes: list[str], rate: float, art: bool
) -> dict[str, Any]:
    """Every method's flagged set against the truth, and cleanse's per-class evidence."""
    started = time.perf_counter()
    audit = audit_features(features, labels, classes, rate, truth)
    seconds = time.perf_counter() - started
    methods = {"cleanse": {**set_precision_recall(audit.flagged, truth), "seconds": seconds}}
    if art:
        for name, (flagged, secs) in art_methods(features, labels, len(classes)).items():
            methods[name] = {**set_precision_recall(flagged, truth), "seconds": secs}
    evidence = [
        {k: c[k] for k in ("index", "decision", "separation", "valley", "spread_ratio", "clusters", "flagged_rows")}
        | {"poisoned_rows": c.get("poisoned_rows"), "others_position": c["others_position"]}
        for c in audit.doc["classes"]
    ]
    return {
        "rows": len(labels),
        "poisoned": int(truth.sum()),
        "methods": methods,
        "cleanse_at_k": audit.doc.get("precision_recall"),
        "cleanse_classes": evidence,
        "flagged_classes": audit.doc["flagged_classes"],
    }


def shares(attack: str, target: int, features: torch.Tensor, data: Any, art: bool, rate: float) -> list[dict[str, Any]]:
    """The same model's audit on subsets whose target class holds other shares of poison (module docstring)."""
    gen = torch.Generator().manual_seed(SHARE_SEED)
    truth = data.poisoned
    poisoned = truth.nonzero().flatten()
    clean_target = ((data.labels == target) & ~truth).nonzero().flatten()
    cases = [(f"{n} of {len(poisoned)} poisoned rows", poisoned, n) for n in KEEP_POISON]
    cases += [(f"all poisoned rows, {n} clean target rows", clean_target, n) for n in KEEP_CLEAN]
    rows = []
    for label, pool, keep_n in cases:
        drop = pool[torch.randperm(len(pool), generator=gen)[keep_n:]]
        keep = torch.ones(len(truth), dtype=torch.bool)
        keep[drop] = False
        sub_truth = truth[keep]
        in_target = data.labels[keep] == target
        share = float(sub_truth[in_target].double().mean())
        row = measure(features[keep], data.labels[keep], sub_truth, list(data.classes), rate, art)
        rows.append({"set": f"{attack}:{target}:{rate}", "case": label, "target_share": share, **row})
        print(f"  share {share:.1%} ({label}): " + _summary(row), flush=True)
    return rows


def _summary(row: dict[str, Any]) -> str:
    return "; ".join(
        f"{n} P {_f(m['precision'])} R {_f(m['recall'])} flagged {m['flagged']}" for n, m in row["methods"].items()
    )


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def table(rows: list[dict[str, Any]], share_rows: list[dict[str, Any]]) -> str:
    """The markdown tables: one row per set and method, then the share test."""
    lines = [
        "| set | poisoned rows | method | precision | recall | F1 | rows flagged | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("missing"):
            lines.append(f"| {r['set']} | - | model not trained: `{r['command']}` | | | | | |")
            continue
        for name, m in r["methods"].items():
            lines.append(
                f"| {r['set']} | {r['poisoned']} | {name} | {_f(m['precision'])} | {_f(m['recall'])} | "
                f"{_f(m['f1'])} | {m['flagged']} | {m['seconds']:.1f} |"
            )
    if share_rows:
        lines += [
            "",
            "| 10% model, audited subset | poison share of the target class | method | precision | recall | F1 | "
            "rows flagged |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in share_rows:
            for name, m in r["methods"].items():
                lines.append(
                    f"| {r['set']}, {r['case']} | {r['target_share']:.1%} | {name} | {_f(m['precision'])} | "
                    f"{_f(m['recall'])} | {_f(m['f1'])} | {m['flagged']} |"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default=DEFAULT_SETS, help="comma-separated ATTACK:TARGET:RATE")
    parser.add_argument("--no-art", action="store_true", help="skip ART (it is a benchmark-only extra)")
    parser.add_argument("--no-shares", action="store_true", help="skip the share test")
    parser.add_argument("--redo", action="store_true", help="measure sets already stored again")
    parser.add_argument("--table", action="store_true", help="only rebuild the table and JSON from stored rows")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    art = not args.no_art
    specs = [s.strip() for s in args.sets.split(",") if s.strip()]
    if not args.table:
        run(specs, art, not args.no_shares, args.redo)
    stored = {r["key"]: r for r in load_rows(ROWS)}
    rows: list[dict[str, Any]] = []
    for spec in specs:
        attack, target, rate = parse_set(spec)
        if spec in stored:
            rows.append(stored[spec])
        elif model_path(attack, target, rate) is None:
            rows.append({"set": spec, "missing": True, "command": train_command(attack, target, rate)})
    share_rows = [r for r in stored.values() if r.get("case")]
    doc = {
        "benchmark": "audit_cifar10",
        "settings": vars(args),
        "machine": machine(),
        "rows": rows,
        "shares": share_rows,
    }
    print("wrote", write_results("audit_cifar10", doc))
    text = table(rows, share_rows)
    (RESULTS / "audit_cifar10-table.md").write_text(text)
    print(text)


def run(specs: list[str], art: bool, with_shares: bool, redo: bool) -> None:
    """Measure every set not stored yet (all with --redo), storing each row as soon as it is done."""
    stored = {r["key"] for r in load_rows(ROWS)}
    cifar = require_cifar()
    train = load_data(str(cifar / "train"))
    for spec in specs:
        attack, target, rate = parse_set(spec)
        path = model_path(attack, target, rate)
        if path is None:
            print(f"{spec}: no model; train it with {train_command(attack, target, rate)}", flush=True)
            continue
        if spec in stored and not redo:
            print(f"{spec}: stored in {ROWS.name} (--redo measures it again)", flush=True)
            continue
        data, _, _ = poison_for(train, attack.removeprefix("plain-"), target, rate, 0)
        truth = data.poisoned if data.poisoned is not None else torch.zeros(len(data), dtype=torch.bool)
        feats, feat_seconds = features_for(path, data, f"{attack}-t{target}-r{rate}")
        row = {
            "key": spec,
            "set": spec,
            "model": path.name,
            "model_sha256": file_digest(path),
            "feature_seconds": feat_seconds,
            "art_version": _art_version() if art else None,
            "machine": machine(),
            **measure(feats, data.labels, truth, list(data.classes), rate, art),
        }
        append_row(ROWS, row)
        print(f"{spec}: " + _summary(row) + f"; cleanse flagged class(es) {row['flagged_classes']}", flush=True)
        if with_shares and spec in SHARE_SETS and isinstance(target, int):
            for share in shares(attack, target, feats, data, art, rate):
                append_row(ROWS, {"key": f"{spec} {share['case']}", "machine": machine(), **share})


def _art_version() -> str:
    import art

    return str(art.__version__)


if __name__ == "__main__":
    main()
