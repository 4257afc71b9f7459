// The CPU kernels of mHC's fused pre-mix (../hyper_connections.h), for one
// instruction set: hc_cpu.cpp includes this header once per set, each time
// inside its own `#pragma GCC target` region and namespace SP_HC_ISA, as
// sinkhorn_kernels.h is.
//
// Forward, per token (in parallel over tokens): the token converted to the
// compute dtype once (an L1/L2 buffer), then read from the cache for its
// sum of squares, the M projections (fn's rows 8 at a time against it) and
// the layer input. One read of the residual from memory.
//
// Backward, in two passes. Per token (in parallel over tokens): the n dot
// products <grad_x, r_j>, the mixes' gradient, and the token's gradient
//   grad_r = pre_j grad_x + sum_m grad_dots[m] fn[m] - (sum_m grad_proj[m] proj[m]) rstd^2 / D * r.
// Then fn's gradient, sum over tokens of grad_dots[t] (x) r_t, in parallel
// over blocks of columns (each block's M rows of sums stay in L1), the
// tokens in order: no reduction across threads.
//
// Bitwise the same on every instruction set and thread count: a dot product
// is kLanes partial sums of fused multiply-adds (madd), added pairwise; no
// other a * b + c is contracted (-ffp-contract=off); every other sum is taken
// in a fixed order.
#if defined(__GNUC__)
#define SP_HC_INLINE inline __attribute__((always_inline))
#else
#define SP_HC_INLINE inline
#endif

namespace simplex_param {
namespace cpu {
namespace SP_HC_ISA {

// 64 bytes of lanes: one AVX-512 register, two AVX2 ones.
template <typename A>
constexpr int kLanes = 64 / static_cast<int>(sizeof(A));

// src converted to the compute dtype: src itself when it is that dtype,
// else converted into buf (bfloat16 on the bits, which vectorises).
template <typename T, typename A>
SP_HC_INLINE const A* as_acc(const T* src, A* buf, int64_t len) {
  if constexpr (std::is_same_v<T, A>) {
    return src;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    for (int64_t i = 0; i < len; ++i) {
      const uint32_t bits = static_cast<uint32_t>(src[i].x) << 16;
      std::memcpy(buf + i, &bits, sizeof(float));
    }
    return buf;
  } else {
    for (int64_t i = 0; i < len; ++i) buf[i] = static_cast<A>(src[i]);
    return buf;
  }
}

// dst = src converted from the compute dtype (bfloat16 rounded to nearest
// even with NaN made quiet, as c10::BFloat16 does).
template <typename T, typename A>
SP_HC_INLINE void store(const A* src, T* dst, int64_t len) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    for (int64_t i = 0; i < len; ++i) {
      uint32_t bits;
      std::memcpy(&bits, src + i, sizeof(bits));
      const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
      dst[i].x = static_cast<uint16_t>(src[i] != src[i] ? 0x7FC0u : rounded);
    }
  } else {
    for (int64_t i = 0; i < len; ++i) dst[i] = static_cast<T>(src[i]);
  }
}

template <typename A>
SP_HC_INLINE A lane_sum(A* s) {
  for (int w = kLanes<A> / 2; w > 0; w /= 2) {
    for (int l = 0; l < w; ++l) s[l] += s[l + w];
  }
  return s[0];
}

// kLanes values in one GCC vector: the accumulators of dots() live in
// registers (arrays of A do not: GCC keeps them on the stack).
template <typename A>
struct Lanes {
  typedef A type __attribute__((vector_size(64)));
};

// Element i of p in the compute dtype A (bfloat16 on the bits, which
// vectorises), and kLanes of them from p as one vector.
template <typename A, typename T>
SP_HC_INLINE A ld(const T* p, int64_t i) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint32_t bits = static_cast<uint32_t>(p[i].x) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  } else {
    return static_cast<A>(p[i]);
  }
}

template <typename A, typename T>
SP_HC_INLINE typename Lanes<A>::type ld_lanes(const T* p) {
  using V = typename Lanes<A>::type;
  V v;
  if constexpr (std::is_same_v<T, A>) {
    std::memcpy(&v, p, sizeof(V));
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    typedef uint16_t U16 __attribute__((vector_size(32)));
    typedef uint32_t U32 __attribute__((vector_size(64)));
    U16 u;
    std::memcpy(&u, p, sizeof(U16));
    const U32 w = __builtin_convertvector(u, U32) << 16;
    std::memcpy(&v, &w, sizeof(V));
  } else {
    for (int l = 0; l < kLanes<A>; ++l) v[l] = static_cast<A>(p[l]);
  }
  return v;
}

// acc + y * x rounded once (a fused multiply-add), lane by lane: with the
// FMA instructions where the set has them (SP_HC_FMA 512 or 256), else
// std::fma. The same bits on every set, and one instruction where there is
// one (a multiply and an add, unfused, would be two).
template <typename V>
SP_HC_INLINE V madd(V acc, V y, V x) {
  using A = std::remove_reference_t<decltype(acc[0])>;
#if SP_HC_FMA == 512
  if constexpr (std::is_same_v<A, float>) {
    return reinterpret_cast<V>(_mm512_fmadd_ps(reinterpret_cast<__m512>(y), reinterpret_cast<__m512>(x),
                                               reinterpret_cast<__m512>(acc)));
  } else {
    return reinterpret_cast<V>(_mm512_fmadd_pd(reinterpret_cast<__m512d>(y), reinterpret_cast<__m512d>(x),
                                               reinterpret_cast<__m512d>(acc)));
  }
#elif SP_HC_FMA == 256
  using H = std::conditional_t<std::is_same_v<A, float>, __m256, __m256d>;
  H a[2], b[2], c[2];
  std::memcpy(a, &acc, sizeof(V));
  std::memcpy(b, &y, sizeof(V));
  std::memcpy(c, &x, sizeof(V));
  for (int k = 0; k < 2; ++k) {
    if constexpr (std::is_same_v<A, float>) {
      a[k] = _mm256_fmadd_ps(b[k], c[k], a[k]);
    } else {
      a[k] = _mm256_fmadd_pd(b[k], c[k], a[k]);
    }
  }
  V r;
  std::memcpy(&r, a, sizeof(V));
  return r;
#else
  V r;
  for (int l = 0; l < kLanes<A>; ++l) r[l] = std::fma(y[l], x[l], acc[l]);
  return r;
#endif
}

// out[b] = <f[b], v> for b < B in the compute dtype A, each as kLanes
// partial sums added pairwise (the same bits for any B, and whether the
// operands come converted or not): v is read once for the B rows.
template <int B, typename A, typename F, typename X>
SP_HC_INLINE void dots(const F* const* f, const X* v, int64_t len, A* out) {
  using V = typename Lanes<A>::type;
  constexpr int L = kLanes<A>;
  V s[B];
  for (int b = 0; b < B; ++b) s[b] = V{};
  int64_t i = 0;
  for (; i + L <= len; i += L) {
    const V x = ld_lanes<A>(v + i);
    for (int b = 0; b < B; ++b) s[b] = madd(s[b], ld_lanes<A>(f[b] + i), x);
  }
  for (int b = 0; b < B; ++b) {
    alignas(64) A lanes[L];
    std::memcpy(lanes, &s[b], sizeof(V));
    for (int l = 0; i + l < len; ++l) lanes[l] = std::fma(ld<A>(f[b], i + l), ld<A>(v, i + l), lanes[l]);
    out[b] = lane_sum(lanes);
  }
}

// The projections fn @ r of a block of tokens, as GCC vectors of lane
// sums: the columns in chunks of kChunk, each chunk of fn (M x 1 KiB) read
// from L1 for every token of the block, in tiles of kTileTokens tokens by
// kTileRows rows: each vector loaded (a token's or a row's) serves a whole
// row or column of the tile's accumulators, which live in registers (one
// vector is one AVX-512 register, two AVX2 ones, four SSE ones). Each lane
// sums its columns in increasing order, so the bits are those of dots().
template <typename A>
constexpr int64_t kChunk = 1024 / static_cast<int64_t>(sizeof(A));
constexpr int kTileTokens = SP_HC_TILE_TOKENS;
constexpr int kTileRows = SP_HC_TILE_ROWS;

// s[q * M + b] += lanes of f[b] * v[q] over len (a multiple of kLanes), for
// q < Q tokens and b < B rows (f's rows `stride` apart).
template <int Q, int B, typename A>
SP_HC_INLINE void chunk_dots(const A* f, int64_t stride, const A* const* v, int64_t c0, int64_t len,
                             typename Lanes<A>::type* s, int64_t M) {
  using V = typename Lanes<A>::type;
  constexpr int L = kLanes<A>;
  V acc[Q][B];
  for (int q = 0; q < Q; ++q) {
    for (int b = 0; b < B; ++b) acc[q][b] = s[q * M + b];
  }
  for (int64_t i = 0; i < len; i += L) {
    V x[Q];
    for (int q = 0; q < Q; ++q) std::memcpy(&x[q], v[q] + c0 + i, sizeof(V));
    for (int b = 0; b < B; ++b) {
      V y;
      std::memcpy(&y, f + b * stride + i, sizeof(V));
      for (int q = 0; q < Q; ++q) acc[q][b] = madd(acc[q][b], y, x[q]);
    }
  }
  for (int q = 0; q < Q; ++q) {
    for (int b = 0; b < B; ++b) s[q * M + b] = acc[q][b];
  }
}

// The rows of one chunk for Q tokens: tiles of kTileRows rows, then one.
template <int Q, typename A>
SP_HC_INLINE void chunk_rows(const A* packed, int64_t w, int64_t M, const A* const* r, int64_t c0,
                             typename Lanes<A>::type* s) {
  int64_t m = 0;
  for (; m + kTileRows <= M; m += kTileRows) chunk_dots<Q, kTileRows>(packed + m * w, w, r, c0, w, s + m, M);
  for (; m < M; ++m) chunk_dots<Q, 1>(packed + m * w, w, r, c0, w, s + m, M);
}

// d[t * M + m] = <fn[m], r[t]> for the `count` tokens r[0..count):
// chunk_dots over the whole vectors, then the columns past the last whole
// vector per lane, then the lanes added pairwise. fn's chunk is first
// copied into `packed` (M x kChunk): fn's rows, n C values apart (often a
// multiple of 4 KiB), would all fall in the same L1 sets. sums: count * M
// vectors of scratch.
// While it runs, the `ahead` bytes from `next` (the next block) are
// prefetched into L2, a slice per chunk, so that they arrive while this
// block computes.
template <typename A>
void block_dots(const A* fn, int64_t M, int64_t D, const A* const* r, int64_t count, A* packed,
                typename Lanes<A>::type* sums, A* d, const char* next, int64_t ahead) {
  using V = typename Lanes<A>::type;
  constexpr int L = kLanes<A>;
  const int64_t whole = D - D % L;
  const int64_t chunks = std::max<int64_t>(1, (whole + kChunk<A> - 1) / kChunk<A>);
  const int64_t slice = (ahead + chunks - 1) / chunks;
  for (int64_t e = 0; e < count * M; ++e) sums[e] = V{};
  for (int64_t c0 = 0, k = 0; c0 < whole; c0 += kChunk<A>, ++k) {
    const int64_t w = std::min(kChunk<A>, whole - c0);
    for (int64_t b = k * slice; b < std::min(ahead, (k + 1) * slice); b += 64) __builtin_prefetch(next + b, 0, 2);
    for (int64_t m = 0; m < M; ++m) std::memcpy(packed + m * w, fn + m * D + c0, w * sizeof(A));
    int64_t t = 0;
    for (; t + kTileTokens <= count; t += kTileTokens) chunk_rows<kTileTokens>(packed, w, M, r + t, c0, sums + t * M);
    for (; t < count; ++t) chunk_rows<1>(packed, w, M, r + t, c0, sums + t * M);
  }
  for (int64_t t = 0; t < count; ++t) {
    for (int64_t m = 0; m < M; ++m) {
      alignas(64) A lanes[L];
      std::memcpy(lanes, sums + t * M + m, sizeof(V));
      for (int l = 0; whole + l < D; ++l) lanes[l] = std::fma(fn[m * D + whole + l], r[t][whole + l], lanes[l]);
      d[t * M + m] = lane_sum(lanes);
    }
  }
}

// ss[q] = <r[q], r[q]> for q < count, with dots()' bits: four tokens at a
// time, so that four chains of multiply-adds run side by side.
template <typename A>
SP_HC_INLINE void sums_of_squares(const A* const* r, int64_t count, int64_t D, A* ss) {
  int64_t q = 0;
  for (; q + 4 <= count; q += 4) {
    using V = typename Lanes<A>::type;
    constexpr int L = kLanes<A>;
    V s[4] = {};
    int64_t i = 0;
    for (; i + L <= D; i += L) {
      for (int k = 0; k < 4; ++k) {
        V x;
        std::memcpy(&x, r[q + k] + i, sizeof(V));
        s[k] = madd(s[k], x, x);
      }
    }
    for (int k = 0; k < 4; ++k) {
      alignas(64) A lanes[L];
      std::memcpy(lanes, &s[k], sizeof(V));
      for (int l = 0; i + l < D; ++l) lanes[l] = std::fma(r[q + k][i + l], r[q + k][i + l], lanes[l]);
      ss[q + k] = lane_sum(lanes);
    }
  }
  for (; q < count; ++q) dots<1>(&r[q], r[q], D, &ss[q]);
}

// rows[q * stride + i] += sum over m of gd[q * M + m] * f[m * w + i], m in
// order as fused multiply-adds, for q < Q tokens and i < w (whole vectors):
// each vector of f loaded once for the Q tokens.
template <int Q, typename A>
SP_HC_INLINE void add_rows(const A* f, int64_t w, int64_t M, const A* gd, A* rows, int64_t stride) {
  using V = typename Lanes<A>::type;
  constexpr int L = kLanes<A>;
  for (int64_t i = 0; i < w; i += L) {
    V acc[Q];
    for (int q = 0; q < Q; ++q) std::memcpy(&acc[q], rows + q * stride + i, sizeof(V));
    for (int64_t m = 0; m < M; ++m) {
      V y;
      std::memcpy(&y, f + m * w + i, sizeof(V));
      for (int q = 0; q < Q; ++q) acc[q] = madd(acc[q], V{} + gd[q * M + m], y);  // gd broadcast
    }
    for (int q = 0; q < Q; ++q) std::memcpy(rows + q * stride + i, &acc[q], sizeof(V));
  }
}

// Tokens per block of the kernels: the block's fn chunk is read from L1
// once per token, the block's tokens stay in L2 (16 x n C values).
constexpr int64_t kTokens = 16;

// out[k] = <rows[k], v> for k < count: 8 rows at a time, then the rest in
// one pass (v read once per pass).
template <typename A, typename F, typename X>
SP_HC_INLINE void ptr_dots(const F* const* rows, int64_t count, const X* v, int64_t len, A* out) {
  int64_t k = 0;
  for (; k + 8 <= count; k += 8) dots<8>(rows + k, v, len, out + k);
  switch (count - k) {
#define SP_HC_REST(b) \
  case b: return dots<b>(rows + k, v, len, out + k);
    SP_HC_REST(1) SP_HC_REST(2) SP_HC_REST(3) SP_HC_REST(4) SP_HC_REST(5) SP_HC_REST(6) SP_HC_REST(7)
#undef SP_HC_REST
    default: return;
  }
}

// Which of scale's three entries scales mix m.
SP_HC_INLINE int64_t group(int64_t m, int64_t n) { return m < n ? 0 : m < 2 * n ? 1 : 2; }

template <typename A>
SP_HC_INLINE A sigmoid(A v) {
  return A(1) / (A(1) + std::exp(-v));
}

// Tokens per task of the post-mix's at::parallel_for: about 64 Ki
// multiply-adds (about n^2 C per token).
SP_HC_INLINE int64_t post_grain(const HcPost& p) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, p.n * p.n * p.C));
}

template <typename T, typename A>
void forward_tokens(const HcPre& p) {
  const int64_t n = p.n, C = p.C, D = n * C, M = p.M;
  const T* residual = static_cast<const T*>(p.residual);
  const A* fn = static_cast<const A*>(p.fn);
  const A* scale = static_cast<const A*>(p.scale);
  const A* base = static_cast<const A*>(p.base);
  T* x = static_cast<T*>(p.x);
  A* mixes = static_cast<A*>(p.mixes);
  A* proj = static_cast<A*>(p.proj);
  A* rstd = static_cast<A*>(p.rstd);
  using V = typename Lanes<A>::type;
  const int64_t blocks = (p.tokens + kTokens - 1) / kTokens;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> buf((std::is_same_v<T, A> ? 0 : kTokens * D) + C + kTokens * M + n + M * kChunk<A> + kTokens);
    std::vector<A> raw((kTokens * M + 1) * kLanes<A>);  // the lane sums, 64-byte aligned below
    V* sums = reinterpret_cast<V*>((reinterpret_cast<uintptr_t>(raw.data()) + 63) & ~uintptr_t{63});
    A* conv = buf.data();                                 // the block's tokens, when converted
    A* acc = conv + (std::is_same_v<T, A> ? 0 : kTokens * D);  // a layer input
    A* d = acc + C;                                       // fn @ r
    A* pre = d + kTokens * M;
    A* packed = pre + n;                                  // fn's chunk
    A* sq = packed + M * kChunk<A>;                       // the tokens' sums of squares
    const A* r[kTokens];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t t0 = blk * kTokens, count = std::min(kTokens, p.tokens - t0);
      // The tokens in the compute dtype (converted into conv if need be),
      // the next block prefetched meanwhile: read in chunks of a row, 16 rows
      // at once, from memory, the hardware prefetchers would not keep up.
      for (int64_t q = 0; q < count; ++q) r[q] = as_acc(residual + (t0 + q) * D, conv + q * D, D);
      const int64_t ahead = blk + 1 < end ? std::min(kTokens, p.tokens - t0 - count) * D * int64_t{sizeof(T)} : 0;
      block_dots(fn, M, D, r, count, packed, sums, d, reinterpret_cast<const char*>(residual + (t0 + count) * D),
                 ahead);
      sums_of_squares(r, count, D, sq);
      for (int64_t q = 0; q < count; ++q) {
        const int64_t t = t0 + q;
        const A ss = sq[q];
        const A rs = A(1) / std::sqrt(ss / static_cast<A>(D) + static_cast<A>(p.rms_eps));
        for (int64_t m = 0; m < M; ++m) {
          const A pm = d[q * M + m] * rs;
          proj[t * M + m] = pm;
          mixes[t * M + m] = pm * scale[group(m, n)] + base[m];
        }
        for (int64_t j = 0; j < n; ++j) pre[j] = sigmoid(mixes[t * M + j]) + static_cast<A>(p.pre_eps);
        rstd[t] = rs;
        for (int64_t c = 0; c < C; ++c) acc[c] = pre[0] * r[q][c];
        for (int64_t j = 1; j < n; ++j) {
          const A* rj = r[q] + j * C;
          for (int64_t c = 0; c < C; ++c) acc[c] += pre[j] * rj[c];
        }
        store(acc, x + t * C, C);
      }
    }
  });
}

// The first pass of the backward: everything per token (the file's comment).
template <typename T, typename A>
void backward_tokens(const HcPre& p) {
  constexpr int L = kLanes<A>;
  const int64_t n = p.n, C = p.C, D = n * C, M = p.M;
  const int64_t whole = D - D % L;
  const T* residual = static_cast<const T*>(p.residual);
  const T* grad_x = static_cast<const T*>(p.grad_x);
  const A* fn = static_cast<const A*>(p.fn);
  const A* scale = static_cast<const A*>(p.scale);
  const A* mixes = static_cast<const A*>(p.mixes);
  const A* proj = static_cast<const A*>(p.proj);
  const A* rstd = static_cast<const A*>(p.rstd);
  const A* grad_mixes = static_cast<const A*>(p.grad_mixes);
  T* grad_residual = static_cast<T*>(p.grad_residual);
  A* grad_mix = static_cast<A*>(p.grad_mix);
  A* grad_dots = static_cast<A*>(p.grad_dots);
  const int64_t blocks = (p.tokens + kTokens - 1) / kTokens;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> buf(kTokens * D + D + C + 2 * n + M * kChunk<A>);
    A* rows = buf.data();              // the block's tokens' gradients
    A* conv = rows + kTokens * D;      // a token, when converted
    A* gconv = conv + D;               // grad_x's row, when converted
    A* gp = gconv + C;                 // <grad_x, r_j>
    A* pre = gp + n;
    A* packed = pre + n;               // fn's chunk
    std::vector<const A*> streams(n);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t t0 = blk * kTokens, count = std::min(kTokens, p.tokens - t0);
      // Per token: the scalars, then coef * r + pre_j * grad_x into its row.
      for (int64_t q = 0; q < count; ++q) {
        const int64_t t = t0 + q;
        const A* r = as_acc(residual + t * D, conv, D);
        const A* g = as_acc(grad_x + t * C, gconv, C);
        for (int64_t j = 0; j < n; ++j) streams[j] = r + j * C;
        ptr_dots(streams.data(), n, g, C, gp);
        const A rs = rstd[t];
        A pp = 0;  // sum_m grad_proj[m] proj[m]
        for (int64_t m = 0; m < M; ++m) {
          A gm = grad_mixes != nullptr ? grad_mixes[t * M + m] : A(0);
          if (m < n) {
            const A s = sigmoid(mixes[t * M + m]);
            pre[m] = s + static_cast<A>(p.pre_eps);
            gm += gp[m] * (s * (A(1) - s));
          }
          grad_mix[t * M + m] = gm;
          const A gproj = gm * scale[group(m, n)];
          grad_dots[t * M + m] = gproj * rs;
          pp += gproj * proj[t * M + m];
        }
        const A coef = -pp * rs * rs / static_cast<A>(D);
        A* row = rows + q * D;
        for (int64_t i = 0; i < D; ++i) row[i] = coef * r[i];
        for (int64_t j = 0; j < n; ++j) {
          A* rowj = row + j * C;
          for (int64_t c = 0; c < C; ++c) rowj[c] += pre[j] * g[c];
        }
      }
      // row += sum_m grad_dots[m] fn[m], m in order, one fused multiply-add
      // each: fn's chunk packed in L1 for the block, each of its vectors
      // loaded once for kTileTokens tokens.
      for (int64_t c0 = 0; c0 < whole; c0 += kChunk<A>) {
        const int64_t w = std::min(kChunk<A>, whole - c0);
        for (int64_t m = 0; m < M; ++m) std::memcpy(packed + m * w, fn + m * D + c0, w * sizeof(A));
        int64_t q = 0;
        for (; q + kTileTokens <= count; q += kTileTokens) {
          add_rows<kTileTokens>(packed, w, M, grad_dots + (t0 + q) * M, rows + q * D + c0, D);
        }
        for (; q < count; ++q) add_rows<1>(packed, w, M, grad_dots + (t0 + q) * M, rows + q * D + c0, D);
      }
      for (int64_t q = 0; q < count; ++q) {
        A* row = rows + q * D;
        const A* gd = grad_dots + (t0 + q) * M;
        for (int64_t i = whole; i < D; ++i) {
          for (int64_t m = 0; m < M; ++m) row[i] = std::fma(gd[m], fn[m * D + i], row[i]);
        }
        store(row, grad_residual + (t0 + q) * D, D);
      }
    }
  });
}

// The second pass: grad_fn[m, i] = sum over t of grad_dots[t, m] r_t[i],
// tokens 4 at a time, in order.
template <typename T, typename A>
void backward_fn(const HcPre& p) {
  constexpr int64_t kCols = 1024 / static_cast<int64_t>(sizeof(A));
  const int64_t D = p.n * p.C, M = p.M;
  const T* residual = static_cast<const T*>(p.residual);
  const A* grad_dots = static_cast<const A*>(p.grad_dots);
  A* grad_fn = static_cast<A*>(p.grad_fn);
  const int64_t blocks = (D + kCols - 1) / kCols;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> buf((M + 4) * kCols);
    A* sums = buf.data();
    A* conv = sums + M * kCols;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t c0 = b * kCols, w = std::min(kCols, D - c0);
      std::fill(sums, sums + M * kCols, A(0));
      int64_t t = 0;
      for (; t + 4 <= p.tokens; t += 4) {
        const A* r[4];
        for (int q = 0; q < 4; ++q) r[q] = as_acc(residual + (t + q) * D + c0, conv + q * kCols, w);
        const A* gd = grad_dots + t * M;
        for (int64_t m = 0; m < M; ++m) {
          const A a0 = gd[m], a1 = gd[M + m], a2 = gd[2 * M + m], a3 = gd[3 * M + m];
          A* s = sums + m * kCols;
          for (int64_t i = 0; i < w; ++i) s[i] += (a0 * r[0][i] + a1 * r[1][i]) + (a2 * r[2][i] + a3 * r[3][i]);
        }
      }
      for (; t < p.tokens; ++t) {
        const A* r = as_acc(residual + t * D + c0, conv, w);
        for (int64_t m = 0; m < M; ++m) {
          const A a = grad_dots[t * M + m];
          A* s = sums + m * kCols;
          for (int64_t i = 0; i < w; ++i) s[i] += a * r[i];
        }
      }
      for (int64_t m = 0; m < M; ++m) std::copy(sums + m * kCols, sums + m * kCols + w, grad_fn + m * D + c0);
    }
  });
}

template <typename T, typename A>
void backward_all(const HcPre& p) {
  backward_tokens<T, A>(p);
  backward_fn<T, A>(p);
}

// The post-mix, per token (in parallel over tokens): the operands read in
// their dtype and converted in registers, each output summed in an L1
// buffer.
template <typename T, typename A>
void post_forward_tokens(const HcPost& p) {
  const int64_t n = p.n, C = p.C;
  const T* layer_output = static_cast<const T*>(p.layer_output);
  const T* residual = static_cast<const T*>(p.residual);
  const A* post = static_cast<const A*>(p.post);
  const A* h = static_cast<const A*>(p.h);
  T* out = static_cast<T*>(p.out);
  at::parallel_for(0, p.tokens, post_grain(p), [&](int64_t begin, int64_t end) {
    std::vector<A> acc(C);
    for (int64_t t = begin; t < end; ++t) {
      const T* f = layer_output + t * C;
      const T* r = residual + t * n * C;
      const A* ht = h + t * n * n;
      for (int64_t i = 0; i < n; ++i) {
        const A w = post[t * n + i];
        for (int64_t c = 0; c < C; ++c) acc[c] = w * ld<A>(f, c);
        for (int64_t j = 0; j < n; ++j) {
          const A hji = ht[j * n + i];
          const T* rj = r + j * C;
          for (int64_t c = 0; c < C; ++c) acc[c] += hji * ld<A>(rj, c);
        }
        store(acc.data(), out + (t * n + i) * C, C);
      }
    }
  });
}

template <typename T, typename A>
void post_backward_tokens(const HcPost& p) {
  const int64_t n = p.n, C = p.C;
  const T* layer_output = static_cast<const T*>(p.layer_output);
  const T* residual = static_cast<const T*>(p.residual);
  const T* grad = static_cast<const T*>(p.grad);
  const A* post = static_cast<const A*>(p.post);
  const A* h = static_cast<const A*>(p.h);
  T* grad_f = static_cast<T*>(p.grad_layer_output);
  T* grad_r = static_cast<T*>(p.grad_residual);
  A* grad_post = static_cast<A*>(p.grad_post);
  A* grad_h = static_cast<A*>(p.grad_h);
  at::parallel_for(0, p.tokens, post_grain(p), [&](int64_t begin, int64_t end) {
    std::vector<A> acc(C), d(n + 1);
    std::vector<const T*> rows(n + 1);
    for (int64_t t = begin; t < end; ++t) {
      const T* g = grad + t * n * C;
      const A* pt = post + t * n;
      const A* ht = h + t * n * n;
      rows[0] = layer_output + t * C;
      for (int64_t j = 0; j < n; ++j) rows[j + 1] = residual + (t * n + j) * C;
      for (int64_t i = 0; i < n; ++i) {
        ptr_dots(rows.data(), n + 1, g + i * C, C, d.data());
        grad_post[t * n + i] = d[0];
        for (int64_t j = 0; j < n; ++j) grad_h[t * n * n + j * n + i] = d[j + 1];
      }
      // grad_f = sum_i post_i g_i, then grad_r_j = sum_i H[j, i] g_i.
      for (int64_t j = -1; j < n; ++j) {
        const A* w = j < 0 ? pt : ht + j * n;
        for (int64_t c = 0; c < C; ++c) acc[c] = w[0] * ld<A>(g, c);
        for (int64_t i = 1; i < n; ++i) {
          const T* gi = g + i * C;
          for (int64_t c = 0; c < C; ++c) acc[c] += w[i] * ld<A>(gi, c);
        }
        store(acc.data(), j < 0 ? grad_f + t * C : grad_r + (t * n + j) * C, C);
      }
    }
  });
}

inline void post_forward(const HcPost& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dtype, "hc_post_cpu", [&] {
    post_forward_tokens<scalar_t, at::opmath_type<scalar_t>>(p);
  });
}

inline void post_backward(const HcPost& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dtype, "hc_post_backward_cpu", [&] {
    post_backward_tokens<scalar_t, at::opmath_type<scalar_t>>(p);
  });
}

inline void forward(const HcPre& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dtype, "hc_pre_cpu", [&] {
    forward_tokens<scalar_t, at::opmath_type<scalar_t>>(p);
  });
}

inline void backward(const HcPre& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dtype, "hc_pre_backward_cpu", [&] {
    backward_all<scalar_t, at::opmath_type<scalar_t>>(p);
  });
}

} // namespace SP_HC_ISA
} // namespace cpu
} // namespace simplex_param

#undef SP_HC_INLINE
