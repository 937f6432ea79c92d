"""dlmfuse.kv_scatter_ and dlmfuse.KVCache (DESIGN.md section 5).

kv_scatter_: bit-exact against dlmfuse.reference.kv_scatter_ for every dtype and both position
dtypes; strided cache views written in place (same data_ptr, the base buffer changed only at the
written rows); validate=True raises before any write; validate=False skips out-of-range rows and
never writes outside the cache; argument errors; n = 0; opcheck; torch.compile(fullgraph=True).
KVCache: write / view / mask / attend / reset / nbytes, lengths, unwritten slots invisible (attend
equals the reference attention on explicitly built K/V and an explicit dense mask), broadcast
labels. CUDA tests (marked) repeat the core checks on the GPU and capture kv_scatter_ in a graph.
"""

import pytest
import torch

import dlmfuse
from dlmfuse import KVCache, kv_scatter_
from dlmfuse._ext import ORDER_INFINITY
from dlmfuse.kv_cache import UNWRITTEN_GROUP

from conftest import (DTYPE_IDS, DTYPES, DispatchLog, assert_fp32_close, assert_lowp_attention_close,
                      lowp_attention_bound)

POS_DTYPES = (torch.int32, torch.int64)
# (B, Lmax, H, D, n)
SIZES = ((1, 1, 1, 64, 1), (2, 97, 3, 64, 7), (3, 130, 2, 128, 130), (2, 33, 4, 16, 5))


def randn(*shape, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def unique_positions(batch, max_len, n, dtype=torch.int64, seed=0, device="cpu"):
    """[B, n] distinct positions per row, in random order."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(max_len, generator=g)[:n] for _ in range(batch)]
    return torch.stack(rows).to(device=device, dtype=dtype)


def make_case(batch, max_len, heads, head_dim, n, dtype=torch.float32, pos_dtype=torch.int64, seed=0, device="cpu"):
    k_cache = randn(batch, max_len, heads, head_dim, dtype=dtype, seed=seed, device=device)
    v_cache = randn(batch, max_len, heads, head_dim, dtype=dtype, seed=seed + 1, device=device)
    k_new = randn(batch, n, heads, head_dim, dtype=dtype, seed=seed + 2, device=device)
    v_new = randn(batch, n, heads, head_dim, dtype=dtype, seed=seed + 3, device=device)
    positions = unique_positions(batch, max_len, n, pos_dtype, seed=seed + 4, device=device)
    return k_cache, v_cache, k_new, v_new, positions


def bits(t):
    """The tensor's bit pattern, so that equality is exact (also for -0.0 and NaN)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_bits_equal(actual, expected, name):
    diff = (bits(actual) != bits(expected)).nonzero()
    assert diff.numel() == 0, f"{name}: differs at {diff[:5].tolist()}"


# -------------------------------------------------------------------------------- kv_scatter_
@pytest.mark.parametrize("pos_dtype", POS_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("size", SIZES, ids=str)
def test_matches_reference(size, dtype, pos_dtype, device):
    k_cache, v_cache, k_new, v_new, positions = make_case(*size, dtype=dtype, pos_dtype=pos_dtype, device=device)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    dlmfuse.reference.kv_scatter_(k_ref, v_ref, k_new, v_new, positions)
    ptrs = k_cache.data_ptr(), v_cache.data_ptr()
    assert kv_scatter_(k_cache, v_cache, k_new, v_new, positions) is None
    assert (k_cache.data_ptr(), v_cache.data_ptr()) == ptrs
    assert_bits_equal(k_cache, k_ref, "k_cache")
    assert_bits_equal(v_cache, v_ref, "v_cache")
    # Spelled out: written rows hold the new rows, every other row is unchanged.
    b = torch.arange(size[0], device=device)[:, None]
    assert_bits_equal(k_cache[b, positions.long()], k_new, "written k rows")
    assert_bits_equal(v_cache[b, positions.long()], v_new, "written v rows")


def test_nothing_else_changes():
    k_cache, v_cache, k_new, v_new, positions = make_case(2, 40, 2, 64, 6)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    kv_scatter_(k_cache, v_cache, k_new, v_new, positions)
    written = torch.zeros(2, 40, dtype=torch.bool)
    written.scatter_(1, positions, True)
    assert_bits_equal(k_cache[~written], k_before[~written], "unwritten k rows")
    assert_bits_equal(v_cache[~written], v_before[~written], "unwritten v rows")
    assert_bits_equal(k_new, randn(2, 6, 2, 64, seed=2), "k_new (input)")


def strided_views(kind, batch, max_len, heads, head_dim, dtype):
    """(buffer, cache view) pairs for the strided layouts a user hands to kv_scatter_."""
    if kind == "slice_of_longer_buffer":
        buffer = randn(batch, max_len + 9, heads, head_dim, dtype=dtype, seed=10)
        return buffer, buffer[:, 4:4 + max_len]
    if kind == "permuted_heads":  # storage [B, H, Lmax, D], seen as [B, Lmax, H, D]
        buffer = randn(batch, heads, max_len, head_dim, dtype=dtype, seed=10)
        return buffer, buffer.transpose(1, 2)
    if kind == "layer_of_stacked_cache":  # [layers, B, Lmax, H, D][1], and every other batch row
        buffer = randn(3, 2 * batch, max_len, heads, head_dim, dtype=dtype, seed=10)
        return buffer, buffer[1, ::2]
    if kind == "wider_head_dim":  # the first D of a wider last dim (row stride > D)
        buffer = randn(batch, max_len, heads, head_dim + 16, dtype=dtype, seed=10)
        return buffer, buffer[..., :head_dim]
    raise AssertionError(kind)


STRIDED_KINDS = ("slice_of_longer_buffer", "permuted_heads", "layer_of_stacked_cache", "wider_head_dim")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("kind", STRIDED_KINDS)
def test_strided_cache_views_written_in_place(kind, dtype):
    batch, max_len, heads, head_dim, n = 2, 37, 3, 64, 5
    k_buf, k_cache = strided_views(kind, batch, max_len, heads, head_dim, dtype)
    v_buf, v_cache = strided_views(kind, batch, max_len, heads, head_dim, dtype)
    assert not k_cache.is_contiguous()
    # New rows are strided too: a [B, n, H, D] view of a [B, H, n, D] tensor.
    k_new = randn(batch, heads, n, head_dim, dtype=dtype, seed=2).transpose(1, 2)
    v_new = randn(batch, heads, n, head_dim, dtype=dtype, seed=3).transpose(1, 2)
    positions = unique_positions(batch, max_len, n, torch.int32, seed=4)

    k_buf_ref, v_buf_ref = k_buf.clone(), v_buf.clone()
    k_view_ref = k_buf_ref.as_strided(k_cache.shape, k_cache.stride(), k_cache.storage_offset())
    v_view_ref = v_buf_ref.as_strided(v_cache.shape, v_cache.stride(), v_cache.storage_offset())
    dlmfuse.reference.kv_scatter_(k_view_ref, v_view_ref, k_new, v_new, positions)

    ptrs = k_cache.data_ptr(), v_cache.data_ptr()
    kv_scatter_(k_cache, v_cache, k_new, v_new, positions)
    assert (k_cache.data_ptr(), v_cache.data_ptr()) == ptrs
    # The whole base buffer equals the reference: written rows changed, everything else is intact.
    assert_bits_equal(k_buf, k_buf_ref, "k buffer")
    assert_bits_equal(v_buf, v_buf_ref, "v buffer")
    assert not torch.equal(k_buf, randn(*k_buf.shape, dtype=dtype, seed=10)), "nothing was written"


PACKED_LAYOUTS = {
    # flash-attn's kv-packed cache [B, L, 2, H, D]: K and V interleave row by row
    "kv_packed": lambda buf: (buf[:, :, 0], buf[:, :, 1]),
    # K in the first H heads of [B, L, 2H, D], V in the last H
    "head_halves": lambda buf: (buf.flatten(2, 3)[:, :, :3], buf.flatten(2, 3)[:, :, 3:]),
    # every other [L, H, D] block of a [2B, L, H, D] stack
    "alternate_blocks": lambda buf: (buf.permute(0, 2, 1, 3, 4).flatten(0, 1)[0::2],
                                     buf.permute(0, 2, 1, 3, 4).flatten(0, 1)[1::2]),
}


@pytest.mark.parametrize("layout", PACKED_LAYOUTS)
def test_disjoint_views_of_one_buffer_are_written_in_place(layout, device):
    """K and V that are views of one buffer without a common element are accepted (their memory
    spans interleave), written in place and equal the reference."""
    B, L, H, D, n = 2, 19, 3, 64, 5
    buf = randn(B, L, 2, H, D, seed=20, device=device)
    k_cache, v_cache = PACKED_LAYOUTS[layout](buf)
    assert k_cache.shape == (B, L, H, D) and v_cache.shape == (B, L, H, D), (k_cache.shape, v_cache.shape)
    expected = buf.clone()
    k_exp, v_exp = PACKED_LAYOUTS[layout](expected)
    k_new, v_new = randn(B, n, H, D, seed=21, device=device), randn(B, n, H, D, seed=22, device=device)
    positions = unique_positions(B, L, n, seed=23, device=device)
    dlmfuse.reference.kv_scatter_(k_exp, v_exp, k_new, v_new, positions)
    kv_scatter_(k_cache, v_cache, k_new, v_new, positions)
    assert_bits_equal(buf, expected, "packed buffer")
    assert torch.equal(k_cache[0, positions[0, 0]], k_new[0, 0]) and torch.equal(v_cache[1, positions[1, 4]], v_new[1, 4])


def _sharing_caches(case):
    """(base buffer, k_cache, v_cache) of one shape that share at least one element."""
    if case == "same_view":
        buf = torch.zeros(2, 9, 4, 64)
        return buf, buf, buf[:]
    if case == "overlapping_heads":  # heads 0-1 and 1-2: head 1 is in both
        buf = torch.zeros(2, 9, 4, 64)
        return buf, buf[:, :, 0:2], buf[:, :, 1:3]
    if case == "one_element":  # rows of 8 used elements every 16; V starts on K's last element
        buf = torch.zeros(576)
        return buf, buf.as_strided((2, 9, 2, 4), (144, 16, 4, 1), 0), buf.as_strided((2, 9, 2, 4), (144, 16, 4, 1), 135)
    # V's rows are every other row of the buffer, K's the first four: rows 0 and 2 are in both
    buf = torch.zeros(2, 9, 4, 64)
    return buf, buf[:, 0:4], buf.as_strided((2, 4, 4, 64), (9 * 256, 512, 64, 1), 0)


@pytest.mark.parametrize("case", ["same_view", "overlapping_heads", "one_element", "strided_rows"])
def test_caches_that_share_an_element_are_refused(case):
    buf, k_cache, v_cache = _sharing_caches(case)
    assert k_cache.shape == v_cache.shape
    new = torch.ones(k_cache.shape[0], 1, *k_cache.shape[2:])
    positions = torch.zeros(k_cache.shape[0], 1, dtype=torch.int64)
    before = buf.clone()
    with pytest.raises(ValueError, match="k_cache and v_cache share memory"):
        kv_scatter_(k_cache, v_cache, new, new.clone(), positions)
    assert torch.equal(buf, before)


def test_validate_false_duplicates_write_the_last_row_whole(device):
    """New rows for one slot: the slot gets the last of them, bit for bit, never a mix. Rows of
    16 MiB, so that the copies of two threads or CTAs interleave if both write (without the rule,
    16 of 20 calls of the [2, 2, 2, 2] case tore the row on the 2-core dev machine)."""
    heads, head_dim = 64, 65536  # one row of K: 4M float32 elements
    k_cache = torch.zeros(1, 4, heads, head_dim, device=device)
    v_cache = torch.zeros(1, 4, heads, head_dim, device=device)
    k_new = torch.stack([torch.full((heads, head_dim), float(i + 1)) for i in range(4)])[None].to(device)
    v_new = -k_new
    for positions in [[[2, 2, 2, 2]]] * 5 + [[[2, 2]], [[1, 2, 1, 1]], [[3, 0, 3, 9]]]:
        positions = torch.tensor(positions, device=device)
        n = positions.shape[1]
        k_cache.zero_(), v_cache.zero_()
        kv_scatter_(k_cache, v_cache, k_new[:, :n], v_new[:, :n], positions, validate=False)
        expected_k, expected_v = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
        for i, pos in enumerate(positions[0].tolist()):  # in order: later rows overwrite
            if 0 <= pos < 4:
                expected_k[0, pos], expected_v[0, pos] = k_new[0, i], v_new[0, i]
        assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v), positions.tolist()
        ref_k, ref_v = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
        dlmfuse.reference.kv_scatter_(ref_k, ref_v, k_new[:, :n], v_new[:, :n], positions, validate=False)
        assert torch.equal(ref_k, expected_k) and torch.equal(ref_v, expected_v), "reference"


def test_validate_false_duplicates_are_resolved_in_every_row_of_a_batch():
    g = torch.Generator().manual_seed(5)
    B, L, H, D, n = 3, 6, 2, 64, 12
    k_cache, v_cache = torch.zeros(B, L, H, D), torch.zeros(B, L, H, D)
    positions = torch.randint(-1, L + 1, (B, n), generator=g)
    k_new = torch.arange(B * n, dtype=torch.float32).view(B, n, 1, 1).expand(B, n, H, D).contiguous()
    kv_scatter_(k_cache, v_cache, k_new, k_new + 0.5, positions, validate=False)
    for b in range(B):
        for slot in range(L):
            rows = (positions[b] == slot).nonzero()[:, 0].tolist()
            expected = float(k_new[b, rows[-1], 0, 0]) if rows else 0.0
            assert torch.all(k_cache[b, slot] == expected) and torch.all(v_cache[b, slot] == (expected + 0.5 if rows else 0.0))


@pytest.mark.parametrize("pos_dtype", POS_DTYPES, ids=str)
def test_zero_new_rows(pos_dtype):
    k_cache, v_cache, _, _, _ = make_case(2, 9, 2, 64, 1)
    before = k_cache.clone(), v_cache.clone()
    empty = torch.empty(2, 0, 2, 64)
    kv_scatter_(k_cache, v_cache, empty, empty, torch.empty(2, 0, dtype=pos_dtype))
    kv_scatter_(k_cache, v_cache, empty, empty, torch.empty(2, 0, dtype=pos_dtype), validate=False)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


BAD_POSITIONS = [
    # (positions [2, 3] with max_len 10, words of the message)
    ([[0, 1, 2], [3, 10, 4]], ["positions[1, 1]", "10", "Lmax=10"]),
    ([[0, -1, 2], [3, 4, 5]], ["positions[0, 1]", "-1"]),
    ([[0, 1, 2], [3, 4, -2**31]], ["positions[1, 2]", str(-2**31)]),
    ([[0, 1, 2], [7, 4, 7]], ["position 7", "row 1"]),
    ([[5, 5, 5], [0, 1, 2]], ["position 5", "row 0"]),
]


@pytest.mark.parametrize("pos_dtype", POS_DTYPES, ids=str)
@pytest.mark.parametrize("positions, words", BAD_POSITIONS, ids=[str(i) for i in range(len(BAD_POSITIONS))])
def test_validate_raises_before_any_write(positions, words, pos_dtype, device):
    k_cache, v_cache, k_new, v_new, _ = make_case(2, 10, 2, 64, 3, device=device)
    before = k_cache.clone(), v_cache.clone()
    with pytest.raises(ValueError) as info:
        kv_scatter_(k_cache, v_cache, k_new, v_new, torch.tensor(positions, dtype=pos_dtype, device=device))
    for word in words:
        assert word in str(info.value), f"{word!r} not in {str(info.value)!r}"
    # Row 0 of most cases is valid: it must not have been written either.
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


def test_validate_rejects_int64_positions_beyond_int32():
    k_cache, v_cache, k_new, v_new, _ = make_case(1, 10, 1, 64, 2)
    before = k_cache.clone()
    for bad in (2**32 + 1, -(2**32) + 3, 2**62):  # would alias a valid slot if truncated to 32 bits
        with pytest.raises(ValueError, match=str(bad)):
            kv_scatter_(k_cache, v_cache, k_new, v_new, torch.tensor([[bad, 0]]))
    assert torch.equal(k_cache, before)


@pytest.mark.parametrize("pos_dtype", POS_DTYPES, ids=str)
def test_validate_false_skips_out_of_range_without_writing_outside(pos_dtype, device):
    batch, max_len, heads, head_dim = 3, 12, 2, 64
    # The cache is the middle of a bigger buffer: guard rows before and after, guard batch rows.
    k_buf = randn(batch + 2, max_len + 6, heads, head_dim, seed=20, device=device)
    v_buf = randn(batch + 2, max_len + 6, heads, head_dim, seed=21, device=device)
    k_cache, v_cache = k_buf[1:1 + batch, 3:3 + max_len], v_buf[1:1 + batch, 3:3 + max_len]
    extreme = torch.iinfo(pos_dtype)
    positions = torch.tensor([
        [-1, 0, max_len, 5],
        [max_len - 1, -3, max_len + 2, extreme.max],
        [extreme.min, 7, -max_len, 2],
    ], dtype=pos_dtype, device=device)
    k_new = randn(batch, 4, heads, head_dim, seed=22, device=device)
    v_new = randn(batch, 4, heads, head_dim, seed=23, device=device)

    k_expected, v_expected = k_buf.clone(), v_buf.clone()
    for b, row in enumerate(positions.tolist()):
        for i, pos in enumerate(row):
            if 0 <= pos < max_len:
                k_expected[1 + b, 3 + pos] = k_new[b, i]
                v_expected[1 + b, 3 + pos] = v_new[b, i]
    kv_scatter_(k_cache, v_cache, k_new, v_new, positions, validate=False)
    assert_bits_equal(k_buf, k_expected, "k buffer")
    assert_bits_equal(v_buf, v_expected, "v buffer")
    # The reference agrees.
    k_ref, v_ref = k_buf.clone(), v_buf.clone()
    dlmfuse.reference.kv_scatter_(k_ref[1:1 + batch, 3:3 + max_len], v_ref[1:1 + batch, 3:3 + max_len],
                                  k_new, v_new, positions, validate=False)
    assert_bits_equal(k_ref, k_expected, "reference k buffer")


def test_validate_false_all_out_of_range_writes_nothing():
    k_cache, v_cache, k_new, v_new, _ = make_case(2, 8, 1, 64, 2)
    before = k_cache.clone(), v_cache.clone()
    kv_scatter_(k_cache, v_cache, k_new, v_new, torch.tensor([[8, -1], [100, -100]]), validate=False)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


def _bad_args():
    kc, vc, kn, vn, pos = make_case(2, 10, 2, 64, 3)
    return [
        # (args, exception, words in the message)
        ((kc, vc, kn.bfloat16(), vn, pos), TypeError, ["k_new", "torch.float32", "torch.bfloat16"]),
        ((kc, vc, kn, vn.half(), pos), TypeError, ["v_new", "torch.float16"]),
        ((kc, vc.double(), kn, vn, pos), TypeError, ["v_cache", "torch.float64"]),
        ((kc, vc, kn, vn, pos.float()), TypeError, ["positions", "int32 or int64", "torch.float32"]),
        ((kc, vc, kn, vn, pos.to(torch.int16)), TypeError, ["positions", "torch.int16"]),
        ((kc, vc, kn, vn, pos.tolist()), TypeError, ["positions", "list"]),
        ((kc.numpy(), vc, kn, vn, pos), TypeError, ["k_cache", "ndarray"]),
        ((kc, vc, kn, vn, pos.to("meta")), TypeError, ["positions", "meta", "cpu"]),
        ((kc, vc, kn.to("meta"), vn, pos), TypeError, ["k_new", "meta", "cpu"]),
        ((kc, vc[:, :9], kn, vn, pos), ValueError, ["v_cache", "[2, 10, 2, 64]", "[2, 9, 2, 64]"]),
        ((kc, vc, kn[:, :, :1], vn, pos), ValueError, ["k_new", "Hkv=2", "[2, 3, 1, 64]"]),
        ((kc, vc, kn, vn[:, :2], pos), ValueError, ["v_new", "[2, 2, 2, 64]"]),
        ((kc, vc, kn, vn, pos[:, :2]), ValueError, ["positions", "n=3", "[2, 2]"]),
        ((kc, vc, kn, vn, pos[:1]), ValueError, ["positions", "B=2", "[1, 3]"]),
        ((kc, vc, kn, vn, pos[0]), ValueError, ["positions", "[3]"]),
        ((kc[0], vc, kn, vn, pos), ValueError, ["k_cache", "4 dims", "[10, 2, 64]"]),
        ((kc, vc, kn, vn.transpose(1, 3), pos), ValueError, ["v_new"]),
        ((kc.transpose(2, 3), vc, kn, vn, pos), ValueError, ["k_cache", "contiguous last dim"]),
        ((kc[:1].expand(2, -1, -1, -1), vc, kn, vn, pos), ValueError, ["k_cache", "share memory", "(0, 128, 64, 1)"]),
        ((kc, vc[:, :1].expand(-1, 10, -1, -1), kn, vn, pos), ValueError, ["v_cache", "share memory"]),
        ((kc, kc, kn, vn, pos), ValueError, ["k_cache and v_cache share memory"]),
    ]


@pytest.mark.parametrize("case", range(len(_bad_args())))
def test_bad_arguments(case):
    args, exc, words = _bad_args()[case]
    before = [a.clone() if isinstance(a, torch.Tensor) and a.device.type == "cpu" else None for a in args[:2]]
    with pytest.raises(exc) as info:
        kv_scatter_(*args)
    message = str(info.value)
    assert message.startswith("kv_scatter_:"), message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    for cache, old in zip(args[:2], before):
        if old is not None and cache.shape == old.shape:
            assert torch.equal(cache, old)


def test_new_rows_that_alias_the_cache_are_read_before_any_write():
    """k_new / v_new may be views of the caches themselves (shifting rows): the result is as if
    they had been copied first, like the reference."""
    k_cache, v_cache = (torch.arange(2 * 8 * 64, dtype=torch.float32).view(2, 8, 1, 64) + offset for offset in (0, 1000))
    positions = torch.tensor([[1, 2, 3], [4, 5, 6]])
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    dlmfuse.reference.kv_scatter_(expected_k, expected_v, expected_k[:, 0:3].clone(), expected_v[:, 2:5].clone(), positions)
    kv_scatter_(k_cache, v_cache, k_cache[:, 0:3], v_cache[:, 2:5], positions)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


def test_writes_are_seen_by_autograd():
    """Like torch's in-place ops: the version counters move, so a backward through an attention
    that read the old cache raises instead of using the new rows; a leaf cache that requires grad
    is refused (grad mode on) before anything is written."""
    k_cache, v_cache, k_new, v_new, positions = make_case(1, 8, 2, 16, 2)
    q = torch.randn(1, 3, 2, 16, requires_grad=True)
    versions = k_cache._version, v_cache._version
    out = dlmfuse.attention(q, k_cache, v_cache)
    kv_scatter_(k_cache, v_cache, k_new, v_new, positions)
    assert k_cache._version > versions[0] and v_cache._version > versions[1]
    with pytest.raises(RuntimeError, match=r"attention backward: a tensor this attention read .* was written in "
                                           r"place .* KV cache overwritten by dlmfuse.kv_scatter_(.|\n)*modified by an inplace"):
        out.sum().backward()
    leaf = k_cache.clone().requires_grad_(True)
    before = leaf.detach().clone()
    with pytest.raises(RuntimeError, match="kv_scatter_: k_cache is a leaf tensor that requires grad"):
        kv_scatter_(leaf, v_cache, k_new, v_new, positions)
    assert torch.equal(leaf.detach(), before)
    with torch.no_grad():
        kv_scatter_(leaf, v_cache, k_new, v_new, positions)  # allowed, as for torch's in-place ops
    assert torch.equal(leaf.detach()[0, positions[0]], k_new[0])


def test_new_rows_that_require_grad_need_no_grad_mode():
    """The write is not differentiable: under grad mode, new rows that require grad raise instead
    of silently cutting the graph; under no_grad (or detached) they are written."""
    k_cache, v_cache, k_new, v_new, positions = make_case(1, 8, 2, 16, 2)
    k_new.requires_grad_(True)
    with pytest.raises(RuntimeError, match="kv_scatter_: k_new requires grad, but the cache write is not differentiable"):
        kv_scatter_(k_cache, v_cache, k_new, v_new, positions)
    before = k_cache.clone()
    with pytest.raises(RuntimeError):
        kv_scatter_(k_cache, v_cache, k_new, v_new, positions)
    assert torch.equal(k_cache, before)
    with torch.no_grad():
        kv_scatter_(k_cache, v_cache, k_new, v_new, positions)
    assert torch.equal(k_cache[0, positions[0]], k_new[0].detach())
    kv_scatter_(k_cache, v_cache, k_new.detach() + 1, v_new, positions)
    assert torch.equal(k_cache[0, positions[0]], k_new[0].detach() + 1)


def test_opcheck():
    for pos_dtype, validate in ((torch.int64, True), (torch.int32, False)):
        k_cache, v_cache, k_new, v_new, positions = make_case(2, 17, 2, 64, 4, pos_dtype=pos_dtype)
        torch.library.opcheck(torch.ops.dlmfuse.kv_scatter_, (k_cache, v_cache, k_new, v_new, positions, validate))


@pytest.mark.slow
def test_torch_compile_fullgraph():
    k_cache, v_cache, k_new, v_new, positions = make_case(2, 21, 2, 64, 5)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    dlmfuse.reference.kv_scatter_(k_ref, v_ref, k_new * 2, v_new + 1, positions)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(k_cache, v_cache, k_new, v_new, positions):
        kv_scatter_(k_cache, v_cache, k_new * 2, v_new + 1, positions, validate=False)
        return k_cache.sum()

    total = step(k_cache, v_cache, k_new, v_new, positions)
    assert_bits_equal(k_cache, k_ref, "k_cache")
    assert_bits_equal(v_cache, v_ref, "v_cache")
    assert torch.allclose(total, k_ref.sum())


# ------------------------------------------------------------------------------------- KVCache
def explicit_attention(q, q_order, q_group, slots, max_len, scale=None):
    """Reference attention over explicitly built K/V and a dense mask (explicit_inputs)."""
    k, v, bias = explicit_inputs(q, q_order, q_group, slots, max_len)
    return dlmfuse.reference.attention(q, k, v, bias=bias, scale=scale, out_dtype=torch.float64)


def explicit_inputs(q, q_order, q_group, slots, max_len):
    """K, V and a -inf bias that hides what the labels hide, built from the test's bookkeeping.

    slots: per batch row, {position: (k [H, D], v [H, D], order, group)} of the written slots
    (not the cache's). Unwritten positions get zero K/V and are hidden.
    """
    batch, q_len = q.shape[:2]
    heads, head_dim = next(iter(next(s for s in slots if s).values()))[0].shape
    k = torch.zeros(batch, max_len, heads, head_dim, dtype=q.dtype)
    v = torch.zeros_like(k)
    visible = torch.zeros(batch, q_len, max_len, dtype=torch.bool)
    q_order, q_group = q_order.expand(batch, q_len), q_group.expand(batch, q_len)
    for b, row in enumerate(slots):
        for j, (k_row, v_row, order, group) in row.items():
            k[b, j], v[b, j] = k_row, v_row
            for i in range(q_len):
                visible[b, i, j] = order < int(q_order[b, i]) or group == int(q_group[b, i])
    bias = torch.zeros(batch, 1, q_len, max_len).masked_fill(~visible[:, None], float("-inf"))
    return k, v, bias


def record(slots, positions, k, v, order, group):
    for b in range(positions.shape[0]):
        for i, pos in enumerate(positions[b].tolist()):
            slots[b][pos] = (k[b, i].clone(), v[b, i].clone(), int(order[b, i]), int(group[b, i]))


def test_fresh_cache_and_nbytes():
    cache = KVCache(3, 2, 50, 4, 64, torch.bfloat16, "cpu")
    assert cache.k.shape == cache.v.shape == (3, 2, 50, 4, 64) and cache.k.dtype == torch.bfloat16
    assert cache.k_order.shape == cache.k_group.shape == cache.k_doc.shape == (2, 50)
    assert cache.k_order.dtype == cache.k_group.dtype == cache.k_doc.dtype == cache.lengths.dtype == torch.int32
    assert torch.equal(cache.lengths, torch.zeros(2, dtype=torch.int32))
    assert (cache.k_order == ORDER_INFINITY).all() and (cache.k_group == UNWRITTEN_GROUP).all()
    kv_bytes = 2 * 3 * 2 * 50 * 4 * 64 * 2
    label_bytes = 3 * 2 * 50 * 4 + 2 * 4  # order, group, doc [B, Lmax] int32, lengths [B] int32
    # Labels may carry a small fixed slack per row (e.g. a spare column): at most 3 int32 per row.
    assert kv_bytes + label_bytes <= cache.nbytes <= kv_bytes + label_bytes + 3 * 2 * 4, cache.nbytes
    assert "MiB" in repr(cache) and "max_len=50" in repr(cache)


@pytest.mark.parametrize("kwargs, exc, word", [
    ({"num_layers": 0}, ValueError, "num_layers"),
    ({"batch": -1}, ValueError, "batch"),
    ({"max_len": 2.0}, ValueError, "max_len"),
    ({"head_dim": True}, ValueError, "head_dim"),
    ({"dtype": torch.int32}, TypeError, "dtype"),
    ({"dtype": "float32"}, TypeError, "dtype"),
    ({"dtype": torch.float64}, TypeError, "torch.float64"),  # attention reads float32 / bf16 / fp16 only
    ({"head_dim": 300}, ValueError, "head_dim must be at most 256"),
])
def test_constructor_errors(kwargs, exc, word):
    args = {"num_layers": 2, "batch": 1, "max_len": 8, "num_kv_heads": 1, "head_dim": 64, "dtype": torch.float32}
    args.update(kwargs)
    with pytest.raises(exc, match=word):
        KVCache(**args)


def test_layer_index_errors():
    """write, view and attend take a layer in [0, num_layers): no negative indexing."""
    cache = KVCache(2, 1, 8, 1, 64, torch.float32)
    q, labels = torch.randn(1, 2, 1, 64), torch.ones(1, 2, dtype=torch.int32)
    k = torch.randn(1, 1, 1, 64)
    calls = {"write": lambda layer: cache.write(layer, torch.tensor([[0]]), k, k),
             "view": lambda layer: cache.view(layer),
             "attend": lambda layer: cache.attend(layer, q, labels, labels)}
    for method, call in calls.items():
        for layer in (2, -1, 1.0, True):
            with pytest.raises(ValueError, match=rf"KVCache.{method}: layer must be an int in \[0, 2\), got {layer!r}"):
                call(layer)


def test_write_validate_false_duplicates_take_the_last_rows_labels(device):
    """A repeated position gets K, V and labels of the same (last) new row."""
    cache = KVCache(1, 2, 6, 1, 64, torch.float32, device)
    pos = torch.tensor([[4, 1, 4, 4, 1], [0, 0, 5, 2, 0]], device=device)
    k = torch.arange(10, dtype=torch.float32, device=device).view(2, 5, 1, 1).expand(2, 5, 1, 64).contiguous()
    order = torch.arange(100, 110, dtype=torch.int32, device=device).view(2, 5)
    cache.write(0, pos, k, -k, order=order, group=-order, validate=False)
    for b in range(2):
        for slot in range(6):
            rows = (pos[b] == slot).nonzero()[:, 0].tolist()
            if not rows:
                assert int(cache.k_order[b, slot]) == ORDER_INFINITY
                continue
            last = rows[-1]
            assert torch.all(cache.k[0, b, slot] == k[b, last]) and torch.all(cache.v[0, b, slot] == -k[b, last])
            assert int(cache.k_order[b, slot]) == int(order[b, last]) and int(cache.k_group[b, slot]) == -int(order[b, last])


def test_write_labels_lengths_and_layers():
    cache = KVCache(2, 2, 20, 2, 64, torch.float32, "cpu")
    pos = torch.tensor([[3, 0, 7], [12, 5, 1]])
    k, v = randn(2, 3, 2, 64, seed=1), randn(2, 3, 2, 64, seed=2)
    order = torch.tensor([[1, 2, 3], [4, 5, 6]], dtype=torch.int32)
    group = torch.tensor([[-1, -2, -3], [-4, -5, -6]], dtype=torch.int64)  # any int dtype
    cache.write(1, pos, k, v, order=order, group=group)
    b = torch.arange(2)[:, None]
    assert torch.equal(cache.k[1][b, pos], k) and torch.equal(cache.v[1][b, pos], v)
    assert not cache.k[0].any() and not cache.v[0].any(), "layer 0 must be untouched"
    assert torch.equal(cache.k_order[b, pos], order) and torch.equal(cache.k_group[b, pos], group.int())
    others = torch.ones(2, 20, dtype=torch.bool)
    others[b, pos] = False
    assert (cache.k_order[others] == ORDER_INFINITY).all() and (cache.k_group[others] == UNWRITTEN_GROUP).all()
    assert cache.lengths.tolist() == [8, 13]

    # Lower positions do not shrink lengths; labels omitted leave labels as they are.
    cache.write(0, torch.tensor([[1], [0]]), randn(2, 1, 2, 64), randn(2, 1, 2, 64))
    assert cache.lengths.tolist() == [8, 13]
    assert int(cache.k_order[0, 1]) == ORDER_INFINITY and int(cache.k_order[1, 1]) == 6
    cache.write(0, torch.tensor([[19], [13]], dtype=torch.int32), randn(2, 1, 2, 64), randn(2, 1, 2, 64))
    assert cache.lengths.tolist() == [20, 14]

    # view: the cache's own storage, ready for attention.
    view = cache.view(1)
    assert view.k.data_ptr() == cache.k[1].data_ptr() and view.v.data_ptr() == cache.v[1].data_ptr()
    assert view.k.shape == (2, 20, 2, 64) and view.kv_lens is cache.lengths
    assert torch.equal(view.k_order, cache.k_order) and torch.equal(view.k_group, cache.k_group)
    mask = cache.mask(torch.zeros(1, 4, dtype=torch.int32), torch.zeros(1, 4, dtype=torch.int32))
    assert isinstance(mask, dlmfuse.Mask) and torch.equal(mask.k_order, cache.k_order)

    cache.reset()
    assert cache.lengths.tolist() == [0, 0]
    assert (cache.k_order == ORDER_INFINITY).all() and (cache.k_group == UNWRITTEN_GROUP).all()


def test_labels_broadcast():
    cache = KVCache(1, 3, 10, 1, 64, torch.float32, "cpu")
    pos = torch.tensor([[0, 4], [1, 2], [9, 3]])
    k = randn(3, 2, 1, 64)
    cache.write(0, pos, k, k, order=torch.tensor([[7, 8]], dtype=torch.int32), group=5)
    b = torch.arange(3)[:, None]
    assert cache.k_order[b, pos].tolist() == [[7, 8]] * 3
    assert cache.k_group[b, pos].tolist() == [[5, 5]] * 3
    cache.write(0, pos, k, k, order=torch.tensor(2), group=torch.tensor([[1, 2]]))
    assert cache.k_order[b, pos].tolist() == [[2, 2]] * 3 and cache.k_group[b, pos].tolist() == [[1, 2]] * 3


def test_write_validate_false_out_of_range_leaves_real_slots_untouched():
    cache = KVCache(1, 2, 10, 1, 64, torch.float32, "cpu")
    cache.write(0, torch.tensor([[0, 9], [5, 6]]), randn(2, 2, 1, 64), randn(2, 2, 1, 64),
                order=torch.full((2, 2), 3), group=torch.full((2, 2), 4))
    before = {name: getattr(cache, name).clone() for name in ("k", "v", "k_order", "k_group", "lengths")}
    pos = torch.tensor([[-1, 10, 4], [-10, 2**40, 1]])
    k_new, v_new = randn(2, 3, 1, 64, seed=5), randn(2, 3, 1, 64, seed=6)
    cache.write(0, pos, k_new, v_new, order=torch.full((2, 3), 100), group=torch.full((2, 3), 200), validate=False)
    expected_order, expected_group = before["k_order"].clone(), before["k_group"].clone()
    expected_order[0, 4] = expected_order[1, 1] = 100
    expected_group[0, 4] = expected_group[1, 1] = 200
    assert torch.equal(cache.k_order, expected_order) and torch.equal(cache.k_group, expected_group)
    expected_k = before["k"].clone()
    expected_k[0, 0, 4], expected_k[0, 1, 1] = k_new[0, 2], k_new[1, 2]
    assert torch.equal(cache.k, expected_k)
    assert cache.lengths.tolist() == [10, 7]  # out-of-range positions never grow lengths
    assert cache.k_order.shape == (2, 10), "views hide any spare storage"


def test_write_validate_true_raises_and_changes_nothing():
    cache = KVCache(1, 1, 10, 1, 64, torch.float32, "cpu")
    before = {name: getattr(cache, name).clone() for name in ("k", "k_order", "k_group", "lengths")}
    for bad in ([[2, 10]], [[3, 3]], [[-1, 0]]):
        with pytest.raises(ValueError):
            cache.write(0, torch.tensor(bad), randn(1, 2, 1, 64), randn(1, 2, 1, 64), order=1, group=1)
    for name, value in before.items():
        assert torch.equal(getattr(cache, name), value), name
    with pytest.raises(ValueError, match="layer"):
        cache.write(1, torch.tensor([[0]]), randn(1, 1, 1, 64), randn(1, 1, 1, 64))


BAD_LABELS = [
    # (labels keyword arguments for write at positions [[2, 3]], exception, words of the message)
    ({"order": torch.tensor([[0.5, 1.5]])}, TypeError, ["order", "torch.float32"]),
    ({"order": torch.zeros(1, 3, dtype=torch.int32)}, ValueError, ["order", "[1, 3]"]),
    ({"group": 2**31}, ValueError, ["group", str(2**31)]),  # would become UNWRITTEN_GROUP
]


@pytest.mark.parametrize("labels, exc, words", BAD_LABELS, ids=("float", "shape", "int32_range"))
def test_write_bad_labels_raise_and_change_nothing(labels, exc, words):
    cache = KVCache(1, 1, 10, 1, 64, torch.float32, "cpu")
    with pytest.raises(exc) as info:
        cache.write(0, torch.tensor([[2, 3]]), randn(1, 2, 1, 64), randn(1, 2, 1, 64), **labels)
    for word in words:
        assert word in str(info.value)
    assert not cache.k.any() and not cache.v.any(), "K/V were written although the call raised"
    assert cache.lengths.tolist() == [0]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_attend_hides_unwritten_slots(dtype):
    batch, max_len, kv_heads, q_heads, head_dim = 2, 24, 2, 4, 64
    cache = KVCache(2, batch, max_len, kv_heads, head_dim, dtype, "cpu")
    # Garbage in every slot, then forgotten: reset keeps the bits but must hide them.
    everywhere = torch.arange(max_len).expand(batch, max_len)
    garbage = randn(batch, max_len, kv_heads, head_dim, seed=30, dtype=dtype) * 50
    cache.write(1, everywhere, garbage, garbage, order=0, group=0)
    cache.reset()

    g = torch.Generator().manual_seed(31)
    slots = [{}, {}]
    for step, n in enumerate((5, 3, 4)):
        pos = unique_positions(batch, 18, n, seed=40 + step)  # slots 18.. stay unwritten (beyond lengths)
        k, v = randn(batch, n, kv_heads, head_dim, seed=50 + step, dtype=dtype), randn(batch, n, kv_heads, head_dim, seed=60 + step, dtype=dtype)
        order = torch.randint(0, 4, (batch, n), generator=g, dtype=torch.int32)
        group = torch.randint(0, 4, (batch, n), generator=g, dtype=torch.int32)
        cache.write(1, pos, k, v, order=order, group=group)
        record(slots, pos, k, v, order, group)
    assert cache.lengths.tolist() == [max(s) + 1 for s in slots]
    holes = [set(range(max(s) + 1)) - set(s) for s in slots]
    assert all(holes), "the test needs unwritten slots below lengths"

    q = randn(batch, 7, q_heads, head_dim, seed=70, dtype=dtype)
    q_order = torch.randint(0, 5, (batch, 7), generator=g, dtype=torch.int32)
    q_group = torch.randint(0, 5, (1, 7), generator=g, dtype=torch.int32)  # batch-1 labels broadcast
    out = cache.attend(1, q, q_order, q_group)
    out_lse = cache.attend(1, q, q_order, q_group, return_lse=True, scale=0.1)

    # GQA: query head h reads kv head h // 2; the explicit reference repeats K/V itself.
    expected = explicit_attention(q, q_order, q_group, slots, max_len)
    expected_scaled = explicit_attention(q, q_order, q_group, slots, max_len, scale=0.1)
    assert out.shape == q.shape and out.dtype == dtype and not out.isnan().any()
    assert isinstance(out_lse, tuple) and out_lse[1].shape == (batch, q_heads, 7)
    if dtype == torch.float32:
        assert_fp32_close(out.double(), expected, "attend")
        assert_fp32_close(out_lse[0].double(), expected_scaled, "attend scale=0.1")
    else:
        k, v, bias = explicit_inputs(q, q_order, q_group, slots, max_len)
        assert_lowp_attention_close(out, q, k, v, expected, "attend", bias=bias)
        assert_lowp_attention_close(out_lse[0], q, k, v, expected_scaled, "attend scale=0.1", bias=bias, scale=0.1)


# ---------------------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_cuda_matches_cpu_and_validate_false_has_no_sync(dtype):
    k_cache, v_cache, k_new, v_new, positions = make_case(4, 97, 3, 128, 9, dtype=dtype, device="cuda")
    positions[0, 0], positions[2, 3] = -1, 97  # skipped with validate=False
    k_cpu, v_cpu = k_cache.cpu(), v_cache.cpu()
    kv_scatter_(k_cpu, v_cpu, k_new.cpu(), v_new.cpu(), positions.cpu(), validate=False)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        kv_scatter_(k_cache, v_cache, k_new, v_new, positions, validate=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_bits_equal(k_cache.cpu(), k_cpu, "k_cache")
    assert_bits_equal(v_cache.cpu(), v_cpu, "v_cache")


@pytest.mark.cuda
def test_cuda_strided_views_in_place():
    k_buf = randn(3, 2, 4, 50, 64, dtype=torch.bfloat16, device="cuda")  # [layers, B, H, Lmax, D]
    v_buf = randn(3, 2, 4, 50, 64, dtype=torch.bfloat16, seed=1, device="cuda")
    k_cache, v_cache = k_buf[1].transpose(1, 2), v_buf[1].transpose(1, 2)
    k_new = randn(2, 6, 4, 64, dtype=torch.bfloat16, seed=2, device="cuda")
    v_new = randn(2, 6, 4, 64, dtype=torch.bfloat16, seed=3, device="cuda")
    positions = unique_positions(2, 50, 6, torch.int32, device="cuda")
    k_ref, v_ref = k_buf.cpu(), v_buf.cpu()
    dlmfuse.reference.kv_scatter_(k_ref[1].transpose(1, 2), v_ref[1].transpose(1, 2), k_new.cpu(), v_new.cpu(), positions.cpu())
    ptr = k_cache.data_ptr()
    kv_scatter_(k_cache, v_cache, k_new, v_new, positions)
    assert k_cache.data_ptr() == ptr
    assert_bits_equal(k_buf.cpu(), k_ref, "k buffer")
    assert_bits_equal(v_buf.cpu(), v_ref, "v buffer")


@pytest.mark.cuda
def test_cuda_graph_capture_of_kv_scatter():
    k_cache, v_cache, k_new, v_new, positions = make_case(2, 64, 2, 128, 8, dtype=torch.bfloat16, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the capture
        kv_scatter_(k_cache, v_cache, k_new, v_new, positions, validate=False)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kv_scatter_(k_cache, v_cache, k_new, v_new, positions, validate=False)
    for seed in (1, 2):
        new = make_case(2, 64, 2, 128, 8, dtype=torch.bfloat16, seed=seed * 10, device="cuda")
        for dst, src in zip((k_cache, v_cache, k_new, v_new, positions), new):
            dst.copy_(src)
        positions[1, 0] = 64  # out of range: skipped
        k_ref, v_ref = k_cache.cpu(), v_cache.cpu()
        dlmfuse.reference.kv_scatter_(k_ref, v_ref, k_new.cpu(), v_new.cpu(), positions.cpu(), validate=False)
        graph.replay()
        torch.cuda.synchronize()
        assert_bits_equal(k_cache.cpu(), k_ref, "k_cache")
        assert_bits_equal(v_cache.cpu(), v_ref, "v_cache")


def test_write_without_length_update():
    """update_lengths=False (a model's later layers) writes K/V only; lengths stay as they were."""
    cache = KVCache(2, 2, 16, 1, 8, torch.float32, "cpu")
    pos = unique_positions(2, 12, 3, seed=4)
    k, v = randn(2, 3, 1, 8, seed=5), randn(2, 3, 1, 8, seed=6)
    cache.write(0, pos, k, v, order=0, group=0)
    lengths, order = cache.lengths.clone(), cache.k_order.clone()
    cache.write(1, pos, k * 2, v * 2, update_lengths=False)
    assert torch.equal(cache.lengths, lengths) and torch.equal(cache.k_order, order)
    assert torch.equal(cache.k[1].gather(1, pos[:, :, None, None].expand(2, 3, 1, 8)), k * 2)
    fresh = KVCache(1, 2, 16, 1, 8, torch.float32, "cpu")
    fresh.write(0, pos, k, v, update_lengths=False)
    assert fresh.lengths.tolist() == [0, 0], "nothing was marked written"


def host_reads(log: DispatchLog) -> int:
    """Host reads of tensor values (``.item()``, ``bool(t)``, ``int(t)``): device syncs on CUDA."""
    return log.ops.count(str(torch.ops.aten._local_scalar_dense.default))


def test_attend_does_not_read_lengths_back():
    """KVCache.attend passes the cache's own lengths (in range by construction) without reading
    their values: on CUDA that read would be a device sync per layer of every denoising step.
    Public attention with the same kv_lens still checks them (and so reads them)."""
    cache = KVCache(1, 2, 16, 2, 64, torch.float32, "cpu")
    pos = unique_positions(2, 12, 4)
    cache.write(0, pos, randn(2, 4, 2, 64), randn(2, 4, 2, 64), order=0, group=0)
    q, labels = randn(2, 3, 2, 64, seed=2), torch.ones(1, 3, dtype=torch.int32)
    with DispatchLog() as log:
        out = cache.attend(0, q, labels, labels)
    assert host_reads(log) == 0
    view = cache.view(0)
    with DispatchLog() as log:
        expected = dlmfuse.attention(q, view.k, view.v, mask=cache.mask(labels, labels), kv_lens=view.kv_lens)
    assert host_reads(log) > 0, "the public op's kv_lens check should read the values (control)"
    assert torch.equal(out, expected)
    bad = torch.tensor([3, 17], dtype=torch.int32)
    with pytest.raises(ValueError, match="kv_lens"):
        dlmfuse.attention(q, view.k, view.v, kv_lens=bad)


@pytest.mark.cuda
def test_cuda_kv_cache_attend_has_no_sync():
    cache = KVCache(1, 2, 32, 2, 64, torch.bfloat16, "cuda")
    cache.write(0, unique_positions(2, 20, 6, device="cuda"), randn(2, 6, 2, 64, dtype=torch.bfloat16, device="cuda"),
                randn(2, 6, 2, 64, dtype=torch.bfloat16, seed=1, device="cuda"), order=0, group=0, validate=False)
    q = randn(2, 3, 2, 64, dtype=torch.bfloat16, seed=3, device="cuda")
    labels = torch.ones(1, 3, dtype=torch.int32, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cache.attend(0, q, labels, labels)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
def test_cuda_kv_cache_attend():
    cache = KVCache(1, 2, 32, 2, 64, torch.bfloat16, "cuda")
    pos = unique_positions(2, 20, 6, device="cuda")
    k = randn(2, 6, 2, 64, dtype=torch.bfloat16, device="cuda")
    cache.write(0, pos, k, k * 0.5, order=0, group=0, validate=False)
    q = randn(2, 3, 2, 64, dtype=torch.bfloat16, seed=3, device="cuda")
    labels = torch.ones(1, 3, dtype=torch.int32, device="cuda")
    out = cache.attend(0, q, labels, labels)
    cpu = KVCache(1, 2, 32, 2, 64, torch.bfloat16, "cpu")
    cpu.write(0, pos.cpu(), k.cpu(), k.cpu() * 0.5, order=0, group=0)
    expected = cpu.attend(0, q.cpu(), labels.cpu(), labels.cpu())
    assert torch.equal(cache.lengths.cpu(), cpu.lengths)
    # Both are within their bound of the float64 attention over the same rows, so within the sum.
    k_all, v_all = cpu.k[0], cpu.v[0]
    mask = cpu.mask(labels.cpu(), labels.cpu())
    ref = dlmfuse.reference.attention(q.cpu(), k_all, v_all, mask=mask, kv_lens=cpu.lengths, out_dtype=torch.float64)
    bound = sum(lowp_attention_bound(q.cpu(), k_all, v_all, ref, rounded_p=rounded, mask=mask, kv_lens=cpu.lengths)
                for rounded in (True, False))
    assert ((out.cpu().double() - expected.double()).abs() <= bound).all()
