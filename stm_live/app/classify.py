"""``stm-live classify FILE``: the tip verdict of one recorded frame.

The frame is read through :mod:`stm_live.interpret` (channel, sign, levelling, pitch), as
``reconstruct``, replay and the live monitor read frames. A frame outside the classifier's
scope (far coarser or larger than it takes) is "unknown" without running the network; one
inside the scope but outside what the classifier knows (its domain score above threshold,
:mod:`stm_live.models.tipdomain`) is "unknown" too, with the probabilities shown for the
record. A bad verdict farther from its class's frames than the class's action limit is
"held back": no policy acts on it. Prints one line, or with ``--json`` one JSON object.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.console import Console

from stm_live.interpret import classifier_scope, from_scan
from stm_live.io.sxm import read_sxm

__all__ = ["classify_main", "classify_file"]

JSON_KEYS = ("label", "good", "probabilities", "s_fraction", "in_domain", "domain_score", "held_back", "reason")


def classify_file(path, *, channel: str | None = None, device: str = "auto", classifier=None) -> tuple[dict, object]:
    """``(result, NetworkInput)`` for one .sxm: ``result`` has :data:`JSON_KEYS`.

    ``classifier``: a loaded tip classifier (default: the shipped one, loaded only when the
    frame is in scope). Errors in the file raise ValueError naming it."""
    from stm_live.models.tipstate import UNKNOWN  # noqa: PLC0415 - torch: a frame out of scope is answered without it

    path = Path(path)
    if path.suffix.lower() != ".sxm":
        raise ValueError(f"{path.name}: classify takes a Nanonis .sxm scan")
    scan = read_sxm(path)
    net_in = from_scan(scan, channel, name=path.name)
    scope = classifier_scope(net_in.image.shape, net_in.pixel_size_nm, net_in.line_spacing_nm)
    if not scope.ok:  # the network never sees it: nothing to trust, nothing to compute
        return {
            "label": UNKNOWN,
            "good": False,
            "probabilities": None,
            "s_fraction": None,
            "in_domain": False,
            "domain_score": None,
            "held_back": False,
            "reason": scope.reason,
        }, net_in
    if classifier is None:
        from stm_live.models.tipstate import load_tip_classifier  # noqa: PLC0415 - torch: only for a frame in scope

        classifier = load_tip_classifier(device)
    try:
        v = classifier.classify(net_in.image, net_in.pixel_size_nm, line_spacing_nm=net_in.line_spacing_nm)
    except ValueError as exc:  # e.g. fewer than 3 scanned lines
        raise ValueError(f"{path.name}: {exc}") from None
    score = None if math.isnan(v.domain_score) else round(float(v.domain_score), 3)
    if v.held_back:
        reason = (
            f"held back, no policy acts on it: inside the classifier's domain (score {v.domain_score:.0f} <= "
            f"{v.domain_threshold:.0f}) but far from its {v.label} frames (class score {v.class_score:.0f} > "
            f"action limit {v.action_limit:.0f})"
        )
    elif v.in_domain:
        reason = (
            ""
            if score is None
            else (f"inside the classifier's domain (score {v.domain_score:.0f} <= threshold {v.domain_threshold:.0f})")
        )
    else:
        reason = (
            f"outside what the classifier knows (domain score {v.domain_score:.0f} > threshold "
            f"{v.domain_threshold:.0f}): its probabilities are not to be trusted"
        )
    return {
        "label": v.label,
        "good": bool(v.good),
        "probabilities": {k: round(float(p), 6) for k, p in v.probabilities.items()},
        "s_fraction": round(float(v.s_fraction), 6),
        "in_domain": bool(v.in_domain),
        "domain_score": score,
        "held_back": bool(v.held_back),
        "reason": reason,
    }, net_in


def classify_main(
    path, *, channel: str | None = None, as_json: bool = False, device: str = "auto", console=None
) -> dict:
    """`stm-live classify FILE [--channel NAME] [--json]`: print the verdict; return it."""
    result, net_in = classify_file(path, channel=channel, device=device)
    if as_json:
        text = json.dumps(result)
    else:
        name = Path(path).name
        if result["probabilities"] is None:
            text = f"{name}: unknown — {result['reason']} [{net_in.describe()}]"
        else:
            probs = result["probabilities"]
            nearest = max(probs, key=probs.get)
            head = (
                f"{result['label']} ({'good' if result['good'] else 'bad'} tip, p = {probs[nearest]:.2f}, "
                f"s share {result['s_fraction']:.2f})"
                if result["in_domain"]
                else f"unknown (nearest {nearest}, p = {probs[nearest]:.2f})"
            )
            tail = f"; {result['reason']}" if result["reason"] else ""
            text = f"{name}: {head}{tail} [{net_in.describe()}]"
    if console is None:
        console = Console()
    console.print(text, markup=False, highlight=False, soft_wrap=True)
    return result
