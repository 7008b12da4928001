"""Gaussian cube reading, CubeOrbital sampling against analytic orbitals, the continuation
into vacuum, and cube orbitals imaged like library molecules."""

from __future__ import annotations

import numpy as np
import pytest

from stm_live.io.cube import BOHR_NM, Cube, read_cube, write_cube
from stm_live.simulators.imaging import CubePlacement, Placement, ScanFrame, constant_height_image
from stm_live.simulators.orbitals import CubeOrbital, extend_into_vacuum, molecule, orbital_fields, orbital_level
from stm_live.simulators.vacuum import KAPPA_PER_NM

A_NM = 0.3  # Gaussian width of the test orbital
PLANE_NM = 0.25  # molecular plane height in the cube frame


def _pz(x, y, z):
    """psi = z exp(-r^2/a^2) about (0, 0, PLANE_NM), with its exact gradient."""
    zz = z - PLANE_NM
    e = np.exp(-(x**2 + y**2 + zz**2) / A_NM**2)
    return np.stack([zz * e, zz * e * (-2 * x / A_NM**2), zz * e * (-2 * y / A_NM**2), e * (1 - 2 * zz**2 / A_NM**2)])


def _cube(n=(44, 40, 48), step_nm=0.045, mo=False):
    origin = np.array([-1.0, -0.9, PLANE_NM - 1.05])
    axes = np.eye(3) * step_nm
    atoms = np.array([[-0.07, 0.0, PLANE_NM], [0.07, 0.0, PLANE_NM]])
    blank = Cube(("test", "pz"), np.array([6, 6]), atoms, origin, axes, np.zeros((1, *n)))
    psi = _pz(*blank.positions_nm())[0]
    data = np.stack([psi, -psi]) if mo else psi[None]
    return Cube(("test", "pz"), np.array([6, 6]), atoms, origin, axes, data, mo_indices=(41, 42) if mo else ())


def test_write_read_round_trip_in_nm(tmp_path):
    cube = _cube()
    back = read_cube(write_cube(tmp_path / "pz.cube", cube))
    assert back.shape == cube.shape
    np.testing.assert_allclose(back.origin_nm, cube.origin_nm, atol=1e-6)
    np.testing.assert_allclose(back.axes_nm, cube.axes_nm, atol=1e-6)
    np.testing.assert_allclose(back.atoms_nm, cube.atoms_nm, atol=1e-6)
    np.testing.assert_allclose(back.data, cube.data, rtol=1e-5, atol=1e-9)


def test_negative_counts_mean_angstrom_and_mo_line_is_read(tmp_path):
    text = (
        "c1\nc2\n"
        "   -1    0.0 0.0 0.0\n"  # NATOMS < 0: an MO line follows the atoms
        "   -2    0.5 0.0 0.0\n"  # negative count: lengths in Angstrom
        "   -2    0.0 0.5 0.0\n"
        "   -2    0.0 0.0 0.5\n"
        "    6    6.0  1.0 2.0 3.0\n"
        "    2   7 8\n" + " ".join(str(float(v)) for v in range(16)) + "\n"
    )
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
    assert err[0] < 1e-3 * np.abs(ref[0]).max()  # psi: cubic spline, smooth input
    assert np.all(err[1:] < 2e-3 * np.abs(ref[1:]).max())  # 4th-order differences, h/a=0.15
    # The second orbital is -psi; a point beyond the box reads zero.
    np.testing.assert_allclose(CubeOrbital(cube, mo=1).fields(x, y, z), -f, atol=1e-12)
    assert np.all(orb.fields(np.array([5.0]), np.array([0.0]), np.array([0.2])) == 0)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: "\n".join(t.splitlines()[:4]), "only 4 lines"),
        (lambda t: t.replace("    6    6.0", "    6    six", 1), r"line 7: atom 1 is not numeric"),
        (lambda t: t.rstrip().rsplit(" ", 1)[0] + "\n", "expected 8 voxel values"),
        (lambda t: t.rstrip() + " 1.0x\n", r"line 8: voxel value '1.0x' is not numeric"),
        (lambda t: t.replace("    2    0.0 1.0", "    2.5  0.0 1.0"), "line 5: voxel count"),
    ],
)
def test_malformed_cube_names_the_line(tmp_path, edit, message):
    good = (
        "c1\nc2\n    1    0.0 0.0 0.0\n    2    1.0 0.0 0.0\n    2    0.0 1.0 0.0\n"
        "    2    0.0 0.0 1.0\n    6    6.0 0.0 0.0 0.0\n"
        "1 2 3 4 5 6 7 8\n"
    )
    path = tmp_path / "ok.cube"
    path.write_text(good)
    assert read_cube(path).shape == (2, 2, 2)
    path.write_text(edit(good))
    with pytest.raises(ValueError, match=message) as info:
        read_cube(path)
    assert "ok.cube" in str(info.value)


# ----------------------------------------------------------------- continuation into vacuum
SOURCES = np.array([[0.15, 0.0, -0.12], [-0.15, 0.0, -0.12]])  # below the plane z = 0
SIGNS = (1.0, -1.0)


def _vacuum_solution(x, y, z):
    """An exact solution of (nabla^2 - kappa^2) psi = 0 above the sources, sum of
    +-exp(-kappa r)/r, with its gradient: what a continuation must reproduce."""
    out = np.zeros((4, *np.shape(x)))
    for (a, b, c), sign in zip(SOURCES, SIGNS):
        dx, dy, dz = x - a, y - b, z - c
        r = np.sqrt(dx * dx + dy * dy + dz * dz)
        f = np.exp(-KAPPA_PER_NM * r) / r
        g = -f * (KAPPA_PER_NM + 1 / r) / r
        out += sign * np.stack([f, g * dx, g * dy, g * dz])
    return out


def _grid_cube(values_at, atoms_xy, *, margin_nm=1.1, top_nm=0.6, step_nm=0.02, cut_short_above=None):
    """A cube around ``atoms_xy`` (plane z = 0) holding ``values_at(x, y, z)``; with
    ``cut_short_above`` the values decay an extra exp(-2 kappa dz) above that height, as a
    localised basis set's tail does."""
    lo = np.array([atoms_xy[:, 0].min() - margin_nm, atoms_xy[:, 1].min() - margin_nm, 0.04])
    n = np.round((np.array([*np.ptp(atoms_xy, axis=0) + 2 * margin_nm, top_nm - 0.04])) / step_nm).astype(int) + 1
    x, y, z = lo[:, None, None, None] + np.indices(n) * step_nm
    psi = values_at(x, y, z)
    if cut_short_above is not None:
        psi = psi * np.exp(-2 * KAPPA_PER_NM * np.clip(z - cut_short_above, 0, None))
    atoms = np.c_[atoms_xy, np.zeros(len(atoms_xy))]
    return Cube(("grid", "test"), np.full(len(atoms), 6), atoms, lo, np.eye(3) * step_nm, psi[None])


def test_continuation_into_vacuum_restores_a_tail_the_basis_cut_short():
    cube = _grid_cube(lambda x, y, z: _vacuum_solution(x, y, z)[0], SOURCES[:, :2], cut_short_above=0.2)
    continued, as_is = CubeOrbital(cube, vacuum_from_nm=0.2), CubeOrbital(cube)
    x, y = np.meshgrid(np.linspace(-0.8, 0.8, 33), np.linspace(-0.6, 0.6, 25))
    for height in (0.3, 0.6, 1.0):
        z = np.full_like(x, height)
        exact = _vacuum_solution(x, y, z)
        scale = np.abs(exact).max(axis=(1, 2))
        assert np.all(np.abs(continued.fields(x, y, z)[0] - exact).max(axis=(1, 2)) < 2e-3 * scale)
        if height <= 0.6:  # the cube as it is holds the cut-short tail: far too weak
            assert np.abs(as_is.fields(x, y, z)[0, 0]).max() < 0.5 * scale[0]
    extended = extend_into_vacuum(cube, from_nm=0.2, top_nm=1.2)
    assert extended.data.shape[0] == 1 and extended.axes_nm[2, 2] == pytest.approx(0.02)
    assert extended.origin_nm[2] == pytest.approx(0.0) and extended.shape[2] == 61


def test_continuation_refuses_what_it_cannot_do():
    cube = _grid_cube(lambda x, y, z: _vacuum_solution(x, y, z)[0], SOURCES[:, :2], top_nm=0.3, step_nm=0.05)
    with pytest.raises(ValueError, match=r"must hold the plane 0.5 nm above the molecule"):
        extend_into_vacuum(cube, from_nm=0.5)
    sheared = Cube(
        cube.comment,
        cube.atomic_numbers,
        cube.atoms_nm,
        cube.origin_nm,
        cube.axes_nm + np.array([[0, 0.01, 0], [0, 0, 0], [0, 0, 0]]),
        cube.data,
    )
    with pytest.raises(ValueError, match="axes run along"):
        extend_into_vacuum(sheared)
    with pytest.raises(ValueError, match="from_nm < top_nm"):
        extend_into_vacuum(cube, from_nm=0.2, top_nm=0.1)
    with pytest.raises(ValueError, match="mo index 1 out of range"):
        CubeOrbital(cube, mo=1, vacuum_from_nm=0.2)


def _library_cube(name="naphthalene", label="HOMO", **kw):
    level = orbital_level(name, label)
    m = molecule(name)
    atoms_xy = m.xyz_nm[list(m.pi_atoms)][:, :2]
    return _grid_cube(lambda x, y, z: orbital_fields(level, x, y, z)[0, 0], atoms_xy, **kw)


def test_a_cube_orbital_images_like_the_library_molecule_it_holds():
    orbital = CubeOrbital(_library_cube(top_nm=0.5, step_nm=0.025))  # sampled as it is
    frame = ScanFrame(0.1, -0.05, 2.4, 2.0, angle_deg=10.0, pixels=48, lines=40)
    kw = dict(tip="co", z_nm=0.4, bias_V=-1.0)
    library = constant_height_image([Placement("naphthalene", 0.2, -0.1, 30.0, "HOMO")], frame, **kw)
    from_cube = constant_height_image([CubePlacement(orbital, 0.2, -0.1, 30.0)], frame, **kw)
    assert np.abs(from_cube - library).max() < 5e-3 * library.max()
    moved = constant_height_image([CubePlacement(orbital, 0.2, -0.1, 75.0)], frame, **kw)
    assert np.abs(moved - library).max() > 0.2 * library.max()  # the rotation is applied
    with pytest.raises(ValueError, match="CubePlacement.orbital must be a CubeOrbital"):
        CubePlacement("naphthalene.cube")


def test_evaluate_stmnet_on_a_cube_file(tmp_path):
    """`stm-live evaluate --cube`: the shipped STM-Net on a cube orbital of a held-out
    molecule (perylene's LUMO, sampled to 0.35 nm and continued into vacuum from 0.2 nm)."""
    from typer.testing import CliRunner

    from stm_live.cli import app
    from stm_live.models.metrics import cube_quality
    from stm_live.models.stmnet import load_stmnet

    path = write_cube(tmp_path / "perylene_lumo.cube", _library_cube("perylene", "LUMO", top_nm=0.35, step_nm=0.03))
    result = CliRunner().invoke(
        app,
        ["evaluate", "--model", "stmnet", "--device", "cpu", "--cube", str(path), "--samples", "1"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "perylene_lumo.cube" in result.output and "cube orbitals" in result.output
    summary = cube_quality(load_stmnet("cpu"), [path], samples=2)["summary"]["cube orbitals"]
    assert summary["stmnet"][2] == 8  # 4 evaluation tips x 2 frames
    assert summary["stmnet"][0] > summary["identity"][0] + 8.0  # dB
    assert summary["stmnet"][1] > 0.97

    for args, message in (
        (["--cube", str(tmp_path / "none.cube")], "none.cube does not exist"),
        (["--vacuum-from", "0.3"], "apply to cube files"),
        (["--model", "tipstate", "--cube", str(path)], "STM-Net only"),
    ):
        bad = CliRunner().invoke(app, ["evaluate", *args])
        assert bad.exit_code == 2 and message in bad.output, bad.output


def test_a_scenario_scans_a_cube_orbital_over_the_protocol(tmp_path):
    """`molecules: [{cube: FILE}]` in a scenario: the simulated controller images the cube's
    orbital (on the library's current scale) and serves it over TCP like any molecule."""
    from stm_live.devices.client import NanonisClient
    from stm_live.simulators.imaging import cube_amplitude
    from stm_live.simulators.scenario import ScenarioError, load_scenario
    from stm_live.simulators.server import start_server_thread

    write_cube(tmp_path / "naphthalene_homo.cube", _library_cube(top_nm=0.3, step_nm=0.03))
    common = (
        "tip: {preset: co}\nartifacts: {}\nz_controller: false\nz_nm: 0.45\nbias_V: -1.0\n"
        "frame: {width_nm: 2.4, height_nm: 2.4, pixels: 32, lines: 32}\n"
    )
    (tmp_path / "cube.yaml").write_text(
        "molecules:\n  - {cube: naphthalene_homo.cube, x_nm: 0.1, rotation_deg: 30}\n" + common
    )
    (tmp_path / "library.yaml").write_text(
        "molecules:\n  - {molecule: naphthalene, orbital: HOMO, x_nm: 0.1, rotation_deg: 30}\n" + common
    )
    scenario = load_scenario(tmp_path / "cube.yaml")
    (placed,) = scenario.molecules
    assert isinstance(placed, CubePlacement) and placed.amplitude == pytest.approx(cube_amplitude(placed.orbital))

    def scan(path):
        with start_server_thread(scenario=load_scenario(path), time_scale=20.0) as srv:
            with NanonisClient(srv.host, srv.port) as client:
                client.scan_buffer_set([0], 32, 32)
                client.scan_action("start", "down")
                assert client.scan_wait_end_of_scan(30.0)[0] is False
                return np.asarray(client.scan_frame_data_grab(0, True).data, dtype=np.float64)

    from_cube, library = scan(tmp_path / "cube.yaml"), scan(tmp_path / "library.yaml")
    assert np.isfinite(from_cube).all()
    assert np.corrcoef(from_cube.ravel(), library.ravel())[0, 1] > 0.99  # the same orbital, same place
    # Brightness: an s tip 0.45 nm above sees the pentacene HOMO's peak, the library's calibration.
    from stm_live.simulators.imaging import s_wave_image

    def s_peak(placement):
        return s_wave_image(
            [placement], ScanFrame(0.0, 0.0, 3.0, 3.0, pixels=75, lines=75), z_nm=0.45, bias_V=-1.0
        ).max()

    assert s_peak(placed) == pytest.approx(s_peak(Placement("pentacene", orbital="HOMO")), rel=0.02)
    assert s_peak(CubePlacement(placed.orbital)) > 2 * s_peak(placed)  # the cube's own scale differs

    bad = {
        "{cube: none.cube}": r"molecules\[0\]\.cube: .*none.cube",
        "{cube: naphthalene_homo.cube, molecule: naphthalene}": r"molecules\[0\]\.molecule: a cube entry",
        "{molecule: naphthalene, mo: 2}": r"molecules\[0\]\.mo: only for a cube entry",
    }
    for entry, message in bad.items():
        (tmp_path / "bad.yaml").write_text(f"molecules:\n  - {entry}\n")
        with pytest.raises(ScenarioError, match=message):
            load_scenario(tmp_path / "bad.yaml")
