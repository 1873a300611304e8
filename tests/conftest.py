r"""What the tests share: fixtures, tiny models, the implementation table, and the
assertion that a refusal left everything as it was.

Test modules import the plain helpers with `from conftest import ...` (pytest puts
this folder on `sys.path`); the fixtures they get by name.

The docs tests need tools that pip does not install: `npm` (the site's build installs
KaTeX with it) and Debian's `chromium` and `chromium-driver` (the browser test).
Where one is missing, such a test is skipped with the command that installs it, so
that the README's quick start runs on a machine without them; under `CI=true`, where
`.ci/run` installs them, a missing tool is a failure, so the tests cannot silently
stop running there.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch


def require(available: bool, what: str) -> None:
    r"""Skip the test (fail it under `CI=true`) unless `available`; `what` says what is
    missing and how to install it."""
    if available:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(what)
    pytest.skip(what)


# ## One thread
#
# The tensors of most tests are tiny: a second intra-op thread cannot speed them up,
# and on a busy machine its fork and join make them much slower. A module opts in with
# `pytestmark = pytest.mark.usefixtures("one_thread")`; the count is restored after it.
@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ## The tests' build of the fused kernel
#
# The CPU build with `SOPHIA_TESTING` (the plain kernels, `convert`, the packing and the
# launch count), built once and cached on disk by torch; the module is skipped where it
# cannot be built. While a module uses it, the optimizer's fused steps run on it too,
# so that `set_packing` and `launch_count` see their launches.
@pytest.fixture(scope="module")
def ext():
    from sophia import fused

    try:
        testing = fused.load_extension("cpu", testing=True)
    except fused.FusedUnavailableError as error:
        pytest.skip(f"the CPU build of the fused kernel is unavailable: {error}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            fused,
            "load_extension",
            functools.partial(fused.load_extension, testing=True),
        )
        yield testing


# ## The implementations
#
# The optimizer's flags that select each implementation of the step. On CPU tensors
# `foreach=None` would pick the reference, so both are forced. `implementations()`
# leaves out the fused kernel where its build for `device_type` is unavailable; it is
# a function, not a constant, so that only the modules that ask pay for the check.
IMPLEMENTATIONS = {
    "reference": dict(foreach=False),
    "foreach": dict(foreach=True),
    "fused": dict(fused=True),
}


def implementations(device_type: str = "cpu") -> dict[str, dict]:
    r"""`IMPLEMENTATIONS`, less the fused kernel where it cannot run on `device_type`."""
    from sophia.fused import fused_available

    found = dict(IMPLEMENTATIONS)
    if not fused_available(device_type):
        del found["fused"]
    return found


# ## Hyperparameters
#
# One base set, the scale of a small model's (the reference configs' betas and weight
# decay, a learning rate for a few dozen steps); a test names only what it changes and
# why, so a reader sees what matters to it.
HYPER = dict(lr=3e-3, betas=(0.965, 0.99), rho=0.05, weight_decay=0.1)


def hyper(**changes) -> dict:
    r"""`HYPER` with `changes`."""
    return {**HYPER, **changes}


# ## Tiny models
#
# A multilayer perceptron of the given widths with `activation` between its layers,
# seeded; every row of a batch is one prediction, so $B$ is the number of rows. And
# the smallest GPT that still has every part (one block, two heads).
def tiny_mlp(
    *widths: int, activation=torch.nn.Tanh, seed: int = 0, dtype=torch.float32
) -> torch.nn.Sequential:
    r"""`Linear(widths[0], widths[1])`, `activation()`, ..., `Linear(.., widths[-1])`."""
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(widths, widths[1:])):
        if i:
            layers.append(activation())
        layers.append(torch.nn.Linear(fan_in, fan_out))
    return torch.nn.Sequential(*layers).to(dtype)


def tiny_gpt_config(**changes):
    r"""A one-block, two-head, 32-wide GPT over 16 positions; `changes` override."""
    from sophia.experiments.model import GPTConfig

    return GPTConfig(
        **{**dict(block_size=16, n_layer=1, n_head=2, n_embd=32), **changes}
    )


# A quiet training run of that GPT, with batches of four and one evaluation batch; a
# test adds its steps and intervals. `tiny_gpt_args()` is the same run on the command
# line of `python -m sophia.train` (where the learning rate is the optimizer's).
def tiny_train_config(**changes):
    r"""A `TrainConfig` of `tiny_gpt_config()` at `lr=1e-2`; `changes` override."""
    from sophia.experiments.config import TrainConfig

    fields = dict(
        model=tiny_gpt_config(), batch_size=4, eval_iters=1, verbose=False, lr=1e-2
    )
    return TrainConfig(**{**fields, **changes})


def tiny_gpt_args() -> list[str]:
    r"""The flags of `tiny_gpt_config()`, `--batch-size 4 --eval-iters 1 --quiet`."""
    config = tiny_gpt_config()
    args = []
    for field in ("block_size", "n_layer", "n_head", "n_embd"):
        args += ["--" + field.replace("_", "-"), str(getattr(config, field))]
    return [*args, "--batch-size", "4", "--eval-iters", "1", "--quiet"]


# ## Nothing changed
#
# A refusal must leave the parameters and the optimizer's state bit for bit as they
# were. `snapshot` copies both, the state keyed by the parameter's position;
# `assert_unchanged` compares, and also that no parameter gained or lost state.
def snapshot(params, opt) -> tuple[list[torch.Tensor], dict[int, dict]]:
    r"""Copies of `params` and of `opt`'s state for each of them."""
    params = list(params)
    return (
        [p.detach().clone() for p in params],
        {
            i: {
                k: v.clone() if torch.is_tensor(v) else v
                for k, v in opt.state[p].items()
            }
            for i, p in enumerate(params)
            if p in opt.state
        },
    )


def assert_unchanged(before, params, opt) -> None:
    r"""Assert that `params` and `opt`'s state are bit for bit what `snapshot` saw."""
    params = list(params)
    old_params, old_state = before
    for i, (p, q) in enumerate(zip(params, old_params)):
        assert torch.equal(p.detach(), q), f"parameter {i} changed"
    assert {i for i, p in enumerate(params) if p in opt.state} == set(old_state)
    for i, state in old_state.items():
        now = opt.state[params[i]]
        assert now.keys() == state.keys(), f"parameter {i}: state keys changed"
        for k, v in state.items():
            same = torch.equal(now[k], v) if torch.is_tensor(v) else now[k] == v
            assert same, f"parameter {i}: state {k!r} changed"


# ## Docstrings that are raw
#
# The line of every docstring in `source` that is not a raw string literal: in a plain
# literal `\b`, `\f`, `\n`, `\t` are escapes, and LaTeX's `\begin` loses its backslash.
def non_raw_docstrings(source: str) -> list[int]:
    r"""Line numbers of the module's, classes' and functions' docstrings that are not
    raw strings."""
    import ast

    lines = source.splitlines()
    found = []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, kinds) or not node.body:
            continue
        first = node.body[0]
        if (
            isinstance(first, ast.Expr)
            and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)
        ):
            opening = lines[first.lineno - 1][first.col_offset :]
            if opening[:1] not in "rR":
                found.append(first.lineno)
    return found
