r"""`SophiaG(fused=True)` as a user meets it, on the CPU build of the kernel.

The kernel itself is checked element by element in `test_fused_cpu.py`; here the
optimizer drives it: training agrees with the reference, GradScaler's contract holds
(a step with an overflowed gradient changes nothing), checkpoints move between
implementations, and bad input is refused before anything is written.
"""

import copy

import pytest
import torch

from sophia import SophiaG, gnb_loss

fused = pytest.importorskip("sophia.fused")


@pytest.fixture(scope="module", autouse=True)
def cpu_build():
    try:
        fused.load_extension("cpu")
    except fused.FusedUnavailableError as error:
        pytest.skip(f"the CPU build of the fused kernel is unavailable: {error}")


def make_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(12, 32), torch.nn.GELU(), torch.nn.Linear(32, 5)
    )
    return model.to(dtype)


def batch(t, dtype=torch.float32):
    g = torch.Generator().manual_seed(t)
    return torch.randn(32, 12, generator=g).to(dtype), torch.randint(
        0, 5, (32,), generator=g
    )


def train(model, opt, steps, k=5, start=0):
    losses = []
    for t in range(start, start + steps):
        x, y = batch(t, next(model.parameters()).dtype)
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step(bs=32)
        losses.append(loss.item())
        if t % k == k - 1:
            opt.zero_grad(set_to_none=True)
            sampled, bs = gnb_loss(
                model(batch(10_000 + t, x.dtype)[0]),
                generator=torch.Generator().manual_seed(t),
            )
            sampled.backward()
            opt.update_hessian()
    return losses


HYPER = dict(lr=3e-3, betas=(0.965, 0.99), rho=0.05, weight_decay=0.1)


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_fused_training_agrees_with_the_reference(dtype, rtol):
    ref_model, fused_model = make_model(dtype), make_model(dtype)
    ref_losses = train(
        ref_model, SophiaG(ref_model.parameters(), **HYPER, foreach=False), 60
    )
    fused_losses = train(
        fused_model, SophiaG(fused_model.parameters(), **HYPER, fused=True), 60
    )
    assert ref_losses[-1] < ref_losses[0]
    torch.testing.assert_close(
        torch.tensor(fused_losses), torch.tensor(ref_losses), rtol=rtol, atol=0
    )
    for a, b in zip(ref_model.parameters(), fused_model.parameters()):
        torch.testing.assert_close(b, a, rtol=rtol, atol=rtol)


def test_fused_bfloat16_training_tracks_the_reference():
    ref_model, fused_model = make_model(torch.bfloat16), make_model(torch.bfloat16)
    train(ref_model, SophiaG(ref_model.parameters(), **HYPER, foreach=False), 30)
    train(fused_model, SophiaG(fused_model.parameters(), **HYPER, fused=True), 30)
    for a, b in zip(ref_model.parameters(), fused_model.parameters()):
        # Within a few bfloat16 units in the last place: the two round the same float32
        # values, which may themselves differ in their last bit.
        torch.testing.assert_close(b.float(), a.float(), rtol=2**-6, atol=2**-10)


def test_state_dict_moves_between_fused_and_reference():
    straight = make_model()
    opt = SophiaG(straight.parameters(), **HYPER, fused=True)
    train(straight, opt, 20)

    first = make_model()
    opt1 = SophiaG(first.parameters(), **HYPER, foreach=False)
    train(first, opt1, 10)
    second = copy.deepcopy(first)
    opt2 = SophiaG(second.parameters(), **HYPER, fused=True)
    opt2.load_state_dict(opt1.state_dict())
    for group in opt2.param_groups:
        group["foreach"], group["fused"] = None, True
    train(second, opt2, 10, start=10)
    for a, b in zip(straight.parameters(), second.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_lr_as_a_tensor_follows_its_value():
    model_a, model_b = make_model(), make_model()
    opt_a = SophiaG(model_a.parameters(), **HYPER, fused=True)
    opt_b = SophiaG(
        model_b.parameters(), **dict(HYPER, lr=torch.tensor(HYPER["lr"])), fused=True
    )
    train(model_a, opt_a, 6)
    train(model_b, opt_b, 6)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    # Writing into the tensor changes the next step, with no new optimizer.
    opt_b.param_groups[0]["lr"].fill_(0.0)
    before = [p.detach().clone() for p in model_b.parameters()]
    for p in model_b.parameters():
        p.grad = torch.ones_like(p)
    opt_b.step()
    for p, q in zip(model_b.parameters(), before):
        assert torch.equal(p, q)


def test_grad_scaler_skips_an_overflowed_step_and_unscales_otherwise():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    model, ref = make_model(), make_model()
    opt = SophiaG(model.parameters(), **HYPER, fused=True)
    ref_opt = SophiaG(ref.parameters(), **HYPER, foreach=False)
    assert opt._step_supports_amp_scaling

    for t in range(4):
        x, y = batch(t)
        for m in (model, ref):
            m.zero_grad(set_to_none=True)
        scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
        torch.nn.functional.cross_entropy(ref(x), y).backward()
        scaler.step(opt, bs=32)
        scaler.update()
        ref_opt.step(bs=32)
    for a, b in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)

    # An overflow: the step changes nothing at all, step counters included.
    params = [p.detach().clone() for p in model.parameters()]
    state = {
        k: {n: v.clone() for n, v in s.items()}
        for k, s in enumerate(opt.state.values())
    }
    scale = scaler.get_scale()
    model.zero_grad(set_to_none=True)
    scaler.scale(
        torch.nn.functional.cross_entropy(model(batch(9)[0]), batch(9)[1])
    ).backward()
    next(model.parameters()).grad[0, 0] = float("inf")
    scaler.step(opt, bs=32)
    scaler.update()
    assert scaler.get_scale() < scale
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    for k, s in enumerate(opt.state.values()):
        for n, v in s.items():
            assert torch.equal(v, state[k][n]), n


def test_bad_input_is_refused_before_anything_is_written():
    good = torch.randn(4, 4, requires_grad=True)
    strided = torch.randn(4, 8)[:, ::2].requires_grad_()
    opt = SophiaG([good, strided], fused=True)
    good.grad = torch.ones(4, 4)
    strided.grad = torch.ones(4, 4)
    before = good.detach().clone()
    with pytest.raises((ValueError, RuntimeError, TypeError), match=r"contiguous"):
        opt.step()
    assert torch.equal(good, before) and good not in opt.state

    # One group fused, one not: a bad fused group stops the step before the first group runs.
    other = torch.randn(3, requires_grad=True)
    opt = SophiaG(
        [
            dict(params=[other], fused=False, foreach=False),
            dict(params=[strided], fused=True),
        ]
    )
    other.grad = torch.ones(3)
    other_before = other.detach().clone()
    with pytest.raises((ValueError, RuntimeError, TypeError), match=r"contiguous"):
        opt.step()
    assert torch.equal(other, other_before) and other not in opt.state


def test_default_fused_none_on_cpu_is_the_reference():
    from sophia.optimizer import _implementation

    p = torch.zeros(3)
    assert _implementation(dict(fused=None, foreach=None), [p]) == "reference"
    assert _implementation(dict(fused=True, foreach=None), [p]) == "fused"
    assert _implementation(dict(fused=False, foreach=True), [p]) == "foreach"


def test_a_kernel_that_cannot_build_refuses_the_whole_step(monkeypatch):
    # A non-fused group listed first must not move when the fused group's kernel is
    # unavailable: the build is part of the checks, before any write.
    def no_build(device_type):
        raise fused.FusedUnavailableError("no compiler (simulated)")

    monkeypatch.setattr(fused, "load_extension", no_build)
    first = torch.randn(3, requires_grad=True)
    second = torch.randn(3, requires_grad=True)
    opt = SophiaG(
        [dict(params=[first], foreach=False), dict(params=[second], fused=True)]
    )
    first.grad, second.grad = torch.ones(3), torch.ones(3)
    before = first.detach().clone()
    with pytest.raises(fused.FusedUnavailableError, match="simulated"):
        opt.step()
    assert torch.equal(first, before) and not opt.state


def test_inference_tensors_are_refused_before_any_write():
    with torch.inference_mode():
        frozen = torch.randn(3)
    ok = torch.randn(3, requires_grad=True)
    ok.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match=r"params\[1\] is an inference tensor"):
        fused.check_fused_tensors(
            {"params": [ok, frozen], "grads or estimates": [ok.grad, torch.ones(3)]}
        )
