"""`LongRangeMACE`: a MACE model plus long-range blocks, and `augment` (private module)."""

import logging
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from e3nn.util.jit import compile_mode

from . import _mace_adapter as adapter
from ._block import LongRangeBlock
from ._deploy import (
    deployable_copy,
    field_derivatives,
    input_specs,
    merge_declared,
    merge_plan,
    merge_planned,
    or_zeros,
)
from ._geometry import cell_volume
from ._outputs import Input, Output, declared_inputs, outputs_by_name

logger = logging.getLogger(__name__)


@compile_mode("script")
class LongRangeMACE(torch.nn.Module):
    r"""A MACE model (called untouched) plus long-range blocks.

    One forward pass strains positions, periodic shifts **and** the cell with a symmetric
    displacement, runs the base model and every block on the strained geometry, sums the
    energies and takes forces, virials, stress and (on request) field responses from one
    autograd graph:

    .. math:: E = E_\mathrm{base} + \sum_b E_b, \quad F = -\partial E/\partial R,
              \quad \sigma = \frac{1}{\Omega}\partial E/\partial \varepsilon,
              \quad \mu = -\partial E/\partial \mathcal{E}

    The wrapper compiles with ``torch.jit.script`` (its forward takes mace's
    ``Dict[str, Tensor]`` batch). Blocks that call the Python electrostatics engine keep
    doing so from a scripted model (``@torch.jit.ignore``); :meth:`deployable` gives the
    copy whose blocks run the TorchScript graph engine, which ``torch.jit.save`` can write
    and a process without Python callbacks (or without mace-lr) can load.

    Args:
        base: a MACE model whose forward returns ``node_feats``.
        blocks: block name → block.
    """

    #: Python-side views of the model; not compiled by ``torch.jit.script``
    __jit_unused_properties__ = [
        "atomic_numbers",
        "r_max",
        "heads",
        "required_inputs",
        "declared_inputs",
        "declared_outputs",
    ]
    #: the blocks' declarations as plain lists, read by the scripted forward
    _script_inputs: List[Tuple[str, bool, bool, float]]  # _deploy.InputSpec
    _script_merge: List[Tuple[str, str, str, bool, str, str]]  # _deploy.MergeStep

    def __init__(self, base: torch.nn.Module, blocks: Mapping[str, LongRangeBlock]):
        super().__init__()
        self.base = base
        self.blocks = torch.nn.ModuleDict(dict(blocks))
        #: block name → class, whose declarations (inputs, outputs) hold also once the block
        #: is replaced by its TorchScript compilation (which keeps no class attributes)
        self._block_classes = {name: type(block) for name, block in blocks.items()}
        self.register_buffer(
            "_z_table", torch.tensor(adapter.base_atomic_numbers(base), dtype=torch.int64), persistent=False
        )
        #: field responses computed in every call on top of the ``compute_*`` flags
        #: (``"dipole"``, ``"born_effective_charges"``, ``"polarizability"``). Set by
        #: ``mace_lr_run_train`` while a loss needs them (mace's training loop cannot pass
        #: the flags); not saved with the model.
        self.training_responses = ()  # tuple of str (no annotation: mace tries to script the model)
        self._script_inputs = input_specs(self.declared_inputs)
        self._script_merge = merge_plan({name: self._declaring(name, b) for name, b in self.blocks.items()})

    # mace's training and evaluation code reads these off the model: same types as MACE
    @property
    def atomic_numbers(self) -> torch.Tensor:
        """Atomic numbers of the base model, in its one-hot order."""
        return self.base.atomic_numbers

    @property
    def r_max(self) -> torch.Tensor:
        """Cutoff radius of the base model, Å."""
        return self.base.r_max

    @property
    def heads(self) -> List[str]:
        """Heads of the base model."""
        return adapter.base_heads(self.base)

    def __getattr__(self, name: str):
        # Fall back to the base model's attributes (interactions, readouts, ...) so that
        # mace utilities (freezing, parameter groups, LoRA) work on the wrapped model.
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            base = modules.get("base")
            if base is None or name.startswith("__"):
                raise
            return getattr(base, name)

    @property
    def required_inputs(self) -> List[str]:
        """Data keys some block needs explicitly (e.g. ``total_charge``)."""
        keys: List[str] = []
        for block in self.blocks.values():
            for key in getattr(block, "required_inputs", ()):
                if key not in keys:
                    keys.append(key)
        return keys

    @property
    def declared_inputs(self) -> List[Input]:
        """Inputs the blocks declare (:attr:`LongRangeBlock.inputs`), each key once."""
        return declared_inputs(self._declaring(name, block) for name, block in self.blocks.items())

    @property
    def declared_outputs(self) -> Dict[str, Output]:
        """``{output name: Output}`` the blocks declare (:attr:`LongRangeBlock.outputs`)."""
        return outputs_by_name(self._declaring(name, block) for name, block in self.blocks.items())

    def deployable(self) -> "LongRangeMACE":
        """A copy whose blocks use the TorchScript graph engine (``method="graph"``).

        ``torch.jit.script(model.deployable())`` has no Python callbacks: it saves with
        ``torch.jit.save`` and runs where mace-lr is not installed. Periodic sums become
        Ewald sums whose real-space part runs on the base model's graph edges, at each
        block's ``accuracy``; open boundaries stay exact; slabs are not supported. Eager
        evaluation of the copy runs the same code.
        """
        return deployable_copy(self).train(self.training)

    def _declaring(self, name: str, block: torch.nn.Module):
        """What carries the declarations of block ``name``: the block, or its class when the
        block is a TorchScript compilation.
        """
        if isinstance(block, torch.jit.ScriptModule):
            return self.__dict__.get("_block_classes", {}).get(name, block)
        return block

    def forward(
        self,
        data: Dict[str, torch.Tensor],
        training: bool = False,
        compute_force: bool = True,
        compute_virials: bool = False,
        compute_stress: bool = False,
        compute_dipole: bool = False,
        compute_born_charges: bool = False,
        compute_polarizability: bool = False,
    ) -> Dict[str, Optional[torch.Tensor]]:
        """Energy, forces, stress and optional field responses of a batch.

        Args:
            data: a mace batch (``positions``, ``cell``, ``edge_index``, ``unit_shifts``,
                ``batch``, ``ptr``, ``node_attrs``, ...) plus optional ``total_charge``
                [n_graphs] e, ``external_field`` [n_graphs, 3] V/Å, and the inputs the
                blocks declare (:attr:`declared_inputs`, defaults where absent).
            training: keep the graph so losses on forces can be differentiated.
            compute_force: forces ``-∂E/∂R`` [n_atoms, 3] eV/Å.
            compute_virials: virials ``-∂E/∂ε`` [n_graphs, 3, 3] eV.
            compute_stress: stress ``(1/Ω) ∂E/∂ε`` [n_graphs, 3, 3] eV/Å³ (the cell is strained too).
            compute_dipole: dipole ``-∂E/∂field`` [n_graphs, 3] e·Å.
            compute_born_charges: ``Z[i, α, β] = ∂F_iβ/∂field_α`` [n_atoms, 3, 3] e.
            compute_polarizability: ``-∂²E/∂field²`` [n_graphs, 3, 3] e·Å²/V.

        Returns:
            ``energy`` [G] eV, ``base_energy`` [G], ``lr_energy`` [G], ``forces`` [N, 3]
            eV/Å, ``virials``/``stress`` [G, 3, 3] (eV, eV/Å³), ``charges`` [N] e when a
            block provides them (summed over blocks), every output the blocks declare
            (:attr:`LongRangeBlock.outputs`) under its declared name (with its mask, e.g.
            ``wannier_centroids`` [N, 3] Å and ``wannier_centroid_mask`` [N]), response
            tensors when requested, and per-block extras named ``<block>_<key>``.
        """
        extra: List[str] = []
        if torch.jit.is_scripting():
            data = data.copy()
        else:
            data = dict(data)
            extra = list(self.__dict__.get("training_responses", ()))
        compute_dipole = compute_dipole or "dipole" in extra
        compute_born_charges = compute_born_charges or "born_effective_charges" in extra
        compute_polarizability = compute_polarizability or "polarizability" in extra
        batch = data["batch"]
        num_graphs = int(data["ptr"].numel() - 1)
        positions = data["positions"]
        if not positions.requires_grad:
            positions.requires_grad_(True)
        dtype, device = positions.dtype, positions.device
        cell = data["cell"].view(-1, 3, 3)
        want_strain = compute_virials or compute_stress
        want_field = compute_dipole or compute_born_charges or compute_polarizability

        displacement = torch.zeros((num_graphs, 3, 3), dtype=dtype, device=device)
        if want_strain:
            displacement.requires_grad_(True)
            sym = 0.5 * (displacement + displacement.transpose(-1, -2))
            strained_positions = positions + torch.einsum("be,bec->bc", positions, sym[batch])
            cell = cell + torch.matmul(cell, sym)
        else:
            strained_positions = positions
        sender = data["edge_index"][0]
        shifts = torch.einsum("be,bec->bc", data["unit_shifts"], cell[batch[sender]])

        field = data.get("external_field")
        if field is None:
            field = torch.zeros((num_graphs, 3), dtype=dtype, device=device)
        field = field.view(num_graphs, 3).to(dtype)
        if want_field:
            field = field.detach().clone().requires_grad_(True)

        base_data = dict(data)
        base_data["positions"] = strained_positions
        base_data["shifts"] = shifts
        base_data["cell"] = cell.reshape(-1, 3)
        if torch.jit.is_scripting():  # adapter.call_base, inlined for TorchScript
            base_out = self.base(
                base_data,
                training=training,
                compute_force=False,
                compute_virials=False,
                compute_stress=False,
                compute_displacement=False,
            )
        else:
            base_out = adapter.call_base(self.base, base_data, training=training)
        base_energy = base_out["energy"]
        node_feats = base_out.get("node_feats")
        if base_energy is None or node_feats is None:
            raise RuntimeError("the base model returned no energy or node_feats")

        pbc = data.get("pbc")
        if pbc is None:
            pbc = (cell.detach().abs().sum(-1) > 0).view(num_graphs, 3)
        total_charge = data.get("total_charge")
        if total_charge is None:
            total_charge = torch.zeros(num_graphs, dtype=dtype, device=device)
        species = torch.argmax(data["node_attrs"], dim=-1)
        ctx: Dict[str, torch.Tensor] = {
            "positions": strained_positions,
            "cell": cell,
            "pbc": pbc.view(num_graphs, 3).to(torch.bool),
            "batch": batch,
            "ptr": data["ptr"],
            "atomic_numbers": self._z_table[species],
            "node_attrs": data["node_attrs"],
            "node_feats": node_feats,
            "total_charge": total_charge.view(num_graphs).to(dtype),
            "external_field": field,
            "edge_index": data["edge_index"],
            "shifts": shifts,
        }
        if torch.jit.is_scripting():
            specs = self._script_inputs
        else:
            specs = input_specs(self.declared_inputs)
        for key, per_atom, is_int, default in specs:
            rows = positions.shape[0] if per_atom else num_graphs
            kind = torch.int64 if is_int else dtype
            value = data.get(key)
            if value is None:
                value = torch.full((rows,), default, dtype=kind, device=device)
            ctx[key] = value.view(rows).to(kind)

        out: Dict[str, Optional[torch.Tensor]] = {}
        lr_energy = torch.zeros(num_graphs, dtype=dtype, device=device)
        given_by: Dict[str, str] = {}
        for name, block in self.blocks.items():
            result = block(ctx)
            lr_energy = lr_energy + result["energy"]
            for key, value in result.items():
                out[name + "_" + key] = value
            if torch.jit.is_scripting():
                merge_planned(out, given_by, name, result, self._script_merge)
            else:
                merge_declared(out, given_by, name, self._declaring(name, block), result)
        energy = base_energy + lr_energy

        inputs: List[torch.Tensor] = [positions]
        if want_strain:
            inputs.append(displacement)
        if want_field:
            inputs.append(field)
        need_graph = training or compute_born_charges or compute_polarizability
        forces: Optional[torch.Tensor] = None
        virials: Optional[torch.Tensor] = None
        stress: Optional[torch.Tensor] = None
        dipole: Optional[torch.Tensor] = None
        if compute_force or want_strain or want_field:
            grad_outputs: List[Optional[torch.Tensor]] = [torch.ones_like(energy.sum())]
            grads = torch.autograd.grad(
                [energy.sum()],
                inputs,
                grad_outputs=grad_outputs,
                retain_graph=need_graph,
                create_graph=need_graph,
                allow_unused=True,
            )
            forces = -or_zeros(grads[0], positions)
            k = 1
            if want_strain:
                g_disp = or_zeros(grads[k], displacement)
                k += 1
                virials = -g_disp
                volume = cell_volume(cell).view(-1, 1, 1)
                stress = torch.where(volume > 0, g_disp / volume.clamp(min=1e-12), torch.zeros_like(g_disp))
            if want_field:
                dipole = -or_zeros(grads[k], field)
        if not want_field:
            block_dipoles: List[torch.Tensor] = []
            for key, value in out.items():
                if key.endswith("_dipole") and value is not None:
                    block_dipoles.append(value)
            if len(block_dipoles) > 0:
                dipole = torch.stack(block_dipoles).sum(0)
        charges = out.get("charges")
        out["dipole"] = dipole
        out["energy"] = energy
        out["base_energy"] = base_energy
        out["lr_energy"] = lr_energy
        out["node_energy"] = base_out.get("node_energy")
        out["forces"] = forces
        out["virials"] = virials
        out["stress"] = stress
        out["node_feats"] = node_feats
        out["charges"] = charges
        if want_field and dipole is not None and (compute_born_charges or compute_polarizability):
            bec, pol = field_derivatives(dipole, positions, field, training)
            if compute_born_charges:
                out["born_effective_charges"] = bec
            if compute_polarizability:
                out["polarizability"] = pol
        return out


def _block_kwargs(base: torch.nn.Module) -> Dict[str, Any]:
    return {
        "feature_irreps": adapter.base_feature_irreps(base),
        "atomic_numbers": adapter.base_atomic_numbers(base),
        "r_max": adapter.base_r_max(base),
    }


def augment(
    model: torch.nn.Module,
    blocks: Union[str, Sequence[str], Mapping[str, Dict[str, Any]]],
    **config: Any,
) -> LongRangeMACE:
    """Attach long-range block(s) to a MACE model (identity at initialisation).

    Args:
        model: a MACE model (``ScaleShiftMACE``, ``MACE``, multi-head) or a
            :class:`LongRangeMACE` (new blocks are added to the existing ones).
        blocks: a block name, a list of names, or ``{name: config}``.
        **config: configuration for a single block (only with one block name).

    Returns:
        A :class:`LongRangeMACE` whose predictions equal ``model``'s until trained.
    """
    from .registry import get_block

    if isinstance(blocks, str):
        specs: Dict[str, Dict[str, Any]] = {blocks: dict(config)}
    elif isinstance(blocks, Mapping):
        if config:
            raise ValueError("pass per-block configuration inside the `blocks` mapping, not as keywords")
        specs = {name: dict(cfg or {}) for name, cfg in blocks.items()}
    else:
        names: Iterable[str] = list(blocks)
        if config and len(list(names)) != 1:
            raise ValueError("keyword configuration is ambiguous with several blocks; pass a mapping")
        specs = {name: dict(config) for name in names}

    if isinstance(model, LongRangeMACE):
        base = model.base
        existing = dict(model.blocks.items())
    else:
        base = model
        existing = {}
    kwargs = _block_kwargs(base)
    dtype = next(base.parameters()).dtype
    device = next(base.parameters()).device
    new_blocks: Dict[str, LongRangeBlock] = dict(existing)
    for name, cfg in specs.items():
        if name in new_blocks:
            raise ValueError(f"the model already has a block named {name!r}")
        cls = get_block(name)
        block = cls(**kwargs, **cfg).to(dtype=dtype, device=device)
        new_blocks[name] = block
        logger.info("attached block %r (%d parameters)", name, sum(p.numel() for p in block.parameters()))
    return LongRangeMACE(base, new_blocks)
