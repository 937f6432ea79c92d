#!/usr/bin/env bash
# Runs the project's test suite against an installed wheel, as a user gets it: a fresh venv of the
# given Python, the wheel and the given torch from the package index, no compiler on PATH, and the
# tests copied away from the source tree (so `dlmfuse` can only come from the wheel).
#
#   bash scripts/test_wheel.sh dist/dlmfuse-*-cp311-*.whl torch==2.13.0 [python [pytest args]]
#   bash scripts/test_wheel.sh dist/dlmfuse-*-abi3-*.whl torch==2.14.1 ~/.pyenv/versions/3.13.0/bin/python
#
#   bash scripts/test_wheel.sh WHEEL TORCH PYTHON -q -rf tests/test_docs.py   (pytest arguments last;
#                                                                        default: -q -x tests)
set -euo pipefail
cd "$(dirname "$0")/.."
wheel="$(realpath "$1")"
torch_spec="$2"
python="${3:-python3}"
shift $(($# < 3 ? $# : 3))
[ $# -gt 0 ] || set -- -q -x tests

work="$(mktemp -d "${TMPDIR:-/tmp}/dlmfuse-wheel-test.XXXXXX")"
trap 'rm -rf "$work"' EXIT
"$python" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q "$torch_spec" "$wheel" pytest hypothesis packaging matplotlib transformers tokenizers
cp -r tests README.md pyproject.toml LICENSE CHANGELOG.md .ci docs examples bench scripts "$work/"  # what tests read

# PATH: the venv and git (bench rows record the commit); no gcc, g++, cc, clang or nvcc.
mkdir "$work/bin"
ln -s "$(command -v git)" "$work/bin/git"
cd "$work"
env -i HOME="$HOME" PATH="$work/venv/bin:$work/bin" TMPDIR="${TMPDIR:-/tmp}" \
  "$work/venv/bin/python" - <<'EOF'
import shutil, sys
import dlmfuse, torch
compilers = [c for c in ("gcc", "g++", "cc", "c++", "clang", "nvcc") if shutil.which(c)]
assert not compilers, f"compilers on PATH: {compilers}"
assert dlmfuse.__file__.startswith(sys.prefix), f"dlmfuse imported from {dlmfuse.__file__}, not the venv"
info = dlmfuse.build_info()
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, dlmfuse {info['version']} from {dlmfuse.__file__}")
print(f"cuda {info['cuda']}, archs {info['cuda_archs']}, cpu isa {info['cpu_isa']}")
EOF
env -i HOME="$HOME" PATH="$work/venv/bin:$work/bin" TMPDIR="${TMPDIR:-/tmp}" \
  "$work/venv/bin/python" -m pytest -p no:cacheprovider "$@"
