"""The ``stm-live`` command.

It parses options and calls one function per command, in that command's module of
:mod:`stm_live.app` (testable without the CLI). Each command imports its module inside its
function: torch, bluesky and tiled take seconds to import, and ``stm-live --help`` does not
wait for them.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import typer

from stm_live.app.queue import queue_app  # light: typer only; the queue server loads on use
from stm_live.models import check_device  # light: refuses an impossible --device before any load

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])
sim_app = typer.Typer(no_args_is_help=True, help="The simulated Nanonis controller.")
runs_app = typer.Typer(no_args_is_help=True, help="Runs stored in the journal and tiled.")
app.add_typer(sim_app, name="sim")
app.add_typer(runs_app, name="runs")
app.add_typer(queue_app, name="queue")


def _fail(exc: Exception) -> None:
    """Print a user error without a traceback and exit non-zero."""
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@contextmanager
def _user_errors():
    """The CLI's one error boundary: what a user can fix (bad input, a missing file, a
    controller that cannot be reached or refuses a command) is one line, not a traceback.
    Acquired data is already in the journal when these surface."""
    from stm_live.devices.protocol import NanonisError  # here: numpy (0.1 s) would slow --help

    try:
        yield
    except (ValueError, OSError, NanonisError) as exc:
        _fail(exc)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_output"), help="Report folder."),
    data_dir: Path = typer.Option(Path("stm_live_data"), help="Journal and tiled data."),
    frames: int = typer.Option(3, min=1, help="Live frames to acquire."),
    seed: int = typer.Option(0),
    view: bool = typer.Option(False, "--view", help="Serve the live viewer while it runs."),
    quick: bool = typer.Option(False, "--quick", help="Small frames, for smoke tests."),
    tiled_uri: str | None = typer.Option(
        None, help="A lab's tiled server for the runs (default: an embedded one in DATA_DIR/tiled)."
    ),
):
    """Simulated controller, live frames, live reconstruction, tip monitor, report."""
    from stm_live.app.demo import run_demo

    with _user_errors():
        run_demo(out=out, data_dir=data_dir, frames=frames, seed=seed, view=view, quick=quick, tiled_uri=tiled_uri)


@sim_app.command("serve")
def sim_serve(
    ctx: typer.Context,
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(6501),
    scenario: Path | None = typer.Option(None, help="Scenario YAML (default: shipped)."),
    replay: Path | None = typer.Option(None, help="Serve this recorded .sxm instead."),
    time_scale: float = typer.Option(1.0, help="Scan clock speed-up factor."),
    seed: int = typer.Option(0),
    nanonis_release: int = typer.Option(
        14718, "--nanonis-release", help="Nanonis release to emulate (10862, 12202, 13172, 13742, 14254, 14573, 14718)."
    ),
    session_dir: Path | None = typer.Option(
        None, "--session-dir", help="Session folder for autosaved .sxm files (created if missing)."
    ),
    cassette: Path | None = typer.Option(
        None,
        "--cassette",
        help="Answer from this session recording (.nrec) first; the simulator answers commands it never saw.",
    ),
    cassette_only: bool = typer.Option(
        False, "--cassette-only", help="With --cassette: an error reply for what the recording never saw."
    ),
):
    """Run the simulated controller until Ctrl-C."""
    from stm_live.app.sim import serve

    release_given = ctx.get_parameter_source("nanonis_release").name != "DEFAULT"
    with _user_errors():
        serve(
            host=host,
            port=port,
            scenario=scenario,
            replay=replay,
            time_scale=time_scale,
            seed=seed,
            nanonis_release=nanonis_release if release_given else None,
            session_dir=session_dir,
            cassette=cassette,
            cassette_only=cassette_only,
        )


@sim_app.command("record")
def sim_record(
    upstream: list[str] = typer.Option(
        ..., "--upstream", help="Controller HOST:PORT; repeat for each of its ports in use (up to 4)."
    ),
    listen: str = typer.Option(
        "127.0.0.1:6501", "--listen", help="HOST:PORT for the first upstream; the next ones on PORT+1, ..."
    ),
    out: Path = typer.Option(..., "--out", help="The new session recording (.nrec); never overwritten."),
    faults: str | None = typer.Option(
        None, "--faults", help="Scenario (name or YAML) whose faults: the proxy applies to its clients."
    ),
):
    """Record a session: a transparent proxy between any client and a controller."""
    from stm_live.app.sim import record

    with _user_errors():
        record(upstream, listen, out, faults)


@sim_app.command("inspect")
def sim_inspect(
    recording: Path = typer.Argument(..., help="A session recording (.nrec)."),
    redact: Path | None = typer.Option(
        None, "--redact", help="Write a copy without session/file paths and comments, to share."
    ),
):
    """Commands, counts, reply times, errors and release of a session recording."""
    from stm_live.app.sim import inspect

    with _user_errors():
        inspect(recording, redact)


@app.command()
def scan(
    profile: str = typer.Option("sim", help="Profile name or YAML path."),
    host: str | None = typer.Option(None, help="Override the profile's host."),
    port: int | None = typer.Option(None, help="Override the profile's first port."),
    width_nm: float = typer.Option(5.0),
    pixels: int = typer.Option(128),
    lines: int = typer.Option(128),
    direction: str = typer.Option("down"),
    frames: int = typer.Option(1, min=1),
    data_dir: Path = typer.Option(Path("stm_live_data")),
    tiled_uri: str | None = typer.Option(
        None, help="A lab's tiled server for the runs (default: an embedded one in DATA_DIR/tiled)."
    ),
    tip_policy: str = typer.Option("prompt", help="off | prompt | auto"),
    worker: str | None = typer.Option(None, help="0MQ address of a remote worker."),
    view: bool = typer.Option(False, "--view"),
):
    """Acquire live frames from a controller (real or simulated)."""
    from stm_live.app.scan import run_scan

    with _user_errors():
        run_scan(
            profile=profile,
            host=host,
            port=port,
            width_nm=width_nm,
            pixels=pixels,
            lines=lines,
            direction=direction,
            frames=frames,
            data_dir=data_dir,
            tiled_uri=tiled_uri,
            tip_policy=tip_policy,
            worker=worker,
            view=view,
        )


@app.command()
def replay(
    files: list[Path] = typer.Argument(..., help=".sxm files or folders of them."),
    time_scale: float = typer.Option(50.0),
    worker: str | None = typer.Option(None, help="0MQ address of a remote worker."),
    data_dir: Path = typer.Option(Path("stm_live_data")),
    out: Path = typer.Option(Path("replay_output")),
    view: bool = typer.Option(False, "--view"),
):
    """Replay recorded scans through the whole acquisition pipeline."""
    from stm_live.app.replay import run_replay

    with _user_errors():
        run_replay(files=files, time_scale=time_scale, worker=worker, data_dir=data_dir, out=out, view=view)


@app.command()
def reconstruct(
    inputs: list[Path] = typer.Argument(..., help=".sxm scans, .3ds grids or .npy images, or folders of them."),
    output: Path = typer.Option(
        Path("reconstructions"), "-o", "--output", help="Output .npy/.png/.sxm for one file, else a folder."
    ),
    pixel_size: float | None = typer.Option(None, help="nm per pixel (read from .sxm; needed for .npy)."),
    line_spacing: float | None = typer.Option(None, help="nm per line when not square with pixels."),
    channel: str | None = typer.Option(
        None, help=".sxm channel (default: Z on constant current, Current on constant height)."
    ),
    fmt: str = typer.Option("png", "--format", help="Per-file output in a folder: png, npy or sxm."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    views: int = typer.Option(2, help="Symmetry views averaged: 2 (default), 4 (best, 2x slower) or 1 (fastest)."),
    bias: list[float] | None = typer.Option(
        None,
        help=".3ds grids: the biases (V) whose maps to reconstruct (default: every sweep point; "
        "the PNG shows the strongest resonances).",
    ),
):
    """Reconstruct the pristine orbital |psi|^2 from CO-tip images; one line per file."""
    from stm_live.app.reconstruct import main as reconstruct_main

    with _user_errors():
        code = reconstruct_main(
            inputs,
            output,
            pixel_size_nm=pixel_size,
            line_spacing_nm=line_spacing,
            channel=channel,
            fmt=fmt,
            device=device,
            views=views,
            biases=bias,
        )
    raise typer.Exit(code=code)


@app.command()
def classify(
    input: Path = typer.Argument(..., help="A recorded .sxm frame."),
    channel: str | None = typer.Option(None, help=".sxm channel (default: as reconstruct picks it)."),
    as_json: bool = typer.Option(
        False,
        "--json",
        help="One JSON object: label, good, probabilities, s_fraction, in_domain, domain_score, held_back, reason.",
    ),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
):
    """The tip classifier's verdict on one recorded frame ("unknown" outside what it knows)."""
    from stm_live.app.classify import classify_main

    with _user_errors():
        classify_main(input, channel=channel, as_json=as_json, device=check_device(device))


@app.command()
def train(
    ctx: typer.Context,
    model: str = typer.Option(
        "stmnet",
        help="stmnet | wide (STM-Net twice as wide, for a GPU) | tipstate | tipdomain (the tip "
        "classifier's domain statistics)",
    ),
    steps: int = typer.Option(4000, help="Training steps (with --minutes: a cap, if given)."),
    out: Path | None = typer.Option(None, help="Checkpoint path (default: shipped weights)."),
    device: str = typer.Option("auto"),
    seed: int | None = typer.Option(None, help="Random seed (default: the model's own)."),
    resume: bool = typer.Option(False, "--resume"),
    lr: float | None = typer.Option(None, help="Peak learning rate (default: the model's own)."),
    threads: int | None = typer.Option(None, help="CPU threads for torch (default: the model's own)."),
    init: Path | None = typer.Option(None, help="Warm start from this checkpoint (same architecture)."),
    bank_size: int | None = typer.Option(
        None, help="tipstate: simulated frames rendered once and reused with fresh noise (default 12000)."
    ),
    weights: Path | None = typer.Option(
        None, help="tipdomain: the classifier checkpoint whose domain to fit (default: the shipped one)."
    ),
    minutes: float | None = typer.Option(
        None,
        help="stmnet/wide: train for this many minutes of wall-clock time (the final evaluation "
        "comes after); --steps then caps the steps only if given.",
    ),
    workers: int | None = typer.Option(
        None, help="stmnet/wide: processes simulating training pairs (default: 0 on CPU, all cores but two on CUDA)."
    ),
    broad_recipe: bool = typer.Option(
        False,
        "--broad-recipe",
        help="tipstate: the broadened recipe (metal terraces, steps, adsorbates, small "
        "molecules, bond-resolving heights).",
    ),
):
    """Train a network on the physics simulator; writes checkpoint and model card."""
    from stm_live.app.train import main as train_main

    with _user_errors():
        train_main(
            model=model,
            steps=steps,
            steps_given=ctx.get_parameter_source("steps").name != "DEFAULT",
            out=out,
            device=device,
            seed=seed,
            resume=resume,
            lr=lr,
            threads=threads,
            init=init,
            bank_size=bank_size,
            weights=weights,
            minutes=minutes,
            workers=workers,
            broad_recipe=broad_recipe,
        )


@app.command()
def evaluate(
    model: str = typer.Option("stmnet", help="stmnet | tipstate"),
    device: str = typer.Option("auto"),
    samples: int | None = typer.Option(
        None, help="Samples per molecule/orbital/tip cell (stmnet, default 8) or per class (tipstate, default 40)."
    ),
    seed: int = typer.Option(1234),
    cube: list[Path] | None = typer.Option(
        None, help="stmnet: evaluate on this cube file's orbital (e.g. from DFT) instead; repeatable."
    ),
    cube_mo: int = typer.Option(0, help="Which orbital of a multi-orbital cube file (0 = the first)."),
    vacuum_from: float | None = typer.Option(
        None,
        help="Height (nm) above the molecular plane from which cube orbitals are continued into "
        "vacuum (default 0.2; 0 samples the cube as it is).",
    ),
):
    """Evaluate a shipped network on held-out simulated data; prints a table."""
    from stm_live.app.evaluate import main as evaluate_main

    with _user_errors():
        evaluate_main(
            model=model, device=device, samples=samples, seed=seed, cube=cube, cube_mo=cube_mo, vacuum_from=vacuum_from
        )


@app.command()
def bench(
    only: str | None = typer.Option(None, help="Run benchmarks whose name contains this."),
    args: list[str] | None = typer.Argument(
        None, help="Arguments for the benchmark --only picks, after --: `stm-live bench --only gpu -- --smoke`."
    ),
):
    """Run the benchmarks in benchmarks/ and print their tables."""
    from stm_live.app.bench import main as bench_main

    bench_main(only=only, argv=args)


_TILED_URI_HELP = "A tiled server (e.g. the lab's) to read the runs from, in the BlueskyRun layout."


@runs_app.command("list")
def runs_list(
    data_dir: Path = typer.Option(Path("stm_live_data")),
    tiled_uri: str | None = typer.Option(None, help=_TILED_URI_HELP),
):
    """List the runs in the journal (or in tiled)."""
    from stm_live.app.runs import runs_list as list_runs

    with _user_errors():
        list_runs(data_dir=data_dir, tiled_uri=tiled_uri)


@runs_app.command("show")
def runs_show(
    run: str,
    data_dir: Path = typer.Option(Path("stm_live_data")),
    tiled_uri: str | None = typer.Option(None, help=_TILED_URI_HELP),
):
    """Show one run's metadata and lines."""
    from stm_live.app.runs import runs_show as show_run

    with _user_errors():
        show_run(run, data_dir=data_dir, tiled_uri=tiled_uri)


@runs_app.command("export")
def runs_export(
    run: str,
    sxm: Path = typer.Option(..., "--sxm", help="Output .sxm file."),
    data_dir: Path = typer.Option(Path("stm_live_data")),
    tiled_uri: str | None = typer.Option(None, help=_TILED_URI_HELP),
):
    """Export a run as a Nanonis .sxm file."""
    from stm_live.app.runs import runs_export as export_run

    with _user_errors():
        export_run(run, sxm=sxm, data_dir=data_dir, tiled_uri=tiled_uri)


@app.command()
def worker(
    connect: str = typer.Option("tcp://127.0.0.1:5578", help="Proxy's outbound address."),
    results: str = typer.Option("tcp://127.0.0.1:5580", help="Where to send results."),
    device: str = typer.Option("auto"),
    curve_keys: Path | None = typer.Option(None, help="Folder with CURVE keys."),
    journal: Path | None = typer.Option(None, help="Data folder to catch up from after a late join."),
):
    """Run live reconstruction and the tip monitor on documents from a 0MQ proxy."""
    from stm_live.app.worker import run_worker

    with _user_errors():
        device = check_device(device)
    run_worker(connect=connect, results=results, device=device, curve_keys=curve_keys, journal=journal)


@app.command()
def view(
    port: int = typer.Option(8765),
    data_dir: Path = typer.Option(Path("stm_live_data"), help="Data folder whose journals to follow."),
    tiled_uri: str | None = typer.Option(
        None, help="Show a run stored in this tiled server (BlueskyRun layout) instead."
    ),
    run: str = typer.Option("latest", help="With --tiled-uri: the run (uid, prefix, latest, -N)."),
):
    """Serve the live viewer on 127.0.0.1, following the runs journaled in DATA_DIR."""
    from stm_live.app.view import run_viewer

    with _user_errors():
        run_viewer(port=port, data_dir=data_dir, tiled_uri=tiled_uri, run=run)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
