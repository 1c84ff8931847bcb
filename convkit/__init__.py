"""convkit: conv2d (im2col + GEMM) and fused BatchNorm+ReLU kernels of our own, as PyTorch
custom ops (``torch.ops.convkit.*``) with autograd, and drop-in ``nn`` layers.

Data flows one way: ``convkit.nn`` -> ``convkit.functional`` -> ``convkit.ops`` ->
``torch.ops.convkit`` -> C++/CUDA kernels.
"""
from convkit import ops  # noqa: F401  (loads the extension, registers fake kernels)
from convkit import autograd  # noqa: F401  (registers autograd on im2col and col2im)
from convkit import cuda_emulation, functional, nn  # noqa: F401
from convkit.cuda_emulation import emulated_cuda  # noqa: F401
from convkit.functional import batch_norm, batch_norm_relu, conv2d  # noqa: F401
from convkit.ops import cpu_cache_bytes, empty_cpu_cache  # noqa: F401
from convkit.cpu_kernels import cpu_capabilities, cpu_capability, set_cpu_capability  # noqa: F401

__version__ = "0.1.0"
__all__ = ["conv2d", "batch_norm", "batch_norm_relu", "cpu_cache_bytes", "empty_cpu_cache",
           "cpu_capability", "cpu_capabilities", "set_cpu_capability", "emulated_cuda",
           "cuda_emulation", "functional", "nn", "ops", "autograd"]
