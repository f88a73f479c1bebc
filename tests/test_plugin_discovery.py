"""Plugin discovery, one subprocess per route: entry points, plugins_dir, BATCHD_LOAD_PLUGINS,
disabled_plugins, check_pending and BATCHD_TRACE_PLUGINS, all seen through `batchd plugins`."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from batchd.plugins import get_tasks
from batchd.testing import Workspace
from test_plugins import SUMMARIZE_PLUGIN as ONE_OFF_PLUGIN

BUILTIN_TASKS = {"analysis", "documents", "embed", "sentiment", "template", "translate", "variations"}
BUILTIN_PLUGINS = BUILTIN_TASKS | {"cost", "log", "webhook", "email"}


def with_plugin_file(workspace: Workspace, name: str, body: str, **settings) -> Path:
    """Write the workspace's plugins/NAME.py (its plugins_dir), and ``settings`` into its config."""
    path = workspace.add_plugin(name, textwrap.dedent(body))
    if settings:
        workspace.configure(**settings)
    return path


def listed_plugins(workspace: Workspace, **env: str) -> dict[str, dict]:
    result = workspace.batchd("plugins", "--json", **env)
    assert result.returncode == 0, result.stderr
    return {plugin["name"]: plugin for plugin in json.loads(result.stdout)}


def test_entry_points_list_the_builtins(workspace: Workspace):
    plugins = listed_plugins(workspace)
    assert BUILTIN_PLUGINS <= plugins.keys()
    translate = plugins["translate"]
    assert translate["source"] == "entry point batchd"
    assert translate["version"]  # batchd's own version: the builtins are its entry points
    assert translate["hooks"] == ["register_tasks"]
    assert translate["tasks"] == ["translate"]


def test_table_output_names_each_plugin(workspace: Workspace):
    result = workspace.batchd("plugins")
    assert result.returncode == 0, result.stderr
    for name in BUILTIN_PLUGINS:
        assert name in result.stdout


def test_plugins_dir_file_is_listed_and_its_task_usable(workspace: Workspace):
    path = with_plugin_file(workspace, "summarize", ONE_OFF_PLUGIN)
    summarize = listed_plugins(workspace)["summarize"]
    assert summarize == {
        "name": "summarize", "version": None, "source": str(path), "hooks": ["register_tasks"], "tasks": ["summarize"],
    }
    schema = workspace.batchd("schema")
    assert schema.returncode == 0, schema.stderr
    assert "summarize" in schema.stdout


def test_empty_load_plugins_loads_no_entry_points(workspace: Workspace):
    with_plugin_file(workspace, "summarize", ONE_OFF_PLUGIN)
    assert listed_plugins(workspace, BATCHD_LOAD_PLUGINS="").keys() == {"summarize"}  # plugins_dir still loads


def test_load_plugins_selects_entry_points(workspace: Workspace):
    assert listed_plugins(workspace, BATCHD_LOAD_PLUGINS="translate").keys() == {"translate"}


def test_unknown_load_plugins_name_is_an_error(workspace: Workspace):
    result = workspace.batchd("plugins", BATCHD_LOAD_PLUGINS="translate,nosuch")
    assert result.returncode != 0
    assert "BATCHD_LOAD_PLUGINS names unknown plugins: nosuch" in result.stderr
    assert "available: " in result.stderr and "translate" in result.stderr


def test_disabled_plugins_are_not_loaded(workspace: Workspace):
    # A disabled file is not even imported, so a broken one-off plugin can be switched off.
    with_plugin_file(workspace, "broken", "raise ImportError('not today')\n",
                     disabled_plugins=["sentiment", "broken"])
    plugins = listed_plugins(workspace)
    assert plugins.keys() == BUILTIN_PLUGINS - {"sentiment"}
    schema = workspace.batchd("schema")
    assert schema.returncode == 0, schema.stderr
    assert '"sentiment"' not in schema.stdout and '"translate"' in schema.stdout


def test_misspelt_hook_fails_at_start_up(workspace: Workspace):
    misspelt = "from batchd import hookimpl\n\n@hookimpl\ndef register_task(register):\n    pass\n"
    with_plugin_file(workspace, "typo", misspelt)
    result = workspace.batchd("plugins")
    assert result.returncode != 0
    assert "register_task" in result.stderr and "'typo'" in result.stderr
    assert "Traceback" not in result.stderr


def test_trace_plugins_logs_hook_calls(workspace: Workspace):
    result = workspace.batchd("plugins", BATCHD_TRACE_PLUGINS="1", BATCHD_LOAD_PLUGINS="translate")
    assert result.returncode == 0, result.stderr
    assert "batchd.plugins" in result.stderr and "register_tasks [hook]" in result.stderr
    assert "<register for plugin 'translate'>" in result.stderr
    assert "register_tasks" not in workspace.batchd("plugins").stderr  # off by default


def test_cache_follows_the_environment(monkeypatch):
    # In-process: the cached registry must change with BATCHD_LOAD_PLUGINS, not keep the first answer.
    monkeypatch.setenv("BATCHD_LOAD_PLUGINS", "translate")
    assert get_tasks().keys() == {"translate"}
    monkeypatch.setenv("BATCHD_LOAD_PLUGINS", "")
    assert get_tasks() == {}
    monkeypatch.delenv("BATCHD_LOAD_PLUGINS")
    assert BUILTIN_TASKS <= get_tasks().keys()
