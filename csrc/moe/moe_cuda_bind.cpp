// CUDA kernel of moe_dispatch, registered for the CUDA dispatch key (schema: moe_cpu.cpp). The
// expert compute and combine ops run on GPUs through Triton (eegfast/ops/moe_triton.py).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "moe/moe.h"
#include "moe/moe_cuda.h"

#include <tuple>

namespace eegfast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_dispatch_cuda(
    const at::Tensor& expert_idx, int64_t num_experts) {
  check_moe_dispatch_inputs(expert_idx, num_experts);
  TORCH_CHECK(expert_idx.is_cuda(), "moe_dispatch_cuda: expert_idx must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(expert_idx.device());
  const at::Tensor idx = expert_idx.contiguous();
  const int64_t S = idx.numel();
  const auto opts = idx.options();
  at::Tensor counts = at::empty({num_experts}, opts);
  at::Tensor offsets = at::empty({num_experts + 1}, opts);
  at::Tensor sorted_slots = at::empty({S}, opts);
  at::Tensor slot_pos = at::empty({S}, opts);
  C10_CUDA_CHECK(moe_cuda::launch_dispatch(
      idx.data_ptr<int64_t>(), S, num_experts, counts.data_ptr<int64_t>(),
      offsets.data_ptr<int64_t>(), sorted_slots.data_ptr<int64_t>(), slot_pos.data_ptr<int64_t>(),
      at::cuda::getCurrentCUDAStream()));
  return {counts, offsets, sorted_slots, slot_pos};
}

}  // namespace
}  // namespace eegfast

TORCH_LIBRARY_IMPL(eegfast, CUDA, m) { m.impl("moe_dispatch", &eegfast::moe_dispatch_cuda); }
