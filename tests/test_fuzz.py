"""Property-based fuzzing of every public op with hypothesis (issue 13, item 6).

Each test draws the arguments of one op (or op family): shapes with 0, 1 and odd sizes, Lq != Lk,
GQA ratios, every float dtype and wrong ones, non-contiguous views (permuted, stepped, offset,
wider rows, stride-0 expansions), labels with INT32_MIN / INT32_MAX, bias broadcasts, kv_lens and
positions in and out of range, duplicates, integer extremes (0, -1, 2**31, 2**63, 2**64, numpy
ints) and NaN / inf for float arguments. A case is a plain dict of choices (so hypothesis prints a
readable, shrunk reproducer); the tensors are built from a drawn generator seed.

The property, for every case:
- the call raises TypeError or ValueError whose message starts with the op's name (never a
  nanobind signature dump), or returns a result equal to dlmfuse.reference within the tolerances of
  conftest.py; any other exception (RuntimeError, NotImplementedError, OverflowError, IndexError,
  ...) is a failure, and a call that does not return within HANG_SECONDS kills the run (hang);
- a case built only from valid choices must succeed; a case with a defect the contract rejects
  (DESIGN.md section 6: TypeError for dtype / kind, ValueError for shapes / values) must raise that
  error; "either" marks inputs the contract leaves open (accept with the right result, or refuse);
- inputs are never modified, except the caches of kv_scatter_ / KVCache.write, which are written in
  place (same data_ptr; the whole buffer under a view equals the reference's write on a clone, bit
  for bit, so nothing outside the written rows changes).

Budget: the default profile runs a few thousand cases in about a minute on two cores,
derandomized so that CI is reproducible. DLMFUSE_FUZZ_EXAMPLES scales it: "10x" multiplies every
test's max_examples, a plain number N sets them all to N. DLMFUSE_FUZZ_SEED=<int> runs a different
(seeded, reproducible) sample, DLMFUSE_FUZZ_SEED=random a fresh one each run (hypothesis prints the
seed and a reproduce blob on failure).
"""

from __future__ import annotations

import contextlib
import faulthandler
import math
import numbers
import os

import numpy as np
import torch
from hypothesis import HealthCheck, event, note, seed, settings
from hypothesis import given, strategies as st

import dlmfuse
from dlmfuse import ORDER_INFINITY, KVCache, Mask
from dlmfuse.kv_cache import UNWRITTEN_GROUP
from dlmfuse.reference.sampling import kept_tokens

from conftest import assert_fp32_close, check_attention
from test_kv_cache import assert_bits_equal
from test_mask import grid, random_eso_ranks
from test_sampling import CONF_ATOL, CONF_RTOL, describe_mismatch
from test_select_unmask import check_against_reference as check_select_unmask

# --------------------------------------------------------------------------- budget, reproducibility
_EXAMPLES_ENV = "DLMFUSE_FUZZ_EXAMPLES"
_SEED_ENV = "DLMFUSE_FUZZ_SEED"
HANG_SECONDS = 120  # one call (op + reference) slower than this is a hang: the run is killed


def _max_examples(default: int) -> int:
    """default, scaled ("10x") or replaced ("5000") by DLMFUSE_FUZZ_EXAMPLES."""
    raw = os.environ.get(_EXAMPLES_ENV, "").strip().lower()
    if not raw:
        return default
    if raw.endswith("x"):
        return max(1, round(float(raw[:-1]) * default))
    return max(1, int(raw))


_SEED = os.environ.get(_SEED_ENV, "").strip().lower()
settings.register_profile(
    "dlmfuse-fuzz",
    deadline=None,
    derandomize=not _SEED,  # CI: the same cases every run
    database=None,  # nothing written into the repository; failures print a reproduce blob instead
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                           HealthCheck.large_base_example],
)


def fuzz(examples: int):
    """The fuzz profile with `examples` cases (see DLMFUSE_FUZZ_EXAMPLES / DLMFUSE_FUZZ_SEED)."""
    def apply(test):
        test = settings(settings.get_profile("dlmfuse-fuzz"), max_examples=_max_examples(examples))(test)
        if _SEED and _SEED != "random":
            test = seed(int(_SEED))(test)
        return test
    return apply


# ------------------------------------------------------------------------------------ the property
EITHER = "either"  # a choice the contract leaves open: refuse it (TypeError / ValueError) or accept it
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
FLOAT64_MAX = float(torch.finfo(torch.float64).max)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT_EXTREMES = (0, -1, 2**31, 2**63, 2**64)
SIGNATURE_DUMP = "incompatible function arguments"


@contextlib.contextmanager
def no_hang(seconds: int = HANG_SECONDS):
    """Kills the process with every thread's traceback if the block runs longer than `seconds`."""
    faulthandler.dump_traceback_later(seconds, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def call_op(call, prefixes):
    """(result, None) or (None, error) for a TypeError / ValueError whose message starts with one of
    `prefixes` (the op's name). Any other exception propagates: the test fails with it."""
    try:
        with no_hang():
            return call(), None
    except (TypeError, ValueError) as error:
        message = str(error)
        assert SIGNATURE_DUMP not in message, f"binding signature dump instead of a checked error: {message}"
        assert message.startswith(prefixes), (
            f"{type(error).__name__} whose message does not start with {prefixes}: {message!r}")
        return None, error


def check_outcome(error, problems) -> bool:
    """`problems`: [(what, TypeError | ValueError | EITHER)] of the case. No problem: the call must
    succeed; a definite one: it must raise one of the definite types; only EITHER: anything
    call_op allows. Returns whether the call succeeded."""
    note(f"problems: {problems}; raised: {None if error is None else f'{type(error).__name__}: {error}'}")
    event("succeeded" if error is None else f"raised {type(error).__name__}")  # --hypothesis-show-statistics
    if not problems:
        assert error is None, f"a valid call raised {type(error).__name__}: {error}"
    definite = tuple({kind for _, kind in problems if kind is not EITHER})
    if definite:
        assert error is not None, f"{problems}: the call succeeded instead of raising {definite}"
        allowed = definite + ((TypeError, ValueError) if len(definite) < len(problems) else ())
        assert isinstance(error, allowed), f"{problems}: expected {definite}, got {type(error).__name__}: {error}"
    return error is None


def snapshot(tensors):
    return [(t, t.clone()) for t in tensors if isinstance(t, torch.Tensor)]


def assert_untouched(snapshots, what="input"):
    for t, before in snapshots:
        assert_bits_equal(t, before, f"{what} modified by the call")


# ------------------------------------------------------------------------------ building tensors
def generator(case_seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(case_seed)


def randn(shape, gen, dtype=torch.float32, scale=1.0):
    return (torch.randn(tuple(shape), generator=gen, dtype=torch.float64) * scale).to(dtype)


def strided(values: torch.Tensor, layout: str, fill=0):
    """(base, view_of): a fresh buffer and the function that makes a view of it (or of a clone of
    it) equal to `values`, with `layout`'s strides. Layouts: contiguous; permuted (leading dims in
    reverse memory order, last dim contiguous); transposed (every dim reversed: the last dim is
    strided); step (every other element of dim 1, or dim 0 below 3 dims); offset (a non-zero
    storage offset); wide (rows of a wider last dim); bad_last (last dim of stride 2); expanded
    (dim 0 broadcast with stride 0: every row equal to values[0])."""
    shape, n = list(values.shape), values.dim()
    if layout == "contiguous" or n == 0:
        return values.clone(), lambda b: b
    if layout == "permuted":
        perm = list(reversed(range(n - 1))) + [n - 1]  # its own inverse
        return values.permute(perm).contiguous(), lambda b: b.permute(perm)
    if layout == "transposed":
        perm = list(reversed(range(n)))
        return values.permute(perm).contiguous(), lambda b: b.permute(perm)
    if layout == "expanded":
        return values[:1].clone(), lambda b: b.expand(shape)
    if layout == "step":
        d = 1 if n >= 3 else 0
        big = shape.copy()
        big[d] *= 2
        index = (slice(None),) * d + (slice(None, None, 2),)
    elif layout == "offset":
        big = [shape[0] + 1] + shape[1:]
        index = (slice(1, None),)
    elif layout == "wide":
        big = shape[:-1] + [shape[-1] + 3]
        index = (Ellipsis, slice(None, shape[-1]))
    elif layout == "bad_last":
        big = shape[:-1] + [2 * shape[-1]]
        index = (Ellipsis, slice(None, None, 2))
    else:
        raise AssertionError(layout)
    base = torch.full(big, fill, dtype=values.dtype)
    base[index] = values
    return base, lambda b: b[index]


def with_layout(values: torch.Tensor, layout: str, fill=0) -> torch.Tensor:
    base, view_of = strided(values, layout, fill)
    return view_of(base)


SEEDS = st.integers(0, 2**32 - 1)


def mostly(common, rare):
    """Mostly `common`, sometimes `rare` (extremes, wrong types); shrinks to `common`."""
    return st.one_of(common, common, common, rare)


def defects(*names):
    """No defect in two cases out of three, else one of `names`."""
    return st.one_of(st.none(), st.none(), st.sampled_from(names))


def describe_int(value):
    return f"{type(value).__name__} {value!r}"


def float_arg_problem(value, *, low=-math.inf, high=math.inf, low_open=False, allow_none=True):
    """The contract's verdict on a float argument: TypeError unless a real number (no bool),
    ValueError outside [low, high] (or (low, high]) or NaN; ints of any size compare exactly."""
    if value is None:
        return None if allow_none else TypeError
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return TypeError
    if isinstance(value, numbers.Integral):
        value = int(value)  # exact comparisons for ints beyond the float range
    else:
        value = float(value)  # numpy scalars too
        if math.isnan(value):
            return ValueError
    too_low = value <= low if low_open else value < low
    return ValueError if too_low or value > high else None


def int_arg_problem(value, *, low=None, high=None):
    """TypeError unless an integer (numpy ints count, bools do not), ValueError outside [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return TypeError
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        return ValueError
    return None


def without(problems, what):
    """`problems` less the entries about `what` (a defect that turned out harmless for this shape)."""
    return [p for p in problems if p[0] != what]


def batch_problem(what, sizes):
    """Label / index batches must each be 1 or one common B (ValueError otherwise). A batch of 0
    next to a batch of 1 is left open: torch broadcasting gives 0, the Mask takes the largest."""
    sizes = set(sizes)
    if len(sizes - {1}) > 1:
        return [(what, ValueError)]
    if {0, 1} <= sizes:
        return [(f"{what}: 0 and 1", EITHER)]
    return []


# ========================================================================================= attention
LENGTHS = st.sampled_from([1, 0, 2, 3, 5, 7, 16, 17, 33])
HEAD_DIMS = st.sampled_from([8, 1, 3, 16, 64, 65, 128, 256])
QKV_LAYOUTS = ("contiguous", "permuted", "step", "offset", "wide", "expanded")
LABEL_LAYOUTS = ("contiguous", "transposed", "step", "expanded", "one_d")
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


# ======================================================================================= kv_scatter_
CACHE_LAYOUTS = ("contiguous", "permuted", "step", "offset", "wide", "packed", "layer_of_stack")
NEW_LAYOUTS = ("contiguous", "permuted", "step", "expanded", "alias_cache")
POSITION_KINDS = ("unique", "duplicates", "out_of_range", "extremes", "mixed")
SCATTER_DEFECTS = {
    "expanded_cache": ValueError, "same_cache": ValueError, "cache_bad_last": ValueError,
    "positions_int16": TypeError, "positions_float": TypeError, "positions_shape": ValueError,
    "new_dtype": TypeError, "new_shape": ValueError, "cache_rank3": ValueError, "positions_list": TypeError,
}


@st.composite
def scatter_cases(draw):
    return dict(
        dtype=draw(st.sampled_from(FLOAT_DTYPES + (torch.float64, torch.int32))), B=draw(st.integers(0, 3)),
        Lmax=draw(st.sampled_from([1, 0, 2, 5, 9, 17])), H=draw(st.integers(0, 3)),
        D=draw(st.sampled_from([8, 1, 3, 64])), n=draw(st.integers(0, 8)),
        cache_layout=draw(st.sampled_from(CACHE_LAYOUTS)), new_layout=draw(st.sampled_from(NEW_LAYOUTS)),
        pos_dtype=draw(st.sampled_from([torch.int64, torch.int32])),
        pos_layout=draw(st.sampled_from(["contiguous", "transposed", "step", "expanded"])),
        positions=draw(st.sampled_from(POSITION_KINDS)), validate=draw(st.booleans()),
        defect=draw(defects(*SCATTER_DEFECTS)), seed=draw(SEEDS))


def cache_buffers(layout, shape, dtype, gen):
    """(base buffers, view_of(bases) -> (k_cache, v_cache)): caches as views of fresh buffers."""
    B, L, H, D = shape
    fill = randn((B, L, H, D), gen).to(dtype)
    if layout == "packed":  # k and v: disjoint views of one [B, L, 2, H, D] buffer
        base = randn((B, L, 2, H, D), gen).to(dtype)
        return [base], lambda bases: (bases[0][:, :, 0], bases[0][:, :, 1])
    if layout == "layer_of_stack":  # layer 1 of stacked [layers, B, L, H, D] caches
        k, v = (randn((3, B, L, H, D), gen).to(dtype) for _ in range(2))
        return [k, v], lambda bases: (bases[0][1], bases[1][1])
    (k_base, k_of), (v_base, v_of) = (strided(fill, layout, fill=7), strided(fill.clone(), layout, fill=-3))
    return [k_base, v_base], lambda bases: (k_of(bases[0]), v_of(bases[1]))


def random_positions(kind, B, n, Lmax, gen):
    if kind == "unique" and n <= Lmax:
        rows = [torch.randperm(Lmax, generator=gen)[:n] for _ in range(B)]
        return torch.stack(rows) if B else torch.zeros(0, n, dtype=torch.int64)
    in_range = torch.randint(max(Lmax, 1), (B, n), generator=gen)
    if kind == "duplicates" or kind == "unique":
        return in_range
    extremes = torch.tensor([-1, Lmax, INT32_MIN, INT32_MAX, 2**31, -(2**63), 2**63 - 1])
    pick = extremes[torch.randint(len(extremes), (B, n), generator=gen)]
    share = {"out_of_range": 0.3, "extremes": 1.0, "mixed": 0.5}[kind]
    return torch.where(torch.rand(B, n, generator=gen) < share, pick, in_range)


def positions_are_valid(positions, Lmax):
    pos = positions.to(torch.int64)
    if pos.numel() == 0:
        return True
    if ((pos < 0) | (pos >= Lmax)).any():
        return False
    return all(len(set(row)) == len(row) for row in pos.tolist())


@fuzz(2500)
@given(case=scatter_cases())
def test_kv_scatter_(case):
    c, defect = case, case["defect"]
    gen = generator(c["seed"])
    B, Lmax, H, D, n, dtype = c["B"], c["Lmax"], c["H"], c["D"], c["n"], c["dtype"]
    layout = "contiguous" if defect in ("expanded_cache", "cache_bad_last") else c["cache_layout"]
    bases, views_of = cache_buffers(layout, (B, Lmax, H, D), dtype, gen)
    k_cache, v_cache = views_of(bases)
    problems = [(defect, SCATTER_DEFECTS[defect])] if defect else []
    if defect == "expanded_cache":  # rows that share memory: a write would land in several places
        bases = [k_cache[:1].clone(), v_cache.clone()]
        views_of = lambda b: (b[0].expand(B, Lmax, H, D), b[1])  # noqa: E731
        k_cache, v_cache = views_of(bases)
        if B <= 1 or Lmax * H * D == 0:
            problems = without(problems, defect)
    elif defect == "same_cache":
        v_cache = k_cache
        if B * Lmax * H * D == 0:
            problems = [(defect, EITHER)]  # no element at all: sharing is moot
    elif defect == "cache_bad_last":
        bases = [strided(k_cache, "bad_last", fill=7)[0], v_cache.clone()]
        views_of = lambda b: (b[0][..., ::2], b[1])  # noqa: E731
        k_cache, v_cache = views_of(bases)
        if D <= 1:
            problems = without(problems, defect)
    new_values = [randn((B, n, H, D), gen).to(dtype) for _ in range(2)]
    if c["new_layout"] == "alias_cache" and n <= Lmax:  # new rows read from the cache being written
        k_new, v_new = v_cache[:, :n], k_cache[:, Lmax - n:]
    else:
        new_layout = c["new_layout"] if c["new_layout"] != "alias_cache" else "contiguous"
        k_new, v_new = (with_layout(t, new_layout) for t in new_values)
    positions = with_layout(random_positions(c["positions"], B, n, Lmax, gen).to(torch.int64), c["pos_layout"])
    if c["pos_dtype"] == torch.int32:  # int32 positions: extremes wrap to other (often in-range) values
        positions = with_layout(positions.to(torch.int32), c["pos_layout"])
    if defect == "positions_int16":
        positions = positions.to(torch.int16)
    elif defect == "positions_float":
        positions = positions.float()
    elif defect == "positions_shape":
        positions = torch.zeros(B, n + 1, dtype=torch.int64)
    elif defect == "positions_list":
        positions = positions.tolist()
    elif defect == "new_dtype":
        k_new = k_new.to(torch.float64 if dtype != torch.float64 else torch.float32)
    elif defect == "new_shape":
        v_new = torch.zeros(B, n, H + 1, D, dtype=dtype)
    elif defect == "cache_rank3":
        v_cache = v_cache.select(-1, 0)
    if dtype not in FLOAT_DTYPES:  # the contract names no cache dtype: a plain copy, or a refusal
        problems.append((f"{dtype} caches", EITHER))
    position_tensor = (isinstance(positions, torch.Tensor) and positions.dtype in (torch.int32, torch.int64)
                       and tuple(positions.shape) == (B, n))
    if position_tensor and c["validate"] and not positions_are_valid(positions, Lmax):
        problems.append(("validate=True with positions out of range or repeated", ValueError))

    # The expected buffers: the reference on clones, with the new rows read before any write.
    expected = [None if b is None else b.clone() for b in bases]
    before = [t.clone() for t in (k_new, v_new, positions) if isinstance(t, torch.Tensor)]
    pointers = [t.data_ptr() for t in (k_cache, v_cache) if isinstance(t, torch.Tensor)]
    inputs_untouched = snapshot([positions] + ([] if c["new_layout"] == "alias_cache" else [k_new, v_new]))
    result, error = call_op(
        lambda: dlmfuse.kv_scatter_(k_cache, v_cache, k_new, v_new, positions, validate=c["validate"]),
        ("kv_scatter_:",))
    assert_untouched(inputs_untouched)
    assert [t.data_ptr() for t in (k_cache, v_cache) if isinstance(t, torch.Tensor)] == pointers
    if not check_outcome(error, problems):
        for actual, untouched in zip(bases, expected):  # refused: nothing written
            if actual is not None:
                assert_bits_equal(actual, untouched, "cache buffer after a refused call")
        return
    assert result is None
    exp_k, exp_v = views_of(expected)
    dlmfuse.reference.kv_scatter_(exp_k, exp_v, before[0], before[1], before[2], validate=False)
    for actual, want in zip(bases, expected):  # the whole buffer: written rows and everything else
        assert_bits_equal(actual, want, "cache buffer (in place, vs the reference on a clone)")


# ===================================================================================== sample_tokens
LOGITS_DTYPES = FLOAT_DTYPES + (torch.float64,)
LOGITS_LAYOUTS = ("contiguous", "permuted", "step", "offset", "wide", "expanded")
SPECIAL_LOGITS = ("none", "neg_inf", "nan", "extreme", "pos_inf", "empty_row", "ties")
TEMPERATURE_EXTREMES = (0, 1, 2**31, 2**63, 2**64, 2**1100, -1, 1e-30, 1e30, 1e-50, 1e50, 5e-324, math.inf,
                        math.nan, -0.5, np.float32(0.7), np.float64(2.0), True, "1.0")
COUNTER_EXTREMES = (0, -1, 2**31, 2**63 - 1, 2**63, 2**64, np.int64(5), np.uint64(2**64 - 1), True, 1.5)
SAMPLING_DEFECTS = {
    "logits_int": TypeError, "logits_bool": TypeError, "logits_0d": ValueError, "vocab_0": ValueError,
    "logits_bad_last": ValueError, "confidence_kind": ValueError, "logits_list": TypeError,
    "seed_float_tensor": TypeError, "seed_two_elements": TypeError, "suppress_float": TypeError,
}


@st.composite
def sampling_cases(draw):
    vocab = draw(st.sampled_from([5, 1, 2, 3, 8, 17, 50]))
    id_values = st.integers(0, vocab - 1)
    # At most one scalar argument per case is drawn from its extremes (readable failures, mostly valid cases).
    wild = draw(st.one_of(st.none(), st.none(), st.sampled_from(["temperature", "top_k", "top_p", "seed", "offset",
                                                                 "suppress"])))

    def argument(name, common, extremes):
        return draw(extremes if wild == name else common)

    return dict(
        dtype=draw(st.sampled_from(LOGITS_DTYPES)), vocab=vocab,
        lead=draw(st.lists(st.sampled_from([3, 0, 1, 2, 5]), min_size=0, max_size=2)),
        layout=draw(st.sampled_from(LOGITS_LAYOUTS)), magnitude=draw(st.sampled_from([1.0, 10.0, 300.0])),
        special=draw(st.sampled_from(SPECIAL_LOGITS)),
        temperature=argument("temperature", st.just(0.0) | st.floats(0.0, 5.0), st.sampled_from(TEMPERATURE_EXTREMES)),
        top_k=argument("top_k", st.none() | st.integers(1, vocab + 2),
                       st.sampled_from(INT_EXTREMES + (np.uint64(2**64 - 1), 2.0))),
        top_p=argument("top_p", st.none() | st.floats(0.0, 1.0, exclude_min=True),
                       st.sampled_from((0, 1, 0.0, -0.5, 1.5, 1e-300, math.nan, 2**64, True))),
        seed=argument("seed", st.none() | st.integers(0, 2**63 - 1) | st.just("tensor"), st.sampled_from(COUNTER_EXTREMES)),
        offset=argument("offset", st.integers(0, 2**63 - 1), st.sampled_from(COUNTER_EXTREMES)),
        confidence=draw(st.sampled_from(("prob", "margin", "neg_entropy", "logit"))),
        suppress=argument("suppress", st.none() | st.lists(id_values, max_size=4), st.lists(
            id_values | st.sampled_from(INT_EXTREMES + (vocab, -(2**63), 2**70)), min_size=1, max_size=3)),
        suppress_as=draw(st.sampled_from(["list", "int64", "int32", "uint8", "tuple"])),
        tempered=draw(st.booleans()), defect=draw(defects(*SAMPLING_DEFECTS)), seed_value=draw(SEEDS))


def random_logits(c, gen):
    shape = (*c["lead"], c["vocab"])
    x = randn(shape, gen, torch.float64, c["magnitude"])
    special, flat = c["special"], x.view(-1, c["vocab"])
    if flat.numel():
        if special in ("neg_inf", "nan", "pos_inf"):
            value = {"neg_inf": -math.inf, "nan": math.nan, "pos_inf": math.inf}[special]
            flat.masked_fill_(torch.rand(flat.shape, generator=gen) < 0.2, value)
        elif special == "extreme":  # the dtype's largest finite values
            big = float(torch.finfo(c["dtype"]).max)
            pick = torch.rand(flat.shape, generator=gen)
            flat.masked_fill_(pick < 0.15, big)
            flat.masked_fill_(pick > 0.85, -big)
        elif special == "empty_row":  # a row with nothing to emit
            flat[int(torch.randint(flat.shape[0], (), generator=gen))] = -math.inf
        elif special == "ties":
            flat.copy_(flat.round().clamp(-2, 2))
    return x.to(c["dtype"])


def suppress_argument(c):
    ids = c["suppress"]
    if ids is None:
        return None
    as_kind = c["suppress_as"]
    if as_kind == "list":
        return list(ids)
    if as_kind == "tuple":
        return tuple(ids)
    dtype = {"int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8}[as_kind]
    info = torch.iinfo(dtype)
    if all(info.min <= i <= info.max for i in ids):
        return torch.tensor(ids, dtype=dtype)
    return list(ids)


def counter_problem(value):
    if value is None or isinstance(value, torch.Tensor):
        return None
    return int_arg_problem(value, low=0, high=2**63 - 1)


def build_sampling(c):
    """(logits, kwargs, problems) of one sample_tokens case."""
    gen = generator(c["seed_value"])
    defect = c["defect"]
    layout = c["layout"] if c["lead"] or c["layout"] not in ("step", "expanded") else "offset"  # 1-d: keep V contiguous
    logits = with_layout(random_logits(c, gen), layout)
    problems = [(defect, SAMPLING_DEFECTS[defect])] if defect else []
    if defect == "logits_int":
        logits = logits.nan_to_num(0.0, posinf=1.0, neginf=-1.0).to(torch.int32)
    elif defect == "logits_bool":
        logits = logits > 0
    elif defect == "logits_0d":
        logits = torch.tensor(1.0)
    elif defect == "vocab_0":
        logits = logits[..., :0]
    elif defect == "logits_bad_last":
        logits = with_layout(logits, "bad_last")
        if c["vocab"] <= 1:
            problems = without(problems, defect)
    elif defect == "logits_list":
        logits = logits.tolist()
    kwargs = dict(temperature=c["temperature"], top_k=c["top_k"], top_p=c["top_p"], seed=c["seed"],
                  offset=c["offset"], confidence=c["confidence"], suppress_tokens=suppress_argument(c),
                  tempered_confidence=c["tempered"])
    if kwargs["seed"] == "tensor":
        kwargs["seed"] = torch.tensor([7], dtype=torch.int64)
    if defect == "confidence_kind":
        kwargs["confidence"] = "entropy"
    elif defect == "seed_float_tensor":
        kwargs["seed"] = torch.tensor(3.0)
    elif defect == "seed_two_elements":
        kwargs["seed"] = torch.tensor([1, 2])
    elif defect == "suppress_float":
        kwargs["suppress_tokens"] = torch.tensor([0.0])
    checks = [
        ("temperature", float_arg_problem(kwargs["temperature"], low=0.0, high=FLOAT64_MAX, allow_none=False)),
        ("top_k", None if kwargs["top_k"] is None else int_arg_problem(kwargs["top_k"], low=1)),
        ("top_p", float_arg_problem(kwargs["top_p"], low=0.0, high=1.0, low_open=True)),
        ("seed", counter_problem(kwargs["seed"])), ("offset", counter_problem(kwargs["offset"])),
    ]
    ids = c["suppress"] or []
    if defect != "suppress_float" and any(not 0 <= i < c["vocab"] for i in ids):
        checks.append(("suppress_tokens out of [0, V)", ValueError))
    problems += [(f"{name}={kwargs.get(name, '')!r}", kind) for name, kind in checks if kind]
    return logits, kwargs, problems


def reference_kwargs(kwargs, vocab):
    """The op's arguments in the reference's terms: plain ints, top_k capped at V (the op's own
    documented rule: a k of V or more keeps every token)."""
    ref = dict(kwargs)
    ref["seed"] = int(ref["seed"].item() if isinstance(ref["seed"], torch.Tensor) else ref["seed"])
    ref["offset"] = int(ref["offset"])
    ref["temperature"] = float(ref["temperature"])
    if ref["top_k"] is not None:
        ref["top_k"] = min(int(ref["top_k"]), vocab)
    if ref["top_p"] is not None:
        ref["top_p"] = float(ref["top_p"])
    return ref


@fuzz(1500)
@given(case=sampling_cases())
def test_sample_tokens(case):
    logits, kwargs, problems = build_sampling(case)
    seed_drawn = kwargs["seed"] is None
    if not problems and seed_drawn:
        kwargs["seed"] = 12345  # the reference needs the seed; None is exercised in the call below too
    ref = None
    if not problems:  # rows with nothing to emit: the CPU op raises ValueError (documented)
        ref = dlmfuse.reference.sample_tokens(logits, **reference_kwargs(kwargs, logits.shape[-1]))
        if (ref[0] < 0).any():
            problems = [("a row with no token that can be emitted", ValueError)]
    inputs = snapshot([logits, kwargs["suppress_tokens"], kwargs["seed"]])
    call_kwargs = dict(kwargs, seed=None) if seed_drawn else kwargs
    result, error = call_op(lambda: dlmfuse.sample_tokens(logits, **call_kwargs), ("sample_tokens:",))
    assert_untouched(inputs)
    if not check_outcome(error, problems):
        return
    tokens, conf = result
    lead = tuple(logits.shape[:-1])
    assert tokens.dtype == torch.int64 and tokens.shape == lead and conf.dtype == torch.float32 and conf.shape == lead
    if seed_drawn:  # a seed of its own: same kept set, and the seeded call below is compared
        keep = kept_tokens(logits, **{k: v for k, v in reference_kwargs(kwargs, logits.shape[-1]).items()
                                      if k in ("temperature", "top_k", "top_p", "suppress_tokens")})
        assert keep.gather(1, tokens.reshape(-1, 1)).all(), "seed=None emitted a filtered token"
        tokens, conf = dlmfuse.sample_tokens(logits, **kwargs)
    compare_sampling(logits, tokens, conf, ref, kwargs)


def compare_sampling(logits, tokens, conf, ref, kwargs):
    """Tokens identical to the float64 reference, confidence within test_sampling's tolerance. Rows
    holding a +inf logit are outside that contract (the docstring: the +inf token is chosen, the
    probability-based confidence is NaN): only that is checked there."""
    vocab = logits.shape[-1]
    rows = logits.detach().double().reshape(-1, vocab)
    got, got_conf = tokens.reshape(-1), conf.reshape(-1)
    want, want_conf = ref[0].reshape(-1), ref[1].reshape(-1)
    suppressed = torch.zeros(vocab, dtype=torch.bool)
    if kwargs["suppress_tokens"] is not None and len(kwargs["suppress_tokens"]):
        suppressed[torch.as_tensor(kwargs["suppress_tokens"]).long()] = True
    pos_inf_rows = (torch.isposinf(rows) & ~suppressed).any(dim=1)
    for r in pos_inf_rows.nonzero().reshape(-1).tolist():
        token = int(got[r])
        assert torch.isposinf(rows[r, token]) and not suppressed[token], f"row {r}: +inf logit not chosen"
        if kwargs["confidence"] == "logit":
            assert torch.isposinf(got_conf[r]), f"row {r}: logit confidence of a +inf token"
    finite = ~pos_inf_rows
    bad = ((got != want) & finite).nonzero().reshape(-1).tolist()
    assert not bad, describe_mismatch(logits, got, want, kwargs, bad)
    torch.testing.assert_close(got_conf[finite], want_conf[finite], rtol=CONF_RTOL, atol=CONF_ATOL,
                               msg=lambda m: f"confidence for {kwargs}: {m}")


# ===================================================================================== select_unmask
K_EXTREMES = (0, 1, -1, 2**31, 2**63, 2**64, -(2**64), np.int64(2), np.uint64(2**64 - 1), True, 2.0, "1")
THRESHOLD_EXTREMES = (0, -1, 2**2000, -(2**2000), math.inf, -math.inf, math.nan, np.float32(0.5), True, "0.5")
FACTOR_EXTREMES = (0, -1.0, 2**64, 2**2000, math.inf, math.nan, 1e-300, np.float64(1.0), True)
UNMASK_DEFECTS = {
    "confidence_int": TypeError, "candidates_uint8": TypeError, "shape_mismatch": ValueError,
    "confidence_1d": ValueError, "no_rule": ValueError, "two_rules": ValueError,
    "k_tensor_shape": ValueError, "k_tensor_float": TypeError, "confidence_list": TypeError,
}
K_TENSOR_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16, torch.uint32,
                   torch.uint64)


@st.composite
def unmask_cases(draw):
    rule = draw(st.sampled_from(["k", "k_tensor", "threshold", "factor"]))
    if rule == "k":
        value = draw(mostly(st.integers(0, 12), st.sampled_from(K_EXTREMES)))
    elif rule == "k_tensor":
        value = dict(dtype=draw(st.sampled_from(K_TENSOR_DTYPES)), zero_dim=draw(st.booleans()),
                     extreme=draw(st.sampled_from([None, -1, 2**31 - 1, 2**63 - 1, "max"])))
    elif rule == "threshold":
        value = draw(mostly(st.floats(-0.5, 1.5), st.sampled_from(THRESHOLD_EXTREMES)))
    else:
        value = draw(mostly(st.floats(0.0, 8.0, exclude_min=True), st.sampled_from(FACTOR_EXTREMES)))
    return dict(
        dtype=draw(st.sampled_from(LOGITS_DTYPES)), B=draw(st.sampled_from([2, 0, 1, 3, 5])),
        L=draw(st.sampled_from([7, 0, 1, 2, 33])), conf_layout=draw(st.sampled_from(
            ["contiguous", "transposed", "step", "expanded", "offset"])),
        cand_layout=draw(st.sampled_from(["contiguous", "transposed", "step", "expanded"])),
        values=draw(st.sampled_from(["uniform", "ties", "specials", "near_one"])),
        density=draw(st.sampled_from([0.5, 0.0, 1.0])), rule=rule, value=value,
        defect=draw(defects(*UNMASK_DEFECTS)), seed=draw(SEEDS))


def random_confidence(kind, shape, gen):
    conf = torch.rand(shape, generator=gen, dtype=torch.float64)
    if kind == "ties":
        conf = torch.randint(0, 5, shape, generator=gen, dtype=torch.float64) / 4
    elif kind == "near_one":
        conf = conf ** 0.05
    elif kind == "specials":
        pick = torch.rand(shape, generator=gen)
        conf = conf.masked_fill(pick < 0.1, math.nan).masked_fill((pick >= 0.1) & (pick < 0.2), -math.inf)
        conf = conf.masked_fill((pick >= 0.2) & (pick < 0.3), math.inf)
    return conf


def k_tensor(spec, B, gen):
    dtype = spec["dtype"]
    values = torch.randint(0, 9, (1,) if spec["zero_dim"] else (B,), generator=gen)
    info = torch.iinfo(dtype)
    extreme = spec["extreme"]
    if extreme is not None and values.numel():
        values[0] = min(info.max, 2**63 - 1) if extreme == "max" else min(max(extreme, info.min), info.max)
    if dtype == torch.uint64:  # torch has no uint64 from int64 beyond 2**63: build the bits
        tensor = values.to(torch.int64).view(torch.uint64)
        if extreme == "max" and values.numel():
            tensor = tensor.clone()
            tensor.view(torch.int64)[0] = -1  # 2**64 - 1
    else:
        tensor = values.to(dtype)
    return tensor.reshape(()) if spec["zero_dim"] else tensor


def k_tensor_is_negative(k):
    if k.dtype in (torch.uint8, torch.uint16, torch.uint32, torch.uint64):
        return False
    return bool((k.to(torch.int64) < 0).any())


@fuzz(2500)
@given(case=unmask_cases())
def test_select_unmask(case):
    c, defect = case, case["defect"]
    gen = generator(c["seed"])
    B, L = c["B"], c["L"]
    conf = with_layout(random_confidence(c["values"], (B, L), gen).to(c["dtype"]), c["conf_layout"])
    cand = with_layout(torch.rand(B, L, generator=gen) < c["density"], c["cand_layout"])
    problems = [(defect, UNMASK_DEFECTS[defect])] if defect else []
    rule = {}
    if c["rule"] == "k_tensor":
        rule["k"] = k_tensor(c["value"], B, gen)
        if k_tensor_is_negative(rule["k"]):
            problems.append(("k tensor with a negative value", ValueError))
    elif c["rule"] == "k":
        rule["k"] = c["value"]
        problem = int_arg_problem(c["value"], low=0)
        if problem:
            problems.append((f"k={describe_int(c['value'])}", problem))
    elif c["rule"] == "threshold":
        rule["threshold"] = c["value"]
        problem = float_arg_problem(c["value"])
        if problem:
            problems.append((f"threshold={c['value']!r}", problem))
    else:
        rule["factor"] = c["value"]
        problem = float_arg_problem(c["value"], low=0.0, low_open=True)
        if problem:
            problems.append((f"factor={c['value']!r}", problem))
    if defect == "confidence_int":
        conf = (conf.nan_to_num(0.0, posinf=1.0, neginf=-1.0) * 4).to(torch.int32)
    elif defect == "candidates_uint8":
        cand = cand.to(torch.uint8)
    elif defect == "shape_mismatch":
        cand = torch.ones(B, L + 1, dtype=torch.bool)
    elif defect == "confidence_1d":
        conf, cand = conf.reshape(-1), cand.reshape(-1)
    elif defect == "no_rule":
        rule = {}
    elif defect == "two_rules":
        rule = dict(rule, threshold=0.5) if "threshold" not in rule else dict(rule, k=1)
    elif defect == "k_tensor_shape":
        rule = {"k": torch.ones(B + 1, 2, dtype=torch.int64)}
        problems = [(defect, ValueError)]
    elif defect == "k_tensor_float":
        rule = {"k": torch.ones(B)}
        problems = [(defect, TypeError)]
    elif defect == "confidence_list":
        conf = conf.tolist()
    inputs = snapshot([conf, cand, rule.get("k")])
    result, error = call_op(lambda: dlmfuse.select_unmask(conf, cand, **rule), ("select_unmask:",))
    assert_untouched(inputs)
    if not check_outcome(error, problems):
        return
    assert result.dtype == torch.bool and result.shape == cand.shape
    reference_rule = {name: in_reference_terms(name, value) for name, value in rule.items()}
    assert torch.equal(result, check_select_unmask(conf, cand, **reference_rule)), "differs from the reference"


def in_reference_terms(name, value):
    """A select_unmask rule value as the reference takes it: Python ints, and ints beyond the float
    range as +-inf for threshold / factor (the op's documented saturation)."""
    if isinstance(value, torch.Tensor) or not isinstance(value, numbers.Integral):
        return value
    if name == "k" or abs(int(value)) < 2**1000:
        return int(value)
    return math.inf if value > 0 else -math.inf


# ========================================================================================== Mask
@st.composite
def family_cases(draw):
    return dict(
        family=draw(st.sampled_from(("causal", "block_causal", "block_diagonal", "prefix_lm", "bd3_train",
                                     "bidirectional"))),
        seq_len=draw(mostly(st.integers(1, 40), st.sampled_from(INT_EXTREMES + (np.int64(5), 2.0, True, "4")))),
        block_size=draw(mostly(st.integers(1, 9), st.sampled_from(INT_EXTREMES + (2**31 - 1, np.int32(3), 1.5)))),
        prefix_len=draw(mostly(st.none() | st.integers(0, 40), st.sampled_from(INT_EXTREMES + (np.int64(2),)))),
        k_len=draw(mostly(st.none() | st.integers(1, 40), st.sampled_from(INT_EXTREMES))),
        device=draw(st.sampled_from([None, "cpu", torch.device("cpu")])))


def family_expected(c):
    """The family's dense mask [Lq, Lk] from its definition (as tests/test_mask.py writes them)."""
    family, seq_len = c["family"], int(c["seq_len"])
    block = min(int(c["block_size"]), seq_len) if family in ("block_causal", "block_diagonal", "bd3_train") else 1
    prefix = 0 if c["prefix_len"] is None else int(c["prefix_len"])
    i, j = grid(seq_len)
    if family == "causal":
        return j <= i
    if family == "block_causal":
        blocks_done = (i - prefix).div(block, rounding_mode="floor") + 1
        block_end = (prefix + blocks_done * block).clamp(max=seq_len)
        block_end = torch.where(i < prefix, torch.full_like(i, prefix), block_end)
        return j < block_end
    if family == "block_diagonal":
        return i.div(block, rounding_mode="floor") == j.div(block, rounding_mode="floor")
    if family == "prefix_lm":
        return (j < prefix) | (j <= i)
    if family == "bd3_train":
        i, j = grid(2 * seq_len)
        q_noisy, k_noisy = i < seq_len, j < seq_len
        q_block = torch.where(q_noisy, i, i - seq_len).div(block, rounding_mode="floor")
        k_block = torch.where(k_noisy, j, j - seq_len).div(block, rounding_mode="floor")
        return ((q_noisy & k_noisy & (k_block == q_block)) | (q_noisy & ~k_noisy & (k_block < q_block))
                | (~q_noisy & ~k_noisy & (k_block <= q_block)))
    k_len = seq_len if c["k_len"] is None else int(c["k_len"])
    return torch.ones(seq_len, k_len, dtype=torch.bool)


def family_problems(c):
    family = c["family"]
    problems = []
    seq = c["seq_len"]
    as_int = None if isinstance(seq, (bool, float, str)) else int(seq)
    if as_int is None or as_int <= 0 or as_int > INT32_MAX:
        problems.append(("seq_len", ValueError))
    if family in ("block_causal", "block_diagonal", "bd3_train"):
        size = c["block_size"]
        if isinstance(size, (bool, float)) or int(size) <= 0:
            problems.append(("block_size", ValueError))
    if family in ("block_causal", "prefix_lm"):
        prefix = c["prefix_len"]
        if prefix is not None and (as_int is None or not 0 <= int(prefix) <= as_int):
            problems.append(("prefix_len", ValueError))
    if family == "bidirectional" and c["k_len"] is not None and not 0 < int(c["k_len"]) <= INT32_MAX:
        problems.append(("k_len", ValueError))
    return problems


def build_family(c):
    family, device = c["family"], c["device"]
    if family in ("causal",):
        return Mask.causal(c["seq_len"], device=device)
    if family == "block_causal":
        extra = {} if c["prefix_len"] is None else {"prefix_len": c["prefix_len"]}
        return Mask.block_causal(c["seq_len"], c["block_size"], device=device, **extra)
    if family == "block_diagonal":
        return Mask.block_diagonal(c["seq_len"], c["block_size"], device=device)
    if family == "prefix_lm":  # prefix_len is required here: None draws 0
        return Mask.prefix_lm(c["seq_len"], c["prefix_len"] or 0, device=device)
    if family == "bd3_train":
        return Mask.bd3_train(c["seq_len"], c["block_size"], device=device)
    return Mask.bidirectional(c["seq_len"], k_len=c["k_len"], device=device)


def assert_well_formed(mask):
    labels = (mask.q_order, mask.q_group, mask.k_order, mask.k_group)
    assert all(t.dtype == torch.int32 and t.dim() == 2 and t.shape[0] in (1, mask.batch) for t in labels)
    assert mask.q_group.shape[1] == mask.q_len and mask.k_group.shape[1] == mask.k_len


@fuzz(1500)
@given(case=family_cases())
def test_mask_families(case):
    problems = family_problems(case)
    result, error = call_op(lambda: build_family(case), ("Mask:",))
    if not check_outcome(error, problems):
        return
    assert_well_formed(result)
    expected = family_expected(case)
    dense = result.to_dense()
    assert dense.shape == (1, *expected.shape), (dense.shape, expected.shape)
    diff = (dense[0] != expected).nonzero()
    assert diff.numel() == 0, f"{case['family']}: differs from the family's definition at {diff[:5].tolist()}"


LABEL_DTYPES = (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8, torch.uint16, torch.uint32,
                torch.uint64, torch.float32, torch.bool)


@st.composite
def label_cases(draw):
    return dict(
        kind=draw(st.sampled_from(["raw", "gather", "eso", "clean_and_self"])),
        B=draw(st.sampled_from([1, 2, 3, 0])), Lq=draw(st.sampled_from([3, 1, 0, 7])),
        Lk=draw(st.sampled_from([4, 1, 0, 9])),
        dtypes=draw(st.tuples(*[st.sampled_from(LABEL_DTYPES[:8])] * 4)),
        wrong_dtype=draw(mostly(st.none(), st.sampled_from(LABEL_DTYPES))),
        layouts=draw(st.tuples(*[st.sampled_from(LABEL_LAYOUTS)] * 4)),
        per_batch=draw(st.tuples(*[st.booleans()] * 4)),
        values=draw(mostly(st.sampled_from(["small", "int32_extremes"]), st.just("beyond_int32"))),
        rank3=draw(st.booleans()) and draw(st.booleans()),
        index=dict(n=draw(st.integers(0, 5)), per_batch=draw(st.booleans()), one_d=draw(st.booleans()),
                   extreme=draw(st.none() | st.sampled_from([-1, "q_len", 2**31, 2**63 - 1, -(2**63), "uint64_max"])),
                   dtype=draw(st.sampled_from([torch.int64, torch.int32, torch.uint8, torch.uint64, torch.int16]))),
        variant=draw(st.sampled_from(["A", "B", "C"])),
        seed=draw(SEEDS))


def label_values(shape, kind, dtype, gen):
    """int64 values of `kind` that `dtype` can hold (wider values only where the dtype allows)."""
    pools = {"small": [0, 1, 2, 3], "int32_extremes": [INT32_MIN, -1, 0, 1, INT32_MAX],
             "beyond_int32": [0, 1, INT32_MAX, 2**31, -(2**31) - 1, 2**40, 2**63 - 1]}
    info = torch.iinfo(dtype) if dtype.is_floating_point is False and dtype != torch.bool else None
    pool = torch.tensor([v for v in pools[kind] if info is None or info.min <= v <= min(info.max, 2**63 - 1)] or [0])
    return pool[torch.randint(len(pool), tuple(shape), generator=gen)]


def as_dtype(values: torch.Tensor, dtype):
    """int64 values in `dtype` (uint64 through its bits, which torch cannot convert to directly)."""
    return values.view(torch.uint64) if dtype == torch.uint64 else values.to(dtype)


def expected_dense(q_order, q_group, k_order, k_group):
    """The visibility rule on the int64 values of the labels, broadcast over the batch."""
    earlier = k_order[:, None, :] < q_order[:, :, None]
    same = k_group[:, None, :] == q_group[:, :, None]
    return earlier | same


@fuzz(1500)
@given(case=label_cases())
def test_mask_labels(case):
    """Mask(...) from any integer labels, then gather_queries, and Mask.eso / Mask.clean_and_self:
    a well-formed Mask whose dense form is the visibility rule on the given values, or a named error."""
    c = case
    gen = generator(c["seed"])
    B, Lq, Lk = c["B"], c["Lq"], c["Lk"]
    problems, values, tensors = [], [], []
    for index, (length, dtype, layout, per_batch) in enumerate(
            zip((Lq, Lq, Lk, Lk), c["dtypes"], c["layouts"], c["per_batch"])):
        batch = B if per_batch else 1
        v = label_values((batch, length), c["values"], dtype, gen)  # int64 [batch, length]
        t = as_dtype(v, dtype)
        if layout == "one_d" and batch == 1:
            t = t[0]
        elif layout != "one_d":
            t = with_layout(t, layout)
            v = v[:1].expand(batch, length) if layout == "expanded" else v
        values.append(v)
        tensors.append(t)
        if v.numel() and ((v < INT32_MIN) | (v > INT32_MAX)).any():
            problems.append((f"label {index} beyond int32", ValueError))
    if c["wrong_dtype"] in (torch.float32, torch.bool):
        tensors[1] = tensors[1].to(c["wrong_dtype"])
        problems.append(("q_group of a non-integer dtype", TypeError))
    if c["rank3"]:
        tensors[3] = tensors[3][None] if tensors[3].dim() == 2 else tensors[3][None, None]
        problems.append(("3-d k_group", ValueError))
    problems += batch_problem("label batches", [v.shape[0] for v in values])

    mask, error = call_op(lambda: Mask(*tensors), ("Mask:",))
    if check_outcome(error, problems):
        assert_well_formed(mask)
        batch = mask.batch
        assert torch.equal(mask.to_dense(), expected_dense(*(v.expand(batch, -1) for v in values)))
        if c["kind"] == "gather":
            check_gather_queries(mask, values, c["index"], gen)
    if c["kind"] in ("eso", "clean_and_self"):
        check_eso_and_clean_and_self(c, tensors[0], values[0], gen)


def check_gather_queries(mask, values, spec, gen):
    """gather_queries(index) of random rows (extremes, every index dtype, 1-d, batch 1 or B)."""
    q_batch, Lq = max(values[0].shape[0], values[1].shape[0]), mask.q_len
    rows = mask.batch if spec["per_batch"] else 1
    index = torch.randint(max(Lq, 1), (rows, spec["n"]), generator=gen)
    if spec["extreme"] is not None and index.numel():
        index.view(-1)[0] = {"q_len": Lq, "uint64_max": -1}.get(spec["extreme"], spec["extreme"])
    dtype, info = spec["dtype"], torch.iinfo(spec["dtype"])
    if dtype != torch.uint64 and not ((index >= info.min) & (index <= info.max)).all():
        dtype = torch.int64  # values the drawn dtype cannot hold
    index_t = as_dtype(index, dtype)
    wanted = [i + 2**64 if dtype == torch.uint64 and i < 0 else i for i in index.reshape(-1).tolist()]
    if spec["one_d"] and rows == 1:
        index_t = index_t[0]
    checks = [("index out of [0, q_len)", ValueError)] if any(not 0 <= i < Lq for i in wanted) else []
    checks += batch_problem("index batch vs query label batch", [q_batch, rows])
    result, error = call_op(lambda: mask.gather_queries(index_t), ("gather_queries:",))
    if not check_outcome(error, checks):
        return
    assert_well_formed(result)
    batch = max(q_batch, rows)
    rows_index = torch.tensor(wanted, dtype=torch.int64).reshape(rows, spec["n"]).expand(batch, -1)
    q_order, q_group = (v.expand(batch, -1).gather(1, rows_index) for v in values[:2])
    full = max(batch, values[2].shape[0], values[3].shape[0])
    expected = expected_dense(q_order.expand(full, -1), q_group.expand(full, -1),
                              values[2].expand(full, -1), values[3].expand(full, -1))
    assert torch.equal(result.to_dense(), expected), "gather_queries rows differ from the rule on those rows"


def check_eso_and_clean_and_self(c, rank_t, rank, gen):
    """Mask.eso(order_rank, is_clean, variant) against the labels its docstring gives, and
    Mask.clean_and_self(is_clean) against its definition."""
    Lq = rank.shape[1]
    layout = c["layouts"][1] if c["layouts"][1] != "one_d" else "contiguous"
    is_clean = with_layout(torch.rand(c["B"] if c["per_batch"][1] else 1, Lq, generator=gen) < 0.5, layout)
    if c["kind"] == "clean_and_self":
        result, error = call_op(lambda: Mask.clean_and_self(is_clean), ("Mask",))
        check_outcome(error, [])
        i, j = grid(Lq)
        assert torch.equal(result.to_dense(), is_clean[:, None, :] | (i == j)), "clean_and_self: definition"
        return
    checks = [("variant", ValueError)] if c["variant"] == "C" else []
    if rank_t.dtype.is_floating_point or rank_t.dtype == torch.bool or rank_t.dim() not in (1, 2):
        checks.append(("order_rank", TypeError if rank_t.dim() in (1, 2) else ValueError))
    if rank.numel() and ((rank < INT32_MIN) | (rank > INT32_MAX)).any():
        checks.append(("order_rank beyond int32", ValueError))
    checks += batch_problem("order_rank vs is_clean batch", [rank.shape[0], is_clean.shape[0]])
    result, error = call_op(lambda: Mask.eso(rank_t, is_clean, c["variant"]), ("Mask.eso:", "Mask:"))
    if not check_outcome(error, checks):
        return
    assert_well_formed(result)
    batch = max(rank.shape[0], is_clean.shape[0])
    r, clean = rank.expand(batch, -1), is_clean.expand(batch, -1)
    group = r.clone() if c["variant"] == "B" else torch.where(clean, torch.zeros_like(r), -1 - r)
    assert torch.equal(result.to_dense(), expected_dense(r, group, r, group)), "eso: labels of its docstring"


# ========================================================================================= KVCache
CONSTRUCTOR_EXTREMES = INT_EXTREMES + (True, 2.0, np.int64(2))


@st.composite
def kv_cache_cases(draw):
    config = dict(
        num_layers=draw(st.integers(1, 3)), batch=draw(st.integers(1, 3)), max_len=draw(st.sampled_from([8, 1, 5, 17])),
        num_kv_heads=draw(st.integers(1, 3)), head_dim=draw(st.sampled_from([8, 1, 64])),
        dtype=draw(st.sampled_from(FLOAT_DTYPES)))
    bad = draw(mostly(st.none(), st.sampled_from(["num_layers", "batch", "max_len", "num_kv_heads", "head_dim",
                                                  "dtype"])))
    if bad == "dtype":
        config["dtype"] = draw(st.sampled_from([torch.int32, torch.float64, "float32"]))
    elif bad is not None:
        config[bad] = draw(st.sampled_from(CONSTRUCTOR_EXTREMES + ((257,) if bad == "head_dim" else ())))
    step = st.fixed_dictionaries(dict(
        op=st.sampled_from(["write", "write", "attend", "view", "reset"]),
        layer=mostly(st.integers(0, 2), st.sampled_from([-1, 3, 2**63, True])),
        n=st.integers(0, 6), positions=st.sampled_from(POSITION_KINDS),
        pos_dtype=st.sampled_from([torch.int64, torch.int32]),
        validate=st.booleans(), update_lengths=st.booleans(),
        order=mostly(st.sampled_from([None, "tensor", "row", "scalar"]),
                     st.sampled_from(["beyond_int32", "float", "python_huge", "string", "uint32"])),
        group=st.sampled_from([None, "tensor", "row", "scalar"]),
        Lq=st.integers(0, 5), heads_ratio=st.sampled_from([1, 2]), scale=st.none() | st.floats(-1, 1),
        return_lse=st.booleans(), seed=SEEDS))
    return dict(config=config, steps=draw(st.lists(step, min_size=1, max_size=4)), seed=draw(SEEDS))


class CacheModel:
    """What a KVCache must hold after each call: K/V through dlmfuse.reference.kv_scatter_, labels
    with the last row of a repeated position winning, lengths one past the largest in-range write."""

    def __init__(self, cache: KVCache):
        self.k, self.v = cache.k.clone(), cache.v.clone()
        B, Lmax = cache.batch, cache.max_len
        self.order = torch.full((B, Lmax), ORDER_INFINITY, dtype=torch.int32)
        self.group = torch.full((B, Lmax), UNWRITTEN_GROUP, dtype=torch.int32)
        self.lengths = torch.zeros(B, dtype=torch.int32)

    def write(self, layer, positions, k, v, labels, update_lengths):
        dlmfuse.reference.kv_scatter_(self.k[layer], self.v[layer], k, v, positions, validate=False)
        pos = positions.to(torch.int64)
        for b in range(pos.shape[0]):
            for i in range(pos.shape[1]):
                p = int(pos[b, i])
                if 0 <= p < self.order.shape[1]:
                    for store, values in labels:
                        store[b, p] = int(values[b, i])  # later rows overwrite earlier ones
                    if update_lengths:
                        self.lengths[b] = max(int(self.lengths[b]), p + 1)

    def reset(self):
        self.order.fill_(ORDER_INFINITY)
        self.group.fill_(UNWRITTEN_GROUP)
        self.lengths.zero_()

    def assert_equals(self, cache):
        assert_bits_equal(cache.k, self.k, "KVCache.k")
        assert_bits_equal(cache.v, self.v, "KVCache.v")
        assert torch.equal(cache.k_order, self.order) and torch.equal(cache.k_group, self.group), "KVCache labels"
        assert torch.equal(cache.lengths, self.lengths), f"lengths {cache.lengths.tolist()} != {self.lengths.tolist()}"


def write_labels(kind, B, n, gen):
    """(argument, int64 [B, n] values or None, problem) for one of write()'s order/group kinds."""
    if kind is None:
        return None, None, None
    values = torch.randint(-2, 4, (B, n), generator=gen)
    if kind == "tensor":
        return values.to(torch.int32), values, None
    if kind == "row":
        return values[:1].to(torch.int64), values[:1].expand(B, n), None
    if kind == "scalar":
        return 2, torch.full((B, n), 2), None
    if kind == "beyond_int32":
        values[..., :1] = 2**31
        return values, values, (ValueError if n else None)
    if kind == "float":
        return values.float(), None, TypeError
    if kind == "python_huge":
        return 2**63, None, ValueError
    if kind == "string":
        return "0", None, TypeError
    return values.clamp(min=0).to(torch.uint32), values.clamp(min=0), EITHER  # uint32: accept or refuse


@fuzz(600)
@given(case=kv_cache_cases())
def test_kv_cache(case):
    config = case["config"]
    problems = []
    for name in ("num_layers", "batch", "max_len", "num_kv_heads", "head_dim"):
        value = config[name]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= INT32_MAX:
            problems.append((name, EITHER if isinstance(value, np.integer) and value > 0 else ValueError))
    if config["head_dim"] == 257:
        problems.append(("head_dim", ValueError))
    if config["dtype"] not in FLOAT_DTYPES:
        problems.append(("dtype", TypeError))
    cache, error = call_op(lambda: KVCache(device="cpu", **config), ("KVCache:",))
    if not check_outcome(error, problems):
        return
    model = CacheModel(cache)
    model.assert_equals(cache)
    B, Lmax, H, D = cache.batch, cache.max_len, config["num_kv_heads"], config["head_dim"]
    for step in case["steps"]:
        gen = generator(step["seed"])
        layer = step["layer"]
        layer_ok = not isinstance(layer, bool) and isinstance(layer, int) and 0 <= layer < cache.num_layers
        checks = [] if layer_ok else [(f"layer={layer!r}", ValueError)]
        if step["op"] == "write":
            n = step["n"]
            positions = random_positions(step["positions"], B, n, Lmax, gen).to(step["pos_dtype"])
            k, v = (randn((B, n, H, D), gen, cache.k.dtype) for _ in range(2))
            order, order_values, order_problem = write_labels(step["order"], B, n, gen)
            group, group_values, group_problem = write_labels(step["group"], B, n, gen)
            checks += [(f"order {step['order']}", order_problem)] if order_problem else []
            checks += [(f"group {step['group']}", group_problem)] if group_problem else []
            if step["validate"] and not positions_are_valid(positions, Lmax):
                checks.append(("validate=True with positions out of range or repeated", ValueError))
            _, error = call_op(lambda: cache.write(layer, positions, k, v, order, group, validate=step["validate"],
                                                   update_lengths=step["update_lengths"]),
                               ("KVCache.write:", "kv_scatter_:"))
            if check_outcome(error, checks):
                labels = [(store, values) for store, values in
                          ((model.order, order_values), (model.group, group_values)) if values is not None]
                model.write(layer, positions, k, v, labels, step["update_lengths"])
            model.assert_equals(cache)  # refused calls change nothing
        elif step["op"] == "reset":
            cache.reset()
            model.reset()
            model.assert_equals(cache)
        elif step["op"] == "view":
            view, error = call_op(lambda: cache.view(layer), ("KVCache.view:",))
            if check_outcome(error, checks):
                assert view.k.data_ptr() == cache.k[layer].data_ptr() and view.v.data_ptr() == cache.v[layer].data_ptr()
                assert_bits_equal(view.k, model.k[layer], "view.k")
                assert_bits_equal(view.v, model.v[layer], "view.v")
                assert torch.equal(view.k_order, model.order) and torch.equal(view.k_group, model.group)
                assert torch.equal(view.kv_lens, model.lengths)
        else:
            Lq = step["Lq"]
            q = randn((B, Lq, H * step["heads_ratio"], D), gen, cache.k.dtype)
            q_order, q_group = (torch.randint(-2, 5, (B, Lq), generator=gen, dtype=torch.int32) for _ in range(2))
            kwargs = {"return_lse": step["return_lse"]}
            if step["scale"] is not None:
                kwargs["scale"] = step["scale"] / math.sqrt(D)
            result, error = call_op(lambda: cache.attend(layer, q, q_order, q_group, **kwargs),
                                    ("KVCache.attend:", "attention:"))
            if not check_outcome(error, checks):
                continue
            out, lse = result if step["return_lse"] else (result, None)
            check_attention(out, q, model.k[layer], model.v[layer], lse=lse,
                            mask=Mask(q_order, q_group, model.order, model.group), kv_lens=model.lengths,
                            scale=kwargs.get("scale"))
            model.assert_equals(cache)
