"""LES with ``charge_groups="fragments"``: every bonded fragment keeps its formal charge."""

from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule
from ase.neighborlist import NeighborList, natural_cutoffs
from mace_lr.plugins.les import LESBlock
from scipy.sparse.csgraph import connected_components

import mace_lr
from mace_lr import testing as T
from mace_lr._data import atoms_to_batch
from mace_lr.electrostatics import COULOMB_CONSTANT
from mace_lr.nn import COVALENT_RADII, bonded_fragments

DATA = Path(__file__).resolve().parents[1] / "data"
Z_HCNO = (1, 6, 7, 8)
FRAGMENTS = {"total_charge": "learned", "charge_groups": "fragments"}


@pytest.fixture(scope="module")
def base():
    return T.make_test_model(atomic_numbers=Z_HCNO, r_max=4.0, seed=3)


def _ammonium():
    return Atoms(
        "NH4", positions=[[0, 0, 0], [0.6, 0.6, 0.6], [0.6, -0.6, -0.6], [-0.6, 0.6, -0.6], [-0.6, -0.6, 0.6]]
    )


def _formate():
    return Atoms("CHOO", positions=[[0, 0, 0], [0, 0, 1.10], [1.13, 0, -0.63], [-1.13, 0, -0.63]])


def _with_formal(atoms, charge):
    """``atoms`` with its formal charge on the first atom."""
    atoms = atoms.copy()
    formal = np.zeros(len(atoms))
    formal[0] = charge
    atoms.arrays["formal_charges"] = formal
    atoms.info["charge"] = charge
    return atoms


def _pair(a, b, separation, direction=(0.0, 0.3, 1.0)):
    """``a`` + ``b`` with their centroids ``separation`` Å apart (formal charges kept)."""
    u = np.asarray(direction, float) / np.linalg.norm(direction)
    b = b.copy()
    b.positions += a.positions.mean(0) - b.positions.mean(0) + separation * u
    pair = a + b
    pair.info["charge"] = a.info["charge"] + b.info["charge"]
    return pair


def _systems():
    rng = np.random.default_rng(4)
    nh4, hcoo, water = (
        _with_formal(_ammonium(), 1),
        _with_formal(_formate(), -1),
        _with_formal(molecule("H2O"), 0),
    )
    out = [nh4, hcoo, _pair(nh4, hcoo, 6.0), _pair(nh4, nh4, 9.0), _pair(water, hcoo, 5.0)]
    out.append(_pair(_pair(nh4, water, 4.0), hcoo, 7.0, direction=(1.0, 0.0, 0.2)))  # three fragments
    for atoms in out:
        atoms.positions += rng.normal(scale=0.03, size=atoms.positions.shape)
    return out


def _model(base, **options):
    return T.perturb_blocks(mace_lr.augment(base, {"les": {**FRAGMENTS, **options}}), scale=0.5)


def _ase_fragments(atoms):
    """Reference partition: ASE's neighbour list with 1.2 × covalent radii, scipy components."""
    nl = NeighborList(natural_cutoffs(atoms, mult=1.2), self_interaction=False, bothways=True, skin=0.0)
    nl.update(atoms)
    return connected_components(nl.get_connectivity_matrix(sparse=True), directed=False)[1]


def _fragments_of(atoms, r_max=5.0):
    batch = atoms_to_batch([atoms], sorted(set(atoms.numbers)), r_max)
    z = torch.as_tensor(atoms.numbers, dtype=torch.int64)
    radii = torch.tensor(COVALENT_RADII, dtype=torch.float64)
    return bonded_fragments(z, batch["positions"], batch["edge_index"], batch["shifts"], radii)


def _same_partition(a, b):
    a, b = np.asarray(a), np.asarray(b)
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_bonded_fragments_match_ase_connectivity_open_and_periodic():
    for atoms in _systems():
        labels, count = _fragments_of(atoms)
        assert count == len(set(_ase_fragments(atoms).tolist()))
        assert _same_partition(labels.numpy(), _ase_fragments(atoms))
        assert labels[0] == 0 and bool((labels[1:] >= labels[:-1].cummax(0).values - 1).all())
    # a molecule cut by the periodic boundary is still one fragment; two molecules stay two
    cell = molecule("CH3OH") + molecule("H2O")
    cell.positions[6:] += 3.0
    cell.set_cell([6.0, 6.5, 7.0])
    cell.set_pbc(True)
    cell.positions -= cell.positions[0] - 0.2  # atom 0 near a face: its neighbours wrap
    cell.wrap()
    labels, count = _fragments_of(cell, r_max=3.0)
    assert count == 2 and _same_partition(labels.numpy(), _ase_fragments(cell))
    assert len(set(labels[:6].tolist())) == 1


def test_bonded_fragments_agree_with_the_shipped_dimer_labels():
    """The bond graph recovers the generator's monomer labels in every shipped dimer (3.5–15 Å)."""
    frames = ase.io.read(DATA / "dimers_test.xyz", ":") + ase.io.read(DATA / "leave_family_out_test.xyz", ":")
    for atoms in frames:
        labels, count = _fragments_of(atoms)
        assert count == len(set(atoms.arrays["fragment"].tolist())), atoms.info
        assert _same_partition(labels.numpy(), atoms.arrays["fragment"])


@pytest.mark.parametrize("weights", ["uniform", "learned"])
def test_each_fragment_sums_to_its_formal_charge_in_a_batch(base, weights):
    systems = _systems()
    model = _model(base, total_charge=weights)
    out = T.evaluate(model, systems)
    q = out["charges"].numpy()
    start = 0
    for atoms in systems:
        labels = _ase_fragments(atoms)
        formal = atoms.arrays["formal_charges"]
        for f in set(labels.tolist()):
            mine = start + np.flatnonzero(labels == f)
            assert abs(q[mine].sum() - formal[labels == f].sum()) < 1e-10
        start += len(atoms)
    # the structure-wide correction gets the totals right but moves charge between fragments
    whole = mace_lr.augment(base, "les", total_charge=weights)
    whole.blocks["les"].load_state_dict(model.blocks["les"].state_dict())
    pair = systems[3]  # NH4+ ... NH4+
    qs = T.evaluate(whole, [pair])["charges"].numpy()
    assert abs(qs.sum() - 2.0) < 1e-10 and abs(qs[:5].sum() - 1.0) > 1e-3


def test_distant_fragments_keep_their_own_charges_and_interact_by_coulomb(base):
    """Beyond the receptive field the binding energy is γ Σ_{i∈A, j∈B} q_i q_j / r_ij exactly."""
    model = _model(base, smearing=0.5)
    nh4, hcoo = _with_formal(_ammonium(), 1), _with_formal(_formate(), -1)
    gamma = float(model.blocks["les"].gamma().detach())
    for b in (nh4, hcoo):
        pair = _pair(nh4, b, 30.0)
        e_pair, e_a, e_b = (float(T.evaluate(model, [s])["energy"][0]) for s in (pair, nh4, b))
        qa = T.evaluate(model, [nh4])["charges"].numpy()
        qb = T.evaluate(model, [b])["charges"].numpy()
        q = T.evaluate(model, [pair])["charges"].numpy()
        np.testing.assert_allclose(q, np.concatenate([qa, qb]), atol=1e-12)
        r = np.linalg.norm(pair.positions[:5, None] - pair.positions[None, 5:], axis=-1)
        coulomb = gamma * COULOMB_CONSTANT * float((qa[:, None] * qb[None, :] / r).sum())
        assert abs((e_pair - e_a - e_b) - coulomb) < 1e-9 * abs(coulomb) + 1e-12
        assert abs(coulomb) > 0.1 * gamma  # ~ γ Q_A Q_B k_e / 30 Å = 0.48 γ eV


def test_forces_invariances_and_identity_at_init(base):
    systems = _systems()
    T.assert_identity_at_init(base, mace_lr.augment(base, {"les": FRAGMENTS}), systems)
    model = _model(base)
    for atoms in (systems[2], systems[5]):
        T.assert_forces_match_finite_differences(model, atoms, max_components=8)
        T.assert_invariances(model, atoms)
    atoms = systems[5]
    q0 = T.evaluate(model, [atoms])["charges"].numpy()
    perm = np.random.default_rng(1).permutation(len(atoms))
    np.testing.assert_allclose(T.evaluate(model, [atoms[perm]])["charges"].numpy(), q0[perm], atol=1e-10)


def test_block_contract_fragments():
    T.run_block_contract("les", config={"smearing": 1.2, **FRAGMENTS})


def test_options_inputs_and_errors(base):
    model = mace_lr.augment(base, {"les": FRAGMENTS})
    block = model.blocks["les"]
    assert block.to_config()["charge_groups"] == "fragments"
    assert model.required_inputs == ["formal_charges"]
    assert LESBlock.required_inputs_for(FRAGMENTS) == ("formal_charges",)
    assert (
        "charge_groups" not in mace_lr.augment(base, "les", total_charge="learned").blocks["les"].to_config()
    )
    with pytest.raises(ValueError, match='needs `total_charge="uniform"` or `"learned"`'):
        mace_lr.augment(base, "les", charge_groups="fragments")
    with pytest.raises(ValueError, match="`charge_groups` must be one of 'structure', 'fragments'"):
        mace_lr.augment(base, "les", total_charge="learned", charge_groups="molecules")
    atoms = _systems()[2]
    atoms.calc = mace_lr.MACELRCalculator(model_paths=_model(base), device="cpu")
    e0 = atoms.get_potential_energy()
    # changing the formal charges alone invalidates the calculator's results
    atoms.arrays["formal_charges"] = np.zeros(len(atoms))
    atoms.info["charge"] = 0
    assert abs(atoms.get_potential_energy() - e0) > 1e-6
    atoms.info["charge"] = 1
    with pytest.raises(ValueError, match=r"formal charges sum to 0 e but atoms.info\['charge'\] is 1 e"):
        atoms.get_potential_energy()
    del atoms.arrays["formal_charges"]
    with pytest.raises(KeyError, match=r"no atoms.arrays\['formal_charges'\] \(formal_charges\)"):
        atoms.get_potential_energy()


def test_training_data_carry_the_formal_charges(base):
    """mace's data pipeline, with mace-lr's hooks, puts ``formal_charges`` in the batch."""
    from mace import data as mace_data
    from mace.data import atomic_data
    from mace.tools import torch_geometric
    from mace.tools.utils import AtomicNumberTable

    from mace_lr.cli import _lr_hooks as hooks
    from mace_lr.cli._mace_patches import RunContext

    run = RunContext(
        specs={"les": dict(FRAGMENTS)}, carried=None, weights={}, keys={"external_field": "f"}, seed=1
    )
    update = hooks.keyspec_hook(mace_data.update_keyspec_from_kwargs, run)
    from_config = hooks.target_shapes_hook(atomic_data.AtomicData.from_config, run).__get__(
        None, atomic_data.AtomicData
    )
    keyspec = update(mace_data.KeySpecification(), {"energy_key": "REF_energy", "forces_key": "REF_forces"})
    systems = _systems()
    bare = systems[0].copy()
    del bare.arrays["formal_charges"]  # a structure without them gets the input's default, 0
    table = AtomicNumberTable(list(Z_HCNO))
    data = [
        from_config(mace_data.config_from_atoms(a, key_specification=keyspec), z_table=table, cutoff=4.0)
        for a in systems + [bare]
    ]
    batch = torch_geometric.batch.Batch.from_data_list(data).to_dict()
    expect = np.concatenate([a.arrays["formal_charges"] for a in systems] + [np.zeros(len(bare))])
    np.testing.assert_array_equal(batch["formal_charges"].numpy(), expect)
    model = _model(base)
    batch["positions"] = batch["positions"].to(torch.float64)
    out = model({k: (v.double() if v.is_floating_point() else v) for k, v in batch.items()})
    q, ptr = out["charges"].detach().numpy(), batch["ptr"].numpy()
    assert abs(q[ptr[3] : ptr[3] + 5].sum() - 1.0) < 1e-10 and abs(q[ptr[-2] :].sum()) < 1e-10
