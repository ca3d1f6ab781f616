// Transparent huge pages for fresh outputs, shared by the CPU ops.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace kdops::cpu {

// Asks Linux for transparent huge pages behind a fresh, untouched output of at least a few
// MiB. Where THP is in "madvise" mode (the common default), the first write to each 4 KiB
// page of a new output otherwise costs a page fault: about half of the loss backward's time
// (2048 x 32000 fp32 gradient, 2 cores); with 2 MiB pages that cost nearly vanishes. Only a
// hint: without THP nothing changes.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.nbytes();
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = end & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

}  // namespace kdops::cpu
