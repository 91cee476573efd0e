"""From ``ase.Atoms`` to a mace batch with the long-range inputs (private module).

Inputs read from ``atoms.info``: ``charge`` (total charge, e), ``spin`` (multiplicity) and
``external_field`` (3-vector, V/Å), ``electrode_potential`` (V, electrode 1 minus
electrode 2); from ``atoms.arrays``: ``electrode`` (0 for ordinary atoms, 1 or 2 for
electrode atoms). A key some block requires but the structure lacks is
an error naming the key, never a silent neutral default.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence

import mace  # noqa: F401
import numpy as np
import torch
from mace import data as mace_data
from mace.tools import torch_geometric
from mace.tools.utils import AtomicNumberTable

logger = logging.getLogger(__name__)

#: atoms.info key → mace data key
INFO_KEYS = {"charge": "total_charge", "spin": "total_spin", "external_field": "external_field"}
#: mace data key → atoms.info key
_DATA_TO_INFO = {data_key: info_key for info_key, data_key in INFO_KEYS.items()}


def _check_atoms(atoms, z_table: Sequence[int], index: int) -> None:
    unknown = sorted(set(int(z) for z in atoms.numbers) - set(int(z) for z in z_table))
    if unknown:
        from ase.data import chemical_symbols

        names = ", ".join(f"{chemical_symbols[z]} (Z={z})" for z in unknown)
        known = ", ".join(chemical_symbols[z] for z in z_table)
        raise ValueError(
            f"structure {index} contains element(s) {names} the model does not know; it knows {known}"
        )
    pbc = atoms.get_pbc()
    if pbc.any():
        cell = np.asarray(atoms.get_cell())
        if tuple(pbc) == (True, True, True) and abs(np.linalg.det(cell)) < 1e-6:
            raise ValueError(
                f"structure {index} is periodic (pbc={pbc.tolist()}) but its cell has zero volume"
            )
        if tuple(pbc) not in ((True, True, True), (True, True, False)):
            raise ValueError(
                f"structure {index} has pbc={pbc.tolist()}; supported are fully periodic, "
                "open, and slabs with pbc=[True, True, False]"
            )
    field = atoms.info.get("external_field")
    if field is not None and np.asarray(field, dtype=float).shape != (3,):
        raise ValueError(
            f"structure {index}: atoms.info['external_field'] must be a 3-vector in V/Å, "
            f"got shape {np.asarray(field).shape}"
        )


def atoms_to_batch(
    atoms_list: Sequence,
    z_table: Sequence[int],
    r_max: float,
    heads: Optional[List[str]] = None,
    required: Sequence[str] = (),
    external_field: Optional[Sequence[float]] = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> Dict[str, torch.Tensor]:
    """Collate structures into one batch dictionary.

    Args:
        atoms_list: structures.
        z_table: atomic numbers of the model, in its one-hot order.
        r_max: neighbour-list cutoff, Å.
        heads: model heads (the first is used unless ``atoms.info['head']`` says otherwise).
        required: mace data keys some block needs (e.g. ``"total_charge"``).
        external_field: field in V/Å applied to every structure without its own
            ``atoms.info['external_field']``.
        dtype: floating dtype of the batch.
        device: where to put it.
    """
    heads = list(heads) if heads else ["Default"]
    z_table = [int(z) for z in z_table]
    r_max = float(r_max)
    keyspec = mace_data.KeySpecification(info_keys=dict(_DATA_TO_INFO), arrays_keys={})
    table = AtomicNumberTable(z_table)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        data_list = []
        for index, atoms in enumerate(atoms_list):
            _check_atoms(atoms, z_table, index)
            for key in required:
                info_key = _DATA_TO_INFO.get(key, key)
                if info_key not in atoms.info:
                    raise KeyError(
                        f"structure {index} has no atoms.info[{info_key!r}] ({key}), which a block "
                        "of this model requires; set it explicitly (e.g. 0 for a neutral system)"
                    )
            if external_field is not None and "external_field" not in atoms.info:
                atoms = atoms.copy()  # never write into the caller's Atoms
                atoms.info["external_field"] = np.asarray(external_field, dtype=float)
            config = mace_data.config_from_atoms(
                atoms, key_specification=keyspec, head_name=atoms.info.get("head", heads[0])
            )
            data_list.append(
                mace_data.AtomicData.from_config(config, z_table=table, cutoff=r_max, heads=heads)
            )
        batch = torch_geometric.batch.Batch.from_data_list(data_list)
    finally:
        torch.set_default_dtype(previous)
    out = batch.to_dict()
    result: Dict[str, torch.Tensor] = {}
    for key, value in out.items():
        if isinstance(value, torch.Tensor):
            result[key] = value.to(device)
    num_graphs = len(atoms_list)
    # mace replaces the lattice vector of a non-periodic direction by a large fake one;
    # use the structure's own cell so that the stress volume is the one ASE reports
    # (the unit shifts along non-periodic directions are zero, so the graph is unchanged)
    cells = np.stack([np.asarray(atoms.get_cell()) for atoms in atoms_list]).reshape(-1, 3)
    result["cell"] = torch.as_tensor(cells, dtype=dtype, device=device)
    if "pbc" in result:
        result["pbc"] = result["pbc"].view(num_graphs, 3)
    if "external_field" in result:
        result["external_field"] = result["external_field"].view(num_graphs, 3)
    if any("electrode" in atoms.arrays for atoms in atoms_list):
        tags = []
        for index, atoms in enumerate(atoms_list):
            tag = np.asarray(atoms.arrays.get("electrode", np.zeros(len(atoms))), dtype=np.int64)
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
            tags.append(tag)
        result["electrode"] = torch.as_tensor(np.concatenate(tags), device=device)
        potentials = [float(atoms.info.get("electrode_potential", 0.0)) for atoms in atoms_list]
        result["electrode_potential"] = torch.tensor(potentials, dtype=dtype, device=device)
    return result
