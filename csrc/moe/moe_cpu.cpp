// Top-k Mixture-of-Experts: op schemas and the CPU kernels.
//
// Data flow (names as in eegfast/ops/moe.py). A token slot s = t * k + i is the i-th expert
// choice of token t. moe_dispatch sorts the slots by expert (stably, so each expert sees its
// tokens in order); moe_expert_ffn runs every expert's two-layer GELU MLP on its group of rows
// of that order; moe_combine sums each token's k expert outputs weighted by its gates.
//
// CPU strategy: dispatch is an exact O(T k + E) counting sort (no comparison sort). The expert
// GEMMs go to BLAS (at::addmm per expert group, written straight into slices of the outputs);
// the win over a Python loop is one call for all experts, one gather of the input rows and
// no per-expert temporaries. Combine and the gradient gather-sums are hand-written loops that
// accumulate in fp32 (fp64 for fp64), parallel over tokens.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "moe/moe.h"

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace eegfast {
namespace {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

constexpr int64_t kChunkRows = 256;  // rows per work item of the forward expert GEMMs

// Tokens per parallel chunk: at least ~16K multiply-adds, so small batches stay on one thread
// (an OpenMP region costs more than they do, and much more on a busy machine).
int64_t token_grain(int64_t k, int64_t D) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, k * D));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_dispatch_cpu(
    const at::Tensor& expert_idx, int64_t num_experts) {
  check_moe_dispatch_inputs(expert_idx, num_experts);
  TORCH_CHECK(expert_idx.device().is_cpu(), "moe_dispatch_cpu: expert_idx must be a CPU tensor");
  const at::Tensor idx = expert_idx.contiguous();
  const int64_t S = idx.numel();
  const auto long_opts = idx.options();
  at::Tensor counts = at::zeros({num_experts}, long_opts);
  at::Tensor offsets = at::empty({num_experts + 1}, long_opts);
  at::Tensor sorted_slots = at::empty({S}, long_opts);
  at::Tensor slot_pos = at::empty({S}, long_opts);
  const int64_t* e_of = idx.data_ptr<int64_t>();
  int64_t* count = counts.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s) {
    const int64_t e = e_of[s];
    TORCH_CHECK_VALUE(e >= 0 && e < num_experts, "moe_dispatch: expert_idx holds ", e,
                      ", outside [0, num_experts = ", num_experts, ")");
    ++count[e];
  }
  int64_t* offset = offsets.data_ptr<int64_t>();
  std::vector<int64_t> cursor(num_experts);
  offset[0] = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    cursor[e] = offset[e];
    offset[e + 1] = offset[e] + count[e];
  }
  int64_t* sorted = sorted_slots.data_ptr<int64_t>();
  int64_t* pos = slot_pos.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s) {  // in slot order: stable
    const int64_t p = cursor[e_of[s]]++;
    sorted[p] = s;
    pos[s] = p;
  }
  return {counts, offsets, sorted_slots, slot_pos};
}

// out[t, :] = sum_i w(t, i) * src[slot_pos[t * k + i], :], w = gates or 1. out: (T, D).
template <typename scalar_t, typename gate_t>
void gather_sum(const scalar_t* src, int64_t src_stride, const gate_t* gates,
                const int64_t* slot_pos, int64_t T, int64_t k, int64_t D, scalar_t* out) {
  using acc = acc_t<scalar_t>;
  at::parallel_for(0, T, token_grain(k, D), [&](int64_t begin, int64_t end) {
    std::vector<acc> row(D);
    for (int64_t t = begin; t < end; ++t) {
      std::fill(row.begin(), row.end(), acc(0));
      for (int64_t i = 0; i < k; ++i) {
        const int64_t pos = slot_pos[t * k + i];
        if (pos < 0) continue;  // -1: a slot whose expert index was out of range (no row)
        const acc w = gates ? static_cast<acc>(gates[t * k + i]) : acc(1);
        const scalar_t* y = src + pos * src_stride;
        for (int64_t d = 0; d < D; ++d) row[d] += w * static_cast<acc>(y[d]);
      }
      for (int64_t d = 0; d < D; ++d) out[t * D + d] = static_cast<scalar_t>(row[d]);
    }
  });
}

// The kernels index rows of y by slot_pos without bounds checks in their loops: checked here
// once, serially (O(T k), nothing beside the GEMMs), so that a direct op call or a compiled
// graph (where eegfast.ops.moe_combine skips its own check) gets an error, not a wild read or
// write. `distinct`: the backward stores (not adds) one gradient row per slot, so a row named
// twice would lose gradient.
void check_slot_positions(const at::Tensor& pos, int64_t rows, bool distinct, const char* op) {
  const int64_t* p = pos.data_ptr<int64_t>();
  std::vector<uint8_t> seen(distinct ? rows : 0, 0);
  for (int64_t s = 0; s < pos.numel(); ++s) {
    TORCH_CHECK(p[s] >= -1 && p[s] < rows, op, ": slot_pos[", s, "] = ", p[s],
                " is outside [-1, ", rows, ") (rows of y)");
    if (distinct && p[s] >= 0) {
      TORCH_CHECK(!seen[p[s]], op, ": slot_pos names row ", p[s],
                  " twice (it must come from moe_dispatch: one slot per row)");
      seen[p[s]] = 1;
    }
  }
}

at::Tensor gather_sum_tensor(const at::Tensor& src, const at::Tensor* gates,
                             const at::Tensor& slot_pos, int64_t T, int64_t k) {
  const at::Tensor src_c = src.stride(1) == 1 ? src : src.contiguous();
  const at::Tensor pos = slot_pos.contiguous();
  check_slot_positions(pos, src.size(0), /*distinct=*/false, "moe_combine");
  const int64_t D = src.size(1);
  at::Tensor out = at::empty({T, D}, src.options());
  if (T == 0 || D == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "moe_gather", [&] {
    using value_t = scalar_t;
    if (gates == nullptr) {
      gather_sum<value_t, float>(src_c.data_ptr<value_t>(), src_c.stride(0), nullptr,
                                 pos.data_ptr<int64_t>(), T, k, D, out.data_ptr<value_t>());
      return;
    }
    const at::Tensor g = gates->contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "moe_gates", [&] {
      gather_sum<value_t, scalar_t>(src_c.data_ptr<value_t>(), src_c.stride(0),
                                    g.data_ptr<scalar_t>(), pos.data_ptr<int64_t>(), T, k, D,
                                    out.data_ptr<value_t>());
    });
  });
  return out;
}

// offsets on the host, checked: 0, non-decreasing, at most S = T * top_k (the rows the
// kernels narrow to; past S the backward's narrow failed with a message naming no argument).
std::vector<int64_t> offsets_on_host(const at::Tensor& offsets, int64_t S, const char* op) {
  const at::Tensor o = offsets.to(at::kCPU).contiguous();
  const int64_t* p = o.data_ptr<int64_t>();
  std::vector<int64_t> host(p, p + o.numel());
  TORCH_CHECK(host[0] == 0, op, ": offsets[0] must be 0, got ", host[0]);
  for (size_t e = 0; e + 1 < host.size(); ++e)
    TORCH_CHECK(host[e] <= host[e + 1], op, ": offsets must be non-decreasing, got offsets[", e,
                "] = ", host[e], " > offsets[", e + 1, "] = ", host[e + 1]);
  TORCH_CHECK(host.back() <= S, op, ": offsets[E] = ", host.back(), " > T * top_k = ", S);
  return host;
}

// The forward gathers x[sorted_slots // top_k] by index_select, whose out-of-range error
// names no argument: checked here once, serially (O(T k)), as eegfast.ops.moe_expert_ffn does
// in eager mode, so that a compiled graph (where it skips its check) or a direct op call says
// which argument is wrong.
void check_sorted_slots(const at::Tensor& sorted_slots) {
  const at::Tensor ss = sorted_slots.contiguous();
  const int64_t* slot = ss.data_ptr<int64_t>();
  const int64_t S = ss.numel();
  for (int64_t j = 0; j < S; ++j)
    TORCH_CHECK(slot[j] >= 0 && slot[j] < S, "moe_expert_ffn: sorted_slots[", j, "] = ",
                slot[j], " is outside [0, T * top_k = ", S, ") (token slots)");
}

// Rows of x in expert-sorted order: x[sorted_slots // top_k]. One gather for all experts.
at::Tensor gather_sorted_rows(const at::Tensor& x, const at::Tensor& sorted_slots,
                              int64_t top_k) {
  return x.index_select(0, top_k == 1 ? sorted_slots : sorted_slots.div(top_k, "floor"));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_expert_ffn_cpu(
    const at::Tensor& x, const at::Tensor& sorted_slots, const at::Tensor& offsets,
    const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
    int64_t top_k) {
  check_moe_ffn_inputs(x, sorted_slots, offsets, w1, b1, w2, b2, top_k);
  const int64_t S = sorted_slots.size(0), E = w1.size(0), H = w1.size(1), Dout = w2.size(1);
  const std::vector<int64_t> offset = offsets_on_host(offsets, S, "moe_expert_ffn");
  check_sorted_slots(sorted_slots);
  at::Tensor y = at::empty({S, Dout}, x.options());
  at::Tensor a1 = at::empty({S, H}, x.options());
  at::Tensor h = at::empty({S, H}, x.options());
  if (offset[E] < S) {  // rows past the last expert (dropped slots) produce zeros
    y.narrow(0, offset[E], S - offset[E]).zero_();
    a1.narrow(0, offset[E], S - offset[E]).zero_();
    h.narrow(0, offset[E], S - offset[E]).zero_();
  }
  if (offset[E] == offset[0]) return {y, a1, h};
  // Work items of at most kChunkRows rows of one expert, run in parallel with single-threaded
  // GEMMs: fc1 -> GELU -> fc2 of a chunk stays in cache (the dense FFN streams its whole
  // (T, H) activation through memory twice), and small per-expert GEMMs do not pay for
  // splitting each one over threads.
  std::vector<std::pair<int64_t, int64_t>> chunks;  // (expert, first row)
  for (int64_t e = 0; e < E; ++e)
    for (int64_t lo = offset[e]; lo < offset[e + 1]; lo += kChunkRows) chunks.emplace_back(e, lo);
  const at::Tensor tokens = top_k == 1 ? sorted_slots : sorted_slots.div(top_k, "floor");
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    // Worker threads do not inherit the caller's dispatch state: keep autograd out, as it is
    // on the calling thread inside a kernel.
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t c = begin; c < end; ++c) {
      const auto [e, lo] = chunks[c];
      const int64_t n = std::min(kChunkRows, offset[e + 1] - lo);
      const at::Tensor xs = x.index_select(0, tokens.narrow(0, lo, n));
      at::Tensor a1_c = a1.narrow(0, lo, n), h_c = h.narrow(0, lo, n), y_c = y.narrow(0, lo, n);
      at::addmm_out(a1_c, b1[e], xs, w1[e].t());
      at::gelu_out(h_c, a1_c);
      at::addmm_out(y_c, b2[e], h_c, w2[e].t());
    }
  });
  return {y, a1, h};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_expert_ffn_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& sorted_slots,
    const at::Tensor& offsets, const at::Tensor& slot_pos, const at::Tensor& w1,
    const at::Tensor& w2, const at::Tensor& a1, const at::Tensor& h, int64_t top_k) {
  const int64_t S = sorted_slots.size(0), E = w1.size(0), H = w1.size(1), D = x.size(1);
  const int64_t Dout = w2.size(1), T = x.size(0);
  check_moe_ffn_inputs(x, sorted_slots, offsets, w1, at::empty({E, H}, w1.options()), w2,
                       at::empty({E, Dout}, w2.options()), top_k);
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == S && grad_y.size(1) == Dout,
              "moe_expert_ffn_bwd: grad_y must have shape (T * top_k, D_out) = (", S, ", ", Dout,
              "), got ", grad_y.sizes());
  TORCH_CHECK(a1.sizes() == h.sizes() && a1.size(0) == S && a1.size(1) == H,
              "moe_expert_ffn_bwd: a1 and h must have shape (T * top_k, H)");
  TORCH_CHECK(slot_pos.dim() == 1 && slot_pos.size(0) == S && slot_pos.scalar_type() == at::kLong,
              "moe_expert_ffn_bwd: slot_pos must be int64 of shape (T * top_k,) = (", S,
              ",), got ", slot_pos.sizes());
  {
    // dx gathers each slot's row through slot_pos: it must invert sorted_slots (a slot listed
    // twice, or not at all, would lose or misplace gradient)
    const at::Tensor ss = sorted_slots.contiguous(), sp = slot_pos.contiguous();
    const int64_t *order = ss.data_ptr<int64_t>(), *where = sp.data_ptr<int64_t>();
    for (int64_t j = 0; j < S; ++j)
      TORCH_CHECK(order[j] >= 0 && order[j] < S && where[order[j]] == j,
                  "moe_expert_ffn_bwd: sorted_slots must be a permutation of [0, T * top_k) and "
                  "slot_pos its inverse (as moe_dispatch gives them); they disagree at ", j);
  }
  const std::vector<int64_t> offset = offsets_on_host(offsets, S, "moe_expert_ffn_bwd");
  at::Tensor dy = grad_y.to(x.scalar_type());
  at::Tensor dx_sorted = at::zeros({S, D}, x.options());
  at::Tensor dw1 = at::zeros_like(w1, at::MemoryFormat::Contiguous);
  at::Tensor db1 = at::zeros({E, H}, w1.options());
  at::Tensor dw2 = at::zeros_like(w2, at::MemoryFormat::Contiguous);
  at::Tensor db2 = at::zeros({E, Dout}, w2.options());
  if (offset[E] > offset[0]) {
    const at::Tensor xs = gather_sorted_rows(x, sorted_slots.narrow(0, 0, offset[E]), top_k);
    for (int64_t e = 0; e < E; ++e) {
      const int64_t lo = offset[e], n = offset[e + 1] - offset[e];
      if (n == 0) continue;
      const at::Tensor dy_e = dy.narrow(0, lo, n);
      at::Tensor dw2_e = dw2[e], dw1_e = dw1[e], dx_e = dx_sorted.narrow(0, lo, n);
      at::mm_out(dw2_e, dy_e.t(), h.narrow(0, lo, n));
      db2[e].copy_(dy_e.sum(0));
      const at::Tensor da1 = at::gelu_backward(dy_e.mm(w2[e]), a1.narrow(0, lo, n));
      at::mm_out(dw1_e, da1.t(), xs.narrow(0, lo, n));
      db1[e].copy_(da1.sum(0));
      at::mm_out(dx_e, da1, w1[e]);
    }
  }
  at::Tensor dx = gather_sum_tensor(dx_sorted, nullptr, slot_pos, T, top_k);
  return {dx, dw1, db1, dw2, db2};
}

at::Tensor moe_combine_cpu(const at::Tensor& y, const at::Tensor& gates,
                           const at::Tensor& slot_pos) {
  check_moe_combine_inputs(y, gates, slot_pos);
  return gather_sum_tensor(y, &gates, slot_pos, gates.size(0), gates.size(1));
}

// grad_y[slot_pos[s]] = gates[s] * grad_out[t], grad_gates[s] = <grad_out[t], y[slot_pos[s]]>.
template <typename scalar_t, typename gate_t>
void combine_bwd(const scalar_t* grad_out, const scalar_t* y, const gate_t* gates,
                 const int64_t* slot_pos, int64_t T, int64_t k, int64_t D, scalar_t* grad_y,
                 gate_t* grad_gates) {
  using acc = acc_t<scalar_t>;
  at::parallel_for(0, T, token_grain(k, D), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const scalar_t* go = grad_out + t * D;
      for (int64_t i = 0; i < k; ++i) {
        const int64_t s = t * k + i, row = slot_pos[s];
        if (row < 0) {  // no row (see gather_sum): nothing read, nothing to differentiate
          grad_gates[s] = gate_t(0);
          continue;
        }
        const acc g = static_cast<acc>(gates[s]);
        const scalar_t* ys = y + row * D;
        scalar_t* gy = grad_y + row * D;
        acc dot = 0;
        for (int64_t d = 0; d < D; ++d) {
          const acc gd = static_cast<acc>(go[d]);
          dot += gd * static_cast<acc>(ys[d]);
          gy[d] = static_cast<scalar_t>(g * gd);
        }
        grad_gates[s] = static_cast<gate_t>(dot);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> moe_combine_bwd_cpu(const at::Tensor& grad_out,
                                                       const at::Tensor& y,
                                                       const at::Tensor& gates,
                                                       const at::Tensor& slot_pos) {
  check_moe_combine_inputs(y, gates, slot_pos);
  const int64_t T = gates.size(0), k = gates.size(1), D = y.size(1);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == T && grad_out.size(1) == D,
              "moe_combine_bwd: grad_out must have shape (T, D) = (", T, ", ", D, "), got ",
              grad_out.sizes());
  const at::Tensor go = grad_out.to(y.scalar_type()).contiguous();
  const at::Tensor y_c = y.contiguous(), g_c = gates.contiguous(), pos = slot_pos.contiguous();
  check_slot_positions(pos, y.size(0), /*distinct=*/true, "moe_combine_bwd");
  // Rows of y that no slot points to (none when slot_pos is a permutation) get zero gradient.
  at::Tensor grad_y = at::zeros_like(y_c);
  at::Tensor grad_gates = at::empty_like(g_c);
  if (T == 0 || k == 0) return {grad_y, grad_gates};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "moe_combine", [&] {
    using value_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g_c.scalar_type(), "gates", [&] {
      combine_bwd<value_t, scalar_t>(go.data_ptr<value_t>(), y_c.data_ptr<value_t>(),
                                     g_c.data_ptr<scalar_t>(), pos.data_ptr<int64_t>(), T, k, D,
                                     grad_y.data_ptr<value_t>(), grad_gates.data_ptr<scalar_t>());
    });
  });
  return {grad_y, grad_gates};
}

}  // namespace
}  // namespace eegfast

TORCH_LIBRARY_FRAGMENT(eegfast, m) {
  m.def("moe_dispatch(Tensor expert_idx, int num_experts) -> "
        "(Tensor counts, Tensor offsets, Tensor sorted_slots, Tensor slot_pos)");
  m.def("moe_expert_ffn(Tensor x, Tensor sorted_slots, Tensor offsets, Tensor w1, Tensor b1, "
        "Tensor w2, Tensor b2, int top_k) -> (Tensor y, Tensor a1, Tensor h)");
  m.def("moe_expert_ffn_bwd(Tensor grad_y, Tensor x, Tensor sorted_slots, Tensor offsets, "
        "Tensor slot_pos, Tensor w1, Tensor w2, Tensor a1, Tensor h, int top_k) -> "
        "(Tensor dx, Tensor dw1, Tensor db1, Tensor dw2, Tensor db2)");
  m.def("moe_combine(Tensor y, Tensor gates, Tensor slot_pos) -> Tensor");
  m.def("moe_combine_bwd(Tensor grad_out, Tensor y, Tensor gates, Tensor slot_pos) -> "
        "(Tensor grad_y, Tensor grad_gates)");
}

TORCH_LIBRARY_IMPL(eegfast, CPU, m) {
  m.impl("moe_dispatch", &eegfast::moe_dispatch_cpu);
  m.impl("moe_expert_ffn", &eegfast::moe_expert_ffn_cpu);
  m.impl("moe_expert_ffn_bwd", &eegfast::moe_expert_ffn_bwd_cpu);
  m.impl("moe_combine", &eegfast::moe_combine_cpu);
  m.impl("moe_combine_bwd", &eegfast::moe_combine_bwd_cpu);
}
