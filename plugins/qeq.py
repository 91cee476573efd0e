r"""QEq — fourth-generation charge equilibration: nonlocal charges from a global solve.

Each atom gets an electronegativity χ_i = χ⁰_Z + Δχ(features) (per-element values plus a
readout of the base model's invariant features, its output layer zero-initialised), each
element a hardness J_Z > 0 and a Gaussian width σ_Z (learnable, initialised from
ionisation energies, electron affinities and covalent radii). The charges minimise
(physics.md, "QEq")

.. math:: E_Q(q) = \sum_i (\chi_i - \mathcal{E}\cdot\mathbf r_i - V_i) q_i
          + \tfrac12 \sum_i J_i q_i^2 + E_\mathrm{coul}(q; \sigma)

subject to :math:`\sum_i q_i = Q` (``total_charge``). A field ℰ (V/Å) enters the
electronegativities, so the charges respond to it and dipole, Born charges and
polarizability follow by autograd. The block energy is

.. math:: E = \gamma\, E_Q(q^*) + \sum_i \varepsilon_\mathrm{sr}(h_i, q^*_i)

with the coupling γ = max(a, 0) (``coupling_init``, default 0: exactly silent at
initialisation for any structure, charge and field, while the gradient on ``a`` is
non-zero) and, with ``fourth_generation=True``, a short-range readout of the features
and the equilibrated charge (zero-initialised output). The charges themselves do not
depend on γ, so ``charges`` always sum to Q. γ scales the equilibration energy and the
field coupling together, like an inverse dielectric constant; the dipole, Born charges
and polarizability the model reports are derivatives of this energy (dipole
γ Σ q* r). ``coupling_init=1`` with ``learn_coupling=False`` is plain physical QEq.

**Constant-potential electrodes** (Siepmann–Sprik). Atoms with ``atoms.arrays["electrode"]``
= 1 or 2 form two electrodes held at potentials ±ΔV/2 (``atoms.info["electrode_potential"]``
= ΔV, volts, electrode 1 minus electrode 2): they minimise ``E_Q − Σ V_i q_i`` with the
electrode pair neutral, while the other atoms keep the total charge Q. ``electrode_charge``
reports the charge on electrode 1.

Solvers: ``"dense"`` (exact, O(N³), small structures), ``"cg"`` (matrix-free projected
conjugate gradient whose matrix-vector product is the electrostatics engine — P3M for
large periodic cells) or ``"auto"``; derivatives go through the same solver
(see :mod:`mace_lr.electrostatics._qeq`).
"""

import logging
import math
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch

from mace_lr import Input, LongRangeBlock, Output, Target
from mace_lr.electrostatics import COULOMB_CONSTANT, solve_qeq_batch, solve_qeq_graph
from mace_lr.nn import scalar_feature_indices, softplus_inverse, straight_through_coupling

logger = logging.getLogger(__name__)

# first ionisation energy and electron affinity, eV (NIST); missing elements use defaults
_IP_EA: Dict[int, Tuple[float, float]] = {
    1: (13.598, 0.754),
    3: (5.392, 0.618),
    4: (9.323, 0.0),
    5: (8.298, 0.280),
    6: (11.260, 1.262),
    7: (14.534, 0.0),
    8: (13.618, 1.461),
    9: (17.423, 3.401),
    11: (5.139, 0.548),
    12: (7.646, 0.0),
    13: (5.986, 0.433),
    14: (8.152, 1.390),
    15: (10.487, 0.746),
    16: (10.360, 2.077),
    17: (12.968, 3.613),
    19: (4.341, 0.501),
    20: (6.113, 0.025),
    35: (11.814, 3.364),
    53: (10.451, 3.059),
}
_DEFAULT_IP_EA = (8.0, 1.0)
_MIN_HARDNESS = 0.5


def initial_element_parameters(atomic_numbers: Sequence[int]) -> Dict[str, List[float]]:
    """Physical starting values per element.

    Mulliken χ⁰ = (IP + EA)/2 (V), width σ = covalent radius (Å), and the hardness J that
    makes the total self-hardness J + k_e/(√π σ) equal IP − EA (at least 0.5 eV/e²).
    """
    from ase.data import covalent_radii

    chi, hardness, widths = [], [], []
    for z in atomic_numbers:
        ip, ea = _IP_EA.get(int(z), _DEFAULT_IP_EA)
        sigma = float(covalent_radii[int(z)])
        chi.append(0.5 * (ip + ea))
        widths.append(sigma)
        hardness.append(max(ip - ea - COULOMB_CONSTANT / (math.sqrt(math.pi) * sigma), _MIN_HARDNESS))
    return {"electronegativity": chi, "hardness": hardness, "widths": widths}


def _check_electrodes(atoms, index: int) -> None:
    """Electrode labels are 0, 1 or 2, and a structure with electrode atoms sets the potential."""
    if "electrode" not in atoms.arrays:
        return
    tag = np.asarray(atoms.arrays["electrode"], dtype=np.int64)
    if not set(np.unique(tag).tolist()) <= {0, 1, 2}:
        raise ValueError(
            f"structure {index}: atoms.arrays['electrode'] must hold 0 (not an electrode), "
            f"1 or 2 (the two electrodes), got {sorted(set(tag.tolist()))}"
        )
    if "electrode_potential" not in atoms.info and (tag > 0).any():
        raise KeyError(
            f"structure {index} has electrode atoms but no atoms.info['electrode_potential'] "
            "(V, electrode 1 minus electrode 2); set it explicitly (0 for shorted electrodes)"
        )


class QEqBlock(LongRangeBlock):
    """Charge-equilibration block (see the module documentation).

    Args:
        feature_irreps: irreps of the base model's ``node_feats``.
        atomic_numbers: elements of the base model.
        r_max: base-model cutoff, Å.
        hidden: width of the electronegativity readout's hidden layer.
        solver: ``"auto"`` (dense up to ``dense_max_atoms``), ``"dense"`` or ``"cg"``.
        dense_max_atoms: size up to which ``"auto"`` uses the dense solver.
        tol: CG relative residual.
        max_iter: CG iteration limit (exceeding it is an error, never silent charges).
        accuracy: relative accuracy of the electrostatics.
        method: periodic electrostatics method (``"auto"``, ``"ewald"``, ``"p3m"``), or
            ``"graph"``: one dense TorchScript-compilable solve per structure
            (:func:`mace_lr.electrostatics.solve_qeq_graph`; periodic cells as a purely
            reciprocal sum; no slabs, no electrodes; ``solver`` is then not used).
        coupling_init: initial ``a`` of γ = max(a, 0) (0: identity at initialisation).
        learn_coupling: train ``a``.
        learn_widths: train the Gaussian widths.
        fourth_generation: add the short-range readout of features and charges.
        warm_start: start CG from the previous call's charges for the same structure
            (inference only).
    """

    name = "qeq"
    #: ``method == "graph"`` (a TorchScript constant: a scripted block compiles one solver)
    graph_engine: torch.jit.Final[bool]
    required_inputs = ("total_charge",)
    inputs = (
        Input(
            "electrode",
            "atom",
            "",
            "electrode",
            dtype="int64",
            description="0 for ordinary atoms, 1 or 2 for the atoms of the two electrodes",
            check=_check_electrodes,
        ),
        Input(
            "electrode_potential", "structure", "V", "electrode_potential", description="electrode 1 minus 2"
        ),
    )
    outputs = (
        # equilibrated charges are partial charges: 4G-HDNNPs fit them to reference charges
        Output.charges(
            "equilibrated partial charges",
            target=Target(
                weight_flag="lr_charges_weight",
                key_flag="charges_key",
                help="weight of a loss on REF_charges (--charges_key); only for blocks whose charges may "
                "be fitted to a charge partition (qeq, as in 4G-HDNNPs; never LES latent charges)",
            ),
        ),
        Output(
            "electrode_charge",
            "structure",
            "e",
            "electrode_charge",
            description="charge on electrode 1",
            summed=True,
        ),
    )

    def __init__(
        self,
        feature_irreps: str,
        atomic_numbers: Sequence[int],
        r_max: float,
        hidden: int = 32,
        solver: str = "auto",
        dense_max_atoms: int = 256,
        tol: float = 1e-6,
        max_iter: int = 500,
        accuracy: float = 1e-4,
        method: str = "auto",
        coupling_init: float = 0.0,
        learn_coupling: bool = True,
        learn_widths: bool = True,
        fourth_generation: bool = False,
        warm_start: bool = True,
        **config: Any,
    ) -> None:
        if config:
            raise TypeError(f"unknown QEq option(s): {', '.join(sorted(config))}")
        if solver not in ("auto", "dense", "cg"):
            raise ValueError(f"QEq `solver` must be 'auto', 'dense' or 'cg', got {solver!r}")
        if not 0.0 < tol < 1.0:
            raise ValueError(f"QEq `tol` must be in (0, 1), got {tol}")
        super().__init__(
            feature_irreps,
            atomic_numbers,
            r_max,
            hidden=int(hidden),
            solver=str(solver),
            dense_max_atoms=int(dense_max_atoms),
            tol=float(tol),
            max_iter=int(max_iter),
            accuracy=float(accuracy),
            method=str(method),
            coupling_init=float(coupling_init),
            learn_coupling=bool(learn_coupling),
            learn_widths=bool(learn_widths),
            fourth_generation=bool(fourth_generation),
            warm_start=bool(warm_start),
        )
        self.solver = str(solver)
        self.dense_max_atoms = int(dense_max_atoms)
        self.tol = float(tol)
        self.max_iter = int(max_iter)
        self.accuracy = float(accuracy)
        self.method = str(method)
        self.graph_engine = self.method == "graph"
        self.fourth_generation = bool(fourth_generation)
        self.warm_start = bool(warm_start)
        scalars: List[int] = scalar_feature_indices(feature_irreps)
        if not scalars:
            raise ValueError(f"feature irreps {feature_irreps!r} have no invariant (0e) channels")
        self.register_buffer("scalar_index", torch.tensor(scalars, dtype=torch.int64), persistent=False)
        init = initial_element_parameters(self.atomic_numbers)
        self.register_buffer(
            "element_z", torch.tensor(self.atomic_numbers, dtype=torch.int64), persistent=False
        )
        self.electronegativity = torch.nn.Parameter(torch.tensor(init["electronegativity"]))
        self.hardness_raw = torch.nn.Parameter(torch.tensor([softplus_inverse(j) for j in init["hardness"]]))
        widths_raw = torch.tensor([softplus_inverse(s) for s in init["widths"]])
        if learn_widths:
            self.widths_raw = torch.nn.Parameter(widths_raw)
        else:
            self.register_buffer("widths_raw", widths_raw)
        # engine smearing: the narrowest initial pair kernel (a fixed number, so the
        # electrostatics parameters stay cached while the widths train)
        self.base_smearing = math.sqrt(2.0) * min(init["widths"]) if init["widths"] else 0.0
        self.readout = torch.nn.Sequential(
            torch.nn.Linear(len(scalars), hidden),
            torch.nn.SiLU(),
            # no bias: a constant shift of every χ moves no charge (it is redundant with χ⁰)
            torch.nn.Linear(hidden, 1, bias=False),
        )
        torch.nn.init.zeros_(self.readout[2].weight)
        coupling = torch.tensor(float(coupling_init))
        if learn_coupling:
            self.coupling = torch.nn.Parameter(coupling)
        else:
            self.register_buffer("coupling", coupling)
        # fourth generation: per-atom energy from features and equilibrated charge
        self.short_range = torch.nn.Sequential()
        if self.fourth_generation:
            self.short_range = torch.nn.Sequential(
                torch.nn.Linear(len(scalars) + 1, hidden),
                torch.nn.SiLU(),
                torch.nn.Linear(hidden, 1),
            )
            torch.nn.init.zeros_(self.short_range[2].weight)
            torch.nn.init.zeros_(self.short_range[2].bias)

    def gamma(self) -> torch.Tensor:
        """Coupling γ = max(a, 0), with the gradient of ``a`` passed straight through."""
        return straight_through_coupling(self.coupling)

    def hardness(self) -> torch.Tensor:
        """J per element, eV/e² (in the base model's element order)."""
        return torch.nn.functional.softplus(self.hardness_raw)

    def widths(self) -> torch.Tensor:
        """Gaussian width σ per element, Å."""
        return torch.nn.functional.softplus(self.widths_raw)

    @torch.jit.ignore
    def equilibrate(
        self,
        positions: torch.Tensor,
        chi: torch.Tensor,
        hardness: torch.Tensor,
        widths: torch.Tensor,
        ctx: Dict[str, torch.Tensor],
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """QEq energies [G], charges [N] and electrode-1 charges [G] (runs in Python).

        :func:`mace_lr.electrostatics.solve_qeq_batch` solves a batch of open molecules
        in one dense solve and anything else structure by structure.
        """
        result = solve_qeq_batch(
            positions,
            chi,
            hardness,
            widths,
            ctx["cell"],
            ctx["pbc"],
            ctx["ptr"],
            ctx["total_charge"],
            ctx["atomic_numbers"],
            electrode=ctx["electrode"],
            electrode_potential=ctx["electrode_potential"],
            solver=self.solver,
            dense_max_atoms=self.dense_max_atoms,
            tol=self.tol,
            max_iter=self.max_iter,
            accuracy=self.accuracy,
            method=self.method,
            base_smearing=self.base_smearing,
            newton_steps=2 if self.fourth_generation else 1,
            warm_start=self.warm_start and not self.training,
        )
        self.last_iterations = result["iterations"].tolist()  # CG iterations (diagnostics)
        return result["energy"], result["charges"], result["electrode_charge"]

    def forward(self, ctx: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        positions = ctx["positions"]
        dtype = positions.dtype
        species = torch.argmax(ctx["node_attrs"], dim=-1)
        scalars = ctx["node_feats"][:, self.scalar_index]
        chi = self.electronegativity.to(dtype)[species] + self.readout(scalars).squeeze(-1).to(dtype)
        field = ctx["external_field"].to(dtype)
        chi = chi - (field[ctx["batch"]] * positions).sum(-1)
        hardness = self.hardness().to(dtype)[species]
        widths = self.widths().to(dtype)[species]
        if self.graph_engine:
            if bool((ctx["electrode"] > 0).any()):
                raise ValueError("QEq with method='graph' does not handle electrodes")
            e_qeq, charges = solve_qeq_graph(
                positions, chi, hardness, widths, ctx["cell"], ctx["pbc"], ctx["ptr"], ctx["total_charge"],
                self.accuracy, self.base_smearing,
            )  # fmt: skip
            electrode_charge = torch.zeros_like(e_qeq)
        else:
            e_qeq, charges, electrode_charge = self.equilibrate(positions, chi, hardness, widths, ctx)
        gamma = self.gamma().to(dtype)
        energy = gamma * e_qeq
        if self.fourth_generation:
            atom_energy = self.short_range(torch.cat([scalars, charges[:, None].to(scalars.dtype)], -1))
            energy = energy.index_add(0, ctx["batch"], atom_energy.squeeze(-1).to(dtype))
        num_graphs = ctx["ptr"].shape[0] - 1
        dipole = torch.zeros((num_graphs, 3), dtype=dtype, device=positions.device)
        dipole = gamma * dipole.index_add(0, ctx["batch"], charges[:, None] * positions)
        return {
            "energy": energy,
            "charges": charges,
            "dipole": dipole,
            "electrode_charge": electrode_charge,
        }
