r"""LES — latent Ewald summation: learned local charges interacting through Coulomb's law.

Each atom's invariant features give a latent charge :math:`\tilde q_i`; the block energy
is the Coulomb energy of Gaussian charges of width σ (physics.md, "LES")

.. math:: E = \gamma\, \frac{k_e}{2} \sum_{i \ne j} \tilde q_i \tilde q_j
          \frac{\operatorname{erf}(r_{ij}/\sqrt{2}\sigma)}{r_{ij}}
          - \mathcal{E}\cdot\sum_i q_i \mathbf{r}_i,
   \qquad q_i = \sqrt{\gamma}\,\tilde q_i ,

(Ewald/P3M sum over images for periodic cells, slab correction for ``pbc=[T,T,F]``).
The coupling γ = max(a, 0) of a learnable ``a`` (``coupling_init``, default 0) makes the
block exactly silent at initialisation. Zero-initialising the charges instead would
leave training at a saddle point: the energy is quadratic in the charges, so every
gradient of an energy or force loss vanishes at q = 0. γ is linear in ``a`` and its
gradient is passed straight through the clamp, so ``a`` can move back from negative
values when the data ask for electrostatics; γ itself is never negative. The reported
``charges`` √γ q̃ are the physical charges whose plain Coulomb energy is the block energy.
A dipole-only loss gives no gradient while γ = 0 (√γ has an infinite slope there);
start such runs with ``coupling_init > 0``.
"""

import logging
from typing import Any, Dict, List, Sequence

import torch

from mace_lr import LongRangeBlock, Output
from mace_lr.electrostatics import coulomb_potential_batch, coulomb_potential_graph
from mace_lr.nn import graph_sum, scalar_feature_indices, straight_through_coupling

logger = logging.getLogger(__name__)


class LESBlock(LongRangeBlock):
    """Latent Ewald summation block.

    Args:
        feature_irreps: irreps of the base model's ``node_feats``.
        atomic_numbers: elements of the base model.
        r_max: base-model cutoff, Å.
        smearing: Gaussian width σ of the charges, Å (default 1.0).
        hidden: width of the charge readout's hidden layer (default 32).
        accuracy: relative accuracy of periodic sums (default 1e-3: relative error of the
            long-range forces; energies come out ~100× more accurate, and the forces are
            exact gradients of the approximate energy, so MD conserves energy).
        method: ``"auto"``, ``"ewald"``, ``"p3m"`` or ``"graph"`` (Ewald with its real-space
            part on the base model's graph edges, TorchScript-compilable: the deployable
            engine, :func:`mace_lr.electrostatics.coulomb_potential_graph`; no slabs).
        coupling_init: initial value of the coupling parameter ``a`` (0: identity at init).
    """

    name = "les"
    #: ``method == "graph"``: a TorchScript constant, so a scripted block compiles only the
    #: engine it runs (the graph engine has no Python callback)
    graph_engine: torch.jit.Final[bool]
    outputs = (Output.charges("latent charges (a scale of its Coulomb energy, not a charge partition)"),)

    def __init__(
        self,
        feature_irreps: str,
        atomic_numbers: Sequence[int],
        r_max: float,
        smearing: float = 1.0,
        hidden: int = 32,
        accuracy: float = 1e-3,
        method: str = "auto",
        coupling_init: float = 0.0,
        **config: Any,
    ) -> None:
        if config:
            raise TypeError(f"unknown LES option(s): {', '.join(sorted(config))}")
        if smearing <= 0:
            raise ValueError(f"LES `smearing` must be > 0 Å, got {smearing}")
        super().__init__(
            feature_irreps,
            atomic_numbers,
            r_max,
            smearing=float(smearing),
            hidden=int(hidden),
            accuracy=float(accuracy),
            method=str(method),
            coupling_init=float(coupling_init),
        )
        self.smearing = float(smearing)
        self.accuracy = float(accuracy)
        self.method = str(method)
        self.graph_engine = self.method == "graph"
        scalars: List[int] = scalar_feature_indices(feature_irreps)
        if not scalars:
            raise ValueError(f"feature irreps {feature_irreps!r} have no invariant (0e) channels")
        self.register_buffer("scalar_index", torch.tensor(scalars, dtype=torch.int64), persistent=False)
        self.readout = torch.nn.Sequential(
            torch.nn.Linear(len(scalars), hidden),
            torch.nn.SiLU(),
            torch.nn.Linear(hidden, 1),
        )
        self.coupling = torch.nn.Parameter(torch.tensor(float(coupling_init)))

    def latent_charges(self, node_feats: torch.Tensor) -> torch.Tensor:
        """Latent charges ``q̃`` [n_atoms] from the invariant features."""
        return self.readout(node_feats[:, self.scalar_index]).squeeze(-1)

    def gamma(self) -> torch.Tensor:
        """Coupling γ = max(a, 0), with the gradient of ``a`` passed straight through."""
        return straight_through_coupling(self.coupling)

    def physical_scale(self) -> torch.Tensor:
        """``√γ`` (0 while γ = 0, with a zero gradient there)."""
        gamma = self.gamma()
        safe = torch.clamp(gamma, min=1e-30)
        return torch.where(gamma > 0, torch.sqrt(safe), torch.zeros_like(gamma))

    @torch.jit.ignore
    def coulomb_energies(
        self,
        positions: torch.Tensor,
        charges: torch.Tensor,
        cell: torch.Tensor,
        pbc: torch.Tensor,
        ptr: torch.Tensor,
        batch: torch.Tensor,
    ) -> torch.Tensor:
        """Coulomb energy of each graph [n_graphs], eV (runs in Python under TorchScript)."""
        phi = coulomb_potential_batch(
            positions,
            charges,
            cell,
            pbc,
            ptr,
            smearing=self.smearing,
            accuracy=self.accuracy,
            method=self.method,
        )
        return graph_sum(0.5 * charges * phi, batch, ptr.shape[0] - 1)

    def forward(self, ctx: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        positions = ctx["positions"]
        q_latent = self.latent_charges(ctx["node_feats"]).to(positions.dtype)
        num_graphs = ctx["ptr"].shape[0] - 1
        if self.graph_engine:
            phi = coulomb_potential_graph(
                positions, q_latent[:, None], ctx["cell"], ctx["pbc"], ctx["ptr"], ctx["edge_index"],
                ctx["shifts"], self.smearing, self.accuracy, self.r_max,
            )  # fmt: skip
            e_coulomb = graph_sum(0.5 * q_latent * phi[:, 0], ctx["batch"], num_graphs)
        else:
            e_coulomb = self.coulomb_energies(
                positions, q_latent, ctx["cell"], ctx["pbc"], ctx["ptr"], ctx["batch"]
            )
        charges = self.physical_scale().to(positions.dtype) * q_latent
        dipole = graph_sum(charges[:, None] * positions, ctx["batch"], num_graphs)
        field_energy = -(ctx["external_field"] * dipole).sum(-1)
        energy = self.gamma().to(positions.dtype) * e_coulomb + field_energy
        return {"energy": energy, "charges": charges, "dipole": dipole}
