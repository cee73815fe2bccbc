// What the translation units of the CPU QK-norm attention share: the problem description,
// the instruction-set enum, the task scheduler and the entry points of the kernels of each
// vector width. See qk_norm_attention_cpu.cpp for the kernels' design.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <mutex>
#include <string>
#include <unordered_map>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

#define EEGFAST_INLINE __attribute__((always_inline)) inline
// For the lambdas of the hot loops: GCC inlined them by itself under -std=c++17 but not under
// -std=c++20 (torch 2.13's default), where the out-of-line calls made the forward 3x slower
// (their strides stop being compile-time constants).
#define EEGFAST_INLINE_LAMBDA __attribute__((always_inline))


namespace eegfast {
namespace qk_attention {

constexpr int64_t kMaxHeadDim = 128;
constexpr int kKeyBlock = 64;    // keys per online-softmax step
constexpr int kMinChunR = 32;  // smallest query chunk worth its own task

// ---- problem description ------------------------------------------------------------------

template <typename scalar_t>
struct Strided {  // (B, H, N, D) tensor with arbitrary strides
  const scalar_t* data;
  int64_t sb, sh, sn, sd;
  const scalar_t* row(int64_t b, int64_t h, int64_t i) const {
    return data + b * sb + h * sh + i * sn;
  }
};

template <typename scalar_t>
Strided<scalar_t> strided(const at::Tensor& t) {
  return {t.data_ptr<scalar_t>(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// ---- instruction sets -----------------------------------------------------------------------
// AVX-512 runs the 512-bit instance with 8-row tiles and 8-key / 8-dim query-lane micro-tiles
// (8 x 3 accumulators in 32 registers); AVX2 and generic code run the 256-bit instance with
// 4-row tiles (16 registers).

enum class Isa { kGeneric, kAvx2, kAvx512, kAmx };  // kAmx: kAvx512 + the bf16 AMX forward
enum class Kernel { kForward, kBackward, kBackwardKeys };

// Query chunks per (batch, head): 1 unless there are too few (batch, head) pairs to keep every
// thread busy.
inline int64_t query_chunks(int64_t pairs, int64_t N) {
  const int64_t threads = at::get_num_threads();
  const int64_t wanted = (2 * threads + pairs - 1) / std::max<int64_t>(pairs, 1);
  const int64_t most = std::max<int64_t>(1, N / kMinChunR);
  return std::clamp<int64_t>(wanted, 1, most);
}


template <typename T>
const T* ptr_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

struct Prepared {
  c10::optional<at::Tensor> qw, qb, kw, kb, key_padding, ids;
};

// The tensors of one backward call (contiguous; lse and the stats in the accumulation type).
struct BackwardTensors {
  const at::Tensor &grad_out, &out, &lse, &q_stats, &k_stats;  // (B, N, H, D) x 2, (B, H, N),
                                                               // (B, H, N, 2) x 2; grad_out's
                                                               // rows need only be contiguous
  at::Tensor &dq, &dk, &dv;                                    // (B, H, N, D)
};

// ---- task scheduling ----------------------------------------------------------------------

// Runs fn(task) for every task in [0, tasks) on at::get_num_threads() threads. Each thread starts
// on its own contiguous share, front to back (neighbouring tasks, as the next-head prefetch
// expects), and when that is done takes tasks from the back of the others' shares. A static
// split makes the call wait for its slowest share, and on a shared machine (two cores, other
// processes) a thread that loses its core for a while holds up the whole call.
template <typename Fn>
void run_tasks(int64_t tasks, const Fn& fn) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), tasks);
  if (threads <= 1 || at::in_parallel_region()) {
    for (int64_t task = 0; task < tasks; ++task) fn(task);
    return;
  }
  TORCH_CHECK(tasks < (int64_t(1) << 31), "qk_norm_attention: too many tasks (", tasks, ")");
  // share i: (first << 32) | end, both changed only by compare-and-swap
  std::vector<std::atomic<uint64_t>> shares(threads);
  for (int64_t i = 0; i < threads; ++i)
    shares[i] = (static_cast<uint64_t>(tasks * i / threads) << 32) |
                static_cast<uint64_t>(tasks * (i + 1) / threads);
  auto take = [&](int64_t share, bool front) -> int64_t {
    uint64_t range = shares[share].load();
    while (true) {
      const int64_t first = static_cast<int64_t>(range >> 32);
      const int64_t end = static_cast<int64_t>(range & 0xffffffffu);
      if (first >= end) return -1;
      const uint64_t rest = front ? range + (uint64_t(1) << 32) : range - 1;
      if (shares[share].compare_exchange_weak(range, rest)) return front ? first : end - 1;
    }
  };
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t me = begin; me < end; ++me) {
      for (int64_t task; (task = take(me, true)) >= 0;) fn(task);
      for (int64_t k = 1; k < threads; ++k)
        for (int64_t task; (task = take((me + k) % threads, false)) >= 0;) fn(task);
    }
  });
}


// ---- the kernels of each vector width ------------------------------------------------------
// Compiled in their own translation units, qk_norm_attention_v256.cpp (32-byte vectors: AVX2
// and generic code) and qk_norm_attention_v512.cpp (AVX-512, and the AMX forward), so that a
// parallel build compiles them side by side: together in one unit they were the build's
// longest step by far (several minutes at -O3 on two cores). Each unit includes
// qk_norm_attention_kernels.h in its namespace; these are its entry points, which dispatch on
// q's dtype.

#define EEGFAST_QK_ATTENTION_ENTRY_POINTS                                                        \
  void dispatch_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,          \
                        const Prepared& opt, double scale, bool causal, double eps,            \
                        at::Tensor& out, at::Tensor& lse, at::Tensor& q_stats,                 \
                        at::Tensor& k_stats, Isa isa);                                         \
  void dispatch_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,         \
                         const Prepared& opt, double scale, bool causal,                       \
                         const BackwardTensors& t, Isa isa, at::Tensor& q_param_sums,          \
                         at::Tensor& k_param_sums);

namespace v256 {
EEGFAST_QK_ATTENTION_ENTRY_POINTS
}  // namespace v256

#if defined(__x86_64__)
namespace v512 {
EEGFAST_QK_ATTENTION_ENTRY_POINTS
// The forward of bf16 inputs through the tile unit when it applies; false otherwise, having
// done nothing (qk_norm_attention_amx.h).
bool amx_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const Prepared& opt, double scale, bool causal, double eps, at::Tensor& out,
                 at::Tensor& lse, at::Tensor& q_stats, at::Tensor& k_stats);
}  // namespace v512
#endif

#undef EEGFAST_QK_ATTENTION_ENTRY_POINTS

}  // namespace qk_attention
}  // namespace eegfast
