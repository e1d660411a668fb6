"""Unpacks cuBLAS/cuBLASLt headers from PyPI's nvidia-cublas wheel into a folder.

The CUDA toolkit on a machine without a GPU may ship nvcc without cuBLAS headers.
Compiling our CUDA sources there needs only the headers, so we fetch the wheel
and unpack its include/ folder instead of installing ~700 MB of libraries.
Does nothing when cublasLt.h is already reachable.
"""

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from densepipe._build import cublas_include_dirs


def main(dest: str) -> int:
    found = cublas_include_dirs()
    if found:
        print(f"cuBLASLt headers: {found[0]}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
               "-d", tmp, "nvidia-cublas"]
        if subprocess.run(cmd).returncode != 0:
            print("cuBLASLt headers: could not download nvidia-cublas; CUDA compile test will skip")
            return 0
        wheel = next(Path(tmp).glob("nvidia_cublas-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            members = [n for n in zf.namelist() if "/include/" in n]
            zf.extractall(dest, members)
    print(f"cuBLASLt headers unpacked into {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
