r"""
---
title: What the first GPU must show
summary: The checks of python -m sophia.gpucheck - the build, the CUDA tests, the three implementations against each other, CUDA graphs, GradScaler, host syncs, the benchmark and the notebooks.
---

The [command](gpucheck.html) runs these checks in order on one GPU and writes what
each found. A check is a function of a `Context` (the folder it writes to, the device,
the checkout it was run from) that returns its **figures**, a flat dictionary of
numbers and short strings, or raises `CheckFailed` with a message and the figures it
had, or `CheckSkipped` where it cannot run here (a package installed without its
`tests/` or `notebooks/`). Any other exception is a crash, which the command records
too.

The agreement checks hold the [foreach version](../foreach.html) and the
[fused kernel](../fused.html) against the [reference](../reference.html), as
`tests/test_fused_cuda.py` does, and report the **max relative difference**
$$\max_i \frac{|b_i - a_i|}{|a_i| + 10^{-2}},$$
the smallest `rtol` for which `torch.testing.assert_close(b, a, rtol=rtol,
atol=rtol * 1e-2)` passes, with the tolerance it must meet.
"""

from __future__ import annotations

import contextlib
import math
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..hessian import gnb_loss
from ..optimizer import SophiaG

# The flags that select each implementation; the first is the one the others are
# held against.
IMPLEMENTATIONS = {
    "reference": dict(foreach=False),
    "foreach": dict(foreach=True),
    "fused": dict(fused=True),
}
RELATIVE_FLOOR = 1e-2


@dataclass
class Context:
    r"""Where a check writes (`out`), what it runs on (`device`), the checkout it came
    from (`repo`, `None` for an installed package) and the benchmark's size."""

    out: Path
    device: torch.device
    repo: Path | None
    bench_params: int = 125_000_000
    bench_tensors: int = 150


class CheckFailed(AssertionError):
    r"""A check ran and found a problem; `figures` are what it measured."""

    def __init__(self, message: str, figures: dict | None = None) -> None:
        super().__init__(message)
        self.figures = figures or {}


class CheckSkipped(Exception):
    r"""A check that cannot run here; the message says why and what would let it."""


def _needs_cuda(ctx: Context) -> None:
    if ctx.device.type != "cuda":
        raise CheckSkipped(f"needs a CUDA device, got {ctx.device}")


# A NaN is the worst disagreement: it counts as infinite (Python's `max` would keep or
# drop a NaN depending on where it stands), as in the demo's `max_relative_difference`.
def max_relative_difference(expected: list[Tensor], actual: list[Tensor]) -> float:
    r"""$\max_i |b_i - a_i| / (|a_i| + 10^{-2})$ over every tensor pair."""
    return max(
        ((b.float() - a.float()).abs() / (a.float().abs() + RELATIVE_FLOOR))
        .nan_to_num(nan=math.inf)
        .max()
        .item()
        for a, b in zip(expected, actual)
    )


# Each implementation's run against the reference's: the figures, and the names of
# those over `tolerance`.
def _agreement(runs: dict[str, list[Tensor]], tolerance: float, prefix: str = ""):
    reference = runs["reference"]
    figures = {
        f"{prefix}{name} vs reference": max_relative_difference(reference, params)
        for name, params in runs.items()
        if name != "reference"
    }
    over = [name for name, value in figures.items() if not value <= tolerance]
    return figures, over


# ## The build
#
# First, so that the checks after it (and the tests in their own process, which share
# the cache) find the kernel built; its time is the first-build cost a user pays.
def build(ctx: Context) -> dict:
    from .. import fused

    start = time.perf_counter()
    try:
        fused.load_extension(ctx.device.type)
    except fused.FusedUnavailableError as error:
        raise CheckFailed(f"the fused kernel does not build: {error}") from None
    return {"seconds": time.perf_counter() - start}


# ## The CUDA tests
#
# `pytest -m cuda` in its own process, from the `tests/` beside the package: a
# checkout, or an editable install of one. A wheel has no tests, so there the check is
# skipped, which is not a pass. The log and a JUnit file go to the output folder.
def pytest_cuda(ctx: Context) -> dict:
    tests = ctx.repo / "tests" if ctx.repo is not None else None
    if tests is None or not (tests / "test_fused_cuda.py").is_file():
        raise CheckSkipped(
            "no tests/ beside the package (installed from a wheel?): run from a "
            "checkout, e.g. `pip install -e .` in a clone"
        )
    junit, log = ctx.out / "pytest-cuda.xml", ctx.out / "pytest-cuda.log"
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p"]
    command += ["no:cacheprovider", f"--junitxml={junit}", str(tests)]
    with log.open("w") as stream:
        code = subprocess.run(
            command, cwd=ctx.repo, stdout=stream, stderr=subprocess.STDOUT
        ).returncode
    figures = {"exit status": code, "log": log.name}
    if junit.is_file():
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        for key in ("tests", "failures", "errors", "skipped"):
            figures[key] = int(suite.get(key, 0))
    ran = figures.get("tests", 0) - figures.get("skipped", 0)
    if code != 0 or ran == 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise CheckFailed(f"pytest -m cuda: exit {code}, {ran} ran: {tail[0]}", figures)
    return figures


# ## The three implementations on quadratics
#
# The closed loop of `tests/test_fused_cuda.py`: a separable quadratic whose gradient
# is $c \odot \theta$, awkward tensor sizes, a refresh every $k$ steps, in `float32`
# and `bfloat16`. The numbers are drawn on the CPU, so every device starts alike.
QUADRATIC_SHAPES = [(1,), (3,), (1023,), (64, 33), (70_001,), (5, 5, 5)]
QUADRATIC_STEPS, QUADRATIC_K = 300, 10
QUADRATIC_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2**-6}


def _quadratic_run(device: torch.device, flags: dict, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    params = [
        torch.randn(s, generator=gen).to(device, dtype).requires_grad_()
        for s in QUADRATIC_SHAPES
    ]
    curv = [
        (torch.rand(s, generator=gen) * 10 + 0.1).to(device) for s in QUADRATIC_SHAPES
    ]
    opt = SophiaG(params, lr=1e-2, rho=0.1, weight_decay=0.1, **flags)
    for t in range(QUADRATIC_STEPS):
        for p, c in zip(params, curv):
            p.grad = (c * p.detach().float()).to(dtype)
        opt.step(bs=8)
        if t % QUADRATIC_K == QUADRATIC_K - 1:
            for p, c in zip(params, curv):
                p.grad = (c.sqrt() * p.detach().float()).to(dtype)
            opt.update_hessian()
    return [p.detach() for p in params]


def agreement_quadratics(ctx: Context) -> dict:
    figures, over = {}, []
    for dtype, tolerance in QUADRATIC_TOLERANCE.items():
        prefix = f"{str(dtype).removeprefix('torch.')}: "
        runs = {
            name: _quadratic_run(ctx.device, flags, dtype)
            for name, flags in IMPLEMENTATIONS.items()
        }
        found, bad = _agreement(runs, tolerance, prefix)
        figures |= found | {f"{prefix}tolerance": tolerance}
        over += bad
    if over:
        raise CheckFailed(f"over the tolerance: {', '.join(over)}", figures)
    return figures


# ## The three implementations on the small GPT
#
# A few training steps of a two-block GPT in `float32`, with a Hessian refresh from
# `gnb_loss` before the first step and every `GPT_K` after. Attention runs under the
# math backend, whose backward is deterministic, so the runs differ by what the
# optimizers do; a few steps amplify a last-bit difference, hence the looser tolerance.
GPT_SIZES = dict(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=64)
GPT_STEPS, GPT_K, GPT_BATCH = 6, 3, 8
GPT_TOLERANCE = 1e-4


def _gpt_run(device: torch.device, flags: dict) -> list[Tensor]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from .model import GPT, GPTConfig

    torch.manual_seed(0)
    config = GPTConfig(**GPT_SIZES)
    model = GPT(config).to(device)
    opt = SophiaG(model.param_groups(0.1), lr=1e-3, rho=0.05, **flags)
    data, labels = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    shape = (GPT_BATCH, config.block_size + 1)
    with sdpa_kernel(SDPBackend.MATH):
        for t in range(GPT_STEPS):
            idx = torch.randint(config.vocab_size, shape, generator=data).to(device)
            x, y = idx[:, :-1], idx[:, 1:]
            if t % GPT_K == 0:
                loss, _ = gnb_loss(model(x)[0], generator=labels)
                loss.backward()
                opt.update_hessian()
                opt.zero_grad(set_to_none=True)
            model(x, y)[1].backward()
            opt.step(bs=x.numel())
            opt.zero_grad(set_to_none=True)
    return [p.detach() for p in model.parameters()]


def agreement_gpt(ctx: Context) -> dict:
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        runs = {name: _gpt_run(ctx.device, f) for name, f in IMPLEMENTATIONS.items()}
    finally:
        torch.set_float32_matmul_precision(precision)
    figures, over = _agreement(runs, GPT_TOLERANCE)
    figures |= {"steps": GPT_STEPS, "tolerance": GPT_TOLERANCE}
    if over:
        raise CheckFailed(f"over the tolerance: {', '.join(over)}", figures)
    return figures


# ## CUDA graphs with a tensor learning rate
#
# As `tests/test_fused_cuda.py` does it: one warm-up step on a side stream, a capture,
# then replays with new gradients and a decaying `lr` written into the captured tensor,
# against the same steps taken eagerly with a float `lr`.
GRAPH_REPLAYS, GRAPH_TOLERANCE = 20, 1e-6


def graph_capture(ctx: Context) -> dict:
    _needs_cuda(ctx)
    torch.manual_seed(0)
    shapes = [(257,), (32, 31)]
    eager = [torch.randn(s, device="cuda", requires_grad=True) for s in shapes]
    graphed = [p.detach().clone().requires_grad_() for p in eager]
    lr = torch.tensor(1e-2, device="cuda")
    opt_e = SophiaG(eager, lr=1e-2, fused=True, capturable=True)
    opt_g = SophiaG(graphed, lr=lr, fused=True, capturable=True)
    for p, q in zip(graphed, eager):
        p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        opt_g.step(bs=4)
    torch.cuda.current_stream().wait_stream(stream)
    opt_e.step(bs=4)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_g.step(bs=4)
    for t in range(GRAPH_REPLAYS):
        grads = [torch.randn(s, device="cuda") for s in shapes]
        for p, q, g in zip(graphed, eager, grads):
            p.grad.copy_(g)
            q.grad = g.clone()
        lr.fill_(1e-2 * 0.9**t)
        graph.replay()
        opt_e.param_groups[0]["lr"] = 1e-2 * 0.9**t
        opt_e.step(bs=4)
    torch.cuda.synchronize()
    figures = {
        "replays": GRAPH_REPLAYS,
        "graphed vs eager": max_relative_difference(eager, graphed),
        "tolerance": GRAPH_TOLERANCE,
        "step counter": opt_g.state[graphed[0]]["step"].item(),
    }
    if not figures["graphed vs eager"] <= GRAPH_TOLERANCE:
        raise CheckFailed("replays differ from the eager steps", figures)
    if figures["step counter"] != GRAPH_REPLAYS + 1:
        raise CheckFailed(f"step counter is not {GRAPH_REPLAYS + 1}", figures)
    return figures


# ## A step that GradScaler skips
#
# One scaled step, then a NaN in a gradient: `scaler.step` must change no parameter
# and no state (the fused kernel gets the overflow flag itself; the others are not
# called), and `scaler.update` must lower the scale.
def _scaler_skip(device: torch.device, flags: dict) -> tuple[bool, float, float]:
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4).to(device)
    opt = SophiaG(model.parameters(), lr=1e-2, **flags)
    scaler = torch.amp.GradScaler(device.type)
    x = torch.randn(8, 16, device=device)
    for poison in (False, True):
        opt.zero_grad()
        scaler.scale(model(x).pow(2).mean()).backward()
        if poison:
            before = [t.clone() for t in model.parameters()]
            before += [v.clone() for s in opt.state.values() for v in s.values()]
            scale = scaler.get_scale()
            model.weight.grad[0, 0] = float("nan")
        scaler.step(opt, bs=8)
        scaler.update()
    after = list(model.parameters())
    after += [v for s in opt.state.values() for v in s.values()]
    same = len(after) == len(before) and all(map(torch.equal, before, after))
    return same, scale, scaler.get_scale()


def grad_scaler_skip(ctx: Context) -> dict:
    figures, bad = {}, []
    for name, flags in IMPLEMENTATIONS.items():
        same, before, after = _scaler_skip(ctx.device, flags)
        figures[f"{name}: unchanged"] = same
        figures[f"{name}: scale"] = f"{before:g} -> {after:g}"
        if not same or not after < before:
            bad.append(name)
    if bad:
        raise CheckFailed(
            f"a skipped step changed something: {', '.join(bad)}", figures
        )
    return figures


# ## No host sync in a default step
#
# `torch.cuda.set_sync_debug_mode("error")` turns every wait of the host for the
# device into an error. The default `SophiaG` is held to it; `nonfinite="unchecked"`
# and `fused=True` are run too, so the report says whether a sync comes from the
# non-finite check or from the step itself.
SYNC_CASES = {
    "default": {},
    'nonfinite="unchecked"': dict(nonfinite="unchecked"),
    "fused=True": dict(fused=True),
}


def _syncs(options: dict) -> str:
    params = [
        torch.randn(s, device="cuda", requires_grad=True) for s in [(64, 33), (7,)]
    ]
    opt = SophiaG(params, **options)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.update_hessian()
    opt.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    except RuntimeError as error:
        return f"syncs: {str(error).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return "no sync"


def no_host_sync(ctx: Context) -> dict:
    _needs_cuda(ctx)
    figures = {case: _syncs(options) for case, options in SYNC_CASES.items()}
    figures["default nonfinite"] = SophiaG([torch.zeros(1)]).nonfinite
    if figures["default"] != "no sync":
        cause = (
            "the non-finite check"
            if figures['nonfinite="unchecked"'] == "no sync"
            else "the step itself (it syncs with nonfinite='unchecked' too)"
        )
        raise CheckFailed(f"the default step waits for the device: {cause}", figures)
    return figures


# ## The benchmark
#
# `python -m sophia.benchmark` at the size of GPT-2 small, twice: with the default
# non-finite check, and with `nonfinite="unchecked"`, the update alone, which moves
# the bytes the bandwidth column counts. The tables are kept beside the report. The
# targets: with the check, the fused step no slower than PyTorch's fused AdamW; without
# it, at most 0.9 of fused AdamW's time and at 85% or more of copy bandwidth, and the
# foreach step no slower than AdamW's foreach step.
FUSED_MIN_OF_COPY = 0.85
FUSED_OVER_ADAMW_FUSED = {"raise": 1.0, "unchecked": 0.9}


def _benchmark_run(ctx: Context, nonfinite: str) -> dict:
    from . import benchmark as bench

    stem = "benchmark" if nonfinite == "raise" else f"benchmark-{nonfinite}"
    argv = ["--device", str(ctx.device), "--params", str(ctx.bench_params)]
    argv += ["--tensors", str(ctx.bench_tensors), "--nonfinite", nonfinite]
    argv += ["--json", str(ctx.out / f"{stem}.json")]
    with (ctx.out / f"{stem}.txt").open("w") as table:
        with contextlib.redirect_stdout(table):
            return bench.main(argv)


# One run's figures (keys prefixed but for the default run), and the targets it
# missed.
def _benchmark_figures(results: dict, nonfinite: str) -> tuple[dict, list[str]]:
    from . import benchmark as bench

    rows = results["results"]
    if bench.FUSED_SOPHIA not in rows:
        reason = results["unavailable"].get(bench.FUSED_SOPHIA, "not run")
        raise CheckFailed(f"{bench.FUSED_SOPHIA} did not run: {reason}")
    prefix = "" if nonfinite == "raise" else f"{nonfinite}: "
    figures = {f"{prefix}copy GB/s": results["copy_bandwidth_gbs"]}
    for name, row in rows.items():
        figures[f"{prefix}{name} ms/step"] = row["median_ms"]
        figures[f"{prefix}{name} of copy"] = row["bandwidth_fraction"]
    fused, foreach = rows[bench.FUSED_SOPHIA], rows["SophiaG(foreach=True)"]
    baseline = rows[bench.BASELINE]["median_ms"]
    figures[f"{prefix}fused / AdamW foreach"] = fused["median_ms"] / baseline
    figures[f"{prefix}foreach / AdamW foreach"] = foreach["median_ms"] / baseline
    missed, target = [], FUSED_OVER_ADAMW_FUSED[nonfinite]
    if bench.FUSED_ADAMW in rows:
        ratio = fused["median_ms"] / rows[bench.FUSED_ADAMW]["median_ms"]
        figures[f"{prefix}fused / AdamW fused"] = ratio
        if ratio > target:
            missed.append(f"{prefix}fused over {target}x AdamW fused")
    if nonfinite == "unchecked":
        if fused["bandwidth_fraction"] < FUSED_MIN_OF_COPY:
            missed.append(f"{prefix}fused under {FUSED_MIN_OF_COPY:.0%} of copy")
        if figures[f"{prefix}foreach / AdamW foreach"] > 1:
            missed.append(f"{prefix}foreach slower than AdamW foreach")
    return figures, missed


def benchmark(ctx: Context) -> dict:
    figures, missed = {}, []
    for nonfinite in FUSED_OVER_ADAMW_FUSED:
        run_figures, run_missed = _benchmark_figures(
            _benchmark_run(ctx, nonfinite), nonfinite
        )
        figures.update(run_figures)
        missed += run_missed
    if missed:
        raise CheckFailed("; ".join(missed), figures)
    return figures


# ## The notebooks
#
# Each of the checkout's notebooks executed top to bottom in a fresh `python3` kernel,
# in a folder under the output folder, where the executed copy is written too (even a
# failed one, which shows the error); the committed files are not touched.
NOTEBOOK_CELL_TIMEOUT = 300


def notebooks(ctx: Context) -> dict:
    folder = ctx.repo / "notebooks" if ctx.repo is not None else None
    found = sorted(folder.glob("*.ipynb")) if folder is not None else []
    if not found:
        raise CheckSkipped("no notebooks/ beside the package: run from a checkout")
    import nbformat
    from nbconvert.preprocessors import CellExecutionError, ExecutePreprocessor

    workdir = ctx.out / "notebooks"
    workdir.mkdir(exist_ok=True)
    figures, failed = {}, []
    for path in found:
        nb = nbformat.read(path, as_version=4)
        executor = ExecutePreprocessor(
            timeout=NOTEBOOK_CELL_TIMEOUT, kernel_name="python3"
        )
        start = time.perf_counter()
        try:
            executor.preprocess(nb, {"metadata": {"path": str(workdir)}})
            figures[f"{path.stem} s"] = time.perf_counter() - start
        except CellExecutionError as error:
            lines = [line for line in str(error).splitlines() if line.strip()]
            figures[f"{path.stem}"] = f"failed: {lines[-1] if lines else error}"
            failed.append(path.stem)
        finally:
            nbformat.write(nb, workdir / path.name)
    if failed:
        raise CheckFailed(f"failed: {', '.join(failed)}", figures)
    return figures
