/*
---
title: The launcher's C interface
summary: Raw pointers, sizes and a stream in; kernels launched; an error code out. No PyTorch.
---

# The launcher's C interface

The [binding](binding.html) checks the tensors and calls these functions with raw
pointers; the [launcher](sophia_launcher.html) packs the tensors into launches of the
[kernel](sophia_kernel.html). Keeping PyTorch out of this interface is what lets the
launcher and the kernel compile with plain `nvcc -c` (the tests do), and lets the
same source compile as C++ for the [CPU emulation](cpu_emulation.html).

Conventions, for every function:

* `dtype`: `0` = `float32`, `1` = `float16`, `2` = `bfloat16`, `3` = `float64`. All
  tensors of one call have that dtype; `n_tensors` entries per list, element counts in
  `numels`; every tensor contiguous.
* Hyperparameters are `double`: the very Python numbers the reference receives, so the
  kernel can derive `1 - beta1` and `1 - lr * weight_decay` as the reference does.
* `lr_ptr`, `grad_scale`, `found_inf`: one `float` in device memory, or null.
* `stream`: a `cudaStream_t` as `void*` (ignored by the CPU build).
* Return: `0` on success; otherwise an error code, and `sophia_last_error()` says what
  went wrong. Launches are asynchronous on the GPU, as usual.
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

// The step, `sophiag_reference` for every tensor of the lists; `rho_bs` is `rho * bs`.
SOPHIA_API int sophia_fused_step(int dtype, int n_tensors, void* const* params, const void* const* grads,
                                 void* const* exp_avgs, const void* const* hessians, const int64_t* numels,
                                 double lr, const float* lr_ptr, double beta1, double rho_bs,
                                 double weight_decay, double eps, int maximize, const float* grad_scale,
                                 const float* found_inf, void* stream);

// The Hessian EMA, `hessian_ema_reference` for every tensor of the lists.
SOPHIA_API int sophia_fused_hessian_ema(int dtype, int n_tensors, void* const* hessians,
                                        const void* const* estimates, const int64_t* numels, double beta2,
                                        int square, void* stream);

// What the last failed call (on this host thread) reported.
SOPHIA_API const char* sophia_last_error(void);

// ## For the tests
//
// The same two operations with the plain one-thread-per-element kernels, one launch
// per tensor.
SOPHIA_API int sophia_simple_step(int dtype, int n_tensors, void* const* params, const void* const* grads,
                                  void* const* exp_avgs, const void* const* hessians, const int64_t* numels,
                                  double lr, const float* lr_ptr, double beta1, double rho_bs,
                                  double weight_decay, double eps, int maximize, const float* grad_scale,
                                  const float* found_inf, void* stream);
SOPHIA_API int sophia_simple_hessian_ema(int dtype, int n_tensors, void* const* hessians,
                                         const void* const* estimates, const int64_t* numels, double beta2,
                                         int square, void* stream);

// Round `n` floats to `dtype` with the kernel's conversions (`stored`), and back (`back`).
SOPHIA_API int sophia_convert(int dtype, const float* src, void* stored, float* back, int64_t n, void* stream);

// The packing: `out` (seven entries) receives, for lists of `depth` tensors, the chunk
// size, block size, elements per thread per iteration, tensors per launch, blocks per
// launch and bytes of kernel arguments now in use, and the GPU's block size.
SOPHIA_API int sophia_packing(int depth, int64_t* out);

// Change the packing (tests reach many launches with little data, and run the CPU
// build with the GPU's block size): a chunk size that is a positive multiple of the
// vector width, at most this many blocks and tensors per launch, this many threads per
// block (at most the GPU's); `0` restores a default. Not thread-safe: for tests only.
SOPHIA_API int sophia_set_packing(int64_t chunk_size, int max_blocks, int max_tensors, int block_size);

// How many kernels the last call on this host thread launched.
SOPHIA_API int64_t sophia_launch_count(void);

#ifdef __cplusplus
}
#endif
