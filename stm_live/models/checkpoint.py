"""Checkpoints of both networks (STM-Net and the tip classifier): the device they run on,
their SHA-256 beside them, the verified weights-only load, the save, and the command line a
model card records.

One convention for both:

- The hash of a file ``<name>`` sits beside it in ``<name>.sha256`` (``sha256sum`` format):
  ``stmnet.pt.sha256``, ``tipstate.pt.sha256``, ``tipdomain.npz.sha256``. A hash file under
  STM-Net's earlier name (the suffix replaced: ``stmnet.sha256``) is still found, with a
  one-line warning to rename it.
- A checkpoint is a dict ``{"state_dict": weights, "config": dict, **metadata}`` read with
  ``torch.load(weights_only=True)``. That is STM-Net's layout, kept for new checkpoints of
  both networks: the config stays a typed dict inside the file (no JSON string to decode),
  and ``state_dict`` is torch's own name for what it holds. The tip classifier's earlier
  layout (``{"model": weights, "config": JSON}``) still loads, so shipped files keep their
  bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = [
    "WEIGHTS_DIR",
    "card_command",
    "hash_path",
    "load_checkpoint",
    "resolve_device",
    "save_checkpoint",
    "sha256_of",
    "verify",
    "write_hash",
]

logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).parent / "weights"  # the shipped checkpoints and their model cards

_renames_told: set[Path] = set()  # old-named hash files already warned about (once per process)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` (or None): CUDA when present, else the CPU; any other name as torch reads it."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def sha256_of(path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_path(path) -> Path:
    """Where the SHA-256 of ``path`` lives: ``<name>.sha256`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def write_hash(path) -> str:
    """Write the hash file of ``path``; returns the digest."""
    digest = sha256_of(path)
    hash_path(path).write_text(f"{digest}  {Path(path).name}\n")
    return digest


def _find_hash(path: Path, what: str) -> Path | None:
    """The hash file of ``path``, under its name or STM-Net's earlier one; None if neither."""
    new = hash_path(path)
    if new.is_file():
        return new
    old = path.with_suffix(".sha256")
    if old == new or not old.is_file():
        return None
    if old.resolve() not in _renames_told:
        _renames_told.add(old.resolve())
        logger.warning("%s %s: its hash file has the old name %s; rename it to %s", what, path, old.name, new.name)
    return old


def verify(path, *, what: str, fix: str) -> str:
    """The SHA-256 of ``path`` once it matches the hash file beside it. ``what`` names the file
    in the one-line errors and ``fix`` says what to do: FileNotFoundError when the file is
    missing, ValueError when its hash file is missing or does not match."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found at {path}; {fix}")
    found = _find_hash(path, what)
    if found is None:
        raise ValueError(f"{what} {path.name}: hash file missing ({hash_path(path)}), cannot verify it; {fix}")
    words = found.read_text().split()
    expected = words[0].lower() if words else ""
    actual = sha256_of(path)
    if actual != expected:
        raise ValueError(
            f"{what} {path} is corrupt or modified: sha256 {actual[:16]}... does not match "
            f"{found.name} ({expected[:16] or 'empty'}...); {fix}"
        )
    return actual


def load_checkpoint(
    path, build: Callable[[dict, dict], torch.nn.Module], *, what: str, fix: str
) -> tuple[torch.nn.Module, dict]:
    """``build(weights, config)`` from the checkpoint at ``path`` (verified by :func:`verify`,
    then read with ``torch.load(weights_only=True)``, either layout), and its metadata: every
    other key, ``config`` as a dict and ``sha256``. A file that does not load, or does not
    build, is a ValueError in one line naming it and ``fix``."""
    digest = verify(path, what=what, fix=fix)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        config = state["config"]
        if isinstance(config, str):  # the tip classifier's earlier layout
            config = json.loads(config)
        net = build(state["state_dict"] if "state_dict" in state else state["model"], config)
    except Exception as exc:  # unreadable despite a matching hash, or another network's
        why = " ".join(str(exc).split())  # torch's own messages run over several lines
        raise ValueError(f"{what} {path} could not be loaded ({why}); {fix}") from exc
    info = {k: v for k, v in state.items() if k not in ("state_dict", "model")}
    return net, {**info, "config": config, "sha256": digest}


def save_checkpoint(path, net: torch.nn.Module, config: dict, **metadata) -> str:
    """Write ``{"state_dict", "config", **metadata}`` of ``net`` (weights on the CPU) to
    ``path``, through a temporary file so no reader meets half a checkpoint, then its hash
    file; returns the SHA-256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}, "config": config, **metadata}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return write_hash(path)


def card_command() -> str:
    """The training command as a model card records it: this process's command line, without
    ``--out`` (a candidate path is machine-specific: the card names the default location)."""
    argv = sys.argv[:]
    if not argv:
        return "?"
    if argv[0].endswith("stm-live") or argv[0].endswith("cli.py"):
        argv[0] = "stm-live"
    if "--out" in argv[:-1]:
        i = argv.index("--out")
        del argv[i : i + 2]
    return " ".join(shlex.quote(a) for a in ([os.path.basename(argv[0])] + argv[1:]))
