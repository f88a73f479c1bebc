"""Remote and input faults of reliability.md B8 not covered elsewhere: a remote job that vanishes, a
job the service fails as a whole, one manifest hard-linked into the inbox under two names."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from batchd.journal import Journal, journal_path
from batchd.testing import DaemonRunner, Emulator, Workspace
from invariants import Dropped, assert_invariants
from sinks import ReservedPort
from test_daemon import TRANSLATE, remote_jobs


def test_a_remote_job_that_disappears_fails_its_requests_and_is_never_recreated(workspace: Workspace,
                                                                               tmp_path: Path):
    with Emulator(tmp_path / "google", job_seconds=60) as google:
        runner = DaemonRunner(workspace)
        process = runner.start(emulator=google)
        try:
            workspace.drop("translate.toml", TRANSLATE)
            [job] = workspace.wait_for(lambda: list(google.client().batches.list()), what="the remote job")
            google.client().batches.delete(name=job.name)  # someone else deleted it
            folder = workspace.wait_for_delivery("translate")
        finally:
            assert process.stop() == 0
        assert list(google.client().batches.list()) == [], "the vanished job was created again"
    assert folder.state == "failed"
    assert {line["error"]["code"] for line in folder.results} == {"remote_missing"}
    assert len(folder.results) == 4


def test_a_job_the_service_fails_is_delivered_failed_with_every_request_an_error(workspace: Workspace,
                                                                                daemon: DaemonRunner):
    workspace.configure(faults=["job-failed"])
    dropped = [Dropped.of(workspace.drop("translate.toml", TRANSLATE))]

    run = daemon.run_once()

    assert run.returncode == 1, run.stderr
    folder = run.outbox["translate"]
    assert folder.state == "failed" and folder.summary["counts"] == {"total": 4, "succeeded": 0, "failed": 4}
    assert all(line["status"] == "error" and line["error"] for line in folder.results)
    assert_invariants(workspace, dropped, remote_jobs(workspace))


def test_one_manifest_hard_linked_under_two_names_is_never_run(workspace: Workspace, daemon: DaemonRunner):
    """A name with another name beside it could be changed through that one after batchd checked it:
    neither runs (nothing is billed), both are kept whole in their rejected folders."""
    first = workspace.drop("first.toml", TRANSLATE)
    os.link(first, workspace.inbox / "second.toml")

    run = daemon.run_once()

    delivered = workspace.delivered()
    assert sorted(summary["state"] for summary in delivered.values()) == ["rejected", "rejected"], run.stderr
    assert {summary["error"]["kind"] for summary in delivered.values()} == {"hard link"}
    assert remote_jobs(workspace) == []
    assert os.listdir(workspace.inbox) == []


def test_a_service_unreachable_at_start_up_does_not_stop_recovery_or_the_daemon(workspace: Workspace,
                                                                                tmp_path: Path, request):
    """A restart after a crash needs batches.list to reconcile; with the API down the daemon stays up
    (no crash loop under systemd) and reconciles once the service answers again."""
    workspace.configure(chunk_max_requests=2)
    # The port stays reserved while the service is down: no other test's server (all of them take
    # the same API key) may answer there, nor take it before the service comes back.
    port = ReservedPort()
    request.addfinalizer(port.close)
    runner = DaemonRunner(workspace)
    with Emulator(tmp_path / "google", port=port.port) as google:
        workspace.drop("translate.toml", TRANSLATE)
        crashed = runner.start(emulator=google, BATCHD_CRASH_AT="after-create")
        assert crashed.wait(120) == -9
        base_url = google.base_url
    # The service is down: the daemon restarts with creates to reconcile and nothing answering.
    env = {"BATCHD_PROVIDER": "gemini", "GEMINI_API_KEY": "test-key", "GOOGLE_GEMINI_BASE_URL": base_url}
    process = workspace.start("run", **env)
    workspace.wait_for(lambda: "retrying" in process.output() or process.poll() is not None,
                       what="a failed reconcile")
    assert process.poll() is None, f"the daemon gave up while the service was down:\n{process.output()[-3000:]}"
    with Emulator(tmp_path / "google", port=port.port) as google:
        folder = workspace.wait_for_delivery("translate")
        assert process.stop() == 0
        jobs = list(google.client().batches.list())
    assert folder.state == "succeeded"
    assert_invariants(workspace, [Dropped.of_text("translate.toml", TRANSLATE)], jobs)


def test_a_refused_api_key_pauses_submission_and_the_job_goes_once_the_key_is_fixed(workspace: Workspace,
                                                                                   tmp_path: Path):
    """A revoked or mistyped key is the operator's to fix: the job waits (never delivered as failed),
    the daemon stays up and says why, and after a restart with the right key it runs, once."""
    workspace.configure(settle_seconds=0, poll_interval=0.2, poll_max_interval=1.0)
    with Emulator(tmp_path / "google") as google:
        wrong = workspace.start("run", BATCHD_PROVIDER="gemini", GEMINI_API_KEY="not-the-key",
                                GOOGLE_GEMINI_BASE_URL=google.base_url)
        workspace.drop("translate.toml", TRANSLATE)
        workspace.wait_for(lambda: "refuses the API key" in wrong.output(), timeout=60, what="the refusal logged")
        assert wrong.poll() is None, "the daemon stays up"
        assert workspace.delivered() == {}, "the job waits; it is not delivered as failed"
        status = workspace.wait_for(lambda: "submissions paused" in (result := workspace.batchd("status")).stderr
                                    and result, timeout=30, what="the pause shown by batchd status")
        assert f"batchd (pid {wrong.pid}): submissions paused: the service refuses the API key" in status.stderr
        assert "translate" in status.stdout
        assert wrong.stop() == 0
        assert "Traceback" not in wrong.output()
        assert "paused" not in workspace.batchd("status").stderr, "a stopped daemon's notices are not shown"

        right = DaemonRunner(workspace).start(emulator=google)
        workspace.wait_for_delivery("translate")
        assert right.stop() == 0
        summary = workspace.delivered()["translate"]
        assert summary["state"] == "succeeded"
        created = list(google.client().batches.list(config={"page_size": 50}))
        assert len(created) == len(summary["remote_batches"]) == 1, "nothing was created twice"


@pytest.mark.slow  # about 4 s alone, 8 s on a loaded machine: three daemons and batchd status
def test_a_key_refused_while_a_create_is_unconfirmed_is_waited_out_not_a_crash_loop(workspace: Workspace,
                                                                                   tmp_path: Path):
    """Killed right after a create, batchd must ask the service whether the batch exists before it creates
    it again. Restarted with a revoked key, that question raised out of start-up on every restart; now it
    is one line, the daemon stays up with submissions paused, and with the key fixed the job is delivered
    from the batch already created, never a second one."""
    workspace.configure(settle_seconds=0, poll_interval=0.2, poll_max_interval=1.0)
    runner = DaemonRunner(workspace)
    with Emulator(tmp_path / "google") as google:
        workspace.drop("translate.toml", TRANSLATE)
        crashed = runner.start(emulator=google, BATCHD_CRASH_AT="after-create")
        assert crashed.wait(120) == -9, crashed.output()[-3000:]

        revoked = workspace.start("run", BATCHD_PROVIDER="gemini", GEMINI_API_KEY="a-revoked-key",
                                  GOOGLE_GEMINI_BASE_URL=google.base_url)
        status = workspace.wait_for(lambda: "submissions paused" in (result := workspace.batchd("status")).stderr
                                    and result, timeout=60, what="the pause shown by batchd status")
        assert "the service refuses the API key (API key not valid" in status.stderr, status.stderr
        time.sleep(1.5)  # a few polls, each reconciling again
        assert revoked.poll() is None, f"the daemon gave up:\n{revoked.output()[-3000:]}"
        assert revoked.stop() == 0
        output = revoked.output()
        assert "Traceback" not in output, output[-3000:]
        refused = [line for line in output.splitlines() if "refuses the API key" in line and "level=debug" not in line]
        assert len(refused) == 1, "one line, not one per poll:\n" + "\n".join(refused)
        assert "reconciling unconfirmed creates" in refused[0] and "fix GEMINI_API_KEY" in refused[0]
        assert workspace.delivered() == {}, "the job waits for the key"

        right = runner.start(emulator=google)
        folder = workspace.wait_for_delivery("translate")
        assert right.stop() == 0
        created = list(google.client().batches.list(config={"page_size": 50}))
    assert folder.state == "succeeded"
    assert len(created) == len(folder.summary["remote_batches"]) == 1, "nothing was created twice"


def test_a_key_refused_while_results_are_downloaded_is_waited_out_not_a_failed_job(workspace: Workspace):
    """The key is revoked (403) after the batch ran: its results are fetched again later, and the job is
    delivered succeeded once the service takes the key again, never failed for it."""
    workspace.configure(inline_max_requests=0, faults=["403*2@download"])  # file chunks: results are downloaded
    workspace.drop("translate.toml", TRANSLATE)

    result = workspace.batchd("run", "--once")

    assert result.returncode == 0, result.stderr[-3000:]
    assert workspace.delivered()["translate"]["state"] == "succeeded"
    assert "fetching the results of job" in result.stderr and "the service refuses the API key" in result.stderr
    assert "the service accepts the API key again" in result.stderr



@pytest.mark.slow  # about 10 s: a daemon kept waiting on a quota that never comes back
def test_a_quota_refusal_is_waited_out_visibly_once_per_wait_not_as_a_submitted_job(workspace: Workspace):
    """429 RESOURCE_EXHAUSTED on create: nothing was created, so the chunks wait 'built' for as long as the
    service asks (its RetryInfo: 2 s from the emulator); the log says so once per wait, not once per
    refused create, and `batchd status` shows the wait with its countdown."""
    workspace.configure(faults=["429@create"], chunk_max_requests=1)  # four chunks, each create refused
    daemon = workspace.start("run")
    try:
        workspace.drop("translate.toml", TRANSLATE)
        started = time.monotonic()
        workspace.wait_for(lambda: "waiting: quota" in daemon.output(), timeout=60, what="the quota wait logged")
        status = workspace.wait_for(lambda: "waiting: quota" in (result := workspace.batchd("status")).stderr
                                    and result, timeout=30, what="the quota wait shown by batchd status")
        assert re.search(rf"batchd \(pid {daemon.pid}\): waiting: quota \(429 RESOURCE_EXHAUSTED on create\), "
                         r"(retry in \d+ s|retrying now)", status.stderr), status.stderr
        assert daemon.poll() is None and workspace.delivered() == {}
    finally:
        assert daemon.stop() == 0
    elapsed = time.monotonic() - started
    waits = re.findall(r"level=warning .*refused: quota exhausted .*waiting: quota, uploads and creates retry in "
                       r"(\d+) s", daemon.output())
    assert waits and all(int(wait) >= 2 for wait in waits), "the service's RetryInfo is honoured"
    assert len(waits) <= 1 + elapsed / 2, f"{len(waits)} log lines in {elapsed:.0f} s: one per wait"
    assert "will reconcile" not in daemon.output(), "a refused create is known not to exist"


def test_a_service_that_fails_every_poll_is_polled_at_the_poll_clock_not_in_a_loop(workspace: Workspace):
    """A create whose outcome is unknown (a 503: the batch may exist) has its display name watched, and the
    list is read for it. With every list failing too (an outage), the failed look was not counted as a look:
    the next poll started at the next tick, about 1,400 polls and log lines a second, until the service was
    back. The polls now wait for the poll clock, as any failed poll does, and a run of failures is said once."""
    import json
    import urllib.request

    def lists() -> int:
        with urllib.request.urlopen(f"{emulator_url}/_emulator/stats") as answer:  # not the Gemini API
            return json.load(answer)["routes"].get("list", 0)

    workspace.configure(poll_interval=0.2, poll_max_interval=1, faults=["503@create", "503@list"])
    daemon = workspace.start("run")
    try:
        workspace.drop("translate.toml", TRANSLATE)
        workspace.wait_for(lambda: "will reconcile" in daemon.output(), timeout=60, what="the create failed")
        emulator_url = re.search(r"embedded emulator at (http://\S+)", daemon.output())[1]
        before = lists()
        time.sleep(4)
        polls = lists() - before
        assert daemon.poll() is None
    finally:
        assert daemon.stop() == 0
    assert 1 <= polls <= 12, f"{polls} lists in 4 s (poll_interval 0.2 s, poll_max_interval 1 s)"
    # Said once (then every ten minutes while it lasts), not at every poll.
    assert daemon.output().count("polling failed") == 1, daemon.output()[-3000:]


def test_creates_failing_through_an_outage_are_said_once_then_summed_up_not_once_per_chunk(workspace: Workspace):
    """Twenty jobs sent while every create fails with an unknown outcome (here a 503: the batch may exist):
    each is reconciled (found by its name, or sent again), and the log says the first failure in full, then
    that creates go through again and after how many failures, instead of a WARNING per chunk (thousands
    under a burst). Every job is delivered, each from one remote batch."""
    workspace.configure(pack_jobs_below=0, faults=["503*20@create"])
    dropped = [Dropped.of(workspace.drop(f"t{n:02d}.toml", TRANSLATE.replace("Hello", f"Hello {n}")))
               for n in range(20)]
    run = workspace.batchd("run", "--once")
    said = run.stderr
    assert run.returncode == 0, said[-3000:]
    assert said.count("will reconcile") == 1, said[-3000:]
    assert "further such failures are summed up every 60 s" in said
    failed = int(re.search(r"takes uploads and creates again, after (\d+) failed", said)[1])
    assert 2 <= failed <= 20
    report = assert_invariants(workspace, dropped, remote_jobs(workspace))
    assert report["folders"] == 20


def test_fetches_failing_for_a_while_are_said_once_then_their_end(workspace: Workspace):
    """Ten finished batches whose results cannot be fetched for a while (every get answers 503, each tried
    again at the next poll): the first failure is said in full, the end of the run with its count, not a
    WARNING per chunk per poll. Every job is delivered."""
    workspace.configure(pack_jobs_below=0, faults=["503*60@get"])  # (the SDK tries a get 5 times)
    dropped = [Dropped.of(workspace.drop(f"t{n:02d}.toml", TRANSLATE.replace("Hello", f"Hello {n}")))
               for n in range(10)]
    run = workspace.batchd("run", "--once")
    said = run.stderr
    assert run.returncode == 0, said[-3000:]
    assert said.count("fetching chunk") == 1 and "further such failures are summed up every 60 s" in said, said[-3000:]
    failed = int(re.search(r"results are fetched again, after (\d+) failed fetches", said)[1])
    assert 2 <= failed <= 12
    assert assert_invariants(workspace, dropped, remote_jobs(workspace))["folders"] == 10


@pytest.mark.slow
def test_a_service_that_never_answers_the_poll_holds_neither_other_jobs_nor_a_stop(workspace: Workspace):
    """The poll's list is read in a thread of its own: a service that takes it and does not answer (here
    for 30 s, the emulator's sleep on every list) holds no claim or create of another job meanwhile, and
    no stop; the call gives up after ASKED_ONCE_TIMEOUT_SECONDS and the poll says so. Before, the loop
    waited in the list: a manifest dropped then was submitted only once the call had timed out, and a
    stop waited for it too."""
    from batchd.provider import ASKED_ONCE_TIMEOUT_SECONDS

    workspace.configure(job_seconds=600, faults=["slow=30@list"])
    process = workspace.start("run")
    try:
        workspace.drop("translate.toml", TRANSLATE)
        workspace.wait_for(lambda: "submitted" in process.output(), what="the remote job")
        time.sleep(1.0)  # the first poll's list is on its way, and is not answered
        workspace.drop("second.toml", TRANSLATE + "force = true\n")
        waited = seconds_until(workspace, lambda: submitted(workspace, "second"), "the second job submitted")
        assert waited < ASKED_ONCE_TIMEOUT_SECONDS - 4, process.output()[-2000:]
        workspace.wait_for(lambda: "polling failed" in process.output(), timeout=ASKED_ONCE_TIMEOUT_SECONDS + 20,
                           what="the list given up after its timeout")
        time.sleep(1.0)  # the next poll's list is on its way, and is not answered either
    finally:
        stops_within(process, 5)


@pytest.mark.slow
def test_a_start_with_an_unconfirmed_create_waits_for_no_list(workspace: Workspace):
    """Killed right after a create, batchd restarts while every list takes the service 30 s: new manifests
    are claimed and submitted at once, the unconfirmed create waits for the poll's list in the poll's
    thread, and a stop takes no time. Restarted with a prompt service, the job is delivered from the batch
    created before the kill, never a second one. Before, the start read the list itself, before READY and
    before any claim, until the call's timeout (10 s)."""
    workspace.configure(settle_seconds=0)
    workspace.drop("translate.toml", TRANSLATE)
    crashed = workspace.start("run", BATCHD_CRASH_AT="after-create")
    assert crashed.wait(120) == -9, crashed.output()[-3000:]
    workspace.configure(settle_seconds=0, faults=["slow=30@list"])
    started = time.monotonic()
    process = workspace.start("run")
    try:
        workspace.drop("second.toml", TRANSLATE + "force = true\n")
        workspace.wait_for(lambda: submitted(workspace, "second"), what="the second job submitted")
        assert time.monotonic() - started < 6, process.output()[-2000:]
        journal = Journal(journal_path(workspace.state), readonly=True)
        try:  # its create is still unconfirmed: the list has not answered
            [job] = journal.find_jobs("translate")
            assert [chunk.state for chunk in journal.chunks(job.id)] == ["submitting"]
        finally:
            journal.close()
    finally:
        stops_within(process, 5)
    workspace.configure(settle_seconds=0)
    assert workspace.batchd("run", "--once").returncode == 0
    summary = workspace.delivered()["translate"]
    assert summary["state"] == "succeeded" and len(summary["remote_batches"]) == 1, summary


def submitted(workspace: Workspace, name: str) -> bool:
    return any(job["name"] == name and job["state"] == "submitted" for job in workspace.status())


def cancelling_while_the_service_is_slow(workspace: Workspace, seconds: float, **settings):
    """A running daemon whose one job (translate) is being cancelled while the service takes ``seconds`` to
    answer each cancel: the cancels are on their way, and not answered yet."""
    workspace.configure(job_seconds=600, faults=[f"slow={seconds:g}@cancel"], **settings)
    process = workspace.start("run")
    try:
        workspace.drop("translate.toml", TRANSLATE)
        workspace.wait_for(lambda: submitted(workspace, "translate"), what="the job's remote jobs")
        assert workspace.batchd("cancel", "translate").returncode == 0
        time.sleep(1.0)
    except BaseException:
        process.kill()
        raise
    return process


def stops_within(process, seconds: float) -> None:
    """A SIGTERM ends ``process`` with exit code 0 within ``seconds`` (else it is killed and the test fails)."""
    try:
        stop_asked = time.monotonic()
        assert process.stop(timeout=60) == 0
        assert time.monotonic() - stop_asked < seconds, process.output()[-2000:]
    finally:
        if process.poll() is None:
            process.kill()


def seconds_until(workspace: Workspace, predicate, what: str) -> float:
    """How long from now until ``predicate`` holds (``Workspace.wait_for`` bounds it against a hang)."""
    started = time.monotonic()
    workspace.wait_for(predicate, what=what)
    return time.monotonic() - started


@pytest.mark.slow
def test_cancels_the_service_is_slow_to_answer_hold_no_other_job(workspace: Workspace):
    """A job of four chunks is cancelled while every cancel takes the service 3 s: the four go out from the
    cancel pool together, and a manifest dropped meanwhile is submitted at once. Before, the loop sent
    them one after the other and waited for each: 12 s in which no other job moved."""
    process = cancelling_while_the_service_is_slow(workspace, 3, chunk_max_requests=1)
    try:
        workspace.drop("second.toml", TRANSLATE + "force = true\n")
        waited = seconds_until(workspace, lambda: submitted(workspace, "second"), "the second job submitted")
        assert waited < 5, process.output()[-2000:]
        assert workspace.wait_for_delivery("translate").summary["state"] == "cancelled"
    finally:
        assert process.stop() == 0


@pytest.mark.slow
def test_a_model_list_the_service_is_slow_to_answer_holds_no_other_job(workspace: Workspace):
    """Admission asks for the model list in a thread of its own: while the service takes 8 s to answer it,
    a manifest that needs no model check (it names no task batchd has) is rejected and delivered at once,
    and the job that waits for the list goes on once it has come. Before, the loop waited in the list."""
    workspace.configure(faults=["slow=8@model-list"])
    process = workspace.start("run")
    try:
        workspace.drop("translate.toml", TRANSLATE)
        time.sleep(1.0)  # its model is being looked up, and the list is not answered
        workspace.drop("bad.toml", 'task = "no-such-task"\ntexts = ["one"]\n')
        waited = seconds_until(workspace, lambda: "bad" in workspace.outbox_folders(), "the bad manifest delivered")
        assert waited < 4, process.output()[-2000:]
        assert workspace.outbox_folder("bad").summary["state"] == "rejected"
        assert workspace.wait_for_delivery("translate").summary["state"] == "succeeded"
    finally:
        assert process.stop() == 0


@pytest.mark.slow
def test_a_cancel_the_service_never_answers_holds_no_stop(workspace: Workspace):
    """The monitor's calls run on daemon threads: a stop while a cancel waits for a service that does not
    answer (here for 30 s) is prompt, and exits 0. On a ThreadPoolExecutor's threads, joined at exit, it
    waited for the call's timeout (10 s)."""
    stops_within(cancelling_while_the_service_is_slow(workspace, 30), 5)


def test_a_service_gone_unreachable_holds_neither_the_loop_nor_a_stop(workspace: Workspace, tmp_path: Path):
    """The loop's own calls (the poll's list, a cancel) go out once and are paced by the loop: with the
    service unreachable and the shipped retry settings, a stop is prompt, where one poll sitting in the
    SDK's backoff (1 + 2 + 4 + 8 s) held the loop, and the stop, for 15 s."""
    workspace.configure(retry={"initial_seconds": 1.0, "max_seconds": 60.0})
    with Emulator(tmp_path / "google", job_seconds=600) as google:
        runner = DaemonRunner(workspace)
        process = runner.start(emulator=google)
        workspace.drop("translate.toml", TRANSLATE)
        workspace.wait_for(lambda: list(google.client().batches.list()), what="the remote job")
    time.sleep(1.0)  # the service is gone: the daemon's polls are refused meanwhile
    stops_within(process, 8)
    assert "polling failed" in process.output()
