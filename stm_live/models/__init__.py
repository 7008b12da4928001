"""Networks: STM-Net (orbital reconstruction) and the tip-state classifier.

Loaders are imported lazily so ``import stm_live.models`` does not pull torch.
"""


def load_stmnet(device: str | None = "auto", path=None, **options):
    """The shipped STM-Net checkpoint as a ``Reconstructor`` (see ``stmnet.py``)."""
    from stm_live.models.stmnet import load_stmnet as _load

    return _load(device=device, path=path, **options)


def load_tip_classifier(device: str | None = "auto", path=None):
    """The shipped tip-state classifier (see ``tipstate.py``)."""
    from stm_live.models.tipstate import load_tip_classifier as _load

    return _load(device=device, path=path)
