// Exhaustive test of vec_exp (csrc/cpu/vec_exp.h), run by ctest once per CPU capability the
// build compiles (see CMakeLists.txt): every float from −105 to 90, where exp goes from 0 to
// +inf, lies within 1 ulp of the exact exp (std::exp in double, which is far more accurate
// than a float ulp), and −inf, +inf, NaN and the ends of the range map to 0, +inf, NaN.
// Exits 77 (ctest's skip code) where this CPU cannot run the capability.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>

#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif
#define KDOPS_NAME(x) #x
#define KDOPS_STRING(x) KDOPS_NAME(x)

#include "cpu/vec_exp.h"

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int kLanes = Vec::size();

float from_bits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

uint32_t to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

// Error of `got` against the exact value in units of the float spacing at the exact value.
double ulps(float got, double exact) {
  const float nearest = static_cast<float>(exact);
  if (std::isinf(nearest)) return std::isinf(got) ? 0 : std::numeric_limits<double>::infinity();
  const float above = std::nextafter(std::fabs(nearest), std::numeric_limits<float>::infinity());
  const double spacing = static_cast<double>(above) - std::fabs(nearest);
  return std::fabs(static_cast<double>(got) - exact) / spacing;
}

struct Worst {
  double ulps = 0;
  float x = 0;
};

void check(const float* x, Worst& worst) {
  float y[kLanes];
  kdops::cpu::CPU_CAPABILITY::vec_exp(Vec::loadu(x)).store(y);
  for (int j = 0; j < kLanes; ++j) {
    const double e = ulps(y[j], std::exp(static_cast<double>(x[j])));
    if (!(e <= worst.ulps)) worst = {e, x[j]};
  }
}

bool cpu_runs_capability() {
#if defined(CPU_CAPABILITY_AVX512)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#elif defined(CPU_CAPABILITY_AVX2)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return true;
#endif
}

}  // namespace

int main() {
  if (!cpu_runs_capability()) {
    std::printf("vec_exp (%s): this CPU cannot run it, skipped\n", KDOPS_STRING(CPU_CAPABILITY));
    return 77;
  }
  Worst worst;
  float batch[kLanes];
  int k = 0;
  auto add = [&](float x) {
    batch[k++] = x;
    if (k == kLanes) {
      check(batch, worst);
      k = 0;
    }
  };
  // Negative floats from −105 up to −0 (bit patterns downwards), then +0 up to 90.
  for (uint32_t b = to_bits(-105.0f); b >= to_bits(-0.0f); --b) add(from_bits(b));
  for (uint32_t b = 0; b <= to_bits(90.0f); ++b) add(from_bits(b));
  while (k != 0) add(0.0f);

  const float inf = std::numeric_limits<float>::infinity();
  float special[kLanes] = {};
  const float in[] = {-inf, inf, std::numeric_limits<float>::quiet_NaN(), -1e30f, 1e30f};
  std::memcpy(special, in, sizeof in);
  float out[kLanes];
  kdops::cpu::CPU_CAPABILITY::vec_exp(Vec::loadu(special)).store(out);
  const bool specials_ok = out[0] == 0 && out[1] == inf && std::isnan(out[2]) && out[3] == 0 &&
                           out[4] == inf;

  const bool ok = worst.ulps <= 1.0 && specials_ok;
  std::printf("vec_exp (%s): max error %.4f ulp at x = %a; specials %s: %s\n",
              KDOPS_STRING(CPU_CAPABILITY), worst.ulps, worst.x, specials_ok ? "ok" : "WRONG",
              ok ? "passed" : "FAILED");
  return ok ? 0 : 1;
}
