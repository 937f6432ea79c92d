"""Property-based fuzzing of attention and merge_attention with hypothesis: the property, the budget and
its environment variables are described in fuzz_support.py."""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given, strategies as st

import dlmfuse
from dlmfuse import Mask

from conftest import assert_fp32_close, check_attention
from test_mask import random_eso_ranks
from fuzz_support import (LABEL_LAYOUTS, fuzz, EITHER, INT32_MIN, INT32_MAX, FLOAT32_MAX, FLOAT_DTYPES, call_op,
                          check_outcome, snapshot, assert_untouched, generator, randn, with_layout, SEEDS, mostly,
                          defects, float_arg_problem, without, batch_problem)


# ========================================================================================= attention
LENGTHS = st.sampled_from([1, 0, 2, 3, 5, 7, 16, 17, 33])
HEAD_DIMS = st.sampled_from([8, 1, 3, 16, 64, 65, 128, 256])
QKV_LAYOUTS = ("contiguous", "permuted", "step", "offset", "wide", "expanded")
INT_DTYPES = {"int32": torch.int32, "int64": torch.int64, "int16": torch.int16, "uint8": torch.uint8}
LABEL_POOLS = {"small": (0, 1, 2, 3), "extreme": (INT32_MIN, INT32_MIN + 1, -1, 0, 1, INT32_MAX - 1, INT32_MAX)}
MASK_FAMILIES = ("causal", "block_causal", "block_diagonal", "prefix_lm", "bd3_train", "bidirectional",
                 "eso_A", "eso_B", "clean_and_self")
BLOCK_SIZES = st.sampled_from([1, 2, 3, 5, 64, 2**31, 2**63])
# Extreme scales: ints the contract accepts (finite in float32) or refuses, non-finite floats, wrong types.
SCALE_EXTREMES = (0, -1, 2**31, 2**63, 2**64, 2**1100, 1e39, -1e39, math.inf, -math.inf, math.nan,
                  np.float32(0.25), np.int64(1), True, "0.5", 1e-30)
ATTENTION_DEFECTS = {
    "q_int32": TypeError, "q_float64": TypeError, "k_other_dtype": TypeError, "q_rank3": ValueError,
    "k_batch": ValueError, "v_len": ValueError, "heads_not_multiple": ValueError, "zero_q_heads": ValueError,
    "head_dim_0": ValueError, "head_dim_257": ValueError, "q_bad_last": ValueError, "q_list": TypeError,
    "mask_tensor": TypeError, "mask_q_len": ValueError, "mask_batch": ValueError, "label_float": TypeError,
    "label_beyond_int32": ValueError, "bias_float64": TypeError, "bias_int": TypeError,
    "bias_not_broadcastable": ValueError, "bias_float": TypeError, "kv_lens_value": ValueError,
    "kv_lens_shape": ValueError, "kv_lens_float": TypeError, "kv_lens_bool": TypeError,
    "kv_lens_unsigned": EITHER, "kv_lens_list": TypeError,
}


@st.composite
def label_specs(draw):
    return dict(pool=draw(st.sampled_from(tuple(LABEL_POOLS))),
                dtype=draw(st.sampled_from(["int32", "int64", "int16", "uint8"])),
                layouts=draw(st.tuples(*[st.sampled_from(LABEL_LAYOUTS)] * 4)),
                per_batch=draw(st.tuples(*[st.booleans()] * 4)))


@st.composite
def family_specs(draw):
    return dict(family=draw(st.sampled_from(MASK_FAMILIES)), block_size=draw(BLOCK_SIZES),
                prefix_frac=draw(st.sampled_from([0.0, 0.5, 1.0])), gather=draw(st.booleans()))


@st.composite
def attention_cases(draw):
    return dict(
        dtype=draw(st.sampled_from(FLOAT_DTYPES)), B=draw(st.integers(0, 3)), Lq=draw(LENGTHS), Lk=draw(LENGTHS),
        Hkv=draw(st.integers(1, 3)), group=draw(st.sampled_from([1, 2, 3])), D=draw(HEAD_DIMS),
        layouts=draw(st.tuples(*[st.sampled_from(QKV_LAYOUTS)] * 3)),
        mask=draw(st.sampled_from([None, "labels", "family"])), labels=draw(label_specs()),
        family=draw(family_specs()),
        bias=draw(st.none() | st.fixed_dictionaries(dict(
            dims=st.tuples(*[st.booleans()] * 4), rank=st.integers(2, 4), dtype=st.sampled_from(FLOAT_DTYPES),
            layout=st.sampled_from(["contiguous", "transposed", "step", "expanded"]),
            neg_inf=st.sampled_from([0.0, 0.2, 1.0])))),
        kv_lens=draw(st.none() | st.fixed_dictionaries(dict(
            dtype=st.sampled_from(["int32", "int64", "int16", "uint8"]),
            layout=st.sampled_from(["contiguous", "step", "expanded"])))),
        scale=draw(mostly(st.none() | st.floats(-2, 2), st.sampled_from(SCALE_EXTREMES))),
        return_lse=draw(st.booleans()),
        defect=draw(defects(*ATTENTION_DEFECTS)),
        seed=draw(SEEDS),
    )


def random_labels(shape, pool, gen, dtype=torch.int32):
    values = torch.tensor(LABEL_POOLS[pool], dtype=torch.int64)
    return values[torch.randint(len(values), tuple(shape), generator=gen)].to(dtype)


def build_labels(spec, B, Lq, Lk, gen, defect):
    """The four label tensors of a random-label Mask (dtype / layout / batch per spec)."""
    dtype = INT_DTYPES[spec["dtype"]]
    pool = spec["pool"] if dtype in (torch.int32, torch.int64) else "small"  # narrow dtypes hold small labels
    q_len = Lq + 1 if defect == "mask_q_len" else Lq
    labels = []
    shapes = zip((q_len, q_len, Lk, Lk), spec["layouts"], spec["per_batch"])
    for index, (length, layout, per_batch) in enumerate(shapes):
        batch = B + 1 if defect == "mask_batch" and index == 0 else (B if per_batch else 1)
        values = random_labels((batch, length), pool, gen, dtype)
        if layout == "one_d" and batch == 1:
            values = values[0]
        labels.append(with_layout(values, "contiguous" if layout == "one_d" else layout))
    if defect == "label_float":
        labels[0] = labels[0].float()
    if defect == "label_beyond_int32" and labels[2].numel():
        labels[2] = labels[2].to(torch.int64).contiguous()
        labels[2].view(-1)[0] = 2**31
    return labels


def family_mask(spec, B, Lq, Lk, gen):
    """A mask family over Lk keys, then (sparse queries) gather_queries of Lq of its rows; None
    when the family has no instance with Lk keys."""
    family, seq_len = spec["family"], Lk
    if Lk == 0 or (family == "bd3_train" and Lk % 2):
        return None
    prefix_len = int(spec["prefix_frac"] * seq_len)
    if family == "causal":
        mask = Mask.causal(seq_len)
    elif family == "block_causal":
        mask = Mask.block_causal(seq_len, spec["block_size"], prefix_len=prefix_len)
    elif family == "block_diagonal":
        mask = Mask.block_diagonal(seq_len, spec["block_size"])
    elif family == "prefix_lm":
        mask = Mask.prefix_lm(seq_len, prefix_len)
    elif family == "bd3_train":
        mask = Mask.bd3_train(seq_len // 2, spec["block_size"])
    elif family == "bidirectional":
        mask = Mask.bidirectional(seq_len)
    elif family in ("eso_A", "eso_B"):
        rank, is_clean = random_eso_ranks(max(B, 1), seq_len, gen)
        mask = Mask.eso(rank, is_clean, family[-1])
    else:
        mask = Mask.clean_and_self(torch.rand(1, seq_len, generator=gen) < 0.5)
    if Lq == Lk and not spec["gather"]:
        return mask
    return mask.gather_queries(torch.randint(Lk, (mask.batch, Lq), generator=gen))


def build_attention(case):
    """(args, kwargs, problems) of one attention case."""
    c, defect = dict(case), case["defect"]
    gen = generator(c["seed"])
    problems = [(defect, ATTENTION_DEFECTS[defect])] if defect else []
    if defect == "heads_not_multiple":
        c["Hkv"], c["group"] = 2, 1.5
    if defect == "zero_q_heads":
        c["group"] = 0
    if defect in ("head_dim_0", "head_dim_257"):
        c["D"] = 0 if defect == "head_dim_0" else 257
    B, Lq, Lk, Hkv, D, dtype = c["B"], c["Lq"], c["Lk"], c["Hkv"], c["D"], c["dtype"]
    Hq = int(Hkv * c["group"])
    q_layout, k_layout, v_layout = c["layouts"]
    if defect == "q_bad_last":
        q_layout = "bad_last"
        if D <= 1:  # a single element has no stride to get wrong
            problems = without(problems, defect)
    q = with_layout(randn((B, Lq, Hq, D), gen, dtype), q_layout)
    k_batch = B + 1 if defect == "k_batch" else B
    k = with_layout(randn((k_batch, Lk, Hkv, D), gen, dtype), k_layout)
    v = with_layout(randn((k_batch, Lk + (defect == "v_len"), Hkv, D), gen, dtype), v_layout)
    if defect in ("q_int32", "q_float64"):
        wrong = torch.int32 if defect == "q_int32" else torch.float64
        q, k, v = (t.to(wrong) for t in (q, k, v))
    if defect == "k_other_dtype":
        k = k.to(torch.float16 if dtype != torch.float16 else torch.bfloat16)
    if defect == "q_rank3":
        q = q[:, :, 0]
    if defect == "q_list":
        q = q.tolist()

    kwargs = {"return_lse": c["return_lse"]}
    mask_defects = ("mask_q_len", "mask_batch", "label_float", "label_beyond_int32")
    mask_kind = "labels" if defect in mask_defects else c["mask"]
    if mask_kind == "family":
        kwargs["mask"] = family_mask(c["family"], B, Lq, Lk, gen)
    elif mask_kind == "labels":
        labels = build_labels(c["labels"], B, Lq, Lk, gen, defect)
        if defect in ("mask_batch", "label_beyond_int32"):
            problems = without(problems, defect)  # judged below, on what was built
        if defect == "label_beyond_int32" and labels[2].dtype == torch.int64 and labels[2].numel():
            problems.append((defect, ValueError))
        label_batches = [t.shape[0] if t.dim() == 2 else 1 for t in labels]
        problems += batch_problem("label batches", label_batches)
        if not batch_problem("label batches", label_batches) and max(label_batches) not in (1, B):
            problems.append(("mask batch is neither 1 nor B", ValueError))
        kwargs["mask"] = ("labels", labels)  # the Mask is built inside the call (its errors count)
    if defect == "mask_tensor":
        kwargs["mask"] = torch.zeros(B, Lq, Lk, dtype=torch.bool)

    spec = c["bias"]
    if defect and defect.startswith("bias") and spec is None:
        spec = dict(dims=(True,) * 4, rank=4, dtype=dtype, layout="contiguous", neg_inf=0.0)
    if spec is not None:
        full = (B, Hq, Lq, Lk)
        shape = [size if keep else 1 for size, keep in zip(full, spec["dims"])][4 - spec["rank"]:]
        bias = randn(shape, gen, spec["dtype"])
        if spec["neg_inf"] and bias.numel():
            hide = torch.rand(bias.shape, generator=gen) < spec["neg_inf"]
            bias = bias.masked_fill(hide, -math.inf)
        bias = with_layout(bias, spec["layout"])
        if defect == "bias_float64":
            bias = bias.double()
        elif defect == "bias_int":
            bias = bias.nan_to_num(0.0, neginf=-5.0).to(torch.int32)
        elif defect == "bias_not_broadcastable":
            bias = torch.zeros(B + 2, 1, 1, 1, dtype=spec["dtype"])
        elif defect == "bias_float":
            bias = 0.5
        kwargs["bias"] = bias

    spec = c["kv_lens"]
    if defect and defect.startswith("kv_lens") and spec is None:
        spec = dict(dtype="int32", layout="contiguous")
    if spec is not None:
        lens = torch.randint(Lk + 1, (B,), generator=gen)
        int_dtype = INT_DTYPES[spec["dtype"]]
        if defect == "kv_lens_value" and B:
            lens[int(torch.randint(B, (), generator=gen))] = [-1, Lk + 1, INT32_MIN, INT32_MAX, 2**40, 2**63 - 1,
                                                               -(2**63)][int(torch.randint(7, (), generator=gen))]
            int_dtype = torch.int64
        if defect == "kv_lens_unsigned":
            int_dtype = [torch.uint16, torch.uint32, torch.uint64][int(torch.randint(3, (), generator=gen))]
        kv_lens = with_layout(lens.to(int_dtype), spec["layout"])
        if defect == "kv_lens_value":  # judged on what was built (an expanded layout keeps lens[0] only)
            outside = bool(((kv_lens < 0) | (kv_lens > Lk)).any())
            problems = without(problems, defect) + ([(defect, ValueError)] if outside else [])
        if defect == "kv_lens_shape":
            kv_lens = torch.zeros(B + 1, dtype=torch.int32)
        elif defect == "kv_lens_float":
            kv_lens = kv_lens.float()
        elif defect == "kv_lens_bool":
            kv_lens = kv_lens > 0
        elif defect == "kv_lens_list":
            kv_lens = kv_lens.tolist()
        kwargs["kv_lens"] = kv_lens

    scale = c["scale"]
    if scale is not None:
        if isinstance(scale, float) and -2 <= scale <= 2 and D > 0:
            scale = scale / math.sqrt(D)  # drawn as a multiple of the default: scores of size ~1
        problem = float_arg_problem(scale, low=-FLOAT32_MAX, high=FLOAT32_MAX)
        if problem:
            problems.append((f"scale={scale!r}", problem))
        kwargs["scale"] = scale
    return (q, k, v), kwargs, problems


def realized_mask(mask):
    return Mask(*mask[1]) if isinstance(mask, tuple) else mask


@fuzz(1000)
@given(case=attention_cases())
def test_attention(case):
    (q, k, v), kwargs, problems = build_attention(case)
    inputs = snapshot([q, k, v, kwargs.get("bias"), kwargs.get("kv_lens")]
                      + (list(kwargs["mask"][1]) if isinstance(kwargs.get("mask"), tuple) else []))

    def call():
        return dlmfuse.attention(q, k, v, **dict(kwargs, mask=realized_mask(kwargs.get("mask"))))

    result, error = call_op(call, ("attention:", "Mask:"))
    assert_untouched(inputs)
    if not check_outcome(error, problems):
        return
    out, lse = result if kwargs["return_lse"] else (result, None)
    ref_kwargs = {name: kwargs[name] for name in ("bias", "kv_lens", "scale") if name in kwargs}
    if "kv_lens" in ref_kwargs:  # the reference compares in int64 (torch cannot promote uint16-64)
        ref_kwargs["kv_lens"] = ref_kwargs["kv_lens"].to(torch.int64)
    ref_kwargs["mask"] = realized_mask(kwargs.get("mask"))
    if ref_kwargs.get("scale") is not None:  # the kernels take the scale as a float; torch cannot scale by 2**64
        ref_kwargs["scale"] = float(ref_kwargs["scale"])
    if q.dtype != torch.float32 and k.shape[1] == 0:
        # No key: the exact contract (out 0, lse -inf); the low-precision bound needs keys.
        assert out.dtype == q.dtype and out.shape == q.shape and torch.equal(out, torch.zeros_like(out))
        assert lse is None or (lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and torch.isneginf(lse).all())
        return
    check_attention(out, q, k, v, lse=lse, **ref_kwargs)


# =================================================================================== merge_attention
LSE_KINDS = ("normal", "neg_inf", "pos_inf", "nan", "huge", "mixed")
MERGE_DEFECTS = {
    "out_b_dtype": TypeError, "out_a_int": TypeError, "out_b_shape": ValueError, "lse_float64": TypeError,
    "lse_bf16": TypeError, "lse_shape": ValueError, "out_bad_last": ValueError, "lse_list": TypeError,
    "out_rank3": ValueError,
}


@st.composite
def merge_cases(draw):
    return dict(
        dtype=draw(st.sampled_from(FLOAT_DTYPES)), B=draw(st.integers(0, 3)), L=draw(LENGTHS),
        H=draw(st.integers(1, 4)), D=draw(st.sampled_from([8, 1, 3, 64, 65])),
        out_layouts=draw(st.tuples(*[st.sampled_from(QKV_LAYOUTS)] * 2)),
        lse_layouts=draw(st.tuples(*[st.sampled_from(["contiguous", "permuted", "transposed", "step", "expanded",
                                                      "offset"])] * 2)),
        lse_kinds=draw(st.tuples(*[st.sampled_from(LSE_KINDS)] * 2)),
        out_specials=draw(st.booleans()), defect=draw(defects(*MERGE_DEFECTS)), seed=draw(SEEDS))


def random_lse(shape, kind, gen):
    """float32 lse values of one kind; "mixed" draws each entry's kind."""
    normal = randn(shape, gen, scale=3.0)
    specials = {"neg_inf": -math.inf, "pos_inf": math.inf, "nan": math.nan}
    if kind in specials:  # a quarter of the entries
        return normal.masked_fill(torch.rand(shape, generator=gen) < 0.25, specials[kind])
    if kind == "huge":
        return randn(shape, gen, scale=1e37).clamp(-FLOAT32_MAX, FLOAT32_MAX)
    if kind == "mixed":
        pick = torch.randint(5, shape, generator=gen)
        table = torch.tensor([0.0, -math.inf, math.inf, math.nan, 3e38])
        return torch.where(pick == 0, normal, table[pick])
    return normal


def assert_nan_at_same_places(actual, expected, name):
    a, e = actual.detach().double(), expected.detach().double()
    diff = (a.isnan() != e.isnan()).nonzero()
    assert diff.numel() == 0, f"{name}: NaN pattern differs from the reference at {diff[:5].tolist()}"
    return a.nan_to_num(0.0, posinf=math.inf, neginf=-math.inf), e.nan_to_num(0.0, posinf=math.inf, neginf=-math.inf)


@fuzz(1500)
@given(case=merge_cases())
def test_merge_attention(case):
    c, defect = case, case["defect"]
    gen = generator(c["seed"])
    B, L, H, D, dtype = c["B"], c["L"], c["H"], c["D"], c["dtype"]
    outs = []
    for layout in c["out_layouts"]:
        values = randn((B, L, H, D), gen, dtype)
        if c["out_specials"] and values.numel():  # inf / NaN outputs: ignored where their weight is 0
            values.view(-1)[int(torch.randint(values.numel(), (), generator=gen))] = math.nan
        outs.append(with_layout(values, "bad_last" if defect == "out_bad_last" and not outs else layout))
    lses = [with_layout(random_lse((B, H, L), kind, gen), layout)
            for kind, layout in zip(c["lse_kinds"], c["lse_layouts"])]
    out_a, out_b = outs
    lse_a, lse_b = lses
    problems = [(defect, MERGE_DEFECTS[defect])] if defect else []
    if defect == "out_bad_last" and D <= 1:
        problems = without(problems, defect)
    if defect == "out_b_dtype":
        out_b = out_b.to(torch.float16 if dtype != torch.float16 else torch.float32)
    elif defect == "out_a_int":
        out_a = out_a.nan_to_num(0.0).to(torch.int32)
    elif defect == "out_b_shape":
        out_b = torch.zeros(B, L + 1, H, D, dtype=dtype)
    elif defect == "lse_float64":
        lse_a = lse_a.double()
    elif defect == "lse_bf16":
        lse_b = lse_b.bfloat16()
    elif defect == "lse_shape":
        lse_b = lse_b.transpose(1, 2) if L != H else lse_b[:, :, :0]
    elif defect == "lse_list":
        lse_a = lse_a.tolist()
    elif defect == "out_rank3":
        out_a = out_a[:, :, 0]
    inputs = snapshot([out_a, lse_a, out_b, lse_b])
    result, error = call_op(lambda: dlmfuse.merge_attention(out_a, lse_a, out_b, lse_b), ("merge_attention:",))
    assert_untouched(inputs)
    if not check_outcome(error, problems):
        return
    out, lse = result
    assert out.dtype == dtype and out.shape == out_a.shape and lse.dtype == torch.float32 and lse.shape == lse_a.shape
    # The exact merge of these partials: float64 outputs in, one rounding to the dtype allowed.
    exact_out, exact_lse = dlmfuse.reference.merge_attention(out_a.double(), lse_a, out_b.double(), lse_b)
    got_lse, want_lse = assert_nan_at_same_places(lse, exact_lse, "lse")
    assert_fp32_close(got_lse, want_lse, "lse")
    got, want = assert_nan_at_same_places(out, exact_out, "out")
    if dtype == torch.float32:
        assert_fp32_close(got, want, "out")
    else:
        unit = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
        both_inf = torch.isinf(want) & (got == want)
        excess = torch.where(both_inf, 0.0, (got - want).abs() - unit * want.abs() - 2.0**-20)
        assert not (excess > 0).any(), f"out: {int((excess > 0).sum())} elements beyond one rounding of the exact merge"
