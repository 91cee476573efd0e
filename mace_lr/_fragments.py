r"""Covalent fragments of a batch: connected components of the bond graph (private module).

Two atoms are bonded when their distance is below ``bond_scale`` times the sum of their
covalent radii (ASE's table, Cordero et al. 2008). The fragments are the connected
components of that graph, found on the base model's edges (every bond is shorter than
the cutoff), so periodic images and batches of several structures need no extra work;
a fragment never spans two structures. The labels are integers: nothing here is
differentiated, and the partition is constant while no bond forms or breaks.
"""

from typing import Tuple

import torch
from ase.data import covalent_radii

#: covalent radii, Å, indexed by atomic number (ASE's table)
COVALENT_RADII = tuple(float(r) for r in covalent_radii)
#: default bond criterion: distance < 1.2 × (r_cov,i + r_cov,j)
BOND_SCALE = 1.2


def bonded_fragments(
    atomic_numbers: torch.Tensor,
    positions: torch.Tensor,
    edge_index: torch.Tensor,
    shifts: torch.Tensor,
    radii: torch.Tensor,
    bond_scale: float = BOND_SCALE,
) -> Tuple[torch.Tensor, int]:
    r"""Fragment index of every atom: connected components of the covalent bond graph.

    Args:
        atomic_numbers: [N] int64.
        positions: [N, 3] Å.
        edge_index: [2, E] int64, the base model's edges (sender, receiver); both
            directions of a pair need not be present.
        shifts: [E, 3] Å, image shifts of the edges (``r_ij = r_j - r_i + shift``).
        radii: covalent radius of every atomic number, Å (:data:`COVALENT_RADII` as a tensor).
        bond_scale: bonded when ``r_ij < bond_scale (r_i + r_j)``.

    Returns:
        ``(fragment [N] int64 in 0..F-1, F)``; fragments are numbered in the order of
        their lowest atom index, so atoms of one structure (consecutive in a batch) get
        consecutive fragment numbers and a batch keeps its structures' order.
    """
    n = positions.shape[0]
    device = positions.device
    labels = torch.arange(n, dtype=torch.int64, device=device)
    if n == 0:
        return labels, 0
    sender, receiver = edge_index[0], edge_index[1]
    vectors = (positions[receiver] - positions[sender] + shifts).detach()
    distance = torch.linalg.norm(vectors.to(torch.float64), dim=-1)
    r_cov = radii.to(device=device, dtype=torch.float64)[atomic_numbers]
    bonded = distance < bond_scale * (r_cov[sender] + r_cov[receiver])
    a = torch.cat([sender[bonded], receiver[bonded]])
    b = torch.cat([receiver[bonded], sender[bonded]])
    # minimum-label propagation with pointer jumping: each pass lowers every label to the
    # smallest one among its bonded neighbours and then to its label's label; it ends with
    # every atom labelled by the lowest index of its fragment (at most n passes)
    changed = True
    while changed:
        lowered = labels.scatter_reduce(0, b, labels[a], reduce="amin", include_self=True)
        lowered = lowered[lowered]
        changed = not torch.equal(lowered, labels)
        labels = lowered
    is_root = labels == torch.arange(n, dtype=torch.int64, device=device)
    number = torch.cumsum(is_root.to(torch.int64), 0) - 1
    return number[labels], int(is_root.sum())
