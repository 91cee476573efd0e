"""From ``ase.Atoms`` to a mace batch with the long-range inputs (private module).

Inputs read from ``atoms.info``: ``charge`` (total charge, e), ``spin`` (multiplicity) and
``external_field`` (3-vector, V/Å), plus the inputs the blocks declare
(:class:`mace_lr.Input`, e.g. qeq's electrode labels). A key some block requires but the
structure lacks is an error naming the key, never a silent neutral default. The global
default dtype is never changed.
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

from ._keys import INFO_EXTERNAL_FIELD, INFO_HEAD, INFO_TO_DATA, POSITIONS
from ._outputs import PER_ATOM, Input

logger = logging.getLogger(__name__)

#: mace data key → atoms.info key
_DATA_TO_INFO = {data_key: info_key for info_key, data_key in INFO_TO_DATA.items()}


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
    inputs: Sequence[Input] = (),
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
        inputs: inputs the blocks declare (:class:`mace_lr.Input`), read from the
            structures that have them (the others get the input's default).
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
    data_list = []
    frames = []
    for index, atoms in enumerate(atoms_list):
        _check_atoms(atoms, z_table, index)
        for key in required:
            info_key = _DATA_TO_INFO.get(key, key)
            declared = next((item for item in inputs if item.key == key), None)
            per_atom = declared is not None and declared.per == PER_ATOM
            if per_atom and declared.source not in atoms.arrays:
                raise KeyError(
                    f"structure {index} has no atoms.arrays[{declared.source!r}] ({key}), which a block "
                    "of this model requires; set one value per atom (e.g. zeros for neutral molecules)"
                )
            if not per_atom and info_key not in atoms.info:
                raise KeyError(
                    f"structure {index} has no atoms.info[{info_key!r}] ({key}), which a block "
                    "of this model requires; set it explicitly (e.g. 0 for a neutral system)"
                )
        for item in inputs:
            if item.check is not None:
                item.check(atoms, index)
        if external_field is not None and INFO_EXTERNAL_FIELD not in atoms.info:
            atoms = atoms.copy()  # never write into the caller's Atoms
            atoms.info[INFO_EXTERNAL_FIELD] = np.asarray(external_field, dtype=float)
        frames.append(atoms)
        config = mace_data.config_from_atoms(
            atoms, key_specification=keyspec, head_name=atoms.info.get(INFO_HEAD, heads[0])
        )
        data_list.append(mace_data.AtomicData.from_config(config, z_table=table, cutoff=r_max, heads=heads))
    # mace builds its tensors in the default dtype; cast them, and read the float inputs
    # again from the structures so that no value passes through a narrower dtype
    batch = torch_geometric.batch.Batch.from_data_list(data_list)
    result: Dict[str, torch.Tensor] = {}
    for key, value in batch.to_dict().items():
        if isinstance(value, torch.Tensor):
            result[key] = (value.to(dtype) if value.is_floating_point() else value).to(device)
    positions = np.concatenate([np.asarray(atoms.positions, dtype=float) for atoms in frames])
    result[POSITIONS] = torch.as_tensor(positions, dtype=dtype, device=device)
    for info_key, key in INFO_TO_DATA.items():
        if key in result and any(info_key in atoms.info for atoms in frames):
            rows = result[key].detach().to(torch.float64).cpu().numpy().reshape(len(frames), -1)
            for g, atoms in enumerate(frames):
                if info_key in atoms.info:
                    rows[g] = np.asarray(atoms.info[info_key], dtype=float).reshape(-1)
            result[key] = torch.as_tensor(rows.reshape(result[key].shape), dtype=dtype, device=device)
    # the image shifts of the edges, Å, from the integer unit shifts and the full-precision cells
    edge_cells = torch.as_tensor(
        np.stack([np.asarray(atoms.get_cell()) for atoms in frames]), dtype=dtype, device=device
    )[result["batch"][result["edge_index"][0]]]
    result["shifts"] = torch.einsum("ei,eij->ej", result["unit_shifts"], edge_cells)
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
    for item in inputs:
        per_atom = item.per == PER_ATOM
        if not any(item.source in (atoms.arrays if per_atom else atoms.info) for atoms in atoms_list):
            continue
        kind = torch.int64 if item.dtype == "int64" else dtype
        if per_atom:
            values = np.concatenate(
                [np.asarray(a.arrays.get(item.source, np.full(len(a), item.default))) for a in atoms_list]
            )
        else:
            values = np.array([float(a.info.get(item.source, item.default)) for a in atoms_list])
        result[item.key] = torch.as_tensor(
            values.astype(np.int64) if kind == torch.int64 else values, dtype=kind, device=device
        )
    return result
