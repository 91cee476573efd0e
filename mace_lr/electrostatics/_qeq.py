r"""Charge equilibration: the Gaussian-charge operator, constrained solvers, implicit derivatives.

Charges minimise the quadratic energy (physics.md, "QEq")

.. math:: E_Q(q) = \sum_i \chi_i q_i + \tfrac12 q^\top A q, \qquad
          A_{ij} = \delta_{ij}\Big(J_i + \frac{k_e}{\sqrt{\pi}\,\sigma_i}\Big)
                 + k_e \sum_{\mathbf n}{}' \frac{\operatorname{erf}(r_{ij,\mathbf n}/\sqrt2\gamma_{ij})}
                   {r_{ij,\mathbf n}},
          \quad \gamma_{ij} = \sqrt{\sigma_i^2 + \sigma_j^2}

subject to fixed charge sums over groups of atoms (one group per structure, or separate
groups for an electrolyte and a constant-potential electrode pair). ``σ_i`` is the
standard deviation of atom i's Gaussian charge density, ``k_e/(√π σ_i)`` its self-energy.

The Coulomb part is the electrostatics engine's potential of Gaussian charges with one
common width ``s0`` (Ewald/P3M for periodic cells, slab correction, exact open sum), plus
a short-ranged pair correction ``k_e [erf(r/√2γ_ij) − erf(r/√2 s0)]/r`` on a neighbour list
(it decays like ``erfc``); the dense solver assembles the same operator column by column,
so both solvers see the same matrix.

Derivatives. The solve itself runs without autograd. Differentiable charges are then
built by Newton steps from the converged solution,
``q ← q − B P (A q + χ)``, where ``B`` is the constrained inverse of the frozen matrix and
``P`` removes group means. Each step has the value of its input (the residual is zero at
convergence), but its derivative is the implicit-function derivative: one step gives exact
first derivatives of ``q*`` (forces, Born charges, parameter gradients), two steps exact
second derivatives (training on forces when the energy is not stationary in ``q``, as
with a fourth-generation readout). Applying ``B`` in the backward pass is another
constrained solve with the same solver, so dense and CG give the same derivatives.

The QEq energy itself is stationary in ``q`` on the constraint surface, so its first
derivatives (forces, stress, energy-loss gradients) are taken at fixed charges and need
no backward solve; a term with zero value and zero first derivatives,
``−½ δqᵀ A δq`` with ``δq = q − q*``, carries the ``−∂q*ᵀ A ∂q*`` part of its second
derivatives (training on forces). Losses on the charges themselves still go through
``B``.
"""

from __future__ import annotations

import logging
from typing import Dict, Optional, Tuple

import torch

from ._qeq_operator import GaussianCoulombOperator, SpectralPreconditioner, _group_sums

logger = logging.getLogger(__name__)


class ChargeEquilibrationError(RuntimeError):
    """A charge solve did not reach its tolerance (the charges would be wrong)."""


class ConstrainedSolver:
    """Minimises ``½ xᵀAx − bᵀx`` subject to fixed sums of ``x`` over groups of atoms.

    Args:
        operator: a detached :class:`GaussianCoulombOperator` (no autograd inside solves).
        group: [N] int64 group index of every atom (0..G−1, every group non-empty).
        method: ``"cg"`` (matrix-free preconditioned conjugate gradient) or ``"dense"``.
        tol: relative residual ``‖P r‖ / ‖P r₀‖`` at which CG stops.
        max_iter: CG iteration limit; exceeding it raises :class:`ChargeEquilibrationError`.
    """

    def __init__(
        self,
        operator: GaussianCoulombOperator,
        group: torch.Tensor,
        method: str = "cg",
        tol: float = 1e-6,
        max_iter: int = 500,
        preconditioner: str = "auto",
    ) -> None:
        if method not in ("cg", "dense"):
            raise ValueError(f"unknown charge solver {method!r}; use 'cg' or 'dense'")
        if preconditioner not in ("auto", "jacobi", "spectral"):
            raise ValueError(f"unknown preconditioner {preconditioner!r}; use 'auto', 'jacobi' or 'spectral'")
        periodic = operator.pbc == (True, True, True)
        if preconditioner == "spectral" and not periodic:
            raise ValueError("the spectral preconditioner needs a fully periodic cell")
        if preconditioner == "auto":
            preconditioner = "spectral" if periodic and group.shape[0] >= 64 else "jacobi"
        self.preconditioner = preconditioner
        self.operator = operator
        self.group = group
        self.n_groups = int(group.max()) + 1 if group.numel() else 0
        self.method = method
        self.tol = float(tol)
        self.max_iter = int(max_iter)
        self.iterations = 0
        self.residual = 0.0
        self._lu: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        if method == "dense":
            n = group.shape[0]
            a = operator.dense()
            c = torch.zeros((n, self.n_groups), dtype=a.dtype, device=a.device)
            c[torch.arange(n, device=a.device), group] = 1.0
            kkt = torch.cat(
                [torch.cat([a, c], 1), torch.cat([c.T, torch.zeros_like(c.T[:, : self.n_groups])], 1)], 0
            )
            self._lu = torch.linalg.lu_factor(kkt)

    def solve(
        self, rhs: torch.Tensor, targets: Optional[torch.Tensor] = None, x0: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Solution [N] or [N, C] for right-hand sides ``rhs`` and group sums ``targets`` [G(, C)]."""
        squeeze = rhs.ndim == 1
        b = rhs[:, None] if squeeze else rhs
        dtype = self.operator.positions.dtype
        b = b.to(dtype)
        if targets is None:
            t = torch.zeros((self.n_groups, b.shape[1]), dtype=dtype, device=b.device)
        else:
            t = targets.to(dtype).reshape(self.n_groups, -1).expand(self.n_groups, b.shape[1])
        with torch.no_grad():
            if self.method == "dense":
                assert self._lu is not None
                sol = torch.linalg.lu_solve(*self._lu, torch.cat([b, t], 0))
                x = sol[: b.shape[0]]
                self.iterations, self.residual = 0, 0.0
            else:
                x = self._pcg(b, t, None if x0 is None else (x0[:, None] if x0.ndim == 1 else x0).to(dtype))
        return x[:, 0] if squeeze else x

    def _project(self, r: torch.Tensor) -> torch.Tensor:
        counts = _group_sums(torch.ones_like(r[:, :1]), self.group, self.n_groups)
        return r - (_group_sums(r, self.group, self.n_groups) / counts)[self.group]

    def _pcg(self, b: torch.Tensor, t: torch.Tensor, x0: Optional[torch.Tensor]) -> torch.Tensor:
        op, group, g = self.operator, self.group, self.n_groups
        m_inv = (1.0 / op.diagonal)[:, None].expand_as(b)
        w_sum = _group_sums(m_inv, group, g)
        if self.preconditioner == "spectral":
            apply_m = SpectralPreconditioner(op)
        else:

            def apply_m(r: torch.Tensor) -> torch.Tensor:
                return r / op.diagonal[:, None]

        # M⁻¹ r projected onto zero group sums in the M-metric:
        # z = M⁻¹r − U (CᵀU)⁻¹ Cᵀ M⁻¹ r with C the group indicator and U = M⁻¹C
        indicator = torch.zeros((b.shape[0], g), dtype=b.dtype, device=b.device)
        indicator[torch.arange(b.shape[0], device=b.device), group] = 1.0
        u = apply_m(indicator)
        ctu_inv = torch.linalg.inv(indicator.T @ u)

        def precondition(r: torch.Tensor) -> torch.Tensor:
            z = apply_m(r)
            return z - u @ (ctu_inv @ (indicator.T @ z))

        # feasible start: targets spread in proportion to 1/A_ii, or the shifted warm start
        x = m_inv * (t / w_sum)[group]
        if x0 is not None:
            x = x + x0 - m_inv * (_group_sums(x0, group, g) / w_sum)[group]
        # the residual lives in the quotient by group-constant vectors (those shift the
        # Lagrange multipliers only); keeping it projected stops a large constant part
        # from swamping the inner products with rounding errors
        x_start = m_inv * (t / w_sum)[group]
        a_start = op.matvec(x_start)
        r = self._project(b - (a_start if x0 is None else op.matvec(x)))
        norm0 = torch.linalg.norm(self._project(b - a_start), dim=0)
        # a right-hand side that is constant per group moves no charge: its projected norm
        # is rounding noise, so residuals are measured against at least 1e-12 of the data
        floor = 1e-12 * (torch.linalg.norm(b, dim=0) + torch.linalg.norm(a_start, dim=0))
        scale = torch.maximum(norm0, floor)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        z = precondition(r)
        p = z.clone()
        rz = (r * z).sum(0)
        res = torch.linalg.norm(r, dim=0) / scale
        res = torch.where(norm0 <= floor, torch.zeros_like(res), res)
        it = 0
        best, since_best = float(res.max()), 0
        while bool((res > self.tol).any()):
            if it >= self.max_iter or since_best >= 25:
                stalled = f"(stalled after {it} iterations)"
                why = f"in {self.max_iter} iterations" if it >= self.max_iter else stalled
                raise ChargeEquilibrationError(
                    f"charge equilibration (CG) did not converge {why}: relative residual "
                    f"{float(res.max()):.3g} > tol {self.tol:g}, best {best:.3g} "
                    f"(N={b.shape[0]}, pbc={list(op.pbc)}). Increase `max_iter`, or loosen `tol` "
                    "(the attainable residual is limited by the electrostatics `accuracy`), or "
                    "check for non-physical hardness/widths"
                )
            ap = op.matvec(p)
            pap = (p * ap).sum(0)
            active = res > self.tol
            alpha = torch.where(active & (pap > 0), rz / torch.where(pap > 0, pap, torch.ones_like(pap)), 0.0)
            if bool((active & (pap <= 0)).any()):
                raise ChargeEquilibrationError(
                    "charge equilibration matrix is not positive definite on the constrained "
                    f"subspace (pᵀAp = {float(pap.min()):.3g}); hardness or widths are non-physical"
                )
            x = x + alpha * p
            r = self._project(r - alpha * ap)
            z = precondition(r)
            rz_new = (r * z).sum(0)
            if bool(((rz_new < 0) & (res > self.tol)).any()):
                raise ChargeEquilibrationError(
                    f"the {self.preconditioner} preconditioner is not positive definite for this "
                    "structure; use preconditioner='jacobi'"
                )
            beta = torch.where(rz > 0, rz_new / torch.where(rz > 0, rz, torch.ones_like(rz)), 0.0)
            p = z + beta * p
            # keep the search direction on the constraint surface: rounding errors along
            # the group-constant directions would otherwise grow (A need not be positive
            # definite there, e.g. the jellium mode of a periodic cell)
            p = p - m_inv * (_group_sums(p, group, g) / w_sum)[group]
            rz = rz_new
            res = torch.linalg.norm(r, dim=0) / scale
            res = torch.where(norm0 <= floor, torch.zeros_like(res), res)
            it += 1
            if float(res.max()) < 0.5 * best:
                best, since_best = float(res.max()), 0
            else:
                since_best += 1
        self.iterations = it
        self.residual = float(res.max()) if res.numel() else 0.0
        logger.debug("QEq CG converged in %d iterations (residual %.2e)", it, self.residual)
        return x


class _Solve(torch.autograd.Function):
    """``y = B x`` (constrained inverse, zero group sums); linear, symmetric, differentiable."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, solver: ConstrainedSolver) -> torch.Tensor:  # type: ignore[override]
        ctx.solver = solver
        if not bool(x.detach().any()):
            return torch.zeros_like(x)  # B 0 = 0 (e.g. the gradient of a stationary energy)
        return solver.solve(x).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return _Solve.apply(grad, ctx.solver), None


class _NewtonCorrection(torch.autograd.Function):
    """Value zero (the residual vanishes at the solution); derivative ``B P``."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, solver: ConstrainedSolver) -> torch.Tensor:  # type: ignore[override]
        ctx.solver = solver
        return torch.zeros_like(g)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return _Solve.apply(grad, ctx.solver), None


def solve_qeq(
    positions: torch.Tensor,
    electronegativity: torch.Tensor,
    hardness: torch.Tensor,
    widths: torch.Tensor,
    cell: Optional[torch.Tensor] = None,
    pbc=(False, False, False),
    total_charge: float | torch.Tensor = 0.0,
    *,
    groups: Optional[torch.Tensor] = None,
    group_charges: Optional[torch.Tensor] = None,
    solver: str = "auto",
    tol: float = 1e-8,
    max_iter: int = 500,
    accuracy: float = 1e-6,
    method: str = "auto",
    base_smearing: float = 0.0,
    newton_steps: int = 1,
    initial_guess: Optional[torch.Tensor] = None,
    preconditioner: str = "auto",
) -> Dict[str, torch.Tensor]:
    r"""Equilibrated charges and QEq energy of one structure, differentiable in every input.

    Minimises :math:`\sum_i \chi_i q_i + \tfrac12 q^\top A q` (see the module docs) subject to
    :math:`\sum_i q_i = Q`, or to one fixed sum per group of atoms.

    Args:
        positions: [N, 3] Å.
        electronegativity: [N] χ_i, V (eV/e); put external potentials here (a field
            ``E`` enters as ``χ_i − E·r_i``, an electrode potential ``V`` as ``χ_i − V``).
        hardness: [N] J_i > 0, eV/e².
        widths: [N] Gaussian standard deviations σ_i > 0, Å.
        cell: [3, 3] Å (``None`` for open boundaries).
        pbc: three booleans.
        total_charge: Q, e (used when ``groups`` is ``None``).
        groups: [N] int64 group of every atom (0..G−1), each with a fixed charge sum.
        group_charges: [G] the charge sum of each group, e.
        solver: ``"dense"``, ``"cg"`` or ``"auto"`` (dense up to 256 atoms).
        tol: relative residual of the CG solve (the dense solve is exact).
        max_iter: CG iteration limit (a :class:`ChargeEquilibrationError` beyond it).
        accuracy: relative accuracy of the electrostatics.
        method: electrostatics method for periodic cells.
        base_smearing: common Gaussian width of the engine sum, Å (0: point charges).
        newton_steps: Newton steps after the solve that carry derivatives (1: exact first
            derivatives; 2: exact second derivatives of the charges).
        initial_guess: [N] charges to start CG from (e.g. the previous MD step's).
        preconditioner: CG preconditioner: ``"jacobi"``, ``"spectral"`` (Jacobi plus a
            k-space correction of long-wavelength modes, periodic cells) or ``"auto"``
            (spectral for periodic cells of 64 atoms or more).

    Returns:
        ``charges`` [N] e, ``energy`` [] eV, ``chemical_potential`` [G] V (the Lagrange
        multiplier of each group), ``iterations`` and ``residual`` (CG diagnostics).
    """
    n = positions.shape[0]
    dtype, device = positions.dtype, positions.device
    if electronegativity.shape != (n,):
        raise ValueError(f"`electronegativity` must have shape [{n}], got {tuple(electronegativity.shape)}")
    if bool((hardness.detach() <= 0).any()):
        raise ValueError("hardness J must be > 0 eV/e² for every atom")
    if cell is None:
        cell = torch.zeros(3, 3, dtype=dtype, device=device)
    if groups is None:
        groups = torch.zeros(n, dtype=torch.int64, device=device)
        group_charges = torch.as_tensor(total_charge, dtype=dtype, device=device).reshape(1)
    else:
        groups = groups.to(torch.int64)
        if group_charges is None:
            raise ValueError("`group_charges` is required with `groups`")
        n_groups = int(groups.max()) + 1 if n else 0
        present = torch.bincount(groups, minlength=n_groups)
        if bool((present == 0).any()):
            raise ValueError("every group index 0..G−1 must contain at least one atom")
        group_charges = torch.as_tensor(group_charges, dtype=dtype, device=device).reshape(n_groups)
    if solver == "auto":
        solver = "dense" if n <= 256 else "cg"
    op = GaussianCoulombOperator(positions, cell, pbc, widths, hardness, accuracy, method, base_smearing)
    frozen = ConstrainedSolver(op.detached(torch.float64), groups, solver, tol, max_iter, preconditioner)
    q0 = frozen.solve(
        -electronegativity.detach().to(torch.float64),
        group_charges.detach().to(torch.float64),
        x0=None if initial_guess is None else initial_guess.detach().to(torch.float64),
    ).to(dtype)
    # A q0 with the derivatives of A in positions, cell, hardness and widths
    a_q0 = op.matvec(q0)
    q = q0
    for step in range(int(newton_steps)):
        residual = (a_q0 if step == 0 else op.matvec(q)) + electronegativity
        q = q - _NewtonCorrection.apply(residual, frozen)
    # The energy is stationary in q on the constraint surface, so its first derivatives
    # are those at fixed charges: E(q0) with q0 a constant (no backward solve). The term
    # −½ δqᵀA δq, δq = q − q0 (zero in value, carrying ∂q*), has zero value and first
    # derivatives and restores the second derivatives: d²E = ∂²E(q0) − ∂q*ᵀ A ∂q*, the
    # exact Hessian of E(q*(θ), θ) (∂²E/∂θ∂q = −A ∂q*/∂θ at the solution).
    energy = (electronegativity * q0).sum() + 0.5 * (q0 * a_q0).sum()
    if newton_steps > 0 and q.requires_grad:
        dq = q - q0
        energy = energy - 0.5 * (dq * frozen.operator.constant_matvec(dq).to(dtype)).sum()
    grad = (a_q0 + electronegativity).detach()
    counts = torch.bincount(groups, minlength=frozen.n_groups).to(dtype)
    mu = _group_sums(grad[:, None], groups, frozen.n_groups)[:, 0] / counts
    return {
        "charges": q,
        "energy": energy,
        "chemical_potential": mu,
        "iterations": torch.tensor(frozen.iterations),
        "residual": torch.tensor(frozen.residual),
    }
