// The loss row kernels compiled for AVX-512 (F, BW, VL, DQ).
//
// As ATen does for its vectorized kernels, this file is compiled with its capability's flags
// (-m... and CPU_CAPABILITY=AVX512, CPU_CAPABILITY_AVX512): setup.py and CMakeLists.txt add them to
// every source whose name ends in _avx512.cpp. kd_loss.cpp picks a capability at run time.
#include "kd_loss_kernels.h"

#ifdef KDOPS_X86_CAPABILITIES
#ifndef CPU_CAPABILITY_AVX512
#error "kd_loss_avx512.cpp must be compiled with the AVX512 flags (see setup.py)"
#endif
#include "kd_loss_second_order.h"

namespace kdops::cpu::AVX512 {
const KernelTable kernels{"AVX512", forward, backward, double_backward};
}  // namespace kdops::cpu::AVX512
#endif  // KDOPS_X86_CAPABILITIES
