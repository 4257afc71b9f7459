// How the CPU kernels cut a contraction (contraction.h) into tiles, and
// the interface between the parallel loop (contraction_cpu.cpp) and the
// per-instruction-set kernels (kernels.h, built once per instruction set).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../contraction.h"

namespace simplex_param {
namespace cpu {

constexpr int64_t kBlock = 2048;  // elements per tile
constexpr int kLanes = 32;        // partial sums of a dot product

// The tiles of a (rows x row_len) range: a piece of one row when rows are
// long (one row in all for shared (K,) weights), or a run of whole rows when
// they are short.
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
  inline void for_each_segment(int64_t t, F&& f) const {
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

// Tiles [t0, t1) of one contraction. The backward writes the dot products of
// a row in one piece to grad_w, of a row in several to
// partials[(row * pieces + piece) * K + k] (in the accumulation dtype).
using ForwardTiles = void (*)(const Contraction& c, const Tiles& tiles, int64_t t0, int64_t t1);
using BackwardTiles = void (*)(const Contraction& c, const Tiles& tiles, void* partials, int64_t t0, int64_t t1);

// One instruction set's kernels, per dtype: float, double, half, bfloat16.
struct IsaKernels {
  const char* name;
  ForwardTiles forward[4];
  BackwardTiles backward[4];
};

// The table of namespace `ns`'s kernels: taking their addresses runs none of
// them, so this is built outside the instruction set's target region.
#define SIMPLEX_PARAM_ISA_KERNELS(ns, name)                                                     \
  ::simplex_param::cpu::IsaKernels {                                                            \
    name,                                                                                       \
        {ns::forward_tiles<float>, ns::forward_tiles<double>, ns::forward_tiles<c10::Half>,     \
         ns::forward_tiles<c10::BFloat16>},                                                     \
        {ns::backward_tiles<float>, ns::backward_tiles<double>, ns::backward_tiles<c10::Half>, \
         ns::backward_tiles<c10::BFloat16>},                                                    \
  }

IsaKernels default_kernels();
IsaKernels avx2_kernels();
IsaKernels avx512_kernels();
IsaKernels avx512_bf16_kernels();

} // namespace cpu
} // namespace simplex_param
