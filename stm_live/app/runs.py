"""``stm-live runs list|show|export``: the runs in the journal (or in a tiled server) as a
table, one run's metadata, one run as a Nanonis .sxm file."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

from event_model import sanitize_doc
from rich.console import Console
from rich.table import Table

from stm_live.console import migrated_note
from stm_live.io.sxm import write_sxm
from stm_live.store import (
    JournalError,
    RunData,
    find_journal,
    find_tiled_run,
    journal_dir,
    migrate_old_layout,
    read_journal,
    run_data,
    run_from_tiled,
    scan_from_run,
)

__all__ = ["runs_list", "runs_show", "runs_export"]


def _tiled_client(tiled_uri: str, data_dir):
    """A client of the lab's tiled server, its runs in the BlueskyRun layout (migrated once)."""
    from tiled.client import from_uri  # noqa: PLC0415 - 0.3 s: only for runs read from tiled

    client = from_uri(tiled_uri)
    migrated = migrate_old_layout(client, data_dir)
    if migrated:
        Console().print(migrated_note(migrated))
    return client


def _load_run(run: str, data_dir, tiled_uri: str | None) -> tuple[RunData, str]:
    """One run's frame and where it was read: the journal, or tiled given its URI."""
    if tiled_uri:
        client = _tiled_client(tiled_uri, data_dir)
        uid = find_tiled_run(client, run)
        return run_from_tiled(client, uid), f"{tiled_uri.split('?')[0]} {uid}"
    path = find_journal(run, data_dir)
    return run_data(read_journal(path)), str(path)


def _summary_row(start: dict, stop: dict | None, lines_read) -> dict:
    meta = start.get("stm_live", {})
    return {
        "uid": start["uid"],
        "time": datetime.fromtimestamp(start["time"]).isoformat(timespec="seconds"),
        "plan": start.get("plan_name", ""),
        "size": f"{meta.get('pixels', '?')}x{meta.get('lines', '?')}",
        "lines_read": len(set(int(v) for v in lines_read)),
        "exit_status": stop["exit_status"] if stop else "incomplete",
    }


def _tiled_rows(client) -> list[dict]:
    rows = []
    for _uid, node in client.sort(("start.time", 1)).items():
        start, stop = node.metadata.get("start"), node.metadata.get("stop")
        if not start:
            continue
        key = (start.get("stm_live") or {}).get("line_key", "stm_line_index")
        lines = node["primary"][key].read() if "primary" in node and key in node["primary"] else []
        rows.append(_summary_row(start, stop, lines))
    return rows


def runs_list(*, data_dir: str | os.PathLike = "stm_live_data", tiled_uri: str | None = None) -> list[dict]:
    """Print and return a summary of every journaled run (oldest first); given ``tiled_uri``,
    of every run in that tiled server instead."""
    if tiled_uri:
        rows = _tiled_rows(_tiled_client(tiled_uri, data_dir))
        title = f"runs in tiled at {tiled_uri.split('?')[0]}"
    else:
        rows = []
        directory = journal_dir(data_dir)
        for path in sorted(directory.glob("*.journal"), key=lambda p: p.stat().st_mtime):
            try:
                data = run_data(read_journal(path))
            except JournalError as exc:
                rows.append({"uid": path.stem, "error": str(exc)})
                continue
            rows.append(_summary_row(data.start, data.stop, data.lines_read))
        title = f"runs in {directory}"
    table = Table(title=title)
    for column in ("uid", "time", "plan", "size", "lines_read", "exit_status"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            *(
                str(row.get(c, row.get("error", "")))
                for c in ("uid", "time", "plan", "size", "lines_read", "exit_status")
            )
        )
    Console().print(table)
    return rows


def runs_show(run: str, *, data_dir: str | os.PathLike = "stm_live_data", tiled_uri: str | None = None) -> RunData:
    """Print one run's start metadata, exit status and line coverage; return its data."""
    data, where = _load_run(run, data_dir, tiled_uri)
    console = Console()
    console.print(f"[bold]{data.uid}[/bold]  {where}")
    console.print(json.dumps(sanitize_doc(data.start.get("stm_live", {})), indent=1))
    meta = data.start.get("stm_live", {})
    console.print(
        f"exit_status: {data.exit_status}"
        + (f" ({data.stop.get('reason')})" if data.stop and data.stop.get("reason") else "")
    )
    console.print(f"lines read: {len(set(data.lines_read))}/{meta.get('lines', '?')} ({data.events} events)")
    return data


def runs_export(
    run: str, *, sxm: str | os.PathLike, data_dir: str | os.PathLike = "stm_live_data", tiled_uri: str | None = None
) -> Path:
    """Write one run (journaled, or in tiled given ``tiled_uri``) as a Nanonis .sxm file (via
    :mod:`stm_live.io.sxm`)."""
    data, _ = _load_run(run, data_dir, tiled_uri)
    out = write_sxm(Path(sxm), scan_from_run(data))
    Console().print(
        f"wrote {out} ({len(set(data.lines_read))}/{data.start['stm_live']['lines']} lines, {data.exit_status})"
    )
    return Path(out)
