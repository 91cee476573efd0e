"""Everything mace-lr knows about mace internals lives here (private).

A mace release that changes model attributes or config extraction touches this file
only.
"""

from __future__ import annotations

import importlib
from typing import Any, Dict, List

import mace  # noqa: F401  (must be imported before e3nn on torch 2.13)
import numpy as np
import torch
from e3nn import o3

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


def base_atomic_numbers(model: torch.nn.Module) -> List[int]:
    return [int(z) for z in model.atomic_numbers.tolist()]


def base_r_max(model: torch.nn.Module) -> float:
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


def export_base(model: torch.nn.Module) -> Dict[str, Any]:
    """Describe a MACE model as plain data (class name, constructor config, weights)."""
    from mace.tools.scripts_utils import extract_config_mace_model

    config = extract_config_mace_model(model)
    if "error" in config:
        raise ValueError(f"cannot extract the configuration of this MACE model: {config['error']}")
    cls = type(model)
    return {
        "class": f"{cls.__module__}:{cls.__qualname__}",
        "config": _encode(config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }


def import_base(spec: Dict[str, Any]) -> torch.nn.Module:
    """Rebuild a MACE model from :func:`export_base` output (allow-listed names only)."""
    cls = _decode({"__callable__": spec["class"]})
    config = _decode(spec["config"])
    for key in ("atomic_energies", "atomic_inter_scale", "atomic_inter_shift"):
        if isinstance(config.get(key), torch.Tensor):
            config[key] = config[key].numpy()
    dtype = getattr(torch, spec.get("dtype", "float64"))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = cls(**config)
    finally:
        torch.set_default_dtype(previous)
    model.load_state_dict(spec["state_dict"])
    return model.to(dtype)
