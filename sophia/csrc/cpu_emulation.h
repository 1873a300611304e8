/*
---
title: Running the CUDA kernel on the CPU
summary: The few CUDA names the kernel uses, defined for a C++ compiler, so the same source runs as loops.
---

[`launcher_cpu.cpp`](launcher_cpu.html) defines `SOPHIA_CPU_EMULATION`, includes this
header, then includes the CUDA launcher and kernel **source files themselves**, so a
C++ compiler compiles the very code that `nvcc` compiles for the GPU. This header
supplies what that code needs from CUDA: the function qualifiers (as plain inline
functions), the thread indices (as variables the launch loop sets), the rounding
intrinsics, the bit casts and the half types bit for bit as on the GPU, and the launch,
`SOPHIA_LAUNCH(kernel, grid, block, stream, args...)`, as a loop over the blocks of the
grid and, inside each, over the threads of the block.

Running the threads one after another is a legitimate schedule because the kernels
keep their invariant (stated in [the kernel](sophia_kernel.html)): no thread waits for
another or reads what another writes. So the tests of this build test the GPU's
indexing, chunking and vector/scalar paths. Why this is faithful, how OpenMP runs the
blocks, and why the build needs `-ffp-contract=off`:
[how the fused kernel is built](../../engineering/kernel.md).
*/
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(_OPENMP)
#include <omp.h>
#endif

// ## Qualifiers
//
// A `__global__` kernel and a `__device__` function are plain functions on the host.
#define __global__
#define __device__
#define __host__
#define __launch_bounds__(...)
#if defined(_MSC_VER)
#define __forceinline__ __forceinline
#define __restrict__ __restrict
#else
#define __forceinline__ inline __attribute__((always_inline))
#endif

// ## Thread indices
//
// `dim3` as in CUDA; one set of indices per host thread, set by the launch loop.
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx(0, 0, 0);
inline thread_local dim3 blockIdx(0, 0, 0);
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

// ## Rounding intrinsics
//
// `float` and `double` on the host are IEEE binary32 and binary64 with round to nearest
// even, so each of these is its CUDA namesake exactly: one operation, one rounding, as
// long as the compiler does not contract `a * b + c` behind our back
// (`-ffp-contract=off`); the multiply-adds that *should* be fused are `std::fma`.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }

// The bits of a value, as an integer of its width (the non-finite check reads them).
inline unsigned int __float_as_uint(float x) {
    unsigned int u;
    std::memcpy(&u, &x, sizeof u);
    return u;
}
inline long long __double_as_longlong(double x) {
    long long u;
    std::memcpy(&u, &x, sizeof u);
    return u;
}

// ## Half types
//
// Storage only: the kernel never computes in these types, it converts. A `bfloat16` is
// the top half of a `float32`; a `float16` has 5 exponent bits and 10 mantissa bits.
struct __half {
    uint16_t bits;
};
struct __nv_bfloat16 {
    uint16_t bits;
};

inline uint32_t float_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}

inline float bits_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

// `bfloat16` to `float32` is exact: put the bits back on top.
inline float __bfloat162float(__nv_bfloat16 h) { return bits_float(static_cast<uint32_t>(h.bits) << 16); }

// `float32` to `bfloat16`, round to nearest even: add just under half a unit of the
// kept part, plus one if the kept part is odd, and cut. A carry out of the mantissa
// moves to the exponent, which is right (and rounds the largest finite values up to
// infinity, as it should). A NaN would be corrupted by the add, so it becomes the
// canonical NaN, as on the GPU. (A select, not a branch, so that loops of these
// vectorize.)
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    const uint32_t u = float_bits(f);
    const uint32_t rounding_bias = 0x7fffu + ((u >> 16) & 1u);
    const uint32_t rounded = (u + rounding_bias) >> 16;
    const bool is_nan = (u & 0x7fffffffu) > 0x7f800000u;
    return __nv_bfloat16{static_cast<uint16_t>(is_nan ? 0x7fffu : rounded)};
}

// `float16` to `float32` is exact. Subnormal halves are `mantissa` units of $2^{-24}$;
// multiplying by that power of two is exact.
constexpr float kHalfSubnormalUnit = 1.0f / 16777216.0f;

inline float __half2float(__half h) {
    const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
    const uint32_t exponent = (h.bits >> 10) & 0x1fu;
    const uint32_t mantissa = h.bits & 0x3ffu;
    if (exponent == 0x1fu) {
        return bits_float(sign | 0x7f800000u | (mantissa << 13));
    }
    if (exponent == 0) {
        const float magnitude = static_cast<float>(mantissa) * kHalfSubnormalUnit;
        return bits_float(sign | float_bits(magnitude));
    }
    return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// `float32` to `float16`, round to nearest even. Three ranges, by magnitude:
//
// * at or past the midpoint between the largest half and the next power of two:
//   infinity (the tie goes up, to the even "mantissa" of infinity);
// * a normal half: keep the top mantissa bits and round on the dropped ones, a carry
//   moving into the exponent;
// * below the smallest normal half: a subnormal, an integer number of units of
//   $2^{-24}$, rounded from the full 24-bit significand.
inline __half __float2half_rn(float f) {
    const uint32_t u = float_bits(f);
    const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
    const uint32_t magnitude = u & 0x7fffffffu;
    if (magnitude > 0x7f800000u) {
        return __half{0x7fff};
    }
    if (magnitude >= 0x477ff000u) {
        return __half{static_cast<uint16_t>(sign | 0x7c00u)};
    }
    if (magnitude >= 0x38800000u) {
        uint32_t h = (magnitude >> 13) - (112u << 10);
        const uint32_t dropped = magnitude & 0x1fffu;
        if (dropped > 0x1000u || (dropped == 0x1000u && (h & 1u))) {
            ++h;
        }
        return __half{static_cast<uint16_t>(sign | h)};
    }
    if (magnitude <= 0x33000000u) {
        return __half{sign};
    }
    const uint32_t exponent = magnitude >> 23;
    const uint32_t significand = (magnitude & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - exponent;
    uint32_t h = significand >> shift;
    const uint32_t dropped = significand & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1u);
    if (dropped > halfway || (dropped == halfway && (h & 1u))) {
        ++h;
    }
    return __half{static_cast<uint16_t>(sign | h)};
}

// ## The check's flag
//
// Blocks may run on several OpenMP threads, and any of them may set the flag; the
// store is then an atomic write, so that two threads storing the same one are not a
// data race in C++'s sense.
inline void sophia_set_flag(float* flag) {
#if defined(_OPENMP)
#pragma omp atomic write
#endif
    *flag = 1.0f;
}

// ## Errors
//
// Nothing here can fail asynchronously the way a GPU launch can.
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "no error"; }
using cudaStream_t = void*;

// ## The launch
//
// Blocks in any order (in parallel if OpenMP is on: blocks are as independent as
// threads, and the indices are `thread_local`), and in each block, threads one after
// another. `body` is the kernel call with its arguments bound.
namespace sophia_emulation {
template <typename Body>
void launch(const dim3 grid, const dim3 block, const Body& body) {
    const long long blocks = grid.x;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (blocks > 1)
#endif
    for (long long b = 0; b < blocks; ++b) {
        gridDim = grid;
        blockDim = block;
        blockIdx = dim3(static_cast<unsigned int>(b));
        for (unsigned int t = 0; t < block.x; ++t) {
            threadIdx = dim3(t);
            body();
        }
    }
}
}  // namespace sophia_emulation

#define SOPHIA_LAUNCH(kernel, grid, block, stream, ...) \
    ((void)(stream), ::sophia_emulation::launch((grid), (block), [&]() { kernel(__VA_ARGS__); }))
