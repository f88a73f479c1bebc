"""Tests of the keywords plugin: its requests and organized output alone, then through a real
`batchd run --once` on the Gemini Batch API emulator (fixtures from batchd.testing)."""

import json
from pathlib import Path

import pytest

from batchd.manifest import ManifestError, load_manifest
from batchd.testing import DaemonRunner, Emulator, Workspace, answered, failed, write_manifest
from batchd_keywords import Keywords

MANIFEST = Path(__file__).resolve().parents[1] / "manifests" / "articles.toml"
TASKS = {"keywords": Keywords()}  # registered by hand: these tests do not need the entry point


def test_requests_ask_for_structured_keywords(tmp_path):
    manifest = load_manifest(write_manifest(tmp_path, "job", {"task": "keywords", "texts": ["Bees and honey."],
                                                              "max_keywords": 3}), tasks=TASKS)
    [request] = manifest.requests()
    assert request.key == "1" and request.input == {"id": "1", "text": "Bees and honey."}
    assert "Bees and honey." in request.prompt and "at most 3 keywords" in request.prompt
    assert request.config["response_mime_type"] == "application/json"
    assert request.config["response_json_schema"]["properties"]["keywords"]["maxItems"] == 3
    assert request.config["temperature"] == 0.0  # the task's default_config


def test_organize_cleans_keywords_and_keeps_failures(tmp_path):
    manifest = load_manifest(MANIFEST, tasks=TASKS)
    solar, rail, bees = manifest.requests()
    organized = dict(manifest.organize([
        answered(solar, data={"keywords": [" solar panels", "Solar panels", "batteries", ""]}),
        failed(rail, "quota exhausted"),
        answered(bees, text="Sorry, I cannot help with that."),
    ]))
    assert organized == {
        "solar": ["solar panels", "batteries"],
        "rail": {"error": "quota exhausted"},
        "bees": {"error": "unexpected answer: 'Sorry, I cannot help with that.'"},
    }


def test_a_misspelt_field_is_reported(tmp_path):
    path = write_manifest(tmp_path, "job", {"task": "keywords", "texts": ["x"], "max_keyword": 3})
    with pytest.raises(ManifestError, match="max_keyword"):
        load_manifest(path, tasks=TASKS)


def test_the_plugin_is_installed(workspace: Workspace):
    result = workspace.batchd("plugins", "--json")
    assert result.returncode == 0, result.stderr
    [plugin] = [plugin for plugin in json.loads(result.stdout) if plugin["name"] == "keywords"]
    assert plugin["source"] == "entry point batchd-keywords"
    assert plugin["hooks"] == ["register_tasks"] and plugin["tasks"] == ["keywords"]


def test_the_daemon_delivers_keywords(workspace: Workspace, daemon: DaemonRunner):
    workspace.drop_manifest("articles.toml", MANIFEST.read_text())

    run = daemon.run_once()

    assert run.returncode == 0, run.stderr
    articles = run.outbox["articles"]
    assert articles.state == "succeeded"
    assert articles.organized.keys() == {"solar", "rail", "bees"}
    for keywords in articles.organized.values():
        assert 1 <= len(keywords) <= 4 and all(isinstance(keyword, str) and keyword for keyword in keywords)
    assert all(line["status"] == "ok" and line["data"]["keywords"] for line in articles.results)


def test_a_bad_manifest_is_rejected_naming_the_field(workspace: Workspace, daemon: DaemonRunner):
    workspace.drop_manifest("bad", {"task": "keywords", "texts": ["x"], "max_keywords": 0})

    run = daemon.run_once()

    assert run.returncode == 1  # a rejected job makes --once fail
    assert run.outbox["bad"].state == "rejected"
    assert "max_keywords" in json.dumps(run.outbox["bad"].summary["error"])


def test_the_emulator_accepts_the_schema_and_answers_it(emulator: Emulator, tmp_path):
    # One request sent as it is, online, through the real google-genai SDK.
    manifest = load_manifest(write_manifest(tmp_path, "job", {"task": "keywords", "texts": ["Night trains."]}),
                             tasks=TASKS)
    [request] = manifest.requests()
    response = emulator.client().models.generate_content(
        model="gemini-2.5-flash", contents=request.prompt, config=request.config
    )
    [(key, keywords)] = manifest.organize([answered(request, text=response.text, data=json.loads(response.text))])
    assert key == "1" and keywords and all(isinstance(keyword, str) for keyword in keywords)


def test_the_daemon_on_a_test_emulator(workspace: Workspace, daemon: DaemonRunner, emulator: Emulator):
    # The daemon talks to the test's emulator as it would to Google, so the test sees the remote job.
    workspace.drop_manifest("articles.toml", MANIFEST.read_text())

    run = daemon.run_once(emulator=emulator)

    assert run.returncode == 0, run.stderr
    assert run.outbox["articles"].summary["provider"] == "gemini"
    [job] = emulator.client().batches.list()
    assert job.display_name.startswith("batchd-articles-") and job.state.name == "JOB_STATE_SUCCEEDED"
