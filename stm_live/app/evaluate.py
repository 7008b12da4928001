"""``stm-live evaluate``: a shipped network on held-out simulated data; prints a table.

``stmnet``: STM-Net per molecule, orbital and tip (:func:`stm_live.models.training.evaluate_main`),
or on the orbitals of cube files (e.g. from DFT); ``tipstate``: the tip classifier
(:func:`stm_live.models.tiptrain.evaluate_main`).
"""

from __future__ import annotations

from pathlib import Path

from stm_live.app import given
from stm_live.console import table_console
from stm_live.models import check_device, metrics, tiptrain, training

__all__ = ["main"]


def main(
    *,
    model: str = "stmnet",
    device: str = "auto",
    samples: int | None = None,
    seed: int = 1234,
    cube: list[Path] | None = None,
    cube_mo: int = 0,
    vacuum_from: float | None = None,
) -> None:
    """Evaluate ``model`` with the options of ``stm-live evaluate`` (``samples`` None: the
    model's own default). Raises ValueError for an option the model does not take."""
    if model == "stmnet":
        evaluate_main = training.evaluate_main
    elif model == "tipstate":
        evaluate_main = tiptrain.evaluate_main
    else:
        raise ValueError(f"unknown model {model!r}; choose stmnet or tipstate")
    if cube and model != "stmnet":
        raise ValueError("--cube evaluates STM-Net only (--model stmnet)")
    if not cube and (vacuum_from is not None or cube_mo):
        raise ValueError("--vacuum-from and --cube-mo apply to cube files: give --cube FILE")
    cubes = {"cubes": cube, "cube_mo": cube_mo, "vacuum_from_nm": vacuum_from} if cube else {}
    result = evaluate_main(device=check_device(device), seed=seed, **given(samples=samples), **cubes)
    if model == "tipstate":
        print(tiptrain.format_report(result))
        return
    console = table_console()
    for table in metrics.format_quality(result):
        console.print(table)
    if "latency" in result:
        console.print(metrics.format_latency(result["latency"]))
