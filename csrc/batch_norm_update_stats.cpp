// The running statistics' update of batch norm, one kernel for every device:
//   num_batches_tracked += 1 (if given); running = running + w * (batch - running) with w = momentum,
//   or 1 / num_batches_tracked when momentum is None (the cumulative average); var is the unbiased
//   batch variance. On plain host memory by a loop, else (CUDA, tensors being traced) by ops.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/library.h>

#include <algorithm>
#include <iterator>
#include <optional>

namespace fusedops {
namespace {

using at::Tensor;
using MaybeTensor = std::optional<Tensor>;

// A plain contiguous CPU tensor, not one being traced (torch.compile): its memory can be written directly.
bool on_host(const Tensor& t) {
  constexpr c10::DispatchKeySet traced({c10::DispatchKey::Python, c10::DispatchKey::Functionalize});
  return t.is_cpu() && t.is_contiguous() && !t.key_set().has_any(traced);
}

// torch.lerp's formula, so that both updates give the same bits: s + w * (e - s) for w < 0.5,
// else e - (e - s) * (1 - w), in the op math type.
template <typename opmath_t>
opmath_t lerp(opmath_t s, opmath_t e, opmath_t w) {
  return w < opmath_t(0.5) ? s + w * (e - s) : e - (e - s) * (opmath_t(1) - w);
}

// The running statistics' update by a loop over host memory: a few hundred instructions per channel
// instead of several dispatched ops.
void update_on_host(const Tensor& running_mean, const Tensor& running_var, const MaybeTensor& num_batches_tracked,
                    const Tensor& mean, const Tensor& var, std::optional<double> momentum) {
  double w = momentum.value_or(0.0);
  if (num_batches_tracked.has_value()) {
    const int64_t count = ++num_batches_tracked->mutable_data_ptr<int64_t>()[0];
    if (!momentum.has_value()) w = 1.0 / static_cast<double>(count);  // the cumulative average
  }
  const bool var64 = var.scalar_type() == at::kDouble;  // var in the compute dtype, fp32 or fp64
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean.scalar_type(), "update_running_stats", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    scalar_t *rm = running_mean.mutable_data_ptr<scalar_t>(), *rv = running_var.mutable_data_ptr<scalar_t>();
    const double* m = mean.const_data_ptr<double>();
    for (int64_t c = 0; c < running_mean.numel(); ++c) {  // running = lerp(running, batch, w)
      const double v = var64 ? var.const_data_ptr<double>()[c] : var.const_data_ptr<float>()[c];
      rm[c] = lerp<opmath_t>(rm[c], static_cast<scalar_t>(m[c]), static_cast<opmath_t>(w));
      rv[c] = lerp<opmath_t>(rv[c], static_cast<scalar_t>(v), static_cast<opmath_t>(w));
    }
  });
}

// The same update by ops: CUDA tensors, and tensors being traced.
void update_by_ops(const Tensor& running_mean, const Tensor& running_var, const MaybeTensor& num_batches_tracked,
                   const Tensor& mean, const Tensor& var, std::optional<double> momentum) {
  if (num_batches_tracked.has_value()) num_batches_tracked->add_(1);
  const Tensor batch_mean = mean.to(running_mean.scalar_type()), batch_var = var.to(running_var.scalar_type());
  if (momentum.has_value()) {
    at::_foreach_lerp_({running_mean, running_var}, {batch_mean, batch_var}, *momentum);
  } else {
    const Tensor w = 1.0 / num_batches_tracked->to(at::kDouble);
    running_mean.lerp_(batch_mean, w.to(running_mean.scalar_type()));
    running_var.lerp_(batch_var, w.to(running_var.scalar_type()));
  }
}

// fusedops::batch_norm_update_stats: num_batches_tracked (if given) counts the batch, and
// running = running + w * (batch - running) with w = momentum, or 1 / num_batches_tracked when
// momentum is None (the cumulative average); var is the unbiased batch variance. On host memory by a
// loop, else by ops; the written tensors' versions are bumped, as every in-place op does.
void update_running_stats(const Tensor& running_mean, const Tensor& running_var, const MaybeTensor& num_batches_tracked,
                          const Tensor& mean, const Tensor& var, std::optional<double> momentum) {
  TORCH_CHECK_VALUE(momentum.has_value() || num_batches_tracked.has_value(),
                    "batch_norm: momentum=None (the cumulative average) needs num_batches_tracked");
  const Tensor* buffers[] = {&running_mean, &running_var, num_batches_tracked ? &*num_batches_tracked : nullptr};
  const bool same_dtype = running_mean.scalar_type() == running_var.scalar_type();
  if (same_dtype && std::all_of(std::begin(buffers), std::end(buffers), [](const Tensor* t) { return !t || on_host(*t); })) {
    // the loop reads an fp64 mean and an fp32 or fp64 var (what the forward ops return)
    const Tensor mean64 = mean.scalar_type() == at::kDouble ? mean : mean.to(at::kDouble);
    const bool var_ok = var.scalar_type() == at::kDouble || var.scalar_type() == at::kFloat;
    update_on_host(running_mean, running_var, num_batches_tracked, mean64.contiguous(),
                   (var_ok ? var : var.to(at::kFloat)).contiguous(), momentum);
  } else {
    update_by_ops(running_mean, running_var, num_batches_tracked, mean, var, momentum);
  }
  for (const Tensor* t : buffers) {
    if (t) torch::autograd::increment_version(*t);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedops, CompositeExplicitAutograd, m) {
  m.impl("batch_norm_update_stats", &update_running_stats);
}

}  // namespace fusedops
