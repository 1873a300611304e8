r"""The fused kernel's CPU build, element by element against the reference.

The CPU build compiles the CUDA kernel and launcher as C++ and runs the launches as
loops (see `sophia/csrc/cpu_emulation.h`), so these tests exercise the GPU code's
packing, chunking, vector and scalar paths on any machine. They run it three ways:
with the CPU build's default (one thread per block), with the GPU's block size, and
with a tiny packing that makes hundreds of launches from little data.

**Agreement.** The kernel rounds where the reference rounds, and PyTorch's CPU kernels
evaluate `add_(alpha=)` and `addcmul_` as fused multiply-adds on x86 CPUs with AVX2 or
AVX-512 (measured). There every result is **bitwise** the reference's, in all four
dtypes, and the tests assert it. Elsewhere (a CPU on which PyTorch rounds those
multiply-adds twice), they allow what one extra rounding per operation can do: in
`float32`/`float64`, a step is a chain of at most four roundings, each changing an
intermediate by at most one unit in the last place ($2^{-24}$ relative in `float32`),
and every intermediate is bounded by $|\theta| + \eta$, so the results differ by less
than $4 \cdot 2^{-24} (|\theta| + \eta) < 10^{-6}(|\theta| + \eta)$. In `bfloat16` and
`float16` the `float32` results are rounded once, so they differ by at most one unit in
the last place of the storage type, and mostly not at all.
"""

import contextlib
import math
import platform

import pytest
import torch

from sophia.reference import hessian_ema_reference, sophiag_reference

fused = pytest.importorskip("sophia.fused")

EXPECT_BITWISE = platform.machine().lower() in (
    "x86_64",
    "amd64",
) and torch.backends.cpu.get_cpu_capability() in (
    "AVX2",
    "AVX512",
)
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
HYPER = dict(
    lr=0.01, beta1=0.965, rho=0.04, bs=64.0, weight_decay=0.1, eps=1e-15, maximize=False
)
SIZES = [1, 3, 5, 7, 64, 1023, 1024, 4097]

# One OpenMP thread for the launches (and for PyTorch, whose OpenMP runtime the CPU
# build shares): most tests make many tiny launches, whose fork and join dominate on
# a busy machine. `test_blocks_run_on_several_threads` runs blocks in parallel.
pytestmark = pytest.mark.usefixtures("one_thread")


# The launch configurations. `gpu` runs the kernel with the GPU's block size; `tiny`
# packs so little per launch that every branch of the packing is taken.
PACKINGS = {
    "cpu": dict(),
    "gpu": dict(block_size="gpu"),
    "tiny": dict(chunk_size=64, max_blocks=5, max_tensors=3, block_size=8),
}


@contextlib.contextmanager
def packing(ext, chunk_size=0, max_blocks=0, max_tensors=0, block_size=0):
    if block_size == "gpu":
        block_size = ext.packing(4)["gpu_block_size"]
    ext.set_packing(chunk_size, max_blocks, max_tensors, block_size)
    try:
        yield ext.packing(4)
    finally:
        ext.set_packing(0, 0, 0, 0)


@pytest.fixture(params=list(PACKINGS))
def launch_config(request, ext):
    with packing(ext, **PACKINGS[request.param]) as config:
        yield config


# ## Tensors with guards
#
# The fused tensors live inside larger buffers filled with a sentinel, `offset`
# elements past a vector boundary (`offset=1` makes a view like `base[1:]`, which the
# kernel must take on its scalar path). A write out of bounds changes a sentinel.
class Arena:
    SENTINEL = 7.0
    GUARD = 8

    def __init__(self):
        self.buffers = []

    def place(self, t, offset=0):
        buf = torch.full(
            (t.numel() + offset + 2 * self.GUARD,), self.SENTINEL, dtype=t.dtype
        )
        start = self.GUARD + offset
        view = buf[start : start + t.numel()].view(t.shape)
        view.copy_(t)
        self.buffers.append((buf, start, start + t.numel()))
        return view

    def assert_guards_intact(self):
        for buf, lo, hi in self.buffers:
            assert bool(
                (buf[:lo] == self.SENTINEL).all() and (buf[hi:] == self.SENTINEL).all()
            ), "out-of-bounds write"


def random_state(sizes, dtype, seed=0, hessian_scale=0.1):
    r"""params, grads, exp_avgs, hessians; Hessians positive, zero and negative (Hutchinson's can be)."""
    gen = torch.Generator().manual_seed(seed)
    lists = [[], [], [], []]
    for n in sizes:
        h = torch.rand(n, generator=gen, dtype=torch.float64) * hessian_scale
        kind = torch.randint(0, 4, (n,), generator=gen)
        h = torch.where(kind == 0, torch.zeros_like(h), torch.where(kind == 1, -h, h))
        values = [
            torch.randn(n, generator=gen, dtype=torch.float64),
            torch.randn(n, generator=gen, dtype=torch.float64),
            0.1 * torch.randn(n, generator=gen, dtype=torch.float64),
            h,
        ]
        for column, v in zip(lists, values):
            column.append(v.to(dtype))
    return lists


def clones(lists):
    return [[t.clone() for t in column] for column in lists]


INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def max_ulps(actual, expected):
    r"""The largest difference, in units in the last place of `expected`'s dtype (NaNs excluded)."""
    a, e = actual.detach().flatten(), expected.detach().flatten()
    keep = ~(a.isnan() | e.isnan())
    a, e = a[keep].double(), e[keep].double()
    if a.numel() == 0:
        return 0.0
    mantissa = {
        torch.float32: 23,
        torch.float64: 52,
        torch.bfloat16: 7,
        torch.float16: 10,
    }[expected.dtype]
    tiny = torch.finfo(expected.dtype).smallest_normal
    _, exponent = torch.frexp(torch.maximum(e.abs(), torch.full_like(e, tiny)))
    ulp = torch.ldexp(torch.ones_like(e), exponent - 1 - mantissa)
    return float(((a - e).abs() / ulp).max())


def assert_agrees(actual, expected, what, lr=HYPER["lr"]):
    r"""Bitwise where expected (see the module docstring), otherwise within one extra rounding per op."""
    a, e = actual.detach(), expected.detach()
    assert a.dtype == e.dtype and a.shape == e.shape, what
    assert torch.equal(a.isnan(), e.isnan()), f"{what}: NaN in different places"
    a, e = a[~a.isnan()], e[~e.isnan()]
    if EXPECT_BITWISE:
        same = a.view(INT_VIEW[a.element_size()]) == e.view(INT_VIEW[e.element_size()])
        assert bool(same.all()), (
            f"{what}: {int((~same).sum())} elements differ, up to {max_ulps(a, e)} ulp"
        )
    elif a.dtype in (torch.float32, torch.float64):
        diff = (a.double() - e.double()).abs()
        assert bool((diff <= 1e-6 * (e.double().abs() + lr)).all()), (
            f"{what}: max |diff| {float(diff.max())}"
        )
    else:
        assert max_ulps(a, e) <= 1, f"{what}: {max_ulps(a, e)} ulp"
        assert float((a == e).float().mean()) > 0.9, (
            f"{what}: most elements should be equal"
        )


def run_step(sizes, dtype, *, seed=0, offsets=None, hyper=HYPER, **extra):
    r"""One step of the reference and of the fused kernel (on guarded tensors) from the same state."""
    state = random_state(sizes, dtype, seed)
    ref = clones(state)
    arena = Arena()
    offsets = offsets or (lambda column, i: 0)
    fz = [
        [arena.place(t, offsets(c, i)) for i, t in enumerate(column)]
        for c, column in enumerate(state)
    ]
    ref_steps = [torch.tensor(3.0) for _ in sizes]
    fz_steps = [torch.tensor(3.0) for _ in sizes]
    sophiag_reference(*ref, ref_steps, **hyper)
    fused.sophiag_fused(*fz, fz_steps, **{**hyper, **extra})
    arena.assert_guards_intact()
    return state, ref, fz, ref_steps, fz_steps


def assert_step_agrees(ref, fz, ref_steps, fz_steps, state, lr=HYPER["lr"]):
    names = ["params", "grads", "exp_avgs", "hessians"]
    for name, ref_column, fz_column in zip(names, ref, fz):
        for i, (r, f) in enumerate(zip(ref_column, fz_column)):
            assert_agrees(f, r, f"{name}[{i}]", lr=lr)
    for i, (g, f) in enumerate(zip(state[1], fz[1])):
        assert torch.equal(g, f), f"grads[{i}] was written"
    for r, f in zip(ref_steps, fz_steps):
        assert torch.equal(r, f)


# ## The kernel's conversions are PyTorch's
#
# Random bit patterns (every kind of float32), and the hard cases: ties to even, the
# largest finite values and the overflow to infinity, subnormals of the target type
# and of float32, signed zeros, infinities, NaN.
def conversion_inputs():
    gen = torch.Generator().manual_seed(0)
    to_int32 = lambda x: ((x + 2**31) % 2**32 - 2**31).to(torch.int32)
    random_bits = to_int32(
        torch.randint(0, 2**32, (1 << 18,), generator=gen, dtype=torch.int64)
    )
    high = torch.randint(0, 2**16, (4096,), generator=gen, dtype=torch.int64) << 16
    bf16_ties = to_int32(
        torch.cat([high | low for low in (0x8000, 0x7FFF, 0x8001, 0x0000, 0xFFFF)])
    )
    half_mantissas = torch.randint(1024, 2048, (64,), generator=gen).double()
    half_ties = torch.cat(
        [
            (half_mantissas + frac) * 2.0 ** (e - 10)
            for e in range(-14, 16)
            for frac in (0.5, 0.49999, 0.50001)
        ]
        + [
            (torch.arange(0, 1024).double() + frac) * 2.0**-24
            for frac in (0.5, 0.25, 0.75)
        ]
    ).float()
    special = torch.tensor(
        [
            0.0,
            -0.0,
            math.inf,
            -math.inf,
            math.nan,
            -math.nan,
            65504.0,
            65519.99,
            65520.0,
            65536.0,
            2.0**-14,
            2.0**-24,
            2.0**-25,
            2.0**-25 * (1 + 2**-20),
            2.0**-26,
            3.0 * 2.0**-26,
            1e-45,
            1.17549435e-38,
            torch.finfo(torch.float32).max,
            torch.finfo(torch.bfloat16).max,
            3.3961776e38,
            1.0,
            -1.0,
            1.0 + 2**-8,
            1.0 + 2**-9,
            1.0 + 3 * 2**-9,
            1.0 + 2**-11,
            1.0 + 3 * 2**-11,
        ],
        dtype=torch.float32,
    )
    values = torch.cat(
        [
            random_bits.view(torch.float32),
            bf16_ties.view(torch.float32),
            half_ties,
            special,
        ]
    )
    return torch.cat([values, -values])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_conversions_match_torch(ext, dtype):
    src = conversion_inputs()
    stored, back = ext.convert(src, dtype, 0)
    expected = src.to(dtype)
    nan = src.isnan()
    assert bool(stored[nan].isnan().all()) and not bool(stored[~nan].isnan().any())
    bits, expected_bits = (
        stored[~nan].view(torch.int16),
        expected[~nan].view(torch.int16),
    )
    assert torch.equal(bits, expected_bits), (
        f"{int((bits != expected_bits).sum())} values round differently"
    )
    assert torch.equal(
        back[~nan].view(torch.int32), expected[~nan].float().view(torch.int32)
    )
    assert bool(back[nan].isnan().all())


# ## One step, every dtype, every launch configuration
#
# The "big-lr" hyperparameters are chosen so that $1 - \eta\lambda$ computed in
# `float32` differs from the reference's (computed in `double`, then rounded): the
# kernel must derive its constants as the reference does.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "hyper",
    [
        HYPER,
        dict(HYPER, weight_decay=0.0, maximize=True),
        dict(HYPER, lr=0.3, beta1=0.0, weight_decay=0.7),
    ],
    ids=["default", "maximize-no-decay", "big-lr"],
)
def test_step_matches_reference(launch_config, dtype, hyper):
    state, ref, fz, ref_steps, fz_steps = run_step(
        SIZES + [65536 + 5], dtype, hyper=hyper
    )
    assert_step_agrees(ref, fz, ref_steps, fz_steps, state, lr=hyper["lr"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("square", [True, False], ids=["square", "plain"])
def test_hessian_ema_matches_reference(launch_config, dtype, square):
    sizes = SIZES + [65536 + 5]
    gen = torch.Generator().manual_seed(1)
    hessians = [torch.rand(n, generator=gen).to(dtype) for n in sizes]
    estimates = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    ref = [h.clone() for h in hessians]
    arena = Arena()
    fz = [arena.place(h, offset=i % 2) for i, h in enumerate(hessians)]
    hessian_ema_reference(ref, estimates, beta2=0.99, square=square)
    fused.hessian_ema_fused(fz, estimates, beta2=0.99, square=square)
    arena.assert_guards_intact()
    for i, (r, f) in enumerate(zip(ref, fz)):
        assert_agrees(f, r, f"hessians[{i}]")


# ## The packing
#
# A model of the launcher's packing, written independently, gives the number of
# launches; the step's agreement with the reference shows that every element was
# updated exactly once (a skipped element keeps its old value, a doubled one moves twice).
def expected_launches(numels, chunk_size, max_blocks, max_tensors):
    launches, tensors, blocks = 0, 0, 0
    for n in numels:
        if n == 0:
            continue
        if tensors == max_tensors:
            launches, tensors, blocks = launches + 1, 0, 0
        tensors += 1
        for _ in range(-(-n // chunk_size)):
            if blocks == max_blocks:
                launches, tensors, blocks = launches + 1, 1, 0
            blocks += 1
    return launches + (blocks > 0)


def test_many_small_tensors_share_launches(ext):
    sizes = [1 + (7 * i) % 37 for i in range(150)]
    config = ext.packing(4)
    state, ref, fz, ref_steps, fz_steps = run_step(sizes, torch.float32)
    launches = ext.launch_count()
    assert launches == expected_launches(
        sizes, config["chunk_size"], config["max_blocks"], config["max_tensors"]
    )
    assert launches == -(-len(sizes) // config["max_tensors"]) > 1
    assert_step_agrees(ref, fz, ref_steps, fz_steps, state)


@pytest.mark.parametrize(
    "sizes",
    [
        [5000, 1, 20000, 3, 1023, 0, 64, 65],
        [64 * 5 * 3 + 1],
        [0, 0],
        [64] * 11 + [1] * 4,
    ],
    ids=["mixed", "carry-over", "empty", "exact-fits"],
)
def test_large_tensors_span_chunks_and_launches(ext, sizes):
    with packing(
        ext, chunk_size=64, max_blocks=5, max_tensors=3, block_size=8
    ) as config:
        state, ref, fz, ref_steps, fz_steps = run_step(sizes, torch.float32)
        launches = ext.launch_count()
    assert launches == expected_launches(
        sizes, config["chunk_size"], config["max_blocks"], config["max_tensors"]
    )
    assert_step_agrees(ref, fz, ref_steps, fz_steps, state)


def test_production_packing_with_the_gpu_block_size(ext):
    sizes = [3 * 65536 + 5, 65536, 1, 70001]
    with packing(ext, block_size="gpu") as config:
        state, ref, fz, ref_steps, fz_steps = run_step(sizes, torch.float32)
        launches = ext.launch_count()
    assert (
        config["chunk_size"] == 65536
        and config["block_size"] == config["gpu_block_size"]
    )
    assert launches == 1
    assert_step_agrees(ref, fz, ref_steps, fz_steps, state)


def test_blocks_run_on_several_threads(ext):
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))
    try:
        sizes = [70001 + 13 * i for i in range(40)]
        state, ref, fz, ref_steps, fz_steps = run_step(sizes, torch.float32)
        assert torch.get_num_threads() >= 2 and ext.launch_count() == 1
    finally:
        torch.set_num_threads(before)
    assert_step_agrees(ref, fz, ref_steps, fz_steps, state)


def test_packing_fits_the_kernel_argument_bank(ext):
    for depth in (2, 4):
        config = ext.packing(depth)
        assert config["kernel_arg_bytes"] <= 4096
        assert config["chunk_size"] % config["ilp"] == 0
    with pytest.raises(RuntimeError, match="multiple of"):
        ext.set_packing(6, 0, 0, 0)
    assert ext.packing(4)["chunk_size"] == 65536


# ## Misaligned views take the scalar path
#
# `base[1:]` of a contiguous tensor is contiguous but starts mid-vector. Here some
# tensors are misaligned in one list only, some in all, some not at all; neighbours
# in memory are guarded.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_misaligned_views_next_to_aligned_ones(launch_config, dtype):
    sizes = [1, 3, 5, 1023, 4096, 65536 + 7]
    offsets = lambda column, i: [0, 1, (column == 2) * 1, 3, 0, 2][i]
    state, ref, fz, ref_steps, fz_steps = run_step(sizes, dtype, offsets=offsets)
    vector_bytes = launch_config["ilp"] * fz[0][0].element_size()
    assert (
        fz[0][1].data_ptr() % vector_bytes != 0
        and fz[0][0].data_ptr() % vector_bytes == 0
    )
    assert_step_agrees(ref, fz, ref_steps, fz_steps, state)


# ## The plain kernel and the multi-tensor kernel agree, bit for bit, on any CPU
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_simple_kernel_matches_multi_tensor_kernel(ext, dtype):
    sizes = SIZES + [65536 + 3]
    a = random_state(sizes, dtype, seed=3)
    b = clones(a)
    args = (0.02, None, 0.9, 2.5, 0.1, 1e-15, False, None, None, 0)
    ext.fused_step(a, *args)
    ext.simple_step(b, *args)
    for x, y in zip(a[0] + a[2], b[0] + b[2]):
        assert torch.equal(x, y)
    estimates = [torch.randn(n).to(dtype) for n in sizes]
    for square in (True, False):
        ext.hessian_ema([a[3], estimates], 0.99, square, 0)
        ext.simple_hessian_ema([b[3], estimates], 0.99, square, 0)
        for x, y in zip(a[3], b[3]):
            assert torch.equal(x, y)


# ## NaN and the guards
#
# A NaN passes through `clamp` in the reference; the kernel lets it through too
# (`fmaxf` would not). Negative and zero curvature give sign steps of size $\eta$, and
# so does an infinite momentum (the clip takes it to one).
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_inf_and_negative_curvature_follow_the_reference(ext, dtype):
    nan, inf = math.nan, math.inf
    param = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, -2.0], dtype=dtype)
    grad = torch.tensor([0.5, 0.5, nan, inf, 0.5, 0.0, -0.5, 1.0], dtype=dtype)
    exp_avg = torch.tensor([0.1, 0.1, 0.1, 0.1, nan, 0.0, 0.3, 0.2], dtype=dtype)
    hessian = torch.tensor([nan, -1.0, 0.5, 0.5, 0.5, 0.0, 0.0, inf], dtype=dtype)
    state = [[param], [grad], [exp_avg], [hessian]]
    ref, fz = clones(state), clones(state)
    sophiag_reference(*ref, [torch.tensor(0.0)], **HYPER)
    fused.sophiag_fused(*fz, [torch.tensor(0.0)], **HYPER)
    for r, f in zip(ref, fz):
        assert_agrees(f[0], r[0], "special values")
    assert bool(fz[0][0][[0, 2, 4]].isnan().all())
    assert float(fz[0][0][3]) == pytest.approx(
        (1 - HYPER["lr"] * HYPER["weight_decay"]) - HYPER["lr"], rel=1e-2
    )


# ## GradScaler's contract
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flag", [1.0, 2.0, math.inf, math.nan])
def test_found_inf_changes_nothing_at_all(ext, dtype, flag):
    state = random_state(SIZES, dtype)
    before = clones(state)
    steps = [torch.tensor(5.0) for _ in SIZES]
    fused.sophiag_fused(
        *state,
        steps,
        **HYPER,
        found_inf=torch.tensor([flag]),
        grad_scale=torch.tensor(8.0),
    )
    for column, old in zip(state, before):
        for t, o in zip(column, old):
            assert torch.equal(
                t.view(INT_VIEW[t.element_size()]), o.view(INT_VIEW[o.element_size()])
            )
    assert all(float(s) == 5.0 for s in steps)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_found_inf_zero_is_a_normal_step(ext, dtype):
    state, ref, fz, ref_steps, fz_steps = run_step(
        SIZES, dtype, found_inf=torch.tensor(0.0)
    )
    assert_step_agrees(ref, fz, ref_steps, fz_steps, state)
    assert all(float(s) == 4.0 for s in fz_steps)


# The kernel divides the scaled gradient by the scale as it reads it. With a power of
# two the scaling and unscaling are exact, so the step equals the reference's on the
# unscaled gradient in every dtype; with another scale (float32), it equals the
# reference's on `scaled / scale` computed by PyTorch.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grad_scale_gives_the_step_on_the_unscaled_gradient(ext, dtype):
    state = random_state(SIZES, dtype)
    ref, fz = clones(state), clones(state)
    scaled = [g * 1024 for g in state[1]]
    fz[1] = [s.clone() for s in scaled]
    sophiag_reference(*ref, [torch.tensor(0.0) for _ in SIZES], **HYPER)
    fused.sophiag_fused(
        *fz,
        [torch.tensor(0.0) for _ in SIZES],
        **HYPER,
        grad_scale=torch.tensor(1024.0),
    )
    for column in (0, 2):
        for r, f in zip(ref[column], fz[column]):
            assert_agrees(f, r, "scaled step")
    assert all(torch.equal(s, f) for s, f in zip(scaled, fz[1])), (
        "the gradient must not be written"
    )


def test_grad_scale_not_a_power_of_two(ext):
    state = random_state(SIZES, torch.float32)
    scale = torch.tensor(3.0)
    scaled = [g * 3.0 for g in state[1]]
    ref = clones(state)
    ref[1] = [s / scale for s in scaled]
    fz = clones(state)
    fz[1] = scaled
    sophiag_reference(*ref, [torch.tensor(0.0) for _ in SIZES], **HYPER)
    fused.sophiag_fused(
        *fz, [torch.tensor(0.0) for _ in SIZES], **HYPER, grad_scale=scale
    )
    for column in (0, 2):
        for r, f in zip(ref[column], fz[column]):
            assert_agrees(f, r, "scaled step")


# ## The learning rate as a tensor
#
# Read by the kernel from memory as `float32`: the reference with that value.
@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(), (1,)])
def test_lr_as_a_tensor(ext, lr_dtype, shape):
    lr = torch.full(shape, 0.0123, dtype=lr_dtype)
    state, ref, fz, ref_steps, fz_steps = run_step(
        SIZES, torch.float32, hyper=dict(HYPER, lr=float(lr.float().reshape(()))), lr=lr
    )
    assert_step_agrees(ref, fz, ref_steps, fz_steps, state)


def test_lr_tensor_is_read_at_every_call(ext):
    state = random_state([9], torch.float32)
    lr = torch.tensor(0.0)
    before = clones(state)
    fused.sophiag_fused(
        *state, [torch.tensor(0.0)], **dict(HYPER, lr=lr, weight_decay=0.0)
    )
    assert torch.equal(state[0][0], before[0][0])
    lr.fill_(0.5)
    fused.sophiag_fused(
        *state, [torch.tensor(0.0)], **dict(HYPER, lr=lr, weight_decay=0.0)
    )
    assert not torch.equal(state[0][0], before[0][0])


# ## Complex parameters, empty tensors, dtype conversion of estimates
def test_complex_parameters_are_pairs_of_reals(ext):
    gen = torch.Generator().manual_seed(5)
    make = lambda n: torch.randn(n, generator=gen, dtype=torch.complex64)
    state = [
        [make(3), make(1023)],
        [make(3), make(1023)],
        [make(3), make(1023)],
        [make(3).abs() * 0.1 + 0j, make(1023) * 0.1],
    ]
    ref, fz = clones(state), clones(state)
    sophiag_reference(*ref, [torch.tensor(0.0)] * 2, **HYPER)
    fused.sophiag_fused(*fz, [torch.tensor(0.0), torch.tensor(0.0)], **HYPER)
    for r, f in zip(ref[0] + ref[2], fz[0] + fz[2]):
        assert_agrees(torch.view_as_real(f), torch.view_as_real(r), "complex")
    est = [make(3), make(1023)]
    hessian_ema_reference(ref[3], est, beta2=0.99, square=True)
    fused.hessian_ema_fused(fz[3], est, beta2=0.99, square=True)
    for r, f in zip(ref[3], fz[3]):
        assert_agrees(torch.view_as_real(f), torch.view_as_real(r), "complex EMA")


def test_empty_tensors_and_lists(ext):
    fused.sophiag_fused([], [], [], [], [], **HYPER)
    fused.hessian_ema_fused([], [], beta2=0.99, square=True)
    state, ref, fz, ref_steps, fz_steps = run_step([0, 5, 0], torch.float32)
    assert_step_agrees(ref, fz, ref_steps, fz_steps, state)


# An estimate in another dtype is converted to the Hessian's first: exact upward, one
# rounding downward (then the result is the reference's on the rounded estimate).
def test_estimates_are_converted_to_the_hessian_dtype(ext):
    gen = torch.Generator().manual_seed(7)
    h32, e16 = (
        torch.rand(1001, generator=gen),
        torch.randn(1001, generator=gen).to(torch.bfloat16),
    )
    ref, fz = [h32.clone()], [h32.clone()]
    hessian_ema_reference(ref, [e16], beta2=0.99, square=True)
    fused.hessian_ema_fused(fz, [e16], beta2=0.99, square=True)
    assert_agrees(fz[0], ref[0], "upward")
    h16, e32 = (
        torch.rand(1001, generator=gen).to(torch.bfloat16),
        torch.randn(1001, generator=gen),
    )
    ref, fz = [h16.clone()], [h16.clone()]
    hessian_ema_reference(ref, [e32.to(torch.bfloat16)], beta2=0.99, square=False)
    fused.hessian_ema_fused(fz, [e32], beta2=0.99, square=False)
    assert_agrees(fz[0], ref[0], "downward")


# ## Several hundred steps in closed loop
#
# A separable quadratic $L = \sum_i \tfrac12 c_i \theta_i^2 - b_i\theta_i$ split into
# tensors of awkward sizes; a Hessian refresh every `k` steps, alternating the
# Gauss-Newton-Bartlett form (noisy gradients, squared) and Hutchinson's (noisy exact
# curvature, some of it negative). Same noise for both runs.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_closed_loop_on_a_quadratic(ext, dtype, steps=300, k=10):
    sizes = [1, 3, 1023, 4097, 70001]
    runs = {}
    for name in ("reference", "fused"):
        gen = torch.Generator().manual_seed(11)
        curv = [
            torch.rand(n, generator=gen, dtype=torch.float64) * 10 + 0.1 for n in sizes
        ]
        target = [torch.randn(n, generator=gen, dtype=torch.float64) for n in sizes]
        params = [
            torch.randn(n, generator=gen, dtype=torch.float64).to(dtype) for n in sizes
        ]
        exp_avgs = [torch.zeros(n, dtype=dtype) for n in sizes]
        hessians = [torch.zeros(n, dtype=dtype) for n in sizes]
        state_steps = [torch.tensor(0.0) for _ in sizes]
        step, ema = (
            (sophiag_reference, hessian_ema_reference)
            if name == "reference"
            else (fused.sophiag_fused, fused.hessian_ema_fused)
        )
        noise = torch.Generator().manual_seed(12)

        def grads(curv=curv, params=params, target=target):
            return [
                (c * p.double() - b).to(dtype) for c, p, b in zip(curv, params, target)
            ]

        def loss(curv=curv, params=params, target=target):
            return sum(
                float((0.5 * c * p.double() ** 2 - b * p.double()).sum())
                for c, p, b in zip(curv, params, target)
            )

        first = loss()
        for t in range(steps):
            step(
                params,
                grads(),
                exp_avgs,
                hessians,
                state_steps,
                lr=3e-2,
                beta1=0.965,
                rho=0.05,
                bs=4.0,
                weight_decay=0.01,
                eps=1e-15,
                maximize=False,
            )
            if t % k == k - 1:
                if (t // k) % 2 == 0:
                    est = [
                        (
                            g.double()
                            + 0.1
                            * torch.randn(g.shape, generator=noise, dtype=torch.float64)
                        ).to(dtype)
                        for g in grads()
                    ]
                    ema(hessians, est, beta2=0.99, square=True)
                else:
                    est = [
                        (
                            c
                            + 3.0
                            * torch.randn(c.shape, generator=noise, dtype=torch.float64)
                        ).to(dtype)
                        for c in curv
                    ]
                    ema(hessians, est, beta2=0.99, square=False)
        runs[name] = (params, exp_avgs, hessians, state_steps, first, loss())
    (p_r, m_r, h_r, s_r, first, last_r), (p_f, m_f, h_f, s_f, _, last_f) = (
        runs["reference"],
        runs["fused"],
    )
    assert last_r < 0.5 * first
    if EXPECT_BITWISE:
        for r, f in zip(p_r + m_r + h_r, p_f + m_f + h_f):
            assert torch.equal(r, f)
    else:
        assert abs(last_f - last_r) <= 1e-3 * abs(last_r)
    assert all(float(s) == steps for s in s_r + s_f)


# ## Bad input: a clear error, and nothing changed
def spoil(kind, state):
    params, grads, exp_avgs, hessians = state
    n = params[1].numel()
    if kind == "int":
        params[1] = torch.ones(n, dtype=torch.int64)
    elif kind == "bool":
        grads[1] = torch.ones(n, dtype=torch.bool)
    elif kind == "float8":
        exp_avgs[1] = torch.zeros(n).to(torch.float8_e4m3fn)
    elif kind == "non-contiguous":
        exp_avgs[1] = torch.zeros(n, 2)[:, 0]
    elif kind == "sparse":
        grads[1] = grads[1].to_sparse()
    elif kind == "meta":
        hessians[1] = torch.empty(n, device="meta")
    elif kind == "mixed dtype":
        exp_avgs[1] = exp_avgs[1].double()
    elif kind == "shape":
        grads[1] = torch.zeros(n + 1)
    elif kind == "conj":
        params[1] = torch.randn(n, dtype=torch.complex64).conj()
    return state


BAD = {
    "int": (
        TypeError,
        r"params\[1\] has dtype torch\.int64 \(dtype torch\.int64, device cpu, layout torch\.strided",
    ),
    "bool": (TypeError, r"grads\[1\] has dtype torch\.bool \(.*device cpu"),
    "float8": (TypeError, r"exp_avgs\[1\] has dtype torch\.float8_e4m3fn"),
    "non-contiguous": (
        ValueError,
        r"exp_avgs\[1\] is not contiguous \(dtype torch\.float32, device cpu, layout torch\.strided.*strides \(2,\)",
    ),
    "sparse": (
        TypeError,
        r"grads\[1\] has layout torch\.sparse_coo \(dtype torch\.float32, device cpu",
    ),
    "meta": (RuntimeError, r"hessians\[1\] is on device meta"),
    "mixed dtype": (
        TypeError,
        r"exp_avgs\[1\] has dtype torch\.float64 but params\[1\] has torch\.float32",
    ),
    "shape": (
        ValueError,
        r"grads\[1\] has shape \(1024,\) but params\[1\] has \(1023,\)",
    ),
    "conj": (ValueError, r"params\[1\] is a lazy conjugated"),
}


def assert_columns_unchanged(state, before):
    for column, old in zip(state, before):
        for t, o in zip(column, old):
            if t.device.type != "meta":
                assert torch.equal(
                    t.to_dense() if t.is_sparse else t,
                    o.to_dense() if o.is_sparse else o,
                )


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_input_is_refused_before_anything_is_written(ext, kind):
    state = spoil(kind, random_state([5, 1023, 3], torch.float32))
    before = [[t.clone() for t in column] for column in state]
    steps = [torch.tensor(2.0) for _ in range(3)]
    exc, match = BAD[kind]
    with pytest.raises(exc, match=match):
        fused.sophiag_fused(*state, steps, **HYPER)
    assert_columns_unchanged(state, before)
    assert all(float(s) == 2.0 for s in steps)


def test_bad_scalars_are_refused(ext):
    state = random_state([5], torch.float32)
    before = clones(state)
    with pytest.raises(
        ValueError, match=r"lr as a tensor must hold one floating-point value"
    ):
        fused.sophiag_fused(
            *state, [torch.tensor(0.0)], **dict(HYPER, lr=torch.tensor([0.1, 0.2]))
        )
    with pytest.raises(ValueError, match=r"found_inf"):
        fused.sophiag_fused(
            *state, [torch.tensor(0.0)], **HYPER, found_inf=torch.zeros(2)
        )
    for column, old in zip(state, before):
        assert torch.equal(column[0], old[0])


# The binding repeats the checks that keep the kernel inside each tensor's memory, with
# messages that name the list, the index and the tensor, whatever reaches it.
BINDING_BAD = {
    "mixed dtype": (
        lambda s: s[2].__setitem__(0, s[2][0].double()),
        r"exp_avgs\[0\] has dtype torch\.float64 but the call's tensors have dtype torch\.float32",
    ),
    "int": (
        lambda s: s[3].__setitem__(1, torch.ones(3, dtype=torch.int32)),
        r"hessians\[1\] has unsupported dtype torch\.int32 \(dtype torch\.int32, device cpu, layout torch\.strided",
    ),
    "non-contiguous": (
        lambda s: s[1].__setitem__(0, torch.zeros(4, 2)[:, 1]),
        r"grads\[0\] is not contiguous",
    ),
    "sparse": (
        lambda s: s[1].__setitem__(1, torch.zeros(3).to_sparse()),
        r"grads\[1\] has layout torch\.sparse_coo",
    ),
    "meta": (
        lambda s: s[0].__setitem__(1, torch.zeros(3, device="meta")),
        r"params\[1\] is on meta .* cpu build",
    ),
    "numel": (
        lambda s: s[2].__setitem__(1, torch.zeros(4)),
        r"exp_avgs\[1\] has 4 elements but params\[1\] has 3",
    ),
    "length": (lambda s: s[3].pop(), r"hessians has 1 tensors, expected 2"),
}


@pytest.mark.parametrize("kind", list(BINDING_BAD))
def test_binding_refuses_bad_tensors(ext, kind):
    state = [[torch.randn(4), torch.randn(3)] for _ in range(4)]
    edit, match = BINDING_BAD[kind]
    edit(state)
    before = [[t.clone() for t in column] for column in state]
    with pytest.raises(RuntimeError, match=match):
        ext.fused_step(state, 0.1, None, 0.9, 1.0, 0.1, 1e-15, False, None, None, 0)
    assert_columns_unchanged(state, before)


def test_binding_refuses_bad_scalars(ext):
    state = [[torch.randn(4)] for _ in range(4)]
    args = [0.1, None, 0.9, 1.0, 0.1, 1e-15, False, None, None, 0]
    for position, name in ((1, "lr"), (7, "grad_scale"), (8, "found_inf")):
        bad = list(args)
        bad[position] = torch.tensor(1.0, dtype=torch.float64)
        with pytest.raises(
            RuntimeError,
            match=rf"{name} must be a one-element torch\.float32 tensor on cpu",
        ):
            ext.fused_step(state, *bad)
