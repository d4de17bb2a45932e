"""Device and precision selection: never hard-coded, everything runs on CPU.

Every decision that depends on the hardware reads a `Capability` (what the device computes natively), so tests can
hand in the capability of a GPU they do not have: bf16 only where the device computes it natively (not emulated, as
V100 and T4 do), fp16 with a gradient scaler where bf16 is missing, float64 wherever the device has it (not MPS).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from cleanse.errors import CleanseError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Capability:
    """What a device computes natively, as the precision and dtype decisions need it."""

    type: str  # cpu | cuda | mps
    float64: bool  # float64 tensors exist (MPS has none)
    bf16: bool  # bf16 matmuls at full speed (CUDA compute capability 8+, CPUs with AVX512-BF16/AMX)
    fp16: bool  # fp16 tensor cores: the mixed precision to use where bf16 is missing (CUDA 7.0+)
    tf32: bool  # TF32 matmuls and convolutions (CUDA 8.0+)


def capability(device: torch.device) -> Capability:
    """Probe `device` (the device named, not the current one)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, _ = torch.cuda.get_device_capability(index)
        with torch.cuda.device(index):
            bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        return Capability("cuda", float64=True, bf16=bf16, fp16=major >= 7, tf32=major >= 8)
    if device.type == "mps":  # autocast on MPS covers too few ops to pay; fp32 there
        return Capability("mps", float64=False, bf16=False, fp16=False, tf32=False)
    return Capability(device.type, float64=True, bf16=_cpu_bf16(), fp16=False, tf32=False)


def _cpu_bf16() -> bool:
    try:  # fast bf16 matmuls need AVX512-BF16/AMX; elsewhere bf16 autocast is slower than fp32
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return native and "AVX512" in torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return False


def resolve_device(spec: str = "auto") -> torch.device:
    """--device as a torch device, checked, and prepared (prepare_device)."""
    if spec == "auto":
        if torch.cuda.is_available():
            return prepare_device(torch.device("cuda", torch.cuda.current_device()))
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
    if device.type == "cuda":
        return prepare_device(torch.device("cuda", device.index if device.index is not None else 0))
    return device


def prepare_device(device: torch.device, cap: Capability | None = None) -> torch.device:
    """Make `device` the current CUDA device (so every allocation and query without an index lands there) and turn
    on what pays on it: TF32 matmuls and convolutions (Ampere+; fp32 code keeps a 10-bit mantissa in its products,
    the accuracy PyTorch's 'high' matmul precision stands for) and cuDNN's autotuner (fixed input sizes throughout a
    job). Under torch.use_deterministic_algorithms the autotuner stays off."""
    if device.type != "cuda":
        return device
    cap = cap or capability(device)
    torch.cuda.set_device(device)
    if cap.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = not torch.are_deterministic_algorithms_enabled()
    return device


def wide_float(device: torch.device, cap: Capability | None = None) -> torch.dtype:
    """The widest float the device computes in: float64, except where it has none (MPS: float32 there)."""
    has_float64 = cap.float64 if cap is not None else device.type != "mps"
    return torch.float64 if has_float64 else torch.float32


def resolve_precision(precision: str, device: torch.device, cap: Capability | None = None) -> str:
    """--precision for `device`: auto is bf16 where native, else fp16 where the device has fp16 tensor cores, else
    fp32. An explicit fp16 needs those tensor cores; an explicit bf16 is honoured anywhere (emulated where not
    native: slower, the user's choice)."""
    if precision not in PRECISIONS:
        raise CleanseError(f"--precision {precision!r} must be one of {', '.join(PRECISIONS)}")
    if precision in ("auto", "fp16"):
        cap = cap or capability(device)
        if precision == "fp16" and not cap.fp16:
            raise CleanseError(
                f"--precision fp16 needs a CUDA GPU with fp16 tensor cores (compute capability 7.0+), not "
                f"{device.type}; use --precision bf16 or fp32"
            )
        if precision == "auto":
            return "bf16" if cap.bf16 else "fp16" if cap.fp16 else "fp32"
    return precision


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    if precision in ("bf16", "fp16"):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16):
            yield
    else:
        yield


class GradScaling:
    """zero_grad, backward and optimiser step in one call, through torch's gradient scaler in fp16 (whose small
    gradients would underflow unscaled); bf16 and fp32 step plainly. The scaler's skipped steps (an inf/NaN in the
    scaled gradients) are how fp16 training is meant to recover, not a divergence."""

    def __init__(self, device: torch.device, precision: str) -> None:
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def step(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        self.backward(optimizer, loss)
        self.apply(optimizer)

    def backward(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor, zero: bool = True) -> None:
        """zero_grad and the (scaled) backward: gradients may be reduced over ranks before `apply`. `zero=False` adds
        to the gradients already there (a batch stepped in pieces)."""
        if zero:
            optimizer.zero_grad(set_to_none=True)
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def apply(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimiser step (skipped by the scaler when fp16 gradients overflowed) and the scale's update."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def state(self) -> dict[str, torch.Tensor]:
        """The scaler's loss scale and growth counter, for resume checkpoints (empty when not scaling)."""
        if self.scaler is None:
            return {}
        saved = self.scaler.state_dict()
        return {
            "scaler.scale": torch.tensor(float(saved["scale"])),
            "scaler.growth_tracker": torch.tensor(int(saved["_growth_tracker"])),
        }

    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.scaler is None or "scaler.scale" not in tensors:
            return
        saved = self.scaler.state_dict()
        saved.update(scale=float(tensors["scaler.scale"]), _growth_tracker=int(tensors["scaler.growth_tracker"]))
        self.scaler.load_state_dict(saved)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` (on the CPU) on `device` without making the host wait for the device: on CUDA it is staged in pinned
    memory and copied asynchronously (a copy from pageable memory waits for every kernel queued before it)."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def rows_to_device(images: torch.Tensor, index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """images[index] on `device`: gathered on the CPU (the store may be memory-mapped) straight into pinned memory
    on CUDA, then copied asynchronously."""
    index = index.cpu()
    if device.type == "cuda" and images.device.type == "cpu":
        staged = torch.empty((len(index), *images.shape[1:]), dtype=images.dtype, pin_memory=True)
        torch.index_select(images, 0, index, out=staged)
        return staged.to(device, non_blocking=True)
    return images[index].to(device)


class LaggedScalar:
    """A device scalar the host reads without stalling the device: on the CPU at once; on an accelerator one call
    late (`exchange` starts a non-blocking copy of this value and returns the one before, whose copy is done or
    nearly so), so loops that look at a loss or a batch figure every step keep the device's queue full."""

    def __init__(self, device: torch.device) -> None:
        self.lag = device.type != "cpu"
        self._pending: tuple[torch.Tensor, torch.Event | None] | None = None

    def exchange(self, value: torch.Tensor) -> float | None:
        """This value (CPU) or the previous one (accelerators; None at the first call)."""
        value = value.detach()
        if not self.lag:
            return float(value)
        previous = self.latest()
        if value.device.type == "cpu":  # only when a test forces the lag on the CPU, which has no events
            self._pending = (value.clone(), None)
            return previous
        host = value.to("cpu", non_blocking=True)
        event = torch.Event(device=value.device)
        event.record()
        self._pending = (host, event)
        return previous

    def latest(self) -> float | None:
        """The last value exchanged and not yet returned (waits for its copy), or None."""
        if self._pending is None:
            return None
        host, event = self._pending
        if event is not None:
            event.synchronize()
        self._pending = None
        return float(host)
