// The loss row kernels compiled for AVX2 + FMA.
//
// As ATen does for its vectorized kernels, this file is compiled with its capability's flags
// (-m... and CPU_CAPABILITY=AVX2, CPU_CAPABILITY_AVX2): setup.py and CMakeLists.txt add them to
// every source whose name ends in _avx2.cpp. kd_loss.cpp picks a capability at run time.
#include "kd_loss_kernels.h"

#ifdef KDOPS_X86_CAPABILITIES
#ifndef CPU_CAPABILITY_AVX2
#error "kd_loss_avx2.cpp must be compiled with the AVX2 flags (see setup.py)"
#endif
#include "kd_loss_second_order.h"

namespace kdops::cpu::AVX2 {
const KernelTable kernels{"AVX2", forward, backward, double_backward};
}  // namespace kdops::cpu::AVX2
#endif  // KDOPS_X86_CAPABILITIES
