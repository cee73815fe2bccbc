// The CPU QK-norm attention kernels with 32-byte vectors: AVX2 + FMA code and generic code (see
// qk_norm_attention_cpu.cpp). A translation unit of its own so it compiles beside the others.
#include "qk_norm_attention/qk_norm_attention_cpu.h"

namespace eegfast {
namespace qk_attention {
namespace v256 {
constexpr int kVectorBytes = 32;
#include "qk_norm_attention/qk_norm_attention_kernels.h"
}  // namespace v256
}  // namespace qk_attention
}  // namespace eegfast
