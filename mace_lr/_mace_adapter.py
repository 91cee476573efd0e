"""Everything mace-lr knows about mace internals lives here (private).

A mace release that changes model attributes or config extraction touches this file
only.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import re
from typing import Any, Dict, Iterator, List

import mace  # noqa: F401  (must be imported before e3nn on torch 2.13)
import numpy as np
import torch
from e3nn import o3

logger = logging.getLogger(__name__)

#: Modules whose classes and functions a saved base-model config may name.
_ALLOWED_PREFIXES = ("mace.modules", "torch.nn.functional", "torch.nn.modules", "e3nn.")


def base_feature_irreps(model: torch.nn.Module) -> str:
    """Irreps of the ``node_feats`` output (concatenated product outputs of every layer)."""
    if not hasattr(model, "products"):
        raise TypeError(
            f"{type(model).__name__} is not a MACE model with interaction products; "
            "mace-lr needs a model whose forward returns `node_feats`"
        )
    irreps = o3.Irreps("")
    for product in model.products:
        irreps = irreps + o3.Irreps(str(product.linear.irreps_out))
    return str(irreps)


def _feature_indices(irreps: str, l: int, p: int) -> List[int]:  # noqa: E741
    """Column indices of the channels of irrep (l, p), in e3nn's [channel, m] layout."""
    idx: List[int] = []
    start = 0
    for mul, ir in o3.Irreps(irreps):
        width = mul * ir.dim
        if ir.l == l and ir.p == p:
            idx.extend(range(start, start + width))
        start += width
    return idx


def scalar_feature_indices(irreps: str) -> List[int]:
    """Column indices of the invariant (0e) channels in a feature vector with ``irreps``."""
    return _feature_indices(irreps, 0, 1)


def vector_feature_indices(irreps: str) -> List[int]:
    """Column indices of the vector (1o) channels, ordered [channel, xyz] (e3nn's layout)."""
    return _feature_indices(irreps, 1, -1)


def foundation_model_names() -> List[str]:
    """Names ``mace_run_train --foundation_model`` resolves itself (downloaded or cached)."""
    from mace.calculators import foundations_models as fm

    names = [str(n) for n in getattr(fm, "mace_mp_names", []) if n is not None]
    names += list(getattr(fm, "polar_model_names", []))
    names += ["small_off", "medium_off", "large_off", "mace_omol"]
    return sorted(set(names))


class UnsupportedMACEVersionError(ValueError):
    """A MACE model written by a mace-torch release the installed one cannot run."""


def _check_not_2022_format(model: torch.nn.Module) -> None:
    """Refuse models from mace-torch 0.1.0, which kept ``atomic_numbers``/``r_max`` as Python values.

    mace-torch registered both as tensor buffers in October 2022 (before 0.2.0); files pickled
    earlier hold a list and a float. Installed mace (whose own calculator calls
    ``r_max.item()``) cannot run them, so neither can mace-lr.
    """
    plain = [
        f"`{name}` as a {type(getattr(model, name, None)).__name__}"
        for name in ("atomic_numbers", "r_max")
        if hasattr(model, name) and not isinstance(getattr(model, name), torch.Tensor)
    ]
    if plain:
        raise UnsupportedMACEVersionError(
            f"this {type(model).__name__} stores {' and '.join(plain)} instead of a tensor buffer: it was "
            f"written by mace-torch 0.1.0 (before October 2022), which the installed mace-torch "
            f"{_mace_version()} cannot run. Convert it (build the same architecture with the installed "
            "mace-torch and load the old model's state dict into it) or retrain it"
        )


def _mace_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mace-torch")
    except PackageNotFoundError:  # pragma: no cover - mace imported from a source tree
        return getattr(mace, "__version__", "unknown")


def base_atomic_numbers(model: torch.nn.Module) -> List[int]:
    """Atomic numbers of a MACE model, in its one-hot order."""
    _check_not_2022_format(model)
    return [int(z) for z in model.atomic_numbers.tolist()]


def base_r_max(model: torch.nn.Module) -> float:
    """Cutoff radius of a MACE model, Å."""
    _check_not_2022_format(model)
    return float(model.r_max)


def base_heads(model: torch.nn.Module) -> List[str]:
    return list(getattr(model, "heads", ["Default"]))


def call_base(model: torch.nn.Module, data: Dict[str, torch.Tensor], training: bool) -> Dict[str, Any]:
    """Run the base model on already-strained data without letting it take derivatives."""
    return model(
        data,
        training=training,
        compute_force=False,
        compute_virials=False,
        compute_stress=False,
        compute_displacement=False,
    )


def _encode(value: Any) -> Any:
    if isinstance(value, o3.Irreps):
        return {"__irreps__": str(value)}
    if isinstance(value, type) or callable(value) and hasattr(value, "__qualname__"):
        name = f"{value.__module__}:{value.__qualname__}"
        return {"__callable__": name}
    if isinstance(value, np.ndarray):
        return torch.as_tensor(value)
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if "__irreps__" in value:
            return o3.Irreps(value["__irreps__"])
        if "__callable__" in value:
            module_name, qualname = value["__callable__"].split(":", 1)
            if not module_name.startswith(_ALLOWED_PREFIXES):
                raise ValueError(
                    f"refusing to import {value['__callable__']!r} from a model file: only "
                    f"names from {', '.join(_ALLOWED_PREFIXES)} are allowed"
                )
            obj: Any = importlib.import_module(module_name)
            for part in qualname.split("."):
                obj = getattr(obj, part)
            return obj
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


#: Attributes that the installed mace-torch sets on every ScaleShiftMACE and models pickled by
#: older releases lack, with the value that reproduces those models' behaviour.
#: ``extract_config_mace_model`` falls back to these values when an attribute is absent;
#: :func:`export_base` checks that it did.
ATTRIBUTES_ADDED_LATER: Dict[str, Any] = {
    "apply_cutoff": True,  # the radial cutoff envelope was always applied
    "edge_irreps": None,
    "use_reduced_cg": False,  # U matrices from the full Clebsch-Gordan basis (they are in the weights)
    "use_so3": False,
    "use_edge_irreps_first": False,
    "use_agnostic_product": False,  # element-dependent product weights
    "use_last_readout_only": False,  # energy summed over every layer's readout
}

#: Buffers of ``mace.modules.symmetric_contraction.Contraction`` added in mace-torch 0.3.14:
#: ``weights_{k}_zeroed`` (k < correlation - 1) and ``weights_max_zeroed``, boolean scalars
#: recording that the coupling matrix ``U_matrix_{k+1}`` (``U_matrix_{correlation}`` for
#: ``max``) is identically zero. mace computes them in the constructor from the U matrices and
#: reads them only when converting to/from cuequivariance; the forward pass never does, so
#: adding them changes no prediction.
ZEROED_BUFFER = re.compile(r"(^|\.)contractions\.\d+\.weights_(\d+|max)_zeroed$")


def _zeroed_flags_from(u_matrices: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The ``weights_*_zeroed`` buffers of a Contraction with buffers ``U_matrix_1..correlation``.

    Same rule as the installed mace's constructor: the flag of ``U_matrix_nu`` is
    ``weights_{nu-1}_zeroed`` below the correlation order, ``weights_max_zeroed`` at it.
    """
    correlation = len(u_matrices)
    flags = {}
    for nu in range(1, correlation + 1):
        u_matrix = u_matrices[f"U_matrix_{nu}"]
        name = f"weights_{nu - 1}_zeroed" if nu < correlation else "weights_max_zeroed"
        flags[name] = torch.tensor(
            not bool(torch.any(u_matrix != 0)), dtype=torch.bool, device=u_matrix.device
        )
    return flags


def missing_buffers(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Buffers the installed mace's version of ``model`` has and the (older) ``model`` lacks.

    Only the explicitly known ones (:data:`ZEROED_BUFFER`) are filled in, with the values the
    installed mace's constructor would give them.

    Returns:
        state-dict key → value; empty for a model written by the installed mace.
    """
    from mace.modules.symmetric_contraction import Contraction

    missing: Dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        if isinstance(module, Contraction):
            u_matrices = {n: b for n, b in module._buffers.items() if n.startswith("U_matrix_")}
            if len(u_matrices) != int(module.correlation):
                raise RuntimeError(
                    f"{prefix}: expected U matrices 1..{module.correlation}, got {sorted(u_matrices)}"
                )
            for name, value in _zeroed_flags_from(u_matrices).items():
                if name not in module._buffers:
                    missing[f"{prefix}.{name}" if prefix else name] = value
    return missing


def export_base(model: torch.nn.Module) -> Dict[str, Any]:
    """Describe a MACE model as plain data (class name, constructor config, weights).

    A model from an older mace-torch is exported in the installed format (``model`` itself is
    not modified): the buffers of :func:`missing_buffers` are added to its weights, and
    attributes it lacks take the values of :data:`ATTRIBUTES_ADDED_LATER`. Files from
    mace-torch 0.1.0 are refused with :class:`UnsupportedMACEVersionError`.
    """
    from mace.tools.scripts_utils import extract_config_mace_model

    _check_not_2022_format(model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    added = missing_buffers(model)
    state.update({k: v.cpu() for k, v in added.items()})
    if added:
        logger.info(
            "MACE model from mace-torch < 0.3.14 exported in the format of %s: %d `weights_*_zeroed` "
            "buffers added",
            _mace_version(),
            len(added),
        )
    config = extract_config_mace_model(model)
    if "error" in config:
        raise ValueError(f"cannot extract the configuration of this MACE model: {config['error']}")
    absent = [name for name in ATTRIBUTES_ADDED_LATER if not hasattr(model, name)]
    for name in absent:
        if config.get(name, ATTRIBUTES_ADDED_LATER[name]) != ATTRIBUTES_ADDED_LATER[name]:
            raise RuntimeError(  # a mace release changed a fallback: the rebuilt model would differ
                f"mace-torch {_mace_version()} fills the absent attribute `{name}` of an older MACE "
                f"model with {config.get(name)!r}, but models without it behave as {name}="
                f"{ATTRIBUTES_ADDED_LATER[name]!r}; mace_lr._mace_adapter needs an update"
            )
    if not hasattr(model, "heads"):
        config["heads"] = base_heads(model)  # the reloaded model keeps the head name used in memory
        absent.append("heads")
    if absent:
        logger.info("MACE model from an older mace-torch lacks %s: older behaviour kept", ", ".join(absent))
    cls = type(model)
    return {
        "class": f"{cls.__module__}:{cls.__qualname__}",
        "config": _encode(config),
        "state_dict": state,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }


@contextlib.contextmanager
def building_in(dtype: torch.dtype) -> Iterator[None]:
    """Build a MACE model in ``dtype``: the one place mace-lr switches the default dtype.

    e3nn computes its coupling coefficients in the default dtype when a model is built;
    building in float32 and casting would leave float32-accurate constants in a float64
    model (equivariance then holds to 1e-7 only). mace offers no dtype argument, so the
    default is switched for the construction alone and restored at once, also on errors.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def import_base(spec: Dict[str, Any]) -> torch.nn.Module:
    """Rebuild a MACE model from :func:`export_base` output (allow-listed names only)."""
    cls = _decode({"__callable__": spec["class"]})
    config = _decode(spec["config"])
    for key in ("atomic_energies", "atomic_inter_scale", "atomic_inter_shift"):
        if isinstance(config.get(key), torch.Tensor):
            config[key] = config[key].numpy()
    dtype = getattr(torch, spec.get("dtype", "float64"))
    with building_in(dtype):
        model = cls(**config)
    state = dict(spec["state_dict"])
    # files written by mace-lr before export_base upgraded old models lack the buffers of
    # ZEROED_BUFFER: compute them from the stored U matrices, as export_base does now
    filled = [k for k in model.state_dict() if k not in state and ZEROED_BUFFER.search(k)]
    for key in filled:
        prefix, _, name = key.rpartition(".")
        stored = {
            n: state[f"{prefix}.{n}"]
            for n in model.get_submodule(prefix)._buffers
            if n.startswith("U_matrix_")
        }
        state[key] = _zeroed_flags_from(stored)[name]
    if filled:
        logger.info(
            "model file with weights from mace-torch < 0.3.14: %d `weights_*_zeroed` buffers rebuilt",
            len(filled),
        )
    model.load_state_dict(state)  # strict: anything else missing or unexpected is an error
    return model.to(dtype)
