"""Packed sequences: several documents in one row, each attending only within itself.

Document labels are ANDed with the visibility rule, so every mask family works inside each
document (docs/visibility.md, "Packed documents"). This script checks that attention over a packed
row equals attention over each document alone.

Run: python examples/packed_documents.py   (CPU, a few seconds)
"""

import torch

import dlmfuse

torch.manual_seed(0)
H, D = 4, 64
lengths = [40, 24, 64]                       # three documents packed into one row of 128
L = sum(lengths)
documents = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))  # [L] ids
q, k, v = (torch.randn(1, L, H, D) for _ in range(3))

# Block-causal decoding inside every document: blocks restart at each document's start.
packed = dlmfuse.Mask.block_causal(L, block_size=8, documents=documents)
out = dlmfuse.attention(q, k, v, mask=packed)

start = 0
for length in lengths:
    part = slice(start, start + length)
    alone = dlmfuse.attention(q[:, part], k[:, part], v[:, part], mask=dlmfuse.Mask.block_causal(length, block_size=8))
    err = (out[:, part] - alone).abs().max().item()
    assert err < 1e-5, err
    print(f"document at {start:>3}..{start + length - 1:>3}: packed == alone (max diff {err:.1e})")
    start += length

# Any mask can be restricted to documents afterwards; document_positions gives each token's
# document and its position inside it (for RoPE positions that restart per document).
causal = dlmfuse.Mask.causal(L).within_documents(documents)
doc, pos = dlmfuse.mask.document_positions(documents, L)
assert causal.has_documents and pos[0, lengths[0]].item() == 0
visible = causal.to_dense()[0]
assert not visible[lengths[0], lengths[0] - 1]          # the second document's first token ...
assert visible[lengths[0], lengths[0]]                  # ... sees only itself
print(f"causal within documents: {int(visible.sum())} visible pairs (plain causal: {L * (L + 1) // 2})")
