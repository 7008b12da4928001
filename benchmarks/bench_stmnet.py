"""STM-Net quality (PSNR/SSIM vs identity and the classical baseline, noise curve) and
inference latency at 128^2, 256^2, 512^2, each for 1, 2 (the default) and 4 symmetry views
(CPU; CUDA too when present).

Run: ``python -m benchmarks stmnet`` or ``stm-live bench --only stmnet``.
Set ``STM_LIVE_BENCH_SAMPLES`` (frames per cell, default 4) for a longer run.
"""

from __future__ import annotations

import os
import time

import torch


def main() -> None:
    from stm_live.console import table_console
    from stm_live.models.metrics import format_latency, format_quality, latency_by_views, quality_tables
    from stm_live.models.stmnet import SYMMETRY_VIEWS, load_stmnet

    threads = int(os.environ.get("STM_LIVE_BENCH_THREADS", "2"))
    torch.set_num_threads(threads)
    samples = int(os.environ.get("STM_LIVE_BENCH_SAMPLES", "4"))
    rec = load_stmnet(device="cpu")
    console = table_console()
    print(
        f"checkpoint: {rec.info.get('steps')} steps, training pixel size {rec.pixel_size_nm} nm; "
        f"{samples} frames per cell, 96x96 px; torch threads {threads}"
    )
    for views in sorted(SYMMETRY_VIEWS):
        t = time.perf_counter()
        print(f"\n== output averaged over {views} symmetry view(s){' (default)' if views == rec.views else ''} ==")
        for table in format_quality(quality_tables(rec.with_views(views), samples=samples, seed=1234), show_rows=False):
            console.print(table)
        print(f"(quality: {time.perf_counter() - t:.1f} s)")
    console.print(format_latency(latency_by_views(rec)))
    if torch.cuda.is_available():
        console.print(format_latency(latency_by_views(load_stmnet(device="cuda"))))


if __name__ == "__main__":
    main()
