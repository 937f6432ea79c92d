"""``python -m dlmfuse eval``: speed against quality of every sampler on the shipped tiny code
model (docs/evaluation.md).

Per sampler and rule (LLaDA, Fast-dLLM threshold 0.9 / 0.7 / factor / editing, Dream entropy,
MDLM, ReMDM, Eso-LM A and B; :data:`.runs.SAMPLERS`) and per cache mode that applies: tokens per
forward pass, wall time, and the share of completions that compile (:mod:`.compile_share`) for
prompts cut from held-out functions (:mod:`.prompts`). Model-level quality: the masked-diffusion
bound on the held-out NLL, beside a unigram model's NLL on the same tokens. Every number comes
from fixed inputs and seeds.

Programmatic use (any model and tokenizer with ``encode`` / ``decode`` / ``mask_token_id`` /
``end_of_text_id``), e.g. a random model in a test::

    rows = dlmfuse.evaluation.evaluate(model, tokenizer, held_out_texts=[("a.py", source)],
                                       unigram_counts=counts, seq_len=32, prompts=2, gen_length=8,
                                       block_length=4, nll_windows=2, nll_ratios=2)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterable, Optional, Sequence, TextIO

import torch

from ..generate import CACHE_MODES
from .prompts import function_prompts
from .report import print_table, write_plot
from .runs import SAMPLERS, likelihood_row, reference_row, run_sampler

__all__ = ["evaluate", "add_arguments", "main", "SAMPLERS"]

# (prompts, NLL windows, NLL mask ratios) of a default and a --quick run.
DEFAULT_SIZES = (16, 64, 8)
QUICK_SIZES = (4, 8, 4)


def evaluate(model, tokenizer, *, held_out_texts: Sequence, unigram_counts: Sequence[int], seq_len: int,
             prompts: int = DEFAULT_SIZES[0], gen_length: int = 64, block_length: int = 16,
             samplers: Optional[Iterable[str]] = None, caches: Optional[Iterable[str]] = None,
             nll_windows: int = DEFAULT_SIZES[1], nll_ratios: int = DEFAULT_SIZES[2], seed: int = 0,
             progress: Optional[TextIO] = None) -> list:
    """The rows of an evaluation: one ``"nll"`` row, one ``"sampler"`` row per (sampler, cache
    mode), one ``"reference"`` row. ``held_out_texts``: (path, source) pairs; ``samplers``: keys of
    :data:`SAMPLERS` (default all); ``caches``: modes to run where they apply (default all)."""
    progress = sys.stderr if progress is None else progress
    specs = _selected_specs(samplers)
    caches = list(CACHE_MODES if caches is None else caches)
    if gen_length % block_length:
        raise ValueError(f"evaluate: gen_length={gen_length} must be a multiple of block_length={block_length}")
    chosen = function_prompts(held_out_texts, tokenizer, prompts)
    if not chosen:
        raise ValueError("evaluate: the held-out texts hold no function to prompt with")
    stream = torch.tensor([i for _, text in held_out_texts for i in [*tokenizer.encode(text), tokenizer.end_of_text_id]])
    mask_id = tokenizer.mask_token_id
    plan = [(spec, cache) for spec in specs for cache in caches
            if cache == "none" or cache in spec.build(gen_length, block_length, mask_id).cache_modes]
    print(f"[1/{len(plan) + 1}] held-out NLL ...", end=" ", file=progress, flush=True)
    rows = [likelihood_row(model, tokenizer, stream, unigram_counts, seq_len=seq_len, windows=nll_windows,
                           ratios=nll_ratios, seed=seed)]
    print(f"model {rows[0]['model_nll']:.3f}, unigram {rows[0]['unigram_nll']:.3f} nats/token", file=progress, flush=True)
    for i, (spec, cache) in enumerate(plan, 2):
        print(f"[{i}/{len(plan) + 1}] {spec.label}, cache={cache} ...", end=" ", file=progress, flush=True)
        row = run_sampler(model, tokenizer, chosen, spec, cache, gen_length=gen_length, block_length=block_length,
                          seed=seed)
        rows.append(row)
        print(f"{row['wall_s']:.1f} s, {row['tokens_per_forward']:.2f} tokens/forward, "
              f"{row['accepted']}/{row['prompts']} compile", file=progress, flush=True)
    rows.append({**reference_row(tokenizer, chosen, gen_length), "prompt_sources": [p.source for p in chosen]})
    return rows


def _selected_specs(keys: Optional[Iterable[str]]):
    if keys is None:
        return list(SAMPLERS)
    known = {spec.key: spec for spec in SAMPLERS}
    keys = list(keys)
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise ValueError(f"evaluate: unknown sampler {unknown[0]!r} (samplers: {', '.join(known)})")
    return [known[k] for k in keys]


# ------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_SIZES[0]} prompts and {QUICK_SIZES[1]} x {QUICK_SIZES[2]} NLL windows x mask "
                             f"ratios instead of {DEFAULT_SIZES[0]} and {DEFAULT_SIZES[1]} x {DEFAULT_SIZES[2]}")
    parser.add_argument("--prompts", type=int, metavar="N", help="completion prompts (held-out functions)")
    parser.add_argument("--gen-length", type=int, default=64, metavar="N", help="tokens generated per prompt")
    parser.add_argument("--block-length", type=int, default=16, metavar="N",
                        help="block of the block samplers (LLaDA, Fast-dLLM); divides --gen-length")
    parser.add_argument("--nll-windows", type=int, metavar="N", help="held-out windows of the NLL")
    parser.add_argument("--nll-ratios", type=int, metavar="K", help="mask ratios per NLL window")
    parser.add_argument("--only", action="append", choices=[s.key for s in SAMPLERS], metavar="SAMPLER",
                        help=f"run only this sampler (repeatable): {', '.join(s.key for s in SAMPLERS)}")
    parser.add_argument("--cache", action="append", choices=CACHE_MODES, metavar="MODE",
                        help="run only this cache mode (repeatable): none, prefix, dual")
    parser.add_argument("--seed", type=int, default=0, help="seed of the NLL masks and of every generation")
    parser.add_argument("--model-dir", metavar="PATH",
                        help="a folder written by scripts/train_tiny_dlm.py (default: the shipped model)")
    parser.add_argument("--json", metavar="PATH", help="write one JSON line per row, with the environment")
    parser.add_argument("--plot", metavar="PATH", help="write the speed / quality chart as PNG (needs matplotlib)")


def main(args: argparse.Namespace, command: str, out: Optional[TextIO] = None) -> int:
    """Run the evaluation of the shipped (or --model-dir) model from parsed ``args``."""
    from ..bench.common import environment
    from ..bench.plot import MissingMatplotlib, require_matplotlib
    from ..codelm import corpus, tiny_code_model

    out = sys.stdout if out is None else out
    if args.plot:
        try:
            require_matplotlib()  # before minutes of work, not after
        except MissingMatplotlib as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    sizes = QUICK_SIZES if args.quick else DEFAULT_SIZES
    model, tokenizer, info = tiny_code_model(path=args.model_dir)
    _, held_out_files = corpus.split_files(corpus.stdlib_files())
    try:
        rows = evaluate(model, tokenizer, held_out_texts=corpus.read_texts(held_out_files),
                        unigram_counts=info["unigram_counts"], seq_len=info["seq_len"],
                        prompts=sizes[0] if args.prompts is None else args.prompts, gen_length=args.gen_length,
                        block_length=args.block_length, samplers=args.only, caches=args.cache,
                        nll_windows=sizes[1] if args.nll_windows is None else args.nll_windows,
                        nll_ratios=sizes[2] if args.nll_ratios is None else args.nll_ratios, seed=args.seed)
    except ValueError as error:  # bad sizes or flags: one line, not a traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    env = environment(torch.device("cpu"), command)
    parameters = sum(p.numel() for p in model.parameters())
    header = (f"dlmfuse eval: tiny code model ({parameters / 1e6:.2f} M parameters, {info['training']['steps']} "
              f"training steps), {rows[-1]['prompts']} prompts from {len(held_out_files)} held-out stdlib files "
              f"(Python {info['corpus']['python']} trained, {env['python']} here), {args.gen_length} tokens each, "
              f"blocks of {args.block_length}, greedy, seed {args.seed}; {env['device']}")
    print_table(rows, header, out)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            for row in rows:
                f.write(json.dumps({**row, **env, "model_dir": args.model_dir or "shipped"}) + "\n")
        print(f"{len(rows)} rows written to {args.json}", file=out)
    if args.plot:
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        nll = rows[0]
        title = (f"tiny code model: held-out NLL bound {nll['model_nll']:.2f} nats/token (unigram "
                 f"{nll['unigram_nll']:.2f}); {rows[-1]['prompts']} prompts, {args.gen_length} tokens, greedy")
        write_plot(rows, args.plot, title)
        print(f"plot written to {args.plot}", file=out)
    return 0
