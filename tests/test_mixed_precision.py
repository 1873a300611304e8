r"""Mixed precision: bf16 autocast, fp16 with `torch.amp.GradScaler` (for the step and for
the Hessian refresh), and bf16 parameters with their state.

* Under `bfloat16` autocast, Sophia-G trains the small GPT (refreshes included) and its
  loss goes down.
* With a `GradScaler`, a step whose gradients overflowed is skipped and leaves
  parameters and state bit for bit unchanged, for every implementation: the scaler
  skips it itself for the reference and foreach versions, and the fused kernel skips it
  on the device (`found_inf`).
* `update_hessian(scaler=scaler)` divides the scale out of the sampled-label gradient
  (the refresh is outside the scaler), and skips a refresh that overflowed.
* `bfloat16` parameters keep `bfloat16` state (`exp_avg`, `hessian`), like
  `torch.optim.AdamW`; the math is done in `float32` and rounded once when stored, so
  the three implementations agree bit for bit, and with a `float32` step rounded once.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import hyper, implementations, tiny_gpt_config, tiny_mlp

from sophia import SophiaG, gnb_loss
from sophia.experiments.model import GPT

IMPLS = list(implementations().values())
IMPL_IDS = [
    next(iter(flags)) + "=" + str(next(iter(flags.values()))) for flags in IMPLS
]
HYPER = hyper(betas=(0.9, 0.99))


def mlp():
    return tiny_mlp(6, 12, 4)


def batch(t):
    gen = torch.Generator().manual_seed(t)
    return torch.randn(16, 6, generator=gen), torch.randint(0, 4, (16,), generator=gen)


def test_bf16_autocast_trains_the_gpt():
    config = tiny_gpt_config(vocab_size=32)
    torch.manual_seed(0)
    model = GPT(config)
    opt = SophiaG(model.parameters(), lr=3e-3, rho=0.05, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    # A learnable sequence: token t is followed by t + 1.
    start = torch.randint(0, 16, (8, 1), generator=gen)
    x = (start + torch.arange(16)) % 32
    y = (x + 1) % 32
    losses = []
    for t in range(30):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(x, y)
        loss.backward()
        opt.step(bs=y.numel())
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if t % 5 == 4:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits, _ = model(x)
            sampled, B = gnb_loss(logits, generator=gen)
            sampled.backward()
            opt.update_hessian()
            opt.zero_grad(set_to_none=True)
    assert all(
        p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters()
    )
    assert losses[-1] < 0.7 * losses[0]
    assert opt.win_rate() > 0


# ## fp16 with a GradScaler
#
# The scaler's `found_inf` comes from the scaled gradients; one infinity is enough. The
# loss is computed under `float16` autocast where the CPU has it.
@pytest.mark.parametrize("flags", IMPLS, ids=IMPL_IDS)
def test_grad_scaler_skips_an_overflowed_step_bit_for_bit(flags):
    model = mlp()
    opt = SophiaG(model.parameters(), **HYPER, **flags)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for t in range(3):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(batch(t)[0]), batch(t)[1])
        scaler.scale(loss).backward()
        scaler.step(opt, bs=16)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    assert all(s["step"].item() == 3 for s in opt.state.values())

    params = [p.detach().clone() for p in model.parameters()]
    state = [{k: v.clone() for k, v in s.items()} for s in opt.state.values()]
    scale = scaler.get_scale()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.cross_entropy(model(batch(9)[0]), batch(9)[1])
    scaler.scale(loss).backward()
    model[2].bias.grad[1] = float("inf")
    scaler.step(opt, bs=16)
    scaler.update()
    assert scaler.get_scale() == scale / 2
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    for s, old in zip(opt.state.values(), state):
        for k, v in old.items():
            assert torch.equal(s[k], v), k


# The refresh under a scaler: the sampled-label loss scaled by $s$, then
# `update_hessian(scaler=scaler)`, gives the same $h$ as an unscaled backward pass, bit
# for bit ($s$ is a power of two). Without `scaler=` it would be $s^2$ times too large.
@pytest.mark.parametrize("flags", IMPLS, ids=IMPL_IDS)
def test_the_refresh_divides_the_scale_out(flags):
    scaled, plain = mlp(), mlp()
    opt_s = SophiaG(scaled.parameters(), **HYPER, **flags)
    opt_p = SophiaG(plain.parameters(), **HYPER, **flags)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, _ = batch(3)
    loss_s, _ = gnb_loss(scaled(x), generator=torch.Generator().manual_seed(5))
    loss_p, _ = gnb_loss(plain(x), generator=torch.Generator().manual_seed(5))
    scaler.scale(loss_s).backward()
    loss_p.backward()
    opt_s.update_hessian(scaler=scaler)
    opt_p.update_hessian()
    for a, b in zip(scaled.parameters(), plain.parameters()):
        assert torch.equal(opt_s.state[a]["hessian"], opt_p.state[b]["hessian"])
        assert opt_p.state[b]["hessian"].abs().sum() > 0
    # The gradients themselves are left scaled, as the scaler would find them.
    assert torch.equal(
        next(scaled.parameters()).grad, 2.0**10 * next(plain.parameters()).grad
    )


@pytest.mark.parametrize("flags", IMPLS, ids=IMPL_IDS)
def test_an_overflowed_refresh_is_skipped(flags):
    model = mlp()
    opt = SophiaG(model.parameters(), **HYPER, **flags)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, _ = batch(4)
    loss, _ = gnb_loss(model(x), generator=torch.Generator().manual_seed(5))
    scaler.scale(loss).backward()
    opt.update_hessian(scaler=scaler)
    before = {k: s["hessian"].clone() for k, s in enumerate(opt.state.values())}
    model[0].weight.grad[0, 0] = float("nan")
    opt.update_hessian(scaler=scaler)
    assert opt.skipped_refreshes == 1
    for k, s in enumerate(opt.state.values()):
        assert torch.equal(s["hessian"], before[k])


def test_scaler_must_be_a_grad_scaler():
    model = mlp()
    opt = SophiaG(model.parameters())
    with pytest.raises(
        TypeError, match=r"scaler must be a torch.amp.GradScaler or None, got float"
    ):
        opt.update_hessian(scaler=1024.0)


# ## bf16 parameters
#
# The state has the parameter's dtype (half the memory of `float32` state; the choice
# `torch.optim.AdamW` makes too). Each step computes in `float32` from the stored
# values and rounds once on store, so it equals a `float32` step taken from the same
# (bf16-valued) numbers and rounded to bf16 at the end.
@pytest.mark.parametrize("flags", IMPLS, ids=IMPL_IDS)
def test_bf16_parameters_keep_bf16_state_and_round_once(flags):
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(64, generator=gen).bfloat16().requires_grad_()
    opt = SophiaG([p], **HYPER, **flags)
    estimate = torch.rand(64, generator=gen).bfloat16()
    opt.update_hessian([estimate])
    p.grad = torch.randn(64, generator=gen).bfloat16()
    # The same step in float32, from the same starting values.
    q = p.detach().float().requires_grad_()
    ref = SophiaG([q], **HYPER, foreach=False)
    ref.update_hessian([estimate.float()])
    q.grad = p.grad.float()
    opt.step(bs=100)
    ref.step(bs=100)
    state = opt.state[p]
    assert (
        state["exp_avg"].dtype == torch.bfloat16
        and state["hessian"].dtype == torch.bfloat16
    )
    assert torch.equal(p.detach(), q.detach().bfloat16())
    assert torch.equal(state["exp_avg"], ref.state[q]["exp_avg"].bfloat16())
    assert torch.equal(state["hessian"], ref.state[q]["hessian"].bfloat16())
