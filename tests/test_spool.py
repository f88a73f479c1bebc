"""The spool's join and the gate through which the loop hands finished chunks to a job's writer."""

from __future__ import annotations

import json
import queue
import threading

import pytest

from batchd.daemon.context import Stopping
from batchd.daemon.writer import ChunkGate
from batchd import jsonfast
from batchd import spool as spool_module
from batchd.encoding import RequestEncoder
from batchd.spool import ChunkLimits, JobSpool
from batchd.task import TaskRequest

LIMITS = ChunkLimits(max_requests=2, max_bytes=1 << 20, inline_max_requests=0, inline_max_bytes=0)


def built_spool(tmp_path, count: int) -> JobSpool:
    spool = JobSpool(tmp_path / "job")
    spool.root.mkdir()
    requests = (TaskRequest(key=f"k{n}", prompt=f"text {n}", input={"n": n}) for n in range(count))
    chunks = list(spool.build(requests, RequestEncoder("m").encode, LIMITS))
    assert [c.request_count for c in chunks] == [2] * (count // 2) + [1] * (count % 2)
    return spool


def answer(spool: JobSpool, idx: int, keys: list[str]) -> None:
    lines = [json.dumps({"key": key, "response": {"candidates": [{"content": {"parts": [{"text": f"re {key}"}]}}]}})
             for key in keys]
    spool.results_path(idx).write_text("\n".join(lines) + "\n")


def test_joined_waits_at_a_chunk_still_running_and_goes_on_once_it_is_back(tmp_path):
    spool = built_spool(tmp_path, 4)
    answer(spool, 0, ["k1", "k0"])  # out of order within the chunk
    gate = ChunkGate([0, 1], threading.Event())
    gate.open(0, None)
    results: queue.Queue = queue.Queue()

    def writer():
        for result in spool.joined(gate.error_of):
            results.put(result)
        results.put(None)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    assert [results.get(timeout=10).key for _ in range(2)] == ["k0", "k1"]
    assert gate.pending()
    thread.join(0.5)
    assert thread.is_alive() and results.empty(), "chunk 1 was read before the loop said it was back"

    answer(spool, 1, ["k2", "k3"])
    gate.open(1, None)
    rest = [results.get(timeout=10) for _ in range(3)]
    assert [r.key for r in rest[:2]] == ["k2", "k3"] and rest[2] is None
    assert [r.text for r in rest[:2]] == ["re k2", "re k3"]
    assert not gate.pending()


def test_a_chunk_without_results_gives_each_request_its_error(tmp_path):
    spool = built_spool(tmp_path, 3)
    answer(spool, 0, ["k0", "k1"])
    gate = ChunkGate([0, 1], threading.Event())
    gate.open(0, None)
    gate.open(1, {"code": "expired", "message": "the batch expired"})
    results = list(spool.joined(gate.error_of))
    assert [(r.key, r.status) for r in results] == [("k0", "ok"), ("k1", "ok"), ("k2", "error")]
    assert results[2].error == {"code": "expired", "message": "the batch expired"}


def test_index_entries_of_a_chunk_never_recorded_are_missing_without_waiting(tmp_path):
    # A build that stopped part way leaves index entries of a chunk that was never recorded.
    spool = built_spool(tmp_path, 3)
    answer(spool, 0, ["k0", "k1"])
    gate = ChunkGate([0], threading.Event())
    gate.open(0, None)
    results = list(spool.joined(gate.error_of))
    assert [(r.key, r.status) for r in results] == [("k0", "ok"), ("k1", "ok"), ("k2", "error")]
    assert results[2].error["code"] == "missing"


def test_a_writer_waiting_at_the_gate_stops_when_the_daemon_does(tmp_path):
    stopping = threading.Event()
    gate = ChunkGate([0], stopping)
    failure: list[BaseException] = []

    def wait():
        try:
            gate.error_of(0)
        except BaseException as error:  # noqa: BLE001 - recorded for the assertion
            failure.append(error)

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    stopping.set()
    thread.join(10)
    assert not thread.is_alive()
    assert len(failure) == 1 and isinstance(failure[0], Stopping)


def test_opening_a_chunk_twice_keeps_the_first_word(tmp_path):
    gate = ChunkGate([0], threading.Event())
    gate.open(0, {"code": "x", "message": "first"})
    gate.open(0, None)
    assert gate.error_of(0) == {"code": "x", "message": "first"}
    assert not gate.pending()


def inline_answer(key: str | None, text: str) -> dict:
    """An inline result record as batchd.remote.inline_results makes it (key None: the service dropped it)."""
    return {"key": key, "response": {"candidates": [{"content": {"parts": [{"text": text}]}}]}}


def test_inline_answers_without_their_key_take_the_keys_no_other_answer_has(tmp_path):
    spool = built_spool(tmp_path, 4)
    # Chunk 0 holds k0 and k1: the service dropped k0's key and returned k1's answer first.
    spool.write_inline_results(0, [inline_answer("k1", "re k1"), inline_answer(None, "re k0")])
    # Chunk 1: both keys dropped.
    spool.write_inline_results(1, [inline_answer(None, "re k2"), inline_answer(None, "re k3")])
    gate = ChunkGate([0, 1], threading.Event())
    gate.open(0, None)
    gate.open(1, None)

    results = list(spool.joined(gate.error_of))

    # Matching by absolute position would have given k0's answer to k1 (a key already taken). The one
    # keyless answer for the one request left is certain, not a guess; two of each are matched by position.
    assert [(r.key, r.text, r.joined_by) for r in results] == [
        ("k0", "re k0", "key"), ("k1", "re k1", "key"), ("k2", "re k2", "position"), ("k3", "re k3", "position")]


def test_result_lines_and_answers_decode_whatever_json_takes():
    """orjson encodes and decodes the hot JSON (batchd.jsonfast); what it refuses goes through json, so
    an integer beyond 64 bits or a NaN in an answer is kept, never an error."""
    record = {"key": "k", "response": {"n": 2 ** 70, "text": "ünïcödé \u2028 \"q\"\n"}}
    line = jsonfast.dumps(record)
    assert "\n" not in line and "ünïcödé" in line  # one line, non-ASCII as is
    assert jsonfast.loads(line) == record
    assert jsonfast.loads('{"x": NaN, "y": 1}')["y"] == 1
    assert jsonfast.loads(b'{"a": [1, 2.5, null, true]}') == {"a": [1, 2.5, None, True]}
    with pytest.raises(ValueError):
        jsonfast.loads('{"torn": ')


INLINE = ChunkLimits(max_requests=100, max_bytes=1 << 20, inline_max_requests=100, inline_max_bytes=1 << 20)


def requests_of(count: int, size: int = 10) -> list[TaskRequest]:
    # (U+2028 and U+0085 end a line for str.splitlines, never in JSON lines)
    return [TaskRequest(key=f"k{n}", prompt="é\u2028\x85" * (size // 3), input={"n": n, "text": "a\u2029b"},
                        config={"response_mime_type": "application/json"} if n % 2 else {}) for n in range(count)]


def test_a_small_job_is_built_in_memory_as_its_files_would_hold_it(tmp_path, monkeypatch):
    """A small job's one inline chunk carries its requests and index lines (for the journal: SmallBuild) and
    leaves no file; its readers give exactly what the files of the same build give."""
    encode = RequestEncoder("m").encode
    small_spool, file_spool = JobSpool(tmp_path / "small"), JobSpool(tmp_path / "files")
    small_spool.root.mkdir()
    file_spool.root.mkdir()

    [chunk] = small_spool.build(iter(requests_of(3)), encode, INLINE)
    monkeypatch.setattr(spool_module, "SMALL_BUILD_BYTES", 0)
    [filed] = file_spool.build(iter(requests_of(3)), encode, INLINE)

    assert chunk.small is not None and filed.small is None
    assert list(small_spool.root.iterdir()) == [], "a small build wrote a file"
    assert (chunk.idx, chunk.mode, chunk.last, chunk.request_count) == (0, "inline", True, 3)
    assert (filed.idx, filed.mode, filed.last, filed.request_count, filed.byte_size) == \
        (chunk.idx, chunk.mode, chunk.last, chunk.request_count, chunk.byte_size)
    assert chunk.small.requests == file_spool.requests_path(0).read_text(encoding="utf-8")
    assert chunk.small.index == file_spool.index_path.read_text(encoding="utf-8")
    assert list(small_spool.read_index(chunk.small)) == list(file_spool.read_index())
    assert list(small_spool.request_lines(0, chunk.small)) == list(file_spool.request_lines(0))
    prompts = [line["request"]["contents"][0]["parts"][0]["text"] for line in small_spool.read_requests(0, chunk.small)]
    assert prompts == [request.prompt for request in requests_of(3)]


def test_a_members_share_of_its_packs_results_reads_as_its_file_would(tmp_path):
    """A share kept in the journal is read line by line as a results file is: split at newlines only."""
    spool = JobSpool(tmp_path / "job")
    records = [{"key": "k0", "response": {"text": "one\u2028two\x85three"}}, {"key": "k1", "error": {"code": 3}}]
    share = spool_module.results_lines(records)

    assert list(spool.read_results(0, share)) == records


@pytest.mark.parametrize("why, requests, limits", [
    ("more than SMALL_BUILD_BYTES", requests_of(3, size=spool_module.SMALL_BUILD_BYTES // 4), INLINE),
    ("more than one chunk", requests_of(3), ChunkLimits(2, 1 << 20, 100, 1 << 20)),
    ("too many to go inline", requests_of(3), ChunkLimits(100, 1 << 20, 2, 1 << 20)),
    ("a request it cannot send", [*requests_of(2), TaskRequest(key="bad", prompt="x", input={},
                                                               error={"code": "too_large", "message": "no"})], INLINE),
])
def test_a_job_that_turns_out_larger_is_built_into_files_whole(tmp_path, why, requests, limits):
    """Read until it outgrows a small build, a job is written into its spool's files from its first request on:
    the requests read so far are not lost."""
    spool = JobSpool(tmp_path / "job")
    spool.root.mkdir()

    chunks = list(spool.build(iter(requests), RequestEncoder("m").encode, limits))

    assert all(chunk.small is None for chunk in chunks), why
    assert [entry[0] for entry in spool.read_index()] == [request.key for request in requests]
    sent = [json.loads(line)["key"] for chunk in chunks for line in spool.request_lines(chunk.idx)]
    assert sent == [request.key for request in requests if request.error is None]
