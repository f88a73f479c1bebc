"""The ``embed`` task: its manifest, the EmbedContentRequests it puts on the wire through google-genai's
``batches.create_embeddings``, and embeddings.npy end to end against the embedded emulator."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from batchd.emulator.responder import EmulatedResponder
from batchd.manifest import ManifestError, load_manifest
from batchd.npy import NpyRowWriter
from batchd.encoding import EmbedRequestEncoder, inline_embeddings_source
from batchd.provider import Provider
from batchd.remote import RemoteJob
from batchd.spool import to_embed_result
from batchd.task import TaskRequest
from batchd.testing import EMULATOR_API_KEY, DaemonRunner, Workspace
from test_daemon import assert_one_live_job_per_chunk, request_files
from test_provider import recorder, recording_server  # noqa: F401 (fixtures: google-genai's request bodies)

# batchd calls the experimental batches.create_embeddings knowingly (batchd.provider silences it in the daemon).
pytestmark = pytest.mark.filterwarnings("ignore::google.genai._common.ExperimentalWarning")

MODEL = "gemini-embedding-001"
#: Batch price of gemini-embedding-001 input tokens (batchd.config.DEFAULT_PRICES: 0.15 USD a million, halved).
BATCH_PRICE_PER_TOKEN = 0.15 / 1_000_000 * 0.5

#: Every chunk inline (one request each: an embed chunk of more goes as a file) or every chunk a file.
CHUNK_MODES = {
    "inline": {"chunk_max_requests": 1, "inline_max_requests": 2},
    "file": {"chunk_max_requests": 50_000, "inline_max_requests": 0},
}


def manifest(tmp_path: Path, text: str, name: str = "m.toml"):
    path = tmp_path / name
    path.write_text(text)
    return load_manifest(path)


def emulated_vector(text: str, *, task_type: str | None = None, dimensions: int | None = None,
                    title: str | None = None) -> list[float]:
    """The vector the emulator answers for one text (its responder is deterministic)."""
    request: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "user"}}
    if task_type:
        request["taskType"] = task_type
    if dimensions:
        request["outputDimensionality"] = dimensions
    if title:
        request["title"] = title
    return EmulatedResponder().embed(request, f"models/{MODEL}")["embedding"]["values"]


# -- the manifest -------------------------------------------------------------------------------------


def test_an_embed_manifest_defaults_to_the_embedding_model_and_builds_embed_requests(tmp_path):
    job = manifest(tmp_path, 'task = "embed"\ntexts = ["alpha", "beta"]\ntask_type = "RETRIEVAL_DOCUMENT"\n'
                             'output_dimensionality = 16\ntitle = "Handbook"\n')
    assert (job.kind, job.model) == ("embed", MODEL)
    requests = list(job.requests())
    assert [(r.key, r.prompt, r.input) for r in requests] == [
        ("1", "alpha", {"id": "1", "text": "alpha"}), ("2", "beta", {"id": "2", "text": "beta"})]
    assert requests[0].config == {"task_type": "RETRIEVAL_DOCUMENT", "output_dimensionality": 16, "title": "Handbook"}
    line = json.loads(EmbedRequestEncoder().encode(requests[0]))
    assert line == {"key": "1", "request": {"content": {"parts": [{"text": "alpha"}], "role": "user"},
                                            "taskType": "RETRIEVAL_DOCUMENT", "outputDimensionality": 16,
                                            "title": "Handbook"}}


def test_an_embedding_model_named_by_the_manifest_is_kept(tmp_path):
    assert manifest(tmp_path, 'task = "embed"\nmodel = "text-embedding-004"\ntexts = ["a"]\n').model == \
        "text-embedding-004"


@pytest.mark.parametrize(("text", "field", "message"), [
    ('task_type = "RETRIEVAL"\n', "task_type", "RETRIEVAL_DOCUMENT"),
    ('output_dimensionality = 0\n', "output_dimensionality", "greater than or equal to 1"),
    ('output_dimensionality = 4096\n', "output_dimensionality", "less than or equal to 3072"),
    ('title = "Handbook"\n', None, 'title is only used with task_type = "RETRIEVAL_DOCUMENT"'),
    ('title = "Handbook"\ntask_type = "SEMANTIC_SIMILARITY"\n', None, "'SEMANTIC_SIMILARITY'"),
    ('model = "gemini-2.5-flash"\n', "model", "'gemini-2.5-flash' is a generation model and cannot embed"),
    ('temperature = 0.5\n', "temperature", "embeddings, which take no generation settings (remove temperature)"),
    ('dimensions = 8\n', "dimensions", "unknown field (task 'embed' takes: items, texts, task_type"),
    ('[[items]]\ntext = "b"\nconfig = { temperature = 0.5 }\n', "items[0].config", "unknown field"),
])
def test_bad_embed_manifests_are_refused_naming_the_field(tmp_path, text, field, message):
    with pytest.raises(ManifestError) as refused:
        manifest(tmp_path, 'task = "embed"\ntexts = ["a"]\n' + text)
    assert refused.value.field == field
    assert message in str(refused.value)


def test_a_generation_task_refuses_an_embedding_model(tmp_path):
    with pytest.raises(ManifestError, match="'gemini-embedding-001' is an embedding model and cannot generate"):
        manifest(tmp_path, 'task = "sentiment"\nmodel = "gemini-embedding-001"\ntexts = ["a"]\n')


# -- the wire: what google-genai sends -------------------------------------------------------------------


def test_inline_and_file_embedding_creates_send_what_the_sdk_sends(recorder):
    base_url, bodies = recorder
    config = {"task_type": "SEMANTIC_SIMILARITY", "output_dimensionality": 8}
    texts = ['A "quoted" text — ünïcödé, 日本語', "second"]
    lines = [EmbedRequestEncoder().encode(TaskRequest(str(n), text, {}, config)) + "\n"
             for n, text in enumerate(texts)]
    with Provider(api_key=EMULATOR_API_KEY, base_url=base_url) as provider:
        provider.create_from_lines(MODEL, lines, "inline-embed", "embed")
        provider.create_from_file(MODEL, "files/abc", "file-embed", "embed")
        # The SDK's documented inline form, from the texts and their one config.
        provider._single_shot_client.batches.create_embeddings(
            model=MODEL, src={"inlined_requests": {"contents": texts, "config": config}},
            config={"display_name": "inline-embed"})

    inline, from_file, documented = bodies
    assert inline["_path"].endswith(f"/models/{MODEL}:asyncBatchEmbedContent")
    assert inline == documented
    # Each inline request is the request its requests-file line holds; no key travels with it.
    assert [sent["request"] for sent in inline["batch"]["inputConfig"]["requests"]["requests"]] == \
        [json.loads(line)["request"] for line in lines]
    assert all("metadata" not in sent for sent in inline["batch"]["inputConfig"]["requests"]["requests"])
    assert from_file["batch"] == {"inputConfig": {"file_name": "files/abc"}, "displayName": "file-embed"}


def test_inline_embeddings_must_share_their_settings():
    lines = [{"key": "a", "request": {"content": {"parts": [{"text": "a"}]}, "taskType": "CLUSTERING"}},
             {"key": "b", "request": {"content": {"parts": [{"text": "b"}]}}}]
    with pytest.raises(ValueError, match="request 'b': inline embedding requests must share their settings"):
        inline_embeddings_source(lines)


def test_an_embedding_result_line_becomes_a_vector_and_its_token_count():
    ok = to_embed_result("k", {"id": "k"}, {"key": "k", "response": {"embedding": {"values": [0.5, -1]},
                                                                        "tokenCount": "3"}})
    assert (ok.status, ok.embedding, ok.usage, ok.failure()) == \
        ("ok", [0.5, -1], {"promptTokenCount": 3, "totalTokenCount": 3}, None)
    empty = to_embed_result("k", {"id": "k"}, {"key": "k", "response": {"embedding": {}}})
    assert (empty.status, empty.error["code"]) == ("error", "no_embedding")
    failed = to_embed_result("k", {"id": "k"}, {"key": "k", "error": {"code": 3, "message": "too long"}})
    assert failed.failure() == "too long"


def test_npy_rows_of_another_length_are_refused_and_the_header_holds_the_final_shape(tmp_path):
    path = tmp_path / "e.npy"
    with open(path, "wb") as file:
        writer = NpyRowWriter(file)
        assert [writer.add([1.0, 2.0]), writer.add([3.0, 4.5])] == [0, 1]
        with pytest.raises(ValueError, match="3 values where the rows before have 2"):
            writer.add([1.0, 2.0, 3.0])
        writer.close()
    array = np.load(path)
    assert (array.shape, array.dtype) == ((2, 2), np.float32)
    assert array.tolist() == [[1.0, 2.0], [3.0, 4.5]]


# -- end to end ---------------------------------------------------------------------------------------


def check_delivered(workspace: Workspace, ids_and_texts: list[tuple[str, str]], **settings: Any) -> dict:
    """The job's embeddings, index, organized.json and results against the emulator's vectors; its summary."""
    folder = workspace.outbox / "corpus"
    embeddings = np.load(folder / "embeddings.npy")
    dimensions = settings.get("dimensions") or 3072
    assert (embeddings.shape, embeddings.dtype) == ((len(ids_and_texts), dimensions), np.float32)
    expected = np.array([emulated_vector(text, **settings) for _, text in ids_and_texts], dtype=np.float32)
    assert np.array_equal(embeddings, expected)
    index = [json.loads(line) for line in (folder / "embeddings_index.jsonl").read_text().splitlines()]
    assert index == [{"row": row, "key": item_id} for row, (item_id, _) in enumerate(ids_and_texts)]
    organized = json.loads((folder / "organized.json").read_text())
    assert organized == {item_id: {"row": row} for row, (item_id, _) in enumerate(ids_and_texts)}
    results = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    assert [(r["key"], r["status"], r["embedding_row"], r["input"]["text"]) for r in results] == \
        [(item_id, "ok", row, text) for row, (item_id, text) in enumerate(ids_and_texts)]
    assert all("values" not in json.dumps(r) for r in results)  # results.jsonl stays small: rows, not vectors
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["task"] == "embed" and summary["model"] == MODEL and summary["state"] == "succeeded"
    assert summary["counts"]["total"] == summary["counts"]["succeeded"] == len(ids_and_texts)
    tokens = sum((len(text) + 3) // 4 for _, text in ids_and_texts)  # the emulator's count
    assert summary["tokens"] == {"prompt": tokens, "output": 0, "thoughts": 0, "total": tokens}
    cost = summary["cost"]
    assert cost["estimate_details"]["output_tokens"] == 0
    assert cost["estimate_details"]["priced_as"] == MODEL
    assert cost["estimate_details"]["method"].startswith("countTokens")  # embedding models count tokens too
    # Prices are rounded to 8 decimals.
    assert cost["estimate"] == pytest.approx(cost["estimate_details"]["input_tokens"] * BATCH_PRICE_PER_TOKEN, abs=1e-8)
    assert cost["actual"] == pytest.approx(tokens * BATCH_PRICE_PER_TOKEN, abs=1e-8)
    assert cost["actual_details"]["output_tokens"] == 0
    return summary


@pytest.mark.parametrize("mode", CHUNK_MODES)
def test_inline_texts_are_embedded_into_an_npy_array(workspace: Workspace, daemon: DaemonRunner, mode):
    workspace.configure(**CHUNK_MODES[mode])
    texts = ["The cat sat on the mat.", "Stock markets fell sharply.", "A kitten naps on a rug.", "Rain later."]
    workspace.drop("corpus.toml", 'task = "embed"\ntask_type = "SEMANTIC_SIMILARITY"\noutput_dimensionality = 32\n'
                                  f"texts = {json.dumps(texts)}\n")
    run = daemon.run_once()
    assert run.returncode == 0, run
    summary = check_delivered(workspace, [(str(n), text) for n, text in enumerate(texts, 1)],
                              task_type="SEMANTIC_SIMILARITY", dimensions=32)
    # google-genai sends inline embeddings without keys: only a chunk of one text goes inline (its answer
    # is surely its own), so nothing is matched by position.
    assert [b["mode"] for b in summary["remote_batches"]] == (["inline"] * 4 if mode == "inline" else ["file"])
    assert "warnings" not in summary and "joined_by_position" not in summary["counts"]
    assert summary["state"] == "succeeded"


@pytest.mark.parametrize("mode", CHUNK_MODES)
def test_a_csv_corpus_is_embedded_with_its_own_ids(workspace: Workspace, daemon: DaemonRunner, mode):
    workspace.configure(**CHUNK_MODES[mode])
    rows = [("doc-a", "Refunds are issued within 14 days."), ("doc-b", "Shipping is free over 50 EUR."),
            ("doc-c", "Support answers within a day.")]
    (workspace.inbox / "corpus.csv").write_text("doc_id,body\n" + "".join(f"{i},{t}\n" for i, t in rows))
    workspace.drop("corpus.toml", 'task = "embed"\ninput = "corpus.csv"\nid_column = "doc_id"\n'
                                  'text_column = "body"\ntask_type = "RETRIEVAL_DOCUMENT"\ntitle = "Shop FAQ"\n')
    run = daemon.run_once()
    assert run.returncode == 0, run
    check_delivered(workspace, rows, task_type="RETRIEVAL_DOCUMENT", title="Shop FAQ")


def test_an_embed_manifest_naming_a_generation_model_is_rejected_and_the_daemon_goes_on(
        workspace: Workspace, daemon: DaemonRunner):
    workspace.drop("wrong.toml", 'task = "embed"\nmodel = "gemini-2.5-flash"\ntexts = ["a"]\n')
    workspace.drop("corpus.toml", 'task = "embed"\noutput_dimensionality = 4\ntexts = ["fine"]\n')
    run = daemon.run_once()
    assert run.returncode == 1  # a job was rejected
    rejected = json.loads((workspace.outbox / "wrong" / "summary.json").read_text())
    assert rejected["state"] == "rejected"
    assert "is a generation model and cannot embed" in rejected["error"]["message"]
    assert np.load(workspace.outbox / "corpus" / "embeddings.npy").shape == (1, 4)


# One crash point in the default run, the others in the slow step (as the kill -9 matrices).
@pytest.mark.parametrize("point", [pytest.param("after-intent", marks=pytest.mark.slow),
                                   pytest.param("after-upload", marks=pytest.mark.slow), "after-create"])
def test_killed_around_an_embedding_create_the_restart_delivers_once_and_creates_nothing_twice(
        workspace: Workspace, point: str):
    # One inline chunk and one file chunk: every kill point meets both kinds of create. An embed chunk of
    # more than one text is a file whatever inline_max_requests says (inline embeddings carry no keys).
    workspace.configure(chunk_max_requests=2, inline_max_requests=1000)
    texts = ["one", "two", "three"]
    workspace.drop("corpus.toml", f'task = "embed"\noutput_dimensionality = 8\ntexts = {json.dumps(texts)}\n')

    crashed = workspace.start("run", BATCHD_CRASH_AT=point)
    assert crashed.wait(120) == -signal.SIGKILL, f"the daemon did not reach crash point {point}"
    result = workspace.batchd("run", "--once")

    assert result.returncode == 0, result.stderr
    summary = workspace.delivered()["corpus"]
    assert summary["state"] == "succeeded" and summary["counts"]["total"] == 3
    assert [b["mode"] for b in summary["remote_batches"]] == ["file", "inline"]
    embeddings = np.load(workspace.outbox / "corpus" / "embeddings.npy")
    assert np.array_equal(embeddings, np.array([emulated_vector(t, dimensions=8) for t in texts], dtype=np.float32))
    assert_one_live_job_per_chunk(workspace)
    assert request_files(workspace) == [], "a request file was left on the Files API"


def test_inline_embeddings_are_read_under_either_output_name():
    """google-genai reads inline embedding results under inlinedResponses or inlinedEmbedContentResponses."""
    answers = [{"response": {"embedding": {"values": [1.0]}}}]
    for name in ("inlinedResponses", "inlinedEmbedContentResponses"):
        operation = {"name": "batches/b", "metadata": {"state": "BATCH_STATE_SUCCEEDED",
                                                       "output": {name: {"inlinedResponses": answers}}}}
        assert RemoteJob.from_operation(operation).inlined == answers
