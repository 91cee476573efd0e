"""Loss terms on the long-range outputs and the field responses (private module).

Beside :mod:`mace_lr.response`, whose minimum-image maths the periodic terms use; the
training CLI adds :class:`LongRangeLoss` on top of mace's own loss.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from mace.modules.loss import reduce_loss  # global mean under DDP, plain mean otherwise

from ._geometry import cell_volume
from ._keys import (
    BATCH,
    BORN_CHARGES,
    BORN_EFFECTIVE_CHARGES,
    CELL,
    DIPOLE,
    PBC,
    POLARIZABILITY,
    POLARIZATION,
    PRESENT_SUFFIX,
)
from ._outputs import MSE_MINIMUM_IMAGE, PER_ATOM, Output, declared_targets
from .response import centroid_minimum_image, dipole_minimum_image, polarization_minimum_image


def _batch_value(batch: Any, key: str) -> Optional[torch.Tensor]:
    try:
        return batch[key]
    except (KeyError, AttributeError, TypeError):
        return None


class LongRangeLoss(torch.nn.Module):
    r"""mace's loss plus terms on the long-range blocks' outputs and the field responses.

    .. math:: L = L_\mathrm{mace} + w_\mu \langle|\mu - \mu_\mathrm{ref}|^2\rangle
              + w_Z \langle (Z_{i,ab} - Z_{i,ab}^\mathrm{ref})^2 \rangle
              + w_\alpha \langle (\alpha_{ab} - \alpha_{ab}^\mathrm{ref})^2 \rangle
              + w_P \langle |P - P_\mathrm{ref}|^2_\mathrm{min.\ image} \rangle
              + \sum_t w_t \langle |y_t - y_{t,\mathrm{ref}}|^2 \rangle

    Averages run over components (dipole, Z, α) or structures (P). For periodic structures
    the dipole (Ω P, e·Å) is compared at the minimum image modulo e·a_k along each periodic
    lattice vector (:func:`mace_lr.response.dipole_minimum_image`), and the polarization
    μ/Ω (e/Å²) modulo e·a_k/Ω (:func:`mace_lr.response.polarization_loss`), so a reference
    on another polarization branch costs nothing. Z (e) and α (e·Å²/V) are the model's
    ``born_effective_charges`` and ``polarizability`` (second derivatives of its energy).
    Under ``--distributed`` every average is over the whole global batch (mace's
    ``reduce_loss``, as for mace's own terms), so the averaged DDP gradient is that of one
    process holding all ranks' structures.

    The terms on outputs the blocks declare as training targets (:class:`mace_lr.Target`,
    e.g. ``charges`` of qeq, ``wannier_centroids`` of the wannier block) are mean squared
    errors per component over the atoms (structures) that have a prediction and a
    reference, positions in periodic cells at the minimum image when the target says so.

    Args:
        base_loss: mace's loss module.
        dipole_weight, born_charges_weight, polarizability_weight, polarization_weight:
            weights of the response terms (0: off).
        targets: ``{output name: (Output, providers)}`` of the declared targets (default:
            those of every available block, :func:`mace_lr._outputs.declared_targets`).
        **target_weights: ``<output name>_weight`` of declared targets (e.g.
            ``charges_weight``, ``wannier_centroids_weight``).
    """

    def __init__(
        self,
        base_loss: torch.nn.Module,
        dipole_weight: float = 0.0,
        born_charges_weight: float = 0.0,
        polarizability_weight: float = 0.0,
        polarization_weight: float = 0.0,
        targets: Optional[Dict[str, Tuple[Output, Sequence[str]]]] = None,
        **target_weights: float,
    ):
        super().__init__()
        self.base_loss = base_loss
        self.dipole_weight = float(dipole_weight)
        self.born_charges_weight = float(born_charges_weight)
        self.polarizability_weight = float(polarizability_weight)
        self.polarization_weight = float(polarization_weight)
        declared = declared_targets() if targets is None else targets
        #: output name → (declaration, weight) of the declared-target terms switched on
        self.target_terms: Dict[str, Tuple[Output, float]] = {}
        for flag, weight in target_weights.items():
            name = flag[: -len("_weight")] if flag.endswith("_weight") else flag
            if name not in declared:
                raise TypeError(
                    f"LongRangeLoss got {flag}={weight!r}, but no block declares a training target "
                    f"{name!r} (declared: {sorted(declared)})"
                )
            if float(weight) > 0:
                self.target_terms[name] = (declared[name][0], float(weight))

    @staticmethod
    def _predicted(pred, key: str, term: str) -> torch.Tensor:
        value = pred.get(key)
        if value is None:
            raise RuntimeError(f"a {term} loss was requested but the model returned no {key!r}")
        return value

    def forward(self, ref, pred, ddp: Optional[bool] = None) -> torch.Tensor:
        loss = (
            self.base_loss(ref=ref, pred=pred, ddp=ddp)
            if ddp is not None
            else self.base_loss(ref=ref, pred=pred)
        )
        cell = ref[CELL].view(-1, 3, 3)
        pbc = _batch_value(ref, PBC)
        if self.dipole_weight > 0:
            dipole = self._predicted(pred, DIPOLE, "dipole")
            delta = dipole - ref[DIPOLE].view(-1, 3)
            # a periodic cell's dipole (Ω P) is defined modulo e·a_k: compare at the minimum image
            delta = dipole_minimum_image(delta, cell, pbc)
            loss = loss + self.dipole_weight * reduce_loss(delta**2, ddp)
        if self.born_charges_weight > 0:
            z = self._predicted(pred, BORN_EFFECTIVE_CHARGES, "Born-charge")
            loss = loss + self.born_charges_weight * reduce_loss(
                (z - ref[BORN_CHARGES].view(-1, 3, 3)) ** 2, ddp
            )
        if self.polarizability_weight > 0:
            alpha = self._predicted(pred, POLARIZABILITY, "polarizability")
            delta = alpha - ref[POLARIZABILITY].view(-1, 3, 3)
            loss = loss + self.polarizability_weight * reduce_loss(delta**2, ddp)
        if self.polarization_weight > 0:
            dipole = self._predicted(pred, DIPOLE, "polarization")
            volume = cell_volume(cell.to(dipole.dtype))
            if bool((volume <= 0).any()):
                raise RuntimeError("a polarization loss needs periodic cells with a volume")
            p_pred = dipole / volume[:, None]
            p_ref = ref[POLARIZATION].view(-1, 3).to(dipole.dtype)
            # polarization_loss per structure, averaged over the global batch under DDP
            sq = (polarization_minimum_image(p_pred - p_ref, cell, pbc) ** 2).sum(-1)
            loss = loss + self.polarization_weight * reduce_loss(sq, ddp)
        for name, (output, weight) in self.target_terms.items():
            loss = loss + weight * self._declared_term(name, output, ref, pred, cell, pbc, ddp)
        return loss

    def _declared_term(self, name: str, output: Output, ref, pred, cell, pbc, ddp: Optional[bool]):
        """Mean squared error per component of a declared target over the atoms (structures)
        with a prediction and a reference (global mean under DDP).
        """
        value = self._predicted(pred, name, output.what)
        rows = (-1, *output.shape)
        delta = value - ref[name].view(rows).to(value.dtype)
        if output.target.loss == MSE_MINIMUM_IMAGE:
            flags = pbc.view(-1, 3) if pbc is not None else cell.detach().abs().sum(-1) > 0
            cells, flags = cell.to(delta.dtype), flags.view(-1, 3)
            if output.per == PER_ATOM:
                cells, flags = cells[ref[BATCH]], flags[ref[BATCH]]
            delta = centroid_minimum_image(delta, cells, flags)
        mask = None
        if output.mask_output is not None:
            mask = pred[output.mask_output].to(value.dtype)
        present = _batch_value(ref, name + PRESENT_SUFFIX)
        if present is not None:
            mask = present.view(-1) if mask is None else mask * present.view(-1)
        if mask is None:
            return reduce_loss(delta**2, ddp)
        total = (delta**2 * mask.view(-1, *([1] * len(output.shape)))).sum()
        count = float(math.prod(output.shape)) * mask.sum().detach()
        if ddp and torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank joins the reduction, also one whose batch has no reference
            world = torch.distributed.get_world_size()
            count = count.clone()
            torch.distributed.all_reduce(count)
            return total * world / count.clamp(min=1.0)
        return total / count.clamp(min=1.0)

    def __repr__(self) -> str:
        terms = [
            f"{name}={getattr(self, name)}"
            for name in (
                "dipole_weight",
                "born_charges_weight",
                "polarizability_weight",
                "polarization_weight",
            )
            if getattr(self, name) > 0
        ]
        terms = ", ".join(terms + [f"{name}_weight={w}" for name, (_, w) in self.target_terms.items()])
        return f"LongRangeLoss({self.base_loss!r}{', ' + terms if terms else ''})"
