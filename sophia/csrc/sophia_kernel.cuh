/*
---
title: The fused Sophia step, as a CUDA kernel
summary: The reference step, statement by statement, for one element in registers; a plain kernel, then a multi-tensor one.
---

The [reference](../reference.html) reads and writes every parameter tensor once per
*operation*: a multiply, an add, a clamp, a divide... each a pass over memory. On a
GPU the step is limited by memory traffic, not arithmetic, so the fastest step reads
each element of `param`, `grad`, `exp_avg` and `hessian` once, does all the math in
registers, and writes `param` and `exp_avg` once. This file is that step.

It is plain CUDA C++ with no PyTorch header, in three parts:

1. **The math of one element** (`sophia_step_element`, `hessian_ema_element`): the
   statements of `sophiag_reference` and `hessian_ema_reference`, in the same order,
   with the same names, each under a comment that quotes the reference line it
   implements.
2. **The plain kernel** (`sophia_step_simple_kernel`): one thread per element of one
   tensor. Read it first; only the tests' build launches it, against the production
   kernel.
3. **The multi-tensor kernel** (`sophia_step_multi_tensor_kernel`): one launch for
   many tensors, `kILP` elements per thread per iteration, with vector loads when the
   memory allows. This is the kernel the optimizer uses. The
   [launcher](sophia_launcher.html) packs the tensors into launches.

## The invariant

Every kernel here keeps one rule: **each thread reads and writes only its own
elements**. No shared memory, no `__syncthreads`, no atomics, no warp shuffles, no
communication between threads of any kind. (One write is shared, and harmless: the
non-finite check's flag, which a thread sets to one and no thread of the launch reads;
every writer stores the same value, so the order does not matter.) Nothing in Sophia's step needs it (the
update of one coordinate depends on that coordinate alone), and the rule buys two
things. The kernels are correct for any grid and block size and any order in which
the threads run. And so the [CPU emulation](cpu_emulation.html) may run this very
source, compiled by a C++ compiler, as plain loops over blocks and threads: the
tests on a machine without a GPU exercise the indexing, the chunking and the
vector/scalar paths of the code that runs on the GPU. `tests/test_nvcc.py` checks
the rule three ways: no construct that would break it in this file or the launcher,
no such instruction in the PTX that `nvcc` generates, and no barrier in `ptxas`'s
report.
*/
#pragma once

#include <cfloat>
#include <cstdint>

#include "sophia_launcher.h"

// On the GPU the half types come from the CUDA headers, and the check's flag is set
// with a plain store. Under the CPU emulation, `cpu_emulation.h` (included before this
// file) defines host types with the same names and bit-exact conversions, and a store
// its OpenMP threads may share; this is the one place this file differs between the
// two builds.
#if !defined(SOPHIA_CPU_EMULATION)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
__device__ __forceinline__ void sophia_set_flag(float* flag) { *flag = 1.0f; }
#endif

namespace sophia {

// ## Working precision ("opmath")
//
// As in the reference, the math of `float16` and `bfloat16` tensors is done in
// `float32`: each value is converted when it is loaded, and rounded once, to nearest
// even, when it is stored. `float32` math stays `float32` and `float64` stays
// `float64`. `OpMath<T>::type` is the working type for storage type `T`.
template <typename T>
struct OpMath {
    using type = float;
};
template <>
struct OpMath<double> {
    using type = double;
};

// Loading: storage to working precision. For the half types this is exact (every
// `float16` and `bfloat16` value is a `float32` value).
__device__ __forceinline__ float to_opmath(float x) { return x; }
__device__ __forceinline__ double to_opmath(double x) { return x; }
__device__ __forceinline__ float to_opmath(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_opmath(__nv_bfloat16 x) { return __bfloat162float(x); }

// Storing: working precision to storage, rounding to nearest even (`_rn`), which is
// what the reference's final `copy_` into a half-precision tensor does.
template <typename T>
__device__ __forceinline__ T from_opmath(typename OpMath<T>::type x);
template <>
__device__ __forceinline__ float from_opmath<float>(float x) { return x; }
template <>
__device__ __forceinline__ double from_opmath<double>(double x) { return x; }
template <>
__device__ __forceinline__ __half from_opmath<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_opmath<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// ## Where the rounding happens
//
// Each PyTorch op in the reference rounds its result once. To land on the same bits we
// must round at the same places, and a compiler left to itself does not: `nvcc`
// fuses `a * b + c` into one fused multiply-add (one rounding instead of two) whenever
// it sees the pattern, even across statements. So every operation below is an
// intrinsic with its rounding spelled out: `mul_rn` and `div_rn` round once,
// `fma_rn` computes $a b + c$ exactly and rounds once.
//
// Which one is right for each reference line? `t.add_(u, alpha=a)` and
// `t.addcmul_(u, v, value=a)` are fused multiply-adds in PyTorch: ATen writes them as
// `self + alpha * other`, which `nvcc` contracts on the GPU, and its CPU kernels
// evaluate with `vec::fmadd` (measured: the CPU results equal a single-rounding FMA on
// every element, and differ from two roundings on a few percent of them). `mul_`,
// the division and the clamps are single operations.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return __fma_rn(a, b, c); }

// ## The hyperparameters
//
// They arrive in the structs of the C interface (`sophia_launcher.h`) as `double`,
// exactly the Python numbers the reference receives. The reference computes
// `1 - lr * weight_decay` and `1 - beta1` in Python, in `double`, and PyTorch converts
// the result to the tensor's working type when it applies the op; we do the same
// arithmetic, in `double` with the same two roundings, then convert. (Computing
// `1 - beta1` in `float32` instead would give a different `float32` number for most
// `beta1`, and a different last bit in `exp_avg`.)
//
// `lr_ptr`, when not null, points to the learning rate in device memory and overrides
// `lr`: a step captured in a CUDA graph then follows a schedule that writes into that
// tensor between replays. `grad_scale` (nullable) is the loss scale of
// `torch.amp.GradScaler`, and `found_inf` (nullable) its overflow flag; see below.
using StepArgs = SophiaStepArgs;
using EmaArgs = SophiaEmaArgs;
using CheckArgs = SophiaCheckArgs;

// Reference: `_in_range(rho * bs, ...)` and `_in_range(eps, ...)`: a number above the
// working type's largest value becomes that value, one that would round to zero its
// smallest normal value, so that neither $0 \cdot \infty$ nor $0 / 0$ can make a NaN;
// any other number converts as it would have.
template <typename opmath_t>
struct Range;
template <>
struct Range<float> {
    static constexpr double largest = FLT_MAX;
    static constexpr float tiny = FLT_MIN;
};
template <>
struct Range<double> {
    static constexpr double largest = DBL_MAX;
    static constexpr double tiny = DBL_MIN;
};

template <typename opmath_t>
__device__ __forceinline__ opmath_t in_range(double x) {
    if (x > Range<opmath_t>::largest) {
        return static_cast<opmath_t>(Range<opmath_t>::largest);
    }
    const opmath_t rounded = static_cast<opmath_t>(x);
    return rounded == opmath_t(0) ? Range<opmath_t>::tiny : rounded;
}

// The same numbers in working precision, computed once per thread (not once per
// element) at the start of each kernel.
template <typename opmath_t>
struct StepCoefficients {
    opmath_t decay;
    opmath_t beta1;
    opmath_t one_minus_beta1;
    opmath_t rho_bs;
    opmath_t eps;
    opmath_t neg_lr;
    opmath_t grad_scale;
    bool maximize;
};

template <typename opmath_t>
__device__ __forceinline__ StepCoefficients<opmath_t> make_step_coefficients(const StepArgs& args) {
    const double lr = args.lr_ptr != nullptr ? static_cast<double>(*args.lr_ptr) : args.lr;
    StepCoefficients<opmath_t> c;
    c.decay = static_cast<opmath_t>(__dsub_rn(1.0, __dmul_rn(lr, args.weight_decay)));
    c.beta1 = static_cast<opmath_t>(args.beta1);
    c.one_minus_beta1 = static_cast<opmath_t>(__dsub_rn(1.0, args.beta1));
    c.rho_bs = in_range<opmath_t>(args.rho_bs);
    c.eps = in_range<opmath_t>(args.eps);
    c.neg_lr = static_cast<opmath_t>(-lr);
    c.grad_scale = args.grad_scale != nullptr ? static_cast<opmath_t>(*args.grad_scale) : opmath_t(1);
    c.maximize = args.maximize != 0;
    return c;
}

template <typename opmath_t>
struct EmaCoefficients {
    opmath_t beta2;
    opmath_t one_minus_beta2;
    bool square;
};

template <typename opmath_t>
__device__ __forceinline__ EmaCoefficients<opmath_t> make_ema_coefficients(const EmaArgs& args) {
    EmaCoefficients<opmath_t> c;
    c.beta2 = static_cast<opmath_t>(args.beta2);
    c.one_minus_beta2 = static_cast<opmath_t>(__dsub_rn(1.0, args.beta2));
    c.square = args.square != 0;
    return c;
}

// ## Skipping an overflowed step
//
// `torch.amp.GradScaler` sets `found_inf` to a non-zero value when some gradient
// overflowed; the step must then change nothing. Every thread reads the flag and
// returns before it touches memory. No thread has to tell another: each one decides
// alone, from the same flag, so the invariant holds.
__device__ __forceinline__ bool step_skipped(const float* found_inf) {
    return found_inf != nullptr && *found_inf != 0.0f;
}

// ## The step, for one element
//
// This is the loop body of `sophiag_reference`, for one coordinate, in working
// precision. `param` and `exp_avg` are updated in place (in registers); `grad` and
// `hessian` are read only.
template <typename opmath_t>
__device__ __forceinline__ void sophia_step_element(
    opmath_t& param, opmath_t grad, opmath_t& exp_avg, opmath_t hessian, const StepCoefficients<opmath_t>& c) {
    // Not in the reference, which receives unscaled gradients: with a `GradScaler`, the
    // gradient in memory is $s\,g_t$ for the loss scale $s$, and we unscale it as we read
    // it, $g_t = (s\,g_t)/s$. The gradient tensor itself is never written. Without a
    // scaler, `grad_scale` is one and the division is exact, so the line changes
    // nothing; written without a branch, it lets a C++ compiler vectorize this function
    // (the division is free on the GPU, where the step waits on memory).
    grad = div_rn(grad, c.grad_scale);

    // Reference: `grad = -grads[i]` when maximizing. Negation is exact.
    grad = c.maximize ? -grad : grad;

    // Reference: `param_w.mul_(1 - lr * weight_decay)`,
    // $\theta \leftarrow (1 - \eta_t\lambda)\,\theta$ (Algorithm 3, line 11).
    param = mul_rn(param, c.decay);

    // Reference: `exp_avg_w.mul_(beta1).add_(grad_w, alpha=1 - beta1)`,
    // $m_t = \beta_1 m_{t-1} + (1-\beta_1)\, g_t$ (Algorithm 3, line 6): a multiply, then
    // a fused multiply-add.
    exp_avg = mul_rn(exp_avg, c.beta1);
    exp_avg = fma_rn(grad, c.one_minus_beta1, exp_avg);

    // Reference: `denom = (hessian_w * rho_bs).clamp_(min=_in_range(eps, hessian_w.dtype))`,
    // $d_t = \max(\rho B h_t, \epsilon)$, the denominator of Algorithm 3, line 12, with
    // $\rho B$ and $\epsilon$ already brought into the working dtype's range (`c.rho_bs`,
    // `c.eps`).
    // The comparison is written so that a NaN passes through, as in `torch.clamp`:
    // `NaN < eps` is false, so a NaN stays a NaN. (`fmaxf` would return `eps` and
    // quietly hide a NaN in the Hessian.)
    opmath_t denom = mul_rn(hessian, c.rho_bs);
    denom = (denom < c.eps) ? c.eps : denom;

    // Reference: `update = (exp_avg_w / denom).clamp_(min=-1, max=1)`,
    // $u_t = \operatorname{clip}(m_t / d_t, 1)$, again letting a NaN through.
    opmath_t update = div_rn(exp_avg, denom);
    update = (update < opmath_t(-1)) ? opmath_t(-1) : update;
    update = (update > opmath_t(1)) ? opmath_t(1) : update;

    // Reference: `param_w.add_(update, alpha=-lr)`, $\theta_t = \theta_{t-1} - \eta_t u_t$
    // (Algorithm 3, line 12).
    param = fma_rn(update, c.neg_lr, param);
}

// ## The Hessian EMA, for one element
//
// Reference: `hessian_ema_reference`, the fold of Algorithm 3, lines 7-10. First
// `hessian_w.mul_(beta2)`, $h \leftarrow \beta_2 h$ (or zero when $\beta_2 = 0$, so that
// an infinite $h$ gives no $0 \cdot \infty$). Then, with `square`, the Gauss-Newton-Bartlett form
// `hessian_w.addcmul_(estimate_w, estimate_w, value=1 - beta2)`,
// $h \leftarrow h + (1-\beta_2)\,\hat g \odot \hat g$, which PyTorch evaluates as
// `self + (value * t1) * t2`: one rounded product, then a fused multiply-add. Without
// `square`, `hessian_w.add_(estimate_w, alpha=1 - beta2)`,
// $h \leftarrow h + (1-\beta_2)\,\hat h$, a fused multiply-add.
template <typename opmath_t>
__device__ __forceinline__ void hessian_ema_element(
    opmath_t& hessian, opmath_t estimate, const EmaCoefficients<opmath_t>& c) {
    hessian = c.beta2 == opmath_t(0) ? opmath_t(0) : mul_rn(hessian, c.beta2);
    if (c.square) {
        hessian = fma_rn(mul_rn(c.one_minus_beta2, estimate), estimate, hessian);
    } else {
        hessian = fma_rn(estimate, c.one_minus_beta2, hessian);
    }
}

// ## Step (a): the plain kernel
//
// One thread per element of one tensor: thread $i$ of the grid loads element $i$ of
// the four tensors, converts to working precision, runs the step, rounds and stores.
// The launcher starts $\lceil n / \text{block} \rceil$ blocks for a tensor of $n$
// elements, one launch per tensor. It is easy to check by eye, and it is the kernel
// the multi-tensor one is tested against; but a model with hundreds of tensors pays
// hundreds of launches, and each thread issues one narrow load per tensor. Part (b)
// fixes both. A template compiles only where it is launched, and only the tests' build
// (`SOPHIA_TESTING`) launches this one: it stays in this file to be read first.
template <typename T>
__global__ void sophia_step_simple_kernel(
    T* __restrict__ param, const T* __restrict__ grad, T* __restrict__ exp_avg, const T* __restrict__ hessian,
    const int64_t n, const StepArgs args) {
    using opmath_t = typename OpMath<T>::type;
    if (step_skipped(args.found_inf)) {
        return;
    }
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= n) {
        return;
    }
    const StepCoefficients<opmath_t> c = make_step_coefficients<opmath_t>(args);

    // Reference: the working copies, `param_w = _opmath(_as_real(param))` and so on
    // (complex tensors arrive already viewed as real).
    opmath_t param_i = to_opmath(param[i]);
    opmath_t exp_avg_i = to_opmath(exp_avg[i]);

    // Reference: the statements of the loop body.
    sophia_step_element(param_i, to_opmath(grad[i]), exp_avg_i, to_opmath(hessian[i]), c);

    // Reference: `_store(param, param_w)` and `_store(exp_avg, exp_avg_w)`, rounding once.
    param[i] = from_opmath<T>(param_i);
    exp_avg[i] = from_opmath<T>(exp_avg_i);
}

template <typename T>
__global__ void hessian_ema_simple_kernel(
    T* __restrict__ hessian, const T* __restrict__ estimate, const int64_t n, const EmaArgs args) {
    using opmath_t = typename OpMath<T>::type;
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= n) {
        return;
    }
    const EmaCoefficients<opmath_t> c = make_ema_coefficients<opmath_t>(args);
    opmath_t hessian_i = to_opmath(hessian[i]);
    hessian_ema_element(hessian_i, to_opmath(estimate[i]), c);
    hessian[i] = from_opmath<T>(hessian_i);
}

// ## Step (b): the multi-tensor kernel
//
// The idea is apex's `multi_tensor_apply` (and ATen's fused optimizers after it). The
// launcher cuts every tensor into **chunks** of `chunk_size` elements and gives each
// block of the grid one chunk of one tensor. A table passed *by value* as a kernel
// argument says, for block `b`, which tensor (`block_to_tensor[b]`) and which of its
// chunks (`block_to_chunk[b]`) it handles, and holds, per tensor, the address of each
// list's tensor and the element count. Many small tensors thus share one launch, and
// a large one is spread over many blocks.
//
// Kernel arguments live in a small constant bank whose size is capped at
// `kKernelParamBytes` on every GPU and toolkit we target, so the table is sized to fit
// it: per tensor, one address per list (`depth` lists) and one element count; per
// block, one byte for the tensor and one `int` for the chunk.
// `kMaxBlocksPerLaunch` blocks of `kChunkSize` elements keep a large GPU busy for one
// launch; the tensor capacity is whatever the rest of the bank allows once
// `kReservedParamBytes` are set aside for the other kernel arguments, and a
// `static_assert` below checks the total.
constexpr int kILP = 4;
constexpr int kBlockSize = 512;
constexpr int64_t kChunkSize = 65536;
constexpr int kMaxBlocksPerLaunch = 320;
constexpr int kKernelParamBytes = 4096;
constexpr int kReservedParamBytes = 256;

constexpr int max_tensors_per_launch(int depth) {
    return static_cast<int>(
        (kKernelParamBytes - kReservedParamBytes - kMaxBlocksPerLaunch * (sizeof(unsigned char) + sizeof(int))) /
        ((depth + 1) * sizeof(int64_t)));
}

template <int depth>
struct TensorListMetadata {
    void* addresses[depth][max_tensors_per_launch(depth)];
    int64_t numel[max_tensors_per_launch(depth)];
    unsigned char block_to_tensor[kMaxBlocksPerLaunch];
    int block_to_chunk[kMaxBlocksPerLaunch];
};

// The step has four lists (`param`, `grad`, `exp_avg`, `hessian`), the EMA two
// (`hessian`, `estimate`), the non-finite check one (`grad`). A block's tensor index
// must fit its byte in the table.
static_assert(sizeof(TensorListMetadata<4>) + sizeof(int64_t) + sizeof(StepArgs) <= kKernelParamBytes,
              "the step's kernel arguments must fit the kernel parameter bank");
static_assert(sizeof(TensorListMetadata<2>) + sizeof(int64_t) + sizeof(EmaArgs) <= kKernelParamBytes,
              "the EMA's kernel arguments must fit the kernel parameter bank");
static_assert(sizeof(TensorListMetadata<1>) + sizeof(int64_t) + sizeof(CheckArgs) <= kKernelParamBytes,
              "the check's kernel arguments must fit the kernel parameter bank");
static_assert(max_tensors_per_launch(1) <= 256 && max_tensors_per_launch(2) <= 256 &&
                  max_tensors_per_launch(4) <= 256,
              "block_to_tensor holds a tensor index in one byte");
static_assert(kChunkSize % kILP == 0, "a chunk must start on a vector boundary");

// ### Vector loads
//
// Memory is read fastest in wide transactions. When the addresses of a tensor in all
// lists are multiples of `kILP * sizeof(T)` bytes, a thread loads its `kILP` consecutive
// elements of each list with one instruction: `AlignedVector<T>` is `kILP` values with
// that alignment, so the compiler emits one wide load instead of `kILP` narrow ones.
// Chunks start at multiples of the chunk size, itself a multiple of `kILP`, so every
// chunk of an aligned tensor is aligned too.
template <typename T>
struct alignas(kILP * sizeof(T)) AlignedVector {
    T val[kILP];
};

template <typename T>
__device__ __forceinline__ bool is_aligned(const void* p) {
    return reinterpret_cast<uintptr_t>(p) % (kILP * sizeof(T)) == 0;
}

template <typename T>
__device__ __forceinline__ void load_vector(T (&dst)[kILP], const T* src) {
    const AlignedVector<T> v = *reinterpret_cast<const AlignedVector<T>*>(src);
#pragma unroll
    for (int ii = 0; ii < kILP; ++ii) {
        dst[ii] = v.val[ii];
    }
}

template <typename T>
__device__ __forceinline__ void store_vector(T* dst, const T (&src)[kILP]) {
    AlignedVector<T> v;
#pragma unroll
    for (int ii = 0; ii < kILP; ++ii) {
        v.val[ii] = src[ii];
    }
    *reinterpret_cast<AlignedVector<T>*>(dst) = v;
}

// ### One chunk, by one block
//
// The traversal below does not know Sophia. `Op` says which lists it writes
// (`Op::writes(list)`) and what to do with the `depth` working-precision values of one
// element (`op(x)`); the traversal loads and converts (the reference's working copies),
// calls `op` (its statements), rounds and stores (its `_store`).
//
// Each thread handles `kILP` elements per iteration, so that it has several loads in
// flight before it needs the first result (instruction-level parallelism, "ILP").
//
// * **Vector path**, when every list's address for this tensor is aligned: thread `t`
//   takes the `kILP` consecutive elements starting at `kILP * t`, then strides by
//   `kILP * blockDim.x`, covering the largest multiple of `kILP` that fits in the chunk.
// * **Scalar path**, for everything else: all of a misaligned tensor's chunk (a view
//   like `base[1:]` starts mid-vector), or the last `n % kILP` elements of an aligned
//   one. Thread `t` takes elements `t`, `t + blockDim.x`, ... (`kILP` of them per
//   iteration), so neighbouring threads still read neighbouring addresses.
//
// Either way each element of the chunk belongs to exactly one thread, which loads it,
// updates it and stores it: the invariant.
template <typename T, int depth, typename Op>
__device__ __forceinline__ void multi_tensor_chunk(const TensorListMetadata<depth>& meta, const int64_t chunk_size,
                                                   Op& op) {
    using opmath_t = typename OpMath<T>::type;
    const int tensor = meta.block_to_tensor[blockIdx.x];
    const int64_t offset = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * chunk_size;
    const int64_t left = meta.numel[tensor] - offset;
    const int64_t n = left < chunk_size ? left : chunk_size;
    const int64_t tid = threadIdx.x;
    const int64_t threads = blockDim.x;

    T* lists[depth];
    bool aligned = true;
#pragma unroll
    for (int d = 0; d < depth; ++d) {
        lists[d] = static_cast<T*>(meta.addresses[d][tensor]) + offset;
        aligned = aligned && is_aligned<T>(lists[d]);
    }

    // Vector path.
    const int64_t n_vector = aligned ? n - n % kILP : 0;
    for (int64_t i = tid * kILP; i < n_vector; i += threads * kILP) {
        T v[depth][kILP];
#pragma unroll
        for (int d = 0; d < depth; ++d) {
            load_vector(v[d], lists[d] + i);
        }
#pragma unroll
        for (int ii = 0; ii < kILP; ++ii) {
            opmath_t x[depth];
#pragma unroll
            for (int d = 0; d < depth; ++d) {
                x[d] = to_opmath(v[d][ii]);
            }
            op(x);
#pragma unroll
            for (int d = 0; d < depth; ++d) {
                if (Op::writes(d)) {
                    v[d][ii] = from_opmath<T>(x[d]);
                }
            }
        }
#pragma unroll
        for (int d = 0; d < depth; ++d) {
            if (Op::writes(d)) {
                store_vector(lists[d] + i, v[d]);
            }
        }
    }

    // Scalar path: first all the loads of an iteration, then the math, then the stores.
    for (int64_t start = n_vector; start < n; start += threads * kILP) {
        opmath_t x[kILP][depth];
#pragma unroll
        for (int ii = 0; ii < kILP; ++ii) {
            const int64_t i = start + tid + ii * threads;
            if (i < n) {
#pragma unroll
                for (int d = 0; d < depth; ++d) {
                    x[ii][d] = to_opmath(lists[d][i]);
                }
            }
        }
#pragma unroll
        for (int ii = 0; ii < kILP; ++ii) {
            const int64_t i = start + tid + ii * threads;
            if (i < n) {
                op(x[ii]);
#pragma unroll
                for (int d = 0; d < depth; ++d) {
                    if (Op::writes(d)) {
                        lists[d][i] = from_opmath<T>(x[ii][d]);
                    }
                }
            }
        }
    }
}

// ### The three operations
//
// The step's lists are, in order, `param`, `grad`, `exp_avg`, `hessian` (the order of
// the reference's arguments); it writes `param` and `exp_avg`. The EMA's are
// `hessian`, `estimate`; it writes `hessian`. The check's one list is the gradients,
// which it only reads.
template <typename opmath_t>
struct SophiaStepOp {
    StepCoefficients<opmath_t> c;
    __host__ __device__ static constexpr bool writes(int list) { return list == 0 || list == 2; }
    __device__ __forceinline__ void operator()(opmath_t (&x)[4]) const { sophia_step_element(x[0], x[1], x[2], x[3], c); }
};

template <typename opmath_t>
struct HessianEmaOp {
    EmaCoefficients<opmath_t> c;
    __host__ __device__ static constexpr bool writes(int list) { return list == 0; }
    __device__ __forceinline__ void operator()(opmath_t (&x)[2]) const { hessian_ema_element(x[0], x[1], c); }
};

// Is an element a NaN or an infinity? They are the values whose exponent bits are all
// ones, so adding one to a value's exponent field carries into the sign bit for them
// and for no other value. The thread `or`s those sums into `found`, and its answer is
// the top bit: integer operations with no branch and no comparison (on the CPU build,
// half again as fast as a floating-point test). A half-precision value is tested in
// working precision, where the conversion keeps NaNs and infinities what they are.
template <typename opmath_t>
struct Bits;
template <>
struct Bits<float> {
    using type = uint32_t;
    static constexpr type exponent = 0x7f800000u;
    static constexpr type exponent_one = 0x00800000u;
    __device__ __forceinline__ static type of(float x) { return __float_as_uint(x); }
};
template <>
struct Bits<double> {
    using type = uint64_t;
    static constexpr type exponent = 0x7ff0000000000000ull;
    static constexpr type exponent_one = 0x0010000000000000ull;
    __device__ __forceinline__ static type of(double x) { return static_cast<type>(__double_as_longlong(x)); }
};

template <typename opmath_t>
struct NonfiniteCheckOp {
    using B = Bits<opmath_t>;
    typename B::type found;
    __host__ __device__ static constexpr bool writes(int) { return false; }
    __device__ __forceinline__ void operator()(opmath_t (&x)[1]) {
        found |= (B::of(x[0]) & B::exponent) + B::exponent_one;
    }
    __device__ __forceinline__ bool any() const { return (found >> (8 * sizeof(found) - 1)) != 0; }
};

// ### The kernels
//
// One block per chunk, as listed in `meta`. A skipped step (`found_inf`) returns
// before reading anything else.
template <typename T>
__global__ void __launch_bounds__(kBlockSize)
    sophia_step_multi_tensor_kernel(const TensorListMetadata<4> meta, const int64_t chunk_size, const StepArgs args) {
    using opmath_t = typename OpMath<T>::type;
    if (step_skipped(args.found_inf)) {
        return;
    }
    SophiaStepOp<opmath_t> op{make_step_coefficients<opmath_t>(args)};
    multi_tensor_chunk<T>(meta, chunk_size, op);
}

template <typename T>
__global__ void __launch_bounds__(kBlockSize)
    hessian_ema_multi_tensor_kernel(const TensorListMetadata<2> meta, const int64_t chunk_size, const EmaArgs args) {
    using opmath_t = typename OpMath<T>::type;
    HessianEmaOp<opmath_t> op{make_ema_coefficients<opmath_t>(args)};
    multi_tensor_chunk<T>(meta, chunk_size, op);
}

// The check: every thread reads its elements of the gradients, and one that found a
// NaN or an infinity sets `args.found` to one. Nothing else is written, so the flag is
// the whole output, and the step that follows takes it as `found_inf`.
template <typename T>
__global__ void __launch_bounds__(kBlockSize)
    nonfinite_check_multi_tensor_kernel(const TensorListMetadata<1> meta, const int64_t chunk_size,
                                        const CheckArgs args) {
    using opmath_t = typename OpMath<T>::type;
    NonfiniteCheckOp<opmath_t> op{0};
    multi_tensor_chunk<T>(meta, chunk_size, op);
    if (op.any()) {
        sophia_set_flag(args.found);
    }
}

// ## For the tests: storage conversions alone
//
// Rounds `float32` values to storage type `T` and back, with the conversions the
// kernels use, so the tests can compare them with PyTorch's on any values (ties,
// subnormals, infinities, NaN). Launched by the tests' build only.
template <typename T>
__global__ void convert_kernel(const float* __restrict__ src, T* __restrict__ stored, float* __restrict__ back,
                               const int64_t n) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= n) {
        return;
    }
    const T s = from_opmath<T>(static_cast<typename OpMath<T>::type>(src[i]));
    stored[i] = s;
    back[i] = static_cast<float>(to_opmath(s));
}

}  // namespace sophia
