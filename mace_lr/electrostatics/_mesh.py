"""P3M reciprocal space on torch-pme, with free mesh sizes and a cached influence function.

torch-pme rounds every mesh dimension up to a power of two (up to 8× more points than
needed) and recomputes the P3M influence function on every call. This subclass uses its
``_compute_kspace`` hook to take the mesh size we choose (FFT-friendly 2^a·3^b·5^c) and
to rebuild the influence function only when the cell changes or carries a gradient
(strain derivatives need it differentiable).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torchpme

from .._geometry import cell_volume


def fft_friendly(n: int) -> int:
    """Smallest integer ≥ n whose prime factors are 2, 3 and 5."""
    n = max(int(n), 4)
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


class MeshKSpace(torchpme.P3MCalculator):
    """k-space part of P3M for one Ewald width and mesh spacing (see module docs)."""

    def __init__(self, split: float, mesh_spacing: float, interpolation_nodes: int = 5):
        super().__init__(
            torchpme.CoulombPotential(smearing=split),
            mesh_spacing=mesh_spacing,
            interpolation_nodes=interpolation_nodes,
        )
        self._cached: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def mesh_shape(self, cell: torch.Tensor) -> torch.Tensor:
        lengths = torch.linalg.norm(cell.detach(), dim=1).cpu()
        sizes = [max(8, fft_friendly(int(torch.ceil(length / self.mesh_spacing)))) for length in lengths]
        return torch.tensor(sizes, dtype=torch.int64, device=cell.device)

    def _compute_kspace(self, charges, cell, positions, periodic=None, node_mask=None, kvectors=None):
        ns = self.mesh_shape(cell)
        self.mesh_interpolator.update(cell, ns)
        cached = self._cached
        reuse = (
            cached is not None
            and not cell.requires_grad
            and cached[0].shape == cell.shape
            and cached[0].dtype == cell.dtype
            and cached[0].device == cell.device
            and torch.equal(cached[0], cell)
            and torch.equal(cached[1], ns)
        )
        if not reuse:
            self.kspace_filter.update(cell, ns)
            self._cached = None if cell.requires_grad else (cell.detach().clone(), ns.clone())
        self.mesh_interpolator.compute_weights(positions)
        rho_mesh = self.mesh_interpolator.points_to_mesh(particle_weights=charges)
        potential_mesh = self.kspace_filter.forward(rho_mesh)
        ivolume = cell_volume(cell).pow(-1)
        potential = self.mesh_interpolator.mesh_to_points(potential_mesh) * ivolume
        potential = potential - charges * self.potential.self_contribution()
        charge_tot = torch.sum(charges, dim=0)
        potential = potential - 2 * self.potential.background_correction() * charge_tot * ivolume
        return potential / 2
