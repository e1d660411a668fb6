"""Build-time facts shared by setup.py and the CUDA compile test.

Kept free of torch imports at module level so setup.py can load it before the
extension exists.
"""

import glob
import os
import site
import sysconfig

_AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"}
_AVX2 = {"avx2", "fma"}


def cpu_capability() -> str:
    """The widest ATen vector ISA this CPU supports: AVX512, AVX2 or DEFAULT."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "DEFAULT"
    have = set(flags)
    if _AVX512 <= have:
        return "AVX512"
    if _AVX2 <= have:
        return "AVX2"
    return "DEFAULT"


def _site_dirs() -> list[str]:
    dirs = [sysconfig.get_paths()["purelib"], *site.getsitepackages()]
    return list(dict.fromkeys(d for d in dirs if os.path.isdir(d)))


def cuda_home() -> str | None:
    """The CUDA toolkit root, as torch finds it, or from nvcc on PATH."""
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME:
        return cpp_extension.CUDA_HOME
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return root
    return None


def _pip_nvidia_roots() -> list[str]:
    """pip's CUDA wheels: site-packages/nvidia/<name>/{include,lib}, <name> being
    the library (cublas, CUDA 12 wheels) or the CUDA major (cu13, CUDA 13 wheels)."""
    return [r for d in _site_dirs() for r in sorted(glob.glob(os.path.join(d, "nvidia", "*")))]


def _toolkit_lib_dirs() -> list[str]:
    home = cuda_home()
    if not home:
        return []
    return [os.path.join(home, "lib64"), os.path.join(home, "lib"),
            *sorted(glob.glob(os.path.join(home, "targets", "*", "lib")))]


def cublas_include_dirs() -> list[str]:
    """Directories holding cublasLt.h: the toolkit's own, pip's nvidia-cublas, or
    headers unpacked by `make cuda-headers` (the toolkit here ships without them)."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    candidates = []
    home = cuda_home()
    if home:
        candidates.append(os.path.join(home, "include"))
    candidates += [os.path.join(r, "include") for r in _pip_nvidia_roots()]
    candidates += glob.glob(os.path.join(here, ".venv", "cuda-headers", "nvidia", "*", "include"))
    return [d for d in candidates if os.path.exists(os.path.join(d, "cublasLt.h"))][:1]


def _soname_major(name: str) -> int:
    tail = name.rsplit(".so.", 1)[-1].split(".")[0]
    return int(tail) if tail.isdigit() else -1


def cublaslt_link() -> dict[str, list[str]] | None:
    """Linker settings for libcublasLt, or None when no copy is found.

    pip's wheels come first: a CUDA build of torch from pip loads its cuBLASLt from
    there, and linking the same soname keeps one copy in the process. Those wheels
    ship only the versioned file (libcublasLt.so.13), which `-lcublasLt` cannot find,
    so that case links it by file name (`-l:libcublasLt.so.13`)."""
    for libdir in [os.path.join(r, "lib") for r in _pip_nvidia_roots()] + _toolkit_lib_dirs():
        if os.path.exists(os.path.join(libdir, "libcublasLt.so")):
            flag = "-lcublasLt"
        else:
            versioned = glob.glob(os.path.join(libdir, "libcublasLt.so.*"))
            if not versioned:
                continue
            # The soname itself (libcublasLt.so.13 rather than .so.13.1.0.3), newest major first.
            best = min((os.path.basename(v) for v in versioned), key=lambda n: (-_soname_major(n), len(n)))
            flag = f"-l:{best}"
        return {"library_dirs": [libdir], "runtime_library_dirs": [libdir], "extra_link_args": [flag]}
    return None


def loaded_libstdcxx(maps: str = "/proc/self/maps") -> str | None:
    """The shared C++ runtime (libstdc++.so.6) this process has loaded, torch's own, or None.

    Linked by path, it makes the extension use that runtime even where the compiler driver
    links libstdc++ statically by default (a GCC configured with static standard libraries):
    two C++ runtimes in one process disagree on locale state, and formatting the first number
    into an error message then crashes."""
    try:
        with open(maps) as f:
            paths = {line.split()[-1] for line in f if "/libstdc++.so" in line}
    except OSError:
        return None
    return min(paths) if paths else None


# The CPU build of torch ships the c10/cuda headers but not this generated one;
# for compile-only checks of our CUDA sources we supply its one line.
_CUDA_CMAKE_MACROS = "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n"


def nvcc_compile_command(source: str, obj: str, shim_dir: str, arch: str = "90") -> list[str] | None:
    """An nvcc command that compiles one of our .cu files to an object file the way
    the CUDA extension build does, or None when nvcc or the cuBLASLt headers are
    missing. Writes the shim header under shim_dir."""
    import shutil

    import torch.utils.cpp_extension as ce

    nvcc = shutil.which("nvcc") or (os.path.join(cuda_home(), "bin", "nvcc") if cuda_home() else None)
    cublas = cublas_include_dirs()
    if not nvcc or not os.path.exists(nvcc) or not cublas:
        return None
    shim = os.path.join(shim_dir, "c10", "cuda", "impl")
    os.makedirs(shim, exist_ok=True)
    header = os.path.join(shim, "cuda_cmake_macros.h")
    if not os.path.exists(header):
        with open(header, "w") as f:
            f.write(_CUDA_CMAKE_MACROS)
    includes = [*ce.include_paths(), shim_dir, sysconfig.get_paths()["include"], *cublas]
    return [
        nvcc, "-c", source, "-o", obj, "-std=c++20", "-O3", "-DDENSEPIPE_CUDA",
        "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC",
        "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
        f"-gencode=arch=compute_{arch},code=sm_{arch}",
        *[f"-I{d}" for d in includes],
    ]
