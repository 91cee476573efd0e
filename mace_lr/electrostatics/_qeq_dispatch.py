"""Charge equilibration of a batch of structures: the solver each structure needs (private).

A batch of small open molecules without electrodes goes to the one batched dense solve of
:func:`._qeq_batch.solve_qeq_open_batch`; anything else (periodic cells, slabs, electrodes,
large structures that need CG) goes structure by structure to :func:`._qeq.solve_qeq`,
with constant-potential electrodes turned into electronegativity shifts and group charge
constraints, and CG warm-started from the last converged charges of the same structure.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch

from ._qeq import solve_qeq
from ._qeq_batch import solve_qeq_open_batch

# last converged charges per structure (warm starts for MD; never used while training)
_WARM_START: "OrderedDict[Tuple[int, bytes], torch.Tensor]" = OrderedDict()
_WARM_START_SIZE = 16


def _electrode_constraints(
    chi: torch.Tensor, tags: torch.Tensor, potential: torch.Tensor, total: torch.Tensor, graph: int
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Electrodes at ±ΔV/2, neutral as a pair; the other atoms keep the total charge."""
    if not bool((tags > 0).any()):
        return chi, None, None
    v = torch.where(tags == 1, 0.5 * potential, -0.5 * potential)
    chi = chi - torch.where(tags > 0, v, torch.zeros_like(v))
    in_electrode = (tags > 0).to(torch.int64)
    if bool((tags == 0).any()):
        return chi, in_electrode, torch.stack([total, torch.zeros_like(total)])
    if abs(float(total)) > 1e-12:
        raise ValueError(
            f"structure {graph}: every atom is an electrode atom, so the total charge must be 0 "
            f"(the electrode pair is kept neutral), got {float(total):g}"
        )
    return chi, torch.zeros_like(in_electrode), total.reshape(1)


def solve_qeq_batch(
    positions: torch.Tensor,
    electronegativity: torch.Tensor,
    hardness: torch.Tensor,
    widths: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    ptr: torch.Tensor,
    total_charge: torch.Tensor,
    atomic_numbers: torch.Tensor,
    *,
    electrode: Optional[torch.Tensor] = None,
    electrode_potential: Optional[torch.Tensor] = None,
    solver: str = "auto",
    dense_max_atoms: int = 256,
    tol: float = 1e-6,
    max_iter: int = 500,
    accuracy: float = 1e-4,
    method: str = "auto",
    base_smearing: float = 0.0,
    newton_steps: int = 1,
    warm_start: bool = False,
) -> Dict[str, torch.Tensor]:
    r"""QEq charges and energies of every structure of a batch, each with the solver it needs.

    Args:
        positions: [N, 3] Å, graph after graph.
        electronegativity: [N] χ_i, V (fields already folded in).
        hardness: [N] J_i > 0, eV/e².
        widths: [N] Gaussian standard deviations σ_i > 0, Å.
        cell: [G, 3, 3] Å.
        pbc: [G, 3] bool.
        ptr: [G + 1] int64 atom offsets.
        total_charge: [G] e.
        atomic_numbers: [N] int64 (the warm-start key of a structure).
        electrode: [N] int64, 0 for ordinary atoms, 1 or 2 for the two electrodes
            (``None``: no electrodes).
        electrode_potential: [G] V, electrode 1 minus electrode 2.
        solver: ``"auto"`` (dense up to ``dense_max_atoms``), ``"dense"`` or ``"cg"``.
        dense_max_atoms: the largest structure ``"auto"`` solves densely.
        tol: CG relative residual.
        max_iter: CG iteration limit (a ``ChargeEquilibrationError`` beyond it).
        accuracy: relative accuracy of the electrostatics.
        method: periodic electrostatics method (``"auto"``, ``"ewald"``, ``"p3m"``).
        base_smearing: common engine width s0, Å (see :func:`solve_qeq`).
        newton_steps: Newton steps of the solve (2 when the energy has terms beyond QEq).
        warm_start: start CG from the last converged charges of the same structure
            (same atom count and elements; for MD, never while training).

    Returns:
        ``energy`` [G] eV, ``charges`` [N] e, ``electrode_charge`` [G] e (the charge on
        electrode 1), ``iterations`` [G] int64 (CG iterations, 0 for dense solves).
    """
    counts = ptr[1:] - ptr[:-1]
    n_graphs = int(counts.numel())
    if electrode is None:
        electrode = torch.zeros_like(atomic_numbers)
    if electrode_potential is None:
        electrode_potential = positions.new_zeros(n_graphs)
    n_largest = int(counts.max()) if n_graphs else 0
    dense = solver == "dense" or (solver == "auto" and n_largest <= dense_max_atoms)
    open_only = not bool(pbc.any()) and not bool((electrode > 0).any())
    if n_graphs and dense and open_only and bool((counts > 0).all()):
        result = solve_qeq_open_batch(
            positions,
            electronegativity,
            hardness,
            widths,
            ptr,
            total_charge.to(positions.dtype),
            accuracy=accuracy,
            base_smearing=base_smearing,
            n_max=n_largest,
        )
        return {
            "energy": result["energy"],
            "charges": result["charges"],
            "electrode_charge": positions.new_zeros(n_graphs),
            "iterations": torch.zeros(n_graphs, dtype=torch.int64, device=positions.device),
        }
    bounds = ptr.tolist()
    flags = pbc.tolist()
    potential = electrode_potential.to(positions.dtype)
    energies: List[torch.Tensor] = []
    charges: List[torch.Tensor] = []
    electrode_charges: List[torch.Tensor] = []
    iterations: List[int] = []
    for g in range(n_graphs):
        a, b = bounds[g], bounds[g + 1]
        tags = electrode[a:b]
        total = total_charge[g]
        chi_g, groups, group_charges = _electrode_constraints(
            electronegativity[a:b], tags, potential[g], total, g
        )
        chosen = solver if solver != "auto" else ("dense" if b - a <= dense_max_atoms else "cg")
        key = (b - a, atomic_numbers[a:b].detach().cpu().numpy().tobytes())
        use_warm = warm_start and chosen == "cg"
        result = solve_qeq(
            positions[a:b],
            chi_g,
            hardness[a:b],
            widths[a:b],
            cell[g],
            flags[g],
            total,
            groups=groups,
            group_charges=group_charges,
            solver=chosen,
            tol=tol,
            max_iter=max_iter,
            accuracy=accuracy,
            method=method,
            base_smearing=base_smearing,
            newton_steps=newton_steps,
            initial_guess=_WARM_START.get(key) if use_warm else None,
        )
        q = result["charges"]
        iterations.append(int(result["iterations"]))
        if use_warm:
            _WARM_START[key] = q.detach()
            while len(_WARM_START) > _WARM_START_SIZE:
                _WARM_START.popitem(last=False)
        energies.append(result["energy"])
        charges.append(q)
        electrode_charges.append(torch.where(tags == 1, q, torch.zeros_like(q)).sum())
    if not energies:
        empty = positions.new_zeros(0)
        return {
            "energy": empty,
            "charges": empty,
            "electrode_charge": empty,
            "iterations": torch.zeros(0, dtype=torch.int64, device=positions.device),
        }
    return {
        "energy": torch.stack(energies),
        "charges": torch.cat(charges),
        "electrode_charge": torch.stack(electrode_charges),
        "iterations": torch.tensor(iterations, dtype=torch.int64, device=positions.device),
    }
