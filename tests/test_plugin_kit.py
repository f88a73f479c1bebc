"""The kit for plugin authors: every hook documented and tested, the docs' code honest, the
example plugin installable with its own tests passing, and batchd.testing's daemon fixture."""

from __future__ import annotations

import ast
import json
import re
import textwrap
from pathlib import Path

import pytest

from batchd import hookspecs
from batchd.testing import DaemonRunner, Emulator, Workspace
from conftest import REPO

DOCS = REPO / "docs" / "plugins.md"
EXAMPLE = REPO / "examples" / "batchd-keywords"
EXAMPLE_MODULE = EXAMPLE / "batchd_keywords.py"
EXAMPLE_MANIFEST = EXAMPLE / "manifests" / "articles.toml"


def hookspec_names() -> set[str]:
    return {name for name, value in vars(hookspecs).items() if callable(value) and hasattr(value, "batchd_spec")}


def docs_section(title: str) -> str:
    """The text of the ``## TITLE`` section of docs/plugins.md, up to the next ``## `` heading."""
    found = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", DOCS.read_text(), re.M | re.S)
    assert found, f"docs/plugins.md has no '## {title}' section"
    return found[1]


def documented_hooks() -> dict[str, str]:
    """The ``### <hook>`` subsections of the Hooks section, by hook name (a signature may follow it)."""
    parts = re.split(r"^### `?(\w+)[^\n]*\n", docs_section("Hooks"), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def hook_test_names() -> set[str]:
    """Every test function named ``test_hook_...`` under tests/."""
    names = set()
    for path in (REPO / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_hook_"):
                names.add(node.name)
    return names


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```(?:python|py)\n(.*?)^```", markdown, re.M | re.S)


# --- Every hook has documentation and a test of its own ---------------------------------------


def test_every_hookspec_is_documented_and_tested():
    hooks = hookspec_names()
    assert "register_tasks" in hooks  # the scan finds hookspecs at all
    documented = documented_hooks()
    tests = hook_test_names()
    undocumented = sorted(hooks - documented.keys())
    untested = sorted(hook for hook in hooks
                      if not any(name == f"test_hook_{hook}" or name.startswith(f"test_hook_{hook}_") for name in tests))
    assert not undocumented, f"hooks without a '### <hook>' section under '## Hooks' in docs/plugins.md: {undocumented}"
    assert not untested, f"hooks without a test function named test_hook_<hook>... under tests/: {untested}"


def test_every_documented_hook_exists():
    stale = sorted(documented_hooks().keys() - hookspec_names())
    assert not stale, f"docs/plugins.md documents hooks that batchd.hookspecs does not define: {stale}"


def test_every_hook_section_has_an_example_and_its_arguments():
    for hook, text in documented_hooks().items():
        assert python_blocks(text), f"### {hook} has no python example"
        spec = getattr(hookspecs, hook)
        for argument in spec.__code__.co_varnames[: spec.__code__.co_argcount]:
            assert re.search(rf"`{argument}\b", text), f"### {hook} does not describe its argument {argument!r}"


# --- The docs' code runs ---------------------------------------------------------------------------


def test_tutorial_code_is_the_example_plugin():
    # Each step of the tutorial shows a piece of the example module as it is, so the tutorial
    # cannot drift from the plugin that the example's own tests (and test below) run.
    sources = [EXAMPLE_MODULE.read_text(), (EXAMPLE / "tests" / "test_keywords.py").read_text()]
    blocks = python_blocks(docs_section("Tutorial: a keywords task from nothing"))
    assert len(blocks) >= 4
    for block in blocks:
        assert any(block in source for source in sources), f"this tutorial block is not in the example:\n{block}"


def test_hook_register_tasks_documented_example_runs(workspace: Workspace, daemon: DaemonRunner):
    [example] = python_blocks(documented_hooks()["register_tasks"])[:1]
    workspace.add_plugin("shout", example)
    workspace.drop_manifest("loud", {"task": "shout", "texts": ["hello there"]})

    run = daemon.run_once()

    assert run.returncode == 0, run.stderr
    assert run.outbox["loud"].state == "succeeded"
    [(key, text)] = run.outbox["loud"].organized.items()
    assert key == "1" and text.isupper() and "HELLO THERE" in text


def test_hook_register_tasks_from_a_plugins_dir_file_with_postponed_annotations(workspace: Workspace, daemon: DaemonRunner):
    # The example module as a one-off plugin: its pydantic models use `from __future__ import
    # annotations`, which only resolve when the module is in sys.modules like an imported one.
    workspace.add_plugin("keywords_one_off", EXAMPLE_MODULE.read_text())
    workspace.drop_manifest("articles.toml", EXAMPLE_MANIFEST.read_text())

    run = daemon.run_once()

    assert run.returncode == 0, run.stderr
    organized = run.outbox["articles"].organized
    assert organized.keys() == {"solar", "rail", "bees"}
    assert all(isinstance(keywords, list) and keywords for keywords in organized.values())


# --- batchd.testing -----------------------------------------------------------------------------------


def test_daemon_fixture_runs_until_stopped(workspace: Workspace, daemon: DaemonRunner):
    running = daemon.start()
    workspace.drop_manifest("one", {"task": "translate", "texts": ["Hi"], "languages": ["French"]})
    delivered = workspace.wait_for_delivery("one")
    assert delivered.state == "succeeded" and delivered.organized["Hi"].keys() == {"French"}
    assert [line["status"] for line in delivered.results] == ["ok"]
    assert running.stop() == 0
    assert "one.toml" in running.output()


def test_daemon_fixture_stops_what_a_test_left_running(workspace: Workspace):
    runner = DaemonRunner(workspace)
    running = runner.start()
    workspace.wait_for(lambda: (workspace.state / "journal.db").exists(), what="daemon up")
    runner.stop_all()
    assert running.returncode == 0


def test_daemon_fixture_can_use_the_tests_emulator(workspace: Workspace, daemon: DaemonRunner, emulator: Emulator):
    workspace.drop_manifest("one", {"task": "translate", "texts": ["Hi", "Bye"], "languages": ["French"]})

    run = daemon.run_once(emulator=emulator)

    assert run.returncode == 0, run.stderr
    summary = run.outbox["one"].summary
    assert (summary["provider"], summary["emulated"]) == ("gemini", False)  # as if it were Google
    [job] = emulator.client().batches.list()
    assert job.name == summary["remote_batches"][0]["name"]
    assert job.state.name == "JOB_STATE_SUCCEEDED"


def test_manifests_can_be_dropped_as_json(workspace: Workspace, daemon: DaemonRunner):
    workspace.drop_manifest("job.json", {"task": "translate", "texts": ["Hi"], "languages": ["German"]})
    run = daemon.run_once()
    assert run.returncode == 0, run.stderr
    assert run.outbox["job"].organized["Hi"].keys() == {"German"}


# --- The example plugin package, installed like anyone's ------------------------------------------


@pytest.mark.slow
def test_the_example_plugin_installs_and_its_own_tests_pass(fresh_venv, source_copy, tmp_path):
    example = source_copy / "examples" / EXAMPLE.name
    fresh_venv.install(source_copy, example)
    workspace = Workspace.create(tmp_path / "workspace", python=str(fresh_venv.python))

    listed = workspace.batchd("plugins", "--json")

    assert listed.returncode == 0, listed.stderr
    plugins = {plugin["name"]: plugin for plugin in json.loads(listed.stdout)}
    assert plugins["keywords"] == {"name": "keywords", "version": "0.1.0", "source": "entry point batchd-keywords",
                                   "hooks": ["register_tasks"], "tasks": ["keywords"]}
    assert "translate" in plugins  # batchd's builtins come through the same door
    only = workspace.batchd("plugins", "--json", BATCHD_LOAD_PLUGINS="keywords")
    assert [plugin["name"] for plugin in json.loads(only.stdout)] == ["keywords"], only.stderr
    workspace.configure(disabled_plugins=["keywords"])
    without = workspace.batchd("plugins", "--json")
    assert "keywords" not in {plugin["name"] for plugin in json.loads(without.stdout)}, without.stderr
    workspace.configure()
    # From outside the example's folder, so its module is imported from the venv, as installed.
    tests = fresh_venv.run("-m", "pytest", "-q", "-p", "no:cacheprovider", str(example), cwd=tmp_path, check=False)
    assert tests.returncode == 0, tests.stdout[-5000:] + tests.stderr[-2000:]
    expected = len(re.findall(r"^def test_", (example / "tests" / "test_keywords.py").read_text(), re.M))
    assert f"{expected} passed" in tests.stdout, tests.stdout[-2000:]
    imported = fresh_venv.run("-c", "import batchd_keywords; print(batchd_keywords.__file__)", cwd=tmp_path).stdout
    assert imported.startswith(str(fresh_venv.site))
