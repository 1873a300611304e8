r"""
---
title: How fast is one step?
summary: A benchmark of the optimizer step alone - the reference, the torch._foreach version, the fused kernel and torch.optim.AdamW on the same parameters.
---

Per coordinate, Sophia's step reads and writes as much memory as AdamW's (the
parameter, its gradient and two state tensors), but its clipped step takes more
separate passes over memory: a multiplication and a clamp for the denominator, a
division, and a clamp to $[-1, 1]$ in two ops, with two temporary tensors, where
AdamW's denominator takes a square root and an addition, with one. This page measures
what that costs. It times the **optimizer step alone** (no forward, no backward) of

* `SophiaG(params, foreach=False)`, the [reference](../reference.html), one tensor at
  a time;
* `SophiaG(params, foreach=True)`, the [`torch._foreach` version](../foreach.html);
* `SophiaG(params, fused=True)`, the [fused kernel](../fused.html): on CUDA, or its CPU
  build (the same kernel source compiled as C++);
* `torch.optim.AdamW(params, foreach=True)`, the **baseline**, what most people train
  with; `AdamW(foreach=False)`, how much foreach buys AdamW here; and
  `AdamW(fused=True)`, PyTorch's own fused kernel, the bar for ours;
* and, alone, the look for NaNs and infinities that `SophiaG`'s default
  (`nonfinite="raise"`) makes before each step: `check(kernel)`, the fused kernel's
  (a fused step's), and `check(GradScaler pass)` (every other step's);

on one synthetic parameter set shaped like a small transformer's
([what is stepped and how it is timed](measure.html)). Run it with

```
python -m sophia.benchmark                      # the defaults: see --help
python -m sophia.benchmark --device cpu --dtype bfloat16 --json step.json
```

It prints the machine, the parameter set and a table: per implementation, the median
and minimum time of one step in milliseconds, the median over the baseline's median
**from the same run**, and the step's effective memory bandwidth as a fraction of the
device's copy bandwidth. The targets, on a GPU and on the CPU build: with the default
non-finite check, the fused step no slower than PyTorch's fused AdamW; with
`--nonfinite unchecked` (the update alone, which moves the bytes the bandwidth column
counts), at most 0.9 of fused AdamW's time and, on a GPU, at 85% or more of copy
bandwidth, and the foreach step no slower than AdamW's foreach step.

**Read the ratios, not the milliseconds.** A ratio to AdamW measured seconds apart on
the same machine carries over to other machines much better than a time. A whole
training step is dominated by the matrix multiplications, so a ratio well above one
here can still be a small share of it: time the whole step before holding this one
against the paper's claim of halving the number of steps.

## Two traps on a CPU

On a CPU the step is bound by memory, and two things outside the optimizer's code can
outweigh it; both show as a minimum far below the median, or a large system time.

* **Threads that spin.** Between parallel regions torch's OpenMP threads spin; on a
  small shared virtual machine a thread may wait a whole scheduler slice for a core on
  every parallel operation. Compare with `--threads 1` or `OMP_WAIT_POLICY=PASSIVE`.
* **Fresh memory.** An out-of-place operation allocates its result, and the first write
  to each fresh page is a page fault. A foreach version holds its temporaries for *all*
  tensors at once, so it faults in far more fresh memory per step than a loop that
  frees each tensor's temporaries before the next, which also keeps each tensor in
  cache for all its operations.

## Extending it

The implementations are `(name, factory)` pairs built in one place, `contenders()`; a
factory takes the parameters (gradients set) and returns a function that takes one
step. One that cannot run here (a fused kernel that does not build) is listed with the
reason instead of a time.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

# Every Sophia contender is the public `SophiaG` with a flag, so what is timed is what a
# user runs, dispatch included.
from ..nonfinite import found_nonfinite
from ..optimizer import SophiaG

# The parameter set, the clock and the bandwidth live in `measure`; the names are
# imported here too, so `sophia.experiments.benchmark.transformer_like_shapes` and the
# old `sophia.benchmark` paths keep working.
from .measure import INIT_STD as INIT_STD
from .measure import LAYER_SHARE as LAYER_SHARE
from .measure import (
    PASSES,
    _copy_bandwidth,
    _copy_for,
    _device_name,
    _master_tensors,
    _sync,
    _time_block,
    transformer_like_shapes,
)

__all__ = ["main", "transformer_like_shapes", "contenders"]


# ## Defaults
#
# A parameter set the size of a small GPT; steps and repeats that keep a run to a
# minute or two on a small CPU. An odd number of repeats makes the median one of the
# samples. `BS`, Sophia's $B$, only scales $h$ and not the work; it is the reference
# code's default.
DEFAULT_PARAMS = 10_000_000
DEFAULT_TENSORS = 100
DEFAULT_STEPS = 10
DEFAULT_REPEATS = 7
DEFAULT_WARMUP = 3
DEFAULT_SEED = 0
BS = 5120
# The table's labels. Every ratio divides by `BASELINE`, AdamW's foreach step
# (PyTorch's default on a GPU); the fused two may be missing on a machine. The text
# before the parenthesis is the key of `PASSES`.
BASELINE = "AdamW(foreach=True)"
FUSED_SOPHIA = "SophiaG(fused=True)"
FUSED_ADAMW = "AdamW(fused=True)"
KERNEL_CHECK = "check(kernel)"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ## The contenders
#
# A factory receives the parameters, gradients set, and returns a step: a call with no
# arguments, whose result is ignored. What must happen once before timing happens in
# the factory.
Step = Callable[[], object]


# Sophia with the constructor's defaults and `flags`. One untimed `update_hessian()`
# folds $g \odot g$ into $h$, so the timed steps divide by a non-zero $h$ and the clip
# takes both branches, as in training; in training it runs once every $k$ steps, so it
# is not in the step time. `nonfinite="raise"` (the [optimizer](../optimizer.html)'s
# default) reads every gradient once more per step, which AdamW does not;
# `--nonfinite unchecked` compares the update alone.
def _sophiag(nonfinite: str = "raise", **flags: bool) -> Callable[[list[Tensor]], Step]:
    def make(params: list[Tensor]) -> Step:
        opt = SophiaG(params, nonfinite=nonfinite, **flags)
        opt.update_hessian()
        return lambda: opt.step(bs=BS)

    return make


# AdamW with PyTorch's defaults and `flags`: the values do not change the work done.
def _adamw(**flags: bool) -> Callable[[list[Tensor]], Step]:
    def make(params: list[Tensor]) -> Step:
        opt = torch.optim.AdamW(params, **flags)
        return opt.step

    return make


# The non-finite check alone, as the default step makes it before the update: the
# fused kernel's own check (`kernel=True`, a fused step's) or the `GradScaler` pass
# (every other step's). Each reads the gradients once; the pass also writes them back.
def _check(kernel: bool) -> Callable[[list[Tensor]], Step]:
    def make(params: list[Tensor]) -> Step:
        grads = [p.grad for p in params]
        return lambda: found_nonfinite(grads, kernel=kernel)

    return make


# A kernel that does not build here (no compiler, no CUDA toolkit): the first line of
# the reason, for the table.
def _fused_sophia_unavailable(device: torch.device) -> str | None:
    from .. import fused

    try:
        fused.load_extension(device.type)
    except (fused.FusedUnavailableError, ValueError) as error:
        return str(error).splitlines()[0]
    return None


# PyTorch's fused AdamW support has changed between releases, so one step on a tiny
# parameter of this device and dtype is more reliable than a list of devices.
def _fused_adamw_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    try:
        p = torch.zeros(4, device=device, dtype=dtype, requires_grad=True)
        p.grad = torch.ones_like(p)
        torch.optim.AdamW([p], fused=True).step()
    except (RuntimeError, ValueError) as error:
        return str(error).splitlines()[0]
    return None


# The order of this list is the order of the table.
def contenders(
    device: torch.device = torch.device("cpu"),
    dtype: torch.dtype = torch.float32,
    nonfinite: str = "raise",
) -> list[tuple[str, Callable[[list[Tensor]], Step]]]:
    r"""The implementations to time on `device`, as `(name, factory)` pairs; one of the
    names is `BASELINE`."""
    found = [
        ("SophiaG(foreach=False)", _sophiag(nonfinite, foreach=False)),
        ("SophiaG(foreach=True)", _sophiag(nonfinite, foreach=True)),
        (FUSED_SOPHIA, _sophiag(nonfinite, fused=True)),
        (BASELINE, _adamw(foreach=True)),
        ("AdamW(foreach=False)", _adamw(foreach=False)),
        (FUSED_ADAMW, _adamw(fused=True)),
        (KERNEL_CHECK, _check(kernel=True)),
        ("check(GradScaler pass)", _check(kernel=False)),
    ]
    missing = unavailable(device, dtype)
    return [(name, make) for name, make in found if name not in missing]


def unavailable(device: torch.device, dtype: torch.dtype) -> dict[str, str]:
    r"""The fused contenders that cannot run on `device` with `dtype`, with the
    reason."""
    no_kernel = _fused_sophia_unavailable(device)
    reasons = {
        FUSED_SOPHIA: no_kernel,
        KERNEL_CHECK: no_kernel,
        FUSED_ADAMW: _fused_adamw_unavailable(device, dtype),
    }
    return {name: reason for name, reason in reasons.items() if reason is not None}


# ## The run
#
# Warm-up steps first, untimed, for every contender: the first step allocates the
# state, and on a GPU the first calls load kernels and fill the caching allocator.
# Then repeats, round-robin: in repeat $r$ the $i$-th turn, a block of `steps` steps,
# goes to contender $(r + i) \bmod n$, so a slow drift of the machine's load hits all
# alike and no contender always follows the same neighbour.
def _run(
    steps_by_name: dict[str, Step],
    *,
    steps: int,
    repeats: int,
    warmup: int,
    device: torch.device,
) -> dict[str, list[float]]:
    names = list(steps_by_name)
    for name in names:
        for _ in range(warmup):
            steps_by_name[name]()
    # The device drained and the warm-up's garbage collected before the first block.
    _sync(device)
    gc.collect()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            samples[name].append(_time_block(steps_by_name[name], steps, device))
    return samples


# ## The command line
#
# Every input is checked before any tensor is allocated. A bad one ends the run with
# `parser.error`: one line on stderr naming the option, and exit code 2, the usage-error
# convention. `--threads` has no default: without it, torch keeps its own choice.
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sophia.benchmark",
        description="Time the optimizer step alone: SophiaG (reference, foreach, "
        "fused) against torch.optim.AdamW.",
    )
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument(
        "--device", default=default_device, help="torch device (default: %(default)s)"
    )
    for option, default, help in (
        ("--params", DEFAULT_PARAMS, "total number of parameters"),
        ("--tensors", DEFAULT_TENSORS, "number of parameter tensors"),
        ("--steps", DEFAULT_STEPS, "steps per timed block"),
        ("--repeats", DEFAULT_REPEATS, "timed blocks per implementation"),
        ("--warmup", DEFAULT_WARMUP, "untimed steps per implementation first"),
    ):
        parser.add_argument(
            option, type=int, default=default, help=f"{help} (default: %(default)s)"
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
        help="SophiaG's rule for NaN/inf gradients; 'unchecked' skips the look for "
        "them (default: %(default)s)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        help="also write the results as JSON to PATH",
    )
    return parser


# What `argparse` cannot express: lower bounds (`--warmup` may be zero), no more
# tensors than parameters (every tensor holds an element), a device that exists, and
# a folder for the JSON that exists now, not after a run of minutes.
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
        parser.error(
            f"argument --tensors: {args.tensors} tensors cannot hold only "
            f"{args.params} parameters (--params)"
        )
    device = _parse_device(parser, args.device)
    if args.json is not None:
        _check_json_path(parser, args.json)
    return args, device


# The JSON's folder exists and takes a file, and the path is not a folder: found now,
# not after a run of minutes.
def _check_json_path(parser: argparse.ArgumentParser, path: Path) -> None:
    if not path.parent.is_dir():
        parser.error(f"argument --json: the folder {str(path.parent)!r} does not exist")
    if path.is_dir():
        parser.error(f"argument --json: {str(path)!r} is a folder")
    try:
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as error:
        parser.error(
            f"argument --json: cannot write into {str(path.parent)!r}: "
            f"{error.strerror or error}"
        )


# The device in three steps: a string `torch.device` parses; CUDA present if asked for;
# one empty allocation, which catches a device that parses but does not exist
# (`cuda:7` on a one-GPU machine) or that this PyTorch build cannot use.
def _parse_device(parser: argparse.ArgumentParser, name: str) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        parser.error(f"argument --device: {name!r} is not a torch device ({e})")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(
            f"argument --device: {name!r} asked for, but CUDA is not available in "
            "this torch build or machine"
        )
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ValueError) as e:
        parser.error(
            f"argument --device: cannot allocate on {name!r} ({str(e).splitlines()[0]})"
        )
    return device


# ## The results
#
# As printed and as written to JSON: the run's facts and, per contender, the median
# and minimum in milliseconds, the ratio of medians to the baseline's, the effective
# bandwidth and every sample, so a reader can look at the spread. A new contender must
# be named `Optimizer(...)` after a key of `PASSES`, or this fails with a `KeyError`.
def _results(args, device, counted, samples, copy_bandwidth, missing) -> dict:
    numel = sum(p.numel() for p in counted)
    bytes_per_pass = numel * counted[0].element_size()
    baseline_median = statistics.median(samples[BASELINE])

    def summary(name: str, times: list[float]) -> dict:
        median = statistics.median(times)
        bandwidth = PASSES[name.split("(")[0]] * bytes_per_pass / median
        return {
            "median_ms": 1e3 * median,
            "min_ms": 1e3 * min(times),
            "ratio": median / baseline_median,
            "bandwidth_gbs": bandwidth / 1e9,
            "samples_ms": [1e3 * t for t in times],
            "bandwidth_fraction": (bandwidth / 1e9) / (copy_bandwidth / 1e9),
        }

    return {
        "device": str(device),
        "device_name": _device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "params": numel,
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
        "results": {name: summary(name, times) for name, times in samples.items()},
    }


# ## The report
#
# The facts that make two runs comparable, the copy bandwidth, then the table in the
# order of `contenders()` (the baseline reads exactly `1.00x`), the contenders that did
# not run, and a footnote so the bandwidth column is never read as measured traffic.
def _print_report(results: dict) -> None:
    r = results
    print("sophia.benchmark: the optimizer step alone (no forward, no backward)")
    print(f"device   {r['device']} ({r['device_name']})")
    print(f"torch    {r['torch']}, {r['threads']} CPU threads")
    print(
        f"params   {r['params']:,} in {r['tensors']} tensors, {r['dtype']}, "
        f"seed {r['seed']}"
    )
    print(
        f"timing   {r['warmup']} warm-up steps, then {r['repeats']} repeats of "
        f"{r['steps']} steps each, round-robin; per-step times"
    )
    print(f"SophiaG  nonfinite={r['nonfinite']!r}, bs={r['bs']}")
    print()
    print(
        f"copy     {r['copy_bandwidth_gbs']:.1f} GB/s (dst.copy_(src) over a buffer "
        "of all the parameters)"
    )
    print()
    width = max(len("implementation"), *(len(n) for n in r["results"]))
    header = (
        f"{'implementation':<{width}}  {'ms/step (median)':>16}  {'min':>8}  "
        f"{'vs ' + r['baseline']:>24}  {'GB/s':>7}  {'of copy':>7}"
    )
    print(header)
    print("-" * len(header))
    for name, row in r["results"].items():
        print(
            f"{name:<{width}}  {row['median_ms']:>16.3f}  {row['min_ms']:>8.3f}  "
            f"{row['ratio']:>23.2f}x  {row['bandwidth_gbs']:>7.1f}  "
            f"{100 * row['bandwidth_fraction']:>6.0f}%"
        )
    for name, reason in r["unavailable"].items():
        print(f"{name:<{width}}  not run: {reason}")
    print()
    print(
        "GB/s: the least bytes a step must move (6 tensor-passes for Sophia, 7 for "
        "AdamW, 1 for a check: a read of the gradients) over its median time."
    )


# ## Putting it together
def main(argv: list[str] | None = None) -> dict:
    r"""Run the benchmark with command-line arguments `argv`, print the table, and
    return the results."""
    args, device = _parse(argv)
    # The threads are set first, so every operation, the copy's included, uses them.
    dtype = DTYPES[args.dtype]
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    # Each contender gets its own converted copy of the master tensors, which are then
    # dropped so they hold no memory during the run. `unavailable` is asked twice (here
    # and in `contenders()`); the builds are cached, so only the AdamW probe repeats.
    master = _master_tensors(
        transformer_like_shapes(args.params, args.tensors), args.seed
    )
    missing = unavailable(device, dtype)
    timed = contenders(device, dtype, args.nonfinite)
    copies = {name: _copy_for(master, device, dtype) for name, _ in timed}
    del master
    # The factories build the optimizers (and fill Sophia's $h$) outside any timing.
    steps_by_name = {name: make(copies[name]) for name, make in timed}
    counted = next(iter(copies.values()))

    # The timed run, then the copy bandwidth on the same machine, as many repeats.
    samples = _run(
        steps_by_name,
        steps=args.steps,
        repeats=args.repeats,
        warmup=args.warmup,
        device=device,
    )
    numel = sum(p.numel() for p in counted)
    copy_bandwidth = _copy_bandwidth(numel, dtype, device, args.repeats)
    results = _results(args, device, counted, samples, copy_bandwidth, missing)
    _print_report(results)
    if args.json is not None:
        try:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
        except OSError as error:
            print(f"error: cannot write {args.json}: {error.strerror}", file=sys.stderr)
            raise SystemExit(1) from None
        print(f"\nwrote {args.json}")
    # Flushed before returning: a piped stdout is buffered, and a caller that writes to
    # stderr next would otherwise interleave the two.
    sys.stdout.flush()
    return results


if __name__ == "__main__":
    main()
