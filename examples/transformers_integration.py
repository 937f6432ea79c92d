"""dlmfuse as the attention of a transformers model: attn_implementation="dlmfuse".

``dlmfuse.integrations.transformers.register()`` adds the backend; the model then hands dlmfuse
the masks it would hand SDPA (causal or bidirectional with padding become labels, other masks an
additive bias). This script checks the logits against SDPA on a tiny random Llama.

Run: python examples/transformers_integration.py   (CPU; needs `pip install transformers`)
"""

import torch
import transformers

from dlmfuse.integrations import transformers as dlmfuse_hf

dlmfuse_hf.register()

torch.manual_seed(0)
config = transformers.LlamaConfig(vocab_size=101, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
model = transformers.LlamaForCausalLM(config).eval()

ids = torch.randint(0, 101, (2, 24))
attention_mask = torch.ones(2, 24, dtype=torch.long)
attention_mask[1, :6] = 0  # the second prompt is left padded

logits = {}
for implementation in ("sdpa", "dlmfuse"):
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        logits[implementation] = model(ids, attention_mask=attention_mask).logits

real = attention_mask.bool()  # padded rows attend to nothing in particular; compare real tokens
err = (logits["dlmfuse"] - logits["sdpa"])[real].abs().max().item()
scale = logits["sdpa"][real].abs().max().item()
assert err <= 1e-4 * scale, (err, scale)
print(f"Llama (GQA 4/2), left padding: max |dlmfuse - sdpa| = {err:.1e} (logits up to {scale:.2f})")

# Greedy decoding through generate() runs the same backend, KV cache included.
model.set_attn_implementation("dlmfuse")
out = model.generate(ids[:1], max_new_tokens=8, do_sample=False, pad_token_id=0)
model.set_attn_implementation("sdpa")
expected = model.generate(ids[:1], max_new_tokens=8, do_sample=False, pad_token_id=0)
assert torch.equal(out, expected)
print("generate() with the KV cache: same tokens as SDPA:", out[0, -8:].tolist())
