"""What "nothing lost, nothing billed twice" means, checked in one place (reliability.md B8, I1-I5).

Fault tests record what they dropped into the inbox (:class:`Dropped`: the manifest's bytes and
the request keys it must produce) and, once the daemon has finished, call
:func:`assert_invariants` with the workspace and the remote jobs the service holds. While the
daemon is still between crashes, :func:`assert_nothing_lost` checks the weaker, in-flight form
of conservation: every manifest is somewhere (inbox, a job's spool, or the outbox).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from google.genai import types

from batchd.inbox import is_temp_name
from batchd.journal import Journal, journal_path
from batchd.manifest import load_manifest
from batchd.testing import Workspace

#: summary.json states a delivered job may end in.
OUTCOMES = {"succeeded", "partial", "plugin_failed", "failed", "cancelled", "rejected"}


@dataclass(frozen=True)
class Dropped:
    """A manifest a test dropped into the inbox."""

    name: str          # its file name in the inbox
    sha256: str        # of its bytes
    keys: frozenset[str] | None  # the request keys it must produce; None for one that must be rejected

    @classmethod
    def of_text(cls, name: str, text: str) -> Dropped:
        """Record a manifest by its text (one whose inputs are all inline), e.g. after it was taken."""
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / name
            path.write_text(text)
            return cls.of(path)

    @classmethod
    def of(cls, path: Path, *, rejected: bool = False) -> Dropped:
        """Record ``path`` (already in the inbox, its input files beside it) before the daemon may take it."""
        data = path.read_bytes()
        keys = None if rejected else frozenset(request.key for request in load_manifest(path).requests())
        return cls(path.name, hashlib.sha256(data).hexdigest(), keys)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest_copies(folder: Path, names: set[str]) -> list[Path]:
    return [path for path in folder.iterdir() if path.name in names and path.is_file()]


def assert_nothing_lost(ws: Workspace, dropped: Iterable[Dropped]) -> None:
    """In flight (the daemon stopped or killed at any instant): every dropped manifest still exists,
    in the inbox, in a job's spool (claimed) or in an outbox folder; never nowhere (I1, I5)."""
    dropped = list(dropped)
    names = {d.name for d in dropped}
    present: set[str] = set()
    places = [ws.inbox, *_folders(ws.state / "jobs"), *_folders(ws.outbox)]
    for place in places:
        for path in _manifest_copies(place, names):
            present.add(_sha256(path))
    lost = [d.name for d in dropped if d.sha256 not in present]
    assert not lost, f"manifests in no place at all: {lost}"


def _folders(path: Path) -> list[Path]:
    return [p for p in path.iterdir() if p.is_dir()] if path.is_dir() else []


def assert_invariants(ws: Workspace, dropped: Iterable[Dropped], remote_jobs: Iterable[types.BatchJob]) -> dict:
    """After the daemon has delivered everything: I1-I4 hold. Returns counts for the test's report.

    - I1 every dropped manifest is delivered in exactly one outbox folder (found by the sha256 of
      the manifest copy in it), no folder holds anything else, no temp file is left in the outbox,
      the inbox holds no manifest, every journal job is done and no job spool is left behind;
    - I2 every request key of a delivered manifest is in its results.jsonl exactly once, and
      summary.json's counts agree;
    - I3 at most one non-cancelled remote job per display name, every remote job the service holds
      is recorded in the journal (adopted or a cancelled duplicate), every display name is an
      intent the journal committed, and every chunk's adopted job is among the service's;
    - I4 every JSON file in the outbox parses, and so does every results.jsonl line.
    """
    dropped = list(dropped)
    by_sha = {d.sha256: d for d in dropped}
    assert len(by_sha) == len(dropped), "the test dropped the same bytes twice; I1 cannot tell them apart"
    names = {d.name for d in dropped}

    # I4 first: everything after reads these files.
    folders = sorted(_folders(ws.outbox))
    for folder in folders:
        for path in folder.rglob("*"):
            assert not is_temp_name(path.name), f"temp file left in the outbox: {path}"
            if path.suffix == ".json":
                json.loads(path.read_text())  # raises on a torn file
            elif path.name == "results.jsonl":
                for number, line in enumerate(path.read_text().splitlines(), 1):
                    assert line.strip(), f"{path} line {number} is blank"
                    json.loads(line)
    stray = [p.name for p in ws.outbox.iterdir() if not p.is_dir()] if ws.outbox.is_dir() else []
    assert not stray, f"files directly in the outbox: {stray}"

    # I1
    delivered: dict[str, list[Path]] = defaultdict(list)
    for folder in folders:
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["state"] in OUTCOMES, (folder, summary["state"])
        # A job that did not succeed says why.
        assert summary["state"] == "succeeded" or summary.get("error", {}).get("message"), (folder, summary)
        copies = _manifest_copies(folder, names)
        assert len(copies) == 1, f"{folder} holds {len(copies)} of the dropped manifests"
        delivered[_sha256(copies[0])].append(folder)
    twice = {by_sha[sha].name: [f.name for f in places] for sha, places in delivered.items() if len(places) > 1}
    assert not twice, f"delivered more than once: {twice}"
    unknown = [places[0].name for sha, places in delivered.items() if sha not in by_sha]
    assert not unknown, f"outbox folders of no dropped manifest: {unknown}"
    missing = sorted(d.name for d in dropped if d.sha256 not in delivered)
    assert not missing, f"never delivered: {missing}"
    left = sorted(p.name for p in ws.inbox.iterdir() if p.name in names) if ws.inbox.is_dir() else []
    assert not left, f"manifests still in the inbox: {left}"
    spools = sorted(p.name for p in _folders(ws.state / "jobs"))
    assert not spools, f"job spools left behind: {spools}"

    journal = Journal(journal_path(ws.state), readonly=True)
    try:
        jobs = journal.jobs(packs=True)  # a pack's remote batches are recorded under it
        unfinished = [(job.source, job.state) for job in jobs if job.state != "done"]
        assert not unfinished, f"jobs the journal still has in flight: {unfinished}"
        chunks = [chunk for job in jobs for chunk in journal.chunks(job.id)]
        recorded = {row["remote_name"]: row for job in jobs for row in journal.remote_jobs(job.id)}
    finally:
        journal.close()

    # I2
    requests = 0
    for sha, [folder] in delivered.items():
        expected = by_sha[sha].keys
        summary = json.loads((folder / "summary.json").read_text())
        if expected is None:
            assert summary["state"] == "rejected", (folder.name, summary["state"])
            continue
        lines = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
        keys = Counter(line["key"] for line in lines)
        repeated = [key for key, count in keys.items() if count > 1]
        assert not repeated, f"{folder.name}: keys more than once in results.jsonl: {repeated}"
        assert set(keys) == expected, (f"{folder.name}: missing {sorted(expected - set(keys))}, "
                                       f"unexpected {sorted(set(keys) - expected)}")
        assert all(line["status"] in ("ok", "error") for line in lines), folder.name
        assert all(line["error"] for line in lines if line["status"] == "error"), folder.name
        counts = summary["counts"]
        assert counts["total"] == len(lines) == counts["succeeded"] + counts["failed"], (folder.name, counts)
        assert counts["succeeded"] == sum(line["status"] == "ok" for line in lines), (folder.name, counts)
        requests += len(lines)

    # I3
    remote = list(remote_jobs)
    live = Counter(job.display_name for job in remote if job.state != types.JobState.JOB_STATE_CANCELLED)
    assert all(count == 1 for count in live.values()), {n: c for n, c in live.items() if c > 1}
    unrecorded = [job.name for job in remote if job.name not in recorded]
    assert not unrecorded, f"remote jobs the journal never recorded (cost unaccounted): {unrecorded}"
    intents = {chunk.display_name for chunk in chunks}
    without_intent = sorted({job.display_name for job in remote} - intents)
    assert not without_intent, f"remote jobs created without a committed intent: {without_intent}"
    names_held = {job.name for job in remote}
    adopted_gone = [c.remote_name for c in chunks if c.remote_name and c.remote_name not in names_held]
    assert not adopted_gone, f"chunks adopted remote jobs the service does not hold: {adopted_gone}"
    duplicates = [row for row in recorded.values() if row["role"] == "duplicate"]
    cancelled_duplicates = [job for job in remote if recorded.get(job.name, {}).get("role") == "duplicate"]
    assert all(job.state == types.JobState.JOB_STATE_CANCELLED for job in cancelled_duplicates)
    # create calls minus cancelled duplicates == one per chunk that reached the service (a chunk skipped
    # because its job was cancelled may have only a stray: a late create, cancelled).
    reached = {job.display_name for job in remote if recorded.get(job.name, {}).get("role") != "duplicate"}
    assert len(remote) - len(duplicates) == len(reached), (len(remote), len(duplicates), len(reached))

    # Chunks meant to be a remote batch of their own: not those whose requests rode in a pack's.
    sharing = Counter(c.remote_name for c in chunks if c.remote_name)
    own = [c for c in chunks if c.packed_in is None or c.remote_name and sharing[c.remote_name] == 1]
    return {"folders": len(folders), "requests": requests, "remote_jobs": len(remote),
            "duplicates_cancelled": len(duplicates), "chunks": len(own)}
