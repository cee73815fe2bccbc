// Fused MoE dispatch: histogram, prefix scan and stable counting sort of the token slots in one
// kernel launch (no argsort chain). No torch headers (see moe_cuda.h).
//
// One block of 1024 threads, which suits the sizes MoE layers see (T k up to a few 10^5 slots,
// E <= 64): a multi-block sort would need a second launch or a decoupled look-back scan, and
// the whole pass is memory-light (8 bytes read per slot, 16 written).
//
//   pass 1: per-expert counts with shared-memory atomics; one thread turns them into offsets.
//   pass 2: slots in tiles of 1024, one per thread. Within a warp, __match_any_sync groups the
//           lanes that chose the same expert: a lane's rank is the number of such lanes below
//           it. The leader of each group writes the group size to a (warp, expert) table, one
//           thread per expert scans that table over the 32 warps, and each slot lands at
//           base[e] + (slots of e in earlier warps) + (rank in its warp). Tiles go in order,
//           warps and lanes in slot order, so equal experts keep slot order (stable).
#include "moe/moe_cuda.h"

#include <cstdint>

namespace eegfast {
namespace moe_cuda {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;

__global__ void __launch_bounds__(kThreads)
    dispatch_kernel(const int64_t* __restrict__ expert_idx, int64_t S, int num_experts,
                    int64_t* __restrict__ counts, int64_t* __restrict__ offsets,
                    int64_t* __restrict__ sorted_slots, int64_t* __restrict__ slot_pos) {
  __shared__ unsigned int count[kMaxBuckets];
  __shared__ long long base[kMaxBuckets + 1];
  __shared__ unsigned int warp_count[kWarps][kMaxBuckets];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int E = num_experts;

  for (int e = tid; e < E; e += kThreads) count[e] = 0;
  __syncthreads();
  for (int64_t s = tid; s < S; s += kThreads) {
    const int64_t e = expert_idx[s];
    if (e >= 0 && e < E) atomicAdd(&count[e], 1u);
  }
  __syncthreads();
  if (tid == 0) {
    long long run = 0;
    for (int e = 0; e < E; ++e) {
      base[e] = run;
      offsets[e] = run;
      counts[e] = count[e];
      run += count[e];
    }
    base[E] = run;
    offsets[E] = run;
  }
  __syncthreads();
  for (int64_t j = base[E] + tid; j < S; j += kThreads) sorted_slots[j] = -1;

  const unsigned int lanes_below = (1u << lane) - 1u;
  for (int64_t tile = 0; tile < S; tile += kThreads) {
    for (int i = tid; i < kWarps * kMaxBuckets; i += kThreads) (&warp_count[0][0])[i] = 0;
    __syncthreads();
    const int64_t s = tile + tid;
    int e = -1;
    if (s < S) {
      const int64_t raw = expert_idx[s];
      e = (raw >= 0 && raw < E) ? static_cast<int>(raw) : -1;
    }
    const unsigned int peers = __match_any_sync(0xffffffffu, e);
    const unsigned int rank = __popc(peers & lanes_below);
    if (e >= 0 && rank == 0) warp_count[warp][e] = __popc(peers);
    __syncthreads();
    unsigned int tile_total = 0;
    if (tid < E) {  // exclusive scan over warps, one thread per expert
      for (int w = 0; w < kWarps; ++w) {
        const unsigned int c = warp_count[w][tid];
        warp_count[w][tid] = tile_total;
        tile_total += c;
      }
    }
    __syncthreads();
    if (s < S) {
      if (e >= 0) {
        const int64_t p = base[e] + warp_count[warp][e] + rank;
        sorted_slots[p] = s;
        slot_pos[s] = p;
      } else {
        slot_pos[s] = -1;
      }
    }
    __syncthreads();
    if (tid < E) base[tid] += tile_total;
  }
}

}  // namespace

cudaError_t launch_dispatch(const int64_t* expert_idx, int64_t S, int64_t num_experts,
                            int64_t* counts, int64_t* offsets, int64_t* sorted_slots,
                            int64_t* slot_pos, cudaStream_t stream) {
  if (S < 0 || num_experts < 1 || num_experts > kMaxBuckets) return cudaErrorInvalidValue;
  dispatch_kernel<<<1, kThreads, 0, stream>>>(expert_idx, S, static_cast<int>(num_experts),
                                              counts, offsets, sorted_slots, slot_pos);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------
// Whether the current device can run these kernels (see moe_cuda.h)

cudaError_t kernel_image_status() {
  cudaFuncAttributes attributes;
  const cudaError_t err = cudaFuncGetAttributes(&attributes, dispatch_kernel);
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

}  // namespace moe_cuda
}  // namespace eegfast
