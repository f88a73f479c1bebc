"""The command line: submit, status, list, cancel, schema and errors, each as a real process."""

from __future__ import annotations

import json
import subprocess

import pytest

from batchd.testing import Workspace
from test_daemon import TRANSLATE


def test_submit_validates_and_drops_atomically(workspace: Workspace, tmp_path_factory):
    source = tmp_path_factory.mktemp("elsewhere") / "job.toml"
    source.write_text(TRANSLATE)
    result = workspace.batchd("submit", str(source))
    assert result.returncode == 0, result.stderr
    assert (workspace.inbox / "job.toml").read_text() == TRANSLATE
    # The same name again does not overwrite the first drop.
    assert workspace.batchd("submit", str(source)).returncode == 0
    assert sorted(p.name for p in workspace.inbox.iterdir()) == ["job-2.toml", "job.toml"]


REVIEWS = "id,text\na1,Great value\na2,Terrible support\n"


def test_submit_copies_the_named_input_file_so_the_daemon_runs_the_job(workspace: Workspace, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    (elsewhere / "data").mkdir()
    (elsewhere / "data" / "reviews.csv").write_text(REVIEWS)
    (elsewhere / "reviews.toml").write_text('task = "sentiment"\ninput = "data/reviews.csv"\n')
    result = workspace.batchd("submit", str(elsewhere / "reviews.toml"))
    assert result.returncode == 0, result.stderr
    assert (workspace.inbox / "data" / "reviews.csv").read_text() == REVIEWS
    # The same input again is reused, not refused.
    assert workspace.batchd("submit", str(elsewhere / "reviews.toml")).returncode == 0
    run = workspace.batchd("run", "--once")
    assert run.returncode == 1, run.stderr  # the repeat is rejected
    delivered = workspace.delivered()
    assert {name: summary["state"] for name, summary in delivered.items()} == {
        "reviews": "succeeded", "reviews-2": "rejected"}, "the second is the same content, refused as a repeat"


def test_submit_never_overwrites_a_different_input_in_the_inbox(workspace: Workspace, tmp_path_factory):
    (workspace.inbox / "reviews.csv").write_text("id,text\nz9,Another job's row\n")
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    (elsewhere / "reviews.csv").write_text(REVIEWS)
    (elsewhere / "reviews.toml").write_text('task = "sentiment"\ninput = "reviews.csv"\n')
    result = workspace.batchd("submit", str(elsewhere / "reviews.toml"))
    assert result.returncode == 1
    assert "reviews.csv" in result.stderr and "different" in result.stderr
    assert (workspace.inbox / "reviews.csv").read_text() == "id,text\nz9,Another job's row\n"
    assert sorted(p.name for p in workspace.inbox.iterdir()) == ["reviews.csv"], "no manifest dropped"


def test_submit_refuses_an_invalid_manifest(workspace: Workspace, tmp_path_factory):
    source = tmp_path_factory.mktemp("elsewhere") / "bad.toml"
    source.write_text('task = "translate"\ntexts = ["a"]\n')
    result = workspace.batchd("submit", str(source))
    assert result.returncode != 0
    assert "languages" in result.stderr
    assert not list(workspace.inbox.iterdir())


def test_submit_refuses_a_fifo_or_a_device_at_once_instead_of_waiting_on_it(workspace: Workspace, tmp_path):
    """`batchd submit x.toml` where x.toml is a FIFO blocked forever in open(); a device was read as a file."""
    import os

    fifo = tmp_path / "pipe.toml"
    os.mkfifo(fifo)
    device = tmp_path / "device.toml"
    device.symlink_to("/dev/zero")
    for path in (fifo, device):
        result = workspace.batchd("submit", str(path), timeout=30)
        assert result.returncode == 1 and "not a regular file" in result.stderr, result.stderr
    assert not list(workspace.inbox.iterdir())


def test_submit_refuses_a_model_the_provider_does_not_serve(workspace: Workspace, tmp_path_factory):
    source = tmp_path_factory.mktemp("elsewhere") / "typo.toml"
    source.write_text(TRANSLATE + 'model = "gemini-2.5-flsh"\n')
    result = workspace.batchd("submit", str(source))
    assert result.returncode == 1
    assert "'gemini-2.5-flsh' is not a model the emulator serves" in result.stderr, result.stderr
    assert "did you mean 'gemini-2.5-flash'" in result.stderr and "cost.prices" not in result.stderr
    assert not list(workspace.inbox.iterdir())
    # Unchecked when asked (the daemon checks it again before anything is sent).
    assert workspace.batchd("submit", "--no-model-check", str(source)).returncode == 0


def test_status_and_list_after_a_run(workspace: Workspace):
    workspace.drop("translate.toml", TRANSLATE)
    assert workspace.batchd("run", "--once").returncode == 0

    jobs = workspace.status()
    assert [(j["name"], j["state"], j["outcome"], j["requests"], j["done"]) for j in jobs] == [
        ("translate", "done", "succeeded", 4, 4)]
    one = json.loads(workspace.batchd("status", "translate", "--json").stdout)
    assert one[0]["remote_batches"][0]["name"].startswith("batches/")
    table = workspace.batchd("list")
    assert table.returncode == 0 and "translate.toml" in table.stdout and "succeeded" in table.stdout
    missing = workspace.batchd("status", "nope")
    assert missing.returncode != 0 and "no job named 'nope'" in missing.stderr


def test_status_leaves_out_jobs_finished_over_a_day_ago_and_list_keeps_them(workspace: Workspace):
    import sqlite3
    import time

    workspace.drop("old.toml", TRANSLATE)
    workspace.drop("new.toml", TRANSLATE.replace("Hello", "Hi"))
    assert workspace.batchd("run", "--once").returncode == 0
    with sqlite3.connect(workspace.state / "journal.db") as db:
        db.execute("UPDATE jobs SET finished_at = ? WHERE name = 'old'", (time.time() - 25 * 3600,))
    assert [job["name"] for job in workspace.status()] == ["new"]
    listed = json.loads(workspace.batchd("list", "--json").stdout)
    assert sorted(job["name"] for job in listed) == ["new", "old"]
    named = json.loads(workspace.batchd("status", "old", "--json").stdout)
    assert [job["name"] for job in named] == ["old"], "a job asked for by name is shown however old"


def test_status_before_any_run_says_no_jobs(workspace: Workspace):
    result = workspace.batchd("status")
    assert result.returncode == 0 and "no jobs" in result.stdout


@pytest.mark.parametrize("command", ["status", "list"])
def test_a_journal_whose_schema_is_not_yet_written_reads_as_no_jobs(workspace: Workspace, command: str):
    """The instant after a starting daemon creates its journal file and before it commits the tables."""
    import sqlite3

    from batchd.journal import journal_path

    path = journal_path(workspace.state)
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    try:
        result = workspace.batchd(command, "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == []
    finally:
        db.close()


def test_cancel_drops_a_cancel_file_once(workspace: Workspace):
    assert workspace.batchd("cancel", "long").returncode == 0
    assert (workspace.inbox / "long.cancel").exists()
    again = workspace.batchd("cancel", "long")
    assert again.returncode == 0 and "already requested" in again.stdout


def test_approve_drops_an_approve_file_once(workspace: Workspace):
    first = workspace.batchd("approve", "long")
    assert first.returncode == 0 and "approval requested for long" in first.stdout
    assert (workspace.inbox / "long.approve").read_bytes() == b""
    again = workspace.batchd("approve", "long")
    assert again.returncode == 0 and "approval of long was already requested" in again.stdout


@pytest.mark.parametrize("verb", ["cancel", "approve"])
def test_cancel_and_approve_refuse_a_name_with_a_folder(workspace: Workspace, verb: str):
    result = workspace.batchd(verb, "../elsewhere")
    assert result.returncode != 0 and "is not a job name or id" in result.stderr
    assert not list(workspace.root.glob(f"elsewhere.{verb}")) and not list(workspace.inbox.iterdir())


@pytest.mark.parametrize("verb", ["cancel", "approve"])
def test_cancel_and_approve_of_a_name_too_long_for_a_file_say_to_give_the_id(workspace: Workspace, verb: str):
    """A name longer than a file name may be (pasted by mistake, or a long manifest's): one line pointing to the
    job's id, not an OSError traceback, and nothing left in the inbox."""
    result = workspace.batchd(verb, "x" * 5000)
    assert result.returncode == 1 and "too long a name" in result.stderr and "job's id" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr) < 400
    assert not list(workspace.inbox.iterdir())


@pytest.mark.parametrize("stem", ["n" * 250, "é" * 125])
def test_submit_of_a_manifest_whose_name_is_as_long_as_a_file_name_may_be(workspace: Workspace, tmp_path, stem: str):
    """A manifest named up to the filesystem's limit (255 bytes): submit writes it beside its final name under a
    temp name, which was the name and 14 bytes more (ENAMETOOLONG, a traceback); the temp name is shortened,
    and the daemon delivers the job under its full name."""
    manifest = tmp_path / f"{stem}.toml"
    manifest.write_text('task = "translate"\ntexts = ["Hello"]\nlanguages = ["French"]\n')
    submitted = workspace.batchd("submit", str(manifest))
    assert submitted.returncode == 0, submitted.stderr[-2000:]
    assert [path.name for path in workspace.inbox.iterdir()] == [manifest.name]
    assert workspace.batchd("run", "--once").returncode == 0
    assert workspace.delivered()[stem]["state"] == "succeeded"


def test_schema_describes_every_task(workspace: Workspace):
    result = workspace.batchd("schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    text = json.dumps(schema)
    assert all(task in text for task in ("translate", "sentiment", "variations"))


def test_an_unknown_config_key_is_named(workspace: Workspace):
    workspace.config.write_text(workspace.config.read_text().replace("inbox =", "inbx = 1\ninbox ="))
    result = workspace.batchd("run", "--once")
    assert result.returncode != 0
    assert "inbx" in result.stderr


def test_emulator_command_is_wired(workspace: Workspace):
    result = workspace.batchd("emulator", "--help")
    assert result.returncode == 0 and "--job-seconds" in result.stdout


def test_the_emulator_command_is_listed_once_after_it_was_loaded():
    """It is imported on first use (it brings uvicorn); once loaded, the help still names it once."""
    from batchd.cli import main

    context = main.make_context("batchd", [], resilient_parsing=True)
    assert main.get_command(context, "emulator") is not None
    assert main.list_commands(context).count("emulator") == 1


def test_global_options_are_taken_after_the_command_too(workspace: Workspace):
    """`batchd run --config F`, `batchd status --config F --log-level DEBUG`: the global options anywhere."""
    from batchd.cli import globals_first

    assert globals_first(["status", "--config", "c.toml", "--log-level", "DEBUG", "--json"]) == [
        "--config", "c.toml", "--log-level", "DEBUG", "status", "--json"]
    assert globals_first(["--log-format", "json", "config", "show", "--config=c.toml"]) == [
        "--log-format", "json", "--config=c.toml", "config", "show"]
    assert globals_first(["submit", "--", "--config"]) == ["submit", "--", "--config"]
    env = {"BATCHD_CONFIG": ""}
    result = workspace.batchd("status", "--config", str(workspace.config), "--log-level", "DEBUG", "--json", **env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
    shown = workspace.batchd("config", "show", "--json", "--config", str(workspace.config), **env)
    assert json.loads(shown.stdout)["config_file"] == str(workspace.config)


def test_without_a_config_file_status_fails_and_says_where_it_looked(workspace: Workspace, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    env = workspace.env(BATCHD_CONFIG="")
    result = subprocess.run([workspace.python, "-m", "batchd", "status"], cwd=elsewhere, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "no jobs" not in result.stdout
    assert f"no batchd state at {elsewhere / 'state'}" in result.stderr
    assert str(elsewhere / "config.toml") in result.stderr and "--config" in result.stderr
    listed = subprocess.run([workspace.python, "-m", "batchd", "list"], cwd=elsewhere, env=env,
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 1 and "no batchd state" in listed.stderr
    submitted = subprocess.run([workspace.python, "-m", "batchd", "cancel", "x"], cwd=elsewhere, env=env,
                               capture_output=True, text=True, timeout=60)
    assert "no config file" in submitted.stderr and "using the built-in defaults" in submitted.stderr
    assert "provider emulator" in submitted.stderr


def test_submit_force_runs_the_same_content_again(workspace: Workspace, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    (elsewhere / "t.toml").write_text(TRANSLATE)
    (elsewhere / "j.json").write_text(json.dumps({"task": "translate", "texts": ["a"], "languages": ["French"]}))
    for name in ("t.toml", "j.json"):
        assert workspace.batchd("submit", str(elsewhere / name)).returncode == 0
    assert workspace.batchd("run", "--once").returncode == 0
    # The same content again: refused as a repeat (saying how to run it anyway), unless forced.
    assert workspace.batchd("submit", str(elsewhere / "t.toml")).returncode == 0
    forced = [workspace.batchd("submit", "--force", str(elsewhere / name)) for name in ("t.toml", "j.json")]
    assert all(result.returncode == 0 and "force = true" in result.stdout for result in forced), forced
    assert json.loads((workspace.inbox / "j.json").read_text())["force"] is True
    assert (workspace.inbox / "t-2.toml").read_text().startswith("force = true")
    assert workspace.batchd("run", "--once").returncode == 1
    states = {name: summary["state"] for name, summary in workspace.delivered().items()}
    assert states == {"t": "succeeded", "j": "succeeded", "t-2": "rejected", "t-2-2": "succeeded",
                      "j-2": "succeeded"}, states
    rejected = workspace.delivered()["t-2"]
    assert rejected["error"]["code"] == "duplicate" and "--force" in rejected["error"]["message"]
    (elsewhere / "off.toml").write_text("force = false\n" + TRANSLATE)
    refused = workspace.batchd("submit", "--force", str(elsewhere / "off.toml"))
    assert refused.returncode == 1 and "force = false" in refused.stderr
