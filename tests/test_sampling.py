"""dlmfuse.sample_tokens against the float64 reference (dlmfuse.reference.sample_tokens).

- Philox4x32-10 known answers (Random123's kat_vectors) and the reference's own statistics
  (Gumbel-max frequencies == softmax(l / T), chi-square).
- Kernel tokens IDENTICAL to the reference fed the same seed / offset, for every logits dtype, odd
  vocabularies, [N, V] and [B, L, V], temperatures, top_k / top_p / both / suppress_tokens, every
  confidence kind (confidence within rtol 1e-4), tempered_confidence; rows with big spreads, -inf
  and NaN entries. No mismatch is tolerated: with continuous random logits the float64 reference has
  no near-ties, and ties in the logits themselves have a defined answer (first index; ties at a
  top-k / top-p boundary are kept).
- Determinism, chi-square on the kernel, filtered / suppressed tokens never emitted, greedy ==
  argmax, the Gumbel tail (rare tokens at the right rate; a gap > 17 only float64-accurate noise
  can cross), extreme magnitudes and temperatures (no NaN), bad inputs, opcheck, torch.compile
  (suppress_tokens included), and (marked cuda) CPU == CUDA, seed/offset tensors, graph capture.
"""

from __future__ import annotations

import math

import pytest
import torch

import dlmfuse
from dlmfuse.reference.sampling import gumbel_uniforms, kept_tokens

ref_sample = dlmfuse.reference.sample_tokens
philox = dlmfuse.reference.philox4x32_10

INF, NAN = math.inf, math.nan
LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
TEMPERATURES = (0.0, 0.5, 1.0, 2.0)
CONFIDENCE_KINDS = ("prob", "margin", "neg_entropy", "logit")
CONF_RTOL = 1e-4
CONF_ATOL = 1e-6  # absolute floor: margin (a difference of probabilities) and neg_entropy near 0

# Upper 1e-4 quantiles of the chi-square distribution, chi2.isf(1e-4, dof), computed from the
# regularized incomplete gamma function (they equal scipy.stats.chi2.isf(1e-4, dof) to 3 decimals).
CHI2_CRITICAL_1E4 = {1: 15.137, 2: 18.421, 3: 21.108, 4: 23.513, 5: 25.745, 6: 27.856, 7: 29.878}


def chi2_critical(dof: int) -> float:
    try:
        from scipy.stats import chi2
    except ImportError:
        return CHI2_CRITICAL_1E4[dof]
    return float(chi2.isf(1e-4, dof))


def chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic of the token counts against probs (float64 [V]); returns (stat, dof).

    Tokens with probability 0 must never appear; they do not count as categories."""
    counts = torch.bincount(tokens.reshape(-1).cpu(), minlength=probs.numel()).double()
    support = probs > 0
    assert counts[~support].sum() == 0, f"sampled a token of probability 0: counts {counts.tolist()}"
    expected = probs[support] * counts.sum()
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    return stat, int(support.sum()) - 1


def poisson_band(lam: float, alpha: float = 1e-4) -> tuple[int, int]:
    """[lo, hi] with P(X < lo) <= alpha / 2 and P(X > hi) <= alpha / 2 for X ~ Poisson(lam)."""
    pmf = [math.exp(-lam)]
    for n in range(1, int(lam * 10 + 50)):
        pmf.append(pmf[-1] * lam / n)
    cdf, lo = 0.0, 0
    while cdf + pmf[lo] <= alpha / 2:
        cdf += pmf[lo]
        lo += 1
    tail, hi = 0.0, len(pmf) - 1
    while tail + pmf[hi] <= alpha / 2:
        tail += pmf[hi]
        hi -= 1
    return lo, hi


# ----------------------------------------------------------------------------------- test inputs
def random_logits(shape, dtype=torch.float32, seed=0, *, special=True):
    """Standard normals scaled per row by 1..10; with `special`, some rows with big spreads (x50 and
    x300) and ~10% -inf entries in some rows (never a whole row)."""
    g = torch.Generator().manual_seed(seed)
    vocab = shape[-1]
    x = torch.randn(*shape, generator=g, dtype=torch.float64).reshape(-1, vocab)
    rows = x.shape[0]
    x *= 1 + 9 * torch.rand(rows, 1, generator=g, dtype=torch.float64)
    if special and rows > 1:
        kind = torch.randint(0, 6, (rows,), generator=g)
        x[kind == 1] *= 50
        x[kind == 2] *= 300
        holes = (torch.rand(rows, vocab, generator=g) < 0.1) & (kind == 3).unsqueeze(1)
        holes[:, [0, min(4, vocab - 1)]] = False  # never a whole row (column 4: suppressed by no test)
        x[holes] = -INF
    return x.reshape(shape).to(dtype)


def describe_mismatch(logits, got, expected, kwargs, rows):
    l = logits.detach().cpu().double().reshape(-1, logits.shape[-1])
    lines = []
    for r in rows[:3]:
        g, e = int(got[r]), int(expected[r])
        lines.append(f"row {r}: kernel {g} (logit {l[r, g].item() if g >= 0 else None}) vs reference {e} "
                     f"(logit {l[r, e].item() if e >= 0 else None}), row max {l[r].max().item()}")
    return f"{len(rows)} token mismatches for {kwargs}, logits {logits.dtype} {list(logits.shape)}:\n" + "\n".join(lines)


def check_against_reference(logits, **kwargs):
    """Runs dlmfuse.sample_tokens and the float64 reference; tokens must be identical, confidence
    within rtol 1e-4. Returns (tokens, confidence) of the kernel."""
    tokens, conf = dlmfuse.sample_tokens(logits, **kwargs)
    ref_tokens, ref_conf = ref_sample(logits, **kwargs)
    lead = tuple(logits.shape[:-1])
    assert tokens.dtype == torch.int64 and tuple(tokens.shape) == lead, (tokens.dtype, tokens.shape)
    assert conf.dtype == torch.float32 and tuple(conf.shape) == lead, (conf.dtype, conf.shape)
    assert tokens.device == logits.device and conf.device == logits.device
    got, expected = tokens.cpu().reshape(-1), ref_tokens.reshape(-1)
    bad = (got != expected).nonzero().reshape(-1).tolist()
    assert not bad, describe_mismatch(logits, got, expected, kwargs, bad)
    torch.testing.assert_close(conf.cpu(), ref_conf, rtol=CONF_RTOL, atol=CONF_ATOL,
                               msg=lambda m: f"confidence for {kwargs}: {m}")
    return tokens, conf


# ------------------------------------------------------------------------- Philox and reference
PHILOX_KAT = [  # Random123 kat_vectors: philox4x32 10 rounds, (counter, key) -> output
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    out = philox(*counter, *key)
    assert tuple(int(x) for x in out) == expected, [f"{int(x):08x}" for x in out]


def test_philox_vectorised_matches_scalar():
    g = torch.Generator().manual_seed(0)
    words = torch.randint(0, 2 ** 32, (6, 64), generator=g, dtype=torch.int64)
    batched = torch.stack(philox(*words))  # [4, 64]
    for i in (0, 17, 63):
        scalar = philox(*(int(w) for w in words[:, i]))
        assert [int(x) for x in scalar] == batched[:, i].tolist()
    assert int(batched.min()) >= 0 and int(batched.max()) < 2 ** 32


def test_reference_uniform_layout():
    """u for (row r, column j) comes from counter (j >> 1, r, offset lo, offset hi), key (seed lo,
    seed hi), words (0, 1) for even j and (2, 3) for odd j, 52 bits, u = (2a + 1) / 2^53."""
    seed, offset = (7 << 32) | 123, (5 << 32) | 9
    u = gumbel_uniforms(3, 5, seed, offset)
    for r, j in ((0, 0), (2, 3), (1, 4)):
        out = [int(x) for x in philox(j >> 1, r, offset & 0xFFFFFFFF, offset >> 32, seed & 0xFFFFFFFF, seed >> 32)]
        hi, lo = (out[0], out[1]) if j % 2 == 0 else (out[2], out[3])
        a = (hi << 20) | (lo >> 12)
        assert u[r, j].item() == (2 * a + 1) / 2 ** 53
    assert 0 < u.min() and u.max() < 1


@pytest.mark.parametrize("temperature", (1.0, 0.5))
def test_reference_gumbel_max_frequencies(temperature):
    logits = torch.tensor([0.3, -1.0, 1.2, 0.0, -2.5, 0.8, 0.1, -0.4], dtype=torch.float64)
    draws = torch.cat([ref_sample(logits.expand(2000, 8), temperature=temperature, seed=11, offset=o)[0]
                       for o in range(10)])  # 20000 draws over rows and offsets
    stat, dof = chi_square(draws, torch.softmax(logits / temperature, 0))
    assert stat < chi2_critical(dof), f"chi-square {stat:.2f} >= {chi2_critical(dof)} (dof {dof})"


def test_reference_uses_given_uniforms():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    u = torch.tensor([[1 - 1e-15, 0.5, 1e-300]], dtype=torch.float64)  # G = 34.5, 0.37, -6.6
    tokens, _ = ref_sample(logits, temperature=1.0, uniforms=u)
    assert tokens.tolist() == [0]


def test_reference_kept_set_rules():
    l = torch.tensor([[3.0, 1.0, 3.0, 2.0, 2.0, -INF, NAN, 0.0]])
    assert kept_tokens(l, top_k=1).tolist() == [[1, 0, 1, 0, 0, 0, 0, 0]]  # tie at the k-th value kept
    assert kept_tokens(l, top_k=3).tolist() == [[1, 0, 1, 1, 1, 0, 0, 0]]
    assert kept_tokens(l, top_k=99).tolist() == [[1, 1, 1, 1, 1, 0, 0, 1]]
    assert kept_tokens(l, top_p=0.1).tolist() == [[1, 0, 1, 0, 0, 0, 0, 0]]
    p = torch.softmax(torch.tensor([3.0, 1.0, 3.0, 2.0, 2.0, 0.0], dtype=torch.float64), 0)
    two = float(p[0] * 2)
    assert kept_tokens(l, top_p=two - 1e-12).tolist() == [[1, 0, 1, 0, 0, 0, 0, 0]]
    assert kept_tokens(l, top_p=two + 1e-9).tolist() == [[1, 0, 1, 1, 1, 0, 0, 0]]  # ties at the boundary kept
    assert kept_tokens(l, top_p=1.0).tolist() == kept_tokens(l, top_k=99).tolist()
    assert kept_tokens(l, top_k=3, top_p=0.1, suppress_tokens=torch.tensor([0])).tolist() == [[0, 0, 1, 0, 0, 0, 0, 0]]
    for nothing in ([], ()):  # an empty Python sequence suppresses nothing (it is not a float tensor)
        assert kept_tokens(l, suppress_tokens=nothing).tolist() == kept_tokens(l).tolist()
        for run in (dlmfuse.sample_tokens, dlmfuse.reference.sample_tokens):
            assert all(torch.equal(a, b) for a, b in zip(run(l, seed=3, suppress_tokens=nothing), run(l, seed=3)))


# ------------------------------------------------------------------- kernel == float64 reference
SHAPES = ((5, 1), (9, 7), (6, 1000), (3, 32000), (2, 3, 7), (2, 3, 1000))


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", LOGITS_DTYPES, ids=str)
def test_matches_reference(dtype, shape, temperature):
    logits = random_logits(shape, dtype, seed=sum(shape) + LOGITS_DTYPES.index(dtype))
    check_against_reference(logits, temperature=temperature, seed=1234, offset=5)
    check_against_reference(logits, temperature=temperature, seed=(3 << 40) | 99, offset=(1 << 35) + 7)


FILTERS = {
    "top_k1": dict(top_k=1),
    "top_k5": dict(top_k=5),
    "top_k50": dict(top_k=50),
    "top_k_huge": dict(top_k=10 ** 9),
    "top_p0.5": dict(top_p=0.5),
    "top_p0.9": dict(top_p=0.9),
    "top_p0.99": dict(top_p=0.99),
    "top_p1": dict(top_p=1.0),
    "top_k20_top_p0.8": dict(top_k=20, top_p=0.8),
    "top_k3_top_p0.999": dict(top_k=3, top_p=0.999),
    "suppress": dict(suppress_tokens=torch.tensor([0, 3, 5, 6, 3])),
    "suppress_top_k_top_p": dict(suppress_tokens=torch.tensor([1, 2]), top_k=4, top_p=0.7),
}


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("vocab", (7, 1000, 32000))
@pytest.mark.parametrize("name", FILTERS)
def test_filters_match_reference(name, vocab, temperature):
    rows = 64 if vocab < 32000 else 4
    logits = random_logits((rows, vocab), torch.float32, seed=vocab + 1)
    check_against_reference(logits, temperature=temperature, seed=42, offset=1, **FILTERS[name])


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("name", ("top_k5", "top_p0.9", "top_k20_top_p0.8"))
def test_filters_low_precision_ties(dtype, name):
    """bf16 / fp16 logits tie often: ties at the top-k / top-p boundary must all be kept."""
    logits = (torch.randn(64, 1000, generator=torch.Generator().manual_seed(3)) * 2).to(dtype)
    for temperature in (0.0, 1.0):
        check_against_reference(logits, temperature=temperature, seed=9, **FILTERS[name])


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_filters_low_precision_ties_wide(dtype):
    logits = (torch.randn(4, 32000, generator=torch.Generator().manual_seed(4)) * 3).to(dtype)  # many ties
    for extra in (dict(top_k=1000), dict(top_k=7), dict(top_p=0.95), dict(top_k=500, top_p=0.3)):
        check_against_reference(logits, temperature=1.0, seed=10, **extra)


@pytest.mark.parametrize("tempered", (False, True))
@pytest.mark.parametrize("kind", CONFIDENCE_KINDS)
@pytest.mark.parametrize("temperature", (0.0, 0.7, 2.0))
def test_confidence_matches_reference(kind, temperature, tempered):
    logits = random_logits((48, 1000), torch.float32, seed=5)
    for extra in ({}, dict(top_k=30, top_p=0.9), dict(suppress_tokens=torch.arange(0, 1000, 3))):
        check_against_reference(logits, temperature=temperature, confidence=kind, tempered_confidence=tempered,
                                seed=77, offset=3, **extra)


def test_float64_logits_confidence_precision():
    """float64 logits keep their precision in the confidence too (not only in the token choice):
    two logits 1/3 apart near 2e4 (float32 spacing there: 2e-3) give p = sigmoid(1/3)."""
    logits = torch.tensor([[20000.0, 20000.0 - 1 / 3]], dtype=torch.float64)
    for kind, expected in (("prob", 1 / (1 + math.exp(-1 / 3))), ("margin", math.tanh(1 / 6))):
        _, conf = dlmfuse.sample_tokens(logits, confidence=kind)
        assert conf.item() == pytest.approx(expected, rel=CONF_RTOL), kind


@pytest.mark.parametrize("kind", CONFIDENCE_KINDS)
def test_confidence_kinds_by_hand(kind):
    logits = torch.tensor([[2.0, 0.0, 1.0, -INF], [5.0, 5.0, 0.0, 0.0], [1.5, -INF, -INF, -INF]])
    tokens, conf = dlmfuse.sample_tokens(logits, confidence=kind)
    assert tokens.tolist() == [0, 0, 0]  # first index on ties
    p0 = torch.softmax(torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64), 0)
    p1 = torch.softmax(torch.tensor([5.0, 5.0, 0.0, 0.0], dtype=torch.float64), 0)
    expected = {
        "prob": [p0[0], p1[0], 1.0],
        "margin": [p0[0] - p0[2], 0.0, 1.0],  # equal top-2 -> 0; a single kept token -> top1 - 0
        "neg_entropy": [(p0 * p0.log()).sum(), (p1 * p1.log()).sum(), 0.0],
        "logit": [2.0, 5.0, 1.5],
    }[kind]
    torch.testing.assert_close(conf, torch.tensor([float(x) for x in expected]), rtol=CONF_RTOL, atol=CONF_ATOL)


def test_confidence_after_filtering_and_tempering():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    _, conf = dlmfuse.sample_tokens(logits, top_k=2, confidence="prob")
    assert conf.item() == pytest.approx(1 / (1 + math.exp(-1.0)), rel=1e-6)  # softmax over the kept two
    # suppress 1, then top_k=2 of {0, 2, 3} -> {0, 2}; tempered: softmax([2, 0] / 2) over them.
    t, conf = dlmfuse.sample_tokens(logits.expand(200, 4), top_k=2, temperature=2.0, seed=1, confidence="prob",
                                    tempered_confidence=True, suppress_tokens=torch.tensor([1]))
    assert set(t.tolist()) == {0, 2}
    p = torch.zeros(4, dtype=torch.float64)
    p[[0, 2]] = torch.softmax(torch.tensor([1.0, 0.0], dtype=torch.float64), 0)
    torch.testing.assert_close(conf.double(), p[t], rtol=1e-6, atol=0)
    # untempered: softmax([2, 1]) over the top-2 {0, 1}, whatever the temperature.
    t, conf = dlmfuse.sample_tokens(logits.expand(200, 4), top_k=2, temperature=2.0, seed=1, confidence="prob")
    p = torch.tensor([1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(1.0)), 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(conf.double(), p[t], rtol=1e-6, atol=0)


EXTREME_CASES = {  # name: (logits builder, temperature)
    "f32_huge_T0": ("huge", 0.0),
    "f32_huge_T0.5": ("huge", 0.5),
    "f32_huge_T1": ("huge", 1.0),
    "f32_huge_T2": ("huge", 2.0),
    "T1e-30": ("normal", 1e-30),
    "T1e30": ("normal", 1e30),
    "T1e-50": ("normal", 1e-50),  # below float32's smallest subnormal
    "T1e50": ("normal", 1e50),  # above float32's largest value
    "f64_1e300_T0.25": ("f64_huge", 0.25),
}


def extreme_logits(name):
    normal = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))
    return {"huge": torch.tensor([[3e38, 2.9e38, -3e38, 1.0], [-3e38, -3.3e38, -2e38, -1e38]]),
            "normal": normal, "f64_huge": normal.double() * 1e300}[name]


@pytest.mark.parametrize("kind", CONFIDENCE_KINDS)
@pytest.mark.parametrize("case", EXTREME_CASES)
def test_extreme_magnitudes(case, kind):
    """Logits near the float32 limit (or beyond it in float64), and temperatures that push l / T
    past it or that float32 cannot hold: the float64 contract still defines every token and
    confidence (no NaN)."""
    builder, temperature = EXTREME_CASES[case]
    logits = extreme_logits(builder)
    for tempered in (False, True):
        for extra in ({}, dict(top_k=2), dict(top_p=0.5)):
            _, conf = check_against_reference(logits, temperature=temperature, seed=1, confidence=kind,
                                              tempered_confidence=tempered, **extra)
            assert not torch.isnan(conf).any()


def test_vocab_one():
    logits = torch.randn(4, 1)
    for temperature in (0.0, 1.0):
        for kind, value in (("prob", 1.0), ("margin", 1.0), ("neg_entropy", 0.0)):
            tokens, conf = dlmfuse.sample_tokens(logits, temperature=temperature, seed=1, confidence=kind)
            assert tokens.tolist() == [0] * 4
            torch.testing.assert_close(conf, torch.full((4,), value))


def test_nan_and_inf_entries_never_chosen():
    logits = random_logits((40, 97), torch.float32, seed=8, special=False)
    g = torch.Generator().manual_seed(1)
    holes = torch.rand(40, 97, generator=g)
    logits[holes < 0.15] = NAN
    logits[(holes >= 0.15) & (holes < 0.4)] = -INF
    logits[:, 96] = 0.0  # every row keeps a finite token
    logits[0, :96] = NAN  # a row with a single finite token
    for temperature in TEMPERATURES:
        tokens, _ = check_against_reference(logits, temperature=temperature, seed=4, top_k=10)
        assert torch.isfinite(logits[torch.arange(40), tokens]).all()
        assert tokens[0].item() == 96


def test_pos_inf_logit_beats_finite_logits_whose_score_overflows():
    """A kept +inf logit is chosen even where a finite logit's l / T overflows to +inf as well
    (T tiny, or a float64 logit near the float64 limit); suppressed +inf entries do not count."""
    row = [-0.8931, -0.1447, 0.9534, INF, INF]
    for dtype, temperature in ((torch.float32, 2.2e-309), (torch.float32, 1e-40), (torch.float64, 1e-300),
                               (torch.float32, 1e-31), (torch.float32, 1.0)):
        logits = torch.tensor([row, row[::-1]], dtype=dtype)
        for extra in ({}, dict(top_k=3), dict(suppress_tokens=[3])):
            tokens, _ = dlmfuse.sample_tokens(logits, temperature=temperature, seed=12345, **extra)
            want, _ = dlmfuse.reference.sample_tokens(logits, temperature=temperature, seed=12345, **extra)
            assert torch.equal(tokens, want)
            expect = [4, 0] if extra.get("suppress_tokens") else [3, 0]
            assert tokens.tolist() == expect, (dtype, temperature, extra)
    big = torch.tensor([[1e308, INF, 1e308]], dtype=torch.float64)
    assert dlmfuse.sample_tokens(big, temperature=0.5, seed=3)[0].tolist() == [1]


def test_strided_and_permuted_rows():
    """Rows are the flattened leading dims of the logical tensor, whatever its strides."""
    base = random_logits((6, 4, 130), torch.float32, seed=2)
    for view in (base[::2], base.transpose(0, 1), base[:, 1:3], base[..., :97]):
        check_against_reference(view, temperature=1.0, seed=5, offset=2)
        check_against_reference(view, temperature=0.0)


# ------------------------------------------------------------------ determinism and statistics
def test_determinism_and_offset():
    logits = random_logits((64, 1000), torch.float32, seed=10)
    a, ca = dlmfuse.sample_tokens(logits, temperature=1.0, seed=3, offset=0)
    b, cb = dlmfuse.sample_tokens(logits, temperature=1.0, seed=3, offset=0)
    assert torch.equal(a, b) and torch.equal(ca, cb)
    c, _ = dlmfuse.sample_tokens(logits, temperature=1.0, seed=3, offset=1)
    d, _ = dlmfuse.sample_tokens(logits, temperature=1.0, seed=4, offset=0)
    assert (a != c).any() and (a != d).any()
    e, _ = dlmfuse.sample_tokens(logits, temperature=1.0, seed=torch.tensor(3), offset=torch.tensor(0))
    assert torch.equal(a, e)  # seed / offset as one-element tensors


def test_seed_none():
    logits = torch.zeros(256, 1000)
    a, _ = dlmfuse.sample_tokens(logits, temperature=1.0)
    b, _ = dlmfuse.sample_tokens(logits, temperature=1.0)
    assert ((a >= 0) & (a < 1000)).all()
    assert (a != b).any(), "seed=None must draw fresh noise"


def test_greedy_is_argmax_and_ignores_seed():
    logits = random_logits((4, 5, 1000), torch.float32, seed=12)
    tokens, conf = dlmfuse.sample_tokens(logits)
    assert torch.equal(tokens, logits.argmax(-1))
    for seed, offset in ((None, 0), (1, 0), (2 ** 62, 12345)):
        t, c = dlmfuse.sample_tokens(logits, temperature=0.0, seed=seed, offset=offset)
        assert torch.equal(t, tokens) and torch.equal(c, conf)
    ties = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    assert dlmfuse.sample_tokens(ties)[0].tolist() == [1, 0]  # first index on ties


CHI_LOGITS = torch.tensor([0.3, -1.0, 1.2, 0.0, -2.5, 0.8, 0.1, -0.4])


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("temperature", (1.0, 0.5))
def test_kernel_frequencies(temperature, dtype):
    logits = CHI_LOGITS.to(dtype)
    draws = torch.cat([dlmfuse.sample_tokens(logits.expand(4000, 8), temperature=temperature, seed=2024, offset=o)[0]
                       for o in range(5)])  # 20000 draws over rows and offsets
    stat, dof = chi_square(draws, torch.softmax(logits.double() / temperature, 0))
    assert stat < chi2_critical(dof), f"chi-square {stat:.2f} >= {chi2_critical(dof)} (dof {dof})"


@pytest.mark.parametrize("extra", (dict(top_k=3), dict(top_p=0.75), dict(suppress_tokens=torch.tensor([2, 5])),
                                   dict(top_k=5, top_p=0.8)), ids=str)
def test_kernel_frequencies_filtered(extra):
    """Filtered sampling draws from the softmax renormalised over the kept tokens, and never emits
    a filtered token."""
    draws, _ = dlmfuse.sample_tokens(CHI_LOGITS.expand(20000, 8), temperature=1.0, seed=99, **extra)
    kept = kept_tokens(CHI_LOGITS.unsqueeze(0), temperature=1.0, **extra)[0]
    assert torch.isin(draws, kept.nonzero().reshape(-1)).all(), "emitted a filtered token"
    probs = torch.softmax(CHI_LOGITS.double().masked_fill(~kept, -INF), 0)
    stat, dof = chi_square(draws, probs)
    assert stat < chi2_critical(dof), f"chi-square {stat:.2f} >= {chi2_critical(dof)} (dof {dof})"


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_filtered_and_suppressed_never_emitted(temperature):
    logits = random_logits((256, 500), torch.float32, seed=21, special=False)
    suppress = torch.tensor([int(i) for i in logits[:, :].argmax(-1)[:20]] + [7, 499])
    for extra in (dict(top_k=4), dict(top_p=0.6), dict(top_k=8, top_p=0.5), dict(suppress_tokens=suppress),
                  dict(suppress_tokens=suppress, top_k=2)):
        kept = kept_tokens(logits, temperature=temperature, **extra)
        for offset in range(4):
            tokens, _ = dlmfuse.sample_tokens(logits, temperature=temperature, seed=5, offset=offset, **extra)
            assert kept[torch.arange(256), tokens].all(), f"{extra}: emitted a token outside the kept set"
            if "suppress_tokens" in extra:
                assert not torch.isin(tokens, suppress).any()


def test_rare_token_rate():
    """logits [0, -12] at T = 1: p(rare) = 6.1e-6; 2e6 draws (rows of one call) give ~12.3."""
    rows = 2_000_000
    logits = torch.tensor([0.0, -12.0]).expand(rows, 2)
    tokens, _ = dlmfuse.sample_tokens(logits, temperature=1.0, seed=31337)
    count = int(tokens.sum())
    lam = rows * math.exp(-12.0) / (1 + math.exp(-12.0))
    lo, hi = poisson_band(lam)
    assert lo <= count <= hi, f"rare token drawn {count} times, expected ~{lam:.1f} (band [{lo}, {hi}])"
    ref_tokens, _ = ref_sample(logits, temperature=1.0, seed=31337)
    assert torch.equal(tokens, ref_tokens), f"rows {(tokens != ref_tokens).nonzero().reshape(-1)[:5].tolist()}"


# seed 1234, offset 1813, row 2, column 114 has u = 1 - 1.2e-8 (G = 18.21, found by a search with
# the reference): beyond the 16.6 a 24-bit uniform can reach, inside float64's 36.7.
FAR_TAIL = dict(seed=1234, offset=1813, row=2, column=114)


@pytest.mark.parametrize("margin", (0.25, -0.25))
def test_far_tail_gumbel(margin):
    """A token 17+ logits below the best wins exactly when its float64 Gumbel noise says so."""
    seed, offset, row, column = FAR_TAIL.values()
    g = -torch.log(-torch.log(gumbel_uniforms(row + 1, column + 1, seed, offset)[row]))
    assert g[column] > 18.0
    gap = float(g[column] - g[0]) - margin  # rare wins by `margin` (or loses by it)
    assert gap > 17.0
    logits = torch.full((row + 1, column + 1), -INF, dtype=torch.float64)
    logits[:, 0] = 0.0
    logits[:, column] = -gap
    tokens, _ = dlmfuse.sample_tokens(logits, temperature=1.0, seed=seed, offset=offset)
    assert tokens[row].item() == (column if margin > 0 else 0)
    check_against_reference(logits, temperature=1.0, seed=seed, offset=offset)
    check_against_reference(logits.float(), temperature=1.0, seed=seed, offset=offset)


# ------------------------------------------------------------------------------------ bad inputs
def test_bad_inputs():
    logits = torch.randn(4, 10)
    with pytest.raises(TypeError, match="logits.*int64"):
        dlmfuse.sample_tokens(torch.zeros(4, 10, dtype=torch.int64))
    for t in (-0.5, NAN, -INF):
        with pytest.raises(ValueError, match=f"temperature.*{t}"):
            dlmfuse.sample_tokens(logits, temperature=t)
    for k in (0, -3):
        with pytest.raises(ValueError, match=f"top_k.*{k}"):
            dlmfuse.sample_tokens(logits, top_k=k)
    for p in (0.0, -0.1, 1.5, NAN):
        with pytest.raises(ValueError, match=f"top_p.*{p}"):
            dlmfuse.sample_tokens(logits, top_p=p)
    with pytest.raises(ValueError, match=r"(?s)confidence.*'entropy'|'entropy'.*confidence") as info:
        dlmfuse.sample_tokens(logits, confidence="entropy")
    for kind in CONFIDENCE_KINDS:
        assert kind in str(info.value), f"error does not list the allowed kinds: {info.value}"
    for bad in ([10], [-1], [3, 12]):
        with pytest.raises(ValueError, match=f"suppress_tokens.*{bad[-1]}"):
            dlmfuse.sample_tokens(logits, suppress_tokens=torch.tensor(bad))
    with pytest.raises(ValueError, match="logits"):
        dlmfuse.sample_tokens(torch.tensor(1.0))
    with pytest.raises(ValueError, match="logits"):
        dlmfuse.sample_tokens(torch.zeros(3, 0))


def test_row_without_tokens_raises():
    logits = torch.randn(6, 5)
    logits[3] = -INF
    for temperature in (0.0, 1.0):
        with pytest.raises(ValueError, match=r"\brow\b\D*\b3\b"):
            dlmfuse.sample_tokens(logits, temperature=temperature, seed=0)
    logits = torch.randn(6, 5)
    logits[4, 1:] = -INF
    with pytest.raises(ValueError, match=r"\brow\b\D*\b4\b"):
        dlmfuse.sample_tokens(logits, suppress_tokens=torch.tensor([0]))
    with pytest.raises(ValueError, match=r"\brow\b"):
        dlmfuse.sample_tokens(torch.randn(2, 3), suppress_tokens=torch.tensor([0, 1, 2]))


# ---------------------------------------------------------------------- torch.library and compile
def test_opcheck():
    logits = random_logits((3, 5, 37), torch.float32, seed=1)
    suppressed = torch.zeros(37, dtype=torch.uint8)
    suppressed[[2, 30]] = 1
    op = torch.ops.dlmfuse.sample_tokens.default
    # (logits, temperature, top_k (0 = off), top_p (1 = off), suppressed uint8 [V] or None, seed, offset,
    #  seed_tensor, offset_tensor (CUDA-only device counters), confidence kind code, tempered_confidence)
    for args in ((logits, 0.0, 0, 1.0, None, 0, 0, None, None, 0, False),
                 (logits, 1.0, 5, 0.9, suppressed, 7, 3, None, None, 1, True),
                 (logits.to(torch.bfloat16), 0.5, 0, 0.8, None, 2 ** 40, 2 ** 33, None, None, 2, False),
                 (logits.double(), 2.0, 3, 1.0, suppressed, 1, 0, None, None, 3, False)):
        torch.library.opcheck(op, args)


@pytest.mark.slow
def test_torch_compile_fullgraph():
    logits = random_logits((4, 8, 1000), torch.float32, seed=6)

    def step(x):
        tokens, conf = dlmfuse.sample_tokens(x, temperature=1.0, top_k=50, seed=17, offset=2, confidence="margin")
        return tokens, conf * 2

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    tokens, conf = compiled(logits)
    ref_tokens, ref_conf = step(logits)
    assert torch.equal(tokens, ref_tokens) and torch.equal(conf, ref_conf)


@pytest.mark.slow
def test_torch_compile_fullgraph_suppress_tokens():
    """suppress_tokens (a tensor, e.g. the mask token id) inside a compiled denoising step."""
    logits = random_logits((2, 8, 500), torch.float32, seed=7)
    suppress = torch.tensor([0, 3, 499])

    def step(x):
        return dlmfuse.sample_tokens(x, temperature=1.0, seed=5, suppress_tokens=suppress, confidence="prob")

    tokens, conf = torch.compile(step, fullgraph=True, backend="eager")(logits)
    ref_tokens, ref_conf = step(logits)
    assert torch.equal(tokens, ref_tokens) and torch.equal(conf, ref_conf)
    assert not torch.isin(tokens, suppress).any()


# ------------------------------------------------------------------------------------------ CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", LOGITS_DTYPES, ids=str)
def test_cuda_matches_cpu(dtype):
    for shape in ((7, 1), (33, 7), (8, 32000), (2, 4, 1000), (1, 126464)):
        logits = random_logits(shape, dtype, seed=shape[-1])
        for kwargs in (dict(), dict(temperature=1.0), dict(temperature=0.5, top_k=20),
                       dict(temperature=2.0, top_p=0.9, confidence="margin"),
                       dict(temperature=1.0, top_k=40, top_p=0.8, confidence="neg_entropy",
                            tempered_confidence=True,
                            # ids inside V (a V=1 row would suppress its only token)
                            suppress_tokens=torch.tensor([t for t in (0, 5) if t < shape[-1] - 1], dtype=torch.long)),
                       dict(temperature=1.0, confidence="logit")):
            cpu_tokens, cpu_conf = dlmfuse.sample_tokens(logits, seed=123, offset=4, **kwargs)
            cuda_kwargs = dict(kwargs)
            if "suppress_tokens" in cuda_kwargs:
                cuda_kwargs["suppress_tokens"] = cuda_kwargs["suppress_tokens"].cuda()
            cuda_tokens, cuda_conf = check_against_reference(logits.cuda(), seed=123, offset=4, **cuda_kwargs)
            assert torch.equal(cuda_tokens.cpu(), cpu_tokens), f"{shape} {kwargs}: CPU and CUDA tokens differ"
            torch.testing.assert_close(cuda_conf.cpu(), cpu_conf, rtol=CONF_RTOL, atol=CONF_ATOL)


@pytest.mark.cuda
def test_cuda_few_rows_large_vocab():
    """Few rows over a large vocabulary (the split-V path) still match the reference exactly."""
    logits = random_logits((2, 126464), torch.bfloat16, seed=3).cuda()
    for temperature in TEMPERATURES:
        check_against_reference(logits, temperature=temperature, seed=8, offset=1)
        check_against_reference(logits, temperature=temperature, seed=8, offset=1, top_k=100, top_p=0.95)


@pytest.mark.cuda
def test_cuda_row_without_tokens():
    """No host sync on CUDA: a row with nothing to emit gives token -1 and confidence -inf."""
    logits = torch.randn(4, 9, device="cuda")
    logits[2] = -INF
    tokens, conf = dlmfuse.sample_tokens(logits, temperature=1.0, seed=0)
    assert tokens[2].item() == -1 and conf[2].item() == -INF
    assert (tokens[[0, 1, 3]] >= 0).all() and torch.isfinite(conf[[0, 1, 3]]).all()


@pytest.mark.cuda
def test_cuda_seed_offset_tensors():
    logits = random_logits((8, 1000), torch.float32, seed=2).cuda()
    seed, offset = torch.tensor(77, device="cuda"), torch.tensor((5 << 32) + 3, device="cuda")
    tokens, _ = dlmfuse.sample_tokens(logits, temperature=1.0, seed=seed, offset=offset)
    expected, _ = ref_sample(logits, temperature=1.0, seed=77, offset=(5 << 32) + 3)
    assert torch.equal(tokens.cpu(), expected)


@pytest.mark.cuda
@pytest.mark.parametrize("extra", ({}, dict(top_k=50), dict(top_k=50, top_p=0.9)), ids=str)
def test_cuda_graph_capture_with_seed_offset_tensors(extra):
    logits = random_logits((4, 32, 1000), torch.bfloat16, seed=4).cuda()
    seed = torch.tensor(2024, dtype=torch.int64, device="cuda")
    offset = torch.tensor(0, dtype=torch.int64, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the graph
        dlmfuse.sample_tokens(logits, temperature=1.0, seed=seed, offset=offset, **extra)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens, conf = dlmfuse.sample_tokens(logits, temperature=1.0, seed=seed, offset=offset, **extra)
    for step in range(3):
        offset.fill_(step)
        graph.replay()
        torch.cuda.synchronize()
        expected, expected_conf = dlmfuse.sample_tokens(logits.cpu(), temperature=1.0, seed=2024, offset=step, **extra)
        assert torch.equal(tokens.cpu(), expected), f"replay with offset {step} differs from the CPU tokens"
        torch.testing.assert_close(conf.cpu(), expected_conf, rtol=CONF_RTOL, atol=CONF_ATOL)


@pytest.mark.cuda
def test_cuda_extreme_inputs_give_the_cpu_tokens():
    """Inputs whose fp32 scores overflow (tiny T, +inf logits, huge logits) must not give -1."""
    cases = (
        (torch.tensor([[0.0, 1.0, 2.0]]), 1e-40),
        (torch.tensor([[0.0, float("inf"), 1.0, float("inf")]]), 1.0),
        (torch.randn(4, 1000, generator=torch.Generator().manual_seed(0)) * 1e4, 1.0),
        (torch.tensor([[1e300, -1e300, 0.0]], dtype=torch.float64), 1.0),
    )
    for logits, temperature in cases:
        cpu_tokens, _ = dlmfuse.sample_tokens(logits, temperature=temperature, seed=3)
        cuda_tokens, _ = dlmfuse.sample_tokens(logits.cuda(), temperature=temperature, seed=3)
        assert torch.equal(cpu_tokens, cuda_tokens.cpu()), (logits, temperature)


def test_numpy_scalars_are_accepted_as_numbers():
    """Arguments computed with numpy (np.int64 seeds, np.float32 temperatures) work like Python
    numbers, in the op and in the reference; numpy bools are still refused."""
    np = pytest.importorskip("numpy")
    logits = torch.randn(2, 3, 11, generator=torch.Generator().manual_seed(0))
    plain = dict(seed=3, offset=2, temperature=0.7, top_k=4, top_p=0.9)
    numpy = dict(seed=np.int64(3), offset=np.uint32(2), temperature=np.float32(0.7), top_k=np.int64(4), top_p=np.float64(0.9))
    expected = dlmfuse.sample_tokens(logits, **{**plain, "temperature": float(np.float32(0.7))})
    assert all(torch.equal(a, b) for a, b in zip(dlmfuse.sample_tokens(logits, **numpy), expected))
    ref = dlmfuse.reference.sample_tokens
    assert all(torch.equal(a, b) for a, b in zip(ref(logits, seed=np.int64(3)), ref(logits, seed=3)))
    with pytest.raises(TypeError, match="seed must be an int"):
        dlmfuse.sample_tokens(logits, seed=np.bool_(True))
