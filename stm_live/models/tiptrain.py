"""The tip classifier's training, its evaluation on held-out simulated sets, and its model card.

``train_main`` is ``stm-live train --model tipstate`` and ``evaluate_main`` is ``stm-live
evaluate --model tipstate``: the data come from :mod:`stm_live.models.tipdata`, the network
and checkpoint loading from :mod:`stm_live.models.tipstate`. Progress and the final report of
a training run go to this module's logger at INFO (a command shows them with
``stm_live.models.console_progress()``); the evaluation returns its report, which
:func:`format_report` turns into the text the command prints.
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from stm_live.models.checkpoint import card_command, resolve_device, save_checkpoint
from stm_live.models.tipdata import (
    COARSE_SHARE,
    COARSEST_NM,
    FINE_SHARE,
    FINEST_NM,
    LOW_TIP_SHARE,
    METAL_SHARE,
    PARTIAL_SHARE,
    SMALL_THINGS_SHARE,
    STEP_SHARE,
    WINDOW_SHARE,
    build_bank,
    finish,
    make_batch,
)
from stm_live.models.tipstate import (
    DEFAULT_WEIGHTS,
    GOOD_CLASSES,
    MODEL_CARD,
    TIP_CLASSES,
    TipClassifier,
    TipNet,
    TipNetConfig,
    load_tip_classifier,
)

__all__ = ["train_main", "evaluate", "evaluate_report", "format_report", "report_table", "evaluate_main"]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- training
def train_main(
    steps: int = 6000,
    out=None,
    device: str = "auto",
    seed: int = 0,
    resume: bool = False,
    batch: int = 32,
    lr: float = 2e-3,
    threads: int = 1,
    bank_size: int = 12000,
    init: Path | None = None,
    broad_recipe: bool = False,
) -> Path:
    """Train on a bank of simulated renders (:func:`build_bank`; ``broad_recipe``: the broadened
    one) with fresh noise, artifacts, flips and partial cuts per step; checkpoints every 100
    steps; writes the model card.
    ``init``: warm start from a (hash-verified) classifier checkpoint of the same architecture;
    the new checkpoint and card record the lineage (``init_sha256``, ``total_steps``)."""
    if bank_size < 1:
        raise ValueError(f"bank_size must be at least 1 rendered frame, got {bank_size}")
    torch.set_num_threads(threads)  # shared machines: 1 thread by default
    torch.manual_seed(seed)
    out = Path(out) if out is not None else DEFAULT_WEIGHTS
    dev = resolve_device(device)
    cfg = TipNetConfig()
    net = TipNet(cfg).to(dev)
    lineage = {"total_steps": steps}
    if init is not None:
        parent = load_tip_classifier("cpu", init, domain=None)
        if parent.cfg != cfg:
            raise ValueError(f"--init: {init} has architecture {asdict(parent.cfg)}, not {asdict(cfg)}")
        net.load_state_dict(parent.net.state_dict())
        parent_steps = int(parent.info.get("total_steps", parent.info.get("steps", 0)))
        lineage = {
            "init_sha256": parent.info["sha256"],
            "init_steps": parent_steps,
            "total_steps": parent_steps + steps,
        }
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    start, wall_before = 0, 0.0
    ckpt = out.with_suffix(".ckpt")
    out.parent.mkdir(parents=True, exist_ok=True)  # the resume state is written there from step 100
    if resume:
        if not ckpt.is_file():
            raise ValueError(f"--resume: no training state at {ckpt}; start without --resume")
        st = torch.load(ckpt, map_location="cpu", weights_only=True)
        if int(st["steps"]) != steps:
            raise ValueError(f"--resume: saved run was for --steps {int(st['steps'])}, not {steps}")
        net.load_state_dict(st["model"])
        opt.load_state_dict(st["optim"])
        sched.load_state_dict(st["sched"])
        start, wall_before = int(st["step"]), float(st["wall_s"])
        logger.info("resumed from step %d", start)
    t0 = time.perf_counter()
    bank = build_bank(min(bank_size, steps * batch), seed, cfg, scenery=broad_recipe)  # a short run draws fewer
    run_acc, run_loss = 0.0, 0.0
    for step in range(start, steps):
        net.train()
        rng = np.random.default_rng([seed, step])  # each step's batch depends on (seed, step) only
        picks = rng.integers(len(bank), size=batch)
        x = np.stack([finish(bank[i], rng, cfg, flip=True) for i in picks])
        y = np.array([bank[i].label for i in picks], np.int64)
        s = np.array([bank[i].s_fraction for i in picks], np.float32)
        x, y, s = torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev), torch.from_numpy(s).to(dev)
        logits, s_hat = net(x)
        loss = F.cross_entropy(logits, y, label_smoothing=0.02) + 2.0 * F.mse_loss(s_hat, s)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        run_loss = 0.95 * run_loss + 0.05 * loss.item() if step > start else loss.item()
        acc = float((logits.argmax(1) == y).float().mean())
        run_acc = 0.95 * run_acc + 0.05 * acc if step > start else acc
        if (step + 1) % 100 == 0 or step + 1 == steps:
            el = wall_before + time.perf_counter() - t0
            logger.info("step %d/%d loss %.3f acc %.3f (%.0f s)", step + 1, steps, run_loss, run_acc, el)
            torch.save(
                {
                    "model": net.state_dict(),
                    "optim": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "step": step + 1,
                    "steps": steps,
                    "wall_s": el,
                },
                ckpt,
            )
    wall = wall_before + time.perf_counter() - t0
    save_checkpoint(out, net.cpu(), asdict(net.cfg), steps=steps, seed=seed, **lineage)
    ckpt.unlink(missing_ok=True)  # the resume state is not shipped
    logger.info(
        "saved %s (%.0f KiB) after %.0f s; its domain statistics are fitted by `stm-live train --model "
        "tipdomain` (the classifier does not load without them)",
        out,
        out.stat().st_size / 1024,
        wall,
    )
    # the new weights have no domain statistics yet (`stm-live train --model tipdomain` fits them)
    report = evaluate_report(load_tip_classifier("cpu", out, domain=None), samples=min(40, max(2, steps // 100)))
    logger.info("%s", format_report(report))
    # The card goes beside whichever checkpoint was written, shipped or not.
    card = MODEL_CARD if out.resolve() == DEFAULT_WEIGHTS.resolve() else out.with_name(out.stem + "_MODEL_CARD.md")
    _write_card(
        card,
        steps=steps,
        seed=seed,
        batch=batch,
        lr=lr,
        bank_size=len(bank),
        wall=wall,
        threads=threads,
        device=str(dev),
        report=report,
        lineage=lineage,
        broad=broad_recipe,
    )
    return out


# --------------------------------------------------------------------------- evaluation
def evaluate(
    clf: TipClassifier,
    samples: int = 20,
    seed: int = 1234,
    *,
    partial: bool = False,
    rows: int | None = None,
    middle: bool = False,
    mode: str | None = None,
    coarse: bool = False,
    scenery: bool = False,
) -> dict:
    """Fresh held-out simulated set (own seed, never a training stream): ``samples`` x 7
    frames, classes drawn uniformly, at the training pixel size unless ``coarse`` (every frame
    a coarser scan, :func:`finish`). Full frames unless ``partial`` (the training mix of
    partial frames) or ``rows`` (every frame cut to that many of S rows, from the top or the
    ``middle`` of the frame); ``scenery``: the broadened recipe (metal terraces, adsorbates,
    small molecules) instead of the default one. Class metrics score the network's most probable class; with a
    domain model, ``unknown_share`` is the share of these in-domain frames it calls unknown
    (NaN without one)."""
    rng = np.random.default_rng([seed, 10_000_019, rows or 0, len(mode or "")] + ([1] if scenery else []))
    n = samples * len(TIP_CLASSES)
    x, y, s = make_batch(
        n, rng, clf.cfg, partial=partial, rows=rows, middle=middle, mode=mode, coarse=coarse, scenery=scenery
    )
    unknown = float("nan")
    if getattr(clf, "domain", None) is None:
        probs, s_hat = clf.predict(torch.from_numpy(x))
    else:  # the seven classes are scored as before; the gate's "unknown" share on the side
        probs, s_hat, feats = clf.predict(torch.from_numpy(x), features=True)
        scores = clf.domain.score_inputs(feats.cpu().numpy(), x, clf.cfg.pixel_size_nm)
        unknown = float(np.mean(~(scores <= clf.domain.threshold)))
    pred = probs.argmax(1).cpu().numpy()
    k = len(TIP_CLASSES)
    conf = np.zeros((k, k), np.int64)
    for t, p in zip(y, pred):
        conf[t, p] += 1
    good = np.array([TIP_CLASSES.index(c) for c in GOOD_CLASSES])
    gb_true, gb_pred = np.isin(y, good), np.isin(pred, good)
    f1 = []
    for c in range(k):
        tp, fp, fn = conf[c, c], conf[:, c].sum() - conf[c, c], conf[c, :].sum() - conf[c, c]
        f1.append(2 * tp / max(2 * tp + fp + fn, 1))
    return {
        "n": int(n),
        "accuracy": float((pred == y).mean()),
        "good_vs_bad": float((gb_true == gb_pred).mean()),
        "macro_f1": float(np.mean(f1)),
        "per_class_f1": dict(zip(TIP_CLASSES, map(float, f1))),
        "s_fraction_mae": float(np.abs(s_hat.cpu().numpy() - s).mean()),
        "confusion": conf.tolist(),
        "unknown_share": unknown,
    }


def evaluate_report(clf: TipClassifier, samples: int = 40, seed: int = 1234) -> dict:
    """The evaluation the card and benchmark print: full frames (headline; the recipe's mix of
    constant height and current), each imaging mode alone, the same frames scanned coarser,
    frames cut to fewer rows, and half frames from the middle (a window that starts mid-scene,
    as the monitor judges the lines since a tip change)."""
    size = clf.cfg.size
    report = {
        "full frames": evaluate(clf, samples, seed),
        "broadened recipe (metal terraces, adsorbates, small molecules)": evaluate(clf, samples, seed, scenery=True),
    }
    for mode in ("height", "current"):
        report[f"{mode} only"] = evaluate(clf, samples, seed, mode=mode)
    report[f"coarser scans ({clf.cfg.pixel_size_nm}-{COARSEST_NM} nm)"] = evaluate(clf, samples, seed, coarse=True)
    for rows in (size // 4, size // 2, 3 * size // 4):
        report[f"first {rows}/{size} rows"] = evaluate(clf, samples, seed, rows=rows)
    report[f"middle {size // 2}/{size} rows"] = evaluate(clf, samples, seed, rows=size // 2, middle=True)
    return report


def _format_metrics(m: dict) -> str:
    lines = [
        f"n={m['n']}  accuracy {m['accuracy']:.3f}  good-vs-bad "
        f"{m['good_vs_bad']:.3f}  macro-F1 {m['macro_f1']:.3f}  s-share MAE {m['s_fraction_mae']:.3f}",
        "confusion (rows true, cols predicted):",
        " " * 12 + " ".join(f"{c[:7]:>7}" for c in TIP_CLASSES),
    ]
    for c, row in zip(TIP_CLASSES, m["confusion"]):
        lines.append(f"{c:>12}" + " ".join(f"{v:7d}" for v in row))
    return "\n".join(lines)


def report_table(report: dict) -> list[str]:
    """Markdown rows: one per evaluation set of :func:`evaluate_report`."""
    gated = any(np.isfinite(m.get("unknown_share", np.nan)) for m in report.values())
    rows = [
        "| set | n | good-vs-bad | macro-F1 | accuracy | s-share MAE |" + (" called unknown |" if gated else ""),
        "|---|---|---|---|---|---|" + ("---|" if gated else ""),
    ]
    rows += [
        f"| {name} | {m['n']} | {m['good_vs_bad']:.3f} | {m['macro_f1']:.3f} | {m['accuracy']:.3f} | "
        f"{m['s_fraction_mae']:.3f} |" + (f" {m['unknown_share']:.3f} |" if gated else "")
        for name, m in report.items()
    ]
    return rows


def format_report(report: dict) -> str:
    """The text ``stm-live evaluate --model tipstate`` prints: the full frames' metrics and
    confusion matrix, then :func:`report_table`."""
    full = report["full frames"]
    return "\n".join(["held-out simulated set, full frames: " + _format_metrics(full), "", *report_table(report)])


def evaluate_main(device: str = "auto", samples: int = 40, seed: int = 1234) -> dict:
    """`stm-live evaluate --model tipstate`: metrics on held-out simulated sets (the command
    prints ``format_report`` of them)."""
    clf = load_tip_classifier(device)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    return evaluate_report(clf, samples=samples, seed=seed)


def _write_card(
    card: Path, *, steps, seed, batch, lr, bank_size, wall, threads, device, report, lineage: dict, broad: bool = False
) -> None:
    cfg = TipNetConfig()
    full = report["full frames"]
    card.write_text(
        "\n".join(
            [
                "# Tip-state classifier (`tipstate.pt`)",
                "",
                f"CNN ({len(cfg.widths)} conv stages of widths {', '.join(map(str, cfg.widths))}, masked mean+max "
                "pooling, class + s-share heads), "
                f"{sum(p.numel() for p in TipNet().parameters()):,} parameters; classes {', '.join(TIP_CLASSES)}; "
                f"good = {', '.join(GOOD_CLASSES)}.",
                "",
                f"- Command: `{card_command()}`",
                *(
                    [
                        f"- Warm start: from the checkpoint with sha256 `{lineage['init_sha256']}` "
                        f"({lineage['init_steps']} steps; its card is in the project history), "
                        f"{lineage['total_steps']} steps in all"
                    ]
                    if "init_sha256" in lineage
                    else []
                ),
                f"- Data recipe (`stm_live.models.tipdata.render_sample` + `finish`): {bank_size} simulated frames "
                f"rendered once (`build_bank`), {cfg.size}x{cfg.size} px at {cfg.pixel_size_nm} nm/px: 1-3 random "
                "library molecules (HOMO or LUMO side, the first near the centre, random rotation, none overlapping "
                "another: `scatter_molecules`) on an optional NaCl-like substrate (corrugation 0-0.1)"
                + (
                    (
                        f" or, in {METAL_SHARE:.0%} of frames, a Au(111) or Cu(111) terrace (broadened recipe, "
                        "`simulators.scenery`: herringbone ridges 0.01-0.025 nm on 80 % of Au frames, "
                        "surface-state standing waves around every scatterer, and on "
                        f"{STEP_SHARE:.0%} of the metal constant-current frames 1-2 monatomic step edges); "
                        f"in {SMALL_THINGS_SHARE:.0%} of frames 1-4 adsorbates and small molecules beside them "
                        "(adatoms, polyenes, random closed-shell polyhexes of 1-4 rings); molecules, lattices, "
                        "tip tilts and second apexes at random angles to the scan lines (a rotated frame is inside); "
                        f"constant height z 0.45-0.8 nm ({LOW_TIP_SHARE:.0%} of them at bond-resolving heights "
                        "0.3-0.45 nm)"
                    )
                    if broad
                    else "; constant height z 0.45-0.8 nm"
                )
                + " (2/3) or constant current "
                "(1/3, setpoint 0.3-0.9 of the constant-height peak, Z map through `current_from_z`); per class a "
                "tip preset with jitter (CO s share 5-22 %, 30 % of CO tips coherent; mixed s 32-60 %; tilt "
                "15-35 deg or p imbalance 0.68-0.85; second apex 0.35-0.9 nm away at strength 0.4-1; blunt "
                "width x0.8-1.6). Every step draws random flips, a coarser scan of the same area for "
                f"{COARSE_SHARE:.0%} of frames (pixel and line spacing each {cfg.pixel_size_nm}-{COARSEST_NM} nm, "
                "resampled back as at inference; "
                f"{FINE_SHARE:.0%} of the others finer, {FINEST_NM}-{cfg.pixel_size_nm} nm), fresh white + per-line "
                "noise, 'unstable' artifacts (mid-frame "
                f"tip change, line jumps, streaks) and partial frames ({PARTIAL_SHARE:.0%}, >= a quarter of the rows; "
                f"{WINDOW_SHARE:.0%} of them windows that start mid-frame).",
                f"- Steps: {steps}, batch {batch}, AdamW lr {lr} one-cycle, seed {seed}",
                f"- Wall time: {wall / 60:.1f} min (rendering the bank included) on {device}, "
                f"{platform.machine()} {platform.processor() or ''}, {threads} torch thread(s), "
                f"torch {torch.__version__}",
                "",
                "## Held-out metrics",
                "",
                "Fresh frames from the same recipe with their own seed (`stm-live evaluate --model tipstate`, "
                f"{full['n'] // len(TIP_CLASSES)} per class, seed 1234). "
                "Targets: good-vs-bad >= 0.99, macro-F1 >= 0.95 on full frames.",
                "",
                *report_table(report),
                "",
                "Per-class F1 (full frames): " + ", ".join(f"{k} {v:.2f}" for k, v in full["per_class_f1"].items()),
                "",
                "Limits: trained and scored on simulation only; a partial frame whose rows hold no molecule "
                "carries little tip information, which the rows curve shows. Real-tip validation pending.",
                "",
            ]
        )
    )
