// The CPU kernels of the Sinkhorn normalisation (../sinkhorn.h), for one
// instruction set: sinkhorn_cpu.cpp includes this header once per set, each
// time inside its own `#pragma GCC target` region and namespace SP_SINK_ISA,
// as kernels.h is for the contraction.
//
// Matrices are done kLanes at a time (a block), lane-major: entry (i, j) of
// the block's matrix l is at m[(i * n + j) * kLanes + l]. Every operation is
// then a loop over the lanes that the compiler vectorises for the target,
// and for n <= 16 (N > 0, the size a template argument) the block of one
// step lives on the stack in L1 with every loop over i and j unrolled. N = 0
// is the generic loop, with n a run-time value, for n > 16.
//
// Bitwise the same on every instruction set and thread count: no a * b + c
// contraction (-ffp-contract=off), std::exp per lane (never vectorised: no
// -ffast-math), every sum taken in index order, each matrix on its own.
#if defined(__GNUC__)
#define SP_SINK_INLINE inline __attribute__((always_inline))
#else
#define SP_SINK_INLINE inline
#endif

namespace simplex_param {
namespace cpu {
namespace SP_SINK_ISA {

// 64 bytes of lanes: one AVX-512 register, two AVX2 ones.
template <typename A>
constexpr int kLanes = 64 / static_cast<int>(sizeof(A));

// n, known at compile time when N > 0.
template <int N>
struct Size {
  int rt;
  SP_SINK_INLINE int operator()() const { return N > 0 ? N : rt; }
};

// s = softmax of each row of x (the row maximum subtracted first); x and s
// may be the same buffer.
template <int N, typename A>
SP_SINK_INLINE void softmax_rows(const A* x, A* s, Size<N> size) {
  constexpr int L = kLanes<A>;
  const int n = size();
  for (int i = 0; i < n; ++i) {
    const A* xr = x + i * n * L;
    A* sr = s + i * n * L;
    alignas(64) A mx[L], sum[L];
    for (int l = 0; l < L; ++l) mx[l] = xr[l];
    for (int j = 1; j < n; ++j) {
      for (int l = 0; l < L; ++l) mx[l] = mx[l] < xr[j * L + l] ? xr[j * L + l] : mx[l];
    }
    for (int j = 0; j < n; ++j) {
      for (int l = 0; l < L; ++l) sr[j * L + l] = std::exp(xr[j * L + l] - mx[l]);
    }
    for (int l = 0; l < L; ++l) sum[l] = sr[l];
    for (int j = 1; j < n; ++j) {
      for (int l = 0; l < L; ++l) sum[l] += sr[j * L + l];
    }
    for (int j = 0; j < n; ++j) {
      for (int l = 0; l < L; ++l) sr[j * L + l] /= sum[l];
    }
  }
}

// Step k of the forward: z = y / d with d = sum(y) + eps over each column
// (k even) or row (k odd). y and z may be the same buffer; d gets n * L values.
template <int N, typename A>
SP_SINK_INLINE void normalize(const A* y, A* z, A* d, int64_t k, A eps, Size<N> size) {
  constexpr int L = kLanes<A>;
  const int n = size();
  if (k % 2 == 0) {  // columns: d[j] = sum_i y[i, j] + eps
    for (int j = 0; j < n; ++j) {
      for (int l = 0; l < L; ++l) d[j * L + l] = y[j * L + l];
    }
    for (int i = 1; i < n; ++i) {
      for (int j = 0; j < n; ++j) {
        for (int l = 0; l < L; ++l) d[j * L + l] += y[(i * n + j) * L + l];
      }
    }
    for (int j = 0; j < n; ++j) {
      for (int l = 0; l < L; ++l) d[j * L + l] += eps;
    }
    for (int i = 0; i < n; ++i) {
      for (int j = 0; j < n; ++j) {
        for (int l = 0; l < L; ++l) z[(i * n + j) * L + l] = y[(i * n + j) * L + l] / d[j * L + l];
      }
    }
  } else {  // rows: d[i] = sum_j y[i, j] + eps
    for (int i = 0; i < n; ++i) {
      const A* yr = y + i * n * L;
      A* zr = z + i * n * L;
      A* di = d + i * L;
      for (int l = 0; l < L; ++l) di[l] = yr[l];
      for (int j = 1; j < n; ++j) {
        for (int l = 0; l < L; ++l) di[l] += yr[j * L + l];
      }
      for (int l = 0; l < L; ++l) di[l] += eps;
      for (int j = 0; j < n; ++j) {
        for (int l = 0; l < L; ++l) zr[j * L + l] = yr[j * L + l] / di[l];
      }
    }
  }
}

// The vector-Jacobian product of step k, in place on g: with z the step's
// output and d its denominators, g = (g - sum(g * z)) / d along the step's
// direction.
template <int N, typename A>
SP_SINK_INLINE void normalize_vjp(A* g, const A* z, const A* d, int64_t k, Size<N> size) {
  constexpr int L = kLanes<A>;
  const int n = size();
  if (k % 2 == 0) {  // columns
    alignas(64) A t[(N > 0 ? N : 1) * L];
    std::vector<A> heap(N > 0 ? 0 : n * L);
    A* tj = N > 0 ? t : heap.data();
    for (int j = 0; j < n; ++j) {
      for (int l = 0; l < L; ++l) tj[j * L + l] = g[j * L + l] * z[j * L + l];
    }
    for (int i = 1; i < n; ++i) {
      for (int j = 0; j < n; ++j) {
        for (int l = 0; l < L; ++l) tj[j * L + l] += g[(i * n + j) * L + l] * z[(i * n + j) * L + l];
      }
    }
    for (int i = 0; i < n; ++i) {
      for (int j = 0; j < n; ++j) {
        for (int l = 0; l < L; ++l) {
          A& gij = g[(i * n + j) * L + l];
          gij = (gij - tj[j * L + l]) / d[j * L + l];
        }
      }
    }
  } else {  // rows
    for (int i = 0; i < n; ++i) {
      A* gr = g + i * n * L;
      const A* zr = z + i * n * L;
      alignas(64) A t[L];
      for (int l = 0; l < L; ++l) t[l] = gr[l] * zr[l];
      for (int j = 1; j < n; ++j) {
        for (int l = 0; l < L; ++l) t[l] += gr[j * L + l] * zr[j * L + l];
      }
      for (int j = 0; j < n; ++j) {
        for (int l = 0; l < L; ++l) gr[j * L + l] = (gr[j * L + l] - t[l]) / d[i * L + l];
      }
    }
  }
}

// The softmax's vector-Jacobian product, per row: out = s * (g - sum(g * s)).
template <int N, typename A>
SP_SINK_INLINE void softmax_vjp(const A* g, const A* s, A* out, Size<N> size) {
  constexpr int L = kLanes<A>;
  const int n = size();
  for (int i = 0; i < n; ++i) {
    const A* gr = g + i * n * L;
    const A* sr = s + i * n * L;
    A* outr = out + i * n * L;
    alignas(64) A t[L];
    for (int l = 0; l < L; ++l) t[l] = gr[l] * sr[l];
    for (int j = 1; j < n; ++j) {
      for (int l = 0; l < L; ++l) t[l] += gr[j * L + l] * sr[j * L + l];
    }
    for (int j = 0; j < n; ++j) {
      for (int l = 0; l < L; ++l) outr[j * L + l] = sr[j * L + l] * (gr[j * L + l] - t[l]);
    }
  }
}

// Block b's matrices, lane-major, into m: matrices [b * L, b * L + L) of
// `count`, the missing ones of the last block copies of its last matrix.
template <typename A>
SP_SINK_INLINE void load_block(const A* src, A* m, int64_t b, int64_t count, int64_t nn) {
  constexpr int L = kLanes<A>;
  for (int l = 0; l < L; ++l) {
    const A* p = src + std::min<int64_t>(b * L + l, count - 1) * nn;
    for (int64_t e = 0; e < nn; ++e) m[e * L + l] = p[e];
  }
}

template <typename A>
SP_SINK_INLINE void store_block(const A* m, A* dst, int64_t b, int64_t count, int64_t nn) {
  constexpr int L = kLanes<A>;
  const int valid = static_cast<int>(std::min<int64_t>(L, count - b * L));
  for (int l = 0; l < valid; ++l) {
    A* p = dst + (b * L + l) * nn;
    for (int64_t e = 0; e < nn; ++e) p[e] = m[e * L + l];
  }
}

// Blocks per task of at::parallel_for: about 2^16 element-steps each, so
// that small problems stay on one thread.
inline int64_t block_grain(int64_t nn, int64_t steps, int L) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, nn * (steps + 1) * L));
}

template <int N, typename A>
void forward_blocks(const Sinkhorn& p) {
  constexpr int L = kLanes<A>;
  const Size<N> size{static_cast<int>(p.n)};
  const int64_t nn = p.n * p.n, steps = sinkhorn_steps(p.iters);
  const int64_t blocks = (p.count + L - 1) / L;
  const A eps = static_cast<A>(p.eps);
  const A* x = static_cast<const A*>(p.logits);
  A* out = static_cast<A*>(p.out);
  at::parallel_for(0, blocks, block_grain(nn, steps, L), [&](int64_t begin, int64_t end) {
    alignas(64) A m_stack[(N > 0 ? N * N : 1) * L], d_stack[(N > 0 ? N : 1) * L];
    std::vector<A> heap(N > 0 ? 0 : (nn + p.n) * L);
    A* m = N > 0 ? m_stack : heap.data();
    A* d = N > 0 ? d_stack : heap.data() + nn * L;
    for (int64_t b = begin; b < end; ++b) {
      load_block(x, m, b, p.count, nn);
      softmax_rows<N>(m, m, size);
      for (int64_t e = 0; e < nn * L; ++e) m[e] += eps;
      for (int64_t k = 0; k < steps; ++k) normalize<N>(m, m, d, k, eps, size);
      store_block(m, out, b, p.count, nn);
    }
  });
}

// The forward again, keeping the softmax and every step's output and
// denominators of the block (a tape of (steps + 2) n^2 + steps n values per
// lane), then the steps' vector-Jacobian products in reverse.
template <int N, typename A>
void backward_blocks(const Sinkhorn& p) {
  constexpr int L = kLanes<A>;
  const Size<N> size{static_cast<int>(p.n)};
  const int64_t nn = p.n * p.n, steps = sinkhorn_steps(p.iters);
  const int64_t blocks = (p.count + L - 1) / L;
  const A eps = static_cast<A>(p.eps);
  const A* x = static_cast<const A*>(p.logits);
  const A* grad = static_cast<const A*>(p.grad);
  A* out = static_cast<A*>(p.out);
  at::parallel_for(0, blocks, block_grain(nn, 2 * steps, L), [&](int64_t begin, int64_t end) {
    // s, then y_0 .. y_steps (y_0 = s + eps), then g, then d_0 .. d_{steps-1}.
    std::vector<A> tape(((steps + 3) * nn + steps * p.n) * L);
    A* s = tape.data();
    A* y = s + nn * L;
    A* g = y + (steps + 1) * nn * L;
    A* d = g + nn * L;
    for (int64_t b = begin; b < end; ++b) {
      load_block(x, s, b, p.count, nn);
      softmax_rows<N>(s, s, size);
      for (int64_t e = 0; e < nn * L; ++e) y[e] = s[e] + eps;
      for (int64_t k = 0; k < steps; ++k) {
        normalize<N>(y + k * nn * L, y + (k + 1) * nn * L, d + k * p.n * L, k, eps, size);
      }
      load_block(grad, g, b, p.count, nn);
      for (int64_t k = steps - 1; k >= 0; --k) normalize_vjp<N>(g, y + (k + 1) * nn * L, d + k * p.n * L, k, size);
      softmax_vjp<N>(g, s, y, size);  // y_0 is no longer needed: the result goes there
      store_block(y, out, b, p.count, nn);
    }
  });
}

// n <= 16: the size a template argument; larger: the generic loop.
template <typename A, template <int, typename> class Run>
void by_size(const Sinkhorn& p) {
  switch (p.n) {
#define SP_SINK_CASE(n) \
  case n: return Run<n, A>::run(p);
    SP_SINK_CASE(1) SP_SINK_CASE(2) SP_SINK_CASE(3) SP_SINK_CASE(4) SP_SINK_CASE(5) SP_SINK_CASE(6)
    SP_SINK_CASE(7) SP_SINK_CASE(8) SP_SINK_CASE(9) SP_SINK_CASE(10) SP_SINK_CASE(11) SP_SINK_CASE(12)
    SP_SINK_CASE(13) SP_SINK_CASE(14) SP_SINK_CASE(15) SP_SINK_CASE(16)
#undef SP_SINK_CASE
    default: return Run<0, A>::run(p);
  }
}

template <int N, typename A>
struct Forward {
  static void run(const Sinkhorn& p) { forward_blocks<N, A>(p); }
};
template <int N, typename A>
struct Backward {
  static void run(const Sinkhorn& p) { backward_blocks<N, A>(p); }
};

inline void forward(const Sinkhorn& p) {
  if (p.dtype == at::kDouble) return by_size<double, Forward>(p);
  return by_size<float, Forward>(p);
}

inline void backward(const Sinkhorn& p) {
  if (p.dtype == at::kDouble) return by_size<double, Backward>(p);
  return by_size<float, Backward>(p);
}

} // namespace SP_SINK_ISA
} // namespace cpu
} // namespace simplex_param
