"""Acquisition overhead: RunEngine + TCP + durable journal, 512 px per line.

Two measurements against the simulated controller on 127.0.0.1:

* saturated: the controller runs far ahead (time scale 2000), so the RunEngine never
  waits for the scan; the interval between consecutive durable (journaled + fsync'ed)
  events is the whole per-line cost: trigger/read/save on the RunEngine, the follower's
  TCP grabs on its thread, msgpack + fsync in the journal.
* paced: 50 lines/s from the controller (0.01 s forward + 0.01 s backward), a full frame;
  every line must arrive, and the latency from "line in hand" to "line durable" is shown.
* tiled: one 512 x 512 run of 4 channels (forward and backward) ingested from its journal
  through bluesky's TiledWriter into the embedded tiled server (the BlueskyRun layout), timed;
  then 512-line frames through a session with tiled, alternately with nothing to ingest and
  while such a run (the previous frame, as in a session) is ingested beside them on the
  session's ingestion thread, saturated and paced: had ingestion run on the RunEngine loop, a
  line would wait for the whole of it; per-line overhead and latency say whether any does.

Run: ``python -m benchmarks acquisition`` (or ``make bench``).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

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
    code = f"from stm_live.app.sim import serve; serve(host='127.0.0.1', port=0, time_scale={time_scale!r}, seed=0)"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1")
    )
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
            durable.append((time.time(), doc["timestamps"]["stm_line_index"], doc["data"]["stm_line_index"]))

    RE.subscribe(after_journal)
    stm.client.scan_speed_set(0.0, 0.0, line_time_s, line_time_s, "time", 1.0)
    t0 = time.perf_counter()
    (uid,) = RE(live_frame(stm, frame=(0, 0, 10e-9, 10e-9, 0), pixels=PIXELS, lines=lines, channels=CHANNELS))
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
    RE.subscribe(lambda name, doc: stamps.append(time.perf_counter()) if name == "event" else None)

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


def _synthetic_journal(data_dir, pixels: int = PIXELS, lines: int = PIXELS, channels: int = 4):
    """A journaled frame run of ``channels`` channels, forward and backward, as live_frame
    documents it (interfaces.md layout), without a controller."""
    from event_model import compose_run

    names = [f"ch{k}" for k in range(channels)]
    keys = {n: {"forward": f"stm_{n}_fwd", "backward": f"stm_{n}_bwd"} for n in names}
    meta = {
        "frame": {"center_x_m": 0.0, "center_y_m": 0.0, "width_m": 25e-9, "height_m": 25e-9, "angle_deg": 0.0},
        "pixels": pixels,
        "lines": lines,
        "pixel_size_nm": 25 / pixels,
        "scan_direction": "down",
        "bias_V": -1.0,
        "setpoint_A": 1e-11,
        "z_controller": "constant_height",
        "line_key": "stm_line_index",
        "channels": [{"name": n, "index": k, "units": "A", "keys": keys[n]} for k, n in enumerate(names)],
    }
    run = compose_run(metadata={"plan_name": "live_frame", "stm_live": meta})
    data_keys = {"stm_line_index": {"source": "bench", "dtype": "integer", "shape": []}}
    data_keys.update(
        {
            key: {"source": "bench", "dtype": "array", "shape": [pixels], "dtype_numpy": "<f4"}
            for n in names
            for key in keys[n].values()
        }
    )
    desc = run.compose_descriptor(name="primary", data_keys=data_keys)
    writer = JournalWriter(data_dir, fsync=False)
    writer("start", run.start_doc)
    writer("descriptor", desc.descriptor_doc)
    rng = np.random.default_rng(0)
    for row in range(lines):
        data = {
            "stm_line_index": row,
            **{k: rng.random(pixels, dtype=np.float32) for k in data_keys if k != "stm_line_index"},
        }
        writer("event", desc.compose_event(data=data, timestamps=dict.fromkeys(data, time.time()), validate=False))
    writer("stop", run.compose_stop())
    return writer.path_for(run.start_doc["uid"])


def _ingestion_s(repeats: int = 2) -> np.ndarray:
    """Seconds to ingest one 512 x 512 run of 4 channels (8 arrays a line) through TiledWriter."""
    import bluesky.callbacks.tiled_writer  # noqa: F401  (its imports, seconds, are not ingestion)

    from stm_live.store import ingest_journal, open_tiled

    with tempfile.TemporaryDirectory() as tmp:
        client, server = open_tiled(tmp)
        try:
            cost = []
            for _ in range(repeats):
                path = _synthetic_journal(tmp)
                t0 = time.perf_counter()
                ingest_journal(client, path)
                cost.append(time.perf_counter() - t0)
            return np.array(cost)
        finally:
            server.close()


def _frames_beside_ingestion(
    lines: int, data_dir, *, time_scale: float, line_time_s: float, runs: int = 1, pairs: int = 2
):
    """Frames through one session with tiled (the embedded server), alternately with nothing to
    ingest and while ``runs`` 512 x 512 x 4-channel runs are ingested beside them on the
    session's ingestion thread. Returns, quiet and beside ingestion, the intervals between
    durable lines and the "line in hand -> durable" latencies (ms), and per busy frame the
    share of it the ingestion lasted."""
    from stm_live.session import AcquisitionSession

    big = [_synthetic_journal(Path(data_dir) / "elsewhere") for _ in range(runs)]  # not recovered
    durable: list[tuple[float, float]] = []

    def after_journal(name, doc):
        if name == "event":
            durable.append((time.time(), doc["timestamps"]["stm_line_index"]))

    found = {False: ([], []), True: ([], [])}
    covered = []
    with _controller(time_scale) as (host, port):
        stm = NanonisSTM(host, port, name="stm")
        try:
            stm.client.scan_speed_set(0.0, 0.0, line_time_s, line_time_s, "time", 1.0)
            with AcquisitionSession(data_dir, tiled=True, inline_callbacks=[after_journal]) as session:
                if not session.wait(120) or session.ingestor is None:
                    raise RuntimeError(f"embedded tiled did not start: {session.tiled_error}")
                for k in range(2 * pairs):
                    beside = k % 2 == 1
                    durable.clear()
                    t0 = time.perf_counter()
                    ingested_at: list[float] = []
                    for path in big if beside else ():
                        session.ingestor.submit(path)
                    watcher = threading.Thread(
                        target=lambda t=t0, box=ingested_at: (  # when it ends
                            session.ingestor.join(600),
                            box.append(time.perf_counter() - t),
                        ),
                        daemon=True,
                    )
                    watcher.start()
                    session(
                        live_frame(stm, frame=(0, 0, 10e-9, 10e-9, 0), pixels=PIXELS, lines=lines, channels=CHANNELS)
                    )
                    frame_s = time.perf_counter() - t0
                    t = np.array(durable)
                    found[beside][0].append(np.diff(t[:, 0]) * 1e3)
                    found[beside][1].append((t[:, 0] - t[:, 1]) * 1e3)
                    watcher.join(600)
                    if beside:
                        covered.append(min(1.0, ingested_at[0] / frame_s))
                    session.wait(120)  # the frame's own ingestion: between frames, not in them
                if session.ingestor.errors:
                    raise RuntimeError(f"ingestion failed: {session.ingestor.errors}")
        finally:
            stm.close()
    return ({k: (np.concatenate(v[0]), np.concatenate(v[1])) for k, v in found.items()}, covered)


def _stats(ms: np.ndarray) -> str:
    return f"median {np.median(ms):6.2f} ms   p99 {np.percentile(ms, 99):6.2f} ms   max {ms.max():6.2f} ms"


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
        print(f"  frame wall {wall:.2f} s incl. configuration; lines journaled {len(set(data.lines_read))}/{lines}")
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
        print(f"  sustained {rate:5.1f} lines/s, lost lines {lost}, exit_status {data.exit_status}")
        print(f"  line in hand -> durable: {_stats(lat)}")
        results.update(
            rate_lines_s=float(rate), lost_lines=int(lost), durable_latency_p99_ms=float(np.percentile(lat, 99))
        )

    ingest = _ingestion_s()
    print("tiled (BlueskyRun layout through bluesky's TiledWriter; the embedded server, in a process of its own):")
    print(
        f"  ingestion of one {PIXELS} x {PIXELS} run, 4 channels x 2 directions: "
        f"{', '.join(f'{t:.2f}' for t in ingest)} s ({np.median(ingest) / PIXELS * 1e3:.1f} ms a line)"
    )
    results["tiled_ingest_s"] = float(np.median(ingest))
    lines = PIXELS
    for label, time_scale, line_time_s in (("saturated", 2000.0, 0.1), ("paced at 50 lines/s", 1.0, 0.01)):
        with tempfile.TemporaryDirectory() as tmp:
            found, covered = _frames_beside_ingestion(lines, tmp, time_scale=time_scale, line_time_s=line_time_s)
        print(f"  {label}, {PIXELS} px x {lines} lines, frames alternately (one session, tiled embedded):")
        for beside, name in ((False, "nothing to ingest"), (True, "beside such a run's ingestion")):
            gaps, latency = found[beside]
            print(f"    {name + ':':32s} per line {_stats(gaps)}")
            if time_scale == 1.0:  # saturated, the controller runs ahead: that latency only grows
                print(f"    {'':32s} in hand -> durable {_stats(latency)}")
        print(f"    (the ingestion lasted {', '.join(f'{100 * c:.0f} %' for c in covered)} of those frames)")
        key = "saturated" if time_scale > 1 else "paced"
        results[f"{key}_quiet_median_ms"] = float(np.median(found[False][0]))
        results[f"{key}_beside_ingestion_median_ms"] = float(np.median(found[True][0]))
        results[f"{key}_beside_ingestion_max_ms"] = float(np.max(found[True][0]))
    return results


if __name__ == "__main__":
    main()
