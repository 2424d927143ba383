// Issue rates of the vector instructions the CPU kernels' inner loops are made of, in a
// register-only loop (no loads or stores), per core cycle: what bounds the AVX2 GEMMs
// (ouromamba::u4_mm: vpmaddubsw + vpaddw; ouromamba::s16_mm: vpmaddwd + vpaddd) and the fp32
// ones they are compared with (vfmadd231ps).
//
//   g++ -O2 -mavx2 -mfma benchmarks/x86_rates.cpp -o /tmp/x86_rates && /tmp/x86_rates
//
// The core clock is read from a chain of dependent integer adds (one per cycle on every x86 core
// of the last decade) run just before each measurement, because on a shared or turbo-boosting
// machine the clock moves between runs. Each rate is the best of several repetitions (noise from
// other tenants only ever slows a loop down). "alone": 12 independent chains of the instruction;
// "pair": 6 independent chains of the instruction followed by the add that accumulates its result,
// the form the GEMM kernels issue it in. Multiply-adds per cycle = rate x lanes x products per lane.

#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// Core cycles per second, from dependent adds.
double clock_hz() {
  const long n = 20000000;
  long a = 0;
  const double t0 = now();
  for (long i = 0; i < n; ++i) {
    asm volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\t"
                 "add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0"
                 : "+r"(a));
  }
  return 10.0 * n / (now() - t0);
}

#define CLOBBER "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11"
#define ONE(INS, d) INS " %%ymm14, %%ymm15, %%ymm" #d "\n\t"
#define ALONE(INS)                                                                                                    \
  ONE(INS, 0) ONE(INS, 1) ONE(INS, 2) ONE(INS, 3) ONE(INS, 4) ONE(INS, 5) ONE(INS, 6) ONE(INS, 7) ONE(INS, 8)         \
  ONE(INS, 9) ONE(INS, 10) ONE(INS, 11)
#define TWO(INS, ADD, t, c) INS " %%ymm14, %%ymm15, %%ymm" #t "\n\t" ADD " %%ymm" #t ", %%ymm" #c ", %%ymm" #c "\n\t"
#define PAIRS(INS, ADD) \
  TWO(INS, ADD, 6, 0) TWO(INS, ADD, 7, 1) TWO(INS, ADD, 8, 2) TWO(INS, ADD, 9, 3) TWO(INS, ADD, 10, 4) TWO(INS, ADD, 11, 5)

// Best instructions (or pairs) per cycle of `body` (count per loop iteration) over `reps` tries.
template <typename F>
double rate(F body, int count, int reps = 21) {
  const long n = 10000000;
  double best = 0.0;
  for (int r = 0; r < reps; ++r) {
    const double hz = clock_hz();
    const double t0 = now();
    body(n);
    best = std::max(best, count * static_cast<double>(n) / ((now() - t0) * hz));
  }
  return best;
}

#define RATE_ALONE(INS) rate([](long n) { for (long i = 0; i < n; ++i) asm volatile(ALONE(INS)::: CLOBBER); }, 12)
#define RATE_PAIRS(INS, ADD) rate([](long n) { for (long i = 0; i < n; ++i) asm volatile(PAIRS(INS, ADD)::: CLOBBER); }, 6)

}  // namespace

int main() {
  asm volatile("vpxor %%ymm14, %%ymm14, %%ymm14\n\tvpxor %%ymm15, %%ymm15, %%ymm15" ::: "xmm14", "xmm15");
  std::printf("core clock (dependent adds): %.2f GHz\n\n", clock_hz() / 1e9);
  std::printf("| instructions (256-bit) | per cycle | multiply-adds per cycle |\n|---|---:|---:|\n");
  const double fma = RATE_ALONE("vfmadd231ps");
  std::printf("| vfmadd231ps alone | %.2f | %.1f (fp32) |\n", fma, 8 * fma);
  const double mulf = RATE_PAIRS("vmulps", "vaddps");
  std::printf("| vmulps + vaddps pair | %.2f | |\n", mulf);
  const double madd = RATE_ALONE("vpmaddwd");
  std::printf("| vpmaddwd alone | %.2f | %.1f (int16) |\n", madd, 16 * madd);
  const double madd_add = RATE_PAIRS("vpmaddwd", "vpaddd");
  std::printf("| vpmaddwd + vpaddd pair (s16_mm) | %.2f | %.1f (int16) |\n", madd_add, 16 * madd_add);
  const double ubs = RATE_ALONE("vpmaddubsw");
  std::printf("| vpmaddubsw alone | %.2f | %.1f (u8 x s8) |\n", ubs, 32 * ubs);
  const double ubs_add = RATE_PAIRS("vpmaddubsw", "vpaddw");
  std::printf("| vpmaddubsw + vpaddw pair (u4_mm) | %.2f | %.1f (u8 x s8) |\n", ubs_add, 32 * ubs_add);
  const double addd = RATE_ALONE("vpaddd");
  std::printf("| vpaddd alone | %.2f | |\n", addd);
  return 0;
}
