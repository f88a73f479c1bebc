"""Task plugins that hang: a bounded wait (``plugin_timeout_seconds``) fails their job, never the daemon.

The plugins are one-off modules in the workspace's plugins_dir that block forever in
``requests()`` or in ``organize()``; the daemon runs as a real process.
"""

from __future__ import annotations

import json

import pytest

from batchd.testing import DaemonRunner, Workspace

HANGING_PLUGINS = '''
import threading

from pydantic import BaseModel, ConfigDict

from batchd import hookimpl
from batchd.task import Task, TaskRequest


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str]


class Stuck(Task):
    """Yields one request, then blocks forever: a network read that never returns."""

    name = "stuck"
    Params = Params

    def inline_items(self, params):
        return "texts", params.texts

    def requests(self, params, items):
        for item in items:
            yield TaskRequest(key=item.id, prompt=f"Say: {item.text}", input={"text": item.text})
            threading.Event().wait()

    def organize(self, results):
        for result in results:
            yield result.key, result.text


class Brooding(Stuck):
    """Builds its requests, then blocks forever organizing the second result."""

    name = "brooding"

    def requests(self, params, items):
        for item in items:
            yield TaskRequest(key=item.id, prompt=f"Say: {item.text}", input={"text": item.text})

    def organize(self, results):
        for n, result in enumerate(results):
            if n == 1:
                threading.Event().wait()
            yield result.key, result.text


@hookimpl
def register_tasks(register):
    register(Stuck())
    register(Brooding())
'''

TRANSLATE = {"task": "translate", "texts": ["Hello"], "languages": ["French", "German"]}


@pytest.fixture
def hanging(workspace: Workspace) -> Workspace:
    workspace.add_plugin("hanging", HANGING_PLUGINS)
    return workspace


def configure(ws: Workspace, timeout: float, **settings) -> None:
    ws.configure(plugin_timeout_seconds=timeout, **settings)


@pytest.mark.parametrize("budget", [False, True], ids=["estimate-alongside", "estimate-first"])
def test_a_plugin_hanging_in_requests_fails_its_job_and_the_others_go_on(hanging: Workspace, daemon: DaemonRunner,
                                                                         budget: bool):
    # With a budget the job's requests are read once for its estimate before it is built: both passes hang.
    configure(hanging, 1.0, **({"cost": {"job_budget": 100.0}} if budget else {}))
    hanging.drop_manifest("stuck", {"task": "stuck", "texts": ["one", "two", "three"]})
    hanging.drop_manifest("translate", TRANSLATE)

    run = daemon.run_once()

    assert run.returncode == 1, run.stderr  # the stuck job is a failure --once reports
    stuck = run.outbox["stuck"].summary
    assert stuck["state"] == "rejected", stuck  # nothing of it was sent
    message = stuck["error"]["message"]
    assert "'stuck'" in message and "plugin 'hanging'" in message and "requests()" in message, message
    assert "plugin_timeout_seconds" in message
    assert run.outbox["translate"].state == "succeeded"


def test_a_plugin_hanging_in_organize_costs_its_job_the_organized_output_not_the_results(hanging: Workspace,
                                                                                        daemon: DaemonRunner):
    configure(hanging, 1.0)
    hanging.drop_manifest("brooding", {"task": "brooding", "texts": ["one", "two", "three"]})
    hanging.drop_manifest("translate", TRANSLATE)

    run = daemon.run_once()

    assert run.returncode == 5, run.stderr  # run --once: a task plugin failed (not a partial job)
    brooding = run.outbox["brooding"]
    assert brooding.state == "plugin_failed"
    message = brooding.summary["error"]["message"]
    assert "'brooding'" in message and "plugin 'hanging'" in message and "organize()" in message, message
    assert [line["status"] for line in brooding.results] == ["ok", "ok", "ok"]
    assert brooding.organized == {}
    assert json.loads((hanging.outbox / "translate" / "organized.json").read_text())["Hello"].keys() == {
        "French", "German"}


@pytest.mark.parametrize("task", ["stuck", "brooding"])
def test_sigterm_stops_the_daemon_while_a_plugin_hangs(hanging: Workspace, daemon: DaemonRunner, task: str):
    configure(hanging, 3600.0)  # the wait never ends on its own here
    running = daemon.start()
    hanging.drop_manifest("translate", TRANSLATE)
    hanging.wait_for_delivery("translate")
    hanging.drop_manifest(task, {"task": task, "texts": ["one", "two", "three"]})
    # Stuck in the plugin: building (requests) or fetched, its results being written (organize).
    hanging.wait_for(lambda: [job for job in hanging.status() if job["name"] == task
                              and job["state"] == ("building" if task == "stuck" else "fetched")],
                     what=f"{task} inside its plugin")
    hanging.drop_manifest("later", {**TRANSLATE, "texts": ["Later"]})
    assert hanging.wait_for_delivery("later").state == "succeeded", "other jobs go on meanwhile"

    assert running.stop(timeout=60) == 0  # SIGTERM: the abandoned plugin thread does not hold up the exit
    assert task not in hanging.delivered()
