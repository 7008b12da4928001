"""Riding through link faults (issue 21): lines lost and doubled, recovery time, frames done.

1. A session of live frames (default 10), 256 x 256, Current + Z, scanned at 20 lines/s
   (0.025 s forward + 0.025 s backward) by the simulated controller on 127.0.0.1, behind its
   fault layer with N faults of each kind (delay, stall, drop, refuse, close_mid_reply), run
   as the demo runs frames: ``live_frame`` one after the other in an ``AcquisitionSession``
   that ``watch``es the device, the journal fsync'ed, the sim profile's link settings (5 s base
   reply deadline, ``link.max_outage_s`` 30 s). The controller runs in this process (its fault
   log and buffers are read directly).

   Stalls and delays hold a reply 6 s, past the deadline they meet, so each is an outage; each
   refusal (10 s) comes with a drop at its line (only a client that reconnects meets a
   refusal). A line is lost if its journaled data (the last copy) differs from the controller's
   frame; doubled if it was journaled more than once. Recovery is wall time from the link's
   "back" to the first line of the interrupted frame journaled that was not before.
   ``--time-scale X`` compresses the scan clock (the quick run uses 2: 40 lines/s of wall
   time): lines lost, doubled and frames completed do not depend on it, nor does recovery much
   (the lines scanned during an outage wait in the controller's buffer: it is the reconnect
   and the first grab, not the line rate); the table says which scale ran.
2. ``stm-live demo --quick`` in a subprocess beside two busy-loop processes (CPU hogs) that
   this benchmark starts and kills: whether it completes (every frame "success", every line
   in), and its wall time.

Run: ``python -m benchmarks faults`` (about 3.5 minutes on a 2-core machine);
``python -m benchmarks faults --quick`` or ``STM_BENCH_FAULTS_QUICK=1`` (5 frames at time
scale 2, one fault of each kind; about 2 minutes). Options: ``--frames``, ``--faults N``,
``--time-scale X``, ``--no-demo``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

KINDS = ("delay", "close_mid_reply", "stall", "drop", "refuse")
SIZE = 256
CHANNELS = {"Current": 0, "Z": 30}
LINE_S = 0.025  # simulated forward (and backward) time per line: 20 lines/s
HELD_S = 6.0  # stall and delay: past the 5 s base deadline (+ a 256 x 256 grab's transfer time)
REFUSE_S = 10.0


def plan_faults(n: int, frames: int, lines: int = SIZE):
    """``n`` faults of each kind. The line faults (stall, drop, refuse) take the last frames,
    one each, at mid-frame (more than one per frame only when there are too few frames: a
    held reply outlasts 200 lines, a second fault in its frame would land inside its outage);
    the grab faults (delay, close_mid_reply) fire at grab counts spread over the frames before,
    reckoning two grabs a line (a follower that misses a line event grabs less than the four
    a line of two channels takes). Returns (faults, kind of each): a refusal's drop counts as the
    refusal's."""
    from stm_live.simulators.faults import Fault

    by_line = [k for _ in range(n) for k in KINDS if k in ("stall", "drop", "refuse")]
    by_grab = [k for _ in range(n) for k in KINDS if k in ("delay", "close_mid_reply")]
    first = max(0, frames - len(by_line))
    faults, kinds = [], []
    for i, kind in enumerate(by_line):
        frame = (first + i) % frames
        line = int(lines * (0.5, 0.2, 0.8)[(first + i) // frames % 3])
        if kind == "stall":
            new = [Fault("stall", line=line, frame=frame, seconds=HELD_S)]
        elif kind == "drop":
            new = [Fault("drop", line=line, frame=frame)]
        else:
            new = [Fault("drop", line=line, frame=frame), Fault("refuse", line=line, frame=frame, seconds=REFUSE_S)]
        faults += new
        kinds += [kind] * len(new)
    grabs = 2 * lines  # per frame, reckoned low
    for i, kind in enumerate(by_grab):
        nth = i * max(1, first) * grabs // len(by_grab) + grabs // 2
        more = {"seconds": HELD_S} if kind == "delay" else {}
        faults.append(Fault(kind, commands=("Scan.FrameDataGrab",), nth=nth, **more))
        kinds.append(kind)
    return faults, kinds


class _Timeline:
    """Outages and journaled lines, on one clock (monotonic)."""

    def __init__(self, layer):
        self.layer = layer
        self.outages: list[list] = []  # [down time, faults fired by then, back time or None]
        self.lines: list[tuple[float, str, int]] = []  # (time, run uid, line)
        self.runs: dict[str, list[float]] = {}  # run uid -> [start time, stop time]
        self._primary: dict[str, str] = {}  # descriptor uid -> run uid

    def link(self, event) -> None:  # a LinkState subscriber (called on client threads)
        if event.kind == "down":
            self.outages.append([time.monotonic(), len(self.layer.fired), None])
        elif event.kind == "back" and self.outages:
            self.outages[-1][2] = time.monotonic()

    def __call__(self, name: str, doc: dict) -> None:  # a RunEngine subscriber, after the journal
        now = time.monotonic()
        if name == "start":
            self.runs[doc["uid"]] = [now, float("inf")]
        elif name == "stop" and doc["run_start"] in self.runs:
            self.runs[doc["run_start"]][1] = now
        elif name == "descriptor" and doc.get("name") == "primary":
            self._primary[doc["uid"]] = doc["run_start"]
        elif name == "event" and doc["descriptor"] in self._primary:
            self.lines.append((now, self._primary[doc["descriptor"]], int(doc["data"]["stm_line_index"])))

    def recoveries(self) -> list[tuple[int | None, float]]:
        """Per outage that ended inside a frame with lines still to come: (index of the last
        fault fired before it began, or None; seconds from "back" to the first line of that
        frame journaled that was not journaled before)."""
        out = []
        for _, n_fired, back in self.outages:
            run = next((uid for uid, (t0, t1) in self.runs.items() if t0 <= (back or -1) < t1), None)
            if run is None:
                continue
            seen = {line for t, uid, line in self.lines if uid == run and t < back}
            new = next((t for t, uid, line in self.lines if uid == run and t >= back and line not in seen), None)
            if new is not None:
                out.append((self.layer.fired[n_fired - 1]["fault"] if n_fired else None, new - back))
        return out


def _session(frames: int, n: int, time_scale: float, data_dir: Path) -> dict:
    from stm_live.config import load_profile
    from stm_live.devices.stm import NanonisSTM
    from stm_live.plans import live_frame
    from stm_live.session import AcquisitionSession
    from stm_live.simulators.scenario import load_scenario
    from stm_live.simulators.server import start_server_thread
    from stm_live.store import read_journal, run_data

    faults, kinds = plan_faults(n, frames)
    scenario = load_scenario("default")
    scenario = replace(scenario, time_per_line_s=LINE_S)
    server = start_server_thread(scenario=scenario, seed=0, time_scale=time_scale, faults=faults)
    profile = load_profile("sim")
    stm = NanonisSTM(server.host, server.port, name="stm", profile=profile, timeout=profile.timeout_s)
    stm.lines.line_timeout = 60.0  # as the demo: a busy CPU is not a stalled scan
    timeline = _Timeline(server.server.faults)
    stm.link.subscribe(timeline.link)
    session = AcquisitionSession(data_dir, progress=False)
    session.RE.subscribe(timeline)  # after the journal: the line is on disk
    session.watch(stm)
    frame = (0.0, 0.0, 7e-9, 7e-9, 0.0)
    results, errors = [], []
    t0 = time.perf_counter()
    try:
        for k in range(frames):
            journaled = len(timeline.lines)
            try:
                (uid,) = session(
                    live_frame(
                        stm,
                        frame=frame,
                        pixels=SIZE,
                        lines=SIZE,
                        channels=list(CHANNELS),
                        md={"purpose": "bench_faults", "frame": k},
                    )
                )
            except Exception as exc:  # reported in the table; the session goes on, as the demo's
                errors.append(f"frame {k}: {type(exc).__name__}: {exc}")
                if len(timeline.lines) == journaled:
                    errors.append("not one line of that frame came: stopping")
                    break
                continue
            truth = {
                (ch, fwd): server.controller.frame_data(idx, fwd)[1]
                for ch, idx in CHANNELS.items()
                for fwd in (True, False)
            }
            run = run_data(read_journal(data_dir / "journal" / f"{uid}.journal"))
            wrong = np.zeros(SIZE, bool)
            for (ch, fwd), wire in truth.items():
                key = f"stm_{ch.lower()}_{'fwd' if fwd else 'bwd'}"
                got = run.images[key] if fwd else run.images[key][:, ::-1]
                wrong |= ~np.all((got == wire) | (np.isnan(got) & np.isnan(wire)), axis=1)
            wrong |= ~np.isin(np.arange(SIZE), run.lines_read)
            results.append(
                {"status": run.exit_status, "lost": int(wrong.sum()), "doubled": run.events - len(set(run.lines_read))}
            )
    finally:
        wall = time.perf_counter() - t0
        session.close()
        stm.close()
        server.stop()
    planned = {k: kinds.count(k) for k in KINDS}
    planned["refuse"] //= 2  # a refusal and its drop are one fault
    fired = {
        k: len(
            {
                f["fault"]
                for f in server.server.faults.fired
                if kinds[f["fault"]] == k and (k != "refuse" or f["kind"] == "refuse")
            }
        )
        for k in KINDS
    }
    return {
        "frames": frames,
        "results": results,
        "errors": errors,
        "planned": planned,
        "fired": fired,
        "kinds": kinds,
        "recoveries": timeline.recoveries(),
        "outages": stm.link.outages,
        "outage_s": stm.link.outage_total_s,
        "wall_s": wall,
    }


def _demo_under_hogs(tmp: Path) -> dict:
    """``stm-live demo --quick`` beside two busy loops."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    out, data = tmp / "demo_output", tmp / "demo_data"
    try:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "stm_live.cli", "demo", "--quick", "--out", str(out), "--data-dir", str(data)],
            capture_output=True,
            text=True,
            timeout=900,
        )
        wall = time.perf_counter() - t0
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait(10)
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    frames = summary.get("frames", [])
    complete = (
        proc.returncode == 0
        and bool(frames)
        and all(f["exit_status"] == "success" and f["lines"] == f["lines_total"] for f in frames)
    )
    tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] if proc.returncode else []
    return {
        "returncode": proc.returncode,
        "complete": complete,
        "wall_s": wall,
        "frames": frames,
        "outages": summary.get("link", {}).get("outages"),
        "errors": summary.get("errors", []),
        "tail": tail[0] if tail else "",
    }


def _ms(values) -> str:
    return f"{np.median(values) * 1e3:.0f} / {np.max(values) * 1e3:.0f}" if len(values) else "-"


def main(argv: list[str] | None = None) -> dict:
    from rich.table import Table

    from stm_live.console import quiet_suspensions, table_console

    quick = os.environ.get("STM_BENCH_FAULTS_QUICK", "") not in ("", "0")
    parser = argparse.ArgumentParser(prog="python -m benchmarks faults", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", default=quick, help="5 frames, 1 fault of each kind")
    parser.add_argument("--frames", type=int, default=None, help="live frames (default 10; quick 5)")
    parser.add_argument("--faults", type=int, default=None, help="faults of each kind (default 2; quick 1)")
    parser.add_argument("--time-scale", type=float, default=None, help="scan clock speed-up (default 1; quick 2)")
    parser.add_argument("--no-demo", action="store_true", help="skip the demo under two CPU hogs")
    args = parser.parse_args(argv or [])
    frames = args.frames or (5 if args.quick else 10)
    n = args.faults if args.faults is not None else (1 if args.quick else 2)
    scale = args.time_scale or (2.0 if args.quick else 1.0)
    console = table_console()
    print(
        f"{frames} frames {SIZE} x {SIZE} (Current + Z), 20 lines/s simulated, time scale {scale:g} "
        f"({20 * scale:g} lines/s wall); {n} fault(s) of each kind; load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        with quiet_suspensions():  # bluesky's five lines per suspension
            s = _session(frames, n, scale, Path(tmp) / "session")
        demo = None if args.no_demo else _demo_under_hogs(Path(tmp))

    rec = s["recoveries"]
    t = Table(
        title=f"Session under injected faults: {frames} frames, {SIZE}x{SIZE}, 20 lines/s "
        f"(time scale {scale:g}); recovery = link back -> first new line, median / max ms"
    )
    for col in ("fault", "injected", "fired", "outages it began", "recovery ms"):
        t.add_column(col)
    for kind in KINDS:
        times = [dt for i, dt in rec if i is not None and s["kinds"][i] == kind]
        t.add_row(kind, str(s["planned"][kind]), str(s["fired"][kind]), str(len(times)), _ms(times))
    t.add_row(
        "all", str(sum(s["planned"].values())), str(sum(s["fired"].values())), str(len(rec)), _ms([dt for _, dt in rec])
    )
    console.print(t)
    res = s["results"]
    lost, doubled = sum(r["lost"] for r in res), sum(r["doubled"] for r in res)
    done = sum(r["status"] == "success" and r["lost"] == 0 for r in res)
    t = Table(title="Lines and frames (targets: 0 lost, 0 doubled, every frame)")
    for col in ("lines lost", "lines doubled", "frames completed", "link outages", "time down s", "session wall s"):
        t.add_column(col)
    t.add_row(
        str(lost), str(doubled), f"{done} / {frames}", str(s["outages"]), f"{s['outage_s']:.1f}", f"{s['wall_s']:.1f}"
    )
    console.print(t)
    for err in s["errors"]:
        print(f"  {err}")
    out = {
        "lines_lost": lost,
        "lines_doubled": doubled,
        "frames_completed": done,
        "frames": frames,
        "recovery_median_s": float(np.median([dt for _, dt in rec])) if rec else None,
        "recovery_max_s": max((dt for _, dt in rec), default=None),
        "outages": s["outages"],
    }
    if demo is not None:
        t = Table(title="stm-live demo --quick beside two CPU hogs")
        for col in ("completes", "frames success / lines in", "link outages", "wall s"):
            t.add_column(col)
        frames_ok = ", ".join(f"{f['exit_status']} {f['lines']}/{f['lines_total']}" for f in demo["frames"]) or "-"
        t.add_row(
            "yes" if demo["complete"] else f"NO (exit {demo['returncode']})",
            frames_ok,
            str(demo["outages"]),
            f"{demo['wall_s']:.1f}",
        )
        console.print(t)
        if demo["tail"]:
            print(f"  demo: {demo['tail']}")
        for err in demo["errors"]:
            print(f"  demo: {err}")
        out.update(demo_complete=demo["complete"], demo_wall_s=demo["wall_s"])
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main(sys.argv[1:])
