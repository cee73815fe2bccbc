// CUDA kernel of moe_dispatch, registered for the CUDA dispatch key (schema: moe_cpu.cpp). The
// expert compute and combine ops run on GPUs through Triton (eegfast/ops/moe_triton.py).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "moe/moe.h"
#include "moe/moe_cuda.h"

#include <algorithm>
#include <tuple>
#include <vector>

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

// _moe_cuda_kernel_image: whether GPU `device` can run the kernels of moe_cuda.cu. Returns the CUDA
// error of looking one up (0: yes; cudaErrorNoKernelImageForDevice or
// cudaErrorInvalidDeviceFunction: they were compiled for other architectures) and the
// architectures they were compiled for (800 for compute_80). eegfast/ops/_backend.py asks
// before it chooses the cuda backend: else every op failed with "no kernel image is available
// for execution on the device" instead of falling back to Triton or the reference.
std::tuple<int64_t, std::vector<int64_t>> moe_cuda_kernel_image(int64_t device) {
  TORCH_CHECK(device >= 0 && device < c10::cuda::device_count(), "_moe_cuda_kernel_image: device ",
              device, " is not a CUDA device index (", int(c10::cuda::device_count()),
              " devices)");
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const int64_t status = static_cast<int64_t>(moe_cuda::kernel_image_status());
  int archs[32];
  const int count = std::min(moe_cuda::compiled_archs(archs, 32), 32);
  return {status, std::vector<int64_t>(archs, archs + count)};
}

}  // namespace
}  // namespace eegfast

TORCH_LIBRARY_IMPL(eegfast, CUDA, m) { m.impl("moe_dispatch", &eegfast::moe_dispatch_cuda); }

// Not an op on tensors (no dispatch key): registered as a plain function, for every key.
TORCH_LIBRARY_FRAGMENT(eegfast, m) {
  m.def("_moe_cuda_kernel_image(int device) -> (int, int[])", &eegfast::moe_cuda_kernel_image);
}
