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

from .optimizer import SophiaG

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


def _layer(d: int) -> list[tuple[int, ...]]:
    return [
        (d,), (d,),
        (3 * d, d), (3 * d,),
        (d, d), (d,),
        (d,), (d,),
        (4 * d, d), (4 * d,),
        (d, 4 * d), (d,),
    ]


def _layers(d: int, n: int) -> list[tuple[int, ...]]:
    block = _layer(d)
    return [block[i % len(block)] for i in range(n)]


def _numel(shapes: list[tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes)


def _vectors(n_params: int, n_tensors: int) -> list[tuple[int, ...]]:
    base, extra = divmod(n_params, n_tensors)
    return [(base + 1,) if i < extra else (base,) for i in range(n_tensors)]


def transformer_like_shapes(n_params: int, n_tensors: int) -> list[tuple[int, ...]]:
    r"""Shapes of `n_tensors` tensors holding exactly `n_params` elements, laid out like a small GPT's."""
    if not 1 <= n_tensors <= n_params:
        raise ValueError(f"need 1 <= n_tensors <= n_params, got n_tensors={n_tensors}, n_params={n_params}")
    n_layers = n_tensors - 2

    # The width fits when the layers leave room for an embedding with at least one
    # row and a final vector of length `d`, when they stay within their share, and
    # when `d * d` is at most the parameter count.
    def fits(d: int) -> bool:
        body = _numel(_layers(d, n_layers))
        return body + 2 * d <= n_params and body <= LAYER_SHARE * n_params and d * d <= n_params

    if n_tensors < 2 or not fits(1):
        return _vectors(n_params, n_tensors)

    # `fits` is monotone in `d`, so the largest width is found by doubling, then bisecting.
    low, high = 1, 2
    while fits(high):
        low, high = high, 2 * high
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    d = low

    layers = _layers(d, n_layers)
    rows, remainder = divmod(n_params - _numel(layers) - d, d)
    return [(rows, d), *layers, (d + remainder,)]


# ## The contenders
#
# Each factory receives the parameters, with their gradients already set, and returns a
# function that takes one step with the optimizer's ordinary API. Whatever must happen
# once before timing happens in the factory: for Sophia, one Hessian refresh from the
# gradients in place.
Step = Callable[[], object]


def _sophiag(**flags: bool) -> Callable[[list[Tensor]], Step]:
    def make(params: list[Tensor]) -> Step:
        opt = SophiaG(params, **flags)
        opt.update_hessian()
        return lambda: opt.step(bs=BS)

    return make


def _adamw(**flags: bool) -> Callable[[list[Tensor]], Step]:
    def make(params: list[Tensor]) -> Step:
        opt = torch.optim.AdamW(params, **flags)
        return opt.step

    return make


# The fused contenders run where they can: Sophia's kernel where it builds (on CUDA, or
# its CPU build), PyTorch's fused AdamW where PyTorch has it for this device and dtype.
# Where one cannot run, the report says why instead of timing it.
def _fused_sophia_unavailable(device: torch.device) -> str | None:
    from . import fused

    try:
        fused.load_extension(device.type)
    except fused.FusedUnavailableError as error:
        return str(error).splitlines()[0]
    return None


def _fused_adamw_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    try:
        p = torch.zeros(4, device=device, dtype=dtype, requires_grad=True)
        p.grad = torch.ones_like(p)
        torch.optim.AdamW([p], fused=True).step()
    except (RuntimeError, ValueError) as error:
        return str(error).splitlines()[0]
    return None


def contenders(
    device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32
) -> list[tuple[str, Callable[[list[Tensor]], Step]]]:
    r"""The implementations to time on `device`, as `(name, factory)` pairs; one of the names is `BASELINE`."""
    found = [
        ("SophiaG(foreach=False)", _sophiag(foreach=False)),
        ("SophiaG(foreach=True)", _sophiag(foreach=True)),
        (FUSED_SOPHIA, _sophiag(fused=True)),
        (BASELINE, _adamw(foreach=True)),
        ("AdamW(foreach=False)", _adamw(foreach=False)),
        (FUSED_ADAMW, _adamw(fused=True)),
    ]
    missing = unavailable(device, dtype)
    return [(name, make) for name, make in found if name not in missing]


def unavailable(device: torch.device, dtype: torch.dtype) -> dict[str, str]:
    r"""The fused contenders that cannot run on `device` with `dtype`, with the reason."""
    reasons = {FUSED_SOPHIA: _fused_sophia_unavailable(device), FUSED_ADAMW: _fused_adamw_unavailable(device, dtype)}
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
PASSES = {"SophiaG": 6, "AdamW": 7}


def _copy_bandwidth(numel: int, dtype: torch.dtype, device: torch.device, repeats: int) -> float:
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


def _master_tensors(shapes: list[tuple[int, ...]], seed: int) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(s, generator=gen) * INIT_STD, torch.randn(s, generator=gen))
        for s in shapes
    ]


def _copy_for(master: list[tuple[Tensor, Tensor]], device: torch.device, dtype: torch.dtype) -> list[Tensor]:
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
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_block(step: Step, steps: int, device: torch.device) -> float:
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


# Warm-up for all, then the repeats: in repeat `r` the contenders take their turns
# starting from the `r`-th, so the order rotates.
def _run(
    steps_by_name: dict[str, Step], *, steps: int, repeats: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    names = list(steps_by_name)
    for name in names:
        for _ in range(warmup):
            steps_by_name[name]()
    _sync(device)
    gc.collect()

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
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, help="torch device (default: %(default)s)")
    parser.add_argument("--params", type=int, default=DEFAULT_PARAMS, help="total number of parameters (default: %(default)s)")
    parser.add_argument("--tensors", type=int, default=DEFAULT_TENSORS, help="number of parameter tensors (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="steps per timed block (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="timed blocks per implementation (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help="untimed steps per implementation first (default: %(default)s)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="parameter dtype (default: %(default)s)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the parameters and gradients (default: %(default)s)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON to PATH")
    return parser


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, torch.device]:
    parser = _parser()
    args = parser.parse_args(argv)
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
        parser.error(f"argument --tensors: {args.tensors} tensors cannot hold only {args.params} parameters (--params)")

    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError) as e:
        parser.error(f"argument --device: {args.device!r} is not a torch device ({e})")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"argument --device: {args.device!r} asked for, but CUDA is not available in this torch build or machine")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ValueError) as e:
        parser.error(f"argument --device: cannot allocate on {args.device!r} ({str(e).splitlines()[0]})")

    if args.json is not None and not args.json.parent.is_dir():
        parser.error(f"argument --json: the folder {str(args.json.parent)!r} does not exist")
    return args, device


# ## The report
#
# The table lists the contenders in the order of `contenders()`. The ratio is the
# median over the baseline's median, so the baseline reads exactly `1.00x`.
def _print_report(results: dict) -> None:
    print("sophia.benchmark: the optimizer step alone (no forward, no backward)")
    print(f"device   {results['device']} ({results['device_name']})")
    print(f"torch    {results['torch']}, {results['threads']} CPU threads")
    print(f"params   {results['params']:,} in {results['tensors']} tensors, {results['dtype']}, seed {results['seed']}")
    print(
        f"timing   {results['warmup']} warm-up steps, then {results['repeats']} repeats of "
        f"{results['steps']} steps each, round-robin; per-step times"
    )
    print()
    print(f"copy     {results['copy_bandwidth_gbs']:.1f} GB/s (dst.copy_(src) over a buffer of all the parameters)")
    print()
    name_width = max(len("implementation"), *(len(n) for n in results["results"]))
    header = (
        f"{'implementation':<{name_width}}  {'ms/step (median)':>16}  {'min':>8}  {'vs ' + results['baseline']:>24}"
        f"  {'GB/s':>7}  {'of copy':>7}"
    )
    print(header)
    print("-" * len(header))
    for name, r in results["results"].items():
        print(
            f"{name:<{name_width}}  {r['median_ms']:>16.3f}  {r['min_ms']:>8.3f}  {r['ratio']:>23.2f}x"
            f"  {r['bandwidth_gbs']:>7.1f}  {100 * r['bandwidth_fraction']:>6.0f}%"
        )
    for name, reason in results["unavailable"].items():
        print(f"{name:<{name_width}}  not run: {reason}")
    print()
    print("GB/s: the least bytes a step must move (6 tensor-passes for Sophia, 7 for AdamW) over its median time.")


# ## Putting it together
def main(argv: list[str] | None = None) -> dict:
    r"""Run the benchmark with command-line arguments `argv`, print the table, and return the results."""
    args, device = _parse(argv)
    dtype = DTYPES[args.dtype]
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    shapes = transformer_like_shapes(args.params, args.tensors)
    master = _master_tensors(shapes, args.seed)
    missing = unavailable(device, dtype)
    timed = contenders(device, dtype)
    copies = {name: _copy_for(master, device, dtype) for name, _ in timed}
    del master
    steps_by_name = {name: make(copies[name]) for name, make in timed}
    counted = next(iter(copies.values()))
    numel = sum(p.numel() for p in counted)
    element_size = counted[0].element_size()

    samples = _run(steps_by_name, steps=args.steps, repeats=args.repeats, warmup=args.warmup, device=device)
    copy_bandwidth = _copy_bandwidth(numel, dtype, device, args.repeats)

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
        "baseline": BASELINE,
        "copy_bandwidth_gbs": copy_bandwidth / 1e9,
        "unavailable": missing,
        "results": {
            name: {
                "median_ms": 1e3 * statistics.median(times),
                "min_ms": 1e3 * min(times),
                "ratio": statistics.median(times) / baseline_median,
                "bandwidth_gbs": PASSES[name.split("(")[0]] * numel * element_size / statistics.median(times) / 1e9,
                "samples_ms": [1e3 * t for t in times],
            }
            for name, times in samples.items()
        },
    }
    for r in results["results"].values():
        r["bandwidth_fraction"] = r["bandwidth_gbs"] / results["copy_bandwidth_gbs"]
    _print_report(results)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    sys.stdout.flush()
    return results


if __name__ == "__main__":
    main()
