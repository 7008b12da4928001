"""``stm-live demo`` (``make demo``): the product's main job, end to end, on the simulator.

The simulated controller serves the shipped ``degrading`` scenario (molecules on NaCl
under a CO tip that picks up a double tip mid-session and may degrade further) on an
ephemeral 127.0.0.1 port. Live frames are acquired through ``NanonisSTM`` over TCP and
the RunEngine (``plans.live_frame``, Current + Z), journaled line by line and ingested
into the embedded tiled store off the RunEngine loop. Frames are constant current (STM-Net
reads Z through ``current_from_z``): reconditioning approaches the tip with the Z
controller on and verifies in that mode, so a constant-height frame would resume and
verify with the wrong channel (see the report of issue 8). STM-Net
reconstructs each frame live (worker thread); the tip monitor judges the tip; the tip
policy is ``auto``: a bad verdict suspends the frame, the tip is reconditioned at the
profile's clean site, verified, and the frame resumes from its checkpoint.

The report folder gets, per frame, a raw | reconstruction | residual | uncertainty PNG (the
last two from the reconstruction's self-consistency check, ``models.consistency``, and the
spread over STM-Net's symmetry views; the agreement line in its caption), mid-scan snapshots
of the live reconstruction and an .sxm file, plus a tip-state timeline PNG and
``summary.json`` (per frame the check's scalars under ``consistency``, and the tip verdicts
with their domain score).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from bluesky.utils import RunEngineInterrupted
from PIL import Image, ImageDraw, ImageFont
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from stm_live.config import load_profile
from stm_live.console import LOG_NAME, LogFile, describe, migrated_note, quiet_suspensions
from stm_live.devices.stm import NanonisSTM
from stm_live.io.sxm import write_sxm
from stm_live.models.tipstate import is_held_back
from stm_live.plans import live_frame
from stm_live.report import save_frame_png
from stm_live.session import AcquisitionSession, DerivedCollector, LineProgress, load_models
from stm_live.simulators.scenario import load_scenario
from stm_live.simulators.server import start_server_thread
from stm_live.store import read_journal, run_data, scan_from_run
from stm_live.viewer import Viewer, ViewerState, json_number

logger = logging.getLogger(__name__)

__all__ = ["run_demo", "DEMO_SCENARIO"]

DEMO_SCENARIO = "degrading"
SCHEDULED_LINE_128 = 40  # the scenario's tip change, for 128-line frames
SNAPSHOT_FRACTIONS = (0.25, 0.5, 0.75)
FINAL_TIMEOUT_S = 120.0
# Verdict colours for the timeline (RGB), by tip class.
_CLASS_COLOURS = {
    "co_sharp": (46, 160, 67),
    "metal_s": (88, 166, 255),
    "mixed": (163, 113, 247),
    "asymmetric": (210, 153, 34),
    "double": (248, 81, 73),
    "blunt": (139, 87, 42),
    "unstable": (110, 118, 129),
    "unknown": (255, 160, 200),  # outside what the classifier knows: no policy acts on it
}


def _demo_scenario(lines: int):
    """The shipped degrading scenario with its scheduled tip change scaled to the frame
    height, so a small (quick) frame still sees the change mid-frame."""
    sc = load_scenario(DEMO_SCENARIO)
    events = tuple(dataclasses.replace(e, line=max(4, round(e.line * lines / 128))) for e in sc.evolution.events)
    return dataclasses.replace(sc, evolution=dataclasses.replace(sc.evolution, events=events))


class _FrameRuns:
    """Inline (RunEngine loop) record of the live-frame runs: uid and start document."""

    def __init__(self) -> None:
        self.starts: dict[str, dict] = {}
        self.stops: dict[str, dict] = {}

    def __call__(self, name: str, doc: dict) -> None:
        if name == "start" and "stm_live" in doc:
            self.starts[doc["uid"]] = doc
        elif name == "stop" and doc.get("run_start") in self.starts:
            self.stops[doc["run_start"]] = doc


class _VerdictPrinter:
    """Prints a verdict message when the tip's label changes or the tip is bad."""

    def __init__(self, console) -> None:
        self.console = console
        self._last: tuple[str | None, str | None] = (None, None)

    def __call__(self, record: dict) -> None:
        key = (record.get("run_uid"), record["label"])
        unknown = record.get("in_domain") is False
        if key == self._last and (record.get("good", True) or unknown):
            return  # a repeated good or unknown verdict says nothing new
        self._last = key
        probs = record["probabilities"]
        if unknown:  # outside what the classifier knows: nothing acts on it
            nearest = max(probs, key=probs.get)
            self.console.print(
                f"  tip verdict at line {record['line']}: [yellow]unknown[/] (domain score "
                f"{record.get('domain_score', float('nan')):.0f} > {record.get('domain_threshold', float('nan')):.0f}; "
                f"nearest {nearest}, p = {probs[nearest]:.2f}; {record['reason']})"
            )
            return
        colour = "green" if record.get("good") else "red"
        held = (
            f"; held back, no action: class score {record['class_score']:.0f} > limit {record['action_limit']:.0f}"
            if is_held_back(record)
            else ""
        )
        self.console.print(
            f"  tip verdict at line {record['line']}: [{colour}]{record['label']}[/] "
            f"(p = {probs.get(record['label'], float('nan')):.2f}, s share {record['s_fraction']:.2f}; "
            f"{record['reason']}{held})"
        )


def _sxm_for_run(path: Path, run) -> Path:
    """Write one journaled frame run as .sxm (what `stm-live runs export` writes)."""
    return write_sxm(path, scan_from_run(run, comment=f"stm-live demo run {run.uid}"))


def _timeline_png(path: Path, frames: list[dict], events: list[dict]) -> Path:
    """Tip-state timeline: one row per frame, each verdict a coloured span of the lines it
    judged, reconditioning actions marked; legend of the classes."""
    font = ImageFont.load_default()
    left, right, row_h, top = 110, 20, 26, 28
    width = 760
    legend_h = 22 * ((len(_CLASS_COLOURS) + 3) // 4) + 10
    height = top + row_h * max(1, len(frames)) + 30 + legend_h
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.text(
        (8, 6), "tip state per frame (verdict over the lines it judged); | = reconditioning", fill=(0, 0, 0), font=font
    )
    span = width - left - right
    for k, frame in enumerate(frames):
        y = top + k * row_h
        lines = max(1, frame["lines_total"])
        draw.text((8, y + 6), f"frame {k} ({frame['uid'][:8]})", fill=(0, 0, 0), font=font)
        draw.rectangle([left, y + 3, left + span, y + row_h - 5], outline=(180, 180, 180), fill=(240, 240, 240))
        previous = -1
        for v in frame["verdicts"]:
            # each verdict colours the lines it judged that no earlier verdict covered
            first = max(v.get("first_line", v["line"]), previous + 1)
            previous = max(previous, v["line"])
            x0 = left + span * first / lines
            x1 = left + span * (v["line"] + 1) / lines
            draw.rectangle([x0, y + 4, max(x0 + 1, x1), y + row_h - 6], fill=_CLASS_COLOURS.get(v["label"], (0, 0, 0)))
        for e in frame["actions"]:
            if e.get("what") != "suspend" or e.get("line") is None:
                continue  # mark where the frame was suspended for reconditioning
            x = left + span * min(lines, max(0, int(e["line"]) + 1)) / lines
            draw.line([x, y, x, y + row_h - 2], fill=(0, 0, 0), width=2)
    y = top + row_h * max(1, len(frames)) + 10
    draw.text((left, y), "0", fill=(0, 0, 0), font=font)
    draw.text((left + span - 30, y), "last line", fill=(0, 0, 0), font=font)
    y += 20
    for i, (label, colour) in enumerate(_CLASS_COLOURS.items()):
        x = 10 + (i % 4) * 185
        yy = y + 22 * (i // 4)
        draw.rectangle([x, yy, x + 14, yy + 14], fill=colour)
        draw.text((x + 20, yy + 2), label, fill=(0, 0, 0), font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path


def _pick_snapshots(snapshots: list[tuple[int, np.ndarray]], lines: int) -> list[tuple[int, np.ndarray]]:
    """The first live update past each fraction of the frame."""
    picked, used = [], set()
    for fraction in SNAPSHOT_FRACTIONS:
        for n, image in snapshots:
            if n >= fraction * lines and n < lines and n not in used:
                picked.append((n, image))
                used.add(n)
                break
    return picked


def run_demo(
    out: os.PathLike | str = "demo_output",
    data_dir: os.PathLike | str = "stm_live_data",
    frames: int = 3,
    seed: int = 0,
    view: bool = False,
    quick: bool = False,
    *,
    device: str = "auto",
    time_scale: float | None = None,
    tiled_uri: str | None = None,
    console=None,
) -> dict[str, Any]:
    """Run the demo session; write the report folder; return the summary (also
    ``out/summary.json``).

    Parameters
    ----------
    out : path
        Report folder.
    data_dir : path
        Journal (``data_dir/journal``) and embedded tiled store (``data_dir/tiled``).
    frames : int
        Live frames to acquire (``quick`` caps it at 2).
    seed : int
        Seeds the simulator (noise, tip hazards, reconditioning outcomes).
    view : bool
        Serve the live viewer on 127.0.0.1 while it runs (prints its URL).
    quick : bool
        48 x 48 frames, at most 2: a smoke test that runs in well under a minute.
    device : str
        Torch device for STM-Net and the tip classifier.
    time_scale : float, optional
        Scan-clock speed-up (default: 10 for 128-line frames, 8 quick).
    tiled_uri : str, optional
        A lab's tiled server for the runs, instead of the embedded one in ``data_dir/tiled``.

    A stalled or dropped link to the controller is reported in one line and ridden through
    (``link.max_outage_s`` of the profile); details and tracebacks go to
    ``data_dir/stm-live.log``, named on screen once.
    """
    t_start = time.perf_counter()
    console = console or Console()
    frames = int(frames)
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    with LogFile(data_dir) as log, quiet_suspensions():
        console.print(log.note)
        return _session(
            out=out,
            data_dir=data_dir,
            frames=frames,
            seed=seed,
            view=view,
            quick=quick,
            device=device,
            time_scale=time_scale,
            tiled_uri=tiled_uri,
            console=console,
            t_start=t_start,
        )


def _session(
    *,
    out,
    data_dir,
    frames: int,
    seed: int,
    view: bool,
    quick: bool,
    device: str,
    time_scale: float | None,
    tiled_uri: str | None,
    console,
    t_start: float,
) -> dict[str, Any]:
    """The demo proper (see :func:`run_demo`)."""
    size = 48 if quick else 128
    frames = min(frames, 2) if quick else frames
    # Simulated line = 0.1 s forward + 0.1 s backward; this keeps a frame to seconds
    # while leaving the 2-core CPU time for the physics, STM-Net and the classifier.
    time_scale = float(time_scale or (8.0 if quick else 10.0))
    out, data_dir = Path(out), Path(data_dir)
    out.mkdir(parents=True, exist_ok=True)

    profile = load_profile("sim")
    reconstructor, classifier = load_models(device, tip=True)
    scenario = _demo_scenario(size)
    server = start_server_thread(scenario=scenario, seed=seed, time_scale=time_scale)
    console.print(
        f"simulated controller on {server.host}:{server.port}: scenario "
        f"{scenario.name!r} ({scenario.description}), time scale {time_scale:g}"
    )
    viewer = state = None
    if view:
        state = ViewerState()
        viewer = Viewer(state)
        console.print(f"viewer: [bold]{viewer.url}[/]")

    runs = _FrameRuns()
    stm = NanonisSTM(server.host, server.port, name="stm", profile=profile, timeout=profile.timeout_s)
    stm.lines.line_timeout = 60.0  # a verification scan or a busy CPU is not a stall
    frame = (
        scenario.frame.center_x_nm * 1e-9,
        scenario.frame.center_y_nm * 1e-9,
        scenario.frame.width_nm * 1e-9,
        scenario.frame.height_nm * 1e-9,
        0.0,
    )
    errors: list[str] = []
    operator: list[dict] = []
    session = AcquisitionSession(
        data_dir,
        inline_callbacks=[runs],
        tiled=True,
        tiled_uri=tiled_uri,
        live=True,
        reconstructor=reconstructor,
        tip=True,
        classifier=classifier,
        tip_options={"every_n_lines": 8 if quick else 16},
        on_verdict=_VerdictPrinter(console),
        stm=stm,
        tip_policy="auto",
        policy_options={"verify_lines": min(24, size // 2)},
        viewer_state=state,
        progress=LineProgress(console=console),
    )
    live, tip, policy, collector = session.live, session.tip, session.policy, session.collector
    try:
        # a stall or drop: the frame is suspended, reconnected, resumed; one line each
        session.watch(stm, say=lambda text: console.print(escape(text), style="yellow"))
        for k in range(frames):
            if policy.state.get() == "bad":
                # A reconditioning that failed outside a run leaves the suspender tripped;
                # the next frame would wait on it forever. Say so and release it.
                msg = "tip policy left the suspender tripped after a failed reconditioning"
                errors.append(f"before frame {k}: {msg}; released")
                console.print(f"[yellow]{msg}; releasing it[/]")
                policy.state.put("good")
            console.print(f"[bold]frame {k + 1}/{frames}[/]: {size} x {size}, constant current, Current + Z")
            try:
                try:
                    session(
                        live_frame(
                            stm,
                            frame=frame,
                            pixels=size,
                            lines=size,
                            channels=["Current", "Z"],
                            direction="down",
                            z_controller="constant_current",
                            md={
                                "purpose": "stm-live demo",
                                "demo_frame": k,
                                "tip_policy": "auto",
                                "scenario": scenario.name,
                            },
                        )
                    )
                except RunEngineInterrupted:
                    _operator_resumes(session.RE, server, policy, console, operator)
            except Exception as exc:  # keep what was acquired; report, go on
                logger.exception("frame %d failed", k)
                errors.append(f"frame {k}: {type(exc).__name__}: {exc}")
                console.print(f"frame {k + 1} failed: {escape(describe(exc))}", style="red")
                if session.RE.state != "idle":
                    session.RE.abort(reason=f"demo: frame {k} failed")
        session.wait(FINAL_TIMEOUT_S)  # the final reconstructions and verdicts, tiled ingestion
        ingested = list(session.ingestor.ingested) if session.ingestor else []
        tiled_error, migrated = session.tiled_error, session.migrated
    finally:
        session.close(FINAL_TIMEOUT_S)
        for closer in (stm.stop_scan, stm.close, server.stop):
            try:
                closer()
            except Exception as exc:
                logger.error("demo cleanup %r failed: %s", closer, exc)
        if viewer is not None:
            viewer.close()
    if migrated:
        console.print(migrated_note(migrated))
    tiled = tiled_uri.split("?")[0] if tiled_uri else str(data_dir / "tiled")  # no API key on screen

    summary = _report(
        out=out,
        data_dir=data_dir,
        runs=runs,
        operator=operator,
        collector=collector,
        live=live,
        tip=tip,
        policy=policy,
        ingested=ingested,
        tiled=tiled,
        tiled_error=tiled_error,
        errors=errors,
        server=server,
        scenario=scenario,
        size=size,
        seed=seed,
        time_scale=time_scale,
        t_start=t_start,
        link=stm.link,
    )
    _print_where(console, summary, out)
    return summary


MAX_OPERATOR_RESUMES = 3


def _operator_resumes(RE, server, policy, console, operator: list[dict]) -> None:
    """The tip policy gave up and paused the RunEngine for the operator. The demo has
    no operator at the keyboard, so it plays one: the simulated tip is replaced by a
    fresh CO tip (what a person would do by hand) and the RunEngine resumes; the frame
    then finishes. Recorded in summary.json under ``tip.operator``."""
    for _ in range(MAX_OPERATOR_RESUMES):
        if RE.state != "paused":
            return
        reason = policy.give_up_reason or RE.pause_msg or "paused"
        console.print(
            f"[yellow]{reason}[/]\n[yellow]demo operator: replacing the simulated "
            f"tip by hand (fresh CO tip) and resuming[/]"
        )
        server.controller.set_tip("co", cause="demo operator: tip replaced by hand")
        operator.append({"time": time.time(), "what": "operator replaced the tip and resumed", "after": reason})
        try:
            RE.resume()
        except RunEngineInterrupted:
            continue
    if RE.state == "paused":
        RE.abort(reason="demo: tip still bad after the operator's repairs")
        raise RuntimeError("tip still bad after the demo operator's repairs; frame aborted")


def _report(
    *,
    out: Path,
    data_dir: Path,
    runs: _FrameRuns,
    operator: list[dict],
    collector: DerivedCollector,
    live,
    tip,
    policy,
    ingested,
    tiled,
    tiled_error,
    errors,
    server,
    scenario,
    size,
    seed,
    time_scale,
    t_start,
    link,
) -> dict[str, Any]:
    frames_out = []
    journal_dir = data_dir / "journal"
    timeline = list(tip.timeline)
    for k, (uid, start) in enumerate(runs.starts.items()):
        journal = journal_dir / f"{uid}.journal"
        run = run_data(read_journal(journal))
        meta = start["stm_live"]
        lines = int(meta["lines"])
        name = f"frame{k}"
        entry: dict[str, Any] = {
            "uid": uid,
            "journal": str(journal),
            "exit_status": run.exit_status,
            "lines_total": lines,
            "lines": len(set(run.lines_read)),
            "events": run.events,
            "lines_resent": run.events - len(set(run.lines_read)),
        }
        entry["sxm"] = str(_sxm_for_run(out / f"{name}.sxm", run))
        source = "stm_current_fwd" if meta["z_controller"] == "constant_height" else "stm_z_fwd"
        raw = run.images[source]
        collector.wait_stopped("reconstruction", uid, FINAL_TIMEOUT_S if uid in runs.stops else 5.0)
        final = collector.finals.get(uid)
        geometry = _picture_geometry(meta)
        channel = next((c for c in meta["channels"] if c["keys"].get("forward") == source), {})
        raw_title = f"{channel.get('name', source)} forward (raw)"
        panels, units = [(raw_title, raw)], [channel.get("units", "")]
        check = collector.checks.get(uid)
        caption = _picture_caption(name, meta, raw_title)
        if final is not None:
            np.save(out / f"{name}_reconstruction.npy", final)
            entry["reconstruction_npy"] = str(out / f"{name}_reconstruction.npy")
            panels.append(("STM-Net |psi|^2", final))
            units.append("a.u.")
            if check is not None:
                panels += _check_panels(check, final.shape)
                units += ["a.u."] * (len(panels) - len(units))
                caption = f"{caption}\n{_check_line(check)}"
        else:
            entry["reconstruction_npy"] = None
            errors.append(f"{name}: no final reconstruction")
        entry["consistency"] = None if check is None else _check_summary(check)
        png = out / f"{name}.png"
        cmaps = ["afmhot", "afmhot", "viridis", "viridis"][: len(panels)]
        save_frame_png(png, panels, units=units, caption=caption, cmap=cmaps, **geometry)
        entry["png"] = str(png)
        entry["snapshots"] = []
        for n, image in _pick_snapshots(collector.snapshots.get(uid, []), lines):
            path = out / f"{name}_live_{n:03d}lines.png"
            save_frame_png(
                path,
                [(f"STM-Net after {n} of {lines} lines", image)],
                units=["a.u."],
                caption=_picture_caption(name, meta, f"live reconstruction, {n}/{lines} lines"),
                **geometry,
            )
            entry["snapshots"].append(str(path))
        entry["verdicts"] = [_verdict_entry(v) for v in timeline if v["run_uid"] == uid]
        stop_time = runs.stops.get(uid, {}).get("time", float("inf"))
        entry["actions"] = [_jsonable(e) for e in policy.events if start["time"] <= e["time"] <= stop_time]
        frames_out.append(entry)
    _timeline_png(out / "tip_timeline.png", frames_out, policy.events)
    stats = live.stats()
    truth = [dict(h) for h in server.controller.tip_history]
    summary = {
        "scenario": scenario.name,
        "seed": seed,
        "frame_size": [size, size],
        "time_scale": time_scale,
        "frames": frames_out,
        "frames_acquired": len(frames_out),
        "lines": int(sum(f["lines"] for f in frames_out)),
        "reconstruction_latency_ms": {"p50": stats["p50_ms"], "p99": stats["p99_ms"], "updates": stats["updates"]},
        "tip": {
            "verdicts": len(timeline),
            "not_sharp": int(sum(v["label"] != "co_sharp" for v in timeline)),
            "unknown": int(sum(v.get("in_domain") is False or v["label"] == "unknown" for v in timeline)),
            "labels": sorted({v["label"] for v in timeline}),
            "actions": [_jsonable(e) for e in policy.events],
            "attempts": [dataclasses.asdict(a) for a in policy.attempts],
            "reconditioned": any(e["what"] == "action" for e in policy.events),
            "gave_up": policy.give_up_reason,
            "operator": [_jsonable(o) for o in operator],
            "simulator_truth": truth,
            "simulator_recondition_log": [dict(r) for r in server.controller.recondition_log],
        },
        "storage": {
            "journal": str(journal_dir),
            "tiled": tiled,
            "log": str(data_dir / LOG_NAME),
            "tiled_runs": ingested,
            "tiled_error": None if tiled_error is None else str(tiled_error),
        },
        "report": {"folder": str(out), "timeline_png": str(out / "tip_timeline.png")},
        "link": {"outages": link.outages, "outage_s": round(link.outage_total_s, 2), "state": link.state},
        "errors": errors + list(live.errors) + list(tip.errors),
        "wall_time_s": round(time.perf_counter() - t_start, 2),
    }
    (out / "summary.json").write_text(json.dumps(_jsonable(summary), indent=1))
    return summary


def _verdict_entry(v: dict) -> dict[str, Any]:
    """One tip verdict for summary.json: ``p`` is the probability of its label (None for
    "unknown", which is no class; ``closest`` then names the most probable class); the domain
    fields when the classifier has a domain model."""
    probabilities = v["probabilities"]
    entry = {key: v[key] for key in ("line", "first_line", "change_line", "label", "s_fraction", "good", "reason")}
    entry["p"] = probabilities.get(v["label"])
    if entry["p"] is None and probabilities:
        entry["closest"] = max(probabilities, key=probabilities.get)
    entry |= {
        key: v[key]
        for key in ("in_domain", "domain_score", "domain_threshold", "class_score", "action_limit")
        if key in v
    }
    if is_held_back(v):
        entry["held_back"] = True
    return entry


def _check_panels(check: dict, shape: tuple[int, ...]) -> list[tuple[str, np.ndarray]]:
    """Residual and view-spread panels of a final self-consistency check (live.CHECK_STREAM);
    a map that is missing, misshapen or all NaN (a reconstructor without symmetry views) is left out."""
    panels = []
    for key, title in (
        ("residual", "residual (measured - predicted)"),
        ("view_spread", "uncertainty (symmetry-view spread)"),
    ):
        image = check.get(key)
        image = None if image is None else np.asarray(image, dtype=np.float32)
        if image is not None and image.shape == tuple(shape) and np.isfinite(image).any():
            panels.append((title, image))
    return panels


def _check_summary(check: dict) -> dict[str, Any]:
    """The check's scalars for summary.json (NaN -> None)."""
    orbital = check.get("orbital")
    return {
        "agreement": json_number(check.get("agreement")),
        "w_s": json_number(check.get("w_s")),
        "orbital": None if orbital is None else bool(orbital),
        "reason": str(check.get("reason") or ""),
        "spread": json_number(check.get("spread")),
        "explained": json_number(check.get("explained")),
    }


def _check_line(check: dict) -> str:
    """The caption's self-consistency line: agreement, fitted s share, view spread, verdict."""
    c = _check_summary(check)

    def number(value, fmt):
        return "n/a" if value is None else format(value, fmt)

    head = (
        f"self-consistency: agreement {number(c['agreement'], '.2f')}, fitted tip s share "
        f"{number(c['w_s'], '.2f')}, view spread "
        + ("n/a" if c["spread"] is None else f"{100 * c['spread']:.1f} % of the bright level")
    )
    if c["orbital"] is None:
        return head
    if c["orbital"]:
        return f"{head}; a CO-tip orbital image"
    reason = c["reason"] or "not a CO-tip orbital image"
    if not reason.startswith("not a CO-tip orbital image"):
        reason = f"not a CO-tip orbital image: {reason}"
    return f"{head}; {reason}"


def _picture_geometry(meta: dict) -> dict[str, Any]:
    """Pixel pitch on both axes and scan direction of a live frame, for its pictures."""
    frame = meta["frame"]
    return {
        "pixel_size_nm": float(frame["width_m"]) * 1e9 / int(meta["pixels"]),
        "line_spacing_nm": float(frame["height_m"]) * 1e9 / int(meta["lines"]),
        "scan_direction": meta.get("scan_direction", "down"),
    }


def _picture_caption(name: str, meta: dict, what: str) -> str:
    """Caption of a frame picture: what it shows, bias, setpoint, mode, direction, geometry."""
    frame, g = meta["frame"], _picture_geometry(meta)
    return (
        f"{name}: {what}; bias {meta['bias_V']:+.2f} V, setpoint {meta['setpoint_A'] * 1e12:.0f} pA, "
        f"{meta['z_controller'].replace('_', ' ')}, scan {g['scan_direction']}; "
        f"{frame['width_m'] * 1e9:.2f} x {frame['height_m'] * 1e9:.2f} nm, "
        f"{meta['pixels']} x {meta['lines']} px, {g['pixel_size_nm']:.3f} x {g['line_spacing_nm']:.3f} nm/px, "
        f"angle {frame.get('angle_deg', 0.0):g} deg"
    )


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def _print_where(console, summary: dict, out: Path) -> None:
    table = Table(
        title=f"stm-live demo: {summary['frames_acquired']} frames, "
        f"{summary['lines']} lines in {summary['wall_time_s']:.0f} s"
    )
    for column in ("frame", "lines", "status", "tip verdicts", "picture", "sxm"):
        table.add_column(column)
    for k, f in enumerate(summary["frames"]):
        labels = [v["label"] for v in f["verdicts"]]
        bad = sum(label != "co_sharp" for label in labels)
        tips = f"{labels[-1] if labels else '-'} ({bad}/{len(labels)} not sharp)"
        table.add_row(
            str(k), f"{f['lines']}/{f['lines_total']}", f["exit_status"], tips, Path(f["png"]).name, Path(f["sxm"]).name
        )
    console.print(table)
    lat = summary["reconstruction_latency_ms"]
    tip = summary["tip"]
    console.print(f"reconstruction latency per line: p50 {lat['p50']:.0f} ms, p99 {lat['p99']:.0f} ms")
    console.print(
        f"tip: {tip['verdicts']} verdicts, {tip['not_sharp']} not sharp; "
        f"{sum(e['what'] == 'action' for e in tip['actions'])} reconditioning action(s)"
        + (
            f"; policy gave up {len(tip['operator'])}x, the demo operator replaced the tip by hand"
            if tip["operator"]
            else ""
        )
    )
    console.print(f"report:   {out}/ (frame*.png, frame*_live_*.png, frame*.sxm, tip_timeline.png, summary.json)")
    link = summary["link"]
    if link["outages"]:
        console.print(
            f"link:     {link['outages']} outage(s), {link['outage_s']:.1f} s in all, ridden "
            f"through (details: {summary['storage']['log']})"
        )
    console.print(f"journal:  {summary['storage']['journal']}")
    console.print(f"tiled:    {summary['storage']['tiled']} ({len(summary['storage']['tiled_runs'])} runs ingested)")
    for err in summary["errors"]:
        console.print(f"[yellow]note: {err}[/]")
