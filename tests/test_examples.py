"""Every script in examples/ runs as documented: ``python examples/NAME.py`` from a checkout,
exit status 0, within a time limit (each checks its own claims with asserts)."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
TIMEOUT_S = 120  # each takes seconds on 2 cores; the limit only catches a hang


def test_examples_exist_and_are_listed():
    assert {p.name for p in EXAMPLES} >= {"attention_masks.py", "sparse_step.py", "packed_documents.py",
                                          "generate_samplers.py", "transformers_integration.py"}
    listing = (ROOT / "examples" / "README.md").read_text()
    assert all(f"`{p.name}`" in listing for p in EXAMPLES)


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs(script):
    if script.stem == "transformers_integration":
        pytest.importorskip("transformers")
    env = dict(os.environ, DLMFUSE_BACKEND="native")  # the kernels, whatever the caller's override
    result = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    assert result.returncode == 0, f"{script.name} failed:\n{result.stdout}\n{result.stderr}"
    assert result.stdout.strip(), f"{script.name} printed nothing"
