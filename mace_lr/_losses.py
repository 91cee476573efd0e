"""Loss terms on the long-range outputs and the field responses (private module).

Beside :mod:`mace_lr.response`, whose minimum-image maths the periodic terms use; the
training CLI adds :class:`LongRangeLoss` on top of mace's own loss.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ._geometry import cell_volume
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
              + w_q \langle (q_i - q_{i,\mathrm{ref}})^2 \rangle
              + w_W \langle |\mathbf W_i - \mathbf W_{i,\mathrm{ref}}|^2_\mathrm{min.\ image} \rangle

    Averages run over components (dipole, Z, α) or structures (P). For periodic structures
    the dipole (Ω P, e·Å) is compared at the minimum image modulo e·a_k along each periodic
    lattice vector (:func:`mace_lr.response.dipole_minimum_image`), and the polarization
    μ/Ω (e/Å²) modulo e·a_k/Ω (:func:`mace_lr.response.polarization_loss`), so a reference
    on another polarization branch costs nothing. Z (e) and α (e·Å²/V) are the model's
    ``born_effective_charges`` and ``polarizability`` (second derivatives of its energy).
    Under ``--distributed`` every average is over the whole global batch (mace's
    ``reduce_loss``, as for mace's own terms), so the averaged DDP gradient is that of one
    process holding all ranks' structures.

    Args:
        base_loss: mace's loss module.
        dipole_weight, charges_weight, born_charges_weight, polarizability_weight,
            polarization_weight: weights of the terms (0: off).
    """

    def __init__(
        self,
        base_loss: torch.nn.Module,
        dipole_weight: float = 0.0,
        charges_weight: float = 0.0,
        born_charges_weight: float = 0.0,
        polarizability_weight: float = 0.0,
        polarization_weight: float = 0.0,
        wannier_centroids_weight: float = 0.0,
    ):
        super().__init__()
        self.base_loss = base_loss
        self.dipole_weight = float(dipole_weight)
        self.charges_weight = float(charges_weight)
        self.born_charges_weight = float(born_charges_weight)
        self.polarizability_weight = float(polarizability_weight)
        self.polarization_weight = float(polarization_weight)
        self.wannier_centroids_weight = float(wannier_centroids_weight)

    @staticmethod
    def _predicted(pred, key: str, term: str) -> torch.Tensor:
        value = pred.get(key)
        if value is None:
            raise RuntimeError(f"a {term} loss was requested but the model returned no {key!r}")
        return value

    def forward(self, ref, pred, ddp: Optional[bool] = None) -> torch.Tensor:
        from mace.modules.loss import reduce_loss  # global mean under DDP, plain mean otherwise

        loss = (
            self.base_loss(ref=ref, pred=pred, ddp=ddp)
            if ddp is not None
            else self.base_loss(ref=ref, pred=pred)
        )
        cell = ref["cell"].view(-1, 3, 3)
        pbc = _batch_value(ref, "pbc")
        if self.dipole_weight > 0:
            dipole = self._predicted(pred, "dipole", "dipole")
            delta = dipole - ref["dipole"].view(-1, 3)
            # a periodic cell's dipole (Ω P) is defined modulo e·a_k: compare at the minimum image
            delta = dipole_minimum_image(delta, cell, pbc)
            loss = loss + self.dipole_weight * reduce_loss(delta**2, ddp)
        if self.born_charges_weight > 0:
            z = self._predicted(pred, "born_effective_charges", "Born-charge")
            loss = loss + self.born_charges_weight * reduce_loss(
                (z - ref["born_charges"].view(-1, 3, 3)) ** 2, ddp
            )
        if self.polarizability_weight > 0:
            alpha = self._predicted(pred, "polarizability", "polarizability")
            delta = alpha - ref["polarizability"].view(-1, 3, 3)
            loss = loss + self.polarizability_weight * reduce_loss(delta**2, ddp)
        if self.polarization_weight > 0:
            dipole = self._predicted(pred, "dipole", "polarization")
            volume = cell_volume(cell.to(dipole.dtype))
            if bool((volume <= 0).any()):
                raise RuntimeError("a polarization loss needs periodic cells with a volume")
            p_pred = dipole / volume[:, None]
            p_ref = ref["polarization"].view(-1, 3).to(dipole.dtype)
            # polarization_loss per structure, averaged over the global batch under DDP
            sq = (polarization_minimum_image(p_pred - p_ref, cell, pbc) ** 2).sum(-1)
            loss = loss + self.polarization_weight * reduce_loss(sq, ddp)
        if self.charges_weight > 0:
            loss = loss + self.charges_weight * reduce_loss((pred["charges"] - ref["charges"]) ** 2, ddp)
        if self.wannier_centroids_weight > 0:
            loss = loss + self.wannier_centroids_weight * self._centroid_loss(ref, pred, cell, pbc, ddp)
        return loss

    def _centroid_loss(self, ref, pred, cell, pbc, ddp: Optional[bool]) -> torch.Tensor:
        """Mean squared centroid error per component over atoms with a predicted and a
        reference centroid (global mean under DDP), periodic cells at the minimum image.
        """
        centroids = self._predicted(pred, "wannier_centroids", "Wannier-centroid")
        mask = pred["wannier_centroid_mask"].to(centroids.dtype) * ref["wannier_centroids_present"].view(-1)
        delta = centroids - ref["wannier_centroids"].view(-1, 3).to(centroids.dtype)
        batch = ref["batch"]
        flags = pbc.view(-1, 3) if pbc is not None else cell.detach().abs().sum(-1) > 0
        delta = centroid_minimum_image(delta, cell.to(delta.dtype)[batch], flags.view(-1, 3)[batch])
        total = (delta**2 * mask[:, None]).sum()
        count = 3.0 * mask.sum().detach()
        if ddp and torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank joins the reduction, also one whose batch has no centroid
            world = torch.distributed.get_world_size()
            count = count.clone()
            torch.distributed.all_reduce(count)
            return total * world / count.clamp(min=1.0)
        return total / count.clamp(min=1.0)

    def __repr__(self) -> str:
        terms = ", ".join(
            f"{name}={getattr(self, name)}"
            for name in (
                "dipole_weight",
                "charges_weight",
                "born_charges_weight",
                "polarizability_weight",
                "polarization_weight",
                "wannier_centroids_weight",
            )
            if getattr(self, name) > 0
        )
        return f"LongRangeLoss({self.base_loss!r}{', ' + terms if terms else ''})"
