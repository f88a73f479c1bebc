"""Job events through the daemon: the log, webhook and email plugins, isolation, at-least-once delivery."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import signal
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import pluggy
import pytest

from batchd import hookimpl, hookspecs
from batchd.config import Settings
from batchd.events import BATCH_MAX, HANDED_MAX, EventDispatcher
from batchd.journal import Journal, journal_path
from batchd_plugins import notify_webhook
from batchd.testing import Workspace
from sinks import HttpSink, SmtpSink
from test_daemon import TRANSLATE

SECRET = "webhook-secret-for-tests"
#: Quick retries, so a test sees several attempts within a second or two.
FAST_RETRIES = {"retry_initial_seconds": 0.1, "retry_max_seconds": 0.4, "timeout_seconds": 5}

RECORDER = '''
import json, os
from batchd import hookimpl

@hookimpl
def job_event(event):
    with open(os.environ["RECORD_EVENTS_TO"], "a") as out:
        out.write(json.dumps(event) + "\\n")
'''
RAISING = '''
from batchd import hookimpl

@hookimpl
def job_event(event):
    raise RuntimeError("boom on " + event["kind"])
'''
HANGING = '''
import time
from batchd import hookimpl

@hookimpl
def job_event(event):
    time.sleep(3600)
'''


def deliveries(ws: Workspace) -> list[dict]:
    """Every event in the journal with its delivery rows by plugin."""
    journal = Journal(journal_path(ws.state), readonly=True)
    try:
        return journal.events()
    finally:
        journal.close()


def recorded(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def without_progress(events: list[dict]) -> list[dict]:
    """The events but ``progress``: how many there are depends on where the polls fall in a run."""
    return [event for event in events if event["kind"] != "progress"]


def with_plugins(ws: Workspace, **plugins: str) -> None:
    """One-off plugins in the workspace's plugins_dir, by name."""
    for name, source in plugins.items():
        ws.add_plugin(name, source)


def assert_signed(received) -> None:
    expected = "sha256=" + hmac.new(SECRET.encode(), received.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(received.headers["X-Batchd-Signature"], expected)
    assert received.headers["X-Batchd-Event-Id"] == received.event["id"]


def test_hook_job_event_log_plugin_writes_one_structured_line_per_event(workspace: Workspace):
    workspace.configure(chunk_max_requests=2, log_format="json")
    workspace.drop("translate.toml", TRANSLATE)

    result = workspace.batchd("run", "--once")

    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines()]
    lines = [record for record in records if record["logger"] == "batchd.notify"]
    assert [line["kind"] for line in lines] == ["accepted", "submitted", "progress", "succeeded"]
    assert [line["event"] for line in lines] == [entry["event"]["id"] for entry in deliveries(workspace)]
    assert lines[-1]["msg"] == "job translate succeeded" and lines[-1]["job_name"] == "translate"
    final = lines[-1]
    assert final["counts"] == {"total": 4, "succeeded": 4, "failed": 0}
    assert Path(final["outbox"]) == workspace.outbox / "translate"
    assert final["cost"]["actual"] > 0 and final["cost"]["currency"] == "USD"
    assert all(entry["deliveries"]["log"]["state"] == "sent" for entry in deliveries(workspace))


def test_hook_job_event_webhook_posts_signed_events(workspace: Workspace):
    with HttpSink() as sink:
        workspace.configure(chunk_max_requests=2, notify={"webhook": {"urls": [sink.url], "secret": SECRET}})
        workspace.drop("translate.toml", TRANSLATE)

        result = workspace.batchd("run", "--once")

    assert result.returncode == 0, result.stderr
    posts = sink.accepted()
    assert [post.event["kind"] for post in posts] == ["accepted", "submitted", "progress", "succeeded"]
    for post in posts:
        assert_signed(post)
        assert post.headers["Content-Type"] == "application/json"
        assert post.headers["X-Batchd-Event"] == post.event["kind"]
    assert len({post.event["id"] for post in posts}) == 4
    final = posts[-1].event
    assert final["job"] == "translate" and final["task"] == "translate" and final["state"] == "done"
    assert final["counts"]["succeeded"] == 4 and final["cost"]["estimate"] > 0
    assert SECRET not in result.stderr, "the secret is never logged"


def test_hook_job_event_progress_of_a_one_chunk_job_follows_the_remote_counts(workspace: Workspace):
    # One chunk running for a few seconds: polls see its batchStats move while it runs. The counts move
    # between 1/4 and all of job_seconds; 5 s leaves a loaded machine time for several polls in between.
    workspace.configure(job_seconds=5, notify={"progress_seconds": 0})
    workspace.drop("translate.toml", TRANSLATE)

    result = workspace.batchd("run", "--once")

    assert result.returncode == 0, result.stderr
    events = [entry["event"] for entry in deliveries(workspace)]
    progress = [event for event in events if event["kind"] == "progress"]
    assert progress, "a one-chunk job reports progress too"
    assert [event["id"] for event in progress] == [f"{event['job_id']}:progress:{n}" for n, event in
                                                    enumerate(progress, 1)]
    for event in progress:
        counts = event["counts"]
        assert set(counts) == {"total", "succeeded", "failed", "done"}
        assert counts["total"] == 4 and counts["done"] == counts["succeeded"] + counts["failed"]
    done = [event["counts"]["done"] for event in progress]
    assert 0 < done[0] and done == sorted(set(done)), "only when the count moved"
    assert events[-1]["kind"] == "succeeded"


def test_hook_job_event_progress_is_throttled_to_one_per_progress_seconds(workspace: Workspace):
    workspace.configure(job_seconds=2, chunk_max_requests=1, notify={"progress_seconds": 3600})
    workspace.drop("translate.toml", TRANSLATE)

    result = workspace.batchd("run", "--once")

    assert result.returncode == 0, result.stderr
    kinds = [entry["event"]["kind"] for entry in deliveries(workspace)]
    assert kinds.count("progress") == 1, kinds
    assert kinds[-1] == "succeeded"


CHOOSY = '''
import json, os
from batchd import hookimpl

@hookimpl
def job_event_kinds(settings):
    return ["succeeded"]

@hookimpl
def job_event(event):
    with open(os.environ["RECORD_EVENTS_TO"], "a") as out:
        out.write(json.dumps(event) + "\\n")
'''
CONFUSED = '''
from batchd import hookimpl

@hookimpl
def job_event_kinds(settings):
    raise KeyError("no such setting")

@hookimpl
def job_event(event):
    pass
'''


def test_hook_job_event_kinds_unconfigured_notifiers_get_no_deliveries(workspace: Workspace):
    with HttpSink() as sink:
        workspace.configure(notify={"webhook": {"urls": [sink.url], "events": ["succeeded"]}})
        workspace.drop("translate.toml", TRANSLATE)

        result = workspace.batchd("run", "--once")
        posts = sink.accepted()

    assert result.returncode == 0, result.stderr
    entries = deliveries(workspace)
    assert len(entries) >= 3
    # email has no apprise URL: not a row for any event; the webhook only for the kind it sends.
    assert all("email" not in entry["deliveries"] for entry in entries)
    assert all("log" in entry["deliveries"] for entry in entries)
    with_webhook = [entry["event"]["kind"] for entry in entries if "webhook" in entry["deliveries"]]
    assert with_webhook == ["succeeded"]
    assert [post.event["kind"] for post in posts] == ["succeeded"]


def test_hook_job_event_kinds_the_log_plugin_queues_nothing_its_log_level_would_drop(workspace: Workspace):
    # Its lines are INFO records: under --log-level WARNING none would be written, so no event is
    # queued for it (a burst would otherwise cost a delivery row and a worker's call per event).
    workspace.drop("translate.toml", TRANSLATE)

    result = workspace.batchd("--log-level", "WARNING", "run", "--once")

    assert result.returncode == 0, result.stderr
    entries = deliveries(workspace)
    assert [entry["event"]["kind"] for entry in entries][-1] == "succeeded"
    assert all("log" not in entry["deliveries"] for entry in entries)
    assert "batchd.notify" not in result.stderr


def test_hook_job_event_kinds_of_a_third_party_plugin_and_one_that_raises(workspace: Workspace):
    record = workspace.root / "events.jsonl"
    with_plugins(workspace, choosy=CHOOSY, confused=CONFUSED)
    workspace.drop("translate.toml", TRANSLATE)

    result = workspace.batchd("run", "--once", RECORD_EVENTS_TO=str(record))

    assert result.returncode == 0, result.stderr
    assert [event["kind"] for event in recorded(record)] == ["succeeded"]
    entries = deliveries(workspace)
    assert [entry["event"]["kind"] for entry in entries if "choosy" in entry["deliveries"]] == ["succeeded"]
    assert all(entry["deliveries"]["confused"]["state"] == "sent" for entry in entries), "it gets every kind"
    assert "plugin confused: job_event_kinds failed (KeyError" in result.stderr


def test_hook_job_event_webhook_events_filter_and_unsigned_without_secret():
    with HttpSink() as sink:
        settings = Settings(notify={"webhook": {"urls": [sink.url], "events": ["failed"]}})
        notify_webhook.job_event(event={"id": "j:succeeded", "kind": "succeeded"}, settings=settings)
        notify_webhook.job_event(event={"id": "j:failed", "kind": "failed"}, settings=settings)
    (post,) = sink.received
    assert post.event["id"] == "j:failed"
    assert "X-Batchd-Signature" not in post.headers


def test_hook_job_event_webhook_failing_then_recovering_is_retried(workspace: Workspace):
    with HttpSink(statuses=[500, 503, 500]) as sink:
        workspace.configure(notify={**FAST_RETRIES, "webhook": {"urls": [sink.url], "secret": SECRET}})
        workspace.drop("translate.toml", TRANSLATE)

        result = workspace.batchd("run", "--once")

    assert result.returncode == 0, result.stderr
    refused = [post.event["id"] for post in sink.received if post.status >= 500]
    accepted = [post.event["id"] for post in sink.accepted()]
    assert len(refused) == 3
    assert set(refused) <= set(accepted), "every refused event was sent again, with the same id"
    assert set(Counter(accepted).values()) == {1}, "each delivered once it was accepted"
    for post in sink.received:
        assert_signed(post)
    rows = {entry["event"]["id"]: entry["deliveries"]["webhook"] for entry in deliveries(workspace)}
    assert all(row["state"] == "sent" for row in rows.values())
    assert rows[refused[0]]["attempts"] >= 2
    assert "not delivered (attempt 1 of 10" in result.stderr


def test_a_receiver_down_is_said_once_and_summed_up_not_a_log_line_per_attempt(workspace: Workspace):
    """A webhook receiver refusing everything while 20 jobs' events are each tried four times: the log had a
    WARNING per attempt (about 240 lines here, tens of thousands in an hour's outage under load). Now the
    first failure in full, then one line summing up the rest (here at the stop), naming events given up."""
    with HttpSink(status=500) as sink:
        workspace.configure(notify={**FAST_RETRIES, "max_attempts": 4, "once_drain_seconds": 10,
                                    "webhook": {"urls": [sink.url], "secret": SECRET}})
        for n in range(20):
            workspace.drop(f"m{n}.toml", TRANSLATE.replace("Hello", f"Hello {n}"))

        result = workspace.batchd("run", "--once")
        refused = len(sink.received)

    assert result.returncode == 0, result.stderr
    assert refused >= 20 * 3 * 4, refused  # every event (accepted, submitted, succeeded) tried four times
    lines = [line for line in result.stderr.splitlines() if "plugin webhook" in line]
    assert len(lines) <= 4, "\n".join(lines)
    assert "not delivered (attempt 1 of 4" in lines[0]
    assert re.search(r"gave up on \d+ event\(s\) after 4 attempts \([^)]*, …\)", result.stderr), result.stderr


def test_hook_job_event_email_through_apprise_reaches_the_smtp_sink(workspace: Workspace):
    with SmtpSink() as smtp:
        workspace.configure(notify={"email": {"urls": [smtp.apprise_url()]}})
        workspace.drop("translate.toml", TRANSLATE)

        result = workspace.batchd("run", "--once")

    assert result.returncode == 0, result.stderr
    # By default only what a person wants to hear about: held jobs and final outcomes.
    (sender, recipients, message), = smtp.messages
    assert (sender, recipients) == ("batchd@example.com", ["ops@example.com"])
    assert message["Subject"] == "batchd: job translate succeeded"
    text = "".join(part.get_payload(decode=True).decode() for part in message.walk()
                   if part.get_content_type() == "text/plain")
    assert str(workspace.outbox / "translate") in text and "Requests: total 4, succeeded 4" in text
    event_ids = [entry["event"]["id"] for entry in deliveries(workspace)]
    assert any(event_id in text for event_id in event_ids)


def test_hook_job_event_a_raising_and_a_hanging_plugin_change_nothing_for_the_others(workspace: Workspace):
    record = workspace.root / "events.jsonl"
    with_plugins(workspace, recorder=RECORDER, raising=RAISING, hanging=HANGING)
    with HttpSink() as sink:
        workspace.configure(notify={
            **FAST_RETRIES, "timeout_seconds": 0.5, "max_attempts": 2, "once_drain_seconds": 3,
            "webhook": {"urls": [sink.url], "secret": SECRET}})
        workspace.drop("translate.toml", TRANSLATE)

        result = workspace.batchd("run", "--once", RECORD_EVENTS_TO=str(record))
        webhook_ids = [post.event["id"] for post in sink.accepted()]

    assert result.returncode == 0, result.stderr
    summary = workspace.delivered()["translate"]
    assert summary["state"] == "succeeded" and summary["counts"]["succeeded"] == 4
    kinds = ["accepted", "submitted", "succeeded"]
    assert [event["kind"] for event in without_progress(recorded(record))] == kinds
    assert webhook_ids == [event["id"] for event in recorded(record)]
    rows = [entry["deliveries"] for entry in deliveries(workspace)]
    assert all(row["recorder"]["state"] == "sent" and row["webhook"]["state"] == "sent" for row in rows)
    assert all(row["raising"]["state"] == "failed" and "boom on" in row["raising"]["last_error"] for row in rows)
    assert all(row["hanging"]["state"] != "sent" for row in rows)
    assert any("timed out after 0.5 s" in (row["hanging"]["last_error"] or "") for row in rows)
    # Said once in full, then summed up (at the latest when the daemon stops), not a line per attempt.
    assert "plugin raising: event " in result.stderr and "not delivered (attempt 1 of 2" in result.stderr
    assert re.search(r"plugin raising: gave up on [2-4] event\(s\) after 2 attempts", result.stderr), result.stderr
    assert sum("plugin raising" in line for line in result.stderr.splitlines()) == 2, result.stderr


def test_events_survive_a_sigkill_and_are_delivered_after_the_restart_with_the_same_ids(workspace: Workspace):
    with HttpSink(status=500) as sink:
        workspace.configure(notify={**FAST_RETRIES, "webhook": {"urls": [sink.url], "secret": SECRET}})
        daemon = workspace.start("run")
        workspace.drop("translate.toml", TRANSLATE)
        workspace.wait_for(lambda: any(post.event["kind"] == "succeeded" for post in sink.received),
                           what="the final event refused once")
        daemon.send_signal(signal.SIGKILL)
        assert daemon.wait(30) == -signal.SIGKILL
        refused = {post.event["id"] for post in sink.received}

        sink.status = 200
        result = workspace.batchd("run", "--once")
        accepted = [post.event for post in sink.accepted()]

    assert result.returncode == 0, result.stderr
    assert {event["id"] for event in accepted} == refused
    assert [event["kind"] for event in without_progress(accepted)] == ["accepted", "submitted", "succeeded"]
    assert all(entry["deliveries"]["webhook"]["state"] == "sent" for entry in deliveries(workspace))


def test_a_restart_makes_deliveries_waiting_out_a_backoff_at_once_in_the_order_of_their_events(workspace: Workspace):
    """Refused with a 10-minute backoff, a job's events wait; after a restart (the receiver mended) they
    go at once, oldest first. Before, `run --once` gave up waiting for them (once_drain_seconds) and
    delivered none."""
    with HttpSink(status=500) as sink:
        workspace.configure(notify={"retry_initial_seconds": 600, "retry_max_seconds": 600, "once_drain_seconds": 3,
                                    "webhook": {"urls": [sink.url], "secret": SECRET}})
        daemon = workspace.start("run")
        workspace.drop("translate.toml", TRANSLATE)
        workspace.wait_for(lambda: any(post.event["kind"] == "succeeded" for post in sink.received),
                           what="the final event refused once")
        assert daemon.stop() == 0
        sink.status = 200
        result = workspace.batchd("run", "--once")
        accepted = [post.event["kind"] for post in sink.accepted()]

    assert result.returncode == 0, result.stderr
    assert without_progress([{"kind": kind} for kind in accepted]) == [
        {"kind": "accepted"}, {"kind": "submitted"}, {"kind": "succeeded"}]
    assert all(entry["deliveries"]["webhook"]["state"] == "sent" for entry in deliveries(workspace))


@pytest.mark.parametrize("point", ["after-intent", "after-publish"])
def test_events_of_a_job_killed_mid_way_are_each_delivered(workspace: Workspace, point: str):
    record = workspace.root / "events.jsonl"
    with_plugins(workspace, recorder=RECORDER)
    workspace.drop("translate.toml", TRANSLATE)

    crashed = workspace.start("run", BATCHD_CRASH_AT=point, RECORD_EVENTS_TO=str(record))
    assert crashed.wait(120) == -signal.SIGKILL
    result = workspace.batchd("run", "--once", RECORD_EVENTS_TO=str(record))

    assert result.returncode == 0, result.stderr
    events = recorded(record)
    assert {event["kind"] for event in without_progress(events)} == {"accepted", "submitted", "succeeded"}
    ids = {event["kind"]: event["id"] for event in events}
    assert all(event["id"] == ids[event["kind"]] for event in events), "a redelivered event keeps its id"
    assert [event["kind"] for event in events].count("succeeded") == 1
    assert all(entry["deliveries"]["recorder"]["state"] == "sent" for entry in deliveries(workspace))
    # The final event says summary.json's counts: kept from the folder's naming, or read back after a restart.
    [final] = [event for event in events if event["kind"] == "succeeded"]
    assert final["counts"] == workspace.delivered()["translate"]["counts"] == {"total": 4, "succeeded": 4, "failed": 0}
    assert final["outbox"] == str(workspace.outbox / "translate")


def test_hook_job_event_announces_rejected_and_failed_jobs(workspace: Workspace):
    workspace.configure(faults=["fail-requests=1.0"])
    workspace.drop("broken.toml", 'task = "translate"\ntexts = ["a"]\nlanguages = "French"\n')
    workspace.drop("translate.toml", TRANSLATE)

    result = workspace.batchd("run", "--once")

    assert result.returncode == 1
    by_job: dict[str, list[dict]] = {}
    for entry in deliveries(workspace):
        by_job.setdefault(entry["event"]["job"], []).append(entry["event"])
    (rejected,) = by_job["broken"]
    assert rejected["kind"] == "rejected" and "languages" in json.dumps(rejected["error"])
    assert Path(rejected["outbox"]) == workspace.outbox / "broken"
    assert [event["kind"] for event in without_progress(by_job["translate"])] == ["accepted", "submitted", "failed"]
    assert by_job["translate"][-1]["counts"] == {"total": 4, "succeeded": 0, "failed": 4}


def test_webhook_secret_and_email_urls_come_from_the_environment_and_are_never_shown(monkeypatch, tmp_path):
    from batchd.config import load_settings

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BATCHD_NOTIFY__WEBHOOK__SECRET", SECRET)
    monkeypatch.setenv("BATCHD_NOTIFY__EMAIL__URLS", '["mailtos://me:hunter2@example.com"]')
    settings = load_settings()
    assert settings.notify.webhook.secret.get_secret_value() == SECRET
    assert settings.notify.email.urls[0].get_secret_value() == "mailtos://me:hunter2@example.com"
    for shown in (repr(settings), json.dumps(settings.redacted_dict())):
        assert SECRET not in shown and "hunter2" not in shown


def test_delivered_events_are_forgotten_after_keep_days_and_pending_ones_never(tmp_path):
    journal = Journal(tmp_path / "journal.db")
    journal.event_targets = lambda event: ("webhook",)
    try:
        journal.add_events([{"id": f"j:{kind}", "job_id": "j", "kind": kind} for kind in ("accepted", "submitted")])
        journal.delivery_sent("j:accepted", "webhook")
        with sqlite3.connect(tmp_path / "journal.db") as db:
            db.execute("UPDATE events SET created_at = created_at - 40 * 86400")
        assert journal.prune_events(before=time.time() - 30 * 86400) == 1
        remaining = journal.events()
        assert [entry["event"]["id"] for entry in remaining] == ["j:submitted"], "still owed to the webhook"
        assert remaining[0]["deliveries"]["webhook"]["state"] == "pending"
    finally:
        journal.close()


def test_each_plugin_is_due_its_oldest_pending_event_only(tmp_path):
    """Due deliveries come a bounded page at a time per plugin, oldest first, here a page of one
    (reading every pending event on every tick made a backlog of thousands cost seconds per tick)."""
    journal = Journal(tmp_path / "journal.db")
    journal.event_targets = lambda event: ("webhook", "log")
    try:
        journal.add_events([{"id": f"j:{kind}", "job_id": "j", "kind": kind}
                            for kind in ("accepted", "submitted", "succeeded")])
        journal.delivery_sent("j:accepted", "webhook")
        journal.delivery_failed("j:accepted", "log", "down", retry_at=time.time() + 600)
        due = journal.due_deliveries(time.time(), plugins=("webhook", "log"))
        assert [(plugin, event["id"], attempts) for plugin, event, attempts in due] == \
            [("webhook", "j:submitted", 0), ("log", "j:submitted", 0)]  # log's retry of j:accepted waits
        assert journal.due_deliveries(time.time(), plugins=("log",))[0][0] == "log"
        journal.delivery_sent("j:submitted", "log")
        journal.delivery_sent("j:succeeded", "log")
        assert journal.due_deliveries(time.time() + 601, plugins=("log",))[0][1]["id"] == "j:accepted"
        assert journal.due_deliveries(time.time(), plugins=("log",)) == []
    finally:
        journal.close()


# --- The dispatcher on its own: a journal, plugins in this process, the loop driven by the test ------


class Recorder:
    """A notifier that keeps the events it is called with; from the ``hold_at``-th call on, each
    call waits for ``gate`` (``holding`` is set once one does)."""

    def __init__(self, hold_at: int | None = None):
        self.events: list[dict] = []
        self.hold_at = hold_at
        self.gate = threading.Event()
        self.holding = threading.Event()

    @hookimpl
    def job_event(self, event):
        if self.hold_at is not None and len(self.events) + 1 >= self.hold_at:
            self.holding.set()
            self.gate.wait()
        self.events.append(event)


class CountingJournal(Journal):
    """A journal that notes how many rows each of its transactions changed."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.commits: list[int] = []

    @contextmanager
    def transaction(self):
        with super().transaction() as db:
            before = db.total_changes
            yield db
            self.commits.append(db.total_changes - before)


def plugin_manager(**plugins: object) -> pluggy.PluginManager:
    """batchd's hooks with these plugins (modules or objects with hook implementations), by name."""
    pm = pluggy.PluginManager("batchd")
    pm.add_hookspecs(hookspecs)
    for name, plugin in plugins.items():
        pm.register(plugin, name=name)
    return pm


def some_events(count: int) -> list[dict]:
    return [{"id": f"job{n // 10}:progress:{n}", "job_id": f"job{n // 10}", "kind": "progress"} for n in range(count)]


def add_events(journal: Journal, events: list[dict]) -> None:
    for start in range(0, len(events), 500):  # as the daemon commits them: a few at a time
        journal.add_events(events[start:start + 500])


def pending(journal: Journal, plugin: str) -> bool:
    return journal.next_delivery_at(plugins=[plugin]) is not None


def pump_until(dispatcher: EventDispatcher, wake: threading.Event, done: Callable[[], bool]) -> int:
    """Drive the dispatcher as the daemon's loop does (pump, then sleep until woken or due) until
    ``done()``; returns how many pumps that took."""
    pumps = 0
    give_up = time.monotonic() + 240  # a guard against a dispatcher that never gets there, not a time limit
    while not done():
        assert time.monotonic() < give_up, "the deliveries never got done"
        dispatcher.pump()
        pumps += 1
        wake.wait(min(1.0, dispatcher.seconds_until_due()))
        wake.clear()
    return pumps


def notify_threads(besides: list[threading.Thread] = ()) -> list[threading.Thread]:
    """The dispatchers' worker threads alive now, but ``besides`` (those of earlier tests)."""
    return [thread for thread in threading.enumerate()
            if thread.name.startswith("batchd-notify-") and thread not in besides]


def test_a_hanging_plugin_holds_up_no_other_plugin_which_gets_its_events_a_page_a_pump(tmp_path):
    hanging = Recorder(hold_at=1)
    journal = Journal(tmp_path / "journal.db")
    wake = threading.Event()
    earlier_threads = notify_threads()
    with HttpSink() as sink:
        settings = Settings(notify={"timeout_seconds": 3600, "webhook": {"urls": [sink.url], "secret": SECRET}})
        dispatcher = EventDispatcher(plugin_manager(webhook=notify_webhook, hanging=hanging), journal,
                                     lambda: settings, wake=wake.set)
        events = some_events(600)
        add_events(journal, events)
        try:
            pumps = pump_until(dispatcher, wake, lambda: not pending(journal, "webhook"))
            workers = notify_threads(besides=earlier_threads)
            rows = [entry["deliveries"] for entry in journal.events()]
        finally:
            hanging.gate.set()
            dispatcher.close()
        posts = sink.accepted()

    assert [post.event["id"] for post in posts] == [event["id"] for event in events], "each once, oldest first"
    assert pumps < len(events) / 5, "each pump hands a plugin many events, not one"
    assert len(workers) == 2, "one worker thread per plugin, however many events"
    assert hanging.holding.is_set()
    assert all(row["webhook"]["state"] == "sent" and row["webhook"]["attempts"] == 1 for row in rows)
    assert all(row["hanging"]["state"] == "pending" and row["hanging"]["attempts"] == 0 for row in rows)
    journal.close()


class Stuck:
    """A notifier whose call with the event ``stuck_on`` does not return until ``gate`` opens."""

    def __init__(self, stuck_on: str):
        self.stuck_on = stuck_on
        self.gate = threading.Event()
        self.events: list[dict] = []

    @hookimpl
    def job_event(self, event):
        if event["id"] == self.stuck_on:
            self.gate.wait()
        self.events.append(event)


def test_a_call_that_hangs_times_out_and_the_plugins_next_events_go_on_from_another_thread(tmp_path):
    events = some_events(300)
    stuck = Stuck(stuck_on=events[0]["id"])
    journal = Journal(tmp_path / "journal.db")
    wake = threading.Event()
    earlier_threads = notify_threads()
    settings = Settings(notify={"timeout_seconds": 0.3, "retry_initial_seconds": 3600, "retry_max_seconds": 3600})
    dispatcher = EventDispatcher(plugin_manager(stuck=stuck), journal, lambda: settings, wake=wake.set)
    add_events(journal, events)
    try:
        pump_until(dispatcher, wake, lambda: len(stuck.events) == len(events) - 1)
        threads = notify_threads(besides=earlier_threads)
        delivered = [event["id"] for event in stuck.events]
    finally:
        dispatcher.close()
        stuck.gate.set()
    rows = {entry["event"]["id"]: entry["deliveries"]["stuck"] for entry in journal.events()}

    assert delivered == [event["id"] for event in events[1:]], "each once, in order, but the one that hangs"
    assert len(threads) == 2, "the hung call's thread, and the one that took over"
    hung = rows.pop(events[0]["id"])
    assert (hung["state"], hung["attempts"], hung["last_error"]) == ("pending", 1, "timed out after 0.3 s")
    assert hung["next_at"] > time.time() + 3000, "retried after its backoff"
    assert all(row["state"] == "sent" and row["attempts"] == 1 for row in rows.values())
    journal.close()


def test_delivered_events_are_recorded_in_few_transactions_of_a_bounded_size(tmp_path):
    recorder = Recorder()
    journal = CountingJournal(tmp_path / "journal.db")
    wake = threading.Event()
    settings = Settings()
    dispatcher = EventDispatcher(plugin_manager(recorder=recorder), journal, lambda: settings, wake=wake.set)
    add_events(journal, some_events(1000))
    journal.commits.clear()

    pump_until(dispatcher, wake, lambda: not pending(journal, "recorder"))
    dispatcher.close()

    assert len(recorder.events) == 1000
    assert sum(journal.commits) == 1000, "every delivery recorded once"
    assert len(journal.commits) <= 1000 / 10, "not a transaction per event"
    assert max(journal.commits) <= HANDED_MAX, "no transaction covers more than a page"
    journal.close()


def test_deliveries_in_flight_when_the_dispatcher_closes_stay_pending_and_are_made_after_the_restart(tmp_path):
    before = Recorder(hold_at=4)
    journal = Journal(tmp_path / "journal.db")
    wake = threading.Event()
    earlier_threads = notify_threads()
    settings = Settings()
    dispatcher = EventDispatcher(plugin_manager(recorder=before), journal, lambda: settings, wake=wake.set)
    events = some_events(10)
    add_events(journal, events)

    pump_until(dispatcher, wake, before.holding.is_set)
    [worker] = notify_threads(besides=earlier_threads)
    dispatcher.close(wait_seconds=0.1)  # the daemon stops (or dies) while the 4th call runs
    states = [(entry["deliveries"]["recorder"]["state"], entry["deliveries"]["recorder"]["attempts"])
              for entry in journal.events()]
    before.gate.set()  # that call ends after all, unrecorded: like a delivery just before a crash
    worker.join(30)

    assert states == [("sent", 1)] * 3 + [("pending", 0)] * 7
    assert [event["id"] for event in before.events] == [event["id"] for event in events[:4]], \
        "a closed dispatcher starts no more calls"
    after = Recorder()
    dispatcher = EventDispatcher(plugin_manager(recorder=after), journal, lambda: settings, wake=wake.set)
    pump_until(dispatcher, wake, lambda: not pending(journal, "recorder"))
    dispatcher.close()
    assert [event["id"] for event in after.events] == [event["id"] for event in events[3:]], \
        "the unrecorded one again, with its id, and the rest"
    journal.close()


class Digest:
    """A notifier that takes events in batches (one message for many); it cannot deliver ``refuse`` the first time."""

    def __init__(self, refuse: str):
        self.batches: list[list[str]] = []
        self.refuse = refuse
        self.single_calls = 0

    @hookimpl
    def job_event_batch(self, events):
        self.batches.append([event["id"] for event in events])
        if self.refuse in self.batches[-1] and len(self.batches) == 1:
            return {self.refuse: "no room for it in this message"}
        return None

    @hookimpl
    def job_event(self, event):
        self.single_calls += 1


def test_hook_job_event_batch_gets_the_due_events_in_order_in_bounded_batches(tmp_path):
    events = some_events(450)
    digest = Digest(refuse=events[7]["id"])
    journal = Journal(tmp_path / "journal.db")
    wake = threading.Event()
    settings = Settings(notify=FAST_RETRIES)
    dispatcher = EventDispatcher(plugin_manager(digest=digest), journal, lambda: settings, wake=wake.set)
    add_events(journal, events)

    pump_until(dispatcher, wake, lambda: not pending(journal, "digest"))
    dispatcher.close()

    assert digest.single_calls == 0, "a plugin with both hooks gets batches"
    assert all(1 <= len(batch) <= BATCH_MAX for batch in digest.batches)
    assert len(digest.batches) < len(events) / 10
    delivered = [event_id for batch in digest.batches for event_id in batch]
    assert list(dict.fromkeys(delivered)) == [event["id"] for event in events], "oldest first"
    assert Counter(delivered) == {event["id"]: 2 if event is events[7] else 1 for event in events}, \
        "the one it could not deliver again, the others once"
    rows = {entry["event"]["id"]: entry["deliveries"]["digest"] for entry in journal.events()}
    assert all(row["state"] == "sent" for row in rows.values())
    assert rows[events[7]["id"]]["attempts"] == 2 and rows[events[8]["id"]]["attempts"] == 1
    journal.close()


def test_due_deliveries_come_in_pages_without_those_handed_out_and_are_recorded_together(tmp_path):
    journal = Journal(tmp_path / "journal.db")
    journal.event_targets = lambda event: ("webhook",)
    try:
        add_events(journal, some_events(5))
        ids = [event["id"] for event in some_events(5)]
        page = journal.due_deliveries(time.time(), plugins=("webhook",), limit=3, excluding=ids[:1])
        assert [event["id"] for _plugin, event, _attempts in page] == ids[1:4]
        journal.record_deliveries(sent=[(ids[1], "webhook"), (ids[2], "webhook")],
                                  failed=[(ids[3], "webhook", "down", time.time() + 600),
                                          (ids[4], "webhook", "gone", None)])
        rows = {entry["event"]["id"]: entry["deliveries"]["webhook"] for entry in journal.events()}
        assert [rows[event_id]["state"] for event_id in ids] == ["pending", "sent", "sent", "pending", "failed"]
        assert rows[ids[3]]["last_error"] == "down" and rows[ids[3]]["attempts"] == 1
        due = journal.due_deliveries(time.time(), plugins=("webhook",), limit=9)
        assert [event["id"] for _plugin, event, _attempts in due] == ids[:1], "the retry is not due yet"
    finally:
        journal.close()


def test_hook_job_event_webhook_keeps_its_connection_open_and_opens_another_when_the_receiver_drops_it():
    with HttpSink() as sink:
        settings = Settings(notify={"webhook": {"urls": [sink.url]}})
        for n in range(3):
            notify_webhook.job_event(event={"id": f"j:progress:{n}", "kind": "progress"}, settings=settings)
        sink.drop_connections()  # as a server closes an idle connection
        notify_webhook.job_event(event={"id": "j:succeeded", "kind": "succeeded"}, settings=settings)
        posts = sink.received

    assert [post.event["id"] for post in posts] == ["j:progress:0", "j:progress:1", "j:progress:2", "j:succeeded"]
    assert len({post.connection for post in posts[:3]}) == 1
    assert posts[3].connection != posts[0].connection and posts[3].status == 200


def test_hook_job_event_webhook_goes_through_the_proxy_of_the_environment(monkeypatch):
    with HttpSink() as proxy:
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{proxy.server.server_address[1]}")
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        settings = Settings(notify={"webhook": {"urls": ["http://hooks.example.invalid/batchd"], "secret": SECRET}})
        notify_webhook.job_event(event={"id": "j:failed", "kind": "failed"}, settings=settings)
        (post,) = proxy.received

    assert post.target == "http://hooks.example.invalid/batchd"
    assert_signed(post)


def test_one_log_line_per_event_and_run_once_rejects_a_bad_manifest_at_once_saying_why(workspace: Workspace):
    # The grace for half-written manifests is long; --once takes complete files and must not wait it out.
    workspace.configure(log_format="json", incomplete_grace_seconds=60)
    workspace.drop("translate.toml", TRANSLATE)
    workspace.drop("bad.toml", 'task = "translate"\ntexts = [1]\nlanguages = ["French"]\n')

    started = time.monotonic()
    result = workspace.batchd("run", "--once")

    assert time.monotonic() - started < 30, "the bad manifest waited for incomplete_grace_seconds"
    assert result.returncode == 1, result.stderr
    assert workspace.delivered()["bad"]["state"] == "rejected"
    records = [json.loads(line) for line in result.stderr.splitlines()]
    shown = [record for record in records if record["level"] != "debug"]
    events = [record for record in shown if record["logger"] == "batchd.notify"]
    assert Counter(record["kind"] for record in events if record["kind"] != "progress") == Counter(
        {"accepted": 1, "submitted": 1, "succeeded": 1, "rejected": 1})
    # The daemon's own lines saying the same are DEBUG: one line per event.
    daemon = [record["msg"] for record in shown if record["logger"] == "batchd"]
    assert not [msg for msg in daemon if msg.startswith(("accepted ", "rejected ")) or " → " in msg], daemon
    (rejected,) = [record for record in events if record["kind"] == "rejected"]
    assert rejected["level"] == "warning" and "texts[0]" in rejected["msg"] and "bad.toml" in rejected["msg"]
    assert rejected["error"]["message"] in rejected["msg"]
