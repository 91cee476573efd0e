"""Saving and loading mace-lr models (private module).

The file is a ``torch.save`` of plain data (strings, numbers, lists, dicts, tensors), so
:func:`load` reads it with ``torch.load(weights_only=True)``: no code is unpickled. The
base MACE model is stored as its class name, constructor configuration (classes and
functions by allow-listed qualified name) and weights; each block as its registry name,
the distribution and version that provided it, its config and its weights.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional, Union

import torch

from . import _mace_adapter as adapter
from ._model import LongRangeMACE

logger = logging.getLogger(__name__)

FORMAT = "mace-lr/1"


class MissingBlockError(RuntimeError):
    """A saved model needs a block that is not installed."""


def save(model: LongRangeMACE, path: Union[str, os.PathLike]) -> None:
    """Write ``model`` to ``path`` in the safe mace-lr format.

    Args:
        model: the model to save.
        path: destination file (conventionally ``*.model``).
    """
    from . import __version__
    from .registry import block_origin

    if not isinstance(model, LongRangeMACE):
        raise TypeError(f"mace_lr.save expects a LongRangeMACE, got {type(model).__name__}")
    blocks = []
    for name, block in model.blocks.items():
        origin = block_origin(name)
        blocks.append(
            {
                "name": name,
                "distribution": origin.get("distribution"),
                "version": origin.get("version"),
                "target": origin.get("target"),
                "config": block.to_config(),
                "state_dict": {k: v.detach().cpu() for k, v in block.state_dict().items()},
            }
        )
    payload = {
        "format": FORMAT,
        "mace_lr_version": __version__,
        "base": adapter.export_base(model.base),
        "blocks": blocks,
    }
    tmp = f"{os.fspath(path)}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load(
    path: Union[str, os.PathLike],
    device: Union[str, torch.device] = "cpu",
    default_dtype: Optional[str] = None,
    allow_pickle: bool = False,
) -> LongRangeMACE:
    """Load a model written by :func:`save`.

    Args:
        path: model file.
        device: where to place the model.
        default_dtype: ``"float32"`` or ``"float64"`` to convert; ``None`` keeps the saved one.
        allow_pickle: also accept pickled whole-module files (e.g. a ``LongRangeMACE``
            saved with ``torch.save``). This runs code from the file: only for files you trust.

    Returns:
        The model in eval mode.
    """
    from .registry import UnknownBlockError, get_block

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no model file at {path!r}")
    try:
        payload: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickled modules are refused by weights_only
        if not allow_pickle:
            raise ValueError(
                f"{path!r} is not a mace-lr model file readable without unpickling code "
                f"({type(exc).__name__}). If you trust it, pass allow_pickle=True."
            ) from exc
        payload = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(payload, LongRangeMACE):
        model = payload
    else:
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(f"{path!r} is not a {FORMAT} model file")
        base = adapter.import_base(payload["base"])
        dtype = next(base.parameters()).dtype
        blocks = {}
        for spec in payload["blocks"]:
            try:
                cls = get_block(spec["name"])
            except UnknownBlockError as exc:
                dist = spec.get("distribution") or "an unknown distribution"
                version = spec.get("version")
                need = f"{dist}=={version}" if version else dist
                raise MissingBlockError(
                    f"{path!r} needs block {spec['name']!r} from {need} "
                    f"(entry point {spec.get('target')}), which is not installed"
                ) from exc
            block = cls.from_config(spec["config"]).to(dtype)
            missing, unexpected = block.load_state_dict(spec["state_dict"], strict=False)
            if missing or unexpected:
                raise RuntimeError(
                    f"weights of block {spec['name']!r} in {path!r} do not match the installed "
                    f"version: missing {missing}, unexpected {unexpected}"
                )
            blocks[spec["name"]] = block
        model = LongRangeMACE(base, blocks)
    if default_dtype is not None:
        model = model.to(getattr(torch, default_dtype))
    return model.to(device).eval()
