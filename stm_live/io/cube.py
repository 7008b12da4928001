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
scale for the imaging code, which normalises). A cube's orbital is imaged, and continued
into vacuum, by ``simulators.orbitals.CubeOrbital``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Cube", "read_cube", "write_cube", "BOHR_NM", "ANGSTROM_NM"]

BOHR_NM = 0.0529177210903  # CODATA 2018 Bohr radius
ANGSTROM_NM = 0.1


@dataclass(frozen=True)
class Cube:
    """A cube file's content; lengths in nm, ``data`` shaped ``(n_mo, n1, n2, n3)``."""

    comment: tuple[str, str]
    atomic_numbers: np.ndarray  # (N,) int
    atoms_nm: np.ndarray  # (N, 3)
    origin_nm: np.ndarray  # (3,)
    axes_nm: np.ndarray  # (3, 3), row i = voxel step along index i
    data: np.ndarray  # (n_mo, n1, n2, n3) float64
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
            raise ValueError(f"{path}: line {lineno}: file ends before the {what} line (only {len(lines)} lines)")
        tokens = lines[lineno - 1].split()
        if len(tokens) < count:
            raise ValueError(
                f"{path}: line {lineno}: {what} needs {count} numbers, got {len(tokens)}: {lines[lineno - 1].strip()!r}"
            )
        try:
            return [float(t) for t in tokens[:count]]
        except ValueError:
            raise ValueError(f"{path}: line {lineno}: {what} is not numeric: {lines[lineno - 1].strip()!r}") from None

    if len(lines) < 6:
        raise ValueError(
            f"{path}: only {len(lines)} lines; a cube file needs at least 6 "
            "(2 comments, atom count/origin, 3 axis lines)"
        )
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
            raise ValueError(f"{path}: line {4 + k}: voxel count must be a non-zero integer, got {row[0]:g}")
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
            raise ValueError(
                f"{path}: line {next_line}: file ends before the MO-index line (a negative atom count announces one)"
            )
        tokens = lines[next_line - 1].split()
        try:
            ints = [int(t) for t in tokens]
        except ValueError:
            raise ValueError(
                f"{path}: line {next_line}: MO-index line is not integers: {lines[next_line - 1].strip()!r}"
            ) from None
        if not ints or ints[0] < 1 or len(ints) < 1 + ints[0]:
            raise ValueError(
                f"{path}: line {next_line}: MO-index line must give a count and "
                f"that many indices: {lines[next_line - 1].strip()!r}"
            )
        n_mo, mo_indices = ints[0], tuple(ints[1 : 1 + ints[0]])
        next_line += 1

    body = lines[next_line - 1 :]
    expected = counts[0] * counts[1] * counts[2] * n_mo
    try:
        values = np.array(" ".join(body).split(), dtype=np.float64)
    except ValueError:
        for i, text in enumerate(body):
            for token in text.split():
                try:
                    float(token)
                except ValueError:
                    raise ValueError(f"{path}: line {next_line + i}: voxel value {token!r} is not numeric") from None
        raise
    if values.size != expected:
        raise ValueError(
            f"{path}: line {next_line}: expected {expected} voxel values "
            f"({counts[0]}x{counts[1]}x{counts[2]} x {n_mo} orbital(s)) from here to the end, "
            f"found {values.size}"
        )
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
            out.append(" ".join(f"{v:13.5E}" for v in row[k : k + 6]))
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return path
