"""DenoiserLM.from_pretrained / save_pretrained on checkpoint directories in the four formats.

LLaDA directories are written here from the published configuration fields and parameter names
(LLaDA-8B's config.json and weight names), filled with random weights, sharded with an index, and
the loaded model's logits are compared with an independent float64 transcription of the LLaDA
architecture (OLMo's "llama" block: RMSNorm, rotate-half RoPE, bidirectional attention, the SwiGLU
ff_out(silu(ff_proj(x)) * up_proj(x)), final ln_f, LM head ff_out or the tied embedding). Llama
and Qwen2 directories are written by transformers itself, Dream's by renaming a Qwen2 one.
"""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

import dlmfuse
from dlmfuse import Mask
from dlmfuse.nn import DenoiserLM

LLADA_CONFIG = {  # the fields of LLaDA-8B's config.json, at a tiny size
    "architectures": ["LLaDAModelLM"], "model_type": "llada", "activation_type": "silu", "alibi": False,
    "attention_layer_norm": False, "block_type": "llama", "d_model": 64, "embedding_size": 56,
    "include_bias": False, "include_qkv_bias": False, "layer_norm_type": "rms", "mlp_hidden_size": 96,
    "mlp_ratio": 4, "n_heads": 4, "n_kv_heads": 2, "n_layers": 2, "rms_norm_eps": 1e-5, "rope": True,
    "rope_theta": 500000.0, "scale_logits": False, "vocab_size": 50, "weight_tying": False,
    "mask_token_id": 49, "max_sequence_length": 4096,
}


def llada_weights(config, seed=0):
    """Random weights with LLaDA's names and shapes (float32)."""
    g = torch.Generator().manual_seed(seed)
    d, heads, kv = config["d_model"], config["n_heads"], config["n_kv_heads"]
    head_dim, hidden, width = d // heads, config["mlp_hidden_size"], config["embedding_size"]

    def w(*shape, std=0.08):
        return torch.randn(*shape, generator=g) * std

    weights = {"model.transformer.wte.weight": w(width, d, std=1.0),
               "model.transformer.ln_f.weight": 1 + w(d, std=0.2)}
    if not config["weight_tying"]:
        weights["model.transformer.ff_out.weight"] = w(width, d)
    for i in range(config["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        weights.update({p + "q_proj.weight": w(d, d), p + "k_proj.weight": w(kv * head_dim, d),
                        p + "v_proj.weight": w(kv * head_dim, d), p + "attn_out.weight": w(d, d),
                        p + "ff_proj.weight": w(hidden, d), p + "up_proj.weight": w(hidden, d),
                        p + "ff_out.weight": w(d, hidden), p + "attn_norm.weight": 1 + w(d, std=0.2),
                        p + "ff_norm.weight": 1 + w(d, std=0.2)})
    return weights


def write_checkpoint(path, config, weights, shards=1):
    """config.json and the weights, in one file or `shards` files with an index."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    names = list(weights)
    if shards == 1:
        save_file(weights, os.path.join(path, "model.safetensors"))
        return
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: weights[n] for n in part}, os.path.join(path, file))
        weight_map.update(dict.fromkeys(part, file))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def llada_logits(config, weights, ids):
    """LLaDA's forward in float64 from its weights, written from the architecture."""
    w = {k: v.double() for k, v in weights.items()}
    d, heads, kv = config["d_model"], config["n_heads"], config["n_kv_heads"]
    head_dim, eps = d // heads, config["rms_norm_eps"]
    B, L = ids.shape

    def rms(x, weight):
        return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    inv_freq = 1.0 / config["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(L, dtype=torch.float64)[:, None] * inv_freq  # [L, D/2]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)

    def rope(x):  # [B, H, L, D], rotate_half
        x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    x = w["model.transformer.wte.weight"][ids]
    for i in range(config["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        h = rms(x, w[p + "attn_norm.weight"])
        q = rope((h @ w[p + "q_proj.weight"].T).view(B, L, heads, head_dim).transpose(1, 2))
        k = rope((h @ w[p + "k_proj.weight"].T).view(B, L, kv, head_dim).transpose(1, 2))
        v = (h @ w[p + "v_proj.weight"].T).view(B, L, kv, head_dim).transpose(1, 2)
        k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), -1) @ v  # bidirectional
        x = x + att.transpose(1, 2).reshape(B, L, d) @ w[p + "attn_out.weight"].T
        h = rms(x, w[p + "ff_norm.weight"])
        gate, up = h @ w[p + "ff_proj.weight"].T, h @ w[p + "up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "ff_out.weight"].T
    x = rms(x, w["model.transformer.ln_f.weight"])
    head = w["model.transformer.wte.weight"] if config["weight_tying"] else w["model.transformer.ff_out.weight"]
    return x @ head.T


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("shards", [1, 3])
def test_llada_checkpoint_matches_the_architecture(tmp_path, tied, shards):
    config = {**LLADA_CONFIG, "weight_tying": tied}
    weights = llada_weights(config, seed=1)
    write_checkpoint(tmp_path, config, weights, shards)
    model = DenoiserLM.from_pretrained(tmp_path)
    assert model.checkpoint_format == "llada" and not model.training
    assert model.embed_tokens.weight.dtype == torch.float32
    ids = torch.randint(0, config["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = model(ids)
    expected = llada_logits(config, weights, ids)
    assert got.shape == (2, 11, config["embedding_size"])  # the padded width of the checkpoint
    scale = float(expected.abs().max())
    assert float((got.double() - expected).abs().max()) <= 1e-4 * scale


def test_llada_loads_in_another_dtype_and_refuses_what_it_cannot_run(tmp_path):
    weights = llada_weights(LLADA_CONFIG)
    write_checkpoint(tmp_path / "ok", LLADA_CONFIG, weights)
    model = DenoiserLM.from_pretrained(tmp_path / "ok", dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(model.lm_head.weight, weights["model.transformer.ff_out.weight"].bfloat16())
    for field, value, words in [("alibi", True, "alibi=True unsupported"),
                                ("attention_layer_norm", True, "attention_layer_norm=True unsupported"),
                                ("rope", False, "rope=False unsupported"),
                                ("layer_norm_type", "default", "layer_norm_type='default' unsupported"),
                                ("block_type", "sequential", "block_type='sequential' unsupported"),
                                ("scale_logits", True, "scale_logits=True unsupported")]:
        write_checkpoint(tmp_path / field, {**LLADA_CONFIG, field: value}, weights)
        with pytest.raises(ValueError, match=words):
            DenoiserLM.from_pretrained(tmp_path / field)


def test_weights_that_do_not_match_the_config_are_named(tmp_path):
    weights = llada_weights(LLADA_CONFIG)
    extra = {**weights, "model.transformer.blocks.0.q_proj.bias": torch.zeros(64)}  # a bias the model lacks
    write_checkpoint(tmp_path / "extra", LLADA_CONFIG, extra)
    with pytest.raises(ValueError, match=r"unexpected weights model.transformer.blocks.0.q_proj.bias"):
        DenoiserLM.from_pretrained(tmp_path / "extra")
    missing = {k: v for k, v in weights.items() if "blocks.1.up_proj" not in k}
    write_checkpoint(tmp_path / "missing", LLADA_CONFIG, missing)
    with pytest.raises(ValueError, match=r"missing parameters layers.1.mlp.up_proj.weight"):
        DenoiserLM.from_pretrained(tmp_path / "missing")
    write_checkpoint(tmp_path / "shape", {**LLADA_CONFIG, "mlp_hidden_size": 80}, weights)
    with pytest.raises(ValueError, match=r"blocks\.\d\.(ff_proj|up_proj|ff_out)\.weight' has shape \[(96, 64|64, 96)\] "
                                         r"but parameter 'layers\.\d\.mlp\.\w+_proj\.weight' expects \[(80, 64|64, 80)\]"):
        DenoiserLM.from_pretrained(tmp_path / "shape")
    write_checkpoint(tmp_path / "arch", {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, weights)
    with pytest.raises(ValueError, match=r"unsupported architecture \(model_type='gpt2'"):
        DenoiserLM.from_pretrained(tmp_path / "arch")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="has no config"):
        DenoiserLM.from_pretrained(tmp_path / "empty")
    with pytest.raises(ValueError, match="is not a directory"):
        DenoiserLM.from_pretrained(tmp_path / "nowhere")


# ---------------------------------------------------------------------- transformers' own formats
def _tiny_hf(kind: str, tie: bool):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    common = dict(vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, tie_word_embeddings=tie,
                  max_position_embeddings=64)
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, rope_theta=10000.0)).eval()
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, rope_theta=10000.0)).eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_transformers_checkpoints_load(tmp_path, kind, tie):
    hf = _tiny_hf(kind, tie)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")  # several shards and an index
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    model = DenoiserLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = hf(ids).logits  # causal
        got = model(ids, mask=Mask.causal(9))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_dream_checkpoint_loads(tmp_path):
    """Dream-7B ships Qwen2's weight names with its own config (model_type "Dream")."""
    hf = _tiny_hf("qwen2", tie=False)
    hf.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        config = json.load(f)
    config.update(model_type="Dream", architectures=["DreamModel"])
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    model = DenoiserLM.from_pretrained(tmp_path)
    assert model.checkpoint_format == "dream" and model.config.attention_bias
    ids = torch.randint(0, 61, (1, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask=Mask.causal(7)), hf(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("biases", ["none", "qkv", "all"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_save_pretrained_round_trips(tmp_path, biases, tie):
    kw = {"none": {}, "qkv": dict(attention_bias=True), "all": dict(attention_bias=True, attention_out_bias=True,
                                                                     mlp_bias=True)}[biases]
    model = DenoiserLM(53, 64, 2, 4, 2, 96, head_dim=16, tie_word_embeddings=tie, **kw).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    model.save_pretrained(tmp_path, max_shard_bytes=30_000)
    loaded = DenoiserLM.from_pretrained(tmp_path)
    assert (loaded.lm_head.weight is loaded.embed_tokens.weight) == tie
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.config == model.config


def test_loading_keeps_one_copy_of_the_weights_in_memory(tmp_path):
    """Peak memory while loading 204 MiB of weights from 30 MiB shards stays near one copy
    (parameters allocated once, tensors streamed one at a time: the rest is the shard being read;
    1.07x measured), far from the 2x of a second full copy or of every shard kept mapped. A small
    checkpoint is loaded first: torch's one-time initialisation (libraries, a CUDA build's
    lazily loaded parts: +0.4-0.8x) is not the loader's."""
    model = DenoiserLM(1000, 1024, 4, 8, 8, 2816, head_dim=128, init_std=0.02)
    model.save_pretrained(tmp_path / "big", max_shard_bytes=30 << 20)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    DenoiserLM(50, 16, 1, 2, 2, 32, head_dim=8).save_pretrained(tmp_path / "small")
    code = textwrap.dedent(f"""
        import torch, dlmfuse

        def status(field):  # kB
            return int(next(l for l in open('/proc/self/status') if l.startswith(field)).split()[1]) * 1024

        dlmfuse.nn.DenoiserLM.from_pretrained({str(tmp_path / "small")!r})
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # resets the peak (VmHWM) to the current resident size
        before = status('VmRSS')
        model = dlmfuse.nn.DenoiserLM.from_pretrained({str(tmp_path / "big")!r})
        print(status('VmHWM') - before)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    growth = int(result.stdout.split()[-1])
    assert size <= growth < 1.3 * size, f"peak grew by {growth / 2**20:.0f} MiB for {size / 2**20:.0f} MiB of weights"


def test_save_replaces_an_earlier_sharded_save_and_index_paths_stay_inside(tmp_path):
    model = DenoiserLM(53, 64, 2, 4, 2, 96, head_dim=16).eval()
    model.save_pretrained(tmp_path, max_shard_bytes=30_000)
    assert len([f for f in os.listdir(tmp_path) if f.startswith("model-")]) > 1
    model.save_pretrained(tmp_path)  # one file now: the old shards and index must go
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {"model.norm.weight": "../elsewhere.safetensors"}}, f)
    with pytest.raises(ValueError, match="names files outside the checkpoint directory"):
        DenoiserLM.from_pretrained(tmp_path)
    os.remove(tmp_path / "model.safetensors.index.json")
    with open(tmp_path / "config.json") as f:
        config = json.load(f)
    with open(tmp_path / "config.json", "w") as f:
        json.dump({**config, "torch_dtype": "int8"}, f)
    with pytest.raises(ValueError, match="torch_dtype torch.int8 is not a float dtype; pass dtype="):
        DenoiserLM.from_pretrained(tmp_path)
    assert DenoiserLM.from_pretrained(tmp_path, dtype=torch.float32).norm.weight.dtype == torch.float32
