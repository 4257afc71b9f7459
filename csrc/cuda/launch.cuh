// The launches of the CUDA kernels (kernels.cuh): vector widths, grid
// sizes, K-chunking, scratch buffers and the grouped ops' tables. One
// source for the GPU build (contraction_cuda.cu) and for the emulation on
// the CPU (tests/cuda_emulation/), templated on a runtime policy R that
// owns everything device-specific:
//
//   int multiprocessors() const;                 streaming multiprocessors
//   at::TensorOptions scratch(at::Device) const; where launch buffers live
//   at::Tensor host_table(int64_t size) const;   an int64 host buffer
//   at::Tensor to_device(const at::Tensor& host, at::Device) const;
//   void launch(void (*kernel)(P...), int64_t blocks, P... args) const;
//                                                kThreads threads a block,
//                                                no dynamic shared memory
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../contraction.h"
#include "kernels.cuh"

namespace simplex_param {
namespace cuda {

// A non-deduced parameter type, so that launch() converts its arguments to
// the kernel's parameter types (C++17 has no std::type_identity).
template <typename T>
struct Same {
  using type = T;
};
template <typename T>
using same_t = typename Same<T>::type;

inline bool aligned(const void* p) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % kVecBytes == 0;
}

// Vector width: V when every pointer and row skip is aligned and vectors
// stay in a row (with M > 1 outputs, in one output's range of a row).
template <typename scalar_t>
bool vectorizable(const Contraction& c) {
  constexpr int V = kVecBytes / sizeof(scalar_t);
  bool ok = aligned(c.out) && aligned(c.grad) && ((c.rows == 1 && c.M == 1) || c.row_len % V == 0);
  for (const void* p : c.x) ok = ok && aligned(p);
  for (const void* p : c.grad_x) ok = ok && aligned(p);
  for (int64_t skip : c.x_skip) ok = ok && skip % V == 0;
  return ok;
}

// Blocks of a grid-stride launch: enough to fill the device.
template <typename R>
int64_t grid_blocks(int64_t n, int vec, const R& rt) {
  const int64_t wanted = (n / vec + kThreads - 1) / kThreads;
  return std::max<int64_t>(1, std::min<int64_t>(wanted, int64_t{rt.multiprocessors()} * (2048 / kThreads)));
}

template <typename acc_t>
constexpr at::ScalarType acc_scalar_type() {
  return c10::CppTypeToScalarType<acc_t>::value;
}

template <typename scalar_t, typename acc_t, int V, typename R>
void launch_mix(const Contraction& c, const std::vector<const void*>& xs_all, const std::vector<int64_t>& skips,
                const std::vector<void*>& outs_all, int64_t out_skip, int64_t w_out, int64_t w_in, const R& rt);

// Input k's row skip (contraction.h): 0 when there are none.
inline int64_t skip_of(const Contraction& c, int64_t k) {
  return c.x_skip.empty() ? 0 : c.x_skip[k];
}

template <typename scalar_t, typename acc_t, int V, typename R>
void launch_forward(const Contraction& c, const R& rt) {
  if (c.M != 1 || !c.x_skip.empty()) {  // mix: output m of row r starts at (r * M + m) * row_len
    std::vector<void*> outs;
    for (int64_t m = 0; m < c.M; ++m) outs.push_back(static_cast<scalar_t*>(c.out) + m * c.row_len);
    std::vector<int64_t> skips(c.K);
    for (int64_t k = 0; k < c.K; ++k) skips[k] = skip_of(c, k);
    launch_mix<scalar_t, acc_t, V>(c, c.x, skips, outs, (c.M - 1) * c.row_len, /*w_out=*/c.K, /*w_in=*/1, rt);
    return;
  }
  const int64_t n = c.rows * c.row_len;
  const int64_t blocks = grid_blocks(n, V, rt);
  at::Tensor acc_buf;  // the running sum between chunks, when there are several
  if (c.K > kFwdChunk) acc_buf = at::empty({n}, rt.scratch(c.device).dtype(acc_scalar_type<acc_t>()));
  acc_t* acc = acc_buf.defined() ? acc_buf.mutable_data_ptr<acc_t>() : nullptr;
  const acc_t* w = static_cast<const acc_t*>(c.w);
  for (int64_t k0 = 0; k0 < c.K; k0 += kFwdChunk) {
    const int kc = static_cast<int>(std::min<int64_t>(kFwdChunk, c.K - k0));
    Ptrs<const scalar_t, kFwdChunk> xs{};
    for (int k = 0; k < kc; ++k) xs.p[k] = static_cast<const scalar_t*>(c.x[k0 + k]);
    const bool last = k0 + kc == c.K;
    rt.launch(&forward_kernel<scalar_t, acc_t, V>, blocks, xs, kc, w + k0, c.K, c.row_len,
              k0 == 0 ? nullptr : acc, last ? nullptr : acc, static_cast<scalar_t*>(c.out), n);
  }
}

// mix_kernel over `xs` (as inputs, input k's rows skips[k] apart) into
// `outs` (null: not wanted; out_skip apart), with weight (row, j, k) at
// c.w[row * M * K + j * w_out + k * w_in]: chunks of kMixOuts outputs, each
// over chunks of kFwdChunk inputs carrying the running sums in a buffer.
template <typename scalar_t, typename acc_t, int V, typename R>
void launch_mix(const Contraction& c, const std::vector<const void*>& xs_all, const std::vector<int64_t>& skips,
                const std::vector<void*>& outs_all, int64_t out_skip, int64_t w_out, int64_t w_in, const R& rt) {
  const int64_t n = c.rows * c.row_len;
  const int64_t blocks = grid_blocks(n, V, rt);
  const int64_t K = static_cast<int64_t>(xs_all.size()), M = static_cast<int64_t>(outs_all.size());
  at::Tensor acc_buf;  // the running sums between input chunks, when there are several
  if (K > kFwdChunk) {
    acc_buf = at::empty({std::min<int64_t>(M, kMixOuts) * n}, rt.scratch(c.device).dtype(acc_scalar_type<acc_t>()));
  }
  acc_t* acc = acc_buf.defined() ? acc_buf.mutable_data_ptr<acc_t>() : nullptr;
  const acc_t* w = static_cast<const acc_t*>(c.w);
  for (int64_t j0 = 0; j0 < M; j0 += kMixOuts) {
    const int mc = static_cast<int>(std::min<int64_t>(kMixOuts, M - j0));
    Ptrs<scalar_t, kMixOuts> outs{};
    bool any = false;
    for (int j = 0; j < mc; ++j) {
      outs.p[j] = static_cast<scalar_t*>(outs_all[j0 + j]);
      any = any || outs.p[j] != nullptr;
    }
    if (!any) continue;
    for (int64_t k0 = 0; k0 < K; k0 += kFwdChunk) {
      const int kc = static_cast<int>(std::min<int64_t>(kFwdChunk, K - k0));
      Ptrs<const scalar_t, kFwdChunk> xs{};
      Skips<kFwdChunk> x_skip{};
      for (int k = 0; k < kc; ++k) {
        xs.p[k] = static_cast<const scalar_t*>(xs_all[k0 + k]);
        x_skip.s[k] = skips[k0 + k];
      }
      const bool last = k0 + kc == K;
      rt.launch(&mix_kernel<scalar_t, acc_t, V>, blocks, xs, kc, x_skip, outs, mc, out_skip,
                w + j0 * w_out + k0 * w_in, c.M * c.K, w_out, w_in, c.row_len, k0 == 0 ? nullptr : acc,
                last ? nullptr : acc, n);
    }
  }
}

template <typename scalar_t, typename acc_t, int V, typename R>
void launch_backward(const Contraction& c, const R& rt) {
  const int64_t tile_len = int64_t{kThreads} * V * kTileVecs;
  const int64_t pieces = std::max<int64_t>(1, (c.row_len + tile_len - 1) / tile_len);
  const int64_t blocks = c.rows * pieces;
  TORCH_CHECK(blocks < (int64_t{1} << 31), "simplex_param: too many rows for one CUDA launch: ", c.rows);
  const bool need_dot = c.grad_w != nullptr;
  at::Tensor partials;
  if (need_dot) {
    partials = at::empty({c.rows * c.M * c.K * pieces}, rt.scratch(c.device).dtype(acc_scalar_type<acc_t>()));
  }
  const acc_t* w = static_cast<const acc_t*>(c.w);
  // With M > 1 outputs, this launch gives the dot products only; the input
  // gradients are launch_mix's, below.
  const bool scaled_dx = c.M == 1;
  for (int64_t k0 = 0; k0 < c.K; k0 += kBwdChunk) {
    const int kc = static_cast<int>(std::min<int64_t>(kBwdChunk, c.K - k0));
    Ptrs<const scalar_t, kBwdChunk> xs{};
    Skips<kBwdChunk> x_skip{};
    Ptrs<scalar_t, kBwdChunk> dxs{};
    bool any = need_dot;
    for (int k = 0; k < kc; ++k) {
      if (need_dot) xs.p[k] = static_cast<const scalar_t*>(c.x[k0 + k]);
      x_skip.s[k] = skip_of(c, k0 + k);
      if (scaled_dx) dxs.p[k] = static_cast<scalar_t*>(c.grad_x[k0 + k]);
      any = any || dxs.p[k] != nullptr;
    }
    if (!any) continue;  // nothing of this chunk is wanted
    rt.launch(&backward_kernel<scalar_t, acc_t, V>, blocks, static_cast<const scalar_t*>(c.grad), xs, x_skip, dxs, kc,
              w + k0, c.K, c.M, c.row_len, pieces, tile_len,
              need_dot ? partials.mutable_data_ptr<acc_t>() + k0 * pieces : nullptr, c.skip_zero_weights);
  }
  if (!scaled_dx) {
    // dx_k = sum_m w[r, m, k] * g_m: the M gradients as inputs, the weights
    // transposed, the K input gradients as outputs.
    std::vector<const void*> gs;
    for (int64_t m = 0; m < c.M; ++m) gs.push_back(static_cast<const scalar_t*>(c.grad) + m * c.row_len);
    launch_mix<scalar_t, acc_t, V>(c, gs, std::vector<int64_t>(c.M, (c.M - 1) * c.row_len), c.grad_x, 0,
                                   /*w_out=*/1, /*w_in=*/c.K, rt);
  }
  if (need_dot) {
    const int64_t count = c.rows * c.M * c.K;
    TORCH_CHECK((count + kWarps - 1) / kWarps < (int64_t{1} << 31),
                "simplex_param: too many weights for one CUDA launch: ", count);
    rt.launch(&finish_kernel<acc_t>, (count + kWarps - 1) / kWarps, partials.const_data_ptr<acc_t>(), count, pieces,
              static_cast<acc_t*>(c.grad_w));
  }
}

// The dtype dispatch, then the vector width.
template <typename R>
void forward(const Contraction& c, const R& rt) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.dtype, "simplex_param_forward_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    constexpr int V = kVecBytes / sizeof(scalar_t);
    if (vectorizable<scalar_t>(c)) {
      launch_forward<scalar_t, acc_t, V>(c, rt);
    } else {
      launch_forward<scalar_t, acc_t, 1>(c, rt);
    }
  });
}

template <typename R>
void backward(const Contraction& c, const R& rt) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.dtype, "simplex_param_backward_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    constexpr int V = kVecBytes / sizeof(scalar_t);
    if (vectorizable<scalar_t>(c)) {
      launch_backward<scalar_t, acc_t, V>(c, rt);
    } else {
      launch_backward<scalar_t, acc_t, 1>(c, rt);
    }
  });
}

inline int64_t as_int(const void* p) {
  return static_cast<int64_t>(reinterpret_cast<uintptr_t>(p));
}

// The grouped ops' table of `cs` (one dtype) on the device (layout at Table
// in kernels.cuh), with the blocks' count and, for the backward, the partial
// dot products' buffer it points into.
struct GroupedLaunch {
  at::Tensor table, partials;
  Table view{};
  int64_t blocks = 0;

  template <typename scalar_t, typename acc_t, typename R>
  static GroupedLaunch make(const std::vector<const Contraction*>& cs, bool backward, const R& rt) {
    GroupedLaunch l;
    constexpr int V = kVecBytes / sizeof(scalar_t);
    const int64_t G = static_cast<int64_t>(cs.size()), K = cs[0]->K;
    const int64_t size = (G + 1) + G * kRecord + G * K * (backward ? 2 : 1);
    at::Tensor host = rt.host_table(size);
    int64_t* first = host.mutable_data_ptr<int64_t>();
    int64_t* rec = first + G + 1;
    int64_t* x = rec + G * kRecord;
    int64_t* grad_x = x + G * K;
    int64_t partial_count = 0;
    first[0] = 0;
    for (int64_t j = 0; j < G; ++j) {
      const Contraction& c = *cs[j];
      const bool vec = vectorizable<scalar_t>(c);
      // The single-call tiles: the forward's grid-stride loop has no tiles,
      // so any length gives its bits; the backward's is launch_backward's.
      const int64_t tile_len = int64_t{kThreads} * (vec ? V : 1) * kTileVecs;
      const int64_t n = c.rows * c.row_len, pieces = (n + tile_len - 1) / tile_len;
      int64_t* r = rec + j * kRecord;
      r[kN] = n;
      r[kW] = as_int(c.w);
      r[kData] = as_int(backward ? c.grad : c.out);
      r[kGradW] = as_int(c.grad_w);
      r[kVec] = vec;
      r[kTileLen] = tile_len;
      r[kPartials] = partial_count;  // an offset until the buffer exists
      r[kPieces] = pieces;
      if (c.grad_w != nullptr) partial_count += K * pieces;
      for (int64_t k = 0; k < K; ++k) {
        x[j * K + k] = k < static_cast<int64_t>(c.x.size()) ? as_int(c.x[k]) : 0;
        if (backward) grad_x[j * K + k] = as_int(c.grad_x[k]);
      }
      first[j + 1] = first[j] + pieces;
    }
    l.blocks = first[G];
    TORCH_CHECK(l.blocks < (int64_t{1} << 31), "simplex_param: too many tiles for one CUDA launch: ", l.blocks);
    if (partial_count > 0) {
      l.partials = at::empty({partial_count}, rt.scratch(cs[0]->device).dtype(acc_scalar_type<acc_t>()));
      for (int64_t j = 0; j < G; ++j) {
        int64_t* r = rec + j * kRecord;
        r[kPartials] = r[kGradW] != 0 ? as_int(l.partials.mutable_data_ptr<acc_t>() + r[kPartials]) : 0;
      }
    }
    l.table = rt.to_device(host, cs[0]->device);
    const int64_t* d = l.table.const_data_ptr<int64_t>();
    l.view = Table{d, d + G + 1, d + G + 1 + G * kRecord, backward ? d + G + 1 + G * kRecord + G * K : nullptr, G, K};
    return l;
  }
};

// The contractions of `cs`, split by dtype; f(pointers to those of one dtype).
template <typename F>
void by_dtype(c10::ArrayRef<Contraction> cs, F&& f) {
  std::vector<bool> done(cs.size(), false);
  for (size_t i = 0; i < cs.size(); ++i) {
    if (done[i]) continue;
    std::vector<const Contraction*> same;
    for (size_t j = i; j < cs.size(); ++j) {
      if (!done[j] && cs[j].dtype == cs[i].dtype) {
        same.push_back(&cs[j]);
        done[j] = true;
      }
    }
    f(same);
  }
}

template <typename R>
void forward_batch(c10::ArrayRef<Contraction> cs, const R& rt) {
  by_dtype(cs, [&](const std::vector<const Contraction*>& same) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, same[0]->dtype, "simplex_param_grouped_forward_cuda", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      constexpr int V = kVecBytes / sizeof(scalar_t);
      const GroupedLaunch launch = GroupedLaunch::make<scalar_t, acc_t>(same, /*backward=*/false, rt);
      rt.launch(&grouped_forward_kernel<scalar_t, acc_t, V>, launch.blocks, launch.view);
    });
  });
}

template <typename R>
void backward_batch(c10::ArrayRef<Contraction> cs, const R& rt) {
  by_dtype(cs, [&](const std::vector<const Contraction*>& same) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, same[0]->dtype, "simplex_param_grouped_backward_cuda", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      constexpr int V = kVecBytes / sizeof(scalar_t);
      const GroupedLaunch launch = GroupedLaunch::make<scalar_t, acc_t>(same, /*backward=*/true, rt);
      rt.launch(&grouped_backward_kernel<scalar_t, acc_t, V>, launch.blocks, launch.view, same[0]->skip_zero_weights);
      if (launch.partials.defined()) {
        const int64_t count = launch.view.G * launch.view.K;
        TORCH_CHECK((count + kWarps - 1) / kWarps < (int64_t{1} << 31),
                    "simplex_param: too many weights for one CUDA launch: ", count);
        rt.launch(&grouped_finish_kernel<acc_t>, (count + kWarps - 1) / kWarps, launch.view);
      }
    });
  });
}

} // namespace cuda
} // namespace simplex_param
