"""The math of gradient fusion: pure functions on Gram matrices and LoRA factors.

For one linear layer with base weight ``W0`` and concepts ``i`` with updates
``dW_i = B_i A_i`` seen on inputs ``X_i`` (columns are input vectors), METHOD.md section 2 asks

    W* = argmin_W  sum_i || W X_i - (W0 + dW_i) X_i ||_F^2 .

With ``G_i = X_i X_i^T`` and ``G = sum_i G_i`` the normal equations give
``(W* - W0) G = sum_i dW_i G_i``. We add a small ridge that pulls toward ``W0``:
``lambda = ridge * trace(G) / d`` (``ridge`` defaults to 1e-6), so directions the features
never visit keep the base weights and ``G + lambda I`` is positive definite. Then

    W* - W0 = sum_i B_i [A_i G_i (G + lambda I)^-1] = [B_1 ... B_N] [A'_1; ...; A'_N],

an exact factorisation of rank <= sum_i rank_i: the fused update is itself a LoRA with
``up = [B_1 ... B_N]`` and ``down = [A'_1; ...; A'_N]``. W0 is never needed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)

DEFAULT_RIDGE = 1e-6


def gram(x: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``X X^T`` for features given as rows ``x`` ``[n, d]`` (any leading dims)."""
    x = x.reshape(-1, x.shape[-1]).to(dtype)
    return x.T @ x


def ridge_lambda(g: torch.Tensor, ridge: float = DEFAULT_RIDGE) -> float:
    d = g.shape[0]
    scale = float(torch.trace(g)) / d
    return ridge * scale if scale > 0 else ridge


def solve_fused_down(
    grams: Sequence[torch.Tensor],
    downs: Sequence[torch.Tensor],
    ridge: float = DEFAULT_RIDGE,
) -> list[torch.Tensor]:
    """``A'_i = A_i G_i (G + lambda I)^-1`` for every concept (see module docstring).

    ``grams[i]``: ``[d, d]``; ``downs[i]``: ``A_i`` ``[r_i, d]``. Cholesky on ``G + lambda I``;
    if that fails (numerically indefinite), a least-squares solve.
    """
    if len(grams) != len(downs) or not grams:
        raise ValueError("need one Gram matrix per LoRA down factor, and at least one")
    dtype = grams[0].dtype
    total = torch.stack(list(grams)).sum(0)
    lam = ridge_lambda(total, ridge)
    eye = torch.eye(total.shape[0], dtype=dtype, device=total.device)
    system = total + lam * eye
    # right-hand side: columns G_i A_i^T, all concepts at once  -> [d, sum r]
    rhs = torch.cat([g @ a.to(dtype).T for g, a in zip(grams, downs, strict=True)], dim=1)
    chol, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        z = torch.cholesky_solve(rhs, chol)
    else:
        log.warning("Gram matrix not positive definite (info=%d): least-squares solve", int(info))
        z = torch.linalg.lstsq(system, rhs).solution
    out, start = [], 0
    for a in downs:
        out.append(z[:, start : start + a.shape[0]].T.contiguous())
        start += a.shape[0]
    return out


def fused_factors(
    grams: Sequence[torch.Tensor],
    ups: Sequence[torch.Tensor],
    downs: Sequence[torch.Tensor],
    ridge: float = DEFAULT_RIDGE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient fusion of one layer as ``(up [out, sum r], down [sum r, in])``."""
    new_downs = solve_fused_down(grams, downs, ridge)
    dtype = new_downs[0].dtype
    up = torch.cat([b.to(dtype) for b in ups], dim=1)
    return up, torch.cat(new_downs, dim=0)


def weight_fusion_factors(
    ups: Sequence[torch.Tensor],
    downs: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_i w_i B_i A_i`` (``w_i = 1/n`` by default, the paper's baseline) as factors."""
    n = len(ups)
    w = [1.0 / n] * n if weights is None else list(weights)
    if len(w) != n:
        raise ValueError(f"{len(w)} weights for {n} concepts")
    up = torch.cat([wi * b.double() for wi, b in zip(w, ups, strict=True)], dim=1)
    down = torch.cat([a.double() for a in downs], dim=0)
    return up, down


def objective(
    delta_up: torch.Tensor,
    delta_down: torch.Tensor,
    grams: Sequence[torch.Tensor],
    ups: Sequence[torch.Tensor],
    downs: Sequence[torch.Tensor],
) -> float:
    """``sum_i ||(W0 + D) X_i - (W0 + B_i A_i) X_i||^2`` from Grams, ``D = up @ down``.

    ``W0`` cancels; with ``M_i = D - B_i A_i = U V^T``, each term is
    ``trace((U^T U)(V^T G_i V))``, computed without forming any ``[out, in]`` matrix.
    """
    total = 0.0
    for g, b, a in zip(grams, ups, downs, strict=True):
        dt = g.dtype
        u = torch.cat([delta_up.to(dt), -b.to(dt)], dim=1)  # [out, R + r]
        v = torch.cat([delta_down.to(dt), a.to(dt)], dim=0)  # [R + r, in]
        total += float(torch.trace((u.T @ u) @ (v @ g @ v.T)))
    return total


def objective_dense(
    delta: torch.Tensor,
    grams: Sequence[torch.Tensor],
    ups: Sequence[torch.Tensor],
    downs: Sequence[torch.Tensor],
) -> float:
    """``objective`` for a dense update ``delta`` ``[out, in]`` (e.g. the L-BFGS result)."""
    total = 0.0
    for g, b, a in zip(grams, ups, downs, strict=True):
        m = delta.to(g.dtype) - b.to(g.dtype) @ a.to(g.dtype)
        total += float(torch.trace(m @ g @ m.T))
    return total


def lbfgs_reference(
    features: Sequence[torch.Tensor],
    ups: Sequence[torch.Tensor],
    downs: Sequence[torch.Tensor],
    iterations: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The reference solver, reproduced: L-BFGS on the raw features, returns ``W - W0``.

    As the authors' implementation: start at ``W0`` (here: a zero update, since ``W0``
    cancels), ``lr=1``, ``history_size=25``, strong-Wolfe line search, ``iterations`` steps
    (500 for the text encoder and keys/values, 50 for the UNet), loss = mean squared error
    between ``W x`` and the concept model's output ``(W0 + B_i A_i) x`` over all recorded x.
    ``features[i]``: ``[n_i, in]`` rows as recorded (kept in host memory, moved per layer).
    """
    out_dim, in_dim = ups[0].shape[0], downs[0].shape[1]
    xs = [f.to(device, torch.float32) for f in features]
    targets = [
        x @ (b.float().to(device) @ a.float().to(device)).T
        for x, b, a in zip(xs, ups, downs, strict=True)
    ]
    n = sum(x.shape[0] for x in xs)
    delta = torch.zeros(out_dim, in_dim, device=device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [delta], lr=1, max_iter=iterations, history_size=25, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = sum(((x @ delta.T - y) ** 2).sum() for x, y in zip(xs, targets, strict=True)) / (
            n * out_dim
        )
        loss.backward()
        return loss

    opt.step(closure)
    return delta.detach()
