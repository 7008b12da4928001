"""The README's commands, run as a user runs them: the `stm-live` CLI, in-process through
typer's runner or as a subprocess where it serves until stopped."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from stm_live.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _invoke(*args: str):
    result = runner.invoke(app, list(args), catch_exceptions=False)
    return result


def _serve(*args: str, pattern: str, timeout_s: float = 60.0):
    """Start `stm-live ...` as a subprocess and wait for the line matching ``pattern``."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "stm_live.cli", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + timeout_s
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return proc, match
    proc.kill()
    raise AssertionError(f"`stm-live {' '.join(args)}` never printed {pattern!r}: {''.join(seen)[-800:]}")


def _stop(proc) -> int:
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        rest = proc.communicate(timeout=10)[0] or ""
        raise AssertionError(
            f"`{' '.join(proc.args[2:])}` did not stop within 20 s of Ctrl-C; its output: {rest[-800:]!r}"
        ) from None


def test_help_lists_every_command():
    out = _invoke("--help").output
    for command in (
        "demo",
        "sim",
        "scan",
        "replay",
        "reconstruct",
        "train",
        "evaluate",
        "bench",
        "runs",
        "worker",
        "view",
    ):
        assert command in out


def test_sim_serve_speaks_nanonis_and_stops_on_ctrl_c():
    from stm_live.devices.client import NanonisClient

    scenario = REPO / "stm_live/simulators/scenarios/degrading.yaml"
    proc, match = _serve(
        "sim",
        "serve",
        "--port",
        "0",
        "--scenario",
        str(scenario),
        "--time-scale",
        "5",
        pattern=r"on 127\.0\.0\.1:(\d+)",
    )
    try:
        with NanonisClient("127.0.0.1", int(match.group(1)), timeout=10) as client:
            client.bias_set(-0.7)
            assert client.bias_get() == pytest.approx(-0.7)
            assert client.signals_names_get()[0].startswith("Current")
    finally:
        assert _stop(proc) == 0


def test_sim_serve_bad_scenario_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("molecules: [{molecule: unobtainium}]\n")
    result = runner.invoke(app, ["sim", "serve", "--port", "0", "--scenario", str(bad)])
    assert result.exit_code != 0
    assert "unobtainium" in result.output


def test_scan_runs_list_export_and_reconstruct(tmp_path, sim_server):
    data = tmp_path / "data"
    result = _invoke(
        "scan",
        "--host",
        sim_server.host,
        "--port",
        str(sim_server.port),
        "--pixels",
        "32",
        "--lines",
        "24",
        "--width-nm",
        "3",
        "--tip-policy",
        "off",
        "--data-dir",
        str(data),
    )
    assert result.exit_code == 0, result.output

    listing = _invoke("runs", "list", "--data-dir", str(data))
    assert listing.exit_code == 0 and "24" in listing.output

    sxm = tmp_path / "scan.sxm"
    exported = _invoke("runs", "export", "latest", "--sxm", str(sxm), "--data-dir", str(data))
    assert exported.exit_code == 0, exported.output
    from stm_live.io.sxm import read_sxm

    scan = read_sxm(sxm)
    assert scan.lines == 24 and scan.pixels == 32

    png = tmp_path / "psi.png"
    npy = tmp_path / "psi.npy"
    for out in (png, npy):
        done = _invoke("reconstruct", str(sxm), "-o", str(out))
        assert done.exit_code == 0, done.output
    assert png.stat().st_size > 1000
    psi = np.load(npy)
    assert psi.shape == (24, 32) and np.isfinite(psi).all()


def test_scan_without_a_controller_is_one_line_not_a_traceback(tmp_path):
    port = _free_port()  # nothing listens there
    result = _invoke(
        "scan",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--pixels",
        "8",
        "--lines",
        "4",
        "--tip-policy",
        "off",
        "--data-dir",
        str(tmp_path / "data"),
    )
    assert result.exit_code == 2
    assert f"cannot connect to 127.0.0.1:{port}" in result.output and "stm-live sim serve" in result.output
    assert "Traceback" not in result.output


def test_evaluate_names_a_missing_checkpoint(tmp_path, monkeypatch):
    from stm_live.models import tipstate

    monkeypatch.setattr(tipstate, "DEFAULT_WEIGHTS", tmp_path / "tipstate.pt")
    result = _invoke("evaluate", "--model", "tipstate", "--samples", "1")
    assert result.exit_code == 2
    assert "stm-live train --model tipstate" in result.output and "Traceback" not in result.output


def test_reconstruct_npy_without_pixel_size_names_the_problem(tmp_path):
    image = tmp_path / "img.npy"
    np.save(image, np.random.default_rng(0).random((32, 32)).astype(np.float32))
    result = runner.invoke(app, ["reconstruct", str(image), "-o", str(tmp_path / "o.npy")])
    assert result.exit_code != 0
    assert "pixel" in result.output.lower()
    result = runner.invoke(
        app, ["reconstruct", str(image), "--pixel-size", "0.05", "--views", "3", "-o", str(tmp_path / "o.npy")]
    )
    assert result.exit_code == 2 and "symmetry views must be one of [1, 2, 4], got 3" in result.output
    result = runner.invoke(
        app, ["reconstruct", str(image), "--pixel-size", "0.05", "--views", "1", "-o", str(tmp_path / "o.npy")]
    )
    assert result.exit_code == 0 and np.load(tmp_path / "o.npy").shape == (32, 32)


def test_view_serves_the_page_following_a_data_dir(tmp_path):
    proc, match = _serve("view", "--port", "0", "--data-dir", str(tmp_path), pattern=r"(http://127\.0\.0\.1:\d+/)")
    try:
        with urllib.request.urlopen(match.group(1) + "state.json", timeout=10) as reply:
            state = json.load(reply)
        assert state["run"] is None and state["lines_done"] == 0
    finally:
        _stop(proc)


# The final evaluation is CPU-bound: with two torch threads it took 14 s alone and over 120 s
# beside two busy-looping processes (each thread waits on the other when the cores are
# taken); with one, 38 s beside a training job and a busy loop.
@pytest.mark.parametrize("model", ["stmnet", "tipstate"])
def test_train_writes_a_checkpoint_and_card_that_load(tmp_path, model):
    out = tmp_path / f"{model}.pt"
    result = _invoke("train", "--model", model, "--steps", "2", "--out", str(out), "--device", "cpu", "--threads", "1")
    assert result.exit_code == 0, result.output
    assert out.exists()
    cards = list(tmp_path.glob("*MODEL_CARD*.md")) + list(tmp_path.glob("*.md"))
    assert cards, "training wrote no model card beside the checkpoint"
    from stm_live import models

    if model == "stmnet":
        assert models.load_stmnet(device="cpu", path=out) is not None
        return
    # a new classifier has no domain statistics yet: its verdicts cannot say "unknown", so it
    # loads bare only when asked to, and otherwise names the command that fits them
    assert models.load_tip_classifier(device="cpu", path=out, domain=None) is not None
    with pytest.raises(FileNotFoundError, match=f"stm-live train --model tipdomain --weights {out}"):
        models.load_tip_classifier(device="cpu", path=out)


def test_train_bank_size_sets_the_tip_classifier_bank_and_is_refused_for_stmnet(tmp_path):
    out = tmp_path / "tipstate.pt"
    result = _invoke(
        "train", "--model", "tipstate", "--steps", "1", "--bank-size", "3", "--out", str(out), "--device", "cpu"
    )
    assert result.exit_code == 0, result.output
    assert "3 simulated frames rendered once" in (tmp_path / "tipstate_MODEL_CARD.md").read_text()
    refused = _invoke("train", "--model", "stmnet", "--steps", "1", "--bank-size", "3", "--out", str(out))
    assert refused.exit_code == 2 and "--bank-size applies to --model tipstate only" in refused.output
    refused = _invoke("train", "--model", "tipstate", "--steps", "1", "--bank-size", "0", "--out", str(out))
    assert refused.exit_code == 2 and "bank_size must be at least 1" in refused.output


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_scan_with_a_worker_process_gets_the_reconstruction_back(tmp_path, sim_server):
    """The README's worker pair: `stm-live worker` in its own process reconstructs, and
    the scan journals the results it sends back."""
    from stm_live.store import read_journal

    out, results = f"tcp://127.0.0.1:{_free_port()}", f"tcp://127.0.0.1:{_free_port()}"
    data = tmp_path / "data"
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stm_live.cli",
            "worker",
            "--connect",
            out,
            "--results",
            results,
            "--device",
            "cpu",
            "--journal",
            str(data),
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        result = _invoke(
            "scan",
            "--host",
            sim_server.host,
            "--port",
            str(sim_server.port),
            "--pixels",
            "32",
            "--lines",
            "16",
            "--width-nm",
            "2",
            "--tip-policy",
            "off",
            "--data-dir",
            str(data),
            "--worker",
            f"{out},{results}",
        )
        assert result.exit_code == 0, result.output
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
    derived = [
        docs
        for docs in map(read_journal, (data / "journal").glob("*.journal"))
        if docs and docs[0][1].get("stm_live_derived") == "reconstruction"
    ]
    assert derived, "no reconstruction came back from the worker"
    events = [doc for name, doc in derived[0] if name == "event" and "reconstruction" in doc["data"]]
    assert events and events[-1]["data"]["reconstruction"].shape == (16, 32)
