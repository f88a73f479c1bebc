"""The cost plugin through the daemon and the emulator: estimates, actual costs, budgets, held jobs."""

from __future__ import annotations

import json
import re
import sqlite3

import pytest

from batchd.config import DEFAULT_PRICES, Settings
from batchd.costs import JobInfo
from batchd.journal import Journal, journal_path
from batchd.task import TaskRequest
from batchd_plugins import cost as cost_plugin
from batchd.testing import Workspace
from conftest import REPO
from test_daemon import TRANSLATE, remote_jobs

#: Same shape as TRANSLATE (4 requests), other content: not a duplicate of it.
TRANSLATE_OTHER = TRANSLATE.replace("Hello, how are you?", "Good morning, how was the trip?")


def events_of(ws: Workspace, name: str) -> list[dict]:
    journal = Journal(journal_path(ws.state), readonly=True)
    try:
        (job,) = journal.find_jobs(name)
        # progress events depend on where the polls fall in the emulated run: not the subject here
        return [entry["event"] for entry in journal.events(job.id) if entry["event"]["kind"] != "progress"]
    finally:
        journal.close()


def batch_price(model: str, prompt_tokens: int, output_tokens: int) -> float:
    price = DEFAULT_PRICES[model]
    return (prompt_tokens * price["input"] + output_tokens * price["output"]) / 1e6 * 0.5


def test_hook_estimate_cost_counts_tokens_and_account_cost_prices_the_usage(workspace: Workspace):
    workspace.drop("translate.toml", TRANSLATE)

    result = workspace.batchd("run", "--once")

    assert result.returncode == 0, result.stderr
    summary = workspace.delivered()["translate"]
    cost, tokens = summary["cost"], summary["tokens"]
    assert cost["currency"] == "USD"
    estimate = cost["estimate_details"]
    assert estimate["method"] == "countTokens: all 4 prompts"
    # The emulator's countTokens applies the rule it bills by: an exact count gives the actual prompt tokens.
    assert estimate["input_tokens"] == tokens["prompt"] > 0
    assert estimate["output_tokens"] == 4 * 256  # default_output_tokens per request
    assert cost["estimate"] == pytest.approx(batch_price("gemini-2.5-flash", tokens["prompt"], 4 * 256))
    # Thinking tokens are billed at the output price (gemini-2.5-flash thinks by default).
    assert tokens["thoughts"] > 0
    assert cost["actual"] == pytest.approx(batch_price("gemini-2.5-flash", tokens["prompt"],
                                                       tokens["output"] + tokens["thoughts"]))
    assert cost["actual_details"]["requests"] == 4
    # The same tokens at the interactive price, and what the batch price saved (half of it).
    assert cost["standard"] == pytest.approx(2 * cost["actual"])
    assert cost["saving"] == pytest.approx(cost["actual"])
    assert cost["estimate_details"]["saving"] == pytest.approx(cost["estimate"])
    (job,) = workspace.status()
    assert job["cost"]["actual"] == cost["actual"] and job["cost"]["saving"] == cost["saving"]
    table = workspace.batchd("status").stdout
    assert "saved" in table and f"${cost['saving']:.4f}" in table
    # run --once closes with what it delivered, what that cost and where it is.
    assert (f"run --once: 1 job(s) delivered (1 succeeded), costing {cost['actual']:.6f} USD; "
            f"results in {workspace.outbox}") in result.stderr


def test_hook_estimate_cost_samples_a_big_job_and_falls_back_to_the_local_rule(workspace: Workspace):
    rows = "".join(f"r{n},{'lovely battery ' * (n % 13 + 1)}and {n}\n" for n in range(300))
    (workspace.inbox / "reviews.csv").write_text("id,text\n" + rows)
    workspace.drop("reviews.toml", 'task = "sentiment"\ninput = "reviews.csv"\n')
    workspace.configure(cost={"count_tokens_sample": 5})

    assert workspace.batchd("run", "--once").returncode == 0
    summary = workspace.delivered()["reviews"]
    estimate = summary["cost"]["estimate_details"]
    assert estimate["method"] == "countTokens: 5 of 300 prompts, scaled by characters"
    assert estimate["requests"] == 300
    assert estimate["input_tokens"] == pytest.approx(summary["tokens"]["prompt"], rel=0.1)

    workspace.configure(cost={"count_tokens": False})
    (workspace.inbox / "more.csv").write_text("id,text\n" + rows.replace("and", "or"))
    workspace.drop("more.toml", 'task = "sentiment"\ninput = "more.csv"\n')
    assert workspace.batchd("run", "--once").returncode == 0
    local = workspace.delivered()["more"]["cost"]["estimate_details"]
    assert local["method"].startswith("local: 4 characters a token")
    assert local["input_tokens"] == pytest.approx(workspace.delivered()["more"]["tokens"]["prompt"], rel=0.1)


def test_hook_check_budget_holds_a_job_over_the_per_job_budget_until_approved(workspace: Workspace):
    workspace.configure(cost={"job_budget": 0.0001})
    workspace.drop("translate.toml", TRANSLATE)
    workspace.drop("other.toml", TRANSLATE_OTHER)

    first = workspace.batchd("run", "--once")

    assert first.returncode == 3, first.stderr  # nothing failed, but jobs are left held
    assert not workspace.delivered()
    assert remote_jobs(workspace) == [], "nothing of a held job is submitted"
    jobs = {job["name"]: job for job in workspace.status()}
    for job in jobs.values():
        assert job["state"] == "held"
        assert "over the per-job budget of 0.0001 USD" in job["hold"]
        assert job["cost"]["estimate"] > 0.0001
    listing = workspace.batchd("list").stdout
    assert "held" in listing and "batchd approve translate" in listing
    assert "kind=held" in first.stderr, "the log plugin announced the hold"

    assert workspace.batchd("approve", "translate").returncode == 0
    assert workspace.batchd("cancel", "other").returncode == 0
    second = workspace.batchd("run", "--once")

    assert second.returncode == 0, second.stderr
    delivered = workspace.delivered()
    assert delivered["translate"]["state"] == "succeeded"
    assert delivered["translate"]["cost"]["estimate"] > 0.0001, "approved over its budget"
    assert delivered["other"]["state"] == "cancelled", "a held job can be cancelled"
    assert [event["kind"] for event in events_of(workspace, "translate")] == [
        "accepted", "held", "submitted", "succeeded"]
    assert [event["kind"] for event in events_of(workspace, "other")] == ["accepted", "held", "cancelled"]
    assert not list(workspace.inbox.iterdir()), "the approve and cancel files were consumed"


@pytest.mark.slow
def test_hook_check_budget_rolling_day_counts_the_jobs_of_the_last_24_hours(workspace: Workspace):
    workspace.drop("first.toml", TRANSLATE)
    assert workspace.batchd("run", "--once").returncode == 0
    first_actual = workspace.delivered()["first"]["cost"]["actual"]

    workspace.configure(cost={"daily_budget": first_actual / 2})
    workspace.drop("second.toml", TRANSLATE_OTHER)
    assert workspace.batchd("run", "--once").returncode == 3
    (held,) = [job for job in workspace.status() if job["state"] == "held"]
    assert "daily budget" in held["hold"]
    second_estimate = held["cost"]["estimate"]

    # Enough for the second job alone, not with what the first spent within the last 24 hours.
    workspace.configure(cost={"daily_budget": second_estimate + first_actual / 2})
    assert workspace.batchd("run", "--once").returncode == 3
    assert "second" not in workspace.delivered()

    # A day passes for the first job: its spending leaves the rolling window.
    with sqlite3.connect(journal_path(workspace.state)) as db:
        db.execute("UPDATE jobs SET admitted_at = admitted_at - 86400 - 60 WHERE name = 'first'")
    result = workspace.batchd("run", "--once")

    assert result.returncode == 0, result.stderr
    assert workspace.delivered()["second"]["state"] == "succeeded"


@pytest.mark.slow
def test_hook_check_budget_in_one_run_a_held_job_goes_once_the_others_actual_cost_is_known(workspace: Workspace):
    # Two jobs whose estimates do not fit the day together; the first's actual cost (far below its
    # estimate: emulated answers are short) makes room for the second in the same run.
    workspace.configure(cost={"default_output_tokens": 1000})
    workspace.drop("probe.toml", TRANSLATE.replace("3 pm", "4 pm"))
    assert workspace.batchd("run", "--once").returncode == 0
    probe = workspace.delivered()["probe"]["cost"]
    assert probe["actual"] * 4 < probe["estimate"]
    # Each remote job runs 2 s: both estimates are in before either job's actual cost is known, however
    # loaded the machine (a first job done before the second's estimate would leave nothing to hold).
    workspace.configure(cost={"default_output_tokens": 1000, "daily_budget": probe["actual"] + 1.5 * probe["estimate"]},
                        job_seconds=2)
    workspace.drop("a.toml", TRANSLATE)
    workspace.drop("b.toml", TRANSLATE_OTHER)

    result = workspace.batchd("run", "--once")

    assert result.returncode == 0, result.stderr
    assert {workspace.delivered()[name]["state"] for name in ("a", "b")} == {"succeeded"}
    kinds = {name: [event["kind"] for event in events_of(workspace, name)] for name in ("a", "b")}
    assert sorted(kinds.values()) == [["accepted", "held", "submitted", "succeeded"],
                                      ["accepted", "submitted", "succeeded"]]


def test_a_raised_budget_releases_a_held_job_while_the_daemon_runs(workspace: Workspace):
    workspace.configure(cost={"job_budget": 0.0001})
    daemon = workspace.start("run")
    try:
        workspace.drop("translate.toml", TRANSLATE)
        workspace.wait_for(lambda: [job["state"] for job in workspace.status()] == ["held"], what="job held")
        # An edit in progress, or any bytes: refused, said, the settings in force kept (it crashed the daemon).
        workspace.config.write_bytes(workspace.config.read_bytes() + b"\n\xff\xfe [[[ not toml")
        workspace.wait_for(lambda: "cannot be used" in daemon.output(), what="the broken config refused")
        assert daemon.poll() is None and "not UTF-8" in daemon.output()
        workspace.configure(cost={"job_budget": 1.0})  # the config file is re-read when it changes
        workspace.wait_for(lambda: "translate" in workspace.delivered(), what="released job delivered")
    finally:
        assert daemon.stop() == 0
    assert workspace.delivered()["translate"]["state"] == "succeeded"


def test_sighup_reads_the_config_file_again_changed_or_not_and_the_daemon_goes_on(workspace: Workspace):
    """`systemctl reload` (the unit's ExecReload sends SIGHUP) reads the config file again even when its
    modification time did not move (a file copied in with its old time, a clock set back); SIGHUP ended
    the process on the spot before."""
    import os
    import signal
    import time

    workspace.configure(cost={"job_budget": 0.0001})
    daemon = workspace.start("run")
    try:
        workspace.drop("translate.toml", TRANSLATE)
        workspace.wait_for(lambda: [job["state"] for job in workspace.status()] == ["held"], what="job held")
        before = workspace.config.stat()
        workspace.configure(cost={"job_budget": 1.0})
        os.utime(workspace.config, ns=(before.st_atime_ns, before.st_mtime_ns))  # only the signal tells
        time.sleep(2.5)  # two looks at the file's time (every second): nothing to reload
        assert [job["state"] for job in workspace.status()] == ["held"]

        daemon.send_signal(signal.SIGHUP)
        workspace.wait_for(lambda: "translate" in workspace.delivered(), what="released job delivered")
        assert "reload asked for (SIGHUP): [cost] and [notify] reloaded" in daemon.output()
        daemon.send_signal(signal.SIGHUP)
        workspace.wait_for(lambda: "[cost] and [notify] unchanged" in daemon.output(), what="a second reload")
        assert daemon.poll() is None
    finally:
        assert daemon.stop() == 0
    assert workspace.delivered()["translate"]["state"] == "succeeded"


# --- the plugin's rules, in process --------------------------------------------------------------


PRICER = '''
import json, os
from batchd import hookimpl
from batchd.task import TaskRequest

@hookimpl
def estimate_cost(job, requests, settings):
    count = sum(1 for _ in requests)
    # Whether its build had begun when its requests had all been seen: chunk files in its spool.
    spool = settings.state_dir / "jobs" / job.id
    built = sum(1 for path in spool.iterdir() if "requests-" in path.name)
    with open(os.environ["RECORD_ESTIMATES_TO"], "a") as out:
        out.write(json.dumps({"requests": count, "chunk_files": built}) + "\\n")
    return {"cost": 0.5, "currency": "USD", "requests": count, "method": "test"}
'''
GATE = '''
from batchd import hookimpl

@hookimpl
def check_budget(estimate):
    return None if estimate and estimate["cost"] < 1 else "too dear"
'''


@pytest.mark.parametrize("gate", [False, True], ids=["no-budget", "a-budget-plugin"])
def test_hook_estimate_cost_runs_alongside_the_build_unless_a_budget_needs_it_first(workspace: Workspace, gate: bool):
    record = workspace.root / "estimates.jsonl"
    workspace.add_plugin("pricer", PRICER)
    if gate:
        workspace.add_plugin("gate", GATE)
    # Without the built-in cost plugin, only these decide; four chunks, so building takes a few steps.
    workspace.configure(disabled_plugins=["cost"], chunk_max_requests=1)
    workspace.drop("translate.toml", TRANSLATE)

    result = workspace.batchd("run", "--once", RECORD_ESTIMATES_TO=str(record))

    assert result.returncode == 0, result.stderr
    (estimate,) = [json.loads(line) for line in record.read_text().splitlines()]
    assert estimate["requests"] == 4
    # A budget check needs the estimate before the first chunk is built; without one, it is made
    # from the build pass (no pass of its own over the manifest): its chunks are being written.
    assert (estimate["chunk_files"] > 0) is not gate, estimate
    summary = workspace.delivered()["translate"]
    assert summary["state"] == "succeeded" and summary["cost"]["estimate"] == 0.5


GATE_OFF_DUTY = GATE + '''

@hookimpl
def budget_applies(settings):
    return False  # this budget is off now: jobs need no estimate before they are built
'''


@pytest.mark.parametrize(("job_budget", "alongside"), [(None, True), (100.0, False)], ids=["off", "a-budget"])
def test_hook_budget_applies_lets_a_budget_plugin_say_it_cannot_hold_now(workspace: Workspace, job_budget,
                                                                         alongside: bool):
    """A third-party budget that says it is off, and the built-in cost plugin (through the same hook):
    the estimate comes from the build pass unless the built-in plugin has a budget to check."""
    record = workspace.root / "estimates.jsonl"
    workspace.add_plugin("pricer", PRICER)
    workspace.add_plugin("gate", GATE_OFF_DUTY)
    workspace.configure(chunk_max_requests=1, cost={"job_budget": job_budget} if job_budget else {})
    workspace.drop("translate.toml", TRANSLATE)

    result = workspace.batchd("run", "--once", RECORD_ESTIMATES_TO=str(record))

    assert result.returncode == 0, result.stderr
    (estimate,) = [json.loads(line) for line in record.read_text().splitlines()]
    assert (estimate["chunk_files"] > 0) is alongside, estimate


def test_prices_by_exact_name_else_longest_prefix_and_config_overrides():
    settings = Settings(cost={"prices": {"gemini-2.5-flash": {"input": 1.0, "output": 2.0}}})
    assert settings.cost.price_for("models/gemini-2.5-flash")[1].input == 1.0
    assert settings.cost.price_for("gemini-2.5-flash-lite-preview-09-2025")[0] == "gemini-2.5-flash-lite"
    assert settings.cost.price_for("gemini-2.5-flash-preview-09-2025")[0] == "gemini-2.5-flash"
    assert settings.cost.price_for("gemini-flash-latest") is None


def test_hook_check_budget_holds_an_unpriced_job_only_when_a_budget_is_set():
    job = JobInfo(id="j", name="n", manifest="n.toml", task="translate", model="gemini-flash-latest")
    estimate = cost_plugin.estimate_cost(job=job, requests=[], count_tokens=None, settings=Settings(),
                                         observed_output=None)
    assert estimate["cost"] is None and "no price" in estimate["error"]
    assert cost_plugin.check_budget(job=job, estimate=estimate, spent_since=lambda _: 0.0,
                                    settings=Settings()) is None
    reason = cost_plugin.check_budget(job=job, estimate=estimate, spent_since=lambda _: 0.0,
                                      settings=Settings(cost={"daily_budget": 10}))
    assert "cost is unknown" in reason and "no price" in reason


def test_hook_account_cost_bills_thinking_tokens_as_output():
    job = JobInfo(id="j", name="n", manifest="n.toml", task="translate", model="gemini-2.5-pro")
    usage = {"prompt_tokens": 1_000_000, "output_tokens": 100_000, "thoughts_tokens": 900_000, "requests": 3}
    actual = cost_plugin.account_cost(job=job, usage=usage, settings=Settings())
    assert actual["output_tokens"] == 1_000_000
    assert actual["cost"] == pytest.approx((1.25 + 10.00) * 0.5)
    assert json.dumps(actual)  # JSON-ready, as summary.json needs


def test_hook_account_cost_prices_cached_prompt_tokens_at_the_cached_price_without_the_batch_discount():
    # Context-cache hits are billed as for interactive traffic: the batch discount applies to the rest.
    job = JobInfo(id="j", name="n", manifest="n.toml", task="translate", model="gemini-2.5-flash")
    usage = {"prompt_tokens": 1_000_000, "cached_tokens": 400_000, "output_tokens": 1_000_000,
             "thoughts_tokens": 0, "requests": 10}
    actual = cost_plugin.account_cost(job=job, usage=usage, settings=Settings())
    assert actual["cached_tokens"] == 400_000
    assert actual["cost"] == pytest.approx(0.6 * 0.30 * 0.5 + 0.4 * 0.03 + 2.50 * 0.5)
    assert actual["standard_cost"] == pytest.approx(0.6 * 0.30 + 0.4 * 0.03 + 2.50)
    assert actual["saving"] == pytest.approx(actual["standard_cost"] - actual["cost"])
    unlisted = Settings(cost={"prices": {"my-model": {"input": 1.0, "output": 2.0}}})
    job = JobInfo(id="j", name="n", manifest="n.toml", task="translate", model="my-model")
    actual = cost_plugin.account_cost(job=job, usage=usage, settings=unlisted)
    assert actual["cost"] == pytest.approx((1.0 + 2.0) * 0.5), "no cached price: cached tokens cost as others"


def test_hook_estimate_cost_prices_output_by_what_the_task_and_model_produced_before():
    job = JobInfo(id="j", name="n", manifest="n.toml", task="sentiment", model="gemini-2.5-flash")
    requests = [TaskRequest(f"k{n}", "short text", {}, {"max_output_tokens": 100} if n % 2 else {})
                for n in range(10)]

    def estimate(observed):
        return cost_plugin.estimate_cost(job=job, requests=requests, count_tokens=None, settings=Settings(),
                                         observed_output=observed)

    assert estimate(None)["output_tokens"] == 5 * 256 + 5 * 100, "the rule: max_output_tokens, else the default"
    too_few = {"requests": cost_plugin.MIN_OBSERVED_REQUESTS - 1, "output_tokens": 1_000_000}
    assert estimate(too_few)["output_tokens"] == 5 * 256 + 5 * 100, "a few answers are not a measure yet"
    calibrated = estimate({"requests": 400, "output_tokens": 400 * 150})
    assert calibrated["output_tokens"] == 5 * 150 + 5 * 100, "150 a request, at most a request's cap"
    assert "150.0 tokens a request, as 400 earlier requests" in calibrated["output_method"]


def test_an_estimate_learns_the_output_of_earlier_jobs_of_its_task_and_model(workspace: Workspace):
    # Sentiment answers are a few tokens, far below default_output_tokens: the second job is priced by
    # what the first actually produced, kept in the journal.
    texts = ", ".join(f'"review {n}: the parcel came late and the box was torn"' for n in range(25))
    workspace.drop("first.toml", f'task = "sentiment"\ntexts = [{texts}]\n')
    assert workspace.batchd("run", "--once").returncode == 0
    first = workspace.delivered()["first"]
    workspace.drop("second.toml", f'task = "sentiment"\ntexts = [{texts}]\nmodel = "gemini-2.5-flash"\n')
    assert workspace.batchd("run", "--once").returncode == 0
    second = workspace.delivered()["second"]

    produced = first["tokens"]["output"] + first["tokens"]["thoughts"]
    assert first["cost"]["estimate_details"]["output_tokens"] == 25 * 256, "nothing observed yet: the rule"
    assert second["cost"]["estimate_details"]["output_tokens"] == pytest.approx(produced, abs=1)
    assert "earlier requests of this task and model" in second["cost"]["estimate_details"]["output_method"]


def test_every_job_is_priced_before_any_of_its_chunks_is_submitted(workspace: Workspace):
    # No budget: the estimate is made by the build pass, and the job waits for it before its first create.
    workspace.configure(chunk_max_requests=1)
    workspace.drop("translate.toml", TRANSLATE)

    result = workspace.batchd("--log-level", "debug", "run", "--once")

    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    estimated = next(n for n, line in enumerate(lines) if "estimated" in line)
    submitting = [n for n, line in enumerate(lines) if "submitting chunk" in line]
    assert submitting and estimated < min(submitting), "\n".join(lines)


def test_hook_estimate_cost_adds_a_capped_thinking_budget_to_the_output():
    job = JobInfo(id="j", name="n", manifest="n.toml", task="translate", model="gemini-2.5-flash")
    settings = Settings(cost={"default_output_tokens": 100})

    def output_tokens(thinking_config):
        config = {"thinking_config": thinking_config} if thinking_config is not None else {}
        requests = [TaskRequest(key=str(n), prompt="p", input={}, config=config) for n in range(3)]
        return cost_plugin.estimate_cost(job=job, requests=requests, count_tokens=None,
                                         settings=settings, observed_output=None)["output_tokens"]

    assert output_tokens({"thinking_budget": 1024, "include_thoughts": True}) == 3 * (100 + 1024)
    # no thinking, or thinking the model sizes itself: nothing to add
    assert output_tokens({"thinking_budget": 0}) == output_tokens({"thinking_budget": -1}) == 300
    assert output_tokens({"thinking_level": "LOW"}) == output_tokens(None) == 300


def test_a_journal_from_before_costs_and_events_gains_their_columns(tmp_path):
    from batchd.journal.schema import ADDED_JOB_COLUMNS, SCHEMA

    path = tmp_path / "journal.db"
    old_schema = "\n".join(line for line in SCHEMA.splitlines()
                           if line.split()[:1] not in ([column] for column in ADDED_JOB_COLUMNS))
    old_schema = old_schema.replace("finished_at   REAL,", "finished_at   REAL")
    old_schema = old_schema.split("-- Job events")[0]  # no events tables either
    with sqlite3.connect(path) as db:
        db.executescript(old_schema)
        db.execute("INSERT INTO jobs (id, name, source, state, created_at, updated_at)"
                   " VALUES ('old', 'old', 'old.toml', 'done', 1, 1)")
        assert "approved" not in {row[1] for row in db.execute("PRAGMA table_info(jobs)")}

    journal = Journal(path)
    try:
        assert journal.job("old").approved is False and journal.job("old").cost is None
        journal.update_job("old", cost={"estimate": {"cost": 1.5}}, spend=1.5, admitted_at=10.0)
        assert journal.job("old").cost == {"estimate": {"cost": 1.5}}
        assert journal.spent_since(5.0) == 1.5
    finally:
        journal.close()


def test_hook_estimate_cost_and_account_cost_documented_examples_win_over_the_builtin(workspace: Workspace):
    docs = (REPO / "docs" / "plugins.md").read_text()
    examples = {}
    for hook in ("estimate_cost", "account_cost"):
        section = re.search(rf"^### {hook}\(.*?(?=^### )", docs, re.M | re.S)[0]
        examples[hook] = re.search(r"^```python\n(.*?)^```", section, re.M | re.S)[1]
    # One-off plugins are registered after the entry points, so pluggy asks them first.
    workspace.add_plugin("flat_price", examples["estimate_cost"])
    workspace.add_plugin("token_price", examples["account_cost"])
    workspace.drop("translate.toml", TRANSLATE)

    assert workspace.batchd("run", "--once").returncode == 0
    summary = workspace.delivered()["translate"]
    assert summary["cost"]["estimate"] == pytest.approx(0.0004)
    assert summary["cost"]["estimate_details"]["method"] == "flat 0.0001 EUR a request"
    assert summary["cost"]["actual"] == pytest.approx(summary["tokens"]["total"] * 2e-7)


def test_cli_estimate_prices_a_manifest_with_its_saving_and_submits_nothing(workspace: Workspace):
    draft = workspace.root / "draft.toml"
    draft.write_text(TRANSLATE)

    result = workspace.batchd("estimate", str(draft))

    assert result.returncode == 0, result.stderr
    assert "4 requests to gemini-2.5-flash" in result.stdout
    assert "countTokens: all 4 prompts" in result.stdout, "counted by a throw-away emulator"
    assert "standard price" in result.stdout and "saving" in result.stdout
    priced = json.loads(workspace.batchd("estimate", "--local", "--json", str(draft)).stdout)
    assert priced["method"].startswith("local") and priced["requests"] == 4
    assert priced["standard_cost"] == pytest.approx(2 * priced["cost"])
    assert priced["saving"] == pytest.approx(priced["cost"])
    assert not list(workspace.inbox.iterdir()) and workspace.status() == [], "nothing dropped, nothing run"

    draft.write_text(TRANSLATE + 'model = "gemini-unheard-of"\n')
    unpriced = workspace.batchd("estimate", "--local", str(draft))
    assert unpriced.returncode == 1 and "no price for model 'gemini-unheard-of'" in unpriced.stderr
    draft.write_text('task = "translate"\n')
    invalid = workspace.batchd("estimate", "--local", str(draft))
    assert invalid.returncode == 1 and "draft.toml" in invalid.stderr


def test_hook_estimate_cost_prices_the_files_a_request_sends_by_kind_and_size():
    from batchd.media import MediaRef

    job = JobInfo(id="j", name="n", manifest="n.toml", task="documents", model="gemini-2.5-flash")
    pdf = MediaRef("a" * 64, "application/pdf", 250_000)  # three pages of ~100 KB
    image = MediaRef("b" * 64, "image/png", 40_000)
    requests = [TaskRequest("k1", "x" * 40, {}, {}, files=(pdf,)), TaskRequest("k2", "x" * 40, {}, {}, files=(image,))]
    estimate = cost_plugin.estimate_cost(job=job, requests=requests, count_tokens=None, settings=Settings(),
                                         observed_output=None)
    assert estimate["input_tokens"] == 20 + 3 * 258 + 258
    assert "2 file(s)" in estimate["method"]
    assert cost_plugin.file_tokens("audio/mpeg", 160_000) == 10 * 32
    assert cost_plugin.file_tokens("text/plain", 400) == 100


def test_the_output_observed_per_task_and_model_adds_up_and_halves_past_its_bound(tmp_path):
    from batchd.journal import OBSERVED_REQUESTS_MAX, Journal

    journal = Journal(tmp_path / "journal.sqlite3")
    try:
        assert journal.observed_output("sentiment", "m") is None
        journal.observe_output("sentiment", "m", 10, 500)
        journal.observe_output("sentiment", "m", 30, 1500)
        journal.observe_output("translate", "m", 1, 7)
        assert journal.observed_output("sentiment", "m") == {"requests": 40, "output_tokens": 2000}
        journal.observe_output("sentiment", "m", OBSERVED_REQUESTS_MAX, 3 * OBSERVED_REQUESTS_MAX)
        # Past the bound both sums are halved: the ratio stays, older jobs weigh less.
        assert journal.observed_output("sentiment", "m") == {
            "requests": (OBSERVED_REQUESTS_MAX + 40) // 2, "output_tokens": (3 * OBSERVED_REQUESTS_MAX + 2000) // 2}
        journal.observe_output("big", "m", OBSERVED_REQUESTS_MAX + 2, 10)  # the first job alone is past it
        assert journal.observed_output("big", "m") == {"requests": OBSERVED_REQUESTS_MAX // 2 + 1, "output_tokens": 5}
        assert journal.observed_output("translate", "m") == {"requests": 1, "output_tokens": 7}
    finally:
        journal.close()
