"""Shared machinery of the property-based fuzz tests (tests/test_fuzz_*.py; issue 13, item 6).

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

import torch
from hypothesis import HealthCheck, event, note, seed, settings
from hypothesis import strategies as st


from test_kv_cache import assert_bits_equal

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
# How label tensors are laid out in memory (the attention and Mask fuzzers).
LABEL_LAYOUTS = ("contiguous", "transposed", "step", "expanded", "one_d")


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
