"""Tests of batchd.inbox: scanning and settling, claiming, and the watcher as a source of hints."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
from pathlib import Path

import pytest
from watchdog.events import FileSystemEventHandler

from batchd.drop import drop_bytes, drop_file
from batchd.inbox import Candidate, Inbox, claim, is_temp_name, sha256_file

SETTLE = 0.2


@pytest.fixture
def inbox_dir(tmp_path) -> Path:
    path = tmp_path / "inbox"
    path.mkdir()
    return path


@pytest.fixture
def state_dir(tmp_path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path


@pytest.fixture
def inbox(inbox_dir):
    inbox = Inbox(inbox_dir, settle_seconds=SETTLE, rescan_seconds=3600)
    yield inbox
    inbox.stop()


def scan_until(inbox: Inbox, predicate, limit: float = 15.0) -> list[Candidate]:
    """Scan (sleeping in inbox.wait between scans) until ``predicate(candidates)`` holds."""
    give_up = time.monotonic() + limit
    while True:
        candidates = inbox.scan()
        if predicate(candidates):
            return candidates
        if time.monotonic() > give_up:
            pytest.fail(f"inbox never reached the expected state; last scan: {candidates}")
        inbox.wait(0.05)


def names(candidates: list[Candidate]) -> list[str]:
    return sorted(candidate.path.name for candidate in candidates)


def backdate(path: Path, seconds: float = 3600) -> None:
    old = time.time_ns() - int(seconds * 1e9)
    os.utime(path, ns=(old, old))


# -- scan and settle ------------------------------------------------------------------------------


def test_a_new_file_settles_after_settle_seconds(inbox, inbox_dir):
    manifest = inbox_dir / "job.toml"
    manifest.write_text('task = "translate"\n')
    assert inbox.scan() == []  # just seen: not settled yet

    [candidate] = scan_until(inbox, bool)
    assert candidate.path == manifest
    assert candidate.size == manifest.stat().st_size
    assert candidate.mtime_ns == manifest.stat().st_mtime_ns
    assert candidate.unchanged_for >= SETTLE


def test_an_old_mtime_alone_does_not_settle_a_file(inbox, inbox_dir):
    # A file copied with its mtime preserved (cp -p) may still be growing: it must also be
    # seen unchanged for settle_seconds.
    manifest = inbox_dir / "job.json"
    manifest.write_text("{}")
    backdate(manifest)
    assert inbox.scan() == []
    assert names(scan_until(inbox, bool)) == ["job.json"]


def test_a_file_still_growing_is_not_settled(inbox, inbox_dir):
    manifest = inbox_dir / "job.toml"
    with open(manifest, "w") as fh:
        for i in range(8):
            fh.write(f"line{i} = {i}\n")
            fh.flush()
            assert inbox.scan() == []
            time.sleep(SETTLE / 4)
    assert names(scan_until(inbox, bool)) == ["job.toml"]


def test_an_mtime_ahead_of_the_clock_still_settles(inbox, inbox_dir):
    # NFS servers stamp mtimes with their own clock; skew must not stall the inbox.
    manifest = inbox_dir / "job.toml"
    manifest.write_text("x = 1\n")
    future = time.time_ns() + 3600 * 10**9
    os.utime(manifest, ns=(future, future))
    assert names(scan_until(inbox, bool)) == ["job.toml"]


def test_unchanged_for_grows_and_resets_on_change(inbox, inbox_dir):
    manifest = inbox_dir / "job.toml"
    manifest.write_text("x = 1\n")
    [first] = scan_until(inbox, bool)
    [later] = scan_until(inbox, lambda found: found and found[0].unchanged_for > first.unchanged_for)
    assert later.unchanged_for > first.unchanged_for

    manifest.write_text("x = 22\n")
    assert inbox.scan() == []


def test_entries_that_disappear_are_forgotten(inbox, inbox_dir):
    manifest = inbox_dir / "job.toml"
    manifest.write_text("x = 1\n")
    backdate(manifest)
    stat_before = manifest.stat()
    scan_until(inbox, bool)

    manifest.unlink()
    assert inbox.scan() == []
    # Same name, size and mtime again: it is a new arrival and must settle afresh.
    manifest.write_text("x = 1\n")
    os.utime(manifest, ns=(stat_before.st_atime_ns, stat_before.st_mtime_ns))
    assert inbox.scan() == []


def test_temp_names_dotfiles_and_other_suffixes_are_ignored(inbox, inbox_dir):
    ignored = [".job.toml", "job.toml.tmp", "job.toml.part", "job.toml~", "job.toml.swp",
               "#job.toml#", "items.csv", "README"]
    for name in ignored + ["real.json", "stop.cancel", "UPPER.TOML"]:
        (inbox_dir / name).write_text("x")
    found = scan_until(inbox, lambda found: len(found) >= 3)
    assert names(found) == ["UPPER.TOML", "real.json", "stop.cancel"]


@pytest.mark.parametrize(
    ("name", "expected"),
    [(".hidden.toml", True), ("a.tmp", True), ("a.TMP", True), ("a.part", True), ("a~", True),
     ("a.swp", True), ("#a#", True), ("#", False), ("a.toml", False), ("a#b.toml", False)],
)
def test_is_temp_name(name, expected):
    assert is_temp_name(name) is expected


def test_custom_suffixes(inbox_dir):
    inbox = Inbox(inbox_dir, settle_seconds=SETTLE, suffixes=(".yaml",))
    (inbox_dir / "a.yaml").write_text("x")
    (inbox_dir / "b.toml").write_text("x")
    assert names(scan_until(inbox, bool)) == ["a.yaml"]


def test_symlinks_directories_and_fifos_are_skipped_and_reported_once(inbox, inbox_dir, tmp_path):
    target = tmp_path / "elsewhere.toml"
    target.write_text("x")
    (inbox_dir / "link.toml").symlink_to(target)
    (inbox_dir / "folder.toml").mkdir()
    os.mkfifo(inbox_dir / "pipe.toml")
    (inbox_dir / "real.toml").write_text("x")

    assert names(scan_until(inbox, bool)) == ["real.toml"]
    irregular = {entry.path.name: entry.kind for entry in inbox.take_irregular()}
    assert irregular == {"link.toml": "symlink", "folder.toml": "directory", "pipe.toml": "fifo"}

    inbox.scan()
    assert inbox.take_irregular() == []  # once while it stays

    (inbox_dir / "pipe.toml").unlink()
    inbox.scan()
    os.mkfifo(inbox_dir / "pipe.toml")
    inbox.scan()
    assert [entry.path.name for entry in inbox.take_irregular()] == ["pipe.toml"]


# -- claim ------------------------------------------------------------------------------------------


def test_claim_moves_the_file_and_a_second_claim_loses(inbox_dir, state_dir):
    manifest = inbox_dir / "job.toml"
    manifest.write_text("x = 1\n")
    assert claim(manifest, state_dir / "j1.toml") is True
    assert not manifest.exists()
    assert (state_dir / "j1.toml").read_text() == "x = 1\n"

    # The same file reported again (a duplicate event): the second claimant finds it gone.
    assert claim(manifest, state_dir / "j2.toml") is False
    assert os.listdir(state_dir) == ["j1.toml"]


def test_claim_never_overwrites_an_existing_dest(inbox_dir, state_dir):
    manifest = inbox_dir / "job.toml"
    manifest.write_text("new")
    (state_dir / "j1.toml").write_text("precious")
    with pytest.raises(FileExistsError):
        claim(manifest, state_dir / "j1.toml")
    assert manifest.read_text() == "new"
    assert (state_dir / "j1.toml").read_text() == "precious"


def test_claim_again_completes_a_claim_killed_midway(inbox_dir, state_dir):
    manifest = inbox_dir / "job.toml"
    manifest.write_text("x")
    os.link(manifest, state_dir / "j1.toml")  # kill -9 between link and unlink
    assert claim(manifest, state_dir / "j1.toml") is True
    assert not manifest.exists()
    assert (state_dir / "j1.toml").read_text() == "x"


def test_claim_into_a_missing_directory_raises_and_keeps_the_file(inbox_dir, state_dir):
    manifest = inbox_dir / "job.toml"
    manifest.write_text("x")
    with pytest.raises(FileNotFoundError):
        claim(manifest, state_dir / "missing" / "j1.toml")
    assert manifest.exists()


# -- the producer side ----------------------------------------------------------------------------


def test_drop_file_never_replaces_a_waiting_manifest(inbox, inbox_dir, tmp_path):
    first, second = tmp_path / "a" / "job.toml", tmp_path / "b" / "job.toml"
    for path, text in ((first, "x = 1\n"), (second, "x = 2\n")):
        path.parent.mkdir()
        path.write_text(text)
    assert drop_file(first, inbox_dir) == inbox_dir / "job.toml"
    assert drop_file(second, inbox_dir) == inbox_dir / "job-2.toml"
    assert sorted(os.listdir(inbox_dir)) == ["job-2.toml", "job.toml"]  # no temp files left
    assert (inbox_dir / "job-2.toml").read_text() == "x = 2\n"
    assert names(scan_until(inbox, lambda found: len(found) == 2)) == ["job-2.toml", "job.toml"]


def test_drop_bytes_uses_the_exact_name_and_refuses_to_replace(inbox_dir):
    cancel = inbox_dir / "job.cancel"
    assert drop_bytes(b"", cancel) == cancel
    with pytest.raises(FileExistsError):
        drop_bytes(b"again", cancel)
    assert os.listdir(inbox_dir) == ["job.cancel"]
    assert cancel.read_bytes() == b""


def test_sha256_file(tmp_path):
    data = os.urandom(3 * (1 << 20) + 17)  # spans several 1 MiB blocks
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


# -- watching -------------------------------------------------------------------------------------


def clear_hints(inbox: Inbox) -> None:
    inbox.scan()
    inbox.wait(0)


def test_wait_without_events_times_out(inbox):
    inbox.start()
    clear_hints(inbox)
    assert inbox.wait(0.05) is False


def test_an_event_wakes_wait(inbox, inbox_dir):
    inbox.start()
    assert inbox.observer_name is not None and inbox.observer_name != "PollingObserver"
    clear_hints(inbox)
    (inbox_dir / "job.toml").write_text("x")
    assert inbox.wait(30) is True
    assert names(scan_until(inbox, bool)) == ["job.toml"]


def test_a_scan_is_due_only_when_it_can_find_something(inbox, inbox_dir, tmp_path):
    """The loop ticks whenever a worker finishes; it lists the inbox only when the watcher saw an event
    since the last scan began, a file is due to have settled, or the rescan is due."""
    assert inbox.scan_due(), "not watched yet: every tick looks"
    inbox.start()
    assert inbox.scan_due(), "the first scan after the watch starts"
    inbox.scan()
    assert not inbox.scan_due(), "nothing happened since the last scan"
    outside = tmp_path / "job.toml"
    outside.write_text("x")
    outside.rename(inbox_dir / "job.toml")
    assert inbox.wait(30) is True
    assert inbox.scan_due(), "the watcher saw the rename"
    assert names(inbox.scan()) == ["job.toml"]  # renamed in: no settle wait
    assert not inbox.scan_due()
    (inbox_dir / "other.toml").write_text("x")  # written in place: it settles
    assert inbox.wait(30) is True
    assert inbox.scan_due() and names(inbox.scan()) == ["job.toml"]
    assert not inbox.scan_due(), "the settle check is not due yet"
    time.sleep(SETTLE + 0.05)
    assert inbox.scan_due(), "the file written in place is due to have settled"
    assert names(inbox.scan()) == ["job.toml", "other.toml"]


def test_an_unwatched_inbox_is_always_due_for_a_scan(inbox_dir):
    inbox = Inbox(inbox_dir, settle_seconds=SETTLE, rescan_seconds=3600, backend="none")
    with inbox:
        inbox.scan()
        assert inbox.scan_due()


def test_a_rename_into_the_inbox_wakes_wait(inbox, inbox_dir, tmp_path):
    outside = tmp_path / "job.toml"
    outside.write_text("x")
    inbox.start()
    clear_hints(inbox)
    outside.rename(inbox_dir / "job.toml")
    assert inbox.wait(30) is True


def test_polling_backend(inbox_dir):
    inbox = Inbox(inbox_dir, settle_seconds=SETTLE, rescan_seconds=3600, backend="polling", poll_seconds=0.1)
    with inbox:
        assert inbox.observer_name == "PollingObserver"
        clear_hints(inbox)
        (inbox_dir / "job.toml").write_text("x")
        assert inbox.wait(30) is True


def test_inotify_limit_at_start_falls_back_to_polling(inbox_dir, monkeypatch):
    def watch_limit_reached(*args, **kwargs):
        raise OSError(errno.ENOSPC, "inotify watch limit reached")

    monkeypatch.setattr("watchdog.observers.inotify.InotifyWatchGroup", watch_limit_reached)
    inbox = Inbox(inbox_dir, settle_seconds=SETTLE, rescan_seconds=3600, backend="inotify", poll_seconds=0.1)
    with inbox:
        assert inbox.observer_name == "PollingObserver"
        clear_hints(inbox)
        (inbox_dir / "job.toml").write_text("x")
        assert inbox.wait(30) is True


def test_unknown_backend_is_rejected(inbox_dir):
    with pytest.raises(ValueError, match="backend"):
        Inbox(inbox_dir, backend="fsevents-please")


def test_a_stopped_observer_is_restarted(inbox, inbox_dir):
    inbox.start()
    assert inbox.ensure_watching() is False
    inbox._observer.stop()
    inbox._observer.join()

    assert inbox.ensure_watching() is True
    assert inbox.ensure_watching() is False
    assert inbox.wait(0) is True  # a restart asks for a rescan: events were lost meanwhile
    inbox.scan()
    (inbox_dir / "job.toml").write_text("x")
    assert inbox.wait(30) is True


class Explodes(FileSystemEventHandler):
    def dispatch(self, event):
        raise RuntimeError("handler bug")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_an_observer_killed_by_a_handler_exception_is_restarted_and_nothing_is_missed(inbox, inbox_dir):
    # watchdog #427: any exception in a handler kills the observer thread for good.
    inbox.start()
    inbox._observer.schedule(Explodes(), str(inbox_dir))
    (inbox_dir / "first.toml").write_text("x")
    give_up = time.monotonic() + 15
    while not inbox.ensure_watching():
        assert time.monotonic() < give_up, "the observer thread never died"
        time.sleep(0.02)

    (inbox_dir / "second.toml").write_text("x")
    assert inbox.wait(30) is True
    # first.toml arrived just as the watcher died; the scan finds it regardless.
    assert names(scan_until(inbox, lambda found: len(found) == 2)) == ["first.toml", "second.toml"]


def test_rescan_finds_files_that_arrived_without_any_event(inbox_dir):
    # Events disabled altogether (as on an inotify overflow or an NFS mount): the periodic
    # rescan alone must find every file.
    inbox = Inbox(inbox_dir, settle_seconds=0.05, rescan_seconds=0.2)
    inbox.scan()
    for i in range(50):
        (inbox_dir / f"job-{i:02d}.toml").write_text("x")
    found: set[str] = set()
    give_up = time.monotonic() + 15
    while len(found) < 50:
        assert time.monotonic() < give_up, f"rescans found only {len(found)} files"
        assert inbox.wait(30) is False  # woken by the timer; no watcher is running
        found.update(candidate.path.name for candidate in inbox.scan())
    assert found == {f"job-{i:02d}.toml" for i in range(50)}


@pytest.mark.timeout(30)
def test_wait_wakes_when_a_pending_file_is_due_to_settle(inbox, inbox_dir):
    # With an hour until the next rescan and no watcher, only the settle deadline can end
    # this wait; a regression shows up as the test timing out.
    (inbox_dir / "job.toml").write_text("x")
    assert inbox.scan() == []
    assert inbox.wait(3600) is False
    assert names(inbox.scan()) == ["job.toml"]


def test_backend_none_watches_nothing_and_the_rescan_still_finds_files(inbox_dir):
    inbox = Inbox(inbox_dir, settle_seconds=0.05, rescan_seconds=0.2, backend="none")
    with inbox:
        assert inbox.observer_name is None
        assert inbox.ensure_watching() is False  # nothing to restart
        inbox.scan()
        (inbox_dir / "job.toml").write_text("x")
        assert inbox.wait(30) is False  # no event: the rescan timer ended the wait
        assert names(scan_until(inbox, bool)) == ["job.toml"]


def test_reaper_removes_only_stale_producer_temp_files(inbox_dir):
    inbox = Inbox(inbox_dir, rescan_seconds=3600, temp_max_age=60)
    stale = [".job.toml.tmp", "big.csv.part", "UP.TMP"]
    spared = [".gitkeep", "job.toml~", ".job.toml.swp", "job.toml", "fresh.tmp"]
    for name in stale + spared:
        (inbox_dir / name).write_text("x")
        if name != "fresh.tmp":
            backdate(inbox_dir / name, 120)
    (inbox_dir / "folder.tmp").mkdir()
    backdate(inbox_dir / "folder.tmp", 120)

    assert sorted(path.name for path in inbox.reap_stale_temp_files()) == sorted(stale)
    assert sorted(os.listdir(inbox_dir)) == sorted(spared + ["folder.tmp"])
    backdate(inbox_dir / "fresh.tmp", 120)
    assert inbox.reap_stale_temp_files() == []  # at most once per rescan period


def test_reaper_is_off_without_a_max_age(inbox_dir):
    (inbox_dir / "old.tmp").write_text("x")
    backdate(inbox_dir / "old.tmp", 10**6)
    assert Inbox(inbox_dir).reap_stale_temp_files() == []
    assert (inbox_dir / "old.tmp").exists()


# -- renamed in: no settling ----------------------------------------------------------------------

#: Long enough that a file returned by a scan within scan_until's limit cannot have settled.
NEVER_SETTLES = 60.0
#: Well inside NEVER_SETTLES, and ample for an inotify event on a loaded machine.
EVENT_LIMIT = 30.0


@pytest.fixture
def watched(inbox_dir):
    """An inbox watched as shipped (backend "auto": inotify here); a file not renamed in takes a minute to settle."""
    inbox = Inbox(inbox_dir, settle_seconds=NEVER_SETTLES, rescan_seconds=3600)
    inbox.start()
    assert inbox.observer_name == "InotifyObserver"
    inbox.scan()
    yield inbox
    inbox.stop()


def rename_in(tmp_path: Path, inbox_dir: Path, name: str, text: str = "x = 1\n") -> Path:
    """Write ``name`` outside the inbox and rename it in, as a producer on the same filesystem does."""
    outside = tmp_path / "producer" / name
    outside.parent.mkdir(exist_ok=True)
    outside.write_text(text)
    return outside.rename(inbox_dir / name)


def test_a_file_renamed_in_from_outside_is_a_candidate_without_settling(watched, inbox_dir, tmp_path):
    manifest = rename_in(tmp_path, inbox_dir, "job.toml")
    [candidate] = scan_until(watched, bool, limit=EVENT_LIMIT)
    assert candidate.path == manifest
    assert (candidate.size, candidate.mtime_ns) == (manifest.stat().st_size, manifest.stat().st_mtime_ns)


def test_a_rename_from_a_temp_name_in_the_inbox_is_an_arrival(watched, inbox_dir, tmp_path):
    # The Maildir way, and what `batchd submit` and `batchd cancel` do.
    (inbox_dir / ".job.toml.tmp").write_text("x = 1\n")
    os.rename(inbox_dir / ".job.toml.tmp", inbox_dir / "job.toml")
    assert names(scan_until(watched, bool, limit=EVENT_LIMIT)) == ["job.toml"]

    source = tmp_path / "other.toml"
    source.write_text("x = 2\n")
    assert drop_file(source, inbox_dir) == inbox_dir / "other.toml"
    drop_bytes(b"", inbox_dir / "job.cancel")
    found = scan_until(watched, lambda found: len(found) == 3, limit=EVENT_LIMIT)
    assert names(found) == ["job.cancel", "job.toml", "other.toml"]


def test_a_file_written_in_place_still_settles(watched, inbox_dir, tmp_path):
    with open(inbox_dir / "in-place.toml", "w") as fh:
        fh.write("x = 1\n")
    # Renamed from one manifest name to another: it may have been written in place, and still be.
    (inbox_dir / "before.json").write_text("{}")
    os.rename(inbox_dir / "before.json", inbox_dir / "after.json")
    # Its events come after theirs, so once it is a candidate theirs have all been handled.
    rename_in(tmp_path, inbox_dir, "sentinel.toml")
    found = scan_until(watched, lambda found: "sentinel.toml" in names(found), limit=EVENT_LIMIT)
    assert names(found) == ["sentinel.toml"]
    assert names(watched.scan()) == ["sentinel.toml"]


def test_a_file_renamed_in_then_written_to_settles_again(watched, inbox_dir, tmp_path):
    manifest = rename_in(tmp_path, inbox_dir, "job.toml")
    scan_until(watched, bool, limit=EVENT_LIMIT)
    with open(manifest, "a") as fh:  # a producer that renamed too early
        fh.write("y = 2\n")
    rename_in(tmp_path, inbox_dir, "sentinel.toml")
    found = scan_until(watched, lambda found: "sentinel.toml" in names(found), limit=EVENT_LIMIT)
    assert names(found) == ["sentinel.toml"]
    assert names(watched.scan()) == ["sentinel.toml"]


def test_a_renamed_in_file_changed_without_any_event_settles_again(inbox_dir, tmp_path):
    # The scan compares the file with what the watcher saw after the rename, so a write whose
    # event was lost (an inotify queue overflow) or not yet handled still counts.
    from watchdog.events import FileModifiedEvent, FileMovedEvent

    from batchd.inbox import _EventHints

    inbox = Inbox(inbox_dir, settle_seconds=NEVER_SETTLES, rescan_seconds=3600, backend="none")
    hints = _EventHints(inbox, threading.Event(), track_moves=True)
    arrived = [rename_in(tmp_path, inbox_dir, f"{name}.toml") for name in ("a", "b", "c", "d")]
    for path in arrived:
        hints.dispatch(FileMovedEvent("", str(path)))  # from outside, as inotify's full events say
    assert names(inbox.scan()) == ["a.toml", "b.toml", "c.toml", "d.toml"]

    appended, touched, reported, removed = arrived
    with open(appended, "a") as fh:
        fh.write("y = 2\n")
    later = touched.stat().st_mtime_ns + 10**9
    os.utime(touched, ns=(later, later))
    hints.dispatch(FileModifiedEvent(str(reported)))  # reported written to, even if nothing shows
    removed.unlink()
    assert inbox.scan() == []
    assert inbox._moved_in == {}  # and nothing is kept about them


def test_a_move_recorded_while_a_scan_lists_the_inbox_outlives_that_scan(inbox_dir, tmp_path, monkeypatch):
    # A file renamed in after the listing passed its place is missing from that listing; the
    # scan must not forget its record as gone.
    from watchdog.events import FileMovedEvent

    from batchd.inbox import _EventHints

    inbox = Inbox(inbox_dir, settle_seconds=NEVER_SETTLES, rescan_seconds=3600, backend="none")
    hints = _EventHints(inbox, threading.Event(), track_moves=True)
    real_scandir = os.scandir

    class ListingThenArrival:
        def __init__(self, path):
            with real_scandir(path) as entries:
                self.listed = list(entries)

        def __enter__(self):
            return self.entries()

        def __exit__(self, *exc_info):
            return False

        def entries(self):
            yield from self.listed
            late = rename_in(tmp_path, inbox_dir, "late.toml")
            hints.dispatch(FileMovedEvent("", str(late)))

    monkeypatch.setattr(os, "scandir", ListingThenArrival)
    assert inbox.scan() == []
    monkeypatch.undo()
    assert names(inbox.scan()) == ["late.toml"]


def test_moves_reported_by_the_polling_observer_are_not_trusted(inbox_dir):
    inbox = Inbox(inbox_dir, settle_seconds=NEVER_SETTLES, rescan_seconds=3600, backend="polling",
                  poll_seconds=0.05)
    seen = EventLog()
    with inbox:
        inbox._observer.schedule(seen, str(inbox_dir))
        (inbox_dir / ".job.toml.tmp").write_text("x = 1\n")
        seen.wait_for(lambda event: event.event_type == "created" and event.src_path.endswith(".tmp"))
        os.rename(inbox_dir / ".job.toml.tmp", inbox_dir / "job.toml")
        seen.wait_for(lambda event: event.event_type == "moved" and event.dest_path.endswith("job.toml"))
        # One observer hands each event to every handler before the next event: once the marker
        # is seen, the inbox has had the move.
        (inbox_dir / "marker.txt").write_text("")
        seen.wait_for(lambda event: event.src_path.endswith("marker.txt"))
        assert inbox.scan() == []


def test_recorded_moves_are_capped_under_a_flood(watched, inbox_dir, tmp_path):
    watched.max_recorded_moves = 100
    seen = EventLog()
    watched._observer.schedule(seen, str(inbox_dir))
    flood = 2000
    producer = tmp_path / "producer"
    producer.mkdir()
    for n in range(flood):
        (producer / f"m{n:04d}.toml").write_text("x = 1\n")
    for n in range(flood):
        os.rename(producer / f"m{n:04d}.toml", inbox_dir / f"m{n:04d}.toml")

    # The first 100 renamed in are candidates at once; the rest wait to settle.
    found = scan_until(watched, lambda found: len(found) >= 100, limit=EVENT_LIMIT)
    assert names(found) == [f"m{n:04d}.toml" for n in range(100)]
    (inbox_dir / "marker.txt").write_text("")  # once it is seen, the inbox has had every move
    seen.wait_for(lambda event: event.src_path.endswith("marker.txt"), limit=60)
    assert len(watched._moved_in) == 100
    assert len(watched.scan()) == 100

    # What left the inbox is forgotten, so arrivals are recorded again.
    for n in range(100):
        (inbox_dir / f"m{n:04d}.toml").unlink()
    assert watched.scan() == []
    rename_in(tmp_path, inbox_dir, "late.toml")
    assert names(scan_until(watched, bool, limit=EVENT_LIMIT)) == ["late.toml"]
    assert len(watched._moved_in) == 1


def test_a_restarted_watcher_forgets_recorded_moves(watched, inbox_dir, tmp_path):
    # Writes made while no one watched went unreported.
    rename_in(tmp_path, inbox_dir, "job.toml")
    scan_until(watched, bool, limit=EVENT_LIMIT)
    watched._observer.stop()
    watched._observer.join()
    assert watched.ensure_watching() is True
    assert watched.scan() == []


@pytest.mark.parametrize("renameat2", ["available", "missing"])
def test_drop_functions_never_replace_a_file_with_or_without_renameat2(inbox_dir, tmp_path, monkeypatch,
                                                                        renameat2):
    if renameat2 == "missing":
        monkeypatch.setattr("batchd.drop._renameat2", None)  # falls back to link + unlink
    source = tmp_path / "job.toml"
    source.write_text("x = 1\n")
    (inbox_dir / "job.toml").write_text("waiting")
    assert drop_file(source, inbox_dir) == inbox_dir / "job-2.toml"
    (inbox_dir / "job.cancel").write_text("")
    with pytest.raises(FileExistsError):
        drop_bytes(b"again", inbox_dir / "job.cancel")
    assert sorted(os.listdir(inbox_dir)) == ["job-2.toml", "job.cancel", "job.toml"]
    assert (inbox_dir / "job.toml").read_text() == "waiting"
    assert (inbox_dir / "job-2.toml").read_text() == "x = 1\n"


class EventLog(FileSystemEventHandler):
    """Every event an observer hands over, for a test to wait on."""

    def __init__(self):
        super().__init__()
        self._events = []
        self._changed = threading.Condition()

    def dispatch(self, event):
        with self._changed:
            self._events.append(event)
            self._changed.notify_all()

    def wait_for(self, predicate, limit: float = EVENT_LIMIT) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: any(predicate(event) for event in self._events), limit):
                pytest.fail(f"no such event within {limit}s; saw {self._events}")


# -- read_entry: open, then check the descriptor -------------------------------------------------------


def test_read_entry_reads_a_regular_file_and_names_what_else_it_finds(tmp_path: Path):
    from batchd.inbox import UnsafeEntry, read_entry

    regular = tmp_path / "a.toml"
    regular.write_bytes(b"x" * 10)
    entry = read_entry(regular, limit=100)
    assert entry.content == b"x" * 10 and entry.inode == os.stat(regular).st_ino
    assert read_entry(regular, limit=4).content == b"xxxxx", "at most limit + 1 bytes: the caller sees it is over"

    (tmp_path / "link.toml").symlink_to(regular)
    (tmp_path / "hard.toml").hardlink_to(tmp_path / "a.toml")
    os.mkfifo(tmp_path / "pipe.toml")  # opened without blocking, then refused
    (tmp_path / "folder.toml").mkdir()
    kinds = {}
    for name in ("link.toml", "hard.toml", "pipe.toml", "folder.toml"):
        with pytest.raises(UnsafeEntry) as refused:
            read_entry(tmp_path / name, limit=100)
        kinds[name] = refused.value.kind
    assert kinds == {"link.toml": "symlink", "hard.toml": "hard link", "pipe.toml": "fifo", "folder.toml": "directory"}
