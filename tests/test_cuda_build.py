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


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Every source compiled at once (nvcc is single-threaded; one at a time would leave
    cores idle): source -> (exit code, stderr, object file), or None without nvcc."""
    base = tmp_path_factory.mktemp("nvcc")
    jobs = {}
    for i, source in enumerate(SOURCES):
        out = base / f"{i}.o"
        cmd = nvcc_compile_command(source, str(out), str(base / "shim"))
        if cmd is None:
            return None
        jobs[source] = (subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), out)
    results = {}
    for src, (proc, out) in jobs.items():
        _, stderr = proc.communicate(timeout=600)  # reads as it waits: a full pipe cannot stall nvcc
        results[src] = (proc.returncode, stderr, out)
    return results


@pytest.mark.parametrize("source", SOURCES, ids=os.path.basename)
def test_cuda_source_compiles(source, compiled):
    if compiled is None:
        pytest.skip("nvcc or cuBLASLt headers not found (run `make cuda-headers`)")
    returncode, stderr, out = compiled[source]
    assert returncode == 0, f"nvcc failed on {source}:\n{stderr[-6000:]}"
    assert out.stat().st_size > 0


def test_there_are_cuda_sources():
    names = {os.path.basename(s) for s in SOURCES}
    assert "dense.cu" in names, names
