r"""Issue 14, "what a hostile user still breaks": one test (or a few) per item, each of
which failed before its fix. The optimizer's refusals leave everything unchanged
(`assert_unchanged`), the commands end with one line and a non-zero status.
"""

from __future__ import annotations

import os
import re
import threading
import warnings

import numpy as np
import pytest
import torch
from conftest import (
    assert_unchanged,
    hyper,
    implementations,
    snapshot,
    tiny_gpt_args,
    tiny_mlp,
    tiny_train_config,
)

from sophia import SophiaG, SophiaH
from sophia.experiments import checkpoint as ckpt
from sophia.experiments.cli import main as train_main
from sophia.experiments.config import TrainConfig
from sophia.experiments.train import train

pytestmark = pytest.mark.usefixtures("one_thread")
IMPLS = implementations()


def stepped(**changes):
    r"""A three-element parameter after one step, with its optimizer."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3))
    opt = SophiaG([p], **hyper(**changes))
    p.grad = torch.randn(3)
    opt.step(bs=10)
    return p, opt


# ## R1: an untouched AdamW state dict
def test_r1_an_untouched_adamw_state_loads_with_sophias_settings():
    p = torch.nn.Parameter(torch.randn(3))
    a = torch.optim.AdamW([p])
    p.grad = torch.randn(3)
    a.step()
    saved = a.state_dict()
    o = SophiaG([p], rho=0.05)
    with pytest.warns(UserWarning) as record:
        o.load_state_dict(saved)
    note = str(record[0].message)
    assert "kept from the checkpoint: 'step' and 'exp_avg' of 1 parameter(s)" in note
    assert "maximize=False" in note
    assert (
        "from the constructor: param_groups[0]: lr=0.0001, betas=(0.965, 0.99), "
        "rho=0.05, weight_decay=0.1, eps=1e-15" in note
    )
    assert "ignored: amsgrad" in note and "exp_avg_sq" in note
    o.step(bs=10)
    group = o.param_groups[0]
    assert (group["rho"], group["eps"], group["betas"], group["lr"]) == (
        0.05,
        1e-15,
        (0.965, 0.99),
        1e-4,
    )
    assert set(o.state[p]) == {"step", "exp_avg", "hessian"}
    assert float(o.state[p]["step"]) == 2
    assert torch.isfinite(p).all()
    # The caller's dict is not changed.
    assert "rho" not in saved["param_groups"][0] and "exp_avg_sq" in saved["state"][0]


# ## R2, R3 and the layout of a state dict: refused before anything is replaced
BAD_STATES = {
    "step None": lambda sd: sd["state"][0].update(step=None),
    "step 'abc'": lambda sd: sd["state"][0].update(step="abc"),
    "step a list": lambda sd: sd["state"][0].update(step=[1, 2]),
    "step NaN": lambda sd: sd["state"][0].update(step=torch.tensor(float("nan"))),
    "entry not a dict": lambda sd: sd["state"].update({0: [1.0, 2.0]}),
    "complex exp_avg": lambda sd: sd["state"][0].update(
        exp_avg=torch.zeros(3, dtype=torch.complex64)
    ),
    "no param_groups": lambda sd: sd.pop("param_groups"),
    "no state": lambda sd: sd.pop("state"),
    "group without params": lambda sd: sd["param_groups"][0].pop("params"),
}
MESSAGES = {
    "step None": r"\['params'\]\[0\]: 'step' must be a finite number .* NoneType",
    "step 'abc'": r"'step' must be a finite number .* got str",
    "step a list": r"'step' must be a finite number .* got list",
    "step NaN": r"'step' must be a finite number .* got nan",
    "entry not a dict": r"param_groups\[0\]\['params'\]\[0\] must be a dict",
    "complex exp_avg": r"\[0\]: 'exp_avg' has dtype torch.complex64 but the parameter",
    "no param_groups": r"state_dict must be a dict with 'state' and 'param_groups'",
    "no state": r"state_dict must be a dict with 'state' and 'param_groups'",
    "group without params": r"state_dict\['param_groups'\]\[0\] must be a dict",
}


@pytest.mark.parametrize("case", list(BAD_STATES))
def test_r2_r3_a_bad_state_is_refused_before_anything_loads(case):
    p, opt = stepped()
    source_p, source = stepped(lr=0.5)
    sd = source.state_dict()
    BAD_STATES[case](sd)
    before = snapshot([p], opt)
    groups = [dict(g) for g in opt.param_groups]
    with pytest.raises(ValueError, match=MESSAGES[case]):
        opt.load_state_dict(sd)
    assert_unchanged(before, [p], opt)
    assert opt.param_groups == groups


def test_r2_a_state_dict_that_is_not_a_dict_is_refused():
    _p, opt = stepped()
    with pytest.raises(ValueError, match="state_dict must be a dict .* got list"):
        opt.load_state_dict([1, 2])


# R3's symptom: a non-dict entry of the second group's parameter loaded, and the next
# step updated group 0 and raised in group 1.
def test_r3_a_non_dict_entry_of_a_second_group_never_gives_half_a_step():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = SophiaG([{"params": [a]}, {"params": [b]}])
    sd = opt.state_dict()
    sd["state"] = {1: "junk"}
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\]"):
        opt.load_state_dict(sd)
    a.grad, b.grad = torch.ones(2), torch.ones(2)
    opt.step()
    assert not torch.equal(a, torch.ones(2)) and not torch.equal(b, torch.ones(2))


# ## R4: $\rho B$ beyond the dtype's range never makes a NaN
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize(
    "dtype, rho, bs",
    [
        (torch.float32, 0.04, 1e40),
        (torch.float64, 10.0, 1e308),
        (torch.bfloat16, 1.0, 1e39),
        (torch.float16, 1e-30, 1e-20),
    ],
)
def test_r4_a_finite_bs_never_gives_a_nan(impl, dtype, rho, bs):
    p = torch.nn.Parameter(torch.randn(4, dtype=dtype))
    opt = SophiaG([p], rho=rho, **IMPLS[impl])
    p.grad = torch.randn(4, dtype=dtype)
    opt.step(bs=bs)
    opt.update_hessian()
    opt.step(bs=bs)
    assert torch.isfinite(p).all() and torch.isfinite(opt.state[p]["exp_avg"]).all()
    assert 0 <= opt.win_rate() <= 1


def test_r4_an_infinite_h_with_a_tiny_rho_bs_and_a_tiny_eps_give_no_nan():
    for impl in IMPLS.values():
        p = torch.nn.Parameter(torch.ones(2))
        opt = SophiaG([p], rho=1e-30, eps=1e-50, nonfinite="unchecked", **impl)
        opt.update_hessian([torch.tensor([float("inf"), 0.0])])
        p.grad = torch.tensor([1.0, 0.0])
        opt.step(bs=1e-20)
        assert torch.isfinite(p).all(), impl


# ## R5: a learning rate the dtype cannot hold is refused before any write
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize(
    "dtype, lr, weight_decay, start, match",
    [
        (torch.float32, 1e39, 0.1, 1.0, r"lr=1e\+39 .* does not fit in torch.float32"),
        (torch.float32, 1e30, 1e9, 1.0, r"lr=1e\+30 .* does not fit in torch.float32"),
        (torch.float16, 1e3, 0.0, 65000.0, r"would take a torch.float16 parameter"),
        (torch.float32, 1e38, 0.1, 1e3, r"would take a torch.float32 parameter"),
    ],
)
def test_r5_a_learning_rate_that_overflows_is_refused(
    impl, dtype, lr, weight_decay, start, match
):
    p = torch.nn.Parameter(torch.full((3,), -start, dtype=dtype))
    opt = SophiaG([p], lr=lr, weight_decay=weight_decay, **IMPLS[impl])
    p.grad = torch.full((3,), 1.0, dtype=dtype)
    before = snapshot([p], opt)
    with pytest.raises(ValueError, match=match) as error:
        opt.step(bs=10)
    assert "nothing changed" in str(error.value)
    assert_unchanged(before, [p], opt)


# A large learning rate whose step fits is taken.
def test_r5_a_large_learning_rate_that_fits_is_taken():
    p = torch.nn.Parameter(torch.ones(3))
    opt = SophiaG([p], lr=1e30, weight_decay=0.0)
    p.grad = torch.ones(3)
    opt.step(bs=10)
    assert torch.equal(p, torch.full((3,), 1.0 - 1e30))


# ## Real scalars: NumPy's, 0-d CPU tensors; never a bool; `10**400` named
@pytest.mark.parametrize(
    "make", [np.float32, np.int64, np.float16, lambda v: torch.tensor(v)]
)
def test_real_scalars_of_every_kind_give_the_python_floats_step(make):
    values = dict(lr=0.25, rho=0.5, weight_decay=0.5, beta=0.5, bs=4)
    if make is np.int64:
        values = dict(lr=1, rho=2, weight_decay=0, beta=0, bs=4)
    results = []
    for convert in (float, make):
        p = torch.nn.Parameter(torch.arange(3.0))
        opt = SophiaG(
            [p],
            lr=convert(values["lr"]),
            rho=convert(values["rho"]),
            weight_decay=convert(values["weight_decay"]),
            betas=(convert(values["beta"]), convert(values["beta"])),
        )
        p.grad = torch.tensor([1.0, -2.0, 3.0])
        opt.update_hessian()
        opt.step(bs=convert(values["bs"]))
        results.append(p.detach().clone())
    assert torch.equal(*results)


@pytest.mark.parametrize("name", ["lr", "rho", "weight_decay", "bs"])
@pytest.mark.parametrize("value", [True, np.bool_(True), torch.tensor(True)])
def test_bools_are_still_refused(name, value):
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    with pytest.raises(TypeError, match=rf"{name} must be a real number"):
        if name == "bs":
            SophiaG([p]).step(bs=value)
        else:
            SophiaG([p], **{name: value})


@pytest.mark.parametrize("name", ["lr", "bs"])
def test_an_int_too_large_for_a_float_names_the_argument(name):
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    with pytest.raises(ValueError, match=rf"{name} must be a finite .* 401 digits"):
        if name == "bs":
            SophiaG([p]).step(bs=10**400)
        else:
            SophiaG([p], lr=10**400)


# ## Parameters: meta device; SophiaH with nothing to train
def test_meta_parameters_are_refused_up_front():
    p = torch.nn.Parameter(torch.empty(3, device="meta"))
    opt = SophiaG([p])
    p.grad = torch.empty(3, device="meta")
    with pytest.raises(ValueError, match=r"\['params'\]\[0\] is on the meta device"):
        opt.step()
    with pytest.raises(ValueError, match="is on the meta device"):
        opt.update_hessian([torch.empty(3, device="meta")])
    assert not opt.state


def test_sophiah_with_every_parameter_frozen_says_so():
    model = tiny_mlp(2, 2).requires_grad_(False)
    opt = SophiaH(model.parameters())
    loss = model(torch.ones(1, 2)).sum()
    with pytest.raises(ValueError, match="SophiaH has no parameter that requires a"):
        opt.update_hessian(loss=loss)


# ## The fused step under a GradScaler's skipped step creates no state
@pytest.mark.skipif("fused" not in IMPLS, reason="the fused CPU build is unavailable")
def test_a_skipped_fused_step_creates_no_state_like_foreach():
    for flags in (dict(foreach=True), dict(fused=True)):
        p = torch.nn.Parameter(torch.ones(3))
        opt = SophiaG([p], **flags)
        p.grad = torch.ones(3)
        opt.grad_scale, opt.found_inf = torch.tensor([2.0]), torch.tensor([1.0])
        opt.step()
        assert p not in opt.state, flags
        assert torch.equal(p, torch.ones(3))


# ## The stale build lock
def test_a_stale_build_lock_is_removed_with_a_warning(tmp_path, monkeypatch):
    from torch.utils import cpp_extension
    from torch.utils.file_baton import FileBaton

    from sophia import fused_build

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    name = fused_build._build_arguments("cpu", False)["name"]
    directory = tmp_path / name
    directory.mkdir()
    (directory / "lock").touch()

    # `cpp_extension.load`'s own guard: a `lock` it cannot take, it waits for forever.
    def load(name, **kwargs):
        baton = FileBaton(os.path.join(directory, "lock"))
        assert baton.try_acquire(), "the build would wait forever"
        baton.release()
        return "built"

    monkeypatch.setattr(cpp_extension, "load", load)
    with pytest.warns(UserWarning, match=re.escape(f"stale build lock {directory}")):
        assert fused_build._build("cpu") == "built"
    assert not (directory / "lock").exists()


@pytest.mark.skipif(os.name == "nt", reason="flock is POSIX")
def test_waiting_for_a_live_build_is_announced(tmp_path, monkeypatch):
    import fcntl

    from torch.utils import cpp_extension

    from sophia import fused_build

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    directory = tmp_path / fused_build._build_arguments("cpu", False)["name"]
    directory.mkdir()
    monkeypatch.setattr(cpp_extension, "load", lambda name, **kwargs: "built")
    held = open(directory / "sophia.lock", "a")
    fcntl.flock(held, fcntl.LOCK_EX)
    threading.Timer(0.5, held.close).start()
    with pytest.warns(UserWarning, match="waiting for another process that builds"):
        assert fused_build._build("cpu") == "built"


# ## Checkpoints: unreadable files, integrity, hand edits, a full disk, `--out ""`
UNREADABLE = {
    "empty": (b"", "the file is empty"),
    "text": (b"101", "truncated, corrupt, or not a PyTorch file"),
    "random": (bytes(range(256)) * 8, "truncated, corrupt, or not a PyTorch file"),
}


@pytest.mark.parametrize("case", [*UNREADABLE, "truncated", "pickled object"])
def test_an_unreadable_checkpoint_says_what_it_is_not(tmp_path, case):
    path = tmp_path / "x.ckpt.pt"
    if case == "truncated":
        torch.save({"format": 2, "model": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:700])
        reason = "truncated"
    elif case == "pickled object":
        torch.save({"format": 2, "x": threading.Lock}, path)
        reason = "Python objects other than tensors"
    else:
        data, reason = UNREADABLE[case]
        path.write_bytes(data)
    with pytest.raises(ValueError) as error:
        ckpt.load_checkpoint(path, TrainConfig())
    message = str(error.value)
    assert message.startswith("not a checkpoint written by sophia.train: ")
    assert reason in message and "weights_only" not in message


def run_with_checkpoint(tmp_path, **changes):
    config = tiny_train_config(
        steps=2, checkpoint_every=1, out=str(tmp_path), eval_interval=2, **changes
    )
    train(config)
    return config, ckpt.checkpoint_path(config)


def resave(path, edit, *, checksum=True):
    saved = torch.load(path, weights_only=True)
    saved.pop("checksum")
    edit(saved)
    if checksum:
        saved["checksum"] = ckpt._digest(saved)
    else:
        saved["checksum"] = torch.load(path, weights_only=True)["checksum"]
    torch.save(saved, path)


def garble(saved):
    weight = next(v for k, v in saved["model"].items() if k.endswith("weight"))
    weight.view(-1)[3] = weight.view(-1)[3] * 1.0001 + 1e-6


HAND_EDITS = {
    "garbled bytes": (garble, False, "is damaged: its contents do not match"),
    "missing key": (lambda s: s.pop("model"), True, "its 'model' is missing"),
    "wrong type": (lambda s: s.update(step="2"), True, "its 'step' is missing or not"),
    "wrong shape": (
        lambda s: s["model"].update({k: torch.zeros(3) for k in list(s["model"])[:1]}),
        True,
        "does not fit this run",
    ),
    "bad rng state": (
        lambda s: s.update(torch_rng=torch.zeros(3, dtype=torch.uint8)),
        True,
        "does not fit this run",
    ),
}


@pytest.mark.parametrize("case", list(HAND_EDITS))
def test_a_damaged_or_hand_edited_checkpoint_is_one_line_and_kept(
    tmp_path, capsys, case
):
    edit, checksum, message = HAND_EDITS[case]
    out = tmp_path / "run"
    argv = ["--out", str(out), *tiny_gpt_args(), "--steps", "2"]
    assert train_main([*argv, "--checkpoint-every", "1"]) == 0
    path = next(out.glob("*.ckpt.pt"))
    resave(path, edit, checksum=checksum)
    damaged = path.read_bytes()
    capsys.readouterr()
    status = train_main([*argv, "--checkpoint-every", "1", "--resume"])
    err = capsys.readouterr().err
    assert status == 1 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert path.read_bytes() == damaged


def test_a_full_disk_is_one_line_and_the_previous_checkpoint_is_kept(
    tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    argv = ["--out", str(out), *tiny_gpt_args(), "--checkpoint-every", "1"]
    assert train_main([*argv, "--steps", "1"]) == 0
    path = next(out.glob("*.ckpt.pt"))
    kept = path.read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    capsys.readouterr()
    status = train_main([*argv, "--steps", "1"])
    err = capsys.readouterr().err
    assert status == 1 and "No space left on device" in err, err
    assert "previous checkpoint is kept" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert path.read_bytes() == kept


def test_an_empty_out_is_refused(capsys):
    assert train_main(["--out", "", *tiny_gpt_args()]) == 2
    assert "out must name a folder, got ''" in capsys.readouterr().err
    with pytest.raises(ValueError, match="out must name a folder"):
        TrainConfig(out="  ")


# ## The benchmark's JSON path is checked before the run
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs a read-only /proc")
def test_the_benchmarks_json_folder_is_checked_before_the_run(capsys):
    from sophia.experiments.benchmark import main as bench_main

    with pytest.raises(SystemExit) as exit_info:
        bench_main(["--device", "cpu", "--json", "/proc/sophia-bench.json"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --json: cannot write into '/proc'" in err


# ## docs/scale.md: an infinite h freezes its coordinate until it is reset
def test_an_infinite_h_freezes_a_coordinate_until_the_documented_reset():
    from pathlib import Path

    page = (Path(__file__).parent.parent / "docs" / "scale.md").read_text()
    section = page[page.index("### A coordinate whose h is infinite") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    p = torch.nn.Parameter(torch.ones(2))
    opt = SophiaG([p], weight_decay=0.0, nonfinite="unchecked")
    opt.update_hessian([torch.tensor([float("inf"), 1e-30])])
    for _ in range(2):
        p.grad = torch.ones(2)
        opt.step(bs=1)
    assert p[0].item() == 1.0 and p[1].item() < 1.0, "coordinate 0 should be frozen"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exec(code, {"opt": opt, "torch": torch})
    p.grad = torch.ones(2)
    opt.step(bs=1)
    assert p[0].item() < 1.0, "after the reset coordinate 0 should move"
