"""Requests the real service refuses are refused the same way: Google's envelope and status names."""

from __future__ import annotations

from pathlib import Path

import httpx2 as httpx  # google-genai's own HTTP client; used where the SDK cannot send the request
import pytest
from google import genai
from google.genai import errors

from batchd.emulator import EmulatorServer
from batchd.emulator.app import MAX_INLINE_BYTES

from .support import API_KEY, MODEL, make_client, output_lines, request_lines, wait_done, write_jsonl


def raw(emulator: EmulatorServer, method: str, path: str, *, key: str | None = API_KEY, **kwargs) -> httpx.Response:
    headers = kwargs.pop("headers", {})
    if key is not None:
        headers["x-goog-api-key"] = key
    return httpx.request(method, emulator.base_url + path, headers=headers, timeout=30, **kwargs)


def assert_envelope(response: httpx.Response, code: int, status: str) -> dict:
    assert response.status_code == code
    error = response.json()["error"]
    assert set(error) == {"code", "message", "status"}
    assert (error["code"], error["status"]) == (code, status)
    return error


def test_unknown_batch_is_404(client: genai.Client):
    with pytest.raises(errors.ClientError) as raised:
        client.batches.get(name="batches/doesnotexist")
    assert (raised.value.code, raised.value.status) == (404, "NOT_FOUND")
    with pytest.raises(errors.ClientError):
        client.batches.cancel(name="batches/doesnotexist")
    with pytest.raises(errors.ClientError):
        client.batches.delete(name="batches/doesnotexist")


def test_unknown_model_is_404(client: genai.Client):
    with pytest.raises(errors.ClientError) as raised:
        client.batches.create(model="gemini-0-imaginary", src=[{"contents": "x"}])
    assert (raised.value.code, raised.value.status) == (404, "NOT_FOUND")
    assert "gemini-0-imaginary" in raised.value.message
    with pytest.raises(errors.ClientError):  # an embedding model does not generate
        client.models.generate_content(model="gemini-embedding-001", contents="x")


def test_configured_models_replace_the_defaults(tmp_path: Path):
    with EmulatorServer(tmp_path, models=["my-model"]) as emulator:
        client = make_client(emulator.base_url)
        assert client.models.count_tokens(model="my-model", contents="abcd").total_tokens == 1
        with pytest.raises(errors.ClientError):
            client.models.count_tokens(model=MODEL, contents="abcd")


def test_missing_or_empty_contents_are_400(client: genai.Client, emulator: EmulatorServer):
    with pytest.raises(errors.ClientError) as raised:
        client.batches.create(model=MODEL, src=[{"contents": "fine"}, {"contents": [{"parts": []}]}])
    assert (raised.value.code, raised.value.status) == (400, "INVALID_ARGUMENT")
    assert "requests[1]" in raised.value.message
    # The SDK itself refuses empty contents and empty batches, so those go over raw HTTP.
    empty_batch = {"batch": {"inputConfig": {"requests": {"requests": []}}}}
    assert_envelope(raw(emulator, "POST", f"/v1/models/{MODEL}:batchGenerateContent", json=empty_batch), 400,
                    "INVALID_ARGUMENT")
    assert_envelope(raw(emulator, "POST", f"/v1beta/models/{MODEL}:generateContent", json={}), 400,
                    "INVALID_ARGUMENT")
    assert_envelope(raw(emulator, "POST", f"/v1beta/models/{MODEL}:countTokens", json={"contents": [{}]}), 400,
                    "INVALID_ARGUMENT")
    assert_envelope(raw(emulator, "POST", f"/v1beta/models/{MODEL}:batchGenerateContent", json={"batch": {}}),
                    400, "INVALID_ARGUMENT")


def test_inline_batch_over_20_mb_is_400(client: genai.Client):
    big = "x" * (MAX_INLINE_BYTES // 3)
    with pytest.raises(errors.ClientError) as raised:
        client.batches.create(model=MODEL, src=[{"contents": big}, {"contents": big}, {"contents": big},
                                                {"contents": "one more"}])
    assert (raised.value.code, raised.value.status) == (400, "INVALID_ARGUMENT")
    assert "exceeds the limit" in raised.value.message


def test_file_over_2_gb_is_refused_at_upload_start(emulator: EmulatorServer):
    response = raw(emulator, "POST", "/upload/v1beta/files", json={"file": {"display_name": "huge"}}, headers={
        "X-Goog-Upload-Protocol": "resumable", "X-Goog-Upload-Command": "start",
        "X-Goog-Upload-Header-Content-Length": str(2 * 1024**3 + 1),
        "X-Goog-Upload-Header-Content-Type": "jsonl"})
    assert_envelope(response, 400, "INVALID_ARGUMENT")
    assert response.headers["x-goog-upload-status"] == "final"


def test_source_file_that_does_not_exist_is_404(client: genai.Client):
    with pytest.raises(errors.ClientError) as raised:
        client.batches.create(model=MODEL, src="files/nosuchfile")
    assert (raised.value.code, raised.value.status) == (404, "NOT_FOUND")


def test_malformed_lines_become_per_line_errors(client: genai.Client, tmp_path: Path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        *request_lines(1, "good"),
        "{not json",
        '["a list"]',
        {"key": "empty", "request": {"contents": []}},
        *request_lines(1, "after"),
    ])
    uploaded = client.files.upload(file=str(path), config={"mime_type": "jsonl"})
    job = wait_done(client, client.batches.create(model=MODEL, src=uploaded.name).name)
    lines = output_lines(client, job)
    assert [line["key"] for line in lines] == ["good0", "2", "3", "empty", "after0"]
    assert ["response" in line for line in lines] == [True, False, False, False, True]
    for line in lines[1:4]:
        assert set(line["error"]) == {"code", "message", "status"}
        assert (line["error"]["code"], line["error"]["status"]) == (400, "INVALID_ARGUMENT")
    assert "line 2" in lines[1]["error"]["message"]


def test_bad_page_token_is_400(client: genai.Client):
    with pytest.raises(errors.ClientError) as raised:
        list(client.batches.list(config={"page_token": "garbage!"}))
    assert (raised.value.code, raised.value.status) == (400, "INVALID_ARGUMENT")
    with pytest.raises(errors.ClientError):
        list(client.files.list(config={"page_token": "garbage!"}))


def test_api_key_is_required_on_json_routes(emulator: EmulatorServer):
    for method, path in [("GET", "/v1beta/batches"), ("GET", "/v1/batches/x"), ("GET", "/v1beta/files"),
                         ("POST", f"/v1/models/{MODEL}:countTokens"), ("POST", "/upload/v1beta/files")]:
        assert_envelope(raw(emulator, method, path, key=None), 403, "PERMISSION_DENIED")


def test_a_configured_api_key_is_the_only_one_accepted(emulator: EmulatorServer):
    client = make_client(emulator.base_url, api_key="wrong-key")
    with pytest.raises(errors.ClientError) as raised:
        client.batches.list()
    assert (raised.value.code, raised.value.status) == (400, "INVALID_ARGUMENT")
    assert "API key not valid" in raised.value.message


def test_upload_sessions_are_unguessable_and_always_answer_with_a_status(emulator: EmulatorServer):
    start = raw(emulator, "POST", "/upload/v1beta/files", json={"file": {"mime_type": "jsonl"}}, headers={
        "X-Goog-Upload-Protocol": "resumable", "X-Goog-Upload-Command": "start"})
    assert start.status_code == 200 and start.headers["x-goog-upload-status"] == "active"
    url = start.headers["x-goog-upload-url"]
    assert url.startswith(emulator.base_url + "/upload/v1beta/files?upload_id=")
    upload_id = httpx.URL(url).params["upload_id"]
    assert len(upload_id) >= 40  # 256 random bits

    wrong = httpx.post(url.replace(upload_id, upload_id[:-4] + "aaaa"), content=b"x",
                       headers={"X-Goog-Upload-Command": "upload, finalize", "X-Goog-Upload-Offset": "0"})
    assert_envelope(wrong, 404, "NOT_FOUND")
    assert wrong.headers["x-goog-upload-status"] == "final"

    # Offsets are honoured: a resent chunk replaces its bytes, a gap is refused. Every chunk but the
    # last is a whole number of granules (the start answer's X-Goog-Upload-Chunk-Granularity).
    granule = int(start.headers["x-goog-upload-chunk-granularity"])
    assert granule == 256 * 1024
    command = {"X-Goog-Upload-Command": "upload"}
    assert httpx.post(url, content=b"a" * granule, headers={**command, "X-Goog-Upload-Offset": "0"}).status_code == 200
    assert httpx.post(url, content=b"b" * granule, headers={**command, "X-Goog-Upload-Offset": "0"}).status_code == 200
    gap = httpx.post(url, content=b"z" * granule, headers={**command, "X-Goog-Upload-Offset": str(3 * granule)})
    assert gap.status_code == 400 and gap.headers["x-goog-upload-status"] == "final"
    ragged = httpx.post(url, content=b"abc", headers={**command, "X-Goog-Upload-Offset": str(granule)})
    assert_envelope(ragged, 400, "INVALID_ARGUMENT")
    assert "granularity" in ragged.json()["error"]["message"]
    query = httpx.post(url, headers={"X-Goog-Upload-Command": "query"})
    assert query.headers["x-goog-upload-size-received"] == str(granule), "the refused chunk was kept"
    final = httpx.post(url, content=b"def\n", headers={"X-Goog-Upload-Command": "upload, finalize",
                                                         "X-Goog-Upload-Offset": str(granule)})
    assert final.status_code == 200 and final.headers["x-goog-upload-status"] == "final"
    assert final.json()["file"]["sizeBytes"] == str(granule + 4)


def test_uploaded_files_cannot_be_downloaded(client: genai.Client, tmp_path: Path):
    uploaded = client.files.upload(file=str(write_jsonl(tmp_path / "a.jsonl", request_lines(1))),
                                   config={"mime_type": "jsonl"})
    with pytest.raises(errors.ClientError) as raised:
        client.files.download(file=uploaded.name)
    assert raised.value.code == 400


def test_unknown_route_is_404_envelope(emulator: EmulatorServer):
    assert_envelope(raw(emulator, "GET", "/v1beta/nothing/here"), 404, "NOT_FOUND")
    assert_envelope(raw(emulator, "GET", "/favicon.ico"), 404, "NOT_FOUND")
