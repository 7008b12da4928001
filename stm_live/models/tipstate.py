"""Tip-state classifier: a small CNN trained on the physics simulator, as it is loaded and run.

Input: one image (lines, pixels), possibly a partial frame (rows not yet scanned are NaN),
resampled to the training pixel size and robustly normalised over the scanned rows, plus a
mask channel (1 = scanned) (:func:`prepare`). Output: probabilities over :data:`TIP_CLASSES`
and a regressed s-wave share of the tip (``TipState.s_fraction``).

The classifier loads with its domain statistics (:class:`DomainModel`, fitted by
:mod:`stm_live.models.tipdomain`): a frame outside what it was trained and benchmarked on gets
the verdict :data:`UNKNOWN`, which is neither good nor bad (:func:`is_known_bad` is what a
policy may act on).

The training data recipe is :mod:`stm_live.models.tipdata`; training, evaluation and the
model card :mod:`stm_live.models.tiptrain`; the checkpoint convention (hash, device, save)
:mod:`stm_live.models.checkpoint`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch import nn
from torch.nn import functional as F

from stm_live.models.checkpoint import WEIGHTS_DIR, load_checkpoint, resolve_device, verify, write_hash

__all__ = [
    "TIP_CLASSES",
    "GOOD_CLASSES",
    "UNKNOWN",
    "MIN_VERDICT_HEIGHT_NM",
    "bad_probability",
    "is_known_bad",
    "is_held_back",
    "is_unknown",
    "TipVerdict",
    "TipNetConfig",
    "TipNet",
    "prepare",
    "DomainModel",
    "domain_path",
    "load_domain",
    "TipClassifier",
    "load_tip_classifier",
    "DEFAULT_WEIGHTS",
]

TIP_CLASSES = ("co_sharp", "metal_s", "mixed", "asymmetric", "double", "blunt", "unstable")
# Tips fit for imaging (as the simulated controller's good tips): sharp CO, sharp metal, CO with
# a larger s share (STM-Net separates s and p); the rest call for reconditioning.
GOOD_CLASSES = ("co_sharp", "metal_s", "mixed")
# The verdict on a frame outside what the classifier knows (DomainModel): neither good nor
# bad, so nothing acts on it; the probabilities stay visible but mean little.
UNKNOWN = "unknown"
# Fewest nanometres of frame height a live verdict should rest on: on the held-out set the
# good-vs-bad call from 1.3 nm of frame is right 7 times in 10, from 2.6 nm 9 times in 10
# (evaluate_report's row curve), and a false "bad" costs a needless reconditioning.
MIN_VERDICT_HEIGHT_NM = 2.5


def bad_probability(probabilities: dict) -> float:
    """The classifier's probability that the tip needs reconditioning (not a good class).
    Meaningful only for a verdict inside the classifier's domain: see :func:`is_known_bad`."""
    return 1.0 - sum(probabilities.get(c, 0.0) for c in GOOD_CLASSES)


def is_unknown(verdict) -> bool:
    """Whether a verdict (a :class:`TipVerdict` or its record dict) is outside the
    classifier's domain: label "unknown" or ``in_domain`` false."""
    get = verdict.get if isinstance(verdict, dict) else (lambda k, d=None: getattr(verdict, k, d))
    return get("label") == UNKNOWN or get("in_domain", True) is False


def _bad_class(verdict, get) -> bool:
    return not is_unknown(verdict) and get("label") in TIP_CLASSES and get("label") not in GOOD_CLASSES


def is_held_back(verdict) -> bool:
    """Whether a verdict of a bad class, inside the domain, lies farther from that class's
    own frames than its action limit (``class_score`` > ``action_limit``,
    :func:`stm_live.models.tipdomain.action_limits`): near the edge of what the classifier
    knows of the class, so no policy acts on it. A record without the two says nothing."""
    get = verdict.get if isinstance(verdict, dict) else (lambda k, d=None: getattr(verdict, k, d))
    try:
        over = float(get("class_score", math.nan)) > float(get("action_limit", math.nan))
    except (TypeError, ValueError):  # a record's null
        over = False
    return _bad_class(verdict, get) and over


def is_known_bad(verdict) -> bool:
    """Whether a verdict says the tip needs reconditioning: a bad class, inside the domain,
    not held back (:func:`is_held_back`). The one test every policy acts on; "unknown" is
    never bad."""
    get = verdict.get if isinstance(verdict, dict) else (lambda k, d=None: getattr(verdict, k, d))
    return _bad_class(verdict, get) and not is_held_back(verdict)


DEFAULT_WEIGHTS = WEIGHTS_DIR / "tipstate.pt"
MODEL_CARD = WEIGHTS_DIR / "TIPSTATE_MODEL_CARD.md"


@dataclass(frozen=True)
class TipVerdict:
    """What the classifier says about the tip that took an image.

    ``in_domain`` false (label :data:`UNKNOWN`): the frame is outside what the classifier was
    trained on (``domain_score`` above ``domain_threshold``, :class:`DomainModel`);
    the probabilities are kept for the record. A classifier without a domain model reports
    ``in_domain`` true and a NaN score. ``class_score`` is the distance to the label's own
    class and ``action_limit`` that class's limit for acting on a bad verdict (NaN: none);
    see :func:`is_held_back`."""

    label: str
    probabilities: dict
    s_fraction: float
    in_domain: bool = True
    domain_score: float = float("nan")
    domain_threshold: float = float("nan")
    class_score: float = float("nan")
    action_limit: float = float("nan")

    def __post_init__(self):
        if (self.label == UNKNOWN) == bool(self.in_domain):
            raise ValueError(
                f"TipVerdict: label {self.label!r} with in_domain={self.in_domain}; "
                f"a verdict is {UNKNOWN!r} exactly when it is outside the domain"
            )
        if self.label != UNKNOWN and self.label not in TIP_CLASSES:
            raise ValueError(f"TipVerdict: label {self.label!r} is not one of {TIP_CLASSES} or {UNKNOWN!r}")

    @property
    def good(self) -> bool:
        return self.label in GOOD_CLASSES

    @property
    def bad(self) -> bool:
        """A bad class inside the domain, not held back (what a policy may act on)."""
        return is_known_bad(self)

    @property
    def held_back(self) -> bool:
        """A bad class inside the domain but beyond its action limit: see :func:`is_held_back`."""
        return is_held_back(self)

    @property
    def nearest(self) -> str:
        """The most probable of :data:`TIP_CLASSES` (the label, unless "unknown")."""
        return max(self.probabilities, key=self.probabilities.get)

    @property
    def confidence(self) -> float:
        """Probability of :attr:`nearest`."""
        return float(self.probabilities[self.nearest])

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "probabilities": dict(self.probabilities),
            "s_fraction": float(self.s_fraction),
            "good": self.good,
            "in_domain": bool(self.in_domain),
            "domain_score": float(self.domain_score),
            "domain_threshold": float(self.domain_threshold),
            "class_score": float(self.class_score),
            "action_limit": float(self.action_limit),
        }


# --------------------------------------------------------------------------- network
@dataclass(frozen=True)
class TipNetConfig:
    size: int = 64  # training image side (pixels): 5.1 nm, room for a second apex's ghost
    pixel_size_nm: float = 0.08  # training pixel size
    widths: tuple = (16, 48, 96, 128)  # channels per stage; each stage after the first halves the map
    n_classes: int = len(TIP_CLASSES)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class TipNet(nn.Module):
    """Conv stages with max pooling between them -> masked mean+max pool over the scanned
    rows -> class logits and the tip's s share."""

    def __init__(self, cfg: TipNetConfig = TipNetConfig()):
        super().__init__()
        self.cfg = cfg
        chans = (2, *cfg.widths)  # input: normalised image + scanned-rows mask
        self.stages = nn.ModuleList(_block(a, b) for a, b in zip(chans[:-1], chans[1:]))
        self.head = nn.Sequential(nn.Linear(2 * chans[-1], 64), nn.ReLU(inplace=True), nn.Linear(64, cfg.n_classes + 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, s, _ = self.embed(x)
        return logits, s

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Class logits, s share and the pooled penultimate features (masked mean and max of
        the last stage, what the head reads), which the domain model scores."""
        mask = x[:, 1:2]
        h = x
        for i, stage in enumerate(self.stages):
            h = stage(F.max_pool2d(h, 2) if i else h)
        m = F.interpolate(mask, size=h.shape[-2:], mode="area").gt(0.5).float()
        mean = (h * m).sum(dim=(2, 3)) / m.sum(dim=(2, 3)).clamp_min(1.0)
        mx = (h + (m - 1.0) * 1e4).amax(dim=(2, 3))  # unscanned cells never win the max
        pooled = torch.cat([mean, mx], dim=1)
        out = self.head(pooled)
        return out[:, :-1], torch.sigmoid(out[:, -1]), pooled


def _build(weights: dict, config: dict) -> TipNet:
    """The network of a checkpoint (``checkpoint.load_checkpoint``)."""
    net = TipNet(TipNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}))
    net.load_state_dict(weights)
    return net


# --------------------------------------------------------------------------- preprocessing
def prepare(
    image: np.ndarray, pixel_size_nm: float, cfg: TipNetConfig, line_spacing_nm: float | None = None
) -> np.ndarray:
    """(H, W) image with NaN rows -> (2, h, w) float32 [normalised image, mask] at cfg pixel
    size (rows resampled by ``line_spacing_nm`` when lines are not square with pixels)."""
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


# --------------------------------------------------------------------------- the domain gate
# What is scored: the classifier's pooled penultimate features, square-rooted, joined by the
# frame's fast-axis power spectrum in bands of physical frequency (log of each band's share);
# why, and what else was measured, is in tipdomain (above SHRINKAGE). The statistics are
# class-conditional Gaussians with one shared covariance (Lee et al., NeurIPS 2018), fitted by
# tipdomain.fit_domain_main.
BANDS_PER_NM = tuple(float(b) for b in np.geomspace(0.15, 6.25, 13))  # 12 bands up to Nyquist at 0.08 nm/px


def line_spectra(inputs, pixel_size_nm: float) -> np.ndarray:
    """Fast-axis power spectra of prepared classifier inputs ((2, h, w): image, mask), (n, 12):
    per scanned line minus its mean, Hann-windowed, |FFT|² averaged over lines, summed in
    :data:`BANDS_PER_NM` (cycles/nm at ``pixel_size_nm``), log of each band's share."""
    bands = np.asarray(BANDS_PER_NM)
    out = np.zeros((len(inputs), len(bands) - 1))
    for i, x in enumerate(inputs):
        x = np.asarray(x)
        mask = x[1] > 0.5
        a = x[0][mask.any(axis=1)][:, mask.any(axis=0)].astype(np.float64)
        a = a - a.mean(axis=1, keepdims=True)
        power = (np.abs(np.fft.rfft(a * np.hanning(a.shape[1]), axis=1)) ** 2).mean(axis=0)
        which = np.digitize(np.fft.rfftfreq(a.shape[1], d=pixel_size_nm), bands)
        share = np.bincount(which, weights=power, minlength=len(bands) + 1)[1 : len(bands)]
        out[i] = np.log(share / (power[1:].sum() + 1e-30) + 1e-6)
    return out


def describe(features: np.ndarray, spectra: np.ndarray) -> np.ndarray:
    """What the Gaussians model: [sqrt(features), line spectra], (n, D + 12)."""
    return np.hstack(
        [np.sqrt(np.maximum(np.asarray(features, dtype=np.float64), 0.0)), np.asarray(spectra, dtype=np.float64)]
    )


@dataclass(frozen=True)
class DomainModel:
    """Class-conditional Gaussians with one shared covariance over :func:`describe` of a
    frame (a mean per class and source of frames: centre j belongs to class j mod the
    number of classes). ``whiten`` W satisfies W Wᵀ = Σ⁻¹ and ``centres`` are the means
    times W, so score = min_c |d W − centre_c|² = min_c Mahalanobis² to mean c.

    ``action_limits`` (one per class, NaN: none) bound the *class score*, the distance to the
    verdict's own class, for a verdict a policy may act on (``tipdomain.action_limits``)."""

    whiten: np.ndarray  # (D, D)
    centres: np.ndarray  # (K, D)
    threshold: float
    classifier_sha256: str
    meta: dict = field(default_factory=dict)
    action_limits: np.ndarray | None = None  # (classes,)

    def distances(self, features: np.ndarray, spectra: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distances to every centre, (n, K), for pooled features (n, F)
        and :func:`line_spectra` (n, 12) of the same frames."""
        g = describe(features, spectra) @ self.whiten.astype(np.float64)
        c = self.centres.astype(np.float64)
        return np.maximum((g * g).sum(1)[:, None] - 2 * g @ c.T + (c * c).sum(1)[None, :], 0.0)

    def score(self, features: np.ndarray, spectra: np.ndarray) -> np.ndarray:
        """The domain score: squared Mahalanobis distance to the nearest class, (n,)."""
        return self.distances(features, spectra).min(axis=1)

    def score_inputs(self, features: np.ndarray, inputs, pixel_size_nm: float) -> np.ndarray:
        """:meth:`score` of prepared inputs given their pooled features."""
        return self.score(features, line_spectra(inputs, pixel_size_nm))

    def judge(self, features: np.ndarray, inputs, pixel_size_nm: float, labels) -> tuple:
        """``(score, class_score, action_limit)``, each (n,), of prepared inputs given their
        pooled features and the class each is labelled: the domain score, the distance to
        the labelled class (the nearer of its means), and that class's action limit (NaN
        for statistics without limits)."""
        d2 = self.distances(features, line_spectra(inputs, pixel_size_nm))
        labels = np.asarray(labels, dtype=np.int64)
        if self.action_limits is None:
            nan = np.full(len(d2), np.nan)
            return d2.min(axis=1), nan, nan
        return (
            d2.min(axis=1),
            class_distance(d2, labels, len(self.action_limits)),
            np.asarray(self.action_limits, np.float64)[labels],
        )

    def save(self, path: Path) -> Path:
        """npz (no pickled objects) + ``<name>.sha256`` beside it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        extra = {} if self.action_limits is None else {"action_limits": np.asarray(self.action_limits, np.float64)}
        np.savez(
            tmp,
            whiten=self.whiten.astype(np.float32),
            centres=self.centres.astype(np.float32),
            threshold=np.float64(self.threshold),
            classifier_sha256=np.str_(self.classifier_sha256),
            meta=np.str_(json.dumps(self.meta)),
            **extra,
        )
        tmp.replace(path)
        write_hash(path)
        return path


def class_distance(d2: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Distance to each frame's labelled class: the nearest of that class's means (one per
    source of frames; centre j belongs to class j mod ``n_classes``), (n,)."""
    own = (np.arange(d2.shape[1])[None, :] % n_classes) == np.asarray(labels, np.int64)[:, None]
    return np.where(own, d2, np.inf).min(axis=1)


def domain_path(classifier_path) -> Path:
    """Where the domain statistics of a classifier checkpoint live: ``tipdomain.npz`` beside
    the shipped weights, ``<stem>_domain.npz`` beside any other checkpoint."""
    p = Path(classifier_path)
    if p.resolve() == DEFAULT_WEIGHTS.resolve():
        return WEIGHTS_DIR / "tipdomain.npz"
    return p.with_name(p.stem + "_domain.npz")


def load_domain(path, *, classifier=None, classifier_sha256: str | None = None) -> DomainModel:
    """Domain statistics from ``path``, verified by their SHA-256 file and, when
    ``classifier_sha256`` is given, checked to belong to that classifier checkpoint."""
    path = Path(path)
    other = classifier is not None and Path(classifier).resolve() != DEFAULT_WEIGHTS.resolve()
    fix = "fit them with `stm-live train --model tipdomain" + (f" --weights {classifier}`" if other else "`")
    verify(path, what="tip classifier domain statistics", fix=fix)
    try:
        with np.load(path, allow_pickle=False) as z:
            whiten, centres = np.array(z["whiten"]), np.array(z["centres"])
            threshold, owner = float(z["threshold"]), str(z["classifier_sha256"])
            meta = json.loads(str(z["meta"]))
            # statistics fitted before the action limits have none: their verdicts are acted on as before
            limits = np.array(z["action_limits"]) if "action_limits" in z.files else None
    except Exception as exc:
        raise ValueError(f"tip classifier domain statistics {path}: unreadable ({exc})") from exc
    d = whiten.shape[0]
    if whiten.shape != (d, d) or centres.ndim != 2 or centres.shape[1] != d or not math.isfinite(threshold):
        raise ValueError(
            f"tip classifier domain statistics {path}: field shapes whiten {whiten.shape}, "
            f"centres {centres.shape}, threshold {threshold} do not fit together"
        )
    if limits is not None and (limits.ndim != 1 or centres.shape[0] % max(len(limits), 1)):
        raise ValueError(
            f"tip classifier domain statistics {path}: {limits.shape} action limits do not fit "
            f"{centres.shape[0]} class means"
        )
    if classifier_sha256 is not None and owner != classifier_sha256:
        raise ValueError(
            f"tip classifier domain statistics {path} were fitted for the checkpoint with sha256 "
            f"{owner[:12]}..., not {classifier_sha256[:12]}... ({classifier}); {fix}"
        )
    return DomainModel(whiten, centres, threshold, owner, meta, limits)


# --------------------------------------------------------------------------- inference
def _bucket(n: int, size: int) -> int:
    """Padded input size for ``n`` pixels: at least the training size, then multiples of 32."""
    return max(size, -(-n // 32) * 32)


class TipClassifier:
    """Inference wrapper: ``classify(image, pixel_size_nm) -> TipVerdict``."""

    def __init__(
        self, net: TipNet, device: torch.device, domain: DomainModel | None = None, *, info: dict | None = None
    ):
        self.net = net.to(device).eval()
        self.device = device
        self.cfg = net.cfg
        self.info = info or {}  # checkpoint metadata, with its sha256
        self.domain = domain  # or None: every frame counts as in domain
        if domain is not None:
            want = 2 * self.cfg.widths[-1] + len(BANDS_PER_NM) - 1
            if domain.whiten.shape[0] != want:
                raise ValueError(
                    f"tip classifier: domain statistics have {domain.whiten.shape[0]} dimensions, this "
                    f"network's descriptor {want}; refit them with `stm-live train --model tipdomain`"
                )
            if domain.action_limits is not None and len(domain.action_limits) != len(TIP_CLASSES):
                raise ValueError(
                    f"tip classifier: domain statistics have {len(domain.action_limits)} action limits, "
                    f"not one per class ({len(TIP_CLASSES)}); refit them with "
                    "`stm-live train --model tipdomain`"
                )

    @property
    def pixel_size_nm(self) -> float:
        return self.cfg.pixel_size_nm

    @torch.no_grad()
    def predict(self, x: torch.Tensor | list, *, features: bool = False):
        """Prepared inputs ((n, 2, h, w), or a list of (2, h, w) of any sizes; scanned rows at
        the top, zero padding at the bottom and right) -> class probabilities (n, 7) and s
        shares (n,), averaged over flips of each frame's scanned area (classes do not change
        under a flip; about a point more accurate). Partial frames are flipped left-right only:
        training always has the scanned rows at the top. All views go through the network as
        one batch, which needs one size: views are zero-padded to a few fixed sizes
        (:func:`_bucket`), so repeated calls repeat input shapes. With ``features`` also the
        pooled penultimate features (n, D), averaged over the same views."""
        views, owner = [], []
        for i, xi in enumerate(x):
            xi = torch.as_tensor(xi)
            rows, cols = xi[1].gt(0.5).any(dim=1), xi[1].gt(0.5).any(dim=0)
            h = int(rows.nonzero().max()) + 1 if rows.any() else xi.shape[1]
            w = int(cols.nonzero().max()) + 1 if cols.any() else xi.shape[2]
            area = xi[:, :h, :w]
            flips = ((), (2,), (1,), (1, 2)) if bool(area[1].gt(0.5).all()) else ((), (2,))
            views += [torch.flip(area, d) if d else area for d in flips]
            owner += [i] * len(flips)
        height = _bucket(max(v.shape[1] for v in views), self.cfg.size)
        width = _bucket(max(v.shape[2] for v in views), self.cfg.size)
        batch = torch.zeros((len(views), 2, height, width))
        for k, v in enumerate(views):
            batch[k, :, : v.shape[1], : v.shape[2]] = v
        outs = [self.net.embed(chunk.to(self.device)) for chunk in batch.split(256)]  # bounded memory
        logits, s, pooled = (torch.cat([o[j] for o in outs]) for j in range(3))
        owner = torch.tensor(owner, device=self.device)
        n = int(owner.max()) + 1
        count = torch.zeros(n, device=self.device).index_add_(0, owner, torch.ones_like(s))
        probs = torch.zeros(n, logits.shape[1], device=self.device).index_add_(0, owner, torch.softmax(logits, 1))
        s_share = torch.zeros(n, device=self.device).index_add_(0, owner, s)
        if not features:
            return probs / count[:, None], s_share / count
        feats = torch.zeros(n, pooled.shape[1], device=self.device).index_add_(0, owner, pooled)
        return probs / count[:, None], s_share / count, feats / count[:, None]

    def classify(self, image: np.ndarray, pixel_size_nm: float, *, line_spacing_nm: float | None = None) -> TipVerdict:
        """Verdict on ``image`` (lines, pixels; NaN rows = not scanned yet)."""
        return self.classify_many([image], pixel_size_nm, line_spacing_nm=line_spacing_nm)[0]

    def classify_many(
        self, images: list, pixel_size_nm: float, *, line_spacing_nm: float | None = None
    ) -> list[TipVerdict]:
        """Verdicts on several images of one scan (e.g. the lines since a change and the
        latest few), in one pass through the network."""
        x = [prepare(im, pixel_size_nm, self.cfg, line_spacing_nm) for im in images]
        if self.domain is None:
            probs, s = self.predict(x)
            scores = class_scores = limits = np.full(len(x), np.nan)
        else:
            probs, s, feats = self.predict(x, features=True)
            scores, class_scores, limits = self.domain.judge(
                feats.cpu().numpy(), x, self.cfg.pixel_size_nm, probs.argmax(1).cpu().numpy()
            )
        threshold = np.nan if self.domain is None else self.domain.threshold
        verdicts = []
        for p, si, score, own, limit in zip(probs.cpu().numpy(), s.cpu().numpy(), scores, class_scores, limits):
            # NaN features (never seen; a NaN score) count as outside: unknown is the safe side
            inside = self.domain is None or bool(score <= threshold)
            verdicts.append(
                TipVerdict(
                    label=TIP_CLASSES[int(p.argmax())] if inside else UNKNOWN,
                    s_fraction=float(si),
                    probabilities={c: float(v) for c, v in zip(TIP_CLASSES, p)},
                    in_domain=inside,
                    domain_score=float(score),
                    domain_threshold=float(threshold),
                    class_score=float(own),
                    action_limit=float(limit),
                )
            )
        return verdicts


def load_tip_classifier(device: str | None = "auto", path=None, *, domain="auto") -> TipClassifier:
    """The tip classifier from ``path`` (default: shipped weights), verified by SHA-256, with
    its domain model (:class:`DomainModel`), which turns frames outside what the classifier
    knows into "unknown" verdicts.

    The hash lives beside the checkpoint as ``<name>.sha256``. ``domain``: "auto" = the
    statistics beside the checkpoint (:func:`domain_path`), required; a path; or None
    for the bare network (training and evaluation only: every frame then counts as inside).
    Raises ``FileNotFoundError`` when a file is missing and ``ValueError`` when a hash does
    not match, a file is unreadable, or the domain statistics belong to another checkpoint.
    """
    p = Path(path) if path is not None else DEFAULT_WEIGHTS
    net, info = load_checkpoint(
        p, _build, what="tip classifier weights", fix="train them with `stm-live train --model tipstate`"
    )
    model = None
    if domain is not None:
        model = load_domain(
            domain_path(p) if domain == "auto" else Path(domain), classifier=p, classifier_sha256=info["sha256"]
        )
    return TipClassifier(net, resolve_device(device), model, info=info)
