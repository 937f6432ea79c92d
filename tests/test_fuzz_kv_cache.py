"""Property-based fuzzing of kv_scatter_ and KVCache with hypothesis: the property, the budget and
its environment variables are described in fuzz_support.py."""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given, strategies as st

import dlmfuse
from dlmfuse import ORDER_INFINITY, KVCache, Mask
from dlmfuse.kv_cache import UNWRITTEN_GROUP

from conftest import check_attention
from test_kv_cache import assert_bits_equal
from fuzz_support import (fuzz, EITHER, INT32_MIN, INT32_MAX, FLOAT_DTYPES, INT_EXTREMES, call_op, check_outcome,
                          snapshot, assert_untouched, generator, randn, strided, with_layout, SEEDS, mostly, defects,
                          without)


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
