"""Tip-state classifier: a small CNN trained on the physics simulator.

Input: one image (lines, pixels), possibly a partial frame (rows not yet scanned are NaN),
resampled to the training pixel size and robustly normalised over the scanned rows, plus a
mask channel (1 = scanned). Output: probabilities over :data:`TIP_CLASSES` and a regressed
s-wave share of the tip (``TipState.s_fraction``).

Training data come on the fly from ``stm_live.simulators`` (orbitals + tip presets +
``constant_height_image`` + artifacts); see :func:`make_batch` for the recipe.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "TIP_CLASSES",
    "GOOD_CLASSES",
    "TipVerdict",
    "TipNetConfig",
    "TipNet",
    "TipClassifier",
    "load_tip_classifier",
    "make_batch",
    "train_main",
    "evaluate_main",
    "DEFAULT_WEIGHTS",
]

TIP_CLASSES = ("co_sharp", "metal_s", "mixed", "asymmetric", "double", "blunt", "unstable")
# Tips fit for imaging (as the simulated controller's good tips): sharp CO, sharp metal, CO with
# a larger s share (STM-Net separates s and p); the rest call for reconditioning.
GOOD_CLASSES = ("co_sharp", "metal_s", "mixed")
WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "tipstate.pt"
MODEL_CARD = WEIGHTS_DIR / "TIPSTATE_MODEL_CARD.md"


@dataclass(frozen=True)
class TipVerdict:
    """What the classifier says about the tip that took an image."""

    label: str
    probabilities: dict
    s_fraction: float

    @property
    def good(self) -> bool:
        return self.label in GOOD_CLASSES

    @property
    def confidence(self) -> float:
        return float(self.probabilities[self.label])

    def to_dict(self) -> dict:
        return {"label": self.label, "probabilities": dict(self.probabilities),
                "s_fraction": float(self.s_fraction), "good": self.good}


# --------------------------------------------------------------------------- network
@dataclass(frozen=True)
class TipNetConfig:
    size: int = 40  # training image side (pixels)
    pixel_size_nm: float = 0.08  # training pixel size
    width: int = 16  # channels of the first block
    n_classes: int = len(TIP_CLASSES)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class TipNet(nn.Module):
    """Conv blocks (x1, x2, x4 width) with pooling -> masked mean+max pool -> heads."""

    def __init__(self, cfg: TipNetConfig = TipNetConfig()):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.b1, self.b2, self.b3 = _block(2, w), _block(w, 2 * w), _block(2 * w, 4 * w)
        self.head = nn.Sequential(nn.Linear(8 * w, 64), nn.ReLU(inplace=True), nn.Linear(64, cfg.n_classes + 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = x[:, 1:2]
        h = self.b1(x)
        h = self.b2(F.max_pool2d(h, 2))
        h = self.b3(F.max_pool2d(h, 2))
        m = F.adaptive_max_pool2d(mask, h.shape[-2:]) if mask.shape[-1] >= h.shape[-1] else mask
        m = F.interpolate(mask, size=h.shape[-2:], mode="area").gt(0.5).float()
        denom = m.sum(dim=(2, 3)).clamp_min(1.0)
        mean = (h * m).sum(dim=(2, 3)) / denom
        mx = (h + (m - 1.0) * 1e4).amax(dim=(2, 3))
        out = self.head(torch.cat([mean, mx], dim=1))
        return out[:, :-1], torch.sigmoid(out[:, -1])


# --------------------------------------------------------------------------- preprocessing
def _prepare(image: np.ndarray, pixel_size_nm: float, cfg: TipNetConfig,
             line_spacing_nm: float | None = None) -> np.ndarray:
    """(H, W) image with NaN rows -> (2, h, w) float32 [normalised image, mask] at cfg pixel
    size (rows resampled by ``line_spacing_nm`` when lines are not square with pixels)."""
    from scipy import ndimage

    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2:
        raise ValueError(f"tip classifier: image must be 2-D (lines, pixels), got shape {img.shape}")
    if not (np.isfinite(pixel_size_nm) and pixel_size_nm > 0):
        raise ValueError(f"tip classifier: pixel_size_nm must be positive, got {pixel_size_nm!r}")
    mask = np.isfinite(img)
    if mask.sum() < 3 * img.shape[1]:
        raise ValueError("tip classifier: image has fewer than 3 scanned lines")
    if line_spacing_nm is None:
        line_spacing_nm = pixel_size_nm
    if not (np.isfinite(line_spacing_nm) and line_spacing_nm > 0):
        raise ValueError(f"tip classifier: line_spacing_nm must be positive, got {line_spacing_nm!r}")
    scale = pixel_size_nm / cfg.pixel_size_nm
    rscale = line_spacing_nm / cfg.pixel_size_nm
    filled = np.where(mask, img, 0.0)
    if abs(scale - 1.0) > 1e-3 or abs(rscale - 1.0) > 1e-3:
        out_shape = (max(4, round(img.shape[0] * rscale)), max(4, round(img.shape[1] * scale)))
        zoom = (out_shape[0] / img.shape[0], out_shape[1] / img.shape[1])
        m = ndimage.zoom(mask.astype(np.float64), zoom, order=1)
        filled = ndimage.zoom(filled, zoom, order=1) / np.maximum(m, 1e-6)
        mask = m > 0.5
    vals = filled[mask]
    lo, med, hi = np.percentile(vals, [1.0, 50.0, 99.0])
    spread = max(hi - lo, 1e-12 * max(abs(med), 1e-30), np.finfo(np.float64).tiny)
    norm = np.where(mask, (filled - med) / spread, 0.0)
    return np.stack([np.clip(norm, -5, 5), mask.astype(np.float64)]).astype(np.float32)


# --------------------------------------------------------------------------- data recipe
def _class_tip(label: str, rng: np.random.Generator):
    """A TipState for one class: a tip.py preset with jitter."""
    from stm_live.simulators.tip import tip_preset

    def co(s_lo=0.05, s_hi=0.22):
        sf = float(rng.uniform(s_lo, s_hi))
        return tip_preset("co").with_(s=sf, px=(1 - sf) / 2, py=(1 - sf) / 2, pz=0.0)

    if label == "co_sharp":
        return co()
    if label == "metal_s":
        return tip_preset("s").with_(pz=float(rng.uniform(0.0, 0.05)))
    if label == "mixed":
        sf = float(rng.uniform(0.32, 0.6))
        return tip_preset("mixed").with_(s=sf, px=(1 - sf) / 2, py=(1 - sf) / 2)
    if label == "asymmetric":
        if rng.random() < 0.7:  # tilted CO
            return co().with_(tilt_deg=float(rng.uniform(15, 35)), tilt_azimuth_deg=float(rng.uniform(0, 360)),
                              name="tilted_co")
        sf, big = float(rng.uniform(0.05, 0.22)), float(rng.uniform(0.68, 0.85))
        px, py = (1 - sf) * big, (1 - sf) * (1 - big)
        if rng.random() < 0.5:
            px, py = py, px
        return tip_preset("asymmetric").with_(s=sf, px=px, py=py)
    if label == "double":
        r, a = float(rng.uniform(0.35, 0.9)), float(rng.uniform(0, 2 * np.pi))
        base = co() if rng.random() < 0.6 else tip_preset("s")
        return base.with_(double_offset_nm=(r * np.cos(a), r * np.sin(a)),
                          double_strength=float(rng.uniform(0.4, 1.0)), name="double")
    if label == "blunt":
        t = tip_preset("blunt")
        return t.with_(apex_width_nm=float(t.apex_width_nm * rng.uniform(0.8, 1.6)),
                       s=float(rng.uniform(0.4, 0.8)))
    raise ValueError(f"unknown tip class {label!r}")


def _scene(rng: np.random.Generator, cfg: TipNetConfig):
    """Random scene: 1-2 library molecules (random orbital side, position, rotation) on an
    optional NaCl-like substrate, in a frame of cfg.size pixels at cfg.pixel_size_nm."""
    from stm_live.simulators.imaging import Placement, ScanFrame, Substrate
    from stm_live.simulators.orbitals import MOLECULE_NAMES

    span = cfg.size * cfg.pixel_size_nm
    frame = ScanFrame(center_x_nm=0.0, center_y_nm=0.0, width_nm=span, height_nm=span,
                      pixels=cfg.size, lines=cfg.size)
    orbital = "HOMO" if rng.random() < 0.5 else "LUMO"
    place = []
    for _ in range(1 if rng.random() < 0.6 else 2):
        name = MOLECULE_NAMES[rng.integers(len(MOLECULE_NAMES))]
        place.append(Placement(name, x_nm=float(rng.uniform(-0.3, 0.3) * span),
                               y_nm=float(rng.uniform(-0.3, 0.3) * span),
                               rotation_deg=float(rng.uniform(0, 360)), orbital=orbital))
    substrate = None
    if rng.random() < 0.7:
        substrate = Substrate(corrugation=float(rng.uniform(0.0, 0.1)), angle_deg=float(rng.uniform(0, 90)))
    return place, frame, (-1.0 if orbital == "HOMO" else 1.0), substrate


def _degrade(img: np.ndarray, rng: np.random.Generator, unstable: bool, other=None) -> np.ndarray:
    """Noise (all classes) and instability artifacts (class 'unstable')."""
    a = np.asarray(img, dtype=np.float32)
    scale = float(np.percentile(a, 99) - np.percentile(a, 1)) or 1.0
    a = a + rng.normal(0.0, rng.uniform(0.005, 0.05) * scale, a.shape).astype(np.float32)
    if rng.random() < 0.5:
        a = a + (rng.normal(0.0, rng.uniform(0.0, 0.03) * scale, (a.shape[0], 1))).astype(np.float32)
    if unstable:
        n = a.shape[0]
        kind = rng.integers(3)
        if kind == 0 and other is not None:  # tip changes mid-frame
            cut = int(rng.integers(n // 4, 3 * n // 4))  # as artifacts.tip_change: rows >= cut new tip
            a = a.copy()
            a[cut:] = np.asarray(other, dtype=np.float32)[cut:] + (a[cut:] - np.asarray(img)[cut:])
        # jumps: blocks of lines shifted in offset and gain
        for _ in range(int(rng.integers(2, 6))):
            r0 = int(rng.integers(0, n - 1))
            r1 = min(n, r0 + int(rng.integers(1, 4)))
            a[r0:r1] = a[r0:r1] * rng.uniform(0.3, 1.8) + rng.choice([-1, 1]) * rng.uniform(0.3, 1.0) * scale
        if kind == 2:  # streaks: spikes along the fast axis
            for _ in range(int(rng.integers(2, 6))):
                r = int(rng.integers(0, n))
                c0 = int(rng.integers(0, a.shape[1] - 4))
                a[r, c0:c0 + int(rng.integers(3, a.shape[1] // 2))] += rng.uniform(0.5, 2.0) * scale
    return a


def simulate_scan(rng: np.random.Generator, tip, *, tip_after=None, change_line: int | None = None,
                  pixels: int = 64, lines: int = 64, width_nm: float = 7.0, z_nm: float = 0.5,
                  molecules: int = 3, noise: float = 1.0, bias_V: float = -0.5) -> np.ndarray:
    """A simulator-like constant-height frame (current, A), as the simulated controller
    renders its default scene: ``molecules`` random library molecules on NaCl-like substrate
    (corrugation 0.05), white/pink noise and line offsets (0.03/0.02/0.01 of the image std,
    times ``noise``). With ``tip_after`` the tip changes at ``change_line``
    (``artifacts.tip_change``). Tips are TipStates or preset names.
    """
    from stm_live.simulators import artifacts as art
    from stm_live.simulators.imaging import Placement, ScanFrame, Substrate, constant_height_image
    from stm_live.simulators.orbitals import MOLECULE_NAMES
    from stm_live.simulators.tip import tip_preset

    def as_tip(t):
        return tip_preset(t) if isinstance(t, str) else t

    frame = ScanFrame(center_x_nm=0.0, center_y_nm=0.0, width_nm=width_nm, height_nm=width_nm * lines / pixels,
                      pixels=pixels, lines=lines)
    half = 0.32 * width_nm
    place = [Placement(MOLECULE_NAMES[rng.integers(len(MOLECULE_NAMES))],
                       x_nm=float(rng.uniform(-half, half)), y_nm=float(rng.uniform(-half, half) * lines / pixels),
                       rotation_deg=float(rng.uniform(0, 360))) for _ in range(molecules)]
    sub = Substrate(corrugation=0.05)
    img = constant_height_image(place, frame, as_tip(tip), z_nm=z_nm, bias_V=bias_V, substrate=sub)
    if tip_after is not None:
        after = constant_height_image(place, frame, as_tip(tip_after), z_nm=z_nm, bias_V=bias_V, substrate=sub)
        img = art.tip_change(img, after, int(change_line))
    sd = float(np.std(img)) * noise
    if sd > 0:
        img = art.white_noise(img, 0.03 * sd, rng)
        img = art.pink_noise(img, 0.02 * sd, rng)
        img = art.line_offsets(img, 0.01 * sd, rng)
    return np.asarray(img, dtype=np.float32)


def make_batch(n: int, rng: np.random.Generator, cfg: TipNetConfig = TipNetConfig(), *,
               partial: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Simulated batch: inputs (n, 2, S, S), labels (n,), s-fraction targets (n,).

    Recipe: a random library molecule (HOMO or LUMO, random position/rotation) imaged at
    constant height (z 0.5-0.8 nm) by a class's tip preset with jitter; white and per-line
    noise for every class; 'unstable' adds a mid-frame tip change, line jumps and streaks
    on top of a random stable tip. With ``partial`` a random number of rows (>= 14) is kept.
    """
    from stm_live.simulators.imaging import constant_height_image

    xs = np.zeros((n, 2, cfg.size, cfg.size), np.float32)
    ys = np.zeros(n, np.int64)
    sf = np.zeros(n, np.float32)
    for i in range(n):
        k = int(rng.integers(len(TIP_CLASSES)))
        label = TIP_CLASSES[k]
        unstable = label == "unstable"
        base = TIP_CLASSES[int(rng.integers(len(TIP_CLASSES) - 1))] if unstable else label
        tip = _class_tip(base, rng)
        place, frame, bias, sub = _scene(rng, cfg)
        z = float(rng.uniform(0.45, 0.8))
        img = constant_height_image(place, frame, tip, z_nm=z, bias_V=bias, substrate=sub)
        other = None
        if unstable:
            other = constant_height_image(place, frame, _class_tip(TIP_CLASSES[int(rng.integers(6))], rng),
                                          z_nm=z, bias_V=bias, substrate=sub)
        img = _degrade(img, rng, unstable, other)
        if partial and rng.random() < 0.6:
            rows = int(rng.integers(14, cfg.size + 1))
            img = img.copy()
            img[rows:] = np.nan
        xs[i] = _prepare(img, cfg.pixel_size_nm, cfg)
        ys[i] = k
        sf[i] = tip.s_fraction
    return xs, ys, sf


# --------------------------------------------------------------------------- inference
def _pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class TipClassifier:
    """Inference wrapper: ``classify(image, pixel_size_nm) -> TipVerdict``."""

    def __init__(self, net: TipNet, device: torch.device):
        self.net = net.to(device).eval()
        self.device = device
        self.cfg = net.cfg

    @property
    def pixel_size_nm(self) -> float:
        return self.cfg.pixel_size_nm

    @torch.no_grad()
    def classify(self, image: np.ndarray, pixel_size_nm: float, *,
                 line_spacing_nm: float | None = None) -> TipVerdict:
        """Verdict on ``image`` (lines, pixels; NaN rows = not scanned yet)."""
        x = torch.from_numpy(_prepare(image, pixel_size_nm, self.cfg, line_spacing_nm))[None].to(self.device)
        logits, s = self.net(x)
        p = torch.softmax(logits, dim=1)[0].cpu().numpy()
        probs = {c: float(v) for c, v in zip(TIP_CLASSES, p)}
        return TipVerdict(label=TIP_CLASSES[int(p.argmax())], probabilities=probs, s_fraction=float(s[0]))

    @classmethod
    def from_checkpoint(cls, path: Path, device: torch.device) -> "TipClassifier":
        state = torch.load(path, map_location="cpu", weights_only=True)
        cfg = TipNetConfig(**json.loads(state["config"]))
        net = TipNet(cfg)
        net.load_state_dict(state["model"])
        return cls(net, device)


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_tip_classifier(device: str | None = "auto", path=None) -> TipClassifier:
    """The tip classifier from ``path`` (default: shipped weights), verified by SHA-256.

    The hash lives beside the checkpoint as ``<name>.sha256``. Raises ``FileNotFoundError``
    when missing and ``ValueError`` when the hash does not match or the file is unreadable.
    """
    p = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not p.is_file():
        raise FileNotFoundError(
            f"tip classifier weights not found at {p}; train them with "
            "`stm-live train --model tipstate`")
    h = p.with_suffix(p.suffix + ".sha256")
    if not h.is_file():
        raise ValueError(f"tip classifier: hash file {h} is missing; cannot verify {p}")
    want = h.read_text().split()[0].strip()
    got = _sha256(p)
    if got != want:
        raise ValueError(f"tip classifier: checkpoint {p} is corrupt (sha256 {got[:12]}..., expected {want[:12]}...)")
    try:
        return TipClassifier.from_checkpoint(p, _pick_device(device))
    except Exception as exc:  # unreadable / wrong layout
        raise ValueError(f"tip classifier: cannot load {p}: {exc}") from exc


# --------------------------------------------------------------------------- training
def _save(path: Path, net: TipNet, extra: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
             "config": json.dumps(asdict(net.cfg))}
    state.update(extra)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    path.with_suffix(path.suffix + ".sha256").write_text(f"{_sha256(path)}  {path.name}\n")


def train_main(steps: int = 1500, out=None, device: str = "auto", seed: int = 0, resume: bool = False,
               batch: int = 32, lr: float = 2e-3, threads: int = 1) -> Path:
    """Train on on-the-fly simulated batches; checkpoints every 100 steps; writes model card."""
    torch.set_num_threads(threads)  # shared machines: 1 thread by default
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    out = Path(out) if out is not None else DEFAULT_WEIGHTS
    dev = _pick_device(device)
    cfg = TipNetConfig()
    net = TipNet(cfg).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    start = 0
    ckpt = out.with_suffix(".ckpt")
    if resume and ckpt.is_file():
        st = torch.load(ckpt, map_location="cpu", weights_only=True)
        net.load_state_dict(st["model"])
        opt.load_state_dict(st["optim"])
        start = int(st["step"])
        rng = np.random.default_rng([seed, start])
        print(f"resumed from step {start}")
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, start + 1), pct_start=0.1)
    for _ in range(start):
        sched.step()
    t0 = time.perf_counter()
    run_acc, run_loss = 0.0, 0.0
    for step in range(start, steps):
        net.train()
        x, y, s = make_batch(batch, rng, cfg)
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
        if (step + 1) % 20 == 0 or step + 1 == steps:
            el = time.perf_counter() - t0
            print(f"step {step + 1}/{steps} loss {run_loss:.3f} acc {run_acc:.3f} ({el:.0f} s)", flush=True)
        if (step + 1) % 100 == 0 or step + 1 == steps:
            st = {"model": net.state_dict(), "optim": opt.state_dict(), "step": step + 1}
            torch.save(st, ckpt)
    wall = time.perf_counter() - t0
    _save(out, net.cpu(), {"steps": steps, "seed": seed})
    ckpt.unlink(missing_ok=True)  # the resume state is not shipped
    print(f"saved {out} ({out.stat().st_size / 1024:.0f} KiB) after {wall:.0f} s")
    metrics = evaluate(load_tip_classifier("cpu", out), samples=40, seed=1234)
    print(_format_metrics(metrics))
    # The card goes beside whichever checkpoint was written, shipped or not.
    card = MODEL_CARD if out.resolve() == DEFAULT_WEIGHTS.resolve() else out.with_name(out.stem + "_MODEL_CARD.md")
    _write_card(card, steps, seed, batch, wall, metrics, start)
    return out


# --------------------------------------------------------------------------- evaluation
def evaluate(clf: TipClassifier, samples: int = 20, seed: int = 1234, partial: bool = True) -> dict:
    """Held-out simulated set (own seed): ``samples`` x 7 images, classes drawn uniformly."""
    rng = np.random.default_rng(seed + 10_000_019)  # disjoint from training streams
    n = samples * len(TIP_CLASSES)
    x, y, s = make_batch(n, rng, clf.cfg, partial=partial)
    with torch.no_grad():
        logits, s_hat = clf.net(torch.from_numpy(x).to(clf.device))
    pred = logits.argmax(1).cpu().numpy()
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
    return {"n": int(n), "accuracy": float((pred == y).mean()), "good_vs_bad": float((gb_true == gb_pred).mean()),
            "macro_f1": float(np.mean(f1)), "per_class_f1": dict(zip(TIP_CLASSES, map(float, f1))),
            "s_fraction_mae": float(np.abs(s_hat.cpu().numpy() - s).mean()), "confusion": conf.tolist()}


def _format_metrics(m: dict) -> str:
    lines = [f"held-out simulated set: n={m['n']}  accuracy {m['accuracy']:.3f}  good-vs-bad "
             f"{m['good_vs_bad']:.3f}  macro-F1 {m['macro_f1']:.3f}  s-share MAE {m['s_fraction_mae']:.3f}",
             "confusion (rows true, cols predicted):",
             " " * 12 + " ".join(f"{c[:7]:>7}" for c in TIP_CLASSES)]
    for c, row in zip(TIP_CLASSES, m["confusion"]):
        lines.append(f"{c:>12}" + " ".join(f"{v:7d}" for v in row))
    return "\n".join(lines)


def evaluate_main(device: str = "auto", samples: int = 8, seed: int = 1234) -> dict:
    """`stm-live evaluate --model tipstate`: print metrics on a held-out simulated set."""
    clf = load_tip_classifier(device)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    m = evaluate(clf, samples=samples, seed=seed)
    print(_format_metrics(m))
    return m


def _write_card(card: Path, steps, seed, batch, wall, m, start) -> None:
    import platform

    card.write_text(f"""# Tip-state classifier (`tipstate.pt`)

Small CNN (3 conv blocks, masked mean+max pooling, class + s-share heads),
{sum(p.numel() for p in TipNet().parameters()):,} parameters; classes {", ".join(TIP_CLASSES)};
good = {", ".join(GOOD_CLASSES)}.

- Command: `.venv/bin/stm-live train --model tipstate --steps {steps} --seed {seed}`
  (resumed from step {start})
- Data recipe: `stm_live.models.tipstate.make_batch` — on-the-fly simulated images,
  {TipNetConfig().size}x{TipNetConfig().size} px at {TipNetConfig().pixel_size_nm} nm/px: 1-2 random library
  molecules (HOMO/LUMO, random position and rotation) on optional NaCl-like substrate
  (corrugation 0-0.1), constant height z 0.45-0.8 nm, tip preset
  per class with jitter (CO s-share 5-22 %, tilt 15-35 deg, double offset 0.3-0.9 nm, blunt
  width x0.8-1.6); white + per-line noise on all; 'unstable' = mid-frame tip change, line
  jumps, streaks; 60 % partial frames (>= 14 rows, rest masked).
- Steps: {steps}, batch {batch}, AdamW + one-cycle LR, seed {seed}
- Wall time: {wall / 60:.1f} min on {platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads
- Held-out metrics (`stm-live evaluate --model tipstate --samples 40`, seed 1234, n={m['n']}):
  accuracy {m['accuracy']:.3f}, good-vs-bad {m['good_vs_bad']:.3f}, macro-F1 {m['macro_f1']:.3f},
  s-share MAE {m['s_fraction_mae']:.3f}
- Per-class F1: {", ".join(f"{k} {v:.2f}" for k, v in m['per_class_f1'].items())}
- Limits: trained on simulation only; single molecule per crop; real-tip validation pending.
""")
