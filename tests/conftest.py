"""Shared test machinery: the `cuda` marker, the `device` fixture and the tolerance table.

Tolerances (DESIGN.md section 7):
- float32: |kernel - float64 reference| <= 1e-5 * max|reference| (rel 1e-5, elementwise too).
- bfloat16 / float16: max|kernel - float64 reference| <= 2 * max|torch in that dtype - float64
  reference| + a small floor (1e-3 * max|reference|) that keeps the check meaningful when PyTorch
  happens to be exact. The float32 lse of low-precision inputs must also be within 1e-4 rel (the
  kernel accumulates scores in float32 from exactly converted inputs).

Nothing here touches a GPU at import or collection time: the `cuda` marker is evaluated when a
marked test is about to run.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dlmfuse

FP32_RTOL = 1e-5
LOWP_RATIO = 2.0
LOWP_FLOOR = 1e-3
LOWP_LSE_RTOL = 1e-4
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# ----------------------------------------------------------------------------------- cuda marker
def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA build of dlmfuse and a visible GPU (skipped otherwise)")
    config.addinivalue_line("markers", "slow: compiles with torch.compile or runs large shapes (still runs by default)")


@functools.lru_cache(maxsize=None)
def cuda_usable() -> bool:
    """A CUDA build of dlmfuse and a visible GPU (evaluated lazily, once)."""
    return bool(dlmfuse.build_info()["cuda"]) and torch.cuda.is_available()


def pytest_runtest_setup(item):
    if item.get_closest_marker("cuda") is not None and not cuda_usable():
        pytest.skip("needs a CUDA build of dlmfuse and a visible GPU")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request) -> torch.device:
    """Every device a test should run on: cpu always, cuda when the `cuda` marker allows it."""
    return torch.device(request.param)


def cuda_test_kernels(*kernels: str) -> list[str]:
    """The DLMFUSE_CUDA_ATTENTION kernels a kernel-parametrised CUDA test runs: ``kernels``, narrowed
    to those named in DLMFUSE_TEST_KERNELS (space- or comma-separated) when it is set. A device run
    tests each not-yet-verified kernel in its own pytest process this way (scripts/gpu_check.sh):
    a fault in one kernel kills its process's CUDA context, not the other kernels' results."""
    chosen = os.environ.get("DLMFUSE_TEST_KERNELS", "").replace(",", " ").split()
    return [kernel for kernel in kernels if not chosen or kernel in chosen]


# ------------------------------------------------------------------------------------ tolerances
def _finite_parts(actual: torch.Tensor, expected: torch.Tensor, name: str):
    """Checks that -inf / +inf / NaN sit at the same places; returns the finite values (float64)."""
    actual = actual.detach().cpu().double()
    expected = expected.detach().cpu().double()
    assert actual.shape == expected.shape, f"{name}: shape {list(actual.shape)} != {list(expected.shape)}"
    assert not torch.isnan(actual).any(), f"{name}: NaN at {torch.isnan(actual).nonzero()[:5].tolist()}"
    for kind, test in (("-inf", torch.isneginf), ("+inf", torch.isposinf)):
        diff = (test(actual) != test(expected)).nonzero()
        assert diff.numel() == 0, f"{name}: {kind} pattern differs at {diff[:5].tolist()}"
    finite = torch.isfinite(expected)
    return actual[finite], expected[finite]


def _scale_of(expected: torch.Tensor) -> float:
    return float(expected.abs().max()) if expected.numel() else 0.0


def assert_fp32_close(actual: torch.Tensor, expected: torch.Tensor, name: str = "out", rtol: float = FP32_RTOL):
    """float32 tolerance: rel 1e-5, with an absolute part of 1e-5 * max|expected|."""
    a, e = _finite_parts(actual, expected, name)
    scale = max(_scale_of(e), 1e-30)
    torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{name}: {m}")


def assert_lowp_close(actual: torch.Tensor, expected: torch.Tensor, torch_lowp: torch.Tensor, name: str = "out"):
    """bf16/fp16 tolerance: kernel error <= 2x PyTorch's error in that dtype (+ a tiny floor)."""
    a, e = _finite_parts(actual, expected, name)
    t, _ = _finite_parts(torch_lowp, expected, f"{name} (torch low precision)")
    if e.numel() == 0:
        return
    kernel_err = float((a - e).abs().max())
    torch_err = float((t - e).abs().max())
    bound = LOWP_RATIO * torch_err + LOWP_FLOOR * _scale_of(e)
    assert kernel_err <= bound, (
        f"{name}: max abs error {kernel_err:.3g} > {LOWP_RATIO} x torch's {torch_err:.3g} "
        f"+ floor {LOWP_FLOOR * _scale_of(e):.3g} (max |expected| {_scale_of(e):.3g})"
    )


def _assert_exact_empty(out: torch.Tensor, lse: torch.Tensor | None, expected_lse: torch.Tensor):
    """Rows with no visible key: out exactly 0 (no NaN) and lse exactly -inf."""
    empty = torch.isneginf(expected_lse.cpu())  # [B, Hq, Lq]
    if not empty.any():
        return
    rows = out.detach().cpu().transpose(1, 2)[empty]  # [n, D]
    assert torch.equal(rows, torch.zeros_like(rows)), "rows with no visible key must give output exactly 0"
    if lse is not None:
        assert torch.isneginf(lse.detach().cpu()[empty]).all(), "rows with no visible key must give lse -inf"


def check_attention(out, q, k, v, *, lse=None, **kwargs):
    """Checks dlmfuse.attention's out (and lse) against dlmfuse.reference.attention.

    kwargs are those of the call (mask, bias, kv_lens, scale). Returns the float64 reference
    (out, lse) for further checks.
    """
    ref_out, ref_lse = dlmfuse.reference.attention(
        q, k, v, return_lse=True, out_dtype=torch.float64, **kwargs)
    assert out.dtype == q.dtype and out.shape == q.shape, (out.dtype, out.shape)
    assert out.device == q.device
    if lse is not None:
        assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1]), (lse.dtype, lse.shape)
    _assert_exact_empty(out, lse, ref_lse)
    if q.dtype == torch.float32:
        assert_fp32_close(out, ref_out, "out")
        if lse is not None:
            assert_fp32_close(lse, ref_lse, "lse")
    else:
        low_out, low_lse = dlmfuse.reference.attention(
            q, k, v, return_lse=True, compute_dtype=q.dtype, **kwargs)
        assert_lowp_close(out, ref_out, low_out, "out")
        if lse is not None:
            assert_lowp_close(lse, ref_lse, low_lse, "lse")
            # Scores are accumulated in float32 from inputs that convert exactly, so the float32
            # lse must also be close to float32 accuracy, far inside the 2x rule.
            assert_fp32_close(lse, ref_lse, "lse", rtol=LOWP_LSE_RTOL)
    return ref_out, ref_lse


def run_and_check(q, k, v, **kwargs):
    """Calls dlmfuse.attention(return_lse=True), checks it, returns (out, lse)."""
    out, lse = dlmfuse.attention(q, k, v, return_lse=True, **kwargs)
    check_attention(out, q, k, v, lse=lse, **kwargs)
    return out, lse


class DispatchLog(TorchDispatchMode):
    """Records every op that reaches the dispatcher's Python mode."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))
