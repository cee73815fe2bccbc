// CUDA launcher of the fused MoE dispatch kernel (moe_cuda.cu). Plain C++: no torch headers, so
// the kernel compiles with nvcc alone; the torch binding is moe_cuda_bind.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace eegfast {
namespace moe_cuda {

constexpr int64_t kMaxBuckets = 65;  // up to 64 experts plus the "dropped" bucket

// From expert_idx (S = T * k slots, int64, contiguous, values in [0, num_experts)) computes in
// one kernel launch: counts (num_experts,), offsets (num_experts + 1,) = exclusive prefix sum
// of counts with offsets[E] = total, sorted_slots (S,) = the slots in expert order (stable:
// ties keep slot order) and slot_pos (S,) its inverse permutation. All int64 device pointers.
// Values outside [0, num_experts) are not counted: their slot_pos is -1 and the tail of
// sorted_slots is filled with -1 (checked on the CPU only; the CUDA op never synchronises).
// S may be 0 (counts and offsets are still written). Asynchronous on `stream`.
cudaError_t launch_dispatch(const int64_t* expert_idx, int64_t S, int64_t num_experts,
                            int64_t* counts, int64_t* offsets, int64_t* sorted_slots,
                            int64_t* slot_pos, cudaStream_t stream);

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

}  // namespace moe_cuda
}  // namespace eegfast
