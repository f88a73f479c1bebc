"""Tests of batchd.provider: the real google-genai SDK over HTTP against the emulator on 127.0.0.1."""

from __future__ import annotations

import inspect
import json
import threading
import tracemalloc
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from google import genai
from google.genai import errors

from batchd.config import RetrySettings
from batchd.task import GenerationSettings
from batchd.emulator.server import EmulatorServer
from batchd.encoding import RequestEncoder, inlined_request
from batchd.testing import EMULATOR_API_KEY, Emulator
from batchd.provider import (
    UPLOAD_PART_BYTES,
    Provider,
    ProviderError,
    RetryPolicy,
    is_auth_error,
    is_retryable,
    tls_context,
)
from batchd.remote import STAT_FIELDS, RemoteJob, inline_results, read_results_file, short_state

MODEL = "gemini-2.5-flash"
API_KEY = EMULATOR_API_KEY
# Fast backoff so retry tests take milliseconds; the attempts match production.
FAST_RETRY = RetryPolicy(attempts=5, initial_delay=0.01, max_delay=0.05)
# X-Emulator-Fault specs (docs/emulator.md). A header spec keeps one counter per spec text for the
# whole emulator, so each test uses its own text.
CREATE_503_ONCE = "503*1@create"


def read_fault(status: int) -> str:
    """The first two gets and the first two lists fail with ``status``: fewer than the retry attempts."""
    return f"{status}*2@get,{status}*2@list"


TRANSLATE_DEFAULTS = {"temperature": 0.2, "max_output_tokens": 256, "system_instruction": "Translate to French."}
VERDICT_SCHEMA = {
    "type": "object",
    "properties": {"label": {"type": "string", "enum": ["positive", "negative"]}, "score": {"type": "number"}},
    "required": ["label", "score"],
}


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    with Emulator(tmp_path_factory.mktemp("emulator"), job_seconds=0.2) as server:
        yield server


@pytest.fixture()
def provider(emulator: EmulatorServer) -> Iterator[Provider]:
    with Provider(api_key=API_KEY, base_url=emulator.base_url, retry=FAST_RETRY) as provider:
        yield provider


def wait_until_done(provider: Provider, name: str) -> RemoteJob:
    for _ in range(2000):  # a bound against hangs, not a timing assertion
        job = provider.get(name)
        if job.done:
            return job
        threading.Event().wait(0.02)
    raise AssertionError(f"{name} never finished")


def write_requests(path: Path, encoder: RequestEncoder, prompts: dict[str, str]) -> Path:
    with open(path, "w", encoding="utf-8") as requests_file:
        for key, prompt in prompts.items():
            requests_file.write(encoder.jsonl_line(key, prompt) + "\n")
    return path


def answer_text(response: dict[str, Any]) -> str:
    return "".join(part.get("text", "") for part in response["candidates"][0]["content"]["parts"])


# -- end to end against the emulator ----------------------------------------------------------------


def test_file_job_round_trip_joins_results_by_key(provider: Provider, tmp_path: Path) -> None:
    prompts = {f"r{number:06d}-fr": f"Sentence number {number}." for number in range(25)}
    input_path = write_requests(tmp_path / "requests.jsonl", RequestEncoder(MODEL, TRANSLATE_DEFAULTS), prompts)

    file_name = provider.upload_jsonl(input_path, "round-trip-input").name
    assert file_name.startswith("files/")
    created = provider.create_from_file(MODEL, file_name, "round-trip")
    assert created.name.startswith("batches/")
    assert created.display_name == "round-trip"
    assert created.state in ("pending", "running")

    job = wait_until_done(provider, created.name)
    assert job.state == "succeeded"
    assert job.stats["requestCount"] == 25
    assert job.stats["successfulRequestCount"] == 25
    assert job.responses_file

    # As the daemon fetches a file-output job: download, then stream the lines.
    downloaded = provider.download(job.responses_file, tmp_path / "out" / "results.jsonl")
    records = {record["key"]: record for record in read_results_file(downloaded)}
    assert records.keys() == prompts.keys()
    for key, prompt in prompts.items():
        assert "Sentence" in answer_text(records[key]["response"])
    assert (tmp_path / "out" / "results.jsonl").is_file()


def test_inline_job_with_structured_output(provider: Provider, tmp_path: Path) -> None:
    encoder = RequestEncoder(MODEL, {"response_mime_type": "application/json", "response_json_schema": VERDICT_SCHEMA})
    requests = [
        encoder.inline("a", "I loved it."),
        encoder.inline("b", "Dreadful.", {"temperature": 0.0}),
    ]
    created = provider.create_inline(MODEL, requests, "inline-structured")
    job = wait_until_done(provider, created.name)
    assert job.state == "succeeded"
    assert job.responses_file is None

    assert job.inlined is not None, "get returns inline output"
    records = {record["key"]: record for record in inline_results(job.inlined)}
    assert records.keys() == {"a", "b"}
    for record in records.values():
        verdict = json.loads(answer_text(record["response"]))
        assert verdict["label"] in ("positive", "negative")
        assert isinstance(verdict["score"], (int, float))


def test_list_pages_through_all_jobs_with_int_stats(provider: Provider) -> None:
    encoder = RequestEncoder(MODEL)
    names = [
        provider.create_inline(MODEL, [encoder.inline(str(n), "hi")] * 2, f"listed-{n}").name for n in range(3)
    ]
    listed = {job.name: job for job in provider.list_jobs(page_size=1)}
    assert set(names) <= listed.keys()
    found = listed[names[1]]
    assert found.display_name == "listed-1"
    assert found.stats.keys() == set(STAT_FIELDS)
    assert all(isinstance(count, int) for count in found.stats.values())
    assert found.stats["requestCount"] == 2

    assert [job.name for job in listed.values() if job.display_name == "listed-1"] == [names[1]]


def test_create_is_not_retried_on_503(emulator: EmulatorServer) -> None:
    with Provider(
        api_key=API_KEY, base_url=emulator.base_url, retry=FAST_RETRY, headers={"X-Emulator-Fault": CREATE_503_ONCE}
    ) as faulty:
        with pytest.raises(errors.ServerError) as raised:
            faulty.create_inline(MODEL, [RequestEncoder(MODEL).inline("k", "hi")], "create-503")
    assert raised.value.code == 503
    assert is_retryable(raised.value)  # for the caller's own policy: reconcile first, then create again
    with Provider(api_key=API_KEY, base_url=emulator.base_url, retry=FAST_RETRY) as provider:
        assert [job for job in provider.list_jobs() if job.display_name == "create-503"] == []


# A 429 on a get is the daemon's to wait out (test_a_429_on_a_get_is_left_to_the_daemon_...).
@pytest.mark.parametrize("status", [503, 500])
def test_a_fetch_s_get_is_retried_and_the_loop_s_reads_go_out_once(emulator: EmulatorServer, provider: Provider,
                                                                   status: int) -> None:
    """A fetch's get runs in a worker thread: the SDK retries it. The loop's own reads (the poll's list,
    the get of a batch the list left out) are tried once: the loop paces them (its poll clock)."""
    created = provider.create_inline(MODEL, [RequestEncoder(MODEL).inline("k", "hi")], f"read-retry-{status}")
    with Provider(
        api_key=API_KEY, base_url=emulator.base_url, retry=FAST_RETRY, headers={"X-Emulator-Fault": read_fault(status)}
    ) as flaky:
        assert flaky.get(created.name).name == created.name
        for _ in range(2):  # each poll's list fails as the service answers it...
            with pytest.raises(errors.APIError) as refused:
                list(flaky.list_jobs())
            assert refused.value.code == status
        assert any(job.name == created.name for job in flaky.list_jobs())  # ...until it answers
    # (A header's fault counts are shared by every request carrying the same text: a text of its own.)
    with Provider(
        api_key=API_KEY, base_url=emulator.base_url, retry=FAST_RETRY, headers={"X-Emulator-Fault": f"{status}*1@get"}
    ) as flaky:
        with pytest.raises(errors.APIError):
            flaky.get(created.name, once=True)
        assert flaky.get(created.name, once=True).name == created.name


def test_download_streams_a_multi_megabyte_output_to_disk(provider: Provider, tmp_path: Path) -> None:
    # Each answer line is ~450 bytes; 28,000 of them make an output file of ~12 MiB.
    prompts = {f"k{number}": f"{number} " + "word " * 10 for number in range(28000)}
    input_path = write_requests(tmp_path / "requests.jsonl", RequestEncoder(MODEL), prompts)
    job = provider.create_from_file(MODEL, provider.upload_jsonl(input_path, "big-input").name, "big")
    job = wait_until_done(provider, job.name)
    destination = tmp_path / "results.jsonl"

    tracemalloc.start()
    try:
        provider.download(job.responses_file, destination)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # google-genai streams in 1 MiB chunks and httpx copies each a few times while assembling it: the
    # peak stays near 4.5 MiB whatever the file size, well below the body it would take to hold it whole.
    mebibyte = 1024 * 1024
    assert destination.stat().st_size > 10 * mebibyte
    assert peak < 8 * mebibyte
    assert [path.name for path in tmp_path.iterdir() if path.name.endswith(".part")] == []
    assert sum(1 for _ in read_results_file(destination)) == len(prompts)


def test_an_upload_holds_one_small_part_at_a_time(provider: Provider, tmp_path: Path) -> None:
    """A request file goes up in parts of UPLOAD_PART_BYTES (the SDK would read 8 MiB at once, held
    twice while sent); every request arrives whole."""
    prompts = {f"k{number}": f"{number} " + "word " * 50 for number in range(25000)}
    input_path = write_requests(tmp_path / "requests.jsonl", RequestEncoder(MODEL), prompts)
    assert input_path.stat().st_size > 3 * UPLOAD_PART_BYTES

    tracemalloc.start()
    try:
        uploaded = provider.upload_jsonl(input_path, "in-parts")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < 3 * UPLOAD_PART_BYTES
    job = wait_until_done(provider, provider.create_from_file(MODEL, uploaded.name, "in-parts").name)
    destination = tmp_path / "results.jsonl"
    provider.download(job.responses_file, destination)
    assert {record["key"] for record in read_results_file(destination)} == set(prompts)


def test_cancel(tmp_path: Path) -> None:
    with EmulatorServer(tmp_path, job_seconds=60, api_key=API_KEY) as slow_emulator:
        with Provider(api_key=API_KEY, base_url=slow_emulator.base_url, retry=FAST_RETRY) as provider:
            created = provider.create_inline(MODEL, [RequestEncoder(MODEL).inline("k", "hi")], "to-cancel")
            provider.cancel(created.name)
            job = wait_until_done(provider, created.name)
    assert job.state == "cancelled"


def test_count_tokens(provider: Provider) -> None:
    assert provider.count_tokens(MODEL, "How many tokens is this?") > 0


def test_wrong_api_key_is_a_clear_permanent_error(emulator: EmulatorServer) -> None:
    with Provider(api_key="not-the-key", base_url=emulator.base_url, retry=FAST_RETRY) as provider:
        with pytest.raises(errors.ClientError) as raised:
            provider.get("batches/anything")
    assert is_auth_error(raised.value)
    assert not is_retryable(raised.value)
    assert "key" in str(raised.value).lower()


def test_from_settings(emulator: EmulatorServer) -> None:
    settings = SimpleNamespace(provider="emulator", api_version="v1beta", gemini_api_key=lambda: API_KEY,
                               retry=RetrySettings(initial_seconds=0.01, max_seconds=0.05))
    with Provider.from_settings(settings, base_url=emulator.base_url) as provider:
        assert provider.count_tokens(MODEL, "hello") > 0


@pytest.mark.parametrize("attempts, outcome", [(3, "answered"), (2, "503")])
def test_from_settings_takes_the_retry_settings(tmp_path: Path, attempts: int, outcome: str) -> None:
    """[retry] reaches the SDK: two 503s in a row are outlived by three tries, not by two."""
    settings = SimpleNamespace(provider="emulator", api_version="v1beta", gemini_api_key=lambda: API_KEY,
                               retry=RetrySettings(attempts=attempts, initial_seconds=0.01, max_seconds=0.05))
    with Emulator(tmp_path / "service", faults=["503*2@count-tokens"]) as service, \
            Provider.from_settings(settings, base_url=service.base_url) as provider:
        if outcome == "answered":
            assert provider.count_tokens(MODEL, "hello") > 0
        else:
            with pytest.raises(Exception, match="503"):
                provider.count_tokens(MODEL, "hello")


def test_from_settings_refuses_an_emulator_without_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GOOGLE_GEMINI_BASE_URL", raising=False)
    settings = SimpleNamespace(provider="emulator", api_version="v1beta", gemini_api_key=lambda: API_KEY)
    with pytest.raises(ProviderError, match="base URL"):
        Provider.from_settings(settings)


def test_sdk_private_request_api_is_unchanged() -> None:
    # batchd reads batchStats through client._api_client.request (see provider._raw_json). If this fails,
    # google-genai changed that private API: adapt _raw_json before anything else.
    client = genai.Client(api_key=API_KEY, http_options={"base_url": "http://127.0.0.1:9"})
    parameters = list(inspect.signature(client._api_client.request).parameters)
    assert parameters == ["http_method", "path", "request_dict", "http_options"]
    # An inline create's body goes as bytes: a built request's data replaced, then sent.
    built = client._api_client._build_request("post", "models/m:batchGenerateContent", {}, None)
    assert built.data == {} and hasattr(built, "headers")
    parameters = list(inspect.signature(client._api_client._request).parameters)
    assert parameters == ["http_request", "http_options", "stream"]


# -- the wire request: file path vs inline path ------------------------------------------------------


class _RecordingHandler(BaseHTTPRequestHandler):
    """Records request bodies and answers every POST with a minimal batch Operation."""

    bodies: list[dict[str, Any]]

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.bodies.append({**body, "_path": self.path})
        answer = json.dumps({"name": "batches/recorded", "metadata": {"state": "BATCH_STATE_PENDING"}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def recording_server() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    bodies: list[dict[str, Any]] = []
    handler = type("Handler", (_RecordingHandler,), {"bodies": bodies})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", bodies
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture()
def recorder(recording_server: tuple[str, list[dict[str, Any]]]) -> tuple[str, list[dict[str, Any]]]:
    recording_server[1].clear()
    return recording_server


@pytest.mark.parametrize(
    "overrides",
    [
        None,
        {"temperature": 0.9, "top_p": 0.5, "top_k": 3, "stop_sequences": ["\n\n"], "seed": 7},
        {"system_instruction": None, "thinking_config": {"thinking_budget": 0}},
        {"response_mime_type": "application/json", "response_json_schema": VERDICT_SCHEMA},
        {"safety_settings": [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}]},
        # A manifest's settings, as Manifest.requests hands them over.
        GenerationSettings(thinking_budget=1024, include_thoughts=True, media_resolution="low",
                           response_modalities=["text", "Image"],
                           safety_settings=[{"category": "hate_speech", "threshold": "block_only_high"},
                                            {"category": "dangerous_content", "threshold": "off"}]).as_config(),
        GenerationSettings(thinking_level="minimal", include_thoughts=False).as_config(),
    ],
)
def test_jsonl_line_is_the_request_the_sdk_sends_inline(
    recorder: tuple[str, list[dict[str, Any]]], overrides: dict[str, Any] | None
) -> None:
    base_url, bodies = recorder
    encoder = RequestEncoder(MODEL, TRANSLATE_DEFAULTS)
    prompt = 'A "quoted" prompt — with ünïcödé, 日本語 and a\nnewline.'
    line = encoder.jsonl_line("key-1", prompt, overrides)
    with Provider(api_key=API_KEY, base_url=base_url) as provider:
        provider.create_inline(MODEL, [encoder.inline("key-1", prompt, overrides)], "from-settings")
        provider.create_inline(MODEL, [RequestEncoder.inline_from_line(json.loads(line))], "from-line")
        provider.create_from_lines(MODEL, [line + "\n"], "from-lines")
        # A line not in the encoder's own order goes through json (the same request on the wire).
        provider.create_from_lines(MODEL, [json.dumps({"request": json.loads(line)["request"], "key": "key-1"})],
                                   "reordered")

    assert "\n" not in line
    # The daemon's inline creates skip the SDK's conversion: the body must be the one the SDK sends.
    assert bodies[3]["batch"].pop("displayName") == "reordered"
    assert bodies[2]["batch"].pop("displayName") == "from-lines"
    assert bodies[1]["batch"].pop("displayName") == "from-line"
    assert bodies[3] == bodies[2] == bodies[1]
    assert json.loads(line)["request"] == encoder.wire_request(prompt, overrides)
    for body in bodies:
        [sent] = body["batch"]["inputConfig"]["requests"]["requests"]
        assert {"key": sent["metadata"]["key"], "request": sent["request"]} == json.loads(line)


# -- units --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["k1", 'a "quoted", \\ key', 'k","request":{"x":1}', "ünïcödé 日本語", "tab\tand\nnewline"])
def test_an_inlined_request_is_its_line_with_the_key_in_metadata(key: str) -> None:
    encoder = RequestEncoder(MODEL, TRANSLATE_DEFAULTS)
    line = encoder.jsonl_line(key, 'a prompt "with" }braces{ and ,"request": inside', {"temperature": 0.5})
    expected = {"request": json.loads(line)["request"], "metadata": {"key": key}}
    assert json.loads(inlined_request(line + "\n")) == expected  # the request's text passed through
    reordered = json.dumps({"request": expected["request"], "key": key})
    assert json.loads(inlined_request(reordered)) == expected  # any other form: through json
    with pytest.raises(ValueError):
        inlined_request('{"key":"k","request":')  # a torn line is an error, never half a request



def test_manifest_settings_are_the_wire_names_and_enum_values() -> None:
    settings = GenerationSettings(thinking_budget=-1, include_thoughts=True, media_resolution="Medium",
                                  response_modalities=["text"],
                                  safety_settings=[{"category": "hate_speech", "threshold": "block_none"}])
    request = RequestEncoder(MODEL).wire_request("p", settings.as_config())
    assert request["safetySettings"] == [{"category": "HARM_CATEGORY_HATE_SPEECH", "threshold": "BLOCK_NONE"}]
    # thinkingConfig's own fields keep the SDK's names, as google-genai sends them (Google takes either)
    assert request["generationConfig"] == {"thinkingConfig": {"thinking_budget": -1, "include_thoughts": True},
                                           "mediaResolution": "MEDIA_RESOLUTION_MEDIUM",
                                           "responseModalities": ["TEXT"]}


def test_request_encoder_rejects_unknown_settings() -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        RequestEncoder(MODEL, {"max_tokens": 5})
    with pytest.raises(ValueError, match="response_schema"):
        RequestEncoder(MODEL).jsonl_line("k", "p", {"response_schema": {"type": "STRING"}})


def test_request_encoder_override_of_none_removes_a_default() -> None:
    encoder = RequestEncoder(MODEL, {"system_instruction": "Be brief.", "temperature": 0.5})
    request = json.loads(encoder.jsonl_line("k", "p", {"system_instruction": None}))["request"]
    assert "systemInstruction" not in request
    assert request["generationConfig"] == {"temperature": 0.5}
    assert encoder.inline("k", "p", {"system_instruction": None})["config"] == {"temperature": 0.5}


@pytest.mark.parametrize(
    ("raw", "short"),
    [
        ("BATCH_STATE_PENDING", "pending"),
        ("JOB_STATE_RUNNING", "running"),
        ("BATCH_STATE_SUCCEEDED", "succeeded"),
        ("JOB_STATE_FAILED", "failed"),
        ("BATCH_STATE_CANCELLED", "cancelled"),
        ("BATCH_STATE_EXPIRED", "expired"),
        ("BATCH_STATE_UNSPECIFIED", "unknown"),
        ("BATCH_STATE_SOMETHING_NEW", "unknown"),
        (None, "unknown"),
    ],
)
def test_short_state(raw: str | None, short: str) -> None:
    assert short_state(raw) == short


def test_remote_job_from_operation_reads_string_stats_and_fills_omitted_zeros() -> None:
    job = RemoteJob.from_operation(
        {
            "name": "batches/abc",
            "metadata": {
                "displayName": "d",
                "state": "BATCH_STATE_RUNNING",
                "batchStats": {"requestCount": "3", "pendingRequestCount": "3"},
                "createTime": "2025-12-10T18:27:01.407650525Z",
            },
        }
    )
    assert job.stats == {
        "requestCount": 3,
        "successfulRequestCount": 0,
        "failedRequestCount": 0,
        "pendingRequestCount": 3,
    }
    assert (job.state, job.raw_state, job.done) == ("running", "BATCH_STATE_RUNNING", False)
    assert job.create_time is not None and job.create_time.year == 2025


def test_results_file_with_malformed_lines_yields_error_records(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    path.write_bytes(
        b'{"key": "a", "response": {"candidates": []}}\n'
        b"\n"
        b"{not json\n"
        b'{"key": "b", "error": {"code": 3, "message": "bad"}}\n'
        b'["a list"]\n'
        b'{"key": "c"}\n'
        b"\xff\xfe\n"
    )
    records = list(read_results_file(path))
    assert [record["key"] for record in records] == ["a", None, "b", None, "c", None]
    assert records[0]["response"] == {"candidates": []}
    assert records[2]["error"] == {"code": 3, "message": "bad"}
    assert all(record["error"]["status"] == "DATA_LOSS" for record in records if record["key"] in (None, "c"))


def test_inline_results_without_metadata_have_no_key() -> None:
    records = list(inline_results([{"response": {"candidates": []}}, {"metadata": {"key": "x"}, "error": {"code": 8}}]))
    assert records == [{"key": None, "response": {"candidates": []}}, {"key": "x", "error": {"code": 8}}]


def test_error_classification() -> None:
    def api_error(code: int, message: str = "m") -> errors.APIError:
        error_class = errors.ClientError if code < 500 else errors.ServerError
        return error_class(code, {"error": {"code": code, "message": message}})

    assert all(is_retryable(api_error(code)) for code in (408, 429, 500, 502, 503, 504))
    assert not any(is_retryable(api_error(code)) for code in (400, 401, 403, 404))
    assert is_retryable(TimeoutError()) and is_retryable(ConnectionResetError())
    assert not is_retryable(ValueError("bad name"))
    assert is_auth_error(api_error(400, "API key not valid. Please pass a valid API key."))
    assert is_auth_error(api_error(403)) and not is_auth_error(api_error(404))


def test_bad_batch_names_are_refused_before_any_request(provider: Provider) -> None:
    with pytest.raises(ProviderError):
        provider.get("batches/../files/x")
    with pytest.raises(ProviderError):
        provider.cancel("abc")


def test_both_clients_share_one_tls_context_made_once_per_process():
    """Left alone, google-genai loads the CA bundle three times a client; batchd makes one context."""
    first = Provider(api_key="k", base_url="http://127.0.0.1:9")
    second = Provider(api_key="k", base_url="http://127.0.0.1:9")
    contexts = {id(client._api_client._http_options.client_args["verify"])
                for provider in (first, second) for client in (provider._retrying_client, provider._single_shot_client)}
    assert contexts == {id(tls_context())}


# -- models ----------------------------------------------------------------------------------------


def test_model_check_reads_the_model_list_once_and_names_close_models(provider: Provider, tmp_path: Path) -> None:
    from batchd.model_check import ModelCheck

    asked: list[str] = []

    class Counting:
        def list_models(self):
            asked.append("list")
            return provider.list_models()

        def model_exists(self, model):
            asked.append(f"get {model}")
            return provider.model_exists(model)

    cache = tmp_path / "models.json"
    check = ModelCheck(lambda: Counting(), "the emulator", cache)
    assert check.problem("gemini-2.5-flash") is None
    assert check.problem("models/gemini-embedding-001") is None
    # An id of a current family the service takes without listing it: models.get says so, once.
    assert check.problem("gemini-3.7-flash-preview-01-2027") is None
    assert check.problem("gemini-3.7-flash-preview-01-2027") is None
    problem = check.problem("gemini-2.5-flsh")
    assert problem is not None and "'gemini-2.5-flsh' is not a model the emulator serves" in problem
    assert "did you mean 'gemini-2.5-flash'" in problem and "prices" not in problem
    assert asked == ["list", "get gemini-3.7-flash-preview-01-2027", "get gemini-2.5-flsh"]
    # The list is kept in the state dir: a check made elsewhere (batchd submit) asks the service nothing.
    assert "gemini-2.5-flash" in json.loads(cache.read_text())["models"]

    def unreachable():
        raise AssertionError("the cached list should have answered")

    assert ModelCheck(unreachable, "the emulator", cache).problem("gemini-2.5-pro") is None
    # Cached for another service, it is not used; a service that cannot answer leaves the model unchecked.
    def down():
        raise ConnectionError("no route to host")

    assert ModelCheck(down, "the Gemini API (v1beta)", cache).problem("gemini-2.5-flsh") is None

    # What the daemon's loop asks (answer) asks the service nothing: it says what must be asked first,
    # which the daemon does in a thread of its own (refresh); a failed ask leaves the model unchecked.
    asked.clear()
    fresh = ModelCheck(lambda: Counting(), "the emulator")
    assert fresh.answer("gemini-2.5-flsh") == (False, None) and asked == []
    fresh.refresh("gemini-2.5-flsh")
    known, problem = fresh.answer("gemini-2.5-flsh")
    assert known and "did you mean 'gemini-2.5-flash'" in problem
    assert fresh.answer("gemini-2.5-flash") == (True, None)
    assert asked == ["list", "get gemini-2.5-flsh"]
    failing = ModelCheck(down, "the emulator")
    assert failing.answer("gemini-2.5-flash") == (False, None)
    failing.refresh("gemini-2.5-flash")
    assert failing.answer("gemini-2.5-flash") == (True, None)


def test_a_429_on_a_get_is_left_to_the_daemon_with_the_wait_the_service_asks(emulator: Emulator) -> None:
    """A fetch's get is not retried on 429 inside the SDK (the daemon waits out a quota, visibly); other
    retryable errors still are; the 429's RetryInfo says how long to wait. The poll's list is sent once
    whatever the error."""
    from batchd.provider import quota_delay

    def routes() -> dict:
        with urllib.request.urlopen(f"{emulator.base_url}/_emulator/stats") as answer:
            return json.load(answer)["routes"]

    with Provider(api_key=API_KEY, base_url=emulator.base_url, retry=FAST_RETRY) as provider:
        created = provider.create_inline(MODEL, [RequestEncoder(MODEL).inline("k", "hi")], "quota-get")
    with Provider(api_key=API_KEY, base_url=emulator.base_url, retry=FAST_RETRY,
                  headers={"X-Emulator-Fault": "429*2@get,429*2@list"}) as throttled:
        before = routes().get("get", 0), routes().get("list", 0)
        with pytest.raises(errors.APIError) as refused:
            throttled.get(created.name)
        with pytest.raises(errors.APIError):
            list(throttled.list_jobs())
        assert (routes()["get"], routes()["list"]) == (before[0] + 1, before[1] + 1), "a 429 is not retried by the SDK"
        assert quota_delay(refused.value) == 2.0  # the emulator's RetryInfo, as Google sends one
    with Provider(api_key=API_KEY, base_url=emulator.base_url, retry=FAST_RETRY,
                  headers={"X-Emulator-Fault": "503*2@get"}) as flaky:
        assert flaky.get(created.name).name == created.name  # 503s are still retried
    assert quota_delay(errors.ServerError(503, {"error": {"code": 503, "message": "m"}})) is None


def test_a_quota_wait_counts_down_in_batchd_status() -> None:
    from batchd.daemon.context import QuotaWait
    from batchd.statedir import render_notice

    quota = QuotaWait(0.1)
    assert quota.refused("create", 40.0, "429 RESOURCE_EXHAUSTED on create") == 40.0
    assert quota.refused("create", 40.0, "429 RESOURCE_EXHAUSTED on create") is None, "the same wait, lengthened"
    assert quota.waiting("create") and not quota.waiting("poll")
    [notice] = quota.notices()
    assert render_notice(notice, now=notice["until"] - 40) == \
        "waiting: quota (429 RESOURCE_EXHAUSTED on create), retry in 40 s"
    assert quota.went_through("create") and quota.notices() == [] and quota.seconds_left("create") == float("inf")


def test_model_check_refuses_what_is_no_model_id_without_asking() -> None:
    from batchd.model_check import ModelCheck

    def never():
        raise AssertionError("nothing is sent for a name that is no model id")

    check = ModelCheck(never, "the emulator")
    for hostile in ("../../x", "gemini 2.5", "x" * 5000, "$(id)"):
        problem = check.problem(hostile)
        assert problem is not None and "is not a model id" in problem and len(problem) < 300
