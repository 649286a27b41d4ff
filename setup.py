"""Build script of kfac-kernels: the Python packages and the native extension ``kfac_kernels._C``.

Install (torch must already be installed; the build uses it, so no build isolation):

    pip install --no-build-isolation -e .          # or without -e

``kfac_kernels._C`` holds the C++ CPU kernels (always built, OpenMP where the compiler has it) and
the CUDA kernels (built when the installed torch has CUDA and nvcc is found under CUDA_HOME or on
PATH; no GPU is needed to build). Without the extension every op still runs (eager / Triton).

Environment switches, read at build time:

    KFAC_KERNELS_NO_NATIVE=1   build no extension at all: a pure-Python install.
    KFAC_KERNELS_FORCE_CPU=1   never build the CUDA kernels (CPU extension only).
    KFAC_KERNELS_FORCE_CUDA=1  require the CUDA kernels: build them even where no GPU is visible
                               (build machines) and fail with a clear error if the installed torch
                               has no CUDA or nvcc is missing, instead of falling back to CPU only.
    KFAC_KERNELS_DEBUG=1       compile with -O0 -g instead of -O3.
    MAX_JOBS=N                 parallel compile jobs (ninja; read by torch.utils.cpp_extension).
    TORCH_CUDA_ARCH_LIST       CUDA architectures to compile for, e.g. "8.0;9.0+PTX" (default:
                               the visible GPUs, or torch's list when none is visible).
    CUDA_HOME                  CUDA toolkit to use (default: found from nvcc on PATH).
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
import subprocess
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _version() -> str:
    """The one source of the version: ``__version__`` in ``kfac_kernels/_version.py``."""
    text = open(os.path.join(ROOT, "kfac_kernels", "_version.py"), encoding="utf-8").read()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


VERSION = _version()


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _sources(pattern: str) -> list[str]:
    # Relative to the project root (setuptools wants relative paths), sorted for stable builds.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _cuda_toolkit(torch) -> tuple[bool, str]:
    """(usable, reason): whether the CUDA kernels can be built here, and why not."""
    if torch.version.cuda is None:
        hip = " (it is a ROCm build)" if getattr(torch.version, "hip", None) else ""
        return False, f"the installed torch {torch.__version__} has no CUDA{hip}"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return False, "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc" + (".exe" if sys.platform == "win32" else ""))
    if not os.path.exists(nvcc):
        return False, f"nvcc not found at {nvcc} (CUDA_HOME={CUDA_HOME})"
    # torch.utils.cpp_extension refuses an nvcc whose major version differs from torch's CUDA.
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True,
                             check=True).stdout
        found = re.search(r"release (\d+)\.(\d+)", out)
    except (OSError, subprocess.CalledProcessError):
        found = None
    if found and found.group(1) != torch.version.cuda.split(".")[0]:
        return False, (f"nvcc at {nvcc} is CUDA {found.group(1)}.{found.group(2)} but torch was "
                       f"built with CUDA {torch.version.cuda} (the major versions must match)")
    return True, ""


def _openmp_flags() -> tuple[list[str], list[str]]:
    """(compile, link) flags for OpenMP; none where the default compiler lacks it (macOS clang)."""
    if sys.platform == "win32":
        return ["/openmp"], []
    if sys.platform == "darwin":
        return [], []
    return ["-fopenmp"], ["-fopenmp"]


def _extensions():
    """(ext_modules, cmdclass) for setup()."""
    if _flag("KFAC_KERNELS_NO_NATIVE"):
        print("kfac-kernels: KFAC_KERNELS_NO_NATIVE=1, building no native extension")
        stale = glob.glob(os.path.join(ROOT, "kfac_kernels", "_C.*"))
        if stale:
            print("kfac-kernels: warning: an extension built earlier is still in the source tree "
                  f"and an editable install will import it: {', '.join(stale)} (delete it for a "
                  "pure-Python package)")
        return [], {}
    force_cpu, force_cuda = _flag("KFAC_KERNELS_FORCE_CPU"), _flag("KFAC_KERNELS_FORCE_CUDA")
    if force_cpu and force_cuda:
        raise RuntimeError("kfac-kernels: KFAC_KERNELS_FORCE_CPU and KFAC_KERNELS_FORCE_CUDA are "
                           "both set; set at most one")
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as err:
        raise RuntimeError(
            "kfac-kernels: building kfac_kernels._C needs torch installed in the build "
            "environment. Install torch first and build with `pip install --no-build-isolation "
            "-e .`, or set KFAC_KERNELS_NO_NATIVE=1 for a pure-Python install "
            f"(import error: {err})") from err

    with_cuda = False
    if not force_cpu:
        usable, why = _cuda_toolkit(torch)
        if usable:
            with_cuda = True
        elif force_cuda:
            raise RuntimeError(f"kfac-kernels: KFAC_KERNELS_FORCE_CUDA=1 but {why}. Install a "
                               "CUDA build of torch and the CUDA toolkit (nvcc), or unset it.")
        else:
            print(f"kfac-kernels: building the CPU kernels only: {why}")

    debug = _flag("KFAC_KERNELS_DEBUG")
    omp_cflags, omp_lflags = _openmp_flags()
    if sys.platform == "win32":
        cxx = ["/Od", "/Zi"] if debug else ["/O2"]
    else:
        # -g0 overrides the -g in Python's default CFLAGS: a much smaller .so and a faster build.
        cxx = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    cxx += omp_cflags
    # The C++ standard is left to torch.utils.cpp_extension, which picks the one its headers need.

    sources = _sources("csrc/cpu/*.cpp") + [
        s for s in _sources("csrc/torch/*.cpp") if not s.endswith("_cuda.cpp")]
    common = dict(
        name="kfac_kernels._C",
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        extra_link_args=omp_lflags,
    )
    if with_cuda:
        sources += _sources("csrc/torch/*_cuda.cpp") + _sources("csrc/cuda/*.cu")
        nvcc = ["-O0", "-g", "-G"] if debug else ["-O3", "-lineinfo"]
        ext = CUDAExtension(
            sources=sources,
            define_macros=[("KFAC_KERNELS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            **common,
        )
        print("kfac-kernels: building kfac_kernels._C with the CPU and CUDA kernels")
    else:
        ext = CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **common)
        print("kfac-kernels: building kfac_kernels._C with the CPU kernels")
    stamp = _build_stamp(torch, with_cuda, debug)
    if _up_to_date(stamp):
        print("kfac-kernels: kfac_kernels._C is up to date with its sources and this torch; not "
              f"rebuilt ({STAMP_FILE}; set KFAC_KERNELS_REBUILD=1 to rebuild)")
        return [], {}
    base = BuildExtension.with_options(use_ninja=True)

    class BuildAndStamp(base):
        """Records what the extension was built from, so an unchanged tree is not rebuilt."""

        def run(self):
            super().run()
            if self.inplace or os.path.exists(os.path.join(ROOT, "kfac_kernels")):
                with open(os.path.join(ROOT, STAMP_FILE), "w", encoding="utf-8") as fh:
                    fh.write(stamp + "\n")

    return [ext], {"build_ext": BuildAndStamp}


# An editable install builds the extension into the source tree; this file beside it records the
# hash of everything it was built from (sources, build script, torch, flags).
STAMP_FILE = os.path.join("kfac_kernels", "_C.build-stamp")


def _build_stamp(torch, with_cuda: bool, debug: bool) -> str:
    digest = hashlib.sha256()
    files = sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True)) + [
        os.path.join(ROOT, "setup.py")]
    for path in files:
        if os.path.isfile(path):
            digest.update(os.path.relpath(path, ROOT).encode())
            with open(path, "rb") as fh:
                digest.update(fh.read())
    # The interpreter enters by its ABI (the extension's file suffix), not its patch release, so a
    # build made by another 3.x.y of the same ABI (e.g. on a build machine) is reused.
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else ""
    digest.update(f"{torch.__version__}|cuda={with_cuda}|arch={arch}|debug={debug}|"
                  f"{_ext_suffix()}".encode())
    return digest.hexdigest()


def _ext_suffix() -> str:
    return sysconfig.get_config_var("EXT_SUFFIX") or ".so"


def _up_to_date(stamp: str) -> bool:
    """Whether the extension in the source tree was built from exactly this (editable installs
    only: a regular install builds into its own directory)."""
    if _flag("KFAC_KERNELS_REBUILD") or not any("develop" in a or "editable" in a
                                                for a in sys.argv):
        return False
    built = os.path.exists(os.path.join(ROOT, "kfac_kernels", "_C" + _ext_suffix()))
    try:
        with open(os.path.join(ROOT, STAMP_FILE), encoding="utf-8") as fh:
            return bool(built) and fh.read().strip() == stamp
    except OSError:
        return False


def _long_description() -> str:
    path = os.path.join(ROOT, "README.md")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    return ""


ext_modules, cmdclass = _extensions()

setup(
    name="kfac-kernels",
    version=VERSION,
    description="Kronecker-factored second-order optimizers (K-FAC, BD-KFAC, SINGD, two-level "
                "K-FAC) for PyTorch with fused CPU, CUDA and Triton kernels",
    long_description=_long_description(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # The Triton kernels live in the repository's top-level triton_kernels/ folder but install as
    # kfac_kernels._triton: other distributions already install a top-level "triton_kernels".
    packages=find_packages(include=["kfac_kernels", "kfac_kernels.*"]) + ["kfac_kernels._triton"],
    package_dir={"kfac_kernels._triton": "triton_kernels"},
    install_requires=["torch>=2.3", "numpy"],
    extras_require={
        "triton": ["triton"],
        "test": ["pytest", "hypothesis", "pytest-benchmark"],
        # The command-line tools kfac-train / kfac-bench and their tasks (kfac_kernels.apps).
        "apps": ["scikit-learn", "tqdm", "matplotlib"],
        # The SOAP baseline of kfac-train (--optimizer soap); it leaves torch as installed.
        "soap": ["pytorch-optimizer"],
    },
    entry_points={"console_scripts": ["kfac-train = kfac_kernels.apps.train:main",
                                      "kfac-bench = kfac_kernels.apps.bench:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
