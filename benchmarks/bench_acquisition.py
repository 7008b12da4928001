"""Acquisition overhead: RunEngine + TCP + durable journal, 512 px per line.

Two measurements against the simulated controller on 127.0.0.1:

* saturated: the controller runs far ahead (time scale 2000), so the RunEngine never
  waits for the scan; the interval between consecutive durable (journaled + fsync'ed)
  events is the whole per-line cost: trigger/read/save on the RunEngine, the follower's
  TCP grabs on its thread, msgpack + fsync in the journal.
* paced: 50 lines/s from the controller (0.01 s forward + 0.01 s backward), a full frame;
  every line must arrive, and the latency from "line in hand" to "line durable" is shown.

Run: ``python -m benchmarks acquisition`` (or ``make bench``).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import numpy as np
from bluesky import RunEngine

from stm_live.devices.stm import NanonisSTM
from stm_live.plans import live_frame
from stm_live.store import Journal, JournalWriter, read_journal, run_data

PIXELS = 512
CHANNELS = ["Current", "Z"]


@contextmanager
def _controller(time_scale: float):
    """The simulated controller in its own process, as a real one is another machine
    (in-process, its physics and encoding would compete with acquisition for the GIL)."""
    code = ("from stm_live.simulators.server import serve_forever; "
            f"serve_forever(host='127.0.0.1', port=0, time_scale={time_scale!r}, seed=0)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        line = proc.stdout.readline()  # "simulated Nanonis controller on HOST:PORT (...)"
        match = re.search(r" on ([\d.]+):(\d+) ", line)
        if not match:
            raise RuntimeError(f"simulated controller did not start: {line!r}")
        yield match.group(1), int(match.group(2))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _acquire(time_scale: float, lines: int, line_time_s: float, data_dir, fsync=True):
    with _controller(time_scale) as (host, port):
        stm = NanonisSTM(host, port, name="stm")
        try:
            return _acquire_with(stm, lines, line_time_s, data_dir, fsync)
        finally:
            stm.close()


def _acquire_with(stm, lines, line_time_s, data_dir, fsync):
    RE = RunEngine({})
    journal = JournalWriter(data_dir, fsync=fsync)
    RE.subscribe(journal)
    durable: list[tuple[float, float, int]] = []  # (durable time, line-in-hand time, row)

    def after_journal(name, doc):  # subscribed after the journal: the event is on disk
        if name == "event":
            durable.append((time.time(), doc["timestamps"]["stm_line_index"],
                            doc["data"]["stm_line_index"]))

    RE.subscribe(after_journal)
    stm.client.scan_speed_set(0.0, 0.0, line_time_s, line_time_s, "time", 1.0)
    t0 = time.perf_counter()
    (uid,) = RE(live_frame(stm, frame=(0, 0, 10e-9, 10e-9, 0), pixels=PIXELS,
                           lines=lines, channels=CHANNELS))
    wall = time.perf_counter() - t0
    data = run_data(read_journal(journal.path_for(uid)))
    return durable, data, wall


def _event_validation_ms(repeats: int = 200) -> np.ndarray:
    """What event-model's schema check adds to composing one event of 4 x 512 float32
    arrays (the RunEngine always validates). jsonschema's ``unevaluatedProperties`` builds
    an error message, a full ``repr``, for every array, and numpy prints up to 1000
    elements in full."""
    import event_model

    data_keys = {k: {"source": "sim", "dtype": "array", "shape": [PIXELS]} for k in "abcd"}
    descriptor = event_model.compose_run().compose_descriptor(data_keys=data_keys, name="primary")
    data = {k: np.zeros(PIXELS, np.float32) for k in "abcd"}
    stamps = dict.fromkeys(data, time.time())
    cost = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        descriptor.compose_event(data=data, timestamps=stamps, validate=True)
        t1 = time.perf_counter()
        descriptor.compose_event(data=data, timestamps=stamps, validate=False)
        cost.append((t1 - t0) - (time.perf_counter() - t1))
    return np.array(cost) * 1e3


def _baselines() -> tuple[np.ndarray, np.ndarray]:
    """What this machine charges for the parts we do not control: a bare RunEngine
    event (checkpoint + trigger_and_read of 4 x 512 float32 soft signals) and one
    fsync'ed journal record of that size."""
    import bluesky.plan_stubs as bps
    import bluesky.preprocessors as bpp
    from ophyd import Component as Cpt
    from ophyd import Device, Signal

    zeros = np.zeros(PIXELS, np.float32)

    class Soft(Device):
        a = Cpt(Signal, value=zeros)
        b = Cpt(Signal, value=zeros)
        c = Cpt(Signal, value=zeros)
        d = Cpt(Signal, value=zeros)

    soft = Soft(name="soft")
    RE = RunEngine({})
    stamps = []
    RE.subscribe(lambda name, doc: stamps.append(time.perf_counter()) if name == "event"
                 else None)

    @bpp.run_decorator()
    def bare():
        for _ in range(200):
            yield from bps.checkpoint()
            yield from bps.trigger_and_read([soft])

    RE(bare())
    with tempfile.TemporaryDirectory() as tmp:
        journal = Journal(os.path.join(tmp, "x.journal"))
        doc = {"data": {k: np.random.rand(PIXELS).astype(np.float32) for k in "abcd"}}
        cost = []
        for _ in range(100):
            t0 = time.perf_counter()
            journal.append("event", doc)
            cost.append(time.perf_counter() - t0)
        journal.close()
    return np.diff(stamps) * 1e3, np.array(cost) * 1e3


def _stats(ms: np.ndarray) -> str:
    return (f"median {np.median(ms):6.2f} ms   p99 {np.percentile(ms, 99):6.2f} ms   "
            f"max {ms.max():6.2f} ms")


def main() -> dict:
    results = {}
    bare, fsync = _baselines()
    print(f"machine baselines (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores):")
    print(f"  bare RunEngine event (4 x {PIXELS} float32): {_stats(bare)}")
    print(f"  journal record incl. fdatasync:            {_stats(fsync)}")
    validation = _event_validation_ms()
    print(f"  of the bare event, event-model validation: {_stats(validation)}")
    results["bare_runengine_median_ms"] = float(np.median(bare))
    results["fsync_median_ms"] = float(np.median(fsync))
    results["event_validation_median_ms"] = float(np.median(validation))
    with tempfile.TemporaryDirectory() as tmp:
        lines = 128
        durable, data, wall = _acquire(2000.0, lines, 0.1, tmp)
        t = np.array([d[0] for d in durable])
        per_line = np.diff(t) * 1e3
        print(f"saturated, {PIXELS} px x {lines} lines, {len(CHANNELS)} channels x 2 dirs:")
        print(f"  per-line overhead (RE + TCP + journal): {_stats(per_line)}")
        print(f"  frame wall {wall:.2f} s incl. configuration; "
              f"lines journaled {len(set(data.lines_read))}/{lines}")
        results["overhead_median_ms"] = float(np.median(per_line))
        results["overhead_p99_ms"] = float(np.percentile(per_line, 99))
        durable, data, wall = _acquire(2000.0, lines, 0.1, tmp, fsync=False)
        per_line = np.diff(np.array([d[0] for d in durable])) * 1e3
        print(f"  same without fsync (the disk's share):  {_stats(per_line)}")
        results["overhead_nofsync_median_ms"] = float(np.median(per_line))

        lines = 256
        durable, data, wall = _acquire(1.0, lines, 0.01, tmp)
        lat = np.array([(d[0] - d[1]) * 1e3 for d in durable])
        t = np.array([d[0] for d in durable])
        rate = (len(t) - 1) / (t[-1] - t[0])
        lost = lines - len(set(data.lines_read))
        print(f"paced at 50 lines/s, {PIXELS} px x {lines} lines:")
        print(f"  sustained {rate:5.1f} lines/s, lost lines {lost}, "
              f"exit_status {data.exit_status}")
        print(f"  line in hand -> durable: {_stats(lat)}")
        results.update(rate_lines_s=float(rate), lost_lines=int(lost),
                       durable_latency_p99_ms=float(np.percentile(lat, 99)))
    return results


if __name__ == "__main__":
    main()
