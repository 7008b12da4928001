"""``stm-live reconstruct``: the pristine orbital |psi|^2 from recorded CO-tip images.

Each .sxm (and each map of a .3ds grid) is read through :mod:`stm_live.interpret` (channel, sign, levelling, pitch,
scope), so this command, replay and live scans see a file the same way. Per file it prints
one line: what it read, what it did, how long it took and where the result went, or why it
skipped the file. A folder (or several files) writes one result per file into the output
folder; a bad file is one line and the rest go on.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console

from stm_live.console import describe
from stm_live.interpret import NetworkInput, from_scan, network_input, stmnet_scope
from stm_live.io.spectroscopy import read_3ds, split_unit
from stm_live.io.sxm import read_sxm, write_sxm
from stm_live.models.consistency import check_reconstruction
from stm_live.report import save_frame_png

__all__ = ["ReconstructResult", "main", "reconstruct_files", "reconstruct_one"]

OUTPUT_SUFFIXES = (".npy", ".png", ".sxm")


@dataclass
class ReconstructResult:
    """What happened to one input file."""

    source: Path
    # "ok" | "flagged" (written, but not a CO-tip orbital image by the self-consistency check)
    # | "skipped" (outside STM-Net's scope) | "failed"
    status: str = "failed"
    output: Path | None = None
    message: str = ""
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def _read(src: Path, *, pixel_size_nm: float | None, line_spacing_nm: float | None, channel: str | None):
    """``(NetworkInput, SxmScan or None)`` for a .sxm or .npy file."""
    suffix = src.suffix.lower()
    if suffix == ".sxm":
        scan = read_sxm(src)
        net_in = from_scan(scan, channel, name=src.name)
        if pixel_size_nm is not None:  # the user overrides the header's pitch
            net_in.pixel_size_nm = float(pixel_size_nm)
            net_in.line_spacing_nm = float(line_spacing_nm or pixel_size_nm)
            net_in.scope = stmnet_scope(net_in.image.shape, net_in.pixel_size_nm, net_in.line_spacing_nm)
        return net_in, scan
    if suffix == ".npy":
        if pixel_size_nm is None:
            raise ValueError(f"{src.name}: a .npy image needs --pixel-size (nm per pixel)")
        raw = np.load(src, allow_pickle=False)
        if raw.ndim != 2:
            raise ValueError(f"{src.name}: a .npy image must be 2-D (lines, pixels), got shape {raw.shape}")
        # A bare array says nothing of its channel: it is taken as a current map.
        return network_input(
            raw, channel=src.stem, mode="constant_height", pixel_size_nm=pixel_size_nm, line_spacing_nm=line_spacing_nm
        ), None
    if suffix == ".dat":
        raise ValueError(
            f"{src.name}: a point spectrum has no image; reconstruct takes .sxm scans, .3ds grids or .npy images"
        )
    raise ValueError(f"{src.name}: input must be .sxm, .3ds or .npy")


# ----------------------------------------------------------------------------- grids
# Default map channel of a grid: the lock-in's dI/dV, else the current.
GRID_CHANNELS = ("LI Demod 1 X", "LI Demod 2 X", "Current")
GRID_PNG_ENERGIES = 4  # maps drawn when no --bias is given: the strongest resonances


def grid_maps(
    grid, channel: str | None = None, biases: Sequence[float] | None = None, *, name: str = ""
) -> list[NetworkInput]:
    """The maps of a grid at ``biases`` (default: every sweep point), each read through
    :func:`stm_live.interpret.network_input` as a frame of the grid's geometry."""

    names = list(grid.channels)
    if channel is None:
        bases = {split_unit(n)[0].lower(): n for n in names}
        channel = next((bases[c.lower()] for c in GRID_CHANNELS if c.lower() in bases), None)
        if channel is None:
            raise ValueError(f"{name}: no dI/dV or current channel among {', '.join(names)}; choose one with --channel")
    full = grid.channel_name(channel)
    unit = split_unit(full)[1]
    sweep = grid.sweep
    ny, nx = grid.shape
    pixel_nm, line_nm = grid.size_m[0] * 1e9 / nx, grid.size_m[1] * 1e9 / ny
    mode = "constant_height" if split_unit(full)[0].lower().startswith("current") else "signal"
    picked = range(len(sweep)) if not biases else sorted({int(np.argmin(np.abs(sweep - b))) for b in biases})
    note = "grid: each point's height set by the feedback before its sweep"
    return [
        network_input(
            grid.channels[full][..., k],
            channel=full,
            mode=mode,
            unit=unit,
            bias_V=float(sweep[k]),
            pixel_size_nm=pixel_nm,
            line_spacing_nm=line_nm,
            scan_direction=grid.direction,
            notes=[note],
        )
        for k in picked
    ]


def strongest_maps(maps: Sequence[NetworkInput], count: int = GRID_PNG_ENERGIES) -> list[int]:
    """Indexes of the ``count`` maps of largest mean signal that are local maxima of the
    grid-averaged spectrum (its resonances), in bias order; the largest maps if there are fewer."""
    level = np.array([float(np.nanmean(m.image)) if np.isfinite(m.image).any() else -np.inf for m in maps])
    peaks = [
        k
        for k in range(len(level))
        if level[k] >= level[max(k - 1, 0)] and level[k] >= level[min(k + 1, len(level) - 1)]
    ]
    order = sorted(peaks, key=lambda k: -level[k])[:count]
    if len(order) < count:
        order += [k for k in np.argsort(-level) if k not in order][: count - len(order)]
    return sorted(order)


def reconstruct_grid(
    src: Path,
    dst: Path,
    reconstructor: Callable[[], object],
    *,
    channel: str | None = None,
    biases: Sequence[float] | None = None,
    result: ReconstructResult,
) -> None:
    """A .3ds grid -> ``<dst stem>.npz`` (the stack: reconstruction, input, bias_V, agreement,
    w_s per map) and ``<dst stem>.png`` (map and reconstruction at ``biases``, else at the
    strongest resonances)."""

    if dst.suffix.lower() == ".sxm":
        raise ValueError(f"{src.name}: a grid's maps are written as .npz + .png, not .sxm")
    grid = read_3ds(src)
    maps = grid_maps(grid, channel, biases, name=src.name)
    first = maps[0]
    if not first.scope.ok:
        result.status, result.message = "skipped", f"{src.name}: {first.scope.reason}"
        return
    net = reconstructor()
    t_net = time.perf_counter()
    recons, checks = [], []
    for m in maps:
        recon = net.reconstruct_detailed(m.image, m.pixel_size_nm, line_spacing_nm=m.line_spacing_nm)
        recons.append(recon.image)
        checks.append(
            check_reconstruction(m.image, recon.image, m.pixel_size_nm, m.line_spacing_nm, network=recon.network)
        )
    network_s = time.perf_counter() - t_net
    stack = dst.with_suffix(".npz")
    stack.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        stack,
        reconstruction=np.stack(recons),
        input=np.stack([m.image for m in maps]),
        bias_V=np.array([m.bias_V for m in maps]),
        agreement=np.array([c.agreement for c in checks]),
        w_s=np.array([c.w_s for c in checks]),
        channel=first.channel,
        pixel_size_nm=first.pixel_size_nm,
        line_spacing_nm=first.line_spacing_nm,
        scan_direction=first.scan_direction,
    )
    shown = range(len(maps)) if biases else strongest_maps(maps)
    panels = [
        p
        for k in shown
        for p in ((f"{maps[k].bias_V:+.3g} V", maps[k].image), (f"|psi|^2 {maps[k].bias_V:+.3g} V", recons[k]))
    ]
    png = dst.with_suffix(".png")
    save_frame_png(
        png,
        panels,
        pixel_size_nm=first.pixel_size_nm,
        line_spacing_nm=first.line_spacing_nm,
        scan_direction=first.scan_direction,
        units=[first.unit or "a.u.", "a.u."] * len(shown),
        caption=f"{src.name}; {first.channel}; grid {grid.shape[1]}x{grid.shape[0]} points x "
        f"{grid.points} biases; " + "; ".join(first.notes),
    )
    flagged = sum(not c.in_scope for c in checks)
    result.status = "ok"
    result.output = stack
    result.extra = {"maps": len(maps), "flagged": flagged}
    result.message = (
        f"{src.name}: {first.channel}, {len(maps)} map(s) of {grid.shape[1]}x{grid.shape[0]} points "
        f"({first.pixel_size_nm:.3g} nm/px) from {maps[0].bias_V:+.3g} to {maps[-1].bias_V:+.3g} V; "
        f"network {network_s:.2f} s; {flagged} map(s) not a CO-tip orbital image by the "
        f"self-consistency check; -> {stack}, {png.name}"
    )


def reconstruct_one(
    src: Path,
    dst: Path,
    reconstructor: Callable[[], object],
    *,
    pixel_size_nm: float | None = None,
    line_spacing_nm: float | None = None,
    channel: str | None = None,
    biases: Sequence[float] | None = None,
) -> ReconstructResult:
    """Reconstruct ``src`` into ``dst`` (.npy, .png or .sxm by suffix; a .3ds grid: its maps at
    ``biases`` into .npz + .png, :func:`reconstruct_grid`); never raises for a
    problem with the file (the result says it). ``reconstructor()`` gives the network, called
    only for a frame in scope (an overview is skipped before torch is even loaded)."""
    result = ReconstructResult(Path(src))
    t0 = time.perf_counter()
    try:
        if Path(src).suffix.lower() == ".3ds":
            reconstruct_grid(Path(src), Path(dst), reconstructor, channel=channel, biases=biases, result=result)
            return result
        net_in, scan = _read(Path(src), pixel_size_nm=pixel_size_nm, line_spacing_nm=line_spacing_nm, channel=channel)
        if not net_in.scope.ok:
            result.status = "skipped"
            result.message = f"{src.name}: {net_in.scope.reason}"
            return result
        net = reconstructor()
        t_net = time.perf_counter()  # the one-off model load is not the file's time
        recon = net.reconstruct_detailed(net_in.image, net_in.pixel_size_nm, line_spacing_nm=net_in.line_spacing_nm)
        network_s = time.perf_counter() - t_net
        check = check_reconstruction(
            net_in.image, recon.image, net_in.pixel_size_nm, net_in.line_spacing_nm, network=recon.network
        )
        _write(dst, net_in, recon, check, scan)
        result.status = "ok" if check.in_scope else "flagged"
        result.output = Path(dst)
        result.extra = {"consistency": check.summary(), "spread": recon.spread}
        resample = f"resampled to {net.pixel_size_nm:g} nm/px for the network, {net.views} view(s)"
        result.message = (
            f"{src.name}: {net_in.describe()}; {resample}; network {network_s:.2f} s; "
            f"{check.line()}; view spread {recon.spread:.3f} -> {dst}"
        )
    except (ValueError, OSError) as exc:
        result.message = describe(exc) if str(src.name) in str(exc) else f"{src.name}: {describe(exc)}"
    finally:
        result.seconds = time.perf_counter() - t0
    return result


def _write(dst: Path, net_in: NetworkInput, recon, check, scan) -> None:
    """The reconstruction in ``dst``'s format, with the self-consistency residual and the
    symmetry-view spread beside it (.npy: ``<stem>_residual.npy``, ``<stem>_spread.npy``;
    .sxm: extra channels; .png: extra panels)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    extras = {"residual": check.residual, "spread": recon.view_spread}
    suffix = dst.suffix.lower()
    if suffix == ".npy":
        np.save(dst, recon.image)
        for what, image in extras.items():
            np.save(dst.with_name(f"{dst.stem}_{what}.npy"), image)
    elif suffix == ".png":
        raw = scan.channels[net_in.channel][net_in.direction] if scan is not None else net_in.image
        save_frame_png(
            dst,
            [
                (f"{net_in.channel} ({net_in.direction})", raw),
                ("STM-Net |psi|^2", recon.image),
                ("residual (CO-tip model)", check.residual),
                ("view spread", recon.view_spread),
            ],
            pixel_size_nm=net_in.pixel_size_nm,
            line_spacing_nm=net_in.line_spacing_nm,
            scan_direction=net_in.scan_direction,
            units=[net_in.unit, "a.u.", "A" if net_in.mode == "constant_height" else "a.u.", "a.u."],
            cmap=["afmhot", "afmhot", "gray", "viridis"],
            caption=net_in.caption(dst.stem) + "; " + check.line(),
        )
    else:
        if scan is None:
            raise ValueError("writing .sxm needs an .sxm input (its header supplies the frame geometry)")

        out_scan = copy.deepcopy(scan)
        for name, image in (
            ("STM-Net", recon.image),
            ("STM-Net residual", extras["residual"]),
            ("STM-Net spread", extras["spread"]),
        ):
            out_scan.channels[name] = {"forward": image, "backward": image.copy()}
            out_scan.units[name] = "a.u."
        write_sxm(dst, out_scan)


def _inputs(paths: Sequence[Path]) -> tuple[list[Path], list[ReconstructResult]]:
    files, bad = [], []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in (".sxm", ".3ds"))
            if not found:
                bad.append(ReconstructResult(path, message=f"{path}: folder holds no .sxm or .3ds files"))
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            bad.append(ReconstructResult(path, message=f"{path}: no such file or folder"))
    return files, bad


def reconstruct_files(
    inputs: Sequence[os.PathLike | str],
    output: os.PathLike | str,
    *,
    pixel_size_nm: float | None = None,
    line_spacing_nm: float | None = None,
    channel: str | None = None,
    device: str = "auto",
    views: int = 2,
    fmt: str = "png",
    report: Callable[[ReconstructResult], None] = lambda result: None,
    load: Callable[[], object] | None = None,
    biases: Sequence[float] | None = None,
) -> list[ReconstructResult]:
    """Reconstruct files or folders of them; ``report`` gets each file's result as it is done.

    One input file and an ``output`` ending in .npy/.png/.sxm writes that file; otherwise
    ``output`` is a folder that gets ``<stem>_psi.<fmt>`` per input.
    """
    from stm_live.models import check_device  # noqa: PLC0415 - torch: frames out of scope skip it

    device = check_device(device)
    if fmt not in ("npy", "png", "sxm"):
        raise ValueError(f"--format must be npy, png or sxm, got {fmt!r}")
    if pixel_size_nm is not None and not pixel_size_nm > 0:
        raise ValueError(f"--pixel-size must be > 0 nm, got {pixel_size_nm!r}")
    output = Path(output)
    files, results = _inputs([Path(p) for p in inputs])
    single = len(inputs) == 1 and len(files) == 1 and not Path(inputs[0]).is_dir()
    if single and output.suffix:
        if output.suffix.lower() not in OUTPUT_SUFFIXES:
            raise ValueError(f"output must end in .npy, .png or .sxm, got {output.name!r}")
        targets = [output]
    else:
        if output.suffix.lower() in OUTPUT_SUFFIXES:
            raise ValueError(f"{len(files)} inputs need an output folder, not the file {output.name!r}")
        targets = [output / f"{f.stem}_psi.{fmt}" for f in files]
    for r in results:
        report(r)
    loaded = []

    def reconstructor():
        if not loaded:
            from stm_live.models import load_stmnet  # noqa: PLC0415 - torch: frames out of scope skip it

            loaded.append(load() if load is not None else load_stmnet(device=device, views=views))
        return loaded[0]

    for src, dst in zip(files, targets):
        result = reconstruct_one(
            src,
            dst,
            reconstructor,
            pixel_size_nm=pixel_size_nm,
            line_spacing_nm=line_spacing_nm,
            channel=channel,
            biases=biases,
        )
        report(result)
        results.append(result)
    return results


def main(inputs: Sequence[os.PathLike | str], output: os.PathLike | str, **options) -> int:
    """The command: one line per file on the console; exit status 0 when every file was
    reconstructed (a flag from the self-consistency check is in its line, the result is
    written), 1 when some were skipped as outside STM-Net's scope, 2 when any failed."""

    console = Console(highlight=False)
    colour = {"ok": "green", "flagged": "yellow", "skipped": "yellow", "failed": "red"}
    results = reconstruct_files(
        inputs,
        output,
        report=lambda r: console.print(f"[{colour[r.status]}]{r.status}[/] {r.message}", soft_wrap=True),
        **options,
    )
    if any(r.status == "failed" for r in results):
        return 2
    return 1 if any(r.status == "skipped" for r in results) else 0
