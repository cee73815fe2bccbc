// CUDA launchers of the VQ ops (kernels in vq_cuda.cu). Plain C++: no torch headers, so the
// kernels compile with nvcc alone; the torch binding is vq_cuda_bind.cpp.
//
// All pointers are device pointers to contiguous row-major arrays; every launch is asynchronous
// on `stream` (no host synchronisation). A returned error is that of the launch (bad arguments:
// cudaErrorInvalidValue), never of the kernels' execution.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace eegfast {
namespace vq_cuda {

// dtype codes of z and codebook
constexpr int kDtypeFloat32 = 0;
constexpr int kDtypeFloat16 = 1;
constexpr int kDtypeBFloat16 = 2;

// metric codes
constexpr int kMetricCosine = 0;
constexpr int kMetricL2 = 1;

// Scratch bytes launch_nearest needs for these sizes: packed fp32 codebook, per-code bias and
// float64 norms, the largest norm, the list of rows to re-check in float64, and per-row partial
// results. O(N + K * D). 0 for invalid sizes (N < 0, K < 1 or D < 1).
size_t nearest_workspace_bytes(int64_t N, int64_t K, int64_t D);

// indices[n] = nearest code of z[n] (cosine: largest cosine similarity; l2: smallest squared
// distance), scores[n] = that similarity / squared distance (float64, rounded to float32).
// Rows with a NaN or inf element: index -1, score NaN. Same results as the CPU kernel.
// z: (N, D), codebook: (K, D), both of `dtype`; indices: (N,) int64; scores: (N,) float32;
// workspace: at least nearest_workspace_bytes(N, K, D) bytes, 16-byte aligned.
// N may be 0 (nothing is launched); K must be in [1, 2^31 - 1], D >= 1.
cudaError_t launch_nearest(const void* z, const void* codebook, int dtype, int64_t N, int64_t K,
                           int64_t D, int metric, int64_t* indices, float* scores,
                           void* workspace, size_t workspace_bytes, cudaStream_t stream);

// counts[k] += #{n : indices[n] == k}, sums[k, :] += sum of z[n, :] over those n, for
// 0 <= indices[n] < K; other indices (e.g. -1) are skipped. counts (K,) and sums (K, D) are
// float32 and must be zeroed by the caller. fp32 atomics: the summation order is not fixed.
cudaError_t launch_code_stats(const void* z, int dtype, const int64_t* indices, int64_t N,
                              int64_t K, int64_t D, float* counts, float* sums,
                              cudaStream_t stream);

// cudaSuccess when the current device can run this file's kernels: cudaFuncGetAttributes on one
// of them loads its image (or JIT-compiles it from PTX). Otherwise that call's error:
// cudaErrorNoKernelImageForDevice or cudaErrorInvalidDeviceFunction when the file was compiled
// for other architectures (TORCH_CUDA_ARCH_LIST), where every launch would fail the same way.
// The error is also taken off the runtime's last-error slot, so that no later launch check
// reports it. Synchronous; creates the device's context if there is none.
cudaError_t kernel_image_status();

// The virtual architectures this file was compiled for, as nvcc's __CUDA_ARCH_LIST__ lists
// them (800 for compute_80): writes at most `capacity` of them to `archs` and returns how many
// there are (0 when nvcc did not say).
int compiled_archs(int* archs, int capacity);

}  // namespace vq_cuda
}  // namespace eegfast
