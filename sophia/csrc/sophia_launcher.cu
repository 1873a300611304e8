/*
---
title: The launcher
summary: Packs lists of tensors into as few launches of the multi-tensor kernel as the argument bank allows.
---

# The launcher

The [kernel](sophia_kernel.html) handles one chunk of one tensor per block, and
learns which from a table passed by value at launch. This file fills that table. It
walks the tensors in order, cuts each into chunks of `chunk_size` elements, and gives
one block to each chunk, launching the kernel whenever the table is full:

* **many small tensors** share a launch, up to `max_tensors_per_launch(depth)` of them;
* **a large tensor** gets one block per chunk; if its chunks do not all fit in the
  launch being filled, the launch goes and the tensor carries over, as the first entry
  of the next table, with its remaining chunks;
* **more tensors than fit** simply make several launches.

For example, with room for two blocks per launch, tensors of 1, 3 and 1 chunks launch
as `[a0 b0] [b1 b2] [c0]`, and `b` appears in the first two tables.

The file is plain CUDA C++ with no PyTorch header (`nvcc -c` compiles it on its own,
and `tests/test_nvcc.py` does), and the [CPU build](launcher_cpu.html) compiles the same
text as C++: only `SOPHIA_LAUNCH` (a real launch here, a loop there) and the default
block size differ.
*/
#include "sophia_launcher.h"
#include "sophia_kernel.cuh"

#include <climits>
#include <cstdarg>
#include <cstdio>

// A launch on `stream`, no dynamic shared memory (the kernels use none). The CPU
// emulation defines its own `SOPHIA_LAUNCH` before including this file.
#if !defined(SOPHIA_LAUNCH)
#define SOPHIA_LAUNCH(kernel, grid, block, stream, ...) \
    kernel<<<(grid), (block), 0, static_cast<cudaStream_t>(stream)>>>(__VA_ARGS__)
#endif

namespace sophia {
namespace {

// ## Errors
//
// Each entry point returns `0` or an error code and leaves a message for
// `sophia_last_error()`. Per host thread, like CUDA's own last error.
enum Status { kOk = 0, kBadArgument = 1, kLaunchFailed = 2 };

thread_local char last_error[1024] = "";
thread_local int64_t launch_count = 0;

int fail(const int status, const char* format, ...) {
    va_list args;
    va_start(args, format);
    std::vsnprintf(last_error, sizeof last_error, format, args);
    va_end(args);
    return status;
}

// A launch is asynchronous: this catches a bad configuration, not a fault inside the
// kernel (that surfaces at the next synchronizing call, as for any CUDA kernel).
int check_launch(const char* kernel) {
    const cudaError_t error = cudaGetLastError();
    if (error != cudaSuccess) {
        return fail(kLaunchFailed, "launching %s failed: %s", kernel, cudaGetErrorString(error));
    }
    ++launch_count;
    return kOk;
}

// ## The packing in use
//
// The kernel's limits, or smaller ones that a test asked for with `sophia_set_packing`.
//
// The block size is the GPU's, `kBlockSize`, except in the CPU build. There a block's
// threads run one after another on one core, and thread `t`'s elements lie
// `kILP * blockDim.x` apart: a core would revisit every cache line once per thread.
// With one thread per block, that thread walks its chunk contiguously, which is what a
// core (and its prefetcher and vector unit) does best. The kernel is correct for any
// block size (the invariant), and the tests run the CPU build with the GPU's block size
// as well, so that its indexing is tested as the GPU runs it.
struct Packing {
    int64_t chunk_size;
    int max_blocks;
    int max_tensors;
    int block_size;
};

#if defined(SOPHIA_CPU_EMULATION)
constexpr int kDefaultBlockSize = 1;
#else
constexpr int kDefaultBlockSize = kBlockSize;
#endif

Packing packing_override = {0, 0, 0, 0};

Packing packing_for(const int depth) {
    const int max_tensors = max_tensors_per_launch(depth);
    Packing p = {kChunkSize, kMaxBlocksPerLaunch, max_tensors, kDefaultBlockSize};
    if (packing_override.chunk_size > 0) {
        p.chunk_size = packing_override.chunk_size;
    }
    if (packing_override.block_size > 0) {
        p.block_size = packing_override.block_size;
    }
    if (packing_override.max_blocks > 0) {
        p.max_blocks = packing_override.max_blocks;
    }
    if (packing_override.max_tensors > 0 && packing_override.max_tensors < max_tensors) {
        p.max_tensors = packing_override.max_tensors;
    }
    return p;
}

// ## Checking the lists
//
// The binding has checked the tensors; this checks what reaches the C interface, so
// that a bad call from anywhere fails with a message instead of a fault.
int check_lists(const char* where, const int n_tensors, const int depth, void* const* const* lists,
                const int64_t* numels) {
    if (n_tensors < 0) {
        return fail(kBadArgument, "%s: n_tensors must be >= 0, got %d", where, n_tensors);
    }
    if (n_tensors == 0) {
        return kOk;
    }
    if (numels == nullptr) {
        return fail(kBadArgument, "%s: numels is null", where);
    }
    for (int d = 0; d < depth; ++d) {
        if (lists[d] == nullptr) {
            return fail(kBadArgument, "%s: list %d is null", where, d);
        }
    }
    for (int t = 0; t < n_tensors; ++t) {
        if (numels[t] < 0) {
            return fail(kBadArgument, "%s: numels[%d] is negative (%lld)", where, t, static_cast<long long>(numels[t]));
        }
        for (int d = 0; d < depth; ++d) {
            if (numels[t] > 0 && lists[d][t] == nullptr) {
                return fail(kBadArgument, "%s: tensor %d of list %d has a null address", where, t, d);
            }
        }
    }
    return kOk;
}

// ## Packing tensors into launches
//
// `lists[d][t]` is the address of tensor `t` in list `d`. `launch(meta, blocks)` starts
// the kernel on a filled table. Empty tensors take no block.
template <int depth, typename Launch>
int pack_and_launch(const Packing& packing, const int n_tensors, void* const* const* lists, const int64_t* numels,
                    const Launch& launch) {
    TensorListMetadata<depth> meta;
    int tensors = 0;
    int blocks = 0;
    for (int t = 0; t < n_tensors; ++t) {
        if (numels[t] == 0) {
            continue;
        }
        const int64_t chunks = (numels[t] + packing.chunk_size - 1) / packing.chunk_size;
        if (chunks > INT_MAX) {
            return fail(kBadArgument, "tensor %d has %lld chunks, more than a block table entry holds", t,
                        static_cast<long long>(chunks));
        }

        // The table has no room for another tensor: launch what it holds.
        if (tensors == packing.max_tensors) {
            if (const int status = launch(meta, blocks)) {
                return status;
            }
            tensors = 0;
            blocks = 0;
        }
        for (int d = 0; d < depth; ++d) {
            meta.addresses[d][tensors] = lists[d][t];
        }
        meta.numel[tensors] = numels[t];
        ++tensors;

        for (int64_t chunk = 0; chunk < chunks; ++chunk) {
            // No room for another block: launch, and carry this tensor over to the
            // first entry of the next table.
            if (blocks == packing.max_blocks) {
                if (const int status = launch(meta, blocks)) {
                    return status;
                }
                for (int d = 0; d < depth; ++d) {
                    meta.addresses[d][0] = meta.addresses[d][tensors - 1];
                }
                meta.numel[0] = meta.numel[tensors - 1];
                tensors = 1;
                blocks = 0;
            }
            meta.block_to_tensor[blocks] = static_cast<unsigned char>(tensors - 1);
            meta.block_to_chunk[blocks] = static_cast<int>(chunk);
            ++blocks;
        }
    }
    if (blocks > 0) {
        return launch(meta, blocks);
    }
    return kOk;
}

// ## The two operations, for one storage type
template <typename T>
int launch_step(const int n_tensors, void* const* const* lists, const int64_t* numels, const StepArgs& args,
                void* stream) {
    const Packing packing = packing_for(4);
    const int64_t chunk_size = packing.chunk_size;
    return pack_and_launch<4>(packing, n_tensors, lists, numels, [&](const TensorListMetadata<4>& meta, const int blocks) {
        SOPHIA_LAUNCH(sophia_step_multi_tensor_kernel<T>, dim3(blocks), dim3(packing.block_size), stream, meta,
                      chunk_size, args);
        return check_launch("sophia_step_multi_tensor_kernel");
    });
}

template <typename T>
int launch_hessian_ema(const int n_tensors, void* const* const* lists, const int64_t* numels, const EmaArgs& args,
                       void* stream) {
    const Packing packing = packing_for(2);
    const int64_t chunk_size = packing.chunk_size;
    return pack_and_launch<2>(packing, n_tensors, lists, numels, [&](const TensorListMetadata<2>& meta, const int blocks) {
        SOPHIA_LAUNCH(hessian_ema_multi_tensor_kernel<T>, dim3(blocks), dim3(packing.block_size), stream, meta,
                      chunk_size, args);
        return check_launch("hessian_ema_multi_tensor_kernel");
    });
}

// The plain kernels: one launch per tensor, one thread per element.
constexpr int kSimpleBlockSize = 256;

int simple_grid(const int64_t n, dim3* grid) {
    const int64_t blocks = (n + kSimpleBlockSize - 1) / kSimpleBlockSize;
    if (blocks > INT_MAX) {
        return fail(kBadArgument, "a tensor of %lld elements is too large for the plain kernel",
                    static_cast<long long>(n));
    }
    *grid = dim3(static_cast<unsigned int>(blocks));
    return kOk;
}

template <typename T>
int launch_simple_step(const int n_tensors, void* const* const* lists, const int64_t* numels, const StepArgs& args,
                       void* stream) {
    for (int t = 0; t < n_tensors; ++t) {
        dim3 grid;
        if (numels[t] == 0) {
            continue;
        }
        if (const int status = simple_grid(numels[t], &grid)) {
            return status;
        }
        SOPHIA_LAUNCH(sophia_step_simple_kernel<T>, grid, dim3(kSimpleBlockSize), stream,
                      static_cast<T*>(lists[0][t]), static_cast<const T*>(lists[1][t]),
                      static_cast<T*>(lists[2][t]), static_cast<const T*>(lists[3][t]), numels[t], args);
        if (const int status = check_launch("sophia_step_simple_kernel")) {
            return status;
        }
    }
    return kOk;
}

template <typename T>
int launch_simple_hessian_ema(const int n_tensors, void* const* const* lists, const int64_t* numels,
                              const EmaArgs& args, void* stream) {
    for (int t = 0; t < n_tensors; ++t) {
        dim3 grid;
        if (numels[t] == 0) {
            continue;
        }
        if (const int status = simple_grid(numels[t], &grid)) {
            return status;
        }
        SOPHIA_LAUNCH(hessian_ema_simple_kernel<T>, grid, dim3(kSimpleBlockSize), stream,
                      static_cast<T*>(lists[0][t]), static_cast<const T*>(lists[1][t]), numels[t], args);
        if (const int status = check_launch("hessian_ema_simple_kernel")) {
            return status;
        }
    }
    return kOk;
}

// ## From a dtype code to a storage type
//
// `f(Tag<T>{})` for the storage type `T` of `dtype`.
template <typename T>
struct Tag {
    using type = T;
};

template <typename F>
int dispatch(const char* where, const int dtype, const F& f) {
    switch (dtype) {
        case 0:
            return f(Tag<float>{});
        case 1:
            return f(Tag<__half>{});
        case 2:
            return f(Tag<__nv_bfloat16>{});
        case 3:
            return f(Tag<double>{});
        default:
            return fail(kBadArgument,
                        "%s: unsupported dtype code %d (0 = float32, 1 = float16, 2 = bfloat16, 3 = float64)", where,
                        dtype);
    }
}

StepArgs step_args(const double lr, const float* lr_ptr, const double beta1, const double rho_bs,
                   const double weight_decay, const double eps, const int maximize, const float* grad_scale,
                   const float* found_inf) {
    StepArgs args;
    args.lr = lr;
    args.lr_ptr = lr_ptr;
    args.beta1 = beta1;
    args.rho_bs = rho_bs;
    args.weight_decay = weight_decay;
    args.eps = eps;
    args.grad_scale = grad_scale;
    args.found_inf = found_inf;
    args.maximize = maximize;
    return args;
}

// The step's entry points, fused or plain, share everything but the launch.
template <bool simple>
int step_entry(const char* where, const int dtype, const int n_tensors, void* const* params,
               const void* const* grads, void* const* exp_avgs, const void* const* hessians, const int64_t* numels,
               const StepArgs& args, void* stream) {
    launch_count = 0;
    void* const* lists[4] = {params, const_cast<void* const*>(grads), exp_avgs, const_cast<void* const*>(hessians)};
    if (const int status = check_lists(where, n_tensors, 4, lists, numels)) {
        return status;
    }
    return dispatch(where, dtype, [&](auto tag) {
        using T = typename decltype(tag)::type;
        return simple ? launch_simple_step<T>(n_tensors, lists, numels, args, stream)
                      : launch_step<T>(n_tensors, lists, numels, args, stream);
    });
}

template <bool simple>
int hessian_ema_entry(const char* where, const int dtype, const int n_tensors, void* const* hessians,
                      const void* const* estimates, const int64_t* numels, const EmaArgs& args, void* stream) {
    launch_count = 0;
    void* const* lists[2] = {hessians, const_cast<void* const*>(estimates)};
    if (const int status = check_lists(where, n_tensors, 2, lists, numels)) {
        return status;
    }
    return dispatch(where, dtype, [&](auto tag) {
        using T = typename decltype(tag)::type;
        return simple ? launch_simple_hessian_ema<T>(n_tensors, lists, numels, args, stream)
                      : launch_hessian_ema<T>(n_tensors, lists, numels, args, stream);
    });
}

}  // namespace
}  // namespace sophia

// ## The C entry points
extern "C" {

int sophia_fused_step(int dtype, int n_tensors, void* const* params, const void* const* grads, void* const* exp_avgs,
                      const void* const* hessians, const int64_t* numels, double lr, const float* lr_ptr,
                      double beta1, double rho_bs, double weight_decay, double eps, int maximize,
                      const float* grad_scale, const float* found_inf, void* stream) {
    const sophia::StepArgs args =
        sophia::step_args(lr, lr_ptr, beta1, rho_bs, weight_decay, eps, maximize, grad_scale, found_inf);
    return sophia::step_entry<false>("sophia_fused_step", dtype, n_tensors, params, grads, exp_avgs, hessians,
                                     numels, args, stream);
}

int sophia_fused_hessian_ema(int dtype, int n_tensors, void* const* hessians, const void* const* estimates,
                             const int64_t* numels, double beta2, int square, void* stream) {
    const sophia::EmaArgs args = {beta2, square};
    return sophia::hessian_ema_entry<false>("sophia_fused_hessian_ema", dtype, n_tensors, hessians, estimates,
                                            numels, args, stream);
}

const char* sophia_last_error(void) { return sophia::last_error; }

int sophia_simple_step(int dtype, int n_tensors, void* const* params, const void* const* grads, void* const* exp_avgs,
                       const void* const* hessians, const int64_t* numels, double lr, const float* lr_ptr,
                       double beta1, double rho_bs, double weight_decay, double eps, int maximize,
                       const float* grad_scale, const float* found_inf, void* stream) {
    const sophia::StepArgs args =
        sophia::step_args(lr, lr_ptr, beta1, rho_bs, weight_decay, eps, maximize, grad_scale, found_inf);
    return sophia::step_entry<true>("sophia_simple_step", dtype, n_tensors, params, grads, exp_avgs, hessians,
                                    numels, args, stream);
}

int sophia_simple_hessian_ema(int dtype, int n_tensors, void* const* hessians, const void* const* estimates,
                              const int64_t* numels, double beta2, int square, void* stream) {
    const sophia::EmaArgs args = {beta2, square};
    return sophia::hessian_ema_entry<true>("sophia_simple_hessian_ema", dtype, n_tensors, hessians, estimates,
                                           numels, args, stream);
}

int sophia_convert(int dtype, const float* src, void* stored, float* back, int64_t n, void* stream) {
    sophia::launch_count = 0;
    if (n < 0 || (n > 0 && (src == nullptr || stored == nullptr || back == nullptr))) {
        return sophia::fail(sophia::kBadArgument, "sophia_convert: bad arguments");
    }
    if (n == 0) {
        return sophia::kOk;
    }
    dim3 grid;
    if (const int status = sophia::simple_grid(n, &grid)) {
        return status;
    }
    return sophia::dispatch("sophia_convert", dtype, [&](auto tag) {
        using T = typename decltype(tag)::type;
        SOPHIA_LAUNCH(sophia::convert_kernel<T>, grid, dim3(sophia::kSimpleBlockSize), stream, src,
                      static_cast<T*>(stored), back, n);
        return sophia::check_launch("convert_kernel");
    });
}

int sophia_packing(int depth, int64_t* out) {
    if ((depth != 2 && depth != 4) || out == nullptr) {
        return sophia::fail(sophia::kBadArgument, "sophia_packing: depth must be 2 or 4, got %d", depth);
    }
    const sophia::Packing p = sophia::packing_for(depth);
    out[0] = p.chunk_size;
    out[1] = p.block_size;
    out[2] = sophia::kILP;
    out[3] = p.max_tensors;
    out[4] = p.max_blocks;
    out[5] = depth == 4 ? static_cast<int64_t>(sizeof(sophia::TensorListMetadata<4>) + sizeof(int64_t) +
                                               sizeof(sophia::StepArgs))
                        : static_cast<int64_t>(sizeof(sophia::TensorListMetadata<2>) + sizeof(int64_t) +
                                               sizeof(sophia::EmaArgs));
    out[6] = sophia::kBlockSize;
    return sophia::kOk;
}

int sophia_set_packing(int64_t chunk_size, int max_blocks, int max_tensors, int block_size) {
    if (chunk_size < 0 || chunk_size % sophia::kILP != 0) {
        return sophia::fail(sophia::kBadArgument,
                            "sophia_set_packing: chunk_size must be 0 or a positive multiple of %d, got %lld",
                            sophia::kILP, static_cast<long long>(chunk_size));
    }
    if (max_blocks < 0 || max_blocks > sophia::kMaxBlocksPerLaunch || max_tensors < 0 || block_size < 0 ||
        block_size > sophia::kBlockSize) {
        return sophia::fail(sophia::kBadArgument,
                            "sophia_set_packing: max_blocks must be in [0, %d], max_tensors >= 0, block_size in "
                            "[0, %d]",
                            sophia::kMaxBlocksPerLaunch, sophia::kBlockSize);
    }
    sophia::packing_override = {chunk_size, max_blocks, max_tensors, block_size};
    return sophia::kOk;
}

int64_t sophia_launch_count(void) { return sophia::launch_count; }

}  // extern "C"
