"""attn_implementation="dlmfuse": tiny random transformers Llama / Qwen2 models give SDPA's logits
under the masks transformers builds (causal, left padding, KV-cache decoding) and under custom 4D
masks (bool and additive float); the mask analysis itself; importing dlmfuse never imports
transformers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import dlmfuse
from dlmfuse.integrations import transformers as dlmfuse_hf

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN, INTER = 101, 128, 256
TOL = 2e-5  # relative to max|logits|, float32


@pytest.fixture(scope="module", autouse=True)
def registered():
    dlmfuse_hf.register()
    dlmfuse_hf.register()  # idempotent


def _model(kind: str):
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2,
                  max_position_embeddings=64, attn_implementation="sdpa")
    torch.manual_seed(0)
    if kind == "llama":  # GQA 4/2, head_dim 64
        config = transformers.LlamaConfig(num_attention_heads=4, num_key_value_heads=2, head_dim=64, **common)
        model = transformers.LlamaForCausalLM(config)
    else:  # q/k/v biases, MQA 2/1, head_dim 128 / 2 = 64
        config = transformers.Qwen2Config(num_attention_heads=2, num_key_value_heads=1, **common)
        model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.1 * torch.randn_like(p)) if "norm" in name or name.endswith("bias") else p.normal_(0, 0.1)
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request):
    return _model(request.param)


def _logits(model, implementation, ids, **kwargs):
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model(ids, **kwargs).logits


def _assert_close(actual, expected, name="logits"):
    scale = float(expected.abs().max())
    err = float((actual - expected).abs().max())
    assert err <= TOL * scale, f"{name}: max abs error {err:.3g} > {TOL} x {scale:.3g}"


def _ids(B, L, seed=0):
    return torch.randint(0, VOCAB, (B, L), generator=torch.Generator().manual_seed(seed))


def test_causal_matches_sdpa(model):
    ids = _ids(2, 17)
    expected = _logits(model, "sdpa", ids)
    _assert_close(_logits(model, "dlmfuse", ids), expected)
    assert model.config._attn_implementation == "dlmfuse"


def test_left_padding_matches_sdpa(model):
    ids = _ids(3, 12, seed=1)
    attention_mask = torch.ones(3, 12, dtype=torch.long)
    attention_mask[0, :5] = 0
    attention_mask[2, :1] = 0
    expected = _logits(model, "sdpa", ids, attention_mask=attention_mask)
    got = _logits(model, "dlmfuse", ids, attention_mask=attention_mask)
    real = attention_mask.bool()
    _assert_close(got[real], expected[real])
    assert torch.isfinite(got).all()  # padded query rows see no key: output 0, never NaN


def test_greedy_generate_with_padding_and_cache_matches_sdpa(model):
    ids = _ids(2, 7, seed=2)
    attention_mask = torch.ones(2, 7, dtype=torch.long)
    attention_mask[1, :3] = 0
    outputs = {}
    for implementation in ("sdpa", "dlmfuse"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            outputs[implementation] = model.generate(ids, attention_mask=attention_mask, max_new_tokens=4,
                                                     do_sample=False, pad_token_id=0)
    assert torch.equal(outputs["dlmfuse"], outputs["sdpa"])


def _block_causal_bool(B, L, block):
    return dlmfuse.Mask.block_causal(L, block).to_dense()[:, None].expand(B, 1, L, L)


def test_custom_4d_masks_match_sdpa(model):
    """A block-causal bool mask (not causal: goes through the bias path) and an additive float mask
    with a per-head random bias, passed straight to the model."""
    B, L = 2, 12
    ids = _ids(B, L, seed=3)
    bool_mask = _block_causal_bool(B, L, 4).clone()
    bool_mask[1, 0, :, 2] = False  # a per-batch custom hole
    _assert_close(_logits(model, "dlmfuse", ids, attention_mask=bool_mask),
                  _logits(model, "sdpa", ids, attention_mask=bool_mask), "bool 4D")
    heads = model.config.num_attention_heads
    float_mask = torch.randn(B, heads, L, L, generator=torch.Generator().manual_seed(4))
    float_mask = float_mask.masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    _assert_close(_logits(model, "dlmfuse", ids, attention_mask=float_mask),
                  _logits(model, "sdpa", ids, attention_mask=float_mask), "float 4D")
    bidirectional = torch.ones(B, 1, L, L, dtype=torch.bool)
    _assert_close(_logits(model, "dlmfuse", ids, attention_mask=bidirectional),
                  _logits(model, "sdpa", ids, attention_mask=bidirectional), "bidirectional 4D")


def test_from_config_with_dlmfuse_implementation():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="dlmfuse")
    assert model.config._attn_implementation == "dlmfuse"


# ------------------------------------------------------------------------- the mask analysis
class _Module(torch.nn.Module):
    is_causal = True


@pytest.mark.parametrize("q_len, k_len, offset", [(6, 6, 0), (1, 9, 8), (4, 9, 5), (4, 9, 0)])
def test_causal_padding_masks_become_labels(q_len, k_len, offset):
    key_valid = torch.ones(2, k_len, dtype=torch.bool)
    key_valid[0, :3] = False
    q_idx, k_idx = torch.arange(q_len)[:, None], torch.arange(k_len)[None]
    bool_mask = ((k_idx <= q_idx + offset)[None] & key_valid[:, None])[:, None]
    labels = dlmfuse_hf._recognise_causal_padding(bool_mask, q_len, k_len)
    assert labels is not None
    assert torch.equal(labels.to_dense(), bool_mask[:, 0])


def test_bidirectional_padding_masks_become_labels():
    """The mask a bidirectional model (an encoder; LLaDA, Dream) gets for a padded batch."""
    key_valid = torch.ones(2, 7, dtype=torch.bool)
    key_valid[1, :2] = False
    bool_mask = key_valid[:, None, None, :].expand(2, 1, 5, 7)
    labels = dlmfuse_hf._recognise_causal_padding(bool_mask, 5, 7)
    assert labels is not None
    assert torch.equal(labels.to_dense(), bool_mask[:, 0])
    q, k, v = (torch.randn(2, h, n, 64, generator=torch.Generator().manual_seed(h + n)) for h, n in ((2, 5), (2, 7), (2, 7)))
    out, _ = dlmfuse_hf.attention_forward(_Module(), q, k, v, bool_mask)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask).transpose(1, 2)
    _assert_close(out, expected, "bidirectional padding")


def test_alternating_masks_are_analysed_once_each(monkeypatch):
    """Layers alternating between two masks (Gemma's sliding and full ones) analyse each once."""
    calls = []
    analyse = dlmfuse_hf._recognise_causal_padding
    monkeypatch.setattr(dlmfuse_hf, "_recognise_causal_padding", lambda *args: calls.append(1) or analyse(*args))
    full = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    window = full & torch.ones(6, 6, dtype=torch.bool).triu(-2)
    q, k, v = (torch.randn(1, 2, 6, 64) for _ in range(3))
    for _ in range(3):
        for mask in (window, full):
            dlmfuse_hf.attention_forward(_Module(), q, k, v, mask)
    assert len(calls) == 2


def test_other_masks_are_not_taken_for_causal():
    assert dlmfuse_hf._recognise_causal_padding(_block_causal_bool(2, 8, 4), 8, 8) is None
    per_head = torch.ones(1, 2, 4, 4, dtype=torch.bool).tril()
    assert dlmfuse_hf._recognise_causal_padding(per_head, 4, 4) is None


def test_attention_forward_direct_calls():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, h, 5, 64, generator=g) for h in (4, 2, 2))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def expected(**kwargs):
        return sdpa(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), **kwargs).transpose(1, 2)

    out, weights = dlmfuse_hf.attention_forward(_Module(), q, k, v, None)
    assert weights is None and out.shape == (1, 5, 4, 64)
    _assert_close(out, expected(is_causal=True), "causal")
    out, _ = dlmfuse_hf.attention_forward(_Module(), q, k, v, None, is_causal=False, scaling=0.3)
    _assert_close(out, expected(scale=0.3), "bidirectional")
    with pytest.raises(ValueError, match="dropout=0.1 unsupported"):
        dlmfuse_hf.attention_forward(_Module(), q, k, v, None, dropout=0.1)
    with pytest.raises(ValueError, match="softcap unsupported"):
        dlmfuse_hf.attention_forward(_Module(), q, k, v, None, softcap=30.0)


def test_direct_calls_match_transformers_sdpa_function():
    """Against transformers' own SDPA attention function: T5's position_bias with no mask, a bool
    mask and a float mask; a float mask with torch.finfo(float32).min on every key of a row (the
    mean of the values there, not 0); sparse top-k indices and output_attentions."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class Bidirectional(torch.nn.Module):
        is_causal = False
        num_key_value_groups = 1

    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 2, 5, 64, generator=g) for _ in range(3))
    position_bias = 3 * torch.randn(1, 2, 5, 5, generator=g)
    holes = torch.rand(2, 1, 5, 5, generator=g) > 0.3
    holes[..., 0] = True  # every row sees a key
    floats = torch.zeros(2, 1, 5, 5).masked_fill(~holes, torch.finfo(torch.float32).min)
    for mask in (None, holes, floats):
        for extra in ({"position_bias": position_bias}, {}):
            expected, _ = sdpa_attention_forward(Bidirectional(), q, k, v, mask, scaling=1.0, **extra)
            out, _ = dlmfuse_hf.attention_forward(Bidirectional(), q, k, v, mask, scaling=1.0, **extra)
            _assert_close(out, expected, f"mask {None if mask is None else mask.dtype}, {list(extra)}")
    all_masked = floats.clone()
    all_masked[1, 0, 3] = torch.finfo(torch.float32).min
    expected, _ = sdpa_attention_forward(Bidirectional(), q, k, v, all_masked, scaling=1.0)
    out, _ = dlmfuse_hf.attention_forward(Bidirectional(), q, k, v, all_masked, scaling=1.0)
    _assert_close(out, expected, "a row masked with finfo.min everywhere")
    torch.testing.assert_close(out[1, 3], v[1].mean(dim=1))  # [H, D]: every key weighs the same
    with pytest.raises(ValueError, match="indices unsupported"):
        dlmfuse_hf.attention_forward(Bidirectional(), q, k, v, None, indices=torch.zeros(2, 5, 2, dtype=torch.long))
    dlmfuse_hf._warned[0] = False
    with pytest.warns(UserWarning, match="output_attentions=True gives no attention weights"):
        dlmfuse_hf.attention_forward(Bidirectional(), q, k, v, None, output_attentions=True)


@pytest.mark.slow
def test_t5_position_bias_matches_sdpa():
    """T5 passes its relative-position bias as position_bias: dlmfuse adds it, as SDPA does."""
    config = transformers.T5Config(vocab_size=VOCAB, d_model=64, d_kv=32, d_ff=128, num_layers=2, num_heads=2,
                                   relative_attention_num_buckets=8, decoder_start_token_id=0)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    ids = _ids(2, 9, seed=7)
    padding = torch.ones(2, 9, dtype=torch.long)
    padding[1, 6:] = 0
    decoder_ids = _ids(2, 4, seed=8)
    logits = {}
    for implementation in ("dlmfuse", "sdpa"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            logits[implementation] = model(input_ids=ids, attention_mask=padding, decoder_input_ids=decoder_ids).logits
    _assert_close(logits["dlmfuse"], logits["sdpa"], "T5 logits")


@pytest.mark.slow
def test_compiled_fullgraph_with_a_padding_mask(model):
    """Under torch.compile(fullgraph=True) a bool padding mask takes the bias path (its analysis
    reads values) instead of breaking the graph."""
    B, L = 2, 10
    ids = _ids(B, L, seed=9)
    padding = torch.ones(B, L, dtype=torch.long)
    padding[0, :3] = 0
    expected = _logits(model, "sdpa", ids, attention_mask=padding)
    model.set_attn_implementation("dlmfuse")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got = compiled(ids, attention_mask=padding).logits
    _assert_close(got[:, 3:], expected[:, 3:], "compiled with padding")  # real positions


def test_importing_dlmfuse_does_not_import_transformers():
    code = ("import sys, dlmfuse, dlmfuse.nn, dlmfuse.integrations.transformers; "
            "assert 'transformers' not in sys.modules, 'transformers imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_integration_reachable_as_attribute_without_import():
    """DESIGN.md spells it dlmfuse.integrations.transformers.register(): no explicit import."""
    code = (
        "import sys, dlmfuse\n"
        "assert 'transformers' not in sys.modules\n"
        "dlmfuse.integrations.transformers.register()\n"
        "assert 'transformers' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tiny_head_dim_matches_sdpa(family):
    """Tiny test models often have head_dim 8 or 16: the CPU kernel takes any head_dim <= 256."""
    import transformers

    config_cls, model_cls = ((transformers.LlamaConfig, transformers.LlamaForCausalLM) if family == "llama"
                             else (transformers.Qwen2Config, transformers.Qwen2ForCausalLM))
    config = config_cls(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = model_cls(config).eval()
    ids = torch.randint(0, 100, (2, 11))
    attention_mask = torch.ones(2, 11, dtype=torch.long)
    attention_mask[1, :3] = 0  # left padding
    dlmfuse_hf.register()
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        expected = model(ids, attention_mask=attention_mask).logits
        model.set_attn_implementation("dlmfuse")
        got = model(ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1, 3:], expected[1, 3:], rtol=1e-4, atol=1e-5)
