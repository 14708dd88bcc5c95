// Every l2b_fast operator schema, defined once. The CPU and CUDA kernel files register their own
// implementations; l2b_fast/ops/_cpp_ops.py registers the fake (meta) kernels and autograd.
#include <torch/library.h>

#ifdef L2B_PYTHON_MODULE
#include <Python.h>
// `import l2b_fast._C` loads this library and so runs the registrations below; the module itself is
// empty (no pybind11 needed: everything is reached through torch.ops.l2b_fast).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif

TORCH_LIBRARY(l2b_fast, m) {
  // tau: the temperature as a one-element floating tensor on the logits' device, read by the kernels
  // from memory (a schedule that changes it every step neither recompiles a torch.compile graph nor
  // invalidates a captured CUDA graph; no host synchronisation). Finite and > 0: checked on the host for
  // CPU tensors, by a device-side assert on CUDA.
  // logits [I, J] (parents x children). Exactly one of `noise` ([I, J] gumbel samples) or `seed`
  // (one int64 on logits' device; Philox counter = i * J + j) must be given.
  // Returns soft ([I, J], logits' dtype, softmax over parents of (logits + noise) / tau) and index
  // (int64 [J], argmax over parents of logits + noise). The floating output comes first so generic
  // tooling that sums the outputs (opcheck's autograd test) starts from a float.
  m.def("sample_branches(Tensor logits, Tensor tau, Tensor? noise, Tensor? seed) -> (Tensor soft, Tensor index)");
  // Forward of the straight-through branch: out[j] = parents[index[j]], out [J, *S] with the parents'
  // strides. `logits` and `soft` are not read: they are inputs so autograd can route the
  // straight-through gradient to the logits (see branch_backward).
  m.def("straight_through_branch(Tensor parents, Tensor logits, Tensor index, Tensor soft, Tensor tau) -> Tensor");
  // Fused straight-through backward in one pass over parents and grad_out:
  //   grad_parents[i] = sum_{j : index[j] == i} grad_out[j]
  //   G[i, j]         = <grad_out[j], parents[i]>     (every i, not only index[j])
  //   grad_logits     = soft * (G - sum_i soft * G) / tau     (logits' dtype, fp32 accumulation)
  // An output whose flag is false is not computed and returned empty (shape [0]): without the logits
  // gradient (frozen logits during warmup) no dot product is taken and parents are not read; without
  // the parents gradient (the network input) grad_parents is not written.
  m.def(
      "branch_backward(Tensor grad_out, Tensor parents, Tensor index, Tensor soft, Tensor tau, "
      "bool need_grad_parents=True, bool need_grad_logits=True) -> (Tensor, Tensor)");
}
