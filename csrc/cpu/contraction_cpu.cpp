// CPU kernels of the contraction (contraction.h), forward and backward.
//
// The flat range is cut into tiles of about kBlock elements: a piece of one
// row when rows are long (one row in all for shared (K,) weights), or a run
// of whole rows when they are short. Tiles are spread over threads with
// at::parallel_for. A segment (the part of one row in a tile) is done with
// its accumulator on the stack (L1): the forward reads each input once and
// writes the output once; the backward reads the gradient and each input
// once and writes each wanted input gradient once. That is the minimum
// traffic, so the op runs at memory bandwidth (docs/benchmarks.md).
//
// Determinism: tiles depend on the shapes only, never on the number of
// threads. A segment's dot products <g, x_k> are kLanes fixed partial sums
// added pairwise; a row cut into pieces has its pieces' dot products summed
// in piece order after the parallel loop. The same inputs give the same bits.
//
// The loops are plain C++ that the compiler vectorises. On x86-64 they are
// compiled twice, for the baseline ISA and with AVX2, and the AVX2 copy is
// chosen at run time (AVX2 without FMA: neither copy contracts a * b + c,
// so both give bitwise the same results).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../contraction.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64))
#define SIMPLEX_PARAM_AVX2_PATH 1
#define SIMPLEX_PARAM_TARGET_AVX2 __attribute__((target("avx2")))
#else
#define SIMPLEX_PARAM_AVX2_PATH 0
#endif

#if defined(__GNUC__)
#define SIMPLEX_PARAM_INLINE inline __attribute__((always_inline))
#else
#define SIMPLEX_PARAM_INLINE inline
#endif

namespace simplex_param {
namespace {

constexpr int64_t kBlock = 2048;
constexpr int kLanes = 16;

// The tiles of a (rows x row_len) range.
struct Tiles {
  int64_t rows, row_len;
  int64_t pieces;         // pieces per row: > 1 only for rows longer than kBlock
  int64_t rows_per_tile;  // > 1 only for rows of at most kBlock / 2
  int64_t count;

  Tiles(int64_t rows_, int64_t row_len_) : rows(rows_), row_len(row_len_) {
    if (row_len >= kBlock || rows == 1) {
      pieces = std::max<int64_t>(1, (row_len + kBlock - 1) / kBlock);
      rows_per_tile = 1;
      count = rows * pieces;
    } else {
      pieces = 1;
      rows_per_tile = kBlock / std::max<int64_t>(row_len, 1);
      count = (rows + rows_per_tile - 1) / rows_per_tile;
    }
  }

  // f(row, piece, start, len) for every segment of tile t.
  template <typename F>
  SIMPLEX_PARAM_INLINE void for_each_segment(int64_t t, F&& f) const {
    if (rows_per_tile == 1) {
      const int64_t row = t / pieces, piece = t % pieces;
      const int64_t offset = piece * kBlock;
      f(row, piece, row * row_len + offset, std::min(kBlock, row_len - offset));
    } else {
      const int64_t end = std::min(rows, (t + 1) * rows_per_tile);
      for (int64_t row = t * rows_per_tile; row < end; ++row) f(row, int64_t{0}, row * row_len, row_len);
    }
  }
};

// Grain, in tiles, for at::parallel_for: at least 64K elements of traffic
// per thread, so that small problems stay on one thread.
int64_t tile_grain(int64_t K) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / (kBlock * std::max<int64_t>(K, 1)));
}

// Element conversions to and from the accumulation type. bfloat16 is done on
// the bits (round to nearest even, NaN kept quiet), which vectorises.
template <typename T>
SIMPLEX_PARAM_INLINE auto load(const T* p, int64_t i) {
  return static_cast<at::opmath_type<T>>(p[i]);
}
template <>
SIMPLEX_PARAM_INLINE auto load(const c10::BFloat16* p, int64_t i) {
  const uint32_t bits = static_cast<uint32_t>(p[i].x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
template <typename T, typename A>
SIMPLEX_PARAM_INLINE void store(T* p, int64_t i, A v) {
  p[i] = static_cast<T>(v);
}
template <>
SIMPLEX_PARAM_INLINE void store(c10::BFloat16* p, int64_t i, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  p[i].x = static_cast<uint16_t>(v != v ? 0x7FC0u : rounded);
}

// acc (+)= sum over r < R of w[r] * x[r][start + i], for i < len: R input
// streams advance together.
template <int R, bool First, typename scalar_t, typename acc_t>
SIMPLEX_PARAM_INLINE void accumulate(
    acc_t* acc, const scalar_t* const* xs, const acc_t* w, int64_t start, int64_t len) {
  const scalar_t* x[R];
  acc_t wr[R];
  for (int r = 0; r < R; ++r) {
    x[r] = xs[r] + start;
    wr[r] = w[r];
  }
  for (int64_t i = 0; i < len; ++i) {
    acc_t a = First ? wr[0] * load(x[0], i) : acc[i] + wr[0] * load(x[0], i);
    for (int r = 1; r < R; ++r) a = a + wr[r] * load(x[r], i);
    acc[i] = a;
  }
}

// acc (+)= sum of the n (<= 4) inputs of live_x with weights live_w.
template <typename scalar_t, typename acc_t>
SIMPLEX_PARAM_INLINE void accumulate_n(
    int n, bool first, acc_t* acc, const scalar_t* const* live_x, const acc_t* live_w, int64_t start, int64_t len) {
  switch (n) {
    case 4:
      first ? accumulate<4, true>(acc, live_x, live_w, start, len)
            : accumulate<4, false>(acc, live_x, live_w, start, len);
      break;
    case 3:
      first ? accumulate<3, true>(acc, live_x, live_w, start, len)
            : accumulate<3, false>(acc, live_x, live_w, start, len);
      break;
    case 2:
      first ? accumulate<2, true>(acc, live_x, live_w, start, len)
            : accumulate<2, false>(acc, live_x, live_w, start, len);
      break;
    default:
      first ? accumulate<1, true>(acc, live_x, live_w, start, len)
            : accumulate<1, false>(acc, live_x, live_w, start, len);
  }
}

// out[start, start + len) = sum_k w[k] * xs[k][...], len <= kBlock, over the
// inputs whose weight is not 0: the others are not read. The accumulator
// takes up to four inputs per pass, so that four input streams advance
// together: one stream at a time reads at about 60% of the copy bandwidth,
// and all K at once (K up to 25) overflows the prefetchers
// (docs/benchmarks.md). The sum runs in k order, as the reference's does.
template <typename scalar_t, typename acc_t>
SIMPLEX_PARAM_INLINE void forward_segment(
    const scalar_t* const* xs, const acc_t* w, int64_t K, scalar_t* out, int64_t start, int64_t len) {
  alignas(64) acc_t acc[kBlock];
  const scalar_t* live_x[4];
  acc_t live_w[4];
  int n = 0;
  bool first = true;
  for (int64_t k = 0; k < K; ++k) {
    if (w[k] == acc_t(0)) continue;
    live_x[n] = xs[k];
    live_w[n] = w[k];
    if (++n == 4) {
      accumulate_n(n, first, acc, live_x, live_w, start, len);
      first = false;
      n = 0;
    }
  }
  if (n > 0) {
    accumulate_n(n, first, acc, live_x, live_w, start, len);
    first = false;
  }
  if (first) {  // every weight of the row is 0
    for (int64_t i = 0; i < len; ++i) acc[i] = acc_t(0);
  }
  scalar_t* o = out + start;
  for (int64_t i = 0; i < len; ++i) store(o, i, acc[i]);
}

// On [start, start + len), len <= kBlock: dxs[k] = w[k] * grad where dxs[k]
// is not null, and, when dots is not null, dots[k] = <grad, xs[k]>; with
// skip_zero, dots[k] = 0 where w[k] is 0, and xs[k] is not read.
template <typename scalar_t, typename acc_t>
SIMPLEX_PARAM_INLINE void backward_segment(
    const scalar_t* grad, const scalar_t* const* xs, const acc_t* w, int64_t K,
    scalar_t* const* dxs, acc_t* dots, bool skip_zero, int64_t start, int64_t len) {
  alignas(64) acc_t g[kBlock];
  for (int64_t i = 0; i < len; ++i) g[i] = load(grad + start, i);
  for (int64_t k = 0; k < K; ++k) {
    if (dxs[k] != nullptr) {
      scalar_t* dx = dxs[k] + start;
      const acc_t wk = w[k];
      if (wk == acc_t(0)) {  // exactly 0, also where grad holds inf or NaN
        for (int64_t i = 0; i < len; ++i) store(dx, i, acc_t(0));
      } else {
        for (int64_t i = 0; i < len; ++i) store(dx, i, wk * g[i]);
      }
    }
    if (dots != nullptr && skip_zero && w[k] == acc_t(0)) {
      dots[k] = acc_t(0);
    } else if (dots != nullptr) {
      const scalar_t* x = xs[k] + start;
      acc_t s[kLanes] = {};
      int64_t i = 0;
      for (; i + kLanes <= len; i += kLanes) {
        for (int j = 0; j < kLanes; ++j) s[j] = s[j] + g[i + j] * load(x, i + j);
      }
      for (int j = 0; i < len; ++i, ++j) s[j] = s[j] + g[i] * load(x, i);
      for (int width = kLanes / 2; width > 0; width /= 2) {
        for (int j = 0; j < width; ++j) s[j] = s[j] + s[j + width];
      }
      dots[k] = s[0];
    }
  }
}

// The typed view of a Contraction.
template <typename scalar_t, typename acc_t>
struct Operands {
  std::vector<const scalar_t*> x;
  std::vector<scalar_t*> grad_x;
  const acc_t* w;

  explicit Operands(const Contraction& c) : w(static_cast<const acc_t*>(c.w)) {
    for (const void* p : c.x) x.push_back(static_cast<const scalar_t*>(p));
    for (void* p : c.grad_x) grad_x.push_back(static_cast<scalar_t*>(p));
  }
};

// Tiles [t0, t1) of the forward.
template <typename scalar_t, typename acc_t>
SIMPLEX_PARAM_INLINE void forward_tiles(
    const Contraction& c, const Tiles& tiles, const Operands<scalar_t, acc_t>& ops, int64_t t0, int64_t t1) {
  scalar_t* out = static_cast<scalar_t*>(c.out);
  for (int64_t t = t0; t < t1; ++t) {
    tiles.for_each_segment(t, [&](int64_t row, int64_t, int64_t start, int64_t len) {
      forward_segment(ops.x.data(), ops.w + row * c.K, c.K, out, start, len);
    });
  }
}

// Tiles [t0, t1) of the backward. A row in one piece has its dot products
// written to grad_w directly, a row in several to partials[(row * pieces +
// piece) * K + k].
template <typename scalar_t, typename acc_t>
SIMPLEX_PARAM_INLINE void backward_tiles(
    const Contraction& c, const Tiles& tiles, const Operands<scalar_t, acc_t>& ops, acc_t* partials,
    int64_t t0, int64_t t1) {
  const scalar_t* grad = static_cast<const scalar_t*>(c.grad);
  acc_t* grad_w = static_cast<acc_t*>(c.grad_w);
  for (int64_t t = t0; t < t1; ++t) {
    tiles.for_each_segment(t, [&](int64_t row, int64_t piece, int64_t start, int64_t len) {
      acc_t* dots = grad_w == nullptr ? nullptr
          : tiles.pieces == 1         ? grad_w + row * c.K
                                      : partials + (row * tiles.pieces + piece) * c.K;
      backward_segment(
          grad, ops.x.data(), ops.w + row * c.K, c.K, ops.grad_x.data(), dots, c.skip_zero_weights, start, len);
    });
  }
}

template <typename scalar_t, typename acc_t>
void forward_default(const Contraction& c, const Tiles& tiles, const Operands<scalar_t, acc_t>& ops, int64_t t0, int64_t t1) {
  forward_tiles(c, tiles, ops, t0, t1);
}
template <typename scalar_t, typename acc_t>
void backward_default(const Contraction& c, const Tiles& tiles, const Operands<scalar_t, acc_t>& ops, acc_t* partials,
                      int64_t t0, int64_t t1) {
  backward_tiles(c, tiles, ops, partials, t0, t1);
}

#if SIMPLEX_PARAM_AVX2_PATH
template <typename scalar_t, typename acc_t>
SIMPLEX_PARAM_TARGET_AVX2 void forward_avx2(
    const Contraction& c, const Tiles& tiles, const Operands<scalar_t, acc_t>& ops, int64_t t0, int64_t t1) {
  forward_tiles(c, tiles, ops, t0, t1);
}
template <typename scalar_t, typename acc_t>
SIMPLEX_PARAM_TARGET_AVX2 void backward_avx2(
    const Contraction& c, const Tiles& tiles, const Operands<scalar_t, acc_t>& ops, acc_t* partials,
    int64_t t0, int64_t t1) {
  backward_tiles(c, tiles, ops, partials, t0, t1);
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}
#endif

// Tiles [t0, t1) of one contraction, on the best instruction set there is.
template <typename scalar_t>
void forward_range(const Contraction& c, const Tiles& tiles, int64_t t0, int64_t t1) {
  using acc_t = at::opmath_type<scalar_t>;
  const Operands<scalar_t, acc_t> ops(c);
  auto body = forward_default<scalar_t, acc_t>;
#if SIMPLEX_PARAM_AVX2_PATH
  if (cpu_has_avx2()) body = forward_avx2<scalar_t, acc_t>;
#endif
  body(c, tiles, ops, t0, t1);
}

template <typename scalar_t>
void backward_range(const Contraction& c, const Tiles& tiles, at::opmath_type<scalar_t>* partials,
                    int64_t t0, int64_t t1) {
  using acc_t = at::opmath_type<scalar_t>;
  const Operands<scalar_t, acc_t> ops(c);
  auto body = backward_default<scalar_t, acc_t>;
#if SIMPLEX_PARAM_AVX2_PATH
  if (cpu_has_avx2()) body = backward_avx2<scalar_t, acc_t>;
#endif
  body(c, tiles, ops, partials, t0, t1);
}

// The tiles of several contractions, numbered one after the other, so that
// one parallel loop covers them all: tiles are of about kBlock elements
// whatever the contraction, which balances groups of very different sizes.
struct Batch {
  std::vector<Tiles> tiles;
  std::vector<int64_t> first{0};  // first[j]: number of contraction j's first tile

  explicit Batch(c10::ArrayRef<Contraction> cs) {
    for (const Contraction& c : cs) {
      tiles.emplace_back(c.rows, c.row_len);
      first.push_back(first.back() + tiles.back().count);
    }
  }
  int64_t count() const { return first.back(); }

  // f(j, t0, t1) for each contraction j with tiles in [begin, end), its own
  // tiles [t0, t1) of them.
  template <typename F>
  void for_each(int64_t begin, int64_t end, F&& f) const {
    auto j = static_cast<size_t>(std::upper_bound(first.begin(), first.end(), begin) - first.begin() - 1);
    for (int64_t t = begin; t < end; ++j) {
      const int64_t stop = std::min(end, first[j + 1]);
      f(j, t - first[j], stop - first[j]);
      t = stop;
    }
  }
};

// Per contraction whose rows are cut into pieces: the pieces' dot products,
// in its accumulation dtype, summed in piece order after the parallel loop.
struct Partials {
  std::vector<float> f;
  std::vector<double> d;
  std::vector<int64_t> offset;

  Partials(c10::ArrayRef<Contraction> cs, const Batch& batch) {
    for (size_t j = 0; j < cs.size(); ++j) {
      const bool split = cs[j].grad_w != nullptr && batch.tiles[j].pieces > 1;
      const int64_t n = split ? batch.tiles[j].count * cs[j].K : 0;
      if (acc_type(cs[j].dtype) == at::kDouble) {
        offset.push_back(static_cast<int64_t>(d.size()));
        d.resize(d.size() + n);
      } else {
        offset.push_back(static_cast<int64_t>(f.size()));
        f.resize(f.size() + n);
      }
    }
  }
  template <typename acc_t>
  acc_t* at(size_t j) {
    if constexpr (std::is_same_v<acc_t, double>) {
      return d.data() + offset[j];
    } else {
      return f.data() + offset[j];
    }
  }
};

template <typename acc_t>
void sum_pieces(const Contraction& c, const Tiles& tiles, const acc_t* partials) {
  acc_t* grad_w = static_cast<acc_t*>(c.grad_w);
  for (int64_t row = 0; row < c.rows; ++row) {
    const acc_t* p = partials + row * tiles.pieces * c.K;
    for (int64_t k = 0; k < c.K; ++k) {
      acc_t s = 0;
      for (int64_t piece = 0; piece < tiles.pieces; ++piece) s += p[piece * c.K + k];
      grad_w[row * c.K + k] = s;
    }
  }
}

// All contractions of `cs` (one K for all) in one parallel loop.
void forward_batch(c10::ArrayRef<Contraction> cs) {
  const Batch batch(cs);
  at::parallel_for(0, batch.count(), tile_grain(cs[0].K), [&](int64_t begin, int64_t end) {
    batch.for_each(begin, end, [&](size_t j, int64_t t0, int64_t t1) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cs[j].dtype, "weighted_sum_cpu", [&] {
        forward_range<scalar_t>(cs[j], batch.tiles[j], t0, t1);
      });
    });
  });
}

void backward_batch(c10::ArrayRef<Contraction> cs) {
  const Batch batch(cs);
  Partials partials(cs, batch);
  at::parallel_for(0, batch.count(), tile_grain(cs[0].K), [&](int64_t begin, int64_t end) {
    batch.for_each(begin, end, [&](size_t j, int64_t t0, int64_t t1) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cs[j].dtype, "weighted_sum_backward_cpu", [&] {
        backward_range<scalar_t>(cs[j], batch.tiles[j], partials.at<at::opmath_type<scalar_t>>(j), t0, t1);
      });
    });
  });
  for (size_t j = 0; j < cs.size(); ++j) {
    if (cs[j].grad_w == nullptr || batch.tiles[j].pieces == 1) continue;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cs[j].dtype, "weighted_sum_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      sum_pieces<acc_t>(cs[j], batch.tiles[j], partials.at<acc_t>(j));
    });
  }
}

void forward_kernel(const Contraction& c) {
  forward_batch(c10::ArrayRef<Contraction>(c));
}

void backward_kernel(const Contraction& c) {
  backward_batch(c10::ArrayRef<Contraction>(c));
}

at::Tensor weighted_sum_cpu(const at::Tensor& weights, at::TensorList inputs) {
  return weighted_sum_forward(weights, inputs, forward_kernel);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> weighted_sum_backward_cpu(
    const at::Tensor& grad, const at::Tensor& weights, at::TensorList inputs,
    bool weights_requires_grad, const c10::List<bool>& inputs_requires_grad, bool skip_zero_weights) {
  return weighted_sum_backward(
      grad, weights, inputs, weights_requires_grad, inputs_requires_grad, skip_zero_weights, backward_kernel);
}

std::vector<at::Tensor> grouped_weighted_sum_cpu(const at::Tensor& weights, at::TensorList inputs) {
  return grouped_weighted_sum_forward(weights, inputs, forward_batch);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> grouped_weighted_sum_backward_cpu(
    at::TensorList grads, const at::Tensor& weights, at::TensorList inputs, bool weights_requires_grad,
    const c10::List<bool>& inputs_requires_grad) {
  return grouped_weighted_sum_backward(
      grads, weights, inputs, weights_requires_grad, inputs_requires_grad, backward_batch);
}

} // namespace

TORCH_LIBRARY_IMPL(simplex_param, CPU, m) {
  m.impl("weighted_sum", &weighted_sum_cpu);
  m.impl("_weighted_sum_backward", &weighted_sum_backward_cpu);
  m.impl("grouped_weighted_sum", &grouped_weighted_sum_cpu);
  m.impl("_grouped_weighted_sum_backward", &grouped_weighted_sum_backward_cpu);
}

} // namespace simplex_param
