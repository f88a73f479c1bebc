"""The request cache (``cache = true``): a request answered before is answered from the store in the
state dir instead of being sent again. Jobs run in real daemon processes against the embedded
emulator, whose batches (read through google-genai) say what was sent."""

from __future__ import annotations

import json
import signal
import sqlite3

import urllib.request

import pytest

from batchd.cache import CacheStore, cache_path, canonical, request_hash
from batchd.emulator.server import EmulatorServer
from batchd.cache_split import CacheSplit
from batchd.spool import ChunkLimits, JobSpool
from batchd.task import TaskRequest
from batchd.encoding import RequestEncoder
from batchd.testing import Workspace
from test_daemon import assert_one_live_job_per_chunk
from test_recovery import damage_sqlite_pages

TRANSLATE = """\
task = "translate"
texts = ["Hello, how are you?", "The meeting is at 3 pm."]
languages = ["Spanish", "French"]
cache = true
"""


def translate(texts: list[str], *, cache: bool | None = True, note: str = "") -> str:
    """A translate manifest; ``note`` makes its bytes differ (batchd refuses a manifest it already ran)."""
    lines = ['task = "translate"', f"texts = {json.dumps(texts)}", 'languages = ["Spanish", "French"]']
    if cache is not None:
        lines.append(f"cache = {str(cache).lower()}")
    return "\n".join(lines) + f"\n# {note}\n"


def sent_requests(ws: Workspace) -> list[int]:
    """The request count of every remote batch the embedded emulator holds, oldest first, from the REST
    API's ``batchStats`` (google-genai's BatchJob leaves them out)."""
    with EmulatorServer(ws.state / "emulator") as emulator:
        request = urllib.request.Request(f"{emulator.base_url}/v1beta/batches?pageSize=100",
                                         headers={"x-goog-api-key": "check"})
        with urllib.request.urlopen(request, timeout=30) as response:
            listed = json.load(response)
        assert not listed.get("nextPageToken")
        batches = [b.get("metadata", b) for b in listed.get("operations", listed.get("batches", []))]
        return [int(b["batchStats"]["requestCount"]) for b in sorted(batches, key=lambda b: b["createTime"])]


def run_once(ws: Workspace, code: int = 0) -> None:
    result = ws.batchd("run", "--once")
    assert result.returncode == code, result.stderr


def answers(ws: Workspace, name: str) -> dict[str, tuple]:
    return {line["key"]: (line["status"], line["text"], line["data"]) for line in ws.outbox_folder(name).results}


def cache_stats(ws: Workspace) -> dict:
    result = ws.batchd("cache", "stats", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_second_identical_job_sends_nothing_and_delivers_the_same_results(workspace: Workspace):
    texts = ["Hello, how are you?", "The meeting is at 3 pm."]
    workspace.drop("first.toml", translate(texts))
    run_once(workspace)
    assert sent_requests(workspace) == [4]
    first = workspace.delivered()["first"]
    assert "cached" not in first["counts"] and "cache" not in first
    assert cache_stats(workspace)["entries"] == 4

    workspace.drop("second.toml", translate(texts, note="the same requests again"))
    run_once(workspace)

    assert sent_requests(workspace) == [4], "no batch was created for the second job"
    second = workspace.delivered()["second"]
    assert second["state"] == "succeeded"
    assert second["counts"] == {"total": 4, "succeeded": 4, "failed": 0, "cached": 4}
    assert second["remote_batches"] == []
    assert answers(workspace, "second") == answers(workspace, "first")
    assert all(line["cached"] is True for line in workspace.outbox_folder("second").results)
    assert not any("cached" in line for line in workspace.outbox_folder("first").results)
    assert workspace.outbox_folder("second").organized == workspace.outbox_folder("first").organized
    # Nothing was paid; what was saved is what the same answers cost the first time, at the batch price.
    cache = second["cache"]
    assert cache["hits"] == 4
    assert cache["saved"] == pytest.approx(first["cost"]["actual"])
    assert cache["tokens"]["prompt"] == first["tokens"]["prompt"]
    assert second["cost"]["estimate"] == 0  # cached requests are not priced before submission
    assert second["cost"]["actual"] == 0
    assert second["tokens"]["total"] == 0


@pytest.mark.slow  # 6-8 s of CLI processes; the default run keeps under six minutes
def test_partial_overlap_sends_only_the_new_requests_and_cache_false_sends_again(workspace: Workspace):
    workspace.drop("first.toml", translate(["one", "two"]))
    run_once(workspace)
    workspace.drop("second.toml", translate(["one", "two", "three"]))
    run_once(workspace)

    assert sent_requests(workspace) == [4, 2], "only the two requests of the new text were sent"
    second = workspace.delivered()["second"]
    assert second["counts"]["cached"] == 4 and second["counts"]["total"] == 6
    cached = {line["key"] for line in workspace.outbox_folder("second").results if line.get("cached")}
    assert cached == set(answers(workspace, "first"))
    assert second["cost"]["estimate_details"]["requests"] == 2  # priced alongside the build: the misses only
    assert second["cost"]["actual_details"]["requests"] == 2

    workspace.drop("third.toml", translate(["one", "two", "three"], cache=False))
    run_once(workspace)
    assert sent_requests(workspace) == [4, 2, 6], "cache = false sends every request"
    assert "cached" not in workspace.delivered()["third"]["counts"]


@pytest.mark.slow  # the default run has the manifest's cache = true and false
def test_the_global_setting_turns_the_cache_on_and_a_manifest_turns_it_off(workspace: Workspace):
    workspace.configure(cache=True)
    workspace.drop("first.toml", translate(["one"], cache=None))
    run_once(workspace)
    workspace.drop("second.toml", translate(["one"], cache=None, note="again"))
    workspace.drop("third.toml", translate(["one"], cache=False, note="not from the cache"))
    run_once(workspace)
    delivered = workspace.delivered()
    assert delivered["second"]["counts"].get("cached") == 2
    assert "cached" not in delivered["third"]["counts"]
    assert sorted(sent_requests(workspace)) == [2, 2]


@pytest.mark.slow  # the estimate alongside the build is checked in the default run
def test_an_estimate_before_the_build_leaves_out_what_the_cache_answers(workspace: Workspace):
    workspace.drop("first.toml", translate(["one", "two"]))
    run_once(workspace)
    workspace.configure(cost={"job_budget": 100.0})  # a budget could hold a job: it is priced before it is built
    partial = workspace.root / "partial.toml"
    partial.write_text(translate(["one", "two", "three"]))
    estimate = workspace.batchd("estimate", "--local", "--json", str(partial))
    assert estimate.returncode == 0, estimate.stderr
    assert json.loads(estimate.stdout)["requests"] == 2
    workspace.drop("second.toml", partial.read_text())
    run_once(workspace)
    second = workspace.delivered()["second"]
    assert second["cost"]["estimate_details"]["requests"] == 2
    assert second["counts"]["cached"] == 4 and sent_requests(workspace) == [4, 2]


@pytest.mark.slow  # test_eviction_by_size_removes_the_oldest_answers_first is the quick one
def test_the_store_is_bounded_and_the_oldest_answers_are_evicted(workspace: Workspace):
    workspace.configure(cache_max_entries=3)
    workspace.drop("first.toml", translate(["one", "two"]))
    run_once(workspace)
    stats = cache_stats(workspace)
    assert stats["entries"] == 3 and stats["max_entries"] == 3

    workspace.drop("second.toml", translate(["one", "two"], note="again"))
    run_once(workspace)
    assert sent_requests(workspace) == [4, 1], "the evicted answer is asked again, the three kept are not"
    assert workspace.delivered()["second"]["counts"]["cached"] == 3
    assert cache_stats(workspace)["entries"] == 3


@pytest.mark.slow  # 6-8 s of CLI processes; the default run keeps under six minutes
def test_cache_prune_removes_old_or_all_answers_and_stats_says_what_is_left(workspace: Workspace):
    workspace.drop("first.toml", translate(["one", "two"]))
    run_once(workspace)
    stats = cache_stats(workspace)
    assert stats["entries"] == 4 and stats["bytes"] > 0 and stats["by_model"] == {"gemini-2.5-flash": 4}
    assert "answers   4 of at most 100,000" in workspace.batchd("cache", "stats").stdout

    kept = workspace.batchd("cache", "prune", "--older-than", "1")
    assert kept.returncode == 0 and "removed 0 answer(s); 4 left" in kept.stdout
    with sqlite3.connect(cache_path(workspace.state)) as db:  # two answers made three days old
        db.execute("UPDATE answers SET stored_at = stored_at - 3 * 86400 WHERE hash IN "
                   "(SELECT hash FROM answers ORDER BY hash LIMIT 2)")
    old = workspace.batchd("cache", "prune", "--older-than", "2")
    assert old.returncode == 0 and "removed 2 answer(s); 2 left" in old.stdout
    workspace.configure(cache_max_entries=1)
    bounded = workspace.batchd("cache", "prune")
    assert "removed 1 answer(s); 1 left" in bounded.stdout
    everything = workspace.batchd("cache", "prune", "--all")
    assert everything.returncode == 0 and "removed 1 answer(s); 0 left" in everything.stdout
    assert workspace.batchd("cache", "prune", "--all", "--older-than", "1").returncode == 2

    workspace.drop("second.toml", translate(["one", "two"], note="again"))
    run_once(workspace)
    assert sent_requests(workspace) == [4, 4], "a pruned cache answers nothing"


# -- crashes ------------------------------------------------------------------------------------------


def test_kill_9_between_storing_the_answers_and_publishing_delivers_once_and_bills_once(workspace: Workspace):
    workspace.drop("first.toml", translate(["one", "two"]))
    crashed = workspace.start("run", BATCHD_CRASH_AT="after-cache-store")
    assert crashed.wait(120) == -signal.SIGKILL, "the daemon did not reach after-cache-store"
    assert cache_stats(workspace)["entries"] == 4, "the answers were stored before the crash"
    assert not workspace.delivered()

    run_once(workspace)

    assert workspace.delivered()["first"]["counts"] == {"total": 4, "succeeded": 4, "failed": 0}
    assert sent_requests(workspace) == [4]
    assert cache_stats(workspace)["entries"] == 4
    assert_one_live_job_per_chunk(workspace)


@pytest.mark.slow  # three runs of the daemon
def test_kill_9_mid_build_keeps_what_the_job_took_from_the_cache_even_when_it_is_pruned(workspace: Workspace):
    workspace.drop("first.toml", translate(["one", "two"]))
    run_once(workspace)
    # One request a chunk: the new text's two requests make two chunks, the first recorded (perhaps sent)
    # when the daemon dies; the four others were answered from the cache. A budget has the job priced
    # before it is built, so its chunks are recorded (and sent) as they are built, not held to the end.
    workspace.configure(chunk_max_requests=1, cost={"job_budget": 100.0})
    workspace.drop("second.toml", translate(["three", "one", "two"]))
    crashed = workspace.start("run", BATCHD_CRASH_AT="while-building")
    assert crashed.wait(120) == -signal.SIGKILL, "the daemon did not reach while-building"
    # The store loses every answer before the restart: the job's build pass made its choice already.
    assert workspace.batchd("cache", "prune", "--all").returncode == 0

    run_once(workspace)

    second = workspace.delivered()["second"]
    assert second["state"] == "succeeded"
    assert second["counts"] == {"total": 6, "succeeded": 6, "failed": 0, "cached": 4}
    assert sorted(sent_requests(workspace)) == [1, 1, 4], "the rebuild sent nothing more"
    assert_one_live_job_per_chunk(workspace)
    # Keys are positions: the same answers come back under the keys of this job.
    cached = [line["text"] for line in workspace.outbox_folder("second").results if line.get("cached")]
    assert sorted(cached) == sorted(text for _, text, _ in answers(workspace, "first").values())


# -- the canonical form and the split, without a daemon -------------------------------------------------


def test_the_canonical_form_sorts_keys_drops_the_models_prefix_and_keeps_unicode():
    a = canonical("generate", "models/gemini-2.5-flash", {"contents": [{"parts": [{"text": "é"}]}],
                                                           "generationConfig": {"temperature": 0, "topK": 3}})
    b = canonical("generate", "gemini-2.5-flash", {"generationConfig": {"topK": 3, "temperature": 0},
                                                    "contents": [{"parts": [{"text": "é"}]}]})
    assert a == b == ('{"kind":"generate","model":"gemini-2.5-flash","request":{"contents":[{"parts":[{"text":"é"}]}],'
                      '"generationConfig":{"temperature":0,"topK":3}}}')
    assert request_hash("generate", "gemini-2.5-flash", {"x": 1}) != request_hash("generate", "gemini-2.5-pro", {"x": 1})
    assert request_hash("generate", "m", {"x": 1}) != request_hash("embed", "m", {"x": 1})


def _requests(texts, config=None):
    return [TaskRequest(f"k{n}", text, {"id": str(n)}, config or {}) for n, text in enumerate(texts)]


def _store_answers(path, encoder, requests):
    with CacheStore(path) as store:
        for request in requests:
            digest = request_hash("generate", "gemini-2.5-flash", json.loads(encoder.encode(request))["request"])
            store.put(digest, "generate", "gemini-2.5-flash", {"candidates": [{"content": {"parts": [
                {"text": f"cached {request.prompt}"}]}}]})


def test_a_rebuild_takes_the_decisions_made_before_the_crash_from_the_spool_not_the_store(tmp_path):
    store = tmp_path / "cache.sqlite3"
    encoder = RequestEncoder("gemini-2.5-flash")
    requests = _requests(["a", "b", "new 1", "c", "new 2", "new 3", "d"])
    _store_answers(store, encoder, [r for r in requests if not r.prompt.startswith("new")])
    spool = JobSpool(tmp_path / "job")
    spool.root.mkdir()
    limits = ChunkLimits(max_requests=1, max_bytes=1 << 20, inline_max_requests=10, inline_max_bytes=1 << 20)

    split = CacheSplit(spool, store, "generate", "gemini-2.5-flash", encoder.encode)
    chunks = spool.build(split.tag(iter(requests)), encoder.encode, limits, cache=split)
    first = next(chunks)  # chunk 0 ("new 1") is recorded; the daemon dies here (the generator is dropped)
    assert (first.idx, first.request_count, split.hits) == (0, 1, 3)  # "c" was looked up before "new 2" ended it
    del chunks
    with open(spool.cached_path, "a") as torn:  # what a kill can leave after the last mark: never used
        torn.write(json.dumps({"n": 4, "key": "k4", "response": {}}) + "\n" + '{"n": 5, "ke')

    # Meanwhile the store lost "c" and "d" and learned "new 3".
    with CacheStore(store) as s:
        s.prune(everything=True)
    _store_answers(store, encoder, [requests[5]])

    again = CacheSplit(spool, store, "generate", "gemini-2.5-flash", encoder.encode)
    rebuilt = list(spool.build(again.tag(iter(requests)), encoder.encode, limits, cache=again))
    # a, b and c were decided before chunk 0 went out ("c" came before the mark of chunk 1): still hits.
    # "new 2" is sent, "new 3" is answered from the store now, "d" is gone from it: sent.
    assert [c.request_count for c in rebuilt] == [1, 1, 1]
    assert again.hits == 4
    assert [json.loads(line)["key"] for c in rebuilt for line in spool.requests_path(c.idx).read_text().splitlines()] \
        == ["k2", "k4", "k6"]
    entries = list(spool.read_index())
    assert [e[1] for e in entries] == [-1, -1, 0, -1, 1, -1, 2]
    cached = list(spool.read_cached())
    assert [r["key"] for r in cached] == ["k0", "k1", "k3", "k5"]
    assert cached[2]["response"]["candidates"][0]["content"]["parts"][0]["text"] == "cached c"


def test_eviction_by_size_removes_the_oldest_answers_first(tmp_path):
    with CacheStore(tmp_path / "cache.sqlite3") as store:
        for n in range(10):
            store.put(f"h{n}", "generate", "models/m", {"text": "x" * 100})
        store.commit()
        stats = store.stats()
        assert stats["entries"] == 10 and stats["by_model"] == {"m": 10}
        one = stats["bytes"] // 10
        assert store.evict(100, 5 * one) == 5
        assert store.stats()["bytes"] == 5 * one
        assert store.get("h4") is None and store.get("h5") == {"text": "x" * 100}
        store.put("h5", "generate", "m", {"text": "another answer"})  # a hash keeps its first answer
        store.commit()
        assert store.get("h5") == {"text": "x" * 100} and store.stats()["entries"] == 5
        assert store.evict(2, 10**9) == 3 and store.stats()["entries"] == 2


@pytest.mark.slow
def test_embeddings_from_file_batches_are_cached_and_written_to_the_same_array(workspace: Workspace):
    import numpy as np

    workspace.configure(inline_max_requests=0)  # file batches carry keys; inline embeddings are joined by position
    embed = 'task = "embed"\noutput_dimensionality = 8\ntexts = ["alpha", "beta"]\ncache = true\n'
    workspace.drop("first.toml", embed)
    run_once(workspace)
    workspace.drop("second.toml", embed + "# again\n")
    run_once(workspace)
    assert sent_requests(workspace) == [2]
    second = workspace.delivered()["second"]
    assert second["counts"]["cached"] == 2 and second["remote_batches"] == []
    arrays = [np.load(workspace.outbox / name / "embeddings.npy") for name in ("first", "second")]
    assert arrays[0].shape == (2, 8) and (arrays[0] == arrays[1]).all()


def test_a_damaged_store_is_said_once_costs_no_job_and_a_replaced_one_is_used_at_once(workspace: Workspace):
    """The store's file damaged on disk (its pages overwritten) under a running daemon: the jobs are delivered,
    sending every request; the damage is one ERROR with what to do, not two warnings a job; `batchd cache
    stats` says it in one line and `batchd doctor` warns. Moved aside as the message says, the next job
    starts a new store in the same process, which keeps its answers again."""
    workspace.configure(settle_seconds=0)
    workspace.drop("first.toml", translate(["one", "two"]))
    run_once(workspace)
    store = cache_path(workspace.state)
    damage_sqlite_pages(store, "answers", "totals")

    process = workspace.start("run")
    try:
        for n in range(4):
            workspace.drop(f"again{n}.toml", translate(["one", "two", f"three {n}"], note=str(n)))
        workspace.wait_for(lambda: len(workspace.outbox_folders()) == 5, what="the four jobs delivered")
        said = process.output()
        assert said.count("is damaged") == 1 and "level=error" in said.split("is damaged")[0].splitlines()[-1]
        assert "storing answers failed" not in said and "cannot be read" not in said
        assert all(workspace.delivered()[f"again{n}"]["counts"].get("cached") is None for n in range(4))
        stats = workspace.batchd("cache", "stats")
        assert stats.returncode == 1 and stats.stderr.startswith(f"Error: request cache {store} is damaged")
        doctor = json.loads(workspace.batchd("doctor", "--json").stdout)
        [check] = [check for check in doctor["checks"] if check["name"] == "request cache"]
        assert check["status"] == "warn" and "move cache.sqlite3 aside" in check["fix"]

        for suffix in ("", "-wal", "-shm"):
            aside = store.with_name(store.name + suffix)
            if aside.exists():
                aside.rename(aside.with_name(f"damaged-{aside.name}"))
        workspace.drop("after.toml", translate(["four", "five"], note="after"))
        workspace.wait_for(lambda: "after" in workspace.outbox_folders(), what="the job after the move")
    finally:
        assert process.stop() == 0
    assert cache_stats(workspace)["entries"] == 4  # the new store keeps the last job's answers
