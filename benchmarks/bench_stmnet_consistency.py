"""Reconstruction self-consistency (``stm_live.models.consistency``): agreement score and
fitted s share by evaluation tip, out-of-scope ROC AUC, and the check's cost next to STM-Net
inference per 256^2 frame (CPU, 2 torch threads).

- Held-out molecules: ``metrics.eval_cells("held-out")`` rendered by ``make_eval_pairs``
  (exact ``simulators.imaging`` frames, the held-out molecules), reconstructed by the shipped
  STM-Net and checked against the image the network was given. "w_s error" is the fitted
  s share minus ``consistency.effective_s_share(tip, pz_factor)`` (p_z folded into s with
  the true orbital's factor; for the plain presets it is the tip's own s share), for the
  network's ρ and, as the physics floor, for the exact |psi|^2.
- Out of scope: ``consistency.scope_probe`` frames (noise, adatom lattice, step edges), and,
  when ``stm_live.models.tipdomain`` is present, its out-of-domain families. Neither set
  calibrates the threshold: ``calibrate()`` derives it from training molecules only.

Run: ``python -m benchmarks stmnet_consistency``. ``STM_LIVE_BENCH_SAMPLES`` (frames per cell,
default 2) and ``STM_LIVE_BENCH_PROBES`` (frames per out-of-scope family, default 12).
Threshold calibration: ``python -c "from benchmarks.bench_stmnet_consistency import calibrate; calibrate()"``.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

PIXEL_NM = 0.05  # the network's training pitch, the evaluation cells' pitch


def roc_auc(positive, negative) -> float:
    """P(score of a positive > score of a negative), ties counting half (Mann-Whitney U)."""
    pos, neg = np.asarray(positive, float)[:, None], np.asarray(negative, float)[None, :]
    return float(np.mean(pos > neg) + 0.5 * np.mean(pos == neg))


def molecule_checks(rec, cells, samples: int, seed: int) -> list[dict]:
    """Per frame: the check on STM-Net's reconstruction and on the exact |psi|^2."""
    from stm_live.models.consistency import check_reconstruction, effective_s_share
    from stm_live.models.metrics import eval_tip, make_eval_pairs

    rows = []
    for cell in cells:
        inputs, targets = make_eval_pairs(cell, samples, seed=seed, size=96, pixel_size_nm=PIXEL_NM)
        tip = eval_tip(cell["tip"])
        for image, target in zip(inputs, targets):
            net = check_reconstruction(image, rec.reconstruct(image, PIXEL_NM), PIXEL_NM)
            exact = check_reconstruction(image, target, PIXEL_NM)
            # the reference s share: p_z folded in with the true orbital's (κ_eff/κ)²
            expected = effective_s_share(tip, exact.pz_factor)
            rows.append(
                {
                    "cell": cell,
                    "net": net.summary(),
                    "exact": exact.summary(),
                    "expected_w_s": expected,
                    "nominal_w_s": tip.s_fraction,
                }
            )
    return rows


def pitch_agreement(rec, pitches=(0.05, 0.08, 0.1, 0.13), samples: int = 1, seed: int = 1234) -> list[tuple]:
    """Median agreement on held-out molecules (constant height, every tip) scanned at coarser
    pitches over the same 4.8 nm: checked on the network's grid (as the commands do) and on
    the measured grid. (pitch, n, network grid, measured grid)."""
    from stm_live.models.consistency import check_reconstruction
    from stm_live.models.metrics import eval_cells, make_eval_pairs

    cells = [c for c in eval_cells("held-out") if c["mode"] == "height"]
    out = []
    for pitch in pitches:
        network, measured = [], []
        for cell in cells:
            for image in make_eval_pairs(
                cell, samples, seed=seed, size=round(96 * PIXEL_NM / pitch), pixel_size_nm=pitch
            )[0]:
                detailed = rec.reconstruct_detailed(image, pitch)
                network.append(check_reconstruction(image, detailed.image, pitch, network=detailed.network).agreement)
                measured.append(check_reconstruction(image, detailed.image, pitch).agreement)
        out.append((pitch, len(network), float(np.median(network)), float(np.median(measured))))
    return out


def probe_checks(rec, per_family: int, seed: int) -> dict[str, list[dict]]:
    """The check's scalars on each out-of-scope family: {family: [summary, ...]}."""
    from stm_live.models.consistency import PROBES, check_reconstruction, scope_probe

    rng = np.random.default_rng(seed)
    out: dict[str, list[dict]] = {}
    for name in PROBES:
        for _ in range(per_family):
            image = scope_probe(name, rng, size=96, pixel_size_nm=PIXEL_NM)
            out.setdefault(name, []).append(
                check_reconstruction(image, rec.reconstruct(image, PIXEL_NM), PIXEL_NM).summary()
            )
    try:
        from stm_live.models.tipdomain import OOD_FAMILIES, ood_family
    except ImportError:  # the tip-domain module is optional here
        return out
    for name in OOD_FAMILIES:
        for _ in range(per_family):
            frame = ood_family(name, rng)
            rho = rec.reconstruct(frame.image, frame.pixel_size_nm)
            out.setdefault(f"tipdomain:{name}", []).append(
                check_reconstruction(frame.image, rho, frame.pixel_size_nm, frame.line_spacing_nm).summary()
            )
    return out


def cost_ms(rec, size: int = 256, repeats: int = 5) -> tuple[float, float]:
    """Median ms of ``rec.reconstruct`` and of ``check_reconstruction`` on one size^2 frame of a
    held-out molecule (the same frame and its reconstruction)."""
    from stm_live.models.consistency import check_reconstruction
    from stm_live.models.metrics import eval_cells, make_eval_pairs

    image = make_eval_pairs(eval_cells("held-out")[0], 1, seed=7, size=size, pixel_size_nm=PIXEL_NM)[0][0]
    rho = rec.reconstruct(image, PIXEL_NM)  # warm-up
    check_reconstruction(image, rho, PIXEL_NM)

    def median(fn, n):
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return 1e3 * float(np.median(times))

    # interleave so both see the same machine load
    pairs = [
        (
            median(lambda: rec.reconstruct(image, PIXEL_NM), 1),
            median(lambda: check_reconstruction(image, rho, PIXEL_NM), 3),
        )
        for _ in range(repeats)
    ]
    return float(np.median([p[0] for p in pairs])), float(np.median([p[1] for p in pairs]))


def calibration_cells() -> list[dict]:
    """Training molecules (never the held-out ones) x HOMO/LUMO x every evaluation tip, plus
    constant-current HOMO frames: the frames the threshold is calibrated on."""
    from stm_live.models.metrics import EVAL_TIPS
    from stm_live.simulators.pairs import TRAIN_MOLECULES

    cells = [
        {"molecule": m, "orbital": o, "tip": t, "mode": "height"}
        for m in TRAIN_MOLECULES
        for o in ("HOMO", "LUMO")
        for t in EVAL_TIPS
    ]
    return cells + [{"molecule": m, "orbital": "HOMO", "tip": "co", "mode": "current"} for m in TRAIN_MOLECULES]


def calibrate(samples: int = 3, seed: int = 4321, quantile: float = 5.0) -> float:
    """Print and return the ``quantile`` percentile of the agreement on the calibration cells
    (what ``consistency.AGREEMENT_THRESHOLD`` is set from)."""
    from stm_live.models.stmnet import load_stmnet

    torch.set_num_threads(int(os.environ.get("STM_LIVE_BENCH_THREADS", "2")))
    rec = load_stmnet(device="cpu")
    scores = [r["net"]["agreement"] for r in molecule_checks(rec, calibration_cells(), samples, seed)]
    value = float(np.percentile(scores, quantile))
    print(
        f"calibration: {len(scores)} in-distribution frames; agreement percentiles "
        f"1/5/10/50 = {np.round(np.percentile(scores, [1, 5, 10, 50]), 3).tolist()}; "
        f"{quantile:g}th percentile = {value:.3f}"
    )
    return value


def main() -> None:
    from rich.table import Table

    from stm_live.console import table_console
    from stm_live.models.consistency import AGREEMENT_THRESHOLD
    from stm_live.models.metrics import EVAL_TIPS, eval_cells
    from stm_live.models.stmnet import load_stmnet

    threads = int(os.environ.get("STM_LIVE_BENCH_THREADS", "2"))
    torch.set_num_threads(threads)
    samples = int(os.environ.get("STM_LIVE_BENCH_SAMPLES", "2"))
    per_family = int(os.environ.get("STM_LIVE_BENCH_PROBES", "12"))
    console = table_console()
    rec = load_stmnet(device="cpu")
    print(
        f"held-out molecules: {samples} frame(s) per cell, 96x96 px at {PIXEL_NM} nm; threshold "
        f"{AGREEMENT_THRESHOLD}; torch threads {threads}"
    )

    rows = molecule_checks(rec, eval_cells("held-out"), samples, seed=1234)
    t = Table(title="Self-consistency on held-out molecules, by tip (mean; w_s error = fitted - effective s share)")
    for col in (
        "tip",
        "mode",
        "n",
        "w_s (tip)",
        "eff. w_s",
        "agreement",
        "explained R2",
        "in scope",
        "w_s err (STM-Net)",
        "|w_s err| max",
        "w_s err (exact rho)",
        "agreement (exact rho)",
    ):
        t.add_column(col)
    for tip in EVAL_TIPS:
        for mode in ("height", "current"):
            sel = [r for r in rows if r["cell"]["tip"] == tip and r["cell"]["mode"] == mode]
            if not sel:
                continue
            err = np.array([r["net"]["w_s"] - r["expected_w_s"] for r in sel])
            err_exact = np.array([r["exact"]["w_s"] - r["expected_w_s"] for r in sel])
            t.add_row(
                tip,
                mode,
                str(len(sel)),
                f"{sel[0]['nominal_w_s']:.2f}",
                f"{np.mean([r['expected_w_s'] for r in sel]):.3f}",
                f"{np.mean([r['net']['agreement'] for r in sel]):.3f}",
                f"{np.mean([r['net']['explained'] for r in sel]):.3f}",
                f"{np.mean([r['net']['in_scope'] for r in sel]):.0%}",
                f"{np.nanmean(err):+.3f}",
                f"{np.nanmax(np.abs(err)):.3f}",
                f"{np.nanmean(err_exact):+.3f}",
                f"{np.mean([r['exact']['agreement'] for r in sel]):.3f}",
            )
    console.print(t)
    molecules = {}
    for r in rows:
        molecules.setdefault(f"{r['cell']['molecule']} {r['cell']['orbital']}", []).append(r["net"]["agreement"])
    print(
        "agreement by molecule level: "
        + "; ".join(f"{k} {np.mean(v):.2f} (min {np.min(v):.2f})" for k, v in molecules.items())
    )

    positive = [r["net"]["agreement"] for r in rows]
    positive_r2 = [r["net"]["explained"] for r in rows]
    probes = probe_checks(rec, per_family, seed=99)
    t = Table(
        title=f"Out of scope: ROC AUC, held-out molecules (n={len(positive)}) vs each family (target >= 0.95; "
        "plain R2 for comparison)"
    )
    for col in ("family", "n", "agreement mean", "agreement max", "passes threshold", "ROC AUC", "ROC AUC of plain R2"):
        t.add_column(col)
    own = [v for k, vals in probes.items() if ":" not in k for v in vals]
    everything = [v for vals in probes.values() for v in vals]
    for name, vals in list(probes.items()) + [
        ("probes pooled (noise, adatoms, step)", own),
        ("all families pooled", everything),
    ]:
        score = np.array([v["agreement"] for v in vals])
        t.add_row(
            name,
            str(len(vals)),
            f"{score.mean():.3f}",
            f"{score.max():.3f}",
            f"{np.mean(score >= AGREEMENT_THRESHOLD):.0%}",
            f"{roc_auc(positive, score):.3f}",
            f"{roc_auc(positive_r2, [v['explained'] for v in vals]):.3f}",
        )
    console.print(t)
    print(
        f"held-out molecule frames below the threshold (called out of scope): "
        f"{np.mean(np.asarray(positive) < AGREEMENT_THRESHOLD):.0%}"
    )

    t = Table(title="Agreement on held-out molecules at coarser pixels (median, constant height, every tip)")
    for col in ("pixel nm", "n", "on the network's grid (used)", "on the measured grid"):
        t.add_column(col)
    for pitch, n, network, measured in pitch_agreement(rec):
        t.add_row(f"{pitch:g}", str(n), f"{network:.2f}", f"{measured:.2f}")
    console.print(t)

    infer, check = cost_ms(rec)
    t = Table(title=f"Cost per 256x256 frame, median ms (cpu, torch threads {threads}; STM-Net with {rec.views} views)")
    for col in ("STM-Net reconstruct", "consistency check", "check / inference (target <= 20 %)"):
        t.add_column(col)
    t.add_row(f"{infer:.1f}", f"{check:.1f}", f"{100 * check / infer:.1f} %")
    console.print(t)


if __name__ == "__main__":
    main()
