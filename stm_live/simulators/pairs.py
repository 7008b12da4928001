"""Fast synthetic training pairs: (CO-like tip image, pristine s-wave |ψ|²) of one scene.

Speed comes from one observation: every tip signal is a quadratic form in the four
channels f = (ψ, ∂xψ/κ, ∂yψ/κ, ∂zψ/κ) (Chen's derivative rule, see ``tip``), so per
(molecule, orbital, height) we cache the Gram fields M_ab = Σ_partners f_a f_b (10 unique
components) on a canonical grid in the molecule frame. A tip with channel weights w seen
through a rotation T (molecule rotation, then tip tilt) gives

    S = Σ_ab (Tᵀ D T)_ab M_ab,   D = ``TipState.channel_matrix()`` (diag(w), plus s–p_z coherence)

i.e. one 10-term weighted sum, then a bilinear resample (``map_coordinates``) into the
output frame at the sample's position, rotation and pixel size. Constant-current Z maps
are solved from a stack of heights 0.1 nm apart by inverse quadratic interpolation of
z(ln I) (ln I is nearly linear in z, slope ≈ −2κ). Results match ``imaging`` to within
the canonical grid interpolation error (a few % of the peak; isocurrent z within 0.01 nm).

Augmentation is by construction: every sample draws its pixel size, molecule positions
and rotations, tip, height, mode, substrate pattern and noise afresh.
Call ``warm_up()`` once to fill the cache (≈ 300 MB and a few seconds for the training set).

Inputs are in physical units: current (A) for mode "height", tip height (nm) for mode
"current" (consumers convert with I ∝ exp(2κz)). Targets are Σ|ψ|² at the same height,
scaled to a maximum of 1 (``meta["target_scale"]`` is the factor divided out).
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import gaussian_filter, map_coordinates

from stm_live.simulators import artifacts
from stm_live.simulators.imaging import CURRENT_SCALE_A_PER_V, SUBSTRATE_SIGNAL, Z_MIN_NM, clear_of_others
from stm_live.simulators.orbitals import MOLECULE_NAMES, levels_fields, molecule, orbital_level
from stm_live.simulators.tip import TipState
from stm_live.simulators.vacuum import KAPPA_PER_NM

HELD_OUT_MOLECULES: tuple[str, ...] = ("perylene", "triphenylene", "h2nc")
TRAIN_MOLECULES: tuple[str, ...] = tuple(n for n in MOLECULE_NAMES if n not in HELD_OUT_MOLECULES)
DEFAULT_ORBITALS: tuple[str, ...] = ("HOMO-2", "HOMO-1", "HOMO", "LUMO", "LUMO+1", "LUMO+2")

HEIGHT_STEP_NM = 0.025  # heights are quantised so cached fields are reused
CURRENT_LEVEL_STEP_NM = 0.1  # z stack spacing for constant-current maps
MARGIN_NM = 0.7  # canonical grid margin around the atoms: at z <= 0.6 nm the tail beyond is < 1e-3 of the peak
_PAIRS = [(a, b) for a in range(4) for b in range(a, 4)]  # the 10 unique Gram components


@dataclass
class PairBatch:
    inputs: np.ndarray  # (n, size, size) float32, A ("height") or nm ("current")
    targets: np.ndarray  # (n, size, size) float32, Σ|ψ|² scaled to max 1
    meta: list[dict] = field(default_factory=list)

    def __iter__(self):  # ``inputs, targets = sampler.sample(n)`` as in docs/interfaces.md
        return iter((self.inputs, self.targets))


def _range(name: str, value, lo: float = 0.0, hi: float = math.inf) -> tuple[float, float]:
    pair = (float(value), float(value)) if np.isscalar(value) else tuple(float(v) for v in value)
    if len(pair) != 2 or not (lo <= pair[0] <= pair[1] <= hi):
        raise ValueError(f"{name} must be a value or (low, high) within [{lo}, {hi}], got {value}")
    return pair


def _probability(name: str, value: float) -> float:
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
    return float(value)


class PairSampler:
    """Random scenes of 1..max_molecules library molecules imaged with random tips.

    Parameters
    ----------
    molecules : names from ``orbitals.MOLECULE_NAMES`` (default ``TRAIN_MOLECULES``).
    size : output pixels per side.
    pixel_size_nm : a value or a (low, high) range drawn uniformly per sample.
    heights : tip height range (nm) above the molecular plane.
    s_share : range of the s fraction of the random tip (the rest is p_xy, a little p_z).
    coherent_prob, tilt_prob : chance of a coherent s–p_z tip, of a tilted tip (≤ 25°).
    modes : subset of ("height", "current").
    noise : relative noise range (fraction of the input's peak-to-peak).
    max_molecules : molecules per scene, drawn from 1..max_molecules.
    orbitals : labels drawn from (skipped where a molecule lacks them).
    tips : optional fixed list of ``TipState`` to draw from instead of random CO-like tips
        (double and blunt tips are honoured).
    grid_step_nm : canonical grid spacing (smaller is more accurate, slower to fill).
    cache_mb : memory cap of the field cache (least recently used entries are dropped).
    """

    def __init__(
        self,
        molecules=TRAIN_MOLECULES,
        *,
        size: int = 128,
        pixel_size_nm=(0.04, 0.08),
        seed: int = 0,
        heights=(0.25, 0.6),
        s_share=(0.0, 0.6),
        coherent_prob: float = 0.15,
        tilt_prob: float = 0.15,
        modes=("height", "current"),
        noise=(0.0, 0.1),
        max_molecules: int = 3,
        orbitals=DEFAULT_ORBITALS,
        tips=None,
        substrate_prob: float = 0.5,
        grid_step_nm: float = 0.025,
        cache_mb: float = 512.0,
    ):
        names = [molecules] if isinstance(molecules, str) else list(molecules)
        if not names:
            raise ValueError("molecules is empty: give at least one library molecule name")
        for n in names:
            molecule(n)
        if int(size) != size or size < 8:
            raise ValueError(f"size must be an integer >= 8, got {size}")
        self.size = int(size)
        self.pixel_size_nm = _range("pixel_size_nm", pixel_size_nm, 1e-3, 1.0)
        if self.pixel_size_nm[0] <= 0:
            raise ValueError(f"pixel_size_nm must be positive, got {pixel_size_nm}")
        self.heights = _range("heights", heights, 0.15, 1.5)
        self.s_share = _range("s_share", s_share, 0.0, 1.0)
        self.noise = _range("noise", noise, 0.0, 1.0)
        self.coherent_prob = _probability("coherent_prob", coherent_prob)
        self.tilt_prob = _probability("tilt_prob", tilt_prob)
        self.substrate_prob = _probability("substrate_prob", substrate_prob)
        modes = (modes,) if isinstance(modes, str) else tuple(modes)
        if not modes or any(m not in ("height", "current") for m in modes):
            raise ValueError(f"modes must be a non-empty subset of ('height', 'current'), got {modes}")
        self.modes = modes
        if int(max_molecules) != max_molecules or max_molecules < 1:
            raise ValueError(f"max_molecules must be a positive integer, got {max_molecules}")
        self.max_molecules = int(max_molecules)
        if tips is not None:
            tips = list(tips)
            if not tips or not all(isinstance(t, TipState) for t in tips):
                raise ValueError("tips must be a non-empty list of TipState")
        self.tips = tips
        if not 0.005 <= grid_step_nm <= 0.1:
            raise ValueError(f"grid_step_nm must be in [0.005, 0.1], got {grid_step_nm}")
        self.grid_step_nm = float(grid_step_nm)
        self.cache_bytes = float(cache_mb) * 2**20
        # (molecule, label) choices split by bias sign; labels a molecule lacks are skipped
        self.choices: dict[int, list[tuple[str, str]]] = {-1: [], 1: []}
        for n in names:
            for label in orbitals:
                try:
                    level = orbital_level(n, label)
                except ValueError as exc:
                    if "bad orbital label" in str(exc):
                        raise
                    continue
                self.choices[-1 if level.label.startswith("HOMO") else 1].append((n, level.label))
        if not self.choices[-1] and not self.choices[1]:
            raise ValueError(f"none of the orbitals {tuple(orbitals)} exist for {names}")
        self.rng = np.random.default_rng(seed)
        self._cache: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._cache_used = 0

    # ------------------------------------------------------------------ field cache

    @staticmethod
    def _half_extent_nm(name: str) -> tuple[float, float]:
        """Half widths (x, y) of the canonical grid: the atoms' extent plus the tail margin."""
        xyz = molecule(name).xyz_nm
        return float(np.abs(xyz[:, 0]).max()) + MARGIN_NM, float(np.abs(xyz[:, 1]).max()) + MARGIN_NM

    def gram_fields(self, name: str, label: str, z_nm: float) -> np.ndarray:
        """Cached (10, Gy, Gx) float32 Gram components M_ab on the canonical molecule-frame grid.

        A miss computes every sampled orbital of the molecule at that height in one pass
        (they share the atomic basis functions, the expensive part)."""
        key = (name, label, round(z_nm / HEIGHT_STEP_NM))
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        labels = [lab for sign in (-1, 1) for n, lab in self.choices[sign] if n == name]
        if label not in labels:
            labels.append(label)
        half_x, half_y = self._half_extent_nm(name)
        x, y = np.meshgrid(
            np.arange(-half_x, half_x + 1e-9, self.grid_step_nm), np.arange(-half_y, half_y + 1e-9, self.grid_step_nm)
        )  # [row = y, col = x]
        all_fields = levels_fields([orbital_level(name, lab) for lab in labels], x, y, key[2] * HEIGHT_STEP_NM)
        requested = None
        for lab, f in zip(labels, all_fields):
            f[:, 1:] /= KAPPA_PER_NM
            gram = np.stack([np.einsum("k...,k...->...", f[:, a], f[:, b]) for a, b in _PAIRS]).astype(np.float32)
            entry = (name, lab, key[2])
            if lab == label:
                requested = gram
            if entry not in self._cache:
                self._cache[entry] = gram
                self._cache_used += gram.nbytes
        self._cache.move_to_end(key)
        while self._cache_used > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cache_used -= old.nbytes
        return requested

    def cache_heights(self) -> list[float]:
        """Every height (nm) that sampling can ask the cache for."""
        lo, hi = self.heights
        steps = range(round(lo / HEIGHT_STEP_NM), round(hi / HEIGHT_STEP_NM) + 1)
        heights = {round(k * HEIGHT_STEP_NM, 6) for k in steps}
        if "current" in self.modes:
            level = Z_MIN_NM + 0.05
            while level <= hi + 0.15 + 1e-9:
                heights.add(round(round(level / HEIGHT_STEP_NM) * HEIGHT_STEP_NM, 6))
                level += CURRENT_LEVEL_STEP_NM
        return sorted(heights)

    def warm_up(self) -> int:
        """Fill the field cache for every (molecule, orbital, height) sampling can use; returns
        the number of entries. Optional: ``sample`` fills the cache lazily otherwise."""
        for sign in (-1, 1):
            for name, label in self.choices[sign]:
                for z in self.cache_heights():
                    self.gram_fields(name, label, z)
        return len(self._cache)

    # --------------------------------------------------------------------- drawing

    def _random_tip(self) -> TipState:
        rng = self.rng
        if self.tips is not None:
            return self.tips[rng.integers(len(self.tips))]
        s = rng.uniform(*self.s_share)
        p = 1.0 - s
        pz = p * rng.uniform(0.0, 0.1)
        asym = rng.uniform(-0.1, 0.1)  # slight p_x/p_y imbalance of real CO tips
        pxy = p - pz
        tilt = rng.uniform(5.0, 25.0) if rng.random() < self.tilt_prob else 0.0
        return TipState(
            s=s,
            px=pxy * (0.5 + asym),
            py=pxy * (0.5 - asym),
            pz=pz,
            coherent=bool(rng.random() < self.coherent_prob),
            tilt_deg=tilt,
            tilt_azimuth_deg=rng.uniform(0, 360),
            name="random",
        )

    def _scene(self, width_nm: float):
        rng = self.rng
        sign = int(rng.choice([s for s in (-1, 1) if self.choices[s]]))
        placed: list[tuple[str, str, float, float, float]] = []
        for _ in range(int(rng.integers(1, self.max_molecules + 1))):
            name, label = self.choices[sign][rng.integers(len(self.choices[sign]))]
            r = molecule(name).radius_nm
            for _attempt in range(12):
                span = max(width_nm / 2 - r - 0.2, 0.0) if placed else width_nm * 0.15
                x, y = rng.uniform(-span, span, 2)
                if clear_of_others(name, x, y, [(pn, px, py) for pn, _, px, py, _ in placed]):
                    placed.append((name, label, float(x), float(y), float(rng.uniform(0, 360))))
                    break
        return sign, placed

    # ------------------------------------------------------------------- rendering

    @staticmethod
    def _quadratic_form(tip: TipState, rotation_deg: float) -> np.ndarray:
        """10 coefficients q_ab so that S = Σ q_ab M_ab for this tip and molecule rotation."""
        t = math.radians(rotation_deg)
        mol_rot = np.array([[math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0], [0, 0, 1]])
        transform = np.eye(4)
        transform[1:, 1:] = tip.p_frame().T @ mol_rot  # tip-frame gradient = Rtipᵀ Rmol g_local
        quad = transform.T @ tip.channel_matrix() @ transform
        return np.array([quad[a, b] * (1 if a == b else 2) for a, b in _PAIRS])

    def _coords(self, name: str, x0: float, y0: float, rot_deg: float, pixel: float, shift=(0.0, 0.0)):
        """Output box (row slice, col slice) that sees this molecule, and the canonical-grid
        (row, col) coordinates of its pixels; None when the molecule is out of the frame."""
        half_x, half_y = self._half_extent_nm(name)
        reach = math.hypot(half_x, half_y)
        cx, cy = x0 - shift[0], y0 - shift[1]  # where the molecule appears in the image
        clip = lambda a: min(max(a, 0), self.size)  # noqa: E731
        rs = slice(
            clip(int(math.floor(self.size / 2 - (cy + reach) / pixel))),
            clip(int(math.ceil(self.size / 2 - (cy - reach) / pixel))),
        )
        cs = slice(
            clip(int(math.floor((cx - reach) / pixel + self.size / 2))),
            clip(int(math.ceil((cx + reach) / pixel + self.size / 2))),
        )
        if rs.start >= rs.stop or cs.start >= cs.stop:
            return None
        x = (np.arange(cs.start, cs.stop) + 0.5 - self.size / 2) * pixel - cx
        y = (self.size / 2 - np.arange(rs.start, rs.stop) - 0.5) * pixel - cy
        t = math.radians(rot_deg)
        u = math.cos(t) * x[None, :] + math.sin(t) * y[:, None]
        v = -math.sin(t) * x[None, :] + math.cos(t) * y[:, None]
        return rs, cs, np.stack([(v + half_y) / self.grid_step_nm, (u + half_x) / self.grid_step_nm])

    def _render(self, placed, tip: TipState, heights, pixel: float, *, target: bool = False) -> np.ndarray:
        """Tip signal (or, with ``target``, Σ|ψ|²) of the scene at each height: (len(heights), size, size)."""
        out = np.zeros((len(heights), self.size, self.size))
        apex = (0.0, 0.0) if target else tip.apex_offset_nm()
        shifts = [(apex, 1.0)]
        if not target and tip.double_strength > 0:
            dx, dy = tip.double_offset_nm
            shifts.append(((apex[0] + dx, apex[1] + dy), tip.double_strength))
        for name, label, x0, y0, rot in placed:
            q = None if target else self._quadratic_form(tip, rot).astype(np.float32)
            boxes = [(self._coords(name, x0, y0, rot, pixel, shift), weight) for shift, weight in shifts]
            for j, z in enumerate(heights):
                gram = self.gram_fields(name, label, z)
                # target: |ψ|² = M_00; einsum avoids multithreaded BLAS overhead on this thin product
                signal = gram[0] if target else np.einsum("c,cij->ij", q, gram)
                for box, weight in boxes:
                    if box is None:
                        continue
                    rs, cs, coords = box
                    out[j, rs, cs] += weight * map_coordinates(signal, coords, order=1, mode="constant", cval=0.0)
        if not target and tip.apex_width_nm > 0:
            out = gaussian_filter(out, (0, tip.apex_width_nm / pixel, tip.apex_width_nm / pixel), mode="nearest")
        return out

    def _substrate(self, pixel: float, corrugation: float, angle: float, phase) -> np.ndarray:
        if corrugation == 0:
            return np.full((self.size, self.size), SUBSTRATE_SIGNAL)
        axis = (np.arange(self.size) + 0.5 - self.size / 2) * pixel
        x, y = np.meshgrid(axis, -axis)
        a = math.radians(angle)
        k = 2 * math.pi / 0.398
        u = x * math.cos(a) + y * math.sin(a) + phase[0]
        v = -x * math.sin(a) + y * math.cos(a) + phase[1]
        # same NaCl(100)-like pattern as imaging.Substrate, without the e^{−2κz} factor
        return SUBSTRATE_SIGNAL * (1 + corrugation * 0.5 * (np.cos(k * u) + np.cos(k * v)))

    def _constant_current(self, placed, tip, z_nm, pixel, background) -> tuple[np.ndarray, float]:
        """Z map (nm) whose current equals a setpoint a little below the peak current at z_nm."""
        decay = lambda z: np.exp(-2 * KAPPA_PER_NM * np.asarray(z))  # noqa: E731
        peak = self._render(placed, tip, [z_nm], pixel)[0] + background * decay(z_nm)
        setpoint_signal = float(peak.max()) * self.rng.uniform(0.3, 0.9)
        # stack from just below where the background alone gives the setpoint, to above the molecule
        z_floor = math.log(float(background.min()) / setpoint_signal) / (2 * KAPPA_PER_NM)
        step = CURRENT_LEVEL_STEP_NM
        # levels sit on a fixed grid (0.15, 0.25, ...) so the cache holds few distinct heights
        lowest = max(Z_MIN_NM + 0.05, step * math.floor((z_floor - 0.07) / step) + 0.05)
        lowest = min(lowest, step * math.floor((z_nm - step - 0.05) / step + 1e-6) + 0.05)
        levels = np.arange(lowest, z_nm + 0.15 + 1e-9, step)
        levels = np.round(levels / HEIGHT_STEP_NM) * HEIGHT_STEP_NM
        stack = self._render(placed, tip, levels, pixel) + background[None] * decay(levels)[:, None, None]
        log_signal = np.log(stack)
        target = math.log(setpoint_signal)
        above = np.sum(log_signal > target, axis=0)  # ln I falls with z: levels still above the setpoint
        # inverse quadratic interpolation z(ln I) through the three levels around the crossing
        # (ln I curves near the molecule; linear interpolation over 0.1 nm errs by ~15 % in I)
        m = np.clip(above - 1, 1, len(levels) - 2)[None]
        l0, l1, l2 = (np.take_along_axis(log_signal, m + d, 0)[0] for d in (-1, 0, 1))
        z0, z1, z2 = (levels[m[0] + d] for d in (-1, 0, 1))
        t = target
        safe = lambda a: np.where(np.abs(a) < 1e-9, 1e-9, a)  # noqa: E731
        z_map = (
            z0 * (t - l1) * (t - l2) / safe((l0 - l1) * (l0 - l2))
            + z1 * (t - l0) * (t - l2) / safe((l1 - l0) * (l1 - l2))
            + z2 * (t - l0) * (t - l1) / safe((l2 - l0) * (l2 - l1))
        )
        return np.clip(z_map, Z_MIN_NM, levels[-1] + 0.5), setpoint_signal

    def sample(self, n: int) -> PairBatch:
        """``n`` pairs: inputs (n, size, size) float32, targets (n, size, size) float32, meta."""
        if int(n) != n or n < 1:
            raise ValueError(f"n must be a positive integer, got {n}")
        rng = self.rng
        inputs = np.empty((n, self.size, self.size), np.float32)
        targets = np.empty_like(inputs)
        meta: list[dict] = []
        for i in range(int(n)):
            pixel = float(rng.uniform(*self.pixel_size_nm))
            z = round(rng.uniform(*self.heights) / HEIGHT_STEP_NM) * HEIGHT_STEP_NM
            z = min(max(z, self.heights[0]), self.heights[1])
            mode = self.modes[rng.integers(len(self.modes))]
            tip = self._random_tip()
            sign, placed = self._scene(self.size * pixel)
            bias = float(sign) * float(rng.uniform(0.5, 2.5))
            corrugation = float(rng.uniform(0.0, 0.3)) if rng.random() < self.substrate_prob else 0.0
            background = self._substrate(pixel, corrugation, rng.uniform(0, 90), rng.uniform(0, 0.398, 2))
            target = self._render(placed, tip, [z], pixel, target=True)[0]
            scale = float(target.max()) or 1.0
            targets[i] = target / scale
            item = {
                "molecules": [p[0] for p in placed],
                "orbitals": [p[1] for p in placed],
                "positions_nm": [(p[2], p[3]) for p in placed],
                "rotations_deg": [p[4] for p in placed],
                "tip": tip.name,
                "tip_state": dataclasses.asdict(tip),
                "s_fraction": tip.s_fraction,
                "coherent": tip.coherent,
                "tilt_deg": tip.tilt_deg,
                "z_nm": z,
                "mode": mode,
                "bias_V": bias,
                "pixel_size_nm": pixel,
                "substrate_corrugation": corrugation,
                "target_scale": scale,
            }
            if mode == "height":
                signal = self._render(placed, tip, [z], pixel)[0] + background * math.exp(-2 * KAPPA_PER_NM * z)
                image = CURRENT_SCALE_A_PER_V * abs(bias) * signal
            else:
                image, setpoint_signal = self._constant_current(placed, tip, z, pixel, background)
                item["setpoint_A"] = CURRENT_SCALE_A_PER_V * abs(bias) * setpoint_signal
            level = float(rng.uniform(*self.noise))
            if level > 0:
                span = float(np.ptp(image)) or 1.0
                image = artifacts.white_noise(image, level * span, rng)
                image = artifacts.pink_noise(image, 0.5 * level * span, rng)
                image = artifacts.line_offsets(image, 0.3 * level * span, rng)
            item["noise"] = level
            inputs[i] = image
            meta.append(item)
        return PairBatch(inputs, targets, meta)
