"""Shared test machinery: the `cuda` marker, the `device` fixture and the tolerance table.

Tolerances:
- float32: |kernel - float64 reference| <= 1e-5 * max|reference| (rel 1e-5, elementwise too).
- bfloat16 / float16 attention, element by element against the float64 reference computed from the
  same (already rounded) inputs, a bound that only fp32 accumulation meets (lowp_attention_bound):
  the output is one rounding of an fp32 value o32, so |out - ref| <= u |ref| + (1 + u) delta, with u
  the dtype's unit roundoff (2**-8 bf16, 2**-11 fp16) and delta the worst-case fp32 error of o32
  (score and sum errors of size ~(D + Lk) 2**-24, written out in lowp_attention_bound). Kernels that round P to the input dtype for the P V product (CUDA tensor cores)
  add sum_j e_j v_j with independent |e_j| <= u p_j: 4 sigma of it, 4 u sqrt(sum_j p_j^2 v_j^2 / 3).
  A kernel that keeps its running output in bf16 between key tiles rounds T times, not once, and
  fails (tests/test_lowp_rule.py shows it). The float32 lse of low-precision inputs must be within
  1e-4 rel (scores accumulate in float32 from exactly converted inputs).

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
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
LOWP_P_SIGMAS = 4.0
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


# A CPU-only build on a machine with a GPU would skip every CUDA test and pass: a wheel or an
# install that lost its CUDA module must fail loudly there instead (set this to test such a
# build on purpose).
CPU_BUILD_ON_GPU_ENV = "DLMFUSE_TEST_CPU_BUILD_ON_GPU"


def pytest_runtest_setup(item):
    if item.get_closest_marker("cuda") is None or cuda_usable():
        return
    if torch.cuda.is_available() and not dlmfuse.build_info()["cuda"] and os.environ.get(CPU_BUILD_ON_GPU_ENV) != "1":
        pytest.fail(f"a GPU is visible but this dlmfuse build has no CUDA module ({dlmfuse.__file__}): the CUDA "
                    f"tests cannot run. Build with nvcc on PATH (DLMFUSE_CUDA=ON), or set {CPU_BUILD_ON_GPU_ENV}=1 "
                    f"to test a CPU-only build here.", pytrace=False)
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


def reference_weights(q, k, *, mask=None, bias=None, kv_lens=None, scale=None) -> torch.Tensor:
    """The softmax weights of the float64 reference, ``[B, Hq, Lq, Lk]`` (0 where hidden)."""
    B, Lq, Hq, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    q64 = q.detach().cpu().double().transpose(1, 2)
    k64 = k.detach().cpu().double().transpose(1, 2).repeat_interleave(Hq // Hkv, dim=1)
    s = torch.matmul(q64, k64.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.detach().cpu().double()
    visible = dlmfuse.reference.visibility(None if mask is None else mask.to("cpu"), B, Lq, Lk,
                                           None if kv_lens is None else kv_lens.cpu(), device="cpu")
    s = s.masked_fill(~visible[:, None], float("-inf"))
    empty = torch.isneginf(s).all(-1, keepdim=True)
    return torch.softmax(torch.where(empty, torch.zeros_like(s), s), dim=-1).masked_fill(empty, 0.0)


def lowp_attention_bound(q, k, v, ref_out, *, rounded_p: bool, mask=None, bias=None, kv_lens=None, scale=None):
    """Per-element bound on |out - ref_out| for bf16 / fp16 attention with fp32 accumulation (see
    the module docstring); rounded_p for kernels that round P to the input dtype."""
    u = UNIT_ROUNDOFF[q.dtype]
    B, Lq, Hq, D = q.shape
    Lk, group = k.shape[1], q.shape[2] // k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    kwargs = dict(mask=mask, bias=bias, kv_lens=kv_lens, scale=scale)
    p = reference_weights(q, k, **kwargs)  # [B, Hq, Lq, Lk]
    ref = ref_out.detach().cpu().double()  # [B, Lq, Hq, D]
    v64 = v.detach().cpu().double().transpose(1, 2).repeat_interleave(group, dim=1)  # [B, Hq, Lk, D]
    weighted_abs_v = torch.matmul(p, v64.abs()).transpose(1, 2)  # sum_j p_j |v_j|, [B, Lq, Hq, D]
    # fp32 error of o32: scores err by (D + 2) u32 sum_d |q_d k_d| scale (+ bias rounding) in the
    # worst case, which moves o by that times sum_j p_j |v_j - o|; the sums over keys err by
    # (Lk + D) u32 sum_j p_j |v_j|; exp2 approximations add 2**-21 to a score.
    u32 = 2.0**-24
    q64 = q.detach().cpu().double().abs().transpose(1, 2)
    k64 = k.detach().cpu().double().abs().transpose(1, 2).repeat_interleave(group, dim=1)
    score_size = torch.matmul(q64, k64.transpose(-1, -2)) * abs(scale)  # [B, Hq, Lq, Lk]
    if bias is not None:
        score_size = score_size + bias.detach().cpu().double().abs().nan_to_num(posinf=0.0)
    score_size = torch.where(p > 0, score_size, torch.zeros_like(score_size))
    score_size = score_size.amax(-1) if Lk > 0 else score_size.sum(-1)  # [B, Hq, Lq] (0 without keys)
    score_err = ((D + 2) * u32 * 2 * score_size + 2.0**-21).transpose(1, 2)[..., None]  # [B, Lq, Hq, 1]
    delta = score_err * (weighted_abs_v + ref.abs()) + (Lk + D) * u32 * weighted_abs_v
    bound = u * ref.abs() + (1 + u) * delta
    if rounded_p:
        spread = torch.matmul(p * p, v64 * v64).sqrt().transpose(1, 2)  # sqrt(sum_j p_j^2 v_j^2)
        bound = bound + LOWP_P_SIGMAS * u * spread / 3**0.5
    return bound


def assert_lowp_attention_close(out, q, k, v, ref_out, name: str = "out", **kwargs):
    """bf16/fp16 attention against the float64 reference under lowp_attention_bound."""
    a, e = _finite_parts(out, ref_out, name)
    if e.numel() == 0:
        return
    rounded_p = out.is_cuda  # the CUDA tensor-core kernels round P for the P V product
    bound = lowp_attention_bound(q, k, v, ref_out, rounded_p=rounded_p, **kwargs)
    finite = torch.isfinite(ref_out.detach().cpu().double())
    excess = (a - e).abs() - bound[finite]
    worst = int(excess.argmax())
    assert float(excess[worst]) <= 0, (
        f"{name}: error {float((a - e)[worst].abs()):.3g} at {finite.nonzero()[worst].tolist()} exceeds the "
        f"fp32-accumulation bound {float(bound[finite][worst]):.3g} (expected {float(e[worst]):.6g}, got "
        f"{float(a[worst]):.6g}; {int((excess > 0).sum())} of {excess.numel()} elements over)"
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
        assert_lowp_attention_close(out, q, k, v, ref_out, "out", **kwargs)
        if lse is not None:
            # Scores are accumulated in float32 from inputs that convert exactly.
            assert_fp32_close(lse, ref_lse, "lse", rtol=LOWP_LSE_RTOL)
    return ref_out, ref_lse


# ------------------------------------------------------------------------- scores beyond float32
def overflow_inputs(dtype, device="cpu"):
    """q, k, v [2, 70, 2, 64] with rows whose scores exceed float32: one key dominating by ~1e40
    (batch 0 row 3), two keys beyond float32 with different values (row 5), and a dot product whose
    float32 terms are +inf and -inf (batch 1 row 7, head 1), where float64 gives a finite score.
    float32 or bfloat16 (1e20 is beyond float16)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 70, 2, 64, generator=g) for _ in range(3))
    q[0, 3, 0, 0], k[0, 5, 0, 0] = 1e20, 1e20
    q[0, 5, 0, 1], k[0, 9, 0, 1], k[0, 11, 0, 1] = 2e20, 3e20, 6e20
    q[1, 7, 1, :2], k[1, 8, 1, :2] = torch.tensor([1e20, -1e20]), torch.tensor([1e20, 1e20])
    return tuple(t.to(device, dtype) for t in (q, k, v))


def downward_overflow_inputs(dtype, device="cpu"):
    """q, k, v [1, 9, 1, 64] where every q.k of row 2 is below -3.4e38: in float32 all its scores are
    -inf, which looks like a row that saw no key; in float64 it attends to key 4 (the least negative)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 9, 1, 64, generator=g) for _ in range(3))
    q[0, 2, 0, 0] = 1e20
    k[0, :, 0, 0] = -1e20
    k[0, 4, 0, 0] = -2e19
    return tuple(t.to(device, dtype) for t in (q, k, v))


def check_beyond_float32(out, lse, q, k, v, **kwargs):
    """The contract on rows whose scores exceed float32: a finite output where the float64 reference
    has one, lse never -inf or NaN for a row that saw keys, both equal to the reference's (whose
    float32 lse overflows to +inf where its float64 one exceeds 3.4e38, as ours does)."""
    assert torch.isfinite(out).all(), "a finite output where the float64 reference has one"
    assert not torch.isneginf(lse).any() and not torch.isnan(lse).any(), "every row saw keys"
    ref_out, ref_lse = dlmfuse.reference.attention(q, k, v, return_lse=True, out_dtype=torch.float64, **kwargs)
    assert_fp32_close(lse, ref_lse.to(torch.float32), "lse")
    if q.dtype == torch.float32:
        assert_fp32_close(out, ref_out, "out")
    else:  # torch's own bf16 attention is NaN on these rows: bound by bf16 output rounding instead
        torch.testing.assert_close(out.double(), ref_out, rtol=2**-8, atol=2**-8 * float(ref_out.abs().max()))


def cuda_graph_of(step):
    """Captures ``step()`` in a CUDA graph after one warm-up call on a side stream (allocator and
    lazy initialisation outside the capture); returns the graph and the captured call's outputs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    return graph, outputs


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
