"""Networks: STM-Net (orbital reconstruction) and the tip-state classifier.

Loaders are imported lazily so ``import stm_live.models`` does not pull torch.
"""


def load_stmnet(device: str | None = "auto", path=None, **options):
    """The shipped STM-Net checkpoint as a ``Reconstructor`` (see ``stmnet.py``)."""
    from stm_live.models.stmnet import load_stmnet as _load

    return _load(device=device, path=path, **options)


def load_tip_classifier(device: str | None = "auto", path=None, **options):
    """The shipped tip-state classifier with its domain model (see ``tipstate.py``)."""
    from stm_live.models.tipstate import load_tip_classifier as _load

    return _load(device=device, path=path, **options)


def check_device(device: str | None) -> str:
    """``device`` if this torch build can run on it, else ValueError in one line saying why.

    Accepts ``auto`` (CUDA when present), ``cpu``, ``cuda`` and ``cuda:N``.
    """
    name = "auto" if device is None else str(device).strip().lower()
    if name in ("auto", "cpu"):
        return name
    import torch  # only here: a CPU run should not pay for the import just to be checked

    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, no GPU visible"
            raise ValueError(f"--device {device}: torch {torch.__version__} is {build}; use --device cpu "
                             "(or auto), or install a CUDA build (make venv TORCH=torch)")
        index = int(name[5:]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return name
    raise ValueError(f"--device {device!r} is not a device stm-live runs on; choose auto, cpu, cuda or cuda:N")
