"""dlmfuse.nn: DenoiserLM against transformers' Llama / Qwen2 (causal mask, float32) and against an
independent float64 forward written here (label masks), plus positions, logits_for rows, the KV-cache
path, weight loading and argument errors.

Models are tiny (hidden 128, 2 layers, 4 heads / 2 kv heads, head_dim 64, vocab 97) with weights
large enough (init_std 0.1, random norm weights and biases) that masks and positions change the
logits a lot.
"""

from __future__ import annotations

import doctest
import math

import pytest
import torch

import dlmfuse
from dlmfuse.nn import DenoiserLM, load_hf_state_dict

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, INTER = 97, 128, 2, 4, 2, 64, 256
FP32_TOL = 2e-5  # relative to max|logits|: float32 forward vs the float64 reference
BF16_ATTENTION_ULPS = 4  # bf16 ulps of max|logits| that attention's one rounding may move the logits
BF16_MODEL_TOL = 2**-5  # relative to max|logits|: a bf16 model (every op in bf16) vs float32 / float64
HF_TOL = 1e-4


def make_model(*, attention_bias=False, tie=False, rope_theta=5000.0, seed=0) -> DenoiserLM:
    torch.manual_seed(seed)
    model = DenoiserLM(VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, INTER, rope_theta, head_dim=HEAD_DIM,
                       attention_bias=attention_bias, tie_word_embeddings=tie, init_std=0.1, rms_norm_eps=1e-5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> DenoiserLM:
    return make_model()


@pytest.fixture(scope="module")
def qwen_like() -> DenoiserLM:
    return make_model(attention_bias=True, tie=True, rope_theta=10000.0, seed=1)


# --------------------------------------------------------------------- independent float64 forward
def reference_logits(model: DenoiserLM, ids, positions=None, dense_mask=None) -> torch.Tensor:
    """float64 forward from the formulas: RMSNorm, RoPE (rotate-half pairs (j, j + D/2) by angle
    pos * theta^(-2j/D)), softmax attention with kv head h // (Hq / Hkv), SwiGLU.
    dense_mask: bool [B or 1, L, L] (True = visible) or None (bidirectional)."""
    c = model.config
    w = {k: v.detach().double() for k, v in model.state_dict().items()}
    B, L = ids.shape
    pos = torch.arange(L).expand(B, L) if positions is None else positions.expand(B, L)
    D = c.head_dim
    j = torch.arange(D // 2, dtype=torch.float64)
    angle = pos.double()[..., None] * c.rope_theta ** (-2.0 * j / D)  # [B, L, D/2]
    cos, sin = angle.cos()[:, :, None], angle.sin()[:, :, None]

    def rms(x, weight):
        return weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + c.rms_norm_eps)

    def linear(x, name):
        y = x @ w[name + ".weight"].T
        return y + w[name + ".bias"] if name + ".bias" in w else y

    def rope(x):
        a, b = x[..., : D // 2], x[..., D // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    x = w["embed_tokens.weight"][ids]
    for i in range(c.num_layers):
        p = f"layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = rope(linear(h, p + "self_attn.q_proj").view(B, L, c.num_heads, D))
        k = rope(linear(h, p + "self_attn.k_proj").view(B, L, c.num_kv_heads, D))
        v = linear(h, p + "self_attn.v_proj").view(B, L, c.num_kv_heads, D)
        kv_head = torch.arange(c.num_heads) // (c.num_heads // c.num_kv_heads)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k[:, :, kv_head]) / math.sqrt(D)
        if dense_mask is not None:
            scores = scores.masked_fill(~dense_mask[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        attn = torch.einsum("bhqk,bkhd->bqhd", probs, v[:, :, kv_head]).reshape(B, L, -1)
        x = x + linear(attn, p + "self_attn.o_proj")
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        gate, up = linear(h, p + "mlp.gate_proj"), linear(h, p + "mlp.up_proj")
        x = x + linear(gate * torch.sigmoid(gate) * up, p + "mlp.down_proj")
    return rms(x, w["norm.weight"]) @ w["lm_head.weight"].T


def assert_close_to(actual, expected, tol=FP32_TOL, name="logits"):
    actual, expected = actual.detach(), expected.detach()
    scale = float(expected.abs().max())
    err = float((actual.double() - expected.double()).abs().max())
    assert err <= tol * scale, f"{name}: max abs error {err:.3g} > {tol} x max|expected| {scale:.3g}"


def random_ids(B, L, seed=0):
    return torch.randint(0, VOCAB, (B, L), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- transformers parity
def _hf_model(kind: str):
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
                  rms_norm_eps=1e-5)
    torch.manual_seed(2)
    if kind == "llama":
        config = transformers.LlamaConfig(head_dim=HEAD_DIM, rope_theta=5000.0, **common)
        hf = transformers.LlamaForCausalLM(config)
    else:  # Qwen2: q/k/v biases, tied embeddings; head_dim = hidden / heads, so 64 needs 2 heads
        common.update(num_attention_heads=2, num_key_value_heads=1)
        config = transformers.Qwen2Config(rope_theta=20000.0, tie_word_embeddings=True, **common)
        hf = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.add_(0.1 * torch.randn_like(p)) if "norm" in name or name.endswith("bias") else p.normal_(0, 0.1)
    return hf.eval(), config


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_matches_transformers_under_causal_mask(kind):
    hf, config = _hf_model(kind)
    model = DenoiserLM.from_hf_state_dict(hf.state_dict(), config).eval()
    if kind == "qwen2":
        assert model.lm_head.weight is model.embed_tokens.weight and model.layers[0].self_attn.q_proj.bias is not None
    ids = random_ids(2, 13)
    with torch.no_grad():
        expected = hf(ids).logits
        got = model(ids, mask=dlmfuse.Mask.causal(13))
        bidirectional = model(ids)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert_close_to(got, expected, HF_TOL)
    assert float((bidirectional - expected)[:, :-1].abs().max()) > 0.1  # the mask matters


# ------------------------------------------------------------------------- float64 reference
def _masks(L):
    is_clean = torch.tensor([[1, 0, 1, 1, 0, 0, 1, 0, 1, 0, 0][:L], [0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0][:L]], dtype=torch.bool)
    rank = torch.stack([torch.randperm(L, generator=torch.Generator().manual_seed(s)) for s in (3, 4)])
    return {
        "bidirectional": None,
        "block_causal": dlmfuse.Mask.block_causal(L, 3, prefix_len=4),
        "clean_and_self": dlmfuse.Mask.clean_and_self(is_clean),
        "eso_A": dlmfuse.Mask.eso(rank, is_clean, "A"),
    }


@pytest.mark.parametrize("family", ["bidirectional", "block_causal", "clean_and_self", "eso_A"])
@pytest.mark.parametrize("arch", ["llama", "qwen_like"])
def test_matches_float64_reference(request, arch, family):
    model = request.getfixturevalue("model" if arch == "llama" else arch)
    mask = _masks(11)[family]
    ids = random_ids(2, 11)
    with torch.no_grad():
        got = model(ids, mask=mask)
    expected = reference_logits(model, ids, dense_mask=None if mask is None else mask.to_dense())
    assert_close_to(got, expected)


def test_positions_default_and_explicit(model):
    ids = random_ids(2, 9)
    with torch.no_grad():
        default = model(ids)
        assert torch.equal(model(ids, positions=torch.arange(9).expand(2, 9)), default)
        assert torch.equal(model(ids, positions=torch.arange(9, dtype=torch.int32)), default)  # [L], int32
        positions = torch.stack([torch.arange(9) + 5, torch.randperm(9, generator=torch.Generator().manual_seed(1)) * 3])
        mask = dlmfuse.Mask.block_causal(9, 4)
        got = model(ids, positions=positions, mask=mask)
    assert_close_to(got, reference_logits(model, ids, positions, mask.to_dense()))
    assert float((got - model(ids, mask=mask).detach()).abs().max()) > 1e-2  # positions matter


@pytest.mark.parametrize("family", ["bidirectional", "block_causal"])
def test_logits_for_rows_equal_full_rows(model, family):
    mask = _masks(11)[family]
    ids = random_ids(2, 11, seed=5)
    rows = torch.tensor([[10, 0, 4, 4], [3, 7, 8, 1]])
    with torch.no_grad():
        full = model(ids, mask=mask)
        sparse = model(ids, mask=mask, logits_for=rows)
    assert sparse.shape == (2, 4, VOCAB)
    assert_close_to(sparse, torch.gather(full, 1, rows[..., None].expand(-1, -1, VOCAB)), 1e-6)


def _cache(B=2, max_len=32, dtype=torch.float32):
    return dlmfuse.KVCache(LAYERS, B, max_len, KV_HEADS, HEAD_DIM, dtype, "cpu")


def test_cache_prefix_then_blocks_equals_block_causal_forward(model):
    """Semi-AR decoding with a prefix cache: the prompt (block 0) is written once, then each block
    is fed alone and attends to the cache; rows equal the full block-causal forward."""
    P, block, L = 5, 3, 11
    ids = random_ids(2, L, seed=7)
    mask = dlmfuse.Mask.block_causal(L, block, prefix_len=P)
    cache = _cache()
    with torch.no_grad():
        full = model(ids, mask=mask)
        start = 0
        for stop in (P, P + block, L):
            rows = torch.arange(start, stop)
            sub = dlmfuse.Mask(*(t[:, rows] for t in (mask.q_order, mask.q_group, mask.k_order, mask.k_group)))
            got = model(ids[:, rows], positions=rows, mask=sub, cache=cache)
            assert_close_to(got, full[:, rows], 1e-5, name=f"rows {start}:{stop}")
            start = stop
    assert cache.lengths.tolist() == [L, L]


def test_cache_dual_refeed_per_row_positions(model):
    """Dual cache: after a full bidirectional forward fills the cache, re-feeding any rows (different
    positions per batch row, logits for some of them) reproduces the full forward's rows."""
    L = 12
    ids = random_ids(2, L, seed=9)
    cache = _cache()
    with torch.no_grad():
        full = model(ids)
        assert_close_to(model(ids, cache=cache), full, 1e-5, name="refresh")
        positions = torch.tensor([[4, 5, 6, 7], [8, 2, 11, 0]])
        fed = torch.gather(ids, 1, positions)
        got = model(fed, positions=positions, cache=cache)
        some = model(fed, positions=positions, cache=cache, logits_for=torch.tensor([[3], [0]]))
    expected = torch.gather(full, 1, positions[..., None].expand(-1, -1, VOCAB))
    assert_close_to(got, expected, 1e-5)
    assert_close_to(some, torch.stack([expected[0, 3], expected[1, 0]])[:, None], 1e-5)


def test_reference_backend_gives_the_same_logits(model, monkeypatch):
    ids, mask = random_ids(2, 10), dlmfuse.Mask.block_causal(10, 4, prefix_len=2)
    with torch.no_grad():
        native = model(ids, mask=mask)
        monkeypatch.setenv("DLMFUSE_BACKEND", "reference")
        assert_close_to(model(ids, mask=mask), native, 1e-5)


def test_bf16_model_within_dtype_tolerance(model, monkeypatch):
    """dlmfuse's part of a bf16 model's error is its attention: against the same bf16 model with
    exact attention (the float64 reference, rounded once), the logits may move by the few ulps one
    attention rounding can become downstream (1.2 ulps of max|logits| seen); the model as a whole
    errs by bf16 arithmetic everywhere (1-2.4% of max|logits| seen against float64)."""
    ids, mask = random_ids(1, 10), dlmfuse.Mask.block_causal(10, 4)
    low = make_model().to(torch.bfloat16)
    with torch.no_grad():
        got = low(ids, mask=mask)
        monkeypatch.setenv("DLMFUSE_BACKEND", "reference")
        exact_attention = low(ids, mask=mask)
    assert got.dtype == torch.bfloat16
    assert_close_to(got, exact_attention, BF16_ATTENTION_ULPS * 2.0**-8, "logits vs exact attention")
    assert_close_to(got, reference_logits(model, ids, dense_mask=mask.to_dense()), BF16_MODEL_TOL)


# ----------------------------------------------------------------------------------- loading
def _hf_style_state_dict(model: DenoiserLM) -> dict:
    return {("lm_head.weight" if k == "lm_head.weight" else "model." + k): v.clone()
            for k, v in model.state_dict().items()}


def test_load_roundtrip_and_tied_head(model, qwen_like):
    fresh = make_model(seed=5)
    load_hf_state_dict(fresh, _hf_style_state_dict(model))
    ids = random_ids(1, 6)
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))
    tied_sd = {k: v for k, v in _hf_style_state_dict(qwen_like).items() if k != "lm_head.weight"}
    tied = make_model(attention_bias=True, tie=True, seed=6)
    load_hf_state_dict(tied, tied_sd)
    assert torch.equal(tied.lm_head.weight, qwen_like.embed_tokens.weight)


def test_load_errors_name_keys_and_shapes(model):
    target = make_model(seed=3)
    sd = _hf_style_state_dict(model)
    missing = {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match=r"missing keys .*layers\.1\.mlp\.up_proj\.weight"):
        load_hf_state_dict(target, missing)
    with pytest.raises(ValueError, match=r"unexpected keys .*model\.layers\.0\.self_attn\.q_norm\.weight"):
        load_hf_state_dict(target, {**sd, "model.layers.0.self_attn.q_norm.weight": torch.ones(64)})
    bad = {**sd, "model.layers.0.self_attn.k_proj.weight": torch.zeros(64, HIDDEN)}
    with pytest.raises(ValueError, match=r"k_proj\.weight'? has shape \[64, 128\] .* expects \[128, 128\]"):
        load_hf_state_dict(target, bad)
    before = target.layers[0].self_attn.q_proj.weight.clone()
    assert torch.equal(target.layers[0].self_attn.q_proj.weight, before)  # nothing written on error
    tied = make_model(tie=True, seed=4)
    with pytest.raises(ValueError, match="ties lm_head"):
        load_hf_state_dict(tied, sd)
    with pytest.raises(TypeError, match="state_dict must be a mapping .* got list"):
        load_hf_state_dict(target, list(sd.items()))
    on_meta = DenoiserLM(VOCAB, HIDDEN, 2, 2, 2, INTER, device="meta")
    with pytest.raises(ValueError, match="meta device"):
        load_hf_state_dict(on_meta, sd)


def test_from_hf_config_keeps_padding_idx_and_initializer_range():
    """As transformers' Llama / Qwen2: the pad token's embedding row starts at 0 and gets no
    gradient; random init uses initializer_range."""
    config = dict(model_type="llama", vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, intermediate_size=INTER, pad_token_id=3,
                  initializer_range=0.5)
    m = DenoiserLM.from_hf_config(config)
    assert m.embed_tokens.padding_idx == 3 and not m.embed_tokens.weight[3].any()
    assert 0.4 < float(m.layers[0].mlp.up_proj.weight.detach().std()) < 0.6
    m(torch.tensor([[3, 1, 2, 3]])).sum().backward()
    grad = m.embed_tokens.weight.grad
    assert not grad[3].any() and grad[1].any()
    assert DenoiserLM.from_hf_config({**config, "pad_token_id": None}).embed_tokens.padding_idx is None
    assert float(DenoiserLM.from_hf_config(config, init_std=0.01).layers[0].mlp.up_proj.weight.detach().std()) < 0.02
    with pytest.raises(ValueError, match=rf"pad_token_id must be None or an int in \[0, vocab_size={VOCAB}\)"):
        DenoiserLM(VOCAB, HIDDEN, 1, 2, 2, INTER, pad_token_id=VOCAB)


def test_load_from_the_transformers_model_itself():
    """The transformers model can be passed where its state dict is expected."""
    hf, config = _hf_model("llama")
    from_module = DenoiserLM.from_hf_state_dict(hf, config).eval()
    from_dict = DenoiserLM.from_hf_state_dict(hf.state_dict(), config).eval()
    ids = random_ids(1, 5)
    with torch.no_grad():
        assert torch.equal(from_module(ids), from_dict(ids))


def test_from_hf_config_sliding_window_from_transformers_layer_types():
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, use_sliding_window=True, sliding_window=8)
    # Qwen2's window starts at layer max_window_layers: none slides at 2, layer 1 does at 1.
    assert DenoiserLM.from_hf_config(transformers.Qwen2Config(max_window_layers=2, **common)).config.num_layers == 2
    with pytest.raises(ValueError, match="sliding"):
        DenoiserLM.from_hf_config(transformers.Qwen2Config(max_window_layers=1, **common))


def test_from_hf_config_dict_and_unsupported_settings():
    config = dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, intermediate_size=INTER, rope_theta=1e6,
                  tie_word_embeddings=True)
    m = DenoiserLM.from_hf_config(config)
    assert (m.config.head_dim, m.config.rope_theta, m.config.attention_bias, m.config.attention_out_bias) == (64, 1e6, True, False)
    with pytest.raises(ValueError, match="rope_type 'linear' unsupported"):
        DenoiserLM.from_hf_config({**config, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    with pytest.raises(ValueError, match="model_type 'gpt2' unsupported"):
        DenoiserLM.from_hf_config({**config, "model_type": "gpt2"})
    with pytest.raises(ValueError, match="no 'vocab_size'"):
        DenoiserLM.from_hf_config({k: v for k, v in config.items() if k != "vocab_size"})
    with pytest.raises(ValueError, match="num_key_value_heads must be positive, got 0"):
        DenoiserLM.from_hf_config({**config, "num_key_value_heads": 0})
    assert DenoiserLM.from_hf_config({**config, "num_key_value_heads": None}).config.num_kv_heads == 2  # MHA
    # Sliding windows: refused where a layer slides, accepted where the window starts past the last layer.
    with pytest.raises(ValueError, match=r"slides layers 0 to 0"):
        DenoiserLM.from_hf_config({**config, "use_sliding_window": True, "sliding_window": 8})
    assert DenoiserLM.from_hf_config({**config, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1})
    assert DenoiserLM.from_hf_config({**config, "use_sliding_window": True, "sliding_window": None})
    with pytest.raises(ValueError, match=r"layer types \['sliding_attention'\] unsupported \(layers \[0\]"):
        DenoiserLM.from_hf_config({**config, "layer_types": ["sliding_attention"]})
    assert DenoiserLM.from_hf_config({**config, "use_sliding_window": True, "layer_types": ["full_attention"]})
    with pytest.raises(ValueError, match="head_dim must be >= 1"):
        DenoiserLM(VOCAB, 2, 1, 4, 4, INTER)  # hidden 2 over 4 heads


# ------------------------------------------------------------------------------------ errors
def test_forward_errors_name_received_values(model):
    ids = random_ids(2, 6)
    cases = [
        (TypeError, "input_ids must be int64 .* got torch.float32", dict(input_ids=ids.float())),
        (ValueError, r"input_ids must have shape \[B, L\] .* got \[6\]", dict(input_ids=ids[0])),
        (ValueError, r"positions must have shape \[B=2, L=6\] .* got \[2, 5\]", dict(positions=torch.zeros(2, 5, dtype=torch.long))),
        (TypeError, "positions must be int64 .* got torch.float32", dict(positions=torch.zeros(2, 6))),
        (ValueError, r"logits_for values must lie in \[0, L=6\), got range \[0, 6\]", dict(logits_for=torch.tensor([[0], [6]]))),
        (ValueError, r"logits_for must have shape \[B=2, n\], got \[3\]", dict(logits_for=torch.tensor([0, 1, 2]))),
        (ValueError, rf"input_ids must be token ids in \[0, vocab_size={VOCAB}\), got range \[0, {VOCAB}\]",
         dict(input_ids=torch.cat([ids[:, :5], torch.tensor([[0], [VOCAB]])], dim=1))),
        (ValueError, r"input_ids must be token ids in \[0, vocab_size=\d+\), got range \[-1, ",
         dict(input_ids=torch.cat([ids[:, :5], torch.tensor([[-1], [0]])], dim=1), logits_for=torch.tensor([[0], [1]]))),
        (ValueError, "mask must have q and k labels for the L=6", dict(mask=dlmfuse.Mask.causal(7))),
        (TypeError, "mask must be a dlmfuse.Mask", dict(mask=torch.ones(6, 6, dtype=torch.bool))),
        (ValueError, "cache has 1 layers but the model has 2",
         dict(cache=dlmfuse.KVCache(1, 2, 16, KV_HEADS, HEAD_DIM, torch.float32, "cpu"))),
        (ValueError, "cache has layers=2, batch=2, kv_heads=4", dict(cache=dlmfuse.KVCache(2, 2, 16, 4, HEAD_DIM, torch.float32, "cpu"))),
        (TypeError, "cache dtype torch.bfloat16", dict(cache=_cache(dtype=torch.bfloat16))),
    ]
    for error, message, kwargs in cases:
        kwargs = {"input_ids": ids, **kwargs}
        with pytest.raises(error, match=message), torch.no_grad():
            model(**kwargs)
    with pytest.raises(ValueError, match=r"= 32 is outside \[0, Lmax=32\)"), torch.no_grad():  # cache slots are range-checked
        model(ids, positions=torch.arange(30, 36), cache=_cache())
    with pytest.raises(ValueError, match="num_heads .4. must be a positive multiple of num_kv_heads .3."):
        DenoiserLM(VOCAB, HIDDEN, 1, 4, 3, INTER)


def test_cache_path_refuses_grad_mode_and_autocast_runs(model):
    """With grad enabled the cache write would cut the graph to k_proj / v_proj silently: it
    raises instead. Under autocast (bf16 projections, fp32 RoPE tables) q and k stay in v's dtype."""
    ids = random_ids(2, 6)
    with pytest.raises(RuntimeError, match="cache write is not differentiable; run it under torch.no_grad"):
        model(ids, cache=_cache())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids)
        with pytest.MonkeyPatch.context() as env:
            env.setenv("DLMFUSE_BACKEND", "reference")
            exact_attention = model(ids)
    with torch.no_grad():
        expected = model(ids)
    assert logits.dtype == torch.bfloat16
    assert_close_to(logits, exact_attention, BF16_ATTENTION_ULPS * 2.0**-8, "autocast logits vs exact attention")
    assert_close_to(logits, expected, BF16_MODEL_TOL, "autocast logits vs float32")
    attention = model.layers[0].self_attn
    x = torch.randn(2, 6, attention.q_proj.in_features)
    with torch.no_grad():
        torch.testing.assert_close(attention(x, torch.arange(6)), attention(x, torch.arange(6)[None].expand(2, 6)))


def test_docstring_examples():
    import dlmfuse.nn.model
    result = doctest.testmod(dlmfuse.nn.model, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
