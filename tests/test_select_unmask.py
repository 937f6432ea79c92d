"""dlmfuse.select_unmask against dlmfuse.reference.select_unmask (a Python loop with sorted()).

Random rows with ties, NaN, +-inf and rows without candidates, for every rule (k as an int and as a
per-row tensor, threshold, factor) and every float dtype; the selection invariants; the factor
rule's boundaries computed by hand; bad inputs (exception type and message); meta tensors (no
data-dependent shape); torch.compile(fullgraph=True); CUDA-graph capture + replay (marked cuda).
"""

import math
from unittest import mock

import pytest
import torch

import dlmfuse
from dlmfuse.unmask import select_unmask

NAN, INF = math.nan, math.inf
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
SHAPES = ((1, 1), (3, 7), (5, 97), (2, 130))
THRESHOLDS = (0.5, 0.9, 0.0, -INF, INF)
FACTORS = (0.25, 1.0, 2.0, 4.0)


def random_case(batch, length, dtype=torch.float32, seed=0, device="cpu"):
    """confidence [B, L] with ties, NaN, -inf, +inf and skewed-to-1 rows; candidates [B, L] with
    rows of every density (none, some, all)."""
    g = torch.Generator().manual_seed(seed)
    conf = torch.rand(batch, length, generator=g, dtype=torch.float64)
    kind = torch.randint(0, 3, (batch, 1), generator=g)
    levels = torch.randint(0, 5, (batch, length), generator=g, dtype=torch.float64) / 4  # ties, 0.5 too
    conf = torch.where(kind == 1, levels, conf)
    conf = torch.where(kind == 2, conf ** 0.1, conf)  # near 1: the factor rule takes long prefixes
    special = torch.rand(batch, length, generator=g)
    conf[special < 0.06] = NAN
    conf[(special >= 0.06) & (special < 0.09)] = -INF
    conf[(special >= 0.09) & (special < 0.11)] = INF
    density = torch.tensor([0.0, 0.3, 0.8, 1.0])[torch.randint(0, 4, (batch, 1), generator=g)]
    cand = torch.rand(batch, length, generator=g) < density
    return conf.to(device=device, dtype=dtype), cand.to(device)


def check_invariants(selected, conf, cand):
    assert selected.dtype == torch.bool and selected.shape == cand.shape and selected.device == cand.device
    assert not (selected & ~cand).any(), "selected a position that is not a candidate"


def check_against_reference(conf, cand, **rule):
    got = select_unmask(conf, cand, **rule)
    expected = dlmfuse.reference.select_unmask(conf, cand, **rule)
    check_invariants(got, conf, cand)
    diff = (got != expected).nonzero()
    assert diff.numel() == 0, f"{rule}: differs from the reference at {diff[:5].tolist()}"
    return got


# ------------------------------------------------------------------------------ vs the reference
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(dtype, shape):
    conf, cand = random_case(*shape, dtype=dtype, seed=shape[1])
    n_cand = cand.sum(dim=1)
    for k in (0, 1, 3, shape[1], shape[1] + 5):
        got = check_against_reference(conf, cand, k=k)
        assert torch.equal(got.sum(dim=1), n_cand.clamp(max=k)), "count must be min(k, candidates)"
    for threshold in THRESHOLDS:
        got = check_against_reference(conf, cand, threshold=threshold)
        assert torch.equal(got.sum(dim=1) >= 1, n_cand >= 1), "threshold must select >= 1 when a candidate exists"
    for factor in FACTORS:
        got = check_against_reference(conf, cand, factor=factor)
        assert torch.equal(got.sum(dim=1) >= 1, n_cand >= 1), "factor must select >= 1 when a candidate exists"


@pytest.mark.parametrize("k_dtype", (torch.int32, torch.int64), ids=str)
def test_k_tensor_per_row(k_dtype):
    conf, cand = random_case(6, 33, seed=3)
    k = torch.tensor([0, 1, 5, 33, 100, 2], dtype=k_dtype)
    got = check_against_reference(conf, cand, k=k)
    assert torch.equal(got.sum(dim=1), torch.minimum(cand.sum(dim=1), k.long()))
    # A 0-dim tensor applies to every row, like an int.
    assert torch.equal(select_unmask(conf, cand, k=torch.tensor(4)), select_unmask(conf, cand, k=4))


def test_ties_go_to_the_lower_index():
    conf = torch.tensor([[0.5, 0.7, 0.5, 0.7, 0.5, -0.0, 0.0]])
    cand = torch.ones_like(conf, dtype=torch.bool)
    assert select_unmask(conf, cand, k=3).tolist() == [[True, True, False, True, False, False, False]]
    assert select_unmask(conf, cand, k=6).tolist() == [[True, True, True, True, True, True, False]]


def test_non_candidates_never_compete():
    conf = torch.tensor([[0.99, 0.1, 0.98, 0.2, NAN]])
    cand = torch.tensor([[False, True, False, True, True]])
    assert select_unmask(conf, cand, k=1).tolist() == [[False, False, False, True, False]]
    assert select_unmask(conf, cand, threshold=0.95).tolist() == [[False, False, False, True, False]]
    assert select_unmask(conf, cand, factor=0.1).tolist() == [[False, False, False, True, False]]


def test_nan_ranks_as_minus_inf():
    conf = torch.tensor([[NAN, -INF, 0.1, NAN], [NAN, NAN, NAN, NAN], [-INF, NAN, -INF, NAN]])
    cand = torch.ones_like(conf, dtype=torch.bool)
    # Real values first; NaN and -inf tie and go by position.
    assert select_unmask(conf, cand, k=2).tolist()[0] == [True, False, True, False]
    assert select_unmask(conf, cand, k=3).tolist()[0] == [True, True, True, False]
    # NaN never passes a threshold or a factor test, but a row of NaN still yields its first one.
    for rule in ({"threshold": -INF}, {"threshold": 0.0}, {"factor": 10.0}):
        got = select_unmask(conf, cand, **rule)
        assert got.tolist()[1:] == [[True, False, False, False], [True, False, False, False]], rule
        check_against_reference(conf, cand, **rule)


def test_rows_without_candidates_select_nothing():
    conf, _ = random_case(3, 10, seed=1)
    cand = torch.zeros(3, 10, dtype=torch.bool)
    for rule in ({"k": 4}, {"k": torch.tensor([1, 2, 3])}, {"threshold": -INF}, {"factor": 100.0}):
        assert not select_unmask(conf, cand, **rule).any(), rule


def test_threshold_is_strict():
    conf = torch.tensor([[0.5, 0.75, 0.5, 0.25]])
    cand = torch.ones_like(conf, dtype=torch.bool)
    assert select_unmask(conf, cand, threshold=0.5).tolist() == [[False, True, False, False]]
    assert select_unmask(conf, cand, threshold=0.25).tolist() == [[True, True, True, False]]
    assert select_unmask(conf, cand, threshold=0.9).tolist() == [[False, True, False, False]]


def test_threshold_compares_exactly_in_float64():
    # float32(0.1) is slightly above 0.1, so it passes threshold=0.1 (a float32 comparison would
    # round the threshold to the same float32 and reject it); the float32 below it does not pass.
    f32_tenth = torch.tensor(0.1, dtype=torch.float32)
    below = torch.nextafter(f32_tenth, torch.tensor(0.0))
    assert float(f32_tenth) > 0.1 > float(below)
    conf = torch.stack([torch.tensor(0.9), f32_tenth, below])[None]
    cand = torch.ones_like(conf, dtype=torch.bool)
    assert select_unmask(conf, cand, threshold=0.1).tolist() == [[True, True, False]]


def test_factor_rule_by_hand():
    # factor 2: thresholds 1 - 2/(m+1) are m=2: 1/3, m=3: 0.5, m=4: 0.6, m=5: 2/3.
    # factor 1: m=2: 2/3, m=3: 0.75, m=4: 0.8.
    conf = torch.tensor([
        [0.5, 0.9, 0.5, 0.8, 0.55, 1.0],   # (1.0 not a candidate) sorted 0.9 .8 .55 .5 .5
        [0.3, 0.2, 0.0, 0.0, 0.0, 0.0],    # c(2) = 0.2 < 1/3: only the best
        [0.75, 0.75, 0.75, 0.75, 0.0, 0.0],
        [0.9, 0.7, 0.7, 0.7, 0.7, 0.7],
    ])
    cand = torch.tensor([
        [True, True, True, True, True, False],
        [True, True, False, False, False, False],
        [True, True, True, True, False, False],
        [False, True, True, True, True, True],
    ])
    got = select_unmask(conf, cand, factor=2.0)
    # row 0: m=3 c=0.55 >= 0.5, m=4 c=0.5 < 0.6 -> n=3 (0.9, 0.8, 0.55).
    # row 2: all 0.75 >= 0.6 (m=4) -> n=4. row 3: 0.7 >= 2/3 at m=5 -> all five.
    assert got.int().tolist() == [
        [0, 1, 0, 1, 1, 0],
        [1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [0, 1, 1, 1, 1, 1],
    ]
    got = select_unmask(conf, cand, factor=1.0)
    # row 0: m=2 0.8 >= 2/3, m=3 0.55 < 0.75 -> n=2. row 2: m=3 0.75 >= 0.75 (equal passes),
    # m=4 0.75 < 0.8 -> n=3, ties by position. row 3: m=2 0.7 >= 2/3, m=3 0.7 < 0.75 -> n=2.
    assert got.int().tolist() == [
        [0, 1, 0, 1, 0, 0],
        [1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 1, 1, 0, 0, 0],
    ]
    check_against_reference(conf, cand, factor=2.0)
    check_against_reference(conf, cand, factor=1.0)


def test_factor_boundary_is_exact():
    # factor 2, m=3: threshold exactly 0.5; the float32 just below 0.5 fails.
    just_below = float(torch.nextafter(torch.tensor(0.5), torch.tensor(0.0)))
    conf = torch.tensor([[1.0, 0.9, 0.5], [1.0, 0.9, just_below]])
    cand = torch.ones_like(conf, dtype=torch.bool)
    assert select_unmask(conf, cand, factor=2.0).int().tolist() == [[1, 1, 1], [1, 1, 0]]


def test_strided_inputs_and_grad():
    conf, cand = random_case(40, 6, seed=7)
    conf_t, cand_t = conf.t(), cand.t()  # [6, 40], non-contiguous
    for rule in ({"k": 5}, {"threshold": 0.5}, {"factor": 1.0}):
        check_against_reference(conf_t, cand_t, **rule)
    leaf = torch.rand(2, 9, requires_grad=True)
    out = select_unmask(leaf, torch.ones(2, 9, dtype=torch.bool), k=3)
    assert out.dtype == torch.bool and not out.requires_grad


def test_empty_shapes():
    for shape in ((0, 5), (3, 0)):
        conf, cand = torch.rand(shape), torch.ones(shape, dtype=torch.bool)
        for rule in ({"k": 2}, {"k": torch.full((shape[0],), 2)}, {"threshold": 0.5}, {"factor": 1.0}):
            out = select_unmask(conf, cand, **rule)
            assert out.shape == shape and out.dtype == torch.bool


def test_meta_tensors_have_no_data_dependent_shapes():
    conf, cand = torch.empty(4, 17, device="meta"), torch.empty(4, 17, dtype=torch.bool, device="meta")
    k = torch.empty(4, dtype=torch.int64, device="meta")
    for rule in ({"k": 3}, {"k": k}, {"threshold": 0.5}, {"factor": 1.0}):
        out = select_unmask(conf, cand, **rule)
        assert out.device.type == "meta" and out.shape == (4, 17) and out.dtype == torch.bool


# ------------------------------------------------------------------------------------ bad inputs
CONF = torch.rand(2, 5)
CAND = torch.ones(2, 5, dtype=torch.bool)

BAD_INPUTS = [
    # (args, kwargs, exception, words the message must contain)
    ((CONF.tolist(), CAND), {"k": 1}, TypeError, ["confidence", "list"]),
    ((CONF, CAND.tolist()), {"k": 1}, TypeError, ["candidates", "list"]),
    ((CONF.long(), CAND), {"k": 1}, TypeError, ["confidence", "torch.int64"]),
    ((CONF, CAND.int()), {"k": 1}, TypeError, ["candidates", "torch.int32"]),
    ((CONF, CAND.to("meta")), {"k": 1}, TypeError, ["candidates", "meta", "cpu"]),
    ((CONF[0], CAND[0]), {"k": 1}, ValueError, ["confidence", "[B, L]", "[5]"]),
    ((CONF, CAND[:, :4]), {"k": 1}, ValueError, ["candidates", "[2, 5]", "[2, 4]"]),
    ((CONF, CAND), {}, ValueError, ["exactly one", "k=None", "threshold=None", "factor=None"]),
    ((CONF, CAND), {"k": 2, "threshold": 0.9}, ValueError, ["exactly one", "k=2", "threshold=0.9"]),
    ((CONF, CAND), {"threshold": 0.9, "factor": 1.0}, ValueError, ["threshold=0.9", "factor=1.0"]),
    ((CONF, CAND), {"k": -1}, ValueError, ["k", "-1"]),
    ((CONF, CAND), {"k": 1.5}, TypeError, ["k", "float", "1.5"]),
    ((CONF, CAND), {"k": True}, TypeError, ["k", "bool"]),
    ((CONF, CAND), {"k": torch.tensor([1.0, 2.0])}, TypeError, ["k", "torch.float32"]),
    ((CONF, CAND), {"k": torch.tensor([1, 2, 3])}, ValueError, ["k", "B=2", "[3]"]),
    ((CONF, CAND), {"k": torch.tensor([[1, 2]])}, ValueError, ["k", "[1, 2]"]),
    ((CONF, CAND), {"k": torch.tensor([1, -2])}, ValueError, ["k", ">= 0", "-2"]),
    ((CONF, CAND), {"k": torch.tensor([1, 2], device="meta")}, TypeError, ["k", "meta", "cpu"]),
    ((CONF, CAND), {"threshold": "0.5"}, TypeError, ["threshold", "str", "0.5"]),
    ((CONF, CAND), {"threshold": NAN}, ValueError, ["threshold", "nan"]),
    ((CONF, CAND), {"factor": 0.0}, ValueError, ["factor", "> 0", "0.0"]),
    ((CONF, CAND), {"factor": -1}, ValueError, ["factor", "-1"]),
    ((CONF, CAND), {"factor": NAN}, ValueError, ["factor", "nan"]),
    ((CONF, CAND), {"factor": torch.tensor(1.0)}, TypeError, ["factor", "Tensor"]),
]


@pytest.mark.parametrize("args, kwargs, exc, words", BAD_INPUTS, ids=[str(i) for i in range(len(BAD_INPUTS))])
def test_bad_inputs(args, kwargs, exc, words):
    with pytest.raises(exc) as info:
        select_unmask(*args, **kwargs)
    message = str(info.value)
    assert message.startswith("select_unmask:"), message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


# ------------------------------------------------------------------------- compile / CUDA graphs
@pytest.mark.slow
def test_torch_compile_fullgraph():
    conf, cand = random_case(4, 23, seed=11)
    k_rows = torch.tensor([0, 2, 5, 30])

    @torch.compile(fullgraph=True, backend="eager")
    def step(conf, cand, k_rows):
        return (select_unmask(conf, cand, k=k_rows), select_unmask(conf, cand, k=3),
                select_unmask(conf, cand, threshold=0.5), select_unmask(conf, cand, factor=1.0))

    got = step(conf, cand, k_rows)
    for out, rule in zip(got, ({"k": k_rows}, {"k": 3}, {"threshold": 0.5}, {"factor": 1.0})):
        assert torch.equal(out, dlmfuse.reference.select_unmask(conf, cand, **rule)), rule


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_cuda_matches_reference_without_sync(dtype):
    conf, cand = random_case(8, 130, dtype=dtype, seed=5, device="cuda")
    k_rows = torch.randint(0, 140, (8,), device="cuda")
    rules = ({"k": 7}, {"k": k_rows}, {"threshold": 0.5}, {"factor": 1.0})
    outs = []
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        # A k tensor's ">= 0" check reads it on the host; skip it as a capture does.
        with mock.patch("dlmfuse.unmask.can_read_values", return_value=False):
            outs = [select_unmask(conf, cand, **rule) for rule in rules]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for out, rule in zip(outs, rules):
        expected = dlmfuse.reference.select_unmask(conf, cand, **rule)
        assert out.is_cuda and torch.equal(out, expected), rule


@pytest.mark.cuda
def test_cuda_graph_capture_and_replay():
    batch, length = 4, 64
    conf, cand = random_case(batch, length, seed=21, device="cuda")
    k_rows = torch.tensor([0, 3, 10, 64], device="cuda")
    rules = ({"k": 5}, {"k": k_rows}, {"threshold": 0.5}, {"factor": 1.0})
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the capture
        for rule in rules:
            select_unmask(conf, cand, **rule)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [select_unmask(conf, cand, **rule) for rule in rules]
    for seed in (22, 23):
        new_conf, new_cand = random_case(batch, length, seed=seed, device="cuda")
        conf.copy_(new_conf)
        cand.copy_(new_cand)
        k_rows.copy_(torch.tensor([seed % 5, 1, 64, 2], device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        for out, rule in zip(outs, rules):
            assert torch.equal(out, dlmfuse.reference.select_unmask(conf, cand, **rule)), (seed, rule)


def test_numpy_scalars_are_accepted_as_numbers():
    np = pytest.importorskip("numpy")
    confidence = torch.rand(2, 6, generator=torch.Generator().manual_seed(0))
    candidates = torch.ones(2, 6, dtype=torch.bool)
    for k in (np.int64(2), np.int32(2)):
        assert torch.equal(select_unmask(confidence, candidates, k=k), select_unmask(confidence, candidates, k=2))
    assert torch.equal(select_unmask(confidence, candidates, threshold=np.float32(0.5)),
                       select_unmask(confidence, candidates, threshold=float(np.float32(0.5))))
    with pytest.raises(TypeError, match="k must be an int"):
        select_unmask(confidence, candidates, k=np.bool_(True))
