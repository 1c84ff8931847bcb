"""Builds convkit._C, the C++ (and, where available, CUDA) kernels of convkit.

CPU-only by default. The CUDA sources in csrc/cuda/ are added when nvcc is found (through
CUDA_HOME) and either a GPU is visible or FORCE_CUDA=1 is set. DEBUG=1 builds with -O0 -g.
The C++ is compiled for the building machine's CPU (-march=native: AVX2/AVX-512 in the
kernels' loops); CONVKIT_MARCH=<arch> picks another -march, CONVKIT_MARCH=none none at all
(a build to copy to other machines).
"""
from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def find_nvcc() -> str | None:
    """nvcc under CUDA_HOME (torch's detection), else on PATH."""
    if CUDA_HOME is not None:
        candidate = os.path.join(CUDA_HOME, "bin", "nvcc")
        if os.path.exists(candidate):
            return candidate
    return shutil.which("nvcc")


def nvidia_wheel_include_dirs() -> list[str]:
    """Header folders of the nvidia-* wheels torch depends on (cuBLAS, cuSPARSE, ... live
    there, not under CUDA_HOME, on pip-installed toolchains)."""
    dirs = []
    for site in sys.path:
        for pattern in ("nvidia/cu*/include", "nvidia/*/include"):
            for path in sorted(glob.glob(os.path.join(site, pattern))):
                if os.path.isdir(path) and path not in dirs:
                    dirs.append(path)
    return dirs


def want_cuda() -> bool:
    cuda_sources = glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu"))
    if not cuda_sources or env_flag("CONVKIT_CPU_ONLY"):
        return False
    if find_nvcc() is None or torch.version.cuda is None:
        if env_flag("FORCE_CUDA"):
            raise RuntimeError(
                "FORCE_CUDA=1 but no CUDA toolchain was found: set CUDA_HOME to the CUDA "
                f"installation (CUDA_HOME={CUDA_HOME!r}, torch.version.cuda={torch.version.cuda!r})"
            )
        return False
    return env_flag("FORCE_CUDA") or torch.cuda.is_available()


def march_flags() -> list[str]:
    """-march for the C++ sources: the host's CPU unless CONVKIT_MARCH says otherwise."""
    march = os.environ.get("CONVKIT_MARCH", "native").strip()
    if march.lower() in ("", "none", "0", "off"):
        return []
    return [f"-march={march}"]


def make_extension():
    debug = env_flag("DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx_flags = opt + ["-fopenmp", "-DCONVKIT_PYTHON_MODULE"] + march_flags()
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    extra_link_args = ["-fopenmp"]
    if want_cuda():
        if "TORCH_CUDA_ARCH_LIST" not in os.environ:
            # sm_80 (A100), sm_90 (H100), and PTX for newer GPUs.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        nvcc_flags = opt + ["--expt-relaxed-constexpr", "-DCONVKIT_PYTHON_MODULE"]
        if debug:
            nvcc_flags.append("-lineinfo")
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        # The wheels' headers (cuBLAS, cuSPARSE, ...) go after the toolkit's own (-isystem is
        # searched after -I): their CUDA runtime headers may be newer than nvcc, which then
        # refuses them ("CUDA compiler and CUDA toolkit headers are incompatible").
        wheel_includes = []
        for path in nvidia_wheel_include_dirs():
            wheel_includes += ["-isystem", path]
        return CUDAExtension(
            "convkit._C",
            sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={
                "cxx": cxx_flags + ["-DCONVKIT_WITH_CUDA"] + wheel_includes,
                "nvcc": nvcc_flags + wheel_includes,
            },
            extra_link_args=extra_link_args,
        )
    return CppExtension(
        "convkit._C",
        sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=extra_link_args,
    )


setup(
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
