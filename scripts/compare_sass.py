"""Is the machine code of a CUDA file the same as at another commit? (no GPU needed)

    python scripts/compare_sass.py d45fee2                      # csrc/cuda/attention/attention_sm80.cu
    python scripts/compare_sass.py d45fee2 csrc/cuda/kv_cache.cu --arch 90a

Compiles the file at the working tree and at REF (each with its own csrc headers) for each
architecture, disassembles every kernel and hashes its instruction stream (addresses and
encodings dropped). A kernel of REF counts as unchanged when some kernel of the working tree has
the same hash, whatever its name (template parameters may have been added). Use it after a
refactor of a kernel that a device run verified: identical SASS carries that verification over.

Needs nvcc, and cuobjdump + nvdisasm: taken from PATH, else downloaded once from PyPI
(nvidia-cuda-cuobjdump, nvidia-cuda-nvdisasm) into ~/.cache/dlmfuse-sass-tools.
Exit status: 0 when every kernel of REF is unchanged, 1 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS = Path.home() / ".cache" / "dlmfuse-sass-tools"
INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]+\*/\s+([^;]*);")


def tool(name: str, package: str) -> str:
    found = shutil.which(name) or next((str(p) for p in TOOLS.rglob(name) if p.is_file()), None)
    if found:
        return found
    TOOLS.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(TOOLS), package], check=True)
    for wheel in TOOLS.glob(package.replace("-", "_") + "-*.whl"):
        zipfile.ZipFile(wheel).extractall(TOOLS / "unpacked")
    path = next(p for p in TOOLS.rglob(name) if p.is_file())
    path.chmod(0o755)
    return str(path)


def compile_object(src_root: Path, cu: str, arch: str, out: Path) -> None:
    subprocess.run(["nvcc", "-O3", "-DNDEBUG", f"--generate-code=arch=compute_{arch},code=[sm_{arch}]",
                    "-std=c++17", "-I", str(src_root / "csrc" / "include"), "-I", str(src_root / "csrc"),
                    "-c", str(src_root / cu), "-o", str(out)], check=True)


def kernel_hashes(obj: Path, cuobjdump: str, nvdisasm: str) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{Path(nvdisasm).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    sass = subprocess.run([cuobjdump, "-sass", str(obj)], check=True, capture_output=True, text=True, env=env).stdout
    kernels: dict[str, list[str]] = {}
    name = None
    for line in sass.splitlines():
        if "Function :" in line:
            name = line.split("Function :", 1)[1].strip()
            kernels[name] = []
        elif name is not None and (m := INSTRUCTION.match(line)):
            kernels[name].append(" ".join(m.group(1).split()))
    return {n: hashlib.sha256("\n".join(code).encode()).hexdigest()[:16] for n, code in kernels.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ref", help="the commit whose machine code to compare against (e.g. the verified build)")
    parser.add_argument("file", nargs="?", default="csrc/cuda/attention/attention_sm80.cu")
    parser.add_argument("--arch", action="append", help="80, 90a, ... (repeatable; default 80 and 90a)")
    args = parser.parse_args()
    cuobjdump = tool("cuobjdump", "nvidia-cuda-cuobjdump")
    nvdisasm = tool("nvdisasm", "nvidia-cuda-nvdisasm")
    unchanged = True
    with tempfile.TemporaryDirectory() as tmp:
        ref_root = Path(tmp) / "ref"
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.ref, "csrc"], check=True,
                                 capture_output=True).stdout
        tarfile.open(fileobj=io.BytesIO(archive)).extractall(ref_root)
        for arch in args.arch or ["80", "90a"]:
            hashes = {}
            for side, root in (("ref", ref_root), ("tree", ROOT)):
                obj = Path(tmp) / f"{side}-{arch}.o"
                compile_object(root, args.file, arch, obj)
                hashes[side] = kernel_hashes(obj, cuobjdump, nvdisasm)
            tree_hashes = set(hashes["tree"].values())
            for name, digest in sorted(hashes["ref"].items()):
                same = digest in tree_hashes
                unchanged &= same
                print(f"sm_{arch:4s} {'same   ' if same else 'CHANGED'} {digest} {name}")
            print(f"sm_{arch}: {len(hashes['ref'])} kernels at {args.ref}, {len(hashes['tree'])} in the working tree")
    print("every kernel of", args.ref, "is unchanged" if unchanged else "has changed machine code somewhere")
    return 0 if unchanged else 1


if __name__ == "__main__":
    sys.exit(main())
