r"""Sophia with the exact Hessian diagonal reaches the minimum of a quadratic, whatever its conditioning."""

import torch

from sophia import SophiaH, exact_hessian_diagonal


def quadratic(kind, n=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    curvatures = torch.logspace(-3, 3, n, dtype=torch.float64)
    if kind == "diagonal":
        A = torch.diag(curvatures)
    else:
        # Diagonally dominant, so the diagonal is a good preconditioner, but coupled.
        M = torch.randn(n, n, generator=gen, dtype=torch.float64) * 0.1
        D = torch.diag(curvatures.sqrt())
        A = D @ (torch.eye(n, dtype=torch.float64) + (M + M.T) / 4) @ D
    theta_star = torch.randn(n, generator=gen, dtype=torch.float64)
    return A, A @ theta_star, theta_star


def loss_fn(A, b, theta):
    return 0.5 * theta @ A @ theta - b @ theta


def run_sophia(A, b, steps, k=10, lr=0.5):
    theta = torch.zeros(len(b), dtype=torch.float64, requires_grad=True)
    opt = SophiaH([theta], lr=lr, betas=(0.9, 0.0), rho=1.0, weight_decay=0.0)
    for t in range(steps):
        if t % k == 0:
            opt.update_hessian(exact_hessian_diagonal(loss_fn(A, b, theta), [theta]))
        opt.zero_grad()
        loss_fn(A, b, theta).backward()
        opt.step()
    return theta.detach()


def test_reaches_the_minimum_of_an_ill_conditioned_diagonal_quadratic():
    A, b, theta_star = quadratic("diagonal")
    theta = run_sophia(A, b, steps=300)
    assert (theta - theta_star).abs().max() < 1e-6
    # Gradient descent at its largest stable step, 1/L, for as many steps, has not moved
    # the flattest coordinate (curvature 1e-3) a millionth of the way: the condition
    # number 1e6 is what Sophia's per-coordinate curvature removes.
    theta_gd = torch.zeros_like(theta_star)
    for _ in range(300):
        theta_gd -= (A @ theta_gd - b) / A.diagonal().max()
    assert (theta_gd - theta_star).abs().max() > 0.5 * theta_star.abs().max()


def test_reaches_the_minimum_of_a_coupled_quadratic():
    A, b, theta_star = quadratic("coupled")
    theta = run_sophia(A, b, steps=600, lr=0.2)
    assert (theta - theta_star).abs().max() < 1e-4


def test_exact_diagonal_of_the_quadratic_is_its_diagonal():
    A, b, _ = quadratic("coupled")
    theta = torch.randn(len(b), dtype=torch.float64, requires_grad=True)
    (h,) = exact_hessian_diagonal(loss_fn(A, b, theta), [theta])
    torch.testing.assert_close(h, A.diagonal())
