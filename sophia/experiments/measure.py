r"""
---
title: What the benchmark steps, and how it times them
summary: The benchmark's parameter set shaped like a small GPT's, its seeded tensors, the clock, the copy bandwidth and the machine's name.
---

The [benchmark](benchmark.html) decides *what* to time (the contenders) and prints the
table; this module holds what it measures with: a parameter set shaped like a small
transformer's, seeded weights and gradients with a copy per contender, the clock, the
memory bandwidth a step is held against, and the name of the machine.

## How the time is taken

* **Only `step()` is timed.** The gradients are random, drawn once with a fixed seed,
  and stay in place across steps, as they would between `backward()` and `step()`.
* **Every implementation gets its own copy** of the parameters and gradients, and its
  own state, so none reads memory another has just written.
* **The clock** is `time.perf_counter`. A GPU runs asynchronously (a `step()` returns
  once its kernels are queued), so on CUDA the clock is read only after
  `torch.cuda.synchronize()`, before and after the block.
* **No garbage collection** while a block runs, as in `timeit`: a collection that falls
  in one block would be charged to that implementation.
"""

from __future__ import annotations

import gc
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["transformer_like_shapes", "PASSES"]

# ## A parameter set shaped like a transformer's
#
# A foreach step's cost depends on *how* the parameters are split into tensors: many
# small tensors mean many kernel launches (GPU) or trips through the dispatcher (CPU).
# So the set mixes shapes as a GPT registers them: one **embedding** `(rows, d)`; then
# **blocks** of width `d` (the tensors of `_layer`), the last cut wherever the tensor
# count runs out; one **final vector**, the final layer norm's weight.
#
# The width `d` is the largest for which the layers hold at most `LAYER_SHARE` of all
# parameters (the embedding gets the rest, as in a small GPT) and `d * d` is at most
# the parameter count.
#
# **The counts are exact**: `n_tensors` tensors, `n_params` elements. The embedding's
# rows take the bulk of what the layers leave; the final vector, of length `d` plus
# the remainder, the rest. Where even `d = 1` does not fit, or there is one tensor,
# the set is `n_tensors` plain vectors whose lengths differ by at most one.
LAYER_SHARE = 0.8


# One transformer block of width $d$ in registration order, $12d^2 + 13d$ elements:
# layer norm weight and bias, attention in `(3d, d)` and its bias, attention out
# `(d, d)` and bias, a second layer norm, MLP up `(4d, d)`, bias, down `(d, 4d)`, bias.
def _layer(d: int) -> list[tuple[int, ...]]:
    return [
        (d,),
        (d,),
        (3 * d, d),
        (3 * d,),
        (d, d),
        (d,),
        (d,),
        (d,),
        (4 * d, d),
        (4 * d,),
        (d, 4 * d),
        (d,),
    ]


# `n` tensors of blocks of width `d`, block after block.
def _layers(d: int, n: int) -> list[tuple[int, ...]]:
    block = _layer(d)
    return [block[i % len(block)] for i in range(n)]


def _numel(shapes: list[tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes)


# The fallback: the first `n_params mod n_tensors` vectors one element longer.
def _vectors(n_params: int, n_tensors: int) -> list[tuple[int, ...]]:
    base, extra = divmod(n_params, n_tensors)
    return [(base + 1,) if i < extra else (base,) for i in range(n_tensors)]


def transformer_like_shapes(n_params: int, n_tensors: int) -> list[tuple[int, ...]]:
    r"""Shapes of `n_tensors` tensors holding exactly `n_params` elements, laid out
    like a small GPT's."""
    if not 1 <= n_tensors <= n_params:
        raise ValueError(
            f"need 1 <= n_tensors <= n_params, got n_tensors={n_tensors}, "
            f"n_params={n_params}"
        )
    # Two tensors are the embedding and the final vector; the layers get the rest.
    n_layers = n_tensors - 2

    # A width fits when the layers leave room for one embedding row and a final vector
    # of length `d`, stay within their share, and `d * d <= n_params`.
    def fits(d: int) -> bool:
        body = _numel(_layers(d, n_layers))
        return (
            body + 2 * d <= n_params
            and body <= LAYER_SHARE * n_params
            and d * d <= n_params
        )

    if n_tensors < 2 or not fits(1):
        return _vectors(n_params, n_tensors)

    # `fits` is monotone in `d`: doubling finds a `high` that does not fit, bisection
    # keeps `low` fitting and `high` not until they are adjacent.
    low, high = 1, 2
    while fits(high):
        low, high = high, 2 * high
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    d = low

    # With $N$ = `n_params` and $L$ the layers' elements, the embedding takes
    # $\lfloor (N - L - d)/d \rfloor$ rows of width $d$, and the final vector the
    # remaining $d + r$ elements, $0 \le r < d$: in all
    # $d\lfloor (N - L - d)/d \rfloor + L + d + r = N$.
    layers = _layers(d, n_layers)
    rows, remainder = divmod(n_params - _numel(layers) - d, d)
    return [(rows, d), *layers, (d + remainder,)]


# ## The parameters and their gradients
#
# Drawn once on the CPU in `float32` from one seeded generator, in a fixed order
# (weight, then gradient, tensor after tensor), so every device and dtype starts from
# the same numbers; then each contender gets its own converted copy.
INIT_STD = 0.02


def _master_tensors(
    shapes: list[tuple[int, ...]], seed: int
) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(s, generator=gen) * INIT_STD, torch.randn(s, generator=gen))
        for s in shapes
    ]


# `copy=True` because for `float32` on the CPU `.to` would return the master itself,
# and every contender would step the same memory.
def _copy_for(
    master: list[tuple[Tensor, Tensor]], device: torch.device, dtype: torch.dtype
) -> list[Tensor]:
    params = []
    for weight, grad in master:
        p = weight.to(device=device, dtype=dtype, copy=True).requires_grad_()
        p.grad = grad.to(device=device, dtype=dtype, copy=True)
        params.append(p)
    return params


# ## The clock
#
# One block of `steps` steps: synchronize, read the clock, step, synchronize, read the
# clock. The result is the time of one step, in seconds.
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_block(step: Callable[[], object], steps: int, device: torch.device) -> float:
    # The collector is restored in a `finally`, so an exception cannot leave it off.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        stop = time.perf_counter()
    finally:
        if gc_was_enabled:
            gc.enable()
    return (stop - start) / steps


# ## Memory bandwidth
#
# The step is bound by memory traffic. Per element Sophia's step must read `param`,
# `grad`, `exp_avg` and `hessian` and write `param` and `exp_avg`: six tensor-passes.
# AdamW reads four (`exp_avg_sq` too) and writes three: seven. With $P$ passes of $N$
# elements of $s$ bytes, a step of median time $t$ moves at least $PNs$ bytes:
# $$\text{GB/s} = \frac{P\,N\,s}{t}, \qquad
#   \text{fraction of copy} = \frac{P N s / t}{2 N s / t_{copy}} ,$$
# against a plain `dst.copy_(src)` (two passes) of a buffer as large as all the
# parameters. At equal bandwidth an ideal Sophia step takes the fraction
# `PASSES["SophiaG"] / PASSES["AdamW"]` of an ideal AdamW step, which is why the fused
# Sophia step should beat PyTorch's fused AdamW, not merely match it. For the
# reference and foreach versions, which move more (temporaries, `float32` working
# copies in `bfloat16`), the figure measures efficiency, not traffic. The step counter
# is left out. The non-finite check alone reads the gradients: one pass.
PASSES = {"SophiaG": 6, "AdamW": 7, "check": 1}


# One untimed copy faults the destination's pages in (and loads the kernel on a GPU);
# then as many timed blocks as the contenders get repeats, and their median.
def _copy_bandwidth(
    numel: int, dtype: torch.dtype, device: torch.device, repeats: int
) -> float:
    src = torch.ones(numel, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = [_time_block(lambda: dst.copy_(src), 5, device) for _ in range(repeats)]
    return 2 * numel * src.element_size() / statistics.median(times)


# ## The machine
#
# The GPU as its driver names it; the CPU model from `/proc/cpuinfo` on Linux, else
# what `platform` knows; any other device by its string (`xpu:0`).
def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or platform.machine() or "cpu"
    return str(device)
