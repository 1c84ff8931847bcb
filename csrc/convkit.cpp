// Every convkit operator schema, in one place. Kernels are registered per device in
// csrc/cpu_kernels.cpp (which calls the CPU kernels of csrc/cpu/, built per instruction set)
// and csrc/cuda/*.cu; the autograd of the conv and batch-norm ops in csrc/autograd.cpp, that
// of im2col/col2im and every fake kernel from Python (convkit/autograd.py, convkit/ops.py).
//
// The forward ops are functional (they mutate nothing); the in-place running-statistics
// update of batch norm is an op of its own, batch_norm_update_stats, which needs no gradient.
#include <torch/library.h>

#include "cpu_kernel_table.h"
#include "cuda_emu/routing.h"
#include "cuda_emu/self_test.h"

#ifdef CONVKIT_PYTHON_MODULE
#include <Python.h>
#endif

TORCH_LIBRARY(convkit, m) {
  m.def(
      "conv2d_forward(Tensor input, Tensor weight, Tensor? bias, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups) -> Tensor");
  m.def(
      "conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, bool[3] output_mask) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // The conv's building blocks on their own, with the semantics of F.unfold / F.fold:
  // im2col [N, C, H, W] -> [N, C * kH * kW, oH * oW]; col2im sums the columns back into
  // [N, C, H, W] (its adjoint). Each is the other's gradient.
  m.def(
      "im2col(Tensor input, int[2] kernel_size, int[2] dilation, int[2] padding, "
      "int[2] stride) -> Tensor");
  m.def(
      "col2im(Tensor columns, int[2] output_size, int[2] kernel_size, int[2] dilation, "
      "int[2] padding, int[2] stride) -> Tensor");
  // The fused activation f after the normalisation, y = f(z): activation is one of none, relu,
  // hardtanh (alpha, beta = min_val, max_val; ReLU6 is hardtanh(0, 6)), leaky_relu (alpha =
  // negative_slope), silu, hardswish (csrc/activation.h); the backward recomputes z from x.
  // Returns the output and the statistics used to normalise (batch mean and biased batch
  // variance in training, copies of the running statistics in eval), in float32 (float64
  // for float64 input).
  m.def(
      "batch_norm_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, "
      "Tensor? running_var, bool training, float eps, str activation, float alpha, float beta) "
      "-> (Tensor output, Tensor save_mean, Tensor save_var)");
  m.def(
      "batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor save_mean, Tensor save_var, bool training, float eps, str activation, "
      "float alpha, float beta, bool[3] output_mask) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // running = (1 - momentum) * running + momentum * batch, with the variance made unbiased
  // by count / (count - 1). A no-op for count == 0 (empty batch), as in PyTorch.
  m.def(
      "batch_norm_update_stats(Tensor(a!) running_mean, Tensor(b!) running_var, "
      "Tensor batch_mean, Tensor batch_var, float momentum, int count) -> ()");
  // Synchronised batch norm's building blocks (convkit.nn.SyncBatchNorm; the collectives
  // between them are Python's). Statistics are mean and biased variance, not sum and sum of
  // squares, which cancel when |mean| >> std, and float64 for any input until combined: a
  // float32 mean would round by |mean| * 6e-8 on each process before the merge.
  // This process's statistics over N * S values per channel (0 and 0 for an empty batch).
  m.def("batch_norm_stats(Tensor input) -> (Tensor mean, Tensor var)");
  // The statistics of W processes, mean and var [W, C], with count[r] values per channel in
  // process r, merged in double (csrc/batch_norm.h, combine_statistics) -> mean, var [C] of
  // the same dtype.
  m.def(
      "batch_norm_combine_stats(Tensor mean, Tensor var, int[] count) "
      "-> (Tensor mean, Tensor var)");
  // This process's sum(dy') and sum(dy' * (x - mean)) (float64 [C]; dy' = dy * f'(z), the
  // activation's derivative at z recomputed from x), and its grad_weight and grad_bias.
  m.def(
      "batch_norm_backward_reduce(Tensor grad_output, Tensor input, Tensor mean, Tensor var, "
      "Tensor? weight, Tensor? bias, float eps, str activation, float alpha, float beta) "
      "-> (Tensor sum_dy, Tensor sum_dy_xmu, Tensor grad_weight, Tensor grad_bias)");
  // grad_input from the sums over all processes and `count`, their values per channel.
  m.def(
      "batch_norm_backward_elemt(Tensor grad_output, Tensor input, Tensor mean, Tensor var, "
      "Tensor? weight, Tensor? bias, Tensor sum_dy, Tensor sum_dy_xmu, int count, float eps, "
      "str activation, float alpha, float beta) -> Tensor");
  // Bytes of the largest conv column buffer since the last reset (all threads' tiles
  // together): what CONVKIT_COLUMN_BUDGET_MB bounds. Device-independent bookkeeping.
  m.def("column_buffer_peak_bytes(bool reset=False) -> int", &convkit::peak_column_buffer_bytes);
  // The CPU block cache (csrc/cpu/block_cache.cpp), which keeps the CPU ops' large freed
  // blocks mapped for reuse: the bytes its free blocks hold, and a call that returns them all.
  // Which CPU conv2d paths (csrc/cpu/conv2d/path.h) these arguments take, with this thread's
  // torch.get_num_threads() and CONVKIT_COLUMN_BUDGET_MB: (forward, input gradient, weight
  // gradient), "none" for a gradient the mask leaves out. A debugging and test aid.
  m.def(
      "conv2d_cpu_plan(Tensor input, Tensor weight, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, bool[2] gradient_mask) -> (str, str, str)",
      &convkit::active_conv2d_cpu_plan);
  // How many images each thread's tiles hold in the forward pass of the images and bands
  // paths (csrc/cpu/conv2d/tiles.h), with this thread's torch.get_num_threads(); [] on other
  // paths. A test aid: the tiles' balance.
  m.def(
      "conv2d_cpu_thread_images(Tensor input, Tensor weight, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups) -> int[]",
      &convkit::active_conv2d_cpu_thread_images);
  // The CPU conv kernels' GEMM (csrc/cpu/gemm.h) on its own: alpha * op(a) @ op(b) + beta * c
  // as a new tensor, a and b row-major with any leading dimension. A test aid (CPU only).
  m.def(
      "cpu_gemm(Tensor a, Tensor b, Tensor c, bool transpose_a, bool transpose_b, float alpha, "
      "float beta) -> Tensor");
  m.def("cpu_cache_bytes() -> int", &convkit::all_cpu_cache_bytes);
  m.def("empty_cpu_cache() -> ()", &convkit::empty_all_cpu_caches);
  // The CPU kernels in use (csrc/cpu_kernel_table.h): the instruction set they were compiled
  // for ("avx512", "avx2", "default"; "" before convkit's Python package loads them), and
  // whether this CPU runs a capability's instructions.
  m.def("cpu_capability() -> str", &convkit::cpu_capability);
  m.def("cpu_supports(str capability) -> bool", &convkit::cpu_supports);
  // CUDA emulation (csrc/cuda_emu/): while enabled in the calling thread, the ops above run
  // their CUDA kernels and host code on CPU tensors under the emulator, with the schedule seed
  // and a bound on grid-stride launches' blocks. The state reads back (enabled, seed,
  // max_grid_stride_blocks, op calls routed, kernels launched) for this thread.
  m.def("set_cuda_emulation(bool enabled, int seed, int max_grid_stride_blocks) -> ()",
        &convkit::set_cuda_emulation);
  m.def("cuda_emulation_state() -> (bool, int, int, int, int)", &convkit::cuda_emulation_state);
  // The emulator's self-test kernels (csrc/cuda_emu/self_test.cpp): the table of cases (names
  // and the error each must raise, empty for a correct twin), and one case run by name.
  m.def("cuda_emulator_self_tests() -> (str[], str[])", &convkit::cuda_emulator_self_tests);
  m.def("cuda_emulator_self_test(str name) -> Tensor", &convkit::cuda_emulator_self_test);
  m.def("cuda_emulator_info() -> str", &convkit::cuda_emulator_info);
}

#ifdef CONVKIT_PYTHON_MODULE
// `import convkit._C` loads this shared library, which runs the registrations above; the ops
// live in torch.ops.convkit, and the module holds one function, _install_cpu_kernels.
namespace {

// _C._install_cpu_kernels(capsule): installs the CpuKernelTable a kernel module
// (convkit._cpu_<capability>) hands out as its `kernel_table` capsule, and makes it the one the
// CPU ops call (convkit/cpu_kernels.py).
PyObject* install_cpu_kernels_from_capsule(PyObject* /*module*/, PyObject* capsule) {
  void* table = PyCapsule_GetPointer(capsule, "convkit.CpuKernelTable");
  if (table == nullptr) return nullptr;  // PyCapsule_GetPointer set a Python error
  try {
    convkit::install_cpu_kernels(static_cast<const convkit::CpuKernelTable*>(table));
  } catch (const c10::Error& error) {
    PyErr_SetString(PyExc_RuntimeError, error.what_without_backtrace());
    return nullptr;
  } catch (const std::exception& error) {
    PyErr_SetString(PyExc_RuntimeError, error.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyMethodDef module_methods[] = {
    {"_install_cpu_kernels", install_cpu_kernels_from_capsule, METH_O,
     "Installs a convkit._cpu_<capability> module's kernel_table and makes it the one in use."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                          module_methods};
  return PyModule_Create(&module_def);
}
#endif
