// CUDA kernels of the VQ ops, registered for the CUDA dispatch key. Schemas: vq_cpu.cpp. This
// file checks arguments, allocates outputs and scratch, and calls the launchers of vq_cuda.cu
// on the current stream; nothing here synchronises with the device (in particular, the range
// of vq_code_stats' indices is not checked: the kernel skips indices outside [0, num_codes)).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "vq/vq.h"
#include "vq/vq_cuda.h"

#include <algorithm>
#include <tuple>
#include <vector>

namespace eegfast {
namespace {

int cuda_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return vq_cuda::kDtypeFloat32;
    case at::kHalf: return vq_cuda::kDtypeFloat16;
    case at::kBFloat16: return vq_cuda::kDtypeBFloat16;
    default: TORCH_CHECK(false, "eegfast VQ CUDA kernels: unsupported dtype ", dtype);
  }
}

std::tuple<at::Tensor, at::Tensor> vq_nearest_cuda(const at::Tensor& z,
                                                   const at::Tensor& codebook,
                                                   c10::string_view metric_name) {
  check_vq_inputs(z, codebook);
  TORCH_CHECK(z.is_cuda(), "vq_nearest_cuda: z must be a CUDA tensor");
  const Metric metric = parse_metric(metric_name);
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t N = z.size(0), D = z.size(1), K = codebook.size(0);
  auto indices = at::empty({N}, z.options().dtype(at::kLong));
  auto scores = at::empty({N}, z.options().dtype(at::kFloat));
  if (N == 0) return {scores, indices};
  const at::Tensor z_c = z.contiguous();
  const at::Tensor codebook_c = codebook.contiguous();
  const size_t workspace_bytes = vq_cuda::nearest_workspace_bytes(N, K, D);
  const at::Tensor workspace =
      at::empty({static_cast<int64_t>(workspace_bytes)}, z.options().dtype(at::kByte));
  C10_CUDA_CHECK(vq_cuda::launch_nearest(
      z_c.data_ptr(), codebook_c.data_ptr(), cuda_dtype(z.scalar_type()), N, K, D,
      metric == Metric::kCosine ? vq_cuda::kMetricCosine : vq_cuda::kMetricL2,
      indices.data_ptr<int64_t>(), scores.data_ptr<float>(), workspace.data_ptr(),
      workspace_bytes, at::cuda::getCurrentCUDAStream()));
  return {scores, indices};
}

std::tuple<at::Tensor, at::Tensor> vq_code_stats_cuda(const at::Tensor& z,
                                                      const at::Tensor& indices,
                                                      int64_t num_codes) {
  check_code_stats_inputs(z, indices, num_codes);
  TORCH_CHECK(z.is_cuda(), "vq_code_stats_cuda: z must be a CUDA tensor");
  TORCH_CHECK(indices.device() == z.device(), "vq_code_stats: z is on ", z.device(),
              " but indices is on ", indices.device());
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t N = z.size(0), D = z.size(1);
  auto counts = at::zeros({num_codes}, z.options().dtype(at::kFloat));
  auto sums = at::zeros({num_codes, D}, z.options().dtype(at::kFloat));
  if (N == 0) return {counts, sums};
  const at::Tensor z_c = z.contiguous();
  const at::Tensor indices_c = indices.contiguous();
  C10_CUDA_CHECK(vq_cuda::launch_code_stats(
      z_c.data_ptr(), cuda_dtype(z.scalar_type()), indices_c.data_ptr<int64_t>(), N, num_codes, D,
      counts.data_ptr<float>(), sums.data_ptr<float>(), at::cuda::getCurrentCUDAStream()));
  return {counts, sums};
}

// _vq_cuda_kernel_image: whether GPU `device` can run the kernels of vq_cuda.cu. Returns the CUDA
// error of looking one up (0: yes; cudaErrorNoKernelImageForDevice or
// cudaErrorInvalidDeviceFunction: they were compiled for other architectures) and the
// architectures they were compiled for (800 for compute_80). eegfast/ops/_backend.py asks
// before it chooses the cuda backend: else every op failed with "no kernel image is available
// for execution on the device" instead of falling back to Triton or the reference.
std::tuple<int64_t, std::vector<int64_t>> vq_cuda_kernel_image(int64_t device) {
  TORCH_CHECK(device >= 0 && device < c10::cuda::device_count(), "_vq_cuda_kernel_image: device ",
              device, " is not a CUDA device index (", int(c10::cuda::device_count()),
              " devices)");
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const int64_t status = static_cast<int64_t>(vq_cuda::kernel_image_status());
  int archs[32];
  const int count = std::min(vq_cuda::compiled_archs(archs, 32), 32);
  return {status, std::vector<int64_t>(archs, archs + count)};
}

}  // namespace
}  // namespace eegfast

TORCH_LIBRARY_IMPL(eegfast, CUDA, m) {
  m.impl("vq_nearest", &eegfast::vq_nearest_cuda);
  m.impl("vq_code_stats", &eegfast::vq_code_stats_cuda);
}

// Not an op on tensors (no dispatch key): registered as a plain function, for every key.
TORCH_LIBRARY_FRAGMENT(eegfast, m) {
  m.def("_vq_cuda_kernel_image(int device) -> (int, int[])", &eegfast::vq_cuda_kernel_image);
}
