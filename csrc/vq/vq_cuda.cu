// CUDA kernels of the VQ ops: vq_nearest (nearest code per row) and vq_code_stats (per-code
// counts and sums). No torch headers: this file compiles with nvcc alone (see vq_cuda.h); the
// binding is vq_cuda_bind.cpp.
//
// vq_nearest gives the same indices as the CPU kernel (vq_cpu.cpp), by the same argument:
//
//   1. prep_codebook_kernel packs the codebook as fp32 (cosine: c / max(|c|, 1e-12), |c| in
//      float64) in tiles of 128 codes x D (d-major within a tile, zero padded to a multiple of
//      16 features and 128 codes), with a per-code bias (0 for cosine, -|c|^2 / 2 for l2, -inf
//      for padding codes) and the float64 norms. max_norm_kernel reduces the largest finite
//      norm, as the CPU does.
//   2. nearest_tiles_kernel: an SGEMM-shaped fp32 kernel that never forms the (N, K) scores. A
//      block owns 128 rows and streams a range of 128-code tiles through shared memory (cp.async,
//      double buffered, 16 features per stage); each thread accumulates an 8 x 8 register tile
//      and folds it into a per-row running (best, code, runner-up) as soon as a tile is complete.
//      Blocks also split the codes (grid.y) when there are too few row blocks to fill the GPU.
//   3. finalize_kernel (a thread per row) merges the splits, drops rows with NaN / inf elements
//      (index -1, score NaN), and accepts the fp32 winner only if its gap to the runner-up
//      exceeds tol = 4 (D + 4) 2^-24 S (S = |z| for cosine, |z| C + C^2 for l2, C the largest
//      finite code norm; plus fp32 underflow and the reference's tie tolerance, as finish_row):
//      the fp32 score of any code is within (D + 2) 2^-24 S of its exact value whatever the
//      summation order, so such a gap proves the fp32 winner is the exact winner, on the CPU
//      and here alike, as long as no fp32 value can overflow (S well below FLT_MAX: else the
//      row is re-checked too). Accepted rows get their float64 score; the rest are appended
//      to a list in the workspace.
//   4. rescore_kernel: a block per listed row re-scores all K codes in float64 exactly as
//      rescore_row_float64 in vq_cpu.cpp (NaN scores -> -inf, lowest index within the tie
//      tolerance of the best). Its float64 arithmetic uses explicit round-to-nearest intrinsics
//      (no FMA contraction) in the CPU's sequential order; the CPU build does not contract
//      float64 either (no float64 FMA in the x86-64 build), so the two produce the same float64
//      scores. (Code norms are summed sequentially here, by at::norm on the CPU: they may
//      differ in the last bit, which the tolerances absorb.)
//
// No step synchronises with the host; the list length is read on the device.
#include "vq/vq_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>

#include <algorithm>
#include <cstdint>

namespace eegfast {
namespace vq_cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Constants and workspace layout

constexpr int kBM = 128;           // rows per block of nearest_tiles_kernel
constexpr int kBN = 128;           // codes per tile
constexpr int kBD = 16;            // features per pipeline stage
constexpr int kTileThreads = 256;  // 16 x 16 threads, each an 8 x 8 register tile
constexpr int kLDZ = kBM + 4;      // row stride of the transposed z tile in shared memory: keeps
                                   // float4 alignment, spreads the transposing stores over banks
constexpr int64_t kResidentMaxD = 128;  // padded D up to which the whole z tile stays in smem
constexpr int64_t kTargetBlocks = 256;  // split codes over grid.y below this many row blocks
constexpr int64_t kMaxSplits = 64;
constexpr int kRowThreads = 256;       // finalize / prep / stats kernels
constexpr int kRescoreThreads = 256;
constexpr int64_t kRescoreBlocks = 1024;  // persistent blocks walking the list of re-check rows
constexpr int kMaxNormThreads = 1024;

constexpr double kUnitRoundoff = 5.9604644775390625e-08;  // 2^-24
constexpr double kTieTolerance = 1e-12;
constexpr double kNormEps = 1e-12;  // as torch.nn.functional.normalize
constexpr double kFloatDenormMin = 1.401298464324817e-45;  // 2^-149
constexpr double kFp32OverflowGuard = 1.7014118346046923e+38;  // 2^127, half of FLT_MAX

static_assert(kTileThreads == (kBM / 8) * (kBN / 8), "one 8 x 8 register tile per thread");
static_assert((kBD * kBN / 4) % kTileThreads == 0, "whole float4 copies per thread");
static_assert((kBM * kBD) % kTileThreads == 0, "whole z elements per thread");

struct Plan {
  int64_t row_blocks = 0;       // ceil(N / kBM)
  int64_t tiles = 0;            // ceil(K / kBN)
  int64_t dpad = 0;             // D rounded up to kBD
  int64_t kpad = 0;             // tiles * kBN
  int64_t splits = 1;           // code ranges per row block (grid.y)
  int64_t tiles_per_split = 0;  // tiles per code range; every range is non-empty
  // byte offsets into the workspace
  size_t packed = 0, bias = 0, norm = 0, max_norm = 0, count = 0, list = 0;
  size_t part_best = 0, part_second = 0, part_code = 0, total = 0;
};

constexpr size_t align256(size_t x) { return (x + 255) / 256 * 256; }

Plan make_plan(int64_t N, int64_t K, int64_t D) {
  Plan p;
  p.row_blocks = (N + kBM - 1) / kBM;
  p.tiles = (K + kBN - 1) / kBN;
  p.dpad = (D + kBD - 1) / kBD * kBD;
  p.kpad = p.tiles * kBN;
  int64_t splits = 1;
  if (p.row_blocks > 0 && p.row_blocks < kTargetBlocks)
    splits = (kTargetBlocks + p.row_blocks - 1) / p.row_blocks;
  splits = std::max<int64_t>(1, std::min<int64_t>(std::min<int64_t>(splits, p.tiles), kMaxSplits));
  p.tiles_per_split = (p.tiles + splits - 1) / splits;
  p.splits = (p.tiles + p.tiles_per_split - 1) / p.tiles_per_split;
  size_t offset = 0;
  auto take = [&offset](size_t bytes) {
    const size_t at = offset;
    offset = align256(offset + bytes);
    return at;
  };
  const size_t n = static_cast<size_t>(N), parts = static_cast<size_t>(p.splits) * n;
  p.packed = take(static_cast<size_t>(p.kpad) * static_cast<size_t>(p.dpad) * sizeof(float));
  p.bias = take(static_cast<size_t>(p.kpad) * sizeof(float));
  p.norm = take(static_cast<size_t>(K) * sizeof(double));
  p.max_norm = take(sizeof(double));
  p.count = take(sizeof(unsigned long long));
  p.list = take(n * sizeof(int64_t));
  p.part_best = take(parts * sizeof(float));
  p.part_second = take(parts * sizeof(float));
  p.part_code = take(parts * sizeof(int32_t));
  p.total = offset;
  return p;
}

// Dynamic shared memory of nearest_tiles_kernel: two code stages, and the z tile (resident:
// all dpad features, 82 KiB in all at dpad = 128; else two 16-feature stages, 32.5 KiB).
constexpr size_t tiles_smem_bytes(bool resident, int64_t dpad) {
  return static_cast<size_t>(2 * kBD * kBN + (resident ? dpad * kLDZ : 2 * kBD * kLDZ)) *
         sizeof(float);
}

// Whether the z tile stays resident: up to kResidentMaxD padded features, where the device
// grants the shared memory (smem_optin: cudaDevAttrMaxSharedMemoryPerBlockOptin). sm_75 grants
// 64 KiB and sm_6x 48 KiB, on which the resident launch failed for dpad >= 96 / >= 64.
bool use_resident_z(int64_t dpad, int smem_optin) {
  return dpad <= kResidentMaxD && tiles_smem_bytes(true, dpad) <= static_cast<size_t>(smem_optin);
}

// Whether an fp32 product, partial sum or score of a finite code may overflow for a row: each
// is at most bound_scale (1 + (D + 2) u) in magnitude (|z| |c| for the dot products, plus
// |c|^2 / 2 for the l2 bias; bound_scale as in finalize_kernel). An overflowed code scores inf,
// -inf or NaN (inf - inf), outside the error bound: the exact winner (say an l2 code equal to
// the row, |c| = 3e19) could lose to a finite code by an infinite gap. Such rows go to the
// float64 re-check, as in finish_row (vq_cpu.cpp).
__host__ __device__ inline bool fp32_may_overflow(double bound_scale, int64_t D) {
  return !(bound_scale * (1.0 + 4.0 * static_cast<double>(D + 4) * kUnitRoundoff) <
           kFp32OverflowGuard);
}

// ---------------------------------------------------------------------------------------------
// Device helpers

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// float64 value of an element, exact for all three dtypes (as codebook.to(float64) on the CPU).
template <typename T>
__device__ __forceinline__ double to_double(T x) {
  return static_cast<double>(to_float(x));
}

// std::max(a, b) exactly, NaN behaviour included: (a < b) ? b : a.
__device__ __forceinline__ double std_max(double a, double b) { return (a < b) ? b : a; }

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
#else
  *static_cast<float4*>(smem) = *static_cast<const float4*>(gmem);
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
#endif
}

// Running top-2 of one row: fold in `score` of `code`. Codes arrive in ascending order, so the
// strict '>' keeps the lowest index among equal scores; an equal score at another index becomes
// the runner-up (gap 0: the row is re-checked in float64). NaN compares false: never recorded.
// Identical to the CPU microkernel's update.
__device__ __forceinline__ void top2_update(float score, int code, float& best, int& best_code,
                                            float& second) {
  const bool better = score > best;
  second = better ? best : (score > second ? score : second);
  best = better ? score : best;
  best_code = better ? code : best_code;
}

// Merge the top-2 of a disjoint set of codes (ob, oc, os) into (best, code, second): the larger
// best wins, equal bests go to the lower code, and the runner-up is the largest of both
// runners-up and the losing best. Associative and commutative, so any merge order (butterfly,
// splits) gives the same result. Bests and runners-up are never NaN.
__device__ __forceinline__ void top2_merge(float& best, int& code, float& second, float ob, int oc,
                                           float os) {
  const bool take = ob > best || (ob == best && oc < code);
  const float loser = take ? best : ob;
  second = second > os ? second : os;
  second = second > loser ? second : loser;
  best = take ? ob : best;
  code = take ? oc : code;
}

// Warp-wide max (kTakeMax) or min, result in every lane.
template <bool kTakeMax, typename T>
__device__ __forceinline__ T warp_reduce(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const T o = __shfl_xor_sync(0xffffffffu, v, off);
    v = (kTakeMax ? v < o : o < v) ? o : v;
  }
  return v;
}

// Block-wide max (kTakeMax) or min, result in every thread. `sh` holds one slot per warp; the
// leading barrier keeps a previous call's readers ahead of this call's writers. blockDim.x must
// be a multiple of 32 and every thread of the block must call it.
template <bool kTakeMax, typename T>
__device__ T block_reduce(T v, T* sh, T identity) {
  v = warp_reduce<kTakeMax>(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x >> 5) ? sh[lane] : identity;
  return warp_reduce<kTakeMax>(v);
}

// Cosine similarity or squared distance of a row and a code in float64: final_score in
// vq_cpu.cpp, same order, no contraction.
template <typename T>
__device__ __forceinline__ float final_score(const T* __restrict__ zr, const T* __restrict__ cr,
                                             int64_t D, int metric, double c_norm) {
  double acc = 0.0, z_sq = 0.0;
  if (metric == kMetricCosine) {
    for (int64_t d = 0; d < D; ++d) {
      const double zd = to_double(zr[d]), cd = to_double(cr[d]);
      acc = __dadd_rn(acc, __dmul_rn(zd, cd));
      z_sq = __dadd_rn(z_sq, __dmul_rn(zd, zd));
    }
    const double denom = __dmul_rn(std_max(__dsqrt_rn(z_sq), kNormEps), std_max(c_norm, kNormEps));
    return __double2float_rn(__ddiv_rn(acc, denom));
  }
  for (int64_t d = 0; d < D; ++d) {
    const double diff = __dsub_rn(to_double(zr[d]), to_double(cr[d]));
    acc = __dadd_rn(acc, __dmul_rn(diff, diff));
  }
  return __double2float_rn(acc);
}

// ---------------------------------------------------------------------------------------------
// 1. Codebook packing

// One thread per (padded) code. packed is (tiles, dpad, kBN): the tile for codes
// [t * kBN, (t + 1) * kBN) and features [d0, d0 + kBD) is one contiguous 8 KiB block, copied to
// shared memory with plain 16-byte cp.async. Consecutive threads write consecutive addresses.
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    prep_codebook_kernel(const T* __restrict__ codebook, int64_t K, int64_t D, int64_t dpad,
                         int64_t kpad, int metric, float* __restrict__ packed,
                         float* __restrict__ bias, double* __restrict__ norm) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < kpad;
       k += stride) {
    float* dst = packed + (k / kBN) * dpad * kBN + (k % kBN);
    if (k >= K) {  // padding code: zero features, -inf bias, never wins
      for (int64_t d = 0; d < dpad; ++d) dst[d * kBN] = 0.0f;
      bias[k] = -CUDART_INF_F;
      continue;
    }
    const T* c = codebook + k * D;
    double sq = 0.0;
    for (int64_t d = 0; d < D; ++d) {
      const double v = to_double(c[d]);
      sq = __dadd_rn(sq, __dmul_rn(v, v));
    }
    const double nrm = __dsqrt_rn(sq);
    norm[k] = nrm;
    // as pack_codebook: cosine codes are scaled by 1 / max(|c|, eps), l2 codes by 1 (exact)
    const double scale = metric == kMetricCosine ? __ddiv_rn(1.0, std_max(nrm, kNormEps)) : 1.0;
    for (int64_t d = 0; d < dpad; ++d)
      dst[d * kBN] = d < D ? __double2float_rn(__dmul_rn(to_double(c[d]), scale)) : 0.0f;
    bias[k] = metric == kMetricCosine ? 0.0f
                                      : __double2float_rn(__dmul_rn(__dmul_rn(-0.5, nrm), nrm));
  }
}

// The largest finite norm (0 if none), as pack_codebook in vq_cpu.cpp: a NaN / inf code's fp32
// score is NaN (never a best or runner-up), so the error bound and the reference's tie scale
// are over the finite codes. One block; also zeroes the re-check list length for this call.
__global__ void __launch_bounds__(kMaxNormThreads)
    max_norm_kernel(const double* __restrict__ norm, int64_t K, double* __restrict__ max_norm,
                    unsigned long long* __restrict__ count) {
  __shared__ double sh_value[32];
  if (threadIdx.x == 0) *count = 0ull;
  double m = 0.0;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x)
    m = isfinite(norm[k]) && norm[k] > m ? norm[k] : m;
  m = block_reduce<true, double>(m, sh_value, 0.0);
  if (threadIdx.x == 0) *max_norm = m;
}

// ---------------------------------------------------------------------------------------------
// 2. fp32 tiles: running top-2 per row over a range of code tiles

// Block: rows [row0, row0 + 128) x code tiles [tile_begin, tile_end). Thread (ty, tx) = (tid / 16,
// tid % 16) owns rows {ty*4 + i, 64 + ty*4 + i} (i < 4) and codes {tx*4 + j, 64 + tx*4 + j}
// (j < 4) of each tile: float4 shared-memory reads, conflict free for the codes (a quarter warp
// reads 32 consecutive floats) and broadcast for the rows (two row groups per warp).
//
// Pipeline: one step = (tile, 16-feature chunk). Step s + 1's code chunk is issued with cp.async
// into the other stage right after the barrier of step s, so it lands while step s computes;
// one barrier per step suffices because a stage is only overwritten after every thread has
// passed the barrier that follows its last read. The z tile (transposed, features x rows) is
// loaded once when it fits (kResident: use_resident_z), else per step like the codes.
// After the last chunk of a tile, its 8 x 8 scores (+ bias) are folded into the per-row top-2
// in ascending code order and the accumulators reset. At the end, the 16 threads sharing a row
// (lanes differing in the low 4 bits of one warp) merge their top-2 by xor shuffles.
template <typename T, bool kResident>
__global__ void __launch_bounds__(kTileThreads, 2)
    nearest_tiles_kernel(const T* __restrict__ z, int64_t N, int64_t D, int64_t dpad,
                         const float* __restrict__ packed, const float* __restrict__ bias,
                         int64_t tiles, int64_t tiles_per_split, float* __restrict__ part_best,
                         float* __restrict__ part_second, int32_t* __restrict__ part_code) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* c_s = reinterpret_cast<float*>(smem_raw);  // [2][kBD][kBN]
  float* z_s = c_s + 2 * kBD * kBN;                 // kResident: [dpad][kLDZ]; else [2][kBD][kLDZ]

  const int tid = threadIdx.x;
  const int tx = tid & 15;
  const int ty = tid >> 4;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t tile_begin = static_cast<int64_t>(blockIdx.y) * tiles_per_split;
  const int64_t tile_end = tile_begin + tiles_per_split < tiles ? tile_begin + tiles_per_split
                                                                : tiles;
  const int64_t nchunks = dpad / kBD;

  // code chunk (tile, chunk) -> stage: 2 x 16 bytes per thread, one cp.async group
  auto load_codes = [&](int64_t tile, int64_t chunk, int stage) {
    const float* src = packed + (tile * dpad + chunk * kBD) * kBN;
    float* dst = c_s + stage * (kBD * kBN);
#pragma unroll
    for (int i = tid; i < kBD * kBN / 4; i += kTileThreads) cp_async16(dst + 4 * i, src + 4 * i);
    cp_async_commit();
  };
  // z columns [d0, d0 + kBD) of this block's rows -> dst[dd][m], zero outside N x D
  auto load_z_chunk = [&](int64_t d0, float* dst) {
#pragma unroll 2
    for (int e = tid; e < kBM * kBD; e += kTileThreads) {
      const int m = e / kBD, dd = e % kBD;
      const int64_t row = row0 + m, d = d0 + dd;
      dst[dd * kLDZ + m] = (row < N && d < D) ? to_float(z[row * D + d]) : 0.0f;
    }
  };

  float best[8], second[8];
  int code[8];
  float acc[8][8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    best[i] = -CUDART_INF_F;
    second[i] = -CUDART_INF_F;
    code[i] = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;
  }

  // whole (128 x dpad) z tile, transposed, zero padded; visible after the loop's first barrier
  if constexpr (kResident) {
    const int width = static_cast<int>(dpad);
    for (int e = tid; e < kBM * width; e += kTileThreads) {
      const int m = e / width, dd = e - m * width;
      const int64_t row = row0 + m;
      z_s[dd * kLDZ + m] = (row < N && dd < D) ? to_float(z[row * D + dd]) : 0.0f;
    }
  }

  int64_t tile = tile_begin, chunk = 0;
  int stage = 0;
  if (tile < tile_end) {
    load_codes(tile, 0, 0);
    if (!kResident) load_z_chunk(0, z_s);
  }
  while (tile < tile_end) {
    cp_async_wait_all();  // this thread's copies of step (tile, chunk) ...
    __syncthreads();      // ... and everyone's; everyone is also done reading stage ^ 1

    int64_t next_tile = tile, next_chunk = chunk + 1;
    if (next_chunk == nchunks) {
      next_chunk = 0;
      ++next_tile;
    }
    if (next_tile < tile_end) {
      load_codes(next_tile, next_chunk, stage ^ 1);
      if (!kResident) load_z_chunk(next_chunk * kBD, z_s + (stage ^ 1) * (kBD * kLDZ));
    }

    const float* zc = kResident ? z_s + chunk * (kBD * kLDZ) : z_s + stage * (kBD * kLDZ);
    const float* cc = c_s + stage * (kBD * kBN);
#pragma unroll
    for (int k = 0; k < kBD; ++k) {
      const float4 a0 = *reinterpret_cast<const float4*>(zc + k * kLDZ + ty * 4);
      const float4 a1 = *reinterpret_cast<const float4*>(zc + k * kLDZ + 64 + ty * 4);
      const float4 b0 = *reinterpret_cast<const float4*>(cc + k * kBN + tx * 4);
      const float4 b1 = *reinterpret_cast<const float4*>(cc + k * kBN + 64 + tx * 4);
      const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
      const float b[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }

    if (chunk == nchunks - 1) {  // tile complete: fold its scores into the top-2
      const int64_t base = tile * kBN;
      const float4 bias0 = __ldg(reinterpret_cast<const float4*>(bias + base + tx * 4));
      const float4 bias1 = __ldg(reinterpret_cast<const float4*>(bias + base + 64 + tx * 4));
      const float bj[8] = {bias0.x, bias0.y, bias0.z, bias0.w,
                           bias1.x, bias1.y, bias1.z, bias1.w};
      // codes of padding columns may exceed INT32_MAX only when they lose (-inf bias): unsigned
      // arithmetic keeps that free of overflow
      const unsigned code0 = static_cast<unsigned>(base) + static_cast<unsigned>(tx * 4);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {  // j ascending = code ascending
          const unsigned c = code0 + static_cast<unsigned>(j < 4 ? j : 64 + j - 4);
          top2_update(acc[i][j] + bj[j], static_cast<int>(c), best[i], code[i], second[i]);
          acc[i][j] = 0.0f;
        }
      }
    }

    tile = next_tile;
    chunk = next_chunk;
    stage ^= 1;
  }

  // merge across the 16 threads of each row group (lanes tx = 0..15 of one half warp)
#pragma unroll
  for (int off = 1; off < 16; off <<= 1) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float ob = __shfl_xor_sync(0xffffffffu, best[i], off);
      const float os = __shfl_xor_sync(0xffffffffu, second[i], off);
      const int oc = __shfl_xor_sync(0xffffffffu, code[i], off);
      top2_merge(best[i], code[i], second[i], ob, oc, os);
    }
  }
  // lane tx = i writes row i of its group (constant register indices: no local memory)
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    if (tx == i) {
      const int64_t row = row0 + (i < 4 ? ty * 4 + i : 64 + ty * 4 + i - 4);
      if (row < N) {
        const int64_t at = static_cast<int64_t>(blockIdx.y) * N + row;
        part_best[at] = best[i];
        part_second[at] = second[i];
        part_code[at] = code[i];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// 3. Per-row decision (finish_row in vq_cpu.cpp)

template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    finalize_kernel(const T* __restrict__ z, const T* __restrict__ codebook, int64_t N, int64_t D,
                    int64_t splits, int metric, const double* __restrict__ norm,
                    const double* __restrict__ max_norm_ptr, const float* __restrict__ part_best,
                    const float* __restrict__ part_second, const int32_t* __restrict__ part_code,
                    int64_t* __restrict__ indices, float* __restrict__ scores,
                    unsigned long long* __restrict__ count, int64_t* __restrict__ list) {
  const double max_norm = *max_norm_ptr;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; n < N;
       n += stride) {
    float best = part_best[n], second = part_second[n];
    int code = part_code[n];
    for (int64_t s = 1; s < splits; ++s)  // splits hold ascending code ranges
      top2_merge(best, code, second, part_best[s * N + n], part_code[s * N + n],
                 part_second[s * N + n]);

    const T* zr = z + n * D;
    double z_sq = 0.0, poison = 0.0;
    for (int64_t d = 0; d < D; ++d) {
      const double v = to_double(zr[d]);
      z_sq = __dadd_rn(z_sq, __dmul_rn(v, v));
      poison = __dadd_rn(poison, __dmul_rn(v, 0.0));  // NaN iff some element is NaN or inf
    }
    if (isnan(poison)) {
      indices[n] = -1;
      scores[n] = CUDART_NAN_F;
      continue;
    }
    const double z_norm = __dsqrt_rn(z_sq);
    const double bound_scale =
        metric == kMetricCosine
            ? z_norm
            : __dadd_rn(__dmul_rn(z_norm, max_norm), __dmul_rn(max_norm, max_norm));
    // The fp32 error bound, plus fp32 underflow (products and sums of subnormals), plus the
    // reference's tie tolerance in these units (finish_row in vq_cpu.cpp): a gap within it
    // means codes the reference counts as tied, which only the float64 re-check resolves.
    const double tie_scale =
        metric == kMetricCosine ? __dmul_rn(2.0, std_max(z_norm, kNormEps))
                                : __dadd_rn(z_sq, __dmul_rn(max_norm, max_norm));
    const double tolerance = __dadd_rn(
        __dmul_rn(__dmul_rn(4.0, static_cast<double>(D + 4)),
                  __dadd_rn(__dmul_rn(kUnitRoundoff, bound_scale), kFloatDenormMin)),
        __dmul_rn(kTieTolerance, tie_scale));
    const double gap = __dsub_rn(static_cast<double>(best), static_cast<double>(second));
    if (!(gap > tolerance) || !isfinite(best) || fp32_may_overflow(bound_scale, D)) {
      list[atomicAdd(count, 1ull)] = n;  // rescore_kernel writes this row
      continue;
    }
    indices[n] = code;
    scores[n] = final_score(zr, codebook + static_cast<int64_t>(code) * D, D, metric, norm[code]);
  }
}

// ---------------------------------------------------------------------------------------------
// 4. float64 re-check (rescore_row_float64 in vq_cpu.cpp)

// A block per listed row (persistent blocks walk the list; its length is read on the device, so
// well-separated inputs cost one read per block). Each thread scores codes tid, tid + 256, ...
// with the CPU's formulas in its sequential feature order, so every float64 score equals the
// CPU's. Pass 1: block max of the scores. Pass 2: block min of the first index per thread whose
// score is within the tie tolerance of the max (a thread's codes ascend, so its first hit is
// its lowest). The score function is deterministic, so both passes see the same values.
template <typename T>
__global__ void __launch_bounds__(kRescoreThreads)
    rescore_kernel(const T* __restrict__ z, const T* __restrict__ codebook, int64_t K, int64_t D,
                   int metric, const double* __restrict__ norm,
                   const double* __restrict__ max_norm_ptr,
                   const unsigned long long* __restrict__ count, const int64_t* __restrict__ list,
                   int64_t* __restrict__ indices, float* __restrict__ scores) {
  __shared__ double sh_value[32];
  __shared__ long long sh_index[32];
  const unsigned long long total = *count;
  const double max_norm = *max_norm_ptr;
  constexpr long long kNone = INT64_MAX;
  for (unsigned long long item = blockIdx.x; item < total; item += gridDim.x) {
    const int64_t n = list[item];
    const T* zr = z + n * D;
    double z_sq = 0.0;
    for (int64_t d = 0; d < D; ++d) {
      const double v = to_double(zr[d]);
      z_sq = __dadd_rn(z_sq, __dmul_rn(v, v));
    }
    const double z_norm = __dsqrt_rn(z_sq);
    auto score_of = [&](int64_t k) {
      const T* cr = codebook + k * D;
      double dot = 0.0;
      for (int64_t d = 0; d < D; ++d)
        dot = __dadd_rn(dot, __dmul_rn(to_double(zr[d]), to_double(cr[d])));
      const double nk = norm[k];
      const double s =
          metric == kMetricCosine
              ? __ddiv_rn(dot, __dmul_rn(std_max(z_norm, kNormEps), std_max(nk, kNormEps)))
              : -__dadd_rn(__dsub_rn(z_sq, __dmul_rn(2.0, dot)), __dmul_rn(nk, nk));
      return isnan(s) ? -CUDART_INF : s;
    };

    double local = -CUDART_INF;
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) local = std_max(local, score_of(k));
    const double best = block_reduce<true, double>(local, sh_value, -CUDART_INF);
    if (best == -CUDART_INF) {  // no code with a usable score: no nearest code (uniform)
      if (threadIdx.x == 0) {
        indices[n] = -1;
        scores[n] = CUDART_NAN_F;
      }
      continue;
    }
    const double tol =
        metric == kMetricCosine
            ? kTieTolerance
            : __dmul_rn(kTieTolerance, __dadd_rn(z_sq, __dmul_rn(max_norm, max_norm)));
    const double threshold = __dsub_rn(best, tol);
    long long first = kNone;
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
      if (score_of(k) >= threshold) {
        first = k;
        break;
      }
    }
    first = block_reduce<false, long long>(first, sh_index, kNone);
    if (threadIdx.x == 0) {
      if (first == kNone) {  // no comparable score (tolerance NaN)
        indices[n] = -1;
        scores[n] = CUDART_NAN_F;
      } else {
        indices[n] = first;
        scores[n] = final_score(zr, codebook + first * D, D, metric, norm[first]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// code_stats: a thread per (row, feature); feature 0 also counts the row. cols = max(D, 1) so
// that rows are counted when D = 0.
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    code_stats_kernel(const T* __restrict__ z, const int64_t* __restrict__ indices, int64_t N,
                      int64_t K, int64_t D, int64_t cols, float* __restrict__ counts,
                      float* __restrict__ sums) {
  const int64_t total = N * cols;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += stride) {
    const int64_t n = e / cols, d = e - n * cols;
    const int64_t k = indices[n];
    if (k < 0 || k >= K) continue;  // -1 (no code) and, without a host check, anything invalid
    if (d == 0) atomicAdd(counts + k, 1.0f);
    if (d < D) atomicAdd(sums + k * D + d, to_float(z[n * D + d]));
  }
}

// ---------------------------------------------------------------------------------------------
// Host side

inline unsigned grid_for(int64_t work, int threads, int64_t cap) {
  const int64_t blocks = (work + threads - 1) / threads;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(blocks, cap)));
}

template <typename T, bool kResident>
cudaError_t launch_tiles(const T* z, int64_t N, int64_t D, const Plan& p, const float* packed,
                         const float* bias, float* part_best, float* part_second,
                         int32_t* part_code, cudaStream_t stream) {
  const size_t smem = tiles_smem_bytes(kResident, p.dpad);
  auto kernel = nearest_tiles_kernel<T, kResident>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(p.row_blocks), static_cast<unsigned>(p.splits));
  kernel<<<grid, kTileThreads, smem, stream>>>(z, N, D, p.dpad, packed, bias, p.tiles,
                                               p.tiles_per_split, part_best, part_second,
                                               part_code);
  return cudaGetLastError();
}

template <typename T>
cudaError_t nearest_impl(const T* z, const T* codebook, int64_t N, int64_t K, int64_t D,
                         int metric, int64_t* indices, float* scores, unsigned char* ws,
                         const Plan& p, cudaStream_t stream) {
  float* packed = reinterpret_cast<float*>(ws + p.packed);
  float* bias = reinterpret_cast<float*>(ws + p.bias);
  double* norm = reinterpret_cast<double*>(ws + p.norm);
  double* max_norm = reinterpret_cast<double*>(ws + p.max_norm);
  auto* count = reinterpret_cast<unsigned long long*>(ws + p.count);
  int64_t* list = reinterpret_cast<int64_t*>(ws + p.list);
  float* part_best = reinterpret_cast<float*>(ws + p.part_best);
  float* part_second = reinterpret_cast<float*>(ws + p.part_second);
  int32_t* part_code = reinterpret_cast<int32_t*>(ws + p.part_code);
  cudaError_t err;

  prep_codebook_kernel<T><<<grid_for(p.kpad, kRowThreads, 8192), kRowThreads, 0, stream>>>(
      codebook, K, D, p.dpad, p.kpad, metric, packed, bias, norm);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  max_norm_kernel<<<1, kMaxNormThreads, 0, stream>>>(norm, K, max_norm, count);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  int device = 0, smem_optin = 0;
  if ((err = cudaGetDevice(&device)) != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  err = use_resident_z(p.dpad, smem_optin)
            ? launch_tiles<T, true>(z, N, D, p, packed, bias, part_best, part_second, part_code,
                                    stream)
            : launch_tiles<T, false>(z, N, D, p, packed, bias, part_best, part_second, part_code,
                                     stream);
  if (err != cudaSuccess) return err;

  finalize_kernel<T><<<grid_for(N, kRowThreads, 65535), kRowThreads, 0, stream>>>(
      z, codebook, N, D, p.splits, metric, norm, max_norm, part_best, part_second, part_code,
      indices, scores, count, list);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  const unsigned rescore_blocks = static_cast<unsigned>(std::min<int64_t>(N, kRescoreBlocks));
  rescore_kernel<T><<<rescore_blocks, kRescoreThreads, 0, stream>>>(
      z, codebook, K, D, metric, norm, max_norm, count, list, indices, scores);
  return cudaGetLastError();
}

template <typename T>
cudaError_t code_stats_impl(const T* z, const int64_t* indices, int64_t N, int64_t K, int64_t D,
                            float* counts, float* sums, cudaStream_t stream) {
  const int64_t cols = std::max<int64_t>(D, 1);
  code_stats_kernel<T><<<grid_for(N * cols, kRowThreads, 1 << 16), kRowThreads, 0, stream>>>(
      z, indices, N, K, D, cols, counts, sums);
  return cudaGetLastError();
}

}  // namespace

size_t nearest_workspace_bytes(int64_t N, int64_t K, int64_t D) {
  if (N < 0 || K < 1 || D < 1) return 0;
  return make_plan(N, K, D).total;
}

cudaError_t launch_nearest(const void* z, const void* codebook, int dtype, int64_t N, int64_t K,
                           int64_t D, int metric, int64_t* indices, float* scores,
                           void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (N < 0 || K < 1 || K > INT32_MAX || D < 1) return cudaErrorInvalidValue;
  if (metric != kMetricCosine && metric != kMetricL2) return cudaErrorInvalidValue;
  if (N == 0) return cudaSuccess;
  const Plan p = make_plan(N, K, D);
  if (p.row_blocks > INT32_MAX) return cudaErrorInvalidValue;  // grid.x
  if (z == nullptr || codebook == nullptr || indices == nullptr || scores == nullptr ||
      workspace == nullptr || workspace_bytes < p.total ||
      reinterpret_cast<uintptr_t>(workspace) % 16 != 0)
    return cudaErrorInvalidValue;
  auto* ws = static_cast<unsigned char*>(workspace);
  switch (dtype) {
    case kDtypeFloat32:
      return nearest_impl(static_cast<const float*>(z), static_cast<const float*>(codebook), N,
                          K, D, metric, indices, scores, ws, p, stream);
    case kDtypeFloat16:
      return nearest_impl(static_cast<const __half*>(z), static_cast<const __half*>(codebook), N,
                          K, D, metric, indices, scores, ws, p, stream);
    case kDtypeBFloat16:
      return nearest_impl(static_cast<const __nv_bfloat16*>(z),
                          static_cast<const __nv_bfloat16*>(codebook), N, K, D, metric, indices,
                          scores, ws, p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t launch_code_stats(const void* z, int dtype, const int64_t* indices, int64_t N,
                              int64_t K, int64_t D, float* counts, float* sums,
                              cudaStream_t stream) {
  if (N < 0 || K < 1 || D < 0) return cudaErrorInvalidValue;
  if (N == 0) return cudaSuccess;
  switch (dtype) {
    case kDtypeFloat32:
      return code_stats_impl(static_cast<const float*>(z), indices, N, K, D, counts, sums,
                             stream);
    case kDtypeFloat16:
      return code_stats_impl(static_cast<const __half*>(z), indices, N, K, D, counts, sums,
                             stream);
    case kDtypeBFloat16:
      return code_stats_impl(static_cast<const __nv_bfloat16*>(z), indices, N, K, D, counts,
                             sums, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

// ---------------------------------------------------------------------------------------------
// Whether the current device can run these kernels (see vq_cuda.h)

cudaError_t kernel_image_status() {
  cudaFuncAttributes attributes;
  const cudaError_t err = cudaFuncGetAttributes(&attributes, code_stats_kernel<float>);
  // not a sticky error, but cudaGetLastError would return it after the next good launch
  if (err != cudaSuccess) (void)cudaGetLastError();
  return err;
}

int compiled_archs(int* archs, int capacity) {
#ifdef __CUDA_ARCH_LIST__
  constexpr int kArchs[] = {__CUDA_ARCH_LIST__};
  constexpr int kCount = static_cast<int>(sizeof(kArchs) / sizeof(kArchs[0]));
  for (int i = 0; i < kCount && i < capacity; ++i) archs[i] = kArchs[i];
  return kCount;
#else
  return 0;
#endif
}

}  // namespace vq_cuda
}  // namespace eegfast
