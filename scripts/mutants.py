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


class Mutant(NamedTuple):
    name: str
    path: str  # under python/dlmfuse
    old: str
    new: str
    tests: tuple


MUTANTS = [
    Mutant("backward dK overwrites across query chunks", "_attention_backward.py",
           "dk += torch.matmul(ds.transpose(-1, -2), qf[:, :, rows]) * scale",
           "dk = torch.matmul(ds.transpose(-1, -2), qf[:, :, rows]) * scale", ("tests/test_chunking.py",)),
    Mutant("backward dV overwrites across query chunks", "_attention_backward.py",
           "dv += torch.matmul(p.transpose(-1, -2), do[:, :, rows])",
           "dv = torch.matmul(p.transpose(-1, -2), do[:, :, rows])", ("tests/test_chunking.py",)),
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
    Mutant("KVCache.write labels ignore the last-row rule", "kv_cache.py",
           "if labels and not validate:", "if False:", ("tests/test_kv_cache.py",)),
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
    Mutant("backward grad_lse sign", "_attention_backward.py",
           "delta = delta - grad_lse.to(f32)", "delta = delta + grad_lse.to(f32)",
           ("tests/test_attention_autograd.py",)),
]


def compiled_modules() -> list[Path]:
    """The installed extension modules (_C, and _C_cuda when built), which every mutant reuses."""
    import dlmfuse._ext as ext

    return [Path(module.__file__) for module in (ext._C, ext._C_cuda) if module is not None]


def make_scratch(base: Path) -> Path:
    shutil.copytree(ROOT / "python", base / "python")
    shutil.copytree(ROOT / "tests", base / "tests")
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
