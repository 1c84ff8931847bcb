"""Which instruction set convkit's CPU kernels run: avx512, avx2 or default.

One build holds the kernels of ``csrc/cpu/`` compiled for each capability (extension modules
``convkit._cpu_avx512``, ``_cpu_avx2``, ``_cpu_default``; see ``csrc/cpu_kernel_table.h``).
``import convkit`` loads the best one this CPU runs, or the one the environment variable
``CONVKIT_CPU_CAPABILITY`` names (as ``ATEN_CPU_CAPABILITY`` does for ATen): a build copied to
an older machine runs there, and a test or a benchmark can hold one capability against another.

A module is imported only on a CPU that runs its instructions, so nothing of it (not even its
static initialisers) runs where it cannot.
"""
from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from convkit import _C

# Best first: the order in which the default choice tries them.
CAPABILITIES = ("avx512", "avx2", "default")

ENVIRONMENT_VARIABLE = "CONVKIT_CPU_CAPABILITY"


def _module_name(capability: str) -> str:
    return f"convkit._cpu_{capability}"


def built_capabilities() -> list[str]:
    """The capabilities this build has kernels for, best first."""
    return [name for name in CAPABILITIES
            if importlib.util.find_spec(_module_name(name)) is not None]


def cpu_capabilities() -> list[str]:
    """The capabilities this build has kernels for and this CPU runs, best first: those
    :func:`set_cpu_capability` accepts."""
    return [name for name in built_capabilities() if torch.ops.convkit.cpu_supports(name)]


def cpu_capability() -> str:
    """The capability whose kernels the CPU ops run now."""
    return torch.ops.convkit.cpu_capability()


def _check(capability: str, source: str) -> None:
    if capability not in CAPABILITIES:
        raise ValueError(f"{source} must be one of {', '.join(CAPABILITIES)}, "
                         f"but got {capability!r}")
    if capability not in built_capabilities():
        raise ValueError(f"{source} is {capability!r}, but this build of convkit has no kernels "
                         f"for it (it has {', '.join(built_capabilities())}; setup.py's "
                         "CONVKIT_CPU_CAPABILITIES chose them)")
    if not torch.ops.convkit.cpu_supports(capability):
        raise ValueError(f"{source} is {capability!r}, but this CPU (or its OS) does not run "
                         f"its instructions; it runs {', '.join(cpu_capabilities())}")


def _install(capability: str) -> None:
    """Imports the kernel module of ``capability`` (checked already) and makes it the one the
    CPU ops call."""
    module = importlib.import_module(_module_name(capability))
    _C._install_cpu_kernels(module.kernel_table)


def set_cpu_capability(capability: str) -> None:
    """Makes the CPU ops run the kernels compiled for ``capability`` (``"avx512"``, ``"avx2"``
    or ``"default"``), loading them if need be: for tests and benchmarks that compare one
    instruction set with another. Calls already running finish on the kernels they started
    with. A capability this build lacks or this CPU cannot run is a ``ValueError``."""
    _check(capability, "the CPU capability")
    _install(capability)


def _load_at_import() -> None:
    """Installs the kernels of ``$CONVKIT_CPU_CAPABILITY``, or of the best capability."""
    requested = os.environ.get(ENVIRONMENT_VARIABLE, "").strip()
    if requested:
        try:
            _check(requested, ENVIRONMENT_VARIABLE)
        except ValueError as error:
            raise ImportError(f"convkit: {error}") from None
        _install(requested)
        return
    available = cpu_capabilities()
    if not available:
        raise ImportError(
            "convkit: this build has no CPU kernel modules (convkit._cpu_*): rebuild it with "
            "`pip install -e .` from the project's root"
        )
    _install(available[0])


_load_at_import()
