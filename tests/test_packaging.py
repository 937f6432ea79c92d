"""Packaging basics: --version, py.typed inside the package, LICENSE matching pyproject's license,
a CHANGELOG entry for the version the package reports."""

import importlib.resources
import pathlib
import re
import subprocess
import sys

import dlmfuse

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_version_flag():
    result = subprocess.run([sys.executable, "-m", "dlmfuse", "--version"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"dlmfuse {dlmfuse.__version__}"


def test_package_is_typed():
    """PEP 561: py.typed sits in the installed package folder (pyproject ships the folder whole);
    also run against an installed wheel, so nothing here reads the source tree's python/."""
    assert importlib.resources.files("dlmfuse").joinpath("py.typed").is_file()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^wheel\.packages = \["python/dlmfuse"\]', pyproject, flags=re.M)


def test_license_is_the_apache_2_text():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert 'license = { text = "Apache-2.0" }' in (ROOT / "pyproject.toml").read_text()


def test_changelog_has_the_current_version():
    changelog = (ROOT / "CHANGELOG.md").read_text()
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), flags=re.M).group(1)
    assert version == dlmfuse.__version__
    assert f"\n## {version}\n" in changelog and "\n## Unreleased\n" in changelog
