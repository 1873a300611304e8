/*
---
title: The launcher's C interface
summary: Four argument structs and three entry points; pointers in, an error code out. No PyTorch.
---

The [binding](binding.html) fills these structs and calls these functions; the
[launcher](sophia_launcher.html) packs the tensors into launches of the
[kernel](sophia_kernel.html). PyTorch stays out of this interface so that the launcher
and the kernel compile with plain `nvcc -c`, and as C++ for the
[CPU emulation](cpu_emulation.html) (see
[how the fused kernel is built](../../engineering/kernel.md)).

Every function returns `0` on success, or an error code, and then
`sophia_last_error()` says what went wrong. Launches on the GPU are asynchronous, as
usual. `stream` is a `cudaStream_t` as `void*`, which the CPU build ignores.
*/
#pragma once

#include <stdint.h>

#if defined(__GNUC__)
#define SOPHIA_API __attribute__((visibility("hidden")))
#else
#define SOPHIA_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

// ## The arguments
//
// The tensors of one call, all contiguous and of one storage type `dtype` (`0` =
// `float32`, `1` = `float16`, `2` = `bfloat16`, `3` = `float64`). `lists[d][t]` is the
// address of tensor `t` in list `d`, which has `numels[t]` elements. The step's lists
// are `param`, `grad`, `exp_avg`, `hessian`; the EMA's are `hessian`, `estimate`; the
// non-finite check's, `grad` alone.
typedef struct SophiaTensorLists {
    int dtype;
    int n_tensors;
    void* const* lists[4];
    const int64_t* numels;
} SophiaTensorLists;

// The step's hyperparameters, as the `double`s Python passes to the reference (the
// [kernel](sophia_kernel.html) says why). `rho_bs` is `rho * bs`. `lr_ptr`,
// `grad_scale` and `found_inf` each point to one `float` in device memory, or are
// null; `lr_ptr` overrides `lr`.
typedef struct SophiaStepArgs {
    double lr;
    const float* lr_ptr;
    double beta1;
    double rho_bs;
    double weight_decay;
    double eps;
    const float* grad_scale;
    const float* found_inf;
    int maximize;
} SophiaStepArgs;

typedef struct SophiaEmaArgs {
    double beta2;
    int square;
} SophiaEmaArgs;

// The check's one output: a `float` in device memory, set to one if an element is a
// NaN or an infinity, and otherwise not written (the caller zeroes it).
typedef struct SophiaCheckArgs {
    float* found;
} SophiaCheckArgs;

// ## The entry points
//
// `sophiag_reference` and `hessian_ema_reference`, for every tensor of the lists, and
// the look for NaNs and infinities that comes before a step.
SOPHIA_API int sophia_fused_step(const SophiaTensorLists* tensors, const SophiaStepArgs* args, void* stream);
SOPHIA_API int sophia_fused_hessian_ema(const SophiaTensorLists* tensors, const SophiaEmaArgs* args, void* stream);
SOPHIA_API int sophia_nonfinite_check(const SophiaTensorLists* tensors, const SophiaCheckArgs* args, void* stream);

// What the last failed call on this host thread reported.
SOPHIA_API const char* sophia_last_error(void);

// ## For the tests only
//
// Compiled where the tests' build defines `SOPHIA_TESTING`, never in the build users
// get. The same two operations with the plain one-thread-per-element kernels; the
// kernel's conversions alone (`n` floats rounded to `dtype`, `stored`, and back,
// `back`); the packing (`out` gets, for `depth` lists, the chunk size, block size,
// elements per thread per iteration, tensors and blocks per launch, bytes of kernel
// arguments, and the GPU's block size); a smaller packing, `0` for a default (not
// thread-safe); and how many kernels the last call on this thread launched.
#if defined(SOPHIA_TESTING)
SOPHIA_API int sophia_simple_step(const SophiaTensorLists* tensors, const SophiaStepArgs* args, void* stream);
SOPHIA_API int sophia_simple_hessian_ema(const SophiaTensorLists* tensors, const SophiaEmaArgs* args, void* stream);
SOPHIA_API int sophia_convert(int dtype, const float* src, void* stored, float* back, int64_t n, void* stream);
SOPHIA_API int sophia_packing(int depth, int64_t* out);
SOPHIA_API int sophia_set_packing(int64_t chunk_size, int max_blocks, int max_tensors, int block_size);
SOPHIA_API int64_t sophia_launch_count(void);
#endif

#ifdef __cplusplus
}
#endif
