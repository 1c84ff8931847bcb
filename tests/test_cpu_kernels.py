"""The CPU kernels of each instruction set (convkit.cpu_kernels, csrc/cpu_kernel_table.h).

One build holds csrc/cpu/ compiled for avx512, avx2 and default; ``import convkit`` picks the
best this CPU runs, CONVKIT_CPU_CAPABILITY overrides, and set_cpu_capability switches in the
running process. The rest of the suite runs the kernels in use; these tests run every other
capability this machine has against torch (every conv path of test_conv2d_paths, batch norm
with each fused activation, the SyncBatchNorm ops, the GEMM), check the choice and its
errors, and check that each kernel module holds only its own instruction set. CI also runs
the whole fast tier under CONVKIT_CPU_CAPABILITY=avx2 and =default (.ci/run).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F

import convkit
from conftest import ACTIVATION_ARGUMENTS, ACTIVATIONS, TORCH_ACTIVATIONS, assert_close_to_reference
from test_conv2d_paths import PATHS, check_path_in_its_setting

CAPABILITIES = convkit.cpu_capabilities()
# The kernels in use run every other test; these run the others this CPU has.
OTHER_CAPABILITIES = [name for name in CAPABILITIES if name != convkit.cpu_capability()]


@pytest.fixture(params=OTHER_CAPABILITIES)
def capability(request):
    """Runs the test on the kernels of another capability, then puts back those in use."""
    before = convkit.cpu_capability()
    convkit.set_cpu_capability(request.param)
    try:
        yield request.param
    finally:
        convkit.set_cpu_capability(before)


def _python(code: str, **environment: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CONVKIT_CPU_CAPABILITY"}
    env.update(environment)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)


def test_this_machine_has_the_default_kernels():
    assert CAPABILITIES[-1] == "default"
    assert convkit.cpu_capability() in CAPABILITIES


def test_import_picks_the_best_capability():
    result = _python("import convkit; print(convkit.cpu_capability(), *convkit.cpu_capabilities())")
    assert result.returncode == 0, result.stderr
    chosen, *available = result.stdout.split()
    assert available == CAPABILITIES
    assert chosen == available[0]


@pytest.mark.parametrize("name", CAPABILITIES)
def test_environment_variable_picks_the_capability(name):
    code = ("import torch, convkit; x = torch.randn(2, 3, 9, 9); w = torch.randn(5, 3, 3, 3);"
            "err = (convkit.conv2d(x, w, padding=1) - torch.conv2d(x, w, padding=1)).abs().max();"
            "print(convkit.cpu_capability(), float(err))")
    result = _python(code, CONVKIT_CPU_CAPABILITY=name)
    assert result.returncode == 0, result.stderr
    chosen, error = result.stdout.split()
    assert chosen == name
    assert float(error) < 1e-4


def test_environment_variable_refuses_an_unknown_capability():
    result = _python("import convkit", CONVKIT_CPU_CAPABILITY="AVX2")  # names are lower case
    assert result.returncode != 0
    assert ("ImportError: convkit: CONVKIT_CPU_CAPABILITY must be one of avx512, avx2, default, "
            "but got 'AVX2'") in result.stderr


def test_set_cpu_capability_refuses_unknown_names():
    with pytest.raises(ValueError, match="must be one of avx512, avx2, default, but got 'neon'"):
        convkit.set_cpu_capability("neon")
    with pytest.raises(RuntimeError, match="unknown CPU capability 'neon'"):
        torch.ops.convkit.cpu_supports("neon")


def test_set_cpu_capability_refuses_what_this_cpu_lacks():
    missing = [name for name in convkit.cpu_kernels.built_capabilities()
               if name not in CAPABILITIES]
    if not missing:
        pytest.skip("this CPU runs every capability the build has")
    with pytest.raises(ValueError, match="does not run its instructions"):
        convkit.set_cpu_capability(missing[0])


@pytest.mark.parametrize("path", list(PATHS))
def test_conv2d_paths_on_every_capability(capability, path, monkeypatch):
    check_path_in_its_setting(path, PATHS[path], torch.float32, True, monkeypatch)


@pytest.mark.parametrize("shape", [(6, 5, 7, 9), (3, 16, 33), (37, 24)], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_batch_norm_on_every_capability(capability, activation, shape):
    """Training forward and backward through each fused activation, float32, against torch
    within twice torch's error of a float64 reference; the running statistics too."""
    x = torch.randn(*shape) * 3 + 1
    weight = torch.randn(shape[1])
    bias = torch.randn(shape[1])
    kwargs = ACTIVATION_ARGUMENTS.get(activation, {})

    def run(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (x, weight, bias)]
        mean = torch.zeros(shape[1], dtype=dtype)
        var = torch.ones(shape[1], dtype=dtype)
        out = fn(leaves, mean, var)
        grads = torch.autograd.grad(out, leaves, dy.to(dtype))
        return [out.detach(), *grads, mean, var]

    def ours(leaves, mean, var):
        return convkit.functional.batch_norm_activation(
            leaves[0], mean, var, leaves[1], leaves[2], True, activation=activation, **kwargs)

    def theirs(leaves, mean, var):
        z = F.batch_norm(leaves[0], mean, var, leaves[1], leaves[2], True)
        return TORCH_ACTIVATIONS[activation](z)

    dy = torch.randn(*shape)
    reference = run(theirs, torch.float64)
    names = ["output", "grad_input", "grad_weight", "grad_bias", "running_mean", "running_var"]
    for name, a, b, r in zip(names, run(ours, torch.float32), run(theirs, torch.float32),
                             reference):
        assert_close_to_reference(a, b, r, name=f"{capability} {activation} {name}")


def test_sync_batch_norm_ops_on_every_capability(capability):
    """The SyncBatchNorm ops of each capability against the default kernels' float64 results
    (which test_sync_batch_norm_ops holds against torch)."""
    x = torch.randn(5, 12, 6, 7, dtype=torch.float64)
    dy = torch.randn_like(x)
    weight = torch.randn(12, dtype=torch.float64)
    bias = torch.randn(12, dtype=torch.float64)

    def run():
        mean, var = convkit.ops.batch_norm_stats(x)
        both = convkit.ops.batch_norm_combine_stats(torch.stack([mean, mean + 1]),
                                                    torch.stack([var, var * 2]), [3, 4])
        reduced = convkit.ops.batch_norm_backward_reduce(dy, x, mean, var, weight, bias, 1e-5,
                                                         "silu", 0.0, 0.0)
        grad = convkit.ops.batch_norm_backward_elemt(dy, x, mean, var, weight, bias, reduced[0],
                                                     reduced[1], x.numel() // 12, 1e-5,
                                                     "silu", 0.0, 0.0)
        return [mean, var, *both, *reduced, grad]

    ours = run()
    convkit.set_cpu_capability("default")
    expected = run()
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gemm", ["own", "blas"])
def test_cpu_gemm_on_every_capability(capability, gemm, monkeypatch):
    monkeypatch.setenv("CONVKIT_CPU_GEMM", gemm)
    a = torch.randn(37, 300)
    b = torch.randn(45, 300)
    c = torch.randn(37, 45)
    ours = torch.ops.convkit.cpu_gemm(a, b, c, False, True, 0.5, 2.0)
    theirs = 0.5 * a @ b.T + 2.0 * c
    reference = 0.5 * a.double() @ b.double().T + 2.0 * c.double()
    assert_close_to_reference(ours, theirs, reference, name=f"{capability} {gemm}")


def test_switching_while_another_thread_runs_ops():
    """A switch takes effect between calls: ops running on another thread meanwhile give the
    same results on whichever kernels they get."""
    x = torch.randn(4, 8, 12, 12)
    w = torch.randn(16, 8, 3, 3)
    expected = F.conv2d(x, w, padding=1)
    errors = []
    stop = threading.Event()

    def work():
        while not stop.is_set():
            error = (convkit.conv2d(x, w, padding=1) - expected).abs().max().item()
            errors.append(error)

    before = convkit.cpu_capability()
    worker = threading.Thread(target=work)
    worker.start()
    try:
        for step in range(30):
            convkit.set_cpu_capability(CAPABILITIES[step % len(CAPABILITIES)])
    finally:
        stop.set()
        worker.join()
        convkit.set_cpu_capability(before)
    assert errors and max(errors) < 1e-4


def test_each_capability_has_its_own_block_cache():
    """cpu_cache_bytes counts the free blocks of every kernel module loaded, and
    empty_cpu_cache empties them all."""
    before = convkit.cpu_capability()
    try:
        for name in CAPABILITIES:
            convkit.set_cpu_capability(name)
            y = convkit.conv2d(torch.randn(8, 16, 32, 32), torch.randn(32, 16, 3, 3), padding=1)
            del y  # its 1 MiB output goes back to this module's cache
    finally:
        convkit.set_cpu_capability(before)
    assert convkit.cpu_cache_bytes() >= len(CAPABILITIES) * (1 << 20)
    convkit.empty_cpu_cache()
    assert convkit.cpu_cache_bytes() == 0


# The registers a module's instructions may name: the default kernels are SSE only, the avx2
# ones have no 512-bit (zmm) registers.
FORBIDDEN_REGISTERS = {"default": ("%ymm", "%zmm"), "avx2": ("%zmm",), "avx512": ()}


def _disassembly(path: str) -> str:
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not installed")
    return subprocess.run([objdump, "-d", "--no-show-raw-insn", path], capture_output=True,
                          text=True, check=True).stdout


@pytest.mark.parametrize("name", convkit.cpu_kernels.built_capabilities())
def test_kernel_module_holds_only_its_instruction_set(name):
    # Found, not imported: loading a module this CPU cannot run may execute its instructions
    # (an AVX-512 module's static initialisers died with SIGILL on an AVX2-only CPU).
    listing = _disassembly(importlib.util.find_spec(f"convkit._cpu_{name}").origin)
    for register in FORBIDDEN_REGISTERS[name]:
        assert register not in listing, f"convkit._cpu_{name} uses {register} registers"
    if name != "default":
        assert "%ymm" in listing, f"convkit._cpu_{name} has no vector code of its width"


def test_ops_module_holds_baseline_code_only():
    """convkit._C (the ops, autograd, the emulator) runs on every CPU: no AVX at all."""
    listing = _disassembly(convkit._C.__file__)
    assert "%ymm" not in listing and "%zmm" not in listing
