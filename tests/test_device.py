"""Device decisions, tested on the CPU through injected capabilities (the hardware they describe need not exist)."""

from __future__ import annotations

import importlib

import pytest
import torch

from cleanse.engine.device import (
    Capability,
    GradScaling,
    LaggedScalar,
    autocast,
    prepare_device,
    resolve_precision,
    rows_to_device,
    to_device,
    wide_float,
)
from cleanse.errors import CleanseError

A100 = Capability("cuda", float64=True, bf16=True, fp16=True, tf32=True)
V100 = Capability("cuda", float64=True, bf16=False, fp16=True, tf32=False)  # bf16 only emulated
P100 = Capability("cuda", float64=True, bf16=False, fp16=False, tf32=False)
MPS = Capability("mps", float64=False, bf16=False, fp16=False, tf32=False)
CPU_AMX = Capability("cpu", float64=True, bf16=True, fp16=False, tf32=False)
CPU_AVX2 = Capability("cpu", float64=True, bf16=False, fp16=False, tf32=False)


@pytest.mark.parametrize(
    "cap, expected",
    [(A100, "bf16"), (V100, "fp16"), (P100, "fp32"), (MPS, "fp32"), (CPU_AMX, "bf16"), (CPU_AVX2, "fp32")],
)
def test_auto_precision_is_native_bf16_then_fp16_then_fp32(cap, expected):
    assert resolve_precision("auto", torch.device(cap.type), cap) == expected


def test_explicit_precisions_are_kept_where_the_device_can_run_them():
    assert resolve_precision("fp16", torch.device("cuda"), V100) == "fp16"
    assert resolve_precision("bf16", torch.device("cuda"), V100) == "bf16"  # emulated, but asked for
    assert resolve_precision("fp32", torch.device("cuda"), A100) == "fp32"


def test_fp16_without_tensor_cores_is_refused_with_the_fix():
    with pytest.raises(CleanseError) as err:
        resolve_precision("fp16", torch.device("cpu"), CPU_AMX)
    assert str(err.value) == (
        "--precision fp16 needs a CUDA GPU with fp16 tensor cores (compute capability 7.0+), not cpu; "
        "use --precision bf16 or fp32"
    )


def test_an_unknown_precision_names_the_choices():
    with pytest.raises(CleanseError, match=r"--precision 'fp8' must be one of auto, fp32, bf16, fp16"):
        resolve_precision("fp8", torch.device("cpu"), CPU_AMX)


def test_wide_float_follows_the_capability():
    assert wide_float(torch.device("mps"), MPS) == torch.float32
    assert wide_float(torch.device("cuda"), A100) == torch.float64
    assert wide_float(torch.device("cpu")) == torch.float64
    assert wide_float(torch.device("mps")) == torch.float32  # without a probe: by device type


def test_prepare_device_leaves_a_cpu_alone():
    before = torch.backends.cudnn.benchmark
    assert prepare_device(torch.device("cpu"), A100) == torch.device("cpu")
    assert torch.backends.cudnn.benchmark == before


def test_fp16_autocast_runs_matmuls_in_half_precision():
    with autocast(torch.device("cpu"), "fp16"):
        assert torch.nn.Linear(3, 2)(torch.randn(4, 3)).dtype == torch.float16
    with autocast(torch.device("cpu"), "fp32"):
        assert torch.nn.Linear(3, 2)(torch.randn(4, 3)).dtype == torch.float32


def _net_and_loss(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    net = torch.nn.Linear(3, 1)
    return net, net(torch.randn(8, 3)).pow(2).mean()


def test_plain_scaling_is_exactly_zero_grad_backward_step():
    net, loss = _net_and_loss()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    grads = torch.autograd.grad(loss, list(net.parameters()), retain_graph=True)
    expected = [p - 0.1 * g for p, g in zip(net.parameters(), grads, strict=True)]
    for p in net.parameters():
        p.grad = torch.ones_like(p)  # a stale gradient zero_grad must clear
    GradScaling(torch.device("cpu"), "bf16").step(optimizer, loss)
    for p, e in zip(net.parameters(), expected, strict=True):
        assert torch.allclose(p, e)
    assert GradScaling(torch.device("cpu"), "fp32").state() == {}


def test_fp16_scaling_unscales_before_the_step_and_its_state_round_trips():
    net, loss = _net_and_loss()
    reference, ref_loss = _net_and_loss()
    scaling = GradScaling(torch.device("cpu"), "fp16")
    scaling.step(torch.optim.SGD(net.parameters(), lr=0.1), loss)
    GradScaling(torch.device("cpu"), "fp32").step(torch.optim.SGD(reference.parameters(), lr=0.1), ref_loss)
    for p, r in zip(net.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(p, r, atol=1e-6)  # the 65536x scale was taken off the gradients again
    state = scaling.state()
    assert float(state["scaler.scale"]) == 65536.0 and int(state["scaler.growth_tracker"]) == 1
    other = GradScaling(torch.device("cpu"), "fp16")
    other.restore({"scaler.scale": torch.tensor(1024.0), "scaler.growth_tracker": torch.tensor(7)})
    assert float(other.state()["scaler.scale"]) == 1024.0 and int(other.state()["scaler.growth_tracker"]) == 7


def test_fp16_scaling_skips_a_step_whose_gradients_overflow_and_halves_the_scale():
    net = torch.nn.Linear(1, 1)
    before = [p.detach().clone() for p in net.parameters()]
    scaling = GradScaling(torch.device("cpu"), "fp16")
    scaling.step(torch.optim.SGD(net.parameters(), lr=0.1), net(torch.tensor([[1e36]])).sum() * 1e10)
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before, strict=True))
    assert float(scaling.state()["scaler.scale"]) == 32768.0


def test_lagged_scalar_reads_at_once_on_the_cpu_and_one_call_late_on_accelerators():
    now = LaggedScalar(torch.device("cpu"))
    assert [now.exchange(torch.tensor(v)) for v in (1.0, 2.0)] == [1.0, 2.0] and now.latest() is None
    late = LaggedScalar(torch.device("cpu"))
    late.lag = True  # the accelerator path, on the CPU
    value = torch.tensor(1.0)
    assert late.exchange(value) is None
    value.add_(10)  # the caller reusing its tensor must not change what was read
    assert late.exchange(torch.tensor(2.0)) == 1.0
    assert late.latest() == 2.0 and late.latest() is None


def test_rows_and_tensors_reach_the_device_unchanged():
    images = torch.arange(5 * 2 * 2 * 3, dtype=torch.uint8).view(5, 2, 2, 3)
    index = torch.tensor([4, 0, 2])
    assert torch.equal(rows_to_device(images, index, torch.device("cpu")), images[index])
    assert torch.equal(to_device(index, torch.device("cpu")), index)


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9663676416 bytes"),
    ],
)
def test_running_out_of_memory_in_train_is_exit_2_naming_the_flag(monkeypatch, tmp_path, error):
    from typer.testing import CliRunner

    from cleanse.cli import app

    train_job = importlib.import_module("cleanse.jobs.train")  # the module, not the function cleanse.jobs exports

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(train_job, "train_model", fail)
    out = tmp_path / "m.safetensors"
    result = CliRunner().invoke(app, ["train", "synthetic", "-o", str(out), "--epochs", "1"])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (
        "error: out of memory in cleanse train: lower --batch-size, free memory on the device, or run on another "
        "--device"
    )
    assert not out.exists() and not out.with_name("m.safetensors.run.json").exists()


def test_the_fisher_chunk_fits_the_model_and_does_not_change_the_fisher():
    from cleanse.recipes.tar_ewc import empirical_fisher, fisher_chunk

    small = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    assert fisher_chunk(small) == 32 and fisher_chunk(small, 5) == 5
    big = torch.nn.Linear(4096, 8192)  # 33.6M parameters: 134 MB of float32 gradients per sample
    assert fisher_chunk(big) == 1
    assert fisher_chunk(torch.nn.Linear(1024, 8192)) == 7  # 8.4M parameters: 256 MiB // 33.6 MB = 7
    images, labels = torch.rand(10, 1, 2, 6), torch.randint(0, 3, (10,))
    one, all_at_once = empirical_fisher(small, images, labels, 1), empirical_fisher(small, images, labels, 32)
    for name in one:
        assert torch.allclose(one[name], all_at_once[name], rtol=1e-5, atol=1e-7)
