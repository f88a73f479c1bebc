"""The generated files in the repository match the code they are generated from."""

from __future__ import annotations

import pytest

from batchd import reference
from conftest import REPO

STALE = "{path} is stale: regenerate every generated file with `.venv/bin/python -m batchd.reference` and commit them"


@pytest.mark.parametrize("path", list(reference.pages()), ids=str)
def test_the_committed_file_is_what_the_code_generates(path):
    committed = REPO / path
    assert committed.exists(), STALE.format(path=path)
    assert committed.read_text() == reference.pages()[path], STALE.format(path=path)


def test_the_configuration_reference_lists_every_setting_with_its_environment_variable():
    from batchd.config import EmulatorSettings, Settings

    page = reference.configuration_reference()
    for name, field in Settings.model_fields.items():
        if name not in ("limits", "retry", "emulator", "cost", "notify"):  # tables: their keys are listed as table.key
            assert f"| `{name}` |" in page and f"`BATCHD_{name.upper()}`" in page
    assert "| `limits.nesting` |" in page and "| `retry.attempts` |" in page and "| `cost.daily_budget` |" in page and "`BATCHD_NOTIFY__WEBHOOK__SECRET`" in page
    for name in EmulatorSettings.model_fields:
        assert f"| `emulator.{name}` |" in page and f"`BATCHD_EMULATOR__{name.upper()}`" in page
    assert "| `poll_interval` | number (> 0) | `5.0` |" in page


def test_the_manifest_reference_has_every_task_and_field_of_the_schema():
    from batchd.config import Settings
    from batchd.manifest import manifest_json_schema
    from batchd.plugins import tasks_for

    tasks = tasks_for(Settings(plugins_dir=None, disabled_plugins=[]))
    schema = manifest_json_schema(tasks)
    page = reference.manifests_reference(tasks)
    for name in tasks:
        assert f'## `task = "{name}"`' in page
    for definition in schema["$defs"].values():
        for field in definition.get("properties", {}):
            assert f"| `{field}` |" in page
