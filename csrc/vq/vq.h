// Argument checks and metric parsing shared by the CPU and CUDA bindings of the VQ ops.
#pragma once
#include <ATen/ATen.h>

#include <limits>
#include <string>

namespace eegfast {

enum class Metric { kCosine, kL2 };

inline Metric parse_metric(c10::string_view metric) {
  if (metric == "cosine") return Metric::kCosine;
  if (metric == "l2") return Metric::kL2;
  TORCH_CHECK(false, "vq_nearest: metric must be 'cosine' or 'l2', got '", std::string(metric),
              "'");
}

inline void check_vq_inputs(const at::Tensor& z, const at::Tensor& codebook) {
  TORCH_CHECK(z.dim() == 2, "vq_nearest: z must have shape (N, D), got ", z.sizes());
  TORCH_CHECK(codebook.dim() == 2, "vq_nearest: codebook must have shape (K, D), got ",
              codebook.sizes());
  TORCH_CHECK(codebook.size(0) > 0, "vq_nearest: codebook is empty (K = 0)");
  TORCH_CHECK(z.size(1) == codebook.size(1), "vq_nearest: z has D = ", z.size(1),
              " but codebook has D = ", codebook.size(1));
  TORCH_CHECK(z.size(1) > 0, "vq_nearest: D must be positive");
  TORCH_CHECK(z.scalar_type() == codebook.scalar_type(), "vq_nearest: z is ", z.scalar_type(),
              " but codebook is ", codebook.scalar_type(), "; pass both in one dtype");
  const auto dtype = z.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "vq_nearest: z must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(z.device() == codebook.device(), "vq_nearest: z is on ", z.device(),
              " but codebook is on ", codebook.device());
  TORCH_CHECK(codebook.size(0) <= std::numeric_limits<int32_t>::max(),
              "vq_nearest: codebook has more than 2^31 codes");
}

inline void check_code_stats_inputs(const at::Tensor& z, const at::Tensor& indices,
                                    int64_t num_codes) {
  TORCH_CHECK(z.dim() == 2, "vq_code_stats: z must have shape (N, D), got ", z.sizes());
  TORCH_CHECK(indices.dim() == 1 && indices.size(0) == z.size(0),
              "vq_code_stats: indices must have shape (N,) = (", z.size(0), ",), got ",
              indices.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kLong, "vq_code_stats: indices must be int64, got ",
              indices.scalar_type());
  TORCH_CHECK(num_codes > 0, "vq_code_stats: num_codes must be positive, got ", num_codes);
  const auto dtype = z.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "vq_code_stats: z must be float32, float16 or bfloat16, got ", dtype);
}

}  // namespace eegfast
