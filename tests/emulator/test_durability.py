"""Big inputs, many requests, and state that survives a restart."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from google.genai import types

from batchd.emulator import EmulatorServer

from .support import API_KEY, MODEL, inline_requests, make_client, output_lines, request_lines, wait_done, \
    write_jsonl


def test_multi_chunk_upload_over_8_mib(client, tmp_path: Path):
    path = tmp_path / "big.jsonl"
    padding = "p" * 1000
    with open(path, "w") as file:
        for i in range(9_500):
            file.write(json.dumps({"key": f"k{i}", "request": {"contents": [{"parts": [{"text": f"{i} {padding}"}]}]}})
                       + "\n")
    size = path.stat().st_size
    assert size > 9 * 1024 * 1024  # two chunks of the SDK's 8 MiB

    uploaded = client.files.upload(file=str(path), config={"mime_type": "jsonl"})
    assert uploaded.size_bytes == size
    assert uploaded.sha256_hash == base64.b64encode(hashlib.sha256(path.read_bytes()).hexdigest().encode()).decode()


def test_ten_thousand_request_file_batch(client, tmp_path: Path):
    path = write_jsonl(tmp_path / "10k.jsonl", request_lines(10_000))
    uploaded = client.files.upload(file=str(path), config={"mime_type": "jsonl"})
    job = wait_done(client, client.batches.create(model=MODEL, src=uploaded.name,
                                                  config={"display_name": "ten-thousand"}).name)
    assert job.state == types.JobState.JOB_STATE_SUCCEEDED
    lines = output_lines(client, job)
    assert [line["key"] for line in lines] == [f"k{i}" for i in range(10_000)]
    assert all("response" in line for line in lines)


def test_restart_with_the_same_state_dir_keeps_jobs_and_files(tmp_path: Path):
    state = tmp_path / "state"
    with EmulatorServer(state, job_seconds=0.2, api_key=API_KEY) as emulator:
        client = make_client(emulator.base_url)
        uploaded = client.files.upload(file=str(write_jsonl(tmp_path / "in.jsonl", request_lines(5))),
                                       config={"mime_type": "jsonl", "display_name": "kept"})
        finished = wait_done(client, client.batches.create(model=MODEL, src=uploaded.name).name)
        inline = wait_done(client, client.batches.create(model=MODEL, src=inline_requests(2)).name)
        cancelled = client.batches.create(model=MODEL, src=inline_requests(1))
        client.batches.cancel(name=cancelled.name)
        expected_output = output_lines(client, finished)

    # A job still running when the emulator stops is finished by the next one.
    with EmulatorServer(state, job_seconds=0.5, api_key=API_KEY) as emulator:
        client = make_client(emulator.base_url)
        unfinished = client.batches.create(model=MODEL, src=uploaded.name, config={"display_name": "unfinished"})

    with EmulatorServer(state, api_key=API_KEY) as emulator:
        client = make_client(emulator.base_url)
        assert client.files.get(name=uploaded.name).display_name == "kept"
        assert client.batches.get(name=finished.name).state == types.JobState.JOB_STATE_SUCCEEDED
        assert output_lines(client, client.batches.get(name=finished.name)) == expected_output
        assert [r.metadata["key"] for r in client.batches.get(name=inline.name).dest.inlined_responses] == \
            ["req-0", "req-1"]
        assert client.batches.get(name=cancelled.name).state == types.JobState.JOB_STATE_CANCELLED
        resumed = wait_done(client, unfinished.name)
        assert resumed.state == types.JobState.JOB_STATE_SUCCEEDED
        assert output_lines(client, resumed) == expected_output
        listed = {job.name for job in client.batches.list()}
        assert {finished.name, inline.name, cancelled.name, unfinished.name} <= listed


def test_job_timing_follows_the_stored_create_time(tmp_path: Path):
    with EmulatorServer(tmp_path, job_seconds=0.4) as emulator:
        client = make_client(emulator.base_url)
        job = client.batches.create(model=MODEL, src=inline_requests(1))
    time.sleep(0.5)
    with EmulatorServer(tmp_path, job_seconds=60) as emulator:  # the job keeps its own 0.4 s
        client = make_client(emulator.base_url)
        assert client.batches.get(name=job.name).state == types.JobState.JOB_STATE_SUCCEEDED


def test_a_job_whose_processing_was_cut_off_is_processed_again(tmp_path: Path):
    state = tmp_path / "state"
    with EmulatorServer(state, job_seconds=0.1, api_key=API_KEY) as emulator:
        client = make_client(emulator.base_url)
        uploaded = client.files.upload(file=str(write_jsonl(tmp_path / "in.jsonl", request_lines(20))),
                                       config={"mime_type": "jsonl"})
        job = wait_done(client, client.batches.create(model=MODEL, src=uploaded.name).name)
        expected = output_lines(client, job)
    # What a kill in the middle of processing leaves: the job record without completion, no output yet.
    job_id = job.name.removeprefix("batches/")
    with contextlib.closing(sqlite3.connect(state / "state.db")) as db, db:
        (body,) = db.execute("SELECT body FROM docs WHERE kind = 'jobs' AND id = ?", (job_id,)).fetchone()
        record = json.loads(body)
        del record["completeTime"]
        db.execute("UPDATE docs SET body = ? WHERE kind = 'jobs' AND id = ?", (json.dumps(record), job_id))
        db.execute("DELETE FROM docs WHERE kind = 'files' AND id = ?", (f"batch-{job_id}",))
    (state / "blobs" / f"batch-{job_id}").rename(state / "blobs" / f"batch-{job_id}.part")  # half written

    with EmulatorServer(state, api_key=API_KEY) as emulator:
        client = make_client(emulator.base_url)
        resumed = wait_done(client, job.name)
        assert resumed.state == types.JobState.JOB_STATE_SUCCEEDED
        assert output_lines(client, resumed) == expected
    assert not (state / "blobs" / f"batch-{job_id}.part").exists()


def test_sigkill_after_the_create_answer_keeps_the_job(tmp_path: Path):
    command = [sys.executable, "-m", "batchd.emulator", "--port", "0", "--state-dir", str(tmp_path),
               "--job-seconds", "0.2"]

    def start() -> tuple[subprocess.Popen, str]:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        return process, process.stdout.readline().split("listening on ")[1].split()[0]

    process, base_url = start()
    try:
        client = make_client(base_url)
        created = client.batches.create(model=MODEL, src=inline_requests(3), config={"display_name": "killed"})
        process.kill()
        process.wait(10)
        process, base_url = start()
        client = make_client(base_url)
        job = wait_done(client, created.name)
        assert job.display_name == "killed" and len(job.dest.inlined_responses) == 3
    finally:
        process.kill()
        process.wait(10)


def test_documents_an_older_emulator_kept_as_files_are_moved_into_its_database(tmp_path: Path):
    state = tmp_path / "state"
    with EmulatorServer(state, job_seconds=0, api_key=API_KEY) as emulator:
        client = make_client(emulator.base_url)
        inline = wait_done(client, client.batches.create(model=MODEL, src=inline_requests(2)).name)
        uploaded = client.files.upload(file=str(write_jsonl(tmp_path / "in.jsonl", request_lines(2))),
                                       config={"mime_type": "jsonl", "display_name": "kept"})
    # The layout an older emulator left: a JSON file per document (jobs in batches/), an inline job's
    # requests and answers beside its record.
    with contextlib.closing(sqlite3.connect(state / "state.db")) as db:
        for kind, doc_id, body in db.execute("SELECT kind, id, body FROM docs"):
            folder = state / ("batches" if kind == "jobs" else kind)
            folder.mkdir(exist_ok=True)
            (folder / f"{doc_id}.json").write_text(body)
        for job_id, requests, answers in db.execute("SELECT job_id, input, output FROM inline"):
            (state / "batches" / f"{job_id}.input.json").write_text(requests)
            (state / "batches" / f"{job_id}.output.json").write_text(answers)
    for suffix in ("", "-wal", "-shm"):
        (state / f"state.db{suffix}").unlink(missing_ok=True)

    with EmulatorServer(state, api_key=API_KEY) as emulator:
        client = make_client(emulator.base_url)
        assert [r.metadata["key"] for r in client.batches.get(name=inline.name).dest.inlined_responses] == \
            ["req-0", "req-1"]
        assert client.files.get(name=uploaded.name).display_name == "kept"
    assert not (state / "batches").exists() and not (state / "files").exists()


def test_a_file_past_its_expiry_is_removed_bytes_and_all(tmp_path: Path):
    """The Files API deletes a file once it expires: the emulator answers it 403 from then on and, at its
    next look (every ``expire_seconds`` here, every 10 minutes at most), removes its bytes too, so an
    emulator that runs for months does not keep every results file it ever made."""
    source = tmp_path / "hello.txt"
    source.write_text("hello")
    with EmulatorServer(tmp_path / "state", job_seconds=0.1, expire_seconds=1.0) as emulator:
        client = make_client(emulator.base_url)
        expiring = client.files.upload(file=source, config=types.UploadFileConfig(mime_type="text/plain"))
        blob = emulator.app.store.blob(expiring.name.removeprefix("files/"))
        assert blob.exists()
        time.sleep(1.2)
        kept = client.files.upload(file=source, config=types.UploadFileConfig(mime_type="text/plain"))
        assert [f.name for f in client.files.list()] == [kept.name]
        assert not blob.exists()
        assert emulator.app.store.blob(kept.name.removeprefix("files/")).exists()
