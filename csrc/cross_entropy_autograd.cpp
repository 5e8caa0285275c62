// Autograd of the fused cross-entropy, in C++ so that a training step pays no Python for it.
//   fusedops::cross_entropy(logits, target, ...) -> loss: the forward op computes the loss and its
//   gradient in one pass and the gradient is saved; backward hands it back, scaled by grad_output.
//   fusedops::cross_entropy_inplace(logits, ...): the same with the gradient written over the logits.
// `triton` picks the kernels: the C++ ops (CPU tensors) or the Triton ones (registered from Python).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/library.h>

#include "find_op.h"

#include <string>
#include <tuple>

namespace fusedops {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// (loss, gradient of the logits) of the forward op, or (loss, logits) of the in-place one.
std::tuple<Tensor, Tensor> loss_and_grad(Tensor logits, const Tensor& target, int64_t reduction,
                                         int64_t ignore_index, double label_smoothing, bool inplace, bool triton) {
  using Forward = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, int64_t, int64_t, double);
  using ForwardInplace = Tensor(Tensor&, const Tensor&, int64_t, int64_t, double);
  static const BackendOps<Forward> forward("cross_entropy_forward");
  static const BackendOps<ForwardInplace> forward_inplace("cross_entropy_forward_inplace");
  if (!inplace) return forward.get(triton).call(logits, target, reduction, ignore_index, label_smoothing);
  return {forward_inplace.get(triton).call(logits, target, reduction, ignore_index, label_smoothing), logits};
}

// A real tensor holding 1: the loss is the graph's last op. Not asked of a traced tensor (torch.compile).
bool is_one(const Tensor& t) {
  constexpr c10::DispatchKeySet traced({c10::DispatchKey::Python, c10::DispatchKey::Functionalize});
  return t.numel() == 1 && !t.key_set().has_any(traced) && t.item<double>() == 1.0;
}

struct CrossEntropy : public torch::autograd::Function<CrossEntropy> {
  static Tensor forward(AutogradContext* ctx, Tensor logits, const Tensor& target, int64_t reduction,
                        int64_t ignore_index, double label_smoothing, bool inplace, bool triton) {
    Tensor loss, grad;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(loss, grad) = loss_and_grad(logits, target, reduction, ignore_index, label_smoothing, inplace, triton);
    }
    // the C++ in-place kernel bumps the logits' version itself; the Triton op's bump is in the
    // ADInplaceOrView layer that the guard skipped
    if (inplace && triton) torch::autograd::increment_version(logits);
    ctx->save_for_backward({grad});
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const Tensor grad = ctx->get_saved_variables()[0], &grad_output = grad_outputs[0];
    // grad_output = 1: the saved gradient as it is, no new N x V buffer. Otherwise
    // dlogits = grad * grad_output (per row for reduction "none").
    const Tensor dlogits = is_one(grad_output)
        ? grad : grad * (grad_output.dim() == 1 ? grad_output.unsqueeze(1) : grad_output);
    return {dlogits, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor cross_entropy(const Tensor& logits, const Tensor& target, int64_t reduction, int64_t ignore_index,
                     double label_smoothing, bool triton) {
  return CrossEntropy::apply(logits, target, reduction, ignore_index, label_smoothing, false, triton);
}

Tensor cross_entropy_inplace(Tensor& logits, const Tensor& target, int64_t reduction, int64_t ignore_index,
                             double label_smoothing, bool triton) {
  return CrossEntropy::apply(logits, target, reduction, ignore_index, label_smoothing, true, triton);
}

// Below autograd (no_grad needs no kernel here; inference tensors do): the loss alone.
Tensor cross_entropy_loss(const Tensor& logits, const Tensor& target, int64_t reduction, int64_t ignore_index,
                          double label_smoothing, bool triton) {
  return std::get<0>(loss_and_grad(logits, target, reduction, ignore_index, label_smoothing, false, triton));
}

Tensor cross_entropy_inplace_loss(Tensor& logits, const Tensor& target, int64_t reduction, int64_t ignore_index,
                                  double label_smoothing, bool triton) {
  return std::get<0>(loss_and_grad(logits, target, reduction, ignore_index, label_smoothing, true, triton));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fusedops, m) {
  m.def("cross_entropy(Tensor logits, Tensor target, int reduction, int ignore_index, float label_smoothing, "
        "bool triton) -> Tensor");
  m.def("cross_entropy_inplace(Tensor(a!) logits, Tensor target, int reduction, int ignore_index, "
        "float label_smoothing, bool triton) -> Tensor");
}

TORCH_LIBRARY_IMPL(fusedops, Autograd, m) {
  m.impl("cross_entropy", &cross_entropy);
  m.impl("cross_entropy_inplace", &cross_entropy_inplace);
}

TORCH_LIBRARY_IMPL(fusedops, CompositeExplicitAutograd, m) {
  m.impl("cross_entropy", &cross_entropy_loss);
  m.impl("cross_entropy_inplace", &cross_entropy_inplace_loss);
}

}  // namespace fusedops
