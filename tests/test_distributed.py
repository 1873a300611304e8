r"""Sophia-G under PyTorch's distributed engines: DDP and FSDP2 on two CPU processes (`gloo`).

The claim: wrapped in `DistributedDataParallel` or sharded with `fully_shard`, the
optimizer trains exactly as one process would on the concatenated batch, Hessian
refreshes included, provided `bs` is the *global* number of predictions. Each rank's
sampled-label gradient is averaged with the others' like any gradient, so the refresh
sees $\hat g$ over all $B$ predictions.

The two processes are started once for the whole module (`torch.multiprocessing`,
spawn), run every configuration, and write their final parameters to files; the tests
compare those with a single-process run computed here. What makes the runs comparable:

* the same initial weights (one seed) and the same global batches, each rank taking
  its half;
* the same sampled labels: rank $r$ samples its half's labels from a generator seeded
  with $(t, r)$, and the single process samples each half from the same generators and
  averages the two halves' losses, which is the mean loss over the concatenated batch
  (equal halves);
* `float64` everywhere, so that the only difference is the order of floating-point
  sums (an all-reduce adds the two halves' gradients, the single process adds all rows
  in one matrix product): the tests allow a relative $10^{-9}$ (absolute $10^{-12}$).
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import IMPLEMENTATIONS as IMPLS
from conftest import hyper, tiny_mlp

from sophia import SophiaG, gnb_loss
from sophia.fused import fused_available

WORLD = 2
STEPS = 7
K = 2
LOCAL_BATCH = 6
GLOBAL_BATCH = WORLD * LOCAL_BATCH
# A $\rho$ large enough that about a fifth of the coordinates take unclipped (Newton) steps,
# where a difference in $h$ would show, rather than sign steps, where it would not.
HYPER = hyper(lr=0.05, betas=(0.9, 0.95), rho=2.0)


# A small classifier: every row of a batch is one prediction, so $B$ is the number of rows.
def make_model() -> torch.nn.Module:
    return tiny_mlp(8, 16, 16, 5, dtype=torch.float64)


# The global batch of step `t`, the same in every process; the Hessian batch of a refresh
# is another draw.
def global_batch(t: int, refresh: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * t + (500 if refresh else 0))
    return (
        torch.randn(GLOBAL_BATCH, 8, generator=gen, dtype=torch.float64),
        torch.randint(0, 5, (GLOBAL_BATCH,), generator=gen),
    )


def label_generator(t: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(7919 * t + rank)


# ## The distributed run (one process of it)
#
# `rank`'s half of each batch, DDP's or FSDP's averaged gradients, `bs` = the global $B$.
def train_distributed(model, opt, rank, nan_at=None):
    lo, hi = rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH
    for t in range(STEPS):
        x, y = global_batch(t)
        x = x[lo:hi].clone()
        # An injected NaN on one process. Under DDP, in its input: the backward pass makes
        # its gradients NaN and the all-reduce spreads them to every process. Under FSDP, in
        # one element of its gradient shard, after the reduction: only this process sees it.
        ddp = not hasattr(next(model.parameters()), "to_local")
        if nan_at == t and rank == 1 and ddp:
            x[0, 0] = float("nan")
        F.cross_entropy(model(x), y[lo:hi]).backward()
        if nan_at == t and rank == 1 and not ddp:
            next(model.parameters()).grad.to_local().view(-1)[0] = float("nan")
        opt.step(bs=GLOBAL_BATCH)
        opt.zero_grad(set_to_none=True)
        if t % K == K - 1:
            xh, _ = global_batch(t, refresh=True)
            loss, b_local = gnb_loss(
                model(xh[lo:hi]), generator=label_generator(t, rank)
            )
            assert b_local == LOCAL_BATCH
            loss.backward()
            opt.update_hessian()
            opt.zero_grad(set_to_none=True)


def _worker(rank: int, port: int, out: str, configs: list[tuple[str, str]]) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        for engine, impl in configs:
            model = make_model()
            if engine == "ddp":
                wrapped = DistributedDataParallel(model)
            else:
                mesh = init_device_mesh("cpu", (WORLD,))
                for layer in model:
                    if isinstance(layer, torch.nn.Linear):
                        fully_shard(layer, mesh=mesh)
                wrapped = fully_shard(model, mesh=mesh)
            nan_at = 3 if impl.endswith("+nan") else None
            opt = SophiaG(
                wrapped.parameters(),
                **HYPER,
                **IMPLS[impl.split("+")[0]],
                nonfinite="skip" if nan_at is not None else "raise",
            )
            train_distributed(wrapped, opt, rank, nan_at=nan_at)
            # The full parameters (FSDP gathers its shards), and the state's types.
            params = [
                p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()
                for p in wrapped.parameters()
            ]
            state = opt.state[next(iter(wrapped.parameters()))]
            record = dict(
                params=params,
                skipped=opt.skipped_steps,
                win_rate=opt.win_rate(),
                state_types=sorted({type(v).__name__ for v in state.values()}),
            )
            torch.save(record, Path(out) / f"{engine}-{impl}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# ## The single-process run on the concatenated batch
def train_single(
    impl: str, *, nan_at=None, bs=GLOBAL_BATCH
) -> tuple[list[torch.Tensor], SophiaG]:
    model = make_model()
    opt = SophiaG(model.parameters(), **HYPER, **IMPLS[impl])
    for t in range(STEPS):
        x, y = global_batch(t)
        F.cross_entropy(model(x), y).backward()
        if t != nan_at:
            opt.step(bs=bs)
        opt.zero_grad(set_to_none=True)
        if t % K == K - 1:
            xh, _ = global_batch(t, refresh=True)
            logits = model(xh)
            halves = [
                gnb_loss(
                    logits[r * LOCAL_BATCH : (r + 1) * LOCAL_BATCH],
                    generator=label_generator(t, r),
                )[0]
                for r in range(WORLD)
            ]
            (sum(halves) / WORLD).backward()
            opt.update_hessian()
            opt.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in model.parameters()], opt


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FUSED = fused_available("cpu")
CONFIGS = [
    (engine, impl)
    for engine in ("ddp", "fsdp")
    for impl in IMPLS
    if impl != "fused" or FUSED
]
CONFIGS += [("fsdp", "reference+nan"), ("ddp", "reference+nan")]


# The processes are launched once for the module. A process killed by a *signal* (not
# one that raised: a failed assertion or an error in the optimizer is reported at once)
# is a crash of the transport: gloo's TCP transport aborts now and then when a
# connection drops while it is being set up (pytorch/gloo#514), seen here once in
# dozens of runs on a loaded machine. Such a launch is tried again, on a fresh port, at
# most `LAUNCH_ATTEMPTS` times in all, and each crash is printed.
LAUNCH_ATTEMPTS = 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("distributed")
    for attempt in range(1, LAUNCH_ATTEMPTS + 1):
        try:
            mp.start_processes(
                _worker,
                args=(_free_port(), str(out), CONFIGS),
                nprocs=WORLD,
                join=True,
                start_method="spawn",
            )
            break
        except mp.ProcessExitedException as crash:
            if crash.signal_name is None or attempt == LAUNCH_ATTEMPTS:
                raise
            print(
                f"launch {attempt} of {LAUNCH_ATTEMPTS}: {crash}; launching again",
                file=sys.stderr,
            )
    return {
        (engine, impl, rank): torch.load(out / f"{engine}-{impl}-rank{rank}.pt")
        for engine, impl in CONFIGS
        for rank in range(WORLD)
    }


@pytest.mark.slow
@pytest.mark.parametrize("engine, impl", [c for c in CONFIGS if "+" not in c[1]])
def test_distributed_training_equals_one_process_on_the_concatenated_batch(
    runs, engine, impl
):
    expected, single_opt = train_single(impl)
    for rank in range(WORLD):
        record = runs[(engine, impl, rank)]
        assert record["skipped"] == 0
        for got, want in zip(record["params"], expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        # The clip win rate is over the whole model: under FSDP each process counts its
        # shards and the counts are summed, so every process reports the single process's rate.
        assert record["win_rate"] == pytest.approx(single_opt.win_rate(), abs=1e-12)


# Sophia's state is elementwise, so FSDP shards it with the parameters: under
# `fully_shard` the state tensors are `DTensor`s, like the parameters.
@pytest.mark.slow
def test_fsdp_shards_the_state_with_the_parameters(runs):
    assert runs[("fsdp", "reference", 0)]["state_types"] == ["DTensor", "Tensor"]
    assert runs[("ddp", "reference", 0)]["state_types"] == ["Tensor"]


# `bs` is the global number of predictions: the local $B$ that `gnb_loss` returns on one
# rank gives another run (the check that the equality above is not a coincidence of
# clipped steps).
@pytest.mark.slow
def test_the_local_batch_as_bs_gives_another_run(runs):
    wrong, _ = train_single("reference", bs=LOCAL_BATCH)
    got = runs[("ddp", "reference", 0)]["params"]
    assert max((a - b).abs().max().item() for a, b in zip(got, wrong)) > 1e-6


# A NaN in one process's gradient: under DDP the all-reduce spreads it to every
# process; under FSDP only the process whose shard holds it sees it, and the optimizer
# makes the processes agree. Either way, with `nonfinite="skip"`, every process skips the
# same step, and the run equals a single-process run without that step.
@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_a_nan_on_one_process_is_skipped_by_all(runs, engine):
    expected, _ = train_single("reference", nan_at=3)
    for rank in range(WORLD):
        record = runs[(engine, "reference+nan", rank)]
        assert record["skipped"] == 1
        for got, want in zip(record["params"], expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
