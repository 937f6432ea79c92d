"""The README's example must run as written, and its commands must match .ci/run."""

import pathlib
import re

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _python_blocks(text: str):
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_example_runs():
    blocks = _python_blocks((ROOT / "README.md").read_text())
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    out, lse, out_rows, unmask = (namespace[n] for n in ("out", "lse", "out_rows", "unmask"))
    assert out.shape == (2, 256, 8, 64) and lse.shape == (2, 8, 256)
    assert out_rows.shape == (2, 16, 8, 64)
    assert unmask.dtype == torch.bool and unmask.sum(dim=1).tolist() == [4, 4]


def test_readme_generate_example_runs():
    blocks = _python_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 2, "README has no generate example"
    namespace: dict = {}
    exec(compile(blocks[1], "README.md", "exec"), namespace)
    exact, quick = namespace["exact"], namespace["quick"]
    assert exact.shape == quick.shape == (2, 44)
    assert torch.equal(exact[:, :12], namespace["prompt"])
    # FastDLLM never proposes the mask token; LLaDA (faithful to its published loop) may.
    assert not (quick[:, 12:] == 999).any(), "masks left"


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    setup = re.search(r"## Setup\n\n```bash\n(.*?)```", readme, flags=re.S).group(1)
    install, test = (line.split("#")[0].strip() for line in setup.splitlines()[:2])
    assert install in ci and test in ci


def test_readme_packed_and_training_examples_run():
    """The packed-sequences and training examples (the real-checkpoint one needs a download)."""
    blocks = _python_blocks((ROOT / "README.md").read_text())
    packed = [b for b in blocks if "documents=documents" in b]
    training = [b for b in blocks if "optimizer.step()" in b]
    assert len(packed) == 1 and len(training) == 1
    namespace: dict = {}
    exec(compile(packed[0], "README.md", "exec"), namespace)
    assert namespace["out"].shape == (1, 192, 4, 64) and namespace["q"].grad is not None
    assert namespace["positions"][0, 40].item() == 0  # the second document starts at position 0
    namespace = {}
    exec(compile(training[0], "README.md", "exec"), namespace)
    assert torch.isfinite(namespace["loss"]) and namespace["model"].embed_tokens.weight.grad is not None


def test_readme_tiny_model_example_runs():
    """The shipped tiny code model's example: it completes a prompt, no mask token left."""
    blocks = [b for b in _python_blocks((ROOT / "README.md").read_text()) if "tiny_code_model()" in b]
    assert len(blocks) == 1
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    out, tok = namespace["out"], namespace["tok"]
    assert out.shape == (1, namespace["prompt"].shape[1] + 32) and tok.mask_token_id not in out[0].tolist()
