"""``mace_lr_run_train``: mace's ``mace_run_train`` plus long-range blocks.

Every ``mace_run_train`` flag keeps its meaning; the training loop, data pipeline,
checkpoints, EMA, SWA/stage two, LoRA, freezing and ``--distributed`` are mace's own.
mace-lr adds ``--lr_blocks`` and ``--lr_config`` and hooks three places of mace's run:

* model construction: the model mace builds is wrapped with :func:`mace_lr.augment`
  (identity at initialisation); when the foundation model is itself a mace-lr model its
  blocks and their weights are carried over;
* parameter groups: every block parameter is added to the optimiser (mace's groups only
  know its own modules — a silent trap upstream); ``--freeze`` and ``--lora`` act on the
  base model only, so the new blocks always train in full;
* the data and the loss: the applied field (``--external_field_key``) reaches the model,
  and terms on dipoles, Born effective charges, polarizabilities, polarizations (modulo
  the polarization quantum), Wannier centroids (at the minimum image) and, for blocks
  whose charges are partial charges (qeq), reference charges are added when their key or
  weight is given; the training forward pass then computes those field responses by
  autograd;
* ``--distributed`` on CPU: mace initialises a process group only for CUDA/XPU; mace-lr
  starts a ``gloo`` group and wraps the model in DDP without device ids, so the same
  ``torchrun`` command trains on CPU nodes (and is tested on two CPU ranks).

At the end the ``.model`` files mace wrote are rewritten in mace-lr's safe format, which
``mace_lr.load`` and ``MACELRCalculator`` read.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence
from unittest import mock

import mace  # noqa: F401  (before e3nn)
import torch

from mace_lr.electrostatics._kernels import cell_volume
from mace_lr.response import centroid_minimum_image, dipole_minimum_image, polarization_minimum_image

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """Mace's argument parser with the mace-lr options added."""
    from mace.tools import build_default_arg_parser

    parser = build_default_arg_parser()
    parser.prog = "mace_lr_run_train"
    group = parser.add_argument_group("long-range blocks (mace-lr)")
    group.add_argument(
        "--lr_blocks",
        type=str,
        default=None,
        help="long-range block(s) to attach, comma separated (e.g. 'les'); see mace_lr.available_blocks()",
    )
    group.add_argument(
        "--lr_config",
        type=str,
        default=None,
        help="YAML or JSON file (or inline JSON) with block options: {block: {option: value}}; "
        "with one block a flat {option: value} mapping is accepted",
    )
    group.add_argument(
        "--external_field_key",
        type=str,
        default="external_field",
        help="atoms.info key of the applied field (3-vector, V/Å); structures without it are at zero field",
    )
    group.add_argument(
        "--born_charges_key",
        type=str,
        default="REF_born_charges",
        help="atoms.arrays key of Born effective charges Z[i,a,b] = dF_ib/dE_a = dmu_a/dR_ib (e), "
        "9 columns per atom, row-major",
    )
    group.add_argument(
        "--born_charges_weight",
        type=float,
        default=0.0,
        help="weight of the Born effective charge loss (mean squared error per component, e^2)",
    )
    group.add_argument(
        "--polarization_key",
        type=str,
        default="REF_polarization",
        help="atoms.info key of the polarization of periodic structures (3-vector, e/Å^2), on any branch",
    )
    group.add_argument(
        "--polarization_weight",
        type=float,
        default=0.0,
        help="weight of the polarization loss, compared modulo the quantum e*a_k/Omega along each "
        "periodic lattice vector (minimum image); (e/Å^2)^-2",
    )
    group.add_argument(
        "--wannier_centroids_key",
        type=str,
        default="REF_wannier_centroids",
        help="atoms.arrays key of Wannier centroids (Å, [N, 3]: the centroid of each atom's Wannier "
        "centres; NaN rows for atoms without one), for blocks that predict centroids (wannier)",
    )
    group.add_argument(
        "--wannier_centroids_weight",
        type=float,
        default=0.0,
        help="weight of the Wannier-centroid loss (mean squared error per component over atoms "
        "with a centroid, Å^-2; periodic cells at the minimum image)",
    )
    group.add_argument(
        "--lr_charges_weight",
        type=float,
        default=0.0,
        help="weight of a loss on REF_charges (--charges_key); only for blocks whose charges may "
        "be fitted to a charge partition (qeq, as in 4G-HDNNPs; never LES latent charges)",
    )
    parser.epilog = (
        "mace-lr reads mace's --dipole_key/--dipole_weight and --polarizability_key/"
        "--polarizability_weight as losses on the model's dipole (e·Å; periodic cells modulo e·a_k) "
        "and polarizability -d2U/dE2 (e·Å²/V, 9 values per structure) when either flag of a pair is given."
    )
    return parser


def parse_block_config(lr_blocks: Optional[str], lr_config: Optional[str]) -> Dict[str, Dict[str, Any]]:
    """Turn ``--lr_blocks`` / ``--lr_config`` into ``{name: options}``."""
    names = [n.strip() for n in (lr_blocks or "").split(",") if n.strip()]
    config: Dict[str, Any] = {}
    if lr_config:
        if os.path.exists(lr_config):
            with open(lr_config, encoding="utf-8") as fh:
                text = fh.read()
            if lr_config.endswith((".yaml", ".yml")):
                import yaml

                config = yaml.safe_load(text) or {}
            else:
                config = json.loads(text)
        else:
            try:
                config = json.loads(lr_config)
            except json.JSONDecodeError as exc:
                raise ValueError(f"--lr_config {lr_config!r} is neither a file nor valid JSON") from exc
        if not isinstance(config, dict):
            raise ValueError(f"--lr_config must hold a mapping, got {type(config).__name__}")
    if config and names and not set(config) <= set(names):
        if len(names) == 1:  # a flat {option: value} mapping (values may be mappings too)
            config = {names[0]: config}
        else:
            extra = sorted(set(config) - set(names))
            raise ValueError(
                f"--lr_config has options for block(s) {extra} not listed in --lr_blocks {names}"
            )
    return {name: dict(config.get(name) or {}) for name in names}


def _read_foundation(path: str):
    """Return a mace-lr model if ``path`` is a mace-lr model file, else None."""
    if not path or not os.path.isfile(path):
        return None
    from mace_lr import load

    try:
        return load(path)  # refuses (ValueError) pickled MACE files and foreign formats
    except ValueError:
        return None


def _data_keys_and_elements(frames: Sequence[Any], info_keys: Sequence[str]) -> Dict[str, Any]:
    elements = sorted({int(z) for atoms in frames for z in atoms.numbers})
    missing = {
        key: sum(1 for atoms in frames if key not in atoms.info and key not in atoms.arrays)
        for key in info_keys
    }
    return {"n": len(frames), "elements": elements, "missing": missing}


def preflight(
    args: argparse.Namespace,
    weights: Dict[str, float],
    specs: Dict[str, Dict[str, Any]],
    foundation,
) -> None:
    """Fail at start, with a message naming the problem, instead of mid-run.

    ``weights`` are the run's loss terms (:func:`loss_weights`).
    """
    from ase.data import chemical_symbols

    from mace_lr.registry import get_block

    if args.foundation_model is not None and not os.path.isfile(args.foundation_model):
        from mace_lr._mace_adapter import foundation_model_names

        names = foundation_model_names()
        if args.foundation_model not in names:
            raise ValueError(
                f"--foundation_model {args.foundation_model!r} is neither a model file nor a name mace "
                f"resolves ({', '.join(names)})"
            )
    # the foundation model's elements, read once (None: a named model, resolved by mace)
    fz = _foundation_elements(args, foundation) if args.foundation_model is not None else None
    required: List[str] = []
    classes: Dict[str, type] = {}
    for name, options in specs.items():
        cls = classes[name] = get_block(name)  # unknown names raise with suggestions
        if args.lr_charges_weight > 0 and not getattr(cls, "accepts_charge_targets", False):
            raise ValueError(
                f"--lr_charges_weight > 0 but block {name!r} does not predict partial charges that "
                "may be fitted to a charge partition (LES predicts latent charges, the wannier block "
                "fixed ion-minus-centroid charges); only qeq accepts charge targets"
            )
        if not isinstance(options, dict):
            raise ValueError(f"options of block {name!r} must be a mapping, got {options!r}")
        _check_block_options(name, cls, options, fz)
        for key in getattr(cls, "required_inputs", ()):
            if key == "total_charge":
                required.append(args.total_charge_key)
            elif key == "total_spin":
                required.append(args.total_spin_key)
            else:
                required.append(key)
    if weights["wannier_centroids"] > 0:
        blocks = dict(classes)
        if foundation is not None:
            blocks.update({name: type(block) for name, block in foundation.blocks.items()})
        if not any(getattr(cls, "predicts_wannier_centroids", False) for cls in blocks.values()):
            raise ValueError(
                f"--wannier_centroids_weight > 0 but none of the blocks {sorted(blocks)} predicts "
                "Wannier centroids; attach one with --lr_blocks wannier"
            )
    keys = target_keys(args)
    required += [keys[name] for name, weight in weights.items() if weight > 0]
    if args.train_file and os.path.isfile(args.train_file) and args.train_file.endswith((".xyz", ".extxyz")):
        import ase.io

        frames = ase.io.read(args.train_file, index=":")
        info = _data_keys_and_elements(frames, required)
        for key, count in info["missing"].items():
            if count:
                hint = ""
                if key == args.total_charge_key:
                    hint = (
                        " (the total charge; e.g. pass --total_charge_key charge if your file "
                        "stores atoms.info['charge'])"
                    )
                raise ValueError(
                    f"{count} of {info['n']} structures in {args.train_file} lack the key {key!r}{hint}, "
                    "which the requested blocks/losses need"
                )
        _check_target_shapes(frames, args.train_file, args, weights)
        if "field" in specs and not any(args.external_field_key in a.info for a in frames):
            logger.warning(
                "block 'field' requested but no structure of %s has atoms.info[%r]: every structure "
                "is at zero field, so only response losses can train the field coupling",
                args.train_file,
                args.external_field_key,
            )
        if fz is not None:
            uncovered = [z for z in info["elements"] if z not in fz]
            if uncovered:
                names = ", ".join(chemical_symbols[z] for z in uncovered)
                raise ValueError(
                    f"the foundation model {args.foundation_model} does not know element(s) {names} "
                    f"present in {args.train_file}; it covers "
                    f"{', '.join(chemical_symbols[z] for z in fz)}"
                )


def _check_block_options(
    name: str, cls: type, options: Dict[str, Any], elements: Optional[List[int]]
) -> None:
    """Build the block once on stand-in features so that bad options fail before training.

    The real block is built after mace has loaded the data and the model; a missing or
    misspelt option would otherwise stop the run only then. ``elements``: the foundation
    model's; without them (training from scratch, a named foundation model) the elements
    come from mace and the options are checked when the block is built.
    """
    if not elements:
        return
    try:
        cls(feature_irreps="4x0e+4x1o", atomic_numbers=elements, r_max=5.0, **options)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"block {name!r}: {exc}") from exc


def _check_target_shapes(
    frames: Sequence[Any], path: str, args: argparse.Namespace, weights: Dict[str, float]
) -> None:
    """Response targets must have the documented shapes; polarizations need periodic cells."""
    import numpy as np

    for index, atoms in enumerate(frames):
        if weights["born_charges"] > 0:
            z = np.asarray(atoms.arrays[args.born_charges_key])
            if z.reshape(len(atoms), -1).shape[1] != 9:
                raise ValueError(
                    f"structure {index} of {path}: atoms.arrays[{args.born_charges_key!r}] must hold 9 "
                    f"values per atom (Z[i, a, b] row-major), got shape {z.shape}"
                )
        if weights["polarizability"] > 0 and np.size(atoms.info[args.polarizability_key]) != 9:
            raise ValueError(
                f"structure {index} of {path}: atoms.info[{args.polarizability_key!r}] must hold 9 values "
                f"(a 3x3 polarizability, e·Å²/V), got {np.size(atoms.info[args.polarizability_key])}"
            )
        if weights["polarization"] > 0:
            if np.size(atoms.info[args.polarization_key]) != 3:
                raise ValueError(
                    f"structure {index} of {path}: atoms.info[{args.polarization_key!r}] must be a "
                    "3-vector (e/Å²)"
                )
            if not atoms.pbc.any() or atoms.get_volume() <= 0:
                raise ValueError(
                    f"structure {index} of {path} is not periodic, so it has no polarization; "
                    "train molecules on --dipole_key instead"
                )
        if weights["wannier_centroids"] > 0:
            w = np.asarray(atoms.arrays[args.wannier_centroids_key], dtype=float)
            if w.shape != (len(atoms), 3):
                raise ValueError(
                    f"structure {index} of {path}: atoms.arrays[{args.wannier_centroids_key!r}] must "
                    f"have shape [n_atoms, 3] (Å; NaN rows for atoms without a centroid), got {w.shape}"
                )
        if args.external_field_key in atoms.info and np.size(atoms.info[args.external_field_key]) != 3:
            raise ValueError(
                f"structure {index} of {path}: atoms.info[{args.external_field_key!r}] must be a "
                "3-vector in V/Å"
            )


def _foundation_elements(args, foundation) -> Optional[List[int]]:
    if foundation is not None:
        return [int(z) for z in foundation.atomic_numbers.tolist()]
    if os.path.isfile(args.foundation_model):
        from mace_lr._mace_adapter import base_atomic_numbers

        model = torch.load(args.foundation_model, map_location="cpu", weights_only=False)
        return base_atomic_numbers(model)  # refuses files of mace-torch 0.1.0, naming it
    return None  # named foundation models are resolved (and checked) by mace itself


def _flag_given(args: argparse.Namespace, argv: Sequence[str], names: Sequence[str]) -> bool:
    """Whether any of ``names`` was set on the command line or in the ``--config`` file."""
    if any(a.split("=")[0] in names for a in argv):
        return True
    config = getattr(args, "config", None)
    if config and os.path.isfile(config):
        import yaml

        with open(config, encoding="utf-8") as fh:
            options = yaml.safe_load(fh) or {}
        return isinstance(options, dict) and any(n.lstrip("-") in options for n in names)
    return False


def loss_weights(args: argparse.Namespace, argv: Sequence[str]) -> Dict[str, float]:
    """Weights of the long-range loss terms a run asked for (0: off).

    mace's own ``--dipole_*`` and ``--polarizability_*`` flags (whose weights default to 1)
    switch their term on when either flag of the pair is given; the mace-lr weights
    default to 0.
    """
    dipole = _flag_given(args, argv, ("--dipole_key", "--dipole_weight"))
    polarizability = _flag_given(args, argv, ("--polarizability_key", "--polarizability_weight"))
    return {
        "dipole": float(args.dipole_weight) if dipole else 0.0,
        "polarizability": float(args.polarizability_weight) if polarizability else 0.0,
        "born_charges": float(args.born_charges_weight),
        "polarization": float(args.polarization_weight),
        "charges": float(args.lr_charges_weight),
        "wannier_centroids": float(args.wannier_centroids_weight),
    }


def target_keys(args: argparse.Namespace) -> Dict[str, str]:
    """Data key of each long-range target (and of the applied field)."""
    return {
        "dipole": args.dipole_key,
        "polarizability": args.polarizability_key,
        "born_charges": args.born_charges_key,
        "polarization": args.polarization_key,
        "charges": args.charges_key,
        "wannier_centroids": args.wannier_centroids_key,
        "external_field": args.external_field_key,
    }


#: loss term → model output the training forward must compute
_RESPONSES = {"born_charges": "born_effective_charges", "polarizability": "polarizability"}


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


def _freeze_outside(model: torch.nn.Module, in_optimizer: set) -> None:
    """Stop gradients of trainable parameters that no optimiser group holds.

    mace's groups leave some parameters out (e.g. trainable Bessel weights of the radial
    basis). They are never updated, but mace zeroes only the optimiser's gradients, so
    theirs accumulate over the whole run and enter ``clip_grad_norm_`` over all model
    parameters: the clipping then depends on how many steps this process has run, and a
    restart from a checkpoint diverges from the uninterrupted run at the first clipped step.
    """
    frozen = []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in in_optimizer:
            p.requires_grad_(False)
            frozen.append(name)
    if frozen:
        logger.info("parameters outside every optimiser group get no gradient: %s", ", ".join(frozen))


class _EpochSeededLoader:
    """Reseed the training loader's shuffling at every epoch from ``(seed, epoch)``.

    mace seeds the shuffling generator once, so a run restarted from a checkpoint sees
    a different batch order than the uninterrupted run. Seeding per epoch makes a
    restart continue exactly the same run.
    """

    def __init__(self, loader, seed: int, start_epoch: int):
        self._loader = loader
        self._seed = int(seed)
        self._epoch = int(start_epoch)

    def __iter__(self):
        self._loader.generator.manual_seed(self._seed * 100_003 + self._epoch)
        self._epoch += 1
        return iter(self._loader)

    def __len__(self) -> int:
        return len(self._loader)

    def __getattr__(self, name: str):
        return getattr(self._loader, name)


def _distributed_patches(rt, state: Dict[str, Any]) -> List[Any]:
    """Patches that let mace's ``--distributed`` run on CPU, with ``state["rank"]`` recorded.

    mace initialises a process group only for ``--device cuda`` (nccl) and ``xpu`` (ccl),
    and wraps the model as ``DDP(model, device_ids=[local_rank])``, which is meant for one
    accelerator per process. With ``--device cpu`` a ``gloo`` group is initialised
    (``init_method="env://"``) right after mace has read the rank, and CPU modules are
    wrapped without ``device_ids``. DDP runs with ``find_unused_parameters=False`` (mace's
    choice): a block parameter multiplied by a zero coupling (a fresh LES block) is still in
    the graph and gets a zero gradient, which DDP reduces like any other; only parameters
    that no forward pass reaches would need the flag.

    Under DDP mace shuffles with ``DistributedSampler`` (seeded by ``--seed``) and calls
    ``set_epoch(epoch)`` before every epoch, so each epoch's split and order depend only on
    (seed, epoch, world size): a restart on the same number of processes sees the batches
    of the uninterrupted run (:class:`_EpochSeededLoader` is not needed there; 2 CPU ranks,
    3 epochs straight vs 2 + ``--restart_latest``: identical checkpoints).
    """
    orig_init = rt.init_distributed
    orig_ddp = rt.DDP

    def init_distributed(args):
        rank, local_rank, world_size = orig_init(args)
        state["rank"] = rank
        if args.distributed and args.launcher != "none" and not torch.distributed.is_initialized():
            if args.device == "cpu":
                torch.distributed.init_process_group(
                    backend="gloo", init_method="env://", rank=rank, world_size=world_size
                )
                # mace's logger is set up after this call: say it when the model is wrapped
                state["note"] = (
                    f"gloo process group initialised for --device cpu (rank {rank} of {world_size})"
                )
        if rank != 0:
            # mace silences non-zero ranks with a filter on the root logger, which records
            # of named loggers bypass ("__main__" is this module under python -m)
            state["levels"] = {name: logging.getLogger(name).level for name in ("mace_lr", logger.name)}
            for name in state["levels"]:
                logging.getLogger(name).setLevel(logging.WARNING)
        return rank, local_rank, world_size

    def ddp(module, *a, **k):
        note = state.pop("note", None)
        if note:
            logger.info(note)
        if all(p.device.type == "cpu" for p in module.parameters()):
            k.pop("device_ids", None)
            logger.info("DistributedDataParallel on CPU: model wrapped without device_ids")
        return orig_ddp(module, *a, **k)

    return [(rt, "init_distributed", init_distributed), (rt, "DDP", ddp)]


@contextlib.contextmanager
def _hooks(
    specs: Dict[str, Dict[str, Any]],
    carried: Optional[Dict[str, Any]],
    weights: Dict[str, float],
    keys: Dict[str, str],
    seed: int,
):
    """Patch mace's run_train module for the duration of one run.

    ``weights`` are the loss terms (:func:`loss_weights`); ``keys`` map targets and the
    applied field to the data keys holding them (:func:`target_keys`). Yields a dict
    that holds this process's ``rank`` once mace has read it (0 without ``--distributed``).
    """
    from mace.cli import run_train as rt
    from mace.data.atomic_data import AtomicData

    from mace_lr import LongRangeMACE, augment

    responses = tuple(_RESPONSES[name] for name in _RESPONSES if weights.get(name, 0.0) > 0)
    if weights.get("polarization", 0.0) > 0:
        responses += ("dipole",)  # the full −∂U/∂E, not the blocks' own dipoles

    orig_keyspec = rt.update_keyspec_from_kwargs

    def update_keyspec_from_kwargs(keyspec, keydict):
        keyspec = orig_keyspec(keyspec, keydict)
        info = {"external_field": keys["external_field"]}
        if weights.get("polarization", 0.0) > 0:
            info["polarization"] = keys["polarization"]
        arrays = {"born_charges": keys["born_charges"]} if weights.get("born_charges", 0.0) > 0 else {}
        if weights.get("wannier_centroids", 0.0) > 0:
            arrays["wannier_centroids"] = keys["wannier_centroids"]
        return keyspec.update(info_keys=info, arrays_keys=arrays)

    orig_from_config = AtomicData.from_config.__func__

    def from_config(cls, config, *a, **k):
        # mace passes extra properties through with their stored shapes (a 3-vector becomes
        # [3, 1], which batches wrongly) and skips missing ones (batches of mixed structures
        # would not collate): give the response targets batchable shapes, zeros where missing
        data = orig_from_config(cls, config, *a, **k)
        dtype = torch.get_default_dtype()
        n = len(config.atomic_numbers)
        if weights.get("born_charges", 0.0) > 0:
            z = config.properties.get("born_charges")
            data.born_charges = (
                torch.zeros(n, 3, 3, dtype=dtype) if z is None else torch.tensor(z, dtype=dtype).view(n, 3, 3)
            )
        if weights.get("polarization", 0.0) > 0:
            p = config.properties.get("polarization")
            data.polarization = (
                torch.zeros(1, 3, dtype=dtype) if p is None else torch.tensor(p, dtype=dtype).view(1, 3)
            )
        if weights.get("wannier_centroids", 0.0) > 0:
            w = config.properties.get("wannier_centroids")
            w = torch.full((n, 3), float("nan"), dtype=dtype) if w is None else torch.tensor(w, dtype=dtype)
            w = w.view(n, 3)
            # rows without a reference centroid (NaN) are masked out of the loss
            present = torch.isfinite(w).all(-1)
            data.wannier_centroids = torch.where(present[:, None], w, torch.zeros_like(w))
            data.wannier_centroids_present = present.to(dtype)
        return data

    orig_configure = rt.configure_model
    orig_params = rt.get_params_options
    orig_loss = rt.get_loss_fn
    orig_train = rt.tools.train

    def configure_model(*a, **k):
        model, output_args = orig_configure(*a, **k)
        if isinstance(model, LongRangeMACE):
            return model, output_args
        if carried:
            dtype = next(model.parameters()).dtype
            model = LongRangeMACE(model, {name: block.to(dtype) for name, block in carried.items()})
            logger.info("carried block(s) %s with their weights from the foundation model", list(carried))
        new = {n: c for n, c in specs.items() if not (carried and n in carried)}
        if new:
            model = augment(model, new)
        if responses:
            model.training_responses = responses
            logger.info("every training forward pass computes %s", ", ".join(responses))
        return model, output_args

    def get_params_options(args, model):
        wrapped = isinstance(model, LongRangeMACE)
        options = orig_params(args, model.base if wrapped else model)
        # mace passes some groups as generators (module.parameters()): materialise them
        # first, or collecting the ids below would exhaust them and leave those groups empty
        for group in options["params"]:
            group["params"] = list(group["params"])
        seen = {id(p) for group in options["params"] for p in group["params"]}
        blocks = model.blocks.items() if wrapped else []
        for name, block in blocks:
            params = [p for p in block.parameters() if id(p) not in seen]
            options["params"].append(
                {"name": f"lr_{name}", "params": params, "weight_decay": 0.0, "lr": args.lr}
            )
            logger.info("optimiser group lr_%s: %d tensors", name, len(params))
            seen.update(id(p) for p in params)
        _freeze_outside(model, seen)
        return options

    def get_loss_fn(*a, **k):
        base = orig_loss(*a, **k)
        if any(w > 0 for w in weights.values()):
            return LongRangeLoss(
                base,
                dipole_weight=weights.get("dipole", 0.0),
                charges_weight=weights.get("charges", 0.0),
                born_charges_weight=weights.get("born_charges", 0.0),
                polarizability_weight=weights.get("polarizability", 0.0),
                polarization_weight=weights.get("polarization", 0.0),
                wannier_centroids_weight=weights.get("wannier_centroids", 0.0),
            )
        return base

    orig_lora = rt.inject_LoRAs

    def inject_LoRAs(model, *a, **k):
        if not isinstance(model, LongRangeMACE):
            return orig_lora(model, *a, **k)
        # LoRA adapts the foundation model; the blocks are new and train in full (wrapped,
        # their scalar parameters, e.g. the LES coupling, would stay frozen at zero)
        model.base = orig_lora(model.base, *a, **k)
        logger.info("LoRA injected into the base model; long-range blocks train all their parameters")
        return model

    loaded: Dict[str, int] = {}
    handler_cls = rt.tools.CheckpointHandler
    orig_load_latest = handler_cls.load_latest

    def load_latest(self, *a, **k):
        epoch = orig_load_latest(self, *a, **k)
        if epoch is not None and "train_started" not in loaded:
            loaded["epoch"] = int(epoch)
        return epoch

    def train(*a, **k):
        loaded["train_started"] = 1
        if "epoch" in loaded and k.get("start_epoch") == loaded["epoch"]:
            # mace's checkpoint of epoch e is written after epoch e finished; upstream
            # resumes at e and trains it twice. Continue with e + 1, as the run would have.
            k["start_epoch"] = loaded["epoch"] + 1
            logger.info("resuming after the completed epoch %d of the checkpoint", loaded["epoch"])
        loader = k.get("train_loader")
        if loader is not None and getattr(loader, "generator", None) is not None and not k.get("distributed"):
            k["train_loader"] = _EpochSeededLoader(loader, seed, k.get("start_epoch", 0))
        return orig_train(*a, **k)

    patches = [
        (rt, "configure_model", configure_model),
        (rt, "get_params_options", get_params_options),
        (rt, "get_loss_fn", get_loss_fn),
        (rt, "inject_LoRAs", inject_LoRAs),
        (rt, "update_keyspec_from_kwargs", update_keyspec_from_kwargs),
        (AtomicData, "from_config", classmethod(from_config)),
        (rt.tools, "train", train),
        (handler_cls, "load_latest", load_latest),
    ]
    state: Dict[str, Any] = {"rank": 0}
    patches += _distributed_patches(rt, state)
    with contextlib.ExitStack() as stack:
        for owner, attr, replacement in patches:
            stack.enter_context(mock.patch.object(owner, attr, replacement))
        try:
            yield state
        finally:
            for name, level in state.get("levels", {}).items():
                logging.getLogger(name).setLevel(level)


def _convert_outputs(args: argparse.Namespace) -> List[str]:
    """Rewrite the .model files mace saved (pickled) in mace-lr's safe format."""
    from mace_lr import LongRangeMACE, save

    written = []
    for suffix in ("", "_stagetwo"):
        path = os.path.join(args.model_dir, f"{args.name}{suffix}.model")
        if not os.path.exists(path):
            continue
        obj = torch.load(path, map_location="cpu", weights_only=False)  # written by this run
        if isinstance(obj, LongRangeMACE):
            save(obj, path)
            written.append(path)
            compiled = os.path.join(args.model_dir, f"{args.name}{suffix}_compiled.model")
            if os.path.exists(compiled):
                # the electrostatics engine runs in Python (neighbour lists, torch-pme), so
                # a TorchScript export of the whole model cannot be evaluated outside Python
                os.remove(compiled)
                logger.info("removed %s: TorchScript export of long-range models is not supported", compiled)
    return written


def run(args: argparse.Namespace, argv: Sequence[str]) -> List[str]:
    """Run one training; returns the mace-lr model files written."""
    from mace.cli import run_train as rt

    specs = parse_block_config(args.lr_blocks, args.lr_config)
    foundation = _read_foundation(args.foundation_model) if args.foundation_model else None
    weights = loss_weights(args, argv)
    preflight(args, weights, specs, foundation)
    carried = None
    tmpdir = None
    if foundation is not None:
        # mace loads foundation models with torch.load: give it the base MACE, keep the blocks
        tmpdir = tempfile.mkdtemp(prefix="mace_lr_foundation_")
        base_path = os.path.join(tmpdir, "base.model")
        torch.save(foundation.base, base_path)
        args.foundation_model = base_path
        carried = dict(foundation.blocks.items())
    with _hooks(specs, carried, weights, target_keys(args), args.seed) as state:
        rt.run(args)
    if state["rank"] != 0:
        # mace saves the .model files on rank 0 before its last barrier; rank 0 rewrites them
        return []
    return _convert_outputs(args)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        written = run(args, argv)
    except (ValueError, KeyError) as exc:
        from mace_lr.registry import BlockRegistryError

        if isinstance(exc, (ValueError, BlockRegistryError)) or "block" in str(exc):
            parser.exit(2, f"mace_lr_run_train: error: {exc.args[0] if exc.args else exc}\n")
        raise
    for path in written:
        logging.info("mace-lr model written to %s", path)


if __name__ == "__main__":
    main()
