#!/usr/bin/env bash
# Builds the cp312-abi3 wheel (CUDA on, sm_80 + sm_90a) that scripts/gpu_check.sh installs on the
# lent GPU machine, into .whl/ (git-ignored; name it in the device tool's `carry`). Building here
# saves device minutes: the machine has Python 3.12 and no network (BUILD_NOTES.md).
set -euo pipefail
cd "$(dirname "$0")/.."
py312="${PY312:-$HOME/.pyenv/versions/3.12.1/bin/python}"
venv="$(mktemp -d "${TMPDIR:-/tmp}/dlmfuse-wheel.XXXXXX")"
trap 'rm -rf "$venv"' EXIT
"$py312" -m venv "$venv"
"$venv/bin/python" -m pip install -q build
rm -rf .whl && mkdir -p .whl
DLMFUSE_CUDA=ON CUDAARCHS="${CUDAARCHS:-80;90a-real}" "$venv/bin/python" -m build --wheel --outdir .whl .
# The commit the wheel is built from (with -dirty for uncommitted changes): gpu_check.sh reports it
# in the bench rows, since the device's copy of the checkout may carry stale git metadata.
sha="$(git rev-parse HEAD)"
git diff --quiet HEAD -- csrc python CMakeLists.txt pyproject.toml || sha="$sha-dirty"
echo "$sha" > .whl/GIT_SHA
ls -l .whl
