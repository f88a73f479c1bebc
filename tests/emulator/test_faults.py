"""Every fault mode, injected per request (``X-Emulator-Fault``) and per server (``faults=[...]``)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx2 as httpx  # google-genai's own HTTP client, for the emulator's stats route
import pytest
from google.genai import errors, types

from batchd.emulator import EmulatorServer
from batchd.emulator.faults import FaultInjector, JobFaults, parse_fault

from .support import API_KEY, JOB_SECONDS, MODEL, inline_requests, make_client, output_lines, request_lines, \
    wait_done, write_jsonl

pytestmark = pytest.mark.filterwarnings("ignore:.*is experimental")


@pytest.mark.parametrize("status, error_type, name", [
    (429, errors.ClientError, "RESOURCE_EXHAUSTED"),
    (500, errors.ServerError, "INTERNAL"),
    (503, errors.ServerError, "UNAVAILABLE"),
])
def test_status_faults_on_every_route(emulator: EmulatorServer, version: str, tmp_path: Path, status: int,
                                      error_type: type, name: str):
    healthy = make_client(emulator.base_url, version)
    job = healthy.batches.create(model=MODEL, src=inline_requests(1))
    uploaded = healthy.files.upload(file=str(write_jsonl(tmp_path / "in.jsonl", request_lines(1))),
                                    config={"mime_type": "jsonl"})
    faulty = make_client(emulator.base_url, version, fault=str(status))
    calls = [
        lambda: faulty.batches.create(model=MODEL, src=inline_requests(1)),
        lambda: faulty.batches.create(model=MODEL, src=uploaded.name),
        lambda: faulty.batches.get(name=job.name),
        lambda: list(faulty.batches.list()),
        lambda: faulty.batches.cancel(name=job.name),
        lambda: faulty.batches.delete(name=job.name),
        lambda: faulty.files.upload(file=str(tmp_path / "in.jsonl"), config={"mime_type": "jsonl"}),
        lambda: faulty.files.get(name=uploaded.name),
        lambda: list(faulty.files.list()),
        lambda: faulty.files.delete(name=uploaded.name),
        lambda: faulty.files.download(file="files/batch-x"),
        lambda: faulty.models.count_tokens(model=MODEL, contents="x"),
        lambda: faulty.models.generate_content(model=MODEL, contents="x"),
    ]
    for call in calls:
        with pytest.raises(error_type) as raised:
            call()
        assert (raised.value.code, raised.value.status) == (status, name)
    assert healthy.batches.get(name=job.name).name == job.name  # nothing was changed by the failed calls


def test_a_failing_upload_chunk_fails_at_once(fresh_emulator: EmulatorServer, tmp_path: Path):
    # The answer still carries X-Goog-Upload-Status, or the SDK would resend the chunk for 7 s.
    # The SDK sends the header with the upload start only; the session keeps its faults for the chunks.
    faulty = make_client(fresh_emulator.base_url, fault="503@upload-chunk")
    with pytest.raises(errors.ServerError):
        faulty.files.upload(file=str(write_jsonl(tmp_path / "in.jsonl", request_lines(1))),
                            config={"mime_type": "jsonl"})
    # Counted, not timed: the one chunk was sent once and not resent.
    routes = httpx.get(fresh_emulator.base_url + "/_emulator/stats").json()["routes"]
    assert (routes["upload-start"], routes["upload-chunk"]) == (1, 1)


def test_every_nth_and_first_k_are_counted_per_route(fresh_emulator: EmulatorServer):
    healthy = make_client(fresh_emulator.base_url)
    job = healthy.batches.create(model=MODEL, src=inline_requests(1))
    every_third_get = make_client(fresh_emulator.base_url, fault="503/3@get")
    outcomes = []
    for _ in range(6):
        try:
            every_third_get.batches.get(name=job.name)
            list(every_third_get.batches.list())  # not a get: never fails, does not count
            outcomes.append("ok")
        except errors.ServerError:
            outcomes.append("503")
    assert outcomes == ["ok", "ok", "503", "ok", "ok", "503"]

    first_create = make_client(fresh_emulator.base_url, fault="500*1@create")
    with pytest.raises(errors.ServerError):
        first_create.batches.create(model=MODEL, src=inline_requests(1))
    assert first_create.batches.create(model=MODEL, src=inline_requests(1)).name


def test_sdk_retries_get_through_a_transient_fault(fresh_emulator: EmulatorServer):
    healthy = make_client(fresh_emulator.base_url)
    job = healthy.batches.create(model=MODEL, src=inline_requests(1))
    retrying = make_client(fresh_emulator.base_url, fault="429*2@get", retries=3)
    assert retrying.batches.get(name=job.name).name == job.name


def test_rates_are_seeded_and_reproducible(tmp_path: Path):
    patterns = []
    for run in range(2):
        with EmulatorServer(tmp_path / str(run), faults=["http=503:0.5@count-tokens"]) as emulator:
            client = make_client(emulator.base_url)
            pattern = []
            for _ in range(20):
                try:
                    client.models.count_tokens(model=MODEL, contents="x")
                    pattern.append(0)
                except errors.ServerError:
                    pattern.append(1)
            patterns.append(pattern)
    assert patterns[0] == patterns[1]
    assert 0 < sum(patterns[0]) < 20


def test_slow_answers_outlast_a_client_timeout(emulator: EmulatorServer):
    healthy = make_client(emulator.base_url)
    job = healthy.batches.create(model=MODEL, src=inline_requests(1))
    impatient = make_client(emulator.base_url, fault="slow=2@get", timeout_ms=300)
    with pytest.raises(Exception) as raised:
        impatient.batches.get(name=job.name)
    assert "timeout" in type(raised.value).__name__.lower()
    patient = make_client(emulator.base_url, fault="slow=0.2@get")
    assert patient.batches.get(name=job.name).name == job.name


def test_a_late_answer_comes_after_the_effect(emulator: EmulatorServer):
    """``late``: the request is handled at once, only its answer waits: a create whose client timed
    out made its job all the same (the ambiguous failure batchd reconciles by display name)."""
    impatient = make_client(emulator.base_url, fault="late=2@create", timeout_ms=300)
    with pytest.raises(Exception) as raised:
        impatient.batches.create(model=MODEL, src=inline_requests(1), config={"display_name": "late-create"})
    assert "timeout" in type(raised.value).__name__.lower()
    healthy = make_client(emulator.base_url)
    assert [j.display_name for j in healthy.batches.list(config={"page_size": 100})].count("late-create") == 1


@pytest.mark.parametrize("source", ["inline", "file"])
def test_fail_requests(emulator: EmulatorServer, tmp_path: Path, source: str):
    client = make_client(emulator.base_url, fault="fail-requests=0.5")
    if source == "inline":
        job = wait_done(client, client.batches.create(model=MODEL, src=inline_requests(40)).name)
        results = [(r.error, r.response) for r in job.dest.inlined_responses]
        failed = [error for error, _ in results if error is not None]
        assert all(error.code == 500 and error.message for error in failed)
    else:
        uploaded = client.files.upload(file=str(write_jsonl(tmp_path / "in.jsonl", request_lines(40))),
                                       config={"mime_type": "jsonl"})
        job = wait_done(client, client.batches.create(model=MODEL, src=uploaded.name).name)
        lines = output_lines(client, job)
        assert len(lines) == 40
        failed = [line for line in lines if "error" in line]
    assert job.state == types.JobState.JOB_STATE_SUCCEEDED
    assert 5 < len(failed) < 35


@pytest.mark.parametrize("fault, state", [
    ("job-failed", types.JobState.JOB_STATE_FAILED),
    ("job-expired", types.JobState.JOB_STATE_EXPIRED),
])
def test_whole_job_faults(emulator: EmulatorServer, version: str, fault: str, state: types.JobState):
    client = make_client(emulator.base_url, version, fault=fault)
    job = wait_done(client, client.batches.create(model=MODEL, src=inline_requests(2)).name)
    assert job.state == state and job.dest is None and job.end_time
    # The fault was stored with the job: a client without the header sees the same.
    healthy = make_client(emulator.base_url, version)
    assert healthy.batches.get(name=job.name).state == state


def test_a_job_fault_with_a_display_name_glob_hits_only_the_jobs_it_names(tmp_path: Path):
    # The server's fault, as batchd's [emulator] faults sets it: the first attempt of chunk 0 expires,
    # the job created again under another name runs normally; a restart changes nothing.
    with EmulatorServer(tmp_path, job_seconds=JOB_SECONDS, faults=["job-expired@*-c0"]) as emulator:
        client = make_client(emulator.base_url)
        expired = client.batches.create(model=MODEL, src=inline_requests(2), config={"display_name": "job-c0"})
        again = client.batches.create(model=MODEL, src=inline_requests(2), config={"display_name": "job-c0-r1"})
        unnamed = client.batches.create(model=MODEL, src=inline_requests(2))
        assert wait_done(client, expired.name).state == types.JobState.JOB_STATE_EXPIRED
        assert wait_done(client, again.name).state == types.JobState.JOB_STATE_SUCCEEDED
        assert wait_done(client, unnamed.name).state == types.JobState.JOB_STATE_SUCCEEDED
    with EmulatorServer(tmp_path, job_seconds=JOB_SECONDS) as emulator:
        client = make_client(emulator.base_url)
        assert client.batches.get(name=expired.name).state == types.JobState.JOB_STATE_EXPIRED
        assert client.batches.get(name=again.name).dest.inlined_responses
    # In a header the same: the glob decides per create.
    with EmulatorServer(tmp_path / "header", job_seconds=JOB_SECONDS) as emulator:
        client = make_client(emulator.base_url, fault="job-failed@nightly-*")
        failed = client.batches.create(model=MODEL, src=inline_requests(1), config={"display_name": "nightly-3"})
        kept = client.batches.create(model=MODEL, src=inline_requests(1), config={"display_name": "daily-3"})
        assert wait_done(client, failed.name).state == types.JobState.JOB_STATE_FAILED
        assert wait_done(client, kept.name).state == types.JobState.JOB_STATE_SUCCEEDED


def test_stuck_pending_until_the_job_expires(tmp_path: Path):
    # The view is the wall clock against the stored createTime: the look after 0.3 s (3 job_seconds)
    # must come before the expiry, also on a loaded machine that stalls this process for a while.
    with EmulatorServer(tmp_path, job_seconds=0.1, expire_seconds=5.0, faults=["stuck-pending"]) as emulator:
        client = make_client(emulator.base_url)
        job = client.batches.create(model=MODEL, src=inline_requests(1))
        time.sleep(0.3)
        assert client.batches.get(name=job.name).state == types.JobState.JOB_STATE_PENDING
        job = wait_done(client, job.name)
        assert job.state == types.JobState.JOB_STATE_EXPIRED and job.dest is None


def test_shuffle_returns_inline_answers_out_of_order(emulator: EmulatorServer):
    client = make_client(emulator.base_url, fault="shuffle")
    job = wait_done(client, client.batches.create(model=MODEL, src=inline_requests(10)).name)
    keys = [r.metadata["key"] for r in job.dest.inlined_responses]
    assert sorted(keys) == sorted(f"req-{i}" for i in range(10))
    assert keys != [f"req-{i}" for i in range(10)]
    for answer in job.dest.inlined_responses:  # each answer still belongs to its own request
        assert f"prompt number {answer.metadata['key'].split('-')[1]}" in answer.response.text


def test_shuffle_keeps_every_file_line_keyed(emulator: EmulatorServer, tmp_path: Path):
    client = make_client(emulator.base_url, fault="shuffle")
    uploaded = client.files.upload(file=str(write_jsonl(tmp_path / "in.jsonl", request_lines(50))),
                                   config={"mime_type": "jsonl"})
    job = wait_done(client, client.batches.create(model=MODEL, src=uploaded.name).name)
    keys = [line["key"] for line in output_lines(client, job)]
    assert sorted(keys) == sorted(f"k{i}" for i in range(50)) and keys != [f"k{i}" for i in range(50)]


def test_drop_metadata(emulator: EmulatorServer):
    client = make_client(emulator.base_url, fault="drop-metadata")
    job = wait_done(client, client.batches.create(model=MODEL, src=inline_requests(3)).name)
    assert [r.metadata for r in job.dest.inlined_responses] == [None, None, None]
    assert all(r.response.text for r in job.dest.inlined_responses)


def test_server_faults_apply_to_every_job(tmp_path: Path):
    with EmulatorServer(tmp_path, job_seconds=JOB_SECONDS, api_key=API_KEY,
                        faults=["shuffle", "drop-metadata=0.5"]) as emulator:
        client = make_client(emulator.base_url)
        job = wait_done(client, client.batches.create(model=MODEL, src=inline_requests(20)).name)
        kept = [r.metadata["key"] for r in job.dest.inlined_responses if r.metadata]
        assert 0 < len(kept) < 20
        assert kept != sorted(kept, key=lambda key: int(key.split("-")[1]))


def test_a_bad_fault_header_is_a_400(emulator: EmulatorServer):
    client = make_client(emulator.base_url, fault="explode")
    with pytest.raises(errors.ClientError) as raised:
        client.batches.list()
    assert raised.value.code == 400 and "explode" in raised.value.message


@pytest.mark.parametrize("spec", ["http", "http=200", "slow", "slow=x", "503@nowhere", "shuffle=1",
                                  "fail-requests", "fail-requests=2", "job-failed@get", "job-expired@", "503/0",
                                  "http=503:abc"])
def test_bad_specs_are_refused_with_a_reason(spec: str):
    with pytest.raises(ValueError, match="fault"):
        parse_fault(spec)
    with pytest.raises(ValueError):
        FaultInjector([spec])


def test_spec_parsing():
    assert parse_fault("503").status == 503 and parse_fault("503").rate == 1.0
    rated = parse_fault("http=429:0.2@get|list")
    assert (rated.status, rated.rate, rated.routes) == (429, 0.2, frozenset({"get", "list"}))
    assert parse_fault("slow=3@files").routes >= {"upload-chunk", "download"}
    assert parse_fault("500/3").every == 3 and parse_fault("500*2").first == 2
    job = JobFaults(["fail-requests=0.25", "shuffle"])
    assert job.shuffle and job.produces_results
    assert [job.request_fails(i) for i in range(100)] == [job.request_fails(i) for i in range(100)]
    assert not JobFaults(["job-failed"]).produces_results


def test_list_lag_leaves_a_job_out_of_its_first_list_passes(fresh_emulator: EmulatorServer):
    """``list-lag=N``: the real service's list may miss a job that was just created; get sees it at once."""
    lagging = make_client(fresh_emulator.base_url, fault="list-lag=2")
    healthy = make_client(fresh_emulator.base_url)
    hidden = lagging.batches.create(model=MODEL, src=inline_requests(1))
    shown = healthy.batches.create(model=MODEL, src=inline_requests(1))

    def listed() -> list[str]:
        return [job.name for job in healthy.batches.list(config={"page_size": 1})]  # every page counts once

    assert listed() == [shown.name]
    assert healthy.batches.get(name=hidden.name).name == hidden.name
    assert listed() == [shown.name]
    assert listed() == [shown.name, hidden.name]
    assert listed() == [shown.name, hidden.name]


def test_list_lag_counts_survive_an_emulator_restart(tmp_path: Path):
    with EmulatorServer(tmp_path, job_seconds=JOB_SECONDS, api_key=API_KEY) as emulator:
        client = make_client(emulator.base_url, fault="list-lag=2")
        hidden = client.batches.create(model=MODEL, src=inline_requests(1))
        assert list(make_client(emulator.base_url).batches.list()) == []
    with EmulatorServer(tmp_path, job_seconds=JOB_SECONDS, api_key=API_KEY) as emulator:
        healthy = make_client(emulator.base_url)
        assert list(healthy.batches.list()) == []
        assert [job.name for job in healthy.batches.list()] == [hidden.name]


def test_list_lag_in_seconds_hides_a_job_until_then(fresh_emulator: EmulatorServer):
    client = make_client(fresh_emulator.base_url, fault="list-lag=3600s")
    client.batches.create(model=MODEL, src=inline_requests(1))
    assert list(client.batches.list()) == []


@pytest.mark.parametrize("spec", ["list-lag", "list-lag=0", "list-lag=x", "list-lag=-1s", "list-lag=2@list"])
def test_bad_list_lag_specs_are_refused(spec: str):
    with pytest.raises(ValueError, match="list-lag|job faults"):
        parse_fault(spec)


def test_list_lag_parses_lists_and_seconds():
    assert JobFaults(["list-lag=3"]).list_lag_lists == 3
    assert JobFaults(["list-lag=1.5s"]).list_lag_seconds == 1.5


def test_errors_carry_googles_details_where_google_sends_them(emulator, tmp_path: Path):
    """A key the service does not know: 400 with an ErrorInfo of reason API_KEY_INVALID; a 429: which
    quota (QuotaFailure), where to read (Help) and when to retry (RetryInfo). google-genai keeps them."""
    wrong = make_client(emulator.base_url, api_key="not-the-key")
    with pytest.raises(errors.ClientError) as refused:
        wrong.batches.list()
    assert refused.value.code == 400
    [info, localized] = refused.value.details["error"]["details"]
    assert info["@type"] == "type.googleapis.com/google.rpc.ErrorInfo" and info["reason"] == "API_KEY_INVALID"
    assert localized["message"] == "API key not valid. Please pass a valid API key."

    throttled = make_client(emulator.base_url, api_key=emulator.api_key, fault="429", retries=1)
    with pytest.raises(errors.ClientError) as exhausted:
        throttled.batches.list()
    assert exhausted.value.code == 429 and exhausted.value.status == "RESOURCE_EXHAUSTED"
    kinds = {detail["@type"].rsplit(".", 1)[-1]: detail for detail in exhausted.value.details["error"]["details"]}
    assert set(kinds) == {"QuotaFailure", "Help", "RetryInfo"} and kinds["RetryInfo"]["retryDelay"] == "2s"
