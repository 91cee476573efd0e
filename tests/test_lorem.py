"""The `lorem` block: long-range equivariant messages from spherical charges."""

import mace  # noqa: F401
import numpy as np
import pytest
import torch
from e3nn import o3

import mace_lr
import mace_lr.testing as T
from mace_lr.electrostatics import COULOMB_CONSTANT, coulomb_potential


@pytest.fixture(scope="module")
def base():
    return T.make_test_model(seed=3)


@pytest.fixture(scope="module")
def systems():
    return T.reference_systems(seed=5)


def lorem_model(base, **config):
    config = {"accuracy": 1e-8, "smearing": 1.1, **config}
    return T.perturb_blocks(mace_lr.augment(base, {"lorem": config}), scale=0.3, seed=2)


def rotation(axis, angle):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def test_lorem_block_contract():
    T.run_block_contract("lorem", config={"smearing": 1.2})


def test_l2_two_updates_forces_stress_script(base, systems):
    model = lorem_model(base, l_max=2, num_updates=2, channels=4)
    block = model.blocks["lorem"]
    assert block.use_square and block.readout_out.weight.abs().max() > 0  # the test can fail
    T.assert_forces_match_finite_differences(model, systems["periodic"], max_components=6)
    T.assert_stress_matches_finite_differences(model, systems["slab"])
    T.assert_forces_match_finite_differences(model, systems["open"], max_components=4)
    T.assert_dtype_consistency(model, systems["open"])
    T.assert_scriptable(model, systems["periodic"])


@pytest.mark.parametrize("key", ["periodic", "open", "slab"])
def test_l0_channel_is_the_engine_potential(base, systems, key):
    model = lorem_model(base, l_max=1, channels=3)
    atoms = systems[key]
    out = T.evaluate(model, [atoms])
    q, v = out["lorem_spherical_charges"], out["lorem_potentials"]
    assert q.shape == v.shape == (len(atoms), 3 * 4)
    pos = torch.tensor(atoms.positions)
    cell = torch.tensor(atoms.cell[:])
    for c in range(3):
        ref = coulomb_potential(pos, q[:, c], cell, atoms.pbc.tolist(), smearing=1.1, accuracy=1e-8)
        err = float((v[:, c] * COULOMB_CONSTANT - ref).abs().max())
        assert err <= 1e-10, f"channel {c}: {err:.3g}"
    # the l = 1 columns are the same scalar kernel applied to each component
    ref = coulomb_potential(pos, q[:, 3:], cell, atoms.pbc.tolist(), smearing=1.1, accuracy=1e-8)
    assert float((v[:, 3:] * COULOMB_CONSTANT - ref).abs().max()) <= 1e-10


def test_one_engine_call_per_update_with_all_components(base, systems, monkeypatch):
    import mace_lr.plugins.lorem as lorem

    calls = []
    original = lorem.coulomb_potential_batch

    def spy(positions, charges, *args, **kwargs):
        calls.append(tuple(charges.shape))
        return original(positions, charges, *args, **kwargs)

    monkeypatch.setattr(lorem, "coulomb_potential_batch", spy)
    model = lorem_model(base, l_max=2, channels=5, num_updates=2)
    atoms = [systems["periodic"], systems["slab"], systems["open"]]
    T.evaluate(model, atoms, compute_force=False)
    n = sum(len(a) for a in atoms)
    assert calls == [(n, 5 * 9), (n, 5 * 9)]


@pytest.mark.parametrize("l_max", [1, 2])
def test_potentials_rotate_with_wigner_d(base, systems, l_max):
    model = lorem_model(base, l_max=l_max, channels=3, num_updates=2)
    atoms = systems["triclinic"]
    ref = T.evaluate(model, [atoms])
    irreps = o3.Irreps(model.blocks["lorem"].state_irreps)
    rotations = [
        rotation([0, 0, 1], np.pi / 2),
        rotation([1, 0, 0], 0.7),
        rotation([1.0, -2.0, 0.5], 2.1),
        T._random_rotation(7),
    ]
    for rot in rotations:
        rotated = atoms.copy()
        rotated.positions = atoms.positions @ rot.T
        rotated.set_cell(atoms.cell[:] @ rot.T, scale_atoms=False)
        out = T.evaluate(model, [rotated])
        d = irreps.D_from_matrix(torch.tensor(rot))
        for key in ("lorem_spherical_charges", "lorem_potentials"):
            want = ref[key] @ d.T
            err = float((out[key] - want).abs().max())
            scale = float(want.abs().max())
            assert scale > 1e-3 and err <= 1e-7 * scale, f"{key}: {err:.3g} (scale {scale:.3g})"
        assert abs(float(out["energy"][0] - ref["energy"][0])) <= 1e-8


def test_supercell_consistency(base, systems):
    model = lorem_model(base, l_max=2, channels=3)
    atoms = systems["periodic"]
    big = atoms * (2, 1, 2)
    one = T.evaluate(model, [atoms])
    four = T.evaluate(model, [big])
    assert abs(float(four["lr_energy"][0] - 4 * one["lr_energy"][0])) <= 1e-8 * max(
        1.0, abs(float(four["lr_energy"][0]))
    )
    assert abs(float(one["lr_energy"][0])) > 1e-4
    n = len(atoms)
    for key in ("lorem_potentials", "lorem_node_energies"):
        tiled = torch.cat([one[key]] * 4)
        assert float((four[key][: 4 * n] - tiled).abs().max()) <= 1e-8, key


def test_total_charge_conditioning(base, systems):
    model = lorem_model(base, l_max=1, channels=4)
    atoms = systems["open"]
    energies = {}
    for charge in (0, 1, -2):
        a = atoms.copy()
        a.info["charge"] = charge
        out = T.evaluate(model, [a])
        sums = out["lorem_spherical_charges"][:, :4].sum(0)
        assert torch.allclose(sums, torch.full_like(sums, float(charge)), atol=1e-10), sums
        energies[charge] = float(out["energy"][0])
    assert abs(energies[1] - energies[0]) > 1e-6 and abs(energies[-2] - energies[0]) > 1e-6


def test_total_charge_is_required(base, systems):
    model = mace_lr.augment(base, {"lorem": {}})
    assert "total_charge" in model.required_inputs


def test_identity_at_init_l2(base, systems):
    model = mace_lr.augment(base, {"lorem": {"l_max": 2, "num_updates": 2}})
    T.assert_identity_at_init(base, model, [systems["periodic"], systems["open"]], atol=0.0)


@pytest.mark.parametrize(
    "config, match",
    [
        ({"l_max": 3}, "l_max"),
        ({"channels": 0}, "channels"),
        ({"smearing": -1.0}, "smearing"),
        ({"width": 2}, "unknown lorem option"),
    ],
)
def test_bad_options(base, config, match):
    with pytest.raises((ValueError, TypeError), match=match):
        mace_lr.augment(base, {"lorem": config})


def _two_ch2_ends(theta, separation=12.0):
    """Two terminal CH₂ groups on the z axis, the far one twisted by θ (open boundaries)."""
    from ase import Atoms

    h = np.array([[0.93, 0.0, -0.55], [-0.93, 0.0, -0.55]])
    rot = rotation([0, 0, 1], theta)
    far = (h * [1, 1, -1]) @ rot.T + [0.0, 0.0, separation]
    atoms = Atoms("CH2CH2", positions=np.vstack([[0, 0, 0], h, [0, 0, separation], far]))
    atoms.info["charge"] = 0
    return atoms


@pytest.mark.parametrize("l_max", [1, 2])
def test_local_harmonics_see_a_far_plane_orientation(l_max):
    """The C of one CH₂ end feels the twist of a CH₂ plane beyond the receptive field.

    By the C₂v symmetry of a terminal CH₂ every l ≤ 1 feature of its carbon lies on the
    C₂ (z) axis, and the far group's potentials at that carbon are invariant under the C₂
    rotation about z: V⁰ and V¹ do not depend on θ, and of V² only the m = ±2 part does,
    which couples to nothing the base features (l ≤ 1, and 1o ⊗ 1o → 2e of axial vectors)
    give the carbon. With the block's own l = 2 harmonics of its C–H bonds it couples.
    """
    base = T.make_test_model(atomic_numbers=(1, 6), r_max=4.0, seed=4)
    thetas = (0.0, 0.5, 1.2, np.pi / 2)
    spread = {}
    for harmonics in (False, True):
        model = lorem_model(base, l_max=l_max, channels=4, local_harmonics=harmonics)
        energies = [float(T.evaluate(model, [_two_ch2_ends(t)])["lorem_node_energies"][0]) for t in thetas]
        spread[harmonics] = max(energies) - min(energies)
        assert abs(energies[0]) > 1e-3  # the carbon's block energy is not trivially zero
    assert spread[False] <= 1e-11, spread  # blind: no model of these features sees the twist
    if l_max == 2:
        assert spread[True] >= 1e-4, spread
    else:  # l = 1 harmonics of a C₂v site are axial too
        assert spread[True] <= 1e-11, spread
