"""Bounded work: a burst of manifests runs on a fixed number of threads, jobs wait their turn in the
journal oldest first, and one job of many chunks does not hold back the small ones."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from batchd.config import load_settings
from batchd.daemon import Daemon
from batchd.daemon.admit import RATIO_MIN_CHARS, TokenCounter
from batchd.daemon.context import DaemonThreads, Workers
from batchd.journal import Journal, journal_path
from batchd.states import JOB_STATES_WITH_REMOTE_WORK, REMOTE_LIVE_CHUNK_STATES, JobState, StrayOutcome
from batchd.testing import Workspace


def small(n: int) -> str:
    return f'task = "sentiment"\ntexts = ["Order {n} arrived.", "Order {n} was late."]\n'


def run_in_process(daemon: Daemon, done, timeout: float = 120) -> int:
    """Tick the daemon's loop in this process until ``done()``; returns the most threads seen."""
    most = 0
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out"
        daemon.loop.tick()
        most = max(most, threading.active_count())
        daemon.inbox.wait(min(daemon.loop.sleep_seconds(), 0.05))
    return most


def test_a_burst_of_jobs_runs_on_a_fixed_number_of_threads(workspace: Workspace):
    """60 jobs, pools of 2: the threads stay within what the pools allow (before, every admitted job
    started a build thread and an estimate of its own), and every job is delivered."""
    workspace.configure(settle_seconds=0, max_concurrent_builds=2, max_concurrent_submissions=2,
                        max_concurrent_writes=2, job_seconds=0)
    for n in range(60):
        workspace.drop(f"job{n:02}.toml", small(n))
    daemon = Daemon(load_settings(workspace.config), once=True)
    before = threading.active_count()
    daemon.start()
    try:
        most = run_in_process(daemon, lambda: len(workspace.outbox_folders()) == 60)
    finally:
        daemon.close()
    # builds 2 (+2 estimates, each reading in one more thread) + submit 2 + fetch 2 + write 2 (+2 organize)
    # + delete 1 + cleanup 1, the watcher, the notification workers and the emulator's pipe reader.
    assert most - before <= 30, most - before
    summaries = [folder.summary for folder in workspace.outbox_folders().values()]
    assert {summary["state"] for summary in summaries} == {"succeeded"}
    # The first jobs' counts measure a ratio the others are priced with, and their estimates say so.
    methods = {summary["cost"]["estimate_details"]["method"].split(":")[0] for summary in summaries}
    assert "countTokens" in methods and any(m.startswith("countTokens ratio (") for m in methods), methods


def test_a_thread_freed_in_a_tick_goes_to_the_next_in_line_in_that_tick(workspace: Workspace):
    """One build thread, three jobs: the tick whose visit ends a build also starts the next job's, instead of
    leaving the thread idle for a tick. A job is visited again within a tick only if the tick did not
    change it: a change's next step waits for the commit (what it intends is durable first)."""
    workspace.configure(settle_seconds=0, max_concurrent_builds=1, job_seconds=0)
    for n in range(3):
        workspace.drop(f"job{n}.toml", small(n))
    daemon = Daemon(load_settings(workspace.config), once=True)
    daemon.start()
    tick = 0
    visits: list[tuple[int, object]] = []  # (tick, the job as its visit read it)
    built_in: dict[str, int] = {}  # job id → the tick it was built in
    building_in: dict[str, int] = {}  # job id → the tick its build started in
    advance, update_job = daemon.loop.advance, daemon.journal.update_job

    def recorded_advance(job):
        visits.append((tick, job))
        advance(job)

    def recorded_update(job_id, **fields):
        if fields.get("state") == JobState.BUILT:
            built_in.setdefault(job_id, tick)
        if fields.get("state") == JobState.BUILDING:
            building_in.setdefault(job_id, tick)
        update_job(job_id, **fields)

    daemon.loop.advance, daemon.journal.update_job = recorded_advance, recorded_update
    try:
        deadline = time.monotonic() + 60
        while len(workspace.outbox_folders()) < 3:
            assert time.monotonic() < deadline, "timed out"
            tick += 1
            daemon.loop.tick()
            daemon.inbox.wait(min(daemon.loop.sleep_seconds(), 0.05))
    finally:
        daemon.close()
    jobs = sorted(built_in, key=built_in.get)
    assert len(jobs) == 3, built_in
    for earlier, later in zip(jobs, jobs[1:]):
        assert building_in[later] == built_in[earlier], (building_in, built_in)
    seen: dict[tuple[int, str], object] = {}
    for at, job in visits:
        before = seen.setdefault((at, job.id), job)
        assert before == job, f"visited again in tick {at} after the tick changed it: {before} → {job}"


def test_a_burst_is_claimed_from_one_listing_of_the_inbox_and_a_file_changed_since_settles_again(
        workspace: Workspace, monkeypatch):
    """Claims are bounded per tick (CLAIMS_PER_TICK); the ticks after the first take the rest from the
    listing they were in instead of listing the inbox again each time (a burst of thousands made that
    the square of its size). A file written to since it was listed is not taken from that listing: it
    settles again and is claimed as it is then."""
    import batchd.daemon.intake as intake

    monkeypatch.setattr(intake, "RELIST_SECONDS", 3600.0)
    workspace.configure(settle_seconds=0, job_seconds=0)
    count = 2 * intake.CLAIMS_PER_TICK + 10
    for n in range(count):
        workspace.drop(f"job{n:03}.toml", small(n))
    daemon = Daemon(load_settings(workspace.config), once=True)
    daemon.start()
    listings = []
    scan = daemon.inbox.scan
    daemon.inbox.scan = lambda: listings.append(1) or scan()
    try:
        daemon.loop.tick()
        assert len(listings) == 1 and len(list(workspace.inbox.iterdir())) == count - intake.CLAIMS_PER_TICK
        changed = workspace.inbox / f"job{count - 1:03}.toml"
        changed.write_text(small(count - 1) + '# edited after the listing\n')
        daemon.loop.tick()
        assert len(listings) == 1, "the second tick claims from the first listing"
        daemon.loop.tick()
        assert [path.name for path in workspace.inbox.iterdir()] == [changed.name], "left to settle again"
        run_in_process(daemon, lambda: len(workspace.outbox_folders()) == count)
    finally:
        daemon.close()
    folder = workspace.outbox_folders()[changed.stem]
    assert "edited after the listing" in (folder.path / changed.name).read_text()


@pytest.mark.slow
def test_jobs_take_their_turn_oldest_first_and_a_big_job_does_not_starve_small_ones(workspace: Workspace):
    """A job of 30 one-request chunks arrives first, then 6 small jobs: with 2 submission threads and
    creates that take a while, the small jobs each get a turn before the big job has sent all its
    chunks (before, the oldest job took every thread that freed up)."""
    workspace.configure(settle_seconds=0, max_concurrent_builds=8, max_concurrent_submissions=2,
                        chunk_max_requests=1, job_seconds=0, faults=["slow=0.3@create"])
    texts = ", ".join(f'"text {n}"' for n in range(30))
    workspace.drop("big.toml", f'task = "sentiment"\ntexts = [{texts}]\n')
    time.sleep(0.01)  # the big job's mtime is older: it is claimed first
    daemon = Daemon(load_settings(workspace.config), once=True)
    daemon.start()
    try:
        run_in_process(daemon, lambda: daemon.journal.count_jobs([JobState.BUILT, JobState.SUBMITTED]) >= 1)
        for n in range(6):
            workspace.drop(f"small{n}.toml", small(n))
        run_in_process(daemon, lambda: len(workspace.outbox_folders()) == 7)
    finally:
        daemon.close()
    journal = Journal(journal_path(workspace.state), readonly=True)
    try:
        (big,) = journal.find_jobs("big")
        intents = sorted(c.intent_at for c in journal.chunks(big.id))
        smalls = [journal.find_jobs(f"small{n}")[0] for n in range(6)]
        first_small_intents = [journal.chunks(job.id)[0].intent_at for job in smalls]
    finally:
        journal.close()
    assert max(first_small_intents) < intents[-1], "the small jobs waited for every chunk of the big one"


class CountingProvider:
    """Stands for batchd's provider in a unit test of the counter's arithmetic (no service involved)."""

    def __init__(self) -> None:
        self.calls = 0

    def count_tokens(self, model: str, texts: list[str]) -> int:
        self.calls += 1
        return sum(len(text) for text in texts) // 4


def test_small_jobs_are_counted_with_a_ratio_a_larger_count_measured():
    provider = CountingProvider()
    counter = TokenCounter(lambda: provider).for_model("gemini-2.5-flash")
    assert counter(["a few words"]) == 2 and provider.calls == 1, "no ratio yet: the service counts"
    assert counter.method == "countTokens"
    assert counter(["x" * 4000]) == 1000 and provider.calls == 2, "a large sample is always counted"
    assert counter(["y" * 400]) == 100 and provider.calls == 2, "a small one is priced with its ratio"
    assert counter.method == "countTokens ratio (4.00 characters a token)", "the estimate says no call was made"
    other = TokenCounter(lambda: provider).for_model("gemini-2.5-pro")
    other(["z" * 40])
    assert provider.calls == 3, "a ratio is per model"


def test_a_burst_of_small_jobs_counts_only_until_their_counts_make_a_ratio():
    # Each job is far below RATIO_MIN_CHARS: the first ones are counted, and together they measure
    # the ratio the rest are priced with (a burst of thousands must not make a countTokens call each).
    provider = CountingProvider()
    counter = TokenCounter(lambda: provider).for_model("gemini-2.5-flash")
    prompts = [["order %03d arrived late and the box was damaged" % n, "x" * 150] for n in range(200)]
    tokens = [counter(prompt) for prompt in prompts]
    per_job = sum(len(text) for text in prompts[0])
    assert provider.calls == -(-RATIO_MIN_CHARS // per_job), "counted until the counts cover RATIO_MIN_CHARS"
    assert tokens[-1] == round(per_job / 4), "the rest priced with the measured ratio"


def test_uploads_are_bounded_apart_from_creates(workspace: Workspace):
    """Each upload holds an 8 MiB part of its requests file in memory: with 4 submission threads and
    ``max_concurrent_uploads = 1``, a job of six file chunks uploads one at a time (its chunks wait in
    the journal, not in a queue) and is delivered whole."""
    workspace.configure(settle_seconds=0, max_concurrent_submissions=4, max_concurrent_uploads=1,
                        chunk_max_requests=2, inline_max_requests=0, job_seconds=0)
    texts = ", ".join(f'"Order {n} arrived."' for n in range(12))
    workspace.drop("many.toml", f'task = "sentiment"\ntexts = [{texts}]\n')
    daemon = Daemon(load_settings(workspace.config), once=True)
    daemon.start()
    submit = daemon.steps.submit
    most_uploads = 0
    try:
        deadline = time.monotonic() + 60
        while not workspace.outbox_folders():
            assert time.monotonic() < deadline, "timed out"
            daemon.loop.tick()
            running = list(submit.submissions.running.values())
            most_uploads = max(most_uploads, sum(work.about == "upload" for work in running))
            daemon.inbox.wait(min(daemon.loop.sleep_seconds(), 0.05))
    finally:
        daemon.close()
    assert most_uploads == 1
    folder = workspace.outbox_folder("many")
    assert folder.summary["state"] == "succeeded" and len(folder.summary["remote_batches"]) == 6


def test_remote_batches_stay_within_max_remote_batches_and_the_rest_wait_their_turn(workspace: Workspace, caplog):
    """Google runs 100 batch jobs per project at once and refuses more creates with 429. With an
    emulator as strict at 2 and ``max_remote_batches = 2``, twelve chunks go two at a time: never more
    than two are pending or running, no create is refused, and every job is delivered."""
    workspace.configure(settle_seconds=0, chunk_max_requests=1, max_remote_batches=2, job_seconds=0.3,
                        emulator={"concurrent_batches": 2})
    caplog.set_level(logging.INFO, logger="batchd")
    for n in range(6):
        workspace.drop(f"job{n}.toml", small(n))
    daemon = Daemon(load_settings(workspace.config), once=True)
    daemon.start()
    most_live, notices = 0, set()
    try:
        deadline = time.monotonic() + 120
        while len(workspace.outbox_folders()) < 6:
            assert time.monotonic() < deadline, "timed out"
            daemon.loop.tick()
            most_live = max(most_live, daemon.journal.count_chunks_in(
                REMOTE_LIVE_CHUNK_STATES, job_states=JOB_STATES_WITH_REMOTE_WORK))
            notices.update(notice for notice in daemon.notices() if isinstance(notice, str))
            daemon.inbox.wait(min(daemon.loop.sleep_seconds(), 0.05))
    finally:
        daemon.close()
    assert most_live == 2, most_live
    assert {folder.summary["state"] for folder in workspace.outbox_folders().values()} == {"succeeded"}
    assert not [r for r in caplog.records if "quota" in r.getMessage()], "a create went beyond the limit"
    assert any("wait their turn" in r.getMessage() for r in caplog.records), "the limit was never logged"
    assert any("as many as max_remote_batches allows" in notice for notice in notices), notices


def test_a_stray_whose_cancel_was_not_taken_yet_counts_against_max_remote_batches(workspace: Workspace):
    """A stray (a late duplicate under one of our names) runs, and counts against Google's 100, until its
    cancel is taken: until then it takes a place under ``max_remote_batches``; once cancelled, none."""
    workspace.configure(max_remote_batches=2)
    daemon = Daemon(load_settings(workspace.config))
    daemon.start()
    try:
        journal, submit = daemon.journal, daemon.steps.submit
        submit.collect()  # a tick's count starts afresh
        assert submit.remote_room() == 2
        journal.record_stray("batches/late", job_id="20261204000000-abcdef", chunk_idx=0,
                             display_name="batchd-x-20261204000000-abcdef-c0", outcome=StrayOutcome.CANCELLING)
        submit.collect()
        assert submit.remote_room() == 1
        journal.set_remote_outcome("batches/late", StrayOutcome.CANCELLED)
        submit.collect()
        assert submit.remote_room() == 2
    finally:
        daemon.close()


def test_work_taken_off_a_pool_marks_its_job_again():
    """The mark a finished piece makes (``on_done``) can be spent by a visit in the tick whose collect ran
    just before the piece ended: that visit still finds it running. Taking it off the pool marks the job
    again, or a step that keeps the outcome in memory (a writer's, an estimate's) waits for the sweep."""
    ready: set[str] = set()
    release = threading.Event()
    workers = Workers("test", 1, on_done=lambda key, future: ready.add(key), on_taken=ready.add)
    try:
        workers.start("job", release.wait)
        assert workers.finished() == []  # a tick's collect: the piece still runs
        release.set()
        deadline = time.monotonic() + 10
        while "job" not in ready:  # it ended and marked its job
            assert time.monotonic() < deadline
            time.sleep(0.001)
        ready.clear()  # the same tick's visit took the mark, and found the piece still running
        [piece] = workers.finished()  # the next tick's collect takes it
        assert piece.key == "job" and ready == {"job"}, "nothing will visit the job until the sweep"
    finally:
        workers.shutdown()


def test_daemon_threads_run_every_piece_on_at_most_their_size_and_a_stop_waits_for_none():
    """The pool of calls a stop need not wait for (batchd.daemon.context.DaemonThreads): bounded, every
    piece runs, and shutting it down returns at once while a piece still runs."""
    from batchd.daemon.context import DaemonThreads

    pool = DaemonThreads(2, "bounded-test")
    release, done, names = threading.Event(), [], set()

    def piece(n: int) -> None:
        names.add(threading.current_thread().name)
        release.wait(10)
        done.append(n)

    for n in range(6):
        pool.submit(lambda n=n: piece(n))
    deadline = time.monotonic() + 10
    while len(names) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)  # both threads take a piece (and then wait in it)
    threads = [t for t in threading.enumerate() if t.name.startswith("bounded-test_")]
    assert len(threads) == 2 and all(t.daemon for t in threads) and names == {t.name for t in threads}
    started = time.monotonic()
    pool.shutdown(wait=True)
    assert time.monotonic() - started < 0.5, "a stop waited for a running piece"
    release.set()
    deadline = time.monotonic() + 10
    while len(done) < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(done) == list(range(6))
    for thread in threads:
        thread.join(5)
    assert not any(t.is_alive() for t in threads), "each thread ends once the work queued before the stop is done"


def test_a_service_keeps_no_record_per_job_it_delivered(workspace: Workspace):
    """A service delivers for months: its run report (what ``run --once`` sums up) counts outcomes, and keeps
    no job's id or manifest name. Before, it kept both for every job delivered, for as long as the process
    ran (about 200 bytes a job). The daemon's other per-job memory is bounded caches (``KEPT_JOBS`` rows,
    ``SPOOLS_REMEMBERED`` spools)."""
    workspace.configure(settle_seconds=0, job_seconds=0)
    daemon = Daemon(load_settings(workspace.config), once=False)
    daemon.start()
    try:
        for n in range(50):
            workspace.drop(f"job{n:02}.toml", small(n))
        run_in_process(daemon, lambda: len(workspace.outbox_folders()) == 50)
        assert daemon.report.outcomes == {"succeeded": 50}
        assert daemon.report.sources == set()
    finally:
        daemon.close()
