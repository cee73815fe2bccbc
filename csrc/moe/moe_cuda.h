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

}  // namespace moe_cuda
}  // namespace eegfast
