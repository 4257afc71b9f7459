// The map registry, kMaps: one entry per map (its Python half, the
// reference forwards and the inverses, is simplex_param/maps.py).
//
// To add a map: write its forward and vjp below and add one line to kMaps;
// add its entry to MAPS in simplex_param/maps.py, an oracle to
// tests/test_maps.py and a row to docs/maps.md. Nothing else changes: the
// ops (simplex_ops.cpp), autograd (autograd.cpp) and the kernels know maps
// only through this registry.
//
// The forwards follow the entmax package's order of arithmetic (the row
// maximum subtracted first), so that their values are its own, bit for bit.
#include "maps.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/TensorSubclassLikeUtils.h>
#include <torch/autograd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>

#include "checks.h"

namespace simplex_param {
namespace {

at::Tensor scaled(const at::Tensor& z, const MapArgs& a) {
  return a.temperature == 1.0 ? z : z / a.temperature;
}

at::Tensor max_subtracted(const at::Tensor& x) {
  return x - std::get<0>(x.max(-1, /*keepdim=*/true));
}

// 1, 2, ..., n in x's dtype: the ranks of a sorted row, along x's last
// dimension. Built from x itself rather than by at::arange, so that a tensor
// subclass (a DTensor, with its placements) gets ranks of its own kind; the
// integers are exact in every floating dtype up to 2^24 (float32).
at::Tensor ranks(const at::Tensor& x) {
  return at::ones_like(x).cumsum(-1);
}

// The longest rows the loops below take: torch.softmax's kernel is slow only
// on rows shorter than one vector, and a row's sum in k order loses accuracy
// with its length (within 16 roundings here).
constexpr int64_t kShortRow = 16;

// Whether the softmax's loops below take `t`: float32 or float64 with plain
// CPU data (no tensor subclass or mode, no pending negation), in rows of at
// most kShortRow. Elsewhere (CUDA, a DTensor or fake tensor reaching the op
// itself) torch's kernels run.
bool short_rows_on_cpu(const at::Tensor& t) {
  return t.device().is_cpu() && t.layout() == at::kStrided && !at::isTensorSubclassLike(t) && !t.is_neg() &&
      (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble) && t.dim() > 0 && t.size(-1) <= kShortRow;
}

// exp(t) in float32 for t <= 0, NaN or -inf (a softmax's exponents), four
// lanes at a time: the reduction t = n ln2 + r, |r| <= ln2 / 2, with ln2 in
// two parts, Cephes' degree-7 polynomial for exp(r), then 2^n applied in
// two exact steps and one rounding, so that subnormal results round once.
// Written with vector types, so that it is vectorised whatever the compiler
// makes of branches, and built without contraction: the same bits on every
// CPU. About 2 ulp from exp; the weights are tested within 8 ulp of the
// exact softmax (tests/test_maps.py).
using F4 = float __attribute__((vector_size(16)));
using I4 = int32_t __attribute__((vector_size(16)));

inline F4 exp_nonpositive(F4 t) {
  const I4 nan = t != t, under = t < -104.0f;  // exp(-104) rounds to 0
  const F4 x = reinterpret_cast<F4>(~(nan | under) & reinterpret_cast<I4>(t)) +
      reinterpret_cast<F4>(under & reinterpret_cast<I4>(F4{} - 104.0f));
  // n = x log2(e) rounded to nearest: 1.5 * 2^23 added and taken off (no
  // rounding instruction needed, which baseline x86-64 lacks).
  const F4 n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const F4 r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  F4 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const F4 scale = reinterpret_cast<F4>((__builtin_convertvector(n, I4) + (64 + 127)) << 23);  // 2^(n + 64)
  const F4 e = (p * scale) * 0x1p-64f;
  return reinterpret_cast<F4>((nan & reinterpret_cast<I4>(t)) | (~(nan | under) & reinterpret_cast<I4>(e)));
}

// x[i] = exp(x[i]) for i < len, four at a time (the tail in a padded copy).
inline void exp_nonpositive(float* x, int64_t len) {
  int64_t i = 0;
  for (; i + 4 <= len; i += 4) {
    F4 v;
    std::memcpy(&v, x + i, sizeof(v));
    v = exp_nonpositive(v);
    std::memcpy(x + i, &v, sizeof(v));
  }
  if (i < len) {
    F4 v{};
    std::memcpy(&v, x + i, (len - i) * sizeof(float));
    v = exp_nonpositive(v);
    std::memcpy(x + i, &v, (len - i) * sizeof(float));
  }
}

inline void exp_nonpositive(double* x, int64_t len) {
  for (int64_t i = 0; i < len; ++i) x[i] = std::exp(x[i]);
}

// f(r0, r1) over the rows [0, rows) of K elements, in parallel blocks of
// about 32768 elements.
template <typename F>
void parallel_rows(int64_t rows, int64_t K, const F& f) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1)), f);
}

// A new tensor shaped as `like`, its rows (of its last dimension) filled by
// loop(out, rows, K), `out` its typed data.
template <typename Loop>
at::Tensor rows_by(const at::Tensor& like, const Loop& loop) {
  at::Tensor out = at::empty(like.sizes(), like.options());
  const int64_t K = like.size(-1), rows = K == 0 ? 0 : like.numel() / K;
  AT_DISPATCH_FLOATING_TYPES(like.scalar_type(), "softmax_rows", [&] {
    loop(out.mutable_data_ptr<scalar_t>(), rows, K);
  });
  return out;
}

// w = softmax(z / T) over rows of K, into `w` (rows x K, contiguous): the
// exponents row by row, then the exp over the whole range at once (rows of
// 8 or 16 are too short to vectorise), then each row scaled by the
// reciprocal of its sum. torch.softmax's kernel runs a scalar exp per
// element for rows shorter than one vector: 280-300 us against about 60 us
// here for the (4096, 8) logits of a per-token mix (docs/benchmarks.md).
template <typename T>
void softmax_rows(const T* z, T* w, int64_t rows, int64_t K, double temperature) {
  const T temp = static_cast<T>(temperature);
  parallel_rows(rows, K, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* zr = z + r * K;
      T* wr = w + r * K;
      T m = -std::numeric_limits<T>::infinity();
      // A NaN need not win the maximum: its exponent is NaN, and so the sum.
      if (temperature == 1.0) {
        for (int64_t k = 0; k < K; ++k) m = std::max(m, zr[k]);
        for (int64_t k = 0; k < K; ++k) wr[k] = zr[k] - m;
      } else {
        for (int64_t k = 0; k < K; ++k) m = std::max(m, zr[k] / temp);
        for (int64_t k = 0; k < K; ++k) wr[k] = zr[k] / temp - m;
      }
    }
    T* wr = w + r0 * K;
    exp_nonpositive(wr, (r1 - r0) * K);
    for (int64_t r = r0; r < r1; ++r, wr += K) {
      T s = 0;
      for (int64_t k = 0; k < K; ++k) s += wr[k];
      const T inv = T(1) / s;  // as torch.softmax does
      for (int64_t k = 0; k < K; ++k) wr[k] = wr[k] * inv;
    }
  });
}

// dz = w * (g - <w, g>) / T, row by row, into `dz`.
template <typename T>
void softmax_vjp_rows(const T* w, const T* g, T* dz, int64_t rows, int64_t K, double temperature) {
  const T temp = static_cast<T>(temperature);
  parallel_rows(rows, K, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T *wr = w + r * K, *gr = g + r * K;
      T dot = 0;
      for (int64_t k = 0; k < K; ++k) dot += wr[k] * gr[k];
      for (int64_t k = 0; k < K; ++k) {
        const T d = wr[k] * (gr[k] - dot);
        dz[r * K + k] = temperature == 1.0 ? d : d / temp;
      }
    }
  });
}

// softmax(z / T). On plain CPU tensors, the row loops above; elsewhere
// torch's kernel (the division skipped at T = 1, where it changes nothing).
at::Tensor softmax_forward(const at::Tensor& z, const MapArgs& a) {
  // Never differentiated through: its callers run below autograd.
  if (!short_rows_on_cpu(z)) return at::_softmax(scaled(z, a), -1, false);
  const at::Tensor zc = z.contiguous();
  return rows_by(z, [&](auto* w, int64_t rows, int64_t K) {
    using T = std::remove_pointer_t<decltype(w)>;
    softmax_rows(zc.const_data_ptr<T>(), w, rows, K, a.temperature);
  });
}

// dL/dz = w * (g - <w, g>) / T: the row loop above, or one fused ATen op.
at::Tensor softmax_vjp(const at::Tensor& w, const at::Tensor& grad_w, const MapArgs& a) {
  // With a graph to record (double backward), the differentiable ATen op.
  const bool graph = at::GradMode::is_enabled() && (w.requires_grad() || grad_w.requires_grad());
  if (graph || !short_rows_on_cpu(w) || !short_rows_on_cpu(grad_w) || grad_w.scalar_type() != w.scalar_type() ||
      grad_w.sizes() != w.sizes()) {
    return scaled(at::_softmax_backward_data(grad_w, w, -1, w.scalar_type()), a);
  }
  const at::Tensor wc = w.contiguous(), gc = grad_w.contiguous();
  return rows_by(w, [&](auto* dz, int64_t rows, int64_t K) {
    using T = std::remove_pointer_t<decltype(dz)>;
    softmax_vjp_rows(wc.const_data_ptr<T>(), gc.const_data_ptr<T>(), dz, rows, K, a.temperature);
  });
}

// z / T, the weights as given at T = 1.
at::Tensor identity_forward(const at::Tensor& z, const MapArgs& a) {
  return scaled(z, a);
}

at::Tensor identity_vjp(const at::Tensor&, const at::Tensor& grad_w, const MapArgs& a) {
  return scaled(grad_w, a);
}

// The sparse maps' Jacobian is diag(s) - s s^T / sum(s), with s = w^(2 - alpha)
// on the support w > 0 and 0 off it: its product with g, divided by T.
at::Tensor family_vjp(const at::Tensor& s, const at::Tensor& grad_w, const MapArgs& a) {
  const at::Tensor sg = s * grad_w;
  return scaled(sg - s * (sg.sum(-1, true) / s.sum(-1, true)), a);
}

// w^e on the support, 0 off it; the power is taken on the support only, so
// that its derivative stays finite at the zeros (double backward).
at::Tensor support_power(const at::Tensor& w, double e) {
  const at::Tensor on = w > 0;
  return at::where(on, at::where(on, w, at::ones_like(w)).pow(e), at::zeros_like(w));
}

// sparsemax(z / T) (Martins & Astudillo, 2016): the Euclidean projection onto
// the simplex, max(x - tau, 0), with tau from the sorted row.
at::Tensor sparsemax_forward(const at::Tensor& z, const MapArgs& a) {
  const at::Tensor x = max_subtracted(scaled(z, a));
  const at::Tensor xs = std::get<0>(x.sort(-1, /*descending=*/true));
  const at::Tensor cumsum = xs.cumsum(-1) - 1;
  const at::Tensor size = (ranks(x) * xs > cumsum).sum(-1, true).clamp_min(1);
  const at::Tensor tau = cumsum.gather(-1, size - 1) / size.to(x.scalar_type());
  return (x - tau).clamp_min(0);
}

at::Tensor sparsemax_vjp(const at::Tensor& w, const at::Tensor& grad_w, const MapArgs& a) {
  return family_vjp((w > 0).to(grad_w.scalar_type()), grad_w, a);
}

// 1.5-entmax(z / T) (Peters, Niculae & Martins, 2019): max(x / 2 - tau, 0)^2
// with tau, exact, from the sorted row.
at::Tensor entmax15_forward(const at::Tensor& z, const MapArgs& a) {
  const at::Tensor x = max_subtracted(scaled(z, a)) / 2;
  const at::Tensor xs = std::get<0>(x.sort(-1, /*descending=*/true));
  const at::Tensor rho = ranks(x);
  const at::Tensor mean = xs.cumsum(-1) / rho;
  const at::Tensor mean_sq = xs.pow(2).cumsum(-1) / rho;
  const at::Tensor delta = (1 - rho * (mean_sq - mean.pow(2))) / rho;
  const at::Tensor tau = mean - delta.clamp_min(0).sqrt();
  const at::Tensor size = (tau <= xs).sum(-1, true).clamp_min(1);
  return (x - tau.gather(-1, size - 1)).clamp_min(0).pow(2);
}

at::Tensor entmax15_vjp(const at::Tensor& w, const at::Tensor& grad_w, const MapArgs& a) {
  return family_vjp(support_power(w, 0.5), grad_w, a);
}

// Bisection steps of entmax_bisect (simplex_param/maps.py: BISECT_ITERS).
constexpr int kBisectIters = 50;

// The softmax stands for alpha-entmax within sqrt(eps) of alpha = 1.
bool softmax_alpha(double alpha) {
  return std::abs(alpha - 1) < std::sqrt(std::numeric_limits<double>::epsilon());
}

// alpha-entmax(z / T): max((alpha - 1) x - tau, 0)^(1 / (alpha - 1)) summing
// to one, tau by bisection in float64 on the exact bracket [-1, -(1/K)^(alpha - 1)]
// (the row maximum at 0), then normalised; the softmax at alpha = 1.
at::Tensor entmax_bisect_forward(const at::Tensor& z, const MapArgs& a) {
  // No aten::to where the dtype matches: below autograd, opcheck flags an op
  // that returns its input.
  const at::Tensor x = z.scalar_type() == at::kDouble ? scaled(z, a) : scaled(z, a).to(at::kDouble);
  if (softmax_alpha(a.alpha)) {
    const at::Tensor w = at::_softmax(x, -1, false);
    return z.scalar_type() == at::kDouble ? w : w.to(z.scalar_type());
  }
  const double am1 = a.alpha - 1;
  const at::Tensor X = max_subtracted(x * am1);
  at::Tensor lo = at::full_like(X.narrow(-1, 0, 1), -1.0);
  at::Tensor width = at::full_like(lo, 1 - std::pow(1.0 / X.size(-1), am1));
  at::Tensor p;
  for (int i = 0; i < kBisectIters; ++i) {
    width = width / 2;
    const at::Tensor mid = lo + width;
    p = (X - mid).clamp_min(0).pow(1 / am1);
    lo = at::where(p.sum(-1, true) >= 1, mid, lo);
  }
  p = p / p.sum(-1, true);
  return z.scalar_type() == at::kDouble ? p : p.to(z.scalar_type());
}

at::Tensor entmax_bisect_vjp(const at::Tensor& w, const at::Tensor& grad_w, const MapArgs& a) {
  return family_vjp(support_power(w, 2 - a.alpha), grad_w, a);
}

constexpr SimplexMap kMaps[] = {
    // name, forward, vjp, ignores_zero_weights, has_alpha
    {"softmax", softmax_forward, softmax_vjp, true, false},
    {"identity", identity_forward, identity_vjp, false, false},
    {"sparsemax", sparsemax_forward, sparsemax_vjp, true, false},
    {"entmax15", entmax15_forward, entmax15_vjp, true, false},
    {"entmax_bisect", entmax_bisect_forward, entmax_bisect_vjp, true, true},
};

std::string map_names() {
  std::string names;
  for (const SimplexMap& m : kMaps) names += (names.empty() ? "'" : ", '") + std::string(m.name) + "'";
  return names;
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class MapFunction : public torch::autograd::Function<MapFunction> {
 public:
  static at::Tensor forward(
      AutogradContext* ctx, const at::Tensor& z, int64_t index, double temperature, double alpha) {
    const MapArgs args{temperature, alpha};
    at::Tensor w = kMaps[index].forward(z, args);
    ctx->save_for_backward({w});
    ctx->saved_data["index"] = index;
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["alpha"] = alpha;
    return w;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const SimplexMap& m = kMaps[ctx->saved_data["index"].toInt()];
    const MapArgs args{ctx->saved_data["temperature"].toDouble(), ctx->saved_data["alpha"].toDouble()};
    return {m.vjp(ctx->get_saved_variables()[0], grads[0], args), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

} // namespace

const SimplexMap& find_map(c10::string_view name) {
  for (const SimplexMap& m : kMaps) {
    if (name == m.name) return m;
  }
  fail_unknown_map(name, map_names());
}

MapArgs map_args(const SimplexMap& map, double temperature, c10::optional<double> alpha) {
  check_temperature(temperature);
  check_alpha(map.name, map.has_alpha, alpha);
  return MapArgs{temperature, alpha.value_or(MapArgs{}.alpha)};
}

at::Tensor map_with_graph(const SimplexMap& map, const at::Tensor& z, const MapArgs& args) {
  return MapFunction::apply(z, static_cast<int64_t>(&map - kMaps), args.temperature, args.alpha);
}

} // namespace simplex_param
