r"""The fused kernel on a real GPU: agreement, CUDA graphs, GradScaler. Skipped without CUDA.

Run on a machine with CUDA torch and a CUDA toolkit (e.g. Colab with a T4):

    python -m pytest -m cuda -v
"""

import pytest
import torch

from sophia import SophiaG

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module", autouse=True)
def cuda_build():
    from sophia import fused

    try:
        fused.load_extension("cuda")
    except fused.FusedUnavailableError as error:
        pytest.fail(f"CUDA is present but the fused kernel does not build: {error}")


def quadratic_run(implementation, dtype, steps=300, k=10, seed=0):
    r"""Several hundred closed-loop steps on a quadratic with refreshes; tensors of awkward sizes."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [(1,), (3,), (1023,), (64, 33), (70_001,), (5, 5, 5)]
    params = [
        torch.randn(s, device="cuda", generator=gen).to(dtype).requires_grad_()
        for s in shapes
    ]
    curv = [torch.rand(s, device="cuda", generator=gen) * 10 + 0.1 for s in shapes]
    flags = dict(
        reference=dict(foreach=False),
        foreach=dict(foreach=True),
        fused=dict(fused=True),
    )[implementation]
    opt = SophiaG(params, lr=1e-2, rho=0.1, weight_decay=0.1, **flags)
    for t in range(steps):
        for p, c in zip(params, curv):
            p.grad = (c * p.detach().float()).to(dtype)
        opt.step(bs=8)
        if t % k == k - 1:
            for p, c in zip(params, curv):
                p.grad = (c.sqrt() * p.detach().float()).to(dtype)
            opt.update_hessian()
    return params


@pytest.mark.parametrize(
    "dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 2**-6)]
)
def test_fused_reference_and_foreach_agree(dtype, rtol):
    ref = quadratic_run("reference", dtype)
    for other in ("foreach", "fused"):
        for a, b in zip(ref, quadratic_run(other, dtype)):
            torch.testing.assert_close(
                b.float(), a.float(), rtol=rtol, atol=rtol * 1e-2
            )


def test_fused_none_is_foreach_on_cuda():
    from sophia.optimizer import _implementation

    p = torch.zeros(4, device="cuda")
    assert _implementation(dict(fused=None, foreach=None), [p]) == "foreach"


def test_cuda_graph_capture_of_the_step():
    torch.manual_seed(0)
    shapes = [(257,), (32, 31)]
    eager = [torch.randn(s, device="cuda", requires_grad=True) for s in shapes]
    graphed = [p.detach().clone().requires_grad_() for p in eager]
    lr = torch.tensor(1e-2, device="cuda")
    opt_e = SophiaG(eager, lr=1e-2, fused=True, capturable=True)
    opt_g = SophiaG(graphed, lr=lr, fused=True, capturable=True)
    for p in graphed:
        p.grad = torch.zeros_like(p)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for p in graphed:
            p.grad.copy_(torch.ones_like(p))
        opt_g.step(bs=4)
    torch.cuda.current_stream().wait_stream(stream)
    for p in eager:
        p.grad = torch.ones_like(p)
    opt_e.step(bs=4)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_g.step(bs=4)

    for t in range(20):
        new_lr = 1e-2 * 0.9**t
        grads = [torch.randn(s, device="cuda") for s in shapes]
        for p, g in zip(graphed, grads):
            p.grad.copy_(g)
        lr.fill_(new_lr)
        graph.replay()
        for p, g in zip(eager, grads):
            p.grad = g.clone()
        opt_e.param_groups[0]["lr"] = new_lr
        opt_e.step(bs=4)
    torch.cuda.synchronize()
    for a, b in zip(eager, graphed):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    assert all(s["step"].device.type == "cuda" for s in opt_g.state.values())
    assert opt_g.state[graphed[0]]["step"].item() == 21


def test_grad_scaler_skip_on_cuda():
    model = torch.nn.Linear(16, 4).cuda()
    opt = SophiaG(model.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randn(8, 16, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        loss = model(x).float().pow(2).mean()
    scaler.scale(loss).backward()
    scaler.step(opt, bs=8)
    scaler.update()
    params = [p.detach().clone() for p in model.parameters()]
    state = [{k: v.clone() for k, v in s.items()} for s in opt.state.values()]
    opt.zero_grad()
    with torch.autocast("cuda", dtype=torch.float16):
        loss = model(x).float().pow(2).mean()
    scaler.scale(loss).backward()
    model.weight.grad[0, 0] = float("nan")
    scaler.step(opt, bs=8)
    scaler.update()
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    for s, old in zip(opt.state.values(), state):
        for k, v in s.items():
            assert torch.equal(v, old[k]), k
