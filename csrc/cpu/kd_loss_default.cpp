// The loss row kernels compiled without SIMD flags: what every CPU can run, and the fallback
// when at::get_cpu_capability() reports DEFAULT (or ATEN_CPU_CAPABILITY=default asks for it).
#define CPU_CAPABILITY DEFAULT
#include "kd_loss_second_order.h"

namespace kdops::cpu::DEFAULT {
const KernelTable kernels{"DEFAULT", forward, backward, double_backward};
}  // namespace kdops::cpu::DEFAULT
