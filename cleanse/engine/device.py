"""Device and precision selection: never hard-coded, everything runs on CPU."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from cleanse.errors import CleanseError

PRECISIONS = ("auto", "fp32", "bf16")


def resolve_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise CleanseError(f"--device {spec!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CleanseError(f"--device {spec}: CUDA is not available on this machine; use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CleanseError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) exist")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CleanseError(f"--device {spec}: MPS is not available on this machine; use --device cpu or auto")
    return device


def wide_float(device: torch.device) -> torch.dtype:
    """The widest float the device computes in: float64, except on MPS, which has none (float32 there)."""
    return torch.float32 if device.type == "mps" else torch.float64


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:  # fast bf16 matmuls need AVX512-BF16/AMX; elsewhere bf16 autocast is slower than fp32
            return (
                bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
                and "AVX512" in torch.backends.cpu.get_cpu_capability()
            )
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise CleanseError(f"--precision {precision!r} must be one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    return precision


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    if precision == "bf16":
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        yield
