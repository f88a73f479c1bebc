"""What ``batchd status`` shows: a table of jobs with progress bars, once or refreshed (``--watch``).

A job row is the dict ``batchd status --json`` prints (see :func:`job_view`). Progress counts
requests: a finished chunk counts all of its requests, a running one what its remote ``batchStats``
say is done. Cost is the row's ``cost`` (``{estimate, actual, standard, saving, currency}``, as in
summary.json): the actual cost, else the estimate marked ``~``, and beside it what the batch price
saves against the interactive one; the columns only appear if some job has a cost. Held jobs get a
line under the table saying why and how to release them.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Group
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

_STATE_STYLE = {"succeeded": "green", "partial": "yellow", "plugin_failed": "red", "failed": "red", "rejected": "red",
                "cancelled": "magenta", "submitted": "cyan", "held": "yellow"}


def console():
    """A console for tables: the terminal's width, or wide enough not to wrap ids in a pipe or a log."""
    from rich.console import Console

    interactive = Console()
    return interactive if interactive.is_terminal else Console(width=200)


def job_state(job: dict) -> str:
    state = job["outcome"] if job["state"] == "done" and job.get("outcome") else job["state"]
    if job.get("cancel_requested") and job["state"] != "done":
        state += " (cancelling)"
    return state


def job_cost(job: dict) -> str | None:
    """The job's cost as shown, if batchd knows one: its actual cost, else its estimate marked ``~``."""
    cost = job.get("cost")
    if not isinstance(cost, dict):
        return None
    currency = cost.get("currency") or "USD"
    if _is_number(cost.get("actual")):
        return _money(float(cost["actual"]), currency)
    if _is_number(cost.get("estimate")):
        return "~" + _money(float(cost["estimate"]), currency)
    return None


def job_saving(job: dict) -> str | None:
    """What the batch price saves against the interactive one (``~`` while it is the estimate's)."""
    cost = job.get("cost")
    if not isinstance(cost, dict) or not _is_number(cost.get("saving")):
        return None
    saving = _money(float(cost["saving"]), cost.get("currency") or "USD")
    return saving if _is_number(cost.get("actual")) else "~" + saving


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _money(amount: float, currency: str = "USD") -> str:
    return f"${amount:.4f}" if currency == "USD" else f"{amount:.4f} {currency}"


def age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def jobs_table(jobs: list[dict], *, now: float | None = None):
    """The jobs as a rich renderable: one row each, with a progress bar and done/total requests."""
    if not jobs:
        return Text("no jobs")
    now = time.time() if now is None else now
    costs = [job_cost(job) for job in jobs]
    table = Table(show_edge=False)
    for column in ("job", "manifest", "task", "state", "progress", "done/total"):
        table.add_column(column, justify="right" if column == "done/total" else "left")
    priced = any(cost is not None for cost in costs)
    if priced:
        table.add_column("cost", justify="right")
        table.add_column("saved", justify="right")
    table.add_column("age", justify="right")
    for job, cost in zip(jobs, costs):
        state = job_state(job)
        total = job["requests"]
        bar = ProgressBar(total=max(total, 1), completed=min(job["done"], total) if total else 0, width=16,
                          complete_style="green" if job["state"] == "done" else "cyan")
        row = [job["id"], job["manifest"], job["task"] or "-", Text(state, style=_STATE_STYLE.get(state, "")),
               bar if total else Text("-"), f"{job['done']}/{total}" if total else "-"]
        if priced:
            row.extend((cost or "-", job_saving(job) or "-"))
        row.append(age(now - job["created_at"]))
        table.add_row(*row)
    held = [Text(f"{job['id']} ({job['manifest']}) is held: {job['hold']}; "
                 f"release it with `batchd approve {job['name']}`", style="yellow")
            for job in jobs if job.get("hold")]
    return Group(table, *held) if held else table


def status_frame(jobs: list[dict], *, title: str | None = None):
    """A ``--watch`` frame: a title line (what and when) above the table."""
    header = Text(title or time.strftime("batchd status  %H:%M:%S"), style="bold")
    return Group(header, jobs_table(jobs))


def job_view(journal, job) -> dict:
    """A job as ``batchd status --json`` and the dashboard show it."""
    from batchd.costs import summary_cost

    chunks = journal.chunks(job.id)
    total = sum(c.request_count for c in chunks)
    done = 0
    for c in chunks:
        if c.state in ("fetched", "skipped"):
            done += c.request_count
        else:
            done += int(c.stats.get("successfulRequestCount", 0)) + int(c.stats.get("failedRequestCount", 0))
    return {
        "id": job.id,
        "name": job.name,
        "manifest": job.source,
        "task": job.task,
        "model": job.model,
        "state": job.state,
        "outcome": job.outcome,
        "requests": total,
        "done": done,
        "cancel_requested": job.cancel_requested,
        "hold": job.hold if job.state == "held" else None,
        "approved": job.approved,
        "cost": summary_cost(job.cost),
        "outbox": job.outbox_dir,
        "error": job.error,
        "retry_of": job.retry_of,
        "created_at": job.created_at,
        "remote_batches": [
            {"chunk": c.idx, "name": c.remote_name, "state": c.remote_state or c.state,
             "requests": c.request_count, "mode": c.mode}
            for c in chunks
        ],
    }
