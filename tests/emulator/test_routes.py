"""Every emulated route through the real google-genai SDK, sync and async, on v1 and v1beta."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import time
import urllib.request
from pathlib import Path

import pytest
from google import genai
from google.genai import errors, types

from batchd.emulator import EmulatorServer
from batchd.testing import Emulator

pytestmark = pytest.mark.filterwarnings("ignore:.*is experimental")

from .support import (
    API_KEY,
    EMBED_MODEL,
    MODEL,
    inline_requests,
    make_client,
    output_lines,
    request_lines,
    wait_done,
    write_jsonl,
)


@pytest.fixture
def slow_client(tmp_path: Path, version: str):
    """A client of an emulator of its own whose jobs take 6 s: PENDING for 1.5 s, RUNNING for 4.5 s.

    The state a client sees is the wall clock against the job's createTime; with the shared emulator's
    0.3 s jobs (PENDING for 75 ms) a loaded machine answered the create with RUNNING already.
    """
    with Emulator(tmp_path / "emulator", job_seconds=6) as server:
        yield server.client(version)


def test_inline_batch_goes_pending_running_succeeded(slow_client: genai.Client):
    client = slow_client
    src = inline_requests(3)
    src[1]["config"] = {"temperature": 0.2, "max_output_tokens": 4, "system_instruction": "Be brief.",
                        "thinking_config": {"thinking_budget": 0}}
    job = client.batches.create(model=MODEL, src=src, config={"display_name": "inline-lifecycle"})
    assert job.name.startswith("batches/") and len(job.name) == len("batches/") + 36
    assert job.state == types.JobState.JOB_STATE_PENDING
    assert job.display_name == "inline-lifecycle" and job.model == f"models/{MODEL}"

    seen = [job.state]
    while not job.done:
        job = client.batches.get(name=job.name)
        if job.state != seen[-1]:
            seen.append(job.state)
    assert seen == [types.JobState.JOB_STATE_PENDING, types.JobState.JOB_STATE_RUNNING,
                    types.JobState.JOB_STATE_SUCCEEDED]
    assert job.end_time >= job.create_time

    answers = job.dest.inlined_responses
    assert [a.metadata["key"] for a in answers] == ["req-0", "req-1", "req-2"]
    assert all(a.response.text.startswith("[emulated") for a in answers)
    assert answers[0].response.text.startswith("[emulated gemini-2.5-flash]")
    capped = answers[1].response
    assert capped.candidates[0].finish_reason == types.FinishReason.MAX_TOKENS
    assert capped.usage_metadata.candidates_token_count <= 4


def test_file_batch_from_upload_to_download(client: genai.Client, tmp_path: Path):
    path = write_jsonl(tmp_path / "in.jsonl", [
        *request_lines(3),
        {"key": "snake", "request": {"contents": [{"parts": [{"text": "x"}]}],
                                     "generation_config": {"max_output_tokens": 2}}},
    ])
    uploaded = client.files.upload(file=str(path), config={"mime_type": "jsonl", "display_name": "route-in"})
    assert uploaded.size_bytes == path.stat().st_size
    assert uploaded.source == types.FileSource.UPLOADED and uploaded.state == types.FileState.ACTIVE
    expected_hash = base64.b64encode(hashlib.sha256(path.read_bytes()).hexdigest().encode()).decode()
    assert uploaded.sha256_hash == expected_hash

    job = client.batches.create(model=MODEL, src=uploaded.name, config={"display_name": "file-route"})
    job = wait_done(client, job.name)
    assert job.state == types.JobState.JOB_STATE_SUCCEEDED
    assert job.dest.file_name == f"files/batch-{job.name.removeprefix('batches/')}"

    output = client.files.get(name=job.dest.file_name)
    assert output.source == types.FileSource.GENERATED and output.download_uri
    lines = output_lines(client, job)
    assert [line["key"] for line in lines] == ["k0", "k1", "k2", "snake"]
    assert lines[3]["response"]["candidates"][0]["finishReason"] == "MAX_TOKENS"

    destination = tmp_path / "out.jsonl"
    client.files.download(file=job.dest.file_name, config={"http_options": {"timeout": 10_000}})
    destination.write_bytes(client.files.download(file=job.dest.file_name))
    assert destination.stat().st_size == output.size_bytes


def test_file_source_given_as_dict_and_bare_request_lines(client: genai.Client, tmp_path: Path):
    path = write_jsonl(tmp_path / "bare.jsonl", [{"contents": [{"parts": [{"text": "bare"}]}]}, ""])
    uploaded = client.files.upload(file=str(path), config={"mime_type": "jsonl"})
    job = wait_done(client, client.batches.create(model=MODEL, src={"file_name": uploaded.name}).name)
    lines = output_lines(client, job)
    assert len(lines) == 1 and lines[0]["key"] == "1" and "response" in lines[0]


def test_embedding_batches_inline_and_file(client: genai.Client, tmp_path: Path):
    job = client.batches.create_embeddings(model=EMBED_MODEL, src={"inlined_requests": {
        "contents": ["a", "b"], "config": {"output_dimensionality": 3}}})
    job = wait_done(client, job.name)
    vectors = [r.response.embedding.values for r in job.dest.inlined_embed_content_responses]
    assert [len(v) for v in vectors] == [3, 3]

    path = write_jsonl(tmp_path / "emb.jsonl", [
        {"key": "e1", "request": {"output_dimensionality": 5, "content": {"parts": [{"text": "1"}]}}}])
    uploaded = client.files.upload(file=str(path), config={"mime_type": "jsonl"})
    job = wait_done(client, client.batches.create_embeddings(model=EMBED_MODEL, src={"file_name": uploaded.name}).name)
    [line] = output_lines(client, job)
    assert line["key"] == "e1" and len(line["response"]["embedding"]["values"]) == 5


def test_list_pages_cancel_and_delete(client: genai.Client, emulator, version: str):
    names = [client.batches.create(model=MODEL, src=inline_requests(1), config={"display_name": f"page-{i}"}).name
             for i in range(2)]
    # A job that stays PENDING can always be cancelled, however slow the machine is.
    stuck = make_client(emulator.base_url, version, fault="stuck-pending")
    names.insert(0, stuck.batches.create(model=MODEL, src=inline_requests(1)).name)
    listed = [job.name for job in client.batches.list(config={"page_size": 2})]
    assert set(names) <= set(listed)
    assert len(listed) == len(set(listed))

    client.batches.cancel(name=names[0])
    assert wait_done(client, names[0]).state == types.JobState.JOB_STATE_CANCELLED  # asynchronous

    deleted = client.batches.delete(name=names[1])
    assert deleted is not None
    with pytest.raises(errors.ClientError) as raised:
        client.batches.get(name=names[1])
    assert raised.value.code == 404 and raised.value.status == "NOT_FOUND"
    assert names[1] not in [job.name for job in client.batches.list()]


def test_list_leaves_inline_answers_out_as_the_service_does(client: genai.Client):
    job = wait_done(client, client.batches.create(model=MODEL, src=inline_requests(1)).name)
    [listed] = [j for j in client.batches.list(config={"page_size": 100}) if j.name == job.name]
    assert listed.state == types.JobState.JOB_STATE_SUCCEEDED and listed.dest is None
    assert job.dest.inlined_responses


def test_files_get_list_delete(client: genai.Client, tmp_path: Path):
    path = write_jsonl(tmp_path / "f.jsonl", request_lines(1))
    uploaded = client.files.upload(file=str(path), config={"mime_type": "jsonl", "display_name": "to-delete"})
    assert client.files.get(name=uploaded.name).display_name == "to-delete"
    assert uploaded.name in [f.name for f in client.files.list(config={"page_size": 2})]
    client.files.delete(name=uploaded.name)
    # As Google answers a file that was deleted or expired (googleapis/python-genai#1218): 403, "may not exist".
    for call in (client.files.get, client.files.delete):
        with pytest.raises(errors.ClientError) as raised:
            call(name=uploaded.name)
        assert (raised.value.code, raised.value.status) == (403, "PERMISSION_DENIED")
        assert "may not exist" in raised.value.message
    assert uploaded.name not in [f.name for f in client.files.list()]


def test_files_list_pages_through_every_file_with_its_display_name(client: genai.Client, tmp_path: Path):
    """The SDK's pager follows nextPageToken (the service's default page is 10 files, at most 100)."""
    path = write_jsonl(tmp_path / "f.jsonl", request_lines(1))
    names = {client.files.upload(file=str(path), config={"mime_type": "jsonl", "display_name": f"page-{n}"}).name:
             f"page-{n}" for n in range(13)}
    pager = client.files.list()
    assert len(pager.page) == 10 and pager.config.get("page_token")
    listed = {f.name: f.display_name for f in client.files.list(config={"page_size": 4}) if f.name in names}
    assert listed == names


def test_a_display_name_over_512_characters_is_refused(client: genai.Client, tmp_path: Path):
    path = write_jsonl(tmp_path / "f.jsonl", request_lines(1))
    with pytest.raises(errors.ClientError) as raised:
        client.files.upload(file=str(path), config={"mime_type": "jsonl", "display_name": "x" * 513})
    assert raised.value.code == 400
    assert client.files.upload(file=str(path), config={"mime_type": "jsonl", "display_name": "x" * 512}).name


def test_upload_with_a_chosen_name(client: genai.Client, tmp_path: Path, version: str):
    path = write_jsonl(tmp_path / "named.jsonl", request_lines(1))
    uploaded = client.files.upload(file=str(path), config={"mime_type": "jsonl", "name": f"named-{version}"})
    assert uploaded.name == f"files/named-{version}"
    with pytest.raises(errors.ClientError) as raised:
        client.files.upload(file=str(path), config={"mime_type": "jsonl", "name": f"named-{version}"})
    assert raised.value.code == 409


def test_online_routes(client: genai.Client):
    assert client.models.count_tokens(model=MODEL, contents="How many tokens is this?").total_tokens == 6
    answer = client.models.generate_content(
        model=MODEL, contents="Give me JSON",
        config={"response_mime_type": "application/json",
                "response_json_schema": {"type": "object", "properties": {"snake_name": {"type": "integer"}},
                                         "required": ["snake_name"]}})
    assert isinstance(json.loads(answer.text)["snake_name"], int)
    assert answer.usage_metadata.total_token_count > 0
    embedding = client.models.embed_content(model=EMBED_MODEL, contents="hi",
                                            config={"output_dimensionality": 4})
    assert len(embedding.embeddings[0].values) == 4


def test_answers_are_deterministic(client: genai.Client):
    first = client.models.generate_content(model=MODEL, contents="same prompt").text
    assert client.models.generate_content(model=MODEL, contents="same prompt").text == first


def test_every_route_async(client: genai.Client, tmp_path: Path, emulator, version: str):
    path = write_jsonl(tmp_path / "async.jsonl", request_lines(2))

    async def scenario() -> None:
        aio = client.aio
        uploaded = await aio.files.upload(file=str(path), config={"mime_type": "jsonl"})
        assert (await aio.files.get(name=uploaded.name)).size_bytes == path.stat().st_size
        assert uploaded.name in [f.name async for f in await aio.files.list()]
        file_job = await aio.batches.create(model=MODEL, src=uploaded.name, config={"display_name": "aio-file"})
        inline_job = await aio.batches.create(model=MODEL, src=inline_requests(2))
        embed_job = await aio.batches.create_embeddings(model=EMBED_MODEL,
                                                        src={"inlined_requests": {"contents": ["x"]}})
        for name in (file_job.name, inline_job.name, embed_job.name):
            while not (job := await aio.batches.get(name=name)).done:
                await asyncio.sleep(0.05)
            assert job.state == types.JobState.JOB_STATE_SUCCEEDED
        file_job = await aio.batches.get(name=file_job.name)
        data = await aio.files.download(file=file_job.dest.file_name)
        assert len(data.decode().splitlines()) == 2
        assert inline_job.name in [j.name async for j in await aio.batches.list()]
        stuck = make_client(emulator.base_url, version, fault="stuck-pending").aio
        to_cancel = await stuck.batches.create(model=MODEL, src=inline_requests(1))
        await aio.batches.cancel(name=to_cancel.name)
        while not (cancelled := await aio.batches.get(name=to_cancel.name)).done:
            await asyncio.sleep(0.05)
        assert cancelled.state == types.JobState.JOB_STATE_CANCELLED
        await aio.batches.delete(name=to_cancel.name)
        await aio.files.delete(name=uploaded.name)
        assert (await aio.models.count_tokens(model=MODEL, contents="abcd")).total_tokens == 1
        assert (await aio.models.generate_content(model=MODEL, contents="hi")).text.startswith("[emulated")

    asyncio.run(scenario())


@pytest.mark.parametrize("model", ["gemini-3.5-flash", "gemini-3.1-pro-preview", "gemini-3-pro-image-preview"])
def test_the_models_of_the_current_batch_guide_are_served(client: genai.Client, model: str):
    job = client.batches.create(model=model, src=inline_requests(1, prefix=model), config={"display_name": model})
    assert job.model == f"models/{model}"
    assert client.models.generate_content(model=model, contents="Hello").text.startswith(f"[emulated {model}]")


def test_models_get_and_list_answer_model_resources(client: genai.Client):
    listed = {model.name: model for model in client.models.list(config={"page_size": 5})}  # the SDK pages on
    assert {"models/gemini-2.5-flash", "models/gemini-3.5-flash", "models/gemini-embedding-001"} <= set(listed)
    flash = client.models.get(model="gemini-2.5-flash")
    assert flash.name == "models/gemini-2.5-flash" and flash.input_token_limit == 1048576
    assert "batchGenerateContent" in flash.supported_actions and flash.thinking is True
    embedding = client.models.get(model="gemini-embedding-001")
    assert "asyncBatchEmbedContent" in embedding.supported_actions and embedding.output_token_limit == 1
    with pytest.raises(errors.ClientError) as raised:
        client.models.get(model="gpt-4o")
    assert raised.value.code == 404


def test_a_new_model_of_a_current_family_is_accepted_unless_models_are_strict(emulator, tmp_path: Path):
    """Google adds models every few weeks: an id of a current family works here as it would there."""
    client = make_client(emulator.base_url)
    assert client.models.generate_content(model="gemini-3.7-flash-preview-01-2027", contents="hi").text
    assert client.models.get(model="gemini-4-pro").name == "models/gemini-4-pro"
    for not_a_family in ("gemini-ultra-9", "gemini-3.7-flashy", "claude-3"):
        with pytest.raises(errors.ClientError):
            client.models.generate_content(model=not_a_family, contents="hi")
    with EmulatorServer(tmp_path / "strict", strict_models=True) as strict:
        strict_client = make_client(strict.base_url)
        assert strict_client.models.generate_content(model="gemini-2.5-flash", contents="hi").text
        with pytest.raises(errors.ClientError) as raised:
            strict_client.models.generate_content(model="gemini-3.7-flash-preview-01-2027", contents="hi")
        assert raised.value.code == 404


def test_timestamps_carry_nanoseconds_on_batches_and_microseconds_on_files(emulator, client: genai.Client,
                                                                            tmp_path: Path):
    """As Google writes them: ``2025-12-10T18:27:01.407650525Z`` in a batch operation,
    ``2025-09-10T13:37:39.328452Z`` in a File; the SDK reads both."""
    job = client.batches.create(model=MODEL, src=inline_requests(1, prefix="stamps"), config={"display_name": "stamps"})
    uploaded = client.files.upload(file=write_jsonl(tmp_path / "stamps.jsonl", request_lines(1)),
                                   config={"mime_type": "application/jsonl"})
    operation = _raw_get(emulator, job.name)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z", operation["metadata"]["createTime"])
    assert re.fullmatch(r".*T\d\d:\d\d:\d\d\.\d{6}Z", _raw_get(emulator, uploaded.name)["createTime"])
    assert client.batches.get(name=job.name).create_time == job.create_time is not None


def _raw_get(emulator, name: str) -> dict:
    request = urllib.request.Request(f"{emulator.base_url}/v1beta/{name}", headers={"x-goog-api-key": emulator.api_key})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


def test_a_create_answers_pending_however_short_the_job(tmp_path: Path):
    """Google's create always answers BATCH_STATE_PENDING; the job's clock starts once it exists, so
    not even a zero-second job (or a body that took long to read and check) answers RUNNING."""
    with Emulator(tmp_path / "service", job_seconds=0) as service:
        job = service.client().batches.create(model=MODEL, src=inline_requests(3, prefix="quick"),
                                              config={"display_name": "quick"})
        assert job.state == types.JobState.JOB_STATE_PENDING
        assert wait_done(service.client(), job.name).state == types.JobState.JOB_STATE_SUCCEEDED


def test_inline_metadata_is_a_struct_and_comes_back_as_sent(emulator):
    """Any JSON in an inlined request's metadata (a google.protobuf.Struct) comes back as sent, as from
    Google: numbers, booleans, nested objects (google-genai's own types send only strings)."""
    metadata = {"key": "struct-1", "n": 1, "flag": True, "obj": {"a": "b"}, "list": [1, "x"]}
    body = {"batch": {"displayName": "struct-metadata", "inputConfig": {"requests": {"requests": [
        {"request": {"contents": [{"parts": [{"text": "Hello"}]}]}, "metadata": metadata}]}}}}
    request = urllib.request.Request(f"{emulator.base_url}/v1beta/models/{MODEL}:batchGenerateContent",
                                     data=json.dumps(body).encode(), method="POST",
                                     headers={"x-goog-api-key": emulator.api_key, "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        name = json.loads(answer.read())["name"]
    # Polled over REST: google-genai itself cannot read such an answer (its InlinedResponse takes strings).
    deadline = time.monotonic() + 30
    while (operation := _raw_get(emulator, name))["metadata"]["state"] != "BATCH_STATE_SUCCEEDED":
        assert time.monotonic() < deadline, operation["metadata"]["state"]
        time.sleep(0.05)
    [response] = operation["metadata"]["output"]["inlinedResponses"]["inlinedResponses"]
    assert response["metadata"] == metadata


def test_a_files_uri_is_googles_and_requests_may_reference_it_in_either_form(emulator, client: genai.Client,
                                                                             tmp_path: Path):
    """File.uri is https://generativelanguage.googleapis.com/<v>/files/<id>, which the SDKs map back to
    the file's name; fileData.fileUri may give that URI, the emulator's own address or files/<id>; a
    reference to a file that is not there is refused as files.get of it is (403)."""
    (tmp_path / "doc.txt").write_text("A short document to summarise.\n")
    uploaded = client.files.upload(file=tmp_path / "doc.txt", config={"mime_type": "text/plain"})
    file_id = uploaded.name.removeprefix("files/")
    assert re.fullmatch(rf"https://generativelanguage\.googleapis\.com/v1(beta)?/files/{file_id}", uploaded.uri)
    assert client.files.get(name=uploaded.uri).name == uploaded.name  # the SDK maps the URI to the name
    for uri in (uploaded.uri, f"{emulator.base_url}/v1beta/files/{file_id}", uploaded.name):
        part = types.Part.from_uri(file_uri=uri, mime_type="text/plain")
        answer = client.models.generate_content(model=MODEL, contents=[part, "Summarise this file."])
        assert answer.text.startswith("[emulated")
    missing = types.Part.from_uri(file_uri="https://generativelanguage.googleapis.com/v1beta/files/nosuchfile1",
                                  mime_type="application/pdf")
    with pytest.raises(errors.ClientError) as raised:
        client.models.generate_content(model=MODEL, contents=[missing, "Summarise this file."])
    assert (raised.value.code, raised.value.status) == (403, "PERMISSION_DENIED")
    web = types.Part.from_uri(file_uri="https://example.com/report.pdf", mime_type="application/pdf")
    assert client.models.generate_content(model=MODEL, contents=[web, "Summarise."]).text  # not a File: not checked
    # Inside a batch, the missing file fails its request only.
    job = wait_done(client, client.batches.create(model=MODEL, src=[
        {"contents": [{"parts": [{"file_data": {"file_uri": uploaded.uri, "mime_type": "text/plain"}},
                                 {"text": "ok"}]}]},
        {"contents": [{"parts": [{"file_data": {"file_uri": "files/nosuchfile2", "mime_type": "application/pdf"}},
                                 {"text": "gone"}]}]},
    ], config={"display_name": "file-refs"}).name)
    first, second = job.dest.inlined_responses
    assert first.response is not None and first.error is None
    assert second.error is not None and second.error.code == 403


def _post(emulator, path: str, **kwargs):
    import httpx2 as httpx

    headers = {"x-goog-api-key": API_KEY, **kwargs.pop("headers", {})}
    return httpx.post(emulator.base_url + path, headers=headers, timeout=30, **kwargs)


@pytest.mark.parametrize("how", ["raw header", "uploadType=media", "multipart"])
def test_a_file_may_be_uploaded_whole_in_one_request(emulator, client: genai.Client, how: str):
    """Besides the resumable protocol the SDK speaks, Google takes a simple upload (the raw bytes) and a
    multipart/related one (the File's JSON, then the bytes); the file then serves a batch as any other."""
    data = b"".join(json.dumps(line).encode() + b"\n" for line in request_lines(2, prefix=f"whole-{how[:3]}"))
    if how == "multipart":
        boundary = "batchd-boundary-42"
        body = (f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n"
                f'{{"file": {{"display_name": "whole-multipart"}}}}\r\n'
                f"--{boundary}\r\nContent-Type: application/jsonl\r\n\r\n").encode() + data + \
            f"\r\n--{boundary}--\r\n".encode()
        response = _post(emulator, "/upload/v1beta/files", content=body, headers={
            "X-Goog-Upload-Protocol": "multipart", "Content-Type": f"multipart/related; boundary={boundary}"})
    elif how == "raw header":
        response = _post(emulator, "/upload/v1beta/files", content=data,
                         headers={"X-Goog-Upload-Protocol": "raw", "Content-Type": "application/jsonl"})
    else:
        response = _post(emulator, "/upload/v1beta/files?uploadType=media", content=data,
                         headers={"Content-Type": "application/jsonl"})
    assert response.status_code == 200, response.text
    file = response.json()["file"]
    assert file["sizeBytes"] == str(len(data)) and file["mimeType"] == "application/jsonl"
    assert file.get("displayName") == ("whole-multipart" if how == "multipart" else None)
    job = wait_done(client, client.batches.create(model=MODEL, src=file["name"]).name)
    assert len(output_lines(client, job)) == 2


def test_a_malformed_multipart_upload_is_a_clear_400(emulator):
    response = _post(emulator, "/upload/v1beta/files", content=b"--x\r\n\r\nonly one part\r\n--x--\r\n",
                     headers={"X-Goog-Upload-Protocol": "multipart", "Content-Type": "multipart/related; boundary=x"})
    assert response.status_code == 400 and "two parts" in response.json()["error"]["message"]


def test_single_quoted_bodies_are_read_as_googles_parser_reads_them(emulator):
    body = "{'contents': [{'parts': [{'text': 'It\\'s \"quoted\" in caf\\u00e9'}]}], \"generationConfig\": {'temperature': 0.1}}"
    response = _post(emulator, f"/v1beta/models/{MODEL}:generateContent", content=body.encode(),
                     headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    assert response.json()["candidates"][0]["content"]["parts"][0]["text"].startswith("[emulated")
    broken = _post(emulator, f"/v1beta/models/{MODEL}:generateContent", content=b"{'contents': [",
                   headers={"Content-Type": "application/json"})
    assert broken.status_code == 400 and broken.json()["error"]["status"] == "INVALID_ARGUMENT"


def test_browsers_may_call_it_from_any_page(emulator):
    """CORS, as Google's API answers it: the preflight is allowed and a page can read the answer and
    the upload protocol's headers (the browser build of the JS SDK needs both)."""
    import httpx2 as httpx

    origin = "http://localhost:5173"
    preflight = httpx.options(emulator.base_url + f"/v1beta/models/{MODEL}:generateContent", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,x-goog-api-key"}, timeout=30)
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] in ("*", origin)
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "x-goog-api-key" in preflight.headers["access-control-allow-headers"].lower()
    start = _post(emulator, "/upload/v1beta/files", json={"file": {"mime_type": "application/jsonl"}}, headers={
        "Origin": origin, "X-Goog-Upload-Protocol": "resumable", "X-Goog-Upload-Command": "start"})
    assert start.headers["access-control-allow-origin"] in ("*", origin)
    assert "x-goog-upload-url" in start.headers["access-control-expose-headers"].lower()


def test_cancel_is_asynchronous_and_a_job_that_ends_first_ends_as_it_would_have(tmp_path: Path):
    """As Google's: cancel answers at once, the job is CANCELLED a moment later, and a job that ends
    before the cancel takes effect ends SUCCEEDED (a client must expect that after asking to cancel)."""
    with EmulatorServer(tmp_path / "slow-cancel", job_seconds=30, cancel_seconds=1.5) as emulator:
        client = make_client(emulator.base_url)
        running = client.batches.create(model=MODEL, src=inline_requests(1), config={"display_name": "to-cancel"})
        client.batches.cancel(name=running.name)
        assert client.batches.get(name=running.name).state == types.JobState.JOB_STATE_PENDING  # not yet
        client.batches.cancel(name=running.name)  # asking again changes nothing
        assert wait_done(client, running.name).state == types.JobState.JOB_STATE_CANCELLED
    with EmulatorServer(tmp_path / "race", job_seconds=0.2, cancel_seconds=5) as emulator:
        client = make_client(emulator.base_url)
        racing = client.batches.create(model=MODEL, src=inline_requests(1), config={"display_name": "race"})
        client.batches.cancel(name=racing.name)
        ended = wait_done(client, racing.name)
        assert ended.state == types.JobState.JOB_STATE_SUCCEEDED and ended.dest.inlined_responses
