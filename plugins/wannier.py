r"""Wannier centroids (DPLR-like): ions plus learned electron centroids, through Coulomb's law.

In an insulator the electrons of each atom's lone and bonding pairs can be summarised by
the centroid of their Wannier centres (physics.md, "Wannier centres and atomic dipoles").
For the chosen species (``centroid_electrons``, e.g. ``{"O": 8}`` in water) the block
predicts the displacement of that centroid from its atom as an equivariant vector,

.. math:: \mathbf W_i = \mathbf R_i + \mathbf d_i, \qquad
          \mathbf d_i = \sum_k g_{ik}(s_i)\, \mathbf u_{ik},

(:math:`\mathbf u_{ik}` learned neighbour vectors plus the base model's 1o features,
:math:`g_{ik}` from the invariant features :math:`s_i`; the last layer of :math:`g` starts
at zero, so every centroid starts on its atom). Every atom carries its ion charge
:math:`Z_i` (nucleus plus core, ``ion_charges``; default: the number of valence
electrons) and every centroid the charge :math:`-n_i`, all Gaussians of width σ. The
block energy is their Coulomb energy (Ewald/P3M for periodic cells, exact pair sum for
molecules, slab correction for ``pbc=[T,T,F]``) plus the coupling to an applied field:

.. math:: E = \gamma\, \frac{k_e}{2} \sum_{a \ne b} q_a q_b
          \frac{\operatorname{erf}(r_{ab}/\sqrt{2}\sigma)}{r_{ab}} - \mathcal{E}\cdot\boldsymbol\mu,
   \qquad \boldsymbol\mu = \sum_i (Z_i - n_i)\,\mathbf R_i - \sum_i n_i\,\mathbf d_i ,

where a, b run over ions and centroids (an ion and its own centroid interact too; the
pair is smooth as they meet). In a periodic cell μ/Ω is the polarization
:math:`(\sum_i Z_i \mathbf R_i - \sum_i n_i \mathbf W_i)/Ω` on the branch of the positions
as given. The coupling γ = max(a, 0) of a learnable ``a`` (``coupling_init``, default 0)
keeps the block silent at zero field at initialisation (the base model already holds the
electrostatics of the training data in its short-range form); ``coupling_init=1`` gives
the plain DPLR energy. The field term is not scaled by γ: it is the field's work on the
model's charges, whose dipole and Born charges are physical from the start.

The centroids can be trained explicitly (``wannier_centroids`` data, loss on
:math:`|\mathbf W_i - \mathbf W_i^\mathrm{ref}|^2` at the minimum image) or implicitly through
dipoles, polarizations, Born charges and energies. Since :math:`\mathbf d_i` depends on
relative positions only, the Born charges obey :math:`\sum_i Z^*_i = Q\,I` with
:math:`Q = \sum_i (Z_i - n_i)`, which must equal the structure's total charge (checked).
"""

import logging
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch

from mace_lr import LongRangeBlock, Output, Target
from mace_lr.electrostatics import coulomb_potential_batch, coulomb_potential_graph
from mace_lr.nn import (
    bessel_wavenumbers,
    element_values,
    feature_vectors,
    neighbour_vectors,
    scalar_feature_indices,
    straight_through_coupling,
    vector_feature_indices,
)

logger = logging.getLogger(__name__)

#: Valence electrons of the main-group elements H–Xe (the default ion charges).
_VALENCE = {
    1: 1, 2: 2, 3: 1, 4: 2, 5: 3, 6: 4, 7: 5, 8: 6, 9: 7, 10: 8,
    11: 1, 12: 2, 13: 3, 14: 4, 15: 5, 16: 6, 17: 7, 18: 8,
    19: 1, 20: 2, 31: 3, 32: 4, 33: 5, 34: 6, 35: 7, 36: 8,
    37: 1, 38: 2, 49: 3, 50: 4, 51: 5, 52: 6, 53: 7, 54: 8,
}  # fmt: skip


def net_charges(ion: torch.Tensor, electrons: torch.Tensor, ptr: torch.Tensor) -> torch.Tensor:
    """Ion charges minus centroid electrons summed per graph [G], e (offsets ``ptr``)."""
    n_graphs = ptr.shape[0] - 1
    batch = torch.repeat_interleave(torch.arange(n_graphs, device=ptr.device), ptr[1:] - ptr[:-1])
    formal = (ion - electrons).detach()
    return torch.zeros(n_graphs, dtype=formal.dtype, device=formal.device).index_add(0, batch, formal)


def coulomb_sites(
    positions: torch.Tensor,
    centroids: torch.Tensor,
    ion: torch.Tensor,
    electrons: torch.Tensor,
    ptr: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sites [S, 3] Å, charges [S] e, graph index [S] and offsets [G + 1] of the charges:
    graph after graph, each graph's ions followed by its centroids.
    """
    n_graphs = ptr.shape[0] - 1
    batch = torch.repeat_interleave(torch.arange(n_graphs, device=ptr.device), ptr[1:] - ptr[:-1])
    has = electrons > 0
    site_graph = torch.cat([batch, batch[has]])
    order = torch.sort(site_graph, stable=True).indices
    sites = torch.cat([positions, centroids[has]], dim=0)[order]
    charges = torch.cat([ion, -electrons[has]], dim=0)[order]
    site_counts = torch.bincount(site_graph, minlength=n_graphs)
    site_ptr = torch.cat([site_counts.new_zeros(1), torch.cumsum(site_counts, 0)])
    return sites, charges, site_graph[order], site_ptr


class WannierBlock(LongRangeBlock):
    """Wannier-centroid block (ions plus learned electron centroids, Coulomb energy).

    Args:
        feature_irreps: irreps of the base model's ``node_feats``.
        atomic_numbers: elements of the base model.
        r_max: base-model cutoff, Å (the centroid vectors see neighbours within it).
        centroid_electrons: element → electrons on its Wannier centroid (e.g. ``{"O": 8}``
            for water: four doubly occupied pairs). Elements not listed carry none.
        ion_charges: element → ion charge (nucleus plus core electrons), e; elements not
            listed get their number of valence electrons (H–Xe main group).
        smearing: Gaussian width σ of ions and centroids, Å (default 1.0).
        num_vectors: equivariant vectors per atom that make up the displacement (default 4).
        num_basis: Bessel functions of the radial basis (default 6).
        hidden: width of the hidden layer mapping invariants to vector weights (default 32).
        accuracy: relative accuracy of periodic sums (default 1e-3).
        method: ``"auto"``, ``"ewald"``, ``"p3m"`` or ``"graph"`` (TorchScript-compilable,
            :func:`mace_lr.electrostatics.coulomb_potential_graph`: the centroids are not on
            the base model's graph, so periodic sums are purely reciprocal, split s = σ,
            O(N·K) with K ∝ V/σ³; no slabs).
        coupling_init: initial value of the coupling parameter ``a`` (0: identity at init,
            1: the plain Coulomb energy of ions and centroids).
    """

    name = "wannier"
    #: ``method == "graph"`` (a TorchScript constant: a scripted block compiles one engine)
    graph_engine: torch.jit.Final[bool]
    outputs = (
        Output.charges("fixed ion-minus-centroid charges"),
        Output(
            "centroids",
            "atom",
            "Å",
            "wannier_centroids",
            shape=(3,),
            description="Wannier centroids",
            mask="centroid_mask",
            mask_name="wannier_centroid_mask",
            target=Target(
                weight_flag="wannier_centroids_weight",
                key_flag="wannier_centroids_key",
                default_key="REF_wannier_centroids",
                loss="mse_minimum_image",
                help="weight of the Wannier-centroid loss (mean squared error per component over atoms "
                "with a centroid, Å^-2; periodic cells at the minimum image)",
            ),
        ),
    )

    def __init__(
        self,
        feature_irreps: str,
        atomic_numbers: Sequence[int],
        r_max: float,
        centroid_electrons: Optional[Mapping[Any, float]] = None,
        ion_charges: Optional[Mapping[Any, float]] = None,
        smearing: float = 1.0,
        num_vectors: int = 4,
        num_basis: int = 6,
        hidden: int = 32,
        accuracy: float = 1e-3,
        method: str = "auto",
        coupling_init: float = 0.0,
        **config: Any,
    ) -> None:
        from ase.data import chemical_symbols

        if config:
            raise TypeError(f"unknown wannier option(s): {', '.join(sorted(config))}")
        if not centroid_electrons:
            raise ValueError(
                "the wannier block needs `centroid_electrons`, the electrons on each species' "
                'Wannier centroid, e.g. {"O": 8} for water'
            )
        if smearing <= 0:
            raise ValueError(f"wannier `smearing` must be > 0 Å, got {smearing}")
        if int(num_vectors) < 1 or int(num_basis) < 1:
            raise ValueError("wannier `num_vectors` and `num_basis` must be >= 1")
        electrons = element_values(
            centroid_electrons, atomic_numbers, "wannier `centroid_electrons`", default=lambda z: 0.0
        )
        ion_list = element_values(
            ion_charges, atomic_numbers, "wannier `ion_charges`", default=_VALENCE.get, noun="ion charge"
        )
        symbols = [chemical_symbols[int(z)] for z in atomic_numbers]
        super().__init__(
            feature_irreps,
            atomic_numbers,
            r_max,
            centroid_electrons={s: n for s, n in zip(symbols, electrons) if n != 0.0},
            ion_charges=dict(zip(symbols, ion_list)),
            smearing=float(smearing),
            num_vectors=int(num_vectors),
            num_basis=int(num_basis),
            hidden=int(hidden),
            accuracy=float(accuracy),
            method=str(method),
            coupling_init=float(coupling_init),
        )
        self.smearing = float(smearing)
        self.accuracy = float(accuracy)
        self.method = str(method)
        self.graph_engine = self.method == "graph"
        self.num_vectors = int(num_vectors)
        dtype = torch.get_default_dtype()
        self.register_buffer("ion_charge", torch.tensor(ion_list, dtype=dtype), persistent=False)
        self.register_buffer("centroid_charge", torch.tensor(electrons, dtype=dtype), persistent=False)
        scalars = scalar_feature_indices(feature_irreps)
        if not scalars:
            raise ValueError(f"feature irreps {feature_irreps!r} have no invariant (0e) channels")
        vectors = vector_feature_indices(feature_irreps)
        self.register_buffer("scalar_index", torch.tensor(scalars, dtype=torch.int64), persistent=False)
        self.register_buffer("vector_index", torch.tensor(vectors, dtype=torch.int64), persistent=False)
        self.num_feature_vectors = len(vectors) // 3
        self.register_buffer("bessel_k", bessel_wavenumbers(int(num_basis), self.r_max))
        self.radial = torch.nn.Linear(len(symbols), self.num_vectors * int(num_basis), bias=False)
        torch.nn.init.normal_(self.radial.weight, std=float(num_basis) ** -0.5)
        self.vector_mix: torch.nn.Module = (
            torch.nn.Linear(self.num_feature_vectors, self.num_vectors, bias=False)
            if self.num_feature_vectors > 0
            else torch.nn.Identity()
        )
        # weights g_ik of the vectors; the last layer starts at zero (centroids on their atoms)
        self.vector_weights = torch.nn.Sequential(
            torch.nn.Linear(len(scalars), int(hidden)),
            torch.nn.SiLU(),
            torch.nn.Linear(int(hidden), self.num_vectors),
        )
        torch.nn.init.zeros_(self.vector_weights[2].weight)
        torch.nn.init.zeros_(self.vector_weights[2].bias)
        self.coupling = torch.nn.Parameter(torch.tensor(float(coupling_init)))

    def gamma(self) -> torch.Tensor:
        """Coupling γ = max(a, 0), with the gradient of ``a`` passed straight through."""
        return straight_through_coupling(self.coupling)

    def displacements(self, ctx: Dict[str, torch.Tensor], carrier: torch.Tensor) -> torch.Tensor:
        """Centroid displacements d_i [n_atoms, 3], Å (zero where ``carrier`` [n_atoms] is False)."""
        positions = ctx["positions"]
        dtype = positions.dtype
        u = neighbour_vectors(ctx, self.radial(ctx["node_attrs"].to(dtype)), self.bessel_k, self.r_max)
        if self.num_feature_vectors > 0:
            v = feature_vectors(ctx["node_feats"], self.vector_index, dtype)
            u = u + self.vector_mix(v).transpose(1, 2)
        g = self.vector_weights(ctx["node_feats"][:, self.scalar_index].to(dtype))  # [n_atoms, K]
        d = (g[:, :, None] * u).sum(1)
        return torch.where(carrier[:, None], d, torch.zeros_like(d))

    @torch.jit.ignore
    def coulomb_energies(
        self,
        positions: torch.Tensor,
        centroids: torch.Tensor,
        ion: torch.Tensor,
        electrons: torch.Tensor,
        cell: torch.Tensor,
        pbc: torch.Tensor,
        ptr: torch.Tensor,
        total_charge: torch.Tensor,
    ) -> torch.Tensor:
        """Coulomb energy of ions and centroids of each graph [n_graphs], eV (Python).

        One engine call for the whole batch: each graph's sites are its ions followed by
        its centroids (graphs in order).
        """
        n_graphs = ptr.shape[0] - 1
        net = net_charges(ion, electrons, ptr)
        bad = (net - total_charge.to(net.dtype)).abs() > 1e-6
        if bool(bad.any()):
            g = int(torch.nonzero(bad)[0, 0])
            raise ValueError(
                f"wannier block: the ion charges minus the centroid electrons of structure {g} "
                f"add up to {float(net[g]):g} e but its total charge is {float(total_charge[g]):g} e; set "
                "atoms.info['charge'] (or --total_charge_key) or check `ion_charges` and "
                "`centroid_electrons`"
            )
        if n_graphs == 0:
            return positions.new_zeros(0)
        sites, charges, site_graph, site_ptr = coulomb_sites(positions, centroids, ion, electrons, ptr)
        phi = coulomb_potential_batch(
            sites,
            charges,
            cell,
            pbc,
            site_ptr,
            smearing=self.smearing,
            accuracy=self.accuracy,
            method=self.method,
        )
        energy = positions.new_zeros(n_graphs)
        return energy.index_add(0, site_graph, 0.5 * charges * phi)

    def graph_coulomb_energies(
        self,
        positions: torch.Tensor,
        centroids: torch.Tensor,
        ion: torch.Tensor,
        electrons: torch.Tensor,
        cell: torch.Tensor,
        pbc: torch.Tensor,
        ptr: torch.Tensor,
        total_charge: torch.Tensor,
    ) -> torch.Tensor:
        """As :meth:`coulomb_energies`, on the TorchScript graph engine (no real-space part)."""
        n_graphs = ptr.shape[0] - 1
        net = net_charges(ion, electrons, ptr)
        if bool(((net - total_charge.to(net.dtype)).abs() > 1e-6).any()):
            raise ValueError(
                "wannier block: ion charges minus centroid electrons differ from the total charge"
            )
        sites, charges, site_graph, site_ptr = coulomb_sites(positions, centroids, ion, electrons, ptr)
        no_edges = torch.zeros((2, 0), dtype=torch.int64, device=positions.device)
        phi = coulomb_potential_graph(
            sites, charges[:, None], cell, pbc, site_ptr, no_edges, sites.new_zeros((0, 3)),
            self.smearing, self.accuracy, 0.0,
        )  # fmt: skip
        return positions.new_zeros(n_graphs).index_add(0, site_graph, 0.5 * charges * phi[:, 0])

    def forward(self, ctx: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        positions = ctx["positions"]
        dtype = positions.dtype
        num_graphs = ctx["ptr"].shape[0] - 1
        species = torch.argmax(ctx["node_attrs"], dim=-1)
        ion = self.ion_charge.to(dtype)[species]
        electrons = self.centroid_charge.to(dtype)[species]
        carrier = electrons > 0
        d = self.displacements(ctx, carrier)
        centroids = positions + d
        args = (
            positions,
            centroids,
            ion,
            electrons,
            ctx["cell"],
            ctx["pbc"],
            ctx["ptr"],
            ctx["total_charge"],
        )
        if self.graph_engine:
            e_coulomb = self.graph_coulomb_energies(*args)
        else:
            e_coulomb = self.coulomb_energies(*args)
        charges = ion - electrons
        atomic_dipoles = -electrons[:, None] * d
        dipole = torch.zeros((num_graphs, 3), dtype=dtype, device=positions.device)
        dipole = dipole.index_add(0, ctx["batch"], charges[:, None] * positions + atomic_dipoles)
        field_energy = -(ctx["external_field"].to(dtype) * dipole).sum(-1)
        energy = self.gamma().to(dtype) * e_coulomb + field_energy
        return {
            "energy": energy,
            "charges": charges,
            "atomic_dipoles": atomic_dipoles,
            "dipole": dipole,
            "centroids": centroids,
            "centroid_mask": carrier,
        }
