"""Attention gradients where scores leave float32: the forward recomputes such rows in float64, and
the backward must too, or it recomputes P as inf - inf = NaN (or P = 0 where every score fell to
-inf, or P = 1 for every key where |lse| absorbed log(sum)).

Both backwards of each device are checked: the fused one (C++ on CPU; on CUDA the tensor-core
kernel behind DLMFUSE_CUDA_KERNELS=1, whose planned forward recomputes rows beyond float32) and the
PyTorch composite (DLMFUSE_BACKEND=reference).
Gradients are compared per row of D values, each against its own magnitude (at least 1): rows of
these inputs range from 0 to 1e20, and a tolerance scaled by the largest would hide any error in
the ordinary rows.
"""

import warnings

import pytest
import torch

import dlmfuse
from dlmfuse import Mask
from dlmfuse import _attention_backward
from dlmfuse._attention_backward import _SCORE_BOUND, rows_beyond_float32

from conftest import overflow_inputs
from test_attention_backward import GRAD_RTOL, gradients

# The float64 route warns (it is slow); test_the_float64_route_warns_when_it_runs checks that.
pytestmark = pytest.mark.filterwarnings("ignore:attention backward:RuntimeWarning")

BACKENDS = ["fused", "composite"]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch, device):
    if request.param == "composite":
        monkeypatch.setenv("DLMFUSE_BACKEND", "reference")
    if device == "cuda":  # the fused CUDA backward, after the planned forward (its rows beyond float32
        monkeypatch.setenv("DLMFUSE_CUDA_KERNELS", "1")  # are recomputed; the verified kernels' are not)
    return request.param


def tolerance(device, dtype):
    """The CUDA bf16 backward rounds P and dS to bf16 for its MMAs (test_attention_backward_cuda.py)."""
    return 4e-2 if device == "cuda" and dtype == torch.bfloat16 else GRAD_RTOL[dtype]


def check_rows(tensors, dtype, seed=0, device="cpu", tol=None, **kwargs):
    """Gradients of (q, k, v[, bias]) on `device` equal the float64 reference's on the same rounded
    inputs, row by row (tolerance: GRAD_RTOL of the dtype unless given)."""
    B, Lq, Hq, D = tensors[0].shape
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(B, Lq, Hq, D, generator=g, dtype=torch.float64)
    grad_lse = torch.randn(B, Hq, Lq, generator=g, dtype=torch.float64)
    rounded = [t.to(dtype).double() for t in tensors]
    expected = gradients(dlmfuse.reference.attention, rounded, torch.float64, grad_out.to(dtype).double(), grad_lse,
                         compute_dtype=torch.float64, **kwargs)
    on_device = {name: t.to(device) for name, t in kwargs.items()}  # tensors and masks
    got = gradients(dlmfuse.attention, [t.to(device) for t in rounded], dtype, grad_out.to(device),
                    grad_lse.to(device), **on_device)
    got = [t.cpu() for t in got]
    tol = GRAD_RTOL[dtype] if tol is None else tol
    for name, a, e in zip(("dq", "dk", "dv", "dbias"), got, expected):
        assert a.dtype == dtype and a.shape == e.shape, name
        assert torch.isfinite(a).all(), f"{name}: non-finite gradient where the float64 reference's is finite"
        row_scale = e.abs().amax(-1, keepdim=True).clamp(min=1.0)
        error = ((a.double() - e).abs() / row_scale).max()
        assert error <= tol, f"{name}: error {float(error):.2e} of its row's magnitude (tolerance {tol:.1e})"
    return got


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ["dense", "causal", "bias", "kv_lens", "gqa", "gqa_two_kv_heads", "labels"])
def test_gradients_of_rows_beyond_float32(backend, device, dtype, case):
    q, k, v = overflow_inputs(torch.float32)
    kwargs = {}
    tensors = [q, k, v]
    if case == "causal":
        kwargs["mask"] = Mask.causal(70)
    elif case == "bias":
        tensors.append(torch.randn(1, 2, 70, 70, generator=torch.Generator().manual_seed(1)))
    elif case == "kv_lens":
        kwargs["kv_lens"] = torch.tensor([70, 9], dtype=torch.int32)  # batch 1 keeps key 8 (the inf - inf row's)
    elif case == "gqa":
        tensors = [q, k[:, :, :1], v[:, :, :1]]  # one KV head for both query heads
    elif case == "gqa_two_kv_heads":
        tensors = [torch.cat([q, q.flip(1)], dim=2), k, v]  # query heads 0, 1 read KV head 0; 2, 3 read 1
    elif case == "labels":
        g = torch.Generator().manual_seed(2)
        kwargs["mask"] = Mask(*(torch.randint(0, 4, (2, 70), generator=g) for _ in range(4)),
                              torch.arange(70).expand(2, 70) // 40, torch.arange(70).expand(2, 70) // 40)
    check_rows(tensors, dtype, device=device, tol=tolerance(device, dtype), **kwargs)


def test_rows_beyond_float32_in_chunks_of_three(monkeypatch):
    """The float64 rows run a few at a time: every chunk must add its dK and dV, none overwrite."""
    monkeypatch.setattr(_attention_backward, "_EXACT_CHUNK_ELEMENTS", 70 * 3)  # group 1, 70 keys: 3 rows
    q, k, v = overflow_inputs(torch.float32)
    check_rows([q, k, v], torch.float32, mask=Mask.causal(70))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_gradients_of_a_row_whose_scores_all_fall_below_float32(backend, device, dtype):
    """Row 2 sees only keys 0-4, all of whose scores are below -3.4e38 in float32 (it attends to key 4
    in float64); the other rows see only keys 5-8, which are ordinary."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 9, 1, 64, generator=g) for _ in range(3))
    q[0, 2, 0, 0], k[0, :5, 0, 0], k[0, 4, 0, 0] = 1e20, -1e20, -2e19
    q[0, :2, 0, 0] = q[0, 3:, 0, 0] = 0.0  # the ordinary rows stay well conditioned against the 1e20 keys
    hidden_keys = torch.arange(9) < 5
    row_two = torch.arange(9) == 2
    # k_group 0 for keys 0-4 and row 2 only; every other row sees the keys of order 0 (keys 5-8).
    mask = Mask((~row_two).long()[None], (~row_two).long()[None], hidden_keys.long()[None],
                (~hidden_keys).long()[None])
    dq, dk, dv = check_rows([q, k, v], dtype, device=device, tol=tolerance(device, dtype), mask=mask)
    assert dv[0, 4].abs().sum() > 0, "key 4 carries row 2's whole attention"


def test_padded_queries_whose_bias_hides_every_key(backend, device):
    """Hugging Face style padding: finfo.min on padded queries and keys, dO = 0 on padded queries.
    Their |lse| is ~3.4e38: they take the float64 route, where dO = 0 gives them zero gradients."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 40, 2, 64, generator=g) for _ in range(3))
    bias = torch.zeros(2, 1, 40, 40)
    bias[1, :, 30:] = bias[1, :, :, 30:] = torch.finfo(torch.float32).min
    dq, dk, dv, dbias = check_rows([q, k, v, bias], torch.float32, device=device)
    assert torch.isfinite(dbias).all()


def test_a_bias_beyond_float32_in_log2_units_on_one_key(backend, device):
    """3e38 on one key: that row's lse is ~3e38 (float64 route), and the float32 backward, which
    still adds the bias, must not turn its +inf (3e38 x log2 e) into NaN dK / dV."""
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 20, 1, 64, generator=g) for _ in range(3))
    bias = torch.zeros(1, 1, 20, 20)
    bias[0, 0, 1, 2] = 3e38
    check_rows([q, k, v, bias], torch.float32, device=device)


def test_keys_past_kv_lens_never_decide_the_float64_route(backend, device):
    """Keys past kv_lens are never read: 1e30 there (an unwritten cache) sends no row to float64
    (no warning), and a batch with no key at all gets zero gradients even when its own q is huge."""
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(2, 12, 2, 64, generator=g) for _ in range(3))
    k[0, 7:], k[1] = 1e30, 1e30
    q[1, 3, 0, 0] = 1e20
    kv_lens = torch.tensor([7, 0], dtype=torch.int32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dq, dk, dv = check_rows([q, k, v], torch.float32, device=device, kv_lens=kv_lens)
    assert not [w for w in caught if "float64" in str(w.message)]
    assert not dq[1].any() and not dk[1].any() and not dv[1].any()


def test_ordinary_inputs_stay_on_the_float32_path():
    """The float64 route is for extremes only: activations far beyond any trained model's (|q|, |k|
    up to 100 at D = 128), inf and NaN do not take it."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 300, 4, 128, generator=g).clamp(-100, 100) * 30
    k = torch.randn(2, 300, 2, 128, generator=g).clamp(-100, 100) * 30
    lse = torch.randn(2, 4, 300) * 1e3
    k[0, 3, 1, 2] = float("inf")  # propagates alike in float32: no reason to send a batch to float64
    q[1, 4, 0, 1] = float("nan")
    assert not rows_beyond_float32(q, k, lse, 128**-0.5).any()
    q[1, 7, 3, 5] = 2**20
    lse[0, 1, 9] = float("inf")
    lse[0, 2, 11] = float("-inf")  # a row without keys is not an extreme
    lse[1, 0, 12] = -_SCORE_BOUND
    rows = rows_beyond_float32(q, k, lse, 128**-0.5)
    assert rows.nonzero().tolist() == [[0, 9], [1, 7], [1, 12]]


def test_the_float64_route_warns_when_it_runs():
    """Once per backward that computes rows in float64; never for rows with dO = 0 (padded queries,
    whose finfo.min bias sends them to that route without any work there)."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 40, 2, 64, generator=g).requires_grad_(True) for _ in range(3))
    bias = torch.zeros(2, 1, 40, 40)
    bias[1, :, 30:] = bias[1, :, :, 30:] = torch.finfo(torch.float32).min
    grad_out = torch.randn(2, 40, 2, 64, generator=g)
    grad_out[1, 30:] = 0.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dlmfuse.attention(q, k, v, bias=bias).backward(grad_out)
        assert not [w for w in caught if "float64" in str(w.message)], "padded rows cost nothing: no warning"
        q, k, v = (t.requires_grad_(True) for t in overflow_inputs(torch.float32))
        dlmfuse.attention(q, k, v).sum().backward()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "computed in float64" in messages[0], messages
