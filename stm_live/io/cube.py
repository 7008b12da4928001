"""Gaussian cube files: a volumetric orbital from DFT, usable wherever a Hückel orbital is.

Format (Gaussian ``cubegen``; also written by ORCA, VASP tools, Multiwfn, ...)::

    comment line 1
    comment line 2
    NATOMS  ox oy oz  [NVAL]        NATOMS < 0: an MO-index line follows the atoms
    N1  a1x a1y a1z                  Ni > 0: lengths in bohr; Ni < 0: lengths in Å
    N2  a2x a2y a2z
    N3  a3x a3y a3z
    Z  charge  x y z                 |NATOMS| lines
    [NMO  mo_1 ... mo_NMO]           only when NATOMS < 0
    values, N1*N2*N3*NMO of them, index 3 fastest (then the MO index fastest of all)

Coordinates are converted to nm on reading; voxel values are kept as they are (arbitrary
scale for the imaging code, which normalises).

Vacuum tails: a DFT orbital in a Gaussian (or any localised) basis decays far too steeply a
few Å above the molecule, where the tip is. :func:`extend_into_vacuum` keeps the cube up to
a plane close to the molecule and continues it above with the exact vacuum solution
(∇² − κ²)ψ = 0, the same physics as the Hückel orbitals' tails in ``simulators.orbitals``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

__all__ = ["Cube", "CubeOrbital", "read_cube", "write_cube", "extend_into_vacuum", "BOHR_NM",
           "ANGSTROM_NM", "VACUUM_FROM_NM"]

BOHR_NM = 0.0529177210903  # CODATA 2018 Bohr radius
ANGSTROM_NM = 0.1
# Height above the molecular plane from which a cube is continued into vacuum by default:
# outside the atoms' cores, below any tip height used for orbital imaging (>= 0.25 nm).
VACUUM_FROM_NM = 0.2


@dataclass(frozen=True)
class Cube:
    """A cube file's content; lengths in nm, ``data`` shaped ``(n_mo, n1, n2, n3)``."""

    comment: tuple[str, str]
    atomic_numbers: np.ndarray  # (N,) int
    atoms_nm: np.ndarray        # (N, 3)
    origin_nm: np.ndarray       # (3,)
    axes_nm: np.ndarray         # (3, 3), row i = voxel step along index i
    data: np.ndarray            # (n_mo, n1, n2, n3) float64
    mo_indices: tuple[int, ...] = ()

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape[1:])

    def positions_nm(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cartesian (x, y, z) of every voxel, each shaped ``(n1, n2, n3)``."""
        idx = np.indices(self.shape, dtype=np.float64)
        xyz = self.origin_nm[:, None, None, None] + np.einsum("iabc,ij->jabc", idx, self.axes_nm)
        return xyz[0], xyz[1], xyz[2]


def read_cube(path: str | os.PathLike) -> Cube:
    """Read a Gaussian cube file; malformed files raise ``ValueError`` naming the line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read cube file: {exc}") from exc

    def numbers(lineno: int, count: int, what: str) -> list[float]:
        # lineno is 1-based, as an editor shows it
        if lineno > len(lines):
            raise ValueError(f"{path}: line {lineno}: file ends before the {what} line "
                             f"(only {len(lines)} lines)")
        tokens = lines[lineno - 1].split()
        if len(tokens) < count:
            raise ValueError(f"{path}: line {lineno}: {what} needs {count} numbers, got "
                             f"{len(tokens)}: {lines[lineno - 1].strip()!r}")
        try:
            return [float(t) for t in tokens[:count]]
        except ValueError:
            raise ValueError(f"{path}: line {lineno}: {what} is not numeric: "
                             f"{lines[lineno - 1].strip()!r}") from None

    if len(lines) < 6:
        raise ValueError(f"{path}: only {len(lines)} lines; a cube file needs at least 6 "
                         "(2 comments, atom count/origin, 3 axis lines)")
    head = numbers(3, 4, "atom count and origin")
    natoms_signed = int(head[0])
    if head[0] != natoms_signed or natoms_signed == 0:
        raise ValueError(f"{path}: line 3: atom count must be a non-zero integer, got {head[0]:g}")
    natoms = abs(natoms_signed)
    axes, counts = [], []
    for k in range(3):
        row = numbers(4 + k, 4, f"axis {k + 1}")
        n = int(row[0])
        if row[0] != n or n == 0:
            raise ValueError(f"{path}: line {4 + k}: voxel count must be a non-zero integer, "
                             f"got {row[0]:g}")
        counts.append(n)
        axes.append(row[1:])
    # Gaussian convention: a negative count means lengths in Å, positive in bohr.
    scale = ANGSTROM_NM if counts[0] < 0 else BOHR_NM
    counts = [abs(n) for n in counts]

    z_numbers, xyz = [], []
    for a in range(natoms):
        row = numbers(7 + a, 5, f"atom {a + 1}")
        z_numbers.append(int(row[0]))
        xyz.append(row[2:5])
    next_line = 7 + natoms
    mo_indices: tuple[int, ...] = ()
    n_mo = 1
    if natoms_signed < 0:
        if next_line > len(lines):
            raise ValueError(f"{path}: line {next_line}: file ends before the MO-index line "
                             "(a negative atom count announces one)")
        tokens = lines[next_line - 1].split()
        try:
            ints = [int(t) for t in tokens]
        except ValueError:
            raise ValueError(f"{path}: line {next_line}: MO-index line is not integers: "
                             f"{lines[next_line - 1].strip()!r}") from None
        if not ints or ints[0] < 1 or len(ints) < 1 + ints[0]:
            raise ValueError(f"{path}: line {next_line}: MO-index line must give a count and "
                             f"that many indices: {lines[next_line - 1].strip()!r}")
        n_mo, mo_indices = ints[0], tuple(ints[1:1 + ints[0]])
        next_line += 1

    body = lines[next_line - 1:]
    expected = counts[0] * counts[1] * counts[2] * n_mo
    try:
        values = np.array(" ".join(body).split(), dtype=np.float64)
    except ValueError:
        for i, text in enumerate(body):
            for token in text.split():
                try:
                    float(token)
                except ValueError:
                    raise ValueError(f"{path}: line {next_line + i}: voxel value {token!r} is "
                                     "not numeric") from None
        raise
    if values.size != expected:
        raise ValueError(
            f"{path}: line {next_line}: expected {expected} voxel values "
            f"({counts[0]}x{counts[1]}x{counts[2]} x {n_mo} orbital(s)) from here to the end, "
            f"found {values.size}")
    data = values.reshape(counts[0], counts[1], counts[2], n_mo).transpose(3, 0, 1, 2)
    return Cube(
        comment=(lines[0], lines[1]),
        atomic_numbers=np.asarray(z_numbers, dtype=int),
        atoms_nm=np.asarray(xyz, dtype=np.float64).reshape(natoms, 3) * scale,
        origin_nm=np.asarray(head[1:4]) * scale,
        axes_nm=np.asarray(axes, dtype=np.float64) * scale,
        data=np.ascontiguousarray(data),
        mo_indices=mo_indices,
    )


def write_cube(path: str | os.PathLike, cube: Cube) -> Path:
    """Write ``cube`` in bohr (the Gaussian default), six values per line."""
    path = Path(path)
    n_mo = cube.data.shape[0]
    n1, n2, n3 = cube.shape
    natoms = len(cube.atomic_numbers)
    mo = bool(cube.mo_indices) or n_mo > 1
    out = [cube.comment[0], cube.comment[1]]
    o = cube.origin_nm / BOHR_NM
    out.append(f"{-natoms if mo else natoms:5d} {o[0]:12.6f} {o[1]:12.6f} {o[2]:12.6f}")
    for n, ax in zip((n1, n2, n3), cube.axes_nm / BOHR_NM):
        out.append(f"{n:5d} {ax[0]:12.6f} {ax[1]:12.6f} {ax[2]:12.6f}")
    for z, p in zip(cube.atomic_numbers, cube.atoms_nm / BOHR_NM):
        out.append(f"{int(z):5d} {float(z):12.6f} {p[0]:12.6f} {p[1]:12.6f} {p[2]:12.6f}")
    if mo:
        idx = cube.mo_indices or tuple(range(1, n_mo + 1))
        out.append(" ".join(str(i) for i in (n_mo, *idx)))
    flat = cube.data.transpose(1, 2, 3, 0).reshape(n1 * n2, n3 * n_mo)
    for row in flat:  # Gaussian breaks lines every 6 values within each (i1, i2) column
        for k in range(0, row.size, 6):
            out.append(" ".join(f"{v:13.5E}" for v in row[k:k + 6]))
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return path


def _derivative(volume: np.ndarray, axis: int) -> np.ndarray:
    """d/d(index) along ``axis``: 4th-order central differences (error ~h^4 f^(5)/30, so
    a cube at the usual 0.1-0.2 bohr spacing gives gradients as good as its values),
    2nd-order one-sided at the two outermost planes."""
    d = np.gradient(volume, axis=axis, edge_order=2)
    v = np.moveaxis(volume, axis, 0)
    dm = np.moveaxis(d, axis, 0)  # a view: writing into it fills d
    dm[2:-2] = (v[:-4] - 8 * v[1:-3] + 8 * v[3:-1] - v[4:]) / 12.0
    return d


def extend_into_vacuum(cube: Cube, *, mo: int = 0, plane_z_nm: float | None = None,
                       from_nm: float = VACUUM_FROM_NM, top_nm: float = 1.2, step_nm: float = 0.02,
                       kappa_per_nm: float | None = None) -> Cube:
    """One orbital of ``cube`` on a regular ``step_nm`` grid from the molecular plane to
    ``top_nm`` above it: sampled from the cube up to ``from_nm`` (rounded to the grid), and
    above it the cube's plane at that height propagated into vacuum, each lateral Fourier component
    ψ(q) decaying as exp(−sqrt(κ² + q²) Δz) (the solution of (∇² − κ²)ψ = 0 above a plane).

    The cube's axes must be aligned with x, y, z (as cubegen and most codes write them);
    the plane defaults to the atoms' mean z. The returned cube holds the one orbital.
    """
    from stm_live.simulators.orbitals import KAPPA_PER_NM

    kappa = KAPPA_PER_NM if kappa_per_nm is None else float(kappa_per_nm)
    if not 0 <= mo < cube.data.shape[0]:
        raise ValueError(f"mo index {mo} out of range: cube holds {cube.data.shape[0]} orbital(s)")
    if not np.allclose(cube.axes_nm, np.diag(np.diag(cube.axes_nm)), atol=1e-9) or np.any(np.diag(cube.axes_nm) <= 0):
        raise ValueError("extend_into_vacuum needs a cube whose voxel axes run along +x, +y, +z; "
                         f"this one has axes (nm) {cube.axes_nm.tolist()}")
    if not 0 < from_nm < top_nm or step_nm <= 0 or min(cube.shape[:2]) < 2:
        raise ValueError(f"need 0 < from_nm < top_nm, step_nm > 0 and >= 2 voxels along x and y, got "
                         f"from_nm={from_nm}, top_nm={top_nm}, step_nm={step_nm}, cube grid {cube.shape}")
    atoms_z = cube.atoms_nm[:, 2].mean() if len(cube.atoms_nm) else 0.0
    plane = float(atoms_z if plane_z_nm is None else plane_z_nm)
    steps = np.diag(cube.axes_nm)
    lo, hi = cube.origin_nm, cube.origin_nm + (np.asarray(cube.shape) - 1) * steps
    n_source = max(1, round(from_nm / step_nm))  # the plane propagated from: from_nm on the grid
    zs = plane + step_nm * np.arange(max(n_source + 2, round(top_nm / step_nm) + 1))
    if not lo[2] <= zs[n_source] <= hi[2]:
        raise ValueError(f"the cube spans z {lo[2]:.3f}..{hi[2]:.3f} nm; it must hold the plane "
                         f"{from_nm} nm above the molecule (z = {zs[n_source]:.3f} nm)")
    nx, ny = (int(np.floor((hi[i] - lo[i]) / step_nm)) + 1 for i in (0, 1))
    xs, ys = lo[0] + step_nm * np.arange(nx), lo[1] + step_nm * np.arange(ny)
    # Below the source plane: the cube's own values on the new grid (cubic spline).
    gx, gy, gz = np.meshgrid(xs, ys, np.clip(zs[:n_source + 1], lo[2], hi[2]), indexing="ij")
    index = (np.stack([gx, gy, gz]) - lo[:, None, None, None]) / steps[:, None, None, None]
    below = ndimage.map_coordinates(cube.data[mo], index.reshape(3, -1), order=3, mode="nearest")
    below = below.reshape(gx.shape)
    # Above it: zero-padded to twice the box, so the periodic FFT folds no tail back in.
    px, py = 2 * nx, 2 * ny
    spectrum = np.fft.rfft2(below[..., -1], s=(px, py))
    qx = 2 * np.pi * np.fft.fftfreq(px, d=step_nm)
    qy = 2 * np.pi * np.fft.rfftfreq(py, d=step_nm)
    decay = np.sqrt(kappa**2 + qx[:, None] ** 2 + qy[None, :] ** 2)
    above = [np.fft.irfft2(spectrum * np.exp(-decay * (z - zs[n_source])), s=(px, py))[:nx, :ny]
             for z in zs[n_source + 1:]]
    volume = np.concatenate([below, np.stack(above, axis=-1)], axis=-1)
    return Cube(cube.comment, cube.atomic_numbers, cube.atoms_nm, np.array([xs[0], ys[0], zs[0]]),
                np.eye(3) * step_nm, volume[None], (cube.mo_indices[mo],) if cube.mo_indices else ())


class CubeOrbital:
    """A cube orbital sampled like ``simulators.orbitals.orbital_fields``.

    ``fields(x_nm, y_nm, z_nm)`` returns ``(1, 4, *x.shape)``: ψ, ∂ψ/∂x, ∂ψ/∂y, ∂ψ/∂z.
    x, y are relative to the molecule's centre (atoms' mean x, y); z is the height above
    the molecular plane (atoms' mean z unless ``plane_z_nm`` is given, in cube
    coordinates). Points outside the cube's box read 0 (the orbital has decayed there
    for a box that holds its tails; check ``cube`` bounds for tall tip heights).
    ``vacuum_from_nm``: continue the orbital into vacuum above that height
    (:func:`extend_into_vacuum`, 1.2 nm above the plane); None samples the cube as it is.
    """

    def __init__(self, cube: Cube, *, plane_z_nm: float | None = None, mo: int = 0,
                 vacuum_from_nm: float | None = None):
        if not 0 <= mo < cube.data.shape[0]:
            raise ValueError(f"mo index {mo} out of range: cube holds {cube.data.shape[0]} "
                             "orbital(s)")
        if vacuum_from_nm is not None:
            cube, mo = extend_into_vacuum(cube, mo=mo, plane_z_nm=plane_z_nm, from_nm=vacuum_from_nm), 0
        if min(cube.shape) < 4:
            raise ValueError(f"cube grid {cube.shape} too small for cubic interpolation "
                             "(need >= 4 voxels per axis)")
        self.cube = cube
        self.center_nm = cube.atoms_nm.mean(axis=0) if len(cube.atoms_nm) else np.zeros(3)
        self.plane_z_nm = float(self.center_nm[2] if plane_z_nm is None else plane_z_nm)
        # r = origin + A^T i  =>  i = M (r - origin), M = inv(A^T); grad_r = M^T grad_i.
        self._to_index = np.linalg.inv(cube.axes_nm.T)
        volume = cube.data[mo]
        grad_i = [_derivative(volume, axis) for axis in range(3)]
        grad_r = np.einsum("ji,j...->i...", self._to_index, np.stack(grad_i))
        # Spline coefficients once, so each fields() call is a cheap prefilter=False lookup.
        self._coeffs = [ndimage.spline_filter(v, order=3, mode="nearest")
                        for v in (volume, *grad_r)]

    def fields(self, x_nm, y_nm, z_nm) -> np.ndarray:
        x, y, z = np.broadcast_arrays(np.asarray(x_nm, dtype=np.float64),
                                      np.asarray(y_nm, dtype=np.float64),
                                      np.asarray(z_nm, dtype=np.float64))
        shape = x.shape
        r = np.stack([x.ravel() + self.center_nm[0], y.ravel() + self.center_nm[1],
                      z.ravel() + self.plane_z_nm])
        idx = self._to_index @ (r - self.cube.origin_nm[:, None])
        upper = np.asarray(self.cube.shape, dtype=np.float64)[:, None] - 1
        inside = np.all((idx >= 0) & (idx <= upper), axis=0)
        out = np.zeros((1, 4, r.shape[1]), dtype=np.float64)
        for k, coeffs in enumerate(self._coeffs):
            out[0, k] = ndimage.map_coordinates(coeffs, idx, order=3, mode="nearest",
                                                prefilter=False)
        out[..., ~inside] = 0.0
        return out.reshape(1, 4, *shape)
