"""docs/ stays true: its code blocks run, its links resolve, the benchmark page defines every
workload id and flag the bench has, and nothing a user reads points at files they do not have."""

import pathlib
import re

import pytest
import torch

from dlmfuse import bench
from dlmfuse.__main__ import build_parser

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))


def test_docs_exist():
    assert {p.name for p in DOCS} >= {"README.md", "visibility.md", "ops.md", "dispatch.md", "generation.md",
                                      "benchmarks.md"}


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_code_blocks_run(page):
    """The python blocks of a page run in order, sharing one namespace (as a reader would paste them)."""
    namespace: dict = {}
    for i, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)):
        exec(compile(block, f"{page.name}, block {i + 1}", "exec"), namespace)


@pytest.mark.parametrize("page", DOCS + [ROOT / "README.md", ROOT / "examples" / "README.md"], ids=lambda p: p.name)
def test_relative_links_resolve(page):
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
        if "://" in target:
            continue
        assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def _all_workload_ids():
    ids = set()
    for device in (torch.device("cpu"), torch.device("cuda")):  # building the lists allocates nothing
        for module in bench.FAMILIES.values():
            ids |= {w.id for w in module.workloads(device, quick=False)}
    return ids


def test_benchmark_page_defines_every_workload_and_flag():
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    defined = set(re.findall(r"^\| (\w+) \| (?:CPU|CUDA) \|", text, flags=re.M))
    assert defined == _all_workload_ids()
    bench_parser = build_parser()._subparsers._group_actions[0].choices["bench"]
    flags = {opt for action in bench_parser._actions for opt in action.option_strings if opt.startswith("--")}
    assert {f for f in flags if f"`{f}" not in text} == {"--help"}
    for module in bench.FAMILIES.values():
        assert all(f"`{peer}`" in text for peer in module.PEERS), module.FAMILY


def test_user_facing_text_points_to_docs_not_design_md():
    """README, the package (docstrings, CLI help), the bench scripts, the tools, docs and examples
    never send a user to DESIGN.md or KERNELS.md (files outside the repository)."""
    files = [ROOT / "README.md", *DOCS, *(ROOT / "examples").glob("*"), *(ROOT / "python").rglob("*.py"),
             *(ROOT / "bench").glob("*.py"), *(ROOT / "scripts").glob("*")]
    offenders = [str(p.relative_to(ROOT)) for p in files
                 if p.is_file() and re.search(r"DESIGN\.md|KERNELS\.md", p.read_text(errors="ignore"))]
    assert offenders == []
    assert "docs/benchmarks.md" in build_parser()._subparsers._group_actions[0].choices["bench"].format_help()
