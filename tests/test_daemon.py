"""The daemon end to end, as a real process against the embedded emulator."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from google import genai
from google.genai import types

from batchd.daemon.crashpoints import ON_EVERY_JOB as CRASH_POINTS
from batchd.emulator.server import EmulatorServer
from batchd.journal import Journal, journal_path
from batchd.testing import Workspace
from conftest import REPO

TRANSLATE = """\
task = "translate"
texts = ["Hello, how are you?", "The meeting is at 3 pm."]
languages = ["Spanish", "French"]
"""

SENTIMENT = """\
task = "sentiment"

[[items]]
id = "r1"
text = "I love this product, it works perfectly."

[[items]]
id = "r2"
text = "Broken after two days. Very disappointed."

[[items]]
id = "r3"
text = "It is fine."
"""

#: SENTIMENT's items as an input file.
SENTIMENT_ITEMS = "".join(json.dumps({"id": f"r{n}", "text": text}) + "\n" for n, text in enumerate(
    ["I love this product, it works perfectly.", "Broken after two days. Very disappointed.", "It is fine."], 1))

VARIATIONS = """\
task = "variations"
base_content = "Our new water bottle keeps drinks cold for 24 hours."

[[variations]]
id = "formal"
tone = "formal"
length = "short"
audience = "business customers"
style = "product description"

[[variations]]
id = "playful"
tone = "playful"
length = "medium"
audience = "teenagers"
style = "social media post"
temperature = 0.9
max_output_tokens = 200
"""


#: Upload every chunk as a file instead of sending it inline.
FILE_MODE = {"inline_max_bytes": 0}


def remote_jobs(ws: Workspace) -> list[types.BatchJob]:
    """Every remote job the embedded emulator holds, read through the SDK after the daemon stopped."""
    with EmulatorServer(ws.state / "emulator") as emulator:
        client = genai.Client(api_key="check", http_options=types.HttpOptions(base_url=emulator.base_url))
        return list(client.batches.list(config={"page_size": 50}))


def remote_job_recorded(ws: Workspace) -> bool:
    """Whether the journal holds a chunk's remote job: read in this process, a look takes milliseconds
    (``batchd status`` starts an interpreter, seconds on a loaded machine, while the remote job runs)."""
    path = journal_path(ws.state)
    if not path.exists():
        return False
    journal = Journal(path, readonly=True)
    try:
        return journal.initialized and any(chunk.remote_name for job in journal.jobs()
                                           for chunk in journal.chunks(job.id))
    finally:
        journal.close()


def request_files(ws: Workspace) -> list[str]:
    """The uploaded (request) files the embedded emulator holds, read through the SDK after the daemon stopped."""
    with EmulatorServer(ws.state / "emulator") as emulator:
        client = genai.Client(api_key="check", http_options=types.HttpOptions(base_url=emulator.base_url))
        return [f.display_name for f in client.files.list(config={"page_size": 100})
                if f.source == types.FileSource.UPLOADED]


def assert_one_live_job_per_chunk(ws: Workspace) -> None:
    jobs = remote_jobs(ws)
    live = Counter(job.display_name for job in jobs if job.state != types.JobState.JOB_STATE_CANCELLED)
    assert live, "no remote jobs were created"
    assert all(count == 1 for count in live.values()), live


def test_run_once_delivers_every_task(workspace: Workspace):
    workspace.drop("translate.toml", TRANSLATE)
    workspace.drop("sentiment.toml", SENTIMENT)
    workspace.drop("variations.toml", VARIATIONS)

    result = workspace.batchd("run", "--once")

    assert result.returncode == 0, result.stderr
    delivered = workspace.delivered()
    assert set(delivered) == {"translate", "sentiment", "variations"}
    assert all(s["state"] == "succeeded" and s["emulated"] is True for s in delivered.values())
    assert not list(workspace.inbox.iterdir())

    translate = workspace.outbox / "translate"
    organized = json.loads((translate / "organized.json").read_text())
    assert organized.keys() == {"Hello, how are you?", "The meeting is at 3 pm."}
    assert all(v.keys() == {"Spanish", "French"} for v in organized.values())
    lines = [json.loads(line) for line in (translate / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and all(line["status"] == "ok" and "emulated" in line["text"].lower() for line in lines)
    assert (translate / "translate.toml").read_text() == TRANSLATE
    assert delivered["translate"]["counts"] == {"total": 4, "succeeded": 4, "failed": 0}

    sentiment = json.loads((workspace.outbox / "sentiment" / "organized.json").read_text())
    assert sentiment.keys() == {"r1", "r2", "r3"}
    assert all(entry["label"] in ("positive", "negative", "neutral", "mixed") for entry in sentiment.values())

    variations = json.loads((workspace.outbox / "variations" / "organized.json").read_text())
    assert variations.keys() == {"formal", "playful"}
    assert_one_live_job_per_chunk(workspace)


def test_a_delivered_jobs_remote_batches_are_deleted_and_a_shared_one_once_every_member_has_its_results(
        workspace: Workspace):
    """delete_finished_batches (on by default): once a job is delivered its remote batches are deleted, a
    shared one (small jobs packed together) once the pack has split its results between its members; a
    delete the service fails is tried again. The project's batch list, which every poll reads newest first,
    then holds what is running, not every batch ever run."""
    workspace.configure(delete_finished_batches=True, chunk_max_requests=3, pack_jobs_below=3,
                        faults=["503*10@delete"])  # (the SDK tries a delete 5 times: two rounds fail)
    process = workspace.start("run")
    try:
        workspace.drop("translate.toml", TRANSLATE)  # 4 requests: two chunks of its own
        workspace.drop("small1.toml", 'task = "sentiment"\ntexts = ["Fine.", "Late."]\n')  # packed together
        workspace.drop("small2.toml", 'task = "sentiment"\ntexts = ["Broken.", "Great."]\n')
        workspace.wait_for(lambda: process.output().count("its results delivered") == 3, timeout=60,
                           what="the three remote batches deleted")
    finally:
        assert process.stop() == 0
    said = process.output()
    assert "deleting batches/" in said and "Traceback" not in said
    assert {name: s["state"] for name, s in workspace.delivered().items()} == {
        "translate": "succeeded", "small1": "succeeded", "small2": "succeeded"}
    made = {batch["name"] for s in workspace.delivered().values() for batch in s["remote_batches"]}
    assert len(made) == 3  # translate's two, and the one small1 and small2 shared
    assert remote_jobs(workspace) == []


def test_remote_batches_a_killed_run_had_not_deleted_are_deleted_after_the_next_start(workspace: Workspace):
    """A batch to delete is committed with the delivery of its work: a daemon killed (SIGKILL) while the
    service fails its deletes leaves them in the journal, and the next start deletes them, once each."""
    workspace.configure(delete_finished_batches=True, chunk_max_requests=3, faults=["503@delete"])
    process = workspace.start("run")
    try:
        workspace.drop("translate.toml", TRANSLATE)  # 4 requests: two batches
        workspace.wait_for(lambda: "translate" in workspace.delivered(), timeout=60, what="translate delivered")
        workspace.wait_for(lambda: "retrying later" in process.output(), timeout=60, what="a delete failed")
    finally:
        process.kill()
        process.wait(30)
    journal = Journal(journal_path(workspace.state), readonly=True)
    try:
        waiting = {name for name, _ in journal.batches_to_delete()}
    finally:
        journal.close()
    made = {batch["name"] for batch in workspace.delivered()["translate"]["remote_batches"]}
    assert waiting == made and len(made) == 2

    workspace.configure(delete_finished_batches=True, chunk_max_requests=3)  # the service deletes again
    result = workspace.batchd("run", "--once")

    assert result.returncode == 0, result.stderr
    assert sorted(re.findall(r"deleted (batches/[^,]+), its results delivered", result.stderr)) == sorted(made)
    assert remote_jobs(workspace) == []
    journal = Journal(journal_path(workspace.state), readonly=True)
    try:
        assert journal.batches_to_delete() == []
    finally:
        journal.close()


def test_the_outbox_folder_holds_the_dropped_manifest_itself_and_the_spool_keeps_no_name_of_it(workspace: Workspace):
    dropped = workspace.drop("translate.toml", TRANSLATE)
    inode = dropped.stat().st_ino

    result = workspace.batchd("run", "--once")

    assert result.returncode == 0, result.stderr
    published = (workspace.outbox / "translate" / "translate.toml").stat()
    # Linked, not copied: no file written again, and its only name once the spool is gone.
    assert (published.st_ino, published.st_nlink) == (inode, 1)
    assert (workspace.outbox / "translate" / "translate.toml").read_text() == TRANSLATE
    assert not list((workspace.state / "jobs").iterdir())


def test_daemon_takes_manifests_dropped_while_running_and_stops_cleanly(workspace: Workspace):
    daemon = workspace.start("run")
    try:
        workspace.drop("first.toml", TRANSLATE)
        workspace.wait_for(lambda: "first" in workspace.delivered(), what="first delivered")
        # Dropped straight in, without the careful rename: still taken once complete.
        (workspace.inbox / "second.toml").write_text(SENTIMENT)
        workspace.wait_for(lambda: "second" in workspace.delivered(), what="second delivered")
    finally:
        assert daemon.stop() == 0
    assert {s["state"] for s in workspace.delivered().values()} == {"succeeded"}


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None  # ended meanwhile


def _allowed_cpus(pid: int, tid: int) -> str:
    status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
    return next(line.split(":", 1)[1].strip() for line in status.splitlines() if line.startswith("Cpus_allowed_list"))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
@pytest.mark.parametrize("one_cpu", [True, False])
def test_the_daemons_threads_share_one_cpu_and_the_embedded_emulator_keeps_every_cpu(workspace: Workspace, one_cpu):
    """one_cpu: every thread of the daemon, those started after the setting took effect too, runs on one
    CPU (they take turns on one GIL); the emulator's process is not bound by it."""
    every = _allowed_cpus(os.getpid(), os.getpid())
    daemon = workspace.start("run", BATCHD_ONE_CPU=str(one_cpu).lower())
    try:
        workspace.drop("first.toml", TRANSLATE)  # the jobs' threads start after the setting took effect
        workspace.wait_for(lambda: "first" in workspace.delivered(), what="first delivered")
        threads = {tid: _allowed_cpus(daemon.pid, int(tid)) for tid in os.listdir(f"/proc/{daemon.pid}/task")}
        children = [int(entry) for entry in os.listdir("/proc") if entry.isdigit() and _parent(int(entry)) == daemon.pid]
        assert len(threads) > 5 and len(children) == 1, (threads, children)
        emulator = {_allowed_cpus(child, int(tid)) for child in children for tid in os.listdir(f"/proc/{child}/task")}
    finally:
        assert daemon.stop() == 0
    if one_cpu:
        assert len(set(threads.values())) == 1 and "," not in next(iter(threads.values())) \
            and "-" not in next(iter(threads.values())), threads
    else:
        assert set(threads.values()) == {every}
    assert emulator == {every}


FROZEN_PROBE_PLUGIN = """
import gc
from pathlib import Path

from batchd import hookimpl
from batchd_plugins.sentiment import Sentiment


class Probe(Sentiment):
    name = "probe"

    def requests(self, params, items):
        Path(REPORT).write_text(str(gc.get_freeze_count()))
        yield from super().requests(params, items)


@hookimpl
def register_tasks(register):
    register(Probe())
"""


def test_what_is_alive_at_start_is_left_out_of_the_cyclic_collectors_walks(workspace: Workspace, tmp_path: Path):
    """The modules, the SDK's types and the plugins live as long as the daemon: they are frozen once it
    has started (gc.freeze), so that no full collection walks them again."""
    report = tmp_path / "frozen"
    workspace.add_plugin("probe", f"REPORT = {str(report)!r}\n" + FROZEN_PROBE_PLUGIN)
    workspace.drop("probe.toml", 'task = "probe"\ntexts = ["Order 1 arrived."]\n')
    assert workspace.batchd("run", "--once").returncode == 0
    assert int(report.read_text()) > 10_000


def test_a_manifest_that_does_not_parse_is_rejected_with_its_line(workspace: Workspace):
    workspace.drop("broken.toml", 'task = "translate"\ntexts = ["a", "b"\nlanguages = ["French"]\n')
    workspace.drop("good.toml", TRANSLATE)

    result = workspace.batchd("run", "--once")

    assert result.returncode == 1  # one job was rejected
    delivered = workspace.delivered()
    assert delivered["good"]["state"] == "succeeded"
    rejected = delivered["broken"]
    assert rejected["state"] == "rejected"
    message = json.dumps(rejected["error"])
    assert "broken.toml" in message and "line" in message
    assert (workspace.outbox / "broken" / "broken.toml").exists(), "the rejected manifest is kept"


@pytest.mark.parametrize("budget, from_file", [(None, False), (1000.0, False), (None, True)],
                         ids=["held-by-its-build", "read-by-its-estimate-for-a-budget",
                              "read-by-its-estimate-for-an-input-file"])
def test_a_bad_row_at_the_end_of_a_big_input_rejects_the_job_with_nothing_sent(workspace: Workspace, budget,
                                                                               from_file):
    """Rows are checked in a worker, not at the claim; still nothing of a job is sent before its last row
    was read: the build holds its chunks (items inline, no budget) or the estimate pass read them all (a
    budget could hold the job, or its rows come from an input file)."""
    workspace.configure(chunk_max_requests=5, inline_max_requests=0, cost={"job_budget": budget} if budget else {})
    rows = [(f"r{n}", f"Review number {n} of the batch.") for n in range(39)] + [("r7", "a duplicate id at the very end")]
    if from_file:
        (workspace.inbox / "reviews.csv").write_text("id,text\n" + "".join(f"{i},{t}\n" for i, t in rows))
        workspace.drop("late.toml", 'task = "sentiment"\ninput = "reviews.csv"\n')
    else:
        items = ",\n".join(f'  {{ id = "{i}", text = "{t}" }}' for i, t in rows)
        workspace.drop("late.toml", f'task = "sentiment"\nitems = [\n{items}\n]\n')

    result = workspace.batchd("run", "--once")

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, "a bad row is the job's problem, not a failure of the cost plugin"
    rejected = workspace.delivered()["late"]
    assert rejected["state"] == "rejected"
    assert "duplicate id 'r7'" in rejected["error"]["message"]
    if from_file:
        assert rejected["error"]["line"] == 41
    assert remote_jobs(workspace) == [], "a batch was created"
    with EmulatorServer(workspace.state / "emulator") as emulator:
        client = genai.Client(api_key="check", http_options=types.HttpOptions(base_url=emulator.base_url))
        assert list(client.files.list()) == [], "requests were uploaded"


GATED_PLUGIN = """
import time
from pathlib import Path

from batchd import hookimpl
from batchd_plugins.sentiment import Sentiment


class Gated(Sentiment):
    \"\"\"Sentiment whose build (its second pass over the rows: the estimate is the first) stops after its
    first chunk until the test opens the gate.\"\"\"

    name = "gated"
    passes = 0

    def requests(self, params, items):
        Gated.passes += 1
        for n, request in enumerate(super().requests(params, items)):
            if Gated.passes > 1 and n == 4:  # chunk 0 (requests 0 and 1) is complete
                deadline = time.monotonic() + 30
                while not Path(GATE).exists() and time.monotonic() < deadline:
                    time.sleep(0.02)
            yield request


@hookimpl
def register_tasks(register):
    register(Gated())
"""


def test_a_job_reading_an_input_file_sends_its_first_chunk_while_later_ones_are_built(workspace: Workspace):
    """Priced first (its rows read whole by the estimate pass), a job of input rows is then sent chunk by
    chunk as it is built: its first batch is created while its build is still stopped at chunk 2."""
    gate = workspace.root / "gate"
    workspace.add_plugin("gated", f"GATE = {str(gate)!r}\n" + GATED_PLUGIN)
    workspace.configure(chunk_max_requests=2, inline_max_requests=0)
    (workspace.inbox / "reviews.csv").write_text("id,text\n" + "".join(f"r{n},Review {n}.\n" for n in range(10)))
    workspace.drop("long.toml", 'task = "gated"\ninput = "reviews.csv"\n')
    daemon = workspace.start("run")
    try:
        workspace.wait_for(lambda: remote_job_recorded(workspace), timeout=20,
                           what="the first chunk created while the build waits")
        gate.touch()
        workspace.wait_for(lambda: "long" in workspace.delivered(), what="long delivered")
    finally:
        gate.touch()
        assert daemon.stop() == 0
    summary = workspace.delivered()["long"]
    assert summary["state"] == "succeeded" and summary["counts"]["total"] == 10
    log = daemon.log_path.read_text()
    assert log.index("chunk 0 is remote job") < log.index("10 requests in 5 chunk(s)"), \
        "the first chunk was held until the build ended"


def test_a_manifest_with_a_bad_field_is_rejected_naming_the_field(workspace: Workspace):
    workspace.drop("bad.toml", 'task = "translate"\ntexts = ["a"]\nlanguages = "French"\n')
    workspace.batchd("run", "--once")
    rejected = workspace.delivered()["bad"]
    assert rejected["state"] == "rejected"
    assert "languages" in json.dumps(rejected["error"])


def test_a_half_written_manifest_waits_until_it_is_complete(workspace: Workspace):
    workspace.configure(incomplete_grace_seconds=60)
    daemon = workspace.start("run")
    try:
        partial = workspace.inbox / "slow.toml"
        partial.write_text(TRANSLATE[:40])  # cut mid-line: it does not parse yet
        workspace.wait_for(lambda: (workspace.state / "journal.db").exists(), what="daemon up")
        # Several scans (settle 0.1 s, rescan 0.5 s) see the unparseable file and leave it alone.
        time.sleep(1.5)
        assert partial.exists() and workspace.status() == []
        partial.write_text(TRANSLATE)
        workspace.wait_for(lambda: "slow" in workspace.delivered(), what="slow delivered")
    finally:
        assert daemon.stop() == 0
    assert workspace.delivered()["slow"]["state"] == "succeeded"


def test_the_same_content_twice_runs_once(workspace: Workspace):
    workspace.drop("one.toml", TRANSLATE)
    workspace.batchd("run", "--once")
    workspace.drop("again.toml", TRANSLATE)
    workspace.batchd("run", "--once")

    delivered = workspace.delivered()
    assert delivered["one"]["state"] == "succeeded"
    assert delivered["again"]["state"] == "rejected"
    assert delivered["again"]["error"]["duplicate_of"] == delivered["one"]["job"]
    assert len(remote_jobs(workspace)) == 1


def test_a_name_taken_in_the_outbox_gets_a_unique_suffix(workspace: Workspace):
    (workspace.outbox / "translate").mkdir()
    workspace.drop("translate.toml", TRANSLATE)
    workspace.batchd("run", "--once")
    assert "translate-2" in workspace.delivered()


def test_inputs_from_a_csv_file(workspace: Workspace):
    (workspace.inbox / "reviews.csv").write_text("id,text\na1,Great value\na2,Terrible support\n")
    workspace.drop("reviews.toml", 'task = "sentiment"\ninput = "reviews.csv"\n')
    result = workspace.batchd("run", "--once")
    assert result.returncode == 0, result.stderr
    organized = json.loads((workspace.outbox / "reviews" / "organized.json").read_text())
    assert organized.keys() == {"a1", "a2"}


@pytest.mark.parametrize("mode", [{}, FILE_MODE], ids=["inline", "file"])
def test_thinking_budget_and_safety_settings_reach_the_service_per_manifest_and_per_line(workspace: Workspace,
                                                                                        mode: dict):
    # The emulator refuses a request body google-genai's types do not allow, and thinks (its
    # gemini-2.5-flash does by default) 32 tokens and more a request, at most the budget.
    workspace.configure(**mode)
    (workspace.inbox / "reviews.jsonl").write_text(
        '{"id": "capped", "text": "Great value for the price."}\n'
        '{"id": "off", "text": "Terrible support.", "config": {"thinking_budget": 0}}\n')
    workspace.drop("reviews.toml", """\
task = "sentiment"
input = "reviews.jsonl"
thinking_budget = 16
include_thoughts = true
safety_settings = [
    {category = "hate_speech", threshold = "block_none"},
    {category = "HARM_CATEGORY_HARASSMENT", threshold = "BLOCK_ONLY_HIGH"},
]
""")

    result = workspace.batchd("run", "--once")

    assert result.returncode == 0, result.stderr
    summary = workspace.delivered()["reviews"]
    assert summary["state"] == "succeeded" and summary["tokens"]["thoughts"] == 16
    lines = {line["key"]: line for line in map(json.loads, (workspace.outbox / "reviews" / "results.jsonl").open())}
    assert lines["capped"]["usage"]["thoughtsTokenCount"] == 16
    assert "thoughtsTokenCount" not in lines["off"]["usage"]
    # include_thoughts: the thought summary is kept apart from the answer, which still parses.
    assert lines["capped"]["thoughts"] and lines["capped"]["thoughts"] not in lines["capped"]["text"]
    assert lines["capped"]["data"]["label"] and "thoughts" not in lines["off"], "budget 0: no thinking, no summary"
    organized = json.loads((workspace.outbox / "reviews" / "organized.json").read_text())
    assert all("label" in verdict for verdict in organized.values()), organized  # the thought summary is no answer


def test_cancel_a_running_job(workspace: Workspace):
    workspace.configure(job_seconds=60)
    daemon = workspace.start("run")
    try:
        workspace.drop("long.toml", TRANSLATE)
        workspace.wait_for(lambda: any(b["name"] for job in workspace.status() for b in job["remote_batches"]),
                           what="remote job created")
        assert workspace.batchd("cancel", "long").returncode == 0
        workspace.wait_for(lambda: "long" in workspace.delivered(), what="cancelled job delivered")
    finally:
        assert daemon.stop() == 0
    summary = workspace.delivered()["long"]
    assert summary["state"] == "cancelled"
    lines = (workspace.outbox / "long" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 4, "every request is accounted for, as a result or an error"
    assert all(job.state == types.JobState.JOB_STATE_CANCELLED for job in remote_jobs(workspace))


@pytest.mark.parametrize("point, mode", [(point, mode) for point in CRASH_POINTS for mode in ("inline", "file")
                                         if (point, mode) != ("after-upload", "inline")])  # inline uploads nothing
def test_kill_9_at_any_step_delivers_exactly_once(workspace: Workspace, point: str, mode: str):
    # Two requests a chunk: every job has several remote jobs, so every crash point meets a job
    # with chunks in different states.
    workspace.configure(chunk_max_requests=2, **FILE_MODE if mode == "file" else {})
    # The sentiment job reads an input file, which leaves the inbox with it whatever the crash point.
    workspace.drop("items.jsonl", SENTIMENT_ITEMS)
    workspace.drop("sentiment.toml", 'task = "sentiment"\ninput = "items.jsonl"\n')
    workspace.drop("translate.toml", TRANSLATE)

    crashed = workspace.start("run", BATCHD_CRASH_AT=point)
    assert crashed.wait(120) == -signal.SIGKILL, f"the daemon did not reach crash point {point}"

    result = workspace.batchd("run", "--once")

    assert result.returncode == 0, result.stderr
    delivered = workspace.delivered()
    assert set(delivered) == {"translate", "sentiment"}, delivered
    assert all(s["state"] == "succeeded" for s in delivered.values())
    assert delivered["translate"]["counts"]["total"] == 4
    assert delivered["sentiment"]["counts"]["total"] == 3
    assert not list(workspace.inbox.iterdir())
    assert (workspace.outbox / "sentiment" / "items.jsonl").read_text() == SENTIMENT_ITEMS
    assert_one_live_job_per_chunk(workspace)
    assert request_files(workspace) == [], "a request file was left on the Files API"


@pytest.mark.parametrize("faults, mode, state", [
    # Slow (13 s: the 429s wait what the service asks); the file case below meets the same faults.
    pytest.param(["http=503:0.3", "http=429:0.2"], "inline", "succeeded", marks=pytest.mark.slow),
    (["http=503:0.3", "http=429:0.2"], "file", "succeeded"),
    (["shuffle"], "inline", "succeeded"),
    # Answers without their keys are matched by position, which is a guess: never a silent success.
    (["drop-metadata"], "inline", "partial"),
    # Inline answers both shuffled and stripped of their keys cannot be joined by anyone;
    # file results always carry their key, so that is what large or order-sensitive jobs use.
    (["shuffle", "drop-metadata"], "file", "succeeded"),
    (["fail-requests=0.5"], "inline", "partial"),
    (["fail-requests=0.5"], "file", "partial"),
])
def test_emulator_faults_end_in_correct_outboxes(workspace: Workspace, faults: list[str], mode: str, state: str):
    # Answers matched by position are checked per job here; in a batch shared by both jobs they are
    # never matched by position (tests/test_pack.py).
    packing = {"pack_jobs_below": 0} if "drop-metadata" in faults else {}
    workspace.configure(faults=faults, **FILE_MODE if mode == "file" else {}, **packing)
    workspace.drop("translate.toml", TRANSLATE)
    workspace.drop("sentiment.toml", SENTIMENT)

    result = workspace.batchd("run", "--once", timeout=180)

    delivered = workspace.delivered()
    assert set(delivered) == {"translate", "sentiment"}, result.stderr
    for name, total in (("translate", 4), ("sentiment", 3)):
        lines = [json.loads(l) for l in (workspace.outbox / name / "results.jsonl").read_text().splitlines()]
        assert len(lines) == total
        assert len({line["key"] for line in lines}) == total
    if state == "succeeded":
        assert all(s["state"] == "succeeded" for s in delivered.values()), delivered
        translate = [json.loads(l) for l in (workspace.outbox / "translate" / "results.jsonl").read_text().splitlines()]
        # Joined by key even when the service shuffles and drops metadata: each answer is about its input.
        for line in translate:
            assert line["input"]["text"].split()[0] in line["text"], line
        assert result.returncode == 0, result.stderr
    else:
        assert all(s["state"] == "partial" for s in delivered.values()), delivered
        assert result.returncode == 4, result.stderr  # run --once says some answers are not to be trusted
    if faults == ["drop-metadata"]:
        # Matched by position, and the outbox says so: per result, in the summary and its error, and the log.
        for name, total in (("translate", 4), ("sentiment", 3)):
            lines = [json.loads(l) for l in (workspace.outbox / name / "results.jsonl").read_text().splitlines()]
            assert all(line["joined_by"] == "position" for line in lines)
            assert delivered[name]["counts"] == {"total": total, "succeeded": total, "failed": 0,
                                                 "joined_by_position": total}
            assert "by position" in delivered[name]["warnings"][0]
            assert delivered[name]["error"]["code"] == "joined_by_position"
            assert "inline_max_requests = 0" in delivered[name]["error"]["message"]
        assert re.search(r"level=warning .*matched to their requests by position.*delivered as partial", result.stderr)
    elif state == "partial":
        assert all(s["error"]["code"] == "requests_failed" for s in delivered.values())
        assert all("× 500: Emulated failure" in s["error"]["message"] for s in delivered.values()), delivered
    else:
        assert all("warnings" not in s and "joined_by_position" not in s["counts"] for s in delivered.values())
    assert_one_live_job_per_chunk(workspace)


def test_a_second_daemon_on_the_same_state_refuses_to_start(workspace: Workspace):
    daemon = workspace.start("run")
    try:
        workspace.wait_for(lambda: (workspace.state / "journal.db").exists(), what="first daemon up")
        second = workspace.batchd("run", "--once", timeout=60)
        assert second.returncode != 0
        assert "already running" in second.stderr
    finally:
        assert daemon.stop() == 0


def test_gemini_provider_without_a_key_is_a_clear_error(workspace: Workspace):
    result = workspace.batchd("run", "--once", "--provider", "gemini")
    assert result.returncode != 0
    assert "GEMINI_API_KEY" in result.stderr


@pytest.mark.parametrize("once", [False, True])
def test_sigterm_mid_job_exits_cleanly_and_a_restart_finishes_it(workspace: Workspace, once: bool):
    # The stop must land while the remote job runs: it is seen in the journal at once, and it runs
    # for 10 s, so a loaded machine that stalls this test for a few seconds still stops it mid-way.
    workspace.configure(job_seconds=10)
    workspace.drop("translate.toml", TRANSLATE)
    daemon = workspace.start("run", *(["--once"] if once else []))
    workspace.wait_for(lambda: remote_job_recorded(workspace), what="remote job created")
    # A service stops with 0; `run --once` says it stopped before delivering everything (EX_TEMPFAIL).
    assert daemon.stop() == (75 if once else 0)
    assert not workspace.delivered()
    if once:  # its closing line says it ended early, not that there was nothing to do
        assert "no job delivered; ended before every job was delivered" in daemon.output(), daemon.output()[-2000:]

    result = workspace.batchd("run", "--once")

    assert result.returncode == 0, result.stderr
    assert workspace.delivered()["translate"]["state"] == "succeeded"
    assert_one_live_job_per_chunk(workspace)


def test_the_gemini_provider_is_a_config_change_and_polls_with_list_pages(workspace: Workspace, tmp_path):
    """provider = "gemini" with the SDK's own variables, pointed at an emulator standing in for Google."""
    with EmulatorServer(tmp_path / "google", job_seconds=1.5, api_key="real-looking-key") as google:
        workspace.configure(provider="gemini", chunk_max_requests=2)
        workspace.drop("translate.toml", TRANSLATE)

        result = workspace.batchd("run", "--once", GEMINI_API_KEY="real-looking-key",
                                  GOOGLE_GEMINI_BASE_URL=google.base_url)

        assert result.returncode == 0, result.stderr
        summary = workspace.delivered()["translate"]
        assert (summary["provider"], summary["emulated"], summary["state"]) == ("gemini", False, "succeeded")
        assert len(summary["remote_batches"]) == 2, "4 requests at 2 a chunk make two remote jobs"
        organized = json.loads((workspace.outbox / "translate" / "organized.json").read_text())
        assert all(len(languages) == 2 for languages in organized.values())
        with urllib.request.urlopen(f"{google.base_url}/_emulator/stats") as answer:  # not the Gemini API
            routes = json.load(answer)["routes"]
    # Jobs ran for 1.5 s under 0.1-0.3 s polls: progress came from list pages, with one get per finished job.
    assert routes["list"] >= 3
    assert routes["get"] == 2


ONE_OFF_PLUGINS = '''
from pydantic import BaseModel, ConfigDict

from batchd import hookimpl
from batchd.task import Task, TaskRequest


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str]


class Shout(Task):
    name = "shout"
    Params = Params

    def inline_items(self, params):
        return "texts", params.texts

    def requests(self, params, items):
        for item in items:
            yield TaskRequest(key=item.id, prompt=f"Shout: {item.text}", input={"text": item.text})

    def organize(self, results):
        for result in results:
            yield result.key, (result.text or "").upper()


class Clumsy(Shout):
    name = "clumsy"

    def organize(self, results):
        for result in results:
            yield result.key, result.text
            raise RuntimeError("organize tripped over its own feet")


class Silent(Shout):
    name = "silent"

    def requests(self, params, items):
        return iter(())


@hookimpl
def register_tasks(register):
    register(Shout())
    register(Clumsy())
    register(Silent())
'''


def test_tasks_from_plugins_dir_and_a_plugin_failure_costs_only_its_organized_output(workspace: Workspace):
    (workspace.root / "plugins.d").mkdir()
    (workspace.root / "plugins.d" / "one_off.py").write_text(ONE_OFF_PLUGINS)
    workspace.configure(plugins_dir="plugins.d")
    workspace.drop("loud.toml", 'task = "shout"\ntexts = ["hello", "world"]\n')
    workspace.drop("clumsy.toml", 'task = "clumsy"\ntexts = ["a", "b", "c"]\n')
    workspace.drop("silent.toml", 'task = "silent"\ntexts = ["a"]\n')
    workspace.drop("translate.toml", TRANSLATE)
    workspace.drop("typo.toml", TRANSLATE.replace("Hello", "Typo") + 'model = "gemini-2.5-flsh"\n')

    result = workspace.batchd("run", "--once", timeout=120)

    delivered = workspace.delivered()
    assert delivered["loud"]["state"] == "succeeded", result.stderr
    loud = json.loads((workspace.outbox / "loud" / "organized.json").read_text())
    assert loud.keys() == {"1", "2"} and "[EMULATED" in loud["1"]
    clumsy = delivered["clumsy"]
    # Not a success with an empty organized.json: an outcome of its own, its error naming the plugin's.
    assert clumsy["state"] == "plugin_failed" and clumsy["error"]["code"] == "plugin_failed"
    assert clumsy["counts"]["total"] == 3 and "organize tripped" in clumsy["error"]["message"]
    assert len((workspace.outbox / "clumsy" / "results.jsonl").read_text().splitlines()) == 3
    assert json.loads((workspace.outbox / "clumsy" / "organized.json").read_text()) == {}
    # A task that builds nothing: rejected with the reason, never rebuilt forever.
    silent = delivered["silent"]
    assert silent["state"] == "rejected" and "produced no requests" in silent["error"]["message"]
    assert delivered["translate"]["state"] == "succeeded", "other jobs are unaffected"
    # A model the provider does not serve: rejected before anything is priced or sent, naming close ones.
    typo = delivered["typo"]
    assert typo["state"] == "rejected" and typo["error"]["code"] == "unknown_model", typo
    assert "'gemini-2.5-flsh' is not a model the emulator serves" in typo["error"]["message"]
    assert "did you mean 'gemini-2.5-flash'" in typo["error"]["message"]
    assert "cost" not in typo and "prices" not in typo["error"]["message"]
    assert json.loads((workspace.state / "models.json").read_text())["source"] == "the emulator"
    schema = workspace.batchd("schema")
    assert '"shout"' in schema.stdout


@pytest.mark.parametrize(("fault", "code"), [
    ("404@download", "results_unavailable"),  # the results file is refused for good
    ("404@get", "remote_missing"),            # listed as finished, then gone when its results are fetched
])
def test_results_the_service_refuses_to_hand_over_fail_the_chunk_not_the_daemon(workspace: Workspace, fault: str,
                                                                                 code: str):
    workspace.configure(faults=[fault], **FILE_MODE)
    workspace.drop("translate.toml", TRANSLATE)

    result = workspace.batchd("run", "--once")

    assert result.returncode == 1, result.stderr  # the job failed: --once says so
    summary = workspace.delivered()["translate"]
    assert summary["state"] == "failed" and summary["counts"] == {"total": 4, "succeeded": 0, "failed": 4}
    errors = [json.loads(line)["error"] for line in (workspace.outbox / "translate" / "results.jsonl").open()]
    assert all(error["code"] == code for error in errors)


def test_the_shipped_examples_all_succeed(workspace: Workspace):
    """README's main job: every example manifest in the repository's examples/inbox/, one per task."""
    shipped = REPO / "examples" / "inbox"
    for path in shipped.iterdir():
        (workspace.inbox / path.name).write_bytes(path.read_bytes())
    manifests = {path.stem for path in shipped.iterdir() if path.suffix in (".toml", ".json")}

    result = workspace.batchd("run", "--once")

    assert result.returncode == 0, result.stderr
    delivered = workspace.delivered()
    assert set(delivered) == manifests
    assert {s["task"] for s in delivered.values()} >= {"translate", "sentiment", "variations", "analysis",
                                                        "documents", "template", "embed"}
    assert all(s["state"] == "succeeded" for s in delivered.values()), delivered


def test_repeats_dropped_are_warned_and_every_result_line_carries_its_source_text(workspace: Workspace):
    workspace.configure(log_format="json")
    workspace.drop("rep.toml", 'task = "translate"\ntexts = ["Hi", "Bye", "Hi"]\nlanguages = ["French"]\n')
    workspace.drop("docs.toml", 'task = "documents"\nprompt = "Sum up: {document}"\n'
                                'documents = ["First doc.", "Second doc."]\n')
    workspace.drop("analysis.toml", 'task = "analysis"\ntexts = ["Great phone."]\nanalyses = ["summary"]\n')
    workspace.drop("tpl.toml", 'task = "template"\ntemplate = "Blurb for {name}"\n'
                               'rows = [{id = "p1", name = "Lamp"}]\n')

    result = workspace.batchd("run", "--once")

    assert result.returncode == 0, result.stderr
    folders = workspace.outbox_folders()
    (warning,) = folders["rep"].summary["warnings"]
    assert warning.startswith("1 repeated text(s) dropped") and "'3 (Hi)'" in warning
    logged = [json.loads(line) for line in result.stderr.splitlines()]
    assert [line["msg"] for line in logged if line["level"] == "warning"] == [
        f"job {folders['rep'].summary['job']} (rep.toml): {warning}"]
    assert "warnings" not in folders["docs"].summary
    assert [line["input"]["text"] for line in folders["docs"].results] == ["First doc.", "Second doc."]
    assert [line["input"]["text"] for line in folders["analysis"].results] == ["Great phone."]
    assert [line["input"]["row"] for line in folders["tpl"].results] == [{"name": "Lamp"}]
    assert all("text" in line["input"] for line in folders["rep"].results)


def test_an_input_file_goes_with_its_last_job_and_a_kill_after_the_claim_loses_nothing(workspace: Workspace):
    """Two manifests name one input file: the first claimed copies it (the other still needs it), the
    last takes it out of the inbox. Killed between a claim and the input's removal, the restart
    finishes the move; each outbox folder holds the file its job read, the inbox is left empty."""
    rows = "id,text\na1,Great value\na2,Terrible support\n"
    (workspace.inbox / "data").mkdir()
    workspace.drop("data/reviews.csv", rows)
    workspace.drop("one.toml", 'task = "sentiment"\ninput = "data/reviews.csv"\n')
    workspace.drop("two.toml", 'task = "sentiment"\ninput = "data/reviews.csv"\ntemperature = 0.5\n')
    workspace.drop("results.jsonl", '{"id": "x", "text": "An input named as an outbox file"}\n')
    workspace.drop("odd.toml", 'task = "sentiment"\ninput = "results.jsonl"\n')

    crashed = workspace.start("run", BATCHD_CRASH_AT="after-claim")
    assert crashed.wait(120) == -signal.SIGKILL
    result = workspace.batchd("run", "--once")

    assert result.returncode == 0, result.stderr
    delivered = workspace.delivered()
    assert {name: summary["state"] for name, summary in delivered.items()} == {
        "one": "succeeded", "two": "succeeded", "odd": "succeeded"}
    for name in ("one", "two"):
        assert (workspace.outbox / name / "data" / "reviews.csv").read_text() == rows
        assert [line["input"]["text"] for line in workspace.outbox_folder(name).results] == [
            "Great value", "Terrible support"]
    # An input whose path is a file batchd writes in the outbox folder stays where it was.
    assert sorted(str(path.relative_to(workspace.inbox)) for path in workspace.inbox.rglob("*")) == [
        "data", "results.jsonl"]
    # Each request was sent once: in a batch of its job's own, or sharing one (batchd/daemon/pack.py).
    assert 1 <= len(remote_jobs(workspace)) <= 3
    db = sqlite3.connect(f"file:{journal_path(workspace.state)}?mode=ro", uri=True)
    try:
        sent = db.execute("SELECT sum(requests) FROM (SELECT max(request_count) AS requests FROM chunks"
                          " WHERE remote_name IS NOT NULL GROUP BY remote_name)").fetchone()[0]
    finally:
        db.close()
    assert sent == 2 + 2 + 1
