// Fused QK-LayerNorm attention on CPU: LayerNorm of q and k over the head dim, then scaled
// softmax attention with key padding / causal / block-causal masks, forward and backward.
//
// Memory: O(N * D) scratch per (batch, head); the (N, N) scores are never formed. The backward
// recomputes the probabilities of each key block from the saved logsumexp (flash-attention
// style) and accumulates dq, dk, dv, then applies the LayerNorm backward with the saved
// (mean, rstd).
//
// Forward: query tiles of 3 vectors of queries, one query per vector lane (queries
// transposed, (D, 3 L)); each key block's scores are formed by broadcasting key elements,
// exponentiated (without any shift where a per-query bound allows, see kUnshiftedScoreLimit),
// and multiplied into the transposed output accumulators by broadcasting value elements.
// Neither the head dim nor the key count is padded to a vector, and the softmax sums are
// lane-wise. Tiles whose bound is too large fall back to row tiles with an online maximum
// (running max m, running sum l, rescaled accumulators).
//
// Layouts per (batch, head), in the accumulation type T (float; double for float64 inputs):
// - normalised keys in panels (P, D, W): W = two vectors of keys, so one FMA scores a query
//   against W keys (row tiles) and a forward micro-tile finds its keys at fixed offsets;
// - rows (N_pad, Dv), Dv = D rounded up to a vector: the fallback row tiles and the backward's
//   per-row data; the forward reads the values as v's own rows when those are whole float
//   vectors (a padded copy otherwise);
// - the backward's keys and values in panels too, the key panels times the softmax scale.
// LayerNorms run lane-wise on the transposed layouts (one row per lane).
// Kernels are written with GCC vector extensions in qk_norm_attention_kernels.h, included
// once per vector width (in its own translation unit), and compiled three times, picked at run time: AVX-512 (512-bit
// vectors, 8-row tiles: the 32 vector registers hold 8 x 3 accumulators), AVX2+FMA (256-bit,
// 4-row tiles) and generic (256-bit). EEGFAST_CPU_ISA=avx512|avx2|generic caps the choice
// (tests). On CPUs with AMX (and the OS's permission to use it), the forward of bf16 inputs runs
// its products on the tile unit instead (qk_norm_attention_amx.h).
// 512-bit vectors: cores with two 512-bit FMA units (most Xeons since Skylake-SP) do twice
// the work per FMA instruction; PyTorch's own CPU kernels use them there too. Going from
// 256-bit vectors to these (with the backward order below) made the forward at
// (8, 10, 257, 20) 1.4x and the backward 1.2x faster on one core of a Xeon (Emerald Rapids).
//
// Backward: per group of query rows (kBackwardGroupRows), key block by key block, each
// block's row tiles in turn (flash-attention-2 order), so a key block's data stays in L1.
//
// Work split: the forward runs one task per (batch, head, query chunk); so does the backward,
// each task then finishing the key LayerNorm backward of its (batch, head) from its own dK / dV
// sums. Chunks are used only when there are fewer (batch, head) pairs than threads; then the
// chunks' dK / dV partial sums are reduced in a second pass. Parameter gradients are summed
// from per-task partials (no atomics, no shared accumulators).
//
// Files: this one holds the op (checks, output pool, instruction-set choice, registration);
// qk_norm_attention_kernels.h the kernels, compiled once per vector width in
// qk_norm_attention_v256.cpp and qk_norm_attention_v512.cpp (+ qk_norm_attention_amx.h);
// qk_norm_attention_cpu.h what they share.
#include "qk_norm_attention/qk_norm_attention_cpu.h"

namespace eegfast {
namespace qk_attention {
namespace {

#if defined(__x86_64__)
const bool kHasAvx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
const bool kHasAvx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");

// AMX-TILE, AMX-BF16 and AVX512-BF16 (CPUID leaf 7), and Linux's permission for this process to
// use the tile data (arch_prctl ARCH_REQ_XCOMP_PERM, which oneDNN asks for too). Asked once, on
// first use.
bool amx_usable() {
  static const bool usable = [] {
    unsigned eax, ebx, ecx, edx;
    if (!kHasAvx512 || !__builtin_cpu_supports("avx512bw")) return false;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    const bool amx_bf16 = edx & (1u << 22), amx_tile = edx & (1u << 24);
    if (!__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx)) return false;
    const bool avx512_bf16 = eax & (1u << 5);
    if (!(amx_bf16 && amx_tile && avx512_bf16)) return false;
#if defined(__linux__)
    constexpr long kRequestPermission = 0x1023, kTileData = 18;
    return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
#else
    return false;
#endif
  }();
  return usable;
}
#endif

// The best instance this CPU runs; EEGFAST_CPU_ISA=amx, avx512, avx2 or generic caps it (read on
// every call, so tests can run every instance on one machine).
Isa cpu_isa() {
  Isa best = Isa::kGeneric;
#if defined(__x86_64__)
  best = kHasAvx512 ? (amx_usable() ? Isa::kAmx : Isa::kAvx512)
         : kHasAvx2 ? Isa::kAvx2
                    : Isa::kGeneric;
#endif
  const char* cap = std::getenv("EEGFAST_CPU_ISA");
  if (cap == nullptr || *cap == '\0') return best;
  const std::string name(cap);
  TORCH_CHECK_VALUE(name == "amx" || name == "avx512" || name == "avx2" || name == "generic",
                    "EEGFAST_CPU_ISA must be 'amx', 'avx512', 'avx2' or 'generic', got '", name,
                    "'");
  const Isa wanted = name == "amx"      ? Isa::kAmx
                     : name == "avx512" ? Isa::kAvx512
                     : name == "avx2"   ? Isa::kAvx2
                                        : Isa::kGeneric;
  return std::min(best, wanted);
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAmx: return "amx";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "generic";
  }
}

// ---- output memory ------------------------------------------------------------------------

// The large outputs (out; dq, dk, dv) come from this allocator, which keeps freed blocks for
// the next call of the same size instead of handing them back to the C library. Depending on
// what else the process allocates, glibc gives a freed block of a few MB back to the kernel
// (heap trim or munmap), and the next call's writes then fault every page in again: at
// (8, 10, 257, 20), 2 threads, Zen 4, the backward op called alone in a loop took ~900 page
// faults per call, ~19% of its time (autograd forward + backward in a loop: ~280, ~2%; with
// other work in between, often none). The pool holds at most EEGFAST_CPU_POOL_MB (default 64;
// 0 keeps nothing; read whenever a block comes back); blocks are reused only for the same
// rounded size. release() empties it. Leaked on purpose: tensors may outlive static
// destruction at exit.
class OutputPool final : public c10::Allocator {
 public:
  static OutputPool& get() {
    static OutputPool* pool = new OutputPool();
    return *pool;
  }

  c10::DataPtr allocate(size_t n) override {
    limit_bytes();  // a bad EEGFAST_CPU_POOL_MB fails here, where an error can be raised
    const size_t bytes = (std::max<size_t>(n, 1) + kGranule - 1) / kGranule * kGranule;
    void* base = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(bytes);
      if (it != free_.end() && !it->second.empty()) {
        base = it->second.back();
        it->second.pop_back();
        cached_ -= bytes;
      }
    }
    // a header line before the data holds the block's size for the deleter
    if (base == nullptr) base = c10::alloc_cpu(bytes + kHeader);
    char* data = static_cast<char*>(base) + kHeader;
    unpoison(base, kHeader + bytes);
    *static_cast<size_t*>(base) = bytes;
    poison(base, kHeader);                 // a kernel's store before the data or past its n
    poison(data + n, bytes - n);           // bytes is caught there, not only past the block
    return {data, base, &give_back, c10::Device(c10::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  int64_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(cached_);
  }

  void release() {
    std::unordered_map<size_t, std::vector<void*>> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(free_);
      cached_ = 0;
    }
    for (auto& [bytes, list] : blocks)
      for (void* base : list) {
        unpoison(base, kHeader + bytes);
        c10::free_cpu(base);
      }
  }

 private:
  static constexpr size_t kGranule = 4096;  // a page
  static constexpr size_t kHeader = 64;     // keeps the data 64-byte aligned

  // Under AddressSanitizer (`make asan`) the header, the rounding slack and every cached block
  // are poisoned, so a store past a pooled tensor or into one already freed is reported as it
  // would be for memory from malloc. No-ops otherwise.
  static void poison(void* p, size_t n) {
#if defined(__SANITIZE_ADDRESS__)
    ASAN_POISON_MEMORY_REGION(p, n);
#else
    (void)p, (void)n;
#endif
  }
  static void unpoison(void* p, size_t n) {
#if defined(__SANITIZE_ADDRESS__)
    ASAN_UNPOISON_MEMORY_REGION(p, n);
#else
    (void)p, (void)n;
#endif
  }

  static size_t limit_bytes() {
    const char* env = std::getenv("EEGFAST_CPU_POOL_MB");
    if (env == nullptr || *env == '\0') return size_t(64) << 20;
    char* end = nullptr;
    const long long mb = std::strtoll(env, &end, 10);
    TORCH_CHECK_VALUE(end != env && *end == '\0' && mb >= 0,
                      "EEGFAST_CPU_POOL_MB must be a whole number of MB >= 0, got '", env, "'");
    return static_cast<size_t>(mb) << 20;
  }

  static void give_back(void* base) {
    OutputPool& pool = get();
    unpoison(base, kHeader);
    const size_t bytes = *static_cast<size_t*>(base);
    size_t limit = 0;
    try {
      limit = limit_bytes();
    } catch (...) {  // a deleter must not throw (allocate reports a bad setting)
    }
    {
      std::lock_guard<std::mutex> lock(pool.mutex_);
      if (pool.cached_ + bytes <= limit) {
        pool.free_[bytes].push_back(base);
        pool.cached_ += bytes;
        poison(base, kHeader + bytes);
        return;
      }
    }
    unpoison(base, kHeader + bytes);
    c10::free_cpu(base);
  }

  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> free_;  // by rounded size
  size_t cached_ = 0;
};

// A contiguous CPU tensor from the pool.
at::Tensor pooled_empty(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::detail::empty_generic(sizes, &OutputPool::get(),
                                   c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   c10::nullopt);
}

at::ScalarType accumulation_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

c10::optional<at::Tensor> as_accumulation(const c10::optional<at::Tensor>& t,
                                          at::ScalarType acc) {
  if (!t.has_value()) return c10::nullopt;
  return t->to(acc).contiguous();
}

Prepared prepare_optional(at::ScalarType acc, const c10::optional<at::Tensor>& q_w,
                          const c10::optional<at::Tensor>& q_b,
                          const c10::optional<at::Tensor>& k_w,
                          const c10::optional<at::Tensor>& k_b,
                          const c10::optional<at::Tensor>& key_padding_mask,
                          const c10::optional<at::Tensor>& block_ids) {
  Prepared out{as_accumulation(q_w, acc), as_accumulation(q_b, acc), as_accumulation(k_w, acc),
               as_accumulation(k_b, acc), c10::nullopt, c10::nullopt};
  if (key_padding_mask.has_value()) out.key_padding = key_padding_mask->contiguous();
  if (block_ids.has_value()) out.ids = block_ids->to(at::kLong).contiguous();
  return out;
}


// ---- argument checks ----------------------------------------------------------------------

void check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const c10::optional<at::Tensor>& q_w, const c10::optional<at::Tensor>& q_b,
                  const c10::optional<at::Tensor>& k_w, const c10::optional<at::Tensor>& k_b,
                  const c10::optional<at::Tensor>& key_padding_mask,
                  const c10::optional<at::Tensor>& block_ids) {
  TORCH_CHECK_VALUE(q.dim() == 4, op, ": q must have shape (B, H, N, D), got ", q.sizes());
  TORCH_CHECK_VALUE(k.sizes() == q.sizes(), op, ": k must have the shape of q ", q.sizes(),
                    ", got ", k.sizes());
  TORCH_CHECK_VALUE(v.sizes() == q.sizes(), op, ": v must have the shape of q ", q.sizes(),
                    ", got ", v.sizes());
  const int64_t B = q.size(0), N = q.size(2), D = q.size(3);
  TORCH_CHECK_VALUE(D >= 1 && D <= kMaxHeadDim, op, ": head dim D = ", D,
                    " is not supported: it must be in 1..", kMaxHeadDim);
  const auto dtype = q.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
                       dtype == at::kDouble,
                   op, ": q must be float32, float16, bfloat16 or float64, got ", dtype);
  TORCH_CHECK_TYPE(k.scalar_type() == dtype, op, ": q is ", dtype, " but k is ", k.scalar_type());
  TORCH_CHECK_TYPE(v.scalar_type() == dtype, op, ": q is ", dtype, " but v is ", v.scalar_type());
  for (const auto* t : {&q, &k, &v})
    TORCH_CHECK_VALUE(t->device().is_cpu(), op, ": q, k, v must be CPU tensors, got ",
                      t->device());
  const std::pair<const char*, const c10::optional<at::Tensor>*> params[] = {
      {"q_w", &q_w}, {"q_b", &q_b}, {"k_w", &k_w}, {"k_b", &k_b}};
  for (const auto& [name, param] : params) {
    if (!param->has_value()) continue;
    const at::Tensor& t = param->value();
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == D, op, ": ", name, " must have shape (D,) = (",
                      D, ",), got ", t.sizes());
    TORCH_CHECK_TYPE(t.is_floating_point(), op, ": ", name, " must be floating point, got ",
                     t.scalar_type());
    TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  }
  if (key_padding_mask.has_value()) {
    const at::Tensor& m = key_padding_mask.value();
    TORCH_CHECK_VALUE(m.dim() == 2 && m.size(0) == B && m.size(1) == N, op,
                      ": key_padding_mask must have shape (B, N) = (", B, ", ", N, "), got ",
                      m.sizes());
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool, op, ": key_padding_mask must be bool, got ",
                     m.scalar_type());
    TORCH_CHECK_VALUE(m.device().is_cpu(), op, ": key_padding_mask must be a CPU tensor");
  }
  if (block_ids.has_value()) {
    const at::Tensor& ids = block_ids.value();
    TORCH_CHECK_VALUE(ids.dim() == 1 && ids.size(0) == N, op,
                      ": block_ids must have shape (N,) = (", N, ",), got ", ids.sizes());
    TORCH_CHECK_TYPE(at::isIntegralType(ids.scalar_type(), /*includeBool=*/false), op,
                     ": block_ids must be an integer tensor, got ", ids.scalar_type());
    TORCH_CHECK_VALUE(ids.device().is_cpu(), op, ": block_ids must be a CPU tensor");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> qk_norm_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& q_w, const c10::optional<at::Tensor>& q_b,
    const c10::optional<at::Tensor>& k_w, const c10::optional<at::Tensor>& k_b, double eps,
    double scale, const c10::optional<at::Tensor>& key_padding_mask, bool causal,
    const c10::optional<at::Tensor>& block_ids) {
  constexpr const char* op = "qk_norm_attention_fwd";
  check_inputs(op, q, k, v, q_w, q_b, k_w, k_b, key_padding_mask, block_ids);
  TORCH_CHECK_VALUE(eps >= 0 && std::isfinite(eps), op, ": eps must be finite and >= 0, got ",
                    eps);
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  const auto acc = accumulation_type(q.scalar_type());
  auto out = pooled_empty({B, N, H, D}, q.scalar_type());
  auto lse = at::empty({B, H, N}, q.options().dtype(acc));
  auto q_stats = at::empty({B, H, N, 2}, q.options().dtype(acc));
  auto k_stats = at::empty({B, H, N, 2}, q.options().dtype(acc));
  if (B * H * N == 0) return {out, lse, q_stats, k_stats};
  const Prepared opt = prepare_optional(acc, q_w, q_b, k_w, k_b, key_padding_mask, block_ids);
  const Isa isa = cpu_isa();
#if defined(__x86_64__)
  if (isa == Isa::kAmx &&
      v512::amx_forward(q, k, v, opt, scale, causal, eps, out, lse, q_stats, k_stats))
    return {out, lse, q_stats, k_stats};
  if (isa >= Isa::kAvx512) {
    v512::dispatch_forward(q, k, v, opt, scale, causal, eps, out, lse, q_stats, k_stats, isa);
    return {out, lse, q_stats, k_stats};
  }
#endif
  v256::dispatch_forward(q, k, v, opt, scale, causal, eps, out, lse, q_stats, k_stats, isa);
  return {out, lse, q_stats, k_stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
qk_norm_attention_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                          const at::Tensor& v, const c10::optional<at::Tensor>& q_w,
                          const c10::optional<at::Tensor>& q_b,
                          const c10::optional<at::Tensor>& k_w,
                          const c10::optional<at::Tensor>& k_b, const at::Tensor& out,
                          const at::Tensor& lse, const at::Tensor& q_stats,
                          const at::Tensor& k_stats, double scale,
                          const c10::optional<at::Tensor>& key_padding_mask, bool causal,
                          const c10::optional<at::Tensor>& block_ids) {
  constexpr const char* op = "qk_norm_attention_bwd";
  check_inputs(op, q, k, v, q_w, q_b, k_w, k_b, key_padding_mask, block_ids);
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  const auto acc = accumulation_type(q.scalar_type());
  const std::vector<int64_t> bnhd{B, N, H, D}, bhn{B, H, N}, stats_shape{B, H, N, 2};
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(bnhd), op,
                    ": grad_out must have shape (B, N, H, D), got ", grad_out.sizes());
  TORCH_CHECK_VALUE(out.sizes() == at::IntArrayRef(bnhd), op,
                    ": out must have shape (B, N, H, D), got ", out.sizes());
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef(bhn), op,
                    ": lse must have shape (B, H, N), got ", lse.sizes());
  TORCH_CHECK_VALUE(q_stats.sizes() == at::IntArrayRef(stats_shape) &&
                        k_stats.sizes() == at::IntArrayRef(stats_shape),
                    op, ": q_stats and k_stats must have shape (B, H, N, 2)");
  TORCH_CHECK_TYPE(grad_out.scalar_type() == q.scalar_type() &&
                       out.scalar_type() == q.scalar_type(),
                   op, ": grad_out and out must have q's dtype ", q.scalar_type());
  const auto param_grad = [&](const c10::optional<at::Tensor>& p) {
    return p.has_value() ? at::empty({D}, p->options()) : at::empty({0}, q.options());
  };
  auto dq = pooled_empty({B, H, N, D}, q.scalar_type());
  auto dk = pooled_empty({B, H, N, D}, q.scalar_type());
  auto dv = pooled_empty({B, H, N, D}, q.scalar_type());
  auto dq_w = param_grad(q_w), dq_b = param_grad(q_b), dk_w = param_grad(k_w),
       dk_b = param_grad(k_b);
  if (B * H * N == 0) {
    for (auto* g : {&dq_w, &dq_b, &dk_w, &dk_b}) g->zero_();
    return {dq, dk, dv, dq_w, dq_b, dk_w, dk_b};
  }
  const Prepared opt = prepare_optional(acc, q_w, q_b, k_w, k_b, key_padding_mask, block_ids);
  // grad_out is read row by row: any strides with contiguous rows (autograd hands a transposed
  // view when the caller's gradient is (B, H, N, D) contiguous; copying it cost a pass over it)
  const at::Tensor grad_c = grad_out.stride(3) == 1 ? grad_out : grad_out.contiguous();
  const at::Tensor out_c = out.contiguous();
  const at::Tensor lse_c = lse.to(acc).contiguous(), q_stats_c = q_stats.to(acc).contiguous(),
                   k_stats_c = k_stats.to(acc).contiguous();
  at::Tensor q_param_sums, k_param_sums;
  const Isa isa = cpu_isa();
  const BackwardTensors t{grad_c, out_c, lse_c, q_stats_c, k_stats_c, dq, dk, dv};
#if defined(__x86_64__)
  if (isa >= Isa::kAvx512)
    v512::dispatch_backward(q, k, v, opt, scale, causal, t, isa, q_param_sums, k_param_sums);
  else
#endif
    v256::dispatch_backward(q, k, v, opt, scale, causal, t, isa, q_param_sums, k_param_sums);
  if (q_w.has_value()) dq_w.copy_(q_param_sums[0]);
  if (q_b.has_value()) dq_b.copy_(q_param_sums[1]);
  if (k_w.has_value()) dk_w.copy_(k_param_sums);
  if (k_b.has_value()) dk_b.zero_();  // exactly zero, see backward_keys
  return {dq, dk, dv, dq_w, dq_b, dk_w, dk_b};
}

}  // namespace
}  // namespace qk_attention
}  // namespace eegfast

TORCH_LIBRARY_FRAGMENT(eegfast, m) {
  m.def(
      "qk_norm_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? q_w, Tensor? q_b, "
      "Tensor? k_w, Tensor? k_b, float eps, float scale, Tensor? key_padding_mask, bool causal, "
      "Tensor? block_ids) -> (Tensor out, Tensor lse, Tensor q_stats, Tensor k_stats)");
  m.def(
      "qk_norm_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? q_w, "
      "Tensor? q_b, Tensor? k_w, Tensor? k_b, Tensor out, Tensor lse, Tensor q_stats, "
      "Tensor k_stats, float scale, Tensor? key_padding_mask, bool causal, Tensor? block_ids) "
      "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dq_w, Tensor dq_b, Tensor dk_w, "
      "Tensor dk_b)");
  m.def("cpu_pool_cached_bytes() -> int");
  m.def("cpu_pool_release() -> ()");
  m.def("cpu_attention_isa() -> str");
}

// No tensor arguments, so no dispatch key: registered for every backend.
TORCH_LIBRARY_IMPL(eegfast, CatchAll, m) {
  m.impl("cpu_pool_cached_bytes", [] { return eegfast::qk_attention::OutputPool::get().cached_bytes(); });
  m.impl("cpu_pool_release", [] { eegfast::qk_attention::OutputPool::get().release(); });
  m.impl("cpu_attention_isa", [] { return std::string(eegfast::qk_attention::isa_name(eegfast::qk_attention::cpu_isa())); });
}

TORCH_LIBRARY_IMPL(eegfast, CPU, m) {
  m.impl("qk_norm_attention_fwd", &eegfast::qk_attention::qk_norm_attention_fwd_cpu);
  m.impl("qk_norm_attention_bwd", &eegfast::qk_attention::qk_norm_attention_bwd_cpu);
}
