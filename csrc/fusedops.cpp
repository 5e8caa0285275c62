// The fusedops operator library: every op's schema, in one table (kOps). Each is one step of a kernel; its
// CPU kernel is C++ (csrc/<operator>.cpp), its CUDA kernel the Triton launcher registered from Python
// (fusedops/<operator>.py), its fake kernel registered from Python too. The ops themselves are not
// differentiable: autograd is the Python torch.autograd.Function of each operator, which calls them.
#include <Python.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <string>

// Lets `import fusedops._C` load this library; loading it registers the ops.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

namespace {

struct Op {
  const char* schema;
  // whether the ops' Autograd fallback applies: backpropagating through the op itself, rather than through its
  // operator's autograd Function, is an error that says so, not a silently missing gradient. The running
  // statistics' update has one kernel for every device (CompositeExplicitAutograd) and no gradient.
  bool autograd_error;
};

// Every op: one step of a kernel, defined once here.
const Op kOps[] = {
    // cross-entropy of (N, V) logits and class indices (N,) or probabilities (N, V), with optional class
    // weights, label smoothing, z-loss and softcap: the loss (per row, or reduced), its gradient with
    // respect to the logits, and each row's logsumexp (acc dtype)
    {"cross_entropy_forward(Tensor logits, Tensor target, Tensor? weight, int reduction, int ignore_index, "
     "float label_smoothing, float z_loss, float? softcap) -> (Tensor, Tensor, Tensor)",
     true},
    // the same, the gradient written over the logits: the loss and lse
    {"cross_entropy_forward_inplace(Tensor(a!) logits, Tensor target, Tensor? weight, int reduction, "
     "int ignore_index, float label_smoothing, float z_loss, float? softcap) -> (Tensor, Tensor)",
     true},
    // backward's scaling by the upstream gradient, in place: grad (2-D, unit stride along rows) times scale,
    // 0-d or one factor per row; nothing is done for a 0-d factor of 1, read on the device (no host sync)
    {"cross_entropy_scale_grad(Tensor(a!) grad, Tensor scale) -> ()", true},
    // batch norm over (N, C, *), contiguous or channels-last: out = act(bn(input) + residual) in the
    // input's layout (activation 0: none, 1: relu), mean (fp64), invstd, unbiased var
    {"batch_norm_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, "
     "Tensor? running_var, bool training, bool unbiased, float eps, Tensor? residual=None, int activation=0) "
     "-> (Tensor, Tensor, Tensor, Tensor)",
     true},
    // grad_input, grad_weight, grad_bias and grad_residual; given the forward's relu output, grad_out is
    // first masked by output > 0, and grad_residual is that masked grad_out (else an empty tensor)
    {"batch_norm_backward(Tensor grad_out, Tensor input, Tensor mean, Tensor invstd, Tensor? weight, "
     "bool training, bool unbiased, Tensor? output=None, bool grad_residual=False) "
     "-> (Tensor, Tensor, Tensor, Tensor)",
     true},
    // a batch split over processes: this share's mean and m2 (fp64) ...
    {"batch_norm_stats(Tensor input) -> (Tensor, Tensor)", true},
    // ... its sum(dy) and sum(dy * (x - mean)) (fp64) ...
    {"batch_norm_backward_reduce(Tensor grad_out, Tensor input, Tensor mean) -> (Tensor, Tensor)", true},
    // ... and its grad_input from the sums and the count (a one-element fp64 tensor) over every process
    {"batch_norm_backward_elemt(Tensor grad_out, Tensor input, Tensor mean, Tensor invstd, Tensor? weight, "
     "Tensor sum_dy, Tensor sum_dy_xmu, Tensor count, bool unbiased) -> Tensor",
     true},
    // the running statistics' update (and the batch count), in place
    {"batch_norm_update_stats(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor(c!)? num_batches_tracked, "
     "Tensor mean, Tensor var, float? momentum) -> ()",
     false},
};

}  // namespace

TORCH_LIBRARY(fusedops, m) {
  for (const Op& op : kOps) {
    m.def(op.schema);
  }
}

TORCH_LIBRARY_IMPL(fusedops, Autograd, m) {
  for (const Op& op : kOps) {
    if (op.autograd_error) {
      const std::string schema = op.schema;
      m.impl(schema.substr(0, schema.find('(')).c_str(), torch::autograd::autogradNotImplementedFallback());
    }
  }
}
