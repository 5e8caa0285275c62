// Fused cross-entropy on CPU: one pass over each row gives its loss and its gradient.
//   loss_i = logsumexp(x_i) - (1-eps) * x_i[t_i] - eps/V * sum_j x_ij
//   grad_i = (softmax(x_i) - eps/V - (1-eps) * one_hot(t_i)) * scale      (scale = 1/count for mean)
// Math in fp32 (fp64 for fp64 logits); rows in parallel with OpenMP; lanes with at::vec.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "huge_pages.h"
#include "vec_math.h"

namespace fusedops {
namespace {

using at::vec::Vectorized;
enum Reduction { kNone = 0, kMean = 1, kSum = 2 };  // torch's at::Reduction numbering

// max that propagates NaN, like at::vec::maximum
template <typename T>
inline T nan_max(T a, T b) { return (std::isnan(a) || a > b) ? a : b; }

// Checks every target before anything is written; returns how many are not ignore_index.
template <typename index_t>
int64_t count_targets(const index_t* target, int64_t n, int64_t num_classes, int64_t ignore_index) {
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = target[i];
    if (t == ignore_index) continue;
    TORCH_CHECK_INDEX(t >= 0 && t < num_classes, "cross_entropy: target[", i, "] = ", t,
                      " is out of range for ", num_classes, " classes (argument 'target')");
    ++count;
  }
  return count;
}

// Rows [begin, end): row_loss[i] and grad row i. grad may alias logits (in-place backward).
// One exp per element: pass 1 keeps e = exp(x - m_b) in a scratch row (m_b: the running max when
// block b was read), pass 2 rescales it to the softmax and writes the gradient.
template <typename scalar_t, typename index_t>
void cross_entropy_rows(const scalar_t* logits, int64_t stride, const index_t* target,
                        scalar_t* grad, int64_t grad_stride, at::opmath_type<scalar_t>* row_loss,
                        int64_t begin, int64_t end, int64_t V, int64_t ignore_index, double eps,
                        double scale_) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size(), B = 8 * W;  // lanes, elements per block
  const acc_t lowest = std::numeric_limits<acc_t>::lowest();  // a finite start: -inf - start = -inf
  const acc_t smooth = eps / V, keep = 1.0 - eps, scale = scale_;
  const auto add = [](Vec& u, Vec& v) { return u + v; };
  std::vector<acc_t> e(V), block_max((V + B - 1) / B);
  for (int64_t i = begin; i < end; ++i) {
    const scalar_t* x = logits + i * stride;
    scalar_t* g = grad + i * grad_stride;
    const int64_t t = target[i];
    if (t == ignore_index) {
      std::fill(g, g + V, scalar_t(0));
      row_loss[i] = 0;
      continue;
    }
    // pass 1, block by block: online max M and sum of exp, s = s * exp(M - M') + sum(exp(x - M')):
    // each block summed on its own, the block sums added compensated (Kahan: c keeps what each
    // addition to s rounded off; once per block, off the per-element dependency chain), the lanes
    // of s added up in double
    Vec s(0), c(0), sx(0);
    acc_t M = lowest, sx_tail = 0;
    double s_tail = 0;
    for (int64_t b0 = 0; b0 < V; b0 += B) {
      const int64_t b1 = std::min(b0 + B, V);
      int64_t j = b0;
      Vec vm(lowest);
      for (; j + W <= b1; j += W) vm = max_lanes(vm, load_acc<acc_t>(x + j));
      acc_t m = at::vec::vec_reduce_all<acc_t>([](Vec& u, Vec& v) { return at::vec::maximum(u, v); }, vm);
      for (; j < b1; ++j) m = nan_max(m, static_cast<acc_t>(x[j]));
      if (m > M || std::isnan(m)) {
        const Vec rescale(M == lowest ? acc_t(0) : std::exp(M - m));  // s = 0 before the first block
        s = s * rescale;
        c = c * rescale;
        M = m;
      }
      block_max[b0 / B] = M;
      const Vec vM(M);
      Vec block_sum(0);
      for (j = b0; j + W <= b1; j += W) {
        const Vec v = load_acc<acc_t>(x + j);
        const Vec ev = exp_nonpositive(v - vM);
        ev.store(e.data() + j);
        block_sum = block_sum + ev;
        if (eps > 0) sx = sx + v;  // sum(x) only for label smoothing
      }
      const Vec y = block_sum - c, sum = s + y;
      c = (sum - s) - y;
      s = sum;
      for (; j < b1; ++j) {  // only in the last block: no rescale follows
        const acc_t v = static_cast<acc_t>(x[j]);
        e[j] = std::exp(v - M);
        s_tail += e[j];
        sx_tail += v;
      }
    }
    alignas(64) acc_t s_lanes[W], c_lanes[W];
    s.store(s_lanes);
    c.store(c_lanes);
    for (int64_t k = 0; k < W; ++k) s_tail += static_cast<double>(s_lanes[k]) - c_lanes[k];
    const acc_t S = s_tail;
    const acc_t xt = static_cast<acc_t>(x[t]);  // in cache now; read before pass 2 may overwrite it
    const acc_t SX = at::vec::vec_reduce_all<acc_t>(add, sx) + sx_tail;
    // loss = (1-eps) * (M - x[t]) + log(S) + eps/V * (V*M - sum(x)): no M + log(S) rounded before
    // M cancels, and M - x[t] is exact when x[t] is near the max
    row_loss[i] = keep * (M - xt) + std::log(S) + (eps > 0 ? smooth * (V * M - SX) : acc_t(0));  // skip 0 * (-inf)
    // pass 2: p = e * f_b, f_b = exp(m_b - M) / S (block_max turned into f in place);
    // grad = (p - eps/V) * scale, and the sum of p off the target
    const int64_t num_blocks = block_max.size();
    int64_t k = 0;
    for (const Vec vM(M), vS(S); k + W <= num_blocks; k += W) {
      (exp_nonpositive(Vec::loadu(block_max.data() + k) - vM) / vS).store(block_max.data() + k);
    }
    for (; k < num_blocks; ++k) block_max[k] = std::exp(block_max[k] - M) / S;
    const acc_t p_t = e[t] * block_max[t / B];
    e[t] = 0;
    Vec others(0);
    acc_t others_tail = 0;
    const Vec vscale(scale), voffset(-smooth * scale);
    for (int64_t b0 = 0; b0 < V; b0 += B) {
      const int64_t b1 = std::min(b0 + B, V);
      const acc_t f = block_max[b0 / B];
      const Vec vf(f);
      int64_t j = b0;
      for (; j + W <= b1; j += W) {
        const Vec p = Vec::loadu(e.data() + j) * vf;
        store_acc<acc_t>(g + j, at::vec::fmadd(p, vscale, voffset));  // (p - eps/V) * scale
        others = others + p;
      }
      for (; j < b1; ++j) {
        const acc_t p = e[j] * f;
        g[j] = static_cast<scalar_t>((p - smooth) * scale);
        others_tail += p;
      }
    }
    // target column: softmax_t - 1, as -(sum of the others) when softmax_t > 1/2 (exact even when
    // softmax_t rounds to 1), else directly (where the sum of the others would cancel)
    const acc_t p_others = at::vec::vec_reduce_all<acc_t>(add, others) + others_tail;
    g[t] = static_cast<scalar_t>((p_t > acc_t(0.5) ? eps - smooth - p_others : p_t - smooth - keep) * scale);
  }
}

// Shared by the out-of-place and in-place forward: fills grad, returns the loss.
at::Tensor cross_entropy_into(const at::Tensor& logits, const at::Tensor& target, at::Tensor& grad,
                              int64_t reduction, int64_t ignore_index, double eps) {
  TORCH_CHECK_VALUE(logits.dim() == 2 && logits.stride(1) == 1,
                    "cross_entropy: logits must be 2-D with unit stride along classes");
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == logits.size(0),
                    "cross_entropy: target must have shape (N,)");
  TORCH_CHECK_VALUE(reduction >= kNone && reduction <= kSum, "cross_entropy: bad reduction ", reduction);
  const int64_t N = logits.size(0), V = logits.size(1);
  const at::Tensor tgt = target.contiguous();
  const auto acc_dtype = at::toOpMathType(logits.scalar_type());
  at::Tensor row_loss = at::empty({N}, logits.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(tgt.scalar_type(), "cross_entropy_target", [&] {
      const index_t* t = tgt.const_data_ptr<index_t>();
      const int64_t count = count_targets(t, N, V, ignore_index);
      const double scale = reduction == kMean ? (count > 0 ? 1.0 / count : 0.0) : 1.0;
      const scalar_t* x = logits.const_data_ptr<scalar_t>();
      scalar_t* g = grad.mutable_data_ptr<scalar_t>();
      acc_t* rl = row_loss.mutable_data_ptr<acc_t>();
      const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1));
      at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
        cross_entropy_rows<scalar_t, index_t>(x, logits.stride(0), t, g, grad.stride(0), rl, begin,
                                              end, V, ignore_index, eps, scale);
      });
      if (reduction != kNone) {  // a serial sum: the same loss for any thread count
        acc_t total = 0;
        for (int64_t i = 0; i < N; ++i) total += rl[i];
        row_loss = at::scalar_tensor(reduction == kMean ? total / acc_t(count) : total,
                                     row_loss.options());
      }
    });
  });
  return row_loss.to(logits.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward(const at::Tensor& logits,
                                                         const at::Tensor& target, int64_t reduction,
                                                         int64_t ignore_index, double label_smoothing) {
  at::Tensor grad = empty_huge(logits.sizes(), logits.options());
  at::Tensor loss = cross_entropy_into(logits, target, grad, reduction, ignore_index, label_smoothing);
  return {loss, grad};
}

at::Tensor cross_entropy_forward_inplace(at::Tensor& logits, const at::Tensor& target, int64_t reduction,
                                         int64_t ignore_index, double label_smoothing) {
  at::assert_no_internal_overlap(logits);  // rows written by several threads at once
  at::Tensor loss = cross_entropy_into(logits, target, logits, reduction, ignore_index, label_smoothing);
  logits.unsafeGetTensorImpl()->bump_version();  // as every in-place op: autograd sees the write
  return loss;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedops, CPU, m) {
  m.impl("cross_entropy_forward", &cross_entropy_forward);
  m.impl("cross_entropy_forward_inplace", &cross_entropy_forward_inplace);
}

}  // namespace fusedops
