// Fused cross-entropy on CPU: one pass over each row gives its loss, its gradient and its logsumexp.
//   y = c * tanh(x / c) with softcap c (else y = x),  M = max_j y_j,  S = sum_j exp(y_j - M),  lse = M + log S
//   q' = (1-ls) * q + ls/V (ls: label smoothing),  q = one_hot(t) (class target) or the row of probabilities
//   W = sum_j w_j q'_j                                                      (class weights w, else ones)
//   loss = sum_j w_j q'_j (lse - y_j) + z * lse^2 = sum_j w_j q'_j (M - y_j) + W log S + z * lse^2
//   grad = scale * ((W + 2 z lse) * softmax(y) - w * q') * (1 - (y/c)^2)     (scale = 1/divisor for mean)
// A row whose target is ignore_index: loss 0, grad 0, lse still computed.
// Math in fp32 (fp64 for fp64 logits), sums over classes' blocks and over rows in fp64; rows in parallel
// with OpenMP; lanes with at::vec.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Dispatch_v2.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <numeric>
#include <optional>
#include <type_traits>
#include <vector>

#include "huge_pages.h"
#include "vec_math.h"

namespace fusedops {
namespace {

using at::vec::Vectorized;
enum Reduction { kNone = 0, kMean = 1, kSum = 2 };  // torch's at::Reduction numbering

template <typename acc_t>
constexpr int64_t kBlock = 8 * Vectorized<acc_t>::size();  // classes per block of the online max

// max that propagates NaN, like at::vec::maximum
template <typename T>
inline T nan_max(T a, T b) { return (std::isnan(a) || a > b) ? a : b; }

// A sum of whole vectors kept in fp64 lanes: each added vector widened exactly, then added.
template <typename acc_t>
struct Fp64Sum {
  Fp64Lanes<acc_t> lanes;
  Fp64Sum() { lanes.fill(Vectorized<double>(0)); }
  void add(const Vectorized<acc_t>& v) {
    const Fp64Lanes<acc_t> u = to_fp64(v);
    for (size_t k = 0; k < lanes.size(); ++k) lanes[k] = lanes[k] + u[k];
  }
  double total() const {
    double sum = 0;
    for (const auto& v : lanes) sum += at::vec::vec_reduce_all<double>([](auto& a, auto& b) { return a + b; }, v);
    return sum;
  }
};

// Class targets, checked before anything is written (IndexError when out of range), as int64, with the
// mean's divisor: sum of w[t_i] over the kept rows (their count without weights), in fp64.
struct Targets {
  std::vector<int64_t> t;
  int64_t kept = 0;
  double divisor = 0;
};

Targets check_targets(const at::Tensor& target, const double* w, int64_t num_classes, int64_t ignore_index) {
  const int64_t n = target.size(0);
  Targets out;
  out.t.resize(n);
  AT_DISPATCH_V2(target.scalar_type(), "cross_entropy_target", AT_WRAP([&] {
    const scalar_t* p = target.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) {
      const int64_t t = out.t[i] = static_cast<int64_t>(p[i]);
      if (t == ignore_index) continue;
      TORCH_CHECK_INDEX(t >= 0 && t < num_classes, "cross_entropy: target[", i, "] = ", t,
                        " is out of range for ", num_classes, " classes (argument 'target')");
      ++out.kept;
      out.divisor += w ? w[t] : 1.0;  // divisor = sum_i w[t_i]
    }
  }), at::kLong, at::kInt, at::kByte);
  return out;
}

// What every row of one call shares.
template <typename scalar_t>
struct Problem {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;         // logits, rows x_stride apart
  int64_t x_stride;
  const int64_t* target;     // class targets, or nullptr
  const scalar_t* q;         // probability targets (N, V) contiguous, or nullptr
  scalar_t* g;               // gradient, rows g_stride apart (may be x itself)
  int64_t g_stride;
  double* row_loss;
  acc_t* lse;
  int64_t V, ignore_index;
  const acc_t* w;            // class weights, or nullptr
  const double* w_before;    // w_before[b] = sum of w_j over the classes before block b (j < b * kBlock)
  double sum_w;              // sum_j w_j (V without weights)
  double ls, z, scale;       // label smoothing, z-loss, gradient scale
  acc_t cap;                 // softcap (used only with it)
};

// Pass 1's results for one row.
template <typename acc_t>
struct RowStats {
  acc_t M, S;  // max_j y_j, sum_j exp(y_j - M)
  double wd;   // sum_j w_j (M - y_j)            (class targets with label smoothing only)
  double qd;   // sum_j w_j q'_j (M - y_j)       (probability targets only)
  double wq;   // W = sum_j w_j q'_j             (probability targets only)
};

// y = c * tanh(x / c) with softcap (kept in ys for the other loops), else x, as acc_t lanes
template <bool kCap, typename acc_t, typename scalar_t>
inline Vectorized<acc_t> load_y(const scalar_t* x, const acc_t* ys, int64_t j) {
  if constexpr (kCap) return Vectorized<acc_t>::loadu(ys + j);
  return load_acc<acc_t>(x + j);
}

template <bool kCap, typename acc_t, typename scalar_t>
inline acc_t scalar_y(const scalar_t* x, const acc_t* ys, int64_t j) {
  if constexpr (kCap) return ys[j];
  return static_cast<acc_t>(x[j]);
}

// max_j y_j over one block [b0, b1); with softcap, y = c * tanh(x / c) is computed here, kept in ys
template <bool kCap, typename scalar_t, typename acc_t>
acc_t block_max_of(const scalar_t* x, acc_t* ys, int64_t b0, int64_t b1, acc_t cap) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  Vec vm(std::numeric_limits<acc_t>::lowest());
  int64_t j = b0;
  for (const Vec vc(cap); j + W <= b1; j += W) {
    Vec y = load_acc<acc_t>(x + j);
    if constexpr (kCap) {
      y = vc * tanh_lanes(y / vc);  // y = c * tanh(x / c)
      y.store(ys + j);
    }
    vm = max_lanes(vm, y);
  }
  acc_t m = at::vec::vec_reduce_all<acc_t>([](Vec& u, Vec& v) { return at::vec::maximum(u, v); }, vm);
  for (; j < b1; ++j) {
    acc_t y = static_cast<acc_t>(x[j]);
    if constexpr (kCap) y = ys[j] = cap * std::tanh(y / cap);
    m = nan_max(m, y);
  }
  return m;
}

// Pass 1 over a row, block by block: online max M and sum of exp, s = s * exp(M - M') + sum(exp(y - M')),
// e_j = exp(y_j - m_b) kept in e (m_b = block_max[b], the running max when block b was read).
// Each block summed on its own, the block sums added compensated (Kahan: c keeps what each addition to
// s rounded off; once per block, off the per-element dependency chain), the lanes of s added in fp64.
// The sums of coefficient * (M - y_j) (no cancellation: every term >= 0 for coefficients >= 0) are summed
// against the running max, each block's sum added in fp64; when the max rises by r, every term so far
// rises by its coefficient * r.
template <bool kProb, bool kWeight, bool kCap, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
RowStats<acc_t> row_pass1(const Problem<scalar_t>& P, const scalar_t* x, const scalar_t* q, acc_t* e, acc_t* ys,
                          acc_t* block_max) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size(), B = kBlock<acc_t>;
  const acc_t lowest = std::numeric_limits<acc_t>::lowest();  // a finite start: -inf - start = -inf
  const bool smooth = !kProb && P.ls > 0;  // class targets' ls/V sum_j w_j (M - y_j)
  const acc_t keep = 1 - P.ls, ls_V = P.ls / P.V;
  const int64_t V = P.V;
  Vec s(0), c(0);
  acc_t M = lowest;
  Fp64Sum<acc_t> wd, qd, wq;
  double s_rest = 0, wd_rest = 0, qd_rest = 0, wq_rest = 0;  // what is summed outside the lanes
  for (int64_t b0 = 0, b = 0; b0 < V; b0 += B, ++b) {
    const int64_t b1 = std::min(b0 + B, V);
    const acc_t m = block_max_of<kCap>(x, ys, b0, b1, P.cap);
    if (m > M || std::isnan(m)) {
      const Vec rescale(M == lowest ? acc_t(0) : std::exp(M - m));  // s = 0 before the first block
      s = s * rescale;
      c = c * rescale;
      if (M != lowest) {
        const double rise = static_cast<double>(m) - M;
        if (smooth) wd_rest += P.w_before[b] * rise;  // the blocks before: sum_j w_j
        if constexpr (kProb) qd_rest += wq.total() * rise;  // sum_j w_j q'_j (no tail yet)
      }
      M = m;
    }
    block_max[b] = M;
    const Vec vM(M);
    Vec block_sum(0), bwd(0), bqd(0), bwq(0);
    int64_t j = b0;
    for (; j + W <= b1; j += W) {
      const Vec d = load_y<kCap>(x, ys, j) - vM;  // y - M <= 0
      const Vec ev = exp_nonpositive(d);
      ev.store(e + j);
      block_sum = block_sum + ev;
      if (smooth) bwd = kWeight ? at::vec::fnmadd(Vec::loadu(P.w + j), d, bwd) : bwd - d;  // += w (M - y)
      if constexpr (kProb) {
        Vec wq_j = at::vec::fmadd(load_acc<acc_t>(q + j), Vec(keep), Vec(ls_V));  // q' = (1-ls) q + ls/V
        if constexpr (kWeight) wq_j = wq_j * Vec::loadu(P.w + j);
        bqd = at::vec::fnmadd(wq_j, d, bqd);  // += w q' (M - y)
        bwq = bwq + wq_j;
      }
    }
    const Vec step = block_sum - c, sum = s + step;
    c = (sum - s) - step;
    s = sum;
    if (smooth) wd.add(bwd);
    if constexpr (kProb) {
      qd.add(bqd);
      wq.add(bwq);
    }
    for (; j < b1; ++j) {  // only in the last block: no rescale follows
      const acc_t d = scalar_y<kCap>(x, ys, j) - M;
      e[j] = std::exp(d);
      s_rest += e[j];
      const double w_j = kWeight ? static_cast<double>(P.w[j]) : 1.0;
      if (smooth) wd_rest -= w_j * d;
      if constexpr (kProb) {
        const double wq_j = w_j * (keep * static_cast<acc_t>(q[j]) + ls_V);
        qd_rest -= wq_j * d;
        wq_rest += wq_j;
      }
    }
  }
  alignas(64) acc_t s_lanes[W], c_lanes[W];
  s.store(s_lanes);
  c.store(c_lanes);
  for (int64_t k = 0; k < W; ++k) s_rest += static_cast<double>(s_lanes[k]) - c_lanes[k];
  return {M, static_cast<acc_t>(s_rest), wd.total() + wd_rest, qd.total() + qd_rest, wq.total() + wq_rest};
}

// block_max[b] = m_b turned in place into f_b = exp(m_b - M) / S: then softmax_j = e_j * f_b
template <typename acc_t>
void block_factors(acc_t* block_max, int64_t num_blocks, acc_t M, acc_t S) {
  using Vec = Vectorized<acc_t>;
  int64_t k = 0;
  for (const Vec vM(M), vS(S); k + Vec::size() <= num_blocks; k += Vec::size()) {
    (exp_nonpositive(Vec::loadu(block_max + k) - vM) / vS).store(block_max + k);
  }
  for (; k < num_blocks; ++k) block_max[k] = std::exp(block_max[k] - M) / S;
}

// Pass 2 over a row: grad_j = (a p_j - b_j) * (1 - (y_j/c)^2), p_j = e_j f_b, a = scale (W + 2 z lse),
// b_j = scale w_j q'_j off a class target (ls/V scale w_j); returns sum_j p_j (classes: e[t] zeroed first).
template <bool kProb, bool kWeight, bool kCap, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
acc_t row_pass2(const Problem<scalar_t>& P, scalar_t* g, const scalar_t* q, const acc_t* e, const acc_t* ys,
                const acc_t* f, acc_t a) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size(), B = kBlock<acc_t>;
  const acc_t kq = P.scale * (1 - P.ls), ks = P.scale * P.ls / P.V, inv_cap = acc_t(1) / P.cap;
  const auto b_lanes = [&](int64_t j) {  // b_j = scale w_j q'_j, q'_j = (1-ls) q_j + ls/V
    Vec b(ks);
    if constexpr (kProb) b = at::vec::fmadd(load_acc<acc_t>(q + j), Vec(kq), b);
    if constexpr (kWeight) b = b * Vec::loadu(P.w + j);
    return b;
  };
  const auto b_scalar = [&](int64_t j) {
    acc_t b = ks;
    if constexpr (kProb) b += kq * static_cast<acc_t>(q[j]);
    if constexpr (kWeight) b *= P.w[j];
    return b;
  };
  Vec sum(0);
  acc_t sum_tail = 0;
  const Vec va(a), vone(1), vinv_cap(inv_cap);
  for (int64_t b0 = 0; b0 < P.V; b0 += B) {
    const int64_t b1 = std::min(b0 + B, P.V);
    const Vec vf(f[b0 / B]);
    int64_t j = b0;
    for (; j + W <= b1; j += W) {
      const Vec p = Vec::loadu(e + j) * vf;
      Vec gj = at::vec::fmsub(p, va, b_lanes(j));  // a p - b
      if constexpr (kCap) {
        const Vec u = Vec::loadu(ys + j) * vinv_cap;
        gj = gj * at::vec::fnmadd(u, u, vone);  // * (1 - (y/c)^2)
      }
      store_acc<acc_t>(g + j, gj);
      sum = sum + p;
    }
    for (; j < b1; ++j) {
      const acc_t p = e[j] * f[b0 / B];
      acc_t gj = a * p - b_scalar(j);
      if constexpr (kCap) gj *= 1 - (ys[j] * inv_cap) * (ys[j] * inv_cap);
      g[j] = static_cast<scalar_t>(gj);
      sum_tail += p;
    }
  }
  return at::vec::vec_reduce_all<acc_t>([](Vec& u, Vec& v) { return u + v; }, sum) + sum_tail;
}

// Rows [begin, end): lse, row_loss and grad of each.
template <bool kProb, bool kWeight, bool kCap, typename scalar_t>
void cross_entropy_rows(const Problem<scalar_t>& P, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t B = kBlock<acc_t>;
  const int64_t V = P.V, num_blocks = (V + B - 1) / B;
  const double ls = P.ls, smooth = ls / V, keep = 1.0 - ls;
  std::vector<acc_t> e(V), ys(kCap ? V : 0), f(num_blocks);
  for (int64_t i = begin; i < end; ++i) {
    const scalar_t* x = P.x + i * P.x_stride;
    const scalar_t* q = kProb ? P.q + i * V : nullptr;
    scalar_t* g = P.g + i * P.g_stride;
    const RowStats<acc_t> r = row_pass1<kProb, kWeight, kCap>(P, x, q, e.data(), ys.data(), f.data());
    const double log_S = std::log(static_cast<double>(r.S)), lse = r.M + log_S;  // lse = M + log S
    P.lse[i] = static_cast<acc_t>(lse);
    const int64_t t = kProb ? 0 : P.target[i];
    if (!kProb && t == P.ignore_index) {
      std::fill(g, g + V, scalar_t(0));
      P.row_loss[i] = 0;
      continue;
    }
    // loss = sum_j w_j q'_j (M - y_j) + W log S + z lse^2: no M + log S rounded before M cancels, and
    // M - y_t exact when y_t is near the max
    const double w_t = kProb || !kWeight ? 1.0 : static_cast<double>(P.w[t]);
    const double y_t = kProb ? 0.0 : scalar_y<kCap>(x, ys.data(), t);  // read before pass 2 may overwrite x
    const double W = kProb ? r.wq : keep * w_t + smooth * P.sum_w;  // W = sum_j w_j q'_j
    double loss = kProb ? r.qd : keep * w_t * (r.M - y_t);           // sum_j w_j q'_j (M - y_j) ...
    if (!kProb && ls > 0) loss += smooth * r.wd;  // ... + ls/V sum_j w_j (M - y_j); none at ls = 0: no 0 * inf
    P.row_loss[i] = loss + W * log_S + P.z * lse * lse;
    block_factors(f.data(), num_blocks, r.M, r.S);
    const acc_t a = P.scale * (W + 2 * P.z * lse);  // a = scale (W + 2 z lse)
    if constexpr (kProb) {
      row_pass2<kProb, kWeight, kCap>(P, g, q, e.data(), ys.data(), f.data(), a);
      continue;
    }
    const double p_t = e[t] * f[t / B];
    e[t] = 0;
    const double others = row_pass2<kProb, kWeight, kCap>(P, g, q, e.data(), ys.data(), f.data(), a);
    // target column: p_t - 1 as -(sum of the others) when p_t > 1/2 (exact even when p_t rounds to 1),
    // else directly (where the sum of the others would cancel);
    // grad_t = scale ((1-ls) w_t (p_t - 1) + ls/V (sum(w) p_t - w_t) + 2 z lse p_t) (1 - (y_t/c)^2)
    const double pm1 = p_t > 0.5 ? -others : p_t - 1.0;
    double g_t = P.scale * (keep * w_t * pm1 + smooth * (P.sum_w * p_t - w_t) + 2 * P.z * lse * p_t);
    if constexpr (kCap) g_t *= 1 - (y_t / P.cap) * (y_t / P.cap);
    g[t] = static_cast<scalar_t>(g_t);
  }
}

// cross_entropy_rows<kProb, kWeight, kCap> with the flags known at run time
template <typename scalar_t>
void run_rows(const Problem<scalar_t>& P, bool prob, bool weighted, bool capped, int64_t N) {
  const auto as_type = [](bool flag, auto f) { flag ? f(std::true_type{}) : f(std::false_type{}); };
  as_type(prob, [&](auto kProb) {
    as_type(weighted, [&](auto kWeight) {
      as_type(capped, [&](auto kCap) {
        const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(P.V, 1));
        at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
          cross_entropy_rows<kProb.value, kWeight.value, kCap.value, scalar_t>(P, begin, end);
        });
      });
    });
  });
}

// Shared by the out-of-place and in-place forward: fills grad, returns the loss and lse.
std::tuple<at::Tensor, at::Tensor> cross_entropy_into(const at::Tensor& logits, const at::Tensor& target,
                                                      const std::optional<at::Tensor>& weight, at::Tensor& grad,
                                                      int64_t reduction, int64_t ignore_index, double label_smoothing,
                                                      double z_loss, std::optional<double> softcap) {
  TORCH_CHECK_VALUE(logits.dim() == 2 && (logits.stride(1) == 1 || logits.size(1) == 1 || logits.numel() == 0),
                    "cross_entropy: logits must be 2-D with unit stride along classes");
  TORCH_CHECK_VALUE(reduction >= kNone && reduction <= kSum, "cross_entropy: bad reduction ", reduction);
  const int64_t N = logits.size(0), V = logits.size(1);
  const bool prob = target.is_floating_point();
  TORCH_CHECK_VALUE(prob ? target.sizes() == logits.sizes() && target.scalar_type() == logits.scalar_type()
                         : target.dim() == 1 && target.size(0) == N,
                    "cross_entropy: target must have shape (N,), or be (N, V) of the logits' dtype");
  TORCH_CHECK_VALUE(!weight || (weight->dim() == 1 && weight->size(0) == V &&
                                weight->scalar_type() == logits.scalar_type()),
                    "cross_entropy: weight must have shape (V,) and the logits' dtype");
  const auto acc_dtype = at::toOpMathType(logits.scalar_type());
  const at::Tensor w64 = weight ? weight->to(at::kDouble).contiguous() : at::Tensor();
  const double* w = weight ? w64.const_data_ptr<double>() : nullptr;
  const Targets targets = prob ? Targets{} : check_targets(target.contiguous(), w, V, ignore_index);
  const int64_t kept = prob ? N : targets.kept;
  const double divisor = prob ? static_cast<double>(N) : targets.divisor;
  const double scale = reduction == kMean ? (kept > 0 ? 1.0 / divisor : 0.0) : 1.0;
  at::Tensor row_loss = at::empty({N}, logits.options().dtype(at::kDouble));
  at::Tensor lse = at::empty({N}, logits.options().dtype(acc_dtype));
  const at::Tensor q = prob ? target.contiguous() : at::Tensor();
  const at::Tensor w_acc = weight ? weight->to(acc_dtype).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int64_t B = kBlock<acc_t>;
    std::vector<double> w_before((V + B - 1) / B + 1, 0.0);  // w_before[b] = sum_{j < b B} w_j
    for (int64_t b = 0; b * B < V; ++b) {
      const int64_t b1 = std::min((b + 1) * B, V);
      w_before[b + 1] = w ? std::accumulate(w + b * B, w + b1, w_before[b]) : b1;
    }
    Problem<scalar_t> P{logits.const_data_ptr<scalar_t>(), logits.stride(0),
                        prob ? nullptr : targets.t.data(), prob ? q.const_data_ptr<scalar_t>() : nullptr,
                        grad.mutable_data_ptr<scalar_t>(), grad.stride(0), row_loss.mutable_data_ptr<double>(),
                        lse.mutable_data_ptr<acc_t>(), V, ignore_index,
                        weight ? w_acc.const_data_ptr<acc_t>() : nullptr, w_before.data(), w_before.back(),
                        label_smoothing, z_loss, scale, static_cast<acc_t>(softcap.value_or(1.0))};
    run_rows(P, prob, weight.has_value(), softcap.has_value(), N);
  });
  if (reduction == kNone) return {row_loss.to(logits.scalar_type()), lse};
  const double* rl = row_loss.const_data_ptr<double>();
  double total = 0;
  for (int64_t i = 0; i < N; ++i) total += rl[i];  // a serial sum: the same loss for any thread count
  if (reduction == kMean) total /= divisor;  // all rows ignored: 0 / 0 = NaN, as torch
  return {at::scalar_tensor(total, logits.options().dtype(at::kDouble)).to(logits.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_forward(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t reduction,
    int64_t ignore_index, double label_smoothing, double z_loss, std::optional<double> softcap) {
  at::Tensor grad = empty_huge(logits.sizes(), logits.options());
  auto [loss, lse] = cross_entropy_into(logits, target, weight, grad, reduction, ignore_index, label_smoothing,
                                        z_loss, softcap);
  return {loss, grad, lse};
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward_inplace(
    at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t reduction,
    int64_t ignore_index, double label_smoothing, double z_loss, std::optional<double> softcap) {
  at::assert_no_internal_overlap(logits);  // rows written by several threads at once
  auto out = cross_entropy_into(logits, target, weight, logits, reduction, ignore_index, label_smoothing, z_loss,
                                softcap);
  logits.unsafeGetTensorImpl()->bump_version();  // as every in-place op: autograd sees the write
  return out;
}

// grad *= scale in place: backward's step. scale is 0-d (one factor, read here: a CPU scalar) or one per row;
// a 0-d factor of exactly 1 (the usual loss.backward()) leaves grad untouched: no pass over it.
void cross_entropy_scale_grad(at::Tensor& grad, const at::Tensor& scale) {
  TORCH_CHECK_VALUE(grad.dim() == 2 && (grad.stride(1) == 1 || grad.size(1) <= 1),
                    "cross_entropy_scale_grad: grad must be 2-D with unit stride along its rows");
  const int64_t N = grad.size(0), V = grad.size(1);
  TORCH_CHECK_VALUE(scale.dim() == 0 || (scale.dim() == 1 && scale.size(0) == N),
                    "cross_entropy_scale_grad: scale must be 0-d or have one factor per row of grad");
  if (scale.dim() == 0 && scale.item<double>() == 1.0) return;  // the factor 1: nothing to do
  at::assert_no_internal_overlap(grad);  // rows written by several threads at once
  const at::Tensor factors = scale.to(at::kDouble).expand({N}).contiguous();
  const double* f = factors.const_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "cross_entropy_scale_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Vec = Vectorized<acc_t>;
    constexpr int64_t W = Vec::size();
    scalar_t* g = grad.mutable_data_ptr<scalar_t>();
    const int64_t stride = grad.stride(0);
    at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* row = g + i * stride;
        const acc_t s = static_cast<acc_t>(f[i]);
        int64_t j = 0;
        for (const Vec vs(s); j + W <= V; j += W) store_acc<acc_t>(row + j, load_acc<acc_t>(row + j) * vs);
        for (; j < V; ++j) row[j] = static_cast<scalar_t>(static_cast<acc_t>(row[j]) * s);
      }
    });
  });
  grad.unsafeGetTensorImpl()->bump_version();  // as every in-place op: autograd sees the write
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedops, CPU, m) {
  m.impl("cross_entropy_forward", &cross_entropy_forward);
  m.impl("cross_entropy_forward_inplace", &cross_entropy_forward_inplace);
  m.impl("cross_entropy_scale_grad", &cross_entropy_scale_grad);
}

}  // namespace fusedops
