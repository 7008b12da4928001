"""Make docs/spectroscopy.png: spectra, a dI/dV map and a grid, simulated and reconstructed.

Everything goes through the project's own path: the simulated controller over TCP (a
pentacene on the surface, a CO tip, levels at the default Hückel mapping), the ophyd devices
and plans through a RunEngine (``grid_spectroscopy`` for two point spectra, ``live_frame`` for
a constant-height lock-in map), the simulator's own Pattern grid saved as a .3ds,
``stm-live runs export`` and ``stm-live reconstruct`` (STM-Net) for the reconstructions.

    python docs/spectroscopy_figure.py [--out docs/spectroscopy.png]

About a minute on a 2-core CPU (STM-Net on 2 maps and one frame).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

SCENE = {
    "name": "pentacene-spectroscopy",
    "molecules": [{"molecule": "pentacene", "x_nm": 0.0, "y_nm": 0.0, "rotation_deg": 15.0}],
    "tip": "co",
    "artifacts": {"white_noise": 0.02},
    "spectra": {"width_V": 0.2, "shape": "lorentzian"},
    "bias_V": -0.5,
    "setpoint_A": 5e-12,
    "z_nm": 0.45,
    "z_controller": True,
}
MAP_FRAME = (0.0, 0.0, 4.8e-9, 4.8e-9, 0.0)  # lock-in map: 64 px, 0.075 nm each
GRID = (40, 40)  # grid points over the same frame: 0.12 nm apart


def main(out: Path) -> None:
    from bluesky import RunEngine

    from stm_live.app.reconstruct import reconstruct_files
    from stm_live.app.runs import runs_export
    from stm_live.devices.client import NanonisClient
    from stm_live.devices.spectroscopy import BiasSpectroscopy
    from stm_live.devices.stm import NanonisSTM
    from stm_live.io.spectroscopy import read_3ds
    from stm_live.plans import grid_spectroscopy, live_frame
    from stm_live.simulators.imaging import Placement, ScanFrame, s_wave_image
    from stm_live.simulators.scenario import parse_scenario
    from stm_live.simulators.server import start_server_thread
    from stm_live.simulators.spectra import level_energies
    from stm_live.store import JournalWriter, read_journal

    levels = level_energies("pentacene")
    homo, lumo = levels["HOMO"], levels["LUMO"]
    work = Path(tempfile.mkdtemp(prefix="stm_live_spectroscopy_"))
    (work / "session").mkdir()
    t0 = time.perf_counter()
    with (
        start_server_thread(
            scenario=parse_scenario(SCENE), seed=1, time_scale=1000.0, save_dir=work / "session"
        ) as srv,
        NanonisClient(srv.host, srv.port, timeout=30.0) as c,
    ):
        RE = RunEngine({})
        journal = JournalWriter(work / "data")
        RE.subscribe(journal)
        stm = NanonisSTM(srv.host, srv.port, name="stm", timeout=30.0)
        spec = BiasSpectroscopy(stm=stm, name="spec")
        c.call("BiasSpectr.AdvPropsSet", (0, 0, 0, 1))  # the lock-in runs during sweeps
        c.call("BiasSpectr.TimingSet", (0.0, 0.0, 0.0, 10.0, 0.0, 1e-3, 0.0, 0.0))

        # (a) point spectra: over the molecule's end, and over bare substrate
        (uid,) = RE(
            grid_spectroscopy(
                stm,
                spec,
                points=[(-0.55e-9, -0.15e-9), (2.2e-9, 2.0e-9)],
                sweep=(-3.0, 3.0, 241),
                channels=["Current", "LI Demod 1 X"],
            )
        )
        spectra = [d["data"] for n, d in read_journal(journal.path_for(uid)) if n == "event"]

        # (b) a constant-height lock-in map at the HOMO resonance, as a live frame
        c.call("LockIn.ModOnOffSet", (1, 1))
        c.call("LockIn.ModAmpSet", (1, 0.02))
        stm.z_controller.put(0)
        stm.z.put(0.45e-9)
        (uid,) = RE(
            live_frame(
                stm,
                frame=MAP_FRAME,
                pixels=64,
                lines=64,
                channels={"Current": 0, "LI Demod 1 X": 35},
                z_controller="constant_height",
                bias=homo,
            )
        )
        sxm = runs_export(uid, sxm=work / "didv_homo.sxm", data_dir=work / "data")  # stm-live runs export
        c.call("LockIn.ModOnOffSet", (1, 0))

        # (c) the simulator's own grid experiment (Pattern grid, BiasSpectr at each point): a .3ds
        stm.z_controller.put(1)
        stm.bias.put(-0.5)
        c.call("BiasSpectr.LimitsSet", (-3.5, 3.0))
        c.call("BiasSpectr.PropsSet", (0, 1, 2, 66, 0.0, 2, 2))
        c.call("BiasSpectr.ChsSet", ([0, 35],))
        c.call("Pattern.GridSet", (1, *GRID, 0, *MAP_FRAME))
        c.call("Pattern.ExpOpen")
        c.call("Pattern.ExpStart", (1,))
        while c.call("Pattern.ExpStatusGet")["running"]:
            time.sleep(0.1)
        grid_path = Path(srv.controller.modules.last_experiment_path)
        stm.close()
    simulated = time.perf_counter() - t0

    # stm-live reconstruct: the lock-in map, and the grid's maps at the two resonances
    (li,) = reconstruct_files([sxm], work / "didv_psi.npy", channel="LI Demod 1 X")
    (gr,) = reconstruct_files([grid_path], work / "grid_psi.npy", channel="LI Demod 1 X", biases=[homo, lumo])
    for result in (li, gr):
        if result.status not in ("ok", "flagged"):
            raise SystemExit(result.message)
        print(result.message)
    stack = np.load(gr.output)
    from stm_live.io.sxm import read_sxm

    didv = read_sxm(sxm).image("LI Demod 1 X", "forward")
    truth = s_wave_image(
        [Placement("pentacene", 0.0, 0.0, 15.0, "HOMO")],
        ScanFrame(0.0, 0.0, 4.8, 4.8, pixels=64, lines=64),
        z_nm=0.45,
        bias_V=-1.0,
    )
    grid = read_3ds(grid_path)
    _figure(out, spectra, didv, np.load(work / "didv_psi.npy"), truth, stack, grid, homo, lumo)
    print(f"simulated in {simulated:.1f} s; wrote {out} (work files in {work})")


def _figure(out, spectra, didv, recon, truth, stack, grid, homo, lumo) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(14, 7.2), dpi=110)
    ax = axes[0, 0]
    for data, label in zip(spectra, ("over pentacene", "bare substrate")):
        ax.plot(data["spec_bias"], np.asarray(data["spec_li_demod_1_x_fwd"]) * 1e12, label=label)
    for v, name in ((homo, "HOMO"), (lumo, "LUMO")):
        ax.axvline(v, color="0.6", lw=0.8, ls="--")
        ax.text(v, 0.5 * ax.get_ylim()[1], f" {name}", fontsize=8, color="0.3")
    ax.set(xlabel="sample bias (V)", ylabel="LI Demod 1 X (pA)", title="(a) BiasSpectr, CO tip")
    ax.legend(fontsize=8, loc="upper center")
    extent = [-2.4, 2.4, -2.4, 2.4]
    panels = [
        (axes[0, 1], didv, "upper", f"(b) dI/dV map {homo:+.1f} V\n(constant height, CO tip)"),
        (axes[0, 2], recon, "upper", "(c) STM-Net of (b)"),
        (axes[0, 3], truth, "upper", "(d) HOMO |psi|^2 (s-wave truth)"),
    ]
    k_h, k_l = (int(np.argmin(np.abs(stack["bias_V"] - v))) for v in (homo, lumo))
    for col, (k, name) in enumerate(((k_h, "HOMO"), (k_l, "LUMO"))):
        v = float(stack["bias_V"][k])
        panels += [
            (
                axes[1, 2 * col],
                stack["input"][k],
                "lower",
                f"({'eg'[col]}) grid {grid.shape[1]}x{grid.shape[0]}, {name} {v:+.2f} V",
            ),
            (axes[1, 2 * col + 1], stack["reconstruction"][k], "lower", f"({'fh'[col]}) STM-Net of the map"),
        ]
    for ax, image, origin, title in panels:
        ax.imshow(image, origin=origin, extent=extent, cmap="magma")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("x (nm)", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("spectroscopy.png"))
    main(parser.parse_args().out)
