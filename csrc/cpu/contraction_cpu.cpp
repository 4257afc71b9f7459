// CPU kernels of the contraction (contraction.h): the parallel loop over
// tiles, and the choice of instruction set.
//
// The flat range of each contraction is cut into tiles of about kBlock
// elements (tiles.h), and the tiles of one op call (several contractions for
// a grouped op) are spread over threads by one at::parallel_for. The work on
// a tile is done by the kernels of one instruction set (kernels.h, built
// once per set in isa_*.cpp), chosen at the first call: the best the CPU
// has, or the one SIMPLEX_PARAM_CPU_CAPABILITY names (default, avx2, avx512,
// avx512_bf16). Every set gives bitwise the same results.
//
// Determinism: tiles depend on the shapes only, never on the number of
// threads; a row cut into pieces has its pieces' dot products summed in
// piece order after the parallel loop.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#include "../contraction.h"
#include "capability.h"
#include "tiles.h"

namespace simplex_param {
namespace cpu {
namespace {

// Grain, in tiles, for at::parallel_for: at least 64K elements of traffic
// per thread, so that small problems stay on one thread. A tile of K inputs
// and M outputs moves K + M - 1 rows of kBlock elements besides the first.
int64_t tile_grain(const Contraction& c) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / (kBlock * std::max<int64_t>(c.K + c.M - 1, 1)));
}

std::vector<IsaKernels> supported_kernels() {
  std::vector<IsaKernels> sets{default_kernels()};
  auto add = [&](const IsaKernels& k) {
    if (k.name != nullptr) sets.push_back(k);  // null: that set was not built
  };
#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64))
  if (__builtin_cpu_supports("avx2")) add(avx2_kernels());
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (avx512) add(avx512_kernels());
  if (avx512 && __builtin_cpu_supports("avx512bf16")) add(avx512_bf16_kernels());
#endif
  return sets;
}

std::string names(const std::vector<IsaKernels>& sets) {
  std::string out;
  for (const IsaKernels& s : sets) out += (out.empty() ? "" : ", ") + std::string(s.name);
  return out;
}

IsaKernels choose_kernels() {
  const std::vector<IsaKernels> sets = supported_kernels();
  const char* wanted = std::getenv("SIMPLEX_PARAM_CPU_CAPABILITY");
  if (wanted == nullptr || *wanted == '\0') return sets.back();
  for (const IsaKernels& s : sets) {
    if (std::string(s.name) == wanted) return s;
  }
  TORCH_CHECK(false, "SIMPLEX_PARAM_CPU_CAPABILITY=", wanted, " is not an instruction set this CPU runs; it runs: ",
              names(sets), " (the names are default, avx2, avx512, avx512_bf16)");
}

const IsaKernels& active_kernels() {
  static const IsaKernels kernels = choose_kernels();
  return kernels;
}

int dtype_index(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kDouble: return 1;
    case at::kHalf: return 2;
    case at::kBFloat16: return 3;
    default: TORCH_CHECK(false, "simplex_param: no CPU kernel for dtype ", t);
  }
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
      const int64_t n = split ? batch.tiles[j].count * cs[j].M * cs[j].K : 0;
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
  void* at(size_t j, at::ScalarType dtype) {
    return dtype == at::kDouble ? static_cast<void*>(at<double>(j)) : static_cast<void*>(at<float>(j));
  }
};

template <typename acc_t>
void sum_pieces(const Contraction& c, const Tiles& tiles, const acc_t* partials) {
  acc_t* grad_w = static_cast<acc_t*>(c.grad_w);
  const int64_t width = c.M * c.K;  // weights per row
  for (int64_t row = 0; row < c.rows; ++row) {
    const acc_t* p = partials + row * tiles.pieces * width;
    for (int64_t k = 0; k < width; ++k) {
      acc_t s = 0;
      for (int64_t piece = 0; piece < tiles.pieces; ++piece) s += p[piece * width + k];
      grad_w[row * width + k] = s;
    }
  }
}

// All contractions of `cs` (one K for all) in one parallel loop.
void forward_batch(c10::ArrayRef<Contraction> cs) {
  const Batch batch(cs);
  std::vector<ForwardTiles> forward;
  for (const Contraction& c : cs) forward.push_back(active_kernels().forward[dtype_index(c.dtype)]);
  at::parallel_for(0, batch.count(), tile_grain(cs[0]), [&](int64_t begin, int64_t end) {
    batch.for_each(begin, end, [&](size_t j, int64_t t0, int64_t t1) {
      forward[j](cs[j], batch.tiles[j], t0, t1);
    });
  });
}

void backward_batch(c10::ArrayRef<Contraction> cs) {
  const Batch batch(cs);
  std::vector<BackwardTiles> backward;
  for (const Contraction& c : cs) backward.push_back(active_kernels().backward[dtype_index(c.dtype)]);
  Partials partials(cs, batch);
  at::parallel_for(0, batch.count(), tile_grain(cs[0]), [&](int64_t begin, int64_t end) {
    batch.for_each(begin, end, [&](size_t j, int64_t t0, int64_t t1) {
      backward[j](cs[j], batch.tiles[j], partials.at(j, cs[j].dtype), t0, t1);
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

at::Tensor mix_cpu(const at::Tensor& weights, at::TensorList inputs) {
  return mix_forward(weights, inputs, forward_kernel);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> mix_backward_cpu(
    const at::Tensor& grad, const at::Tensor& weights, at::TensorList inputs, bool weights_requires_grad,
    const c10::List<bool>& inputs_requires_grad) {
  return mix_backward(grad, weights, inputs, weights_requires_grad, inputs_requires_grad, backward_kernel);
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

const char* active_capability() {
  return active_kernels().name;
}

std::vector<std::string> supported_capabilities() {
  std::vector<std::string> out;
  for (const IsaKernels& s : supported_kernels()) out.emplace_back(s.name);
  return out;
}

} // namespace cpu

TORCH_LIBRARY_IMPL(simplex_param, CPU, m) {
  m.impl("weighted_sum", &cpu::weighted_sum_cpu);
  m.impl("_weighted_sum_backward", &cpu::weighted_sum_backward_cpu);
  m.impl("mix", &cpu::mix_cpu);
  m.impl("_mix_backward", &cpu::mix_backward_cpu);
  m.impl("grouped_weighted_sum", &cpu::grouped_weighted_sum_cpu);
  m.impl("_grouped_weighted_sum_backward", &cpu::grouped_weighted_sum_backward_cpu);
}

} // namespace simplex_param
