// Fused batch norm on CPU: statistics over the batch (and positions) of each channel, with the
// residual add and relu of a residual block fused into the same passes.
//   training: mean = sum(x) / n,  var = sum((x - mean)^2) / (n or n-1),  invstd = 1 / sqrt(var + eps)
//   eval:     mean, var = running_mean, running_var
//   forward:  out = act(y + residual),  y = (x - mean) * a + beta,  a = gamma * invstd,  act = relu or none
//   backward: dz = dy, or with the relu's output dz = dy where out > 0 and 0 where out <= 0 (as torch's
//             relu backward: a NaN output passes dy); grad_residual = dz
//             dbeta = sum(dz),  dgamma = sum(dz * xhat),  xhat = (x - mean) * invstd
//             dx = gamma*invstd/n * (n*dz - sum(dz) - f * xhat * sum(dz*xhat))   (f = n/(n-1) if unbiased)
//             eval: dx = dz * gamma * invstd (the statistics are constants)
// A batch split over processes (SyncBatchNorm) takes the same steps as separate ops, a collective
// between each two: batch_norm_stats, then batch_norm_forward given the combined statistics as
// running ones; batch_norm_backward_reduce, then batch_norm_backward_elemt given the summed sums.
// Input (N, C, *), n = N * L values per channel (L = the product of *, 1 for (N, C)), is read in
// place in one of two access patterns:
//   rows: channels-last storage, and any input with L == 1: a (N*L, C) matrix with C contiguous;
//         vector lanes along C, the per-channel values loaded lane by lane;
//   NCL:  contiguous storage: per channel, N runs of L contiguous values; vector lanes along L, the
//         per-channel values broadcast over a run (blended lane by lane in a vector across two runs).
// Other strided input is copied to contiguous first; residual, grad_out and output are copied to the
// input's layout when stored in another. Outputs (out, grad_input, grad_residual) take the input's layout.
// Forward: one reduction pass (training) and one elementwise pass; backward: one reduction pass and
// one elementwise pass (which also writes grad_residual).
// Reductions: fp64 sums over chunks of rows or runs fixed by the shape (not by the thread count), each
// chunk into its own partial buffer, merged in chunk order; terms of fp16/bf16 data first summed in
// fp32 over 16 vectors or rows. The statistics are sums shifted by a value of each channel.
// Elementwise passes in fp32 (fp64 for fp64 input; fp16/bf16 converted lane by lane), the fp64 mean
// applied as hi + lo, two floats of that precision.
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
#include <type_traits>
#include <vector>

#include "huge_pages.h"
#include "vec_math.h"

namespace fusedops {
namespace {

using at::Tensor;
using at::vec::Vectorized;
using VecD = Vectorized<double>;

constexpr int64_t kColumnBlock = 1024;  // rows: channels of one reduction task, its partials stay in L1
constexpr int64_t kChunkRows = 256;     // rows: rows per chunk of a reduction, at least ...
constexpr int64_t kChunkValues = 2048;  // NCL: values per channel in a chunk of runs, at least ...
constexpr int64_t kMaxChunks = 32;      // ... and at most this many chunks
constexpr int64_t kTaskValues = 16384;  // NCL: values of one reduction task (its channels), at least
constexpr int64_t kShortSum = 16;       // vectors or rows a reduction sums in registers (see kFp32Sums)
constexpr int64_t kPassValues = 32768;  // values of one elementwise task, at least

// Input (N, C, *) as the kernels read it: n = N * L values per channel, rows or NCL.
struct Shape {
  int64_t N, C, L;
  bool rows;
  explicit Shape(const Tensor& x) : N(x.size(0)), C(x.size(1)), L(1) {
    for (int64_t d = 2; d < x.dim(); ++d) L *= x.size(d);
    rows = L == 1 || !x.is_contiguous();
  }
  int64_t values() const { return N * L; }
};

// The (chunk of rows, block of columns) tasks of a reduction over the rows of a (rows, cols) problem:
// the rows of a matrix (rows pattern), or the N runs of each channel (NCL). The chunks are a function
// of the shape alone.
struct Tiles {
  int64_t rows, cols, chunks, chunk_rows, block, blocks;
  explicit Tiles(const Shape& s)
      : rows(s.rows ? s.values() : s.N), cols(s.C),
        chunks(std::clamp<int64_t>(s.rows ? rows / kChunkRows : s.values() / kChunkValues, 1,
                                   std::max<int64_t>(1, std::min(rows, kMaxChunks)))),
        chunk_rows((rows + chunks - 1) / chunks),
        block(s.rows ? kColumnBlock
                     : std::clamp<int64_t>(kTaskValues / std::max<int64_t>(1, chunk_rows * s.L), 1,
                                           std::max<int64_t>(1, cols))),
        blocks((cols + block - 1) / block) {}
  int64_t row_begin(int64_t k) const { return std::min(rows, k * chunk_rows); }
  int64_t row_end(int64_t k) const { return std::min(rows, (k + 1) * chunk_rows); }

  // f(chunk, first row, end row, first column, end column) for every task, tasks in parallel.
  template <typename F>
  void for_each_task(const F& f) const {
    at::parallel_for(0, chunks * blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t k = task / blocks, c0 = task % blocks * block;
        f(k, row_begin(k), row_end(k), c0, std::min(cols, c0 + block));
      }
    });
  }
};

// Two sums per channel over all n values, fp64: sum s of channel c at s * C + c. Each task
// f(r0, r1, c0, c1, acc, stride) adds its rows (or runs) [r0, r1) of channels [c0, c1) into
// acc[s * stride + c], its chunk's zeroed slot of a partial buffer; then the chunks are added in order.
template <typename F>
std::vector<double> channel_sums(const Shape& s, const F& f) {
  const Tiles t(s);
  const int64_t C = t.cols;
  std::vector<double> partial(t.chunks * 2 * C, 0.0), total(2 * C, 0.0);
  t.for_each_task([&](int64_t k, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
    f(r0, r1, c0, c1, partial.data() + k * 2 * C, C);
  });
  for (int64_t k = 0; k < t.chunks; ++k) {
    for (int64_t i = 0; i < 2 * C; ++i) total[i] += partial[k * 2 * C + i];
  }
  return total;
}

// A reduction's terms are summed in registers over kShortSum vectors (NCL) or rows (rows pattern)
// before they are added to fp64 sums: in fp32 for fp16/bf16 data (fp32 holds their differences
// exactly and their products to 2^-24, far below their own precision), else in fp64.
template <typename T>
constexpr bool kFp32Sums = at::vec::is_reduced_floating_point_v<T>;

// The scalar type and the vector accumulators of those sums, one Vectorized<acc_t> of values at a
// time: fp32 for fp16/bf16 data, else fp64 vectors (two for fp32 data).
template <typename T>
using SumScalar = std::conditional_t<kFp32Sums<T>, float, double>;
template <typename T>
using SumLanes = std::conditional_t<kFp32Sums<T>, std::array<Vectorized<float>, 1>, Fp64Lanes<at::opmath_type<T>>>;

// The values of a per-channel array for the lanes of one Vectorized<acc_t> of data from channel c on:
// one channel's, broadcast (NCL), or those of channels c, c+1, ... (rows); as fp32 or fp64 vectors.
template <bool rows, typename acc_t>
struct ChannelLanes {
  int64_t c;
  Vectorized<float> operator()(const float* a) const {
    return rows ? Vectorized<float>::loadu(a + c) : Vectorized<float>(a[c]);
  }
  Fp64Lanes<acc_t> operator()(const double* a) const {
    Fp64Lanes<acc_t> v;
    for (size_t p = 0; p < v.size(); ++p) v[p] = rows ? VecD::loadu(a + c + p * VecD::size()) : VecD(a[c]);
    return v;
  }
};

// Zeroed accumulators
template <typename T>
SumLanes<T> zero_sums() {
  SumLanes<T> z;
  z.fill(typename SumLanes<T>::value_type(0));
  return z;
}

// Two fp64 sums per channel over all n values of x: sum s of channel c at s * C + c, in
// channel_sums' tasks. vector(i, lanes, s1, s2) adds the terms of the whole vector of values from
// element i into s1, s2 (SumLanes<T>), lanes(array) giving a per-channel array's values for its lanes
// (ChannelLanes); term(i, c, U{}) gives those of one value (of channel c) in U, fp32 or fp64.

// Rows: tiles of kShortSum rows; in a tile, G vectors of columns at a time, summed in registers over
// its rows (the tile is read from L1 after its first block), then added into the task's fp64 sums;
// term for the columns past the last whole vector.
template <typename T, typename Vector, typename Term>
std::vector<double> row_sums(const Shape& s, const Vector& vector, const Term& term) {
  using acc_t = at::opmath_type<T>;
  using Sums = SumLanes<T>;
  using U = SumScalar<T>;
  constexpr int64_t W = Vectorized<acc_t>::size();
  constexpr int64_t G = 4 / std::tuple_size_v<Sums>;  // 8 accumulator vectors (more would spill)
  return channel_sums(s, [&](int64_t r0, int64_t r1, int64_t c0, int64_t c1, double* acc, int64_t stride) {
    const int64_t C = s.C;
    // a[0, W) += the lanes of sums, in order
    const auto add = [](const Sums& sums, double* a) {
      Fp64Lanes<acc_t> v;
      if constexpr (kFp32Sums<T>) {
        v = to_fp64(sums[0]);
      } else {
        v = sums;
      }
      for (size_t p = 0; p < v.size(); ++p) (VecD::loadu(a + p * VecD::size()) + v[p]).store(a + p * VecD::size());
    };
    // the n vectors of columns [c, c + n W) of rows [r, r_end), n a compile-time count
    const auto block = [&](auto n, int64_t r, int64_t r_end, int64_t c) {
      std::array<Sums, decltype(n)::value> s1, s2;
      s1.fill(zero_sums<T>());
      s2.fill(zero_sums<T>());
      for (int64_t q = r; q < r_end; ++q) {
        for (int64_t g = 0; g < n; ++g) vector(q * C + c + g * W, ChannelLanes<true, acc_t>{c + g * W}, s1[g], s2[g]);
      }
      for (int64_t g = 0; g < n; ++g) {
        add(s1[g], acc + c + g * W);
        add(s2[g], acc + stride + c + g * W);
      }
    };
    for (int64_t r = r0; r < r1; r += kShortSum) {
      const int64_t r_end = std::min(r1, r + kShortSum);
      int64_t c = c0;
      for (; c + G * W <= c1; c += G * W) block(std::integral_constant<int64_t, G>{}, r, r_end, c);
      for (; c + W <= c1; c += W) block(std::integral_constant<int64_t, 1>{}, r, r_end, c);
      for (; c < c1; ++c) {
        U u1 = 0, u2 = 0;
        for (int64_t q = r; q < r_end; ++q) {
          const std::array<U, 2> t = term(q * C + c, c, U{});
          u1 += t[0];
          u2 += t[1];
        }
        acc[c] += u1;
        acc[stride + c] += u2;
      }
    }
  });
}

// NCL: per channel of a task, over its runs, alternate vectors into two sets of accumulators (hiding
// the adds' latency) held in registers (fp32 ones for fp16/bf16 data, added into fp64 ones every
// kShortSum vectors), term (in fp64) for the runs' tails; added in a fixed order at the end.
template <typename T, typename Vector, typename Term>
std::vector<double> run_sums(const Shape& s, const Vector& vector, const Term& term) {
  using acc_t = at::opmath_type<T>;
  using Sums = SumLanes<T>;
  constexpr int64_t W = Vectorized<acc_t>::size();
  return channel_sums(s, [&](int64_t r0, int64_t r1, int64_t c0, int64_t c1, double* acc, int64_t stride) {
    const int64_t C = s.C, L = s.L;
    for (int64_t c = c0; c < c1; ++c) {
      const ChannelLanes<false, acc_t> lanes{c};
      Fp64Lanes<acc_t> d1, d2;  // the fp64 sums
      d1.fill(VecD(0.0));
      d2.fill(VecD(0.0));
      Sums s1a = zero_sums<T>(), s2a = s1a, s1b = s1a, s2b = s1a;  // sets 0 and 1, fp32 or fp64
      std::array<double, 2> t{};                                   // the runs' tails
      int64_t pending = 0;                                         // vectors in fp32 sets
      const auto flush = [&] {  // fp32 sets into the fp64 sums
        if constexpr (kFp32Sums<T>) {
          const Fp64Lanes<acc_t> u1 = to_fp64(s1a[0] + s1b[0]), u2 = to_fp64(s2a[0] + s2b[0]);
          for (size_t p = 0; p < d1.size(); ++p) {
            d1[p] = d1[p] + u1[p];
            d2[p] = d2[p] + u2[p];
          }
          s1a = s2a = s1b = s2b = zero_sums<T>();
          pending = 0;
        }
      };
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t i = (r * C + c) * L;
        int64_t j = 0;
        for (; j + 2 * W <= L; j += 2 * W) {
          vector(i + j, lanes, s1a, s2a);
          vector(i + j + W, lanes, s1b, s2b);
          if constexpr (kFp32Sums<T>) {
            if ((pending += 2) >= kShortSum) flush();
          }
        }
        if (j + W <= L) {
          vector(i + j, lanes, s1a, s2a);
          j += W;
          ++pending;
        }
        for (; j < L; ++j) {
          const std::array<double, 2> u = term(i + j, c, 0.0);
          t[0] += u[0];
          t[1] += u[1];
        }
      }
      if constexpr (kFp32Sums<T>) {
        flush();
      } else {
        for (size_t p = 0; p < d1.size(); ++p) {
          d1[p] = s1a[p] + s1b[p];
          d2[p] = s2a[p] + s2b[p];
        }
      }
      alignas(64) double buf[2][W];
      for (size_t p = 0; p < d1.size(); ++p) {
        d1[p].store(buf[0] + p * VecD::size());
        d2[p].store(buf[1] + p * VecD::size());
      }
      for (int k = 0; k < 2; ++k) {
        for (int64_t q = 0; q < W; ++q) t[k] += buf[k][q];
        acc[k * stride + c] += t[k];
      }
    }
  });
}

// row_sums or run_sums, by x's access pattern
template <typename T, typename Vector, typename Term>
std::vector<double> pair_sums(const Shape& s, const Vector& vector, const Term& term) {
  return s.rows ? row_sums<T>(s, vector, term) : run_sums<T>(s, vector, term);
}

// Per channel, k: a value of the channel (its first), 0 when not finite or when there are no values.
template <typename T>
std::vector<double> shifts(const T* x, const Shape& s) {
  std::vector<double> k(s.C, 0.0);
  if (s.values() == 0) return k;
  for (int64_t c = 0; c < s.C; ++c) {
    const double v = static_cast<double>(x[s.rows ? c : c * s.L]);
    k[c] = std::isfinite(v) ? v : 0.0;
  }
  return k;
}

// Per channel: mean and m2 = sum((x - mean)^2), fp64, from sums shifted by k, a value of the channel:
//   s1 = sum(x - k), s2 = sum((x - k)^2);  mean = k + s1/n,  m2 = s2 - s1^2/n
// (k among the values keeps s2 - s1^2/n from cancelling when |mean| >> std). An infinite value gives
// mean +-inf and m2 NaN, as PyTorch. Zeros for no values.
template <typename T>
void mean_and_m2(const T* x, const Shape& s, double* mean, double* m2) {
  using acc_t = at::opmath_type<T>;
  const std::vector<double> k = shifts(x, s);
  const double* pk = k.data();
  const int64_t C = s.C;
  const std::vector<float> kf(k.begin(), k.end());  // fp16/bf16 data: k exactly
  const std::vector<double> sums = pair_sums<T>(
      s,
      [x, pk, pkf = kf.data()](int64_t i, const auto& lanes, SumLanes<T>& s1, SumLanes<T>& s2) {
        if constexpr (kFp32Sums<T>) {  // s1 += x - k, s2 += (x - k)^2
          const Vectorized<float> d = load_acc<float>(x + i) - lanes(pkf);
          s1[0] = s1[0] + d;
          s2[0] = at::vec::fmadd(d, d, s2[0]);
        } else {
          const auto v = load_fp64<acc_t>(x + i), k = lanes(pk);
          for (size_t p = 0; p < v.size(); ++p) {
            const VecD d = v[p] - k[p];
            s1[p] = s1[p] + d;
            s2[p] = at::vec::fmadd(d, d, s2[p]);
          }
        }
      },
      [x, pk, pkf = kf.data()](int64_t i, int64_t c, auto zero) {
        using U = decltype(zero);
        const U d = static_cast<U>(x[i]) - (std::is_same_v<U, float> ? pkf[c] : pk[c]);
        return std::array<U, 2>{d, d * d};
      });
  const double n = static_cast<double>(s.values());
  for (int64_t c = 0; c < C; ++c) {
    if (n == 0) {
      mean[c] = m2[c] = 0.0;
      continue;
    }
    const double s1 = sums[c], s2 = sums[C + c], m = s2 - s1 * s1 / n;
    mean[c] = k[c] + s1 / n;
    m2[c] = m < 0 ? 0.0 : m;  // rounding may leave a tiny negative; NaN stays NaN
  }
}

// The stores of an elementwise pass: y[o][i, i + len) = f(i, len, p)[o] for one vector (p the
// coefficients of its lanes), or for two whole ones stored together (fp16/bf16 rounded in one
// conversion). Each thread runs its own copy, whose pointers then stay in registers (a vector store may
// alias any memory, so a pointer read through a reference is read again).
template <typename acc_t, typename S, size_t K, size_t O, typename F>
struct Stores {
  using Vec = Vectorized<acc_t>;
  using Coef = std::array<Vec, K>;
  F f;
  std::array<S*, O> y;
  void one(int64_t i, int64_t len, const Coef& p) const {
    const std::array<Vec, O> v = f(i, len, p);
    for (size_t o = 0; o < O; ++o) store_acc<acc_t>(y[o] + i, v[o], len);
  }
  void two(int64_t i, const Coef& p0, const Coef& p1) const {
    const std::array<Vec, O> v0 = f(i, Vec::size(), p0), v1 = f(i + Vec::size(), Vec::size(), p1);
    for (size_t o = 0; o < O; ++o) store_acc2<acc_t>(y[o] + i, v0[o], v1[o]);
  }
};

// The elementwise passes: outs[o][i, i + len) = f(i, len, p)[o] over every element of the full-size
// tensors (all in x's layout), in vectors: len <= the vector size, p[j] = per-channel array coef[j] at
// those elements' channels (rows: loaded lane by lane; NCL: broadcast over each run); two at a time
// where they fit. In parallel. f should capture raw pointers by value (see Stores).
template <typename acc_t, typename S, size_t K, size_t O, typename F>
void for_each_vector(const Shape& s, const std::array<const acc_t*, K>& coef, const std::array<S*, O>& outs,
                     const F& f) {
  using Vec = Vectorized<acc_t>;
  using Coef = std::array<Vec, K>;
  constexpr int64_t W = Vec::size();
  if (s.rows) {
    at::parallel_for(0, s.values(), std::max<int64_t>(1, kPassValues / std::max<int64_t>(s.C, 1)),
                     [&](int64_t begin, int64_t end) {
                       const Stores<acc_t, S, K, O, F> out{f, outs};  // locals from here on (see Stores)
                       const std::array<const acc_t*, K> a = coef;
                       const int64_t C = s.C;
                       Coef p0, p1;
                       for (int64_t r = begin; r < end; ++r) {
                         int64_t j = 0;
                         for (; j + 2 * W <= C; j += 2 * W) {
                           for (size_t q = 0; q < K; ++q) {
                             p0[q] = Vec::loadu(a[q] + j);
                             p1[q] = Vec::loadu(a[q] + j + W);
                           }
                           out.two(r * C + j, p0, p1);
                         }
                         for (; j < C; j += W) {
                           const int64_t len = std::min(W, C - j);
                           for (size_t q = 0; q < K; ++q) p0[q] = Vec::loadu(a[q] + j, len);
                           out.one(r * C + j, len, p0);
                         }
                       }
                     });
    return;
  }
  // NCL: tasks over ranges of whole vectors of the flat tensor, runs (n, c) in storage order; a vector
  // across the end of a run takes each lane's channel's values (blended run by run), so that there is
  // no partial vector but the tensor's last
  const int64_t total = s.values() * s.C;
  at::parallel_for(0, (total + W - 1) / W, std::max<int64_t>(1, kPassValues / W), [&](int64_t begin, int64_t end) {
    const Stores<acc_t, S, K, O, F> out{f, outs};
    const std::array<const acc_t*, K> a = coef;
    const int64_t C = s.C, L = s.L, i_end = std::min(total, end * W);
    int64_t i = begin * W, run = i / L, run_end = (run + 1) * L, c = run % C;
    Coef p, q;
    const auto next_run = [&] {  // run, run_end, c and p for the run after this one
      ++run;
      run_end += L;
      c = c + 1 == C ? 0 : c + 1;
      for (size_t k = 0; k < K; ++k) p[k] = Vec(a[k][c]);
    };
    for (size_t k = 0; k < K; ++k) p[k] = Vec(a[k][c]);
    while (i < i_end) {  // here run holds element i
      const int64_t stop = std::min(run_end, i_end);
      for (; i + 2 * W <= stop; i += 2 * W) out.two(i, p, p);
      if (i + W <= stop) {
        out.one(i, W, p);
        i += W;
      }
      if (i < stop) {  // a vector across run_end, or the last of the tensor
        const int64_t n = std::min(W, i_end - i);
        q = p;
        while (run_end < i + n) {  // lanes from run_end - i on: the next run's
          const int64_t lane = run_end - i;
          next_run();
          for (size_t k = 0; k < K; ++k) q[k] = Vec::set(p[k], q[k], lane);
        }
        out.one(i, n, q);
        i += n;
      }
      if (i == run_end) next_run();
    }
  });
}

// f(std::bool_constant<flag>{}): a run-time flag made a compile-time one
template <typename F>
void with_flag(bool flag, const F& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
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

// Input as the kernels read it: itself when contiguous or channels-last, else a contiguous copy.
Tensor readable(const Tensor& input) {
  if (input.is_contiguous() || input.movedim(1, -1).is_contiguous()) return input;
  return input.contiguous();
}

// t (shaped like x) in x's layout and dtype: itself when it is so already, else a copy.
Tensor in_layout_of(const Tensor& t, const Tensor& x) {
  const Tensor u = t.to(x.scalar_type());
  if (x.is_contiguous()) return u.contiguous();
  return u.movedim(1, -1).contiguous().movedim(-1, 1);  // channels-last
}

// An uninitialised tensor shaped like x in x's layout (x contiguous or channels-last).
Tensor empty_in_layout_of(const Tensor& x) {
  if (x.numel() == 0) return at::empty_like(x);  // no element says which layout: its strides' (preserve_format)
  if (x.is_contiguous()) return empty_huge(x.sizes(), x.options());
  return empty_huge(x.movedim(1, -1).sizes(), x.options()).movedim(-1, 1);
}

// A per-channel tensor as a contiguous one of `dtype`, or undefined for None.
Tensor per_channel(const std::optional<Tensor>& t, at::ScalarType dtype) {
  return t.has_value() ? t->to(dtype).contiguous() : Tensor();
}

void check_input(const char* op, const Tensor& input) {
  TORCH_CHECK_VALUE(input.dim() >= 2, op, ": input must be (N, C, *), got ", input.dim(), "-D input of shape ",
                    input.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(input.scalar_type()), op, ": input must be floating point, got ",
                    input.scalar_type());
}

void check_like_input(const char* op, const char* name, const Tensor& t, const Tensor& input) {
  TORCH_CHECK_VALUE(t.sizes() == input.sizes(), op, ": ", name, " has shape ", t.sizes(), " but input ",
                    input.sizes());
}

void check_channels(const char* op, const char* name, const std::optional<Tensor>& t, int64_t C) {
  TORCH_CHECK_VALUE(!t.has_value() || (t->dim() == 1 && t->size(0) == C), op, ": ", name,
                    " must have shape (", C, ",) for input with ", C, " channels, got ",
                    t.has_value() ? t->sizes() : at::IntArrayRef{});
}

void check_training_values(const char* op, bool training, const Tensor& input) {
  const int64_t n = Shape(input).values();
  TORCH_CHECK_VALUE(!training || n != 1, op, ": expected more than 1 value per channel when training, got input ",
                    "of shape ", input.sizes());
}

// out = act((x - mean) * a + b + residual), the elementwise pass of the forward
template <typename T, typename acc_t = at::opmath_type<T>>
void normalize(const T* x, const double* mean, const acc_t* a, const acc_t* b, const T* residual, bool relu,
               const Shape& s, T* out) {
  using Vec = Vectorized<acc_t>;
  const SplitMean<acc_t> m(mean, s.C);
  const std::array<const acc_t*, 4> coef{m.hi.data(), m.lo.data(), a, b};
  with_flag(residual != nullptr, [&](auto has_residual) {
    with_flag(relu, [&](auto has_relu) {
      for_each_vector(s, coef, std::array<T*, 1>{out},
                      [x, residual, has_residual, has_relu](int64_t i, int64_t len, const std::array<Vec, 4>& p) {
                        // (x - mean) * a + b
                        Vec y = at::vec::fmadd((load_acc<acc_t>(x + i, len) - p[0]) - p[1], p[2], p[3]);
                        if constexpr (has_residual) y = y + load_acc<acc_t>(residual + i, len);  // + residual
                        if constexpr (has_relu) y = at::vec::clamp_min(y, Vec(0));  // relu, NaN stays NaN
                        return std::array<Vec, 1>{y};
                      });
    });
  });
}

// out, mean (fp64), invstd, var. Training: the batch's mean, invstd of the biased or unbiased
// variance, and the unbiased variance (for running_var); eval: the running statistics.
std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_forward(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var, bool training,
    bool unbiased, double eps, const std::optional<Tensor>& residual, int64_t activation) {
  constexpr const char* op = "batch_norm_forward";
  check_input(op, input);
  const int64_t C = input.size(1);
  check_channels(op, "weight", weight, C);
  check_channels(op, "bias", bias, C);
  check_channels(op, "running_mean", running_mean, C);
  check_channels(op, "running_var", running_var, C);
  TORCH_CHECK_VALUE(activation == 0 || activation == 1, op, ": activation must be 0 (none) or 1 (relu), got ",
                    activation);
  if (residual.has_value()) {
    check_like_input(op, "residual", *residual, input);
    TORCH_CHECK_VALUE(residual->scalar_type() == input.scalar_type(), op, ": residual has dtype ",
                      residual->scalar_type(), " but input ", input.scalar_type());
  }
  check_training_values(op, training, input);
  const auto acc = at::toOpMathType(input.scalar_type());
  const Tensor x = readable(input);
  const Shape s(x);
  Tensor mean, var, invstd = at::empty({C}, x.options().dtype(acc));
  if (training) {
    mean = at::empty({C}, x.options().dtype(at::kDouble));
    var = at::empty({C}, x.options().dtype(acc));
  } else {
    TORCH_CHECK_VALUE(running_mean.has_value() && running_var.has_value(), op,
                      ": running_mean and running_var are needed when training=False");
    mean = running_mean->to(at::kDouble, /*non_blocking=*/false, /*copy=*/true).contiguous();
    var = running_var->to(acc, /*non_blocking=*/false, /*copy=*/true).contiguous();
  }
  const Tensor gamma = per_channel(weight, acc), beta = per_channel(bias, acc);
  const Tensor res = residual.has_value() ? in_layout_of(*residual, x) : Tensor();
  Tensor out = empty_in_layout_of(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    double* pmean = mean.mutable_data_ptr<double>();
    acc_t *pvar = var.mutable_data_ptr<acc_t>(), *pinvstd = invstd.mutable_data_ptr<acc_t>();
    const double n = static_cast<double>(s.values());
    std::vector<double> m2(C);
    if (training) mean_and_m2(x.const_data_ptr<scalar_t>(), s, pmean, m2.data());
    std::vector<acc_t> a(C), b(C, acc_t(0));
    for (int64_t c = 0; c < C; ++c) {
      if (training) {
        pvar[c] = static_cast<acc_t>(m2[c] / (n - 1));  // running_var always takes the unbiased variance
        pinvstd[c] = static_cast<acc_t>(1.0 / std::sqrt(m2[c] / (unbiased ? n - 1 : n) + eps));
      } else {
        pinvstd[c] = static_cast<acc_t>(1.0 / std::sqrt(static_cast<double>(pvar[c]) + eps));
      }
      a[c] = gamma.defined() ? gamma.const_data_ptr<acc_t>()[c] * pinvstd[c] : pinvstd[c];  // gamma * invstd
      if (beta.defined()) b[c] = beta.const_data_ptr<acc_t>()[c];
    }
    normalize(x.const_data_ptr<scalar_t>(), pmean, a.data(), b.data(),
              res.defined() ? res.const_data_ptr<scalar_t>() : nullptr, activation == 1, s,
              out.mutable_data_ptr<scalar_t>());
  });
  return {out, mean, invstd, var};
}

// dz = dy, or with the relu's output (masked: std::true_type) 0 where out <= 0 (a NaN output passes
// dy, as torch's relu backward); in vector lanes or for one value
template <typename Masked, typename V>
V relu_grad(Masked, const V& dy, const V& out) {
  if constexpr (!Masked::value) {
    return dy;
  } else if constexpr (std::is_floating_point_v<V>) {
    return out <= 0 ? V(0) : dy;
  } else {
    return V::blendv(dy, V(0), out <= V(0));
  }
}

// Per channel, sum(dz) at [0, C) and sum(dz * (x - mean)) at [C, 2C), in fp64; dz = dy masked by
// the relu's output when out is given (else out is null).
template <typename T>
std::vector<double> grad_sums(const T* x, const T* dy, const T* out, const double* mean, const Shape& s) {
  using acc_t = at::opmath_type<T>;
  const int64_t C = s.C;
  const SplitMean<float> m(mean, C);  // fp16/bf16 data: x - mean as (x - hi) - lo in fp32
  std::vector<double> sums;
  with_flag(out != nullptr, [&](auto masked) {
    sums = pair_sums<T>(
        s,
        [x, dy, out, mean, masked, hi = m.hi.data(), lo = m.lo.data()](int64_t i, const auto& lanes, SumLanes<T>& s1,
                                                                       SumLanes<T>& s2) {
          if constexpr (kFp32Sums<T>) {  // s1 += dz, s2 += dz * (x - mean)
            using Vec = Vectorized<float>;
            const Vec g = relu_grad(masked, load_acc<float>(dy + i), masked ? load_acc<float>(out + i) : Vec());
            s1[0] = s1[0] + g;
            s2[0] = at::vec::fmadd(g, (load_acc<float>(x + i) - lanes(hi)) - lanes(lo), s2[0]);
          } else {
            Fp64Lanes<acc_t> g;
            if constexpr (masked) {
              g = to_fp64(relu_grad(masked, load_acc<acc_t>(dy + i), load_acc<acc_t>(out + i)));
            } else {
              g = load_fp64<acc_t>(dy + i);
            }
            const auto v = load_fp64<acc_t>(x + i), m = lanes(mean);
            for (size_t p = 0; p < v.size(); ++p) {
              s1[p] = s1[p] + g[p];
              s2[p] = at::vec::fmadd(g[p], v[p] - m[p], s2[p]);
            }
          }
        },
        [x, dy, out, mean, masked, hi = m.hi.data(), lo = m.lo.data()](int64_t i, int64_t c, auto zero) {
          using U = decltype(zero);
          const U g = relu_grad(masked, static_cast<U>(dy[i]), masked ? static_cast<U>(out[i]) : zero);
          const U d = std::is_same_v<U, float> ? (static_cast<U>(x[i]) - hi[c]) - lo[c]
                                               : static_cast<U>(x[i]) - static_cast<U>(mean[c]);
          return std::array<U, 2>{g, g * d};
        });
  });
  return sums;
}

// dx from the sums of grad_sums over all n values of each channel (n = 0: eval mode, where the
// statistics are constants): dx = k1*dz + k2*(x - mean) + k3, dz = dy masked by the relu's output
// when out is given (else null), written to dz_out too when that is given (else null).
template <typename S, typename T = at::opmath_type<S>>
void grad_input(const S* x, const S* dy, const S* out, const double* mean, const T* invstd, const T* gamma,
                const double* sums, double n, bool unbiased, const Shape& s, S* dx, S* dz_out) {
  using Vec = Vectorized<T>;
  const int64_t C = s.C;
  std::vector<T> k1(C), k2(C, T(0)), k3(C, T(0));
  const double f = unbiased ? n / (n - 1) : 1.0;
  for (int64_t c = 0; c < C; ++c) {
    const double sum_dz = sums[c], sum_dz_xmu = sums[C + c], inv = invstd[c];
    const double gamma_invstd = (gamma ? gamma[c] : 1.0) * inv;
    k1[c] = static_cast<T>(gamma_invstd);
    if (n > 0) {  // dx = gamma*invstd/n * (n*dz - sum(dz) - f * xhat * sum(dz*xhat))
      k2[c] = static_cast<T>(-gamma_invstd * inv * inv * sum_dz_xmu * f / n);
      k3[c] = static_cast<T>(-gamma_invstd * sum_dz / n);
    }
  }
  const SplitMean<T> m(mean, C);
  const std::array<const T*, 5> coef{k1.data(), k2.data(), k3.data(), m.hi.data(), m.lo.data()};
  with_flag(out != nullptr, [&](auto masked) {
    with_flag(n > 0, [&](auto training) {
      const auto dx_of = [x, dy, out, masked, training](int64_t i, int64_t len, const std::array<Vec, 5>& p) {
        const Vec dz = relu_grad(masked, load_acc<T>(dy + i, len), masked ? load_acc<T>(out + i, len) : Vec());
        if constexpr (training) {  // dx = k1 * dz + k2 * (x - mean) + k3
          const Vec d = (load_acc<T>(x + i, len) - p[3]) - p[4];
          return std::array<Vec, 2>{at::vec::fmadd(p[0], dz, at::vec::fmadd(p[1], d, p[2])), dz};
        } else {  // eval: dx = k1 * dz alone, as 0 * (x - mean) would be NaN for x = inf
          return std::array<Vec, 2>{p[0] * dz, dz};
        }
      };
      if (dz_out != nullptr) {  // dx and dz
        for_each_vector(s, coef, std::array<S*, 2>{dx, dz_out}, dx_of);
      } else {
        for_each_vector(s, coef, std::array<S*, 1>{dx}, [dx_of](int64_t i, int64_t len, const std::array<Vec, 5>& p) {
          return std::array<Vec, 1>{dx_of(i, len, p)[0]};
        });
      }
    });
  });
}

// The backward ops' common arguments: input as the kernels read it, grad_out (and the relu's output)
// in its layout and dtype, the fp64 mean, and the compute dtype acc.
struct BackwardArgs {
  Tensor x, dy, out, mean;
  at::ScalarType acc;
  BackwardArgs(const char* op, const Tensor& grad_out, const Tensor& input, const Tensor& mean_,
               const std::optional<Tensor>& output = std::nullopt) {
    check_input(op, input);
    check_like_input(op, "grad_out", grad_out, input);
    if (output.has_value()) check_like_input(op, "output", *output, input);
    check_channels(op, "mean", mean_, input.size(1));
    acc = at::toOpMathType(input.scalar_type());
    x = readable(input);
    dy = in_layout_of(grad_out, x);
    if (output.has_value()) out = in_layout_of(*output, x);
    mean = mean_.to(at::kDouble).contiguous();
  }
  template <typename T>
  const T* out_ptr() const {
    return out.defined() ? out.const_data_ptr<T>() : nullptr;
  }
};

// grad_input, grad_weight, grad_bias (the last two in fp32, fp64 for fp64 input) from the mean
// (fp64) and invstd the forward normalised with, and grad_residual (the masked grad_out) when the
// relu's output is given and grad_residual is set, else an empty tensor.
std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_backward(const Tensor& grad_out, const Tensor& input,
                                                               const Tensor& mean, const Tensor& invstd,
                                                               const std::optional<Tensor>& weight, bool training,
                                                               bool unbiased, const std::optional<Tensor>& output,
                                                               bool grad_residual) {
  constexpr const char* op = "batch_norm_backward";
  const BackwardArgs b(op, grad_out, input, mean, output);
  const Shape s(b.x);
  const int64_t C = s.C;
  check_channels(op, "invstd", invstd, C);
  check_channels(op, "weight", weight, C);
  check_training_values(op, training, input);
  const Tensor inv = per_channel(invstd, b.acc), gamma = per_channel(weight, b.acc);
  Tensor dx = empty_in_layout_of(b.x), grad_weight = at::empty({C}, b.x.options().dtype(b.acc)),
         grad_bias = at::empty({C}, grad_weight.options());
  Tensor dz = output.has_value() && grad_residual ? empty_in_layout_of(b.x) : at::empty({0}, input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *px = b.x.const_data_ptr<scalar_t>(), *pdy = b.dy.const_data_ptr<scalar_t>();
    const acc_t* pinv = inv.const_data_ptr<acc_t>();
    const double* pmean = b.mean.const_data_ptr<double>();
    const double n = static_cast<double>(s.values());
    const std::vector<double> sums = grad_sums(px, pdy, b.out_ptr<scalar_t>(), pmean, s);
    for (int64_t c = 0; c < C; ++c) {  // sum(dz * xhat), 0 for no values (where invstd may be NaN)
      grad_weight.mutable_data_ptr<acc_t>()[c] = static_cast<acc_t>(n > 0 ? sums[C + c] * pinv[c] : 0.0);
      grad_bias.mutable_data_ptr<acc_t>()[c] = static_cast<acc_t>(sums[c]);  // sum(dz)
    }
    grad_input(px, pdy, b.out_ptr<scalar_t>(), pmean, pinv, gamma.defined() ? gamma.const_data_ptr<acc_t>() : nullptr,
               sums.data(), training ? n : 0, unbiased, s, dx.mutable_data_ptr<scalar_t>(),
               dz.numel() > 0 ? dz.mutable_data_ptr<scalar_t>() : nullptr);
  });
  return {dx, grad_weight, grad_bias, dz};
}

// The statistics of this process's share of a batch split over processes: per channel the mean and
// m2 = sum((x - mean)^2), both fp64 (zeros for no values).
std::tuple<Tensor, Tensor> batch_norm_stats(const Tensor& input) {
  check_input("batch_norm_stats", input);
  const Tensor x = readable(input);
  const Shape s(x);
  Tensor mean = at::empty({s.C}, x.options().dtype(at::kDouble)), m2 = at::empty({s.C}, mean.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_stats", [&] {
    mean_and_m2(x.const_data_ptr<scalar_t>(), s, mean.mutable_data_ptr<double>(), m2.mutable_data_ptr<double>());
  });
  return {mean, m2};
}

// This process's sum(dy) and sum(dy * (x - mean)) per channel, fp64, to be summed over processes.
std::tuple<Tensor, Tensor> batch_norm_backward_reduce(const Tensor& grad_out, const Tensor& input,
                                                      const Tensor& mean) {
  const BackwardArgs b("batch_norm_backward_reduce", grad_out, input, mean);
  const Shape s(b.x);
  Tensor sum_dy = at::empty({s.C}, b.mean.options()), sum_dy_xmu = at::empty({s.C}, b.mean.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.x.scalar_type(), "batch_norm_backward_reduce", [&] {
    const scalar_t* no_output = nullptr;
    const std::vector<double> sums = grad_sums(b.x.const_data_ptr<scalar_t>(), b.dy.const_data_ptr<scalar_t>(),
                                               no_output, b.mean.const_data_ptr<double>(), s);
    std::copy(sums.begin(), sums.begin() + s.C, sum_dy.mutable_data_ptr<double>());
    std::copy(sums.begin() + s.C, sums.end(), sum_dy_xmu.mutable_data_ptr<double>());
  });
  return {sum_dy, sum_dy_xmu};
}

// grad_input of this process's values from the sums over all processes and their total count (a
// one-element tensor).
Tensor batch_norm_backward_elemt(const Tensor& grad_out, const Tensor& input, const Tensor& mean,
                                 const Tensor& invstd, const std::optional<Tensor>& weight, const Tensor& sum_dy,
                                 const Tensor& sum_dy_xmu, const Tensor& count_, bool unbiased) {
  constexpr const char* op = "batch_norm_backward_elemt";
  const BackwardArgs b(op, grad_out, input, mean);
  const Shape s(b.x);
  const int64_t C = s.C;
  check_channels(op, "invstd", invstd, C);
  check_channels(op, "weight", weight, C);
  check_channels(op, "sum_dy", sum_dy, C);
  check_channels(op, "sum_dy_xmu", sum_dy_xmu, C);
  TORCH_CHECK_VALUE(count_.numel() == 1, op, ": count must have one element, got shape ", count_.sizes());
  const double count = count_.item<double>();
  TORCH_CHECK_VALUE(count > 1 && count >= s.values(), op, ": count must be more than 1 and at least the ",
                    s.values(), " values per channel here, got ", count);
  const Tensor inv = per_channel(invstd, b.acc), gamma = per_channel(weight, b.acc);
  const Tensor sums = at::cat({sum_dy.to(at::kDouble), sum_dy_xmu.to(at::kDouble)});
  Tensor dx = empty_in_layout_of(b.x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    grad_input(b.x.const_data_ptr<scalar_t>(), b.dy.const_data_ptr<scalar_t>(), static_cast<const scalar_t*>(nullptr),
               b.mean.const_data_ptr<double>(), inv.const_data_ptr<acc_t>(),
               gamma.defined() ? gamma.const_data_ptr<acc_t>() : nullptr, sums.const_data_ptr<double>(), count,
               unbiased, s, dx.mutable_data_ptr<scalar_t>(), static_cast<scalar_t*>(nullptr));
  });
  return dx;
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
