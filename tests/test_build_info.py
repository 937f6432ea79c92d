"""dlmfuse.build_info() and `python -m dlmfuse info`: what the build contains, one source of truth."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch
from packaging.version import Version

import dlmfuse
from dlmfuse import _ext

PYPROJECT = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"
DEVICES = ("cpu", "cuda")


def pyproject_version() -> str:
    text = PYPROJECT.read_text()
    project = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    assert project, "pyproject.toml has no [project] table"
    version = re.search(r'^version\s*=\s*"([^"]+)"', project.group(1), re.M)
    assert version, "[project] has no version"
    return version.group(1)


def test_version_is_one_source_of_truth():
    info = dlmfuse.build_info()
    assert info["version"] == dlmfuse.__version__ == dlmfuse._C.__version__ == pyproject_version()
    Version(info["version"])  # a valid PEP 440 version


def test_cuda_fields():
    info = dlmfuse.build_info()
    assert isinstance(info["cuda"], bool)
    assert isinstance(info["cuda_archs"], list) and all(isinstance(a, str) for a in info["cuda_archs"])
    if info["cuda"]:
        assert info["cuda_archs"], "a CUDA build names its architectures"
        assert all(re.fullmatch(r"\d+[a-z]?(-real|-virtual)?", a) for a in info["cuda_archs"]), info["cuda_archs"]
    else:
        assert info["cuda_archs"] == []


def test_kernels_say_which_devices_are_native(monkeypatch):
    monkeypatch.delenv("DLMFUSE_BACKEND", raising=False)
    kernels = dlmfuse.build_info()["kernels"]
    assert {"attention", "merge_attention"} <= set(kernels)
    for op, per_device in kernels.items():
        assert set(per_device) == set(DEVICES), (op, per_device)
        for device, kind in per_device.items():
            assert kind in ("native", "reference"), (op, device, kind)
            assert _ext.use_reference(op, torch.device(device)) == (kind == "reference"), (op, device)
    assert kernels["attention"]["cpu"] == "native"
    assert kernels["merge_attention"]["cpu"] == "native"


def test_cpu_fields_are_consistent():
    info = dlmfuse.build_info()
    assert info["cpu_isa"] == dlmfuse._C.cpu_isa()
    assert info["cpu_isa"] in info["compiled_cpu_isas"]
    assert "baseline" in info["compiled_cpu_isas"]
    assert info["attention_max_head_dim"] == dlmfuse._C.ATTENTION_MAX_HEAD_DIM == 256
    assert info["attention_tile_dims"] == list(dlmfuse._C.ATTENTION_TILE_DIMS)
    if info["cuda"]:
        assert info["cuda_attention_head_dims"] == [64, 128]
    assert isinstance(info["num_threads"], int) and info["num_threads"] >= 1


def _cpuinfo_flags() -> set:
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = re.search(r"^flags\s*:(.*)$", text, re.M)
    return set(line.group(1).split()) if line else set()


def test_the_best_compiled_isa_the_cpu_supports_is_active():
    """The dispatcher sees what /proc/cpuinfo lists (a wheel linked by clang once saw nothing)."""
    flags = _cpuinfo_flags()
    if not flags or os.environ.get("DLMFUSE_CPU_ISA"):
        pytest.skip("needs /proc/cpuinfo and no DLMFUSE_CPU_ISA override")
    compiled = dlmfuse.build_info()["compiled_cpu_isas"]
    want = "baseline"
    if "avx2" in compiled and {"avx2", "fma", "f16c"} <= flags:
        want = "avx2"
    if "avx512" in compiled and {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        want = "avx512"
    assert dlmfuse.build_info()["cpu_isa"] == want


def test_build_info_is_json_serialisable():
    info = dlmfuse.build_info()
    assert json.loads(json.dumps(info)) == info


def run_python(*args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "DLMFUSE_BACKEND"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120)


def test_cli_info_prints_json():
    result = run_python("-m", "dlmfuse", "info", env_extra={"DLMFUSE_BACKEND": "reference"})
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    expected = dlmfuse.build_info()
    expected["backend_override"] = "reference"
    # The override routes every op to the reference, and "kernels" reports what dispatch does.
    expected["kernels"] = {op: {dev: "reference" for dev in devs} for op, devs in expected["kernels"].items()}
    assert printed == expected


def test_misspelt_backend_override_is_an_error(monkeypatch):
    """DLMFUSE_BACKEND=refrence must not silently run the native kernels it meant to bypass."""
    q = torch.randn(1, 3, 2, 64)
    monkeypatch.setenv("DLMFUSE_BACKEND", "refrence")
    with pytest.raises(ValueError, match="DLMFUSE_BACKEND must be 'reference', 'native' or unset, got 'refrence'"):
        dlmfuse.attention(q, q, q)
    for fine in ("native", ""):
        monkeypatch.setenv("DLMFUSE_BACKEND", fine)
        assert dlmfuse.build_info()["kernels"]["attention"]["cpu"] == "native"


def test_bad_thread_count_warns_at_import():
    code = "import dlmfuse; print(dlmfuse.build_info()['num_threads'])"
    result = run_python("-W", "error::RuntimeWarning", "-c", code, env_extra={"DLMFUSE_NUM_THREADS": "abc"})
    assert result.returncode != 0 and "DLMFUSE_NUM_THREADS='abc' is not a positive integer" in result.stderr
    result = run_python("-W", "error::RuntimeWarning", "-c", code, env_extra={"DLMFUSE_NUM_THREADS": "2"})
    assert result.returncode == 0 and result.stdout.strip() == "2", result.stderr


def test_import_and_build_info_never_touch_the_gpu():
    code = (
        "import torch, dlmfuse\n"
        "dlmfuse.build_info()\n"
        "q = torch.randn(1, 3, 2, 64)\n"
        "dlmfuse.attention(q, q, q, mask=dlmfuse.Mask.causal(3))\n"
        "assert not torch.cuda.is_initialized(), 'CUDA was initialised'\n"
        "print('ok')\n"
    )
    result = run_python("-c", code)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_order_infinity_is_one_constant():
    """The extension exports ORDER_INFINITY; mask.py (torch-only, shared with the reference)
    spells it INT32_MAX: both must agree."""
    from dlmfuse import mask

    assert dlmfuse.ORDER_INFINITY == mask.INT32_MAX == 2**31 - 1


def test_a_cpu_build_on_a_gpu_machine_fails_the_cuda_tests_loudly(tmp_path):
    """Run conftest's hook in a child pytest where torch sees a GPU and the build has no CUDA:
    the CUDA-marked test must fail (not skip), unless the opt-out is set."""
    conftest = pathlib.Path(__file__).with_name("conftest.py").read_text()
    pretend = ("import torch, dlmfuse\n"
               "torch.cuda.is_available = lambda: True\n"
               "_info = dlmfuse.build_info\n"
               "dlmfuse.build_info = lambda: {**_info(), 'cuda': False}\n")
    future = "from __future__ import annotations\n"  # must stay the first statement
    (tmp_path / "conftest.py").write_text(conftest.replace(future, future + pretend, 1))
    (tmp_path / "test_gpu.py").write_text("import pytest\n\n@pytest.mark.cuda\ndef test_on_gpu():\n    pass\n")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k != "DLMFUSE_TEST_CPU_BUILD_ON_GPU"}
    failed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert failed.returncode == 1 and "a GPU is visible but this dlmfuse build has no CUDA module" in failed.stdout, failed.stdout
    skipped = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300,
                             env={**env, "DLMFUSE_TEST_CPU_BUILD_ON_GPU": "1"})
    assert skipped.returncode == 0 and "1 skipped" in skipped.stdout, skipped.stdout
