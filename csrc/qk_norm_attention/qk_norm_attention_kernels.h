// The CPU QK-norm attention kernels for one vector width, included once per width by
// qk_norm_attention_v256.cpp and qk_norm_attention_v512.cpp, each inside its own namespace that
// defines `constexpr int kVectorBytes` (32: AVX2 and generic builds; 64: AVX-512) after
// qk_norm_attention_cpu.h. No include guard, no includes: everything here belongs to the
// including namespace; the dispatch_* functions at the end are its entry points.


constexpr int kQueryVectors = 3;  // forward fast path: query tiles of 3 vectors of queries
constexpr int kMaxTileRows = kQueryVectors * kVectorBytes / 4;  // the forward's query tile of
                                                                // floats, >= any row tile R

// ---- vectors ------------------------------------------------------------------------------

template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(kVectorBytes)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(kVectorBytes)));
};
template <typename T>
using vec_t = typename VecOf<T>::type;
template <typename T>
constexpr int kLanes = kVectorBytes / sizeof(T);
template <typename T>
constexpr int kPanel = 2 * kLanes<T>;  // keys per panel

typedef int32_t vi32 __attribute__((vector_size(kVectorBytes)));

template <typename T>
EEGFAST_INLINE vec_t<T> vload(const T* p) {
  vec_t<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
EEGFAST_INLINE void vstore(T* p, vec_t<T> v) {
  std::memcpy(p, &v, sizeof(v));
}
// Broadcasts as shuffles of lane 0, which GCC turns into one vbroadcast (`{} + x` is a real
// scalar add without -ffast-math; a lane loop or {x, x, ...} becomes a chain of inserts).
EEGFAST_INLINE vec_t<float> vsplat(float x) {
  typedef int32_t index_t __attribute__((vector_size(kVectorBytes)));
  return __builtin_shuffle(vec_t<float>{x}, index_t{});
}
EEGFAST_INLINE vec_t<double> vsplat(double x) {
  typedef int64_t index_t __attribute__((vector_size(kVectorBytes)));
  return __builtin_shuffle(vec_t<double>{x}, index_t{});
}
// (0, 1, ..., L - 1).
template <typename T>
EEGFAST_INLINE vec_t<T> lane_index() {
  vec_t<T> v;
  for (int i = 0; i < kLanes<T>; ++i) v[i] = static_cast<T>(i);
  return v;
}
template <typename T>
EEGFAST_INLINE vec_t<T> vmax(vec_t<T> a, vec_t<T> b) {
  return a > b ? a : b;
}
// Sum of the lanes of a Bytes-wide vector: its halves added as vectors until two lanes are
// left (vector extracts and adds in registers; a lane array in memory made hsum ~5% of the
// backward, which sums a few vectors per query and key row).
template <typename T, int Bytes>
struct VecBytes {
  typedef T type __attribute__((vector_size(Bytes)));
};
template <typename T, int Bytes>
EEGFAST_INLINE T hsum_bytes(typename VecBytes<T, Bytes>::type v) {
  if constexpr (Bytes == 2 * sizeof(T)) {
    return v[0] + v[1];
  } else {
    typename VecBytes<T, Bytes / 2>::type lo, hi;
    std::memcpy(&lo, &v, Bytes / 2);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + Bytes / 2, Bytes / 2);
    return hsum_bytes<T, Bytes / 2>(lo + hi);
  }
}
template <typename T>
EEGFAST_INLINE T hsum(vec_t<T> v) {
  return hsum_bytes<T, kVectorBytes>(v);
}
template <typename T>
EEGFAST_INLINE T hmax(vec_t<T> v) {
  T m = v[0];
  for (int i = 1; i < kLanes<T>; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// ---- transposes between rows and lanes ---------------------------------------------------
// Row-major (rows, D) data and the lane layouts the tile kernels read ((D, lanes): one row per
// lane) are converted L x L blocks at a time, with vector loads, stores and two-source
// shuffles: element by element these copies were ~10% of the forward and ~5% of the backward
// at D = 20 (D strided stores per row).

template <typename T>
struct MaskOf;
template <>
struct MaskOf<float> {
  typedef int32_t type __attribute__((vector_size(kVectorBytes)));
};
template <>
struct MaskOf<double> {
  typedef int64_t type __attribute__((vector_size(kVectorBytes)));
};

// Rows a and c = a's row + B of a block: swaps the (B x B) sub-blocks off the diagonal, lanes
// [B, 2B) of a with lanes [0, B) of c in every 2B lanes.
template <int B, typename T, size_t... I>
EEGFAST_INLINE void swap_off_diagonal(vec_t<T>& a, vec_t<T>& c, std::index_sequence<I...>) {
  using M = typename MaskOf<T>::type;
  constexpr size_t L = sizeof...(I);
  const vec_t<T> top = __builtin_shuffle(a, c, M{((I & B) ? L + I - B : I)...});
  const vec_t<T> bottom = __builtin_shuffle(a, c, M{((I & B) ? L + I : I + B)...});
  a = top;
  c = bottom;
}
template <int B, typename T>
EEGFAST_INLINE void transpose_stages(vec_t<T>* r) {
  #pragma GCC unroll 16
  for (int i = 0; i < kLanes<T>; ++i)
    if (!(i & B))
      swap_off_diagonal<B, T>(r[i], r[i + B], std::make_index_sequence<kLanes<T>>{});
  if constexpr (B > 1) transpose_stages<B / 2, T>(r);
}
// r[i][j] <-> r[j][i] for an L x L block held as L vectors: the off-diagonal blocks swapped at
// every scale L / 2, ..., 1 (L log2 L shuffles).
template <typename T>
EEGFAST_INLINE void transpose_block(vec_t<T>* r) {
  transpose_stages<kLanes<T> / 2, T>(r);
}

// Lane r of the result = the sum of u[r]'s lanes, for L vectors u: the transpose's stages with
// an add in place of the second output of each swap, halving the vectors at every stage
// (L - 1 folds of 2 shuffles and an add, where a transpose and L - 1 vector adds take L log2 L
// shuffles). u is overwritten.
template <int B, typename T>
EEGFAST_INLINE vec_t<T> reduce_stages(vec_t<T>* u) {
  #pragma GCC unroll 16
  for (int i = 0; i < B; ++i) {
    vec_t<T> top = u[i], bottom = u[i + B];
    swap_off_diagonal<B, T>(top, bottom, std::make_index_sequence<kLanes<T>>{});
    u[i] = top + bottom;
  }
  if constexpr (B > 1)
    return reduce_stages<B / 2, T>(u);
  else
    return u[0];
}
template <typename T>
EEGFAST_INLINE vec_t<T> reduce_lanes(vec_t<T>* u) {
  return reduce_stages<kLanes<T> / 2, T>(u);
}

// Whether rows of D elements with element stride sd take the block transposes: contiguous,
// unconverted, at least one vector long.
template <typename scalar_t, typename T>
EEGFAST_INLINE bool whole_vector_rows(int64_t D, int64_t sd) {
  return std::is_same_v<scalar_t, T> && sd == 1 && D >= kLanes<T>;
}

// bf16 <-> float a vector at a time (bf16 is the high half of a float's bits). Element by
// element, the conversions of bf16 rows were ~10% of a bf16 forward at D = 20.
typedef uint16_t vu16 __attribute__((vector_size(kVectorBytes / 2)));
typedef uint32_t vu32 __attribute__((vector_size(kVectorBytes)));

EEGFAST_INLINE vec_t<float> vload_bf16(const c10::BFloat16* p) {
  vu16 h;
  std::memcpy(&h, p, sizeof(h));
  return (vec_t<float>)(__builtin_convertvector(h, vu32) << 16);
}

// x's bits rounded to the nearest even bf16 in their high half (low half: carry left-overs).
EEGFAST_INLINE vu32 bf16_rounded_bits(vec_t<float> x) {
  const vu32 bits = (vu32)x;
  return bits + 0x7fffu + ((bits >> 16) & 1u);
}

// Rounds to nearest even, NaN to the quiet NaN c10::BFloat16 makes (0x7fc0), as its conversion.
EEGFAST_INLINE void vstore_bf16(c10::BFloat16* p, vec_t<float> x) {
  const vu32 rounded = bf16_rounded_bits(x) >> 16;
  const vu16 h = __builtin_convertvector(x != x ? vu32{} + 0x7fc0u : rounded, vu16);
  std::memcpy(p, &h, sizeof(h));
}

// Rows that load_row and store_row move a vector at a time: float rows of the accumulation
// type, or bf16 rows into float ones; contiguous, at least a vector long.
template <typename scalar_t, typename T>
EEGFAST_INLINE bool vector_rows(int64_t D, int64_t sd) {
  constexpr bool bf16 = std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<T, float>;
  return (std::is_same_v<scalar_t, T> || bf16) && sd == 1 && D >= kLanes<T>;
}

// dst[d] = x[d] for d < D (>= one vector of floats), converted (bf16 to float, float to bf16,
// or a copy): whole vectors, the last one ending at D (a memcpy call per row was ~3% of the
// backward). The one loop of load_row and store_row.
template <typename From, typename To>
EEGFAST_INLINE void move_row_vectors(const From* x, int64_t D, To* dst) {
  using F = std::conditional_t<std::is_same_v<From, c10::BFloat16>, To, From>;  // the float side
  constexpr int L = kLanes<F>;
  for (int64_t d0 = 0; d0 < D; d0 += L) {
    const int64_t c = std::min(d0, D - L);
    if constexpr (std::is_same_v<From, To>)
      vstore(dst + c, vload(x + c));
    else if constexpr (std::is_same_v<From, c10::BFloat16>)
      vstore(dst + c, vload_bf16(x + c));
    else
      vstore_bf16(dst + c, vload(x + c));
  }
}

template <typename scalar_t, typename T>
EEGFAST_INLINE void load_row(const scalar_t* x, int64_t sd, int64_t D, T* dst);
template <typename scalar_t, typename T>
EEGFAST_INLINE void store_row(const T* x, int64_t D, scalar_t* dst);

// dst[d ld + r] = src[r stride + d] for d < D and r < L, 0 for rows r >= valid (>= 1; those
// rows are not read). Needs whole_vector_rows: dims in chunks of L, the last chunk ending at D
// (so it overlaps the one before and rewrites its last dims with the same values).
template <typename T>
EEGFAST_INLINE void rows_to_lanes(const T* src, int64_t stride, int valid, int64_t D, T* dst,
                                  int64_t ld) {
  constexpr int L = kLanes<T>;
  const auto in_rows = lane_index<T>() < vsplat(static_cast<T>(valid));
  vec_t<T> r[L];
  for (int64_t d0 = 0; d0 < D; d0 += L) {
    const int64_t c = std::min(d0, D - L);
    #pragma GCC unroll 16
    for (int i = 0; i < L; ++i) r[i] = vload(src + std::min(i, valid - 1) * stride + c);
    transpose_block<T>(r);
    #pragma GCC unroll 16
    for (int i = 0; i < L; ++i) vstore(dst + (c + i) * ld, in_rows ? r[i] : vec_t<T>{});
  }
}

// dst[r stride + d] = src[d ld + r] (times row_scale[r] when given) for d < D and r < valid.
// Needs whole_vector_rows for dst (chunks of L dims as in rows_to_lanes).
template <typename T>
EEGFAST_INLINE void lanes_to_rows(const T* src, int64_t ld, int64_t D, int valid, T* dst,
                                  int64_t stride, const T* row_scale = nullptr) {
  constexpr int L = kLanes<T>;
  vec_t<T> r[L];
  for (int64_t d0 = 0; d0 < D; d0 += L) {
    const int64_t c = std::min(d0, D - L);
    #pragma GCC unroll 16
    for (int i = 0; i < L; ++i) r[i] = vload(src + (c + i) * ld);
    transpose_block<T>(r);
    for (int i = 0; i < valid; ++i)
      vstore(dst + i * stride + c, row_scale ? r[i] * vsplat(row_scale[i]) : r[i]);
  }
}

// Rows row0 ... row0 + rows - 1 of (b, h) of t in lanes: dst[d ld + r] for d < D and r < lanes
// (a multiple of L), 0 for r >= rows. Block transposes where whole_vector_rows allows (bf16
// rows: after a conversion a vector at a time, see vector_rows), else element by element.
template <typename scalar_t, typename T>
EEGFAST_INLINE void gather_rows_to_lanes(const Strided<scalar_t>& t, int64_t b, int64_t h,
                                         int64_t row0, int rows, int lanes, int64_t D, T* dst,
                                         int64_t ld) {
  constexpr int L = kLanes<T>;
  const bool blocks = whole_vector_rows<scalar_t, T>(D, t.sd);
  for (int v = 0; v * L < lanes; ++v) {
    const int valid = std::min(rows - v * L, L);
    T* group = dst + v * L;
    if (valid > 0 && blocks) {
      rows_to_lanes(reinterpret_cast<const T*>(t.row(b, h, row0 + v * L)), t.sn, valid, D, group,
                    ld);
      continue;
    }
    if (valid > 0 && !std::is_same_v<scalar_t, T> && vector_rows<scalar_t, T>(D, t.sd)) {
      alignas(64) T converted[kLanes<T> * kMaxHeadDim];  // the group's rows, D apart
      for (int r = 0; r < valid; ++r)
        load_row(t.row(b, h, row0 + v * L + r), 1, D, converted + r * D);
      rows_to_lanes(converted, D, valid, D, group, ld);
      continue;
    }
    for (int64_t d = 0; d < D; ++d) vstore(group + d * ld, vec_t<T>{});
    for (int r = 0; r < valid; ++r) {
      const scalar_t* x = t.row(b, h, row0 + v * L + r);
      for (int64_t d = 0; d < D; ++d) group[d * ld + r] = static_cast<T>(x[d * t.sd]);
    }
  }
}

// The way back: dst[r stride + d] = src[d ld + r] (times row_scale[r] when given), converted
// to scalar_t, for d < D and r < valid (<= L). Block transposes where whole_vector_rows allows
// (bf16 rows: converted a vector at a time after them), else element by element.
template <typename scalar_t, typename T>
EEGFAST_INLINE void scatter_lanes_to_rows(const T* src, int64_t ld, int64_t D, int valid,
                                          scalar_t* dst, int64_t stride,
                                          const T* row_scale = nullptr) {
  if (whole_vector_rows<scalar_t, T>(D, 1)) {
    lanes_to_rows(src, ld, D, valid, reinterpret_cast<T*>(dst), stride, row_scale);
    return;
  }
  if (vector_rows<scalar_t, T>(D, 1)) {
    alignas(64) T rows[kLanes<T> * kMaxHeadDim];  // valid rows, D apart
    lanes_to_rows(src, ld, D, valid, rows, D, row_scale);
    for (int r = 0; r < valid; ++r) store_row(rows + r * D, D, dst + r * stride);
    return;
  }
  for (int r = 0; r < valid; ++r)
    for (int64_t d = 0; d < D; ++d) {
      const T x = src[d * ld + r];
      dst[r * stride + d] = static_cast<scalar_t>(row_scale ? x * row_scale[r] : x);
    }
}

// dst[d] = x[d sd] for d < D, converted to T; dst's elements past D are left as they are.
template <typename scalar_t, typename T>
EEGFAST_INLINE void load_row(const scalar_t* x, int64_t sd, int64_t D, T* dst) {
  if (vector_rows<scalar_t, T>(D, sd)) {
    if constexpr (std::is_same_v<scalar_t, T> || std::is_same_v<scalar_t, c10::BFloat16>)
      move_row_vectors(x, D, dst);
    return;
  }
  for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(x[d * sd]);
}

// exp of a vector of floats for -87 <= x <= 88, max relative error ~4e-7 (an exhaustive float
// check over [-86.5, 88]: 4.0e-7, either way below). The softmaxes spend 8 to 10 vector ops per
// 16 scores here against 40 FMAs for their products, so the op count matters:
// - 16 lanes: x = (16 n + j) ln2 / 16 + r with |r| <= ln2 / 32, e^x = 2^n 2^(j/16) e^r; 2^(j/16)
//   comes from a 16-entry table in one register (one permute), e^r = 1 + r + r^2/2 + r^3/6
//   (truncation 9e-9). 6 FMA-unit ops (2 reduction, 3 polynomial, 1 product): 25% fewer than
//   below, and the exp loop per vector ~28% faster on Zen 4.
// - other widths (an 8-entry table would need the degree-4 polynomial, and two permutes of a
//   16-entry one measured slower under AVX2): x = n ln2 + r with |r| <= ln2 / 2 and e^r =
//   1 + r q(r), q of degree 4 fitted for relative error, 8 FMA-unit ops.
// Both: one-step reduction (ln2's float rounding costs at most 2.4e-7 relative at |n| = 126),
// the rounding sum's low mantissa bits hold the integer (t below), and 2^n goes into exponent
// bits by a shift. (A template so that the table, 16 lanes, is only built where it fits.)
template <int Lanes = kLanes<float>>
EEGFAST_INLINE vec_t<float> vexp_in_range(vec_t<float> x) {
  using vf = vec_t<float>;
  if constexpr (Lanes == 16) {
    using vi16 = typename VecBytes<int32_t, Lanes * 4>::type;
    // bits of float(2^(j/16)) minus j << 19: adding the rounding sum's bits shifted left by 19
    // (16 n + j, two's complement in its low 13 bits) gives the bits of 2^n float(2^(j/16))
    const vi16 table = {0x3f800000, 0x3f7daac3, 0x3f7b95c2, 0x3f79c3d3, 0x3f7837f0, 0x3f76f532,
                        0x3f75fed7, 0x3f75583f, 0x3f7504f3, 0x3f7508a4, 0x3f75672a, 0x3f76248c,
                        0x3f7744fd, 0x3f78ccdf, 0x3f7ac0c7, 0x3f7d257d};
    const vf magic = vsplat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
    const vf t = x * 23.083120654223414f + magic;  // 16 / ln2
    const vf k = t - magic;                        // 16 n + j
    const vf r = x - k * 0.04332169878499658f;     // ln2 / 16
    vf q = vsplat(1.0f / 6.0f);
    q = q * r + 0.5f;
    q = q * r + 1.0f;
    const vf y = q * r + 1.0f;
    const vi16 bits = (vi16)t;
    return y * (vf)((bits << 19) + __builtin_shuffle(table, bits));  // index modulo 16
  } else {
    const vf magic = vsplat(12582912.0f + 127.0f);  // 1.5 * 2^23 + the exponent bias
    const vf t = x * 1.44269504088896341f + magic;
    const vf n = t - magic;
    const vf r = x - n * 0.693147180559945f;
    vf q = vsplat(8.262299001216888e-3f);
    q = q * r + 4.1898973286151886e-2f;
    q = q * r + 1.6668103635311127e-1f;
    q = q * r + 4.9999138712882996e-1f;
    q = q * r + 9.999995231628418e-1f;
    const vf y = q * r + 1.0f;
    return y * (vf)((vi32)t << 23);
  }
}

// exp for x <= 88, with exp(x < -87) flushed to 0, so masked scores (-inf) give exactly 0.
EEGFAST_INLINE vec_t<float> vexp(vec_t<float> x) {
  return x < vsplat(-87.0f) ? vec_t<float>{} : vexp_in_range(x);
}

// Natural log of a vector of positive normal floats: x = 2^e m with m in [sqrt(1/2), sqrt(2))
// (integer arithmetic on the bits), log m = 2 atanh(s) with s = (m - 1) / (m + 1),
// |s| <= 0.1716, by its odd series to s^9 (truncation < 1e-9), and e ln2 with ln2 split in two
// so that e ln2 is exact to float rounding. Replaces one scalar logf call per query row (~5%
// of the forward).
EEGFAST_INLINE vec_t<float> vlog_positive(vec_t<float> x) {
  using vf = vec_t<float>;
  const vi32 sqrt_half = vi32{} + 0x3f3504f3;  // the bits of 0.70710677f
  const vi32 t = (vi32)x - sqrt_half;
  const vf e = __builtin_convertvector(t >> 23, vf);  // arithmetic shift: floor
  const vf m = (vf)((t & 0x007fffff) + sqrt_half);
  const vf s = (m - 1.0f) / (m + 1.0f);
  const vf s2 = s * s;
  vf series = vsplat(2.0f / 9.0f);
  series = series * s2 + 2.0f / 7.0f;
  series = series * s2 + 2.0f / 5.0f;
  series = series * s2 + 2.0f / 3.0f;
  series = series * s2 + 2.0f;
  return e * 0.693145751953125f + (e * 1.428606765330187e-06f + s * series);
}
EEGFAST_INLINE vec_t<double> vlog_positive(vec_t<double> x) {
  vec_t<double> y;
  for (int i = 0; i < kLanes<double>; ++i) y[i] = std::log(x[i]);
  return y;
}

EEGFAST_INLINE vec_t<double> vexp(vec_t<double> x) {
  vec_t<double> y;
  for (int i = 0; i < kLanes<double>; ++i) y[i] = std::exp(x[i]);
  return y;
}
EEGFAST_INLINE vec_t<double> vexp_in_range(vec_t<double> x) { return vexp(x); }

// ---- tile kernels -------------------------------------------------------------------------

// fn(std::integral_constant<int, m>{}, d0) over dims (or keys) [0, D) in chunks of M, then
// one of 4, 2 and 1 each where smaller than M and still needed: exactly D of them, with
// micro-tile sizes known at compile time.
template <int M, typename Fn>
EEGFAST_INLINE void for_dim_chunks(int64_t D, const Fn& fn) {
  int64_t d0 = 0;
  for (; d0 + M <= D; d0 += M) fn(std::integral_constant<int, M>{}, d0);
  if constexpr (M > 4) {
    if (D - d0 >= 4) fn(std::integral_constant<int, 4>{}, d0), d0 += 4;
  }
  if constexpr (M > 2) {
    if (D - d0 >= 2) fn(std::integral_constant<int, 2>{}, d0), d0 += 2;
  }
  if constexpr (M > 1) {
    if (D - d0 >= 1) fn(std::integral_constant<int, 1>{}, d0);
  }
}

// The register-tile micro-kernel of the products below: for m < M, c < C,
//   out[m o_m + c L ...] = (Accumulate ? out[...] : 0)
//                          + sum_{k < K} a[m a_m + k a_k] b[k b_k + c L ...]
// with a's elements broadcast and b's rows read as C vectors. Every caller passes a_m, a_k,
// b_k and o_m that are compile-time constants after inlining wherever it can, so that the
// broadcast operands sit at fixed offsets from one pointer (no index registers).
template <int M, int C, bool Accumulate, typename T>
EEGFAST_INLINE void tile_products(const T* a, int64_t a_m, int64_t a_k, const T* b, int64_t b_k,
                                  int64_t K, T* out, int64_t o_m) {
  constexpr int L = kLanes<T>;
  vec_t<T> acc[M][C];
  #pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
    #pragma GCC unroll 4
    for (int c = 0; c < C; ++c)
      acc[m][c] = Accumulate ? vload(out + m * o_m + c * L) : vec_t<T>{};
  for (int64_t k = 0; k < K; ++k) {
    vec_t<T> row[C];
    #pragma GCC unroll 4
    for (int c = 0; c < C; ++c) row[c] = vload(b + k * b_k + c * L);
    #pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const vec_t<T> x = vsplat(a[m * a_m + k * a_k]);
      #pragma GCC unroll 4
      for (int c = 0; c < C; ++c) acc[m][c] += x * row[c];
    }
  }
  #pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
    #pragma GCC unroll 4
    for (int c = 0; c < C; ++c) vstore(out + m * o_m + c * L, acc[m][c]);
}

// S[r][j] = sum_d A[r][d] * key j of the panels, for R rows and the first `keys` keys of a
// block (a multiple of the vector width; a last half panel is one vector of products).
template <int R, typename T>
EEGFAST_INLINE void score_tile(const T* A, int64_t Dv, int64_t D, const T* panels, int keys,
                               T* S) {
  constexpr int W = kPanel<T>;
  int p = 0;
  for (; p < keys / W; ++p)
    tile_products<R, 2, false>(A, Dv, 1, panels + p * D * W, W, D, S + p * W, kKeyBlock);
  if (keys % W != 0)
    tile_products<R, 1, false>(A, Dv, 1, panels + p * D * W, W, D, S + p * W, kKeyBlock);
}

// The backward's probability P = e^(s - lse) and score gradient dS' = P (dP - delta) of one
// vector of scores s and dP (dS' = dS / scale: see backward_task). Scores of padding rows
// (lse = inf) or masked keys (-inf) get P = 0 from vexp's flush.
template <typename T>
EEGFAST_INLINE void probability_and_grad(vec_t<T> s, vec_t<T> dp, vec_t<T> lse, vec_t<T> delta,
                                         vec_t<T>& prob, vec_t<T>& ds) {
  prob = vexp(s - lse);
  ds = prob * (dp - delta);
}

// The backward's probabilities and score gradients of RR rows and C key vectors of one panel,
// for a key block with no masked score: S = Q K^T and dP = G V^T accumulate side by side in
// registers (the same FMAs in the same order as two score_tile calls), then
//   P = e^(S - lse),  dS' = P (dP - delta)   (dS' = dS / scale: see backward_task)
// are stored once, instead of S and dP being written out and read back by a separate pass
// (~1.5% of the backward at D = 20, 1 thread, Zen 4). Q, G: rows Dv apart; panels: key j, dim
// d at d W + j; P, dS: rows kKeyBlock apart. Rows past the group's (lse = inf) get P = 0 from
// vexp's flush.
template <int RR, int C, typename T>
EEGFAST_INLINE void probability_tile(const T* Q, const T* G, int64_t Dv, int64_t D,
                                     const T* key_panel, const T* value_panel, const T* lse,
                                     const T* delta, T* P, T* dS) {
  constexpr int L = kLanes<T>, W = kPanel<T>;
  vec_t<T> s[RR][C], dp[RR][C];
  #pragma GCC unroll 4
  for (int r = 0; r < RR; ++r)
    #pragma GCC unroll 2
    for (int c = 0; c < C; ++c) s[r][c] = dp[r][c] = vec_t<T>{};
  for (int64_t d = 0; d < D; ++d) {
    vec_t<T> keys[C], values[C];
    #pragma GCC unroll 2
    for (int c = 0; c < C; ++c) {
      keys[c] = vload(key_panel + d * W + c * L);
      values[c] = vload(value_panel + d * W + c * L);
    }
    #pragma GCC unroll 4
    for (int r = 0; r < RR; ++r) {
      const vec_t<T> q = vsplat(Q[r * Dv + d]), g = vsplat(G[r * Dv + d]);
      #pragma GCC unroll 2
      for (int c = 0; c < C; ++c) {
        s[r][c] += q * keys[c];
        dp[r][c] += g * values[c];
      }
    }
  }
  #pragma GCC unroll 4
  for (int r = 0; r < RR; ++r) {
    const vec_t<T> shift = vsplat(lse[r]), d_r = vsplat(delta[r]);
    #pragma GCC unroll 2
    for (int c = 0; c < C; ++c) {
      vec_t<T> prob, ds;
      probability_and_grad<T>(s[r][c], dp[r][c], shift, d_r, prob, ds);
      vstore(P + r * kKeyBlock + c * L, prob);
      vstore(dS + r * kKeyBlock + c * L, ds);
    }
  }
}

// probability_tile over the R rows of a row tile (sub-tiles of up to 4: 16 accumulators with 2
// key vectors) and the first `keys` keys of a block (a multiple of the vector width). Rows
// from `valid` on are past the group's last row: their P and dS are 0, not computed (at
// N = 257 the second row group's one row took a whole tile of R), and a sub-tile with fewer
// than RR rows left runs row by row.
template <int R, typename T>
EEGFAST_INLINE void probability_rows(const T* Q, const T* G, int64_t Dv, int64_t D,
                                     const T* key_panels, const T* value_panels, int keys,
                                     const T* lse, const T* delta, int valid, T* P, T* dS) {
  constexpr int RR = R < 4 ? R : 4, W = kPanel<T>;
  static_assert(R % RR == 0, "row sub-tiles");
  const auto rows = [&](auto tile_rows, int r0) EEGFAST_INLINE_LAMBDA {
    constexpr int n = decltype(tile_rows)::value;
    const T *q = Q + r0 * Dv, *g = G + r0 * Dv;
    T *prob = P + r0 * kKeyBlock, *ds = dS + r0 * kKeyBlock;
    int j = 0;
    for (; j + W <= keys; j += W)
      probability_tile<n, 2>(q, g, Dv, D, key_panels + j * D, value_panels + j * D, lse + r0,
                             delta + r0, prob + j, ds + j);
    if (j < keys)  // a last half panel: one vector
      probability_tile<n, 1>(q, g, Dv, D, key_panels + j * D, value_panels + j * D, lse + r0,
                             delta + r0, prob + j, ds + j);
  };
  int r0 = 0;
  for (; r0 + RR <= valid; r0 += RR) rows(std::integral_constant<int, RR>{}, r0);
  if constexpr (RR > 1)
    for (; r0 < valid; ++r0) rows(std::integral_constant<int, 1>{}, r0);
  for (; r0 < R; ++r0) {
    std::fill(P + r0 * kKeyBlock, P + r0 * kKeyBlock + keys, T(0));
    std::fill(dS + r0 * kKeyBlock, dS + r0 * kKeyBlock + keys, T(0));
  }
}

// out[r][c0 : c0 + C L] += sum_j S[r][j] * B[j][c0 : c0 + C L] over the first `keys` rows of B
// (rows `stride` apart).
template <int R, typename T, int C>
EEGFAST_INLINE void rows_chunk(T* out, int64_t Dv, const T* S, const T* B, int64_t stride,
                               int keys, int64_t c0) {
  tile_products<R, C, true>(S, kKeyBlock, 1, B + c0, stride, keys, out + c0, Dv);
}

// out[r] += sum_j S[r][j] * B[j] over the first `keys` rows of B, in Dv / L vectors of dims: the
// vector v L ... v L + L - 1 of out sums dims v L ..., but the last one sums dims last_chunk ...
// last_chunk + L - 1 (B's rows may end at D: last_chunk = D - L, overlapping the vector before;
// padded rows have last_chunk = Dv - L). Dim d of the result is at value_position(d, ...).
template <int R, typename T>
EEGFAST_INLINE void accumulate_rows(T* out, int64_t Dv, const T* S, const T* B, int64_t stride,
                                    int64_t last_chunk, int keys) {
  constexpr int L = kLanes<T>;
  const int64_t vectors = Dv / L;
  const int64_t regular = last_chunk == Dv - L ? vectors : vectors - 1;  // vectors at v L
  int64_t c = 0;
  for (; c + 3 <= regular; c += 3) rows_chunk<R, T, 3>(out, Dv, S, B, stride, keys, c * L);
  if (regular - c == 2) rows_chunk<R, T, 2>(out, Dv, S, B, stride, keys, c * L);
  if (regular - c == 1) rows_chunk<R, T, 1>(out, Dv, S, B, stride, keys, c * L);
  if (regular < vectors)
    tile_products<R, 1, true>(S, kKeyBlock, 1, B + last_chunk, stride, keys, out + Dv - L, Dv);
}

// Where accumulate_rows leaves dim d of a row.
template <typename T>
EEGFAST_INLINE int64_t value_position(int64_t d, int64_t Dv, int64_t last_chunk) {
  return d < last_chunk ? d : d + (Dv - kLanes<T> - last_chunk);
}

// Key-lane dK / dV sums: out[d][j] += sum_{r < rows} A[r][d] S[r][j] for d < D and the first
// `keys` keys of a block (a multiple of the vector width), out a (D, kKeyBlock)
// block with keys in the vector lanes. So the head dim is not padded to a vector: at D = 20
// with 16-float vectors, 20 FMA rows per key vector instead of the 32 of key rows (Dv).
// Micro-tiles of M dims x C key vectors: M C accumulators, C rows of S loaded per row r.
template <int M, int C, typename T>
EEGFAST_INLINE void transposed_tile(T* out, const T* S, const T* A, int64_t Dv, int rows,
                                    int64_t d0, int c0) {
  constexpr int L = kLanes<T>;
  tile_products<M, C, true>(A + d0, 1, Dv, S + c0 * L, kKeyBlock, rows,
                            out + d0 * kKeyBlock + c0 * L, kKeyBlock);
}
template <int M, int C, typename T>
EEGFAST_INLINE void transposed_dims(T* out, int64_t D, int64_t Dv, const T* S, const T* A,
                                    int rows, int c0) {
  for_dim_chunks<M>(D, [&](auto dims, int64_t d0) EEGFAST_INLINE_LAMBDA {
    transposed_tile<decltype(dims)::value, C>(out, S, A, Dv, rows, d0, c0);
  });
}
// M = R / 2 dims per micro-tile: 4 x 4 accumulators with 32 registers (R = 8), 2 x 4 with 16.
template <int R, typename T>
EEGFAST_INLINE void accumulate_transposed(T* out, int64_t D, int64_t Dv, const T* S,
                                          const T* A, int rows, int keys) {
  constexpr int M = R / 2;
  const int vectors = keys / kLanes<T>;
  int c0 = 0;
  for (; c0 + 4 <= vectors; c0 += 4) transposed_dims<M, 4>(out, D, Dv, S, A, rows, c0);
  if (vectors - c0 >= 2) transposed_dims<M, 2>(out, D, Dv, S, A, rows, c0), c0 += 2;
  if (vectors - c0 == 1) transposed_dims<M, 1>(out, D, Dv, S, A, rows, c0);
}

// ---- problem description ------------------------------------------------------------------

template <typename scalar_t, typename T>
struct Problem {
  int64_t B, H, N, D, Dv, Nk, key_blocks;
  T scale;
  bool causal;
  const bool* key_padding;  // (B, N) or null
  const int64_t* ids;       // (N,) block ids or null
  const T* qw;              // LayerNorm parameters (D,), each possibly null
  const T* qb;
  const T* kw;
  const T* kb;
  int64_t chunks;      // query chunks per (batch, head)
  int64_t chunk_rows;  // multiple of R
  Strided<scalar_t> q, k, v;
};

// Everything about the keys of one (batch, head) that the query tiles read.
template <typename T>
struct KeySide {
  std::vector<T> panels;      // (Nk / W, D, W) normalised keys
  // The forward's values: rows value_stride apart, dim d at d, read straight from v when its
  // rows are whole float vectors (value_last_chunk = D - L; copying them here was ~4% of the
  // forward at D = 20), else from value_rows ((Nk, Dv) copies, value_last_chunk = Dv - L).
  const T* values = nullptr;
  int64_t value_stride = 0, value_last_chunk = 0;
  std::vector<T> value_rows;
  std::vector<T> value_panels;  // (Nk / W, D, W) values (backward)
  std::vector<T> hat_panels;    // (Nk / W, D, W) keys before the LayerNorm's affine step
                                // (backward)
  std::vector<T> bias;        // (Nk,) 0 or -inf (padding key, or past N)
  std::vector<int64_t> ids;   // (Nk,) block id of each key
  std::vector<uint8_t> block_empty;  // (key_blocks,) every key of the block is masked
  std::vector<uint8_t> block_masked;  // (key_blocks,) a key of the used vectors is masked
  std::vector<int> block_keys;        // (key_blocks,) keys to compute: up to the last vector
                                      // holding a key < N
  std::vector<int64_t> block_id_min, block_id_max;  // over the unmasked keys of the block
  T max_key_norm = 0;  // largest Euclidean norm of a normalised key (keys < N)
};

// A task's buffers stay with its thread for the next task (thread_local: allocating and zeroing
// them per task was ~3% of a call at N = 257), except after a task that needed more than this
// (long sequences), so that idle threads do not hold tens of MB.
constexpr size_t kKeptBufferBytes = size_t(1) << 20;

// The thread's KeySide, shared by its forward and backward tasks. Bind it to a reference once
// per task: in a shared library each thread_local access may call __tls_get_addr.
template <typename T>
KeySide<T>& thread_key_side() {
  static thread_local KeySide<T> ks;
  return ks;
}

template <typename E>
void release_if_large(std::vector<E>& buffer) {
  if (buffer.capacity() * sizeof(E) > kKeptBufferBytes) std::vector<E>().swap(buffer);
}
template <typename T>
void release_if_large(KeySide<T>& ks) {
  for (auto* buffer : {&ks.panels, &ks.value_rows, &ks.value_panels, &ks.hat_panels})
    release_if_large(*buffer);
}

// (mean, rstd) of one row of D elements, read with stride sd, and the row itself in dst.
template <typename scalar_t, typename T>
EEGFAST_INLINE void row_stats(const scalar_t* x, int64_t sd, int64_t D, T eps, T* dst, T& mean,
                              T& rstd) {
  T sum = 0;
  for (int64_t d = 0; d < D; ++d) {
    dst[d] = static_cast<T>(x[d * sd]);
    sum += dst[d];
  }
  mean = sum / static_cast<T>(D);
  T var = 0;
  for (int64_t d = 0; d < D; ++d) var += (dst[d] - mean) * (dst[d] - mean);
  rstd = T(1) / std::sqrt(var / static_cast<T>(D) + eps);
}

// dst[d] = (x[d] - mean) rstd w[d] + b[d]; hat[d] = (x[d] - mean) rstd if hat is given.
template <typename scalar_t, typename T>
EEGFAST_INLINE void normalize_row(const scalar_t* x, int64_t sd, int64_t D, T mean, T rstd,
                                  const T* w, const T* b, T* dst, T* hat) {
  for (int64_t d = 0; d < D; ++d) {
    const T h = (static_cast<T>(x[d * sd]) - mean) * rstd;
    if (hat != nullptr) hat[d] = h;
    dst[d] = h * (w ? w[d] : T(1)) + (b ? b[d] : T(0));
  }
}

// LayerNorm of V L rows stored transposed, one row per vector lane: element (d, r) of X at
// X[d V L + r] (a key panel, or a forward query tile). Sums over d are then lane-wise vector
// adds, with no dependent scalar chains (row-wise scalar LayerNorms were ~20% of the forward
// at D = 20). In place: X becomes scale (LN(x) w + b), with rows r >= valid set to 0. The
// (mean, rstd) of each row come from mean_in / rstd_in (V L each) when given, else are
// computed and written to mean_out / rstd_out; norm2_out (V L) gets each row's squared norm.
// hat_out, when given, gets the rows before the affine step ((x - mean) rstd, 0 past `valid`)
// in X's layout.
template <int V, typename T>
EEGFAST_INLINE void layer_norm_lanes(T* X, int64_t D, int valid, T eps, const T* w, const T* b,
                                     T scale, const T* mean_in, const T* rstd_in, T* mean_out,
                                     T* rstd_out, T* norm2_out, T* hat_out = nullptr) {
  constexpr int L = kLanes<T>, S = V * L;
  vec_t<T> mean[V], rstd[V];
  if (mean_in != nullptr) {
    for (int v = 0; v < V; ++v) mean[v] = vload(mean_in + v * L), rstd[v] = vload(rstd_in + v * L);
  } else {
    vec_t<T> sum[V], var[V];
    for (int v = 0; v < V; ++v) sum[v] = var[v] = vec_t<T>{};
    for (int64_t d = 0; d < D; ++d)
      #pragma GCC unroll 3
      for (int v = 0; v < V; ++v) sum[v] += vload(X + d * S + v * L);
    for (int v = 0; v < V; ++v) mean[v] = sum[v] / vsplat(static_cast<T>(D));
    for (int64_t d = 0; d < D; ++d)
      #pragma GCC unroll 3
      for (int v = 0; v < V; ++v) {
        const vec_t<T> c = vload(X + d * S + v * L) - mean[v];
        var[v] += c * c;
      }
    for (int v = 0; v < V; ++v) {
      vstore(mean_out + v * L, mean[v]);
      vstore(rstd_out + v * L, var[v] / vsplat(static_cast<T>(D)) + eps);
      // A counted loop over memory, which GCC vectorises (vsqrt, vdiv); lane by lane on the
      // vector it stayed scalar (~2% of the forward).
      for (int i = 0; i < L; ++i) rstd_out[v * L + i] = T(1) / std::sqrt(rstd_out[v * L + i]);
      rstd[v] = vload(rstd_out + v * L);
    }
  }
  // Lane r of vector v keeps its row when v L + r < valid: one compare per vector (a lane
  // loop here compiled to inserts, ~8% of the forward at N = 257).
  vec_t<T> keep[V], norm2[V];
  for (int v = 0; v < V; ++v) {
    keep[v] = lane_index<T>() < vsplat(static_cast<T>(valid - v * L)) ? vsplat(T(1)) : vec_t<T>{};
    norm2[v] = vec_t<T>{};
  }
  for (int64_t d = 0; d < D; ++d) {
    const vec_t<T> wd = vsplat(w ? w[d] : T(1)), bd = vsplat(b ? b[d] : T(0));
    #pragma GCC unroll 3
    for (int v = 0; v < V; ++v) {
      const vec_t<T> h = (vload(X + d * S + v * L) - mean[v]) * rstd[v];
      // a select, not a product: rows past `valid` may hold inf or NaN (eps = 0, no data)
      const vec_t<T> y = keep[v] != T(0) ? (h * wd + bd) * scale : vec_t<T>{};
      vstore(X + d * S + v * L, y);
      if (hat_out != nullptr) vstore(hat_out + d * S + v * L, keep[v] != T(0) ? h : vec_t<T>{});
      norm2[v] += y * y;
    }
  }
  for (int v = 0; v < V; ++v) vstore(norm2_out + v * L, norm2[v]);
}

// Requests the lines of one contiguous row of D elements, to read or (ForWrite) to write.
template <bool ForWrite = false, typename scalar_t>
EEGFAST_INLINE void prefetch_row(const scalar_t* row, int64_t D) {
  const char* bytes = reinterpret_cast<const char*>(row);
  const int64_t n = D * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t off = 0; off < n; off += 64) __builtin_prefetch(bytes + off, ForWrite, 3);
  __builtin_prefetch(bytes + n - 1, ForWrite, 3);
}
constexpr int64_t kRowPrefetch = 8;  // rows ahead

// Cache lines of rows of heads, requested into L2 a few at a time (`step`) or all at once
// (`finish`). In the (B, N, H, D) and packed layouts a head's rows lie H D (or 3 H D) elements
// apart, which the hardware prefetchers do not follow.
class HeadLines {
 public:
  // Rows (b, h, 0 ... N - 1) of t, D elements each (at most kMaxParts calls).
  template <typename scalar_t>
  void add(const Strided<scalar_t>& t, int64_t b, int64_t h, int64_t N, int64_t D) {
    if (t.sd != 1) return;  // strided elements: left to the hardware
    // adjacent rows ((B, H, N, D) contiguous) are one block, requested line by line (per row,
    // rows sharing lines were requested twice or three times: ~4% of the forward at D = 20)
    const int64_t bytes = D * static_cast<int64_t>(sizeof(scalar_t));
    const bool one_block = t.sn == D;
    Part& part = parts_[parts_count_++];
    part.first = reinterpret_cast<const char*>(t.row(b, h, 0));
    part.rows = one_block ? 1 : N;
    part.row_stride = t.sn * static_cast<int64_t>(sizeof(scalar_t));
    part.row_bytes = one_block ? N * bytes : bytes;
    lines_ += part.rows * (part.row_bytes / 64 + 2);  // at most, whatever the alignment
    if (parts_count_ == 1) start_row();
  }
  // Spreads the lines over about `steps` calls of step.
  void pace(int64_t steps) {
    steps = std::max<int64_t>(steps, 1);
    per_step_ = (lines_ + steps - 1) / steps;
  }
  // Requests the next few lines.
  EEGFAST_INLINE void step() {
    for (int64_t i = 0; i < per_step_ && part_ < parts_count_; ++i) {
      __builtin_prefetch(line_, 0, 2);
      line_ += 64;
      if (line_ >= row_end_) next_row();
    }
  }
  // Requests every line not requested yet.
  void finish() {
    per_step_ = std::numeric_limits<int64_t>::max();
    step();
  }

 private:
  struct Part {  // rows of one tensor, in bytes
    const char* first;
    int64_t rows, row_stride, row_bytes;
  };
  void start_row() {
    if (part_ >= parts_count_) return;
    const Part& part = parts_[part_];
    const char* row = part.first + row_ * part.row_stride;
    line_ = row - reinterpret_cast<uintptr_t>(row) % 64;  // the first line's start
    row_end_ = row + part.row_bytes;
  }
  void next_row() {
    if (++row_ == parts_[part_].rows) row_ = 0, ++part_;
    start_row();
  }
  static constexpr int kMaxParts = 3;
  Part parts_[kMaxParts];
  int parts_count_ = 0, part_ = 0;
  int64_t row_ = 0, lines_ = 0, per_step_ = 0;
  const char* line_ = nullptr;
  const char* row_end_ = nullptr;
};

// Requests the N rows of (b, h) of t into L2 at once.
template <typename scalar_t>
void prefetch_head(const Strided<scalar_t>& t, int64_t b, int64_t h, int64_t N, int64_t D) {
  HeadLines lines;
  lines.add(t, b, h, N, D);
  lines.finish();
}

// A thread runs consecutive tasks (run_tasks hands each a contiguous share first): while it
// computes the last task of (b, h), it requests the next head's q, k and v, so that loading
// them overlaps this task's compute instead of stalling the next one's first reads. These are
// the lines of that next head (none unless task (bh, chunk) is bh's last and a head follows),
// paced over `steps`. The forward takes its steps between micro-tiles: requested all at once
// as its task began, the ~1000 lines of a head at D = 20 filled the line-fill buffers and
// stalled the task's own loads (with the inputs out of cache, ~5% of a single-threaded forward
// at N = 257).
template <typename scalar_t, typename T>
HeadLines next_head_lines(const Problem<scalar_t, T>& p, int64_t bh, int64_t chunk,
                          int64_t steps) {
  HeadLines lines;
  if (chunk == p.chunks - 1 && bh + 1 < p.B * p.H)
    for (const Strided<scalar_t>* t : {&p.q, &p.k, &p.v})
      lines.add(*t, (bh + 1) / p.H, (bh + 1) % p.H, p.N, p.D);
  lines.pace(steps);
  return lines;
}

// Which layouts of the keys and values a kernel reads (see KeySide).
enum class KeyLayout {
  kForward,   // panels, values
  kBackward,  // panels, value_panels, hat_panels
};

// Normalised keys (and values) of (b, h) in the layouts the tile kernels read, the backward's
// panels times the softmax scale. Writes the key statistics to k_stats (N, 2) when given; with
// stats_in, uses those instead of computing.
template <typename scalar_t, typename T>
EEGFAST_INLINE void prepare_keys(const Problem<scalar_t, T>& p, int64_t b, int64_t h, T eps,
                                 KeyLayout layout, const T* stats_in, T* k_stats,
                                 KeySide<T>& ks) {
  const bool backward = layout == KeyLayout::kBackward;
  const int64_t N = p.N, D = p.D, Dv = p.Dv, Nk = p.Nk;
  const T inf = std::numeric_limits<T>::infinity();
  // The value rows' first reads below stalled on memory (~6% of the forward): request them
  // now, while the key LayerNorm computes (the first task of a thread has no earlier request).
  prefetch_head(p.v, b, h, N, D);
  constexpr int W = kPanel<T>, L = kLanes<T>;
  // The buffers come from the thread's previous task (tasks keep a thread_local KeySide): only
  // what is not overwritten below is zeroed here (zero-filling them whole was ~3% of the
  // forward). Panels holding a key < N are written whole (0 in the rows past N); the kernels
  // read value rows up to the vector holding the last key, and all their Dv lanes (the
  // forward's online path).
  const int64_t Np = (N + W - 1) / W * W;  // keys of the panels that hold one < N
  ks.panels.resize(Nk * D);
  std::fill(ks.panels.begin() + Np * D, ks.panels.end(), T(0));
  const bool* padding = p.key_padding ? p.key_padding + b * N : nullptr;
  // Padding keys are ignored, whatever they hold: their probabilities are 0, but 0 times a NaN
  // or inf value is NaN. The forward then reads copies of the values with those rows zeroed
  // (the backward zeroes its value panels' padding lanes below).
  bool nonfinite_padding_values = false;
  if (!backward && padding != nullptr)
    for (int64_t j = 0; j < N && !nonfinite_padding_values; ++j) {
      if (!padding[j]) continue;
      const scalar_t* row = p.v.row(b, h, j);
      for (int64_t d = 0; d < D; ++d)
        if (!std::isfinite(static_cast<T>(row[d * p.v.sd]))) nonfinite_padding_values = true;
    }
  const bool copy_values =
      !backward && (nonfinite_padding_values || !whole_vector_rows<scalar_t, T>(D, p.v.sd));
  if (copy_values) {
    std::vector<T>& rows = ks.value_rows;
    rows.resize(Nk * Dv);
    for (int64_t j = 0; j < N; ++j) vstore(rows.data() + j * Dv + Dv - L, vec_t<T>{});  // past D
    std::fill(rows.begin() + N * Dv, rows.end(), T(0));
  } else if (backward) {
    ks.value_panels.resize(Nk * D);
    std::fill(ks.value_panels.begin() + Np * D, ks.value_panels.end(), T(0));
    ks.hat_panels.resize(Nk * D);
  }
  ks.bias.resize(Nk);
  ks.ids.resize(Nk);
  std::fill(ks.bias.begin() + N, ks.bias.end(), -inf);
  std::fill(ks.ids.begin() + N, ks.ids.end(), 0);
  alignas(64) T mean[W], rstd[W], norm2[W];
  // The largest squared key norm, lane-wise (lanes past N hold 0), and which lanes saw NaN.
  vec_t<T> max_norm2{};
  typename MaskOf<T>::type unordered{};
  for (int64_t j0 = 0; j0 < N; j0 += W) {
    const int valid = static_cast<int>(std::min<int64_t>(W, N - j0));
    T* panel = ks.panels.data() + j0 * D;
    gather_rows_to_lanes(p.k, b, h, j0, valid, W, D, panel, W);
    if (stats_in != nullptr) {
      for (int jj = 0; jj < W; ++jj) {
        mean[jj] = jj < valid ? stats_in[2 * (j0 + jj)] : T(0);
        rstd[jj] = jj < valid ? stats_in[2 * (j0 + jj) + 1] : T(1);
      }
      // the backward's panels hold scale K: its scores need no scaled copy of the queries
      layer_norm_lanes<2>(panel, D, valid, eps, p.kw, p.kb, backward ? p.scale : T(1), mean,
                          rstd, static_cast<T*>(nullptr), static_cast<T*>(nullptr), norm2,
                          backward ? ks.hat_panels.data() + j0 * D : static_cast<T*>(nullptr));
    } else {
      layer_norm_lanes<2>(panel, D, valid, eps, p.kw, p.kb, T(1), static_cast<const T*>(nullptr),
                          static_cast<const T*>(nullptr), mean, rstd, norm2);
      if (k_stats != nullptr)
        for (int jj = 0; jj < valid; ++jj) {
          k_stats[2 * (j0 + jj)] = mean[jj];
          k_stats[2 * (j0 + jj) + 1] = rstd[jj];
        }
    }
    // Padding keys' lanes hold zeros: a NaN or inf key would make its masked scores NaN
    // (NaN + -inf), the forward's rows NaN and the backward's sums NaN.
    if (padding != nullptr)
      for (int jj = 0; jj < valid; ++jj) {
        if (!padding[j0 + jj]) continue;
        for (int64_t d = 0; d < D; ++d) {
          panel[d * W + jj] = T(0);
          if (backward) ks.hat_panels[j0 * D + d * W + jj] = T(0);
        }
        norm2[jj] = T(0);
      }
    for (int half = 0; half < W / L; ++half) {
      const vec_t<T> n2 = vload(norm2 + half * L);
      max_norm2 = n2 > max_norm2 ? n2 : max_norm2;
      unordered |= n2 != n2;
    }
  }
  if (backward) {
    for (int64_t j0 = 0; j0 < N; j0 += W)
      gather_rows_to_lanes(p.v, b, h, j0, static_cast<int>(std::min<int64_t>(W, N - j0)), W, D,
                           ks.value_panels.data() + j0 * D, W);
    if (padding != nullptr)
      for (int64_t j = 0; j < N; ++j)
        if (padding[j])
          for (int64_t d = 0; d < D; ++d)
            ks.value_panels[(j / W) * W * D + d * W + j % W] = T(0);
  } else if (copy_values) {
    for (int64_t j = 0; j < N; ++j) {
      if (nonfinite_padding_values && padding[j])
        std::fill(ks.value_rows.begin() + j * Dv, ks.value_rows.begin() + j * Dv + D, T(0));
      else
        load_row(p.v.row(b, h, j), p.v.sd, D, ks.value_rows.data() + j * Dv);
    }
    ks.values = ks.value_rows.data();
    ks.value_stride = Dv;
    ks.value_last_chunk = Dv - L;
  } else {
    if constexpr (std::is_same_v<scalar_t, T>) ks.values = p.v.row(b, h, 0);
    ks.value_stride = p.v.sn;
    ks.value_last_chunk = D - L;
  }
  // A NaN key makes the bound NaN, so every tile takes the online-max path.
  ks.max_key_norm = std::sqrt(hmax<T>(max_norm2));
  for (int l = 0; l < L; ++l)
    if (unordered[l]) ks.max_key_norm = std::numeric_limits<T>::quiet_NaN();
  // Without key padding or block ids the keys' bias and the blocks' summaries follow from N
  // alone (the per-key loops below were ~1.5% of the forward at N = 257), and the ids and the
  // blocks' id ranges are not read (every use is under p.ids).
  const bool plain = padding == nullptr && p.ids == nullptr;
  if (plain) {
    std::fill(ks.bias.begin(), ks.bias.begin() + N, T(0));
  } else {
    for (int64_t j = 0; j < N; ++j) {
      ks.bias[j] = (padding && padding[j]) ? -inf : T(0);
      ks.ids[j] = p.ids ? p.ids[j] : 0;
    }
  }
  ks.block_empty.assign(p.key_blocks, plain ? 0 : 1);  // each block holds a key < N
  ks.block_masked.assign(p.key_blocks, 0);
  ks.block_keys.assign(p.key_blocks, kKeyBlock);
  // Whole vectors, not panels: at N = 257 the last block computes 16 keys, not 32 (the score
  // and dK / dV tiles take a last half panel as one vector).
  for (int64_t kb = 0; kb < p.key_blocks; ++kb) {
    const int64_t rest = N - kb * kKeyBlock;  // > 0
    const int keys = static_cast<int>(std::min<int64_t>(kKeyBlock, (rest + L - 1) / L * L));
    ks.block_keys[kb] = keys;
    if (plain) {
      ks.block_masked[kb] = keys > rest;  // keys past N
      continue;
    }
    for (int j = 0; j < keys; ++j)
      if (ks.bias[kb * kKeyBlock + j] != T(0)) ks.block_masked[kb] = 1;
  }
  if (plain) return;
  ks.block_id_min.assign(p.key_blocks, std::numeric_limits<int64_t>::max());
  ks.block_id_max.assign(p.key_blocks, std::numeric_limits<int64_t>::min());
  for (int64_t j = 0; j < N; ++j) {
    if (ks.bias[j] != T(0)) continue;
    const int64_t kb = j / kKeyBlock;
    ks.block_empty[kb] = 0;
    ks.block_id_min[kb] = std::min(ks.block_id_min[kb], ks.ids[j]);
    ks.block_id_max[kb] = std::max(ks.block_id_max[kb], ks.ids[j]);
  }
}

// Which key blocks a query tile needs, and whether its scores need per-element masking.
struct TileMask {
  int64_t first_row, last_row;  // query rows of the tile (last_row: last valid one)
  int64_t ids[kMaxTileRows];       // block id of each row (padding rows: the last valid one)
  int64_t id_min, id_max;
};

template <typename scalar_t, typename T>
EEGFAST_INLINE bool block_visible(const Problem<scalar_t, T>& p, const KeySide<T>& ks,
                                  const TileMask& t, int64_t kb) {
  if (ks.block_empty[kb]) return false;
  if (p.causal && kb * kKeyBlock > t.last_row) return false;
  if (p.ids && ks.block_id_min[kb] > t.id_max) return false;
  return true;
}

// Which per-element masks key block kb may need on tile t's rows: causal (some key of the
// block lies after a row) and block-causal (some key's block id exceeds a row's).
struct ElementMasks {
  bool by_position, by_block;
};
template <typename scalar_t, typename T>
EEGFAST_INLINE ElementMasks element_masks(const Problem<scalar_t, T>& p, const KeySide<T>& ks,
                                          const TileMask& t, int64_t kb) {
  return {p.causal && kb * kKeyBlock + kKeyBlock - 1 > t.first_row,
          p.ids && ks.block_id_max[kb] > t.id_min};
}

// Whether some score of the tile's rows in key block kb is masked (a padded key, or a causal /
// block-causal pair): mask_scores has work to do.
template <typename scalar_t, typename T>
EEGFAST_INLINE bool scores_need_mask(const Problem<scalar_t, T>& p, const KeySide<T>& ks,
                                     const TileMask& t, int64_t kb) {
  const ElementMasks m = element_masks(p, ks, t, kb);
  return ks.block_masked[kb] || m.by_position || m.by_block;
}

// Adds the key bias and, where some keys of the block are hidden from some rows, -inf there.
template <int R, typename scalar_t, typename T>
EEGFAST_INLINE void mask_scores(const Problem<scalar_t, T>& p, const KeySide<T>& ks,
                                const TileMask& t, int64_t kb, T* S) {
  constexpr int L = kLanes<T>;
  const T* bias = ks.bias.data() + kb * kKeyBlock;
  const int keys = ks.block_keys[kb];
  if (ks.block_masked[kb])
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < keys; j += L)
        vstore(S + r * kKeyBlock + j, vload(S + r * kKeyBlock + j) + vload(bias + j));
  const int64_t key0 = kb * kKeyBlock;
  const auto [by_position, by_block] = element_masks(p, ks, t, kb);
  if (!by_position && !by_block) return;
  const T inf = std::numeric_limits<T>::infinity();
  for (int r = 0; r < R; ++r) {
    const int64_t i = t.first_row + r;
    for (int j = 0; j < keys; ++j) {
      const bool hidden =
          (by_position && key0 + j > i) || (by_block && ks.ids[key0 + j] > t.ids[r]);
      if (hidden) S[r * kKeyBlock + j] = -inf;
    }
  }
}

template <int R, typename scalar_t, typename T>
EEGFAST_INLINE TileMask tile_mask(const Problem<scalar_t, T>& p, int64_t i0) {
  static_assert(R <= kMaxTileRows, "tile rows");
  TileMask t;
  t.first_row = i0;
  t.last_row = std::min(i0 + R, p.N) - 1;
  t.id_min = std::numeric_limits<int64_t>::max();
  t.id_max = std::numeric_limits<int64_t>::min();
  for (int r = 0; r < R; ++r) {
    const int64_t i = std::min(i0 + r, t.last_row);
    t.ids[r] = p.ids ? p.ids[i] : 0;
    t.id_min = std::min(t.id_min, t.ids[r]);
    t.id_max = std::max(t.id_max, t.ids[r]);
  }
  return t;
}

// ---- forward ------------------------------------------------------------------------------

template <typename scalar_t, typename T>
struct ForwardArgs {
  Problem<scalar_t, T> p;
  T eps;
  scalar_t* out;  // (B, N, H, D)
  T* lse;         // (B, H, N)
  T* q_stats;     // (B, H, N, 2)
  T* k_stats;     // (B, H, N, 2)
};

// Unshifted softmax (forward fast path). The scores of LayerNorm'ed queries and keys are
// bounded: |q_i . k_j| <= |q_i| max_j |k_j| =: c_i (Cauchy-Schwarz; q_i already scaled). When
// c_i <= kUnshiftedScoreLimit for every row of a tile, e^s needs no shift at all: every score lies
// in [-30, 30] (up to rounding), so each term lies in [e^-30, e^30] and a row's sum (at most
// 16k e^30) is far from float overflow and underflow, while the normalisation is exact math
// whatever the shift. That removes the max pass, the rescaling of the accumulators, the shift
// subtraction, and (in blocks with no masked key) the flush of exp to 0. Tiles with a larger
// bound (or NaN) take the online maximum.
constexpr double kUnshiftedScoreLimit = 30.0;

// -- fast path: query-lane tiles --
// A tile holds QT = 3 L queries in the vector lanes: Qt (D, QT) are its normalised, scaled
// queries transposed, St (keys, QT) its scores / probabilities, Ot (D, QT) its output
// accumulators. Scores broadcast one key element against 3 query vectors and P.V broadcasts
// one value element against 3 probability vectors, so neither the head dim nor the key count
// is padded to a vector (at D = 20 the row tiles computed P.V over 24 dims) and the softmax
// sums are plain vector adds (lane = query).

// A tile of QV query vectors (QT = QV L queries); every tile has QV = kQueryVectors but the
// last of a task, which has as few vectors as hold its rows (at N = 257, 17 rows take 2 vectors,
// not 3: ~5% of the forward's tile work was padding rows).

// St[jr][:] = sum_d keys[jr][d] Qt[d][:] for JR keys that lie side by side in a key panel:
// element (jr, d) at keys[d W + jr].
template <int QV, int JR, typename T>
EEGFAST_INLINE void query_lane_scores(const T* Qt, int64_t D, const T* keys, T* St) {
  static_assert(kPanel<T> % JR == 0, "a micro-tile's keys lie in one panel");
  constexpr int QT = QV * kLanes<T>;
  tile_products<JR, QV, false>(keys, 1, kPanel<T>, Qt, QT, D, St, QT);
}

// Ot[d0 + dr][:] += sum_j values[j][d0 + dr] St[j][:] for DR dims, over `keys` keys; element
// (j, d) of values at j key_stride + d dim_stride (rows: (Dv, 1); panels: (1, W)).
template <int QV, int DR, typename T>
EEGFAST_INLINE void query_lane_values(T* Ot, const T* St, const T* values, int64_t key_stride,
                                      int64_t dim_stride, int keys, int64_t d0) {
  constexpr int QT = QV * kLanes<T>;
  tile_products<DR, QV, true>(values + d0 * dim_stride, dim_stride, key_stride, St, QT, keys,
                              Ot + d0 * QT, QT);
}

// All D dims in chunks of DR (see for_dim_chunks).
template <int QV, int DR, typename T>
EEGFAST_INLINE void query_lane_all_values(T* Ot, const T* St, const T* values,
                                          int64_t key_stride, int64_t dim_stride, int64_t D,
                                          int keys) {
  for_dim_chunks<DR>(D, [&](auto dims, int64_t d0) EEGFAST_INLINE_LAMBDA {
    query_lane_values<QV, decltype(dims)::value>(Ot, St, values, key_stride, dim_stride, keys,
                                                 d0);
  });
}

// The key bias and the per-element causal / block-causal masks of one key block, on St.
template <int QV, typename scalar_t, typename T>
EEGFAST_INLINE bool query_lane_mask(const Problem<scalar_t, T>& p, const KeySide<T>& ks,
                                    const TileMask& t, int64_t kb, int keys, T* St) {
  constexpr int QT = QV * kLanes<T>;
  const T inf = std::numeric_limits<T>::infinity();
  const int64_t key0 = kb * kKeyBlock;
  if (ks.block_masked[kb])
    for (int j = 0; j < keys; ++j)
      if (ks.bias[key0 + j] != T(0)) std::fill(St + j * QT, St + (j + 1) * QT, -inf);
  const bool by_position = p.causal && key0 + keys - 1 > t.first_row;
  const bool by_block = p.ids && ks.block_id_max[kb] > t.id_min;
  if (!by_position && !by_block) return ks.block_masked[kb] != 0;
  for (int j = 0; j < keys; ++j) {
    const int64_t key = key0 + j;
    for (int r = 0; r < QT; ++r) {
      const bool hidden =
          (by_position && key > t.first_row + r) || (by_block && ks.ids[key] > t.ids[r]);
      if (hidden) St[j * QT + r] = -inf;
    }
  }
  return true;
}

// -- fallback: row tiles with the online maximum --

// Online softmax over one key block: S becomes the block's probabilities (relative to the
// new running max), alpha the factor that rescales the previous accumulators.
template <int R, typename T>
EEGFAST_INLINE void softmax_step(T* S, int keys, T* m, T* l, T* alpha) {
  constexpr int L = kLanes<T>;
  const T inf = std::numeric_limits<T>::infinity();
  for (int r = 0; r < R; ++r) {
    T* s = S + r * kKeyBlock;
    vec_t<T> mx = vsplat(-inf);
    for (int j = 0; j < keys; j += L) mx = vmax<T>(mx, vload(s + j));
    const T m_new = std::max(m[r], hmax<T>(mx));
    const T shift = m_new == -inf ? T(0) : m_new;  // a row that has seen no key yet
    alpha[r] = std::exp(m[r] - shift);
    vec_t<T> sum{};
    for (int j = 0; j < keys; j += L) {
      const vec_t<T> e = vexp(vload(s + j) - shift);
      vstore(s + j, e);
      sum += e;
    }
    l[r] = l[r] * alpha[r] + hsum<T>(sum);
    m[r] = m_new;
  }
}

// Rows [row_begin, row_end) of (b, h) in R-row tiles with the online maximum: for inputs
// whose score bound is too large (see kUnshiftedScoreLimit), or NaN, and (R = 1) for the few
// rows of a task past its whole vectors of queries. Writes the rows' q_stats (those its
// normalisation used).
template <int R, typename scalar_t, typename T>
EEGFAST_INLINE void forward_rows_online(const ForwardArgs<scalar_t, T>& a, const KeySide<T>& ks,
                                        int64_t b, int64_t h, int64_t row_begin,
                                        int64_t row_end) {
  const Problem<scalar_t, T>& p = a.p;
  const int64_t D = p.D, Dv = p.Dv, N = p.N, H = p.H, bh = b * H + h;
  const T inf = std::numeric_limits<T>::infinity();
  std::vector<T> queries(R * Dv), acc(R * Dv), row(D);
  alignas(64) T S[R * kKeyBlock];
  for (int64_t i0 = row_begin; i0 < row_end; i0 += R) {
    const int rows = static_cast<int>(std::min<int64_t>(R, row_end - i0));
    std::fill(queries.begin(), queries.end(), T(0));
    std::fill(acc.begin(), acc.end(), T(0));
    for (int r = 0; r < rows; ++r) {
      const scalar_t* x = p.q.row(b, h, i0 + r);
      T mean, rstd;
      row_stats(x, p.q.sd, D, a.eps, row.data(), mean, rstd);
      a.q_stats[(bh * N + i0 + r) * 2] = mean;
      a.q_stats[(bh * N + i0 + r) * 2 + 1] = rstd;
      T* dst = queries.data() + r * Dv;
      normalize_row(x, p.q.sd, D, mean, rstd, p.qw, p.qb, dst, static_cast<T*>(nullptr));
      for (int64_t d = 0; d < D; ++d) dst[d] *= p.scale;
    }
    TileMask t = tile_mask<R>(p, i0);
    t.last_row = i0 + rows - 1;
    T m[R], l[R], alpha[R];
    for (int r = 0; r < R; ++r) m[r] = -inf, l[r] = 0;
    for (int64_t kb = 0; kb < p.key_blocks; ++kb) {
      if (!block_visible(p, ks, t, kb)) continue;
      const int keys = ks.block_keys[kb];
      score_tile<R>(queries.data(), Dv, D, ks.panels.data() + kb * kKeyBlock * D, keys, S);
      mask_scores<R>(p, ks, t, kb, S);
      softmax_step<R>(S, keys, m, l, alpha);
      for (int r = 0; r < R; ++r) {
        if (alpha[r] == T(1)) continue;
        for (int64_t d = 0; d < Dv; ++d) acc[r * Dv + d] *= alpha[r];
      }
      // keys past N have P = 0 and no value row to read
      accumulate_rows<R>(acc.data(), Dv, S, ks.values + kb * kKeyBlock * ks.value_stride,
                         ks.value_stride, ks.value_last_chunk,
                         static_cast<int>(std::min<int64_t>(keys, N - kb * kKeyBlock)));
    }
    for (int r = 0; r < rows; ++r) {
      const int64_t i = i0 + r;
      const T inv = l[r] > T(0) ? T(1) / l[r] : T(0);
      scalar_t* o = a.out + ((b * N + i) * H + h) * D;
      for (int64_t d = 0; d < D; ++d) {
        const int64_t at = value_position<T>(d, Dv, ks.value_last_chunk);
        o[d] = static_cast<scalar_t>(acc[r * Dv + at] * inv);
      }
      a.lse[bh * N + i] = l[r] > T(0) ? m[r] + std::log(l[r]) : -inf;
    }
  }
}

// One query-lane tile of QV vectors: rows i0 ... i0 + rows - 1 (rows <= QV L) of (b, h).
// Qt and Ot hold D QV L elements each.
template <int QV, int R, int JR, int DR, typename scalar_t, typename T>
EEGFAST_INLINE void forward_query_tile(const ForwardArgs<scalar_t, T>& a, const KeySide<T>& ks,
                                       int64_t b, int64_t h, int64_t i0, int rows, T* Qt,
                                       T* Ot, HeadLines& next_head) {
  constexpr int L = kLanes<T>, QT = QV * L;
  const Problem<scalar_t, T>& p = a.p;
  const int64_t D = p.D, N = p.N, H = p.H, bh = b * H + h;
  const T inf = std::numeric_limits<T>::infinity();
  alignas(64) T St[kKeyBlock * QT];
  alignas(64) T bound[QT], sums[QT], means[QT], rstds[QT];
  T* q_stats = a.q_stats + bh * N * 2;
  std::fill(Ot, Ot + D * QT, T(0));
  // The tile's output rows ((B, N, H, D): H D elements apart) are written at its end: request
  // their lines now, while the tile computes (writing them stalled on the line fills).
  for (int r = 0; r < rows; ++r) prefetch_row<true>(a.out + ((b * N + i0 + r) * H + h) * D, D);
  gather_rows_to_lanes(p.q, b, h, i0, rows, QT, D, Qt, QT);
  layer_norm_lanes<QV>(Qt, D, rows, a.eps, p.qw, p.qb, p.scale, static_cast<const T*>(nullptr),
                       static_cast<const T*>(nullptr), means, rstds, bound);
  bool unshifted = true;
  for (int r = 0; r < QT; ++r) {
    bound[r] = r < rows ? std::sqrt(bound[r]) * ks.max_key_norm : T(0);  // |q_r| max_j |k_j|
    if (!(bound[r] <= static_cast<T>(kUnshiftedScoreLimit))) unshifted = false;
  }
  if (!unshifted) {  // writes the q_stats its own normalisation used
    forward_rows_online<R>(a, ks, b, h, i0, i0 + rows);
    return;
  }
  for (int r = 0; r < rows; ++r) {
    q_stats[2 * (i0 + r)] = means[r];
    q_stats[2 * (i0 + r) + 1] = rstds[r];
  }
  TileMask t = tile_mask<QT>(p, i0);
  t.last_row = i0 + rows - 1;
  vec_t<T> l[QV];
  for (int v = 0; v < QV; ++v) l[v] = vec_t<T>{};
  for (int64_t kb = 0; kb < p.key_blocks; ++kb) {
    if (!block_visible(p, ks, t, kb)) continue;
    const int64_t key0 = kb * kKeyBlock;
    const int keys = static_cast<int>(std::min<int64_t>(kKeyBlock, N - key0));
    constexpr int W = kPanel<T>;
    // Micro-tiles of JR keys, then of 4, 2, 1 for the rest of the last block: at N = 257 its
    // one key was a micro-tile of 8 (scores and exps of 7 keys past N: ~2% of the forward).
    for_dim_chunks<JR>(keys, [&](auto tile_keys, int64_t j) EEGFAST_INLINE_LAMBDA {
      const int64_t key = key0 + j;
      next_head.step();
      query_lane_scores<QV, decltype(tile_keys)::value>(
          Qt, D, ks.panels.data() + key / W * D * W + key % W, St + j * QT);
    });
    // e^s in place, summed per query; masked scores (-inf) need vexp's flush to 0. The block's
    // sums are named locals that start at 0 and live in this loop alone: l[] lives across the
    // whole key loop (the score and P.V micro-tiles use most registers), and sums carried in or
    // out of it stayed on the stack, so each key's three exps waited on a store-to-load
    // forwarding chain.
    auto exponentiate = [&](auto masked) EEGFAST_INLINE_LAMBDA {
      static_assert(QV <= 3, "three named sums");
      auto exp_stored = [&](T* x) EEGFAST_INLINE_LAMBDA {
        const vec_t<T> e = decltype(masked)::value ? vexp(vload(x)) : vexp_in_range(vload(x));
        vstore(x, e);
        return e;
      };
      vec_t<T> sum0{}, sum1{}, sum2{};
      for (int j = 0; j < keys; ++j) {
        T* row = St + j * QT;
        sum0 += exp_stored(row);
        if constexpr (QV > 1) sum1 += exp_stored(row + L);
        if constexpr (QV > 2) sum2 += exp_stored(row + 2 * L);
      }
      l[0] += sum0;
      if constexpr (QV > 1) l[1] += sum1;
      if constexpr (QV > 2) l[2] += sum2;
    };
    if (query_lane_mask<QV>(p, ks, t, kb, keys, St))
      exponentiate(std::true_type{});
    else
      exponentiate(std::false_type{});
    query_lane_all_values<QV, DR>(Ot, St, ks.values + key0 * ks.value_stride, ks.value_stride,
                                  1, D, keys);
  }
  alignas(64) T logs[QT], inv[QT];
  for (int v = 0; v < QV; ++v) {
    vstore(sums + v * L, l[v]);
    vstore(logs + v * L, vlog_positive(l[v]));  // lanes with a zero sum are not used
    // 1 / sum, 0 for a row that saw no key (a select: the division gives inf there)
    vstore(inv + v * L, l[v] > T(0) ? vsplat(T(1)) / l[v] : vec_t<T>{});
  }
  for (int r = 0; r < rows; ++r) a.lse[bh * N + i0 + r] = sums[r] > T(0) ? logs[r] : -inf;
  scalar_t* out_rows = a.out + ((b * N + i0) * H + h) * D;  // row i0 + r at r H D
  for (int v = 0; v < QV && v * L < rows; ++v)
    scatter_lanes_to_rows(Ot + v * L, QT, D, std::min(rows - v * L, L), out_rows + v * L * H * D,
                          H * D, inv + v * L);
}

// Task `task`'s (batch, head) pair bh = (b, h), query chunk and rows [row_begin, row_end)
// (empty for a chunk past N).
struct TaskRows {
  int64_t bh, chunk, b, h, row_begin, row_end;
};
template <typename scalar_t, typename T>
EEGFAST_INLINE TaskRows task_rows(const Problem<scalar_t, T>& p, int64_t task) {
  const int64_t bh = task / p.chunks, chunk = task % p.chunks;
  const int64_t row_begin = chunk * p.chunk_rows;
  return {bh, chunk, bh / p.H, bh % p.H, row_begin, std::min(p.N, row_begin + p.chunk_rows)};
}

// One task: rows of one (batch, head) in query-lane tiles of kQueryVectors vectors (the last
// one as few as it needs); JR keys per score micro-tile, DR dims per P.V micro-tile, R rows per
// fallback tile.
template <int R, int JR, int DR, typename scalar_t, typename T>
EEGFAST_INLINE void forward_task(const ForwardArgs<scalar_t, T>& a, int64_t task) {
  static_assert(kKeyBlock % JR == 0, "key block");
  constexpr int L = kLanes<T>, QV = kQueryVectors, QT = QV * L;
  static_assert(QT <= kMaxTileRows && QV == 3, "tile rows");
  const Problem<scalar_t, T>& p = a.p;
  const auto [bh, chunk, b, h, row_begin, row_end] = task_rows(p, task);
  if (row_begin >= row_end) return;
  const int64_t N = p.N;
  KeySide<T>& ks = thread_key_side<T>();  // buffers reused (see prepare_keys)
  prepare_keys(p, b, h, a.eps, KeyLayout::kForward, static_cast<const T*>(nullptr),
               chunk == 0 ? a.k_stats + bh * N * 2 : static_cast<T*>(nullptr), ks);
  // At most L / 4 rows past the task's whole vectors of queries (N = 16 m + 1 with 16 lanes, as
  // LaBraM's 257 = 256 patches + the cls token) take the row layout, one at a time: a
  // query-lane vector costs the same FMAs however few of its lanes hold rows (one row: ~12x
  // its row-layout cost), and at N = 257 that last vector was 1 of 17.
  const int64_t tail = (row_end - row_begin) % L;
  const int64_t lane_end = tail <= L / 4 ? row_end - tail : row_end;
  std::vector<T> Qt(p.D * QT), Ot(p.D * QT);
  // one step per score micro-tile (JR keys) of each query tile
  const int64_t tiles = (lane_end - row_begin + QT - 1) / QT;
  HeadLines next_head = next_head_lines(p, bh, chunk, tiles * ((N + JR - 1) / JR));
  for (int64_t i0 = row_begin; i0 < lane_end; i0 += QT) {
    const int rows = static_cast<int>(std::min<int64_t>(QT, lane_end - i0));
    if (rows > 2 * L)
      forward_query_tile<3, R, JR, DR>(a, ks, b, h, i0, rows, Qt.data(), Ot.data(), next_head);
    else if (rows > L)
      forward_query_tile<2, R, JR, DR>(a, ks, b, h, i0, rows, Qt.data(), Ot.data(), next_head);
    else
      forward_query_tile<1, R, JR, DR>(a, ks, b, h, i0, rows, Qt.data(), Ot.data(), next_head);
  }
  next_head.finish();  // what the tiles' steps left (masked blocks, the online path)
  if (lane_end < row_end) forward_rows_online<1>(a, ks, b, h, lane_end, row_end);
  release_if_large(ks);
}

// ---- backward -----------------------------------------------------------------------------

template <typename scalar_t, typename T>
struct BackwardArgs {
  Problem<scalar_t, T> p;
  Strided<scalar_t> grad_out;  // (B, N, H, D) as (B, H, N, D) strides, rows contiguous
  const scalar_t* out;       // (B, N, H, D)
  const T* lse;              // (B, H, N)
  const T* q_stats;          // (B, H, N, 2)
  const T* k_stats;          // (B, H, N, 2)
  scalar_t* dq;              // (B, H, N, D)
  scalar_t* dk;
  scalar_t* dv;
  T* key_grads;    // (B H, chunks, 2, Nk D): d(normalised k), dv partial sums, each in
                   // key-lane blocks (key_blocks, D, kKeyBlock) (see accumulate_transposed)
  T* q_param_grads;  // (B H chunks, 2, D): d q_w, d q_b partial sums
  T* k_param_grads;  // (B H, D): the key LayerNorm weight's (its bias's is exactly zero)
};

// LayerNorm backward of one row, vectorised over its Dv lanes (dn and hat are 0 past D): dx
// (Dv) from the gradient dn of the normalised row; adds the row's contribution to the
// parameter gradients dw, db (Dv each). w_pad: the weight (1 where absent), Dv lanes.
template <typename T>
EEGFAST_INLINE void layer_norm_backward_lanes(const T* dn, const T* hat, T rstd, const T* w_pad,
                                              int64_t D, int64_t Dv, T* dx, T* dw, T* db) {
  constexpr int L = kLanes<T>;
  vec_t<T> sum_g{}, sum_gh{};
  for (int64_t c = 0; c < Dv; c += L) {
    const vec_t<T> d = vload(dn + c), hh = vload(hat + c), g = d * vload(w_pad + c);
    sum_g += g;
    sum_gh += g * hh;
    vstore(dw + c, vload(dw + c) + d * hh);
    vstore(db + c, vload(db + c) + d);
  }
  const vec_t<T> mean_g = vsplat(hsum<T>(sum_g) / static_cast<T>(D));
  const vec_t<T> mean_gh = vsplat(hsum<T>(sum_gh) / static_cast<T>(D));
  const vec_t<T> r = vsplat(rstd);
  for (int64_t c = 0; c < Dv; c += L) {
    const vec_t<T> g = vload(dn + c) * vload(w_pad + c);
    vstore(dx + c, r * (g - mean_g - vload(hat + c) * mean_gh));
  }
}

template <typename T>
EEGFAST_INLINE T dot_lanes(const T* x, const T* y, int64_t Dv) {
  vec_t<T> sum{};
  for (int64_t c = 0; c < Dv; c += kLanes<T>) sum += vload(x + c) * vload(y + c);
  return hsum<T>(sum);
}

// dst[d] = x[d] for d < D, converted to scalar_t.
template <typename scalar_t, typename T>
EEGFAST_INLINE void store_row(const T* x, int64_t D, scalar_t* dst) {
  if (vector_rows<scalar_t, T>(D, 1)) {
    if constexpr (std::is_same_v<scalar_t, T> || std::is_same_v<scalar_t, c10::BFloat16>)
      move_row_vectors(x, D, dst);
    return;
  }
  for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(x[d]);
}

// A LayerNorm parameter in Dv lanes: x[d] (`absent` for every d < D when x is null), 0 past D.
template <typename T>
std::vector<T> padded_param(const T* x, T absent, int64_t D, int64_t Dv) {
  std::vector<T> out(Dv, T(0));
  for (int64_t d = 0; d < D; ++d) out[d] = x ? x[d] : absent;
  return out;
}

// Sums the key gradients of (b, h) over its `chunks` partials (each 2 Nk D: d(normalised
// keys) / scale, dv, in key-lane blocks; see backward_task), then the key LayerNorm backward;
// writes dk, dv and the key parameter gradients. hat_panels: the keys before the affine step
// (KeySide::hat_panels). Works on L keys at a time with the keys in the lanes, as the partials
// and hat panels hold them, so a key's sums over its dims are lane-wise adds (row by row,
// gathering each key's dims and summing them across lanes, this was ~9% of the backward at
// D = 20).
template <typename scalar_t, typename T>
EEGFAST_INLINE void backward_keys(const BackwardArgs<scalar_t, T>& a, int64_t bh,
                                  const T* partials, int64_t chunks, const T* hat_panels) {
  constexpr int L = kLanes<T>, W = kPanel<T>;
  const Problem<scalar_t, T>& p = a.p;
  const int64_t D = p.D, N = p.N, Nk = p.Nk;
  const T* k_stats = a.k_stats + bh * N * 2;
  const bool* padding = p.key_padding ? p.key_padding + (bh / p.H) * N : nullptr;
  // per dim d, L lanes each: the weight gradient sums, then this vector of keys'
  // d(normalised key) times the weight (g), dv and dk. No bias gradient: it is exactly zero
  // (the key bias adds q_n . k_b to every score of a query row, which the softmax ignores).
  std::vector<T> dkw(D * L, T(0)), g_dims(D * L), dval(D * L), dx(D * L);
  alignas(64) T rstd[L];
  const vec_t<T> inv_d = vsplat(T(1) / static_cast<T>(D));
  for (int64_t j0 = 0; j0 < N; j0 += L) {
    const int valid = static_cast<int>(std::min<int64_t>(L, N - j0));
    // element (j, d) of a key-lane block: ((j / kKeyBlock) D + d) kKeyBlock + j % kKeyBlock
    const int64_t at = (j0 / kKeyBlock) * D * kKeyBlock + j0 % kKeyBlock;
    const T* hat = hat_panels + (j0 / W) * D * W + j0 % W;  // dim d at hat[d W]
    // (0 for padding keys too: their rstd is NaN for a NaN key, and their gradients are 0)
    for (int l = 0; l < L; ++l)
      rstd[l] = l < valid && !(padding && padding[j0 + l]) ? k_stats[2 * (j0 + l) + 1] : T(0);
    vec_t<T> sum_g{}, sum_gh{};
    for (int64_t d = 0; d < D; ++d) {
      vec_t<T> dk_d{}, dv_d{};
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        const T* part = partials + chunk * 2 * Nk * D + at + d * kKeyBlock;
        dk_d += vload(part);
        dv_d += vload(part + Nk * D);
      }
      dk_d *= p.scale;
      vstore(dval.data() + d * L, dv_d);
      const vec_t<T> hh = vload(hat + d * W), g = dk_d * vsplat(p.kw ? p.kw[d] : T(1));
      vstore(g_dims.data() + d * L, g);
      sum_g += g;
      sum_gh += g * hh;
      vstore(dkw.data() + d * L, vload(dkw.data() + d * L) + dk_d * hh);
    }
    const vec_t<T> mean_g = sum_g * inv_d, mean_gh = sum_gh * inv_d, r = vload(rstd);
    for (int64_t d = 0; d < D; ++d)
      vstore(dx.data() + d * L,
             r * (vload(g_dims.data() + d * L) - mean_g - vload(hat + d * W) * mean_gh));
    scalar_t* dk = a.dk + (bh * N + j0) * D;  // key j0 + l at l D
    scalar_t* dv = a.dv + (bh * N + j0) * D;
    scatter_lanes_to_rows(dx.data(), L, D, valid, dk, D);
    scatter_lanes_to_rows(dval.data(), L, D, valid, dv, D);
  }
  for (int64_t d = 0; d < D; ++d)
    a.k_param_grads[bh * D + d] = hsum<T>(vload(dkw.data() + d * L));
}

// The key pass after query-chunked backward tasks: (b, h) = bh's keys from its chunks'
// partial sums.
template <typename scalar_t, typename T>
EEGFAST_INLINE void backward_keys_pass(const BackwardArgs<scalar_t, T>& a, int64_t bh) {
  const Problem<scalar_t, T>& p = a.p;
  KeySide<T>& ks = thread_key_side<T>();  // buffers reused (see prepare_keys)
  prepare_keys(p, bh / p.H, bh % p.H, T(0), KeyLayout::kBackward, a.k_stats + bh * p.N * 2,
               static_cast<T*>(nullptr), ks);
  backward_keys(a, bh, a.key_grads + bh * p.chunks * 2 * p.Nk * p.D, p.chunks,
                ks.hat_panels.data());
  release_if_large(ks);
}

// The last key block's keys when they are at most L / 4 (N = 16 m + 1 with 16 lanes, as
// LaBraM's 257: one key), in a block without masks (no padding, causal or block ids): the
// key-lane products would spend a whole vector of keys on each, in all four of S, dP, dK and
// dV (~3% of the backward at N = 257). Here, for each such key j and L rows at a time, the
// rows' products with the key are formed in their own (row) layout and reduced across lanes
// into one vector of rows (reduce_lanes), then
//   P = e^(s - lse),  dS' = P (dp - delta),  dQ^T += k_j dS'^T  (rows in the lanes),
//   dV_j += P^T G,  dK_j' += dS'^T Qn  (row layout, one broadcast per row),
// with the key (scale k_j, see backward_task) and value read from their panels. Moving the
// rows to lanes instead (two L x L transposes per row chunk of each of Qn and G) was ~60% of
// this path's time at N = 257. Qn, G: the group's rows, Dv apart (0 past D and in padding
// rows, whose lse = inf gives P = 0).
template <typename T>
EEGFAST_INLINE void backward_tail_keys(int tail_keys, const T* key_panel, const T* value_panel,
                                       int64_t D, int64_t Dv, const T* queries, const T* grads,
                                       int lane_tiles, const T* lse, const T* delta,
                                       T* dq_lanes, T* dvalues, T* dkn) {
  constexpr int L = kLanes<T>, W = kPanel<T>, QL = 2 * L;
  constexpr int kMaxDv = 128 + L;  // Dv <= 128 rounded up
  alignas(64) T key[kMaxDv], value[kMaxDv], sum_v[kMaxDv], sum_k[kMaxDv];
  alignas(64) T prob_rows[L], ds_rows[L];
  for (int j = 0; j < tail_keys; ++j) {
    for (int64_t d = 0; d < Dv; ++d) {
      key[d] = d < D ? key_panel[d * W + j] : T(0);
      value[d] = d < D ? value_panel[d * W + j] : T(0);
    }
    std::fill(sum_v, sum_v + Dv, T(0));
    std::fill(sum_k, sum_k + Dv, T(0));
    for (int lt = 0; lt < lane_tiles; ++lt) {
      const int64_t r0 = int64_t(lt) * L;
      const T* q = queries + r0 * Dv;
      const T* g = grads + r0 * Dv;
      vec_t<T> s_rows[L], dp_rows[L];
      #pragma GCC unroll 16
      for (int r = 0; r < L; ++r) {
        vec_t<T> s{}, dp{};
        for (int64_t c = 0; c < Dv; c += L) {
          s += vload(q + r * Dv + c) * vload(key + c);
          dp += vload(g + r * Dv + c) * vload(value + c);
        }
        s_rows[r] = s;
        dp_rows[r] = dp;
      }
      vec_t<T> prob, ds;
      probability_and_grad<T>(reduce_lanes<T>(s_rows), reduce_lanes<T>(dp_rows),
                              vload(lse + r0), vload(delta + r0), prob, ds);
      vstore(prob_rows, prob);
      vstore(ds_rows, ds);
      T* dq = dq_lanes + (lt / 2) * D * QL + (lt % 2) * L;
      for (int64_t d = 0; d < D; ++d)
        vstore(dq + d * QL, vload(dq + d * QL) + ds * vsplat(key[d]));
      for (int64_t c = 0; c < Dv; c += L) {
        vec_t<T> acc_v = vload(sum_v + c), acc_k = vload(sum_k + c);
        #pragma GCC unroll 16
        for (int r = 0; r < L; ++r) {
          acc_v += vsplat(prob_rows[r]) * vload(g + r * Dv + c);
          acc_k += vsplat(ds_rows[r]) * vload(q + r * Dv + c);
        }
        vstore(sum_v + c, acc_v);
        vstore(sum_k + c, acc_k);
      }
    }
    for (int64_t d = 0; d < D; ++d) {  // key-lane blocks: key j, dim d at d kKeyBlock + j
      dvalues[d * kKeyBlock + j] += sum_v[d];
      dkn[d * kKeyBlock + j] += sum_k[d];
    }
  }
}

// dQ' of a few rows in the key lanes: acc[(r D + d) L + l] += sum over the block's key vectors
// c of dS'[r][c L + l] (scale K)[c L + l][d], for r < rows, reduced over the lanes at the end of
// the group. A pair of lane tiles holding so few rows (at N = 257 the second row group has 1)
// spent the 2 L rows of the query-lane dQ products on them (~2% of the backward at N = 257).
// dS': rows kKeyBlock apart; key_panels as in backward_task; keys: a multiple of L.
template <typename T>
EEGFAST_INLINE void row_dq_sums(const T* dS, int rows, const T* key_panels, int64_t D, int keys,
                                T* acc) {
  constexpr int L = kLanes<T>, W = kPanel<T>, V = kKeyBlock / L;
  const int vectors = keys / L;
  for (int r = 0; r < rows; ++r) {
    vec_t<T> ds[V];
    #pragma GCC unroll 8
    for (int c = 0; c < V; ++c)
      ds[c] = c < vectors ? vload(dS + r * kKeyBlock + c * L) : vec_t<T>{};
    T* a = acc + r * D * L;
    for (int64_t d = 0; d < D; ++d) {
      vec_t<T> sum = vload(a + d * L);
      #pragma GCC unroll 8
      for (int c = 0; c < V; ++c)  // key vector c: panel c L / W, lanes (c L) % W ...
        if (c < vectors)
          sum += ds[c] * vload(key_panels + (c * L / W) * D * W + (c * L) % W + d * W);
      vstore(a + d * L, sum);
    }
  }
}

// Query rows per group of the backward. A group's per-row data (normalised queries, grad_out
// rows, dq accumulators: ~5 R Dv floats per tile) stays in L2 while the key blocks
// are visited one by one, each block's keys, values and dK / dV sums (~35 KB at D = 20) staying
// in L1 across the group's tiles. Visiting every key block per row tile instead streamed all of
// a head's key data (~175 KB) from L2 per 8 query rows: ~125 bytes per (query, key) pair,
// which bounded the backward, not its FMAs.
constexpr int64_t kBackwardGroupRows = 256;

// Query rows are visited in lane tiles of L rows (TP = L / R row tiles of R rows): the scores,
// probabilities P and dS are computed per row tile (R rows x key vectors), the dK / dV sums
// over the lane tile's L rows at once (half the accumulator loads and stores of R-row sums),
// and dQ with the rows in the vector lanes, two lane tiles (QL = 2 L rows) at a time: dS
// transposed by L x L block transposes, then dQ^T[d][:] += sum_j K[j][d] dS^T[j][:]. With rows
// as lanes the head dim is not padded to a vector (with dims in the lanes, dQ at D = 20 ran 32
// FMA lanes per row and key: ~16% of the backward, the largest of its five products); two
// vectors of rows per key element loaded keep that product off the load ports.
// The key panels hold scale K (prepare_keys), so S = Qn (scale K)^T needs no scaled copy of the
// queries, and the kernels form dS' = dS / scale = P (dP - delta): dQ = dS' (scale K) as it
// stands, and the key sums dK' = dS'^T Qn take their scale once per key in backward_keys
// (instead of a scaled copy of each query row, a product per score vector and, on the last-key
// path, a transpose of those copies).
template <int R, int DR, typename scalar_t, typename T>
EEGFAST_INLINE void backward_task(const BackwardArgs<scalar_t, T>& a, int64_t task) {
  constexpr int L = kLanes<T>, TP = L / R, QL = 2 * L;
  static_assert(L % R == 0 && kBackwardGroupRows % QL == 0, "groups of whole lane tiles");
  const Problem<scalar_t, T>& p = a.p;
  const int64_t bh = task / p.chunks, chunk = task % p.chunks;
  const int64_t b = bh / p.H, h = bh % p.H;
  const int64_t D = p.D, Dv = p.Dv, N = p.N, H = p.H, Nk = p.Nk;
  // d(normalised keys) / scale, then dv, Nk D each (key-lane blocks): with one chunk per
  // (b, h), in the thread's own scratch (L2-sized), finished by this task; else partial sums in
  // the shared buffer, reduced by the key pass.
  static thread_local std::vector<T> thread_own;
  std::vector<T>& own = thread_own;
  T* dkn;
  if (p.chunks == 1) {
    own.assign(2 * Nk * D, T(0));
    dkn = own.data();
  } else {
    dkn = a.key_grads + task * 2 * Nk * D;
    std::fill(dkn, dkn + 2 * Nk * D, T(0));
  }
  T* dvalues = dkn + Nk * D;
  T* dqw = a.q_param_grads + task * 2 * D;
  T* dqb = dqw + D;
  std::fill(dqw, dqw + 2 * D, T(0));
  const int64_t row_begin = chunk * p.chunk_rows;
  const int64_t row_end = std::min(p.N, row_begin + p.chunk_rows);
  if (row_begin >= row_end) return;
  const T inf = std::numeric_limits<T>::infinity();
  next_head_lines(p, bh, chunk, 1).finish();  // at once (the backward's loops take no steps)
  KeySide<T>& ks = thread_key_side<T>();  // buffers reused (see prepare_keys)
  prepare_keys(p, b, h, T(0), KeyLayout::kBackward, a.k_stats + bh * N * 2,
               static_cast<T*>(nullptr), ks);
  // Per row of a group (padded to whole lane tiles): normalised queries, their normalised-only
  // form (LayerNorm backward), grad_out, d(normalised queries); delta and lse.
  const int64_t group_cap =
      std::min(kBackwardGroupRows, (row_end - row_begin + QL - 1) / QL * QL);
  // The per-row buffers come from the thread's previous task, and are written or zeroed per
  // group below where read (value-initialising ~170 KB of them per task was ~3% of the
  // backward).
  static thread_local std::vector<T> thread_rows[4];
  auto& [queries, hats, grads, dqn] = thread_rows;
  for (auto* buffer : {&queries, &hats, &grads, &dqn}) buffer->resize(group_cap * Dv);
  std::vector<T> out_row(Dv), delta(group_cap), lse(group_cap), dx(Dv), dqw_sum(Dv, T(0)),
      dqb_sum(Dv, T(0));
  std::vector<T> dq_lanes(group_cap * D);  // dQ^T per lane tile pair: (group_cap / QL, D, QL)
  // The last key block through backward_tail_keys (see there) when it holds at most L / 4 keys
  // and no mask.
  // (block_masked does not tell: keys past N have the bias -inf that masks them.)
  const int64_t last_block = p.key_blocks - 1;
  const int tail_keys = static_cast<int>(N - last_block * kKeyBlock);
  bool lane_tail = tail_keys <= L / 4 && !p.causal && !p.ids;
  for (int j = 0; lane_tail && j < tail_keys; ++j)
    lane_tail = ks.bias[last_block * kKeyBlock + j] == T(0);
  // dQ' sums of a group's last pair of lane tiles when it holds at most L / 4 rows (see
  // row_dq_sums): (rows, D, L), set up only for such a group
  std::vector<T> dq_rows;
  std::vector<TileMask> masks(group_cap / R);
  const std::vector<T> qw_pad = padded_param(p.qw, T(1), D, Dv),
                       qb_pad = padded_param(p.qb, T(0), D, Dv);
  std::vector<T> q_row(Dv, T(0));
  alignas(64) T P[QL * kKeyBlock];  // a lane tile pair's rows, kKeyBlock apart
  alignas(64) T dS[QL * kKeyBlock];
  alignas(64) T dS_lanes[kKeyBlock * QL];  // dS^T of a lane tile pair: key j's rows at j QL
  const T* q_stats = a.q_stats + bh * N * 2;
  for (int64_t g0 = row_begin; g0 < row_end; g0 += kBackwardGroupRows) {
    const int64_t rows = std::min(kBackwardGroupRows, row_end - g0);
    const int64_t tiles = (rows + R - 1) / R, lane_tiles = (rows + L - 1) / L,
                  pairs = (rows + QL - 1) / QL;
    const int64_t last_pair_rows = rows - (pairs - 1) * QL;
    const int row_dq = last_pair_rows <= L / 4 ? static_cast<int>(last_pair_rows) : 0;
    if (row_dq > 0) dq_rows.assign(row_dq * D * L, T(0));
    // Rows < `rows` are written below, all Dv lanes; the padding rows of the last tile are
    // zeroed, with P = 0 (lse = inf). Filling the whole buffers per group was ~5% of the
    // backward at N = 257.
    for (auto* buffer : {&queries, &hats, &grads})
      std::fill(buffer->begin() + rows * Dv, buffer->begin() + lane_tiles * L * Dv, T(0));
    std::fill(dq_lanes.begin(), dq_lanes.begin() + pairs * QL * D, T(0));
    std::fill(delta.begin() + rows, delta.begin() + lane_tiles * L, T(0));
    std::fill(lse.begin() + rows, lse.begin() + lane_tiles * L, inf);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = g0 + r;
      // grad_out and out rows lie H D elements apart ((B, N, H, D)): request them a few rows
      // ahead (their copies below stalled on memory, ~5% of the backward at D = 20)
      if (i + kRowPrefetch < N) {
        prefetch_row(a.grad_out.row(b, h, i + kRowPrefetch), D);
        prefetch_row(a.out + ((b * N + i + kRowPrefetch) * H + h) * D, D);
      }
      // Whole vectors of each row (lanes past D stay 0): these per-row steps were ~8% of the
      // backward at D = 20 as loops over the D elements.
      load_row(p.q.row(b, h, i), p.q.sd, D, q_row.data());
      const vec_t<T> mean = vsplat(q_stats[2 * i]), rstd = vsplat(q_stats[2 * i + 1]);
      for (int64_t c = 0; c < Dv; c += L) {
        const auto in_row = lane_index<T>() < vsplat(static_cast<T>(D - c));
        const vec_t<T> hat = in_row ? (vload(q_row.data() + c) - mean) * rstd : vec_t<T>{};
        const vec_t<T> normalised = hat * vload(qw_pad.data() + c) + vload(qb_pad.data() + c);
        vstore(hats.data() + r * Dv + c, hat);
        vstore(queries.data() + r * Dv + c, normalised);
      }
      vstore(grads.data() + r * Dv + Dv - L, vec_t<T>{});  // lanes past D
      load_row(a.grad_out.row(b, h, i), 1, D, grads.data() + r * Dv);
      load_row(a.out + ((b * N + i) * H + h) * D, 1, D, out_row.data());
      delta[r] = dot_lanes(grads.data() + r * Dv, out_row.data(), Dv);
      const T saved = a.lse[bh * N + i];
      lse[r] = saved == -inf ? inf : saved;  // a row that saw no key: P = 0
    }
    // dq rows of the group are written at its end: request their lines while it computes
    for (int64_t r = 0; r < rows; ++r) prefetch_row<true>(a.dq + (bh * N + g0 + r) * D, D);
    for (int64_t t = 0; t < tiles; ++t) {
      masks[t] = tile_mask<R>(p, g0 + t * R);
      masks[t].last_row = std::min(g0 + (t + 1) * R, g0 + rows) - 1;
    }
    for (int64_t kb = 0; kb < p.key_blocks - (lane_tail ? 1 : 0); ++kb) {
      const int keys = ks.block_keys[kb];
      // keys past N have dS = 0: dQ sums over the block's keys < N only (at N = 257 the
      // last block's vector holds 1 key of 16)
      const int real_keys = static_cast<int>(std::min<int64_t>(keys, N - kb * kKeyBlock));
      const T* key_panels = ks.panels.data() + kb * kKeyBlock * D;
      const T* value_panels = ks.value_panels.data() + kb * kKeyBlock * D;
      for (int64_t pair = 0; pair < pairs; ++pair) {
        const bool rows_dq = row_dq > 0 && pair == pairs - 1;  // dQ by row_dq_sums
        bool half_visible[2] = {false, false};
        for (int half = 0; half < 2; ++half) {
          const int64_t lt = pair * 2 + half;
          // P and dS of the lane tile's row tiles; 0 in those past the group's rows or not
          // shown this block (causal, block-causal), which the sums below then skip over
          bool visible = false;
          for (int tp = 0; tp < TP && lt < lane_tiles; ++tp) {
            const int64_t t = lt * TP + tp, r0 = t * R;
            T* Pt = P + (half * TP + tp) * R * kKeyBlock;
            T* dSt = dS + (half * TP + tp) * R * kKeyBlock;
            if (t >= tiles || !block_visible(p, ks, masks[t], kb)) {
              for (int r = 0; r < R; ++r) {
                std::fill(Pt + r * kKeyBlock, Pt + r * kKeyBlock + keys, T(0));
                std::fill(dSt + r * kKeyBlock, dSt + r * kKeyBlock + keys, T(0));
              }
              continue;
            }
            visible = true;
            if (!scores_need_mask(p, ks, masks[t], kb)) {
              probability_rows<R>(queries.data() + r0 * Dv, grads.data() + r0 * Dv, Dv, D,
                                  key_panels, value_panels, keys, lse.data() + r0,
                                  delta.data() + r0,
                                  static_cast<int>(std::min<int64_t>(R, rows - r0)), Pt, dSt);
              continue;
            }
            score_tile<R>(queries.data() + r0 * Dv, Dv, D, key_panels, keys, Pt);
            mask_scores<R>(p, ks, masks[t], kb, Pt);
            score_tile<R>(grads.data() + r0 * Dv, Dv, D, value_panels, keys, dSt);
            for (int r = 0; r < R; ++r) {
              const vec_t<T> shift = vsplat(lse[r0 + r]), d_r = vsplat(delta[r0 + r]);
              for (int j = 0; j < keys; j += L) {
                vec_t<T> prob, ds;
                probability_and_grad<T>(vload(Pt + r * kKeyBlock + j),
                                        vload(dSt + r * kKeyBlock + j), shift, d_r, prob, ds);
                vstore(Pt + r * kKeyBlock + j, prob);
                vstore(dSt + r * kKeyBlock + j, ds);
              }
            }
          }
          half_visible[half] = visible;
          if (rows_dq) continue;  // no dS^T
          if (!visible) {  // this half of dS^T is 0
            for (int j = 0; j < real_keys; ++j) vstore(dS_lanes + j * QL + half * L, vec_t<T>{});
            continue;
          }
          const T* dS_half = dS + half * L * kKeyBlock;
          for (int j0 = 0; j0 < real_keys; j0 += L) {
            vec_t<T> block[L];
            for (int r = 0; r < L; ++r) block[r] = vload(dS_half + r * kKeyBlock + j0);
            transpose_block<T>(block);
            for (int j = 0; j < L; ++j) vstore(dS_lanes + (j0 + j) * QL + half * L, block[j]);
          }
        }
        if (!half_visible[0] && !half_visible[1]) continue;
        // dK / dV sums over the pair's rows from the first visible half to the group's last
        // row at once: one load and store of the (D, keys) accumulators per 2 L rows, not L
        // (padding rows of the last row tile have P = dS = 0 and are left out)
        const int first = half_visible[0] ? 0 : L;
        const int last =
            static_cast<int>(std::min<int64_t>(half_visible[1] ? QL : L, rows - pair * QL));
        const int64_t r0 = pair * QL + first;
        accumulate_transposed<R>(dvalues + kb * kKeyBlock * D, D, Dv, P + first * kKeyBlock,
                                 grads.data() + r0 * Dv, last - first, keys);
        accumulate_transposed<R>(dkn + kb * kKeyBlock * D, D, Dv, dS + first * kKeyBlock,
                                 queries.data() + r0 * Dv, last - first, keys);
        if (rows_dq) {
          row_dq_sums(dS, row_dq, key_panels, D, keys, dq_rows.data());
          continue;
        }
        // dQ^T reads the keys from their panels (key j, dim d at d W + j of its panel)
        constexpr int W = kPanel<T>;
        for (int j0 = 0; j0 < real_keys; j0 += W)
          query_lane_all_values<2, DR>(dq_lanes.data() + pair * D * QL, dS_lanes + j0 * QL,
                                       key_panels + j0 * D, 1, W, D,
                                       std::min(W, real_keys - j0));
      }
    }
    if (lane_tail)
      backward_tail_keys(tail_keys, ks.panels.data() + last_block * kKeyBlock * D,
                         ks.value_panels.data() + last_block * kKeyBlock * D, D, Dv,
                         queries.data(), grads.data(), static_cast<int>(lane_tiles), lse.data(),
                         delta.data(), dq_lanes.data(), dvalues + last_block * kKeyBlock * D,
                         dkn + last_block * kKeyBlock * D);
    // dQ^T back to rows (Dv lanes, 0 past D) for the query LayerNorm backward
    for (int64_t lt = 0; lt < lane_tiles; ++lt) {
      const int valid = static_cast<int>(std::min<int64_t>(L, rows - lt * L));
      const T* src = dq_lanes.data() + (lt / 2) * D * QL + (lt % 2) * L;  // dims QL apart
      T* dst = dqn.data() + lt * L * Dv;
      for (int r = 0; r < valid; ++r) vstore(dst + r * Dv + Dv - L, vec_t<T>{});
      scatter_lanes_to_rows(src, QL, D, valid, dst, Dv);
    }
    for (int r = 0; r < row_dq; ++r) {  // the last pair's rows summed by row_dq_sums
      T* dst = dqn.data() + ((pairs - 1) * QL + r) * Dv;
      for (int64_t d = 0; d < D; ++d) dst[d] += hsum<T>(vload(dq_rows.data() + (r * D + d) * L));
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = g0 + r;
      layer_norm_backward_lanes(dqn.data() + r * Dv, hats.data() + r * Dv, q_stats[2 * i + 1],
                                qw_pad.data(), D, Dv, dx.data(), dqw_sum.data(), dqb_sum.data());
      store_row(dx.data(), D, a.dq + (bh * N + i) * D);
    }
  }
  std::copy(dqw_sum.begin(), dqw_sum.begin() + D, dqw);
  std::copy(dqb_sum.begin(), dqb_sum.begin() + D, dqb);
  if (p.chunks == 1) backward_keys(a, bh, dkn, 1, ks.hat_panels.data());
  release_if_large(ks);
  for (auto* buffer : {&own, &queries, &hats, &grads, &dqn})
    release_if_large(*buffer);
}

// ---- instances ----------------------------------------------------------------------------

// One kernel call with the tile sizes of an instruction set: R rows per row tile, JR keys per
// query-lane score micro-tile, DR dims per query-lane P.V micro-tile.
template <int R, int JR, int DR, Kernel K, typename Args>
EEGFAST_INLINE void run_kernel(const Args& a, int64_t index) {
  if constexpr (K == Kernel::kForward)
    forward_task<R, JR, DR>(a, index);
  else if constexpr (K == Kernel::kBackward)
    backward_task<R, DR>(a, index);
  else
    backward_keys_pass(a, index);
}

#if defined(__x86_64__)
template <Kernel K, typename Args>
__attribute__((target("avx512f,avx512vl,avx2,fma"))) void run_avx512(const Args& a,
                                                                     int64_t index) {
  run_kernel<8, 8, 8, K>(a, index);
}
template <Kernel K, typename Args>
__attribute__((target("avx2,fma"))) void run_avx2(const Args& a, int64_t index) {
  run_kernel<4, 4, 4, K>(a, index);
}
#endif

template <Kernel K, typename Args>
void run_generic(const Args& a, int64_t index) {
  run_kernel<4, 4, 4, K>(a, index);
}

// The instance of this width for `isa`: 64-byte vectors run only as AVX-512 (the callers pick
// this width for Isa::kAvx512 alone), 32-byte ones as AVX2 or generic code.
template <Kernel K, typename Args>
void run(const Args& a, Isa isa, int64_t index) {
  if constexpr (kVectorBytes == 64) {
#if defined(__x86_64__)
    run_avx512<K>(a, index);
#endif
  } else {
#if defined(__x86_64__)
    if (isa == Isa::kAvx2) return run_avx2<K>(a, index);
#endif
    run_generic<K>(a, index);
  }
}


// ---- whole passes -------------------------------------------------------------------------

template <typename scalar_t, typename T>
Problem<scalar_t, T> make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const Prepared& opt, double scale, bool causal) {
  Problem<scalar_t, T> p;
  p.B = q.size(0);
  p.H = q.size(1);
  p.N = q.size(2);
  p.D = q.size(3);
  p.Dv = (p.D + kLanes<T> - 1) / kLanes<T> * kLanes<T>;
  p.key_blocks = (p.N + kKeyBlock - 1) / kKeyBlock;
  p.Nk = p.key_blocks * kKeyBlock;
  p.scale = static_cast<T>(scale);
  p.causal = causal;
  p.key_padding = ptr_or_null<bool>(opt.key_padding);
  p.ids = ptr_or_null<int64_t>(opt.ids);
  p.qw = ptr_or_null<T>(opt.qw);
  p.qb = ptr_or_null<T>(opt.qb);
  p.kw = ptr_or_null<T>(opt.kw);
  p.kb = ptr_or_null<T>(opt.kb);
  p.chunks = query_chunks(p.B * p.H, p.N);
  const int64_t rows = (p.N + p.chunks - 1) / p.chunks;
  p.chunk_rows = (rows + kMaxTileRows - 1) / kMaxTileRows * kMaxTileRows;
  p.q = strided<scalar_t>(q);
  p.k = strided<scalar_t>(k);
  p.v = strided<scalar_t>(v);
  return p;
}

// A forward's problem and outputs (out (B, N, H, D), lse (B, H, N), q_stats and k_stats
// (B, H, N, 2)), for forward and the AMX forward.
template <typename scalar_t, typename T>
ForwardArgs<scalar_t, T> forward_args(const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, const Prepared& opt, double scale,
                                      bool causal, double eps, at::Tensor& out, at::Tensor& lse,
                                      at::Tensor& q_stats, at::Tensor& k_stats) {
  return {make_problem<scalar_t, T>(q, k, v, opt, scale, causal),
          static_cast<T>(eps),
          out.data_ptr<scalar_t>(),
          lse.data_ptr<T>(),
          q_stats.data_ptr<T>(),
          k_stats.data_ptr<T>()};
}

// The forward over every (batch, head, query chunk) task; out, lse, q_stats and k_stats are
// written.
template <typename scalar_t, typename T>
void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Prepared& opt,
             double scale, bool causal, double eps, at::Tensor& out, at::Tensor& lse,
             at::Tensor& q_stats, at::Tensor& k_stats, Isa isa) {
  const ForwardArgs<scalar_t, T> a =
      forward_args<scalar_t, T>(q, k, v, opt, scale, causal, eps, out, lse, q_stats, k_stats);
  run_tasks(a.p.B * a.p.H * a.p.chunks, [&](int64_t task) { run<Kernel::kForward>(a, isa, task); });
}

// The backward: writes t.dq, t.dk, t.dv; q_param_sums gets (2, D), the gradients of the query
// LayerNorm's weight (row 0) and bias (row 1); k_param_sums (D,), the key LayerNorm weight's.
template <typename scalar_t, typename T>
void backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Prepared& opt,
              double scale, bool causal, const BackwardTensors& t, Isa isa,
              at::Tensor& q_param_sums, at::Tensor& k_param_sums) {
  const Problem<scalar_t, T> p = make_problem<scalar_t, T>(q, k, v, opt, scale, causal);
  const int64_t B = p.B, H = p.H, D = p.D;
  const auto acc = t.lse.scalar_type();
  const int64_t tasks = B * H * p.chunks;
  // Key-gradient partials per chunk: only when (b, h) pairs are split into query chunks
  // (with one chunk, each task finishes its own keys).
  const int64_t partials = p.chunks > 1 ? tasks : 0;
  const at::Tensor key_grads = at::empty({partials, 2, p.Nk, p.D}, q.options().dtype(acc));
  const at::Tensor q_param_grads = at::empty({tasks, 2, D}, q.options().dtype(acc));
  const at::Tensor k_param_grads = at::empty({B * H, D}, q.options().dtype(acc));
  BackwardArgs<scalar_t, T> a{p,
                              Strided<scalar_t>{t.grad_out.data_ptr<scalar_t>(),
                                                t.grad_out.stride(0), t.grad_out.stride(2),
                                                t.grad_out.stride(1), t.grad_out.stride(3)},
                              t.out.data_ptr<scalar_t>(),
                              t.lse.data_ptr<T>(),
                              t.q_stats.data_ptr<T>(),
                              t.k_stats.data_ptr<T>(),
                              t.dq.data_ptr<scalar_t>(),
                              t.dk.data_ptr<scalar_t>(),
                              t.dv.data_ptr<scalar_t>(),
                              key_grads.data_ptr<T>(),
                              q_param_grads.data_ptr<T>(),
                              k_param_grads.data_ptr<T>()};
  run_tasks(tasks, [&](int64_t task) { run<Kernel::kBackward>(a, isa, task); });
  if (p.chunks > 1) run_tasks(B * H, [&](int64_t bh) { run<Kernel::kBackwardKeys>(a, isa, bh); });
  // Serial sums over the partials, in a fixed order: at::sum took ~30 us a call here (torch
  // profiler, 2 threads) for these few KB.
  const auto sum_rows = [](const at::Tensor& partials, at::Tensor& sums) {
    const int64_t rows = partials.size(0), width = partials.numel() / std::max<int64_t>(rows, 1);
    const T* x = partials.data_ptr<T>();
    T* y = sums.data_ptr<T>();
    std::fill(y, y + width, T(0));
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < width; ++c) y[c] += x[r * width + c];
  };
  q_param_sums = at::empty({2, D}, q_param_grads.options());
  k_param_sums = at::empty({D}, k_param_grads.options());
  sum_rows(q_param_grads, q_param_sums);
  sum_rows(k_param_grads, k_param_sums);
}

// ---- entry points (declared in qk_norm_attention_cpu.h) -------------------------------------

// float32, float64, float16 and bfloat16 inputs; float64 accumulates in double, the rest in
// float.
template <typename scalar_t>
using AccumulationOf = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

void dispatch_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const Prepared& opt, double scale, bool causal, double eps, at::Tensor& out,
                      at::Tensor& lse, at::Tensor& q_stats, at::Tensor& k_stats, Isa isa) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(),
                                  "qk_norm_attention_fwd", [&] {
    forward<scalar_t, AccumulationOf<scalar_t>>(q, k, v, opt, scale, causal, eps, out, lse,
                                                q_stats, k_stats, isa);
  });
}

void dispatch_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const Prepared& opt, double scale, bool causal, const BackwardTensors& t,
                       Isa isa, at::Tensor& q_param_sums, at::Tensor& k_param_sums) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(),
                                  "qk_norm_attention_bwd", [&] {
    backward<scalar_t, AccumulationOf<scalar_t>>(q, k, v, opt, scale, causal, t, isa,
                                                 q_param_sums, k_param_sums);
  });
}
