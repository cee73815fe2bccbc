// Argument checks shared by the CPU and CUDA bindings of the MoE ops (schemas: moe_cpu.cpp).
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <limits>

namespace eegfast {

constexpr int64_t kMoeMaxExperts = 64;  // the fused CUDA dispatch keeps per-expert state in smem

inline void check_moe_dispatch_inputs(const at::Tensor& expert_idx, int64_t num_experts) {
  TORCH_CHECK(expert_idx.dim() == 2, "moe_dispatch: expert_idx must have shape (T, k), got ",
              expert_idx.sizes());
  TORCH_CHECK(expert_idx.scalar_type() == at::kLong, "moe_dispatch: expert_idx must be int64, got ",
              expert_idx.scalar_type());
  TORCH_CHECK(num_experts >= 1 && num_experts <= kMoeMaxExperts + 1,
              "moe_dispatch: num_experts must be in [1, ", kMoeMaxExperts + 1, "], got ",
              num_experts);
  TORCH_CHECK(expert_idx.size(1) >= 1, "moe_dispatch: top_k (expert_idx.size(1)) must be >= 1");
  TORCH_CHECK(expert_idx.numel() < std::numeric_limits<int32_t>::max(),
              "moe_dispatch: more than 2^31 - 1 token slots");
}

inline void check_moe_ffn_inputs(const at::Tensor& x, const at::Tensor& sorted_slots,
                                 const at::Tensor& offsets, const at::Tensor& w1,
                                 const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                                 int64_t top_k) {
  TORCH_CHECK(x.dim() == 2, "moe_expert_ffn: x must have shape (T, D), got ", x.sizes());
  TORCH_CHECK(w1.dim() == 3, "moe_expert_ffn: w1 must have shape (E, H, D), got ", w1.sizes());
  const int64_t E = w1.size(0), H = w1.size(1), D = x.size(1);
  TORCH_CHECK(w1.size(2) == D, "moe_expert_ffn: w1 has D = ", w1.size(2), " but x has D = ", D);
  TORCH_CHECK(w2.dim() == 3 && w2.size(0) == E && w2.size(2) == H,
              "moe_expert_ffn: w2 must have shape (E, D_out, H) = (", E, ", D_out, ", H,
              "), got ", w2.sizes());
  TORCH_CHECK(b1.dim() == 2 && b1.size(0) == E && b1.size(1) == H,
              "moe_expert_ffn: b1 must have shape (E, H) = (", E, ", ", H, "), got ", b1.sizes());
  TORCH_CHECK(b2.dim() == 2 && b2.size(0) == E && b2.size(1) == w2.size(1),
              "moe_expert_ffn: b2 must have shape (E, D_out) = (", E, ", ", w2.size(1),
              "), got ", b2.sizes());
  TORCH_CHECK(top_k >= 1, "moe_expert_ffn: top_k must be >= 1, got ", top_k);
  TORCH_CHECK(sorted_slots.dim() == 1 && sorted_slots.size(0) == x.size(0) * top_k,
              "moe_expert_ffn: sorted_slots must have shape (T * top_k,) = (", x.size(0) * top_k,
              ",), got ", sorted_slots.sizes());
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) == E + 1,
              "moe_expert_ffn: offsets must have shape (E + 1,) = (", E + 1, ",), got ",
              offsets.sizes());
  TORCH_CHECK(sorted_slots.scalar_type() == at::kLong && offsets.scalar_type() == at::kLong,
              "moe_expert_ffn: sorted_slots and offsets must be int64");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
                  dtype == at::kDouble,
              "moe_expert_ffn: x must be float64, float32, float16 or bfloat16, got ", dtype);
  for (const at::Tensor* t : {&w1, &b1, &w2, &b2})
    TORCH_CHECK(t->scalar_type() == dtype, "moe_expert_ffn: x is ", dtype,
                " but a weight or bias is ", t->scalar_type(), "; pass all in one dtype");
}

inline void check_moe_combine_inputs(const at::Tensor& y, const at::Tensor& gates,
                                     const at::Tensor& slot_pos) {
  TORCH_CHECK(y.dim() == 2, "moe_combine: y must have shape (T * k, D), got ", y.sizes());
  TORCH_CHECK(gates.dim() == 2, "moe_combine: gates must have shape (T, k), got ",
              gates.sizes());
  TORCH_CHECK(y.size(0) == gates.numel(), "moe_combine: y has ", y.size(0),
              " rows but gates has T * k = ", gates.numel(), " slots");
  TORCH_CHECK(slot_pos.dim() == 1 && slot_pos.size(0) == gates.numel(),
              "moe_combine: slot_pos must have shape (T * k,) = (", gates.numel(), ",), got ",
              slot_pos.sizes());
  TORCH_CHECK(slot_pos.scalar_type() == at::kLong, "moe_combine: slot_pos must be int64");
  TORCH_CHECK(at::isFloatingType(y.scalar_type()) && at::isFloatingType(gates.scalar_type()),
              "moe_combine: y and gates must be floating point");
}

}  // namespace eegfast
