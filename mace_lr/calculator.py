"""ASE calculator for mace-lr models."""

from __future__ import annotations

import copy
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from ._data import atoms_to_batch
from ._io import load
from ._keys import INFO_CHARGE, INFO_EXTERNAL_FIELD, INFO_HEAD, INFO_SPIN
from ._model import LongRangeMACE
from ._outputs import PER_ATOM, Output

logger = logging.getLogger(__name__)

#: Properties computed on every call.
_BASIC = [
    "energy",
    "free_energy",
    "forces",
    "stress",
    "charges",
    "dipole",
    "polarization",
    "lr_energy",
]
#: Properties that need second derivatives; computed only when asked for.
_RESPONSE = ["born_effective_charges", "polarizability"]
#: atoms.info keys whose change invalidates the results.
_INFO_KEYS = (INFO_CHARGE, INFO_SPIN, INFO_EXTERNAL_FIELD, INFO_HEAD)


class MACELRCalculator(Calculator):
    """ASE calculator for a MACE model with long-range blocks.

    Follows mace's ``MACECalculator`` conventions. Reads ``atoms.info["charge"]`` (total
    charge, e), ``atoms.info["spin"]`` and ``atoms.info["external_field"]`` (V/Å; the
    ``external_field`` argument applies to structures that do not set their own), and the
    inputs the blocks declare (:attr:`mace_lr.LongRangeBlock.inputs`), e.g. the per-atom
    ``atoms.arrays["formal_charges"]`` of LES with ``charge_groups="fragments"``; a change of
    any of them, like a change of the positions, invalidates the results.

    Results (ASE names and units): ``energy`` eV, ``forces`` eV/Å, ``stress`` (Voigt,
    eV/Å³, periodic cells), ``charges`` e, ``dipole`` e·Å, ``polarization`` e/Å²
    (periodic; on the branch of the positions as given), ``born_effective_charges``
    [N, 3, 3] e with ``Z[i, α, β] = ∂F_iβ/∂E_α``, ``polarizability`` [3, 3] e·Å²/V,
    every output the model's blocks declare under its declared name (e.g.
    ``wannier_centroids`` [N, 3] Å, NaN rows for atoms without one; see
    :attr:`mace_lr.LongRangeBlock.outputs`), and ``lr_energy`` (the blocks' share) plus
    ``<block>_energy`` extras.

    Args:
        model_paths: path of a model saved by :func:`mace_lr.save` (or a one-element list),
            or a :class:`~mace_lr.LongRangeMACE` instance.
        device: ``"cpu"``, ``"cuda"``, ...
        default_dtype: ``"float64"`` (default) or ``"float32"``.
        external_field: field in V/Å for structures without ``atoms.info["external_field"]``.
        allow_pickle: allow loading pickled model files (runs code from the file).
    """

    def __init__(
        self,
        model_paths: Union[str, Sequence[str], LongRangeMACE],
        device: str = "cpu",
        default_dtype: str = "float64",
        external_field: Optional[Sequence[float]] = None,
        allow_pickle: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        # own list: never extend the class attribute shared by every ASE calculator
        self.implemented_properties: List[str] = list(_BASIC) + list(_RESPONSE)
        if default_dtype not in ("float32", "float64"):
            raise ValueError(f"default_dtype must be 'float32' or 'float64', got {default_dtype!r}")
        self.dtype = getattr(torch, default_dtype)
        self.device = torch.device(device)
        if isinstance(model_paths, LongRangeMACE):
            # never change the caller's model (dtype, eval mode, requires_grad)
            model = copy.deepcopy(model_paths)
        else:
            single = isinstance(model_paths, (str, os.PathLike))
            paths = [model_paths] if single else list(model_paths)
            if len(paths) != 1:
                raise ValueError(f"MACELRCalculator takes one model file, got {len(paths)}: {paths}")
            model = load(paths[0], device=self.device, allow_pickle=allow_pickle)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        #: outputs the blocks declare, reported under their names
        self.declared_outputs = {
            name: output
            for name, output in self.model.declared_outputs.items()
            if name not in self.implemented_properties
        }
        self.implemented_properties += list(self.declared_outputs)
        self._inputs = self.model.declared_inputs
        #: atoms.info keys whose change invalidates the results (the per-structure inputs too)
        self._info_keys = _INFO_KEYS + tuple(i.source for i in self._inputs if i.per != PER_ATOM)
        #: atoms.arrays keys of the per-atom inputs (ASE compares only its own arrays)
        self._array_keys = tuple(i.source for i in self._inputs if i.per == PER_ATOM)
        for p in self.model.parameters():
            p.requires_grad_(False)
        if external_field is not None:
            field = np.asarray(external_field, dtype=float)
            if field.shape != (3,):
                raise ValueError(f"external_field must be a 3-vector in V/Å, got shape {field.shape}")
            external_field = field
        self.external_field = external_field
        self._info_cache: Dict[str, Any] = {}

    def _inputs_of(self, atoms) -> Dict[str, Any]:
        """The model inputs of ``atoms`` that ASE's own state check does not compare."""
        values = {"info:" + k: atoms.info.get(k) for k in self._info_keys}
        values.update({"arrays:" + k: atoms.arrays.get(k) for k in self._array_keys})
        return values

    def check_state(self, atoms, tol: float = 1e-15):
        changes = super().check_state(atoms, tol)
        info = self._inputs_of(atoms)
        if self.atoms is not None and not _same_info(info, self._info_cache):
            changes.append("info")
        return changes

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        properties = properties or ["energy"]
        if "info" in system_changes:
            system_changes = [c for c in system_changes if c != "info"]
        Calculator.calculate(self, atoms, properties, system_changes)
        self._info_cache = {k: _copy(v) for k, v in self._inputs_of(self.atoms).items()}
        atoms = self.atoms
        pbc = atoms.get_pbc()
        batch = atoms_to_batch(
            [atoms],
            self.model.atomic_numbers,
            self.model.r_max,
            heads=self.model.heads,
            required=self.model.required_inputs,
            inputs=self._inputs,
            external_field=self.external_field,
            dtype=self.dtype,
            device=self.device,
        )
        want_bec = "born_effective_charges" in properties
        want_pol = "polarizability" in properties
        periodic_cell = bool(pbc.any()) and abs(np.linalg.det(atoms.get_cell())) > 1e-9
        out = self.model(
            batch,
            training=False,
            compute_force=True,
            compute_stress=periodic_cell,
            compute_dipole=True,
            compute_born_charges=want_bec,
            compute_polarizability=want_pol,
        )
        res: Dict[str, Any] = {}
        res["energy"] = float(out["energy"].detach()[0])
        res["free_energy"] = res["energy"]
        res["lr_energy"] = float(out["lr_energy"].detach()[0])
        res["forces"] = out["forces"].detach().cpu().numpy()
        if periodic_cell and out["stress"] is not None:
            res["stress"] = full_3x3_to_voigt_6_stress(out["stress"].detach().cpu().numpy()[0])
        dipole = out["dipole"].detach().cpu().numpy()[0]
        res["dipole"] = dipole
        if tuple(pbc) == (True, True, True):
            res["polarization"] = dipole / abs(atoms.get_volume())
        if want_bec:
            res["born_effective_charges"] = out["born_effective_charges"].detach().cpu().numpy()
        if want_pol:
            res["polarizability"] = out["polarizability"].detach().cpu().numpy()[0]
        res.update(declared_results(out, self.model.declared_outputs))
        for key, value in out.items():
            if (
                key.endswith("_energy")
                and key not in ("lr_energy", "base_energy", "node_energy")
                and value is not None
            ):
                res[key] = float(value.detach()[0])
        self.results = res


def declared_results(out: Dict[str, Any], declared: Dict[str, Output]) -> Dict[str, Any]:
    """The ``declared`` outputs (name → :class:`~mace_lr.Output`) of a model output ``out``,
    as numpy values for one structure.

    Per-atom outputs are arrays [n_atoms, *shape] (NaN rows for atoms outside the output's
    mask); per-structure outputs are floats (scalars) or arrays [*shape].
    """
    res: Dict[str, Any] = {}
    for name, output in declared.items():
        value = out.get(name)
        if value is None:
            continue
        value = value.detach().cpu().numpy()
        if output.per == PER_ATOM:
            if output.mask_output is not None and out.get(output.mask_output) is not None:
                value = value.copy() if value.dtype.kind == "f" else value.astype(float)
                value[~out[output.mask_output].detach().cpu().numpy().astype(bool)] = np.nan
            res[name] = value
        else:
            res[name] = float(value[0]) if value[0].ndim == 0 else value[0]
    return res


def _copy(value):
    return np.array(value, copy=True) if isinstance(value, (np.ndarray, list, tuple)) else value


def _same_info(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    for key in set(a) | set(b):
        x, y = a.get(key), b.get(key)
        if (x is None) != (y is None):
            return False
        if x is not None and not np.array_equal(np.asarray(x), np.asarray(y)):
            return False
    return True
