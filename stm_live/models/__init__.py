"""Networks: STM-Net (orbital reconstruction) and the tip-state classifier.

Loaders are imported lazily so ``import stm_live.models`` does not pull torch: the CLI
imports this package at start (``check_device``) for every command.
"""

from __future__ import annotations

import contextlib
import logging
import sys

# The loggers whose INFO records are a training or fitting command's progress lines.
PROGRESS_LOGGERS = (
    "stm_live.models.training",
    "stm_live.models.tiptrain",
    "stm_live.models.tipdata",
    "stm_live.models.tipdomain",
)


class _Stdout(logging.StreamHandler):
    """A stream handler on whatever ``sys.stdout`` is when a record comes (a test runner's
    capture, or rich's live progress display, which prints such lines above its bar)."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):  # StreamHandler sets it; the property always follows sys.stdout
        pass


@contextlib.contextmanager
def console_progress():
    """While inside, the progress lines of training and fitting (INFO records of
    :data:`PROGRESS_LOGGERS`) go to standard output, the message alone, as the commands show
    them. The loggers' levels and handlers are as before afterwards."""
    handler = _Stdout()
    handler.setFormatter(logging.Formatter("%(message)s"))
    loggers = [logging.getLogger(name) for name in PROGRESS_LOGGERS]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.INFO)
        log.addHandler(handler)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels):
            log.removeHandler(handler)
            log.setLevel(level)


def load_stmnet(device: str | None = "auto", path=None, **options):
    """The shipped STM-Net checkpoint as a ``Reconstructor`` (see ``stmnet.py``)."""
    from stm_live.models.stmnet import load_stmnet as _load  # noqa: PLC0415 - torch: see the module docstring

    return _load(device=device, path=path, **options)


def load_tip_classifier(device: str | None = "auto", path=None, **options):
    """The shipped tip-state classifier with its domain model (see ``tipstate.py``)."""
    from stm_live.models.tipstate import load_tip_classifier as _load  # noqa: PLC0415 - torch: see the module docstring

    return _load(device=device, path=path, **options)


def check_device(device: str | None) -> str:
    """``device`` if this torch build can run on it, else ValueError in one line saying why.

    Accepts ``auto`` (CUDA when present), ``cpu``, ``cuda`` and ``cuda:N``.
    """
    name = "auto" if device is None else str(device).strip().lower()
    if name in ("auto", "cpu"):
        return name
    import torch  # noqa: PLC0415 - only here: a CPU run should not pay for the import just to be checked

    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, no GPU visible"
            raise ValueError(
                f"--device {device}: torch {torch.__version__} is {build}; use --device cpu "
                "(or auto), or install a CUDA build (make venv TORCH=torch)"
            )
        index = int(name[5:]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return name
    raise ValueError(f"--device {device!r} is not a device stm-live runs on; choose auto, cpu, cuda or cuda:N")
