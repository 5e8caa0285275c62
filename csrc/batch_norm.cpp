// Fused batch norm on CPU: statistics over the batch (and length) of each channel.
//   training: mean = sum(x) / n,  var = sum((x - mean)^2) / (n or n-1),  invstd = 1 / sqrt(var + eps)
//   eval:     mean, var = running_mean, running_var
//   forward:  y = (x - mean) * a + beta,  a = gamma * invstd
//   backward: dbeta = sum(dy),  dgamma = sum(dy * xhat),  xhat = (x - mean) * invstd
//             dx = gamma*invstd/n * (n*dy - sum(dy) - f * xhat * sum(dy*xhat))   (f = n/(n-1) if unbiased)
//             eval: dx = dy * gamma * invstd (the statistics are constants)
// A batch split over processes (SyncBatchNorm) takes the same steps as separate ops, a collective
// between each two: batch_norm_stats, then batch_norm_forward given the combined statistics as
// running ones; batch_norm_backward_reduce, then batch_norm_backward_elemt given the summed sums.
// The kernels see a (rows, C) matrix with C contiguous: (N, C) input as it is, (N, C, L) through a
// channels-last (N*L, C) copy (a view when the input is stored that way already).
// Reductions in fp64 (Welford for the statistics) over fixed row chunks, a function of the shape and
// not of the thread count, each chunk into its own partial buffer, merged in chunk order. Elementwise
// passes in fp32 (fp64 for fp64 input; fp16/bf16 converted lane by lane), lanes along C with
// at::vec; there the fp64 mean is applied as hi + lo, two floats of that precision.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
#include <vector>

#include "huge_pages.h"
#include "vec_math.h"

namespace fusedops {
namespace {

using at::Tensor;
using at::vec::Vectorized;

constexpr int64_t kColumnBlock = 1024;  // columns of one reduction task: its partials stay in L1
constexpr int64_t kChunkRows = 256;     // rows per chunk of a reduction, at least ...
constexpr int64_t kMaxChunks = 32;      // ... and at most this many chunks

// The (row chunk, column block) tasks of a reduction over the rows of a (rows, cols) matrix.
struct Tiles {
  int64_t rows, cols, chunks, chunk_rows, blocks;
  Tiles(int64_t R, int64_t C)
      : rows(R), cols(C), chunks(std::clamp<int64_t>(R / kChunkRows, 1, kMaxChunks)),
        chunk_rows((R + chunks - 1) / chunks), blocks((C + kColumnBlock - 1) / kColumnBlock) {}
  int64_t row_begin(int64_t k) const { return std::min(rows, k * chunk_rows); }
  int64_t row_end(int64_t k) const { return std::min(rows, (k + 1) * chunk_rows); }

  // f(chunk, first row, end row, first column, end column) for every task, tasks in parallel.
  template <typename F>
  void for_each_task(const F& f) const {
    at::parallel_for(0, chunks * blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t k = task / blocks, c0 = task % blocks * kColumnBlock;
        f(k, row_begin(k), row_end(k), c0, std::min(cols, c0 + kColumnBlock));
      }
    });
  }
};

// Per column of x (rows, cols): mean and m2 = sum((x - mean)^2), in one pass of Welford's updates
// per chunk, the chunks merged with Chan's formula. Plain loops along C, vectorised by the compiler.
template <typename T>
void mean_and_m2(const T* x, const Tiles& t, double* mean, double* m2) {
  std::vector<double> chunk_mean(t.chunks * t.cols, 0.0), chunk_m2(t.chunks * t.cols, 0.0);
  t.for_each_task([&](int64_t k, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
    double *mk = chunk_mean.data() + k * t.cols, *m2k = chunk_m2.data() + k * t.cols;
    for (int64_t r = r0; r < r1; ++r) {
      const T* row = x + r * t.cols;
      const double inv_count = 1.0 / (r - r0 + 1);
      for (int64_t c = c0; c < c1; ++c) {  // mean += (x - mean) / count, m2 += (x - old mean) * (x - mean)
        const double v = static_cast<double>(row[c]), d = v - mk[c];
        mk[c] += d * inv_count;
        m2k[c] += d * (v - mk[c]);
      }
    }
  });
  std::fill(mean, mean + t.cols, 0.0);
  std::fill(m2, m2 + t.cols, 0.0);
  double count = 0;
  for (int64_t k = 0; k < t.chunks; ++k) {
    const double n_k = t.row_end(k) - t.row_begin(k), total = count + n_k;
    if (n_k == 0) continue;
    for (int64_t c = 0; c < t.cols; ++c) {  // Chan: delta = mean_k - mean, m2 += m2_k + delta^2 * n * n_k / total
      const double delta = chunk_mean[k * t.cols + c] - mean[c];
      mean[c] += delta * (n_k / total);
      m2[c] += chunk_m2[k * t.cols + c] + delta * delta * (count * n_k / total);
    }
    count = total;
  }
  // an infinite value makes Welford's mean NaN (inf - inf); the plain mean keeps +-inf, as PyTorch
  for (int64_t c = 0; c < t.cols; ++c) {
    if (std::isfinite(mean[c])) continue;
    double sum = 0;
    for (int64_t r = 0; r < t.rows; ++r) sum += static_cast<double>(x[r * t.cols + c]);
    mean[c] = sum / t.rows;
  }
}

// S column sums of term(r, c) (S doubles for row r, column c) over all rows: S * cols fp64, sum s
// of column c at s * cols + c. Each task adds its chunk's rows into its own slot of a partial buffer,
// then the chunks are added in order. Plain loops along C, vectorised by the compiler.
template <int S, typename Term>
std::vector<double> column_sums(const Tiles& t, const Term& term) {
  const int64_t stride = t.chunks * t.cols;
  std::vector<double> partial(S * stride, 0.0), total(S * t.cols, 0.0);
  t.for_each_task([&](int64_t k, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
    double* acc = partial.data() + k * t.cols;
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t c = c0; c < c1; ++c) {
        const std::array<double, S> v = term(r, c);
        for (int s = 0; s < S; ++s) acc[s * stride + c] += v[s];
      }
    }
  });
  for (int s = 0; s < S; ++s) {
    for (int64_t k = 0; k < t.chunks; ++k) {
      for (int64_t c = 0; c < t.cols; ++c) total[s * t.cols + c] += partial[s * stride + k * t.cols + c];
    }
  }
  return total;
}

// out[r, j:j+n] = f(r, j, n), a Vectorized<acc_t>, over every row (in parallel) and vector of
// columns. f should capture raw pointers by value: each thread runs its own copy, whose pointers
// then stay in registers (a vector store may alias any memory, so a pointer read through a
// reference is read again).
template <typename acc_t, typename T, typename F>
void for_each_row(T* out, int64_t R, int64_t C, const F& f) {
  constexpr int64_t W = Vectorized<acc_t>::size();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1));
  at::parallel_for(0, R, grain, [&f, out, C](int64_t begin, int64_t end) {
    const F row_f = f;
    for (int64_t r = begin; r < end; ++r) {
      int64_t j = 0;
      for (; j + W <= C; j += W) store_acc<acc_t>(out + r * C + j, row_f(r, j, W));
      if (j < C) store_acc<acc_t>(out + r * C + j, row_f(r, j, C - j), C - j);
    }
  });
}

// The fp64 mean as two values of T, hi + lo: (x - hi) - lo is accurate even when |mean| >> std,
// where x - T(mean) would be off by half an ulp of the mean.
template <typename T>
struct SplitMean {
  std::vector<T> hi, lo;
  SplitMean(const double* mean, int64_t C) : hi(C), lo(C) {
    for (int64_t c = 0; c < C; ++c) {
      hi[c] = static_cast<T>(mean[c]);
      lo[c] = static_cast<T>(mean[c] - static_cast<double>(hi[c]));
    }
  }
};

// x - mean = (x - hi) - lo, n lanes from column j
template <typename T, typename S>
Vectorized<T> centered(const S* x, const T* hi, const T* lo, int64_t j, int64_t n) {
  using Vec = Vectorized<T>;
  return (load_acc<T>(x, n) - Vec::loadu(hi + j, n)) - Vec::loadu(lo + j, n);
}

// (N, C) or (N, C, L) -> contiguous (N*L, C): the layout the kernels take, in the stored dtype
// (the kernels convert to fp32 lane by lane).
Tensor to_rows(const Tensor& t) {
  if (t.dim() == 2) return t.contiguous();
  return t.transpose(1, 2).reshape({-1, t.size(1)}).contiguous();
}

// The inverse of to_rows: a contiguous tensor with the shape of `like`.
Tensor from_rows(const Tensor& rows, const Tensor& like) {
  if (like.dim() == 2) return rows;
  Tensor out = at::empty(like.sizes(), like.options());
  out.copy_(rows.view({like.size(0), like.size(2), like.size(1)}).transpose(1, 2));
  return out;
}

// A per-channel tensor as a contiguous one of `dtype`, or undefined for None.
Tensor per_channel(const std::optional<Tensor>& t, at::ScalarType dtype) {
  return t.has_value() ? t->to(dtype).contiguous() : Tensor();
}

void check_input(const char* op, const Tensor& input) {
  TORCH_CHECK_VALUE(input.dim() == 2 || input.dim() == 3, op, ": input must be (N, C) or (N, C, L), got ",
                    input.dim(), "-D input of shape ", input.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(input.scalar_type()), op, ": input must be floating point, got ",
                    input.scalar_type());
}

void check_channels(const char* op, const char* name, const std::optional<Tensor>& t, int64_t C) {
  TORCH_CHECK_VALUE(!t.has_value() || (t->dim() == 1 && t->size(0) == C), op, ": ", name,
                    " must have shape (", C, ",) for input with ", C, " channels, got ",
                    t.has_value() ? t->sizes() : at::IntArrayRef{});
}

// out, mean (fp64), invstd, var. Training: the batch's mean, invstd of the biased or unbiased
// variance, and the unbiased variance (for running_var); eval: the running statistics.
std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_forward(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var, bool training,
    bool unbiased, double eps) {
  constexpr const char* op = "batch_norm_forward";
  check_input(op, input);
  const int64_t C = input.size(1);
  check_channels(op, "weight", weight, C);
  check_channels(op, "bias", bias, C);
  check_channels(op, "running_mean", running_mean, C);
  check_channels(op, "running_var", running_var, C);
  const auto acc = at::toOpMathType(input.scalar_type());
  const Tensor x = to_rows(input);
  const int64_t R = x.size(0);
  Tensor mean, var, invstd = at::empty({C}, x.options().dtype(acc));
  if (training) {
    TORCH_CHECK_VALUE(R > 1, op, ": expected more than 1 value per channel when training, got input of shape ",
                      input.sizes());
    mean = at::empty({C}, x.options().dtype(at::kDouble));
    var = at::empty({C}, x.options().dtype(acc));
  } else {
    TORCH_CHECK_VALUE(running_mean.has_value() && running_var.has_value(), op,
                      ": running_mean and running_var are needed when training=False");
    mean = running_mean->to(at::kDouble, /*non_blocking=*/false, /*copy=*/true).contiguous();
    var = running_var->to(acc, /*non_blocking=*/false, /*copy=*/true).contiguous();
  }
  const Tensor gamma = per_channel(weight, acc), beta = per_channel(bias, acc);
  Tensor y = empty_huge({R, C}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Vec = Vectorized<acc_t>;
    double* pmean = mean.mutable_data_ptr<double>();
    acc_t *pvar = var.mutable_data_ptr<acc_t>(), *pinvstd = invstd.mutable_data_ptr<acc_t>();
    std::vector<double> m2(C);
    if (training) mean_and_m2(x.const_data_ptr<scalar_t>(), Tiles(R, C), pmean, m2.data());
    std::vector<acc_t> a(C), b(C, acc_t(0));
    for (int64_t c = 0; c < C; ++c) {
      if (training) {
        pvar[c] = static_cast<acc_t>(m2[c] / (R - 1));  // running_var always takes the unbiased variance
        pinvstd[c] = static_cast<acc_t>(1.0 / std::sqrt(m2[c] / (unbiased ? R - 1 : R) + eps));
      } else {
        pinvstd[c] = static_cast<acc_t>(1.0 / std::sqrt(static_cast<double>(pvar[c]) + eps));
      }
      a[c] = gamma.defined() ? gamma.const_data_ptr<acc_t>()[c] * pinvstd[c] : pinvstd[c];  // gamma * invstd
      if (beta.defined()) b[c] = beta.const_data_ptr<acc_t>()[c];
    }
    const SplitMean<acc_t> m(pmean, C);
    for_each_row<acc_t>(y.mutable_data_ptr<scalar_t>(), R, C,
                 [C, px = x.const_data_ptr<scalar_t>(), hi = m.hi.data(), lo = m.lo.data(), pa = a.data(),
                  pb = b.data()](int64_t r, int64_t j, int64_t n) {
                   // y = (x - mean) * a + beta
                   return at::vec::fmadd(centered(px + r * C + j, hi, lo, j, n), Vec::loadu(pa + j, n),
                                         Vec::loadu(pb + j, n));
                 });
  });
  return {from_rows(y, input), mean, invstd, var};
}

// Per channel, sum(dy) at [0, C) and sum(dy * (x - mean)) at [C, 2C), in fp64.
template <typename T>
std::vector<double> grad_sums(const T* px, const T* pdy, const double* pmean, int64_t R, int64_t C) {
  return column_sums<2>(Tiles(R, C), [&](int64_t r, int64_t c) {
    const double g = static_cast<double>(pdy[r * C + c]);
    return std::array<double, 2>{g, g * (static_cast<double>(px[r * C + c]) - pmean[c])};  // dy, dy * (x - mean)
  });
}

// dx of rows x, dy from the sums of grad_sums over all n values of each channel (n = 0: eval mode,
// where the statistics are constants). dx = k1*dy + k2*(x - mean) + k3.
template <typename S, typename T = at::opmath_type<S>>
void grad_input(const S* px, const S* pdy, const double* pmean, const T* pinvstd, const T* pgamma,
                const double* sums, double n, bool unbiased, int64_t R, int64_t C, S* pdx) {
  using Vec = Vectorized<T>;
  std::vector<T> k1(C), k2(C, T(0)), k3(C, T(0));
  const double f = unbiased ? n / (n - 1) : 1.0;
  for (int64_t c = 0; c < C; ++c) {
    const double sum_dy = sums[c], sum_dy_xmu = sums[C + c], invstd = pinvstd[c];
    const double gamma_invstd = (pgamma ? pgamma[c] : 1.0) * invstd;
    k1[c] = static_cast<T>(gamma_invstd);
    if (n > 0) {  // dx = gamma*invstd/n * (n*dy - sum(dy) - f * xhat * sum(dy*xhat))
      k2[c] = static_cast<T>(-gamma_invstd * invstd * invstd * sum_dy_xmu * f / n);
      k3[c] = static_cast<T>(-gamma_invstd * sum_dy / n);
    }
  }
  if (n == 0) {  // eval: dx = k1 * dy alone, as 0 * (x - mean) would be NaN for x = inf
    for_each_row<T>(pdx, R, C, [C, pdy, pk1 = k1.data()](int64_t r, int64_t j, int64_t len) {
      return Vec::loadu(pk1 + j, len) * load_acc<T>(pdy + r * C + j, len);
    });
    return;
  }
  const SplitMean<T> m(pmean, C);
  for_each_row<T>(pdx, R, C,
               [C, px, pdy, hi = m.hi.data(), lo = m.lo.data(), pk1 = k1.data(), pk2 = k2.data(),
                pk3 = k3.data()](int64_t r, int64_t j, int64_t len) {
                 const Vec d = centered(px + r * C + j, hi, lo, j, len);
                 return at::vec::fmadd(Vec::loadu(pk1 + j, len), load_acc<T>(pdy + r * C + j, len),
                                       at::vec::fmadd(Vec::loadu(pk2 + j, len), d, Vec::loadu(pk3 + j, len)));
               });
}

// The backward ops' common arguments: grad_out and input as rows in the input's dtype, the fp64
// mean, and the compute dtype acc.
struct BackwardRows {
  Tensor x, dy, mean;
  at::ScalarType acc;
  BackwardRows(const char* op, const Tensor& grad_out, const Tensor& input, const Tensor& mean_) {
    check_input(op, input);
    TORCH_CHECK_VALUE(grad_out.sizes() == input.sizes(), op, ": grad_out has shape ", grad_out.sizes(),
                      " but input ", input.sizes());
    check_channels(op, "mean", mean_, input.size(1));
    acc = at::toOpMathType(input.scalar_type());
    x = to_rows(input);
    dy = to_rows(grad_out.to(input.scalar_type()));
    mean = mean_.to(at::kDouble).contiguous();
  }
};

// grad_input, grad_weight, grad_bias (the last two in fp32, fp64 for fp64 input) from the mean
// (fp64) and invstd the forward normalised with.
std::tuple<Tensor, Tensor, Tensor> batch_norm_backward(const Tensor& grad_out, const Tensor& input,
                                                       const Tensor& mean, const Tensor& invstd,
                                                       const std::optional<Tensor>& weight, bool training,
                                                       bool unbiased) {
  constexpr const char* op = "batch_norm_backward";
  const BackwardRows b(op, grad_out, input, mean);
  const int64_t R = b.x.size(0), C = input.size(1);
  check_channels(op, "invstd", invstd, C);
  check_channels(op, "weight", weight, C);
  TORCH_CHECK_VALUE(!training || R > 1, op, ": expected more than 1 value per channel when training");
  const Tensor inv = per_channel(invstd, b.acc), gamma = per_channel(weight, b.acc);
  Tensor dx = empty_huge({R, C}, b.x.options()), grad_weight = at::empty({C}, b.x.options().dtype(b.acc)),
         grad_bias = at::empty({C}, grad_weight.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *px = b.x.const_data_ptr<scalar_t>(), *pdy = b.dy.const_data_ptr<scalar_t>();
    const acc_t* pinv = inv.const_data_ptr<acc_t>();
    const double* pmean = b.mean.const_data_ptr<double>();
    const std::vector<double> sums = grad_sums(px, pdy, pmean, R, C);
    for (int64_t c = 0; c < C; ++c) {
      grad_weight.mutable_data_ptr<acc_t>()[c] = static_cast<acc_t>(sums[C + c] * pinv[c]);  // sum(dy * xhat)
      grad_bias.mutable_data_ptr<acc_t>()[c] = static_cast<acc_t>(sums[c]);                  // sum(dy)
    }
    grad_input(px, pdy, pmean, pinv, gamma.defined() ? gamma.const_data_ptr<acc_t>() : nullptr, sums.data(),
               training ? R : 0, unbiased, R, C, dx.mutable_data_ptr<scalar_t>());
  });
  return {from_rows(dx, input), grad_weight, grad_bias};
}

// The statistics of this process's share of a batch split over processes: per channel the mean and
// m2 = sum((x - mean)^2), both fp64 (zeros for no rows).
std::tuple<Tensor, Tensor> batch_norm_stats(const Tensor& input) {
  check_input("batch_norm_stats", input);
  const Tensor x = to_rows(input);
  const int64_t R = x.size(0), C = input.size(1);
  Tensor mean = at::empty({C}, x.options().dtype(at::kDouble)), m2 = at::empty({C}, mean.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_stats", [&] {
    mean_and_m2(x.const_data_ptr<scalar_t>(), Tiles(R, C), mean.mutable_data_ptr<double>(),
                m2.mutable_data_ptr<double>());
  });
  return {mean, m2};
}

// This process's sum(dy) and sum(dy * (x - mean)) per channel, fp64, to be summed over processes.
std::tuple<Tensor, Tensor> batch_norm_backward_reduce(const Tensor& grad_out, const Tensor& input,
                                                      const Tensor& mean) {
  const BackwardRows b("batch_norm_backward_reduce", grad_out, input, mean);
  const int64_t R = b.x.size(0), C = input.size(1);
  Tensor sum_dy = at::empty({C}, b.mean.options()), sum_dy_xmu = at::empty({C}, b.mean.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.x.scalar_type(), "batch_norm_backward_reduce", [&] {
    const std::vector<double> s = grad_sums(b.x.const_data_ptr<scalar_t>(), b.dy.const_data_ptr<scalar_t>(),
                                            b.mean.const_data_ptr<double>(), R, C);
    std::copy(s.begin(), s.begin() + C, sum_dy.mutable_data_ptr<double>());
    std::copy(s.begin() + C, s.end(), sum_dy_xmu.mutable_data_ptr<double>());
  });
  return {sum_dy, sum_dy_xmu};
}

// grad_input of this process's rows from the sums over all processes and their total count.
Tensor batch_norm_backward_elemt(const Tensor& grad_out, const Tensor& input, const Tensor& mean,
                                 const Tensor& invstd, const std::optional<Tensor>& weight, const Tensor& sum_dy,
                                 const Tensor& sum_dy_xmu, int64_t count, bool unbiased) {
  constexpr const char* op = "batch_norm_backward_elemt";
  const BackwardRows b(op, grad_out, input, mean);
  const int64_t R = b.x.size(0), C = input.size(1);
  check_channels(op, "invstd", invstd, C);
  check_channels(op, "weight", weight, C);
  check_channels(op, "sum_dy", sum_dy, C);
  check_channels(op, "sum_dy_xmu", sum_dy_xmu, C);
  TORCH_CHECK_VALUE(count > 1 && count >= R, op, ": count must be more than 1 and at least the ", R,
                    " values per channel here, got ", count);
  const Tensor inv = per_channel(invstd, b.acc), gamma = per_channel(weight, b.acc);
  const Tensor sums = at::cat({sum_dy.to(at::kDouble), sum_dy_xmu.to(at::kDouble)});
  Tensor dx = empty_huge({R, C}, b.x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    grad_input(b.x.const_data_ptr<scalar_t>(), b.dy.const_data_ptr<scalar_t>(), b.mean.const_data_ptr<double>(),
               inv.const_data_ptr<acc_t>(), gamma.defined() ? gamma.const_data_ptr<acc_t>() : nullptr,
               sums.const_data_ptr<double>(), count, unbiased, R, C, dx.mutable_data_ptr<scalar_t>());
  });
  return from_rows(dx, input);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedops, CPU, m) {
  m.impl("batch_norm_forward", &batch_norm_forward);
  m.impl("batch_norm_backward", &batch_norm_backward);
  m.impl("batch_norm_stats", &batch_norm_stats);
  m.impl("batch_norm_backward_reduce", &batch_norm_backward_reduce);
  m.impl("batch_norm_backward_elemt", &batch_norm_backward_elemt);
}

}  // namespace fusedops
