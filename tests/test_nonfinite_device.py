"""The non-finite check: one multi-tensor pass, and the device-side rule (steps skipped
on the device, reported at the next synchronization point), forced onto the CPU."""

import pytest
import torch
from conftest import assert_unchanged, hyper, require, snapshot

from sophia import SophiaG, nonfinite
from sophia.fused import fused_available

pytestmark = pytest.mark.usefixtures("one_thread")


def params_with_grads(bad=None):
    torch.manual_seed(0)
    params = [torch.randn(s, requires_grad=True) for s in [(7,), (3, 5), (4,)]]
    for p in params:
        p.grad = torch.randn_like(p)
    if bad is not None:
        params[1].grad[1, 2] = bad
    return params


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.bfloat16, torch.complex64]
)
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


@pytest.fixture
def device_side(monkeypatch):
    require(fused_available("cpu"), "the fused kernel's CPU build (a C++ compiler)")
    monkeypatch.setattr(nonfinite, "DEVICE_SIDE", {"cuda", "cpu"})


def test_device_side_skip_changes_nothing_and_counts_later(device_side):
    params = params_with_grads(bad=float("nan"))
    opt = SophiaG(params, **hyper(), fused=True, nonfinite="skip")
    params[1].grad[1, 2] = 0.0
    opt.step()
    params[1].grad[1, 2] = float("nan")
    before = snapshot(params, opt)
    opt.step()
    opt.step()
    assert_unchanged(before, params, opt)
    assert "_device_skips" in opt.__dict__
    assert opt.skipped_steps == 2
    assert "_device_skips" not in opt.__dict__


@pytest.mark.parametrize("sync_point", ["win_rate", "state_dict", "update_hessian"])
def test_device_side_raise_reports_at_the_next_sync_point(device_side, sync_point):
    params = params_with_grads()
    opt = SophiaG(params, **hyper(), fused=True)
    opt.step()
    params[0].grad[3] = float("inf")
    before = snapshot(params, opt)
    opt.step()
    assert_unchanged(before, params, opt)
    with pytest.raises(
        FloatingPointError, match=r"1 step\(s\) .* skipped on the device"
    ):
        getattr(opt, sync_point)()
    assert_unchanged(before, params, opt)
    # Reported once: the next sync point goes on.
    params[0].grad[3] = 0.0
    opt.state_dict()


def test_device_side_finite_steps_equal_the_host_rule(device_side, monkeypatch):
    runs = []
    for side in ({"cuda", "cpu"}, {"cuda"}):
        monkeypatch.setattr(nonfinite, "DEVICE_SIDE", side)
        params = params_with_grads()
        opt = SophiaG(params, **hyper(), fused=True)
        for _ in range(3):
            opt.step()
        runs.append([p.detach().clone() for p in params])
        assert opt.skipped_steps == 0
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_the_host_rule_still_raises_at_once_on_the_cpu():
    params = params_with_grads(bad=float("nan"))
    opt = SophiaG(params, **hyper(), foreach=True)
    with pytest.raises(FloatingPointError, match=r"param_groups\[0\]\['params'\]\[1\]"):
        opt.step()
