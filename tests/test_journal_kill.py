"""kill -9 of the acquisition process mid-frame loses no line that was read."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from stm_live.store import read_journal, run_data

# The child: simulated controller + RunEngine + journal in one process. A callback
# subscribed *after* the journal prints each line index, so a printed line is a line the
# RunEngine handed to its consumers.
CHILD = textwrap.dedent("""
    import sys
    from bluesky import RunEngine
    from stm_live.devices.stm import NanonisSTM
    from stm_live.plans import live_frame
    from stm_live.simulators.server import start_server_thread
    from stm_live.store import JournalWriter

    server = start_server_thread(seed=3, time_scale=4.0)
    stm = NanonisSTM(server.host, server.port, name="stm")
    RE = RunEngine({})
    RE.subscribe(JournalWriter(sys.argv[1]))

    def report(name, doc):
        if name == "start":
            print("START", doc["uid"], flush=True)
        elif name == "event":
            print("LINE", doc["data"]["stm_line_index"], flush=True)

    RE.subscribe(report)
    RE(live_frame(stm, frame=(0, 0, 4e-9, 4e-9, 0), pixels=64, lines=200,
                  channels=["Current", "Z"]))
    print("DONE", flush=True)
""")


def test_sigkill_mid_frame_loses_no_read_line(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path)],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    uid, lines = None, []
    deadline = time.monotonic() + 60
    try:
        while len(lines) < 15:
            assert time.monotonic() < deadline, "child made no progress"
            out = proc.stdout.readline()
            assert out, f"child exited early: {proc.stderr.read()[-2000:]}"
            kind, value = out.split()
            if kind == "START":
                uid = value
            elif kind == "LINE":
                lines.append(int(value))
        os.kill(proc.pid, signal.SIGKILL)
        rest, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    # lines printed between our read and the kill count too
    lines += [int(v.split()[1]) for v in rest.splitlines() if v.startswith("LINE")]
    assert "DONE" not in rest, "the frame finished before the kill; nothing was tested"
    data = run_data(read_journal(tmp_path / "journal" / f"{uid}.journal"))
    assert data.stop is None  # killed: no stop document
    assert set(lines) <= set(data.lines_read), set(lines) - set(data.lines_read)
    for row in lines:
        assert not (data.images["stm_current_fwd"][row] != data.images["stm_current_fwd"][row]).any()
