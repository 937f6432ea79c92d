"""Train the tiny masked-diffusion code model shipped in python/dlmfuse/data/tiny_code_dlm/.

A LLaMA-shaped dlmfuse.nn.DenoiserLM (bidirectional, dlmfuse's attention and its fused CPU
backward) trained with the masked-diffusion loss (dlmfuse.codelm.objective: one mask ratio
t ~ U(0, 1) per sequence, cross-entropy on the masked tokens weighted 1/t) on the Python standard
library's source files (dlmfuse.codelm.corpus: a fixed, path-hashed train / held-out split), with
a byte-level BPE tokenizer trained on the training files.

Deterministic: the tokenizer, the data order, the masks and the initialisation come from --seed,
and the run stops after a number of steps, never on the clock. --minutes turns a time budget into
steps with SECONDS_PER_STEP (measured on 2 cores; see the calibration note there); --steps gives
them directly. Same machine, thread count, torch version and Python stdlib: same weights.

    python scripts/train_tiny_dlm.py                         # the shipped model (2 cores, ~45 min)
    python scripts/train_tiny_dlm.py --steps 300 --out /tmp/tiny_code   # a short run

Writes to --out: config.json + model.safetensors (save_pretrained, --save-dtype), tokenizer.json,
metadata.json (settings, losses, corpus digest), unigram_counts.json. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pathlib
import platform
import shlex
import shutil
import sys
import time

import torch

import dlmfuse
from dlmfuse.codelm import corpus
from dlmfuse.codelm.objective import elbo_nll, masked_diffusion_loss, token_counts, unigram_log_probs, unigram_nll
from dlmfuse.codelm.pretrained import METADATA_NAME, TINY_CODE_DIR, TOKENIZER_NAME, UNIGRAM_COUNTS_NAME
from dlmfuse.codelm.tokenizer import CodeTokenizer, train_bpe
from dlmfuse.evaluation.runs import bits_per_byte_factor
from dlmfuse.nn import DenoiserLM

# Wall seconds per training step of the default model and batch with --threads 2 on the 2-core dev
# VM (AMD EPYC, AVX-512): 0.92-1.0 s measured in the run that made the shipped model.
SECONDS_PER_STEP = 1.0
DEFAULT_MINUTES = 45.0
LOSS_WINDOW = 50  # the final training loss is the mean of this many last steps


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=TINY_CODE_DIR, help="output folder")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, default=DEFAULT_MINUTES,
                        help=f"time budget on 2 quiet cores, turned into steps at {SECONDS_PER_STEP} s per step")
    budget.add_argument("--steps", type=int, help="training steps (overrides --minutes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch and dlmfuse CPU threads")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4, help="attention heads (head_dim = hidden / heads)")
    parser.add_argument("--mlp", type=int, default=768, help="SwiGLU intermediate size")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    parser.add_argument("--warmup", type=int, default=100, help="linear warm-up steps (then cosine to 10%%)")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--embedding-offset", type=float, default=0.05,
                        help="std of one random vector added to every token embedding at initialisation")
    parser.add_argument("--eval-windows", type=int, default=64, help="held-out windows of the final NLL")
    parser.add_argument("--eval-ratios", type=int, default=8, help="mask ratios per window of the final NLL")
    parser.add_argument("--train-files", type=int, help="use only the first N training files (smoke tests)")
    parser.add_argument("--save-dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--log-every", type=int, default=25)
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = max(1, int(args.minutes * 60 / SECONDS_PER_STEP))
    if args.steps < 1 or args.batch < 1 or args.seq_len < 2:
        parser.error(f"--steps, --batch must be >= 1 and --seq-len >= 2, got {args.steps}, {args.batch}, {args.seq_len}")
    return args


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def learning_rate(step: int, args) -> float:
    """Linear warm-up to --lr, then cosine decay to a tenth of it at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def batches(stream: torch.Tensor, seq_len: int, batch: int, generator: torch.Generator):
    """Endless batches of windows of the training stream: each epoch cuts it at a random offset
    into windows of seq_len and visits them in a random order."""
    while True:
        offset = int(torch.randint(seq_len, (), generator=generator))
        starts = torch.arange(offset, stream.numel() - seq_len + 1, seq_len)
        if starts.numel() < batch:
            raise ValueError(f"the training stream ({stream.numel()} tokens) holds fewer than --batch={batch} "
                             f"windows of --seq-len={seq_len}")
        order = starts[torch.randperm(starts.numel(), generator=generator)]
        for i in range(0, order.numel() - batch + 1, batch):
            yield torch.stack([stream[s:s + seq_len] for s in order[i:i + batch].tolist()])


def build_tokenizer(train_texts, out: pathlib.Path, vocab_size: int, held_out_texts) -> CodeTokenizer:
    trained = train_bpe(train_texts, vocab_size)
    trained.save(str(out / TOKENIZER_NAME))
    tokenizer = CodeTokenizer.from_file(out / TOKENIZER_NAME)
    # The model is evaluated with the pure-Python encoder: it must give the ids training used.
    for text in held_out_texts:
        if tokenizer.encode(text) != trained.encode(text).ids:
            raise RuntimeError("CodeTokenizer's encoding differs from the tokenizers package's on held-out code")
    return tokenizer


def param_groups(model: torch.nn.Module, weight_decay: float):
    """Weight decay on the matrices (embeddings, projections, LM head), none on the norms."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": matrices, "weight_decay": weight_decay}, {"params": vectors, "weight_decay": 0.0}]


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dlmfuse.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    # Everything is written to a staging folder and moved into --out at the end: a failed run never
    # leaves a new tokenizer beside older weights.
    staging = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    started = time.perf_counter()

    train_files, held_out_files = corpus.split_files(corpus.stdlib_files())
    train_files = train_files[:args.train_files] if args.train_files else train_files
    train_texts, held_out_texts = corpus.read_texts(train_files), corpus.read_texts(held_out_files)
    log(f"corpus: {len(train_texts)} training files, {len(held_out_texts)} held-out files "
        f"(Python {platform.python_version()} stdlib at {corpus.stdlib_root()})")
    tokenizer = build_tokenizer([t for _, t in train_texts], staging, args.vocab_size, [t for _, t in held_out_texts])
    train_stream = torch.tensor(tokenizer.encode_files(t for _, t in train_texts))
    held_out_stream = torch.tensor(tokenizer.encode_files(t for _, t in held_out_texts))
    held_out_bytes = sum(len(t.encode("utf-8")) for _, t in held_out_texts)
    log(f"tokens: {train_stream.numel()} training, {held_out_stream.numel()} held out "
        f"({held_out_bytes / held_out_stream.numel():.2f} bytes per token)")

    vocab, mask_id = tokenizer.vocab_size, tokenizer.mask_token_id
    model = DenoiserLM(vocab, args.hidden, args.layers, args.heads, args.heads, args.mlp,
                       head_dim=args.hidden // args.heads)
    # A component every token shares gives every query and key a common direction, whose RoPE
    # rotation scores keys by relative position from the first step on. Without it attention starts
    # uniform, and the loss sat at the unigram model's for 600 steps of this run.
    with torch.no_grad():
        offset = torch.randn(args.hidden, generator=torch.Generator().manual_seed(args.seed + 2))
        model.embed_tokens.weight.add_(args.embedding_offset * offset)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))
    data_rng = torch.Generator().manual_seed(args.seed)
    mask_rng = torch.Generator().manual_seed(args.seed + 1)
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters; {args.steps} steps of "
        f"{args.batch} x {args.seq_len} tokens")

    losses, step_started = [], time.perf_counter()
    for step, x0 in zip(range(args.steps), batches(train_stream, args.seq_len, args.batch, data_rng)):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        loss = masked_diffusion_loss(model, x0, mask_id, mask_rng)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            recent = losses[-args.log_every:]
            seconds = (time.perf_counter() - step_started) / (step + 1)
            log(f"step {step + 1}/{args.steps}  loss {sum(recent) / len(recent):.4f}  "
                f"lr {learning_rate(step, args):.2e}  {seconds:.2f} s/step")
    training_seconds = time.perf_counter() - step_started

    model.eval()
    windows = corpus.evenly_spaced_windows(held_out_stream, args.seq_len, args.eval_windows)
    held_out_nll = elbo_nll(model, windows, mask_id, ratios=args.eval_ratios)
    counts = token_counts(train_stream, vocab)
    baseline = unigram_nll(unigram_log_probs(counts.tolist(), excluded=[mask_id]), windows)
    save_dtype = getattr(torch, args.save_dtype)
    model.to(save_dtype).save_pretrained(staging)
    saved = DenoiserLM.from_pretrained(staging, dtype=torch.float32)
    saved_nll = elbo_nll(saved, windows, mask_id, ratios=args.eval_ratios)
    bytes_per_token = held_out_bytes / held_out_stream.numel()
    to_bits_per_byte = bits_per_byte_factor(tokenizer, windows)  # as `python -m dlmfuse eval` reports it
    final_loss = sum(losses[-LOSS_WINDOW:]) / len(losses[-LOSS_WINDOW:])
    log(f"held-out NLL bound {held_out_nll:.4f} nats/token ({saved_nll:.4f} as saved in {args.save_dtype}); "
        f"unigram {baseline:.4f}; final training loss {final_loss:.4f}")

    metadata = {
        "mask_token_id": mask_id,
        "end_of_text_id": tokenizer.end_of_text_id,
        "vocab_size": vocab,
        "tokenizer_sha256": hashlib.sha256((staging / TOKENIZER_NAME).read_bytes()).hexdigest(),
        "seq_len": args.seq_len,
        "training": {
            "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "tokens_seen": args.steps * args.batch * args.seq_len,
            "epochs": args.steps * args.batch * args.seq_len / train_stream.numel(), "lr": args.lr,
            "warmup": args.warmup, "embedding_offset": args.embedding_offset, "schedule": "linear warm-up, cosine to 10%", "weight_decay": args.weight_decay,
            "optimizer": "AdamW(betas=(0.9, 0.95)), grad norm clipped at 1", "seed": args.seed,
            "threads": args.threads, "save_dtype": args.save_dtype, "training_seconds": round(training_seconds, 1),
            "total_seconds": round(time.perf_counter() - started, 1),
            "command": shlex.join(["python", "scripts/train_tiny_dlm.py", *(sys.argv[1:] if argv is None else argv)]),
        },
        "results": {
            "final_train_loss": final_loss, "held_out_nll": held_out_nll, "held_out_nll_as_saved": saved_nll,
            "unigram_nll": baseline, "held_out_bits_per_byte": saved_nll * to_bits_per_byte,
            "unigram_bits_per_byte": baseline * to_bits_per_byte,
            "eval_windows": args.eval_windows, "eval_ratios": args.eval_ratios, "loss_curve_every_50": [
                sum(losses[i:i + 50]) / len(losses[i:i + 50]) for i in range(0, len(losses), 50)],
        },
        "corpus": {
            "python": platform.python_version(), "train_files": len(train_texts), "held_out_files": len(held_out_texts),
            "train_tokens": train_stream.numel(), "held_out_tokens": held_out_stream.numel(),
            "held_out_bytes_per_token": bytes_per_token, "train_digest": corpus.files_digest(train_texts),
            "held_out_digest": corpus.files_digest(held_out_texts),
        },
        "environment": {"torch": torch.__version__, "dlmfuse": dlmfuse.__version__, "machine": platform.machine(),
                        "cpus": os.cpu_count()},
    }
    (staging / METADATA_NAME).write_text(json.dumps(metadata, indent=1) + "\n")
    (staging / UNIGRAM_COUNTS_NAME).write_text(json.dumps(counts.tolist()) + "\n")
    args.out.mkdir(parents=True, exist_ok=True)
    for path in staging.iterdir():
        path.chmod(0o644)  # safetensors writes 0600; the folder ships in wheels
        os.replace(path, args.out / path.name)
    staging.rmdir()
    log(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
