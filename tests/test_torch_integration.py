"""PyTorch integration of the attention ops: torch.library.opcheck, torch.compile(fullgraph=True),
the eager fast path that skips the dispatcher, and (marked `cuda`) CUDA tensors and CUDA graphs."""

import importlib

import pytest
import torch

import dlmfuse
from dlmfuse import Mask

from conftest import DispatchLog, check_attention, cuda_graph_of, cuda_test_kernels, lowp_attention_bound

attention_module = importlib.import_module("dlmfuse.attention")  # `dlmfuse.attention` is the function


def make(batch, q_len, k_len, q_heads, kv_heads, head_dim=64, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(batch, q_len, q_heads, head_dim), (batch, k_len, kv_heads, head_dim), (batch, k_len, kv_heads, head_dim)]
    return [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes]


def op_args(with_extras, dtype=torch.float32, requires_grad=True):
    """Positional arguments of torch.ops.dlmfuse.attention."""
    B, Lq, Lk, Hq, Hkv = 2, 9, 21, 4, 2
    q, k, v = (t.requires_grad_(requires_grad) for t in make(B, Lq, Lk, Hq, Hkv, dtype=dtype))
    if not with_extras:
        return (q, k, v, None, None, None, None, None, None, None, None, 0.125)
    g = torch.Generator().manual_seed(1)
    labels = [torch.randint(0, 3, (b, n), generator=g, dtype=torch.int32)
              for b, n in ((1, Lq), (B, Lq), (B, Lk), (1, Lk), (B, Lq), (1, Lk))]  # orders, groups, documents
    bias = torch.randn(B, Hq, Lq, Lk, generator=g).to(dtype).requires_grad_(requires_grad)
    kv_lens = torch.tensor([Lk, 15], dtype=torch.int32)
    return (q, k, v, *labels, bias, kv_lens, 0.2)


# ----------------------------------------------------------------------------------------- opcheck
@pytest.mark.parametrize("with_extras", [False, True], ids=["plain", "labels_documents_bias_kv_lens"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_opcheck_attention(with_extras, dtype):
    torch.library.opcheck(torch.ops.dlmfuse.attention.default, op_args(with_extras, dtype))


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
def test_opcheck_attention_broadcast_bias(requires_grad):
    args = list(op_args(True, requires_grad=requires_grad))
    args[9] = torch.randn(1, 4, 1, 21).requires_grad_(requires_grad)  # broadcast, as the public op passes it
    torch.library.opcheck(torch.ops.dlmfuse.attention.default, tuple(args))


def test_opcheck_merge_attention():
    g = torch.Generator().manual_seed(0)
    out_a, out_b = torch.randn(2, 5, 3, 64, generator=g), torch.randn(2, 5, 3, 64, generator=g)
    lse_a, lse_b = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    lse_b[0, 1] = float("-inf")
    torch.library.opcheck(torch.ops.dlmfuse.merge_attention.default, (out_a, lse_a, out_b, lse_b))


def test_public_op_equals_custom_op():
    args = op_args(True, requires_grad=False)
    q, k, v, qo, qg, ko, kg, qd, kd, bias, kv_lens, scale = args
    out, lse = torch.ops.dlmfuse.attention(*args)
    public = dlmfuse.attention(q, k, v, mask=Mask(qo, qg, ko, kg, qd, kd), bias=bias, kv_lens=kv_lens, scale=scale,
                               return_lse=True)
    assert torch.equal(out, public[0]) and torch.equal(lse, public[1])


def test_merge_attention_does_not_silently_drop_gradients():
    """merge_attention on inputs that require grad must give correct gradients or raise; a
    detached result (gradients silently lost) is a bug."""
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(1, 4, 2, 64, generator=g), torch.randn(1, 2, 4, generator=g),
               torch.randn(1, 4, 2, 64, generator=g), torch.randn(1, 2, 4, generator=g)]
    inputs = [t.clone().requires_grad_(True) for t in tensors]
    try:
        out, lse = dlmfuse.merge_attention(*inputs)
    except RuntimeError:
        return  # not differentiable, and says so at the call
    assert out.requires_grad and lse.requires_grad, (
        "merge_attention returned a detached output for inputs that require grad")
    try:
        (out.sum() + lse.sum()).backward()
    except RuntimeError as e:
        assert "merge_attention" in str(e)
        return  # not differentiable, and says so at backward
    ref_inputs = [t.double().requires_grad_(True) for t in tensors]
    ref_out, ref_lse = dlmfuse.reference.merge_attention(*ref_inputs)
    (ref_out.sum() + ref_lse.sum()).backward()
    for name, mine, ref in zip(("out_a", "lse_a", "out_b", "lse_b"), inputs, ref_inputs):
        torch.testing.assert_close(mine.grad.double(), ref.grad, rtol=1e-5, atol=1e-5, msg=lambda m: f"d{name}: {m}")


# ----------------------------------------------------------------------------------- eager fast path
@pytest.fixture
def op_calls(monkeypatch):
    """Counts the calls that go through torch.ops.dlmfuse.{attention, merge_attention}."""
    calls = []
    for name in ("attention", "merge_attention"):
        op = getattr(torch.ops.dlmfuse, name)

        def counting(*args, _op=op, _name=name, **kwargs):
            calls.append(_name)
            return _op(*args, **kwargs)

        monkeypatch.setattr(torch.ops.dlmfuse, name, counting)
    return calls


def test_eager_fast_path_skips_dispatcher(op_calls):
    q, k, v = make(1, 7, 11, 2, 2)
    mask, bias = Mask.causal(11).gather_queries(torch.arange(4, 11)), torch.randn(11)
    call = lambda: dlmfuse.attention(q, k, v, mask=mask, bias=bias, return_lse=True)  # noqa: E731

    fast = call()
    assert op_calls == [], "no grad needed: the eager call must not go through the dispatcher"
    assert not attention_module.needs_dispatcher(q, k, v, bias, differentiable=True)

    q.requires_grad_(True)
    assert attention_module.needs_dispatcher(q, k, v, bias, differentiable=True)
    slow = call()
    assert op_calls == ["attention"], "q requires grad: the call must go through the custom op (autograd)"
    assert slow[0].grad_fn is not None
    assert torch.equal(fast[0], slow[0].detach()) and torch.equal(fast[1], slow[1].detach())

    with torch.no_grad():
        call()
    with torch.inference_mode():
        call()
    assert op_calls == ["attention"], "under no_grad / inference_mode the eager call needs no dispatcher"

    dlmfuse.merge_attention(*fast, *fast)
    assert op_calls == ["attention"], "merge_attention's eager call must not go through the dispatcher"


def test_dispatch_modes_see_the_ops():
    """An active TorchDispatchMode (make_fx tracing, FlopCounterMode, logging) must see the op:
    the eager fast path may only skip the dispatcher when nobody is watching."""
    q, k, v = make(1, 5, 9, 2, 2)
    with DispatchLog() as log:
        out, lse = dlmfuse.attention(q, k, v, return_lse=True)
        dlmfuse.merge_attention(out, lse, out, lse)
    assert "dlmfuse.attention.default" in log.ops, log.ops
    assert "dlmfuse.merge_attention.default" in log.ops, log.ops


def test_make_fx_traces_the_op():
    """make_fx (real tensors) must record the custom op, not bake the eager result into a graph."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def fn(q, k, v):
        return dlmfuse.attention(q, k, v, mask=Mask.causal(6))

    graph = make_fx(fn)(*make(1, 6, 6, 2, 2))
    assert "dlmfuse.attention" in graph.code, graph.code
    fresh = make(1, 6, 6, 2, 2, seed=9)
    torch.testing.assert_close(graph(*fresh), fn(*fresh))


def test_fake_tensors_go_through_the_op():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v = torch.empty(2, 5, 4, 64), torch.empty(2, 8, 2, 64), torch.empty(2, 8, 2, 64)
        out, lse = dlmfuse.attention(q, k, v, mask=Mask.bidirectional(5, 8), kv_lens=torch.zeros(2, dtype=torch.int32),
                                     return_lse=True)
    assert out.shape == (2, 5, 4, 64) and out.dtype == torch.float32
    assert lse.shape == (2, 4, 5) and lse.dtype == torch.float32


# ------------------------------------------------------------------------------------ torch.compile
@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    from torch._dynamo.testing import CompileCounterWithBackend

    B, L, Hq, Hkv = 2, 40, 4, 2
    q, k, v = make(B, L, L, Hq, Hkv)
    bias = torch.randn(Hq, 1, L)
    kv_lens = torch.tensor([L, 31], dtype=torch.int32)

    def fn(q, k, v, mask, bias, kv_lens):
        return dlmfuse.attention(q, k, v, mask=mask, bias=bias, kv_lens=kv_lens, return_lse=True)

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=False)
    for mask in (Mask.block_causal(L, 8, prefix_len=3), Mask.block_causal(L, 16)):
        got = compiled(q, k, v, mask, bias, kv_lens)
        expected = fn(q, k, v, mask, bias, kv_lens)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert counter.frame_count == 1, "new label values (same shapes) must not recompile"


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_checks_kv_lens_values(backend):
    """The [0, Lk] check of kv_lens also holds in a compiled graph (tracing sees no values, so the
    graph carries it as the dlmfuse::check_kv_lens op); in-range values give eager's output."""
    q, k, v = make(2, 5, 6, 2, 2)

    def fn(q, k, v, kv_lens):
        return dlmfuse.attention(q, k, v, kv_lens=kv_lens)

    compiled = torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)
    good = torch.tensor([6, 3], dtype=torch.int32)
    torch.testing.assert_close(compiled(q, k, v, good), fn(q, k, v, good), rtol=1e-6, atol=1e-6)
    for bad in ([7, 3], [6, -2]):
        with pytest.raises(ValueError, match=r"kv_lens values must lie in \[0, Lk=6\]"):
            compiled(q, k, v, torch.tensor(bad, dtype=torch.int32))


def test_opcheck_check_kv_lens():
    for kv_lens in (torch.tensor([3, 0]), torch.tensor([4], dtype=torch.int32)):
        torch.library.opcheck(torch.ops.dlmfuse.check_kv_lens.default, (kv_lens, 4))


def test_torch_compile_fullgraph_merge_attention():
    q, k, v = make(2, 9, 30, 4, 2)
    halves = [dlmfuse.attention(q, k[:, s], v[:, s], return_lse=True) for s in (slice(0, 13), slice(13, 30))]

    def fn(out_a, lse_a, out_b, lse_b):
        return dlmfuse.merge_attention(out_a, lse_a, out_b, lse_b)

    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(*halves[0], *halves[1])
    expected = fn(*halves[0], *halves[1])
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.slow
def test_torch_compile_backward_matches_eager():
    B, L = 1, 24
    q, k, v = make(B, L, L, 2, 1)
    mask = Mask.clean_and_self(torch.arange(L)[None] % 3 == 0)
    bias = torch.randn(2, L, L)

    def loss(q, k, v, bias):
        out, lse = dlmfuse.attention(q, k, v, mask=mask, bias=bias, return_lse=True)
        return out.square().sum() + lse.sum()

    def grads(fn):
        ts = [t.clone().requires_grad_(True) for t in (q, k, v, bias)]
        fn(*ts).backward()
        return [t.grad for t in ts]

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    for a, b in zip(grads(compiled), grads(loss)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------- CUDA
CUDA_CASES = [
    # (B, Lq, Lk, Hq, Hkv, D, dtype, family)
    (2, 97, 97, 4, 2, 64, torch.bfloat16, "block_causal"),
    (2, 1, 1025, 4, 1, 128, torch.float16, "none"),
    (1, 130, 130, 4, 4, 128, torch.float32, "causal"),
    (2, 96, 96, 2, 1, 64, torch.bfloat16, "bd3_train"),
    (2, 7, 130, 8, 2, 128, torch.bfloat16, "random"),
    (3, 200, 333, 4, 2, 64, torch.float16, "random"),  # several query and key tiles, ragged ends
]


def cuda_case_inputs(B, Lq, Lk, Hq, Hkv, D, dtype, family, device):
    q, k, v = make(B, Lq, Lk, Hq, Hkv, D, dtype, device)
    g = torch.Generator().manual_seed(5)
    masks = {  # built only for the case's family (block_causal needs Lq >= its prefix)
        "none": lambda: None,
        "block_causal": lambda: Mask.block_causal(Lq, 16, prefix_len=10),
        "causal": lambda: Mask.causal(Lq),
        "bd3_train": lambda: Mask.bd3_train(Lq // 2, 8),
        "random": lambda: Mask(*(torch.randint(0, 3, (B, n), generator=g, dtype=torch.int32)
                                 for n in (Lq, Lq, Lk, Lk))),
    }
    mask = masks[family]()
    bias = torch.randn(Hq, 1, Lk, generator=g).to(device)
    # Full, shortened and (from the third row on) 5-key lengths.
    kv_lens = torch.tensor(([Lk, max(0, Lk - 17)] + [min(Lk, 5)] * B)[:B], dtype=torch.int32, device=device)
    return q, k, v, dict(mask=None if mask is None else mask.to(device), bias=bias, kv_lens=kv_lens)


# Bias layouts for the tensor-core kernel's bias loads: dense in each float dtype (pairs of adjacent
# keys in one load; next / wide: the 16-bit ones by cp.async tiles, whose last chunk of a row is
# partial under kv_lens), an odd key count (every other fp32 row misaligned for pair loads), a
# transposed view (key stride != 1), a key-broadcast bias (key stride 0), a query-broadcast bf16
# bias (row stride 0: tiles of one repeated row) and a bf16 view one element off a 16-byte
# boundary (not tileable: rows of unaligned pairs).
CUDA_BIAS_LAYOUTS = ["dense-fp32", "dense-bf16", "dense-fp16", "odd-keys-fp32", "transposed-bf16", "key-broadcast",
                     "query-broadcast-bf16", "offset-bf16"]


def cuda_bias(layout: str, B: int, Hq: int, Lq: int, Lk: int, g: torch.Generator, device: str) -> torch.Tensor:
    """The layout's bias on `device`; views are taken there (a copy of a view would be contiguous)."""
    kind, dtype_name = layout.rsplit("-", 1) if layout != "key-broadcast" else ("key-broadcast", "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    shape = {"transposed": (B, Hq, Lk, Lq), "key-broadcast": (B, Hq, Lq, 1), "query-broadcast": (B, Hq, 1, Lk),
             "offset": (B, Hq, Lq, Lk + 8)}.get(kind, (B, Hq, Lq, Lk))
    bias = torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
    if kind == "transposed":
        return bias.transpose(2, 3)
    if kind == "offset":
        return bias[..., 1:Lk + 1]
    return bias


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", cuda_test_kernels("auto", "double_buffer", "next", "wide", "sm90", "gather"))  # gather: falls back (bias)
@pytest.mark.parametrize("layout", CUDA_BIAS_LAYOUTS)
@pytest.mark.parametrize("D", [64, 128])
def test_cuda_bias_layouts_match_reference(layout, D, kernel, monkeypatch):
    monkeypatch.setenv("DLMFUSE_CUDA_ATTENTION", kernel)
    B, Lq, Hq, Hkv = 2, 70, 4, 2
    Lk = 133 if layout.startswith("odd") else 136
    q, k, v = make(B, Lq, Lk, Hq, Hkv, D, torch.bfloat16, "cuda", seed=3)
    g = torch.Generator().manual_seed(4)
    bias = cuda_bias(layout, B, Hq, Lq, Lk, g, "cuda")
    mask = Mask(*(torch.randint(0, 3, (B, n), generator=g, dtype=torch.int32) for n in (Lq, Lq, Lk, Lk))).to("cuda")
    kv_lens = torch.tensor([Lk, Lk - 9], dtype=torch.int32, device="cuda")
    for kwargs in (dict(bias=bias), dict(bias=bias, mask=mask, kv_lens=kv_lens)):
        out, lse = dlmfuse.attention(q, k, v, return_lse=True, **kwargs)
        check_attention(out, q, k, v, lse=lse, **kwargs)


@pytest.mark.cuda
# bf16/fp16: every tensor-core kernel (auto's per-call pick; one or two K/V buffers; "next",
# "wide" with 32 rows per warp, "sm90" with warpgroup MMAs on H100 / H200, gather / sm90_gather
# with PARTIAL tiles' keys gathered), or CUDA cores (simple)
@pytest.mark.parametrize("kernel", cuda_test_kernels("auto", "simple", "single_buffer", "double_buffer", "next", "wide",
                                                     "sm90", "gather", "sm90_gather"))
@pytest.mark.parametrize("case", CUDA_CASES, ids=[f"{c[6]}-{c[7]}-D{c[5]}" for c in CUDA_CASES])
def test_cuda_matches_reference_and_cpu(case, kernel, monkeypatch):
    monkeypatch.setenv("DLMFUSE_CUDA_ATTENTION", kernel)
    q, k, v, kwargs = cuda_case_inputs(*case, device="cuda")
    out, lse = dlmfuse.attention(q, k, v, return_lse=True, **kwargs)
    assert out.is_cuda and lse.is_cuda
    check_attention(out, q, k, v, lse=lse, **kwargs)
    cpu_kwargs = {name: (None if t is None else t.to("cpu")) for name, t in kwargs.items()}
    cpu_out, cpu_lse = dlmfuse.attention(q.cpu(), k.cpu(), v.cpu(), return_lse=True, **cpu_kwargs)
    if q.dtype == torch.float32:
        torch.testing.assert_close(out.cpu().double(), cpu_out.double(), rtol=1e-5, atol=1e-5 * float(cpu_out.abs().max()))
    else:  # each is within its bound of the float64 reference, so they differ by at most the sum
        ref = dlmfuse.reference.attention(q, k, v, out_dtype=torch.float64, **kwargs)
        bound = (lowp_attention_bound(q, k, v, ref, rounded_p=True, **kwargs)
                 + lowp_attention_bound(q, k, v, ref, rounded_p=False, **kwargs))
        excess = (out.cpu().double() - cpu_out.double()).abs() - bound
        assert (excess <= 0).all(), f"CUDA vs CPU: {int((excess > 0).sum())} elements over the sum of their bounds"
    finite = torch.isfinite(cpu_lse)
    assert torch.equal(finite, torch.isfinite(lse.cpu()))
    torch.testing.assert_close(lse.cpu()[finite], cpu_lse[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
def test_cuda_kv_lens_zero_and_grads():
    q, k, v = (t.requires_grad_(True) for t in make(2, 9, 33, 4, 2, 64, torch.float32, "cuda"))
    kv_lens = torch.tensor([0, 20], dtype=torch.int32, device="cuda")
    out, lse = dlmfuse.attention(q, k, v, kv_lens=kv_lens, return_lse=True)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0]).all()
    out.square().sum().backward()
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    dlmfuse.reference.attention(q64, k64, v64, kv_lens=kv_lens).square().sum().backward()
    for a, b in ((q, q64), (k, k64), (v, v64)):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-4 * float(b.grad.abs().max()))


@pytest.mark.cuda
def test_cuda_torch_compile_fullgraph():
    # aot_eager: the compiled graph calls the CUDA kernel through the registered op (fake-tensor
    # tracing on CUDA included) without spending device minutes on Triton code generation.
    B, L, Hq, Hkv, D = 2, 80, 4, 2, 64
    q, k, v = make(B, L, L, Hq, Hkv, D, torch.bfloat16, "cuda")
    bias = torch.randn(Hq, 1, L, device="cuda")
    kv_lens = torch.tensor([L, 57], dtype=torch.int32, device="cuda")

    def fn(q, k, v, mask, bias, kv_lens):
        return dlmfuse.attention(q, k, v, mask=mask, bias=bias, kv_lens=kv_lens, return_lse=True)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=False)
    for mask in (Mask.block_causal(L, 16, prefix_len=5), Mask.block_causal(L, 32)):
        mask = mask.to("cuda")
        got = compiled(q, k, v, mask, bias, kv_lens)
        expected = fn(q, k, v, mask, bias, kv_lens)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        check_attention(got[0], q, k, v, lse=got[1], mask=mask, bias=bias, kv_lens=kv_lens)


@pytest.mark.cuda
def test_cuda_graph_capture_and_replay():
    B, L, Hq, Hkv, D = 2, 64, 4, 2, 128
    q, k, v = make(B, L, L, Hq, Hkv, D, torch.bfloat16, "cuda")
    is_clean = torch.zeros(B, L, dtype=torch.bool, device="cuda")
    is_clean[:, :20] = True
    mask = Mask.clean_and_self(is_clean)
    kv_lens = torch.tensor([L, 50], dtype=torch.int32, device="cuda")
    bias = torch.zeros(Hq, 1, L, device="cuda")

    def step():
        return dlmfuse.attention(q, k, v, mask=mask, bias=bias, kv_lens=kv_lens, return_lse=True)

    graph, (out, lse) = cuda_graph_of(step)

    # New values in the captured inputs (labels included): replay recomputes with them.
    for trial in range(2):
        g = torch.Generator().manual_seed(trial)
        q.copy_(torch.randn(q.shape, generator=g).to(q))
        is_clean.copy_(torch.rand(B, L, generator=g) < 0.5)
        new = Mask.clean_and_self(is_clean)
        for name in ("q_order", "q_group", "k_order", "k_group"):
            getattr(mask, name).copy_(getattr(new, name))
        kv_lens.copy_(torch.tensor([L - trial, 40 + trial], dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        expected = dlmfuse.attention(q, k, v, mask=new, bias=bias, kv_lens=kv_lens, return_lse=True)
        torch.testing.assert_close(out, expected[0])
        torch.testing.assert_close(lse, expected[1])
        check_attention(out, q, k, v, lse=lse, mask=new, bias=bias, kv_lens=kv_lens)


# ------------------------------------------------------------------------------ split-KV (CUDA)


def test_split_heuristic():
    """attention_num_splits: shapes only; splits only grids too small for the GPU, at least two key
    tiles per split, never past ATTENTION_MAX_SPLITS or gridDim.z."""
    splits, most = dlmfuse._C.attention_num_splits, dlmfuse._C.ATTENTION_MAX_SPLITS
    # (B, Hq, Lq, Lk, D, SMs) -> S: A4 sparse steps on an H100 (132 SMs) and an A100 (108 SMs)
    assert splits(8, 32, 32, 2048, 128, 132) == 2
    assert splits(8, 32, 32, 2048, 128, 108) == 2
    assert splits(1, 32, 32, 2048, 128, 132) == most  # 32 CTAs: split as far as allowed
    for Lq in (128, 512, 2048):  # enough CTAs already: no split, no workspace
        assert splits(8, 32, Lq, 2048, 128, 132) == 1
    assert splits(1, 32, 2048, 2048, 128, 132) == 1  # A1 dense
    assert splits(1, 1, 1, 64, 128, 132) == 1  # one key tile
    assert splits(1, 1, 1, 256, 64, 132) == 2  # four key tiles: two per split
    assert splits(1, 1, 1, 2048, 96, 132) == 1  # no tensor-core kernel for head_dim 96
    # 128-row CTAs (DLMFUSE_CUDA_ATTENTION=wide): half the CTAs, so 128 sparse queries split too
    assert splits(8, 32, 128, 2048, 128, 132, rows_per_cta=128) == 2
    assert splits(8, 32, 32, 2048, 128, 132, rows_per_cta=128) == 2
    assert splits(8, 32, 128, 2048, 128, 132, rows_per_cta=96) == 1  # no such kernel
    # GQA packing (next / wide): Dream's 28 query heads over 4 KV heads, 32 sparse queries: 4 x 4
    # CTAs per sequence instead of 28, so more splits; no packing without grouped heads
    assert splits(8, 28, 32, 2048, 128, 132) == 2
    assert splits(8, 28, 32, 2048, 128, 132, kv_heads=4) == 4
    assert splits(8, 32, 32, 2048, 128, 132, kv_heads=32) == 2
    for args in ((0, 32, 32, 2048, 128, 132), (8, 32, 0, 2048, 128, 132), (8, 32, 32, 0, 128, 132),
                 (8, 32, 32, 2048, 128, 0)):
        assert splits(*args) == 1
    assert splits(40000, 1, 1, 1 << 20, 128, 1 << 20) == 1  # batch * S must fit gridDim.z
    for B in (1, 2, 5, 8, 64):
        for Lq in (1, 8, 65, 128):
            for Lk in (1, 63, 130, 1025, 4096):
                S = splits(B, 8, Lq, Lk, 64, 132)
                assert 1 <= S <= most and (S == 1 or 2 * 64 * (S - 1) < Lk), (B, Lq, Lk, S)


def test_gqa_packing_decision():
    """Packing pays exactly when it needs fewer CTAs: grouped heads and few query rows."""
    packs = dlmfuse._C.attention_packs_gqa
    assert packs(28, 4, 32, 64)  # Dream, a sparse step: 4 x ceil(224 / 64) = 16 CTAs, not 28
    assert packs(8, 2, 5, 64) and packs(8, 1, 97, 64)
    assert not packs(32, 32, 32, 64)  # no grouped heads (LLaDA)
    assert not packs(28, 4, 2048, 64)  # 4 x 224 = 28 x 32: no saving
    assert not packs(8, 2, 64, 64)  # one full tile per head already
    for bad in ((8, 0, 32, 64), (8, 3, 32, 64), (2, 4, 32, 64), (8, 2, 0, 64), (8, 2, 32, 0)):
        assert not packs(*bad), bad


def test_cuda_attention_kernel_choice(monkeypatch):
    """DLMFUSE_CUDA_ATTENTION picks the CUDA kernel; a typo is an error, not a silent default."""
    monkeypatch.delenv("DLMFUSE_CUDA_ATTENTION", raising=False)
    assert attention_module.cuda_attention_kernel() == "auto"
    for kernel in attention_module.CUDA_ATTENTION_KERNELS:
        monkeypatch.setenv("DLMFUSE_CUDA_ATTENTION", kernel)
        assert attention_module.cuda_attention_kernel() == kernel
    args = attention_module.cuda_kernel_args
    monkeypatch.setenv("DLMFUSE_CUDA_ATTENTION", "double_buffer")
    assert args().kv_stages == 2 and args().tensor_cores and not args().next_paths
    monkeypatch.setenv("DLMFUSE_CUDA_ATTENTION", "single_buffer")
    assert args().kv_stages == 1 and args().tensor_cores
    assert not args().next_paths and not args().pack_gqa
    monkeypatch.setenv("DLMFUSE_CUDA_ATTENTION", "next")
    assert args().next_paths and args().kv_stages == 2
    assert args().rows_per_warp == 16
    monkeypatch.setenv("DLMFUSE_CUDA_ATTENTION", "wide")
    assert args().next_paths and args().rows_per_warp == 32 and not args().pack_gqa and not args().wgmma
    monkeypatch.setenv("DLMFUSE_CUDA_ATTENTION", "sm90")
    assert args().next_paths and args().rows_per_warp == 16 and args().pack_gqa and args().wgmma
    assert not args().gather_keys
    for kernel, wgmma in (("gather", False), ("sm90_gather", True)):
        monkeypatch.setenv("DLMFUSE_CUDA_ATTENTION", kernel)
        assert args().gather_keys and args().next_paths and args().rows_per_warp == 16 and args().wgmma == wgmma
        assert args("double_buffer").kv_stages == 2 and not args("double_buffer").gather_keys  # named: env ignored
    # An explicit choice is what every call runs; auto has no shape-free arguments.
    q, k = torch.empty(8, 32, 4, 64), torch.empty(8, 2048, 4, 64)
    assert attention_module.cuda_kernel_for(q, k, has_labels=True, has_bias=True) == "sm90_gather"
    monkeypatch.delenv("DLMFUSE_CUDA_ATTENTION")
    with pytest.raises(ValueError, match="cuda_kernel_for"):
        args()
    monkeypatch.setenv("DLMFUSE_CUDA_ATTENTION", "double-buffer")
    with pytest.raises(ValueError, match="DLMFUSE_CUDA_ATTENTION"):
        attention_module.cuda_attention_kernel()


def test_cuda_auto_kernel_policy():
    """auto's per-call pick (attention.auto_cuda_kernel; the H200 measurements behind it are in its
    docstring): bias -> cp.async bias tiles; mask-only steps -> gathered keys (mma.sync at <= 32
    rows); on sm_90 few rows -> next, many -> wide; elsewhere the rest keeps double_buffer."""
    pick = attention_module.auto_cuda_kernel
    for sm90, bias_kernel in ((True, "sm90"), (False, "next")):
        for q_len, k_len, labels in ((32, 2048, True), (2048, 2048, False), (2048, 2048, True)):
            assert pick(q_len, k_len, labels, True, sm90) == bias_kernel
    # A4: 32 / 128 / 512 masked queries against 2048 keys
    assert [pick(n, 2048, True, False, True) for n in (32, 128, 512)] == ["gather", "sm90_gather", "sm90_gather"]
    assert [pick(n, 2048, True, False, False) for n in (32, 128, 512, 1024)] == ["gather"] * 4
    # More than half as many queries as keys: tiles are FULL or SKIP, not PARTIAL (A2)
    assert pick(1025, 2048, True, False, True) == "wide" and pick(1025, 2048, True, False, False) == "double_buffer"
    assert pick(2048, 2048, False, False, True) == "wide"  # A1
    assert pick(64, 2048, False, False, True) == "next" and pick(65, 2048, False, False, True) == "wide"
    assert pick(64, 2048, False, False, False) == "double_buffer"
    for args in ((32, 2048, True, False, True), (2048, 2048, False, False, False)):
        assert pick(*args) in attention_module.CUDA_ATTENTION_KERNELS and pick(*args) != "auto"


def test_split_count_override(monkeypatch):
    q, k, _ = make(1, 4, 300, 2, 2, 64, torch.bfloat16)
    monkeypatch.setenv("DLMFUSE_ATTENTION_SPLITS", "3")
    assert attention_module.cuda_num_splits(q, k) == 3
    assert attention_module.cuda_num_splits(q.float(), k.float()) == 1  # fp32: CUDA-core kernel
    monkeypatch.setenv("DLMFUSE_CUDA_ATTENTION", "simple")
    assert attention_module.cuda_num_splits(q, k) == 1
    monkeypatch.delenv("DLMFUSE_CUDA_ATTENTION")
    for bad in ("0", "17", "two", "-1"):
        monkeypatch.setenv("DLMFUSE_ATTENTION_SPLITS", bad)
        with pytest.raises(ValueError, match="DLMFUSE_ATTENTION_SPLITS"):
            attention_module.cuda_num_splits(q, k)


@pytest.fixture
def split_calls(monkeypatch):
    """Runs the native CUDA attention (DLMFUSE_CUDA_KERNELS=1) and records the num_splits and
    workspace shapes of each call."""
    _C_cuda = dlmfuse._ext._C_cuda
    monkeypatch.setenv("DLMFUSE_CUDA_KERNELS", "1")
    monkeypatch.setenv("DLMFUSE_CUDA_ATTENTION", "auto")
    calls, forward = [], _C_cuda.attention_forward

    def shape_and_capsule(capsule):
        # The extension takes DLPack capsules (dlmfuse._ext.dlpack); a capsule is consumed when
        # imported, so re-export the tensor for the real call.
        if capsule is None:
            return None, None
        workspace = torch.utils.dlpack.from_dlpack(capsule)
        return tuple(workspace.shape), torch.utils.dlpack.to_dlpack(workspace)

    def recording(*args, num_splits=1, partial_out=None, partial_lse=None, **kwargs):
        out_shape, partial_out = shape_and_capsule(partial_out)
        lse_shape, partial_lse = shape_and_capsule(partial_lse)
        calls.append((num_splits, out_shape, lse_shape))
        return forward(*args, num_splits=num_splits, partial_out=partial_out, partial_lse=partial_lse, **kwargs)

    monkeypatch.setattr(_C_cuda, "attention_forward", recording)
    return calls


def sparse_step_inputs(B, n, Lk, Hq, Hkv, D, dtype, device, seed=0):
    """A sparse mask-only step: n masked rows per sequence attend to the clean keys and themselves;
    kv_lens ragged (Lk, a non-multiple of 64, 0, ...)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = make(B, n, Lk, Hq, Hkv, D, dtype, device, seed)
    is_clean = torch.rand(B, Lk, generator=g) < 0.5
    rows = torch.stack([torch.randperm(Lk, generator=g)[:n].sort().values for _ in range(B)])
    is_clean.scatter_(1, rows, False)
    mask = Mask.clean_and_self(is_clean).gather_queries(rows).to(device)
    lens = [Lk, max(1, Lk - 100), 0, Lk // 3][:B]
    kv_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    return q, k, v, dict(mask=mask, kv_lens=kv_lens)


def assert_matches_double_buffer(out, lse, q, k, v, kwargs, monkeypatch):
    """out and lse agree with the double_buffer kernel's (one run of CTAs per query head, every
    tile read) on the same call: out to bf16 rounding, the same empty rows, lse to 1e-5.
    Leaves DLMFUSE_CUDA_ATTENTION at double_buffer."""
    monkeypatch.setenv("DLMFUSE_CUDA_ATTENTION", "double_buffer")
    plain_out, plain_lse = dlmfuse.attention(q, k, v, return_lse=True, **kwargs)
    torch.testing.assert_close(out, plain_out, rtol=2 ** -7, atol=2 ** -7 * float(plain_out.abs().max()))
    finite = torch.isfinite(plain_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    torch.testing.assert_close(lse[finite], plain_lse[finite], rtol=1e-5, atol=1e-5)


# Gathered keys (DLMFUSE_CUDA_ATTENTION=gather / sm90_gather): label layouts whose PARTIAL tiles
# gather into fewer tiles (mask-only steps), whose runs of PARTIAL tiles pass 16 tiles and a
# classification round of 128 tiles (Lk 8300), and whose runs gather nothing useful (block-causal
# diagonals, which then run as they are).
GATHER_CASES = [
    # (name, B, n, Lk, Hq, Hkv, D)
    ("mask_only", 2, 97, 2048, 8, 2, 128),
    ("mask_only", 3, 32, 1025, 4, 4, 64),
    ("mask_only_long", 1, 64, 8300, 2, 1, 64),
    ("block_causal", 2, 130, 520, 4, 2, 128),
    ("random", 2, 70, 700, 4, 2, 64),
]


def gather_case_inputs(name, B, n, Lk, Hq, Hkv, D, device):
    g = torch.Generator().manual_seed(21)
    if name.startswith("mask_only"):
        return sparse_step_inputs(B, n, Lk, Hq, Hkv, D, torch.bfloat16, device, seed=5)
    q, k, v = make(B, n, Lk, Hq, Hkv, D, torch.bfloat16, device, seed=6)
    if name == "block_causal":
        mask = Mask.block_causal(Lk, 32, prefix_len=100).gather_queries(
            torch.arange(Lk - n, Lk).expand(B, -1)).to(device)
    else:  # keys of order 0 seen by all, 1-2 by some, >= 3 only through a (rare) shared group
        randint = lambda low, high, m: torch.randint(low, high, (B, m), generator=g, dtype=torch.int32)  # noqa: E731
        mask = Mask(randint(1, 4, n), randint(0, 300, n), randint(0, 7, Lk), randint(0, 300, Lk)).to(device)
    kv_lens = torch.tensor([Lk, Lk - 77][:B], dtype=torch.int32, device=device)
    return q, k, v, dict(mask=mask, kv_lens=kv_lens)


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", cuda_test_kernels("gather", "sm90_gather"))
@pytest.mark.parametrize("splits", ["1", "3"])
@pytest.mark.parametrize("case", GATHER_CASES, ids=[f"{c[0]}-B{c[1]}-n{c[2]}-Lk{c[3]}-D{c[6]}" for c in GATHER_CASES])
def test_cuda_gathered_keys_match_reference_and_double_buffer(case, splits, kernel, monkeypatch):
    """Gathered FULL / PARTIAL tiles give the reference's out and lse, and those of the kernel that
    reads every tile."""
    monkeypatch.setenv("DLMFUSE_ATTENTION_SPLITS", splits)
    q, k, v, kwargs = gather_case_inputs(*case, device="cuda")
    monkeypatch.setenv("DLMFUSE_CUDA_ATTENTION", kernel)
    out, lse = dlmfuse.attention(q, k, v, return_lse=True, **kwargs)
    check_attention(out, q, k, v, lse=lse, **kwargs)
    assert_matches_double_buffer(out, lse, q, k, v, kwargs, monkeypatch)  # the kernel that reads every tile


SPLIT_CASES = [
    # (B, n, Lk, Hq, Hkv, D, dtype)
    (2, 5, 333, 4, 2, 64, torch.float16),  # ragged keys, GQA
    (3, 97, 1025, 8, 1, 128, torch.bfloat16),  # two query tiles, MQA, a batch with kv_lens 0
    (4, 32, 2048, 8, 8, 128, torch.bfloat16),  # A4-shaped rows (fewer heads)
]


@pytest.mark.cuda
@pytest.mark.parametrize("splits", [1, 3, 8])
@pytest.mark.parametrize("case", SPLIT_CASES, ids=[f"B{c[0]}-n{c[1]}-Lk{c[2]}-D{c[5]}" for c in SPLIT_CASES])
def test_cuda_split_kv_matches_reference_and_cpu(case, splits, split_calls, monkeypatch):
    monkeypatch.setenv("DLMFUSE_ATTENTION_SPLITS", str(splits))
    B, n, Lk, Hq, Hkv, D, dtype = case
    q, k, v, kwargs = sparse_step_inputs(*case, device="cuda")
    out, lse = dlmfuse.attention(q, k, v, return_lse=True, **kwargs)
    workspace = None if splits == 1 else ((splits, B, Hq, n, D), (splits, B, Hq, n))
    assert split_calls == [(splits, *(workspace or (None, None)))]
    check_attention(out, q, k, v, lse=lse, **kwargs)
    assert torch.equal(out[2:3], torch.zeros_like(out[2:3])) and torch.isneginf(lse[2:3]).all()
    cpu_kwargs = {name: t.to("cpu") for name, t in kwargs.items()}
    cpu_out, cpu_lse = dlmfuse.attention(q.cpu(), k.cpu(), v.cpu(), return_lse=True, **cpu_kwargs)
    tol = 2 ** -6
    torch.testing.assert_close(out.cpu().double(), cpu_out.double(), rtol=tol, atol=tol * float(cpu_out.abs().max()))
    finite = torch.isfinite(cpu_lse)
    assert torch.equal(finite, torch.isfinite(lse.cpu()))
    torch.testing.assert_close(lse.cpu()[finite], cpu_lse[finite], rtol=1e-4, atol=1e-4)


GQA_PACK_CASES = [
    # (B, n, Lk, Hq, Hkv, D, dtype): sparse steps whose query heads pack (next / wide)
    (2, 32, 520, 28, 4, 128, torch.bfloat16),  # Dream's heads: 7 per KV head, queries straddle tiles
    (2, 5, 333, 8, 2, 64, torch.float16),  # one partial tile
    (3, 97, 1025, 8, 1, 128, torch.bfloat16),  # MQA: 776 packed rows, several tiles; kv_lens 0
]


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", cuda_test_kernels("next", "sm90", "gather", "sm90_gather"))
@pytest.mark.parametrize("splits", ["1", "3"])
@pytest.mark.parametrize("case", GQA_PACK_CASES, ids=[f"B{c[0]}-n{c[1]}-H{c[3]}x{c[4]}-D{c[5]}" for c in GQA_PACK_CASES])
def test_cuda_gqa_packing_matches_reference(case, splits, kernel, monkeypatch):
    """Packed rows (query-major (query, head) pairs per KV head) give the reference's out and lse,
    and the unpacked double_buffer kernel's, with labels and kv_lens and without."""
    monkeypatch.setenv("DLMFUSE_ATTENTION_SPLITS", splits)
    B, n, Lk, Hq, Hkv, D, dtype = case
    q, k, v, kwargs = sparse_step_inputs(*case, device="cuda")
    for call_kwargs in (kwargs, {}):
        monkeypatch.setenv("DLMFUSE_CUDA_ATTENTION", kernel)
        assert attention_module.cuda_kernel_args().pack_gqa
        assert dlmfuse._ext._C_cuda.attention_packs_gqa(Hq, Hkv, n, 4 * attention_module.cuda_kernel_args().rows_per_warp)
        out, lse = dlmfuse.attention(q, k, v, return_lse=True, **call_kwargs)
        check_attention(out, q, k, v, lse=lse, **call_kwargs)
        assert_matches_double_buffer(out, lse, q, k, v, call_kwargs, monkeypatch)  # one run of CTAs per head


@pytest.mark.cuda
def test_cuda_split_kv_heuristic_splits_few_rows(split_calls, monkeypatch):
    """Without the override, a one-sequence sparse step (32 CTAs) is split, and agrees with the
    unsplit kernel."""
    monkeypatch.delenv("DLMFUSE_ATTENTION_SPLITS", raising=False)
    q, k, v, kwargs = sparse_step_inputs(1, 32, 2048, 32, 32, 128, torch.bfloat16, "cuda")
    out, lse = dlmfuse.attention(q, k, v, return_lse=True, **kwargs)
    assert split_calls[0][0] > 1, split_calls
    check_attention(out, q, k, v, lse=lse, **kwargs)
    monkeypatch.setenv("DLMFUSE_ATTENTION_SPLITS", "1")
    one_out, one_lse = dlmfuse.attention(q, k, v, return_lse=True, **kwargs)
    torch.testing.assert_close(out, one_out, rtol=2 ** -7, atol=2 ** -7 * float(one_out.abs().max()))
    torch.testing.assert_close(lse, one_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_cuda_split_kv_graph_capture_and_replay(split_calls, monkeypatch):
    """The workspace is allocated inside the capture (graph pool); replays with new labels and
    kv_lens recompute."""
    monkeypatch.setenv("DLMFUSE_ATTENTION_SPLITS", "4")
    B, n, Lk = 2, 16, 520
    q, k, v, kwargs = sparse_step_inputs(B, n, Lk, 4, 2, 64, torch.bfloat16, "cuda")
    mask, kv_lens = kwargs["mask"], kwargs["kv_lens"]

    def step():
        return dlmfuse.attention(q, k, v, mask=mask, kv_lens=kv_lens, return_lse=True)

    graph, (out, lse) = cuda_graph_of(step)
    assert all(call[0] == 4 for call in split_calls), split_calls

    for trial in range(2):
        _, _, _, new = sparse_step_inputs(B, n, Lk, 4, 2, 64, torch.bfloat16, "cuda", seed=10 + trial)
        for name in ("q_order", "q_group", "k_order", "k_group"):
            getattr(mask, name).copy_(getattr(new["mask"], name))
        kv_lens.copy_(torch.tensor([Lk - 7 * trial, 64 + trial], dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        check_attention(out, q, k, v, lse=lse, mask=new["mask"], kv_lens=kv_lens)
