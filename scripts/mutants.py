"""Mutation check of the test suite: each mutant is a one-line change to the Python layer that a
test must catch. The script copies the package and the tests to a scratch folder, applies one
mutant at a time there (the working tree is never touched), runs the tests named for it against the
installed compiled modules, and reports every mutant that survived (exit 1 if any).

    python scripts/mutants.py            # every mutant
    python scripts/mutants.py -k dream   # those whose name contains "dream"
    python scripts/mutants.py --list

Add a mutant for every chunked loop, threshold and rule a test is meant to pin down: (name, file
under python/dlmfuse, exact text, replacement, tests to run). The text must occur exactly once.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
_REFINE = "tests/test_refinement_samplers.py"
_BACKWARD_EXTREMES = "tests/test_attention_backward_extremes.py"


class Mutant(NamedTuple):
    name: str
    path: str  # under python/dlmfuse
    old: str
    new: str
    tests: tuple


MUTANTS = [
    Mutant("backward dK overwrites across query chunks", "_attention_backward.py",
           "dk += torch.matmul(ds.transpose(-1, -2), qc) * scale",
           "dk = torch.matmul(ds.transpose(-1, -2), qc) * scale", ("tests/test_chunking.py",)),
    Mutant("backward dV overwrites across query chunks", "_attention_backward.py",
           "dv += torch.matmul(p.transpose(-1, -2), doc)",
           "dv = torch.matmul(p.transpose(-1, -2), doc)", ("tests/test_chunking.py",)),
    Mutant("composite backward repeats a shared visibility row per query head", "_attention_backward.py",
           "(visible.repeat(1, 1, group, 1) if visible.shape[2] > 1 else visible)", "visible.repeat(1, 1, group, 1)",
           ("tests/test_chunking.py",)),
    Mutant("backward keeps rows beyond float32 in float32", "attention.py",
           "exact = rows_beyond_float32(q, k, lse, scale, kv_lens) if can_read_values(lse) else None", "exact = None",
           (_BACKWARD_EXTREMES,)),
    Mutant("backward float64 rows only past 2^100", "_attention_backward.py",
           "_SCORE_BOUND = 2.0 ** 24", "_SCORE_BOUND = 2.0 ** 100", (_BACKWARD_EXTREMES,)),
    Mutant("backward float64 rows ignore |lse|", "_attention_backward.py",
           "| big_lse.any(1)", "", (_BACKWARD_EXTREMES,)),
    Mutant("backward float64 rows normalise by lse", "_attention_backward.py",
           "torch.softmax(s, -1)", "torch.exp(s - torch.logsumexp(s, -1, keepdim=True))", (_BACKWARD_EXTREMES,)),
    Mutant("backward float64 dK overwrites across row chunks", "_attention_backward.py",
           "dk[b, keys, kv_head] += ", "dk[b, keys, kv_head] = ", (_BACKWARD_EXTREMES,)),
    Mutant("bias-gradient parts overwrite dK across row parts", "_attention_backward_parts.py",
           "dk[bs, :, gs] += grads[1]", "dk[bs, :, gs] = grads[1]", ("tests/test_attention_backward.py",)),
    Mutant("bias-gradient parts slice a broadcast bias", "_attention_backward_parts.py",
           "s if bias.shape[d] > 1 else slice(None)", "s", ("tests/test_attention_backward.py",)),
    Mutant("merge weights ignore the +inf rule", "reference/attention.py",
           "torch.where(overflow, torch.isposinf(part).to(top.dtype), torch.exp(part - top))", "torch.exp(part - top)",
           ("tests/test_extremes.py",)),
    Mutant("merge backward multiplies a zero weight", "attention.py",
           "torch.where(weight == 0, torch.zeros_like(weight), weight * (g_lse + along_d))",
           "weight * (g_lse + along_d)", ("tests/test_fuzz_gradients.py",)),
    Mutant("token_probability reads the first chunk's tokens", "samplers/llada.py",
           "rows.gather(1, chosen[first:first + chunk])", "rows.gather(1, chosen[:rows.shape[0]])",
           ("tests/test_chunking.py",)),
    Mutant("FastDLLM threshold strict", "samplers/fast_dllm.py",
           "threshold=math.nextafter(self.threshold, -math.inf)", "threshold=self.threshold",
           ("tests/test_sampler_options.py",)),
    Mutant("Dream ignores eps", "samplers/dream.py", "torch.linspace(1, self.eps, self.steps + 1)",
           "torch.linspace(1, 1e-3, self.steps + 1)", ("tests/test_sampler_options.py",)),
    Mutant("select_unmask factor rule strict", "unmask.py",
           "passes = (sorted_key.to(torch.float64) >= 1.0 - factor / (m + 1.0))",
           "passes = (sorted_key.to(torch.float64) > 1.0 - factor / (m + 1.0))", ("tests/test_select_unmask.py",)),
    Mutant("select_unmask threshold inclusive", "unmask.py",
           "take = (sorted_key.to(torch.float64) > threshold)", "take = (sorted_key.to(torch.float64) >= threshold)",
           ("tests/test_select_unmask.py",)),
    Mutant("reference kv_scatter_ duplicates take the first row", "reference/kv_cache.py",
           'reduce="amax"', 'reduce="amin"', ("tests/test_kv_cache.py",)),
    # (Dropping the rule entirely is invisible on the CPU, whose scatter_ writes in order: the
    # mutant keeps the rule but picks the first row, which disagrees with the K/V written.)
    Mutant("KVCache.write labels take the first of repeated rows", "kv_cache.py",
           'rows, reduce="amax")', 'rows, reduce="amin")', ("tests/test_kv_cache.py",)),
    Mutant("may_share_memory says disjoint", "_memory.py",
           "return _solvable(terms_a + terms_b, target) is not False", "return False", ("tests/test_kv_cache.py",)),
    Mutant("may_share_memory compares spans", "_memory.py",
           "return _solvable(terms_a + terms_b, target) is not False", "return True", ("tests/test_kv_cache.py",)),
    Mutant("Mask.to_dense order test inclusive", "mask.py",
           "earlier = self.k_order[:, None, :] < self.q_order[:, :, None]",
           "earlier = self.k_order[:, None, :] <= self.q_order[:, :, None]", ("tests/test_mask.py",)),
    Mutant("reference visibility ignores kv_lens", "reference/attention.py",
           "visible = visible & in_range[:, None, :]", "visible = visible", ("tests/test_reference.py",)),
    Mutant("reference merge drops the +inf rule", "reference/attention.py",
           "overflow = torch.isposinf(top)", "overflow = torch.zeros_like(top, dtype=torch.bool)",
           ("tests/test_extremes.py",)),
    Mutant("top_k beyond V passed to the kernel", "sampling.py",
           "return min(int(top_k), vocab)", "return int(top_k)", ("tests/test_extremes.py",)),
    Mutant("composite backward grad_lse sign", "_attention_backward.py",
           "delta = delta - grad_lse.to(f32)", "delta = delta + grad_lse.to(f32)",
           ("tests/test_chunking.py",)),
    Mutant("CPU backward's delta ignores grad_lse", "attention.py",
           "(grad_out.to(f32) * out.to(f32)).sum(-1).transpose(1, 2) - grad_lse.to(f32)",
           "(grad_out.to(f32) * out.to(f32)).sum(-1).transpose(1, 2)", ("tests/test_attention_backward.py",)),
    *[Mutant(name, path, old, new, tuple(f"{_REFINE}::{test}" for test in tests)) for name, path, old, new, tests in [
        ("ReMDM cap takes the larger sigma", "samplers/remdm.py",
         "sigma = self.eta if ratio is None else min(self.eta, ratio)",
         "sigma = self.eta if ratio is None else max(self.eta, ratio)", ("test_remdm_matches_published_update_step_by_step",)),
        ("ReMDM loop remasks in its MDLM phases", "samplers/remdm.py", "sigma = self.eta if looping else 0.0",
         "sigma = self.eta", ("test_remdm_matches_published_update_step_by_step",)),
        ("ReMDM conf never records psi", "samplers/remdm.py",
         'ext["psi"] = _scatter_psi(ext["psi"], slots, valid, probability)', "pass",
         ("test_remdm_matches_published_update_step_by_step",)),
        ("ReMDM rescale ignores sigma_max", "samplers/remdm.py", "sigma = self.eta * sigma_max", "sigma = self.eta",
         ("test_remdm_transition_frequencies",)),
        ("ReMDM unmasks at MDLM's rate", "samplers/remdm.py",
         'sigma_masked = 0.0 if self.schedule == "conf" else sigma', "sigma_masked = 0.0",
         ("test_remdm_transition_frequencies",)),
        ("ReMDM conf remasks the confident tokens first", "samplers/refine.py",
         "scores = torch.where(decoded, -confidence.to(torch.float64), -math.inf)",
         "scores = torch.where(decoded, confidence.to(torch.float64), -math.inf)", ("test_remdm_transition_frequencies",)),
        ("ReMDM remask decision reads the host", "samplers/refine.py",
         "remask = decoded & (uniforms < remask_probability)",
         "remask = decoded & (uniforms < float(torch.as_tensor(remask_probability).max()))",
         ("test_decisions_read_nothing_on_the_host_and_trace_whole",)),
        ("ReMDM dual cache forgets stale columns (feeds)", "samplers/remdm.py", 'fed = ext["stale"] | ext["requested"]',
         'fed = ext["requested"]', ("test_remdm_dual_cache_feeds_exactly_the_changed_and_requested_columns",)),
        ("ReMDM dual cache never refreshes remasked rows", "samplers/remdm.py", 'ext["stale"] |= written | remask',
         'ext["stale"] |= written', ("test_cache_is_exact_for_a_one_layer_model",)),
        ("fed columns keep the sort key", "samplers/refine.py", "return key.sort(dim=1).values[:, :count] % length",
         "return key.sort(dim=1).values[:, :count]", ("test_fed_columns_are_distinct_with_the_fed_ones_first",)),
        ("ReMDM loop allows a last step before t_off", "samplers/remdm.py", "if self.steps * t_off < 1.0:",
         "if False:", ("test_bad_arguments_name_the_value",)),
        ("ReMDM cap default eta", "samplers/remdm.py", '"cap": 0.008', '"cap": 0.08',
         ("test_published_defaults_and_docstring",)),
        ("token edits ignore the threshold", "samplers/refine.py",
         "return editable & (tokens != current) & (confidence > threshold)", "return editable & (tokens != current)",
         ("test_token_editing_matches_llada21_step_by_step",)),
        ("token edits count unchanged tokens", "samplers/refine.py",
         "return editable & (tokens != current) & (confidence > threshold)", "return editable & (confidence > threshold)",
         ("test_a_block_ends_at_the_first_editing_only_step_that_changes_nothing",)),
        ("editing-only steps bound inclusive", "samplers/fast_dllm.py",
         'ext["finished"] |= post & (ext["post_steps"] > self.max_post_steps)',
         'ext["finished"] |= post & (ext["post_steps"] >= self.max_post_steps)',
         ("test_token_editing_is_bounded_by_max_post_steps",)),
        ("finished rows keep editing", "samplers/fast_dllm.py",
         "editable = ~masked & (cols >= state.block[0]) & (cols < state.block[1]) & active",
         "editable = ~masked & (cols >= state.block[0]) & (cols < state.block[1])",
         ("test_token_editing_rows_match_each_row_alone",)),
        ("block caches are not refreshed at a new block", "generate.py",
         "if self.kv is None or block != self.cached_block or", "if self.kv is None or",
         ("test_cache_is_exact_for_a_one_layer_model[editing-prefix]",)),
    ]],
    Mutant("diffusion loss drops the 1/t weight", "codelm/objective.py",
           "return (nll * masked).sum(dim=1) / ratios.to(nll.dtype)", "return (nll * masked).sum(dim=1)",
           ("tests/test_eval.py",)),
    Mutant("ELBO masks where u > t", "codelm/objective.py",
           "masked = (uniforms < grid[None, :, None])", "masked = (uniforms > grid[None, :, None])",
           ("tests/test_eval.py",)),
    Mutant("compile rule accepts comment-only completions", "evaluation/compile_share.py",
           "return any(has_code(text) and compiles(prompt + text)", "return any(text.strip() and compiles(prompt + text)",
           ("tests/test_eval.py",)),
    Mutant("eval counts the warm-up generation", "evaluation/runs.py",
           "    counter.calls = 0\n", "\n", ("tests/test_eval.py",)),
    Mutant("prompts keep functions that do not compile alone", "evaluation/prompts.py",
           "if compiles(prompt + reference):", "if True:", ("tests/test_eval.py",)),
    Mutant("the planned family's override takes kernel names", "_cuda_attention.py",
           "    if text in _CUDA_KERNEL_ARGS:", "    if False:", ("tests/test_attention_family.py",)),
    Mutant("cuda_plan_override leaves its value behind", "_cuda_attention.py",
           "            os.environ.pop(_KERNEL_ENV, None)", "            pass", ("tests/test_attention_family.py",)),
]


def compiled_modules() -> list[Path]:
    """The installed extension modules (_C, and _C_cuda when built), which every mutant reuses."""
    import dlmfuse._ext as ext

    return [Path(module.__file__) for module in (ext._C, ext._C_cuda) if module is not None]


def make_scratch(base: Path) -> Path:
    shutil.copytree(ROOT / "python", base / "python")
    shutil.copytree(ROOT / "tests", base / "tests")
    shutil.copytree(ROOT / "scripts", base / "scripts")  # tests/test_eval.py runs the training script
    shutil.copy(ROOT / "pyproject.toml", base / "pyproject.toml")
    for module in compiled_modules():
        shutil.copy(module, base / "python" / "dlmfuse" / module.name)
    return base


# Editable installs put a finder for dlmfuse in front of sys.path; drop it so PYTHONPATH's copy wins.
_RUN_PYTEST = ("import sys, pytest; "
               "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__module__]; "
               "sys.exit(pytest.main(sys.argv[1:]))")


def run_tests(scratch: Path, tests: tuple) -> int:
    env = {**os.environ, "PYTHONPATH": str(scratch / "python"), "DLMFUSE_NUM_THREADS": os.environ.get("DLMFUSE_NUM_THREADS", "2")}
    command = [sys.executable, "-c", _RUN_PYTEST, "-q", "-x", "-p", "no:cacheprovider", *tests]
    return subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True).returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", default="", help="only mutants whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if args.k.lower() in m.name.lower()]
    if args.list:
        for m in chosen:
            print(f"{m.name}: python/dlmfuse/{m.path}; {' '.join(m.tests)}")
        return 0
    survivors = []
    with tempfile.TemporaryDirectory(prefix="dlmfuse-mutants-") as tmp:
        scratch = make_scratch(Path(tmp))
        if run_tests(scratch, tuple(sorted({t for m in chosen for t in m.tests}))) != 0:
            print("the unmutated tests fail: fix them first", file=sys.stderr)
            return 2
        for m in chosen:
            target = scratch / "python" / "dlmfuse" / m.path
            original = target.read_text()
            if original.count(m.old) != 1:
                print(f"{m.name}: the text occurs {original.count(m.old)} times in {m.path}; update the mutant",
                      file=sys.stderr)
                return 2
            target.write_text(original.replace(m.old, m.new))
            start = time.monotonic()
            killed = run_tests(scratch, m.tests) != 0
            target.write_text(original)
            print(f"{'killed  ' if killed else 'SURVIVED'} {m.name} ({time.monotonic() - start:.0f} s)", flush=True)
            if not killed:
                survivors.append(m.name)
    print(f"{len(chosen) - len(survivors)} of {len(chosen)} mutants killed")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
