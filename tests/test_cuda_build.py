"""Our CUDA sources must compile with this machine's nvcc even without a GPU.

Running them is proven on a GPU (tests marked `cuda`); this test only checks the
code is valid CUDA C++ against the installed torch's headers. It skips, saying
why, when nvcc or the cuBLASLt headers are not available (`make cuda-headers`).
"""

import glob
import os
import subprocess

import pytest

from densepipe._build import nvcc_compile_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


@pytest.mark.parametrize("source", SOURCES, ids=os.path.basename)
def test_cuda_source_compiles(source, tmp_path):
    cmd = nvcc_compile_command(source, str(tmp_path / "out.o"), str(tmp_path / "shim"))
    if cmd is None:
        pytest.skip("nvcc or cuBLASLt headers not found (run `make cuda-headers`)")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"nvcc failed on {source}:\n{proc.stderr[-6000:]}"
    assert (tmp_path / "out.o").stat().st_size > 0


def test_there_are_cuda_sources():
    names = {os.path.basename(s) for s in SOURCES}
    assert "dense.cu" in names, names
