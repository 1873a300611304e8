/*
---
title: The launcher
summary: Packs lists of tensors into as few launches of the multi-tensor kernel as the argument bank allows.
---

The [kernel](sophia_kernel.html) handles one chunk of one tensor per block, and learns
which from a table passed by value at launch. This file fills that table. It walks the
tensors in order, cuts each into chunks of `chunk_size` elements, and gives one block
to each chunk, launching the kernel whenever the table is full:

* **many small tensors** share a launch, up to `max_tensors_per_launch(depth)` of them;
* **a large tensor** gets one block per chunk; if its chunks do not all fit in the
  launch being filled, the launch goes and the tensor carries over, as the first entry
  of the next table, with its remaining chunks;
* **more tensors than fit** simply make several launches.

For example, with room for two blocks per launch, tensors of 1, 3 and 1 chunks launch
as `[a0 b0] [b1 b2] [c0]`, and `b` appears in the first two tables.

The step, the Hessian EMA and the non-finite check share every line here: they differ
in their argument struct, which picks the kernel and the number of lists. The [CPU build](launcher_cpu.html)
compiles this same text as C++, where only `SOPHIA_LAUNCH` (a real launch here, a loop
there) and the default block size differ; see
[how the fused kernel is built](../../engineering/kernel.md).
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
// An error code, and a message for `sophia_last_error()`, per host thread like CUDA's
// own last error. The launch count costs one increment per launch; only the tests' build
// reads it.
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
int check_launch() {
    const cudaError_t error = cudaGetLastError();
    if (error != cudaSuccess) {
        return fail(kLaunchFailed, "a kernel launch failed: %s", cudaGetErrorString(error));
    }
    ++launch_count;
    return kOk;
}

// ## The packing in use
//
// The kernel's limits, or smaller ones a test set with `sophia_set_packing`. The CPU
// build runs one thread per block, which walks its chunk contiguously, as a core does
// best; the kernel is correct for any block size.
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

// ## Packing tensors into launches
//
// `launch(meta, blocks)` starts the kernel on a filled table. Empty tensors take no
// block.
template <int depth, typename Launch>
int pack_and_launch(const Packing& packing, const SophiaTensorLists& tensors, const Launch& launch) {
    TensorListMetadata<depth> meta;
    int n = 0;
    int blocks = 0;
    for (int t = 0; t < tensors.n_tensors; ++t) {
        const int64_t numel = tensors.numels[t];
        if (numel == 0) {
            continue;
        }
        const int64_t chunks = (numel + packing.chunk_size - 1) / packing.chunk_size;
        if (chunks > INT_MAX) {
            return fail(kBadArgument, "tensor %d has %lld chunks, more than a block table entry holds", t,
                        static_cast<long long>(chunks));
        }

        // The table has no room for another tensor: launch what it holds.
        if (n == packing.max_tensors) {
            if (const int status = launch(meta, blocks)) {
                return status;
            }
            n = 0;
            blocks = 0;
        }
        for (int d = 0; d < depth; ++d) {
            meta.addresses[d][n] = tensors.lists[d][t];
        }
        meta.numel[n] = numel;
        ++n;

        for (int64_t chunk = 0; chunk < chunks; ++chunk) {
            // No room for another block: launch, and carry this tensor over to the
            // first entry of the next table.
            if (blocks == packing.max_blocks) {
                if (const int status = launch(meta, blocks)) {
                    return status;
                }
                for (int d = 0; d < depth; ++d) {
                    meta.addresses[d][0] = meta.addresses[d][n - 1];
                }
                meta.numel[0] = meta.numel[n - 1];
                n = 1;
                blocks = 0;
            }
            meta.block_to_tensor[blocks] = static_cast<unsigned char>(n - 1);
            meta.block_to_chunk[blocks] = static_cast<int>(chunk);
            ++blocks;
        }
    }
    if (blocks > 0) {
        return launch(meta, blocks);
    }
    return kOk;
}

// ## One launch path for both operations
//
// The argument struct picks the kernel, and the kernel's table type the number of
// lists (`depth`).
template <typename T>
auto multi_tensor_kernel(const StepArgs&) {
    return sophia_step_multi_tensor_kernel<T>;
}

template <typename T>
auto multi_tensor_kernel(const EmaArgs&) {
    return hessian_ema_multi_tensor_kernel<T>;
}

template <typename T>
auto multi_tensor_kernel(const CheckArgs&) {
    return nonfinite_check_multi_tensor_kernel<T>;
}

struct MultiTensor {
    template <int depth, typename Args>
    static int launch(void (*kernel)(TensorListMetadata<depth>, int64_t, Args), const SophiaTensorLists& tensors,
                      const Args& args, void* stream) {
        const Packing packing = packing_for(depth);
        return pack_and_launch<depth>(packing, tensors, [&](const TensorListMetadata<depth>& meta, const int blocks) {
            SOPHIA_LAUNCH(kernel, dim3(blocks), dim3(packing.block_size), stream, meta, packing.chunk_size, args);
            return check_launch();
        });
    }

    template <typename T, typename Args>
    static int run(const SophiaTensorLists& tensors, const Args& args, void* stream) {
        return launch(multi_tensor_kernel<T>(args), tensors, args, stream);
    }
};

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

// Every entry point: `Launcher::run<T>` for the call's storage type. The binding has
// checked the tensors (see [the binding](binding.html)).
template <typename Launcher, typename Args>
int entry(const char* where, const SophiaTensorLists* tensors, const Args* args, void* stream) {
    launch_count = 0;
    return dispatch(where, tensors->dtype, [&](auto tag) {
        return Launcher::template run<typename decltype(tag)::type>(*tensors, *args, stream);
    });
}

// ## The plain kernels, for the tests' build
//
// One launch per tensor, one thread per element.
#if defined(SOPHIA_TESTING)
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

struct Simple {
    // `launch(t, grid)` launches the kernel on tensor `t`.
    template <typename Launch>
    static int each_tensor(const SophiaTensorLists& tensors, const Launch& launch) {
        for (int t = 0; t < tensors.n_tensors; ++t) {
            dim3 grid;
            if (tensors.numels[t] == 0) {
                continue;
            }
            if (const int status = simple_grid(tensors.numels[t], &grid)) {
                return status;
            }
            launch(t, grid);
            if (const int status = check_launch()) {
                return status;
            }
        }
        return kOk;
    }

    template <typename T>
    static int run(const SophiaTensorLists& tensors, const StepArgs& args, void* stream) {
        void* const* const* l = tensors.lists;
        return each_tensor(tensors, [&](const int t, const dim3 grid) {
            SOPHIA_LAUNCH(sophia_step_simple_kernel<T>, grid, dim3(kSimpleBlockSize), stream,
                          static_cast<T*>(l[0][t]), static_cast<const T*>(l[1][t]), static_cast<T*>(l[2][t]),
                          static_cast<const T*>(l[3][t]), tensors.numels[t], args);
        });
    }

    template <typename T>
    static int run(const SophiaTensorLists& tensors, const EmaArgs& args, void* stream) {
        void* const* const* l = tensors.lists;
        return each_tensor(tensors, [&](const int t, const dim3 grid) {
            SOPHIA_LAUNCH(hessian_ema_simple_kernel<T>, grid, dim3(kSimpleBlockSize), stream,
                          static_cast<T*>(l[0][t]), static_cast<const T*>(l[1][t]), tensors.numels[t], args);
        });
    }
};
#endif

}  // namespace
}  // namespace sophia

// ## The C entry points
extern "C" {

int sophia_fused_step(const SophiaTensorLists* tensors, const SophiaStepArgs* args, void* stream) {
    return sophia::entry<sophia::MultiTensor>("sophia_fused_step", tensors, args, stream);
}

int sophia_fused_hessian_ema(const SophiaTensorLists* tensors, const SophiaEmaArgs* args, void* stream) {
    return sophia::entry<sophia::MultiTensor>("sophia_fused_hessian_ema", tensors, args, stream);
}

int sophia_nonfinite_check(const SophiaTensorLists* tensors, const SophiaCheckArgs* args, void* stream) {
    return sophia::entry<sophia::MultiTensor>("sophia_nonfinite_check", tensors, args, stream);
}

const char* sophia_last_error(void) { return sophia::last_error; }

#if defined(SOPHIA_TESTING)
int sophia_simple_step(const SophiaTensorLists* tensors, const SophiaStepArgs* args, void* stream) {
    return sophia::entry<sophia::Simple>("sophia_simple_step", tensors, args, stream);
}

int sophia_simple_hessian_ema(const SophiaTensorLists* tensors, const SophiaEmaArgs* args, void* stream) {
    return sophia::entry<sophia::Simple>("sophia_simple_hessian_ema", tensors, args, stream);
}

int sophia_convert(int dtype, const float* src, void* stored, float* back, int64_t n, void* stream) {
    sophia::launch_count = 0;
    dim3 grid;
    if (n <= 0) {
        return sophia::kOk;
    }
    if (const int status = sophia::simple_grid(n, &grid)) {
        return status;
    }
    return sophia::dispatch("sophia_convert", dtype, [&](auto tag) {
        using T = typename decltype(tag)::type;
        SOPHIA_LAUNCH(sophia::convert_kernel<T>, grid, dim3(sophia::kSimpleBlockSize), stream, src,
                      static_cast<T*>(stored), back, n);
        return sophia::check_launch();
    });
}

int sophia_packing(int depth, int64_t* out) {
    if (depth != 2 && depth != 4) {
        return sophia::fail(sophia::kBadArgument, "sophia_packing: depth must be 2 or 4, got %d", depth);
    }
    const sophia::Packing p = sophia::packing_for(depth);
    out[0] = p.chunk_size;
    out[1] = p.block_size;
    out[2] = sophia::kILP;
    out[3] = p.max_tensors;
    out[4] = p.max_blocks;
    out[5] = static_cast<int64_t>(depth == 4 ? sizeof(sophia::TensorListMetadata<4>) + sizeof(sophia::StepArgs)
                                             : sizeof(sophia::TensorListMetadata<2>) + sizeof(sophia::EmaArgs)) +
             static_cast<int64_t>(sizeof(int64_t));
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
#endif

}  // extern "C"
