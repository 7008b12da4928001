"""STM-Net: a small U-Net from a CO-tip image to the pristine orbital density |psi|^2.

After Zhu, Xue, ... Xu, JACS Au 5, 3163 (2025): a CO tip images
``w_s |psi|^2 + w_p (|d_x psi|^2 + |d_y psi|^2)`` (Chen's derivative rule); the network is
trained on simulated pairs (CO-tip image -> s-wave image) to undo the p-channel part.

This file holds the architecture (``STMNetConfig``, ``STMNet``), the pixel-size-aware
inference wrapper (``Reconstructor``; ``Reconstruction`` adds the symmetry-view spread), the
checkpoint loader (``load_stmnet``) and the GPU fast path (``Acceleration``, ``bf16_check``;
docs/gpu.md). What a recorded frame means to the network (channel,
sign, Z -> current, scope) is decided in ``stm_live/interpret.py``; the command is
``stm_live/app/reconstruct.py``. The input normalisation is ``inputs.py``, the checkpoint
convention (hash, device, save) ``checkpoint.py``, training ``training.py``, metrics,
baselines and evaluation frames ``metrics.py``.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
import time
from collections import Counter, OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stm_live.interpret import STMNET_MAX_SIDE_PX
from stm_live.models.checkpoint import WEIGHTS_DIR, load_checkpoint, resolve_device
from stm_live.models.inputs import normalise, quantiles
from stm_live.models.metrics import eval_cells, make_eval_pairs, psnr, ssim

DEFAULT_CHECKPOINT = WEIGHTS_DIR / "stmnet.pt"
WIDE_CHECKPOINT = WEIGHTS_DIR / "stmnet_wide.pt"  # `stm-live train --model wide` (a GPU run; not shipped yet)
RETRAIN_HINT = "retrain it with `stm-live train --model stmnet` (writes checkpoint, hash and model card)"

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the network
@dataclass
class STMNetConfig:
    channels: int = 16  # width of the first level; doubles at each level down
    depth: int = 3  # number of down-samplings (input sides are padded to a multiple of 2**depth)
    groups: int = 8  # GroupNorm groups
    in_channels: int = 1
    out_channels: int = 1


# Twice the default width: 1.95 M parameters, 7.8 MB of fp32 weights (the default: 0.49 M), for
# training on a GPU in minutes (`stm-live train --model wide`).
WIDE_CONFIG = STMNetConfig(channels=32)


def _block(cin: int, cout: int, groups: int) -> nn.Sequential:
    """(conv 3x3 -> GroupNorm -> ReLU) x 2."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.GroupNorm(groups, cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.GroupNorm(groups, cout),
        nn.ReLU(inplace=True),
    )


class STMNet(nn.Module):
    """Fully convolutional U-Net: max-pool encoder, bilinear-upsample decoder, skip concat.

    The output is a residual on the input added to a learned map, made non-negative with
    softplus (|psi|^2 >= 0).
    """

    def __init__(self, config: STMNetConfig | None = None):
        super().__init__()
        self.config = c = config or STMNetConfig()
        widths = [c.channels * 2**i for i in range(c.depth + 1)]
        self.stem = _block(c.in_channels, widths[0], c.groups)
        self.down = nn.ModuleList(_block(widths[i], widths[i + 1], c.groups) for i in range(c.depth))
        self.up = nn.ModuleList(_block(widths[i + 1] + widths[i], widths[i], c.groups) for i in range(c.depth))
        self.head = nn.Conv2d(widths[0], c.out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(x)]
        for block in self.down:
            skips.append(block(F.max_pool2d(skips[-1], 2)))
        h = skips.pop()
        for block in reversed(self.up):
            skip = skips.pop()
            h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = block(torch.cat([h, skip], dim=1))
        return F.softplus(self.head(h) + x)

    @property
    def multiple(self) -> int:
        return 2**self.config.depth


def _build(weights: dict, config: dict) -> STMNet:
    """The network of a checkpoint (``checkpoint.load_checkpoint``)."""
    net = STMNet(STMNetConfig(**config))
    net.load_state_dict(weights)
    return net.eval()


# --------------------------------------------------------------------------- inference
# Views the output is averaged over, as the image axes each flips: the identity, the 180-degree
# rotation and the mirrors about x and y. Flips keep scan lines horizontal (row offsets and
# streaks look as in training, which a transpose would not); a plain or coherent s-p_z CO tip
# images a molecule's mirror image as the mirror of its image, and training tilts point anywhere.
# The default is 2 views (identity and rotation: most of the gain on the validation seed); 4
# views are about 0.5-0.7 dB better but miss the 100 ms budget for a 256^2 frame on 2 CPU cores.
SYMMETRY_VIEWS = {1: ((),), 2: ((), (-2, -1)), 4: ((), (-2, -1), (-1,), (-2,))}
DEFAULT_VIEWS = 2

# Largest side (px) of the frame the network sees, after resampling to the training pixel size
# (stm_live.interpret sets it with the rest of STM-Net's scope). The whole frame runs in one
# pass (see Reconstructor): at 1024^2 that peaks at ~0.95 GB RSS (0.7 GB over the loaded
# model) and takes 7-11 s with 2 views on 2 CPU cores (benchmarks/bench_stmnet_files.py);
# larger frames are refused rather than tiled.
MAX_NETWORK_SIDE_PX = STMNET_MAX_SIDE_PX


# --------------------------------------------------------------------------- the GPU fast path
BF16_MAX_DROP_DB = 0.1  # mean held-out PSNR that bf16 may cost before "auto" falls back to fp32
GRAPH_SHAPES = 8  # frame shapes with a captured CUDA graph (least recently used dropped)
HOST_BUFFERS = 16  # pinned host buffers kept, by (role, shape)


@dataclass(frozen=True)
class Acceleration:
    """How a :class:`Reconstructor` runs STM-Net on its device; None / "auto": the device's default.

    ``precision``: "fp32", "bf16" (autocast: the convolutions in bf16, the view statistics in
    fp32) or "auto": fp32 on CPU; on CUDA bf16 unless :func:`bf16_check` finds it costs more than
    :data:`BF16_MAX_DROP_DB` on the held-out set, then fp32 (decided at warm-up).
    ``fast``: normalisation, resampling and the NaN mask in torch on the device (one upload,
    one download) and the symmetry views in one batch (default on CUDA). Off is the reference
    path, CPU's default: numpy before and after the network, one pass per view. On CPU the
    batched views agree to ~1e-6 but not bit for bit, and would double a 1024^2 frame's peak.
    ``channels_last``: NHWC activations (CUDA default: whichever layout runs faster, timed at
    warm-up; GroupNorm's NHWC kernels depend on the torch build). Converts the module itself.
    ``graphs``: a CUDA graph per frame shape (views, padding, network, mean and spread), captured
    the second time a shape comes and replayed after; CUDA with ``fast`` only, never on CPU.
    Graphs rather than ``torch.compile``: capture costs one pass, where compiling costs tens of
    seconds per shape, and live band updates come in several shapes.
    """

    precision: str = "auto"
    fast: bool | None = None
    channels_last: bool | None = None
    graphs: bool | None = None

    def for_device(self, device: torch.device) -> Acceleration:
        """Defaults filled in for ``device``, except what warm-up settles on CUDA (precision
        "auto", channels_last None)."""
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        cuda = device.type == "cuda"
        fast = cuda if self.fast is None else bool(self.fast)
        return replace(
            self,
            precision="fp32" if self.precision == "auto" and not cuda else self.precision,
            fast=fast,
            channels_last=(None if cuda else False) if self.channels_last is None else bool(self.channels_last),
            graphs=cuda and fast and self.graphs is not False,
        )


def _nhwc(net: STMNet) -> bool:
    """Whether the module's weights are channels_last (a 16->16 3x3 kernel tells the layouts apart)."""
    weight = net.stem[3].weight
    return weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


def _flip(t: torch.Tensor, axes: tuple) -> torch.Tensor:
    return t.flip(axes) if axes else t


def sync_device(device: torch.device) -> None:
    """Wait for the device's queued work (timing; a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _CudaGraphs:
    """``fn(x)`` replayed from a CUDA graph per input shape, captured the second time a shape is
    seen (a one-off shape stays eager). Returns None where there is no graph (yet): the caller
    runs eagerly. A failed capture turns graphs off for good, with one warning."""

    def __init__(self, fn, limit: int = GRAPH_SHAPES):
        self.fn, self.limit = fn, limit
        self.seen: Counter = Counter()
        self.graphs: OrderedDict[tuple, tuple] = OrderedDict()
        self.failed = False

    def __call__(self, x: torch.Tensor):
        key = tuple(x.shape)
        entry = self.graphs.get(key)
        if entry is None:
            self.seen[key] += 1
            if self.failed or self.seen[key] < 2:
                return None
            entry = self._capture(key, x)
            if entry is None:
                return None
        self.graphs.move_to_end(key)
        graph, static_in, static_out = entry
        static_in.copy_(x)
        graph.replay()
        return static_out

    def _capture(self, key: tuple, x: torch.Tensor):
        try:
            static_in = x.clone()
            side = torch.cuda.Stream(device=x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):  # warm-up passes off the capture, as CUDA graphs require
                for _ in range(2):
                    self.fn(static_in)
            torch.cuda.current_stream(x.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: other threads (the worker's tip monitor) may use the GPU meanwhile
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                static_out = self.fn(static_in)
        except Exception as exc:  # any failure: eager from now on, which is always correct
            self.failed = True
            logger.warning(
                "STM-Net: CUDA graph capture failed for shape %s (%s: %s); running eagerly",
                key,
                type(exc).__name__,
                exc,
            )
            return None
        self.graphs[key] = (graph, static_in, static_out)
        while len(self.graphs) > self.limit:
            self.graphs.popitem(last=False)
        return self.graphs[key]


class _HostBuffers:
    """Pinned host tensors by (role, shape), reused: page-locked copies are asynchronous and run
    at full bus speed, and allocating one costs more than a frame's transfer."""

    def __init__(self, limit: int = HOST_BUFFERS):
        self.limit = limit
        self.buffers: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def get(self, role, shape) -> torch.Tensor:
        key = (role, tuple(shape))
        buf = self.buffers.pop(key, None)
        if buf is None:
            with torch.inference_mode(False):  # a normal tensor: either path may write into it
                buf = torch.empty(tuple(shape), dtype=torch.float32, pin_memory=True)
        self.buffers[key] = buf
        while len(self.buffers) > self.limit:
            self.buffers.popitem(last=False)
        return buf


@dataclass
class Reconstruction:
    """One reconstruction with its symmetry-view uncertainty.

    ``image``: the |psi|^2 estimate (float32, input shape, NaN where the input was NaN; what
    ``Reconstructor.reconstruct`` returns). ``view_spread``: per pixel, the standard deviation
    of the network's output over the symmetry views (each mapped back to the input
    orientation and grid), same shape and NaN as ``image``; all zeros with one view.
    ``spread``: the median of ``view_spread`` where ``image`` exceeds 10 % of its maximum,
    divided by ``image``'s 99th percentile (its maximum if that is 0): a scale-free summary,
    0.0 with one view. ``network``: (the estimate on the network's own grid, its pixel pitch,
    its line pitch, nm) when the frame was resampled for the network, else None; the
    self-consistency check predicts the CO-tip image there (``consistency.check_reconstruction``).
    """

    image: np.ndarray
    view_spread: np.ndarray
    spread: float
    views: int
    network: tuple[np.ndarray, float, float] | None = None


class Reconstructor:
    """Pixel-size-aware STM-Net inference on one image.

    ``reconstruct(image, pixel_size_nm, line_spacing_nm=None)``: validates, fills NaN
    (unscanned) pixels, normalises (percentiles), resamples rows and columns each to the
    training pixel size (columns by ``pixel_size_nm``, rows by ``line_spacing_nm``, default
    square pixels), reflect-pads to a multiple of ``2**depth``, runs the network on the whole
    frame in one pass for each of ``views`` symmetry views (see :data:`SYMMETRY_VIEWS`) and
    averages them, resamples back, clips at 0 and puts NaN back where the input was NaN.
    Output: float32, same shape, |psi|^2 estimate on an arbitrary scale (about 0..1).
    ``reconstruct_detailed`` returns the same image with the spread over the views.

    The frame is never split into tiles, because GroupNorm normalises by the statistics of
    the whole input, so a tile's output depends on the tile's content. That was the seam of
    the old 512 px tiles: on flat background a tile without a molecule has zero variance at
    the first GroupNorm (5e-4..2e-2 per group over the whole 1100^2 test frame), so it
    divides by sqrt(eps) and turns the only structure left, the convolutions' zero-padding
    response at the tile's edges, into bright lines, which the 0.05 ramp floor and the 32 px
    overlap (receptive-field radius 65 px) let into the blend: line means off by up to 0.04
    against one pass. Tiles normalised by the whole frame's statistics match one pass
    exactly, but those statistics need a whole-frame pass (or one pass per GroupNorm layer)
    first; so the frame runs in one pass, bounded by :data:`MAX_NETWORK_SIDE_PX`.

    ``acceleration`` (:class:`Acceleration`) says how the network runs: on CPU the reference
    path above; on CUDA the views in one batch, bf16, the faster memory layout, a CUDA graph
    per frame shape and pinned host buffers (docs/gpu.md). ``warmup`` (default: on CUDA)
    settles what ``acceleration`` leaves to the device and runs the network before the first
    frame. One frame at a time runs the fast path (a lock); the reference path is as before.
    """

    def __init__(
        self,
        net: STMNet,
        pixel_size_nm: float,
        *,
        device="cpu",
        info: dict | None = None,
        views: int = DEFAULT_VIEWS,
        acceleration: Acceleration | None = None,
        warmup: bool | None = None,
    ):
        if views not in SYMMETRY_VIEWS:
            raise ValueError(f"symmetry views must be one of {sorted(SYMMETRY_VIEWS)}, got {views!r}")
        self.device = resolve_device(device)
        self.net = net.to(self.device).eval()
        self.pixel_size_nm = float(pixel_size_nm)
        self.views = views
        self.info = info or {}
        self.acceleration = (acceleration or Acceleration()).for_device(self.device)
        if self.acceleration.channels_last is not None:
            self._set_layout(self.acceleration.channels_last)
        self._nhwc = _nhwc(self.net)
        self._lock = threading.Lock()  # the fast path's buffers and graphs serve one frame at a time
        self._host = _HostBuffers() if self.device.type == "cuda" else None
        self._graphs = _CudaGraphs(lambda x: self._views_forward(x, True)) if self.acceleration.graphs else None
        if self.device.type == "cuda" if warmup is None else warmup:
            self._warm_up()

    def with_views(self, views: int) -> Reconstructor:
        """The same network and settings, averaging over ``views`` symmetry views."""
        return self._derived(views=views)

    def with_acceleration(self, **changes) -> Reconstructor:
        """The same network and views with some :class:`Acceleration` fields changed (no warm-up;
        another memory layout gets its own copy of the network)."""
        return self._derived(**changes)

    def _derived(self, *, views: int | None = None, **changes) -> Reconstructor:
        accel = replace(self.acceleration, **changes)
        layout_changes = accel.channels_last is not None and accel.channels_last != self._nhwc
        net = copy.deepcopy(self.net) if layout_changes else self.net
        return Reconstructor(
            net,
            self.pixel_size_nm,
            device=self.device,
            info=self.info,
            views=self.views if views is None else views,
            acceleration=accel,
            warmup=False,
        )

    # -- device settings
    def _set_layout(self, channels_last: bool) -> None:
        if _nhwc(self.net) != channels_last:
            self.net.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        self._nhwc = channels_last

    def _autocast(self, precision: str | None = None):
        if (precision or self.acceleration.precision) != "bf16":
            return nullcontext()
        # no weight-cast cache: CUDA graph capture forbids it, and inference gains nothing from it
        return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False)

    def _faster_layout(self, precision: str) -> bool:
        """Whether NHWC runs a 2-view 256^2 frame faster than NCHW here (median of 5 passes)."""
        x = torch.rand(2, 1, 256, 256, device=self.device)
        times = {}
        for channels_last in (False, True):
            self._set_layout(channels_last)
            laps = []
            with torch.no_grad(), self._autocast(precision):
                for i in range(6):
                    sync_device(self.device)
                    t0 = time.perf_counter()
                    self._net_padded(x)
                    sync_device(self.device)
                    if i:  # the first pass of a layout pays for its kernels' set-up
                        laps.append(time.perf_counter() - t0)
            times[channels_last] = float(np.median(laps))
        best = min(times, key=times.get)
        self._set_layout(best)
        return best

    def _warm_up(self) -> None:
        """Settle what :class:`Acceleration` leaves to the device, then run a 256^2 frame twice
        (cuDNN, autocast and the allocator set up; its CUDA graph captured) so the first real
        frame does not pay for it."""
        accel = self.acceleration
        if accel.channels_last is None:
            candidate = "fp32" if accel.precision == "fp32" else "bf16"
            accel = self.acceleration = replace(accel, channels_last=self._faster_layout(candidate))
        if accel.precision == "auto":
            verdict = _bf16_verdict(self)
            self.acceleration = replace(accel, precision="bf16" if verdict["ok"] else "fp32")
        probe = np.random.default_rng(0).random((256, 256), dtype=np.float32)
        for _ in range(2):
            self.reconstruct(probe, self.pixel_size_nm)

    # -- checks
    @staticmethod
    def _pitch(value, name: str) -> float:
        try:
            px = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number, got {value!r}") from None
        if not math.isfinite(px) or px <= 0:
            raise ValueError(f"{name} must be finite and > 0, got {value!r}")
        return px

    @classmethod
    def _validate(cls, image, pixel_size_nm, line_spacing_nm=None) -> tuple[np.ndarray, float, float]:
        arr = np.asarray(image)
        if arr.ndim != 2:
            raise ValueError(f"image must be 2-D (lines, pixels), got shape {arr.shape}")
        if min(arr.shape) < 4:
            raise ValueError(f"image too small: shape {arr.shape}, need at least 4x4 pixels")
        if not np.issubdtype(arr.dtype, np.number):
            raise ValueError(f"image must be numeric, got dtype {arr.dtype}")
        px = cls._pitch(pixel_size_nm, "pixel_size_nm")
        line = px if line_spacing_nm is None else cls._pitch(line_spacing_nm, "line_spacing_nm")
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).any():
            raise ValueError("image has no finite values (all NaN: nothing scanned yet)")
        return arr, px, line

    def network_shape(self, shape, pixel_size_nm: float, line_spacing_nm: float | None = None) -> tuple[int, int]:
        """(lines, pixels) of the frame the network sees for an input of ``shape`` (lines,
        pixels) at these pitches; ValueError if a side exceeds :data:`MAX_NETWORK_SIDE_PX`."""
        h, w = (int(n) for n in shape)
        px = self._pitch(pixel_size_nm, "pixel_size_nm")
        line = px if line_spacing_nm is None else self._pitch(line_spacing_nm, "line_spacing_nm")
        th = max(8, round(h * line / self.pixel_size_nm))
        tw = max(8, round(w * px / self.pixel_size_nm))
        if max(th, tw) > MAX_NETWORK_SIDE_PX:
            pitch = f"{px:g} nm/px" if line == px else f"{px:g} nm/px, {line:g} nm line spacing"
            raise ValueError(
                f"frame of {h}x{w} px (lines x pixels) at {pitch} resamples to {th}x{tw} px at STM-Net's "
                f"{self.pixel_size_nm:g} nm/px, over its {MAX_NETWORK_SIDE_PX} px limit per side: crop the frame "
                f"to the molecules (<= {MAX_NETWORK_SIDE_PX * self.pixel_size_nm:g} nm a side) or use a coarser "
                "tool for an overview"
            )
        return th, tw

    # -- the network
    def _net_padded(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = self.net.multiple
        ph, pw = (-h) % m, (-w) % m
        pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
        if ph or pw:
            mode = "reflect" if max(pad[2:]) < h and max(pad[:2]) < w else "replicate"
            x = F.pad(x, pad, mode=mode)
        if self._nhwc:
            x = x.contiguous(memory_format=torch.channels_last)
        y = self.net(x)
        return y[..., pad[2] : pad[2] + h, pad[0] : pad[0] + w]

    def _run(self, x: torch.Tensor, spread: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mean, std) over the symmetry views of the network's output on a (1, 1, h, w)
        tensor, each view mapped back; std is None with one view or ``spread=False``. From
        the shape's CUDA graph where there is one (it always computes the spread)."""
        if self._graphs is not None:
            captured = self._graphs(x)
            if captured is not None:
                mean, std = captured
                return mean, std if spread else None
        return self._views_forward(x, spread)

    def _views_forward(self, x: torch.Tensor, spread: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        views = SYMMETRY_VIEWS[self.views]
        with self._autocast():  # each flip is its own inverse
            if self.acceleration.fast:
                y = self._net_padded(torch.cat([_flip(x, axes) for axes in views]))
                outs = [_flip(y[i : i + 1], axes) for i, axes in enumerate(views)]
            else:
                outs = [_flip(self._net_padded(_flip(x, axes)), axes) for axes in views]
        mean = 0.0
        for y in outs:  # summed in order, then divided: the same numbers as before the spread
            mean = mean + y
        mean = mean / len(outs)
        if len(outs) == 1 or not spread:
            return mean, None
        var = 0.0
        for y in outs:
            var = var + (y - mean) ** 2
        return mean, (var / len(outs)).sqrt()

    # -- transfers
    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        if self._host is None:
            return torch.from_numpy(array).to(self.device)
        buf = self._host.get("in", array.shape)
        buf.numpy()[...] = array
        return buf.to(self.device, non_blocking=True)

    def _to_host(self, tensors: list[torch.Tensor]) -> list[np.ndarray]:
        if self._host is None:
            return [t.cpu().numpy() for t in tensors]
        bufs = [self._host.get(i, t.shape) for i, t in enumerate(tensors)]
        for buf, t in zip(bufs, tensors):
            buf.copy_(t, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return [buf.numpy().copy() for buf in bufs]  # the buffers serve the next frame

    def reconstruct_detailed(
        self, image: np.ndarray, pixel_size_nm: float, line_spacing_nm: float | None = None
    ) -> Reconstruction:
        """The reconstruction with the spread of the network's output over the symmetry views
        (:class:`Reconstruction`; zeros with ``views=1``). ``line_spacing_nm``: the slow-axis
        pitch (rows), default ``pixel_size_nm`` (square pixels)."""
        out, spread_map, network = self._reconstruct(image, pixel_size_nm, line_spacing_nm, spread=True)
        return Reconstruction(out, spread_map, _spread_summary(out, spread_map), self.views, network)

    def reconstruct(self, image: np.ndarray, pixel_size_nm: float, line_spacing_nm: float | None = None) -> np.ndarray:
        """The |psi|^2 estimate (float32, input shape): ``reconstruct_detailed(...).image``
        without computing the spread."""
        return self._reconstruct(image, pixel_size_nm, line_spacing_nm, spread=False)[0]

    __call__ = reconstruct

    def _reconstruct(self, image, pixel_size_nm, line_spacing_nm, *, spread: bool):
        """(image, view-spread map or None if not ``spread``, network-grid image or None)."""
        arr, px, line = self._validate(image, pixel_size_nm, line_spacing_nm)
        h, w = arr.shape
        th, tw = self.network_shape(arr.shape, px, line)  # raises before anything frame-sized is made
        fast = self.acceleration.fast
        # fast: torch on the device from the raw frame on, under no_grad (what CUDA graph capture
        # supports); the reference path normalises in numpy
        with self._lock if fast else nullcontext(), torch.no_grad() if fast else torch.inference_mode():
            if fast:
                raw = self._to_device(arr)
                nan_mask = ~torch.isfinite(raw)
            else:
                raw, nan_mask = arr, ~np.isfinite(arr)
            x = normalise(raw)
            if nan_mask.any():
                x[nan_mask] = quantiles(x[~nan_mask], (0.5,))[0] if fast else float(np.median(x[~nan_mask]))
            t = x[None, None] if fast else self._to_device(x)[None, None]
            nan = nan_mask if fast else torch.from_numpy(nan_mask).to(self.device)
            sy, sx = line / self.pixel_size_nm, px / self.pixel_size_nm
            resample = (th, tw) != (h, w)
            if resample:  # antialias acts on the axes that shrink only (bilinear on the others)
                t = F.interpolate(t, size=(th, tw), mode="bilinear", align_corners=False, antialias=min(sy, sx) < 1)
            mean, std = self._run(t, spread)

            def back(y: torch.Tensor) -> torch.Tensor:
                if resample:
                    y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False, antialias=max(sy, sx) > 1)
                return torch.where(nan, torch.nan, y[0, 0].clamp_min(0).float())

            results = [back(mean)]
            if spread:
                results.append(back(std) if std is not None else torch.where(nan, torch.nan, 0.0))
            if resample:
                results.append(mean[0, 0].clamp_min(0).float())
            host = self._to_host(results)
        network = (host[-1], w * px / tw, h * line / th) if resample else None
        return host[0], host[1] if spread else None, network


def _spread_summary(image: np.ndarray, spread: np.ndarray) -> float:
    """Median view spread over the bright part (> 10 % of the maximum) / the 99th percentile."""
    finite = np.isfinite(image)
    if not finite.any():
        return 0.0
    values = image[finite]
    top = float(values.max())
    if top <= 0:
        return 0.0
    scale = float(np.percentile(values, 99)) or top
    return float(np.median(spread[finite & (image > 0.1 * top)])) / scale


# --------------------------------------------------------------------------- loading
def load_stmnet(
    device: str | None = "auto",
    path: str | Path | None = None,
    *,
    views: int = DEFAULT_VIEWS,
    acceleration: Acceleration | None = None,
) -> Reconstructor:
    """The STM-Net checkpoint (default: the shipped one) as a ``Reconstructor`` averaging over
    ``views`` symmetry views (1, 2 or 4; each costs one network pass), run as ``acceleration``
    says (default: the device's; on CUDA it warms up before returning).

    The file's SHA-256 must match the hash stored beside it (``<name>.sha256``); it is
    loaded with ``torch.load(weights_only=True)`` (``checkpoint.load_checkpoint``).
    """
    path = Path(path) if path is not None else DEFAULT_CHECKPOINT
    net, info = load_checkpoint(path, _build, what="STM-Net checkpoint", fix=RETRAIN_HINT)
    return Reconstructor(
        net, float(info["pixel_size_nm"]), device=device, info=info, views=views, acceleration=acceleration
    )


# --------------------------------------------------------------------------- bf16 or fp32
_BF16_VERDICTS: dict[tuple, dict] = {}  # (checkpoint, device) -> bf16_check: one check per process


def bf16_check(
    reconstructor: Reconstructor,
    *,
    samples: int = 1,
    size: int = 96,
    seed: int = 1234,
    max_drop_db: float = BF16_MAX_DROP_DB,
) -> dict:
    """What bf16 costs: mean PSNR (dB) and SSIM against the |psi|^2 target on the held-out set
    (``metrics.eval_cells("held-out")``, ``samples`` frames per cell, ``make_eval_pairs``),
    with this reconstructor's network, device and views in fp32 and in bf16, and the mean
    PSNR of the bf16 output against the fp32 one (``agreement_db``). ``ok``: bf16 loses at
    most ``max_drop_db`` dB. Metrics as ``metrics.psnr``/``ssim`` (min-max normalised)."""
    px = reconstructor.pixel_size_nm
    pairs = [make_eval_pairs(cell, samples, seed=seed, size=size, pixel_size_nm=px) for cell in eval_cells("held-out")]
    inputs, targets = np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])
    outs = {
        precision: np.stack([reconstructor.with_acceleration(precision=precision).reconstruct(x, px) for x in inputs])
        for precision in ("fp32", "bf16")
    }
    result = {
        precision: {"psnr_db": float(np.mean(psnr(out, targets))), "ssim": float(np.mean(ssim(out, targets)))}
        for precision, out in outs.items()
    }
    drop = result["fp32"]["psnr_db"] - result["bf16"]["psnr_db"]
    return {
        "frames": len(inputs),
        "views": reconstructor.views,
        **result,
        "drop_db": drop,
        "ssim_drop": result["fp32"]["ssim"] - result["bf16"]["ssim"],
        "agreement_db": float(np.mean(psnr(outs["bf16"], outs["fp32"]))),
        "max_drop_db": max_drop_db,
        "ok": drop <= max_drop_db,
    }


def _bf16_verdict(reconstructor: Reconstructor) -> dict:
    """:func:`bf16_check` (one frame per held-out cell) for this checkpoint and device, once."""
    key = (reconstructor.info.get("sha256") or id(reconstructor.net), str(reconstructor.device))
    if key not in _BF16_VERDICTS:
        verdict = _BF16_VERDICTS[key] = bf16_check(reconstructor)
        logger.info(
            "STM-Net on %s: bf16 %s (held-out PSNR %.2f dB vs fp32 %.2f dB)",
            reconstructor.device,
            "used" if verdict["ok"] else "costs too much, fp32 used",
            verdict["bf16"]["psnr_db"],
            verdict["fp32"]["psnr_db"],
        )
    return _BF16_VERDICTS[key]
