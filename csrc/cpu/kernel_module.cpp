// One CPU capability's kernel table (cpu_kernel_table.h), and how it reaches convkit._C.
//
// setup.py compiles csrc/cpu/ once per capability, with CONVKIT_CPU_CAPABILITY=<name> and that
// capability's flags, into the extension module convkit._cpu_<name>, whose `kernel_table`
// attribute is a capsule of the table; convkit/cpu_kernels.py imports the module only on a
// CPU that has its instructions and hands the capsule to _C._install_cpu_kernels. The CMake
// library, one capability linked into the same library as the ops, installs its table when it
// is loaded.
#include "../column_buffer.h"
#include "../cpu_kernel_table.h"
#include "block_cache.h"

#ifndef CONVKIT_CPU_CAPABILITY
#error "CONVKIT_CPU_CAPABILITY must name the capability this build of csrc/cpu/ is for"
#endif

#ifdef CONVKIT_PYTHON_MODULE
#include <Python.h>
#endif

#define CONVKIT_STRINGIZE_(x) #x
#define CONVKIT_STRINGIZE(x) CONVKIT_STRINGIZE_(x)

namespace convkit {

const CpuKernelTable* cpu_kernel_table() {
  static const CpuKernelTable table = [] {
    CpuKernelTable t;
    t.size = sizeof(CpuKernelTable);
    t.capability = CONVKIT_STRINGIZE(CONVKIT_CPU_CAPABILITY);
    add_conv2d_kernels(t);
    add_batch_norm_kernels(t);
    add_sync_batch_norm_kernels(t);
    add_gemm_kernels(t);
    t.cpu_cache_bytes = &cpu_cache_bytes;
    t.empty_cpu_cache = &empty_cpu_cache;
    t.column_buffer_peak_bytes = &column_buffer_peak_bytes;
    return t;
  }();
  return &table;
}

}  // namespace convkit

#ifdef CONVKIT_PYTHON_MODULE

#define CONVKIT_CONCAT_(a, b) a##b
#define CONVKIT_CONCAT(a, b) CONVKIT_CONCAT_(a, b)

PyMODINIT_FUNC CONVKIT_CONCAT(PyInit__cpu_, CONVKIT_CPU_CAPABILITY)(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_cpu_" CONVKIT_STRINGIZE(CONVKIT_CPU_CAPABILITY),
      "convkit's CPU kernels for one instruction set; convkit.cpu_kernels loads them",
      -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  PyObject* capsule = PyCapsule_New(const_cast<convkit::CpuKernelTable*>(convkit::cpu_kernel_table()),
                                    "convkit.CpuKernelTable", nullptr);
  if (capsule == nullptr || PyModule_AddObject(module, "kernel_table", capsule) < 0) {
    Py_XDECREF(capsule);
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}

#else

namespace {

// The CMake library: the table is installed as the library loads (torch.ops.load_library or
// a C++ program linked against it).
const bool installed_at_load = [] {
  convkit::install_cpu_kernels(convkit::cpu_kernel_table());
  return true;
}();

}  // namespace

#endif
