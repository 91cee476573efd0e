"""Registry of long-range blocks: discovery by entry points, plus runtime registration.

Blocks are found in two places:

* **Entry points** of the group :data:`ENTRY_POINT_GROUP` (``"mace_lr.blocks"``) declared
  by installed distributions, e.g. in a plugin's ``pyproject.toml``::

      [project.entry-points."mace_lr.blocks"]
      my_block = "my_package.blocks:MyBlock"

  Discovery is lazy: :func:`available_blocks` reads package metadata only and never imports
  a block's module. The module is imported the first time :func:`get_block` asks for that
  name, and the class is cached.
* **Runtime registrations** made with :func:`register_block` (handy in notebooks and tests).
  They live in this module's own dictionaries only and take precedence over entry points
  when registered with ``overwrite=True``.

:func:`block_origin` reports which distribution (and version) provides a block, so that a
saved model can say which package is needed to load it again.
"""

from __future__ import annotations

import difflib
import logging
import threading
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Dict, Iterable, List, Optional, Tuple, Type

from mace_lr._block import LongRangeBlock

__all__ = [
    "ENTRY_POINT_GROUP",
    "BlockRegistryError",
    "UnknownBlockError",
    "BlockNameClashError",
    "BrokenBlockPluginError",
    "NotABlockError",
    "available_blocks",
    "get_block",
    "register_block",
    "unregister_block",
    "block_origin",
]

logger = logging.getLogger(__name__)

#: Entry-point group in which distributions register their blocks.
ENTRY_POINT_GROUP = "mace_lr.blocks"

_UNKNOWN_DISTRIBUTION = "<unknown distribution>"


class BlockRegistryError(Exception):
    """Base class of the errors raised by the block registry."""


class UnknownBlockError(BlockRegistryError, KeyError):
    """No block is registered under the requested name."""

    def __str__(self) -> str:
        # KeyError.__str__ would show the repr of the message (quotes, escaped newlines).
        return str(self.args[0]) if self.args else ""


class BlockNameClashError(BlockRegistryError, ValueError):
    """A block name is claimed twice (two distributions, or a refused runtime registration)."""


class BrokenBlockPluginError(BlockRegistryError, ImportError):
    """Loading a block's entry point raised; the original exception is chained."""


class NotABlockError(BlockRegistryError, TypeError):
    """A registered object is not a subclass of :class:`~mace_lr._block.LongRangeBlock`."""


@dataclass(frozen=True)
class _Candidate:
    """One entry point claiming a block name."""

    name: str
    target: str
    distribution: Optional[str]
    version: Optional[str]
    entry_point: EntryPoint

    def describe(self) -> str:
        dist = self.distribution if self.distribution is not None else _UNKNOWN_DISTRIBUTION
        version = f" {self.version}" if self.version else ""
        return f"distribution {dist!r}{version} -> {self.target!r}"


_LOCK = threading.RLock()
#: Runtime registrations: name -> class.
_RUNTIME: Dict[str, Type[LongRangeBlock]] = {}
#: Classes already loaded from entry points: (name, target) -> class.
_LOADED: Dict[Tuple[str, str], Type[LongRangeBlock]] = {}


def _iter_entry_points() -> Iterable[EntryPoint]:
    """Entry points of :data:`ENTRY_POINT_GROUP` (single source, patched by tests).

    Returns:
        The installed distributions' entry points of the group, unloaded.
    """
    return entry_points(group=ENTRY_POINT_GROUP)


def _distribution_of(ep: EntryPoint) -> Tuple[Optional[str], Optional[str]]:
    """Name and version of the distribution declaring ``ep`` (``None`` when unknown)."""
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None
    name: Optional[str]
    try:
        name = dist.metadata["Name"]
    except Exception:  # malformed metadata must not break listing
        name = None
    if not name:
        name = getattr(dist, "name", None)
    try:
        version = dist.version
    except Exception:
        version = None
    return (str(name) if name else None), (str(version) if version else None)


def _discover() -> Dict[str, List[_Candidate]]:
    """Read the entry points (without loading them) and group them by block name.

    Identical ``(name, target)`` pairs are collapsed, so a distribution that shows up twice
    (e.g. an editable install next to a site-packages copy) does not count as a clash.

    Returns:
        Mapping of block name to its distinct candidates, names and candidates sorted.
    """
    found: Dict[str, List[_Candidate]] = {}
    seen = set()
    for ep in _iter_entry_points():
        if getattr(ep, "group", ENTRY_POINT_GROUP) != ENTRY_POINT_GROUP:
            continue
        key = (ep.name, ep.value)
        if key in seen:
            continue
        seen.add(key)
        dist, version = _distribution_of(ep)
        found.setdefault(ep.name, []).append(
            _Candidate(name=ep.name, target=ep.value, distribution=dist, version=version, entry_point=ep)
        )
    return {
        name: sorted(cands, key=lambda c: (c.distribution or "", c.target))
        for name, cands in sorted(found.items())
    }


def _clash_message(name: str, candidates: List[_Candidate]) -> str:
    listing = "; ".join(c.describe() for c in candidates)
    return (
        f"Block name {name!r} is registered by more than one entry point in group "
        f"{ENTRY_POINT_GROUP!r}: {listing}. Uninstall one of these distributions, or choose "
        f"explicitly with mace_lr.registry.register_block({name!r}, cls, overwrite=True)."
    )


def _unknown_message(name: str, known: List[str]) -> str:
    msg = f"Unknown long-range block {name!r}."
    close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.6)
    if close:
        msg += " Did you mean " + " or ".join(repr(c) for c in close) + "?"
    if known:
        msg += " Available blocks: " + ", ".join(repr(k) for k in known) + "."
    else:
        msg += " No blocks are available."
    msg += (
        f" Blocks come from installed packages (entry-point group {ENTRY_POINT_GROUP!r}) or "
        "from mace_lr.registry.register_block()."
    )
    return msg


def _check_block_class(obj: Any, what: str) -> None:
    if not (isinstance(obj, type) and issubclass(obj, LongRangeBlock)):
        raise NotABlockError(
            f"{what} is {obj!r}, which is not a subclass of LongRangeBlock "
            f"({LongRangeBlock.__module__}.{LongRangeBlock.__qualname__})."
        )


def _check_class_name(name: str, cls: Type[LongRangeBlock]) -> None:
    if getattr(cls, "name", "") != name:
        logger.warning(
            "Block class %s.%s is registered as %r but its `name` attribute is %r; "
            "models saved with it may not reload under the right name.",
            cls.__module__,
            cls.__qualname__,
            name,
            getattr(cls, "name", ""),
        )


def available_blocks() -> List[str]:
    """Names of all known blocks, without importing any block module.

    A name claimed by several distributions is still listed (a warning is logged);
    requesting it with :func:`get_block` raises :class:`BlockNameClashError`.

    Returns:
        Sorted list of entry-point and runtime-registered block names.
    """
    discovered = _discover()
    with _LOCK:
        runtime = set(_RUNTIME)
    for name, cands in discovered.items():
        if len(cands) > 1 and name not in runtime:
            logger.warning("%s", _clash_message(name, cands))
    return sorted(set(discovered) | runtime)


def _single_candidate(name: str):
    """The one entry point registered under ``name`` (errors for unknown names and clashes)."""
    discovered = _discover()
    cands = discovered.get(name)
    if not cands:
        with _LOCK:
            known = sorted(set(discovered) | set(_RUNTIME))
        raise UnknownBlockError(_unknown_message(name, known))
    if len(cands) > 1:
        raise BlockNameClashError(_clash_message(name, cands))
    return cands[0]


def get_block(name: str) -> Type[LongRangeBlock]:
    """Return the block class registered under ``name``.

    Runtime registrations win; otherwise the entry point is loaded on first request and
    the class cached.

    Args:
        name: registry name of the block (e.g. ``"les"``).

    Returns:
        The :class:`~mace_lr._block.LongRangeBlock` subclass.

    Raises:
        UnknownBlockError: no block has this name (a :class:`KeyError`); the message lists
            the available blocks and close matches.
        BlockNameClashError: several distributions register different targets under it.
        BrokenBlockPluginError: importing the entry point's target raised.
        NotABlockError: the target is not a ``LongRangeBlock`` subclass (a
            :class:`TypeError`).
    """
    with _LOCK:
        if name in _RUNTIME:
            return _RUNTIME[name]
    cand = _single_candidate(name)
    key = (cand.name, cand.target)
    with _LOCK:
        if key in _LOADED:
            return _LOADED[key]
        dist = cand.distribution if cand.distribution is not None else _UNKNOWN_DISTRIBUTION
        version = f" {cand.version}" if cand.version else ""
        try:
            obj = cand.entry_point.load()
        except Exception as exc:
            raise BrokenBlockPluginError(
                f"Block {name!r} from distribution {dist!r}{version} could not be loaded: "
                f"entry point {name} = {cand.target!r} (group {ENTRY_POINT_GROUP!r}) raised "
                f"{type(exc).__name__}: {exc}. Reinstall or fix that package, or uninstall "
                "it if the block is not needed."
            ) from exc
        _check_block_class(
            obj,
            f"Entry point {name} = {cand.target!r} of distribution {dist!r}{version} (block {name!r})",
        )
        _check_class_name(name, obj)
        _LOADED[key] = obj
        return obj


def register_block(name: str, cls: Type[LongRangeBlock], *, overwrite: bool = False) -> None:
    """Register a block class at runtime (e.g. from a notebook).

    Only this module's registry is changed; nothing else global is touched.

    Args:
        name: registry name; should equal ``cls.name``.
        cls: a :class:`~mace_lr._block.LongRangeBlock` subclass.
        overwrite: allow replacing an existing runtime registration or shadowing an
            entry-point block of the same name.

    Raises:
        ValueError: ``name`` is not a non-empty string.
        NotABlockError: ``cls`` is not a ``LongRangeBlock`` subclass (a :class:`TypeError`).
        BlockNameClashError: the name is taken and ``overwrite`` is false (a
            :class:`ValueError`).
    """
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(
            f"Block name must be a non-empty string without surrounding whitespace, got {name!r}."
        )
    _check_block_class(cls, f"The class registered as block {name!r}")
    discovered = _discover()
    with _LOCK:
        if not overwrite:
            if name in _RUNTIME:
                old = _RUNTIME[name]
                raise BlockNameClashError(
                    f"Block name {name!r} is already registered at runtime by "
                    f"{old.__module__}:{old.__qualname__}; pass overwrite=True to replace it, "
                    "or call unregister_block() first."
                )
            if name in discovered:
                listing = "; ".join(c.describe() for c in discovered[name])
                raise BlockNameClashError(
                    f"Block name {name!r} is already provided by an installed package "
                    f"({listing}); pass overwrite=True to shadow it at runtime."
                )
        elif name in discovered and name not in _RUNTIME:
            logger.info(
                "Runtime block %s:%s shadows the entry-point block %r.",
                cls.__module__,
                cls.__qualname__,
                name,
            )
        _check_class_name(name, cls)
        _RUNTIME[name] = cls


def unregister_block(name: str) -> None:
    """Remove a runtime registration made with :func:`register_block`.

    An entry-point block that was shadowed becomes visible again.

    Args:
        name: the runtime-registered name.

    Raises:
        KeyError: ``name`` was not registered at runtime (entry-point blocks cannot be
            unregistered; uninstall their package instead).
    """
    with _LOCK:
        if name not in _RUNTIME:
            raise UnknownBlockError(
                f"Block {name!r} is not registered at runtime, so it cannot be unregistered "
                f"(runtime blocks: {sorted(_RUNTIME)!r}). Entry-point blocks are removed by "
                "uninstalling their package."
            )
        del _RUNTIME[name]


def block_origin(name: str) -> Dict[str, Optional[str]]:
    """Where a block comes from, for recording in saved models.

    Does not import the block's module for entry-point blocks.

    Args:
        name: registry name of the block.

    Returns:
        ``{"name", "distribution", "version", "target"}``. For entry-point blocks,
        ``distribution``/``version`` are those of the providing package and ``target`` is
        the entry point's ``module:attr``; runtime blocks give ``distribution`` and
        ``version`` ``None`` and ``target`` ``module:qualname``.

    Raises:
        UnknownBlockError: no block has this name.
        BlockNameClashError: several distributions register different targets under it.
    """
    with _LOCK:
        runtime = _RUNTIME.get(name)
    if runtime is not None:
        return {
            "name": name,
            "distribution": None,
            "version": None,
            "target": f"{runtime.__module__}:{runtime.__qualname__}",
        }
    cand = _single_candidate(name)
    return {
        "name": name,
        "distribution": cand.distribution,
        "version": cand.version,
        "target": cand.target,
    }
