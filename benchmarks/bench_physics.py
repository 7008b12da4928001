"""Physics forward model: synthetic (CO-tip, s-wave) pairs per second at 128×128 for a mix
of library molecules (floor target 200 pairs/s), and single-image render times."""

from __future__ import annotations

import time

from stm_live.simulators.imaging import (
    Placement,
    ScanFrame,
    constant_current_image,
    constant_height_image,
    s_wave_image,
)
from stm_live.simulators.pairs import TRAIN_MOLECULES, PairSampler
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
    rows.append(("field cache fill (all train molecules/orbitals/heights)",
                 f"{time.perf_counter() - started:8.1f} s", f"{entries} entries"))
    for modes in (("height",), ("current",), ("height", "current")):
        sampler.modes = modes
        elapsed = _best_of(lambda: sampler.sample(pairs), repeats=2)
        rows.append((f"pairs 128x128, mode {'+'.join(modes)}", f"{pairs / elapsed:8.0f} pairs/s",
                     f"{len(TRAIN_MOLECULES)} molecules, 1-3 per scene"))
    frame = ScanFrame(0.0, 0.0, 5.12, 5.12, pixels=128, lines=128)
    co = tip_preset("co")
    for name in ("pentacene", "h2pc"):
        placement = Placement(name)
        t_height = _best_of(lambda: constant_height_image(placement, frame, co, z_nm=0.45, bias_V=-1.0))
        t_s = _best_of(lambda: s_wave_image(placement, frame, z_nm=0.45, bias_V=-1.0))
        t_current = _best_of(lambda: constant_current_image(placement, frame, co, setpoint_A=2e-11, bias_V=-1.0),
                             repeats=1)
        rows.append((f"{name} 128x128 constant height (CO)", f"{t_height * 1e3:8.1f} ms", ""))
        rows.append((f"{name} 128x128 s-wave target", f"{t_s * 1e3:8.1f} ms", ""))
        rows.append((f"{name} 128x128 constant current (CO)", f"{t_current * 1e3:8.1f} ms", "Newton to 1e-5 nm"))
    width = max(len(r[0]) for r in rows)
    print(f"{'case':<{width}}  {'result':>16}  note   (target >= {PAIR_TARGET_PER_S:.0f} pairs/s)")
    for case, result, note in rows:
        print(f"{case:<{width}}  {result:>16}  {note}")


if __name__ == "__main__":
    main()
