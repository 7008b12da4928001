"""Gaussian cube reading and CubeOrbital sampling against an analytic p_z orbital."""

from __future__ import annotations

import numpy as np
import pytest

from stm_live.io.cube import BOHR_NM, Cube, CubeOrbital, read_cube, write_cube

A_NM = 0.3            # Gaussian width of the test orbital
PLANE_NM = 0.25       # molecular plane height in the cube frame


def _pz(x, y, z):
    """psi = z exp(-r^2/a^2) about (0, 0, PLANE_NM), with its exact gradient."""
    zz = z - PLANE_NM
    e = np.exp(-(x**2 + y**2 + zz**2) / A_NM**2)
    return np.stack([zz * e, zz * e * (-2 * x / A_NM**2), zz * e * (-2 * y / A_NM**2),
                     e * (1 - 2 * zz**2 / A_NM**2)])


def _cube(n=(44, 40, 48), step_nm=0.045, mo=False):
    origin = np.array([-1.0, -0.9, PLANE_NM - 1.05])
    axes = np.eye(3) * step_nm
    atoms = np.array([[-0.07, 0.0, PLANE_NM], [0.07, 0.0, PLANE_NM]])
    blank = Cube(("test", "pz"), np.array([6, 6]), atoms, origin, axes, np.zeros((1, *n)))
    psi = _pz(*blank.positions_nm())[0]
    data = np.stack([psi, -psi]) if mo else psi[None]
    return Cube(("test", "pz"), np.array([6, 6]), atoms, origin, axes, data,
                mo_indices=(41, 42) if mo else ())


def test_write_read_round_trip_in_nm(tmp_path):
    cube = _cube()
    back = read_cube(write_cube(tmp_path / "pz.cube", cube))
    assert back.shape == cube.shape
    np.testing.assert_allclose(back.origin_nm, cube.origin_nm, atol=1e-6)
    np.testing.assert_allclose(back.axes_nm, cube.axes_nm, atol=1e-6)
    np.testing.assert_allclose(back.atoms_nm, cube.atoms_nm, atol=1e-6)
    np.testing.assert_allclose(back.data, cube.data, rtol=1e-5, atol=1e-9)


def test_negative_counts_mean_angstrom_and_mo_line_is_read(tmp_path):
    text = ("c1\nc2\n"
            "   -1    0.0 0.0 0.0\n"           # NATOMS < 0: an MO line follows the atoms
            "   -2    0.5 0.0 0.0\n"           # negative count: lengths in Angstrom
            "   -2    0.0 0.5 0.0\n"
            "   -2    0.0 0.0 0.5\n"
            "    6    6.0  1.0 2.0 3.0\n"
            "    2   7 8\n"
            + " ".join(str(float(v)) for v in range(16)) + "\n")
    path = tmp_path / "ang.cube"
    path.write_text(text)
    cube = read_cube(path)
    np.testing.assert_allclose(cube.axes_nm, np.eye(3) * 0.05)
    np.testing.assert_allclose(cube.atoms_nm, [[0.1, 0.2, 0.3]])
    assert cube.mo_indices == (7, 8) and cube.data.shape == (2, 2, 2, 2)
    # MO index runs fastest: voxel (0,0,1) holds values 2 and 3.
    assert cube.data[0, 0, 0, 1] == 2.0 and cube.data[1, 0, 0, 1] == 3.0
    path.write_text(text.replace("-2    0.5", "2    0.5"))
    np.testing.assert_allclose(read_cube(path).axes_nm[0], [0.5 * BOHR_NM, 0, 0])


def test_cube_orbital_matches_analytic_values_and_gradients(tmp_path):
    cube = read_cube(write_cube(tmp_path / "pz.cube", _cube(mo=True)))
    orb = CubeOrbital(cube)  # plane from the atoms' mean z, centre from their mean x, y
    assert orb.plane_z_nm == pytest.approx(PLANE_NM, abs=1e-6)
    x, y = np.meshgrid(np.linspace(-0.4, 0.4, 9), np.linspace(-0.3, 0.3, 7))
    z = np.full_like(x, 0.2)
    f = orb.fields(x, y, z)
    assert f.shape == (1, 4, 7, 9)
    ref = _pz(x, y, z + PLANE_NM)
    # Errors relative to the largest psi and the largest gradient component sampled.
    err = np.abs(f[0] - ref).max(axis=(1, 2))
    assert err[0] < 1e-3 * np.abs(ref[0]).max()         # psi: cubic spline, smooth input
    assert np.all(err[1:] < 2e-3 * np.abs(ref[1:]).max())  # 4th-order differences, h/a=0.15
    # The second orbital is -psi; a point beyond the box reads zero.
    np.testing.assert_allclose(CubeOrbital(cube, mo=1).fields(x, y, z), -f, atol=1e-12)
    assert np.all(orb.fields(np.array([5.0]), np.array([0.0]), np.array([0.2])) == 0)


@pytest.mark.parametrize("edit, message", [
    (lambda t: "\n".join(t.splitlines()[:4]), "only 4 lines"),
    (lambda t: t.replace("    6    6.0", "    6    six", 1), r"line 7: atom 1 is not numeric"),
    (lambda t: t.rstrip().rsplit(" ", 1)[0] + "\n", "expected 8 voxel values"),
    (lambda t: t.rstrip() + " 1.0x\n", r"line 8: voxel value '1.0x' is not numeric"),
    (lambda t: t.replace("    2    0.0 1.0", "    2.5  0.0 1.0"), "line 5: voxel count"),
])
def test_malformed_cube_names_the_line(tmp_path, edit, message):
    good = ("c1\nc2\n    1    0.0 0.0 0.0\n    2    1.0 0.0 0.0\n    2    0.0 1.0 0.0\n"
            "    2    0.0 0.0 1.0\n    6    6.0 0.0 0.0 0.0\n"
            "1 2 3 4 5 6 7 8\n")
    path = tmp_path / "ok.cube"
    path.write_text(good)
    assert read_cube(path).shape == (2, 2, 2)
    path.write_text(edit(good))
    with pytest.raises(ValueError, match=message) as info:
        read_cube(path)
    assert "ok.cube" in str(info.value)
