"""`stm-live reconstruct` end to end on .sxm files: wall time of the command (a fresh process:
imports, read, interpret, network, write), the time it reports for the file itself, and the
process's peak memory, across pixel sizes in and out of STM-Net's scope.

Run: ``python -m benchmarks stmnet`` (with the other STM-Net benchmarks) or
``python -m benchmarks stmnet_files``.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# (pixels, nm per pixel): the 256^2 ladder, a 512^2 frame, the largest frame in
# scope (1024 network pixels a side) and a 2 um overview.
CASES = ((256, 0.02), (256, 0.05), (256, 0.2), (256, 0.8), (512, 0.05), (2048, 0.025), (512, 4.0))
_CHILD = (
    "import resource, runpy, sys\n"
    "sys.argv = ['stm-live'] + sys.argv[1:]\n"
    "try:\n    runpy.run_module('stm_live.cli', run_name='__main__')\n"
    "finally:\n    print('peak_rss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
)


def _frame(path: Path, pixels: int, pitch_nm: float) -> Path:
    from stm_live.io.sxm import scan_from_frames, write_sxm

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:pixels, 0:pixels] * pitch_nm
    side = pixels * pitch_nm
    z = 2e-9 + 3e-12 * xx  # tilted plane, nm -> m below
    for cx, cy in rng.uniform(0.2 * side, 0.8 * side, (6, 2)):
        z = z + 1e-10 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.5)
    z = (z + rng.normal(0, 2e-12, z.shape)).astype(np.float32)
    scan = scan_from_frames(
        {"Z": {"forward": z, "backward": z}},
        units={"Z": "m"},
        center_x_m=0.0,
        center_y_m=0.0,
        width_m=side * 1e-9,
        height_m=side * 1e-9,
        bias_V=-1.0,
    )
    scan.header["Z-CONTROLLER"] = "\tName\ton\tSetpoint\n\tlog Current\t1\t2.000E-11 A"
    return write_sxm(path, scan)


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for pixels, pitch in CASES:
            src = _frame(Path(tmp) / f"f{pixels}_{pitch}.sxm", pixels, pitch)
            t0 = time.perf_counter()
            done = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    _CHILD,
                    "reconstruct",
                    str(src),
                    "-o",
                    str(Path(tmp) / "out.npy"),
                    "--device",
                    "cpu",
                ],
                capture_output=True,
                text=True,
                timeout=600,
            )
            wall = time.perf_counter() - t0
            text = done.stdout + done.stderr
            peak = re.search(r"peak_rss_kib (\d+)", text)
            own = re.search(r"; network ([\d.]+) s;", text)
            status = re.search(r"^(ok|flagged|skipped|failed)", text, re.M)
            rows.append(
                (
                    pixels,
                    pitch,
                    status.group(1) if status else f"exit {done.returncode}",
                    own.group(1) if own else "-",
                    wall,
                    int(peak.group(1)) / 1024 if peak else float("nan"),
                )
            )
    print("stm-live reconstruct, one .sxm per run (Z, constant current), CPU, fresh process each")
    print(f"{'frame':>10} {'nm/px':>6} {'frame nm':>9} {'status':>8} {'network s':>9} {'command s':>10} {'peak MB':>8}")
    for pixels, pitch, status, own, wall, peak in rows:
        print(
            f"{pixels:>5}x{pixels:<4} {pitch:>6g} {pixels * pitch:>9.4g} {status:>8} {own:>9} "
            f"{wall:>10.2f} {peak:>8.0f}"
        )
    print(
        "(network s: STM-Net on the file, as the command reports it; command s: the whole "
        "process, imports and model load included; skipped = outside STM-Net's scope, said in one line)"
    )


if __name__ == "__main__":
    main()
