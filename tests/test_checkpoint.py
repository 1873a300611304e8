r"""Checkpoints: save mid-training, kill, resume, and the continued run equals the
uninterrupted one exactly; a state that does not fit the parameters is refused.

Two levels:

* the optimizer: `state_dict()` / `load_state_dict()` together with the generator that
  samples the Gauss-Newton-Bartlett labels resume a Sophia-G run bit for bit; a state
  with the wrong shapes or non-finite values is refused before anything is loaded; a
  state without `hessian` (another optimizer's) loads with a warning and $h = 0$;
* the training loop: `python -m sophia.train --checkpoint-every N` killed with SIGKILL
  in the middle of its run, then started again with `--resume`, ends with the same
  losses, win rates and parameters as a run that was never interrupted.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import hyper, tiny_gpt_args, tiny_mlp, tiny_train_config

from sophia import SophiaG, SophiaH, gnb_loss
from sophia.experiments.checkpoint import (
    checkpoint_path,
    load_checkpoint,
    save_checkpoint,
)
from sophia.experiments.config import TrainConfig
from sophia.experiments.train import train

HYPER = hyper(lr=0.02, betas=(0.9, 0.95))


# Batches for `tiny_mlp(6, 12, 4)`: 16 rows of 6 inputs, labels among 4 classes.
def batch(t):
    gen = torch.Generator().manual_seed(t)
    return torch.randn(16, 6, generator=gen), torch.randint(0, 4, (16,), generator=gen)


# Steps `start..stop` of a Sophia-G run, with a refresh every other step whose labels
# come from `labels`.
def train_steps(model, opt, labels, start, stop):
    for t in range(start, stop):
        x, y = batch(t)
        F.cross_entropy(model(x), y).backward()
        opt.step(bs=16)
        opt.zero_grad(set_to_none=True)
        if t % 2 == 1:
            loss, _ = gnb_loss(model(batch(100 + t)[0]), generator=labels)
            loss.backward()
            opt.update_hessian()
            opt.zero_grad(set_to_none=True)


# ## The optimizer


def test_optimizer_state_and_label_generator_resume_a_run_exactly():
    model, labels = tiny_mlp(6, 12, 4), torch.Generator().manual_seed(3)
    opt = SophiaG(model.parameters(), **HYPER)
    train_steps(model, opt, labels, 0, 10)

    # The checkpoint, through bytes, as it would go through a file.
    buffer = io.BytesIO()
    torch.save(
        dict(model=model.state_dict(), opt=opt.state_dict(), labels=labels.get_state()),
        buffer,
    )
    train_steps(model, opt, labels, 10, 20)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed, resumed_labels = tiny_mlp(6, 12, 4), torch.Generator()
    resumed.load_state_dict(saved["model"])
    resumed_opt = SophiaG(resumed.parameters(), **HYPER)
    resumed_opt.load_state_dict(saved["opt"])
    resumed_labels.set_state(saved["labels"])
    train_steps(resumed, resumed_opt, resumed_labels, 10, 20)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(opt.state.values(), resumed_opt.state.values()):
        for key in ("step", "exp_avg", "hessian"):
            assert torch.equal(a[key], b[key]), key


# Without the generator's state the labels differ, and so does the run: the generator is
# part of what a checkpoint must hold.
def test_without_the_label_generator_the_run_differs():
    model, labels = tiny_mlp(6, 12, 4), torch.Generator().manual_seed(3)
    opt = SophiaG(model.parameters(), **HYPER)
    train_steps(model, opt, labels, 0, 10)
    other_model, other_opt = copy.deepcopy(model), None
    other_opt = SophiaG(other_model.parameters(), **HYPER)
    other_opt.load_state_dict(opt.state_dict())
    train_steps(model, opt, labels, 10, 20)
    train_steps(other_model, other_opt, torch.Generator().manual_seed(4), 10, 20)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(model.parameters(), other_model.parameters())
    )


def trained_state():
    model = tiny_mlp(6, 12, 4)
    opt = SophiaG(model.parameters(), **HYPER)
    train_steps(model, opt, torch.Generator().manual_seed(3), 0, 4)
    return model, opt


@pytest.mark.parametrize("key", ["exp_avg", "hessian"])
def test_a_state_of_the_wrong_shape_is_refused_and_nothing_loads(key):
    model, opt = trained_state()
    sd = opt.state_dict()
    sd["state"][2][key] = torch.zeros(3, 3)
    fresh_model = tiny_mlp(6, 12, 4)
    fresh = SophiaG(fresh_model.parameters(), **HYPER)
    with pytest.raises(
        ValueError,
        match=rf"param_groups\[0\]\['params'\]\[2\]: '{key}' has shape \(3, 3\) "
        r"but the parameter has shape \(4, 12\)",
    ):
        fresh.load_state_dict(sd)
    assert not fresh.state and fresh.param_groups[0]["lr"] == HYPER["lr"]


def test_a_nonfinite_state_is_refused():
    model, opt = trained_state()
    sd = opt.state_dict()
    sd["state"][1]["hessian"] = sd["state"][1]["hessian"].clone()
    sd["state"][1]["hessian"][0] = float("nan")
    with pytest.raises(ValueError, match=r"\['params'\]\[1\]: 'hessian' holds NaN"):
        SophiaG(tiny_mlp(6, 12, 4).parameters(), **HYPER).load_state_dict(sd)
    sd = opt.state_dict()
    sd["state"][1]["exp_avg"] = sd["state"][1]["exp_avg"].clone()
    sd["state"][1]["exp_avg"][0] = float("inf")
    with pytest.raises(
        ValueError, match=r"\['params'\]\[1\]: 'exp_avg' holds non-finite values"
    ):
        SophiaG(tiny_mlp(6, 12, 4).parameters(), **HYPER).load_state_dict(sd)


# Finite gradients near the dtype's largest value make $\hat g^2$ overflow, and the
# optimizer stores $h = \infty$ (those coordinates then take zero steps). A checkpoint of
# that run loads, and the loaded optimizer continues exactly as the original does.
def test_an_infinite_hessian_reached_by_the_optimizer_loads():
    big = torch.finfo(torch.float32).max
    runs = []
    for _ in range(2):
        p = torch.zeros(3, requires_grad=True)
        runs.append((p, SophiaG([p], lr=0.1)))
    (p, opt), (q, other) = runs
    p.grad = torch.tensor([big, -big, 1.0])
    opt.update_hessian()
    opt.step(bs=5120)
    assert torch.isinf(opt.state[p]["hessian"][:2]).all()
    # Through bytes, as a checkpoint goes (an in-memory `state_dict()` shares its tensors).
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    with torch.no_grad():
        q.copy_(p)
    for t in (p, q):
        t.grad = torch.tensor([1.0, -1.0, 1.0])
    opt.step(bs=5120)
    other.step(bs=5120)
    assert torch.equal(p, q) and torch.isfinite(p).all()


def test_a_state_of_the_wrong_dtype_is_refused():
    model, opt = trained_state()
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"] = torch.zeros(12, 6, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"'exp_avg' has dtype torch.int64"):
        SophiaG(tiny_mlp(6, 12, 4).parameters(), **HYPER).load_state_dict(sd)


# AdamW's checkpoint, untouched: its `exp_avg` (the same $m$) and `step` load, with
# this optimizer's settings and a warning, and until the next refresh every step is a
# sign step of size lr.
def test_another_optimizers_state_loads_with_h_zero_and_a_warning():
    model = tiny_mlp(6, 12, 4)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = batch(0)
    F.cross_entropy(model(x), y).backward()
    adamw.step()
    sd = adamw.state_dict()
    opt = SophiaG(model.parameters(), **hyper(lr=0.01, weight_decay=0.0))
    with pytest.warns(
        UserWarning,
        match=r"kept from the checkpoint: 'step' and 'exp_avg' of 4 parameter\(s\).*"
        r"h starts at zero",
    ):
        opt.load_state_dict(sd)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(bs=16)
    for p, q in zip(model.parameters(), before):
        assert torch.allclose((p - q).abs(), torch.full_like(p, 0.01), atol=1e-6)
        assert torch.equal(opt.state[p]["hessian"], torch.zeros_like(p))


# A state of ours with `exp_avg` and no `hessian` loads with the same warning.
def test_a_state_without_hessian_loads_with_h_zero_and_a_warning():
    model, opt = trained_state()
    sd = opt.state_dict()
    for state in sd["state"].values():
        del state["hessian"]
    fresh = SophiaG(tiny_mlp(6, 12, 4).parameters(), **HYPER)
    with pytest.warns(UserWarning, match=r"4 parameter\(s\) has no 'hessian'"):
        fresh.load_state_dict(sd)


# A negative `hessian` (Hutchinson's) is a legitimate state and loads.
def test_a_negative_hessian_loads():
    p = torch.zeros(3, requires_grad=True)
    opt = SophiaH([p])
    opt.update_hessian([torch.tensor([-1.0, 0.0, 2.0])])
    saved = opt.state_dict()["state"][0]
    assert (saved["hessian"] < 0).any(), "the state to load should hold a negative h"
    q = torch.zeros(3, requires_grad=True)
    loaded_opt = SophiaH([q])
    loaded_opt.load_state_dict(opt.state_dict())
    loaded = loaded_opt.state[q]
    for key in ("hessian", "exp_avg", "step"):
        assert torch.equal(torch.as_tensor(loaded[key]), torch.as_tensor(saved[key])), (
            f"{key} after loading is {loaded[key]}, expected the saved {saved[key]}"
        )


# ## The training loop


def tiny(tmp_path, **changes):
    fields = dict(steps=12, hess_interval=3, eval_interval=4, out=str(tmp_path))
    return tiny_train_config(**{**fields, **changes})


# A write that fails (a full disk, here a `torch.save` that raises) leaves the previous
# checkpoint whole and no temporary file behind.
def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    config = tiny(tmp_path, steps=4, checkpoint_every=2)
    result = train(config)
    path = checkpoint_path(config)
    good = path.read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(
            path,
            step=4,
            config=config,
            model=model,
            optimizer=SophiaG(model.parameters()),
            generators={},
            result=result,
        )
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_a_finished_run_resumes_to_its_result_and_another_config_is_refused(tmp_path):
    config = tiny(tmp_path, checkpoint_every=5, optimizer="sophiah")
    first = train(config)
    again = train(dataclasses.replace(config, resume=True))
    assert (
        again.train_losses == first.train_losses
        and again.val_losses == first.val_losses
    )
    assert load_checkpoint(checkpoint_path(config), config)["step"] == 12
    with pytest.raises(
        ValueError,
        match=r"another configuration \(lr: 0.01 in the checkpoint, 0.02 now\)",
    ):
        train(dataclasses.replace(config, resume=True, lr=2e-2))
    with pytest.raises(ValueError, match=r"need an output folder"):
        TrainConfig(checkpoint_every=3)


# ### A real kill
#
# The command line, killed with SIGKILL right after its first checkpoints appear
# (whatever it is doing at that moment, a write included), then resumed; and the same
# command never interrupted. The model is tiny and the run long enough that the kill
# lands in the middle.
CLI = [
    sys.executable,
    "-m",
    "sophia.train",
    "--optimizer",
    "sophiag",
    "--steps",
    "150",
    "--hess-interval",
    "3",
    "--checkpoint-every",
    "7",
    "--eval-interval",
    "25",
    *tiny_gpt_args(),
]


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    ckpt = killed / "sophiag-seed0.ckpt.pt"
    proc = subprocess.Popen(
        CLI + ["--out", str(killed)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    step_at_kill = torch.load(ckpt, weights_only=True)["step"]
    assert 0 < step_at_kill < 150, step_at_kill
    assert not (killed / "sophiag-seed0.json").exists()

    resumed = subprocess.run(
        CLI + ["--out", str(killed), "--resume"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    uninterrupted = subprocess.run(
        CLI + ["--out", str(whole)], env=env, capture_output=True, text=True
    )
    assert uninterrupted.returncode == 0, uninterrupted.stderr

    a = json.loads((killed / "sophiag-seed0.json").read_text())
    b = json.loads((whole / "sophiag-seed0.json").read_text())
    for key in (
        "train_losses",
        "val_losses",
        "eval_steps",
        "refresh_steps",
        "win_rates",
    ):
        assert a[key] == b[key], key
    final_a = torch.load(ckpt, weights_only=True)
    final_b = torch.load(whole / "sophiag-seed0.ckpt.pt", weights_only=True)
    for name, tensor in final_b["model"].items():
        assert torch.equal(final_a["model"][name], tensor), name
    for key, state in final_b["optimizer"]["state"].items():
        for name, tensor in state.items():
            assert torch.equal(final_a["optimizer"]["state"][key][name], tensor), name
