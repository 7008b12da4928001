"""Physics forward model: synthetic (CO-tip, s-wave) pairs per second at 128×128 for a mix
of library molecules (floor target 200 pairs/s), and single-image render times; point
spectra per second and a 32x32-point grid's simulation time (``spectra.simulate``)."""

from __future__ import annotations

import time

import numpy as np

from stm_live.simulators.imaging import (
    Placement,
    ScanFrame,
    constant_current_image,
    constant_height_image,
    s_wave_image,
)
from stm_live.simulators.pairs import TRAIN_MOLECULES, PairSampler
from stm_live.simulators.scenario import load_scenario
from stm_live.simulators.spectra import simulate
from stm_live.simulators.tip import tip_preset

PAIR_TARGET_PER_S = 200.0


def _best_of(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def main(pairs: int = 400) -> None:
    rows = []
    sampler = PairSampler(TRAIN_MOLECULES, size=128, pixel_size_nm=(0.04, 0.08), seed=0)
    started = time.perf_counter()
    entries = sampler.warm_up()
    rows.append(
        (
            "field cache fill (all train molecules/orbitals/heights)",
            f"{time.perf_counter() - started:8.1f} s",
            f"{entries} entries",
        )
    )
    for modes in (("height",), ("current",), ("height", "current")):
        sampler.modes = modes
        elapsed = _best_of(lambda: sampler.sample(pairs), repeats=2)
        rows.append(
            (
                f"pairs 128x128, mode {'+'.join(modes)}",
                f"{pairs / elapsed:8.0f} pairs/s",
                f"{len(TRAIN_MOLECULES)} molecules, 1-3 per scene",
            )
        )
    frame = ScanFrame(0.0, 0.0, 5.12, 5.12, pixels=128, lines=128)
    co = tip_preset("co")
    for name in ("pentacene", "h2pc"):
        placement = Placement(name)
        t_height = _best_of(
            lambda placement=placement: constant_height_image(placement, frame, co, z_nm=0.45, bias_V=-1.0)
        )
        t_s = _best_of(lambda placement=placement: s_wave_image(placement, frame, z_nm=0.45, bias_V=-1.0))
        t_current = _best_of(
            lambda placement=placement: constant_current_image(placement, frame, co, setpoint_A=2e-11, bias_V=-1.0),
            repeats=1,
        )
        rows.append((f"{name} 128x128 constant height (CO)", f"{t_height * 1e3:8.1f} ms", ""))
        rows.append((f"{name} 128x128 s-wave target", f"{t_s * 1e3:8.1f} ms", ""))
        rows.append((f"{name} 128x128 constant current (CO)", f"{t_current * 1e3:8.1f} ms", "Newton to 1e-5 nm"))
    rows += spectroscopy_rows()
    width = max(len(r[0]) for r in rows)
    print(f"{'case':<{width}}  {'result':>16}  note   (target >= {PAIR_TARGET_PER_S:.0f} pairs/s)")
    for case, result, note in rows:
        print(f"{case:<{width}}  {result:>16}  {note}")


def spectroscopy_rows(spectra: int = 200) -> list[tuple[str, str, str]]:
    """Point spectra per second and a 32x32-point grid's simulation time, over the default
    scenario's scene (4 molecules, 16 resonances) under a CO tip, 301-point sweeps."""
    scene = load_scenario().molecules
    co = tip_preset("co")
    sweep = np.linspace(-3.0, 3.0, 301)
    points = np.random.default_rng(0).uniform(-3.5, 3.5, (spectra, 2))
    rows = []
    for mode, height in (
        ("constant height", dict(z_nm=0.5)),
        ("setpoint at -2.5 V", dict(setpoint_A=5e-12, setpoint_bias_V=-2.5)),
    ):
        n = spectra if "z_nm" in height else spectra // 4
        elapsed = _best_of(
            lambda height=height, n=n: [simulate(scene, co, p, sweep, **height) for p in points[:n]], repeats=2
        )
        rows.append((f"point spectra, {mode}", f"{n / elapsed:8.0f} spectra/s", "301 biases, 4 molecules"))
    grid = ScanFrame(0.0, 0.0, 7.0, 7.0, pixels=32, lines=32, direction="up")
    for mode, height in (
        ("constant height", dict(z_nm=0.5)),
        ("setpoint at -2.5 V", dict(setpoint_A=5e-12, setpoint_bias_V=-2.5)),
    ):
        elapsed = _best_of(lambda height=height: simulate(scene, co, grid, sweep, **height), repeats=2)
        rows.append((f"grid 32x32 points x 301 biases, {mode}", f"{elapsed * 1e3:8.1f} ms", "7 nm frame"))
    return rows


if __name__ == "__main__":
    main()
