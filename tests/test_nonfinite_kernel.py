r"""The fused kernel's non-finite check, on its CPU build: one read of every gradient,
a flag set to one where an element is NaN or infinite, and nothing else written.

It runs through the same traversal as the step (chunks, vector and scalar paths,
several launches), so it is run with the same three packings as the step's tests in
`test_fused_cpu.py`, on views that start mid-vector, with a bad value in each kind of
place: the first element, the vector path, the scalar tail."""

import pytest
import torch

from sophia import SophiaG, nonfinite

fused = pytest.importorskip("sophia.fused")

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
BAD = [float("nan"), float("inf"), -float("inf")]
# The step's three launch configurations (see `test_fused_cpu.py`): the CPU build's
# default, the GPU's block size, and a packing so small that every branch is taken.
PACKINGS = {
    "cpu": (0, 0, 0, 0),
    "gpu": (0, 0, 0, "gpu"),
    "tiny": (64, 5, 3, 8),
}


@pytest.fixture(params=list(PACKINGS))
def packed(request, ext):
    *sizes, block_size = PACKINGS[request.param]
    if block_size == "gpu":
        block_size = ext.packing(4)["gpu_block_size"]
    ext.set_packing(*sizes, block_size)
    try:
        yield ext
    finally:
        ext.set_packing(0, 0, 0, 0)


# Tensors of awkward sizes, every other one a view one element into a larger buffer
# (contiguous, but not on a vector boundary).
def gradients(dtype):
    gen = torch.Generator().manual_seed(0)
    out = []
    for i, n in enumerate([1, 3, 5, 1023, 4096, 65536 + 7]):
        base = torch.randn(n + 1, generator=gen, dtype=torch.float64).to(dtype)
        out.append(base[1:] if i % 2 else base[:n])
    return out


def check(ext, tensors, start=0.0):
    found = torch.full((1,), start)
    ext.nonfinite_check(tensors, found, 0)
    return found.item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_bad_value_anywhere_sets_the_flag_and_nothing_is_written(packed, dtype):
    grads = gradients(dtype)
    before = [g.clone() for g in grads]
    assert check(packed, grads) == 0.0
    for i, g in enumerate(grads):
        for position in sorted({0, g.numel() // 2, g.numel() - 1}):
            for bad in BAD:
                saved = g[position].clone()
                g[position] = bad
                assert check(packed, grads) == 1.0, (i, position, bad)
                g[position] = saved
    for g, b in zip(grads, before):
        assert torch.equal(g.view(torch.uint8), b.view(torch.uint8))


def test_large_finite_values_and_subnormals_are_finite(ext):
    for dtype in DTYPES:
        info = torch.finfo(dtype)
        values = [info.max, -info.max, info.tiny, info.smallest_normal / 4, -0.0]
        assert check(ext, [torch.tensor(values, dtype=dtype)]) == 0.0, dtype


def test_the_flag_is_set_not_cleared(ext):
    assert check(ext, [torch.ones(9)], start=1.0) == 1.0
    assert check(ext, [], start=0.0) == 0.0


def test_the_binding_refuses_a_bad_flag_or_tensor(ext):
    grads = [torch.ones(4)]
    with pytest.raises(RuntimeError, match="found must be a one-element torch.float32"):
        ext.nonfinite_check(grads, torch.zeros(2), 0)
    with pytest.raises(RuntimeError, match="found must be a one-element torch.float32"):
        ext.nonfinite_check(grads, torch.zeros(1, dtype=torch.float64), 0)
    with pytest.raises(RuntimeError, match=r"grads\[1\] is not contiguous"):
        ext.nonfinite_check([torch.ones(3), torch.ones(4, 2)[:, 0]], torch.zeros(1), 0)


# `found_nonfinite(kernel=True)` sends what the kernel takes to it (inference tensors
# included: it only reads) and checks the rest out of place; the flags agree with the
# `GradScaler` pass's.
@pytest.mark.parametrize("bad", [None, *BAD])
@pytest.mark.parametrize("where", range(5))
def test_kernel_flag_agrees_with_the_multi_tensor_pass(ext, bad, where):
    with torch.inference_mode():
        inference = torch.randn(6)
    tensors = [
        torch.randn(70_000),
        torch.randn(5, 4).t(),
        torch.randn(3, dtype=torch.complex64),
        inference,
        torch.randn(17, dtype=torch.bfloat16),
        torch.zeros(0),
    ]
    if bad is not None:
        target = tensors[where]
        target = torch.view_as_real(target) if target.is_complex() else target
        with torch.inference_mode(target.is_inference()):
            target[1] = bad
    by_kernel = nonfinite.found_nonfinite(tensors, kernel=True)
    by_pass = nonfinite.found_nonfinite(
        [t.clone() if t.is_inference() else t for t in tensors]
    )
    expected = float(bad is not None)
    assert [bool(f.item()) for f in by_kernel.values()] == [bool(expected)]
    assert [bool(f.item()) for f in by_pass.values()] == [bool(expected)]


# Through the optimizer: a fused step looks with the kernel (one call), and its
# refusal still names the parameter.
def test_a_fused_step_looks_with_the_kernel_and_names_the_bad_gradient(
    ext, monkeypatch
):
    calls = []
    check_fused = fused.nonfinite_check_fused
    monkeypatch.setattr(
        fused,
        "nonfinite_check_fused",
        lambda tensors, found: (
            calls.append(len(tensors)) or check_fused(tensors, found)
        ),
    )
    params = [torch.randn(5, requires_grad=True) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = SophiaG(params, fused=True)
    opt.step()
    assert calls == [3]
    params[2].grad[4] = float("inf")
    before = [p.detach().clone() for p in params]
    with pytest.raises(FloatingPointError, match=r"\['params'\]\[2\] has a gradient"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
