"""The journal's notification queue: job events and their deliveries to the notification plugins.

An event is inserted in the transaction of the transition it announces (``events=`` of
:meth:`batchd.journal.Journal.update_job`, :meth:`~batchd.journal.Journal.update_chunk` and
:meth:`~batchd.journal.Journal.resubmit_chunk`, or :meth:`NotificationQueue.add_events`), with one
``deliveries`` row per plugin that wants it: a transition and its announcement commit together or
not at all. A delivery row goes pending → sent, or failed once given up; :mod:`batchd.events` hands
the pending ones to the plugins and records what became of them here.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Callable, Collection, Iterable

from batchd import fs
from batchd.logs import redacted_json
from batchd.journal.transactions import Transactions


class NotificationQueue(Transactions):
    """The ``events`` and ``deliveries`` tables (see the module doc)."""

    def __init__(self, path: Path, *, readonly: bool = False,
                 while_locked: Callable[[float], None] = lambda seconds: None,
                 sync_group: fs.SyncGroup | None = None):
        super().__init__(path, readonly=readonly, while_locked=while_locked, sync_group=sync_group)
        #: The plugins an event is to be delivered to (one delivery row each); set by the dispatcher.
        self.event_targets: Callable[[dict], Iterable[str]] = lambda event: ()
        #: Delivery rows added by this process so far (lets the dispatcher skip its queries when none
        #: are new: events no plugin wants add none).
        self.deliveries_added = 0

    def _add_events(self, db: sqlite3.Connection, events: Iterable[dict]) -> None:
        """Insert ``events`` in the open transaction ``db`` (the transition's own), each with a pending
        delivery row per plugin :attr:`event_targets` names. None stands for no event (a pack's: see
        ``Context.event``)."""
        now = time.time()
        for event in events:
            if event is None:
                continue
            inserted = db.execute(
                "INSERT OR IGNORE INTO events (id, job_id, kind, body, created_at) VALUES (?, ?, ?, ?, ?)",
                (event["id"], event["job_id"], event["kind"], redacted_json(event), now),
            ).rowcount
            if not inserted:
                continue  # the same transition again after a crash: the event exists already
            targets = list(self.event_targets(event))
            if targets:
                self.deliveries_added += len(targets)
                db.executemany(
                    "INSERT OR IGNORE INTO deliveries (event_id, plugin, state, next_at) VALUES (?, ?, 'pending', ?)",
                    [(event["id"], plugin, now) for plugin in targets],
                )

    def add_events(self, events: Iterable[dict]) -> None:
        with self.transaction() as db:
            self._add_events(db, events)

    def event_count(self, job_id: str, kind: str) -> int:
        return self._db.execute("SELECT count(*) FROM events WHERE job_id = ? AND kind = ?",
                                (job_id, kind)).fetchone()[0]

    def last_event(self, job_id: str, kind: str) -> tuple[dict, float] | None:
        """The job's latest event of this kind and when it was committed (``time.time()``), if any."""
        row = self._db.execute("SELECT body, created_at FROM events WHERE job_id = ? AND kind = ?"
                               " ORDER BY seq DESC LIMIT 1", (job_id, kind)).fetchone()
        return (json.loads(row["body"]), row["created_at"]) if row else None

    def events(self, job_id: str | None = None) -> list[dict]:
        """Events in the order they were committed, each with its deliveries by plugin."""
        query, args = "SELECT * FROM events", ()
        if job_id is not None:
            query, args = query + " WHERE job_id = ?", (job_id,)
        found = []
        for row in self._db.execute(query + " ORDER BY seq", args).fetchall():
            deliveries = {d["plugin"]: dict(d) for d in self._db.execute(
                "SELECT * FROM deliveries WHERE event_id = ?", (row["id"],))}
            found.append({"event": json.loads(row["body"]), "deliveries": deliveries})
        return found

    def due_deliveries(self, now: float, *, plugins: Iterable[str], limit: int = 1,
                       excluding: Collection[str] = ()) -> list[tuple[str, dict, int]]:
        """``(plugin, event, attempts)`` of the oldest ``limit`` pending deliveries due by ``now`` of
        each plugin, oldest event first: a bounded page, however many are pending.

        ``excluding``: event ids to leave out (those handed to a plugin and not yet recorded).
        """
        due = []
        for plugin in plugins:
            # The planner would rather range over deliveries_pending (every plugin's due rows) and sort them.
            rows = self._db.execute(
                "SELECT d.attempts, e.body FROM deliveries d INDEXED BY deliveries_pending_by_plugin"
                " JOIN events e ON e.id = d.event_id WHERE d.plugin = ? AND d.state = 'pending' AND d.next_at <= ?"
                f" AND d.event_id NOT IN ({', '.join('?' * len(excluding))}) ORDER BY d.rowid LIMIT ?",
                (plugin, now, *excluding, limit),
            )
            due.extend((plugin, json.loads(row["body"]), row["attempts"]) for row in rows)
        return due

    def next_delivery_at(self, *, plugins: Iterable[str]) -> float | None:
        """When the earliest pending delivery to these plugins is due (None: none pending).

        One aggregate over the pending index: it runs on every pump while a notifier keeps failing,
        when the pending rows can be many.
        """
        plugins = tuple(plugins)
        if not plugins:
            return None
        row = self._db.execute(
            f"SELECT MIN(next_at) FROM deliveries WHERE state = 'pending'"
            f" AND plugin IN ({', '.join('?' * len(plugins))})", plugins).fetchone()
        return row[0]

    def retry_pending_now(self, now: float) -> int:
        """Make every pending delivery due at ``now``; returns how many were waiting out a backoff."""
        with self.transaction() as db:
            return db.execute("UPDATE deliveries SET next_at = ? WHERE state = 'pending' AND next_at > ?",
                              (now, now)).rowcount

    def delivery_attempts(self, event_id: str, plugin: str) -> int:
        row = self._db.execute("SELECT attempts FROM deliveries WHERE event_id = ? AND plugin = ?",
                               (event_id, plugin)).fetchone()
        return row[0] if row else 0

    def prune_events(self, before: float) -> int:
        """Forget events older than ``before`` that no plugin is still waiting for; returns how many."""
        pending = "SELECT event_id FROM deliveries WHERE state = 'pending'"
        with self.transaction() as db:
            db.execute(f"DELETE FROM deliveries WHERE event_id IN (SELECT id FROM events WHERE created_at < ?"
                       f" AND id NOT IN ({pending}))", (before,))
            return db.execute(f"DELETE FROM events WHERE created_at < ? AND id NOT IN ({pending})",
                              (before,)).rowcount

    def delivery_sent(self, event_id: str, plugin: str) -> None:
        self.record_deliveries(sent=[(event_id, plugin)])

    def delivery_failed(self, event_id: str, plugin: str, error: str, *, retry_at: float | None) -> None:
        """Record a failed attempt: retried from ``retry_at``, or given up for good when it is None."""
        self.record_deliveries(failed=[(event_id, plugin, error, retry_at)])

    def record_deliveries(self, *, sent: Iterable[tuple[str, str]] = (),
                          failed: Iterable[tuple[str, str, str, float | None]] = ()) -> None:
        """Record delivery attempts in one transaction: ``sent`` as ``(event id, plugin)``, ``failed`` as
        ``(event id, plugin, error, retry_at)`` (see :meth:`delivery_failed`)."""
        now = time.time()
        with self.transaction() as db:
            db.executemany(
                "UPDATE deliveries SET state = 'sent', attempts = attempts + 1, sent_at = ?, last_error = NULL"
                " WHERE event_id = ? AND plugin = ?", [(now, event_id, plugin) for event_id, plugin in sent])
            db.executemany(
                "UPDATE deliveries SET attempts = attempts + 1, last_error = ?, state = ?, next_at = ?"
                " WHERE event_id = ? AND plugin = ?",
                [(error, "failed" if retry_at is None else "pending", retry_at or now, event_id, plugin)
                 for event_id, plugin, error, retry_at in failed])
