"""Bad inputs to attention / merge_attention (and the raw binding): the exact exception type
(TypeError for dtype/device/kind, ValueError for shapes/values) and a message that names the
argument and the value received (DESIGN.md section 6)."""

import math
import re

import pytest
import torch

import dlmfuse
from dlmfuse import Mask

B, LQ, LK, HQ, HKV, D = 2, 5, 7, 4, 2, 64


def qkv(dtype=torch.float32, batch=B, q_len=LQ, k_len=LK, q_heads=HQ, kv_heads=HKV, head_dim=D):
    q = torch.randn(batch, q_len, q_heads, head_dim).to(dtype)
    k = torch.randn(batch, k_len, kv_heads, head_dim).to(dtype)
    v = torch.randn(batch, k_len, kv_heads, head_dim).to(dtype)
    return q, k, v


def labels(batch, length):
    return torch.zeros(batch, length, dtype=torch.int32)


def call(**overrides):
    """dlmfuse.attention with the default good inputs, some replaced by `overrides`."""
    q, k, v = qkv()
    args = dict(q=q, k=k, v=v)
    args.update(overrides)
    return dlmfuse.attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def test_good_defaults_run():
    assert call().shape == (B, LQ, HQ, D)


# ------------------------------------------------------------------------------------- q / k / v
@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_wrong_rank(name):
    bad = torch.randn(B, LQ, D)
    with pytest.raises(ValueError, match=rf"{name} must have 4 dims .*\[2, 5, 64\]"):
        call(**{name: bad})


def test_not_a_tensor():
    with pytest.raises(TypeError, match="q must be a torch.Tensor, got list"):
        call(q=[[1.0]])


@pytest.mark.parametrize("name", ["k", "v"])
def test_dtype_mismatch(name):
    bad = qkv(torch.float16)[1]
    with pytest.raises(TypeError, match=rf"{name} must have the dtype of q \(torch.float32\), got torch.float16"):
        call(**{name: bad})


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float64, torch.bool])
def test_unsupported_q_dtype(dtype):
    q, k, v = (t.to(dtype) for t in qkv())
    with pytest.raises(TypeError, match=re.escape(str(dtype))):
        dlmfuse.attention(q, k, v)


def test_heads_not_multiple():
    q, k, v = qkv(q_heads=6, kv_heads=4)
    with pytest.raises(ValueError, match=r"query heads \(6\).*kv heads \(4\)"):
        dlmfuse.attention(q, k, v)
    q, k, v = qkv(q_heads=0, kv_heads=0)
    with pytest.raises(ValueError, match="at least one head, got Hq=0 and Hkv=0"):
        dlmfuse.attention(q, k, v)


@pytest.mark.parametrize("head_dim", [257, 300])
def test_unsupported_head_dim(head_dim):
    q, k, v = qkv(head_dim=head_dim)
    with pytest.raises(ValueError, match=rf"head_dim={head_dim} unsupported \(supported: 1 to 256\)"):
        dlmfuse.attention(q, k, v)


def test_k_shape_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"k must have shape .*got \[3, 7, 2, 64\]"):
        dlmfuse.attention(q, torch.randn(3, LK, HKV, D), torch.randn(3, LK, HKV, D))
    with pytest.raises(ValueError, match=r"k must have shape .*got \[2, 7, 2, 128\]"):
        dlmfuse.attention(q, torch.randn(B, LK, HKV, 128), torch.randn(B, LK, HKV, 128))
    with pytest.raises(ValueError, match=r"v must have the shape of k \[2, 7, 2, 64\], got \[2, 6, 2, 64\]"):
        dlmfuse.attention(q, k, v[:, :6])


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_non_contiguous_last_dim(name):
    good = dict(zip("qkv", qkv()))[name]
    bad = torch.randn(*good.shape[:-1], 2 * D)[..., ::2]
    with pytest.raises(ValueError, match=rf"{name} must have a contiguous last dimension .*\(stride 1\).*strides"):
        call(**{name: bad})


def test_device_mismatch():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="k is on meta but q is on cpu"):
        dlmfuse.attention(q, k.to("meta"), v)


# ------------------------------------------------------------------------------------------ mask
def test_mask_not_a_mask():
    with pytest.raises(TypeError, match="mask must be a dlmfuse.Mask or None, got Tensor"):
        call(mask=torch.ones(LQ, LK, dtype=torch.bool))


def test_mask_length_mismatch():
    with pytest.raises(ValueError, match=rf"mask is for 6 queries x {LK} keys but q has Lq={LQ}"):
        call(mask=Mask(labels(1, 6), labels(1, 6), labels(1, LK), labels(1, LK)))
    with pytest.raises(ValueError, match=rf"mask is for {LQ} queries x 9 keys .*Lk={LK}"):
        call(mask=Mask(labels(1, LQ), labels(1, LQ), labels(1, 9), labels(1, 9)))


def test_mask_batch_mismatch():
    mask = Mask(labels(3, LQ), labels(3, LQ), labels(1, LK), labels(1, LK))
    with pytest.raises(ValueError, match=rf"mask batch must be 1 or B={B}, got 3"):
        call(mask=mask)


def test_mask_device_mismatch():
    mask = Mask(*(t.to("meta") for t in (labels(1, LQ), labels(1, LQ), labels(1, LK), labels(1, LK))))
    with pytest.raises(TypeError, match="mask is on meta but q is on cpu"):
        call(mask=mask)


# ------------------------------------------------------------------------------------------ bias
@pytest.mark.parametrize("shape", [(5,), (HQ + 1, 1, 1), (B, HQ, LQ, LK + 1), (3, 1, 1, 1)])
def test_bias_not_broadcastable(shape):
    with pytest.raises(ValueError, match=re.escape(f"bias of shape {list(shape)} is not broadcastable to")):
        call(bias=torch.zeros(shape))


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.bool])
def test_bias_dtype(dtype):
    with pytest.raises(TypeError, match=rf"bias must be float32, bfloat16 or float16, got {re.escape(str(dtype))}"):
        call(bias=torch.zeros(LK, dtype=dtype))


def test_bias_not_a_tensor():
    with pytest.raises(TypeError, match="bias must be a torch.Tensor, got float"):
        call(bias=1.0)


# --------------------------------------------------------------------------------------- kv_lens
@pytest.mark.parametrize("values", [[-1, 3], [LK + 1, 3], [0, -5]])
def test_kv_lens_out_of_range(values):
    expected = re.escape(f"kv_lens values must lie in [0, Lk={LK}], got {values}")
    with pytest.raises(ValueError, match=expected):
        call(kv_lens=torch.tensor(values, dtype=torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_kv_lens_not_integer(dtype):
    with pytest.raises(TypeError, match=rf"kv_lens must be an integer tensor .*got {re.escape(str(dtype))}"):
        call(kv_lens=torch.ones(B, dtype=dtype))


@pytest.mark.parametrize("shape", [(B + 1,), (B, 1), ()])
def test_kv_lens_wrong_shape(shape):
    with pytest.raises(ValueError, match=re.escape(f"kv_lens must have shape [B={B}], got {list(shape)}")):
        call(kv_lens=torch.ones(shape, dtype=torch.int32))


def test_kv_lens_not_a_tensor():
    with pytest.raises(TypeError, match="kv_lens must be a torch.Tensor, got list"):
        call(kv_lens=[1, 2])


# ----------------------------------------------------------------------------------------- scale
@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf])
def test_scale_not_finite(scale):
    with pytest.raises(ValueError, match=rf"scale must be finite in float32 \(\|scale\| <= 3.4e38\), got {scale}"):
        call(scale=scale)


@pytest.mark.parametrize("scale", ["0.5", True, torch.tensor(0.5)])
def test_scale_wrong_type(scale):
    with pytest.raises(TypeError, match=rf"scale must be a float or None, got {type(scale).__name__}"):
        call(scale=scale)


# ----------------------------------------------------------------------------------------- merge
def merge_inputs(dtype=torch.float32, batch=1, length=6, heads=2, head_dim=64):
    out_a = torch.randn(batch, length, heads, head_dim).to(dtype)
    out_b = torch.randn(batch, length, heads, head_dim).to(dtype)
    lse_a, lse_b = torch.randn(batch, heads, length), torch.randn(batch, heads, length)
    return dict(out_a=out_a, lse_a=lse_a, out_b=out_b, lse_b=lse_b)


def merge(**overrides):
    args = merge_inputs()
    args.update(overrides)
    return dlmfuse.merge_attention(args["out_a"], args["lse_a"], args["out_b"], args["lse_b"])


def test_merge_errors():
    good = merge_inputs()
    with pytest.raises(TypeError, match=r"out_b must have the dtype of out_a \(torch.float32\), got torch.bfloat16"):
        merge(out_b=good["out_b"].bfloat16())
    with pytest.raises(ValueError, match=r"out_b must have the shape of out_a \[1, 6, 2, 64\], got \[1, 5, 2, 64\]"):
        merge(out_b=good["out_b"][:, :5])
    with pytest.raises(TypeError, match="lse_a must be float32, got torch.float64"):
        merge(lse_a=good["lse_a"].double())
    with pytest.raises(ValueError, match=r"lse_b must have shape \[1, 2, 6\], got \[1, 6, 2\]"):
        merge(lse_b=good["lse_b"].transpose(1, 2).contiguous())
    with pytest.raises(TypeError, match="out_a must be float32, bfloat16 or float16, got torch.float64"):
        merge(out_a=good["out_a"].double(), out_b=good["out_b"].double())
    with pytest.raises(ValueError, match=r"out_a must have 4 dims .*got shape \[6, 2, 64\]"):
        merge(out_a=good["out_a"][0], out_b=good["out_b"][0])
    with pytest.raises(ValueError, match="out_a must have a contiguous last dimension"):
        strided = torch.randn(1, 6, 2, 128)[..., ::2]
        merge(out_a=strided, out_b=strided.clone())
    with pytest.raises(TypeError, match="lse_b must be a torch.Tensor, got NoneType"):
        merge(lse_b=None)
    with pytest.raises(TypeError, match="lse_a is on meta but out_a is on cpu"):
        merge(lse_a=good["lse_a"].to("meta"))


# ----------------------------------------------------------------------------- raw C++ binding
def raw_args(**overrides):
    """Consistent positional arguments of dlmfuse._C.attention_forward, some replaced."""
    q, k, v = qkv()
    args = dict(
        q=q, k=k, v=v, q_order=labels(1, LQ), q_group=labels(1, LQ), k_order=labels(B, LK),
        k_group=labels(B, LK), bias=torch.zeros(B, HQ, LQ, LK), kv_lens=torch.full((B,), LK, dtype=torch.int32),
        out=torch.empty(B, LQ, HQ, D), lse=torch.empty(B, HQ, LQ), scale=0.125,
    )
    args.update(overrides)
    return list(args.values())


def test_raw_binding_accepts_consistent_arguments():
    args = raw_args()
    dlmfuse._C.attention_forward(*args)
    out, lse = args[-3], args[-2]
    expected = dlmfuse.attention(*args[:3], scale=0.125, return_lse=True)
    assert torch.equal(out, expected[0]) and torch.equal(lse, expected[1])


def case(case_id, error, pattern, **overrides):
    return pytest.param(overrides, error, pattern, id=case_id)


def hd300(*shape):
    return torch.randn(*shape, 300)


RAW_CASES = [
    case("k_batch", ValueError, r"k must have shape \[2, 7, 2, 64\], got \[3, 7, 2, 64\]",
         k=torch.randn(B + 1, LK, HKV, D)),
    case("v_len", ValueError, r"v must have shape .*got \[2, 8, 2, 64\]", v=torch.randn(B, LK + 1, HKV, D)),
    case("k_head_dim", ValueError, r"k must have shape .*got \[2, 7, 2, 128\]", k=torch.randn(B, LK, HKV, 128)),
    case("q_rank", ValueError, r"q must have 4 dims", q=torch.randn(B, LQ, D)),
    case("heads", ValueError, r"query heads \(4\).*kv heads \(3\)",
         k=torch.randn(B, LK, 3, D), v=torch.randn(B, LK, 3, D)),
    case("head_dim", ValueError, r"head_dim=300 unsupported",
         q=hd300(B, LQ, HQ), k=hd300(B, LK, HKV), v=hd300(B, LK, HKV), out=hd300(B, LQ, HQ)),
    case("k_dtype", TypeError, r"k must have the dtype of q", k=torch.randn(B, LK, HKV, D).half()),
    case("q_dtype", TypeError, r"q must be float32, bfloat16 or float16, got float64",
         q=torch.randn(B, LQ, HQ, D).double()),
    case("out_shape", ValueError, r"out must have shape", out=torch.empty(B, LQ + 1, HQ, D)),
    case("out_dtype", TypeError, r"out must have the dtype of q", out=torch.empty(B, LQ, HQ, D).half()),
    case("lse_shape", ValueError, r"lse must have shape \[2, 4, 5\], got \[2, 5, 4\]", lse=torch.empty(B, LQ, HQ)),
    case("lse_dtype", TypeError, r"lse must be float32", lse=torch.empty(B, HQ, LQ).double()),
    case("lse_strided", ValueError, r"lse must be contiguous", lse=torch.empty(B, LQ, HQ).transpose(1, 2)),
    case("q_order_len", ValueError, r"q_order must have shape \[2 or 1, 5\], got \[1, 6\]",
         q_order=labels(1, LQ + 1)),
    case("k_group_batch", ValueError, r"k_group must have shape \[2 or 1, 7\], got \[3, 7\]",
         k_group=labels(B + 1, LK)),
    case("label_dtype", TypeError, r"k_order must be int32, got int64", k_order=labels(B, LK).long()),
    case("label_rank", ValueError, r"q_group must have 2 dims", q_group=labels(1, LQ)[0]),
    case("some_labels", ValueError, r"pass all four labels .*got 2", q_group=None, k_group=None),
    case("bias_not_expanded", ValueError, r"bias must have shape \[2, 4, 5, 7\], got \[1, 1, 1, 7\]",
         bias=torch.zeros(1, 1, 1, LK)),
    case("bias_dtype", TypeError, r"bias must be float32, bfloat16 or float16, got float64",
         bias=torch.zeros(B, HQ, LQ, LK).double()),
    case("kv_lens_dtype", TypeError, r"kv_lens must be int32, got int64", kv_lens=torch.full((B,), LK)),
    case("kv_lens_shape", ValueError, r"kv_lens must have shape \[2\], got \[3\]",
         kv_lens=torch.full((B + 1,), LK, dtype=torch.int32)),
    case("q_last_dim", ValueError, r"q must have a contiguous last dimension",
         q=torch.randn(B, LQ, HQ, 2 * D)[..., ::2]),
]


@pytest.mark.parametrize("overrides, error, pattern", RAW_CASES)
def test_raw_binding_rejects_inconsistent_arguments(overrides, error, pattern):
    args = raw_args(**overrides)
    with pytest.raises(error, match=pattern):
        dlmfuse._C.attention_forward(*args)


def test_raw_binding_out_of_range_kv_lens_stays_in_bounds():
    """The public op rejects kv_lens outside [0, Lk]; the raw binding must at least never read out
    of bounds: values past Lk act as Lk, negative values as 0."""
    args = raw_args(kv_lens=torch.tensor([LK + 1000, -50], dtype=torch.int32))
    dlmfuse._C.attention_forward(*args)
    out, lse = args[-3].clone(), args[-2].clone()
    args[8] = torch.tensor([LK, 0], dtype=torch.int32)  # kv_lens
    dlmfuse._C.attention_forward(*args)
    assert torch.equal(out, args[-3]) and torch.equal(lse, args[-2])
    assert torch.isneginf(lse[1]).all() and torch.isfinite(lse[0]).all()


def test_raw_merge_binding_rejects_inconsistent_arguments():
    good = merge_inputs()
    out, lse = torch.empty(1, 6, 2, 64), torch.empty(1, 2, 6)
    with pytest.raises(ValueError, match=r"out_b must have shape"):
        dlmfuse._C.merge_attention(good["out_a"], good["lse_a"], good["out_b"][:, :5], good["lse_b"], out, lse)
    with pytest.raises(ValueError, match=r"lse must have shape"):
        dlmfuse._C.merge_attention(good["out_a"], good["lse_a"], good["out_b"], good["lse_b"], out, lse[:, :1])
    with pytest.raises(TypeError, match=r"lse_a must be float32"):
        dlmfuse._C.merge_attention(good["out_a"], good["lse_a"].double(), good["out_b"], good["lse_b"], out, lse)
    with pytest.raises(TypeError, match=r"out must have the dtype of out_a"):
        dlmfuse._C.merge_attention(good["out_a"], good["lse_a"], good["out_b"], good["lse_b"], out.half(), lse)


def test_numpy_scale_is_accepted():
    np = pytest.importorskip("numpy")
    q = torch.randn(1, 4, 2, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(dlmfuse.attention(q, q, q, scale=np.float32(0.5)), dlmfuse.attention(q, q, q, scale=0.5))
    with pytest.raises(TypeError, match="scale must be a float"):
        dlmfuse.attention(q, q, q, scale=np.bool_(True))
