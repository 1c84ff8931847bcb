"""Builds convkit._C (the ops, their autograd, the CUDA kernels where available, the CUDA
emulator) and convkit._cpu_<capability>, the CPU kernels of csrc/cpu/ compiled once per
instruction set, of which `import convkit` loads the best this CPU runs.

CPU-only by default. The CUDA sources in csrc/cuda/ are added when a CUDA toolkit is found
(CUDA_HOME, else the toolkit of the nvcc on PATH) and either a GPU is visible or FORCE_CUDA=1
is set. The same CUDA code is always also compiled for the CPU against the CUDA emulator
(csrc/cuda_emu/), which the tests use on machines without a GPU. DEBUG=1 builds with -O0 -g.
On x86-64 the CPU kernels are built for avx512 (x86-64-v4), avx2 (x86-64-v3) and default
(x86-64): one build runs on any x86-64, whatever the machine that built it, and picks at
run time (CONVKIT_CPU_CAPABILITY overrides). CONVKIT_CPU_CAPABILITIES=avx512,default (say)
builds fewer, for a faster development build; elsewhere only default is built.
"""
from __future__ import annotations

import glob
import os
import platform
import re
import shutil
import subprocess
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def is_cuda_toolkit(path: str) -> bool:
    """A CUDA toolkit's root: nvcc, the runtime's headers and the runtime library."""
    has_lib = any(
        glob.glob(os.path.join(path, lib, "libcudart.so*"))
        for lib in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"),
                    os.path.join("targets", "sbsa-linux", "lib"))
    )
    return (
        os.path.isfile(os.path.join(path, "bin", "nvcc"))
        and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h"))
        and has_lib
    )


def toolkit_of_nvcc(nvcc: str) -> str | None:
    """The toolkit that owns the compiler `nvcc` runs: follows symlinks, then asks nvcc itself
    (its --dryrun prints TOP=<toolkit>/bin/..), which also sees through wrapper scripts."""
    candidate = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if is_cuda_toolkit(candidate):
        return candidate
    try:
        dryrun = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", dryrun.stdout + dryrun.stderr, re.MULTILINE)
    if match:
        top = os.path.realpath(match.group(1).strip())
        if is_cuda_toolkit(top):
            return top
    return None


def resolve_cuda_home() -> tuple[str | None, str]:
    """The CUDA toolkit to build with, and how it was found: $CUDA_HOME (or $CUDA_PATH) when
    set, else the toolkit of the nvcc on PATH, else /usr/local/cuda."""
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(variable)
        if value:
            if is_cuda_toolkit(value):
                return value, f"${variable}"
            return None, (f"${variable}={value} is not a CUDA toolkit (expected bin/nvcc, "
                          "include/cuda_runtime.h and lib64/libcudart.so under it)")
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        toolkit = toolkit_of_nvcc(nvcc)
        if toolkit is not None:
            return toolkit, f"the toolkit of {nvcc}"
    if is_cuda_toolkit("/usr/local/cuda"):
        return "/usr/local/cuda", "/usr/local/cuda"
    where = f"the nvcc on PATH ({nvcc}) belongs to no toolkit" if nvcc else "no nvcc on PATH"
    return None, f"CUDA_HOME is not set, {where}, and /usr/local/cuda is not a toolkit"


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


# torch.utils.cpp_extension reads CUDA_HOME once, when it is imported, and guesses from the nvcc
# on PATH otherwise (a wrapper script in /usr/local/bin makes that /usr/local, which has no
# libcudart): resolve it first.
CUDA_TOOLKIT, CUDA_TOOLKIT_ORIGIN = resolve_cuda_home()
if CUDA_TOOLKIT is not None:
    os.environ["CUDA_HOME"] = CUDA_TOOLKIT

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


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
    if CUDA_TOOLKIT is None or torch.version.cuda is None:
        if env_flag("FORCE_CUDA"):
            why = (CUDA_TOOLKIT_ORIGIN if CUDA_TOOLKIT is None
                   else f"this torch ({torch.__version__}) is a CPU-only build")
            raise RuntimeError(
                f"FORCE_CUDA=1 but the CUDA kernels cannot be built: {why}. Set CUDA_HOME to "
                "the CUDA toolkit's root (the folder with bin/nvcc), e.g. CUDA_HOME=/usr/local/cuda"
            )
        return False
    return env_flag("FORCE_CUDA") or torch.cuda.is_available()


def emulator_include_dirs() -> list[str]:
    """Where the CUDA emulator finds CUDA's own host-compilable headers (vector types, __half,
    __nv_bfloat16): the toolkit's, else the nvidia wheels'. Without them it defines the vector
    types itself and offers no __half."""
    if CUDA_TOOLKIT is not None:
        return [os.path.join(CUDA_TOOLKIT, "include")]
    return [path for path in nvidia_wheel_include_dirs()
            if os.path.isfile(os.path.join(path, "cuda_fp16.h"))][:1]


# The CPU kernels' instruction sets: the flags of each (convkit/cpu_kernels.py picks among
# those built, best first, with the checks of csrc/cpu_kernels.cpp's cpu_supports).
X86_CPU_CAPABILITIES = {
    "avx512": ["-march=x86-64-v4", "-mtune=generic"],
    "avx2": ["-march=x86-64-v3", "-mtune=generic"],
    "default": ["-march=x86-64", "-mtune=generic"],
}


def is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def cpu_capabilities() -> dict[str, list[str]]:
    """The capabilities to build the CPU kernels for, and their flags: all three on x86-64 (or
    those CONVKIT_CPU_CAPABILITIES names), only default elsewhere."""
    if "CONVKIT_MARCH" in os.environ:
        raise RuntimeError(
            "CONVKIT_MARCH is no longer read: the CPU kernels are built for avx512, avx2 and "
            "default in one build and picked at run time (CONVKIT_CPU_CAPABILITY=avx2 "
            "overrides); CONVKIT_CPU_CAPABILITIES=avx512,default builds fewer. Unset it."
        )
    if not is_x86_64():
        return {"default": []}
    wanted = os.environ.get("CONVKIT_CPU_CAPABILITIES", "").strip()
    if not wanted:
        return dict(X86_CPU_CAPABILITIES)
    names = [name.strip() for name in wanted.split(",") if name.strip()]
    unknown = [name for name in names if name not in X86_CPU_CAPABILITIES]
    if unknown or "default" not in names:
        raise RuntimeError(
            f"CONVKIT_CPU_CAPABILITIES must list some of avx512, avx2, default (comma-separated, "
            f"default always among them: every CPU runs it), but got '{wanted}'"
        )
    return {name: X86_CPU_CAPABILITIES[name] for name in X86_CPU_CAPABILITIES if name in names}


def optimisation_flags(debug: bool) -> list[str]:
    return ["-O0", "-g"] if debug else ["-O3"]


def common_cxx_flags(debug: bool) -> list[str]:
    # -fno-trapping-math: the loops' clamps and selects (ReLU6, Hardswish, exp's range
    # reduction) vectorise only when a comparison may not raise a floating-point exception;
    # no convkit code reads the exception flags, and no value changes.
    return optimisation_flags(debug) + ["-fopenmp", "-fno-trapping-math",
                                        "-DCONVKIT_PYTHON_MODULE"]


def make_ops_extension():
    """convkit._C: everything but csrc/cpu/, compiled for the baseline of the target (it runs
    on every CPU the package is installed on)."""
    debug = env_flag("DEBUG")
    cxx_flags = common_cxx_flags(debug)
    if is_x86_64():
        cxx_flags += X86_CPU_CAPABILITIES["default"]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cuda_emu/*.cpp"))
    for path in emulator_include_dirs():
        cxx_flags += ["-isystem", path]
    # The CUDA kernels, also compiled for the emulator, carry nvcc's `#pragma unroll`.
    cxx_flags.append("-Wno-unknown-pragmas")
    extra_link_args = ["-fopenmp"]
    if want_cuda():
        if "TORCH_CUDA_ARCH_LIST" not in os.environ:
            # sm_80 (A100), sm_90 (H100), and PTX for newer GPUs.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        nvcc_flags = optimisation_flags(debug) + ["--expt-relaxed-constexpr", "-DCONVKIT_PYTHON_MODULE"]
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


def make_cpu_kernel_extension(capability: str, flags: list[str]):
    """convkit._cpu_<capability>: csrc/cpu/ compiled with `flags`. Hidden visibility keeps its
    inline code (ours, ATen's, the standard library's, compiled for this instruction set) to
    itself: see csrc/cpu_kernel_table.h."""
    cxx_flags = common_cxx_flags(env_flag("DEBUG")) + flags + [
        f"-DCONVKIT_CPU_CAPABILITY={capability}",
        "-fvisibility=hidden",
        "-fvisibility-inlines-hidden",
    ]
    sources = sorted(glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/cpu/conv2d/*.cpp"))
    return CppExtension(
        f"convkit._cpu_{capability}",
        sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )


class BuildExtensions(BuildExtension.with_options(use_ninja=True)):
    """torch's BuildExtension with one object folder per extension: the kernel modules compile
    the same sources with different flags, which would otherwise overwrite each other's objects
    (and rebuild them all on every build)."""

    def build_extension(self, ext) -> None:
        shared_build_temp = self.build_temp
        self.build_temp = os.path.join(shared_build_temp, ext.name)
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = shared_build_temp


setup(
    ext_modules=[make_ops_extension()] + [
        make_cpu_kernel_extension(capability, flags)
        for capability, flags in cpu_capabilities().items()
    ],
    cmdclass={"build_ext": BuildExtensions},
)
