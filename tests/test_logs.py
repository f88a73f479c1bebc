"""Log lines (key=value, JSON, journald) and secrets that never reach logs, outbox files or `config show`."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

from batchd import logs
from batchd.emulator.server import EmulatorServer
from batchd.testing import Workspace

#: Recognisable, so a leak anywhere is found by a plain substring search.
FAKE_KEY = "AIzaFAKE-batchd-test-key-0123456789"

TRANSLATE = 'task = "translate"\ntexts = ["Hello"]\nlanguages = ["French"]\n'

# A task plugin that gets hold of the key and puts it everywhere it can: a log line, and an
# exception whose text ends up in the job's summary.json.
LEAKY_PLUGIN = '''
import logging, os
from pydantic import BaseModel, ConfigDict
from batchd import hookimpl
from batchd.task import Task, TaskRequest


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str]


class Leaky(Task):
    name = "leaky"
    Params = Params

    def inline_items(self, params):
        return "texts", params.texts

    def requests(self, params, items):
        key = os.environ["GEMINI_API_KEY"]
        logging.getLogger("leaky").warning("building with key %s", key)
        raise RuntimeError(f"cannot build: the key {key} is not welcome here")

    def organize(self, results):
        yield from ()


@hookimpl
def register_tasks(register):
    register(Leaky())
'''


def every_file_text(folder) -> str:
    return "\n".join(path.read_text(errors="replace") for path in folder.rglob("*") if path.is_file())


def test_the_api_key_never_reaches_logs_outbox_or_config_show(workspace: Workspace, tmp_path):
    (workspace.root / "plugins.d").mkdir()
    (workspace.root / "plugins.d" / "leaky.py").write_text(LEAKY_PLUGIN)
    with EmulatorServer(tmp_path / "google", job_seconds=0.2, api_key=FAKE_KEY) as google:
        workspace.configure(provider="gemini", plugins_dir="plugins.d")
        workspace.drop("translate.toml", TRANSLATE)  # a real job, sent with the key
        workspace.drop("leaky.toml", 'task = "leaky"\ntexts = ["a"]\n')
        env = {"GEMINI_API_KEY": FAKE_KEY, "GOOGLE_GEMINI_BASE_URL": google.base_url}

        run = workspace.batchd("--log-level", "DEBUG", "run", "--once", **env)
        json_run = workspace.batchd("--log-format", "json", "status", "--json", **env)
        show = workspace.batchd("config", "show", **env)
        show_json = workspace.batchd("config", "show", "--json", **env)

    delivered = workspace.delivered()
    assert delivered["translate"]["state"] == "succeeded", run.stderr  # the key did its job
    assert delivered["leaky"]["state"] == "rejected"
    assert "is not welcome here" in delivered["leaky"]["error"]["message"]
    assert "building with key ***" in run.stderr, "the plugin's log line is there, masked"
    assert "the key *** is not welcome" in run.stderr

    # The journal itself keeps no secret: `status --json`, events and webhooks are made from it.
    journal = b"".join(path.read_bytes() for path in workspace.state.glob("journal.db*"))  # WAL included
    assert journal
    assert "is not welcome" in json_run.stdout
    for text in (run.stdout, run.stderr, json_run.stdout, json_run.stderr, show.stdout, show_json.stdout,
                 every_file_text(workspace.outbox), journal.decode(errors="replace")):
        assert FAKE_KEY not in text
    settings = json.loads(show_json.stdout)
    assert settings["secrets"]["GEMINI_API_KEY"] == "set"
    assert settings["settings"]["provider"] == {"value": "gemini", "source": "config file"}
    assert settings["settings"]["cost.count_tokens"]["value"] is True, "not a secret, though named *token*"
    assert settings["settings"]["cost.default_output_tokens"]["value"] != "***"


def test_secret_settings_are_registered_generically():
    from pydantic import BaseModel, SecretStr

    from batchd.config import _register_secrets

    class Hook(BaseModel):
        url: str
        secret: SecretStr

    class Section(BaseModel):
        hooks: list[Hook]

    class Model(BaseModel):
        notifications: Section

    _register_secrets(Model(notifications=Section(hooks=[Hook(url="http://x", secret=SecretStr("whsec-123456789"))])))
    assert logs.redact("signature whsec-123456789 sent") == "signature *** sent"
    assert logs.redact_data({"a": ["whsec-123456789"]}) == {"a": ["***"]}



def test_json_for_the_journal_masks_every_string_and_stays_valid_json(monkeypatch):
    """The journal's JSON is written first and redacted only where a secret shows in it: keys, nested
    strings, a secret JSON escapes, one inside a longer one; a secret's digits as a number stay a number."""
    monkeypatch.setattr(logs, "_secrets", ())
    monkeypatch.setattr(logs, "_secrets_in_json", ())
    plain = {"error": {"message": "no key here", "n": [1, 2.5, None, True]}}
    assert logs.redacted_json(plain) == json.dumps(plain, ensure_ascii=False)  # no secret: the JSON as written
    for secret in ("AIzaFAKE-0123456789", 'quote"and\\back', "AIzaFAKE-0123456789-longer", "1234567"):
        logs.register_secret(secret)
    value = {"AIzaFAKE-0123456789": ["key AIzaFAKE-0123456789-longer", 'q quote"and\\back'],
             "count": 1234567, "note": "1234567 émis", "ok": "nothing"}
    decoded = json.loads(logs.redacted_json(value))
    assert decoded == {"***": ["key ***", "q ***"], "count": 1234567, "note": "*** émis", "ok": "nothing"}
    assert logs.redacted_json({"count": 1234567}) == '{"count": 1234567}'

def test_key_value_lines_quote_what_needs_it_and_keep_a_traceback_on_one_line():
    formatter = logs.KeyValueFormatter()
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        record = logging.LogRecord("batchd", logging.ERROR, __file__, 1, "job %s failed", ("j1",), sys.exc_info())
    record.job = "j1"
    line = formatter.format(record)
    assert "\n" not in line
    assert line.startswith("ts=") and ' level=error logger=batchd msg="job j1 failed" job=j1 exc="Traceback' in line
    journal_line = logs.KeyValueFormatter(journald=True).format(record)
    assert journal_line.startswith("<3>level=error ") and "ts=" not in journal_line

    data = json.loads(logs.JsonFormatter().format(record))
    assert (data["level"], data["msg"], data["job"]) == ("error", "job j1 failed", "j1")
    assert "ValueError: bad" in data["exc"]


def test_under_systemd_the_daemon_logs_without_timestamps_and_with_priorities(workspace: Workspace):
    log_path = workspace.root / "journal-stream.log"
    with open(log_path, "w") as stream:
        st = os.fstat(stream.fileno())
        workspace.drop("translate.toml", TRANSLATE)
        env = workspace.env(JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
        result = subprocess.run([sys.executable, "-m", "batchd", "run", "--once"], cwd=workspace.root, env=env,
                                stderr=stream, stdout=subprocess.DEVNULL, timeout=120)
    assert result.returncode == 0
    lines = log_path.read_text().splitlines()
    ours = [line for line in lines if "logger=batchd" in line]
    assert ours and all(line.startswith("<6>level=info logger=batchd") for line in ours), lines
    assert not any(re.search(r"(^|[\s>])ts=", line) for line in lines), "the journal stamps lines itself"


def test_json_log_format_from_the_config(workspace: Workspace):
    workspace.configure(log_format="json")
    workspace.drop("translate.toml", TRANSLATE)
    result = workspace.batchd("run", "--once")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    delivered = [r for r in records if r["logger"] == "batchd.notify" and r.get("kind") == "succeeded"]
    assert delivered and delivered[0]["job"] and delivered[0]["outbox"].endswith("translate"), result.stderr
    assert all({"ts", "level", "logger", "msg"} <= r.keys() for r in records)


def test_log_level_flag_filters(workspace: Workspace):
    workspace.drop("translate.toml", TRANSLATE)
    result = workspace.batchd("--log-level", "warning", "run", "--once")
    assert result.returncode == 0
    assert "level=info" not in result.stderr


def test_lifecycle_lines_carry_job_fields(workspace: Workspace):
    workspace.drop("translate.toml", TRANSLATE)
    result = workspace.batchd("--log-level", "DEBUG", "run", "--once")
    assert result.returncode == 0
    lines = result.stderr.splitlines()
    # Each event's line is the log plugin's; the daemon's own saying the same is DEBUG, with its fields.
    accepted = next(line for line in lines if "msg=\"job translate accepted\"" in line)
    assert " job=" in accepted and " manifest=translate.toml" in accepted and "level=info" in accepted
    ours = next(line for line in lines if "msg=\"accepted translate.toml" in line)
    assert "level=debug" in ours and " job=" in ours and " manifest=translate.toml" in ours
    assert any(" outcome=succeeded " in line and "level=debug" in line for line in lines)


def test_a_run_of_failures_is_said_first_in_full_then_summed_up_then_its_end():
    run = logs.FailureRun(every=3600)
    assert run.failed() is True  # the first of a run: said in full
    assert [run.failed() for _ in range(4)] == [False] * 4
    assert run.summary() is None  # an hour has not passed
    failures, seconds = run.summary(now=True)
    assert failures == 4 and 0 <= seconds < 60
    assert run.summary(now=True) is None  # nothing new since
    run.failed()
    assert run.succeeded() == 6 and run.succeeded() == 0
    assert run.failed() is True  # a new run
    quick = logs.FailureRun(every=0)
    quick.failed(), quick.failed()
    assert quick.summary()[0] == 1  # due at once: every = 0


def test_a_failure_run_says_its_first_failure_in_full_then_sums_up_the_next(caplog):
    """FailureRun.say, as the poll, the creates and the fetches use it: the first line as it is (and when the next
    are summed up), then a count with the last failure once ``every`` has passed, the rest at DEBUG only."""
    import logging

    logger = logging.getLogger("batchd.test-failure-run")
    caplog.set_level(logging.DEBUG, logger=logger.name)
    slow, quick = logs.FailureRun(every=3600), logs.FailureRun(every=0)
    for n in range(3):
        slow.say(logger, f"fetching chunk {n} failed", "fetches failed")
    quick.say(logger, "create 1 failed", "creates failed")
    quick.say(logger, "create 2 failed", "creates failed")
    said = [(record.levelname, record.getMessage()) for record in caplog.records]
    assert said == [
        ("WARNING", "fetching chunk 0 failed (further such failures are summed up every 3600 s)"),
        ("DEBUG", "fetching chunk 1 failed"),
        ("DEBUG", "fetching chunk 2 failed"),
        ("WARNING", "create 1 failed (further such failures are summed up every 0 s)"),
        ("WARNING", "1 more creates failed in the last 0 s, 2 in a row; the last: create 2 failed"),
    ]
