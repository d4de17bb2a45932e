"""Grad-CAM throughput: cleanse's batched engine against pytorch-grad-cam, side by side in one run.

Same model, layer, batch and images; both maps min-max normalised per image and
compared (max abs difference). Also measures what TAR monitoring adds to one
epoch of tar-ewc-sized work (the 5% CIFAR-10 clean subset: 2,250 training
images, TAR on the 250 held back).

    pip install grad-cam        # benchmark-only dependency (pytorch-grad-cam)
    python -m benchmarks.gradcam_speed [--batch 64] [--reps 8]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from benchmarks.common import machine, write_results
from cleanse.attacks import poison_dataset
from cleanse.data import make_synthetic
from cleanse.engine.device import autocast, resolve_precision
from cleanse.engine.gradcam import grad_cam, normalise
from cleanse.engine.layers import default_layer, resolve_layer, tar_layer
from cleanse.engine.tar import measure_tar
from cleanse.models import new_model


def timed(fn, reps: int) -> tuple[float, object]:
    out = fn()  # warm-up
    start = time.perf_counter()
    for _ in range(reps):
        out = fn()
    return (time.perf_counter() - start) / reps, out


def compare(arch: str, x: torch.Tensor, reps: int, channels_last: bool) -> dict:
    from pytorch_grad_cam import GradCAM

    torch.manual_seed(0)
    model = new_model(arch, 10).eval()
    if channels_last:  # the same model object for both: weights in channels_last, as cleanse loads and trains them
        model = model.to(memory_format=torch.channels_last)
    layer = default_layer(model, (3, 32, 32))
    ours_s, ours = timed(lambda: normalise(grad_cam(model, x, layer).cams), reps)
    lib = GradCAM(model=model, target_layers=[resolve_layer(model, layer)])
    lib_s, theirs = timed(lambda: lib(input_tensor=x, targets=None), reps)
    for p in model.parameters():
        p.grad = None
    diff = float((ours - torch.from_numpy(theirs)).abs().max())
    n = len(x)
    return {
        "arch": arch,
        "layer": layer,
        "batch": n,
        "channels_last_weights": channels_last,
        "cleanse_img_per_s": n / ours_s,
        "grad_cam_img_per_s": n / lib_s,
        "speedup": lib_s / ours_s,
        "max_abs_diff": diff,
    }


def monitor_overhead(reps: int) -> dict:
    """One epoch of tar-ewc's work vs the per-epoch TAR monitor on the held-back triggered images.

    tar-ewc's loss touches every clean image twice per epoch (clean cross-entropy and the
    bounded ascent on its triggered copy): forward+backward over 2,250 clean and 2,250
    triggered images, batch 128. The monitor explains the held-back triggered images only
    (the clean baseline is measured once, before and after, not every epoch).
    """
    data = make_synthetic("train")
    poisoned, trigger = poison_dataset(data, "badnets", 0, 0.1, seed=0)
    model = new_model("cnn", 10)
    device = torch.device("cpu")
    precision = resolve_precision("auto", device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    images = data.images[:2250].permute(0, 3, 1, 2).float().div(255)
    labels = data.labels[:2250]
    triggered = trigger.apply_uint8(data.images[:2250]).permute(0, 3, 1, 2).float().div(255)
    target = torch.zeros_like(labels)
    held_images, held_labels = data.images[2250:2500], data.labels[2250:2500]
    layer = tar_layer(model, (3, 32, 32))

    def epoch() -> None:
        model.train()
        for start in range(0, len(images), 128):
            x = images[start : start + 128].contiguous(memory_format=torch.channels_last)
            xt = triggered[start : start + 128].contiguous(memory_format=torch.channels_last)
            with autocast(device, precision):
                clean_ce = F.cross_entropy(model(x).float(), labels[start : start + 128])
                ascent = (
                    F.cross_entropy(model(xt).float(), target[start : start + 128], reduction="none")
                    .clamp(max=2.0)
                    .mean()
                )
                loss = clean_ce - ascent
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    epoch_s, _ = timed(epoch, max(1, reps // 2))
    tar_s, result = timed(lambda: measure_tar(model, held_images, held_labels, trigger, layer, with_clean=False), reps)
    return {
        "epoch_seconds": epoch_s,
        "tar_seconds": tar_s,
        "overhead": tar_s / epoch_s,
        "tar_layer": layer,
        "tar_images": result["n"],
        "train_images": len(images),
        "precision": precision,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--reps", type=int, default=8)
    args = parser.parse_args()
    x = make_synthetic("test").images[: args.batch].permute(0, 3, 1, 2).float().div(255)
    rows = [compare(arch, x, args.reps, cl) for cl in (False, True) for arch in ("cnn", "resnet18")]
    print(f"\nGrad-CAM, batch {args.batch}, CPU, fp32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(
        f"{'arch':10} {'weights':14} {'layer':8} {'cleanse img/s':>14} {'grad-cam img/s':>15} "
        f"{'speed-up':>9} {'max |diff|':>11}"
    )
    for r in rows:
        fmt = "channels_last" if r["channels_last_weights"] else "contiguous"
        print(
            f"{r['arch']:10} {fmt:14} {r['layer']:8} {r['cleanse_img_per_s']:14.1f} {r['grad_cam_img_per_s']:15.1f} "
            f"{r['speedup']:8.2f}x {r['max_abs_diff']:11.2e}"
        )
    over = monitor_overhead(args.reps)
    print(
        f"\nTAR monitoring: one recipe epoch ({over['train_images']} images, {over['precision']}) "
        f"{over['epoch_seconds']:.2f}s; "
        f"TAR on {over['tar_images']} held-back triggered images at {over['tar_layer']} {over['tar_seconds']:.3f}s "
        f"-> adds {100 * over['overhead']:.1f}%"
    )
    path = write_results(
        "gradcam_speed",
        {"benchmark": "gradcam_speed", "settings": vars(args), "machine": machine(), "rows": rows, "monitor": over},
    )
    print("wrote", path)


if __name__ == "__main__":
    main()
