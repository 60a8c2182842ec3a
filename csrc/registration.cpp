// Op schemas (namespace `flashback`) and the CPU implementations. CUDA implementations are
// registered from csrc/cuda/registration_cuda.cu when the extension is built with CUDA.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

// An empty Python module so `import flashback_ext._C` loads the library and its registrations.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(flashback, m) {
  m.def(
      "kv_append(Tensor k_new, Tensor v_new, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor write_pos, Tensor ring_offset, int sink) -> ()");
  m.def(
      "append_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor kv_lens, "
      "Tensor ring_offset, int sink, float scale, Tensor? q_lens) -> (Tensor out, Tensor lse)");
  m.def("decode_linear(Tensor x, Tensor[] weights) -> Tensor");
}

TORCH_LIBRARY_IMPL(flashback, CPU, m) {
  m.impl("kv_append", &flashback::kv_append_cpu);
  m.impl("append_attention", &flashback::append_attention_cpu);
  m.impl("decode_linear", &flashback::decode_linear_cpu);
}
