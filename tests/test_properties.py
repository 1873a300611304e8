r"""Property-based tests (hypothesis): random shapes, dtypes, hyperparameters and sequences
of steps and refreshes.

Three properties, each over every implementation (the reference, foreach, and the fused
kernel's CPU build when it can be built here):

1. **Agreement.** The three implementations, fed the same sequence, hold the same
   parameters and state after every operation, bit for bit (on the CPU the foreach ops
   call the reference's kernels, and the fused kernel rounds where the reference does:
   see the module `sophia.fused`).
2. **Bounded updates.** Every step moves every (real) coordinate by at most
   $\eta\,(1 + \lambda|\theta|)$: $\eta$ for the clipped Newton step, $\eta\lambda|\theta|$
   for the decoupled weight decay, plus the rounding of the result in its dtype. This
   holds for any $h$, negative ones (Hutchinson) included.
3. **Finite in, finite out.** From finite parameters, gradients and estimates, no
   sequence makes the optimizer write a non-finite parameter or momentum.
4. **A refused step changes nothing.** A learning rate whose step could leave the
   parameters' dtype is refused (`ValueError`) before any write, alike in every
   implementation; the parameters and the state are then bit for bit as they were.

The domain: values up to $10^3$ in magnitude, learning rates up to 1 and, in a share of
the examples, up to the largest `float64` (far beyond every dtype's largest value),
$\beta_1, \beta_2 \in [0, 0.999]$, $\rho \in [10^{-3}, 10]$, $\lambda \in [0, 1]$,
$B \in [1, 10^6]$ and, in a share of the examples, up to the largest `float64` (so that
$\rho B$ overflows every working precision). Squares of gradients may overflow to
infinity in the `float16` state; property 3 covers that case (an infinite $h$ gives a zero
step). The runs are derandomized, so CI sees the same examples every time;
`pytest --hypothesis-show-statistics` reports how many each property ran.
"""

from __future__ import annotations

import torch
from conftest import assert_unchanged, implementations, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sophia import SophiaG

IMPLS = implementations()

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64]
SETTINGS = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)

shapes = st.lists(
    st.lists(st.integers(1, 6), min_size=0, max_size=3).map(tuple),
    min_size=1,
    max_size=3,
)
# Every finite positive `float64` is a valid $B$ and a valid $\eta$; the large ones are
# drawn as often as the ordinary ones.
LARGEST = torch.finfo(torch.float64).max
up_to_the_largest = st.one_of(st.floats(1.0, 1e6), st.floats(1e6, LARGEST))
hyper = st.fixed_dictionaries(
    dict(
        lr=st.one_of(st.floats(0.0, 1.0), st.floats(1.0, LARGEST)),
        betas=st.tuples(st.floats(0.0, 0.999), st.floats(0.0, 0.999)),
        rho=st.floats(1e-3, 10.0),
        weight_decay=st.floats(0.0, 1.0),
        eps=st.sampled_from([1e-15, 1e-8, 1e-3]),
        maximize=st.booleans(),
    )
)
# An operation: a step with `bs`, a refresh from the gradients (Sophia-G's), or a refresh
# from signed estimates (Hutchinson's may be negative). Each carries the seed and the
# order of magnitude of the random values it draws.
operations = st.lists(
    st.tuples(
        st.sampled_from(["step", "refresh", "estimates"]),
        st.integers(0, 2**31 - 1),
        st.integers(-6, 3),
        up_to_the_largest,
    ),
    min_size=1,
    max_size=8,
)


# The values an operation draws, one tensor per parameter, of magnitude up to `10**scale`.
def draw(shape_list, dtype, seed, scale):
    gen = torch.Generator().manual_seed(seed)
    real = torch.float32 if dtype == torch.complex64 else dtype
    out = []
    for shape in shape_list:
        t = (
            torch.rand(
                shape + ((2,) if dtype.is_complex else ()),
                generator=gen,
                dtype=torch.float64,
            )
            * 2
            - 1
        )
        t = (t * 10.0**scale).to(real)
        out.append(torch.view_as_complex(t.contiguous()) if dtype.is_complex else t)
    return out


def real(t):
    return torch.view_as_real(t) if t.is_complex() else t


# Runs the sequence on one optimizer per implementation, from the same parameters, and
# calls `check(name, before, after, h)` after every step that is taken. A step that is
# refused must be refused by every implementation and change nothing (property 4).
def run(shape_list, dtype, h, ops, check=None):
    start = draw(shape_list, dtype, 12345, 0)
    runs = {}
    for name, flags in IMPLS.items():
        params = [t.clone().requires_grad_() for t in start]
        runs[name] = (params, SophiaG(params, **h, **flags))
    for kind, seed, scale, bs in ops:
        values = draw(shape_list, dtype, seed, scale)
        outcomes = {}
        for name, (params, opt) in runs.items():
            if kind == "estimates":
                opt.update_hessian([v.clone() for v in values])
                continue
            for p, v in zip(params, values):
                p.grad = v.clone()
            if kind == "refresh":
                opt.update_hessian()
                continue
            before = [p.detach().clone() for p in params]
            outcomes[name] = step_or_refuse(params, opt, bs)
            if check is not None and outcomes[name] == "taken":
                check(name, before, [p.detach() for p in params], h)
        assert len(set(outcomes.values())) <= 1, outcomes
    return runs


# Takes the step and returns "taken", or checks that a refusal changed nothing and
# returns "refused".
def step_or_refuse(params, opt, bs):
    state = snapshot(params, opt)
    try:
        opt.step(bs=bs)
    except ValueError as error:
        assert "nothing changed" in str(error), str(error)
        assert_unchanged(state, params, opt)
        return "refused"
    return "taken"


@SETTINGS
@given(shape_list=shapes, dtype=st.sampled_from(DTYPES), h=hyper, ops=operations)
def test_all_implementations_agree_bit_for_bit(shape_list, dtype, h, ops):
    runs = run(shape_list, dtype, h, ops)
    ref_params, ref_opt = runs["reference"]
    for name, (params, opt) in runs.items():
        for p, q in zip(params, ref_params):
            assert torch.equal(real(p), real(q)), name
            if q in ref_opt.state:
                for key in ("step", "exp_avg", "hessian"):
                    a, b = real(opt.state[p][key]), real(ref_opt.state[q][key])
                    assert torch.equal(a.isnan(), b.isnan()) and torch.equal(
                        a.nan_to_num(), b.nan_to_num()
                    ), (name, key)


# The bound of property 2, per real coordinate, with one rounding of the stored result:
# half a unit in the last place of the larger of $|\theta_{old}|$ and $|\theta_{new}|$,
# and the `float32` working precision's own rounding of $\eta$ and $\eta\lambda\theta$.
def check_bounded(name, before, after, h):
    for old, new in zip(before, after):
        old, new = real(old).double(), real(new).double()
        tiny = torch.finfo(real(after[0]).dtype).eps
        bound = h["lr"] * (1 + h["weight_decay"] * old.abs())
        slack = tiny * torch.maximum(old.abs(), new.abs()) + 1e-6 * bound
        assert bool(((new - old).abs() <= bound + slack).all()), name


@SETTINGS
@given(shape_list=shapes, dtype=st.sampled_from(DTYPES), h=hyper, ops=operations)
def test_every_update_is_bounded_by_lr_and_the_decay(shape_list, dtype, h, ops):
    run(shape_list, dtype, h, ops, check=check_bounded)


def check_finite(name, before, after, h):
    for p in after:
        assert bool(torch.isfinite(real(p)).all()), name


@SETTINGS
@given(shape_list=shapes, dtype=st.sampled_from(DTYPES), h=hyper, ops=operations)
def test_finite_inputs_never_give_a_nonfinite_parameter(shape_list, dtype, h, ops):
    runs = run(shape_list, dtype, h, ops, check=check_finite)
    for _params, opt in runs.values():
        for state in opt.state.values():
            assert bool(torch.isfinite(real(state["exp_avg"])).all())
