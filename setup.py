"""Builds densepipe._C: the fused dense+activation and optimizer-step kernels.

A CppExtension always; a CUDAExtension when the installed torch has CUDA and a
CUDA toolkit is found. Environment overrides:
  DENSEPIPE_CUDA=0|1           force the CUDA build off or on
  DENSEPIPE_CPU_CAPABILITY=... DEFAULT, AVX2 or AVX512 (default: what this CPU has)
"""

import glob
import importlib.util
import os

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_build_helpers():
    # By path: importing the package itself would need the extension we are building.
    spec = importlib.util.spec_from_file_location("_densepipe_build", os.path.join(ROOT, "src", "densepipe", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_build = _load_build_helpers()
cpu_capability, cublas_include_dirs, cublaslt_link, loaded_libstdcxx = (
    _build.cpu_capability, _build.cublas_include_dirs, _build.cublaslt_link, _build.loaded_libstdcxx)

ISA_FLAGS = {  # compiler flags that match ATen's vectorized code paths
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}


def want_cuda() -> bool:
    forced = os.environ.get("DENSEPIPE_CUDA")
    if forced is not None:
        return forced == "1"
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def extension():
    cap = os.environ.get("DENSEPIPE_CPU_CAPABILITY") or cpu_capability()
    if cap not in ISA_FLAGS:
        raise SystemExit(f"DENSEPIPE_CPU_CAPABILITY={cap!r}: expected one of {sorted(ISA_FLAGS)}")
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno", f"-DCPU_CAPABILITY={cap}",
           f"-DCPU_CAPABILITY_{cap}", *ISA_FLAGS[cap]]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    # torch's C++ runtime by path, ahead of the driver's own -lstdc++ (see loaded_libstdcxx).
    runtime = loaded_libstdcxx()
    common = dict(name="densepipe._C", sources=sources, extra_link_args=["-fopenmp", *([runtime] if runtime else [])])
    if not want_cuda():
        return cpp_extension.CppExtension(**common, extra_compile_args={"cxx": cxx})
    includes, link = cublas_include_dirs(), cublaslt_link()
    if not includes or link is None:
        state = (f"cublasLt.h {'found' if includes else 'missing'}, "
                 f"libcublasLt {'found' if link else 'missing'}")
        raise SystemExit(f"CUDA build: cuBLASLt not found ({state}); install the nvidia-cublas wheel or a "
                         "CUDA toolkit with cuBLAS, or build for CPU with DENSEPIPE_CUDA=0")
    # No --use_fast_math: the epilogues are memory bound, and exact expf/erff/tanhf
    # keep results within rounding of torch's own activations.
    nvcc = ["-O3", "-std=c++20", "-lineinfo", "-DDENSEPIPE_CUDA"]
    common["sources"] += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    common["extra_link_args"] += link["extra_link_args"]
    return cpp_extension.CUDAExtension(
        **common,
        include_dirs=includes,
        library_dirs=link["library_dirs"],
        runtime_library_dirs=link["runtime_library_dirs"],
        extra_compile_args={"cxx": cxx + ["-DDENSEPIPE_CUDA"], "nvcc": nvcc},
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
