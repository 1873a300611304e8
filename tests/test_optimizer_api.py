r"""The torch.optim conventions: state_dict round trips, schedulers, zero_grad, closures, win rate."""

import copy

import pytest
import torch
from conftest import hyper, tiny_mlp

from sophia import SophiaG, SophiaH


# Batches for `tiny_mlp(6, 8, 3)`: 16 rows of 6 inputs, labels among 3 classes.
def data(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def train(model, opt, steps, *, start=0, k=5):
    r"""Cross-entropy training with a Gauss-Newton-Bartlett refresh every k steps; data fixed by step index."""
    from sophia import gnb_loss

    for t in range(start, start + steps):
        x, y = data(t)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step(bs=16)
        if t % k == k - 1:
            opt.zero_grad(set_to_none=True)
            sampled, bs = gnb_loss(
                model(data(10_000 + t)[0]), generator=torch.Generator().manual_seed(t)
            )
            sampled.backward()
            opt.update_hessian()
    return model


@pytest.mark.parametrize(
    "save_foreach, load_foreach",
    [(False, False), (False, True), (True, False), (True, True)],
)
def test_state_dict_round_trip_equals_never_stopping(
    save_foreach, load_foreach, tmp_path
):
    settings = hyper(lr=1e-2)
    straight = tiny_mlp(6, 8, 3)
    opt = SophiaG(straight.parameters(), **settings, foreach=save_foreach)
    train(straight, opt, 23)

    first = tiny_mlp(6, 8, 3)
    opt1 = SophiaG(first.parameters(), **settings, foreach=save_foreach)
    train(first, opt1, 12)
    torch.save(
        {"model": first.state_dict(), "opt": opt1.state_dict()}, tmp_path / "ckpt.pt"
    )

    second = tiny_mlp(6, 8, 3, seed=99)
    opt2 = SophiaG(second.parameters(), **settings, foreach=load_foreach)
    ckpt = torch.load(tmp_path / "ckpt.pt")
    second.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    # The checkpoint's foreach flag comes with it; set the one we want to continue with.
    for group in opt2.param_groups:
        group["foreach"] = load_foreach
    train(second, opt2, 11, start=12)

    for a, b in zip(straight.parameters(), second.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(straight.parameters(), second.parameters()):
        for key in ("step", "exp_avg", "hessian"):
            assert torch.equal(opt.state[a][key], opt2.state[b][key])


def test_state_keys_are_the_authors():
    model = tiny_mlp(6, 8, 3)
    opt = SophiaG(model.parameters())
    train(model, opt, 6)
    sd = opt.state_dict()
    assert set(sd["state"][0]) == {"step", "exp_avg", "hessian"}
    assert sd["state"][0]["step"].dtype == torch.float32
    assert {"lr", "betas", "rho", "weight_decay", "maximize", "capturable"} <= set(
        sd["param_groups"][0]
    )


def test_loads_a_checkpoint_written_by_the_authors_optimizer():
    # The authors' state_dict: same state keys, groups without our keyword-only flags.
    model = tiny_mlp(6, 8, 3)
    opt = SophiaG(model.parameters(), lr=3e-4, rho=0.05)
    train(model, opt, 6)
    sd = copy.deepcopy(opt.state_dict())
    for group in sd["param_groups"]:
        for key in ("foreach", "fused", "eps"):
            del group[key]
    for state in sd["state"].values():
        state["step"] = float(state["step"])
    fresh = SophiaG(model.parameters())
    fresh.load_state_dict(sd)
    assert (
        fresh.param_groups[0]["foreach"] is None
        and fresh.param_groups[0]["eps"] == 1e-15
    )
    assert fresh.param_groups[0]["lr"] == 3e-4
    p = next(model.parameters())
    assert (
        torch.is_tensor(fresh.state[p]["step"]) and fresh.state[p]["step"].item() == 6
    )
    p.grad = torch.ones_like(p)
    fresh.step()


def test_lr_scheduler_drives_the_learning_rate():
    # With weight decay off and h = 0, every coordinate moves by exactly lr per step
    # (a sign step), so the schedule can be read off the parameter.
    p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = SophiaG([p], lr=1.0, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5**t)
    positions = []
    for _ in range(4):
        p.grad = torch.ones(1, dtype=torch.float64)
        opt.step(bs=4)
        sched.step()
        positions.append(p.item())
    assert positions == [-1.0, -1.5, -1.75, -1.875]


def test_zero_grad_and_closure():
    model = tiny_mlp(6, 8, 3)
    opt = SophiaG(model.parameters(), foreach=True)
    x, y = data(0)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure, bs=16)
    assert torch.is_tensor(loss) and loss.item() > 0
    assert all(p.grad is not None for p in model.parameters())
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())


def test_win_rate_counts_unclipped_coordinates():
    # m = 0.1 * g after one step from zero. rho * bs * h per coordinate against |m|:
    p = torch.zeros(4, requires_grad=True)
    opt = SophiaG([p], lr=0.0, betas=(0.9, 0.0), rho=1.0, weight_decay=0.0)
    p.grad = torch.tensor([1.0, 1.0, 0.0, 3.0])
    opt.update_hessian()
    # h = g^2 = [1, 1, 0, 9]; step with g' gives m = 0.1 * g'.
    p.grad = torch.tensor([1.0, 20.0, 5.0, -2.0])
    opt.step(bs=1)
    # |m| = [0.1, 2.0, 0.5, 0.2] vs max(h, eps) = [1, 1, eps, 9]: unclipped are 0 and 3.
    assert opt.win_rate() == 0.5
    # With bs = 100 the denominators grow 100-fold: coordinates 0, 1, 3 win.
    assert opt.win_rate(bs=100) == 0.75


def test_capturable_keeps_steps_on_the_parameter_device():
    p = torch.zeros(3, requires_grad=True)
    opt = SophiaG([p], capturable=True)
    p.grad = torch.ones(3)
    opt.step()
    assert opt.state[p]["step"].device == p.device


def test_sophiah_estimates_the_curvature_of_x_squared_as_two():
    # levanter's check: for L = sum(x^2) the Hessian diagonal is 2 everywhere; with
    # beta2 = 0 the stored hessian is one Hutchinson estimate, exact for a diagonal H.
    x = torch.randn(7, requires_grad=True)
    opt = SophiaH([x], betas=(0.9, 0.0))
    opt.update_hessian(loss=(x**2).sum())
    torch.testing.assert_close(opt.state[x]["hessian"], torch.full((7,), 2.0))


def test_sophiah_maximize_negates_the_estimate():
    x = torch.randn(3, requires_grad=True)
    opt = SophiaH([x], betas=(0.9, 0.0), maximize=True)
    opt.update_hessian(loss=-(x**2).sum())
    torch.testing.assert_close(opt.state[x]["hessian"], torch.full((3,), 2.0))


def test_sophiah_skips_frozen_parameters():
    x = torch.randn(3, requires_grad=True)
    frozen = torch.randn(3, requires_grad=False)
    opt = SophiaH([x, frozen], betas=(0.9, 0.0))
    opt.update_hessian(loss=(x**2).sum() + (frozen * x).sum())
    assert frozen not in opt.state
    torch.testing.assert_close(opt.state[x]["hessian"], torch.full((3,), 2.0))
