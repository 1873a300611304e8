r"""
---
title: How fast is one step?
summary: A benchmark of the optimizer step alone - the reference, the torch._foreach version, the fused kernel and torch.optim.AdamW on the same parameters.
---

# How fast is one step?

Per coordinate, Sophia's step reads and writes as much memory as AdamW's (the
parameter, its gradient and two state tensors), but its clipped step takes more
separate operations, each a pass over memory: a multiplication and a clamp for the
denominator, a division, and a clamp to $[-1, 1]$ in two ops, with two temporary
tensors, where AdamW's denominator takes a square root and an addition, with one. This page measures
what that costs. It times the **optimizer step alone** (no forward pass, no backward
pass) of

* `SophiaG(params, foreach=False)`, the [reference](reference.html), one tensor at a time;
* `SophiaG(params, foreach=True)`, the [`torch._foreach` version](foreach.html);
* `SophiaG(params, fused=True)`, the [fused kernel](fused.html): on CUDA, or on the CPU
  its CPU build (the same kernel source compiled as C++);
* `torch.optim.AdamW(params, foreach=True)`, the **baseline**, what most people train with;
* `torch.optim.AdamW(params, foreach=False)`, for context: how much foreach buys AdamW
  on the same machine;
* `torch.optim.AdamW(params, fused=True)`, PyTorch's own fused kernel, the bar for ours;

on one synthetic set of parameters, shaped like a small transformer's. Run it with

```
python -m sophia.benchmark                      # the defaults: see --help
python -m sophia.benchmark --device cpu --dtype bfloat16 --json step.json
```

It prints the machine (device, torch version, CPU threads), the parameter set
(parameters and tensors, counted from the tensors themselves) and a table: per
implementation, the median and the minimum time of one step in milliseconds, the
median divided by the baseline's median **from the same run**, and the effective memory
bandwidth of the step as a fraction of the device's copy bandwidth (see below).

On a GPU the targets are: the fused step at 85% or more of copy bandwidth and faster
than PyTorch's fused AdamW (Sophia must move six tensor-passes per element, AdamW
seven), and the foreach step no slower than AdamW's foreach step.

**Read the ratios, not the milliseconds.** Absolute times say more about the machine than
about the code; a ratio to AdamW measured seconds apart on the same machine, with the
same parameters, carries over from one machine to another much better. A whole training
step (forward, backward and optimizer) of a transformer is dominated by the matrix
multiplications, so a ratio well above one here can still be a small share of the
training step: time the whole step before holding this one against the paper's claim of
halving the number of steps.

## How the time is taken

* **Only `step()` is timed.** The gradients are random, drawn once with a fixed seed,
  and stay in place across steps, as they would between `backward()` and `step()`.
  Sophia's Hessian EMA is filled once before timing (`update_hessian()`, which in the
  Gauss-Newton-Bartlett convention folds $g \odot g$ into $h$), so the step divides
  by a non-zero $h$ and the clip takes both branches, as in training. Its cost is not
  in the step time: in training it runs once every $k$ steps.
* **Every implementation gets its own copy** of the parameters and of the gradients,
  and its own state, so none of them reads memory another has just written.
* **Warm-up steps** come first, untimed: the first step allocates the optimizer's state,
  and on a GPU the first calls load kernels and fill the caching allocator.
* **Repeats, round-robin.** Then the run does several repeats; in each, every
  implementation takes a block of steps in turn, and the block's time divided by its
  length is one sample of the per-step time. Because the implementations take turns, a
  slow drift of the machine's load (another process, a CPU that heats and slows down)
  hits them all alike, instead of whichever happened to be timed last. The order
  rotates from one repeat to the next, so no implementation always follows the same
  neighbour.
* **Median, and minimum.** The table reports the median of the samples, which one
  disturbed repeat does not move, and the minimum, the best the code can do when
  nothing gets in the way. The ratio uses the medians.
* **The clock** is `time.perf_counter`, the highest-resolution monotonic clock Python has.
  A GPU runs asynchronously: a `step()` returns once its kernels are queued, not done.
  So on CUDA the run calls `torch.cuda.synchronize()` before starting the clock (nothing
  earlier is still running) and before stopping it (everything queued has finished).
* **No garbage collection** while a block runs, as in `timeit`: a collection that
  happens to fall in one block would be charged to that implementation.

## Two traps on a CPU

On a CPU the step is bound by memory, and two things outside the optimizer's code can
outweigh the code itself; both show as a minimum far below the median, or as a large
system time.

* **Threads that spin.** Between parallel regions torch's OpenMP threads spin, waiting
  for work. On a virtual machine with few cores, shared with other processes, a thread
  may wait for a core for a whole scheduler slice on every parallel operation. Compare
  with `--threads 1`, or with `OMP_WAIT_POLICY=PASSIVE` in the environment.
* **Fresh memory.** An out-of-place operation allocates its result. Large blocks come
  straight from the operating system, and the first write to each page is a page fault.
  A foreach version holds its temporaries for *all* tensors at once, so it asks for, and
  faults in, far more fresh memory per step than a loop that frees each tensor's
  temporaries before the next; the reference also keeps each tensor in cache for all
  its operations, where each foreach operation streams every tensor through memory.

## Extending it

The implementations are a list of `(name, factory)` pairs built in one place,
`contenders()`; a factory takes the parameters (with their gradients set) and returns a
function that takes one step. A new implementation is one more pair there; one that
cannot run on the device at hand (a fused kernel that does not build) is listed with the
reason instead of a time.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

# Only the public class is imported: every Sophia contender is `SophiaG` with a flag, so
# what is timed is what a user runs, dispatch included.
from ..optimizer import SophiaG

__all__ = ["main", "transformer_like_shapes", "contenders"]


# ## Defaults
#
# The default parameter set is the size of a small GPT. The default numbers of steps and
# repeats keep the whole run to a minute or two on a small CPU, and to seconds on a GPU;
# an odd number of repeats makes the median one of the samples. The number of predictions per step, $B$ (`bs` in Sophia's `step`), only
# scales the Hessian and does not change the work done; it is the reference code's default.
DEFAULT_PARAMS = 10_000_000
DEFAULT_TENSORS = 100
DEFAULT_STEPS = 10
DEFAULT_REPEATS = 7
DEFAULT_WARMUP = 3
DEFAULT_SEED = 0
BS = 5120
# The names are the table's labels and the keys of the results. `BASELINE` is the one
# every ratio divides by: AdamW's foreach step, PyTorch's default on a GPU. The two
# fused names are those that may be missing on a machine, and the text before the
# parenthesis is the optimizer's name, which `PASSES` is keyed by. `DTYPES` are the
# choices of `--dtype`: full precision, and the half precision that large models are
# usually trained in.
BASELINE = "AdamW(foreach=True)"
FUSED_SOPHIA = "SophiaG(fused=True)"
FUSED_ADAMW = "AdamW(fused=True)"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ## A parameter set shaped like a transformer's
#
# The cost of a foreach step depends on *how* the parameters are split into tensors, not
# only on how many there are: many small tensors mean many kernel launches (on a GPU)
# or many trips through the dispatcher (on a CPU). So the synthetic set mixes shapes the
# way a GPT does, in the order a GPT registers them:
#
# * one **embedding** matrix `(rows, d)`, first;
# * then **blocks** of a transformer layer of width `d`, repeated: layer-norm weight and
#   bias `(d,)`, the attention's input projection `(3d, d)` and its bias `(3d,)`, its
#   output projection `(d, d)` and bias `(d,)`, a second layer norm, the MLP's
#   `(4d, d)`, `(4d,)`, `(d, 4d)`, `(d,)`; the last block is cut wherever the tensor
#   count runs out;
# * one **final vector**, last, the final layer norm's weight.
#
# The width `d` is the largest for which the layers hold no more than `LAYER_SHARE` of
# all parameters (so the embedding gets the rest, as in a small GPT), and no larger than
# the square root of the parameter count (the bound that counts when there are no
# layers, with two tensors).
#
# **The counts are exact.** There are exactly `n_tensors` tensors and exactly `n_params`
# parameters: the embedding's row count takes the bulk of what the layers leave, and the
# final vector, of length `d` plus the remainder (fewer than `d` elements), takes the
# rest. Where even `d = 1` does not fit (very few parameters per tensor), or there is a
# single tensor, the set is `n_tensors` plain vectors whose lengths differ by at most one.
LAYER_SHARE = 0.8


# The tensors of one transformer block of width $d$, in registration order, as listed
# above: in all $12d^2 + 13d$ elements.
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


# `n` tensors of blocks of width `d`, block after block; the last block is cut after its
# `n`-th tensor.
def _layers(d: int, n: int) -> list[tuple[int, ...]]:
    block = _layer(d)
    return [block[i % len(block)] for i in range(n)]


# Elements in a list of shapes.
def _numel(shapes: list[tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes)


# The fallback: `n_tensors` vectors whose lengths add up to `n_params`, the first
# `n_params mod n_tensors` of them one element longer.
def _vectors(n_params: int, n_tensors: int) -> list[tuple[int, ...]]:
    base, extra = divmod(n_params, n_tensors)
    return [(base + 1,) if i < extra else (base,) for i in range(n_tensors)]


def transformer_like_shapes(n_params: int, n_tensors: int) -> list[tuple[int, ...]]:
    r"""Shapes of `n_tensors` tensors holding exactly `n_params` elements, laid out like a small GPT's."""
    if not 1 <= n_tensors <= n_params:
        raise ValueError(
            f"need 1 <= n_tensors <= n_params, got n_tensors={n_tensors}, n_params={n_params}"
        )
    # Two tensors are the embedding and the final vector; the layers get the rest.
    n_layers = n_tensors - 2

    # The width fits when the layers leave room for an embedding with at least one
    # row and a final vector of length `d`, when they stay within their share, and
    # when `d * d` is at most the parameter count.
    def fits(d: int) -> bool:
        body = _numel(_layers(d, n_layers))
        return (
            body + 2 * d <= n_params
            and body <= LAYER_SHARE * n_params
            and d * d <= n_params
        )

    # Fewer than two tensors, or too few parameters for even a width of one: plain vectors.
    if n_tensors < 2 or not fits(1):
        return _vectors(n_params, n_tensors)

    # `fits` is monotone in `d`, so the largest width is found by doubling, then bisecting.
    #
    # Doubling finds a `high` that does not fit in a logarithmic number of calls; bisection
    # then keeps `low` fitting and `high` not until they are adjacent, so `d = low` is the
    # largest width that fits.
    low, high = 1, 2
    while fits(high):
        low, high = high, 2 * high
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    d = low

    # With $N$ = `n_params` and $L$ the layers' elements, the embedding takes
    # $\lfloor (N - L - d)/d \rfloor$ rows of width $d$ (at least one, by `fits`), and the
    # final vector the remaining $d + r$ elements, $0 \le r < d$: in all
    # $d\lfloor (N - L - d)/d \rfloor + L + d + r = N$.
    layers = _layers(d, n_layers)
    rows, remainder = divmod(n_params - _numel(layers) - d, d)
    return [(rows, d), *layers, (d + remainder,)]


# ## The contenders
#
# Each factory receives the parameters, with their gradients already set, and returns a
# function that takes one step with the optimizer's ordinary API. Whatever must happen
# once before timing happens in the factory: for Sophia, one Hessian refresh from the
# gradients in place.
#
# A step is a call with no arguments; what it returns is ignored.
Step = Callable[[], object]


# Sophia with the constructor's defaults and `flags`. The refresh in the factory folds
# $g \odot g$ into $h$ once, untimed, so that the timed steps see a non-zero $h$ and
# the clip takes both branches. Each timed step is `step(bs=BS)`, the public call.
#
# `nonfinite` is the optimizer's rule for NaN and infinity (see the
# [optimizer](optimizer.html)): its default, `"raise"`, reads every gradient once more
# per step to look for them, which AdamW does not do; `--nonfinite unchecked` times the
# step without that look, for a like-for-like comparison of the update itself.
def _sophiag(nonfinite: str = "raise", **flags: bool) -> Callable[[list[Tensor]], Step]:
    def make(params: list[Tensor]) -> Step:
        opt = SophiaG(params, nonfinite=nonfinite, **flags)
        opt.update_hessian()
        return lambda: opt.step(bs=BS)

    return make


# AdamW with PyTorch's defaults and `flags`; its step is its bound `step` method. The
# values of the hyperparameters do not change the work done, so the defaults serve.
def _adamw(**flags: bool) -> Callable[[list[Tensor]], Step]:
    def make(params: list[Tensor]) -> Step:
        opt = torch.optim.AdamW(params, **flags)
        return opt.step

    return make


# The fused contenders run where they can: Sophia's kernel where it builds (on CUDA, or
# its CPU build), PyTorch's fused AdamW where PyTorch has it for this device and dtype.
# Where one cannot run, the report says why instead of timing it.
def _fused_sophia_unavailable(device: torch.device) -> str | None:
    # A kernel that does not build here (no compiler, no CUDA toolkit) gives the first line
    # of the reason, for the table.
    from .. import fused

    try:
        fused.load_extension(device.type)
    except (fused.FusedUnavailableError, ValueError) as error:
        return str(error).splitlines()[0]
    return None


def _fused_adamw_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    # Whether PyTorch's fused AdamW runs here is asked of PyTorch itself: one step on a
    # tiny parameter of this device and dtype. Its support has changed between
    # releases, so trying is more reliable than a list of devices; the error, if any, is
    # its own explanation.
    try:
        p = torch.zeros(4, device=device, dtype=dtype, requires_grad=True)
        p.grad = torch.ones_like(p)
        torch.optim.AdamW([p], fused=True).step()
    except (RuntimeError, ValueError) as error:
        return str(error).splitlines()[0]
    return None


def contenders(
    device: torch.device = torch.device("cpu"),
    dtype: torch.dtype = torch.float32,
    nonfinite: str = "raise",
) -> list[tuple[str, Callable[[list[Tensor]], Step]]]:
    r"""The implementations to time on `device`, as `(name, factory)` pairs; one of the names is `BASELINE`."""
    # The order of this list is the order of the table. The fused contenders that cannot run
    # are filtered out here and reported by `unavailable`.
    found = [
        ("SophiaG(foreach=False)", _sophiag(nonfinite, foreach=False)),
        ("SophiaG(foreach=True)", _sophiag(nonfinite, foreach=True)),
        (FUSED_SOPHIA, _sophiag(nonfinite, fused=True)),
        (BASELINE, _adamw(foreach=True)),
        ("AdamW(foreach=False)", _adamw(foreach=False)),
        (FUSED_ADAMW, _adamw(fused=True)),
    ]
    missing = unavailable(device, dtype)
    # The list, less the contenders that cannot run here.
    return [(name, make) for name, make in found if name not in missing]


def unavailable(device: torch.device, dtype: torch.dtype) -> dict[str, str]:
    r"""The fused contenders that cannot run on `device` with `dtype`, with the reason."""
    # Only the fused contenders can be missing: the reference and foreach steps run on any
    # device PyTorch runs on.
    reasons = {
        FUSED_SOPHIA: _fused_sophia_unavailable(device),
        FUSED_ADAMW: _fused_adamw_unavailable(device, dtype),
    }
    return {name: reason for name, reason in reasons.items() if reason is not None}


# ## Memory bandwidth
#
# The step is bound by memory traffic, so the honest measure of a fused step is how
# close it comes to the device's copy bandwidth. Per element, Sophia's step must read
# `param`, `grad`, `exp_avg` and `hessian` and write `param` and `exp_avg`: six
# tensor-passes. AdamW's reads four (`param`, `grad`, `exp_avg`, `exp_avg_sq`) and writes
# three: seven. Those are the *least* bytes each step can move; the effective bandwidth
# is that many bytes over the measured time, and we report it as a fraction of the
# bandwidth of a plain copy (`dst.copy_(src)`, two passes) of a buffer as large as all the
# parameters together, timed the same way.
#
# In symbols: with $P$ passes of $N$ elements of $s$ bytes each, a step that takes a
# median time $t$ moves at least $PNs$ bytes, an effective bandwidth
# $$\text{GB/s} = \frac{P\,N\,s}{t}, \qquad \text{fraction of copy} = \frac{P N s / t}{2 N s / t_{copy}} .$$
# At the same bandwidth, then, an ideal Sophia step takes the fraction
# `PASSES["SophiaG"] / PASSES["AdamW"]` of an ideal AdamW step: that is why the target
# above asks the fused Sophia step to beat PyTorch's fused AdamW, not merely to match it. For the reference and foreach
# versions, which move more than the least (their temporaries, and in `bfloat16` their
# `float32` working copies), the figure is a measure of efficiency, not of traffic. The
# step counter, one number per tensor, is left out.
PASSES = {"SophiaG": 6, "AdamW": 7}


def _copy_bandwidth(
    numel: int, dtype: torch.dtype, device: torch.device, repeats: int
) -> float:
    # One untimed copy first, so that the destination's pages are faulted in and, on a GPU,
    # the copy kernel is loaded; then as many timed blocks as the contenders get repeats,
    # and their median. The factor 2 is the copy's two passes: one read, one write.
    src = torch.ones(numel, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = [_time_block(lambda: dst.copy_(src), 5, device) for _ in range(repeats)]
    return 2 * numel * src.element_size() / statistics.median(times)


# ## The parameters and their gradients
#
# Drawn once, on the CPU in `float32` with a seeded generator, so that every device and
# dtype starts from the same numbers; then each contender gets its own copy, converted.
# The scale of the weights is a typical initialization; the gradients are standard
# normal.
INIT_STD = 0.02


# One generator, drawn in a fixed order (weight, then gradient, tensor after tensor):
# the same seed gives the same numbers on every machine.
def _master_tensors(
    shapes: list[tuple[int, ...]], seed: int
) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(s, generator=gen) * INIT_STD, torch.randn(s, generator=gen))
        for s in shapes
    ]


def _copy_for(
    master: list[tuple[Tensor, Tensor]], device: torch.device, dtype: torch.dtype
) -> list[Tensor]:
    # `copy=True` matters: for `float32` on the CPU, `.to` would otherwise return the master
    # tensor itself, and every contender would step the same memory. Each gradient is set
    # directly on its parameter, as `backward()` would leave it.
    params = []
    for weight, grad in master:
        p = weight.to(device=device, dtype=dtype, copy=True).requires_grad_()
        p.grad = grad.to(device=device, dtype=dtype, copy=True)
        params.append(p)
    return params


# ## The clock
#
# One block of `steps` steps, timed as described above: synchronize, read the clock,
# step, synchronize, read the clock. The result is the time of one step, in seconds.
def _sync(device: torch.device) -> None:
    # A GPU runs asynchronously: wait for everything queued on it. On the CPU every
    # operation is done when it returns, so there is nothing to wait for.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_block(step: Step, steps: int, device: torch.device) -> float:
    # The collector is switched off for the block and back on only if it was on before, in
    # a `finally`, so that an exception in a step cannot leave it off. `perf_counter` is read
    # after the synchronization, never before it.
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
    # The block's time over its length: one sample of the time per step.
    return (stop - start) / steps


# Warm-up for all, then the repeats: in repeat `r` the contenders take their turns
# starting from the `r`-th, so the order rotates.
def _run(
    steps_by_name: dict[str, Step],
    *,
    steps: int,
    repeats: int,
    warmup: int,
    device: torch.device,
) -> dict[str, list[float]]:
    # The warm-up first, for every contender; then the device is drained and the garbage
    # of the warm-up collected, so that the first timed block does not pay for it.
    names = list(steps_by_name)
    for name in names:
        for _ in range(warmup):
            steps_by_name[name]()
    _sync(device)
    gc.collect()

    # In repeat $r$, the $i$-th turn goes to contender $(r + i) \bmod n$: each contender
    # leads one repeat in $n$, and follows a different neighbour from one repeat to the next.
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            samples[name].append(_time_block(steps_by_name[name], steps, device))
    return samples


# ## The machine
#
# What a reader needs to compare two runs: the device's name (the GPU's, or the CPU
# model from `/proc/cpuinfo` where there is one), the torch version and the number of
# CPU threads torch uses (the CPU step is split across them).
def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        # A GPU is named as its driver names it, which identifies the model and its memory.
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        # On Linux the CPU's model is in `/proc/cpuinfo`; elsewhere (or if the file cannot be
        # read) `platform` knows at least the architecture.
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or platform.machine() or "cpu"
    # Any other device is named by its string (`xpu:0`, ...).
    return str(device)


# ## The command line
#
# Every input is checked before any tensor is allocated. A bad one ends the run with
# `parser.error`: one line on stderr naming the option, and exit code 2, the convention
# of command-line tools for a usage error.
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sophia.benchmark",
        description="Time the optimizer step alone: SophiaG (reference, foreach, fused) against torch.optim.AdamW.",
    )
    # The defaults are the module's constants, shown in `--help`; the device is a GPU when
    # there is one. `--threads` has no default: without it, torch keeps its own choice.
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument(
        "--device", default=default_device, help="torch device (default: %(default)s)"
    )
    parser.add_argument(
        "--params",
        type=int,
        default=DEFAULT_PARAMS,
        help="total number of parameters (default: %(default)s)",
    )
    parser.add_argument(
        "--tensors",
        type=int,
        default=DEFAULT_TENSORS,
        help="number of parameter tensors (default: %(default)s)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=DEFAULT_STEPS,
        help="steps per timed block (default: %(default)s)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=DEFAULT_REPEATS,
        help="timed blocks per implementation (default: %(default)s)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=DEFAULT_WARMUP,
        help="untimed steps per implementation first (default: %(default)s)",
    )
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="float32",
        help="parameter dtype (default: %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch (default: torch's own choice)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help="seed of the parameters and gradients (default: %(default)s)",
    )
    parser.add_argument(
        "--nonfinite",
        choices=["raise", "skip", "unchecked"],
        default="raise",
        help="SophiaG's rule for NaN/inf gradients; 'unchecked' skips the look for them (default: %(default)s)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        help="also write the results as JSON to PATH",
    )
    return parser


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, torch.device]:
    parser = _parser()
    # `argparse` has already refused unknown options, non-integers and a `--dtype` outside
    # `DTYPES`; what remains are the checks it cannot express.
    args = parser.parse_args(argv)
    # The numbers first: each has a lower bound (`--warmup` may be zero), and there cannot
    # be more tensors than parameters, since every tensor holds at least one element.
    for option, value, low in (
        ("--params", args.params, 1),
        ("--tensors", args.tensors, 1),
        ("--steps", args.steps, 1),
        ("--repeats", args.repeats, 1),
        ("--warmup", args.warmup, 0),
        ("--threads", 1 if args.threads is None else args.threads, 1),
    ):
        if value < low:
            parser.error(f"argument {option}: must be >= {low}, got {value}")
    if args.tensors > args.params:
        parser.error(
            f"argument --tensors: {args.tensors} tensors cannot hold only {args.params} parameters (--params)"
        )

    # Then the device, in three steps: a string `torch.device` can parse; CUDA present if
    # asked for; and one empty allocation, which catches a device that parses but does not
    # exist (`cuda:7` on a machine with one GPU) or that this build of PyTorch cannot use.
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError) as e:
        parser.error(f"argument --device: {args.device!r} is not a torch device ({e})")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(
            f"argument --device: {args.device!r} asked for, but CUDA is not available in this torch build or machine"
        )
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ValueError) as e:
        parser.error(
            f"argument --device: cannot allocate on {args.device!r} ({str(e).splitlines()[0]})"
        )

    # The JSON file's folder must exist now: finding out after a run of minutes that the
    # results cannot be written would waste the run.
    if args.json is not None and not args.json.parent.is_dir():
        parser.error(
            f"argument --json: the folder {str(args.json.parent)!r} does not exist"
        )
    return args, device


# ## The report
#
# The table lists the contenders in the order of `contenders()`. The ratio is the
# median over the baseline's median, so the baseline reads exactly `1.00x`.
def _print_report(results: dict) -> None:
    # First the facts that make two runs comparable (device, threads, parameters, timing),
    # then the copy bandwidth, then the table, then the contenders that did not run.
    print("sophia.benchmark: the optimizer step alone (no forward, no backward)")
    print(f"device   {results['device']} ({results['device_name']})")
    print(f"torch    {results['torch']}, {results['threads']} CPU threads")
    print(
        f"params   {results['params']:,} in {results['tensors']} tensors, {results['dtype']}, seed {results['seed']}"
    )
    print(
        f"timing   {results['warmup']} warm-up steps, then {results['repeats']} repeats of "
        f"{results['steps']} steps each, round-robin; per-step times"
    )
    print(f"SophiaG  nonfinite={results['nonfinite']!r}, bs={results['bs']}")
    print()
    print(
        f"copy     {results['copy_bandwidth_gbs']:.1f} GB/s (dst.copy_(src) over a buffer of all the parameters)"
    )
    print()
    # The name column is as wide as the longest name; the ratio's heading names the baseline,
    # so the table says what it is relative to.
    name_width = max(len("implementation"), *(len(n) for n in results["results"]))
    header = (
        f"{'implementation':<{name_width}}  {'ms/step (median)':>16}  {'min':>8}  {'vs ' + results['baseline']:>24}"
        f"  {'GB/s':>7}  {'of copy':>7}"
    )
    print(header)
    print("-" * len(header))
    # One row per contender that ran, in the order of `contenders()`; then those that did
    # not, with the reason.
    for name, r in results["results"].items():
        print(
            f"{name:<{name_width}}  {r['median_ms']:>16.3f}  {r['min_ms']:>8.3f}  {r['ratio']:>23.2f}x"
            f"  {r['bandwidth_gbs']:>7.1f}  {100 * r['bandwidth_fraction']:>6.0f}%"
        )
    for name, reason in results["unavailable"].items():
        print(f"{name:<{name_width}}  not run: {reason}")
    print()
    # A footnote, so that the bandwidth column is never read as measured traffic.
    print(
        "GB/s: the least bytes a step must move (6 tensor-passes for Sophia, 7 for AdamW) over its median time."
    )


# ## Putting it together
def main(argv: list[str] | None = None) -> dict:
    r"""Run the benchmark with command-line arguments `argv`, print the table, and return the results."""
    args, device = _parse(argv)
    # The threads are set before the parameters are made, so that every operation, the
    # copy's included, runs with the same number.
    dtype = DTYPES[args.dtype]
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    # The shapes, the master tensors, and the contenders that can run here. Each contender
    # gets its own converted copy; then the master is dropped, so that it does not hold
    # memory during the run.
    shapes = transformer_like_shapes(args.params, args.tensors)
    master = _master_tensors(shapes, args.seed)
    # Asked once for the report and once inside `contenders()`: the builds are cached, so the
    # second asking costs nothing but the fused AdamW probe.
    missing = unavailable(device, dtype)
    timed = contenders(device, dtype, args.nonfinite)
    copies = {name: _copy_for(master, device, dtype) for name, _ in timed}
    del master
    # The factories build the optimizers (and fill Sophia's $h$) outside any timing. The
    # element count and size are read from the tensors actually timed.
    steps_by_name = {name: make(copies[name]) for name, make in timed}
    counted = next(iter(copies.values()))
    numel = sum(p.numel() for p in counted)
    element_size = counted[0].element_size()

    # The timed run, then the copy bandwidth, on the same machine, with as many repeats.
    samples = _run(
        steps_by_name,
        steps=args.steps,
        repeats=args.repeats,
        warmup=args.warmup,
        device=device,
    )
    copy_bandwidth = _copy_bandwidth(numel, dtype, device, args.repeats)

    # The results, as printed and as written to JSON: the run's facts, and per contender
    # the median and minimum in milliseconds, the ratio to the baseline's median, the
    # effective bandwidth from `PASSES`, and every sample, so that a reader can look at the
    # spread rather than trust a summary.
    #
    # The bandwidth looks `PASSES` up by the text before the parenthesis of the name: a new
    # contender must be named `Optimizer(...)` after an optimizer that has an entry there,
    # or the lookup fails with a `KeyError`, after the whole run.
    baseline_median = statistics.median(samples[BASELINE])
    results = {
        "device": str(device),
        "device_name": _device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "params": sum(p.numel() for p in counted),
        "tensors": len(counted),
        "shapes": ["x".join(map(str, p.shape)) for p in counted],
        "seed": args.seed,
        "steps": args.steps,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "bs": BS,
        "nonfinite": args.nonfinite,
        "baseline": BASELINE,
        "copy_bandwidth_gbs": copy_bandwidth / 1e9,
        "unavailable": missing,
        "results": {
            name: {
                "median_ms": 1e3 * statistics.median(times),
                "min_ms": 1e3 * min(times),
                "ratio": statistics.median(times) / baseline_median,
                "bandwidth_gbs": PASSES[name.split("(")[0]]
                * numel
                * element_size
                / statistics.median(times)
                / 1e9,
                "samples_ms": [1e3 * t for t in times],
            }
            for name, times in samples.items()
        },
    }
    # Each bandwidth as a fraction of the copy's, once the copy's is in the results.
    for r in results["results"].values():
        r["bandwidth_fraction"] = r["bandwidth_gbs"] / results["copy_bandwidth_gbs"]
    _print_report(results)
    # The JSON holds everything the table shows and the samples behind it, to be compared or
    # plotted later.
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    # The table is flushed before returning: when standard output is a pipe it is buffered,
    # and a caller that writes to standard error next would otherwise interleave the two.
    sys.stdout.flush()
    return results


if __name__ == "__main__":
    main()
