"""Molecule library, Hückel levels and the analytic orbital fields."""

import numpy as np
import pytest

from stm_live.simulators.orbitals import (
    MOLECULE_NAMES,
    huckel_matrix,
    molecule,
    orbital_fields,
    orbital_level,
)
from stm_live.simulators.vacuum import KAPPA_PER_NM


def test_kappa_is_the_5eV_vacuum_decay():
    assert KAPPA_PER_NM == pytest.approx(11.46, abs=0.02)


@pytest.mark.parametrize(
    "name, pi_atoms, pi_electrons",
    [
        ("benzene", 6, 6),
        ("naphthalene", 10, 10),
        ("pentacene", 22, 22),
        ("pyrene", 16, 16),
        ("perylene", 20, 20),
        ("coronene", 24, 24),
        ("triphenylene", 18, 18),
        ("azulene", 10, 10),
        ("ptcda", 30, 32),
        ("porphine", 24, 26),
        ("h2pc", 40, 42),
        ("h2nc", 56, 58),
    ],
)
def test_library_atom_and_electron_counts(name, pi_atoms, pi_electrons):
    mol = molecule(name)
    assert len(mol.pi_atoms) == pi_atoms
    assert molecule(name.upper()) is mol
    assert mol.pi_electrons == pi_electrons
    assert np.allclose(mol.xyz_nm[:, 2], 0.0)


def test_every_library_molecule_has_chemical_bond_lengths():
    for name in MOLECULE_NAMES:
        xy = molecule(name).xyz_nm[:, :2]
        dist = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
        np.fill_diagonal(dist, np.inf)
        nearest = dist.min(axis=1)
        assert np.all((nearest > 0.115) & (nearest < 0.145)), name
        bonded = (dist < 0.165).sum(axis=1)
        assert set(bonded) <= {1, 2, 3}, name  # sp2 atoms: at most three π neighbours


def test_benzenoid_geometry_and_long_axis():
    xy = molecule("pentacene").xyz_nm[:, :2]
    dist = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    assert np.allclose(dist[(dist > 0) & (dist < 0.165)], 0.140, atol=1e-9)
    extent = np.ptp(xy, axis=0)
    assert extent[0] > 4 * extent[1]  # long axis along x


def test_heteroatom_parameters_on_the_huckel_diagonal():
    mol = molecule("porphine")
    diag = np.diag(huckel_matrix(mol))
    assert sorted(set(np.round(diag[[i for i, t in enumerate(mol.pi_types) if t != "C"]], 3))) == [0.5, 1.5]
    ptcda = molecule("ptcda")
    assert sorted(set(np.round(np.diag(huckel_matrix(ptcda)), 3))) == [0.0, 1.0, 2.0]


def test_degenerate_levels_are_grouped():
    homo = orbital_level("benzene", "HOMO")
    assert homo.degeneracy == 2
    assert homo.energy == pytest.approx(-2.7)  # x = 1: E = α + β
    assert orbital_level("coronene", "LUMO").degeneracy == 2
    assert orbital_level("pentacene", "HOMO").degeneracy == 1
    assert orbital_level("pentacene", "HOMO").energy < orbital_level("pentacene", "LUMO").energy
    assert orbital_level("naphthalene", "homo-1").label == "HOMO-1"


def test_analytic_gradients_match_finite_differences():
    level = orbital_level("azulene", "HOMO")
    rng = np.random.default_rng(3)
    x, y = rng.uniform(-0.5, 0.5, (2, 50))
    z, h = 0.35, 1e-5
    f = orbital_fields(level, x, y, z)[0]
    fd_x = (orbital_fields(level, x + h, y, z)[0, 0] - orbital_fields(level, x - h, y, z)[0, 0]) / (2 * h)
    fd_y = (orbital_fields(level, x, y + h, z)[0, 0] - orbital_fields(level, x, y - h, z)[0, 0]) / (2 * h)
    fd_z = (orbital_fields(level, x, y, z + h)[0, 0] - orbital_fields(level, x, y, z - h)[0, 0]) / (2 * h)
    scale = np.abs(f[1:]).max()
    for analytic, numeric in zip(f[1:], (fd_x, fd_y, fd_z)):
        assert np.max(np.abs(analytic - numeric)) < 1e-6 * scale


def test_vacuum_tail_decays_with_kappa():
    level = orbital_level("benzene", "HOMO")
    z = np.array([3.0, 3.01])
    psi = orbital_fields(level, np.full(2, 0.05), np.zeros(2), z)[0, 0]
    slope = np.log(abs(psi[1]) / abs(psi[0])) / 0.01
    assert slope == pytest.approx(-KAPPA_PER_NM, rel=0.1)  # not a Slater tail (~ -16 /nm)


def _sign_changes(values):
    values = values[np.abs(values) > 1e-3 * np.abs(values).max()]
    return int(np.sum(np.diff(np.sign(values)) != 0))


def test_pentacene_nodal_planes_across_the_long_axis():
    x = np.linspace(-1.3, 1.3, 1301)
    for label, expected in (("HOMO", 4), ("LUMO", 6)):
        psi = orbital_fields(orbital_level("pentacene", label), x, np.full_like(x, 0.1), 0.3)[0, 0]
        assert _sign_changes(psi) == expected, label
    # the HOMO is odd under the long-axis mirror, the LUMO even
    homo = orbital_level("pentacene", "HOMO")
    up = orbital_fields(homo, x, np.full_like(x, 0.1), 0.3)[0, 0]
    down = orbital_fields(homo, x, np.full_like(x, -0.1), 0.3)[0, 0]
    assert np.allclose(up, -down, atol=1e-12)


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="unknown molecule 'unobtainium'.*pentacene"):
        molecule("unobtainium")
    with pytest.raises(ValueError, match="out of range for benzene"):
        orbital_level("benzene", "HOMO-5")
    with pytest.raises(ValueError, match="bad orbital label"):
        orbital_level("benzene", "SOMO")
    with pytest.raises(ValueError, match="z_nm must be a positive height"):
        orbital_fields(orbital_level("benzene"), np.zeros(3), np.zeros(3), -0.2)
