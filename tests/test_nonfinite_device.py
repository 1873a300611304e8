"""The non-finite check: one multi-tensor pass, and the device-side rule (steps skipped
on the device, reported at the next synchronization point), forced onto the CPU for
the two implementations that take the flag: the foreach step and the fused kernel."""

import pytest
import torch
from conftest import IMPLEMENTATIONS, assert_unchanged, hyper, require, snapshot

from sophia import SophiaG, nonfinite
from sophia.fused import fused_available

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.complex64]


def params_with_grads(bad=None, dtype=torch.float32):
    torch.manual_seed(0)
    params = [
        torch.randn(s, dtype=dtype, requires_grad=True) for s in [(7,), (3, 5), (4,)]
    ]
    for p in params:
        p.grad = torch.randn_like(p)
    if bad is not None:
        params[1].grad[1, 2] = bad
    return params


# The bytes of a tensor: `torch.equal` takes -0.0 for 0.0, and a NaN for no NaN.
def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


# The parameters and every state tensor (the step counters included), as bytes.
def all_bits(params, opt) -> list[torch.Tensor]:
    state = [opt.state[p][k] for p in params for k in ("step", "exp_avg", "hessian")]
    return [bits(t).clone() for t in [*params, *state]]


def assert_same_bits(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"tensor {i} differs"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_the_flag_finds_one_bad_value_and_leaves_the_tensors_bit_for_bit(dtype, bad):
    tensors = [torch.randn(n, dtype=dtype) for n in (5, 70_000, 3)]
    tensors.append(torch.randn(6, 4, dtype=dtype).t())
    before = [t.clone() for t in tensors]
    assert not any(f.item() for f in nonfinite.found_nonfinite(tensors).values())
    tensors[1][2] = bad
    before[1][2] = bad
    (flag,) = nonfinite.found_nonfinite(tensors).values()
    assert flag.item() != 0
    # Finite values bit for bit (a half-precision NaN may come back another NaN).
    for t, b in zip(tensors, before):
        t, b = torch.view_as_real(t) if t.is_complex() else t, b
        b = torch.view_as_real(b) if b.is_complex() else b
        assert torch.equal(t.isnan(), b.isnan())
        finite = b.isfinite()
        assert torch.equal(t[finite].view(torch.uint8), b[finite].view(torch.uint8))


def test_a_non_contiguous_bad_tensor_is_found_out_of_place():
    t = torch.ones(6, 4).t()
    t[1, 3] = float("nan")
    (flag,) = nonfinite.found_nonfinite([torch.ones(3), t]).values()
    assert flag.item() != 0


# ## The rule on the device, forced onto the CPU
#
# Each test that takes `device_side` runs once per implementation that takes the flag,
# with those flags as the fixture's value. The foreach step needs nothing more; the
# fused kernel needs its CPU build.
@pytest.fixture(params=["foreach", "fused"])
def device_side(request, monkeypatch) -> dict:
    if request.param == "fused":
        require(fused_available("cpu"), "the fused kernel's CPU build (a C++ compiler)")
    monkeypatch.setattr(nonfinite, "DEVICE_SIDE", {"cuda", "cpu"})
    return IMPLEMENTATIONS[request.param]


def test_device_side_skip_changes_nothing_and_counts_later(device_side):
    params = params_with_grads(bad=float("nan"))
    opt = SophiaG(params, **hyper(), **device_side, nonfinite="skip")
    params[1].grad[1, 2] = 0.0
    opt.step()
    params[1].grad[1, 2] = float("nan")
    before = snapshot(params, opt)
    opt.step()
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before[0]))
    assert "_device_skips" in opt.__dict__
    assert opt.skipped_steps == 2
    assert "_device_skips" not in opt.__dict__
    assert_unchanged(before, params, opt)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_device_side_skip_is_bit_for_bit(device_side, dtype, bad):
    params = params_with_grads(dtype=dtype)
    opt = SophiaG(params, **hyper(), **device_side, nonfinite="skip")
    opt.step()
    opt.update_hessian()
    opt.step()
    before = all_bits(params, opt)
    params[1].grad[1, 2] = bad
    opt.step()
    assert opt.skipped_steps == 1
    assert_same_bits(all_bits(params, opt), before)


def test_a_skipped_first_step_creates_no_state(device_side):
    params = params_with_grads(bad=float("nan"))
    opt = SophiaG(params, **hyper(), **device_side, nonfinite="skip")
    opt.step()
    assert not opt.state
    assert opt.skipped_steps == 1


@pytest.mark.parametrize("sync_point", ["win_rate", "state_dict", "update_hessian"])
def test_device_side_raise_reports_at_the_next_sync_point(device_side, sync_point):
    params = params_with_grads()
    opt = SophiaG(params, **hyper(), **device_side)
    opt.step()
    params[0].grad[3] = float("inf")
    before = snapshot(params, opt)
    opt.step()
    opt.step()
    with pytest.raises(
        FloatingPointError, match=r"2 step\(s\) .* skipped on the device"
    ):
        getattr(opt, sync_point)()
    assert_unchanged(before, params, opt)
    # Reported once: the next sync point goes on.
    params[0].grad[3] = 0.0
    opt.state_dict()


# Finite steps, and a refresh between them, give the host rule's bits; for the foreach
# step these are also the reference's.
@pytest.mark.parametrize("dtype", DTYPES)
def test_device_side_finite_steps_equal_the_host_rule(device_side, dtype, monkeypatch):
    runs = []
    sides = [({"cuda", "cpu"}, device_side), ({"cuda"}, device_side)]
    if device_side == IMPLEMENTATIONS["foreach"]:
        sides.append(({"cuda"}, IMPLEMENTATIONS["reference"]))
    for side, flags in sides:
        monkeypatch.setattr(nonfinite, "DEVICE_SIDE", side)
        params = params_with_grads(dtype=dtype)
        opt = SophiaG(params, **hyper(), **flags)
        for i in range(3):
            opt.step()
            if i == 0:
                opt.update_hessian()
        assert opt.skipped_steps == 0
        runs.append(all_bits(params, opt))
    for run in runs[1:]:
        assert_same_bits(runs[0], run)


# Steps skipped among taken ones, with a parameter that has no gradient at some steps:
# after the sync point every counter and tensor is what the host rule leaves.
@pytest.mark.parametrize("sync_point", ["state_dict", "skipped_steps"])
def test_device_side_counters_are_exact_at_the_sync_point(
    device_side, sync_point, monkeypatch
):
    pattern = ["ok", "bad", "ok", "no grad", "bad", "bad", "ok", "no grad"]
    runs = []
    for side in ({"cuda", "cpu"}, {"cuda"}):
        monkeypatch.setattr(nonfinite, "DEVICE_SIDE", side)
        params = params_with_grads()
        opt = SophiaG(params, **hyper(), **device_side, nonfinite="skip")
        grads = [p.grad for p in params]
        for what in pattern:
            params[0].grad = None if what == "no grad" else grads[0]
            params[1].grad[1, 2] = float("nan") if what == "bad" else 0.0
            opt.step()
        if sync_point == "state_dict":
            steps = [s["step"].item() for s in opt.state_dict()["state"].values()]
            assert steps == [3, 5, 5]
        else:
            assert opt.skipped_steps == pattern.count("bad")
        runs.append(all_bits(params, opt))
    assert_same_bits(*runs)


# With `capturable`, a foreach step's counters are on the parameters' device, and the
# flag decides their count there: exact at once, with nothing to take back.
def test_device_side_counters_on_the_device_count_at_once(monkeypatch):
    monkeypatch.setattr(nonfinite, "DEVICE_SIDE", {"cuda", "cpu"})
    params = params_with_grads()
    opt = SophiaG(params, **hyper(), foreach=True, capturable=True, nonfinite="skip")
    opt.step()
    params[1].grad[1, 2] = float("nan")
    opt.step()
    assert [opt.state[p]["step"].item() for p in params] == [1, 1, 1]
    assert opt.__dict__["_device_skips"][-1][1] == []
    assert opt.skipped_steps == 1


# The record holds at most `SETTLE_EVERY` steps: the next step settles them first,
# before it changes anything (under `"raise"`, it raises).
@pytest.mark.parametrize("rule", ["skip", "raise"])
def test_device_side_record_is_bounded(device_side, rule, monkeypatch):
    monkeypatch.setattr(nonfinite, "SETTLE_EVERY", 3)
    params = params_with_grads()
    opt = SophiaG(params, **hyper(), **device_side, nonfinite=rule)
    opt.step()
    before = snapshot(params, opt)
    params[1].grad[1, 2] = float("nan")
    opt.step()
    opt.step()
    params[1].grad[1, 2] = 0.0
    if rule == "raise":
        with pytest.raises(FloatingPointError, match=r"2 step\(s\)"):
            opt.step()
        assert_unchanged(before, params, opt)
        return
    opt.step()
    assert opt._skipped_steps == 2
    assert len(opt.__dict__["_device_skips"]) == 1
    assert [opt.state[p]["step"].item() for p in params] == [2, 2, 2]


# A finite step on the device side does not read the flag on the host: the flag is
# made a tensor subclass that notes each read of its value, or of any value computed
# from it, by the ways a wait for the device comes about (`.item()`, `bool()`,
# `.cpu()`, ...). The host rule is caught the same way, so the spy can fail.
HOST_READS = ["item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"]


def host_reads_of_a_second_step(opt) -> list[str]:
    opt.step()
    reads = []

    class Spied(torch.Tensor):
        pass

    for name in HOST_READS:

        def read(self, *args, _name=name, **kwargs):
            reads.append(_name)
            return getattr(torch.Tensor, _name)(self, *args, **kwargs)

        setattr(Spied, name, read)
    found = nonfinite.found_nonfinite

    def spied_flags(*args, **kwargs):
        return {d: f.as_subclass(Spied) for d, f in found(*args, **kwargs).items()}

    with pytest.MonkeyPatch.context() as spied:
        spied.setattr(nonfinite, "found_nonfinite", spied_flags)
        opt.step()
    return reads


def test_device_side_finite_step_reads_nothing_on_the_host(device_side, monkeypatch):
    opt = SophiaG(params_with_grads(), **hyper(), **device_side)
    assert host_reads_of_a_second_step(opt) == []
    monkeypatch.setattr(nonfinite, "DEVICE_SIDE", {"cuda"})
    opt = SophiaG(params_with_grads(), **hyper(), **device_side)
    assert host_reads_of_a_second_step(opt) != []


def test_the_host_rule_still_raises_at_once_on_the_cpu():
    params = params_with_grads(bad=float("nan"))
    opt = SophiaG(params, **hyper(), foreach=True)
    with pytest.raises(FloatingPointError, match=r"param_groups\[0\]\['params'\]\[1\]"):
        opt.step()


# The reference keeps the host rule where the others go on the device.
def test_the_reference_keeps_the_host_rule(monkeypatch):
    monkeypatch.setattr(nonfinite, "DEVICE_SIDE", {"cuda", "cpu"})
    params = params_with_grads(bad=float("nan"))
    opt = SophiaG(params, **hyper(), foreach=False)
    with pytest.raises(FloatingPointError, match=r"param_groups\[0\]\['params'\]\[1\]"):
        opt.step()
