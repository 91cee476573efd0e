r"""LOREM-style long-range equivariant messages.

Each atom carries C "spherical charges" for every degree l ≤ ``l_max`` and order m
(irreps ``C×0e + C×1o [+ C×2e]``), made by an e3nn linear map from a state that starts as
the base model's features plus the block's own local harmonics of the base graph's bonds,

.. math:: h^{0,l}_{ic} = \big(W\,\mathrm{feats}_i\big)^{l}_c
          + \sum_{j \in \mathcal N(i)} R_{cl}(r_{ij}, Z_j)\, Y^{l}(\hat{\mathbf r}_{ij})

(:class:`mace_lr.nn.NeighbourHarmonics`, Bessel radial weights with the base's smooth
cutoff). The harmonics matter where the base has no l = 2 features (max_L 1): a site with a
mirror plane and a two-fold axis, like the carbon of a terminal CH₂, has all its vectors on
the axis, so without them nothing of that carbon (nor 1o ⊗ 1o of its vectors) carries the
orientation of its H–C–H plane, which then reaches the block only weakly through the
hydrogens' in-plane vectors; with them the carbon's l = 2 charges carry it, and V² at a far
CH₂ couples to them (a cumulene's torsion beyond the receptive field).

Every component q^{lm}_{ic} is treated as a scalar charge distribution of Gaussians of
width σ, and its potential

.. math:: V^{lm}_{ic} = \frac{1}{k_e}\,\phi\big[q^{lm}_{\cdot c}\big]_i
          = \sum_{j,\mathbf n}{}' q^{lm}_{jc}\,
            \frac{\operatorname{erf}(|\mathbf r_j + \mathbf n - \mathbf r_i|/\sqrt2\sigma)}
                 {|\mathbf r_j + \mathbf n - \mathbf r_i|}   \quad (e/Å)

comes from the engine (Ewald/P3M for periodic cells, exact pair sum for open boundaries,
slab correction for ``pbc=[T,T,F]``). All C·(l_max+1)² components go through
:func:`mace_lr.electrostatics.coulomb_potential_batch` as one multi-channel charge array,
in one call for the whole batch. Because the kernel is a scalar function of distance, a
rotation R of the structure maps V^{l} to D^{l}(R) V^{l}: the potentials carry the irreps
of the charges (1o charges give a 1o potential, 2e give 2e; inversion leaves the kernel
unchanged, so parities are kept).

A fully connected tensor product of the atom's own equivariant state h with its potentials
forms the long-range message, h ← h + (h ⊗ V)_w (weights w per path and channel triple);
``num_updates`` such updates are made, each with new charges from the updated state. An
invariant MLP of the final scalars gives per-atom energies, summed per graph. Its last
layer starts at zero, so the block energy is exactly zero at initialisation (the energy is
linear in that layer, so, unlike a quadratic Coulomb energy, training does not start at a
saddle point).

Total charge. The l = 0 channels are corrected per graph to sum to the total charge Q
(``total_charge``), ``q_ic ← q_ic − ⟨q_c⟩_g + Q_g / N_g``: without it the block would see a
charged and a neutral structure with the same geometry alike; the potential of the spread
charge Q tells every atom about Q, and the tensor-product weights learn how much of it to
use (a learned multiple a_c Q per channel would do no more, and its a_c would get no
gradient from neutral data). In periodic cells a channel with net charge gets the engine's
neutralising background. The l ≥ 1 components are not charges and are left as they are.

The spherical charges are latent (their scale and sign are arbitrary and the energy is not
their Coulomb energy), so the block returns no ``charges``; the extras are
``lorem_spherical_charges`` and ``lorem_potentials`` of the last update [N, C·(l_max+1)²]
(e3nn irreps order) and ``lorem_node_energies`` [N] eV.
"""

import logging
from typing import Any, Dict, Sequence

import mace  # noqa: F401  (mace sets an environment variable e3nn needs)
import torch
from e3nn import o3

from mace_lr import LongRangeBlock
from mace_lr.electrostatics import COULOMB_CONSTANT, coulomb_potential_batch
from mace_lr.nn import NeighbourHarmonics, graph_sum

logger = logging.getLogger(__name__)

_PARITY = {0: "e", 1: "o", 2: "e"}  # parity (-1)^l: true scalars, vectors, rank-2 tensors


def spherical_irreps(channels: int, l_max: int) -> o3.Irreps:
    """``channels × (0e + 1o + 2e ...)`` up to ``l_max``."""
    return o3.Irreps("+".join(f"{channels}x{deg}{_PARITY[deg]}" for deg in range(l_max + 1)))


class LoremBlock(LongRangeBlock):
    """Long-range equivariant message block.

    Args:
        feature_irreps: irreps of the base model's ``node_feats``.
        atomic_numbers: elements of the base model.
        r_max: base-model cutoff, Å.
        l_max: highest degree of the spherical charges, 0, 1 or 2 (default 1).
        channels: number of charge channels C per (l, m), also the width of the state
            (default 8).
        num_updates: number of long-range message updates (default 1).
        smearing: Gaussian width σ of the charges, Å (default 1.0).
        hidden: width of the energy readout's hidden layer (default 32).
        accuracy: relative accuracy of periodic sums (default 1e-3).
        method: ``"auto"``, ``"ewald"`` or ``"p3m"``.
        local_harmonics: add the block's own local harmonics of the base graph's bonds,
            ``Σ_j R_cl(r_ij, Z_j) Y^l(r̂_ij)`` for l ≤ ``l_max``, to the initial state
            (default True; False gives the state of the base features alone).
        num_basis: Bessel functions of their radial weights (default 8).
    """

    name = "lorem"
    required_inputs = ("total_charge",)
    use_square: torch.jit.Final[bool]
    use_harmonics: torch.jit.Final[bool]

    def __init__(
        self,
        feature_irreps: str,
        atomic_numbers: Sequence[int],
        r_max: float,
        l_max: int = 1,
        channels: int = 8,
        num_updates: int = 1,
        smearing: float = 1.0,
        hidden: int = 32,
        accuracy: float = 1e-3,
        method: str = "auto",
        local_harmonics: bool = True,
        num_basis: int = 8,
        **config: Any,
    ) -> None:
        if config:
            raise TypeError(f"unknown lorem option(s): {', '.join(sorted(config))}")
        if int(l_max) not in (0, 1, 2):
            raise ValueError(f"lorem `l_max` must be 0, 1 or 2, got {l_max}")
        if int(channels) < 1 or int(num_updates) < 1 or int(hidden) < 1 or int(num_basis) < 1:
            raise ValueError(
                f"lorem `channels`, `num_updates`, `hidden` and `num_basis` must be >= 1, got "
                f"{channels}, {num_updates}, {hidden}, {num_basis}"
            )
        if smearing <= 0:
            raise ValueError(f"lorem `smearing` must be > 0 Å, got {smearing}")
        super().__init__(
            feature_irreps,
            atomic_numbers,
            r_max,
            l_max=int(l_max),
            channels=int(channels),
            num_updates=int(num_updates),
            smearing=float(smearing),
            hidden=int(hidden),
            accuracy=float(accuracy),
            method=str(method),
            local_harmonics=bool(local_harmonics),
            num_basis=int(num_basis),
        )
        self.l_max = int(l_max)
        self.channels = int(channels)
        self.num_updates = int(num_updates)
        self.smearing = float(smearing)
        self.accuracy = float(accuracy)
        self.method = str(method)
        irreps_in = o3.Irreps(feature_irreps).simplify()
        if not any(ir.l == 0 and ir.p == 1 for _, ir in irreps_in):
            raise ValueError(f"feature irreps {feature_irreps!r} have no invariant (0e) channels")
        self.irreps_in = str(o3.Irreps(feature_irreps))
        state = spherical_irreps(self.channels, self.l_max)
        self.state_irreps = str(state)
        self.embed = o3.Linear(self.irreps_in, state)
        # local harmonics of the bonds: l = 2 geometry (bond planes) the base features may lack
        self.use_harmonics = bool(local_harmonics)
        if self.use_harmonics:
            self.harmonics = NeighbourHarmonics(
                len(atomic_numbers), self.channels, self.l_max, r_max, int(num_basis)
            )
        else:
            self.harmonics = torch.nn.Identity()
        # rank-2 (2e) state from the vectors of the base model, which usually has none
        self.use_square = self.l_max >= 2 and any(ir.l == 1 and ir.p == -1 for _, ir in irreps_in)
        if self.use_square:
            vec = o3.Irreps(f"{self.channels}x1o")
            self.vec_a = o3.Linear(self.irreps_in, vec)
            self.vec_b = o3.Linear(self.irreps_in, vec)
            self.square = o3.ElementwiseTensorProduct(vec, vec, ["2e"])
        else:  # placeholders (TorchScript drops the branch that uses them: use_square is Final)
            self.vec_a = torch.nn.Identity()
            self.vec_b = torch.nn.Identity()
            self.square = torch.nn.Identity()
        self.charge_maps = torch.nn.ModuleList([o3.Linear(state, state) for _ in range(self.num_updates)])
        self.messages = torch.nn.ModuleList(
            [o3.FullyConnectedTensorProduct(state, state, state) for _ in range(self.num_updates)]
        )
        self.readout_hidden = torch.nn.Linear(self.channels, int(hidden))
        self.readout_out = torch.nn.Linear(int(hidden), 1)
        torch.nn.init.zeros_(self.readout_out.weight)
        torch.nn.init.zeros_(self.readout_out.bias)

    @torch.jit.ignore
    def spherical_potentials(
        self,
        positions: torch.Tensor,
        charges: torch.Tensor,
        cell: torch.Tensor,
        pbc: torch.Tensor,
        ptr: torch.Tensor,
    ) -> torch.Tensor:
        """Potentials V [n_atoms, K] e/Å of spherical charges [n_atoms, K] e.

        All K = C·(l_max+1)² components in one engine call for the whole batch (runs in
        Python under TorchScript).
        """
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
        return phi / COULOMB_CONSTANT

    def initial_state(self, ctx: Dict[str, torch.Tensor]) -> torch.Tensor:
        """State h⁰ [n_atoms, dim state] from the base features and local harmonics (e3nn order)."""
        node_feats = ctx["node_feats"].to(ctx["positions"].dtype)
        h = self.embed(node_feats)
        if self.use_harmonics:
            h = h + self.harmonics(ctx)
        if self.use_square:
            h2 = self.square(self.vec_a(node_feats), self.vec_b(node_feats))
            c = self.channels
            h = torch.cat([h[:, : 4 * c], h[:, 4 * c :] + h2], dim=1)
        return h

    def condition_charges(
        self,
        q: torch.Tensor,
        batch: torch.Tensor,
        ptr: torch.Tensor,
        total_charge: torch.Tensor,
    ) -> torch.Tensor:
        """Charges [n_atoms, K] whose l = 0 channels sum to Q per graph (l ≥ 1 unchanged)."""
        c = self.channels
        num_graphs = ptr.shape[0] - 1
        counts = (ptr[1:] - ptr[:-1]).to(q.dtype).clamp(min=1.0)
        q0 = q[:, :c]
        mean = graph_sum(q0, batch, num_graphs) / counts[:, None]
        target = total_charge.to(q.dtype) / counts
        q0 = q0 - mean[batch] + target[batch][:, None]
        return torch.cat([q0, q[:, c:]], dim=1)

    def forward(self, ctx: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        positions = ctx["positions"]
        batch = ctx["batch"]
        ptr = ctx["ptr"]
        num_graphs = ptr.shape[0] - 1
        h = self.initial_state(ctx)
        q = torch.zeros_like(h)
        v = torch.zeros_like(h)
        for charge_map, message in zip(self.charge_maps, self.messages):
            q = self.condition_charges(charge_map(h), batch, ptr, ctx["total_charge"])
            v = self.spherical_potentials(positions, q, ctx["cell"], ctx["pbc"], ptr)
            h = h + message(h, v)
        scalars = h[:, : self.channels]
        node_energy = self.readout_out(torch.nn.functional.silu(self.readout_hidden(scalars))).squeeze(-1)
        return {
            "energy": graph_sum(node_energy, batch, num_graphs),
            "node_energies": node_energy,
            "spherical_charges": q,
            "potentials": v,
        }
