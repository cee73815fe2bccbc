// The forward for bfloat16 inputs on CPUs with AMX (Intel Sapphire Rapids and later): the two
// products per (query, key) pair run on the tile unit, the softmax on AVX-512.
//
// Included by qk_norm_attention_v512.cpp inside namespace v512, after
// qk_norm_attention_kernels.h, whose key preparation, query LayerNorm and online fallback it
// reuses. x86-64 only.
//
// Why: with bf16 inputs the other kernels compute in float32, at the FMA units' float rate
// (32 multiply-adds a cycle and core), while one TDPBF16PS does 16 x 16 x 32 = 8192 bf16
// multiply-adds in ~16 cycles (measured here: ~1.9 T multiply-adds a second on one core
// against ~0.12 T for float32 FMAs). With the products on the tile unit, the exponentials and
// their sums on the vector units are what is left.
//
// Measured (Intel Xeon with AMX, 2 threads, (8, 10, N, 20) bf16): 1.2x the float32 kernels at
// N = 256-257, 1.6x at N = 512-1024. A step costs ~180-200 ns of a core in the kernel against
// ~100 ns in a stand-alone loop of the same step with its data in L1 (57 ns of exponentials, 52
// of tile work): where the difference goes is not found yet.
//
// Numerics. The scores come from the float32 normalised queries and keys split into bf16 pairs
// x = hi + lo (hi = bf16(x), lo = bf16(x - hi)): s = qh.kh + ql.kh + qh.kl, three tile products
// (the dropped ql.kl is ~2^-16 of s), so scores, lse and the probabilities' exponents are as
// float32 math gives them up to ~1e-5 relative: with one bf16 product an error of |s| 2^-8
// (0.1 at |s| = 30) reached single probabilities as a 10% error, and the float32 backward's
// recomputed probabilities would not sum to 1. The probabilities are rounded to bf16 for P.V (as
// in GPU attention kernels: ~2^-9 relative each); the row sums, and so lse, are of the float32
// probabilities (summed from the rounded ones, on the tile unit through a column of ones in the
// value tiles, lse was off by ~2^-9 / sqrt(keys)). Accumulation, the LayerNorm statistics, lse
// and the division are float32. The scores are bounded (see kUnshiftedScoreLimit), so no row
// maximum is needed: rows whose bound is too large (or NaN)
// take the float32 online path, as do the few rows past a task's whole tiles of 16.
//
// Covers head dims up to 32 (LaBraM Base's 20, Large's 25: one tile of bf16 pairs for the
// scores, two 16-column output tiles), key padding; causal and block-causal masks and larger
// head dims run the float32 kernels.
//
// Tiles (all 16 rows x 64 bytes): 0, 1 scores of 16 queries x 16 keys (float32); 2 the
// queries' hi parts (16 x 32 bf16: dims in pairs); 3 16 keys' hi or lo parts (16 dim pairs x 16
// keys x 2); 4, 5 the output accumulators (dims 0-15, 16-31; float32); 6 the queries' lo parts,
// then the probabilities (16 queries x 32 keys bf16); 7 values (16 key pairs x 16 dims x 2). A
// step takes 32 keys: six score products, one probability tile, one or two P.V products.

constexpr int64_t kAmxMaxHeadDim = 32;
constexpr int kAmxRows = 16;   // queries per tile
constexpr int kAmxStep = 32;   // keys per step
constexpr int kAmxTileBf16 = 512;  // bf16 elements of a 16 x 64-byte tile

// The LDTILECFG operand: palette 1, every tile 16 rows of 64 bytes.
struct alignas(64) AmxTileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};
static_assert(sizeof(AmxTileConfig) == 64, "LDTILECFG reads 64 bytes");

#define EEGFAST_AMX_TARGET \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512bf16,avx2,fma,amx-tile,amx-bf16")))

// bf16 of two float vectors, interleaved: out[2 i] = first[i], out[2 i + 1] = second[i] (the
// pairs a tile's B operand holds). Round to nearest even, as c10::BFloat16.
EEGFAST_AMX_TARGET EEGFAST_INLINE __m512i interleave_bf16(vec_t<float> first,
                                                           vec_t<float> second) {
  // VCVTNE2PS2BF16 puts its second operand's 16 values in the low half
  const __m512i halves = (__m512i)_mm512_cvtne2ps_pbh((__m512)second, (__m512)first);
  const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                         24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
                                         16, 0);
  return _mm512_permutexvar_epi16(pairs, halves);
}

// The bf16 nearest x (round to nearest even), as float: x's hi part; x - hi is exact in float.
EEGFAST_INLINE vec_t<float> bf16_hi(vec_t<float> x) {
  return (vec_t<float>)(bf16_rounded_bits(x) & ~0xffffu);
}

// 32 bf16 in order: low[0..15], then high[0..15] (a row of an A operand).
EEGFAST_AMX_TARGET EEGFAST_INLINE __m512i concat_bf16(vec_t<float> low, vec_t<float> high) {
  return (__m512i)_mm512_cvtne2ps_pbh((__m512)high, (__m512)low);
}

// The thread's bf16 tiles of one head's keys and values, and which key steps its tiles visit
// (reused across its tasks).
struct AmxKeySide {
  std::vector<uint16_t> keys;    // (steps * 2 * 2) tiles: 16 keys each, dims in pairs; hi, lo
  std::vector<uint16_t> values;  // (steps * value_tiles) tiles: 32 keys in pairs, 16 dims
  std::vector<int64_t> steps;    // the steps holding a key that is not padding, in order
  std::vector<uint8_t> masked;   // (steps,) whether a key of the step is masked (bias -inf)
};

inline AmxKeySide& thread_amx_key_side() {
  static thread_local AmxKeySide side;
  return side;
}

// One head as the query tiles read it: plain pointers, taken once per task (through the
// thread_local buffers, every access inside the loops called __tls_get_addr).
struct AmxHead {
  const uint16_t* keys;
  const uint16_t* values;
  const float* bias;     // (steps * kAmxStep,) 0 or -inf (padding key, or past N)
  const int64_t* steps;  // visible steps
  int64_t visible;       // how many
  const uint8_t* masked;
  int value_tiles;       // 16-dim output tiles: 1 for D <= 16, else 2
  float max_key_norm;
  // Step s's key tiles: hi, lo parts of its keys 0-15, then of 16-31.
  const uint16_t* step_keys(int64_t s) const { return keys + 4 * s * kAmxTileBf16; }
};

// The key and value tiles of one head from the float32 layouts prepare_keys made: keys from
// the normalised panels (0 past N and past D), values from the padded value rows.
template <typename scalar_t>
EEGFAST_AMX_TARGET EEGFAST_INLINE AmxHead amx_head(const Problem<scalar_t, float>& p,
                                                   const KeySide<float>& ks, AmxKeySide& side) {
  constexpr int W = kPanel<float>;
  const int64_t D = p.D, N = p.N, steps = (N + kAmxStep - 1) / kAmxStep;
  const int value_tiles = D > 16 ? 2 : 1;
  side.keys.resize(steps * 4 * kAmxTileBf16);
  side.values.resize(steps * value_tiles * kAmxTileBf16);
  side.steps.clear();
  side.masked.assign(steps, 0);
  for (int64_t t = 0; t < steps * 2; ++t) {
    const int64_t key0 = t * 16;
    const float* panel = ks.panels.data() + key0 / W * D * W + key0 % W;  // dim d at d W
    uint16_t* hi_tile = side.keys.data() + 2 * t * kAmxTileBf16;
    uint16_t* lo_tile = hi_tile + kAmxTileBf16;
    for (int pair = 0; pair < 16; ++pair) {
      const int64_t d = 2 * pair;
      const vec_t<float> even = d < D ? vload(panel + d * W) : vec_t<float>{};
      const vec_t<float> odd = d + 1 < D ? vload(panel + (d + 1) * W) : vec_t<float>{};
      const vec_t<float> even_hi = bf16_hi(even), odd_hi = bf16_hi(odd);
      _mm512_storeu_si512(hi_tile + pair * 32, interleave_bf16(even_hi, odd_hi));
      _mm512_storeu_si512(lo_tile + pair * 32, interleave_bf16(even - even_hi, odd - odd_hi));
    }
  }
  for (int64_t s = 0; s < steps; ++s) {
    for (int c = 0; c < value_tiles; ++c) {
      uint16_t* tile = side.values.data() + (s * value_tiles + c) * kAmxTileBf16;
      for (int pair = 0; pair < 16; ++pair) {
        const float* row = ks.values + (s * kAmxStep + 2 * pair) * ks.value_stride + c * 16;
        _mm512_storeu_si512(tile + pair * 32,
                            interleave_bf16(vload(row), vload(row + ks.value_stride)));
      }
    }
    // block_masked covers the 64 keys of the block holding this step (or the vectors of it
    // that hold a key < N); a step past those has only keys past N
    const int64_t key0 = s * kAmxStep, kb = key0 / kKeyBlock;
    if (ks.block_empty[kb]) continue;  // every key of the block is padding
    side.steps.push_back(s);
    side.masked[s] = ks.block_masked[kb] || key0 + kAmxStep > N;
  }
  return {side.keys.data(), side.values.data(),   ks.bias.data(), side.steps.data(),
          static_cast<int64_t>(side.steps.size()), side.masked.data(), value_tiles,
          ks.max_key_norm};
}

// Rows r0 ... r1 - 1 of a step's probabilities from its scores (16 queries x 32 keys, float32):
// e^s, padding keys and keys past N (Masked: bias -inf) flushed to 0, summed per query in
// float32 into sums (a vector per query), and rounded to bf16 into probs (the P.V product's A
// tile).
template <bool Masked>
EEGFAST_AMX_TARGET EEGFAST_INLINE void amx_probability_rows(const float* scores,
                                                            const float* bias, vec_t<float>* sums,
                                                            uint16_t* probs, int r0, int r1) {
  vec_t<float> bias0{}, bias1{};
  if constexpr (Masked) {
    bias0 = vload(bias);
    bias1 = vload(bias + 16);
  }
  #pragma GCC unroll 4
  for (int r = r0; r < r1; ++r) {
    vec_t<float> e0, e1;
    if constexpr (Masked) {
      e0 = vexp(vload(scores + r * kAmxStep) + bias0);
      e1 = vexp(vload(scores + r * kAmxStep + 16) + bias1);
    } else {
      e0 = vexp_in_range(vload(scores + r * kAmxStep));
      e1 = vexp_in_range(vload(scores + r * kAmxStep + 16));
    }
    sums[r] += e0 + e1;
    _mm512_store_si512(probs + r * kAmxStep, concat_bf16(e0, e1));
  }
}

// Part `Part` (0 ... 4) of a step's scores into tiles 0 and 1: qh.kh + ql.kh + qh.kl, the
// queries' hi parts in tile 2, their lo parts loaded into tile 6; keys: the step's key tiles
// (hi, lo parts of keys 0-15, then of 16-31). In parts so that amx_step can spread them between
// rows of exponentials.
template <int Part>
EEGFAST_AMX_TARGET EEGFAST_INLINE void amx_score_part(const uint16_t* keys,
                                                      const uint16_t* queries_lo) {
  if constexpr (Part == 0) {
    _tile_loadd(6, queries_lo, 64);
    _tile_zero(0);
    _tile_zero(1);
    _tile_loadd(3, keys, 64);
    _tile_dpbf16ps(0, 6, 3);
  } else if constexpr (Part == 1) {
    _tile_dpbf16ps(0, 2, 3);
    _tile_loadd(3, keys + kAmxTileBf16, 64);
  } else if constexpr (Part == 2) {
    _tile_dpbf16ps(0, 2, 3);
    _tile_loadd(3, keys + 2 * kAmxTileBf16, 64);
  } else if constexpr (Part == 3) {
    _tile_dpbf16ps(1, 6, 3);
    _tile_dpbf16ps(1, 2, 3);
  } else {
    static_assert(Part == 4, "five parts");
    _tile_loadd(3, keys + 3 * kAmxTileBf16, 64);
    _tile_dpbf16ps(1, 2, 3);
  }
}

// A step's scores at once (the first step of a query tile).
EEGFAST_AMX_TARGET EEGFAST_INLINE void amx_scores(const uint16_t* keys,
                                                  const uint16_t* queries_lo) {
  amx_score_part<0>(keys, queries_lo);
  amx_score_part<1>(keys, queries_lo);
  amx_score_part<2>(keys, queries_lo);
  amx_score_part<3>(keys, queries_lo);
  amx_score_part<4>(keys, queries_lo);
}

// A step's probabilities (see amx_probability_rows) and, when next_keys is given, the next
// step's scores, their parts between groups of rows: issued before all of the step's
// exponentials, or after them, the tile unit and the vector units did not overlap (a
// stand-alone loop of these steps: 130 ns a step either way, 103 ns spread like this; 57 ns for
// the exponentials alone, 52 ns for the tile work alone).
template <bool Masked>
EEGFAST_AMX_TARGET EEGFAST_INLINE void amx_step(const float* scores, const float* bias,
                                                vec_t<float>* sums, uint16_t* probs,
                                                const uint16_t* next_keys,
                                                const uint16_t* queries_lo) {
  const bool next = next_keys != nullptr;
  if (next) amx_score_part<0>(next_keys, queries_lo);
  amx_probability_rows<Masked>(scores, bias, sums, probs, 0, 3);
  if (next) amx_score_part<1>(next_keys, queries_lo);
  amx_probability_rows<Masked>(scores, bias, sums, probs, 3, 6);
  if (next) amx_score_part<2>(next_keys, queries_lo);
  amx_probability_rows<Masked>(scores, bias, sums, probs, 6, 9);
  if (next) amx_score_part<3>(next_keys, queries_lo);
  amx_probability_rows<Masked>(scores, bias, sums, probs, 9, 12);
  if (next) amx_score_part<4>(next_keys, queries_lo);
  amx_probability_rows<Masked>(scores, bias, sums, probs, 12, 16);
}

// One tile of queries i0 ... i0 + rows - 1 (rows <= 16) of (b, h) against all keys. Returns
// false, having written nothing, when a row's score bound is over kUnshiftedScoreLimit (or
// NaN): the caller then runs the float32 online path for these rows.
//
// Software-pipelined by one step: the tile unit forms step n + 1's scores while the vector
// units exponentiate step n's (two score buffers).
template <typename scalar_t>
EEGFAST_AMX_TARGET EEGFAST_INLINE bool amx_query_tile(const ForwardArgs<scalar_t, float>& a,
                                                      const AmxHead& head, int64_t b, int64_t h,
                                                      int64_t i0, int rows) {
  constexpr int L = kLanes<float>;
  static_assert(L == kAmxRows, "one query per lane of a 512-bit vector");
  const Problem<scalar_t, float>& p = a.p;
  const int64_t D = p.D, N = p.N, H = p.H, bh = b * H + h;
  alignas(64) float Qt[kAmxMaxHeadDim * L];  // (dim, query): the lane-wise LayerNorm's layout
  alignas(64) float means[L], rstds[L], norm2[L];
  gather_rows_to_lanes(p.q, b, h, i0, rows, L, D, Qt, L);
  layer_norm_lanes<1>(Qt, D, rows, a.eps, p.qw, p.qb, p.scale, static_cast<const float*>(nullptr),
                      static_cast<const float*>(nullptr), means, rstds, norm2);
  for (int r = 0; r < rows; ++r)
    if (!(std::sqrt(norm2[r]) * head.max_key_norm <= static_cast<float>(kUnshiftedScoreLimit)))
      return false;
  for (int r = 0; r < rows; ++r) {
    a.q_stats[(bh * N + i0 + r) * 2] = means[r];
    a.q_stats[(bh * N + i0 + r) * 2 + 1] = rstds[r];
  }
  // queries to rows of 32 bf16, hi and lo parts (dims past D are 0): two 16 x 16 transposes
  alignas(64) uint16_t queries[kAmxRows * 32], queries_lo[kAmxRows * 32];
  {
    vec_t<float> low[L], high[L];
    for (int d = 0; d < L; ++d) {
      low[d] = d < D ? vload(Qt + d * L) : vec_t<float>{};
      high[d] = d + L < D ? vload(Qt + (d + L) * L) : vec_t<float>{};
    }
    transpose_block<float>(low);
    transpose_block<float>(high);
    for (int r = 0; r < kAmxRows; ++r) {
      const vec_t<float> low_hi = bf16_hi(low[r]), high_hi = bf16_hi(high[r]);
      _mm512_store_si512(queries + r * 32, concat_bf16(low_hi, high_hi));
      _mm512_store_si512(queries_lo + r * 32, concat_bf16(low[r] - low_hi, high[r] - high_hi));
    }
  }
  alignas(64) float scores[2][kAmxRows * kAmxStep];  // two steps' scores
  alignas(64) uint16_t probs[kAmxRows * kAmxStep];    // a step's probabilities in bf16
  vec_t<float> sums[kAmxRows];
  for (int r = 0; r < kAmxRows; ++r) sums[r] = vec_t<float>{};
  _tile_loadd(2, queries, 64);
  _tile_zero(4);
  _tile_zero(5);
  constexpr int64_t kScoreStride = kAmxStep * sizeof(float);
  if (head.visible > 0) {
    amx_scores(head.step_keys(head.steps[0]), queries_lo);
    _tile_stored(0, scores[0], kScoreStride);
    _tile_stored(1, scores[0] + 16, kScoreStride);
  }
  for (int64_t n = 0; n < head.visible; ++n) {
    const int64_t s = head.steps[n];
    const bool next = n + 1 < head.visible;
    const uint16_t* next_keys = next ? head.step_keys(head.steps[n + 1]) : nullptr;
    if (head.masked[s])
      amx_step<true>(scores[n % 2], head.bias + s * kAmxStep, sums, probs, next_keys, queries_lo);
    else
      amx_step<false>(scores[n % 2], head.bias + s * kAmxStep, sums, probs, next_keys, queries_lo);
    _tile_loadd(6, probs, 64);
    _tile_loadd(7, head.values + (s * head.value_tiles) * kAmxTileBf16, 64);
    _tile_dpbf16ps(4, 6, 7);
    if (head.value_tiles > 1) {
      _tile_loadd(7, head.values + (s * head.value_tiles + 1) * kAmxTileBf16, 64);
      _tile_dpbf16ps(5, 6, 7);
    }
    if (next) {
      _tile_stored(0, scores[(n + 1) % 2], kScoreStride);
      _tile_stored(1, scores[(n + 1) % 2] + 16, kScoreStride);
    }
  }
  alignas(64) float acc[kAmxRows * kAmxStep];  // (query, dim) output sums, 32 dims a row
  _tile_stored(4, acc, kScoreStride);
  if (head.value_tiles > 1) _tile_stored(5, acc + 16, kScoreStride);
  const float inf = std::numeric_limits<float>::infinity();
  for (int r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;
    const float l = hsum<float>(sums[r]);
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;  // a row that saw no key: zeros
    a.lse[bh * N + i] = l > 0.0f ? std::log(l) : -inf;
    float* row = acc + r * kAmxStep;
    for (int64_t d = 0; d < D; ++d) row[d] *= inv;
    store_row(row, D, a.out + ((b * N + i) * H + h) * D);
  }
  return true;
}

// One task (as forward_task): rows of one (batch, head) in tiles of 16 queries.
template <typename scalar_t>
EEGFAST_AMX_TARGET void amx_forward_task(const ForwardArgs<scalar_t, float>& a, int64_t task) {
  constexpr int L = kLanes<float>;
  const Problem<scalar_t, float>& p = a.p;
  const auto [bh, chunk, b, h, row_begin, row_end] = task_rows(p, task);
  if (row_begin >= row_end) return;
  const int64_t N = p.N;
  KeySide<float>& ks = thread_key_side<float>();
  prepare_keys(p, b, h, a.eps, KeyLayout::kForward, static_cast<const float*>(nullptr),
               chunk == 0 ? a.k_stats + bh * N * 2 : static_cast<float*>(nullptr), ks);
  AmxKeySide& side = thread_amx_key_side();
  const AmxHead head = amx_head(p, ks, side);
  // As forward_task: at most L / 4 rows past the whole tiles take the float32 row path (at
  // N = 257 the last row would be a tile of 16 with one query).
  const int64_t tail = (row_end - row_begin) % L;
  const int64_t tile_end = tail <= L / 4 ? row_end - tail : row_end;
  static const AmxTileConfig config;
  _tile_loadconfig(&config);  // per thread: the tile configuration is thread state
  for (int64_t i0 = row_begin; i0 < tile_end; i0 += kAmxRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kAmxRows, tile_end - i0));
    if (!amx_query_tile(a, head, b, h, i0, rows))
      forward_rows_online<8>(a, ks, b, h, i0, i0 + rows);
  }
  _tile_release();  // no tile state left for context switches to save
  if (tile_end < row_end) forward_rows_online<1>(a, ks, b, h, tile_end, row_end);
  release_if_large(ks);
  release_if_large(side.keys);
  release_if_large(side.values);
}

// The forward through the tile unit when it applies (bf16 inputs, D <= 32, no causal or
// block-causal mask); false otherwise, having done nothing.
bool amx_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const Prepared& opt, double scale, bool causal, double eps, at::Tensor& out,
                 at::Tensor& lse, at::Tensor& q_stats, at::Tensor& k_stats) {
  using scalar_t = c10::BFloat16;
  if (q.scalar_type() != at::kBFloat16 || q.size(3) > kAmxMaxHeadDim || causal ||
      opt.ids.has_value())
    return false;
  const ForwardArgs<scalar_t, float> a = forward_args<scalar_t, float>(
      q, k, v, opt, scale, causal, eps, out, lse, q_stats, k_stats);
  run_tasks(a.p.B * a.p.H * a.p.chunks, [&](int64_t task) { amx_forward_task(a, task); });
  return true;
}
