// VQ nearest-code lookup and per-code statistics: op schemas and the CPU kernels.
//
// vq_nearest never forms the (N, K) score matrix. Rows of z are processed in chunks; for each
// chunk the codebook streams through in L2-sized blocks of 16-code panels, and a 6-row x 16-code
// register microkernel computes fp32 dot products whose argmax is folded in immediately.
//
// Exactness: besides the best score, every lane keeps the runner-up, so each row ends with the
// gap between its best and second-best fp32 score. With u = 2^-24 the fp32 score of any code is
// within (D + 2) u |z| (cosine) or (D + 2) u (|z| C + C^2) (l2, C = largest code norm) of its
// exact value, so a gap wider than twice that bound (we use 4 (D + 4) u ... for margin) proves the
// fp32 winner is the exact winner. Rows with a narrower gap (near ties, real ties, fp16/bf16
// inputs are converted exactly to fp32 first) are re-scored over all codes in float64, where
// ties within 1e-12 of the best go to the lowest index. This matches the float64 reference
// (eegfast.ops.vq.vq_nearest_reference) exactly, and costs nothing for well-separated rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "vq/vq.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <string>

namespace eegfast {
namespace {

constexpr int kLanes = 8;              // fp32 lanes per 256-bit vector
constexpr int kPanelCodes = 16;        // codes per panel: two vectors
constexpr int kRowTile = 6;            // rows per microkernel: 6 x 2 accumulators + 3 = 15 ymm
constexpr int kChunkRows = 8 * kRowTile;
constexpr int64_t kBlockBytes = 96 * 1024;  // codebook bytes per L2-resident block
constexpr double kUnitRoundoff = 5.9604644775390625e-08;  // 2^-24
constexpr double kTieTolerance = 1e-12;
constexpr double kNormEps = 1e-12;     // as torch.nn.functional.normalize
constexpr double kFp32OverflowGuard = 1.7014118346046923e+38;  // 2^127, half of FLT_MAX

using vf = float __attribute__((vector_size(32)));
using vi = int32_t __attribute__((vector_size(32)));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
inline vi load(const int32_t* p) {
  vi v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store(int32_t* p, vi v) { std::memcpy(p, &v, sizeof(v)); }

// Codebook in panel layout (P, D, 16) with a per-code additive bias: 0 for cosine (codes
// pre-normalised), -|c|^2 / 2 for l2, -inf for the padding codes of the last panel.
struct PackedCodebook {
  at::Tensor panels;  // (P, D, 16) float32
  at::Tensor bias;    // (P * 16,) float32
  at::Tensor code64;  // (K, D) float64: exact values, for the float64 re-check
  at::Tensor norm64;  // (K,) float64: |c|
  double max_norm = 0.0;
};

PackedCodebook pack_codebook(const at::Tensor& codebook, Metric metric) {
  const int64_t K = codebook.size(0), D = codebook.size(1);
  const int64_t P = (K + kPanelCodes - 1) / kPanelCodes;
  PackedCodebook packed;
  packed.code64 = codebook.to(at::kDouble).contiguous();
  packed.norm64 = packed.code64.norm(2, {1}).contiguous();
  packed.panels = at::zeros({P, D, kPanelCodes}, codebook.options().dtype(at::kFloat));
  packed.bias = at::full({P * kPanelCodes}, -std::numeric_limits<float>::infinity(),
                         codebook.options().dtype(at::kFloat));
  const double* c = packed.code64.data_ptr<double>();
  const double* norm = packed.norm64.data_ptr<double>();
  float* panels = packed.panels.data_ptr<float>();
  float* bias = packed.bias.data_ptr<float>();
  double max_norm = 0.0;
  for (int64_t k = 0; k < K; ++k) {
    const double scale = metric == Metric::kCosine ? 1.0 / std::max(norm[k], kNormEps) : 1.0;
    float* dst = panels + (k / kPanelCodes) * D * kPanelCodes + (k % kPanelCodes);
    for (int64_t d = 0; d < D; ++d) dst[d * kPanelCodes] = static_cast<float>(c[k * D + d] * scale);
    bias[k] = metric == Metric::kCosine ? 0.0f : static_cast<float>(-0.5 * norm[k] * norm[k]);
    // Over the finite codes only, as the reference's tie scale: a NaN / inf code's fp32 score
    // is NaN (never a best or runner-up), and a NaN here used to be overwritten by the next
    // code's norm (so C could be too small for the error bound), an inf made every row a tie.
    if (std::isfinite(norm[k]) && norm[k] > max_norm) max_norm = norm[k];
  }
  packed.max_norm = max_norm;
  return packed;
}

// Per-row running state: per lane the best score, its code, and the runner-up.
struct RowState {
  float best[kPanelCodes];
  int32_t best_code[kPanelCodes];
  float second[kPanelCodes];
};

// acc[r] += z[r, d] * panel[d, :] over d, then fold the 16 scores into the row states.
template <int R>
__attribute__((always_inline)) inline void microkernel(const float* z, int64_t D,
                                                      const float* panel, const float* bias,
                                                      int32_t first_code, RowState* state) {
  vf acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = vf{};
  for (int64_t d = 0; d < D; ++d) {
    const vf c0 = load(panel + d * kPanelCodes);
    const vf c1 = load(panel + d * kPanelCodes + kLanes);
    for (int r = 0; r < R; ++r) {
      const vf zr = vf{} + z[r * D + d];
      acc[r][0] += zr * c0;
      acc[r][1] += zr * c1;
    }
  }
  const vi lane = {0, 1, 2, 3, 4, 5, 6, 7};
  for (int h = 0; h < 2; ++h) {
    const vf b = load(bias + h * kLanes);
    const vi code = lane + (first_code + h * kLanes);
    for (int r = 0; r < R; ++r) {
      RowState& s = state[r];
      const vf score = acc[r][h] + b;
      vf best = load(s.best + h * kLanes);
      vf second = load(s.second + h * kLanes);
      vi best_code = load(s.best_code + h * kLanes);
      // Strict '>' keeps the earlier (lower) code on equal scores; the equal score then
      // becomes the runner-up, so the gap is 0 and the row is re-checked in float64.
      const vi better = score > best;
      second = better ? best : (score > second ? score : second);
      best = better ? score : best;
      best_code = better ? code : best_code;
      store(s.best + h * kLanes, best);
      store(s.second + h * kLanes, second);
      store(s.best_code + h * kLanes, best_code);
    }
  }
}

struct ChunkArgs {
  const float* z;  // (N, D) float32
  int64_t N, D, K;
  const PackedCodebook* codes;
  Metric metric;
  int64_t* indices;
  float* scores;
};

// Exact float64 scores of one row against every code; lowest index within kTieTolerance of
// the best. Returns -1 if no code has a comparable score (all NaN).
int64_t rescore_row_float64(const ChunkArgs& a, int64_t row) {
  const float* z = a.z + row * a.D;
  const double* c = a.codes->code64.data_ptr<double>();
  const double* norm = a.codes->norm64.data_ptr<double>();
  double z_sq = 0.0;
  for (int64_t d = 0; d < a.D; ++d) z_sq += double(z[d]) * double(z[d]);
  const double z_norm = std::sqrt(z_sq);
  auto score_of = [&](int64_t k) {
    double dot = 0.0;
    for (int64_t d = 0; d < a.D; ++d) dot += double(z[d]) * c[k * a.D + d];
    double s = a.metric == Metric::kCosine
                   ? dot / (std::max(z_norm, kNormEps) * std::max(norm[k], kNormEps))
                   : -(z_sq - 2.0 * dot + norm[k] * norm[k]);
    return std::isnan(s) ? -std::numeric_limits<double>::infinity() : s;
  };
  double best = -std::numeric_limits<double>::infinity();
  for (int64_t k = 0; k < a.K; ++k) best = std::max(best, score_of(k));
  // No code with a usable score (every code NaN, or inf under l2): no nearest code.
  if (best == -std::numeric_limits<double>::infinity()) return -1;
  const double tol = a.metric == Metric::kCosine
                         ? kTieTolerance
                         : kTieTolerance * (z_sq + a.codes->max_norm * a.codes->max_norm);
  for (int64_t k = 0; k < a.K; ++k)
    if (score_of(k) >= best - tol) return k;
  return -1;
}

// Cosine similarity or squared distance of row and its chosen code, in float64.
float final_score(const ChunkArgs& a, int64_t row, int64_t code) {
  if (code < 0) return std::numeric_limits<float>::quiet_NaN();
  const float* z = a.z + row * a.D;
  const double* c = a.codes->code64.data_ptr<double>() + code * a.D;
  double acc = 0.0, z_sq = 0.0;
  for (int64_t d = 0; d < a.D; ++d) {
    if (a.metric == Metric::kCosine) {
      acc += double(z[d]) * c[d];
      z_sq += double(z[d]) * double(z[d]);
    } else {
      const double diff = double(z[d]) - c[d];
      acc += diff * diff;
    }
  }
  if (a.metric == Metric::kL2) return static_cast<float>(acc);
  const double c_norm = a.codes->norm64.data_ptr<double>()[code];
  return static_cast<float>(acc / (std::max(std::sqrt(z_sq), kNormEps) *
                                   std::max(c_norm, kNormEps)));
}

void finish_row(const ChunkArgs& a, int64_t row, const RowState& s) {
  const float* z = a.z + row * a.D;
  double z_sq = 0.0, poison = 0.0;
  for (int64_t d = 0; d < a.D; ++d) {
    z_sq += double(z[d]) * double(z[d]);
    poison += double(z[d]) * 0.0;  // NaN iff some element is NaN or inf
  }
  if (std::isnan(poison)) {
    a.indices[row] = -1;
    a.scores[row] = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  int lane = 0;
  for (int l = 1; l < kPanelCodes; ++l) {
    if (s.best[l] > s.best[lane] ||
        (s.best[l] == s.best[lane] && s.best_code[l] < s.best_code[lane]))
      lane = l;
  }
  float second = -std::numeric_limits<float>::infinity();
  for (int l = 0; l < kPanelCodes; ++l) {
    second = std::max(second, s.second[l]);
    if (l != lane) second = std::max(second, s.best[l]);
  }
  const double z_norm = std::sqrt(z_sq);
  const double bound_scale =
      a.metric == Metric::kCosine
          ? z_norm
          : z_norm * a.codes->max_norm + a.codes->max_norm * a.codes->max_norm;
  // The fp32 error bound, plus fp32 underflow (each product and sum of subnormals may be off by
  // up to the smallest subnormal), plus the reference's tie tolerance in these units (fp32
  // score = cosine * max(|z|, eps); l2: (|z|^2 - distance) / 2): a gap within it means codes
  // the reference counts as tied (|z| < 1e-12 under cosine, |z| >> C under l2), which only
  // the float64 re-scoring resolves to the lowest index.
  const double tie_scale = a.metric == Metric::kCosine
                               ? 2.0 * std::max(z_norm, kNormEps)
                               : z_sq + a.codes->max_norm * a.codes->max_norm;
  const double tolerance = 4.0 * double(a.D + 4) *
                               (kUnitRoundoff * bound_scale +
                                double(std::numeric_limits<float>::denorm_min())) +
                           kTieTolerance * tie_scale;
  // The bound holds only while no fp32 value overflows. Each product, partial sum and score of
  // a finite code is at most bound_scale (1 + (D + 2) u) in magnitude; near FLT_MAX a code may
  // score inf, -inf or NaN (inf - inf), and the exact winner (an l2 code equal to the row with
  // |c| = 3e19, say) lost to a finite code by an infinite gap. Those rows are re-scored.
  const bool may_overflow =
      !(bound_scale * (1.0 + 4.0 * double(a.D + 4) * kUnitRoundoff) < kFp32OverflowGuard);
  const double gap = double(s.best[lane]) - double(second);
  int64_t code = s.best_code[lane];
  if (!(gap > tolerance) || !std::isfinite(s.best[lane]) || may_overflow)
    code = rescore_row_float64(a, row);
  a.indices[row] = code;
  a.scores[row] = final_score(a, row, code);
}

template <int R>
__attribute__((always_inline)) inline void run_tile(const ChunkArgs& a, int64_t row0, int rows,
                                                   int64_t panel0, int64_t panel1,
                                                   RowState* state) {
  const float* panels = a.codes->panels.data_ptr<float>();
  const float* bias = a.codes->bias.data_ptr<float>();
  (void)rows;
  for (int64_t p = panel0; p < panel1; ++p)
    microkernel<R>(a.z + row0 * a.D, a.D, panels + p * a.D * kPanelCodes,
                   bias + p * kPanelCodes, static_cast<int32_t>(p * kPanelCodes), state);
}

__attribute__((always_inline)) inline void process_chunk_impl(const ChunkArgs& a, int64_t begin,
                                                             int64_t end) {
  RowState state[kChunkRows];
  const int64_t P = a.codes->panels.size(0);
  const int64_t panels_per_block =
      std::max<int64_t>(1, kBlockBytes / (a.D * kPanelCodes * int64_t(sizeof(float))));
  for (int64_t chunk = begin; chunk < end; chunk += kChunkRows) {
    const int64_t rows = std::min<int64_t>(kChunkRows, end - chunk);
    for (int64_t r = 0; r < rows; ++r)
      for (int l = 0; l < kPanelCodes; ++l) {
        state[r].best[l] = state[r].second[l] = -std::numeric_limits<float>::infinity();
        state[r].best_code[l] = 0;
      }
    for (int64_t p0 = 0; p0 < P; p0 += panels_per_block) {
      const int64_t p1 = std::min(P, p0 + panels_per_block);
      int64_t r = 0;
      for (; r + kRowTile <= rows; r += kRowTile)
        run_tile<kRowTile>(a, chunk + r, kRowTile, p0, p1, state + r);
      switch (rows - r) {  // remainder rows: smaller tiles, no padding copies
        case 5: run_tile<5>(a, chunk + r, 5, p0, p1, state + r); break;
        case 4: run_tile<4>(a, chunk + r, 4, p0, p1, state + r); break;
        case 3: run_tile<3>(a, chunk + r, 3, p0, p1, state + r); break;
        case 2: run_tile<2>(a, chunk + r, 2, p0, p1, state + r); break;
        case 1: run_tile<1>(a, chunk + r, 1, p0, p1, state + r); break;
        default: break;
      }
    }
    for (int64_t r = 0; r < rows; ++r) finish_row(a, chunk + r, state[r]);
  }
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) void process_chunk_avx2(const ChunkArgs& a, int64_t begin,
                                                            int64_t end) {
  process_chunk_impl(a, begin, end);
}
const bool kHasAvx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif

void process_chunk_generic(const ChunkArgs& a, int64_t begin, int64_t end) {
  process_chunk_impl(a, begin, end);
}

std::tuple<at::Tensor, at::Tensor> vq_nearest_cpu(const at::Tensor& z, const at::Tensor& codebook,
                                                  c10::string_view metric_name) {
  check_vq_inputs(z, codebook);
  TORCH_CHECK(z.device().is_cpu(), "vq_nearest_cpu: z must be a CPU tensor");
  const Metric metric = parse_metric(metric_name);
  const int64_t N = z.size(0), D = z.size(1), K = codebook.size(0);
  auto indices = at::empty({N}, z.options().dtype(at::kLong));
  auto scores = at::empty({N}, z.options().dtype(at::kFloat));
  if (N == 0) return {scores, indices};
  const at::Tensor z32 = z.to(at::kFloat).contiguous();  // exact for fp16 / bf16
  const PackedCodebook packed = pack_codebook(codebook, metric);
  const ChunkArgs args{z32.data_ptr<float>(), N, D, K, &packed, metric,
                       indices.data_ptr<int64_t>(), scores.data_ptr<float>()};
  at::parallel_for(0, (N + kChunkRows - 1) / kChunkRows, 1, [&](int64_t c0, int64_t c1) {
    const int64_t begin = c0 * kChunkRows, end = std::min(N, c1 * kChunkRows);
#if defined(__x86_64__)
    if (kHasAvx2) return process_chunk_avx2(args, begin, end);
#endif
    process_chunk_generic(args, begin, end);
  });
  return {scores, indices};
}

// counts[k] = #{n : indices[n] == k}, sums[k] = sum of z[n] over those n (index -1: skipped).
std::tuple<at::Tensor, at::Tensor> vq_code_stats_cpu(const at::Tensor& z,
                                                     const at::Tensor& indices,
                                                     int64_t num_codes) {
  check_code_stats_inputs(z, indices, num_codes);
  const int64_t N = z.size(0), D = z.size(1);
  auto counts = at::zeros({num_codes}, z.options().dtype(at::kFloat));
  auto sums = at::zeros({num_codes, D}, z.options().dtype(at::kFloat));
  if (N == 0) return {counts, sums};
  const at::Tensor z32 = z.to(at::kFloat).contiguous();
  const at::Tensor idx = indices.contiguous();
  const int64_t* code_of = idx.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n)
    TORCH_CHECK_VALUE(code_of[n] >= -1 && code_of[n] < num_codes, "vq_code_stats: indices[", n,
                      "] = ", code_of[n], " is outside [-1, num_codes = ", num_codes, ")");
  const float* zp = z32.data_ptr<float>();
  float* cp = counts.data_ptr<float>();
  float* sp = sums.data_ptr<float>();
  // Each thread owns a range of codes and scans all rows: no atomics, no per-thread copies of
  // the (K, D) sums, and a fixed summation order, so results do not depend on thread count.
  at::parallel_for(0, num_codes, 256, [&](int64_t k0, int64_t k1) {
    for (int64_t n = 0; n < N; ++n) {
      const int64_t k = code_of[n];
      if (k < k0 || k >= k1) continue;
      cp[k] += 1.0f;
      float* dst = sp + k * D;
      const float* src = zp + n * D;
      for (int64_t d = 0; d < D; ++d) dst[d] += src[d];
    }
  });
  return {counts, sums};
}

}  // namespace
}  // namespace eegfast

TORCH_LIBRARY_FRAGMENT(eegfast, m) {
  // Scores first: float outputs before integer ones keep torch.library.opcheck's autograd
  // check (which sums all outputs into one accumulator) applicable.
  m.def("vq_nearest(Tensor z, Tensor codebook, str metric) -> (Tensor scores, Tensor indices)");
  m.def("vq_code_stats(Tensor z, Tensor indices, int num_codes) -> (Tensor counts, Tensor sums)");
}

TORCH_LIBRARY_IMPL(eegfast, CPU, m) {
  m.impl("vq_nearest", &eegfast::vq_nearest_cpu);
  m.impl("vq_code_stats", &eegfast::vq_code_stats_cpu);
}
