"""Locality probe: how the charge of each atom responds to moving every other atom."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import torch

from .._data import atoms_to_batch
from .._model import LongRangeMACE
from .plots import _finish, _pyplot


def locality_probe(
    model: LongRangeMACE, atoms, atoms_indices: Optional[Sequence[int]] = None
) -> Dict[str, np.ndarray]:
    """Charge response ``‖∂q_i/∂R_k‖`` (e/Å) of chosen atoms i to the position of every atom k.

    Args:
        model: a :class:`~mace_lr.LongRangeMACE` with a block that returns ``charges``.
        atoms: one structure (``atoms.info["charge"]`` is used when present).
        atoms_indices: the atoms i whose charges are probed (default: all).

    Returns:
        ``distance`` [n_i, N] Å (minimum-image for periodic cells), ``response`` [n_i, N]
        e/Å (Frobenius norm of the 3-vector ``∂q_i/∂R_k``), ``charges`` [N] e and
        ``indices`` [n_i].
    """
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    batch = atoms_to_batch(
        [atoms],
        model.atomic_numbers,
        float(model.r_max),
        heads=model.heads,
        dtype=dtype,
        device=device,
    )
    positions = batch["positions"].detach().clone().requires_grad_(True)
    batch["positions"] = positions
    was_training = model.training
    model.eval()
    try:
        out = model(batch, compute_force=False)
    finally:
        model.train(was_training)
    charges = out.get("charges")
    if charges is None:
        raise ValueError("the model's blocks return no `charges`; the locality probe needs a charge block")
    n = len(atoms)
    indices = list(range(n)) if atoms_indices is None else [int(i) for i in atoms_indices]
    response = np.zeros((len(indices), n))
    for row, i in enumerate(indices):
        (grad,) = torch.autograd.grad(charges[i], positions, retain_graph=True, allow_unused=True)
        if grad is not None:
            response[row] = grad.detach().norm(dim=-1).cpu().numpy()
    distance = atoms.get_all_distances(mic=bool(atoms.pbc.any()))[indices]
    return {
        "distance": distance,
        "response": response,
        "charges": charges.detach().cpu().numpy(),
        "indices": np.asarray(indices),
    }


def plot_locality(probes: Dict[str, Dict[str, np.ndarray]], path, cutoff: Optional[float] = None) -> None:
    """Scatter ``‖∂q_i/∂R_k‖`` against distance for several models (log scale) into ``path``.

    Args:
        probes: label → output of :func:`locality_probe`.
        path: image file to write.
        cutoff: receptive field of the base model to mark (Å), e.g. interactions × r_max.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    floor = 1e-16
    for (label, probe), marker in zip(probes.items(), "os^vD"):
        d = probe["distance"].ravel()
        r = probe["response"].ravel()
        mask = d > 0
        shown = np.maximum(r[mask], floor)
        ax.scatter(d[mask], shown, s=14, marker=marker, alpha=0.7, label=label)
    if cutoff is not None:
        ax.axvline(cutoff, color="k", ls="--", lw=1, label=f"receptive field {cutoff:g} Å")
    ax.set_yscale("log")
    _finish(
        fig,
        ax,
        "distance |R_i − R_k| (Å)",
        "‖∂q_i/∂R_k‖ (e/Å)  (exact zeros drawn at 1e-16)",
        "Locality probe: charge response to distant atoms",
        path,
    )
