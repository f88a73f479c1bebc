"""What the journal knows of the service's side: every remote job seen for a chunk (adopted, a duplicate
the stray watch found, an expired one), the display names watched for strays, the remote batches of
delivered work waiting for their deletion, and the webhook deliveries taken (by id, so a duplicate is
known). The loop's thread writes these rows, as every other (batchd/journal/__init__.py)."""

from __future__ import annotations

import time
from typing import Iterable

from batchd.journal.notifications import NotificationQueue
from batchd.journal.rows import Chunk


class RemoteRecords(NotificationQueue):
    """The ``remote_jobs``, ``watched_names``, ``batches_to_delete`` and ``webhook_deliveries`` tables."""

    # -- remote jobs and strays -------------------------------------------------------------

    def record_remote_job(self, remote_name: str, chunk: Chunk, role: str) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO remote_jobs (remote_name, job_id, chunk_idx, display_name, role)"
                " VALUES (?, ?, ?, ?, ?)",
                (remote_name, chunk.job_id, chunk.idx, chunk.display_name, role),
            )

    def record_stray(self, remote_name: str, *, job_id: str, chunk_idx: int, display_name: str,
                     outcome: str) -> None:
        """A duplicate the stray watch found (``outcome``: cancelling or finished), recorded before any cancel."""
        with self.transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO remote_jobs (remote_name, job_id, chunk_idx, display_name, role, outcome)"
                " VALUES (?, ?, ?, ?, 'duplicate', ?)", (remote_name, job_id, chunk_idx, display_name, outcome))

    def set_remote_outcome(self, remote_name: str, outcome: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE remote_jobs SET outcome = ? WHERE remote_name = ?", (outcome, remote_name))

    def remote_job(self, remote_name: str) -> dict | None:
        row = self._db.execute("SELECT * FROM remote_jobs WHERE remote_name = ?", (remote_name,)).fetchone()
        return dict(row) if row else None

    def remote_jobs(self, job_id: str) -> list[dict]:
        rows = self._db.execute(
            "SELECT * FROM remote_jobs WHERE job_id = ? ORDER BY chunk_idx, remote_name", (job_id,)
        )
        return [dict(row) for row in rows]

    def count_remote_jobs_with_outcome(self, outcome: str) -> int:
        return self._cached(("count_remote_jobs_with_outcome", outcome), lambda: self._db.execute(
            "SELECT count(*) FROM remote_jobs WHERE outcome = ?", (outcome,)).fetchone()[0])

    def remote_jobs_with_outcome(self, outcome: str) -> list[dict]:
        rows = self._db.execute("SELECT * FROM remote_jobs WHERE outcome = ? ORDER BY remote_name", (outcome,))
        return [dict(row) for row in rows]

    def add_batches_to_delete(self, names: Iterable[str]) -> None:
        """Remote batches whose work is delivered, to delete: committed with the transition that delivered
        it, so a restart still deletes them (batchd/daemon/uploads.py)."""
        now = time.time()
        with self.transaction() as db:
            db.executemany("INSERT OR IGNORE INTO batches_to_delete (remote_name, since) VALUES (?, ?)",
                           [(name, now) for name in names])

    def forget_batches_to_delete(self, names: Iterable[str]) -> None:
        """Deleted (or refused for good, or left listed past the bound): no longer waiting."""
        with self.transaction() as db:
            db.executemany("DELETE FROM batches_to_delete WHERE remote_name = ?", [(name,) for name in names])

    def batches_to_delete(self) -> list[tuple[str, float]]:
        """The remote batches waiting for their deletion, oldest first, each with when its work was delivered."""
        return [(row[0], row[1]) for row in
                self._db.execute("SELECT remote_name, since FROM batches_to_delete ORDER BY since, remote_name")]

    def watch_name(self, job_id: str, chunk_idx: int, display_name: str, attempt_at: float) -> None:
        """Watch ``display_name`` (a create under it had an unknown outcome) from ``attempt_at`` on."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO watched_names (display_name, job_id, chunk_idx, first_attempt_at, last_attempt_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT(display_name) DO UPDATE SET"
                " first_attempt_at = min(first_attempt_at, excluded.first_attempt_at),"
                " last_attempt_at = max(last_attempt_at, excluded.last_attempt_at)",
                (display_name, job_id, chunk_idx, attempt_at, attempt_at))

    def watched_names(self) -> dict[str, dict]:
        """Every watched display name, with its row."""
        return self._cached(("watched_names",), lambda: {row["display_name"]: dict(row) for row in self._db.execute(
            "SELECT * FROM watched_names ORDER BY first_attempt_at")})

    def forget_watched_names(self, last_attempt_before: float) -> int:
        """Stop watching the names whose last create is older than ``last_attempt_before``; returns how many."""
        with self.transaction() as db:
            return db.execute("DELETE FROM watched_names WHERE last_attempt_at < ?",
                              (last_attempt_before,)).rowcount

    # -- webhook deliveries taken -----------------------------------------------------------

    def webhook_seen(self, webhook_id: str) -> bool:
        return self._db.execute("SELECT 1 FROM webhook_deliveries WHERE webhook_id = ?",
                                (webhook_id,)).fetchone() is not None

    def record_webhook(self, webhook_id: str, remote_name: str | None, event_type: str | None) -> bool:
        """Record a webhook delivery by its id; False when it was taken before (a duplicate)."""
        with self.transaction() as db:
            cursor = db.execute("INSERT OR IGNORE INTO webhook_deliveries (webhook_id, remote_name, event_type,"
                                " received_at) VALUES (?, ?, ?, ?)", (webhook_id, remote_name, event_type, time.time()))
            return cursor.rowcount == 1

    def last_webhook_at(self) -> float | None:
        """When the latest webhook delivery was taken (wall clock), if any."""
        return self._db.execute("SELECT max(received_at) FROM webhook_deliveries").fetchone()[0]

    def forget_webhooks(self, before: float) -> int:
        with self.transaction() as db:
            return db.execute("DELETE FROM webhook_deliveries WHERE received_at < ?", (before,)).rowcount
