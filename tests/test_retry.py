"""``batchd retry``: a finished job's failed or expired requests sent again as a new job, by key.

The first run gets failures and expiries from the embedded emulator's faults (``fail-requests``,
``job-expired@GLOB``); the retry runs with none. The daemon runs as a real process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from batchd.manifest import ManifestError, ManifestLimits, load_manifest
from batchd.testing import Workspace

SENTIMENT = 'task = "sentiment"\ntexts = [' + ", ".join(f'"text number {n}"' for n in range(8)) + "]\n"
TRANSLATE = """\
task = "translate"
texts = ["Hello, how are you?", "The meeting is at 3 pm.", "See you tomorrow."]
languages = ["Spanish", "French"]
"""


def results(ws: Workspace, name: str) -> list[dict]:
    return ws.outbox_folder(name).results


def error_keys(ws: Workspace, name: str, *, expired: bool) -> set[str]:
    """Keys of the job's errors: those with code "expired", or the others."""
    return {line["key"] for line in results(ws, name)
            if line["status"] == "error" and (line["error"]["code"] == "expired") == expired}


def job_id(ws: Workspace, name: str) -> str:
    return ws.delivered()[name]["job"]


def run_once(ws: Workspace) -> None:
    result = ws.batchd("run", "--once")
    assert result.returncode in (0, 1, 4), result.stderr  # 1: a job failed or was rejected; 4: one is partial


def retry(ws: Workspace, *args: str, code: int = 0):
    result = ws.batchd("retry", *args)
    assert result.returncode == code, (result.stdout, result.stderr)
    return result


def test_a_retry_sends_exactly_the_failed_requests_and_names_the_job_it_retries(workspace: Workspace):
    workspace.configure(faults=["fail-requests=0.5"])
    workspace.drop("sentiment.toml", SENTIMENT)
    run_once(workspace)
    assert workspace.delivered()["sentiment"]["state"] == "partial"
    failed = error_keys(workspace, "sentiment", expired=False)
    parent = job_id(workspace, "sentiment")

    result = retry(workspace, "sentiment")

    assert f"retrying {len(failed)} request(s) of job {parent}" in result.stdout
    assert sorted(p.name for p in workspace.inbox.iterdir()) == ["sentiment.retry-1.keys.jsonl",
                                                                 "sentiment.retry-1.toml"]
    run_once(workspace)  # the same faults: some of the retried requests fail again
    summary = workspace.delivered()["sentiment.retry-1"]
    assert summary["retry_of"] == {"job": parent, "name": "sentiment", "requests": len(failed)}
    assert summary["counts"]["total"] == len(failed)
    assert [line["key"] for line in results(workspace, "sentiment.retry-1")] == sorted(failed, key=int)
    [view] = json.loads(workspace.batchd("status", "--json", "sentiment.retry-1").stdout)
    assert view["retry_of"] == {"job": parent, "name": "sentiment"}
    failed_again = error_keys(workspace, "sentiment.retry-1", expired=False)
    assert failed_again and failed_again < failed

    # A retry of the retry: the next retry of the same manifest, retrying the retry's job.
    workspace.configure()
    retry(workspace, "sentiment.retry-1")
    run_once(workspace)
    summary = workspace.delivered()["sentiment.retry-2"]
    assert summary["state"] == "succeeded"
    assert summary["retry_of"] == {"job": job_id(workspace, "sentiment.retry-1"), "name": "sentiment.retry-1",
                                   "requests": len(failed_again)}
    assert {line["key"] for line in results(workspace, "sentiment.retry-2")} == failed_again
    assert set(workspace.outbox_folder("sentiment.retry-2").organized) == failed_again
    assert "nothing to retry" in retry(workspace, "sentiment.retry-2").stdout
    # Each keys file went with its retry into its outbox folder: nothing is left in the inbox.
    assert (workspace.outbox / "sentiment.retry-2" / "sentiment.retry-2.keys.jsonl").exists()
    assert not list(workspace.inbox.iterdir())

    if shutil.which("jq"):  # the merged view the README shows
        merged = workspace.outbox / "sentiment" / "results.jsonl"
        for name in ("sentiment.retry-1", "sentiment.retry-2"):
            merged = merge_with_jq(workspace, merged, workspace.outbox / name / "results.jsonl")
        lines = [json.loads(line) for line in merged.read_text().splitlines()]
        assert [line["key"] for line in lines] == [line["key"] for line in results(workspace, "sentiment")]
        assert all(line["status"] == "ok" for line in lines)


def merge_with_jq(ws: Workspace, results_path: Path, retry_path: Path) -> Path:
    merged = ws.root / f"merged-{retry_path.parent.name}.jsonl"
    with merged.open("w") as out:
        subprocess.run(["jq", "-cn", "--slurpfile", "retry", str(retry_path),
                        "INDEX($retry[]; .key) as $by | inputs | $by[.key] // .", str(results_path)],
                       stdout=out, check=True)
    return merged


@pytest.mark.slow  # minutes of the default run are counted: two daemon runs and two retries
def test_expired_and_failed_requests_are_retried_apart(workspace: Workspace):
    # Three chunks of two requests: the first expires (no resubmission), the others lose some requests.
    workspace.configure(faults=["job-expired@*-c0", "fail-requests=0.5"], chunk_max_requests=2, resubmit_expired=0)
    workspace.drop("translate.toml", TRANSLATE)
    run_once(workspace)
    expired, failed = (error_keys(workspace, "translate", expired=flag) for flag in (True, False))
    assert len(expired) == 2 and failed, results(workspace, "translate")

    workspace.configure()
    assert "2 expired" in retry(workspace, "translate", "--expired").stdout
    assert f"{len(failed)} failed, 0 expired" in retry(workspace, "translate", "--failed").stdout
    run_once(workspace)

    delivered = workspace.delivered()
    assert {line["key"] for line in results(workspace, "translate.retry-1")} == expired
    assert {line["key"] for line in results(workspace, "translate.retry-2")} == failed
    assert delivered["translate.retry-1"]["retry_of"]["requests"] == 2
    assert delivered["translate.retry-2"]["retry_of"]["requests"] == len(failed)
    assert all(line["status"] == "ok" for name in ("translate.retry-1", "translate.retry-2")
               for line in results(workspace, name))


def test_a_job_with_nothing_to_retry_drops_nothing_and_exits_0(workspace: Workspace):
    workspace.drop("sentiment.toml", SENTIMENT)
    run_once(workspace)

    result = retry(workspace, "sentiment")

    assert "nothing to retry" in result.stdout
    assert list(workspace.inbox.iterdir()) == []


@pytest.mark.slow  # 6-8 s of CLI processes; the default run keeps under six minutes
def test_an_unknown_or_unfinished_job_is_a_clear_error(workspace: Workspace):
    assert "no job named 'nobody'" in retry(workspace, "nobody", code=1).stderr  # no journal yet
    workspace.drop("sentiment.toml", SENTIMENT)
    run_once(workspace)
    assert "no job named 'nobody'" in retry(workspace, "nobody", code=1).stderr
    workspace.drop("broken.toml", 'task = "sentiment"\n')
    run_once(workspace)
    assert "was rejected" in retry(workspace, "broken", code=1).stderr


@pytest.mark.slow  # minutes of the default run are counted: two daemon runs and two retries
def test_a_retry_of_a_job_with_an_input_file_reads_the_same_file(workspace: Workspace):
    workspace.configure(faults=["fail-requests=0.5"])
    rows = "".join(f"r{n},review number {n}\n" for n in range(8))
    workspace.drop("reviews.csv", "id,text\n" + rows)
    workspace.drop("reviews.toml", 'task = "sentiment"\ninput = "reviews.csv"\n')
    run_once(workspace)
    failed = error_keys(workspace, "reviews", expired=False)
    assert failed

    # The input went with its job into its outbox folder; the retry puts it back into the inbox.
    kept = workspace.outbox / "reviews" / "reviews.csv"
    assert kept.read_text() == "id,text\n" + rows and not (workspace.inbox / "reviews.csv").exists()
    workspace.configure()
    kept.rename(workspace.root / "reviews.csv")
    gone = retry(workspace, "reviews", code=1).stderr
    assert "reviews.csv" in gone and "needs the same input file" in gone and "outbox folder" in gone
    (workspace.root / "reviews.csv").rename(kept)
    workspace.drop("reviews.csv", "id,text\nr0,another review\n")
    assert "already has a different" in retry(workspace, "reviews", code=1).stderr
    (workspace.inbox / "reviews.csv").unlink()
    assert not list(workspace.inbox.glob("reviews.retry-*"))

    retry(workspace, "reviews")
    assert (workspace.inbox / "reviews.csv").read_text() == "id,text\n" + rows
    run_once(workspace)

    assert {line["key"] for line in results(workspace, "reviews.retry-1")} == failed
    assert workspace.delivered()["reviews.retry-1"]["state"] == "succeeded"
    assert (workspace.outbox / "reviews.retry-1" / "reviews.csv").read_text() == "id,text\n" + rows
    assert not list(workspace.inbox.iterdir()), "the input and the keys file went with the retry"


BAD_KEYS = {
    "unknown": ('"1"\n"no-such-key"\n', "the task makes no request of 1 listed key(s)"),
    "not-json": ("1\n", "each line of a keys file must be one JSON string"),
    "empty": ("\n", "lists no key"),
    "huge": ('"1"\n' * 400, "larger than 1,024 bytes"),
}


def test_a_bad_keys_file_rejects_the_retry_with_a_clear_error(workspace: Workspace):
    workspace.configure(limits={"retry_keys_bytes": 1024})
    expected = {}
    for name, (keys, message) in BAD_KEYS.items():
        workspace.drop(f"{name}.keys.jsonl", keys)
        expected[name] = message
    (workspace.root / "outside.keys.jsonl").write_text('"1"\n')
    os.symlink(workspace.root / "outside.keys.jsonl", workspace.inbox / "linked.keys.jsonl")
    expected |= {"missing": "keys file not found", "outside": "is outside the inbox",
                 "symlinked": "is outside the inbox", "wrong-type": "unsupported keys type '.txt'"}
    keys_names = {"missing": "missing.keys.jsonl", "outside": "../outside.keys.jsonl",
                  "symlinked": "linked.keys.jsonl", "wrong-type": "keys.txt"}
    (workspace.inbox / "keys.txt").write_text('"1"\n')
    for name in expected:
        keys = keys_names.get(name, f"{name}.keys.jsonl")
        workspace.drop(f"{name}.toml", SENTIMENT + f'retry_of = {{job = "x", keys = "{keys}"}}\n')

    run_once(workspace)

    delivered = workspace.delivered()
    for name, message in expected.items():
        assert delivered[name]["state"] == "rejected", (name, delivered[name])
        assert message in delivered[name]["error"]["message"], (name, delivered[name]["error"])
        assert len(delivered[name]["error"]["message"]) < 2000


# -- the filter itself, without a daemon ------------------------------------------------------------


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def test_requests_are_filtered_by_the_keys_file_for_every_built_in_task(tmp_path: Path):
    write(tmp_path, "keys.jsonl", '"2:French"\n"3:Spanish"\n\n')
    manifest = load_manifest(write(tmp_path, "t.toml", TRANSLATE + 'retry_of = {job = "j", keys = "keys.jsonl"}\n'))
    assert [request.key for request in manifest.requests()] == ["2:French", "3:Spanish"]
    assert manifest.input_files() == [tmp_path / "keys.jsonl"]
    # A key with a line break, written as a JSON string, is one key.
    write(tmp_path, "keys.jsonl", json.dumps("a\nb") + "\n")
    write(tmp_path, "items.jsonl", "".join(json.dumps(item) + "\n" for item in ({"id": "a\nb", "text": "x"},
                                                                               {"id": "c", "text": "y"})))
    manifest = load_manifest(write(tmp_path, "s.toml", 'task = "sentiment"\ninput = "items.jsonl"\n'
                                                       'retry_of = {job = "j", keys = "keys.jsonl"}\n'))
    assert [request.key for request in manifest.requests()] == ["a\nb"]


def test_keys_the_task_never_produces_are_named_in_a_bounded_error(tmp_path: Path):
    write(tmp_path, "keys.jsonl", "".join(json.dumps(f"missing-{n}") + "\n" for n in range(1000)) + '"1:French"\n')
    manifest = load_manifest(write(tmp_path, "t.toml", TRANSLATE + 'retry_of = {job = "j", keys = "keys.jsonl"}\n'))
    with pytest.raises(ManifestError) as raised:
        list(manifest.requests())
    assert "no request of 1,000 listed key(s)" in str(raised.value) and ", …" in str(raised.value)
    assert len(str(raised.value)) < 400


def test_a_keys_file_over_the_limit_is_refused_before_it_is_read(tmp_path: Path):
    write(tmp_path, "keys.jsonl", '"1:French"\n' * 200)
    with pytest.raises(ManifestError, match="larger than 1,024 bytes"):
        load_manifest(write(tmp_path, "t.toml", TRANSLATE + 'retry_of = {job = "j", keys = "keys.jsonl"}\n'),
                      limits=ManifestLimits(retry_keys_bytes=1024))
