"""Line-level tip-change detector.

A tip change mid-frame shows as a *step*: every line after it differs from every line
before it (new contrast, new apparent height), while lines on either side of the step
agree with their own neighbours. Molecules change the image smoothly from line to line,
and single bad lines (spikes, one-line offsets) differ from *both* neighbours. So the
feature for line ``c`` is the line-to-line change ``d_c = line_c - line_{c-1}`` measured
against the changes just before and just after it:

    r_c = |d_c| / max(mean(|d_{c-1}|, |d_{c+1}|), noise floor)

computed separately for the line's shape (``d`` minus its median) and its offset (the
median of ``d``), using robust (median absolute) magnitudes. A one-sided CUSUM on
``log r_c`` (Page 1954: ``S = max(0, S + z - k)``, alarm at ``S > h``) raises the alarm.
The look-ahead is one line, so a change at line ``c`` is flagged when line ``c + 1``
arrives (delay 1 line); the reported ``line`` is ``c``, the first line of the new tip.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["TipChange", "TipWatch", "detect_changes"]

_KINDS = ("shape", "offset", "energy")


@dataclass(frozen=True)
class TipChange:
    """An alarm: the tip changed at ``line`` (first line scanned with the new tip)."""

    line: int
    flagged_at: int  # the line whose arrival raised the alarm
    score: float  # CUSUM statistic at the alarm
    kind: str  # "shape" | "offset" | "energy"


def _robust_mag(v: np.ndarray) -> float:
    """Root mean square of a line difference (a tip change may touch only the molecules,
    a small part of the line, so a median would miss it)."""
    return float(np.sqrt(np.mean(v * v))) if v.size else 0.0


@dataclass
class TipWatch:
    """Streaming detector: feed finished lines with :meth:`update`.

    Parameters
    ----------
    threshold:
        CUSUM alarm level ``h`` on the log-ratio feature (natural log).
    drift:
        CUSUM allowance ``k`` subtracted from each log-ratio.
    floor_factor:
        noise floor = ``floor_factor`` x the median shape change seen so far in the frame,
        so flat, noisy stretches do not make tiny denominators.
    holdoff:
        lines after an alarm during which no new alarm is raised.
    use_energy:
        also watch the line contrast (log RMS) for jumps; off by default: it adds
        detections but also false alarms on high-contrast (metal-tip) frames. Defaults
        tuned on simulated frames (``benchmarks/bench_tip.py``, seed 7; reported on seed 17).
    """

    threshold: float = 0.6
    drift: float = 0.2
    floor_factor: float = 0.5
    holdoff: int = 4
    use_energy: bool = False
    _lines: dict = field(default_factory=dict, repr=False)
    _shape: dict = field(default_factory=dict, repr=False)
    _offset: dict = field(default_factory=dict, repr=False)
    _energy: dict = field(default_factory=dict, repr=False)
    _ehistory: list = field(default_factory=list, repr=False)
    _history: list = field(default_factory=list, repr=False)
    _cusum: dict = field(default_factory=lambda: dict.fromkeys(_KINDS, 0.0), repr=False)
    _last_alarm: int = field(default=-(10**9), repr=False)
    _evaluated: set = field(default_factory=set, repr=False)
    changes: list = field(default_factory=list)

    def reset(self) -> None:
        """Forget everything (new frame)."""
        self._lines.clear()
        self._shape.clear()
        self._offset.clear()
        self._energy.clear()
        self._ehistory.clear()
        self._history.clear()
        self._evaluated.clear()
        self._cusum = dict.fromkeys(_KINDS, 0.0)
        self._last_alarm = -(10**9)
        self.changes = []

    def forget_from(self, line: int) -> None:
        """Drop lines ``>= line`` (a suspender rewind will re-send them)."""
        for d in (self._lines, self._shape, self._offset, self._energy):
            for k in [k for k in d if k >= line]:
                del d[k]
        self._evaluated = {c for c in self._evaluated if c < line - 1}
        self._cusum = dict.fromkeys(_KINDS, 0.0)
        self.changes = [c for c in self.changes if c.line < line]

    def update(self, line: np.ndarray, index: int) -> TipChange | None:
        """Add finished line ``index`` (1-D, NaN-free part used); return an alarm or None."""
        arr = np.asarray(line, dtype=np.float64).ravel()
        if arr.size < 4:
            raise ValueError(f"tipwatch: line {index} has {arr.size} pixels; need at least 4")
        if self._lines and index <= max(self._lines):  # re-sent after a rewind: keep the last
            self.forget_from(index)
        self._lines[index] = arr
        fin = arr[np.isfinite(arr)]
        # line contrast (log RMS about the median): a new tip images molecules brighter/dimmer
        self._energy[index] = float(np.log(_robust_mag(fin - np.median(fin)) + 1e-300)) if fin.size else 0.0
        prev = self._lines.get(index - 1)
        if prev is not None and prev.size == arr.size:
            d = arr - prev
            ok = np.isfinite(d)
            if ok.sum() >= 4:
                d = d[ok]
                med = float(np.median(d))
                self._shape[index] = _robust_mag(d - med)
                self._offset[index] = abs(med)
                self._history.append(self._shape[index])
                self._ehistory.append(abs(self._energy[index] - self._energy[index - 1]))
        self._lines.pop(index - 4, None)  # keep memory bounded
        # line index - 1 now has both neighbours' changes: evaluate it
        return self._evaluate(index - 1, flagged_at=index)

    def _evaluate(self, c: int, flagged_at: int) -> TipChange | None:
        if c in self._evaluated or not all(k in self._shape for k in (c - 1, c, c + 1)):
            return None
        self._evaluated.add(c)
        floor = self.floor_factor * float(np.median(self._history)) if self._history else 0.0
        floor = max(floor, 1e-30)
        z = {}
        for kind, feat, fl in (("shape", self._shape, floor), ("offset", self._offset, 2 * floor)):
            ref = max(0.5 * (feat[c - 1] + feat[c + 1]), fl)
            z[kind] = float(np.log(max(feat[c], 1e-30) / ref))
        alarm = None
        ed = {
            k: abs(self._energy[k] - self._energy[k - 1])
            for k in (c - 1, c, c + 1)
            if k in self._energy and k - 1 in self._energy
        }
        if len(ed) == 3 and self.use_energy:
            efloor = max(5.0 * float(np.median(self._ehistory)) if self._ehistory else 0.0, 0.5)
            z["energy"] = float(np.log(max(ed[c], 1e-12) / max(0.5 * (ed[c - 1] + ed[c + 1]), efloor)))
        else:
            z["energy"] = 0.0
        for kind in _KINDS:
            s = max(0.0, self._cusum[kind] + z[kind] - self.drift)
            self._cusum[kind] = s
            if s > self.threshold and alarm is None and c - self._last_alarm > self.holdoff:
                alarm = TipChange(line=c, flagged_at=flagged_at, score=s, kind=kind)
        if alarm is not None:
            self._last_alarm = c
            self._cusum = dict.fromkeys(_KINDS, 0.0)
            self.changes.append(alarm)
        return alarm


def detect_changes(image: np.ndarray, **kwargs) -> list[TipChange]:
    """Run :class:`TipWatch` over a whole (lines, pixels) image; rows of NaN are skipped."""
    img = np.asarray(image)
    if img.ndim != 2:
        raise ValueError(f"detect_changes: image must be 2-D (lines, pixels), got shape {img.shape}")
    watch = TipWatch(**kwargs)
    for i, row in enumerate(img):
        if np.isnan(row).all():
            continue
        watch.update(row, i)
    return list(watch.changes)
