"""``stm-live train``: train a network on the physics simulator; writes checkpoint and model card.

Models: ``stmnet`` (:mod:`stm_live.models.training`), ``wide`` (STM-Net twice as wide, for a
GPU), ``tipstate`` (the tip classifier, :mod:`stm_live.models.tiptrain`) and ``tipdomain``
(the tip classifier's domain statistics, :mod:`stm_live.models.tipdomain`). Options a model
does not take are refused, naming the ones that apply.
"""

from __future__ import annotations

from pathlib import Path

from stm_live.app import given
from stm_live.models import (  # a test patches a module's trainer: looked up at call time
    check_device,
    console_progress,
    stmnet,
    tipdomain,
    tiptrain,
    training,
)

__all__ = ["main"]


def main(
    *,
    model: str = "stmnet",
    steps: int | None = 4000,
    steps_given: bool = True,
    out: Path | None = None,
    device: str = "auto",
    seed: int | None = None,
    resume: bool = False,
    lr: float | None = None,
    threads: int | None = None,
    init: Path | None = None,
    bank_size: int | None = None,
    weights: Path | None = None,
    minutes: float | None = None,
    workers: int | None = None,
    broad_recipe: bool = False,
) -> None:
    """Train ``model`` with the options of ``stm-live train`` (None: the model's own default).

    ``steps_given``: whether ``steps`` was set by the user; with ``minutes`` an unset
    ``steps`` does not cap the run. Raises ValueError for an option the model does not take.
    """
    if broad_recipe and model != "tipstate":
        raise ValueError("--broad-recipe applies to --model tipstate only")
    if weights is not None and model != "tipdomain":
        raise ValueError("--weights applies to --model tipdomain only")
    if (minutes is not None or workers is not None) and model not in ("stmnet", "wide"):
        raise ValueError("--minutes and --workers apply to --model stmnet and wide only")
    model_options = {}
    if model in ("stmnet", "wide"):
        train_main = training.train_main
        if bank_size is not None:  # STM-Net draws every pair fresh: there is no bank
            raise ValueError("--bank-size applies to --model tipstate only")
        if minutes is not None:  # by time: --steps caps the run only where it was given
            model_options["minutes"] = minutes
            if not steps_given:
                steps = None
        if model == "wide":
            model_options["config"] = stmnet.WIDE_CONFIG
            out = out or stmnet.WIDE_CHECKPOINT
        model_options.update(given(workers=workers))
    elif model == "tipstate":
        train_main = tiptrain.train_main
        model_options = {"broad_recipe": True} if broad_recipe else {}
    elif model == "tipdomain":  # statistics of the shipped classifier's features: no steps
        if lr is not None or init is not None or bank_size is not None or resume:
            raise ValueError("--model tipdomain takes --weights, --out, --seed, --device and --threads only")
        with console_progress():
            tipdomain.fit_domain_main(
                weights=weights, out=out, device=check_device(device), **given(seed=seed, threads=threads)
            )
        return
    else:
        raise ValueError(f"unknown model {model!r}; choose stmnet, wide, tipstate or tipdomain")
    with console_progress():
        train_main(
            steps=steps,
            out=out,
            device=check_device(device),
            resume=resume,
            **model_options,
            **given(seed=seed, lr=lr, threads=threads, init=init, bank_size=bank_size),
        )
