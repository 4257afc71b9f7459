// The CPU kernels of the contraction, for one instruction set: this header
// is compiled once per instruction set (isa_*.cpp), each time inside its own
// `#pragma GCC target` region and namespace SP_ISA, as ATen builds its CPU
// kernels once per capability. The code is plain C++ that the compiler
// vectorises for the target; only the native bfloat16 stores (SP_NATIVE_BF16)
// use intrinsics.
//
// A segment (the part of one row in a tile, at most kBlock elements) is done
// with its accumulator on the stack (L1): the forward reads each input once
// and writes the output once; the backward reads the gradient and each input
// once and writes each wanted input gradient once.
//
// Bitwise the same on every instruction set: no contraction of a * b + c
// (-ffp-contract=off), the forward sums inputs in k order, a dot product is
// kLanes partial sums added pairwise, and bfloat16 is rounded to nearest
// even with NaN made quiet, as c10::BFloat16 does (the native conversion,
// which flushes subnormals and keeps NaN payloads, is patched where they
// occur). Tiles depend on the shapes only, so the thread count does not
// change the bits either.

#if defined(__x86_64__) || defined(_M_X64)
#define SP_X86 1
#else
#define SP_X86 0
#endif

namespace simplex_param {
namespace cpu {
namespace SP_ISA {

#if defined(__GNUC__)
#define SP_INLINE inline __attribute__((always_inline))
#else
#define SP_INLINE inline
#endif

// Element conversions to and from the accumulation type. bfloat16 is done on
// the bits, which vectorises.
template <typename T>
SP_INLINE auto load(const T* p, int64_t i) {
  return static_cast<at::opmath_type<T>>(p[i]);
}
template <>
SP_INLINE auto load(const c10::BFloat16* p, int64_t i) {
  const uint32_t bits = static_cast<uint32_t>(p[i].x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
template <typename T, typename A>
SP_INLINE void store(T* p, int64_t i, A v) {
  p[i] = static_cast<T>(v);
}
template <>
SP_INLINE void store(c10::BFloat16* p, int64_t i, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  p[i].x = static_cast<uint16_t>(v != v ? 0x7FC0u : rounded);
}

// dst[i] = src[i] converted, for i < len.
template <typename T, typename A>
SP_INLINE void store_run(T* dst, const A* src, int64_t len) {
  for (int64_t i = 0; i < len; ++i) store(dst, i, src[i]);
}

#if SP_NATIVE_BF16
// The lanes of v that vcvtneps2bf16 rounds unlike c10: it flushes subnormal
// inputs to zero and keeps NaN payloads.
SP_INLINE __mmask16 unlike_c10(__m512 v) {
  const __m512i a = _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7FFFFFFF));
  return _mm512_cmpgt_epu32_mask(a, _mm512_set1_epi32(0x7F800000)) |
      (_mm512_cmplt_epu32_mask(a, _mm512_set1_epi32(0x00800000)) & _mm512_test_epi32_mask(a, a));
}

// dst[i] = scale * src[i] (Scale) or src[i], in bfloat16: 16 lanes at a
// time with vcvtneps2bf16, the lanes unlike_c10 rounded as store() does
// (unless !Patch, where the caller knows there are none).
template <bool Scale, bool Patch = true>
SP_INLINE void native_bf16_run(c10::BFloat16* dst, float scale, const float* src, int64_t len) {
  const __m512 w = _mm512_set1_ps(scale);
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    const __m512 v = Scale ? _mm512_mul_ps(w, _mm512_loadu_ps(src + i)) : _mm512_loadu_ps(src + i);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
    if (!Patch) continue;
    if (const __mmask16 special = unlike_c10(v)) {
      for (int j = 0; j < 16; ++j) {
        if (special & (1u << j)) store(dst, i + j, Scale ? scale * src[i + j] : src[i + j]);
      }
    }
  }
  for (; i < len; ++i) store(dst, i, Scale ? scale * src[i] : src[i]);
}

template <>
SP_INLINE void store_run(c10::BFloat16* dst, const float* src, int64_t len) {
  native_bf16_run<false>(dst, 1.0f, src, len);
}
#endif

// Input streams per pass over the accumulator, at most: all of them (up to
// 16) when the inputs fit in the last-level cache, fewer when they come
// from memory (Contraction::streams, forward_streams in contraction.h).
constexpr int kMaxStreams = 16;

// dst[i] = src[i] converted, for i < len, with non-temporal stores when
// `stream` (opt-in, SIMPLEX_PARAM_STREAM_BYTES: no read for ownership, no
// eviction of the inputs): converted into an L1 buffer, then streamed out
// 16 bytes at a time. The bits are those of store_run.
template <typename T, typename A>
SP_INLINE void write_run(T* dst, const A* src, int64_t len, bool stream) {
#if SP_X86
  if (stream) {
    alignas(64) T tmp[kBlock];
    store_run(tmp, src, len);
    auto* d = reinterpret_cast<char*>(dst);
    const auto* t = reinterpret_cast<const char*>(tmp);
    size_t bytes = static_cast<size_t>(len) * sizeof(T);
    const size_t head = std::min(bytes, (16 - reinterpret_cast<uintptr_t>(d) % 16) % 16);
    std::memcpy(d, t, head);
    size_t i = head;
    for (; i + 16 <= bytes; i += 16) {
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(t + i)));
    }
    std::memcpy(d + i, t + i, bytes - i);
    return;
  }
#endif
  store_run(dst, src, len);
}

// acc (+)= sum over r < R of w[r] * x[r][start + i], for i < len: R input
// streams advance together. Direct: the sums go to out[start + i] instead,
// converted from registers kLanes at a time.
template <int R, bool First, bool Direct, typename scalar_t, typename acc_t>
SP_INLINE void accumulate(
    acc_t* acc, scalar_t* out, const scalar_t* const* xs, const acc_t* w, int64_t start, int64_t len) {
  const scalar_t* x[R];
  acc_t wr[R];
  for (int r = 0; r < R; ++r) {
    x[r] = xs[r] + start;
    wr[r] = w[r];
  }
  auto sum = [&](int64_t i) {
    acc_t a = First ? wr[0] * load(x[0], i) : acc[i] + wr[0] * load(x[0], i);
    for (int r = 1; r < R; ++r) a = a + wr[r] * load(x[r], i);
    return a;
  };
  if constexpr (Direct && std::is_same_v<scalar_t, acc_t> && R <= 8) {
    // Nothing to convert: each sum straight to the output. (With more
    // streams this loop compiled to slower code than the strips below:
    // K = 13 float32, 6.9 against 4.1 ms.)
    for (int64_t i = 0; i < len; ++i) out[start + i] = sum(i);
  } else if constexpr (Direct) {
    int64_t i = 0;
    for (; i + kLanes <= len; i += kLanes) {
      acc_t a[kLanes];
      for (int j = 0; j < kLanes; ++j) a[j] = sum(i + j);
      store_run(out + start + i, a, kLanes);
    }
    for (; i < len; ++i) store(out + start, i, sum(i));
  } else {
    for (int64_t i = 0; i < len; ++i) acc[i] = sum(i);
  }
}

template <bool First, bool Direct, typename scalar_t, typename acc_t>
SP_INLINE void accumulate_n(
    int n, acc_t* acc, scalar_t* out, const scalar_t* const* x, const acc_t* w, int64_t start, int64_t len) {
  switch (n) {
#define SP_CASE(R) \
    case R: accumulate<R, First, Direct>(acc, out, x, w, start, len); break;
    SP_CASE(16) SP_CASE(15) SP_CASE(14) SP_CASE(13) SP_CASE(12) SP_CASE(11) SP_CASE(10) SP_CASE(9)
    SP_CASE(8) SP_CASE(7) SP_CASE(6) SP_CASE(5) SP_CASE(4) SP_CASE(3) SP_CASE(2)
#undef SP_CASE
    default: accumulate<1, First, Direct>(acc, out, x, w, start, len);
  }
}

// out[start, start + len) = sum_k w[k] * xs[k][...], over the inputs whose
// weight is not 0 (the others are not read), `streams` input streams per
// pass over the accumulator. The sum runs in k order, one rounding per
// product and per addition whatever the passes: the same bits.
template <typename scalar_t, typename acc_t>
SP_INLINE void forward_segment(
    const scalar_t* const* xs, const acc_t* w, int64_t K, scalar_t* out, int64_t start, int64_t len, bool stream,
    int streams) {
  if (!stream && K <= streams && std::find(w, w + K, acc_t(0)) == w + K) {
    // One pass over every input, straight to the output: no list of live
    // inputs and no accumulator (which cost 3% on rows of 768 elements).
    accumulate_n<true, true>(static_cast<int>(K), static_cast<acc_t*>(nullptr), out, xs, w, start, len);
    return;
  }
  alignas(64) acc_t acc[kBlock];
  const scalar_t* live_x[kMaxStreams];
  acc_t live_w[kMaxStreams];
  int n = 0;
  bool first = true;
  for (int64_t k = 0; k < K; ++k) {
    if (w[k] == acc_t(0)) continue;
    live_x[n] = xs[k];
    live_w[n] = w[k];
    if (++n == streams) {
      first ? accumulate_n<true, false>(n, acc, out, live_x, live_w, start, len)
            : accumulate_n<false, false>(n, acc, out, live_x, live_w, start, len);
      first = false;
      n = 0;
    }
  }
  if (n > 0 && !stream) {  // the last pass writes the output from registers
    first ? accumulate_n<true, true>(n, acc, out, live_x, live_w, start, len)
          : accumulate_n<false, true>(n, acc, out, live_x, live_w, start, len);
    return;
  }
  if (n > 0) {
    first ? accumulate_n<true, false>(n, acc, out, live_x, live_w, start, len)
          : accumulate_n<false, false>(n, acc, out, live_x, live_w, start, len);
    first = false;
  }
  if (first) {  // every weight of the row is 0
    for (int64_t i = 0; i < len; ++i) acc[i] = acc_t(0);
  }
  write_run(out + start, acc, len, stream);
}

// dx[i] = w * g[i] for i < len (exactly 0 where w is), converted.
template <typename scalar_t, typename acc_t>
SP_INLINE void scaled_run(scalar_t* dx, acc_t w, const acc_t* g, int64_t len) {
  if (w == acc_t(0)) {  // exactly 0, also where grad holds inf or NaN
    for (int64_t i = 0; i < len; ++i) store(dx, i, acc_t(0));
#if SP_NATIVE_BF16
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    native_bf16_run<true>(dx, w, g, len);
#endif
  } else {
    for (int64_t i = 0; i < len; ++i) store(dx, i, w * g[i]);
  }
}

// Whether w[r] * g[j], for r < R and j < len, is never NaN nor subnormal,
// the products that vcvtneps2bf16 rounds unlike c10: the weights finite
// (none 0), and a test of g alone against the smallest |w[r]|. Products of
// at least 2^-125 in magnitude stay normal once rounded.
template <int R>
SP_INLINE bool normal_products(const float* g, const float* w, int64_t len) {
  float w_min = std::numeric_limits<float>::max();
  for (int r = 0; r < R; ++r) {
    const float a = w[r] < 0 ? -w[r] : w[r];
    if (!(a <= std::numeric_limits<float>::max())) return false;  // inf or NaN: inf * 0 is NaN
    w_min = std::min(w_min, a);
  }
  const float tiny = 0x1p-125f / w_min;
  int bad = 0;  // g[j] not 0 and not at least tiny in magnitude (NaN included)
  for (int64_t j = 0; j < len; ++j) bad |= (g[j] != 0.0f) & !(g[j] >= tiny) & !(g[j] <= -tiny);
  return bad == 0;
}

// dx[j] = w * g[j] for j < kLanes, converted; w not 0 and, for bfloat16 with
// the native conversion, the products normal (normal_products).
template <typename scalar_t, typename acc_t>
SP_INLINE void scaled_lanes(scalar_t* __restrict dx, acc_t w, const acc_t* __restrict g) {
#if SP_NATIVE_BF16
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    native_bf16_run</*Scale=*/true, /*Patch=*/false>(dx, w, g, kLanes);
    return;
  }
#endif
  for (int j = 0; j < kLanes; ++j) store(dx, j, w * g[j]);
}

// The whole kLanes steps of backward_inputs when every input is treated
// alike: Write, each dx[r] written (no weight 0, the products normal where
// scaled_lanes needs it); Read, each x[r] read. With the tests out of the
// loop, the partial sums stay in registers instead of being loaded and stored
// at every step (K = 8, 2 threads, against a plain AVX-512 intrinsics loop:
// float32 from 1.09x to 1.03-1.05x of its time, bfloat16 from about 1.14x to
// 1.06x; fully unrolling the 32 lanes as well was slower, and doubled the
// build). The same operations in the same order: the same bits. Returns the
// elements done.
template <int R, bool Write, bool Read, typename scalar_t, typename acc_t>
SP_INLINE int64_t uniform_lanes(
    const acc_t* __restrict g, const scalar_t* const* x, scalar_t* const* dx, const acc_t* w, acc_t (&s)[R][kLanes], int64_t len) {
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      if constexpr (Write) scaled_lanes(dx[r] + i, w[r], g + i);
      if constexpr (Read) {
        for (int j = 0; j < kLanes; ++j) s[r][j] = s[r][j] + g[i + j] * load(x[r], i + j);
      }
    }
  }
  return i;
}

// Inputs per interleaved pass of the backward: 2 * R accumulator registers
// of 16 float32 lanes on AVX-512.
constexpr int kBackwardStreams = 8;

// The backward of R inputs over [start, start + len), interleaved as
// torch.compile's loop is: every 32 elements, each input's gradient is
// written and its dot product advanced, so the gradient, the R inputs and
// the R input gradients stream together (measured faster than one input
// after the other, in cache and from memory: docs/benchmarks.md). dot[r]
// is <g, x_r> (kLanes partial sums added pairwise), or 0 where read[r] is
// false, and x_r is then not read.
template <int R, typename scalar_t, typename acc_t>
SP_INLINE void backward_inputs(
    const acc_t* __restrict g, const scalar_t* const* xs, scalar_t* const* dxs, const acc_t* w, const bool* read,
    acc_t* dot, int64_t start, int64_t len) {
  acc_t s[R][kLanes] = {};
  const scalar_t* x[R];
  scalar_t* dx[R];
  for (int r = 0; r < R; ++r) {
    x[r] = read[r] ? xs[r] + start : nullptr;
    dx[r] = dxs[r] != nullptr ? dxs[r] + start : nullptr;
  }
  bool write_all = true, write_none = true, read_all = true, read_none = true;
  for (int r = 0; r < R; ++r) {
    write_all = write_all && dx[r] != nullptr && w[r] != acc_t(0);
    write_none = write_none && dx[r] == nullptr;
    read_all = read_all && x[r] != nullptr;
    read_none = read_none && x[r] == nullptr;
  }
#if SP_NATIVE_BF16
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) write_all = write_all && normal_products<R>(g, w, len);
#endif
  int64_t i = 0;
  if (write_all && read_all) {
    i = uniform_lanes<R, true, true>(g, x, dx, w, s, len);
  } else if (write_all && read_none) {
    i = uniform_lanes<R, true, false>(g, x, dx, w, s, len);
  } else if (write_none && read_all) {
    i = uniform_lanes<R, false, true>(g, x, dx, w, s, len);
  }
  for (; i + kLanes <= len; i += kLanes) {
    for (int r = 0; r < R; ++r) {
      if (dx[r] != nullptr) scaled_run(dx[r] + i, w[r], g + i, kLanes);
      if (x[r] != nullptr) {
        for (int j = 0; j < kLanes; ++j) s[r][j] = s[r][j] + g[i + j] * load(x[r], i + j);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    if (dx[r] != nullptr) scaled_run(dx[r] + i, w[r], g + i, len - i);
    if (x[r] == nullptr) {
      dot[r] = acc_t(0);
      continue;
    }
    for (int64_t t = i, j = 0; t < len; ++t, ++j) s[r][j] = s[r][j] + g[t] * load(x[r], t);
    for (int width = kLanes / 2; width > 0; width /= 2) {
      for (int j = 0; j < width; ++j) s[r][j] = s[r][j] + s[r][j + width];
    }
    dot[r] = s[r][0];
  }
}

template <typename scalar_t, typename acc_t>
SP_INLINE void backward_inputs_n(
    int n, const acc_t* g, const scalar_t* const* xs, scalar_t* const* dxs, const acc_t* w, const bool* read,
    acc_t* dot, int64_t start, int64_t len) {
  switch (n) {
    case 8: backward_inputs<8>(g, xs, dxs, w, read, dot, start, len); break;
    case 7: backward_inputs<7>(g, xs, dxs, w, read, dot, start, len); break;
    case 6: backward_inputs<6>(g, xs, dxs, w, read, dot, start, len); break;
    case 5: backward_inputs<5>(g, xs, dxs, w, read, dot, start, len); break;
    case 4: backward_inputs<4>(g, xs, dxs, w, read, dot, start, len); break;
    case 3: backward_inputs<3>(g, xs, dxs, w, read, dot, start, len); break;
    case 2: backward_inputs<2>(g, xs, dxs, w, read, dot, start, len); break;
    default: backward_inputs<1>(g, xs, dxs, w, read, dot, start, len);
  }
}

// On [start, start + len): dxs[k] = w[k] * grad where dxs[k] is not null,
// and, when dots is not null, dots[k] = <grad, xs[k]>; with skip_zero,
// dots[k] = 0 where w[k] is 0, and xs[k] is not read. The inputs go
// kBackwardStreams at a time (backward_inputs); with non-temporal stores
// (opt-in), one after the other.
template <typename scalar_t, typename acc_t>
SP_INLINE void backward_segment(
    const scalar_t* grad, const scalar_t* const* xs, const acc_t* w, int64_t K,
    scalar_t* const* dxs, acc_t* dots, bool skip_zero, bool stream, int64_t start, int64_t len) {
  alignas(64) acc_t buffer[kBlock];
  const acc_t* g = buffer;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    g = grad + start;  // nothing to convert: read in place (it never aliases dxs)
  } else {
    for (int64_t i = 0; i < len; ++i) buffer[i] = load(grad + start, i);
  }
  if (stream) {
    for (int64_t k = 0; k < K; ++k) {
      if (dxs[k] != nullptr) {
        alignas(64) acc_t t[kBlock];
        for (int64_t i = 0; i < len; ++i) t[i] = w[k] == acc_t(0) ? acc_t(0) : w[k] * g[i];
        write_run(dxs[k] + start, t, len, stream);
      }
    }
  }
  scalar_t* const no_dx[kBackwardStreams] = {};
  for (int64_t k0 = 0; k0 < K; k0 += kBackwardStreams) {
    const int n = static_cast<int>(std::min<int64_t>(kBackwardStreams, K - k0));
    bool read[kBackwardStreams];
    bool any = false;
    for (int r = 0; r < n; ++r) {
      read[r] = dots != nullptr && !(skip_zero && w[k0 + r] == acc_t(0));
      any = any || read[r] || (!stream && dxs[k0 + r] != nullptr);
    }
    if (!any) {
      if (dots != nullptr) std::fill(dots + k0, dots + k0 + n, acc_t(0));
      continue;
    }
    acc_t dot[kBackwardStreams];
    const scalar_t* const* x = xs != nullptr ? xs + k0 : nullptr;  // no inputs without dots
    backward_inputs_n(n, g, x, stream ? no_dx : dxs + k0, w + k0, read, dot, start, len);
    if (dots != nullptr) std::copy(dot, dot + n, dots + k0);
  }
}

// Non-temporal stores are weakly ordered: fenced before the results are read.
SP_INLINE void fence(const Contraction& c) {
#if SP_X86
  if (c.stream_stores) _mm_sfence();
#endif
}

// The typed view of a Contraction.
template <typename scalar_t, typename acc_t>
struct Operands {
  std::vector<const scalar_t*> x;
  std::vector<scalar_t*> grad_x;
  const acc_t* w;

  explicit Operands(const Contraction& c) : w(static_cast<const acc_t*>(c.w)), skip(c.x_skip) {
    for (const void* p : c.x) x.push_back(static_cast<const scalar_t*>(p));
    for (void* p : c.grad_x) grad_x.push_back(static_cast<scalar_t*>(p));
    shifted.resize(skip.empty() ? 0 : x.size());
  }

  // The inputs for the segments of `row`, indexed as the row's range in the
  // flat layout: each shifted by its row skip (contraction.h), if any.
  const scalar_t* const* inputs(int64_t row) const {
    if (skip.empty()) return x.data();
    for (size_t k = 0; k < x.size(); ++k) shifted[k] = x[k] + row * skip[k];
    return shifted.data();
  }

 private:
  std::vector<int64_t> skip;
  mutable std::vector<const scalar_t*> shifted;
};

// The first element of output m of `row` in the flat range of the M outputs
// (contraction.h), minus that of the row in the inputs: added to a pointer
// indexed with the inputs' positions.
SP_INLINE int64_t output_shift(const Contraction& c, int64_t row, int64_t m) {
  return (row * (c.M - 1) + m) * c.row_len;
}

template <typename scalar_t>
void forward_tiles(const Contraction& c, const Tiles& tiles, int64_t t0, int64_t t1) {
  using acc_t = at::opmath_type<scalar_t>;
  const Operands<scalar_t, acc_t> ops(c);
  scalar_t* out = static_cast<scalar_t*>(c.out);
  const int streams = std::min(c.streams, kMaxStreams);
  for (int64_t t = t0; t < t1; ++t) {
    tiles.for_each_segment(t, [&](int64_t row, int64_t, int64_t start, int64_t len) {
      // The M outputs one after the other: the segment of every input is read
      // from memory once, by the first, and from the cache by the others.
      const scalar_t* const* xs = ops.inputs(row);
      for (int64_t m = 0; m < c.M; ++m) {
        forward_segment(xs, ops.w + (row * c.M + m) * c.K, c.K, out + output_shift(c, row, m), start, len,
                        c.stream_stores, streams);
      }
    });
  }
  fence(c);
}

// The backward of a segment of mix (M > 1): the M x K dot products
// <g_m, x_k>, each gradient with every input (backward_segment without input
// gradients), then each wanted input gradient dx_k = sum_m w[m, k] * g_m, a
// forward segment over the M gradients with the weights' column k. The
// gradients' segments are read from memory once, by the first pass.
template <typename scalar_t, typename acc_t>
struct MixBackward {
  const Contraction& c;
  const Operands<scalar_t, acc_t>& ops;
  const scalar_t* grad;
  std::vector<const scalar_t*> g;  // scratch, allocated once per call
  std::vector<scalar_t*> no_dx;
  std::vector<acc_t> column;

  MixBackward(const Contraction& c_, const Operands<scalar_t, acc_t>& ops_, const scalar_t* grad_)
      : c(c_), ops(ops_), grad(grad_), g(c.M), no_dx(c.K, nullptr), column(c.M) {}

  void segment(int64_t row, acc_t* dots, int64_t start, int64_t len) {
    for (int64_t m = 0; m < c.M; ++m) g[m] = grad + output_shift(c, row, m);
    const acc_t* w = ops.w + row * c.M * c.K;
    if (dots != nullptr) {
      const scalar_t* const* xs = ops.inputs(row);
      for (int64_t m = 0; m < c.M; ++m) {
        backward_segment(g[m], xs, w + m * c.K, c.K, no_dx.data(), dots + m * c.K, c.skip_zero_weights,
                         false, start, len);
      }
    }
    for (int64_t k = 0; k < c.K; ++k) {
      if (ops.grad_x[k] == nullptr) continue;
      for (int64_t m = 0; m < c.M; ++m) column[m] = w[m * c.K + k];
      forward_segment(g.data(), column.data(), c.M, ops.grad_x[k], start, len, c.stream_stores,
                      std::min(c.streams, kMaxStreams));
    }
  }
};

template <typename scalar_t>
void backward_tiles(const Contraction& c, const Tiles& tiles, void* partials_, int64_t t0, int64_t t1) {
  using acc_t = at::opmath_type<scalar_t>;
  const Operands<scalar_t, acc_t> ops(c);
  const scalar_t* grad = static_cast<const scalar_t*>(c.grad);
  acc_t* grad_w = static_cast<acc_t*>(c.grad_w);
  acc_t* partials = static_cast<acc_t*>(partials_);
  const int64_t width = c.M * c.K;  // weights per row
  std::optional<MixBackward<scalar_t, acc_t>> mix;
  if (c.M != 1) mix.emplace(c, ops, grad);
  for (int64_t t = t0; t < t1; ++t) {
    tiles.for_each_segment(t, [&](int64_t row, int64_t piece, int64_t start, int64_t len) {
      acc_t* dots = grad_w == nullptr ? nullptr
          : tiles.pieces == 1         ? grad_w + row * width
                                      : partials + (row * tiles.pieces + piece) * width;
      if (mix) {
        mix->segment(row, dots, start, len);
        return;
      }
      backward_segment(
          grad, ops.inputs(row), ops.w + row * c.K, c.K, ops.grad_x.data(), dots, c.skip_zero_weights,
          c.stream_stores, start, len);
    });
  }
  fence(c);
}

#undef SP_INLINE
#undef SP_X86

} // namespace SP_ISA
} // namespace cpu
} // namespace simplex_param
