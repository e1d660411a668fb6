"""Where the CUDA build finds cuBLASLt: pip's nvidia wheels (CUDA 12 and 13
layouts) and system toolkits, on fake directory trees."""

from __future__ import annotations

import pytest

from densepipe import _build


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")
    return path


@pytest.fixture
def layout(tmp_path, monkeypatch):
    """Points the path lookups at a fake site-packages and an optional fake toolkit."""
    site, home = tmp_path / "site-packages", tmp_path / "cuda"
    site.mkdir()
    monkeypatch.setattr(_build, "_site_dirs", lambda: [str(site)])
    monkeypatch.setattr(_build, "cuda_home", lambda: str(home) if home.exists() else None)
    return site, home


@pytest.mark.parametrize("wheel_dir,soname", [("cu13", "libcublasLt.so.13"), ("cublas", "libcublasLt.so.12")])
def test_pip_wheel_links_the_versioned_soname(layout, wheel_dir, soname):
    site, _ = layout
    root = site / "nvidia" / wheel_dir
    touch(root / "include" / "cublasLt.h")
    touch(root / "lib" / soname)
    assert _build.cublas_include_dirs() == [str(root / "include")]
    link = _build.cublaslt_link()
    assert link == {"library_dirs": [str(root / "lib")], "runtime_library_dirs": [str(root / "lib")],
                    "extra_link_args": [f"-l:{soname}"]}


def test_soname_preferred_over_full_version(layout):
    site, _ = layout
    lib = site / "nvidia" / "cu13" / "lib"
    touch(lib / "libcublasLt.so.13.1.0.3")
    touch(lib / "libcublasLt.so.13")
    touch(lib / "libcublasLt.so.12")
    assert _build.cublaslt_link()["extra_link_args"] == ["-l:libcublasLt.so.13"]


@pytest.mark.parametrize("libdir", ["lib64", "targets/x86_64-linux/lib"])
def test_system_toolkit_links_by_name(layout, libdir):
    _, home = layout
    touch(home / "bin" / "nvcc")
    touch(home / "include" / "cublasLt.h")
    touch(home / libdir / "libcublasLt.so")
    touch(home / libdir / "libcublasLt.so.12")
    assert _build.cublas_include_dirs() == [str(home / "include")]
    link = _build.cublaslt_link()
    assert link["library_dirs"] == [str(home / libdir)]
    assert link["extra_link_args"] == ["-lcublasLt"]


def test_pip_library_preferred_over_toolkit(layout):
    """A pip CUDA torch loads pip's cuBLASLt; linking the same copy keeps one in the process."""
    site, home = layout
    touch(home / "lib64" / "libcublasLt.so")
    touch(site / "nvidia" / "cu13" / "lib" / "libcublasLt.so.13")
    assert _build.cublaslt_link()["library_dirs"] == [str(site / "nvidia" / "cu13" / "lib")]


def test_no_library_found(layout):
    site, home = layout
    touch(site / "nvidia" / "cu13" / "include" / "cublasLt.h")  # headers alone do not link
    touch(home / "lib64" / "libcudart.so")
    assert _build.cublaslt_link() is None


# ------------------------------------------------ the C++ runtime the extension links
def test_loaded_libstdcxx_reads_the_process_maps(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(
        "7f00-7f10 r--p 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
        "7f20-7f30 r-xp 00000000 08:01 2 /usr/lib/x86_64-linux-gnu/libstdc++.so.6.0.33\n"
        "7f30-7f40 r--p 00010000 08:01 2 /usr/lib/x86_64-linux-gnu/libstdc++.so.6.0.33\n"
        "7f50-7f60 rw-p 00000000 00:00 0 \n")
    assert _build.loaded_libstdcxx(str(maps)) == "/usr/lib/x86_64-linux-gnu/libstdc++.so.6.0.33"
    maps.write_text("7f00-7f10 r--p 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert _build.loaded_libstdcxx(str(maps)) is None
    assert _build.loaded_libstdcxx(str(tmp_path / "missing")) is None


def test_extension_shares_the_loaded_cxx_runtime():
    """A second, static libstdc++ inside the extension crashes on the first number it formats
    into an error message; the built extension must name the shared one torch loads."""
    import shutil
    import subprocess

    import densepipe._C as ext

    runtime = _build.loaded_libstdcxx()
    assert runtime is not None and runtime.startswith("/")
    assert shutil.which("ldd"), "ldd (glibc) lists the extension's shared libraries"
    linked = subprocess.run(["ldd", ext.__file__], capture_output=True, text=True, check=True).stdout
    assert "libstdc++.so.6 =>" in linked
