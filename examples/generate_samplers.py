"""Generation with every sampler and the cache modes that apply to it, on a tiny random model.

Which sampler and cache mode to choose: docs/generation.md. With random weights the tokens are
meaningless; what this shows is the calls, the shapes, and that every position gets filled.

Run: python examples/generate_samplers.py   (CPU, about ten seconds)
"""

import torch

import dlmfuse
from dlmfuse import samplers

torch.manual_seed(0)
VOCAB, MASK = 256, 255  # the last id is the mask token of this toy vocabulary
model = dlmfuse.nn.DenoiserLM(vocab_size=VOCAB, hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1,
                              intermediate_size=256).eval()
with torch.no_grad():  # sharper logits than random init gives, so confidence-based rules have work to do
    model.lm_head.weight.normal_(0.0, 1.0)
prompt = torch.randint(0, MASK, (2, 8))                       # [B, P]
GEN, BLOCK = 32, 8

runs = [
    ("LLaDA low_confidence", samplers.LLaDA(GEN, GEN, BLOCK, mask_token_id=MASK), ("none", "prefix", "dual")),
    ("LLaDA random remasking, T=0.7", samplers.LLaDA(GEN, GEN, BLOCK, temperature=0.7, remasking="random",
                                                     mask_token_id=MASK), ("none",)),
    ("FastDLLM threshold 0.9", samplers.FastDLLM(GEN, BLOCK, threshold=0.9, mask_token_id=MASK), ("none", "dual")),
    ("FastDLLM factor 1.0", samplers.FastDLLM(GEN, BLOCK, factor=1.0, mask_token_id=MASK), ("dual",)),
    *[(f"Dream {alg}", samplers.Dream(16, GEN, alg=alg, mask_token_id=MASK), ("none",))
      for alg in ("origin", "maskgit_plus", "topk_margin", "entropy")],
    ("MDLM ancestral", samplers.MDLM(16, GEN, mask_token_id=MASK), ("none",)),
    ("EsoLM variant A", samplers.EsoLM(8, GEN, mask_token_id=MASK, alpha_0=0.5, variant="A"), ("none",)),
    ("EsoLM variant B", samplers.EsoLM(8, GEN, mask_token_id=MASK, alpha_0=0.5, variant="B"), ("none", "prefix")),
    # Refinement: tokens already written are remasked (ReMDM) or edited (LLaDA 2.1).
    *[(f"ReMDM {schedule}", samplers.ReMDM(GEN, GEN, mask_token_id=MASK, schedule=schedule), ("none", "dual"))
      for schedule in ("cap", "conf")],
    ("ReMDM loop", samplers.ReMDM(GEN, GEN, mask_token_id=MASK, schedule="loop"), ("prefix",)),
    ("FastDLLM threshold 0.7 + editing", samplers.FastDLLM(GEN, BLOCK, threshold=0.7, edit_threshold=0.5,
                                                           max_post_steps=4, mask_token_id=MASK), ("none", "dual")),
]

for name, sampler, caches in runs:
    for cache in caches:
        steps = []
        out = dlmfuse.generate(model, prompt, sampler, cache=cache, seed=0,
                               callback=lambda step, total, tokens: steps.append(step))
        assert out.shape == (2, 8 + GEN) and torch.equal(out[:, :8], prompt)
        left = int((out[:, 8:] == MASK).sum())
        print(f"{name:<32} cache={cache:<7} {len(steps):>3} steps  masks left {left}  "
              f"first tokens {out[0, 8:16].tolist()}")
        # Every sampler but LLaDA fills every position; LLaDA, like its published loop, may
        # propose the mask token itself and leave that column masked.
        assert left == 0 or name.startswith("LLaDA"), name

# The same seed reproduces the same tokens.
sampler = samplers.LLaDA(GEN, GEN, BLOCK, temperature=1.0, mask_token_id=MASK)
assert torch.equal(dlmfuse.generate(model, prompt, sampler, seed=3), dlmfuse.generate(model, prompt, sampler, seed=3))
print("same seed, same tokens")
