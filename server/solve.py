"""The math of gradient fusion: pure functions on Gram matrices and LoRA factors.

For one linear layer with base weight ``W0`` and concepts ``i`` with updates
``dW_i = B_i A_i`` seen on inputs ``X_i`` (columns are input vectors), gradient fusion
(docs/method.md, section 2) asks

    W* = argmin_W  sum_i || W X_i - (W0 + dW_i) X_i ||_F^2 .

With ``G_i = X_i X_i^T`` and ``G = sum_i G_i`` the normal equations give
``(W* - W0) G = sum_i dW_i G_i``. A ridge ``lambda = ridge * trace(G) / d`` keeps
``G + lambda I`` positive definite. Here it pulls toward ``W0``, so directions the features
never visit keep the base weights (``DEFAULT_RIDGE`` 1e-6, this module's default);
``solve_downs(toward_average=...)`` pulls toward the weight-fusion average instead, which
is what the fusion engine does by default (``FusionConfig``: ridge 1e-2 toward the
average). Toward ``W0``:

    W* - W0 = sum_i B_i [A_i G_i (G + lambda I)^-1] = [B_1 ... B_N] [A'_1; ...; A'_N],

an exact factorisation of rank <= sum_i rank_i: the fused update is itself a LoRA with
``up = [B_1 ... B_N]`` and ``down = [A'_1; ...; A'_N]``. W0 is never needed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch

log = logging.getLogger(__name__)

DEFAULT_RIDGE = 1e-6


def symmetric(g: torch.Tensor) -> torch.Tensor:
    """``(G + G^T) / 2`` over the last two dims: bitwise symmetric by construction.

    A product ``X^T X`` is symmetric in exact arithmetic, but a BLAS kernel may sum entry
    ``(i, j)`` and entry ``(j, i)`` in different orders (MKL's AVX-512 GEMM does), so they
    can differ in the last bits. IEEE addition is commutative, so ``G_ij + G_ji`` and
    ``G_ji + G_ij`` are the same number, and halving is exact: every Gram matrix the fusion
    accumulates goes through here once, and sums of such matrices stay bitwise symmetric.
    """
    return (g + g.mT) * 0.5


def gram(x: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``X X^T`` for features given as rows ``x`` ``[n, d]`` (any leading dims), bitwise
    symmetric (``symmetric``)."""
    x = x.reshape(-1, x.shape[-1]).to(dtype)
    return symmetric(x.T @ x)


def ridge_lambda(g: torch.Tensor, ridge: float = DEFAULT_RIDGE) -> float:
    d = g.shape[0]
    scale = float(torch.trace(g)) / d
    return ridge * scale if scale > 0 else ridge


def cross_term(down: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``C_i = A_i G_i`` ``[r, d]``: all the solve needs of one concept's Gram matrix."""
    return down.to(g.dtype) @ g


def solve_downs(
    total: torch.Tensor,
    crosses: Sequence[torch.Tensor],
    ridge: float = DEFAULT_RIDGE,
    toward_average: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """``A'_i = C_i (G + lambda I)^-1`` for every concept, from ``G = sum_i G_i`` and ``C_i``.

    The ridge pulls toward the base weights. With ``toward_average`` (the ``A_i``) it pulls
    toward the weight-fusion average instead: minimising
    ``sum_i ||(W - W_i) X_i||^2 + lambda ||W - W0 - mean_i dW_i||^2`` gives
    ``C_i = A_i (G_i + lambda / n I)``, still exactly low rank. Directions the features
    hardly visit then take the average update rather than none.
    Cholesky on ``G + lambda I``; if that fails (numerically indefinite), least squares.
    ``G`` is made bitwise symmetric first (``symmetric``), so the Cholesky factor (which
    reads one triangle) and the least-squares fallback (which reads both) solve the same
    system whatever kernel produced ``G``.
    """
    if not crosses:
        raise ValueError("need at least one concept")
    lam = ridge_lambda(total, ridge)
    if toward_average is not None:
        n = len(crosses)
        crosses = [
            c + (lam / n) * a.to(c.dtype) for c, a in zip(crosses, toward_average, strict=True)
        ]
    system = symmetric(total) + lam * torch.eye(
        total.shape[0], dtype=total.dtype, device=total.device
    )
    rhs = torch.cat([c.T for c in crosses], dim=1)  # [d, sum r]
    chol, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        z = torch.cholesky_solve(rhs, chol)
    else:
        log.warning("Gram matrix not positive definite (info=%d): least-squares solve", int(info))
        z = torch.linalg.lstsq(system, rhs).solution
    out, start = [], 0
    for c in crosses:
        out.append(z[:, start : start + c.shape[0]].T.contiguous())
        start += c.shape[0]
    return out


def fused_factors(
    grams: Sequence[torch.Tensor],
    ups: Sequence[torch.Tensor],
    downs: Sequence[torch.Tensor],
    ridge: float = DEFAULT_RIDGE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient fusion of one layer as ``(up [out, sum r], down [sum r, in])``."""
    total = torch.stack(list(grams)).sum(0)
    crosses = [cross_term(a, g) for a, g in zip(downs, grams, strict=True)]
    new_downs = solve_downs(total, crosses, ridge)
    up = torch.cat([b.to(total.dtype) for b in ups], dim=1)
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


def objective_from_stats(
    delta_up: torch.Tensor,
    delta_down: torch.Tensor,
    total: torch.Tensor,
    ups: Sequence[torch.Tensor],
    downs: Sequence[torch.Tensor],
    crosses: Sequence[torch.Tensor],
) -> float:
    """``sum_i ||(W0 + D) X_i - (W0 + B_i A_i) X_i||^2`` with ``D = up @ down``.

    ``W0`` cancels. Expanding ``sum_i tr((D - B_i A_i) G_i (D - B_i A_i)^T)`` leaves
    ``tr(D G D^T) - 2 sum_i tr(B_i C_i D^T) + sum_i tr(B_i C_i A_i^T B_i^T)``: only the total
    Gram ``G`` and the ``C_i = A_i G_i`` are needed, and no ``[out, in]`` matrix is formed.
    """
    dt = total.dtype
    up, down = delta_up.to(dt), delta_down.to(dt)
    value = torch.trace((up.T @ up) @ (down @ total @ down.T))
    for b, a, c in zip(ups, downs, crosses, strict=True):
        b, a = b.to(dt), a.to(dt)
        value = value - 2 * torch.trace((up.T @ b) @ (c @ down.T))
        value = value + torch.trace((b.T @ b) @ (c @ a.T))
    return float(value)


def objective(
    delta_up: torch.Tensor,
    delta_down: torch.Tensor,
    grams: Sequence[torch.Tensor],
    ups: Sequence[torch.Tensor],
    downs: Sequence[torch.Tensor],
) -> float:
    """``objective_from_stats`` from the per-concept Gram matrices."""
    total = torch.stack(list(grams)).sum(0)
    crosses = [cross_term(a, g) for a, g in zip(downs, grams, strict=True)]
    return objective_from_stats(delta_up, delta_down, total, ups, downs, crosses)


@dataclass
class LBFGSResult:
    """What ``lbfgs_reference`` returns: the update and how the run went."""

    delta: torch.Tensor  # W - W0 [out, in], the best iterate
    iterations: int  # L-BFGS iterations run
    evaluations: int  # loss evaluations (line-search steps included)
    loss: float  # the best iterate's loss (mean squared error)
    first_loss: float  # the loss at W0


LBFGS_HISTORY = 25
LBFGS_TOLERANCE = 1e-16  # the authors': the run never stops early on a small change


def lbfgs_reference(
    features: Sequence[torch.Tensor],
    ups: Sequence[torch.Tensor],
    downs: Sequence[torch.Tensor],
    iterations: int,
    device: torch.device | str = "cpu",
) -> LBFGSResult:
    """The authors' solver: L-BFGS on the raw features, from ``W0``.

    As their implementation: start at ``W0`` (here a zero update, since ``W0`` cancels),
    ``lr=1``, ``history_size=25``, strong-Wolfe line search, tolerances 1e-16 on the
    gradient and on the change (so it runs its ``iterations``: 500 for the text encoder and
    keys/values, 50 for the UNet), loss = mean squared error between ``W x`` and the concept
    model's output ``(W0 + B_i A_i) x`` over all recorded x, and the best iterate seen is
    returned. ``features[i]``: ``[n_i, in]`` rows as recorded (kept in host memory, moved
    per layer).
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
        [delta],
        lr=1,
        max_iter=iterations,
        history_size=LBFGS_HISTORY,
        tolerance_grad=LBFGS_TOLERANCE,
        tolerance_change=LBFGS_TOLERANCE,
        line_search_fn="strong_wolfe",
    )
    best: dict[str, object] = {"loss": math.inf, "delta": delta.detach().clone()}
    losses: list[float] = []

    def closure() -> torch.Tensor:
        opt.zero_grad()
        squares = sum(((x @ delta.T - y) ** 2).sum() for x, y in zip(xs, targets, strict=True))
        loss = cast(torch.Tensor, squares) / (n * out_dim)
        loss.backward()
        value = float(loss.detach())
        losses.append(value)
        if value < cast(float, best["loss"]):
            best["loss"] = value
            best["delta"] = delta.detach().clone()
        return loss

    opt.step(closure)
    state = opt.state[delta]
    return LBFGSResult(
        delta=cast(torch.Tensor, best["delta"]),
        iterations=int(state.get("n_iter", 0)),
        evaluations=int(state.get("func_evals", len(losses))),
        loss=cast(float, best["loss"]),
        first_loss=losses[0],
    )
