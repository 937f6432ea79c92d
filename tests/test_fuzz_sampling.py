"""Property-based fuzzing of sample_tokens and select_unmask with hypothesis: the property, the budget and
its environment variables are described in fuzz_support.py."""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from hypothesis import given, strategies as st

import dlmfuse
from dlmfuse.reference.sampling import kept_tokens

from test_sampling import CONF_ATOL, CONF_RTOL, describe_mismatch
from test_select_unmask import check_against_reference as check_select_unmask
from fuzz_support import (fuzz, FLOAT64_MAX, FLOAT_DTYPES, INT_EXTREMES, call_op, check_outcome, snapshot,
                          assert_untouched, generator, randn, with_layout, SEEDS, mostly, defects, describe_int,
                          float_arg_problem, int_arg_problem, without)


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
