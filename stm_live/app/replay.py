"""``stm-live replay``: recorded scans through the whole acquisition path.

For each .sxm file the simulated controller is started in-process on an ephemeral
127.0.0.1 port with ``replay=`` that file, and the real path runs on it: ``NanonisSTM``
over TCP, ``plans.live_frame`` with the file's geometry, channels and direction, the
journal, live STM-Net reconstruction and the tip monitor (verdicts only: replay never
acts on a tip). Afterwards each replay is checked: the journaled frame must equal the
recording bit for bit (both are in the internal orientation of docs/interfaces.md), and
the final live reconstruction must equal the offline one (``stm-live reconstruct``: the
same channel at the file's pixel size). A folder replays its .sxm files as one batch with
one summary table (other files in it are listed as skipped); a bad file (truncated, or a
.3ds grid / .dat spectrum given by mistake, named as such) is reported in one line and the
batch goes on; a recording stopped mid-scan is "partial", not a failure; any failure makes
the command exit non-zero at the end (:class:`ReplayFailed`).

A .3ds grid given by name is replayed as a grid: the simulated controller serves its
recorded sweeps (``simulators.replay.GridReplaySource``), ``plans.grid_spectroscopy`` visits
every measured point through the ophyd ``BiasSpectroscopy`` device, one journaled event per
point, and each journaled sweep must equal the recording bit for bit, every channel. Its row
counts points, not lines; ``stm-live reconstruct GRID.3ds`` reconstructs its maps.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import bluesky.preprocessors as bpp
import numpy as np
from rich.console import Console
from rich.table import Table

from stm_live.console import caused_by, describe
from stm_live.devices.spectroscopy import BiasSpectroscopy
from stm_live.devices.stm import ControllerLost, NanonisSTM
from stm_live.interpret import from_scan, scan_pitch
from stm_live.io.sxm import SxmError, read_sxm
from stm_live.plans import grid_spectroscopy, live_frame
from stm_live.report import save_frame_png
from stm_live.session import AcquisitionSession, Consumers, load_models
from stm_live.simulators.replay import GridReplaySource, is_grid, not_a_scan
from stm_live.simulators.server import start_server_thread
from stm_live.store import read_journal, run_data
from stm_live.viewer import Viewer, ViewerState

logger = logging.getLogger(__name__)

__all__ = ["ReplayResult", "ReplayFailed", "run_replay", "collect_files"]

# Offline and live reconstruction run the same network on the same input; the only
# difference is the pixel size, which passes through the float32 wire (frame width).
RECON_RTOL, RECON_ATOL_FRACTION = 1e-4, 1e-5
FINAL_TIMEOUT_S = 120.0  # bounded wait for the last reconstruction / verdict of a file


class ReplayFailed(ValueError):
    """One or more recordings could not be replayed; ``results`` has every file's row."""

    def __init__(self, message: str, results: list[ReplayResult]):
        super().__init__(message)
        self.results = results


@dataclass
class ReplayResult:
    """What happened to one recording."""

    file: Path
    status: str = "failed"  # "ok" | "partial" (recording stopped mid-scan) | "failed"
    message: str = ""
    lines: int = 0  # distinct lines acquired
    total_lines: int = 0  # lines of the frame (header)
    recorded_lines: int = 0  # lines the recording holds
    run_uid: str = ""
    journal: Path | None = None
    tip_last: str = ""
    tip_verdicts: int = 0
    tip_not_sharp: int = 0
    reconstruction_png: Path | None = None
    reconstruction_npy: Path | None = None
    frame_identical: bool | None = None
    reconstruction_matches: bool | None = None
    reconstruction_max_error: float | None = None
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was done or skipped, and why

    @property
    def failed(self) -> bool:
        return self.status == "failed"


def collect_files(
    paths: Iterable[os.PathLike | str],
    skipped: list[str] | None = None,
) -> tuple[list[Path], list[ReplayResult]]:
    """Expand folders into their .sxm files (sorted); a .3ds grid given by name is kept (a
    grid replay); missing paths, and other files given by name that are not .sxm scans (a
    .dat spectrum, a grid saved as .sxm, ...), become failed rows.

    ``skipped`` receives one line per folder naming the other files it holds, which a
    folder replay passes over.
    """
    files: list[Path] = []
    bad: list[ReplayResult] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            entries = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            found = [p for p in entries if p.suffix.lower() == ".sxm"]
            others = [p for p in entries if p.suffix.lower() != ".sxm"]
            if others and skipped is not None:
                shown = ", ".join(p.name for p in others[:8]) + (
                    f", ... ({len(others) - 8} more)" if len(others) > 8 else ""
                )
                skipped.append(
                    f"{path}: replaying its {len(found)} .sxm file(s); skipped {len(others)} other file(s): {shown}"
                )
            if not found:
                bad.append(ReplayResult(path, message=f"{path}: folder holds no .sxm files"))
            files.extend(found)
        elif path.is_file():
            why = None if is_grid(path) else not_a_scan(path)
            if why is not None:
                bad.append(ReplayResult(path, message=why))
            else:
                files.append(path)
        else:
            bad.append(ReplayResult(path, message=f"{path}: no such file or folder"))
    return files, bad


def _signal_indexes(server, scan) -> dict[str, int]:
    """Channel name -> signal index the replaying controller serves it under."""
    source = server.controller.replay
    return {name: int(source.index_of[name]) for name in scan.channels}


def _directions(scan) -> tuple[str, ...]:
    """Directions present in every channel (a single-direction recording has one)."""
    dirs = [d for d in ("forward", "backward") if all(d in c for c in scan.channels.values())]
    return tuple(dirs)


def _replay_plan(stm, scan, *, channels: dict[str, int], z_controller: str, md: dict):
    """``plans.live_frame`` with the recording's geometry.

    The replaying controller refuses Scan.FrameSet/Scan.BufferSet ("frame and buffer
    come from the recording", simulators/controller.py) and already holds exactly this
    frame and buffer, so those two settings are dropped from the plan; everything else
    (configuration, run, one event per line) is live_frame unchanged.
    """
    frame = {
        "center_x_m": scan.offset_m[0],
        "center_y_m": scan.offset_m[1],
        "width_m": scan.range_m[0],
        "height_m": scan.range_m[1],
        "angle_deg": scan.angle_deg,
    }
    fixed = (stm.frame, stm.buffer)

    def drop_fixed(msg):
        return None if msg.command == "set" and msg.obj in fixed else msg

    return bpp.msg_mutator(
        live_frame(
            stm,
            frame=frame,
            pixels=scan.pixels,
            lines=scan.lines,
            channels=channels,
            direction=scan.direction,
            z_controller=z_controller,
            md=md,
        ),
        drop_fixed,
    )


def _complete_lines(scan, directions: Sequence[str]) -> int:
    """Lines an acquisition can deliver from this recording: up to the last row whose
    last-acquired pixel is present in every channel and direction (what the line follower
    waits for), so a row stopped during its backward sweep is not one of them."""
    done = np.ones(scan.lines, dtype=bool)
    for name in scan.channels:
        for d in directions:
            image = scan.image(name, d)
            # internal orientation: forward ends at the right edge, backward at the left
            done &= np.isfinite(image[:, -1] if d == "forward" else image[:, 0])
    rows = np.flatnonzero(done)
    return int(rows[-1] + 1) if rows.size else 0


def _forward_only_row(scan, row: int) -> bool:
    """The row holds forward data and no backward data in any channel."""
    fwd = [d["forward"][row] for d in scan.channels.values() if "forward" in d]
    bwd = [d["backward"][row] for d in scan.channels.values() if "backward" in d]
    return bool(bwd) and any(np.isfinite(r).any() for r in fwd) and not any(np.isfinite(r).any() for r in bwd)


def _compare_frames(run, scan, lines: int | None = None) -> list[str]:
    """Mismatches between the journaled frame and the recording ([] when bit-identical).

    With ``lines``, only the first ``lines`` rows were acquired: they must match the
    recording and the journal must hold NaN after them."""
    problems = []
    for ch in run.start["stm_live"]["channels"]:
        for direction, key in ch["keys"].items():
            got = run.images[key]
            want = scan.image(ch["name"], direction)
            if lines is not None and lines < scan.lines:
                want = want.copy()
                want[lines:] = np.nan  # never acquired: the journal must hold NaN there
            if np.array_equal(got.view(np.uint32), want.view(np.uint32)):
                continue  # bit for bit, NaN payloads included
            if np.array_equal(got, want, equal_nan=True):
                continue  # same values; only NaN payload bits differ
            hint = ""
            if np.array_equal(got, want[:, ::-1], equal_nan=True):
                hint = " (it equals the recording mirrored in x: orientation bug)"
            elif np.array_equal(got, want[::-1], equal_nan=True):
                hint = " (it equals the recording upside down: row-order bug)"
            rows = np.flatnonzero(~np.all((got == want) | (np.isnan(got) & np.isnan(want)), axis=1))
            problems.append(
                f"{ch['name']} {direction} differs from the recording in "
                f"{rows.size} rows (first {rows[:5].tolist()}){hint}"
            )
    return problems


class _ExpectedStopFilter(logging.Filter):
    """Drops the scan-ended records (ScanLines' error line, bluesky's "Run aborted" with its
    traceback) when a replayed recording ends mid-frame: the replay judges that outcome
    (partial, or failed with its cause) and reports it in one line of its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        args = record.args if isinstance(record.args, tuple) else ()
        return not (caused_by(exc, ControllerLost) or any(isinstance(a, ControllerLost) for a in args))


def _save_reconstruction(out: Path, stem: str, image: np.ndarray, source, raw: np.ndarray) -> tuple[Path, Path]:
    """``<stem>_reconstruction.npy`` and an annotated raw | reconstruction PNG."""
    out.mkdir(parents=True, exist_ok=True)
    npy = out / f"{stem}_reconstruction.npy"
    np.save(npy, image)
    png = out / f"{stem}_reconstruction.png"
    save_frame_png(
        png,
        [(f"{source.channel} ({source.direction}, replayed)", raw), ("STM-Net |psi|^2", image)],
        pixel_size_nm=source.pixel_size_nm,
        line_spacing_nm=source.line_spacing_nm,
        scan_direction=source.scan_direction,
        units=[source.unit, "a.u."],
        caption=source.caption(stem),
    )
    return png, npy


def _key_of(run, channel: str, direction: str) -> str:
    """The event data key that journaled ``channel``'s ``direction`` lines."""
    return next(ch["keys"][direction] for ch in run.start["stm_live"]["channels"] if ch["name"] == channel)


def _replay_one(
    path: Path, *, session, pipeline: Consumers, reconstructor, time_scale: float, out: Path, stem: str
) -> ReplayResult:
    result = ReplayResult(path)
    t0 = time.perf_counter()
    why = not_a_scan(path)
    if why is not None:  # a .3ds grid or .dat spectrum in a folder of scans, renamed
        result.message = why
        return result
    try:
        scan = read_sxm(path)
    except SxmError as exc:
        result.message = str(exc)
        return result
    result.total_lines = scan.lines
    result.recorded_lines = scan.lines_scanned
    directions = _directions(scan)
    if not directions:
        result.message = (
            f"{path}: no direction is recorded for every channel ({ {n: sorted(d) for n, d in scan.channels.items()} })"
        )
        return result
    try:
        scan_pitch(scan, name=str(path))
    except ValueError as exc:  # a frame without a size cannot be served as one
        result.message = str(exc)
        return result
    try:  # the same reading of the file as `stm-live reconstruct` and the live callbacks
        source = from_scan(scan, name=path.name)
        z_mode = "constant_current" if source.mode == "constant_current" else "constant_height"
    except ValueError as exc:  # no image channel (an AFM-only frame): replay it all the same
        source, no_image = None, str(exc)
        z_mode = "constant_current" if scan.feedback_on is not False else "constant_height"
    try:
        server = start_server_thread(replay=path, time_scale=time_scale, seed=0)
    except ValueError as exc:  # ReplayError names the file
        result.message = str(exc)
        return result
    stm = None
    try:
        channels = _signal_indexes(server, scan)
        # A slow replay (recorded line time / time_scale) must not read as a stall.
        line_s = sum(server.controller.line_times_s) / time_scale
        stm = NanonisSTM(server.host, server.port, name="stm", timeout=10.0)
        stm.lines.line_timeout = max(30.0, 5 * line_s)
        # live_frame keeps the directions configured here (it sets channels/pixels/lines).
        stm.lines.configure(
            {"channels": channels, "pixels": scan.pixels, "lines": scan.lines, "directions": directions}
        )
        before = session.journal.last_path
        plan_error: Exception | None = None
        try:
            session(
                _replay_plan(
                    stm, scan, channels=channels, z_controller=z_mode, md={"replay_of": str(path), "tip_policy": "off"}
                )
            )
        except Exception as exc:  # judged below, once we know what was acquired
            plan_error = exc
        journal = session.journal.last_path
        if journal is None or journal == before or not journal.is_file():
            raise plan_error or RuntimeError("no run was journaled")
        run = run_data(read_journal(journal))
        result.run_uid, result.journal = run.uid, journal
        result.lines = len(set(run.lines_read))
        complete = _complete_lines(scan, directions)
        if plan_error is not None:
            # A recording stopped mid-scan ends the replayed scan after its last line
            # (ControllerLost, wrapped by the RunEngine): expected when every complete
            # recorded line arrived; anything else is a real failure.
            if not (complete < scan.lines and result.lines >= complete and caused_by(plan_error, ControllerLost)):
                result.problems.append(
                    f"acquisition stopped after {result.lines} of {complete} recorded lines: {describe(plan_error)}"
                )
        result.problems += _compare_frames(run, scan, lines=result.lines)
        result.frame_identical = not result.problems

        # Derived results: wait (bounded) for the final reconstruction and the verdicts.
        done_recon = pipeline.collector.wait_stopped("reconstruction", run.uid, FINAL_TIMEOUT_S)
        done_tip = pipeline.collector.wait_stopped("tip", run.uid, FINAL_TIMEOUT_S)
        verdicts = pipeline.collector.verdicts.get(run.uid, [])
        result.tip_verdicts = len(verdicts)
        result.tip_last = verdicts[-1]["label"] if verdicts else ""
        result.tip_not_sharp = sum(v["label"] != "co_sharp" for v in verdicts)
        if not done_tip:
            result.problems.append(f"tip verdicts incomplete after {FINAL_TIMEOUT_S:.0f} s")
        final = pipeline.collector.finals.get(run.uid)
        if source is not None and not source.scope.ok:  # said once, not a failure
            result.notes.append(f"not reconstructed: {source.scope.reason}")
        elif final is None:
            why = (
                no_image
                if source is None
                else ("timed out" if not done_recon else "the reconstruction failed (see log)")
            )
            result.problems.append(f"no final reconstruction: {why}")
        else:
            # the rows the live side received, read as the live side reads them
            offline_in = from_scan(scan, source.channel, source.direction, name=path.name, lines=result.lines)
            raw = run.images[_key_of(run, source.channel, source.direction)]
            result.reconstruction_png, result.reconstruction_npy = _save_reconstruction(
                out, stem, final, offline_in, raw
            )
            offline = reconstructor.reconstruct(
                offline_in.image, offline_in.pixel_size_nm, line_spacing_nm=offline_in.line_spacing_nm
            )
            scale = float(np.nanmax(np.abs(offline))) if np.isfinite(offline).any() else 1.0
            same_nan = np.array_equal(np.isnan(final), np.isnan(offline))
            err = float(np.nanmax(np.abs(final - offline))) if same_nan else float("inf")
            result.reconstruction_max_error = err
            result.reconstruction_matches = same_nan and np.allclose(
                final, offline, rtol=RECON_RTOL, atol=RECON_ATOL_FRACTION * scale, equal_nan=True
            )
            if not result.reconstruction_matches:
                result.problems.append(
                    f"final reconstruction differs from the offline one (max |diff| {err:.3g}, scale {scale:.3g})"
                )
            check = pipeline.collector.checks.get(run.uid)
            if check is not None:
                result.notes.append(
                    f"self-consistency: agreement {check['agreement']:.2f}, fitted tip s share {check['w_s']:.2f}"
                    + ("" if check["orbital"] else f"; not a CO-tip orbital image: {check['reason']}")
                )
        if result.problems:
            result.status = "failed"
            result.message = f"{path}: " + "; ".join(result.problems)
        elif result.lines < scan.lines:
            result.status = "partial"
            result.message = f"{path}: recording stopped mid-scan; replayed its {result.lines} of {scan.lines} lines"
            if result.recorded_lines > result.lines:  # a half line, not acquirable as one
                where = (
                    "during its backward sweep" if _forward_only_row(scan, result.recorded_lines - 1) else "mid-line"
                )
                result.message += (
                    f"; line {result.recorded_lines}, stopped {where}, is in the file but was never a finished line"
                )
        else:
            result.status = "ok"
            result.message = f"{path}: replayed {result.lines} lines"
        if source is not None:
            result.notes.insert(0, source.describe())
        result.message = "; ".join([result.message, *result.notes])
    except Exception as exc:  # one bad file must not stop the batch
        logger.debug("replay of %s failed", path, exc_info=True)
        result.status = "failed"
        result.message = f"{path}: {describe(exc)}"
    finally:
        if stm is not None:
            stm.stop_scan()
            stm.close()
        server.stop()
        result.seconds = time.perf_counter() - t0
    return result


def _replay_grid(path: Path, *, session, time_scale: float) -> ReplayResult:
    """One .3ds grid through the simulator, the ophyd device and grid_spectroscopy; every
    journaled sweep checked against the recording."""
    result = ReplayResult(path)
    t0 = time.perf_counter()
    try:
        source = GridReplaySource.from_file(path)
    except ValueError as exc:  # ReplayError names the file
        result.message = str(exc)
        return result
    grid = source.grid
    order = np.flatnonzero(grid.measured.reshape(-1))  # acquisition order
    ny, nx = grid.shape
    result.total_lines, result.recorded_lines = nx * ny, len(order)
    points = np.stack([source.x.reshape(-1)[order], source.y.reshape(-1)[order]], -1)
    server = start_server_thread(replay=source, time_scale=time_scale, seed=0)
    stm = None
    try:
        stm = NanonisSTM(server.host, server.port, name="stm", timeout=10.0)
        spec = BiasSpectroscopy(stm=stm, name="spec")
        before = session.journal.last_path
        session(grid_spectroscopy(stm, spec, points=points, md={"replay_of": str(path)}))
        journal = session.journal.last_path
        if journal is None or journal == before:
            raise RuntimeError("no run was journaled")
        result.journal = journal
        docs = read_journal(journal)
        result.run_uid = docs[0][1]["uid"]
        events = {int(d["data"][spec.point_index.name]): d["data"] for n, d in docs if n == "event"}
        result.lines = len(events)
        for k, flat in enumerate(order):
            iy, ix = divmod(int(flat), nx)
            got = events.get(k)
            if got is None:
                result.problems.append(f"point ({ix}, {iy}) was not journaled")
                continue
            for name, recorded in grid.channels.items():
                values = np.asarray(got.get(spec.data_key(name), []), np.float32)
                if values.tobytes() != recorded[iy, ix].tobytes():
                    result.problems.append(f"{name} at point ({ix}, {iy}) differs from the recording")
            if not np.allclose(got[f"{spec.name}_bias"], grid.sweep, rtol=1e-6, atol=1e-9):
                result.problems.append(f"the sweep at point ({ix}, {iy}) differs from the recording's")
        result.frame_identical = not result.problems
        if result.problems:
            result.message = (
                f"{path}: "
                + "; ".join(result.problems[:5])
                + (f"; ... ({len(result.problems)} problems)" if len(result.problems) > 5 else "")
            )
        else:
            result.status = "partial" if len(order) < nx * ny else "ok"
            result.message = (
                f"{path}: replayed {len(order)} grid points x {grid.points} sweep points, "
                f"{len(grid.channels)} channels, bit for bit"
            )
            if result.status == "partial":
                result.message += f"; the recording stopped after {len(order)} of {nx * ny} points"
    except Exception as exc:  # one bad file must not stop the batch
        logger.debug("replay of %s failed", path, exc_info=True)
        result.status, result.message = "failed", f"{path}: {describe(exc)}"
    finally:
        if stm is not None:
            stm.close()
        server.stop()
        result.seconds = time.perf_counter() - t0
    return result


def _summary_table(results: Sequence[ReplayResult], out: Path):
    table = Table(title=f"replay summary: {len(results)} file(s); reconstructions in {out}")
    for column in ("file", "status", "lines", "frame", "tip: last (not sharp/n)", "reconstruction"):
        table.add_column(column, overflow="fold")
    colour = {"ok": "green", "partial": "yellow", "failed": "red"}
    for r in results:
        frame = {True: "exact", False: "DIFFERS", None: "-"}[r.frame_identical]
        recon = "-"
        if r.reconstruction_png is not None:
            recon = r.reconstruction_png.stem + ".png/.npy"
            if r.reconstruction_matches is False:
                recon += " (!= offline)"
        tip = f"{r.tip_last or '-'} ({r.tip_not_sharp}/{r.tip_verdicts})"
        table.add_row(
            r.file.name,
            f"[{colour[r.status]}]{r.status}[/]",
            f"{r.lines}/{r.total_lines}" if r.total_lines else "-",
            frame,
            tip,
            recon,
        )
    return table


def run_replay(
    files: Sequence[os.PathLike | str],
    time_scale: float = 50.0,
    worker: str | None = None,
    data_dir: os.PathLike | str = "stm_live_data",
    out: os.PathLike | str = "replay_output",
    view: bool = False,
    *,
    device: str = "auto",
    worker_wait_s: float = 60.0,
    console=None,
) -> list[ReplayResult]:
    """Replay recorded scans through the acquisition pipeline; print one summary table.

    Parameters
    ----------
    files : .sxm files or folders of them, and .3ds grids
    time_scale : float
        Scan clock speed-up over the recorded line time.
    worker : str, optional
        0MQ address for a remote worker (``stm-live worker``): the proxy's outbound
        address, optionally ``,RESULTS``; reconstruction and verdicts then come from it.
    data_dir : path
        Journal (raw runs and derived runs) in ``data_dir/journal``.
    out : path
        ``<stem>_reconstruction.png`` / ``.npy`` per file.
    view : bool
        Serve the live viewer during the replay (prints its URL).

    Returns
    -------
    list of ReplayResult, one per file (and per missing path)

    Raises
    ------
    ReplayFailed
        After the table, when any file failed (the CLI exits non-zero).
    """
    if not time_scale or time_scale <= 0:
        raise ValueError(f"time_scale must be > 0, got {time_scale!r}")
    console = console or Console()
    out, data_dir = Path(out), Path(data_dir)
    skipped: list[str] = []
    paths, results = collect_files(files, skipped=skipped)
    viewer = state = None
    if view:
        state = ViewerState()
        viewer = Viewer(state)
        console.print(f"viewer: {viewer.url}")
    for line in skipped:
        console.print(f"[yellow]{line}[/]")
    grids = [p for p in paths if is_grid(p)]
    paths = [p for p in paths if not is_grid(p)]
    stack = contextlib.ExitStack()
    try:
        if grids:
            with AcquisitionSession(data_dir, progress=False) as session:
                for path in grids:
                    console.print(f"replaying {path} (grid)")
                    results.append(_replay_grid(path, session=session, time_scale=time_scale))
        if paths:
            reconstructor, classifier = load_models(device, tip=worker is None)
            stems: set[str] = set()
            quiet = _ExpectedStopFilter()
            for name in ("bluesky", "stm_live.devices.stm"):
                logging.getLogger(name).addFilter(quiet)
                stack.callback(logging.getLogger(name).removeFilter, quiet)
            # replay never acts on a tip: the monitor's verdicts only (in-process or the worker's)
            with AcquisitionSession(
                data_dir,
                progress=True,
                live=worker is None,
                reconstructor=reconstructor,
                tip=worker is None,
                classifier=classifier,
                worker=worker,
                worker_wait_s=worker_wait_s,
                viewer_state=state,
                say=console.print,
            ) as session:
                pipeline = session.consumers
                for path in paths:
                    stem, n = path.stem, 1
                    while stem in stems:  # same name in two folders: keep both outputs
                        n += 1
                        stem = f"{path.stem}_{n}"
                    stems.add(stem)
                    console.print(f"replaying {path}")
                    result = _replay_one(
                        path,
                        session=session,
                        pipeline=pipeline,
                        reconstructor=reconstructor,
                        time_scale=time_scale,
                        out=out,
                        stem=stem,
                    )
                    results.append(result)
    finally:
        stack.close()
        if viewer is not None:
            viewer.close()
    console.print(_summary_table(results, out))
    colour = {"ok": "green", "partial": "yellow", "failed": "red"}
    for r in results:
        console.print(f"[{colour[r.status]}]{r.message}[/]", soft_wrap=True)
    failed = [r for r in results if r.failed]
    if failed:
        raise ReplayFailed(
            f"{len(failed)} of {len(results)} replays failed: " + " | ".join(r.message for r in failed), results
        )
    return results
