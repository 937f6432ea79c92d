"""Property-based fuzzing of the Mask constructors and labels with hypothesis: the property, the budget and
its environment variables are described in fuzz_support.py."""

from __future__ import annotations


import numpy as np
import torch
from hypothesis import given, strategies as st

from dlmfuse import Mask

from test_mask import grid
from fuzz_support import (LABEL_LAYOUTS, fuzz, INT32_MIN, INT32_MAX, INT_EXTREMES, call_op, check_outcome, generator,
                          with_layout, SEEDS, mostly, batch_problem)


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
