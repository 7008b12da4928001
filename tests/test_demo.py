"""`stm-live demo --quick` end to end: simulated controller with the degrading tip, live
frames over TCP through the RunEngine, live reconstruction, tip monitor, automatic
reconditioning, journal + tiled, and the report folder."""

from __future__ import annotations

import json

import numpy as np

from stm_live.app.demo import run_demo
from stm_live.io.sxm import read_sxm
from stm_live.store import read_journal, run_data

PNG = b"\x89PNG\r\n\x1a\n"


def test_quick_demo_writes_report_and_journals_every_line(tmp_path):
    out, data = tmp_path / "report", tmp_path / "data"
    summary = run_demo(out=out, data_dir=data, frames=2, seed=0, view=False, quick=True)

    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["frames_acquired"] == 2 == len(on_disk["frames"])
    assert on_disk["wall_time_s"] > 0 and on_disk["storage"]["journal"] == str(data / "journal")
    lat = on_disk["reconstruction_latency_ms"]
    assert lat["p50"] > 0 and lat["p99"] >= lat["p50"]
    assert (out / "tip_timeline.png").read_bytes()[:8] == PNG

    for frame in on_disk["frames"]:
        assert frame["exit_status"] == "success"
        assert open(frame["png"], "rb").read(8) == PNG
        assert frame["snapshots"], "no mid-scan snapshot of the live reconstruction"
        # every line of the frame is in the journal, and the .sxm holds the same frame
        run = run_data(read_journal(frame["journal"]))
        assert sorted(set(run.lines_read)) == list(range(48)), "lines missing from the journal"
        assert np.isfinite(run.images["stm_current_fwd"]).all()
        scan = read_sxm(frame["sxm"])
        assert scan.pixels == scan.lines == 48
        assert scan.image("Current").tobytes() == run.images["stm_current_fwd"].tobytes()
        final = np.load(frame["reconstruction_npy"])
        assert final.shape == (48, 48) and np.isfinite(final).all()

    # The scenario's CO tip turns double mid-frame: a bad verdict, then reconditioning.
    tip = on_disk["tip"]
    assert tip["not_sharp"] >= 1
    if any(h["after"] != "co_sharp" for h in tip["simulator_truth"]):
        assert tip["reconditioned"], "the tip degraded but nothing was done"
        assert any(e["what"] == "action" for e in tip["actions"])
        assert tip["simulator_recondition_log"], "no reconditioning reached the controller"
    assert on_disk["storage"]["tiled_runs"], "nothing was ingested into tiled"
    assert summary["lines"] == on_disk["lines"] == 96
