"""The benchmark harness end to end on tiny workloads (FlexAttention is skipped: compiling it takes
~20 s on these CPUs), plus the workload lists and the command line. A few seconds on CPU."""

import io
import json
import math
import sys

import pytest
import torch

import dlmfuse
from dlmfuse import bench
from dlmfuse.__main__ import build_parser, main as cli_main
from dlmfuse.bench import backward, common, plot, report, runner
from dlmfuse.bench import distributed as dist_bench, generate as gen_bench, kv_cache, sampling
from dlmfuse.bench.attention import AttnSpec, workload, workloads

CPU = torch.device("cpu")
TINY_TIMING = common.Timing(warmup=0, repeats=2)
TINY = [AttnSpec("T1", "dense", L=64, H=2),
        AttnSpec("T2", "bias", L=32, H=2),
        AttnSpec("T3", "block_causal", L=64, H=2, block=16, prompt=16),
        AttnSpec("T4", "sparse", L=64, B=2, H=2, n=8),
        AttnSpec("T5", "sparse", L=64, B=2, H=4, Hkv=2, n=8),  # grouped heads: peers with enable_gqa
        AttnSpec("T6", "bd3_train", L=16, H=2, block=4, train=True)]  # forward + backward

ROW_KEYS = {"family", "workload", "desc", "impl", "kind", "params", "status", "error", "time_ms",
            "times_ms", "time_q1_ms", "time_q3_ms", "time_spread", "tflops_dense", "tflops_visible", "gbps",
            "ratio_vs_dlmfuse", "ratio_q1", "ratio_q3", "ratio_spread", "best_peer", "best_peer_time_ms",
            "best_peer_ratio", "best_peer_ratio_q1", "best_peer_ratio_q3", "best_peer_ratio_spread", "peer_ratios",
            "floor", "floor_percent", "verdict", "warnings", "machine", "interleaved",
            "max_abs_diff_vs_dlmfuse", "device", "torch", "cuda", "python", "dlmfuse",
            "build_info", "git_sha", "timestamp", "command", "graph_time_ms", "graph_gbps", "graph_error"}


def run_tiny(specs, tmp_path, **kwargs):
    out, progress = io.StringIO(), io.StringIO()
    json_path = tmp_path / "out" / "rows.jsonl"  # the harness creates the folder
    rows = bench.run([workload(s) for s in specs], device=CPU, timing=TINY_TIMING, skip=["flex"],
                     command="pytest", json_path=str(json_path), out=out, progress=progress,
                     **kwargs)
    return rows, json_path, out.getvalue(), progress.getvalue()


def test_tiny_run_writes_rows_table_and_progress(tmp_path):
    rows, json_path, table, progress = run_tiny(TINY, tmp_path)

    parsed = [json.loads(line) for line in json_path.read_text().splitlines()]
    assert parsed == json.loads(json.dumps(rows))
    assert {(r["workload"], r["impl"]) for r in parsed} == \
        {(s.id, impl) for s in TINY for impl in ("dlmfuse", "sdpa")}
    for row in parsed:
        assert ROW_KEYS <= row.keys()
        assert row["status"] == "ok", row["error"]
        assert row["command"] == "pytest" and row["git_sha"]
        assert math.isfinite(row["time_ms"]) and row["time_ms"] > 0
        assert row["tflops_visible"] <= row["tflops_dense"]
        if row["impl"] == "sdpa":
            assert math.isfinite(row["ratio_vs_dlmfuse"]) and row["ratio_vs_dlmfuse"] > 0
            assert row["max_abs_diff_vs_dlmfuse"] < 1e-4  # fp32: the same attention
    assert all(r["gbps"] > 0 for r in parsed if r["workload"] in ("T4", "T5"))

    for i, spec in enumerate(TINY, 1):
        assert f"[{i}/{len(TINY)}] {spec.id} {spec.desc} ..." in progress
        assert f"{spec.id} {spec.desc}" in table
    assert "sdpa" in table and "dlmfuse faster" in table and "failed" not in table


def test_training_rows_time_forward_and_backward(monkeypatch):
    """A train spec's implementations return the forward output after computing the gradients of
    q, k and v (in their own layout), and its FLOPs count 3.5x the forward's."""
    spec = AttnSpec("T6", "bd3_train", L=16, H=2, block=4, train=True)
    case = workload(spec).setup(CPU)
    grads = []
    real_grad = torch.autograd.grad

    def recording_grad(outputs, inputs, grad_outputs):
        result = real_grad(outputs, inputs, grad_outputs)
        grads.append([g.shape for g in result])
        return result

    monkeypatch.setattr(torch.autograd, "grad", recording_grad)
    for impl in case.impls:
        if impl.kind == "overhead" or impl.name.startswith("flex"):
            continue
        out = impl.prepare()()
        assert not out.requires_grad
        assert impl.to_common(out).shape == (1, 32, 2, 64)  # 2L queries, dlmfuse layout
    assert grads[0] == [(1, 32, 2, 64)] * 3 and grads[1] == [(1, 2, 32, 64)] * 3  # dlmfuse, then sdpa
    forward = AttnSpec("T6", "bd3_train", L=16, H=2, block=4)
    assert case.flops_dense == 3.5 * workload(forward).setup(CPU).flops_dense


def test_failing_peer_is_recorded_not_fatal(tmp_path):
    def setup(device):
        x = torch.ones(4)

        def refuse():
            raise RuntimeError("No available kernel for these inputs")
        return common.Case(impls=[common.Impl("dlmfuse", lambda: lambda: x * 2,
                                              to_common=lambda out: out, kind="dlmfuse"),
                                  common.Impl("broken", refuse),
                                  common.Impl("other", lambda: lambda: x + x,
                                              to_common=lambda out: out)])
    w = common.Workload("X1", "toy", "toy", {}, setup)
    out = io.StringIO()
    rows = bench.run([w], device=CPU, timing=TINY_TIMING, out=out, progress=io.StringIO())
    by_impl = {r["impl"]: r for r in rows}
    assert by_impl["broken"]["status"] == "error"
    assert "No available kernel" in by_impl["broken"]["error"]
    assert by_impl["other"]["max_abs_diff_vs_dlmfuse"] == 0.0
    assert "broken: RuntimeError: No available kernel" in out.getvalue()


def test_plot_is_png(tmp_path):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "ratios.png"
    run_tiny(TINY[:1], tmp_path, plot_path=str(plot))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(plot.MissingMatplotlib, match="pip install matplotlib"):
        plot.require_matplotlib()


def test_skip_matches_peer_variants():
    assert runner.is_skipped("flex.create_block_mask", ["flex"])
    assert runner.is_skipped("sdpa-cudnn", ["sdpa"])
    assert not runner.is_skipped("sdpa", ["sdpa-cudnn"])
    assert not runner.is_skipped("dlmfuse", ["dlmfuse"])
    assert runner.is_skipped("floor.amax", ["floor"])


def test_default_workloads_follow_design():
    """DESIGN.md §8 rows; building the lists allocates nothing and never touches a GPU."""
    for quick in (False, True):
        cpu = workloads(CPU, quick)
        c1 = [w for w in cpu if w.id == "C1"]
        assert len(c1) == 1 and c1[0].params == dict(
            id="C1", pattern="block_causal", L=1024, B=1, H=8, D=64, dtype="float32",
            block=32, prompt=0, n=0, Hkv=0, train=False, docs=0)
        c3 = [w.params for w in cpu if w.id == "C3"]  # 4 documents of 256 packed, block-causal 32 in each
        assert len(c3) == 1 and (c3[0]["pattern"], c3[0]["L"], c3[0]["docs"], c3[0]["block"]) == ("packed", 1024, 4, 32)
        assert (c3[0]["H"], c3[0]["D"], c3[0]["dtype"]) == (8, 64, "float32")
        assert {"A1", "A2", "A4"} <= {w.id for w in cpu}
    gpu = workloads(torch.device("cuda"), quick=False)
    assert {w.id for w in gpu} == {"A1", "A2", "A3", "A4", "A4g", "A6"}
    a6 = [w.params for w in gpu if w.id == "A6"]
    assert len(a6) == 1 and (a6[0]["L"], a6[0]["docs"], a6[0]["block"]) == (4 * 4096, 4, 32)
    c2 = backward.workloads(CPU, quick=False)
    assert [w.id for w in c2] == ["C2", "C2"] and {w.family for w in c2} == {"backward"}
    assert [w.params["train"] for w in c2] == [True, False]  # fwd+bwd, and the forward alone
    assert (c2[0].params["pattern"], c2[0].params["L"], c2[0].params["block"], c2[0].params["train"]) == ("bd3_train", 512, 16, True)
    a5 = [w.params for w in backward.workloads(torch.device("cuda"), quick=False) if w.id == "A5"]
    assert len(a5) == 2 and a5[0]["pattern"] == "bd3_train" and [p["train"] for p in a5] == [True, False]
    assert (a5[0]["L"], a5[0]["block"], a5[0]["H"], a5[0]["D"]) == (1024, 16, 32, 128)
    assert sorted(w.params["n"] for w in gpu if w.id == "A4") == [32, 128, 512]
    assert {(w.params["H"], w.params["Hkv"]) for w in gpu if w.id == "A4g"} == {(28, 4)}  # Dream-7B heads
    assert {w.params["dtype"] for w in gpu} == {"bfloat16"}
    with pytest.raises(ValueError, match="Hkv must divide H=4"):
        workload(AttnSpec("X", "dense", L=8, H=4, Hkv=3))


KV_TINY = [kv_cache.KVSpec("T1", n=n, B=2, Lmax=32, H=2, D=64, dtype=dtype, validate=validate)
           for n, dtype in ((4, "float32"), (32, "bfloat16")) for validate in (True, False)]
SAMPLE_TINY = [sampling.SampleSpec("T1", B=2, L=3, V=97),
               sampling.SampleSpec("T2", B=2, L=3, V=97, dtype="bfloat16"),
               sampling.SampleSpec("T3", B=2, L=3, V=97, top_k=5, top_p=0.9)]


def run_family_tiny(module, specs, tmp_path):
    """Tiny workloads of a family module: the JSONL rows (parsed back) and the printed table."""
    out = io.StringIO()
    json_path = tmp_path / "rows.jsonl"
    rows = bench.run([module.workload(s) for s in specs], device=CPU, timing=TINY_TIMING,
                     command="pytest", json_path=str(json_path), out=out, progress=io.StringIO())
    parsed = [json.loads(line) for line in json_path.read_text().splitlines()]
    assert parsed == json.loads(json.dumps(rows))
    for row in parsed:
        assert ROW_KEYS <= row.keys()
        assert row["status"] == "ok", row["error"]
        assert row["family"] == module.FAMILY
        assert math.isfinite(row["time_ms"]) and row["time_ms"] > 0
        assert math.isfinite(row["gbps"]) and row["gbps"] > 0
        if row["kind"] == "peer":
            assert row["impl"] in module.PEERS
            assert math.isfinite(row["ratio_vs_dlmfuse"]) and row["ratio_vs_dlmfuse"] > 0
    return parsed, out.getvalue()


def test_kv_cache_tiny_rows_are_exact(tmp_path):
    rows, table = run_family_tiny(kv_cache, KV_TINY, tmp_path)
    assert {(r["desc"], r["impl"]) for r in rows} == \
        {(s.desc, impl) for s in KV_TINY for impl in ("dlmfuse",) + kv_cache.PEERS}
    for row in rows:
        if row["kind"] == "peer":
            assert row["max_abs_diff_vs_dlmfuse"] == 0.0  # the whole caches, bit for bit
    # The copy of the new rows is a floor: dlmfuse's share of it, no ratio row of its own.
    for row in rows:
        if row["impl"] == "floor.copy_":
            assert row["kind"] == "floor" and row["verdict"] is None
        if row["impl"] == "dlmfuse":
            assert row["floor"] == "floor.copy_" and row["floor_percent"] > 0
            assert row["best_peer"] in ("index_copy_", "index_put_")
    n4 = next(r for r in rows if r["impl"] == "dlmfuse" and r["params"]["n"] == 4)
    assert n4["gbps"] == pytest.approx(2 * 2 * 2 * 4 * 2 * 64 * 4 / n4["time_ms"] / 1e6)
    assert "validate=False" in table and "index_put_" in table and "failed" not in table


def test_kv_cache_check_sees_a_wrong_scatter(tmp_path, monkeypatch):
    """The exactness check compares whole caches: a scatter that forgets V shows a difference."""
    def k_only(k_cache, v_cache, k_new, v_new, positions, *, validate=True):
        k_cache[torch.arange(k_cache.shape[0])[:, None], positions] = k_new

    monkeypatch.setattr(dlmfuse, "kv_scatter_", k_only)
    rows = bench.run([kv_cache.workload(KV_TINY[0])], device=CPU, timing=TINY_TIMING,
                     out=io.StringIO(), progress=io.StringIO())
    assert all(r["max_abs_diff_vs_dlmfuse"] > 0 for r in rows if r["kind"] == "peer")


def test_sampling_tiny_rows_agree(tmp_path):
    rows, table = run_family_tiny(sampling, SAMPLE_TINY, tmp_path)
    by = {(r["workload"], r["impl"]): r for r in rows}
    for wid in ("T1", "T2"):
        assert {impl for w, impl in by if w == wid} == \
            {"dlmfuse", "dlmfuse.greedy", "llada-fp64", "torch-greedy", "floor.amax"}
        # Same tokens (a token mismatch differs by >= 1), confidences within float32 rounding.
        assert by[wid, "llada-fp64"]["max_abs_diff_vs_dlmfuse"] < 1e-5
        assert by[wid, "torch-greedy"]["max_abs_diff_vs_dlmfuse"] < 1e-5
        assert by[wid, "floor.amax"]["max_abs_diff_vs_dlmfuse"] is None
        assert by[wid, "floor.amax"]["kind"] == "floor" and by[wid, "dlmfuse"]["floor"] == "floor.amax"
        # Greedy sampling is compared with greedy torch only; T=1 sampling with both peers.
        assert set(by[wid, "dlmfuse.greedy"]["peer_ratios"]) == {"torch-greedy"}
        assert set(by[wid, "dlmfuse"]["peer_ratios"]) == {"llada-fp64", "torch-greedy"}
    assert {impl for w, impl in by if w == "T3"} == {"dlmfuse", "dream-topk-topp", "floor.amax"}
    assert by["T1", "dlmfuse"]["gbps"] == pytest.approx(
        2 * 3 * 97 * 4 / by["T1", "dlmfuse"]["time_ms"] / 1e6)
    assert "top_k=5 top_p=0.9" in table and "failed" not in table


def test_kv_cache_and_sampling_workloads_follow_design():
    """DESIGN.md §8 K1 and S1 on CUDA, CPU-sized rows on CPU; nothing allocated, no GPU touched."""
    cuda = torch.device("cuda")
    k1 = kv_cache.workloads(cuda, quick=False)
    assert {(w.params["n"], w.params["validate"]) for w in k1} == \
        {(n, v) for n in (32, 256) for v in (True, False)}
    for w in k1:
        assert w.id == "K1" and {k: w.params[k] for k in ("B", "Lmax", "H", "D", "dtype")} == \
            dict(B=8, Lmax=4096, H=32, D=128, dtype="bfloat16")
    s1 = [w.params for w in sampling.workloads(cuda, quick=False)]
    assert {(p["B"], p["L"], p["V"], p["dtype"], p["temperature"]) for p in s1} == \
        {(8, 32, 126464, "bfloat16", 1.0)}
    assert sum(p["top_k"] is None and p["top_p"] is None for p in s1) == 1
    for quick in (False, True):
        cpu = [w.params for w in sampling.workloads(CPU, quick)]
        assert {(p["V"], p["dtype"]) for p in cpu if p["top_k"] is None} == \
            {(32000, "float32"), (32000, "bfloat16")}
        assert {w.params["n"] for w in kv_cache.workloads(CPU, quick)} == {32, 256}
    assert set(bench.FAMILIES) == {"attention", "backward", "kv_cache", "sampling", "generate", "distributed"}
    assert bench.OPT_IN_FAMILIES == ("distributed",)  # it starts processes: only with --only
    args = build_parser().parse_args(["bench", "--only", "kv_cache", "--only", "sampling"])
    assert args.only == ["kv_cache", "sampling"]


def test_cli_info_prints_build_info(capsys):
    assert cli_main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"version", "cuda", "cuda_archs"} <= info.keys()


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"]])
def test_cli_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 0
    assert "bench" in capsys.readouterr().out


# ------------------------------------------------------------------------------ generate (E1)
GEN_TINY = gen_bench.GenSpec("T1", B=2, prompt=6, gen=8, block=4, steps=8, vocab=97, hidden=64, layers=1,
                             heads=1, kv_heads=1, mlp=96, mask_token_id=96)


def test_harness_workload_timing_and_stats():
    """A workload's own timing replaces the run's; Case.stats lands in the rows and the table."""
    x = torch.ones(4)

    def setup(device):
        return common.Case(impls=[common.Impl("dlmfuse", lambda: lambda: x * 2, kind="dlmfuse"),
                                  common.Impl("other", lambda: lambda: x + x)],
                           stats=lambda seconds: {name: {"calls": 1, "inverse": 1 / s}
                                                  for name, s in seconds.items()})
    own = common.Workload("X1", "own timing", "toy", {}, setup, timing=common.Timing(warmup=0, repeats=3))
    plain = common.Workload("X2", "run timing", "toy", {}, setup)
    out = io.StringIO()
    rows = bench.run([own, plain], device=CPU, timing=TINY_TIMING, out=out, progress=io.StringIO())
    for row in rows:
        repeats = 3 if row["workload"] == "X1" else TINY_TIMING.repeats
        assert row["repeats"] == repeats and len(row["times_ms"]) == repeats
        assert row["stats"]["calls"] == 1
        assert row["stats"]["inverse"] == pytest.approx(1e3 / row["time_ms"])
    table = out.getvalue()
    assert "X1 own timing: 3 rounds after 0 warm-up" in table
    assert "stats:" in table and "X2 run timing / other: calls=1, inverse=" in table


def test_generate_tiny_rows(tmp_path):
    out = io.StringIO()
    json_path = tmp_path / "rows.jsonl"
    rows = bench.run([gen_bench.workload(GEN_TINY)], device=CPU, timing=TINY_TIMING, command="pytest",
                     json_path=str(json_path), out=out, progress=io.StringIO())
    assert [json.loads(line) for line in json_path.read_text().splitlines()] == json.loads(json.dumps(rows))
    by = {r["impl"]: r for r in rows}
    assert list(by) == [name for name, _ in gen_bench.ROWS]
    tokens = GEN_TINY.B * GEN_TINY.gen
    for name, row in by.items():
        assert ROW_KEYS <= row.keys() and row["status"] == "ok", row["error"]
        assert row["family"] == "generate" and math.isfinite(row["time_ms"])
        stats = row["stats"]
        assert stats["tokens_per_s"] == pytest.approx(tokens / (row["time_ms"] / 1e3))
        assert stats["ms_per_step"] == pytest.approx(row["time_ms"] / stats["steps"])
        if name != "dlmfuse":
            assert 0.0 <= stats["same_tokens_vs_exact"] <= 1.0
        if name != "llada-loop":  # every mode is a line of the report with its speedup over the loop
            assert row["best_peer"] == "llada-loop" and math.isfinite(row["best_peer_ratio"])
    loop = by["llada-loop"]
    # The reference loop gives the exact mode's tokens, and its ratio is the exact mode's speedup.
    assert loop["max_abs_diff_vs_dlmfuse"] == 0.0 and loop["stats"]["same_tokens_vs_exact"] == 1.0
    assert loop["ratio_vs_dlmfuse"] == by["dlmfuse"]["best_peer_ratio"]
    # The first-step probe: logits_for rows against the all-rows LM head (fp32 here: same argmax).
    probe = by["dlmfuse"]["stats"]
    assert 0.0 <= probe["first_step_logits_max_diff"] < 1e-3 and probe["first_step_argmax_agree"] == 1.0
    for name in ("dlmfuse", "llada-loop", "dlmfuse.prefix", "dlmfuse.dual"):
        assert by[name]["stats"]["steps"] == GEN_TINY.steps
    assert GEN_TINY.gen // GEN_TINY.block <= by["dlmfuse.dual+threshold"]["stats"]["steps"] <= GEN_TINY.gen
    table = out.getvalue()
    assert GEN_TINY.desc in table and "tokens_per_s=" in table and "failed" not in table
    for mode in ("prefix", "dual", "dual+threshold"):
        assert f"{GEN_TINY.desc} / {mode}" in table


@pytest.mark.parametrize("steps, gen_length, block_length", [(8, 8, 4), (4, 8, 4), (3, 12, 12)])
def test_llada_loop_equals_exact_generate(steps, gen_length, block_length):
    """The bench's reference loop is LLaDA's: same tokens as dlmfuse.generate(cache="none")
    under greedy decoding, also with several tokens per step."""
    model = gen_bench.build_model(GEN_TINY, CPU)
    prompt = torch.randint(0, GEN_TINY.mask_token_id, (3, 5), generator=torch.Generator().manual_seed(1))
    sampler = dlmfuse.samplers.LLaDA(steps, gen_length, block_length, mask_token_id=GEN_TINY.mask_token_id)
    expected = dlmfuse.generate(model, prompt, sampler, cache="none")
    got = gen_bench.llada_loop(model, prompt, steps=steps, gen_length=gen_length, block_length=block_length,
                               mask_id=GEN_TINY.mask_token_id)
    assert torch.equal(got, expected)
    assert not (got[:, 5:] == GEN_TINY.mask_token_id).all()


def test_generate_model_is_seeded_and_sized():
    before = torch.random.get_rng_state()
    a, b = gen_bench.build_model(GEN_TINY, CPU), gen_bench.build_model(GEN_TINY, CPU)
    assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG is left alone
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not any(p.requires_grad for p in a.parameters())
    assert GEN_TINY.parameter_count() == sum(p.numel() for p in a.parameters())
    std = a.lm_head.weight.std().item() * math.sqrt(GEN_TINY.hidden)
    assert std == pytest.approx(gen_bench.LOGIT_STD, rel=0.1)


def test_generate_workloads_follow_design():
    """DESIGN.md §8 E1 on CUDA (LLaDA-8B shape, bf16), the small model on CPU; nothing allocated."""
    for quick in (False, True):
        gpu = gen_bench.workloads(torch.device("cuda"), quick)
        assert sorted(w.params["B"] for w in gpu) == [1, 8]
        for w in gpu:
            assert w.id == "E1" and w.timing is not None and w.family == "generate"
            assert {k: w.params[k] for k in ("layers", "hidden", "heads", "kv_heads", "mlp", "vocab", "dtype",
                                             "prompt", "gen", "block", "steps")} == dict(
                layers=32, hidden=4096, heads=32, kv_heads=32, mlp=12288, vocab=126464, dtype="bfloat16",
                prompt=512, gen=256, block=32, steps=256)
        cpu = gen_bench.workloads(CPU, quick)
        assert sorted(w.params["B"] for w in cpu) == [1, 4]
        for w in cpu:
            p = w.params
            assert p["dtype"] == "float32" and p["hidden"] // p["heads"] in (64, 128) and p["steps"] == p["gen"]
    e1 = gen_bench.GenSpec(B=8, **gen_bench.GPU_SETTINGS, **gen_bench.LLADA_8B)
    assert 7.9e9 < e1.parameter_count() < 8.1e9
    assert gen_bench.loop_peak_bytes(e1) > 30 * 2**30


def test_graph_timing_is_cuda_only_and_printed():
    """Rows of graph-capturable implementations report a CUDA-graph replay time on CUDA only; the
    table lists it (or why the capture failed) below the eager timings."""
    rows = bench.run([kv_cache.workload(kv_cache.KVSpec("K1", n=2, B=1, Lmax=16, H=1, D=8, validate=False))],
                     device=CPU, timing=TINY_TIMING, command="pytest", out=io.StringIO(), progress=io.StringIO())
    assert all(r["graph_time_ms"] is None and r["graph_error"] is None for r in rows)
    ok = dict(rows[0], graph_time_ms=0.02, graph_gbps=2500.0)
    refused = dict(rows[1], graph_time_ms=None, graph_error="RuntimeError: capture")
    out = io.StringIO()
    report.print_report([ok, refused, rows[2]], common.environment(CPU, "pytest"), TINY_TIMING, out)
    text = out.getvalue()
    assert "CUDA-graph replay (device time without launch overhead):" in text
    assert f"/ {ok['impl']}: 20.0 us, 2500 GB/s" in text
    assert f"/ {refused['impl']}: not captured: RuntimeError: capture" in text


def test_generate_batches_override(monkeypatch):
    """DLMFUSE_E1_BATCHES picks the E1 rows (a device run's minutes go to the rows it names)."""
    monkeypatch.setenv("DLMFUSE_E1_BATCHES", "8")
    assert [w.params["B"] for w in gen_bench.workloads(torch.device("cuda"), True)] == [8]
    monkeypatch.setenv("DLMFUSE_E1_BATCHES", "2, 3")
    assert [w.params["B"] for w in gen_bench.workloads(CPU, True)] == [2, 3]
    for bad in ("0", "eight", "1,,8", "-1"):
        monkeypatch.setenv("DLMFUSE_E1_BATCHES", bad)
        with pytest.raises(ValueError, match="DLMFUSE_E1_BATCHES"):
            gen_bench.workloads(CPU, True)


def test_generate_memory_guard_says_why():
    assert gen_bench.memory_refusal(10 * 2**30, 80 * 2**30, "the model") is None
    reason = gen_bench.memory_refusal(70 * 2**30, 40 * 2**30, "the reference loop")
    assert reason.startswith("skipped: the reference loop needs ~70.0 GiB") and "40.0 GiB free" in reason


def test_generate_rows_that_do_not_fit_record_why(monkeypatch):
    """On a GPU with too little free memory the E1 rows are skipped with the reason (the check
    runs before the model is built, so this never touches a GPU)."""
    monkeypatch.setattr(gen_bench, "_free_gpu_bytes", lambda device: 4 * 2**30)
    e1 = gen_bench.GenSpec(B=1, **gen_bench.GPU_SETTINGS, **gen_bench.LLADA_8B)
    rows = runner.run_workload(gen_bench.workload(e1), torch.device("cuda"), TINY_TIMING)
    assert [r["impl"] for r in rows] == [name for name, _ in gen_bench.ROWS]
    for row in rows:
        assert row["status"] == "error" and row["time_ms"] is None and row["stats"] is None
        assert row["error"].startswith("SkippedRow: skipped: the bfloat16 model needs ~14.9 GiB")


def test_distributed_family_runs_ranks_and_reports_the_bytes_sent(tmp_path):
    """A tiny D2 (sampling [2, 4, 64] over 2 gloo ranks) through the harness: three rows (2 ranks,
    2 ranks gathering the logits, one rank), the same tokens, and the bytes per sampling step:
    STATS_PER_ROW float64 per row against the other rank's half of the logits."""
    assert [w.id for w in dist_bench.workloads(CPU, quick=True)] == ["D1", "D2"]
    assert dist_bench.workloads(torch.device("cuda"), quick=False) == []  # gloo on the CPU only
    spec = dist_bench.DistSpec("D2", "sampling", B=2, rows=4, V=64)
    try:
        rows = bench.run([dist_bench.workload(spec)], device=CPU, timing=TINY_TIMING, command="pytest",
                         json_path=str(tmp_path / "rows.jsonl"), out=io.StringIO(), progress=io.StringIO())
    finally:
        dist_bench.close_pools()
    assert [r["impl"] for r in rows] == ["dlmfuse", "gather-logits", "one-rank"]
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    assert all(r["max_abs_diff_vs_dlmfuse"] == 0.0 for r in rows[1:])
    sent = {r["impl"]: r["stats"]["bytes_sent_per_rank"] for r in rows}
    assert sent == {"dlmfuse": 8 * dlmfuse.distributed.STATS_PER_ROW * 8, "gather-logits": 8 * 32 * 4, "one-rank": 0}
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 3
