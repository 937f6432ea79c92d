"""The shipped tiny code model (dlmfuse.codelm), its training script and ``python -m dlmfuse eval``
(dlmfuse.evaluation): the tokenizer agrees with the ``tokenizers`` package, the objective is the
masked-diffusion bound, the shipped weights beat a unigram model on held-out code, and the evaluation
counts forward passes and compiles completions as docs/evaluation.md says."""

import json
import math
import pathlib
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import dlmfuse
from dlmfuse.codelm import TINY_CODE_DIR, CodeTokenizer, corpus, objective, tiny_code_model
from dlmfuse.codelm.tokenizer import END_OF_TEXT, MASK
from dlmfuse.evaluation import evaluate
from dlmfuse.evaluation.compile_share import accepted, compile_share, complete_lines
from dlmfuse.evaluation.prompts import function_prompts
from dlmfuse.evaluation.runs import CallCounter, likelihood_row
from dlmfuse.nn import DenoiserLM

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shipped():
    return tiny_code_model()


@pytest.fixture(scope="module")
def held_out():
    _, files = corpus.split_files(corpus.stdlib_files())
    return corpus.read_texts(files)


# ------------------------------------------------------------------------------------ tokenizer
EDGE_TEXTS = ["", "x", "\n", "\t\tx = 1\r\n", "s = 'h\u00e9llo \u4e16\u754c \U0001F600'\n", "a  =  b\n\n\n",
              "    # comment\n", "0x1F + 1e-3 + 10_000\n", f"{MASK} {END_OF_TEXT}"]


def test_tokenizer_round_trips_held_out_code(shipped, held_out):
    tok = shipped.tokenizer
    for _, text in held_out[:8]:
        assert tok.decode(tok.encode(text)) == text
    for text in EDGE_TEXTS:
        assert tok.decode(tok.encode(text)) == text


def test_tokenizer_gives_the_ids_of_the_tokenizers_package(shipped, held_out):
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(TINY_CODE_DIR / "tokenizer.json"))
    for text in [t for _, t in held_out[:6]] + EDGE_TEXTS[:-1]:
        assert shipped.tokenizer.encode(text) == reference.encode(text).ids


def test_special_token_names_in_text_are_plain_text(shipped):
    tok = shipped.tokenizer
    ids = tok.encode(f"{MASK}{END_OF_TEXT}")
    assert tok.mask_token_id not in ids and tok.end_of_text_id not in ids
    assert tok.decode([tok.mask_token_id, tok.end_of_text_id]) == MASK + END_OF_TEXT
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


def test_tokenizer_file_must_hold_bpe(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps({"model": {"type": "WordPiece"}}))
    with pytest.raises(ValueError, match="not BPE"):
        CodeTokenizer.from_file(tmp_path / "t.json")


# -------------------------------------------------------------------------------------- corpus
def test_the_split_depends_on_the_path_only():
    files = corpus.stdlib_files()
    train, held = corpus.split_files(files)
    assert set(train).isdisjoint(held) and len(train) + len(held) == len(files)
    assert 0.02 < len(held) / len(files) < 0.1
    assert not any("/test/" in f or f.startswith(("test/", "encodings/", "site-packages/")) for f in files)
    assert [corpus.is_held_out(f) for f in held] == [True] * len(held)


def test_evenly_spaced_windows_cover_the_stream():
    ids = torch.arange(100)
    windows = corpus.evenly_spaced_windows(ids, 10, 4)
    assert windows[:, 0].tolist() == [0, 30, 60, 90] and windows[-1, -1] == 99
    with pytest.raises(ValueError, match="fewer than length"):
        corpus.evenly_spaced_windows(ids, 101, 1)


# ----------------------------------------------------------------------------------- objective
class FixedLogits(torch.nn.Module):
    """A model whose logits are the same log-probabilities at every position, whatever the input."""

    def __init__(self, log_probs):
        super().__init__()
        self.log_probs = torch.nn.Parameter(log_probs.float(), requires_grad=False)

    def forward(self, ids):
        return self.log_probs.expand(*ids.shape, -1)


def test_mask_ratios_are_stratified_over_the_unit_interval():
    ratios = objective.mask_ratios(8, torch.Generator().manual_seed(3))
    assert ratios.min() >= objective.MIN_MASK_RATIO and ratios.max() <= 1.0
    gaps = ratios.sort().values.diff()
    assert torch.allclose(gaps, torch.full_like(gaps, (1 - objective.MIN_MASK_RATIO) / 8), atol=1e-6)


def test_weighted_masked_nll_is_cross_entropy_on_masked_tokens_over_t():
    torch.manual_seed(0)
    logits, x0 = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    masked = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)
    ratios = torch.tensor([0.4, 0.25])
    got = objective.weighted_masked_nll(logits, x0, masked, ratios)
    log_p = logits.log_softmax(-1).gather(-1, x0[..., None])[..., 0]
    expected = torch.stack([-(log_p[b] * masked[b]).sum() / ratios[b] for b in range(2)])
    torch.testing.assert_close(got, expected)


def test_training_loss_is_reproducible_and_differentiable():
    model = DenoiserLM(50, 16, 1, 2, 2, 32, head_dim=8)
    x0 = torch.randint(0, 49, (3, 12), generator=torch.Generator().manual_seed(1))
    first = objective.masked_diffusion_loss(model, x0, 49, torch.Generator().manual_seed(5))
    second = objective.masked_diffusion_loss(model, x0, 49, torch.Generator().manual_seed(5))
    assert first.item() == second.item() and math.isfinite(first.item())
    first.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_elbo_of_a_context_free_model_is_its_cross_entropy():
    """A model that ignores its input predicts every masked token with the same distribution p, so
    the bound's expectation is the cross-entropy of p on the tokens: the estimate (fixed t grid, one
    seeded mask per point) lands within a few percent, and drops the 1/t weight at its peril (~x0.5)."""
    vocab, mask_id = 30, 29
    log_probs = torch.randn(vocab, generator=torch.Generator().manual_seed(0)).log_softmax(-1)
    sequences = torch.multinomial(log_probs[:mask_id].exp(), 64 * 128, replacement=True,
                                  generator=torch.Generator().manual_seed(1)).reshape(64, 128)
    bound = objective.elbo_nll(FixedLogits(log_probs), sequences, mask_id, ratios=8, seed=0)
    cross_entropy = float(-log_probs[sequences].double().mean())
    assert bound == pytest.approx(cross_entropy, rel=0.03)
    assert objective.elbo_nll(FixedLogits(log_probs), sequences, mask_id, ratios=8, seed=0) == bound
    with pytest.raises(ValueError, match="mask token"):
        objective.elbo_nll(FixedLogits(log_probs), sequences.clone().fill_(mask_id), mask_id)
    with pytest.raises(ValueError, match="positive int"):
        objective.elbo_nll(FixedLogits(log_probs), sequences, mask_id, ratios=0)


def test_unigram_baseline_is_add_one_smoothed():
    log_probs = objective.unigram_log_probs([3, 0, 5, 7], excluded=[3])
    assert log_probs[3] == -math.inf
    torch.testing.assert_close(log_probs[:3].exp(), torch.tensor([4, 1, 6], dtype=torch.float64) / 11)
    assert objective.unigram_nll(log_probs, torch.tensor([1, 1])) == pytest.approx(math.log(11))


# ------------------------------------------------------------------------------- shipped model
def test_shipped_model_loads_with_from_pretrained_and_stays_small(shipped):
    files = sorted(p.name for p in TINY_CODE_DIR.iterdir())
    assert files == ["config.json", "metadata.json", "model.safetensors", "tokenizer.json", "unigram_counts.json"]
    assert (TINY_CODE_DIR / "model.safetensors").stat().st_size <= 20 * 2**20
    again = DenoiserLM.from_pretrained(TINY_CODE_DIR, dtype=torch.float32)
    for (name, a), (_, b) in zip(shipped.model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert shipped.model.config.vocab_size == shipped.tokenizer.vocab_size == shipped.info["vocab_size"]
    assert shipped.info["mask_token_id"] == shipped.tokenizer.mask_token_id
    assert sum(shipped.info["unigram_counts"]) == shipped.info["corpus"]["train_tokens"]


def test_shipped_model_beats_the_unigram_baseline_on_held_out_code(shipped, held_out):
    """Recomputed here on this Python's held-out files (not read from metadata.json)."""
    tok = shipped.tokenizer
    stream = torch.tensor(tok.encode_files(text for _, text in held_out))
    row = likelihood_row(shipped.model, tok, stream, shipped.info["unigram_counts"], seq_len=shipped.info["seq_len"],
                         windows=6, ratios=2, seed=0)
    assert row["model_nll"] < 0.8 * row["unigram_nll"], row
    recorded = shipped.info["results"]
    assert recorded["held_out_nll_as_saved"] < 0.8 * recorded["unigram_nll"]


def test_shipped_model_completes_a_function_that_compiles(shipped):
    tok = shipped.tokenizer
    prompt_text = "def add(a, b):\n    "
    prompt = torch.tensor([tok.encode(prompt_text)])
    sampler = dlmfuse.samplers.LLaDA(16, 16, 16, mask_token_id=tok.mask_token_id)
    out = dlmfuse.generate(shipped.model, prompt, sampler)
    completion = tok.decode(out[0, prompt.shape[1]:].tolist())
    assert tok.mask_token_id not in out[0].tolist()
    assert accepted(prompt_text, completion), completion


def test_tiny_code_model_reports_a_folder_without_metadata(tmp_path):
    with pytest.raises(ValueError, match="metadata.json"):
        tiny_code_model(path=tmp_path)


def test_shipped_metadata_pins_the_tokenizer(tmp_path):
    """The shipped metadata names its tokenizer's SHA-256, so a copy whose tokenizer was swapped for
    another (same special ids, other merges) is refused instead of decoding into nonsense."""
    import hashlib
    import shutil

    info = json.loads((TINY_CODE_DIR / "metadata.json").read_text())
    assert info["tokenizer_sha256"] == hashlib.sha256((TINY_CODE_DIR / "tokenizer.json").read_bytes()).hexdigest()
    copy = tmp_path / "model"
    shutil.copytree(TINY_CODE_DIR, copy)
    tokenizer = json.loads((copy / "tokenizer.json").read_text())
    tokenizer["model"]["merges"] = tokenizer["model"]["merges"][:-1]  # one merge fewer: another tokenizer
    (copy / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ValueError, match="not the tokenizer the model was trained with"):
        tiny_code_model(path=copy)


# ------------------------------------------------------------------------------------- prompts
def test_prompts_are_prefixes_of_whole_functions(shipped, held_out):
    tok = shipped.tokenizer
    prompts = function_prompts(held_out, tok, 12)
    assert len(prompts) == 12 and len({p.source for p in prompts}) == 12
    for p in prompts:
        assert p.text.startswith(("def ", "async def ")) and p.text.endswith((" ", "\t"))
        whole = p.text + p.reference
        compile(whole, p.source, "exec")
        assert tok.encode(whole)[:len(p.ids)] == list(p.ids)
        assert len(p.ids) <= 96
    assert function_prompts(held_out, tok, 12) == prompts
    with pytest.raises(ValueError, match="positive int"):
        function_prompts(held_out, tok, 0)


def test_function_prompts_skip_one_statement_functions_and_dedent_methods():
    source = ("class A:\n    def one(self):\n        return 1\n\n"
              "    def two(self):\n        x = 1\n        return x\n")
    tok = CodeTokenizer.from_file(TINY_CODE_DIR / "tokenizer.json")
    (prompt,) = function_prompts([("a.py", source)], tok, 5)
    assert prompt.source == "a.py:5 two"
    assert prompt.text == "def two(self):\n    x = 1\n    " and prompt.reference == "return x\n"


def test_function_prompts_skip_functions_that_do_not_compile_alone_and_keep_decorators_out():
    tok = CodeTokenizer.from_file(TINY_CODE_DIR / "tokenizer.json")
    nonlocal_source = ("def outer():\n    n = 0\n    def inner():\n        nonlocal n\n        n += 1\n"
                       "    return inner\n")
    assert [p.source for p in function_prompts([("n.py", nonlocal_source)], tok, 5)] == ["n.py:1 outer"]
    decorated = "def f():\n    x = 1\n    @dec\n    def g():\n        pass\n    return g\n"
    (prompt,) = function_prompts([("d.py", decorated)], tok, 5)
    assert prompt.text == "def f():\n    x = 1\n    " and prompt.reference.startswith("@dec\n")


# --------------------------------------------------------------------------------- compile rule
@pytest.mark.parametrize("completion, ok", [
    ("return a + b\n", True),
    ("return a + b", True),                                   # whole completion, no newline
    ("return a + b\nprint(a, (", True),                       # complete lines compile
    ("return (a +\n", False),                                 # neither the whole nor the lines
    ("   \n  ", False),                                        # blank
    (f"return a{END_OF_TEXT}def (((", True),                  # cut at the end of text
    ("if a:\n", False),                                       # a block opened with no body
    ("# a comment\n\n", False),                               # no code: the prompt compiles alone
    ("\n\n# more", False),
    ("pass  # done\n", True),
])
def test_acceptance_rule(completion, ok):
    # The prompt holds a statement already (a docstring, as the real prompts do): it compiles alone.
    assert accepted('def f(a, b):\n    """Add."""\n    ', completion) is ok


def test_compile_share_counts_accepted_pairs():
    assert complete_lines("a\nb\nc") == "a\nb\n" and complete_lines("abc") == ""
    assert compile_share(["x = ", "y = "], ["1\n", "(\n"]) == 0.5
    with pytest.raises(ValueError, match="as many completions"):
        compile_share(["x = "], [])


# ----------------------------------------------------------------------------------- evaluation
def test_evaluate_counts_forward_passes_and_rows(shipped, held_out):
    tok = shipped.tokenizer
    torch.manual_seed(0)
    model = DenoiserLM(tok.vocab_size, 32, 1, 2, 2, 64, head_dim=16).eval()
    rows = evaluate(model, tok, held_out_texts=held_out[:4], unigram_counts=shipped.info["unigram_counts"],
                    seq_len=32, prompts=2, gen_length=8, block_length=4, samplers=["llada-4", "fastdllm-0.9", "eso-b"],
                    caches=["none", "dual"], nll_windows=2, nll_ratios=2, progress=open("/dev/null", "w"))
    kinds = [r["kind"] for r in rows]
    assert kinds[0] == "nll" and kinds[-1] == "reference" and kinds.count("sampler") == 5  # Eso-LM B has no dual
    by_key = {(r["sampler"], r["cache"]): r for r in rows if r["kind"] == "sampler"}
    assert set(by_key) == {("llada-4", "none"), ("llada-4", "dual"), ("fastdllm-0.9", "none"),
                           ("fastdllm-0.9", "dual"), ("eso-b", "none")}
    for cache in ("none", "dual"):  # one step per block: each block's first, a full forward in every mode
        llada = by_key["llada-4", cache]
        assert llada["forward_calls"] == 2 * 2 and llada["tokens_per_forward"] == 4.0   # 2 prompts x 2 blocks
    assert all(by_key["fastdllm-0.9", cache]["forward_calls"] >= 2 * 2 for cache in ("none", "dual"))
    for row in by_key.values():
        assert row["prompts"] == 2 and len(row["completions"]) == 2
        assert 1.0 <= row["tokens_per_forward"] <= 8.0 and row["wall_s"] > 0
        assert 0 <= row["accepted"] <= 2
    assert rows[0]["model_nll"] > 0 and rows[0]["unigram_nll"] > 0
    with pytest.raises(ValueError, match="unknown sampler"):
        evaluate(model, tok, held_out_texts=held_out[:1], unigram_counts=[], seq_len=8, samplers=["nope"])
    with pytest.raises(ValueError, match="multiple of block_length"):
        evaluate(model, tok, held_out_texts=held_out[:1], unigram_counts=[], seq_len=8, gen_length=10,
                 block_length=4)


def test_call_counter_counts_every_forward():
    model = DenoiserLM(20, 16, 1, 2, 2, 32, head_dim=8)
    counter = CallCounter(model)
    counter(torch.zeros(1, 4, dtype=torch.int64))
    counter(torch.zeros(1, 4, dtype=torch.int64))
    assert counter.calls == 2 and counter.config is model.config


def test_eval_command_writes_rows(tmp_path):
    out = tmp_path / "eval.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "dlmfuse", "eval", "--prompts", "1", "--only", "llada-4", "--cache", "none",
         "--gen-length", "16", "--nll-windows", "1", "--nll-ratios", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["nll", "sampler", "reference"]
    assert rows[1]["tokens_per_forward"] == 4.0 and rows[1]["command"].startswith("python -m dlmfuse eval")
    assert "LLaDA low-confidence, 4 tokens/step" in result.stdout and "[2/2]" in result.stderr


# --------------------------------------------------------------------------------- training script
def _train(out: pathlib.Path):
    command = [sys.executable, str(ROOT / "scripts" / "train_tiny_dlm.py"), "--out", str(out), "--steps", "3",
               "--train-files", "3", "--vocab-size", "300", "--hidden", "32", "--layers", "1", "--heads", "2",
               "--mlp", "64", "--seq-len", "32", "--batch", "2", "--warmup", "1", "--eval-windows", "2",
               "--eval-ratios", "1", "--save-dtype", "float32", "--threads", "1", "--log-every", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result


def test_training_script_is_deterministic_and_writes_a_loadable_model(tmp_path):
    first = _train(tmp_path / "a")
    _train(tmp_path / "b")
    assert "step 3/3" in first.stderr
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()
    loaded = tiny_code_model(path=tmp_path / "a")
    assert loaded.model.config.vocab_size == loaded.tokenizer.vocab_size == 300
    assert loaded.info["training"]["steps"] == 3 and math.isfinite(loaded.info["results"]["held_out_nll"])
