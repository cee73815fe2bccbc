// The CPU QK-norm attention kernels with 64-byte vectors (AVX-512), and the bf16 forward on the
// AMX tile unit (see qk_norm_attention_cpu.cpp). A translation unit of its own so it compiles
// beside the others. x86-64 only.
#include "qk_norm_attention/qk_norm_attention_cpu.h"

#if defined(__x86_64__)
namespace eegfast {
namespace qk_attention {
namespace v512 {
constexpr int kVectorBytes = 64;
#include "qk_norm_attention/qk_norm_attention_kernels.h"
#include "qk_norm_attention/qk_norm_attention_amx.h"
}  // namespace v512
}  // namespace qk_attention
}  // namespace eegfast
#endif
