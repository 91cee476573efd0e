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

**Total-charge-aware charges** (``total_charge="uniform"`` or ``"learned"``; default
``"none"``: the latent charges above, unconstrained). The readout alone need not give an
isolated ion charges that add up to its charge, nor a neutral molecule charges that add up
to zero. With the option on, the readout's charges are corrected so that every structure
g carries exactly its total charge :math:`Q_g` (``total_charge``, ``atoms.info["charge"]``
or ``--total_charge_key`` in training):

.. math:: q_i = \tilde q_i + \frac{w_i}{\sum_{j\in g} w_j}
          \Big(Q_g - \sum_{j\in g} \tilde q_j\Big),

the minimiser of :math:`\sum_i (q_i - \tilde q_i)^2 / 2w_i` under :math:`\sum_{i\in g} q_i =
Q_g` (charge equilibration without the Coulomb term: :math:`w_i` is a softness, an inverse
hardness). ``"uniform"``: :math:`w_i = 1`, the excess shared equally by all atoms.
``"learned"``: :math:`w_i = \operatorname{softplus}(u(h_i))` from a second readout of the
invariant features (electronegativity-like; its output layer starts at zero, so it starts
uniform), which can put the excess where the chemistry holds it. In this mode the energy is
:math:`\gamma\,[E_\mathrm{coul}(q) - \mathcal E\cdot\sum_i q_i \mathbf r_i]` and the reported
``charges`` are :math:`q` itself (they sum to :math:`Q_g` whatever γ, as in ``qeq``); γ acts
as an inverse dielectric constant and the dipole is :math:`\gamma \sum_i q_i \mathbf r_i`. The
block is still exactly silent at initialisation (γ = 0), and the forces are exact
gradients (the correction is differentiable and uses sums over each graph's atoms).

*Structures of several fragments.* The total charge is known per structure, not per
fragment, so the correction is one global operation: the excess
:math:`\delta = Q_g - \sum_j \tilde q_j` is spread over all atoms of the structure by their
weights, and each fragment receives the share :math:`\delta\,W_F/W` of it
(:math:`W_F = \sum_{i \in F} w_i`). Where the readout already gives every fragment its own
charge, δ = 0 and nothing moves. Otherwise charge is moved between fragments however far
apart they are: two distant fragments then carry non-integer net charges that depend on each
other's size and composition (the charges are no longer local: ∂q_i/∂R_k ≠ 0 for a distant
k, through δ), and their Coulomb energy at long range is that of those fractional charges,
so E(A…B) → E(A) + E(B) holds only as far as the readout is right. A structure evaluated
alone always carries exactly its charge. Learned weights can localise the excess (large
:math:`w` on the atoms of ions, small on neutral molecules), which is what makes distant
fragments keep their formal charges when the readout is nearly right. The cost of a leak is large:
a fragment's own (intramolecular) Coulomb energy grows as the square of its net charge
(several eV/e² for σ = 1 Å), so moving 0.5 e between two distant ions changes the energy of
the pair by eV, far more than their 1 eV interaction at 15 Å
(``benchmarks/bench_leave_family_out.py``, ``data/README.md``). For the same reason the
charged structures' block energy is large from the first step, and the gradient on the
coupling can close the gate (γ = 0) early in training. No embedding of
:math:`Q_g` into the readout is used: it would give every atom of every fragment the
structure's charge as an input (a neutral molecule's charges would change with a distant
ion's presence), would not enforce the sum, and the correction above already uses
:math:`Q_g` exactly.

**Fragments at their formal charges** (``charge_groups="fragments"``, with ``total_charge``
``"uniform"`` or ``"learned"``). Where the charge of every molecule is known — the formal
charges a chemist writes, given per atom as ``atoms.arrays["formal_charges"]``
(the same key in training files; only their sum over each fragment is used) — the same
correction is applied to every covalently bonded fragment F instead of the whole structure,
:math:`\sum_{i \in F} q_i = Q_F = \sum_{i \in F} q^\mathrm{formal}_i`. Fragments are the
connected components of the bond graph (distance below ``bond_scale`` × the summed covalent
radii, 1.2 by default) on the base model's edges. No charge moves between fragments, so a
fragment's charges depend only on its own atoms and their neighbourhood: two fragments
beyond the base model's receptive field interact as their own charge distributions, with
E(A…B) − E(A) − E(B) → γ·(Coulomb energy between them), net charges Q_A Q_B / r at leading
order. The partition is a topology: it is constant while no bond forms or breaks, and the
energy jumps where one does (a proton transfer, a dissociation); for reactive systems use
``"structure"``. Ionic solids and melts, where every ion is "bonded" to its neighbours,
form one fragment and reduce to ``"structure"``.
"""

import logging
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np
import torch

from mace_lr import Input, LongRangeBlock, Output
from mace_lr.electrostatics import coulomb_potential_batch, coulomb_potential_graph
from mace_lr.nn import (
    COVALENT_RADII,
    bonded_fragments,
    graph_sum,
    scalar_feature_indices,
    straight_through_coupling,
)

logger = logging.getLogger(__name__)

#: values of the ``total_charge`` option
TOTAL_CHARGE_MODES = ("none", "uniform", "learned")
#: values of the ``charge_groups`` option: what carries a fixed charge
CHARGE_GROUPS = ("structure", "fragments")
#: per-atom input of ``charge_groups="fragments"``
FORMAL_CHARGES = "formal_charges"


def _check_formal_charges(atoms, index: int) -> None:
    """``atoms.arrays["formal_charges"]``: one finite number per atom, summing to ``info["charge"]``."""
    if FORMAL_CHARGES not in atoms.arrays:
        return
    values = np.asarray(atoms.arrays[FORMAL_CHARGES])
    if values.shape != (len(atoms),) or not np.issubdtype(values.dtype, np.number):
        raise ValueError(
            f"structure {index}: atoms.arrays[{FORMAL_CHARGES!r}] must hold one number per atom "
            f"(shape ({len(atoms)},)), got shape {values.shape} and dtype {values.dtype}"
        )
    if not np.isfinite(values).all():
        raise ValueError(f"structure {index}: atoms.arrays[{FORMAL_CHARGES!r}] has non-finite values")
    total = atoms.info.get("charge")
    if total is not None and abs(float(values.sum()) - float(total)) > 1e-6:
        raise ValueError(
            f"structure {index}: its formal charges sum to {float(values.sum()):g} e but "
            f"atoms.info['charge'] is {float(total):g} e"
        )


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
        total_charge: ``"none"`` (default: unconstrained latent charges), ``"uniform"`` or
            ``"learned"``: charges corrected so that each structure's sum is its
            ``total_charge`` (the excess spread equally, or by learned softplus weights).
            With it on the model requires the total charge of every structure.
        charge_groups: what the correction holds at a fixed charge (with ``total_charge``
            on): ``"structure"`` (default: each structure sums to ``total_charge``) or
            ``"fragments"``: each covalently bonded fragment sums to its formal charge,
            the sum of the per-atom ``formal_charges`` input over its atoms
            (``atoms.arrays["formal_charges"]``); the total charge is then not needed.
        bond_scale: bond criterion of ``"fragments"``: bonded when the distance is below
            ``bond_scale`` times the summed covalent radii (default 1.2).
    """

    name = "les"
    #: ``method == "graph"``: a TorchScript constant, so a scripted block compiles only the
    #: engine it runs (the graph engine has no Python callback)
    graph_engine: torch.jit.Final[bool]
    # set per instance when `total_charge` is on; not part of the compiled module
    __jit_ignored_attributes__ = ["required_inputs", "inputs"]
    outputs = (Output.charges("latent charges (a scale of its Coulomb energy, not a charge partition)"),)
    inputs = (
        Input(
            FORMAL_CHARGES,
            "atom",
            "e",
            FORMAL_CHARGES,
            description="formal charges of the atoms (only their sum over each bonded fragment is used, "
            'by charge_groups="fragments")',
            check=_check_formal_charges,
        ),
    )
    #: ``charge_groups == "fragments"`` (a TorchScript constant)
    per_fragment: torch.jit.Final[bool]

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
        total_charge: str = "none",
        charge_groups: str = "structure",
        bond_scale: float = 1.2,
        **config: Any,
    ) -> None:
        if config:
            raise TypeError(f"unknown LES option(s): {', '.join(sorted(config))}")
        if smearing <= 0:
            raise ValueError(f"LES `smearing` must be > 0 Å, got {smearing}")
        if total_charge not in TOTAL_CHARGE_MODES:
            raise ValueError(
                f"LES `total_charge` must be one of {', '.join(map(repr, TOTAL_CHARGE_MODES))}, "
                f"got {total_charge!r}"
            )
        if charge_groups not in CHARGE_GROUPS:
            raise ValueError(
                f"LES `charge_groups` must be one of {', '.join(map(repr, CHARGE_GROUPS))}, "
                f"got {charge_groups!r}"
            )
        if charge_groups == "fragments" and total_charge == "none":
            raise ValueError(
                'LES `charge_groups="fragments"` corrects the charges of each fragment: it needs '
                '`total_charge="uniform"` or `"learned"` (the redistribution within a fragment)'
            )
        if not bond_scale > 0:
            raise ValueError(f"LES `bond_scale` must be > 0, got {bond_scale}")
        extra: Dict[str, Any] = {} if total_charge == "none" else {"total_charge": str(total_charge)}
        if charge_groups == "fragments":  # older configs stay as they were
            extra.update(charge_groups=str(charge_groups), bond_scale=float(bond_scale))
        super().__init__(
            feature_irreps,
            atomic_numbers,
            r_max,
            smearing=float(smearing),
            hidden=int(hidden),
            accuracy=float(accuracy),
            method=str(method),
            coupling_init=float(coupling_init),
            **extra,
        )
        self.total_charge_mode = str(total_charge)
        self.per_fragment = charge_groups == "fragments"
        self.bond_scale = float(bond_scale)
        if total_charge != "none":
            self.required_inputs = self.required_inputs_for(
                {"total_charge": total_charge, "charge_groups": charge_groups}
            )
        self.register_buffer(
            "covalent_radii", torch.tensor(COVALENT_RADII, dtype=torch.float64), persistent=False
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
        # softness readout of the "learned" mode (output layer zero: uniform weights at init);
        # an Identity (no parameters) otherwise, so that older models load unchanged
        self.weight_readout = torch.nn.Identity()
        if total_charge == "learned":
            self.weight_readout = torch.nn.Sequential(
                torch.nn.Linear(len(scalars), hidden),
                torch.nn.SiLU(),
                torch.nn.Linear(hidden, 1),
            )
            torch.nn.init.zeros_(self.weight_readout[2].weight)
            torch.nn.init.zeros_(self.weight_readout[2].bias)

    @classmethod
    def required_inputs_for(cls, options: Mapping[str, Any]) -> Tuple[str, ...]:
        """Data keys a block built with ``options`` requires (``total_charge`` when the option is
        on; ``formal_charges`` instead with ``charge_groups="fragments"``).
        """
        if options.get("total_charge", "none") == "none":
            return ()
        return (FORMAL_CHARGES,) if options.get("charge_groups") == "fragments" else ("total_charge",)

    def latent_charges(self, node_feats: torch.Tensor) -> torch.Tensor:
        """Latent charges ``q̃`` [n_atoms] from the invariant features."""
        return self.readout(node_feats[:, self.scalar_index]).squeeze(-1)

    def conserve_charge(
        self,
        q_latent: torch.Tensor,
        node_feats: torch.Tensor,
        batch: torch.Tensor,
        total_charge: torch.Tensor,
    ) -> torch.Tensor:
        r"""Charges [n_atoms] e whose sum over each group is ``total_charge`` [n_groups] e.

        :math:`q_i = \tilde q_i + w_i (Q_g - \sum_{j \in g} \tilde q_j) / \sum_{j \in g} w_j`
        with :math:`w_i = 1` (``"uniform"``) or :math:`\operatorname{softplus}(u(h_i))`
        (``"learned"``); segment sums over ``batch`` (the group of each atom: its graph, or its
        fragment), no loop over groups.
        """
        num_graphs = total_charge.shape[0]
        if self.total_charge_mode == "learned":
            raw = self.weight_readout(node_feats[:, self.scalar_index]).squeeze(-1).to(q_latent.dtype)
            weights = torch.nn.functional.softplus(raw) + 1e-6
        else:
            weights = torch.ones_like(q_latent)
        excess = total_charge.to(q_latent.dtype) - graph_sum(q_latent, batch, num_graphs)
        weight_sum = torch.clamp(graph_sum(weights, batch, num_graphs), min=1e-30)
        return q_latent + weights * (excess / weight_sum)[batch]

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
        conserving = self.total_charge_mode != "none"
        if conserving and self.per_fragment:
            fragment, num_fragments = bonded_fragments(
                ctx["atomic_numbers"], positions, ctx["edge_index"], ctx["shifts"], self.covalent_radii,
                self.bond_scale,
            )  # fmt: skip
            formal = ctx["formal_charges"].to(positions.dtype)  # FORMAL_CHARGES (TorchScript)
            fragment_charge = graph_sum(formal, fragment, num_fragments)
            q_latent = self.conserve_charge(q_latent, ctx["node_feats"], fragment, fragment_charge)
        elif conserving:
            q_latent = self.conserve_charge(q_latent, ctx["node_feats"], ctx["batch"], ctx["total_charge"])
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
        gamma = self.gamma().to(positions.dtype)
        if conserving:  # charges sum to Q; γ screens their energy and field coupling together
            charges = q_latent
            dipole = gamma * graph_sum(charges[:, None] * positions, ctx["batch"], num_graphs)
        else:
            charges = self.physical_scale().to(positions.dtype) * q_latent
            dipole = graph_sum(charges[:, None] * positions, ctx["batch"], num_graphs)
        field_energy = -(ctx["external_field"] * dipole).sum(-1)
        energy = gamma * e_coulomb + field_energy
        return {"energy": energy, "charges": charges, "dipole": dipole}
