"""As strict as Google's JSON front end: a misspelled or unknown name, a value of the wrong type, a
role or response MIME type the API does not have are refused with Google's 400, its texts, field
paths (snake_case, ``[i]`` for list items) and ``BadRequest.fieldViolations``; inside a JSONL input
file the same mistakes fail their own line only. What the SDK sends is never refused: the shapes
are read from google-genai's own types."""

from __future__ import annotations

from pathlib import Path

import httpx2 as httpx
import pytest
from google import genai
from google.genai import errors, types

from batchd.emulator import EmulatorServer, shapes
from batchd.emulator.jobs import ActiveJobs

from .support import (API_KEY, EMBED_MODEL, MODEL, inline_requests, make_client, output_lines, request_lines, wait_done,
                      write_jsonl)

HELLO = {"role": "user", "parts": [{"text": "Say hello"}]}


def post(emulator: EmulatorServer, path: str, body) -> httpx.Response:
    return httpx.post(emulator.base_url + path, json=body, headers={"x-goog-api-key": API_KEY}, timeout=30)


def refusal(response: httpx.Response) -> dict:
    """The 400 error of ``response``, checked to be Google's: status, one message line per violation,
    and a BadRequest detail naming each."""
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["status"]) == (400, "INVALID_ARGUMENT")
    (detail,) = error["details"]
    assert detail["@type"] == "type.googleapis.com/google.rpc.BadRequest"
    assert [v["description"] for v in detail["fieldViolations"]] == error["message"].split("\n")
    return error


@pytest.mark.parametrize("body, message, field", [
    ({"contents": [HELLO], "generationConfig": {"temprature": 0.5}},
     "Invalid JSON payload received. Unknown name \"temprature\" at 'generation_config': Cannot find field.",
     "generation_config"),
    ({"contents": [HELLO], "generation_config": {"temperature": "hot"}},
     "Invalid value at 'generation_config.temperature' (TYPE_FLOAT), \"hot\"", "generation_config.temperature"),
    ({"contents": [HELLO], "generationConfig": {"maxOutputTokens": 1.5}},
     "Invalid value at 'generation_config.max_output_tokens' (TYPE_INT32), 1.5", "generation_config.max_output_tokens"),
    ({"contents": [{"parts": [{"text": "x", "inlineData": {"mimeType": "image/png", "data": "@@@"}}]}]},
     "Invalid value at 'contents[0].parts[0].inline_data.data' (TYPE_BYTES), Base64 decoding failed for \"@@@\"",
     "contents[0].parts[0].inline_data.data"),
    ({"contents": [HELLO], "safetySettings": [{"category": "HARM_CATEGORY_GOSSIP", "threshold": "BLOCK_NONE"}]},
     "Invalid value at 'safety_settings[0].category' "
     "(type.googleapis.com/google.ai.generativelanguage.v1beta.HarmCategory), \"HARM_CATEGORY_GOSSIP\"",
     "safety_settings[0].category"),
    ({"contents": [HELLO], "generationConfig": {"responseSchema": {"type": "OBJECT", "properties": {
        "a": {"type": "STRING"}, "b": {"type": "STRING", "additionalPropertees": False}}}}},
     "Invalid JSON payload received. Unknown name \"additionalPropertees\" at "
     "'generation_config.response_schema.properties[1].value': Cannot find field.",
     "generation_config.response_schema.properties[1].value"),
    ({"contents": [HELLO], "google": {"x": 1}},
     "Invalid JSON payload received. Unknown name \"google\": Cannot find field.", None),
])
def test_a_name_or_value_google_would_not_parse_is_refused_with_its_path(emulator: EmulatorServer, body, message,
                                                                        field):
    error = refusal(post(emulator, f"/v1beta/models/{MODEL}:generateContent", body))
    assert error["message"] == message
    violation = error["details"][0]["fieldViolations"][0]
    assert violation.get("field") == field


def test_every_violation_is_reported_at_once(emulator: EmulatorServer):
    body = {"contents": [HELLO], "generationConfig": {"temprature": 0.5, "topK": "many", "candidateCount": True}}
    error = refusal(post(emulator, f"/v1beta/models/{MODEL}:generateContent", body))
    assert error["message"].split("\n") == [
        "Invalid JSON payload received. Unknown name \"temprature\" at 'generation_config': Cannot find field.",
        "Invalid value at 'generation_config.top_k' (TYPE_FLOAT), \"many\"",
        "Invalid value at 'generation_config.candidate_count' (TYPE_INT32), true",
    ]


def test_a_flood_of_violations_is_cut_at_a_bound(emulator: EmulatorServer):
    body = {"contents": [HELLO], "generationConfig": {f"unknown{n}": n for n in range(500)}}
    error = refusal(post(emulator, f"/v1beta/models/{MODEL}:generateContent", body))
    assert len(error["details"][0]["fieldViolations"]) == shapes.MAX_VIOLATIONS


def test_what_protobuf_json_allows_is_accepted(emulator: EmulatorServer):
    """Numbers as strings, integral floats for integers, either spelling of a name, null for unset,
    enums in any case, a single object where a list is expected inside a message, base64url bytes."""
    body = {"contents": [{"role": "user", "parts": [{"text": "x"}, {"inline_data": {
        "mime_type": "image/png", "data": "iVBORw0KGgo_-w"}}]}],
        "generationConfig": {"temperature": "0.5", "maxOutputTokens": 64.0, "topK": 3, "seed": "7",
                             "stopSequences": "END", "responseMimeType": None, "thinkingConfig": {"thinkingBudget": 0}},
        "safety_settings": [{"category": "harm_category_harassment", "threshold": "BLOCK_NONE"}]}
    response = post(emulator, f"/v1beta/models/{MODEL}:generateContent", body)
    assert response.status_code == 200, response.text


def test_a_role_or_response_mime_type_the_api_does_not_have_is_refused(emulator: EmulatorServer):
    robot = post(emulator, f"/v1beta/models/{MODEL}:generateContent",
                 {"contents": [{"role": "robot", "parts": [{"text": "beep"}]}]})
    assert robot.status_code == 400 and robot.json()["error"]["message"] == "Please use a valid role: user, model."
    html = post(emulator, f"/v1beta/models/{MODEL}:generateContent",
                {"contents": [HELLO], "generationConfig": {"responseMimeType": "text/html"}})
    assert html.status_code == 400
    assert "response_mime_type: allowed mimetypes are `text/plain`" in html.json()["error"]["message"]


def test_an_unknown_name_in_a_batch_body_or_an_inline_request_refuses_the_create(client: genai.Client,
                                                                                emulator: EmulatorServer):
    unknown_in_batch = {"batch": {"displayName": "strict-1", "inputConfig": {"requests": {"requests": [
        {"request": {"contents": [HELLO]}}]}}, "priorty": 1}}
    error = refusal(post(emulator, f"/v1beta/models/{MODEL}:batchGenerateContent", unknown_in_batch))
    assert error["message"] == "Invalid JSON payload received. Unknown name \"priorty\" at 'batch': Cannot find field."
    in_request = {"batch": {"displayName": "strict-2", "inputConfig": {"requests": {"requests": [
        {"request": {"contents": [HELLO]}},
        {"request": {"contents": [HELLO], "generationConfig": {"temperature": "hot"}}}]}}}}
    error = refusal(post(emulator, f"/v1beta/models/{MODEL}:batchGenerateContent", in_request))
    assert error["details"][0]["fieldViolations"][0]["field"] == \
        "batch.input_config.requests.requests[1].request.generation_config.temperature"
    names = [job.display_name for job in client.batches.list(config={"page_size": 100})]
    assert "strict-1" not in names and "strict-2" not in names  # nothing was created


def test_a_bad_jsonl_line_fails_alone(client: genai.Client, tmp_path: Path):
    path = write_jsonl(tmp_path / "strict.jsonl", [
        *request_lines(1, "good"),
        {"key": "misspelled", "request": {"contents": [HELLO], "generationConfig": {"temprature": 0.1}}},
        {"key": "typed", "request": {"contents": [HELLO], "generationConfig": {"temperature": "hot"}}},
        {"key": "extra", "request": {"contents": [HELLO]}, "priority": "high"},
        {"key": "robot", "request": {"contents": [{"role": "robot", "parts": [{"text": "x"}]}]}},
        *request_lines(1, "after"),
    ])
    uploaded = client.files.upload(file=str(path), config={"mime_type": "jsonl"})
    job = wait_done(client, client.batches.create(model=MODEL, src=uploaded.name).name)
    lines = {line["key"]: line for line in output_lines(client, job)}
    assert "response" in lines["good0"] and "response" in lines["after0"]
    errors_by_key = {key: line["error"] for key, line in lines.items() if "error" in line}
    assert set(errors_by_key) == {"misspelled", "typed", "extra", "robot"}
    assert all((e["code"], e["status"]) == (400, "INVALID_ARGUMENT") for e in errors_by_key.values())
    assert "Unknown name \"temprature\" at 'request.generation_config'" in errors_by_key["misspelled"]["message"]
    assert "'request.generation_config.temperature' (TYPE_FLOAT)" in errors_by_key["typed"]["message"]
    assert "Unknown name \"priority\"" in errors_by_key["extra"]["message"]


def test_everything_the_sdk_sends_is_accepted(client: genai.Client):
    """The SDK's own serialisation of a request using most of the API's surface passes the check."""
    config = types.GenerateContentConfig(
        system_instruction="Be brief.", temperature=0.3, top_p=0.9, top_k=20, candidate_count=1, max_output_tokens=64,
        stop_sequences=["END"], seed=3, presence_penalty=0.1, frequency_penalty=0.1, response_mime_type="application/json",
        response_schema={"type": "OBJECT", "properties": {"answer": {"type": "STRING"}}, "required": ["answer"]},
        thinking_config=types.ThinkingConfig(thinking_budget=128, include_thoughts=True),
        safety_settings=[types.SafetySetting(category="HARM_CATEGORY_HATE_SPEECH", threshold="BLOCK_ONLY_HIGH")],
        labels={"team": "docs"})
    contents = [types.Content(role="user", parts=[
        types.Part(text="Describe"), types.Part.from_bytes(data=b"\x89PNG\r\n", mime_type="image/png")])]
    assert client.models.generate_content(model=MODEL, contents=contents, config=config).text
    job = client.batches.create(model=MODEL, src=[types.InlinedRequest(contents=contents, config=config,
                                                                      metadata={"row": "1"})],
                                config={"display_name": "strict-sdk"})
    assert job.name
    embedded = client.models.embed_content(model=EMBED_MODEL, contents=["a", "b"],
                                           config=types.EmbedContentConfig(task_type="RETRIEVAL_DOCUMENT",
                                                                           output_dimensionality=8))
    assert [len(e.values) for e in embedded.embeddings] == [8, 8]


def test_an_upload_whose_file_metadata_google_would_not_parse_is_refused(emulator: EmulatorServer):
    response = httpx.post(emulator.base_url + "/upload/v1beta/files", json={"file": {"displayNme": "typo",
                                                                                     "mimeType": "text/plain"}},
                          headers={"x-goog-api-key": API_KEY, "X-Goog-Upload-Protocol": "resumable",
                                   "X-Goog-Upload-Command": "start"}, timeout=30)
    error = refusal(response)
    assert error["message"] == "Invalid JSON payload received. Unknown name \"displayNme\" at 'file': Cannot find field."


def test_batch_jobs_beyond_the_concurrent_limit_are_refused_with_429_until_one_ends(tmp_path: Path):
    """Google runs at most 100 batch jobs per project at once ("concurrent batch requests") and refuses
    a create beyond that with 429 RESOURCE_EXHAUSTED, storing nothing; a job that ends (here: cancelled,
    deleted) makes room, and the count survives a restart."""
    def create(client: genai.Client) -> types.BatchJob:
        return client.batches.create(model=MODEL, src=inline_requests(1))

    with EmulatorServer(tmp_path / "emulator", job_seconds=60, cancel_seconds=0, concurrent_batches=2) as emulator:
        client = make_client(emulator.base_url)
        first, second = create(client), create(client)
        with pytest.raises(errors.ClientError) as refused:
            create(client)
        assert (refused.value.code, refused.value.status) == (429, "RESOURCE_EXHAUSTED")
        [violation] = next(detail for detail in refused.value.details["error"]["details"]
                           if detail["@type"].endswith("QuotaFailure"))["violations"]
        assert violation["quotaValue"] == "2" and "concurrent" in violation["quotaMetric"]
        assert len(list(client.batches.list())) == 2, "the refused create stored a job"
        client.batches.cancel(name=first.name)
        third = create(client)  # the cancelled job ended
        with pytest.raises(errors.ClientError):
            create(client)
        client.batches.delete(name=second.name)
        create(client)
        client.close()
    with EmulatorServer(tmp_path / "emulator", job_seconds=60, concurrent_batches=2) as emulator:
        client = make_client(emulator.base_url)
        with pytest.raises(errors.ClientError):  # third and the last are still running
            create(client)
        client.batches.delete(name=third.name)
        create(client)
        client.close()


def test_without_a_concurrent_limit_no_job_is_counted():
    """``concurrent_batches = 0``: nothing to bound, so no id is kept (it would grow with every job)."""
    unlimited = ActiveJobs(0, ended=lambda job_id: False)
    unlimited.add_existing(f"old{n}" for n in range(100))
    for n in range(1000):
        unlimited.reserve(f"job{n}")
    assert len(unlimited) == 0
    limited = ActiveJobs(2, ended=lambda job_id: job_id == "a")
    limited.reserve("a"), limited.reserve("b")
    limited.reserve("c")  # full: "a" has ended and leaves
    assert len(limited) == 2
