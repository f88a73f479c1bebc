"""The plugin manager and the registry of task types.

Every task, the builtin ones included, comes from a plugin: installed distributions declare
modules in the ``batchd`` entry-point group, and a ``plugins_dir`` may hold one-off modules.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
from pathlib import Path
from types import ModuleType

import pluggy
from pydantic import BaseModel

from batchd import hookspecs
from batchd.manifest import COMMON_FIELDS
from batchd.task import Task

ENTRY_POINT_GROUP = "batchd"


class PluginError(Exception):
    """A plugin failed to load or registered something invalid; the message names the plugin."""


@functools.cache
def get_plugin_manager(plugins_dir: Path | None = None) -> pluggy.PluginManager:
    """The plugin manager with every entry-point plugin (and ``plugins_dir`` module) registered.

    Cached per ``plugins_dir``: plugins are imported once per process.
    """
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            # Loading by name (rather than the whole group at once) lets a failure name its
            # plugin, while pluggy still records the distribution for introspection.
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=entry_point.name)
        except Exception as exc:
            raise PluginError(
                f"plugin {entry_point.name!r} ({entry_point.value}) failed to load: {exc}"
            ) from exc
    if plugins_dir is not None:
        for path in sorted(Path(plugins_dir).glob("*.py")):
            _register_module(pm, _import_file(path), name=str(path))
    try:
        pm.check_pending()  # a misspelt hook name must fail loudly, not be ignored
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {exc.plugin!r}: {exc}") from exc
    return pm


@functools.cache
def get_tasks(plugins_dir: Path | None = None) -> dict[str, Task]:
    """All registered tasks by name. Cached; treat the result as read-only."""
    pm = get_plugin_manager(plugins_dir)
    tasks: dict[str, Task] = {}
    owners: dict[str, str] = {}
    # Each implementation gets its own register() so errors can name the plugin at fault.
    for impl in pm.hook.register_tasks.get_hookimpls():
        register = functools.partial(_register_task, tasks, owners, impl.plugin_name)
        arguments = {"register": register}
        try:
            impl.function(*(arguments[name] for name in impl.argnames))
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(f"plugin {impl.plugin_name!r}: register_tasks failed: {exc!r}") from exc
    return tasks


def _register_task(tasks: dict[str, Task], owners: dict[str, str], plugin: str, task: Task) -> None:
    problem = _task_problem(task)
    if problem:
        raise PluginError(f"plugin {plugin!r} registered an invalid task {task!r}: {problem}")
    if task.name in tasks:
        raise PluginError(
            f"plugin {plugin!r} registered task {task.name!r}, already registered by plugin {owners[task.name]!r}"
        )
    tasks[task.name] = task
    owners[task.name] = plugin


def _task_problem(task: object) -> str | None:
    """What makes ``task`` unusable, or ``None``."""
    if not isinstance(task, Task):
        return "not a batchd.task.Task instance"
    name = getattr(task, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        return "name must be an identifier-like string"
    for attribute in ("Params", "Item"):
        model = getattr(task, attribute, None)
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return f"{attribute} must be a pydantic model class"
    if task.Params.model_config.get("extra") != "forbid":
        return 'Params must set extra="forbid" so misspelt manifest fields are reported'
    if "id" not in task.Item.model_fields:
        return "Item must have an 'id' field"
    clashes = sorted(set(COMMON_FIELDS) & task.Params.model_fields.keys())
    if clashes:
        return f"Params fields {clashes} clash with common manifest fields"
    return None


def _import_file(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"batchd_plugins_dir.{path.stem}", path)
    if spec is None or spec.loader is None:
        raise PluginError(f"plugin file {path} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise PluginError(f"plugin file {path} failed to load: {exc!r}") from exc
    return module


def _register_module(pm: pluggy.PluginManager, module: ModuleType, name: str) -> None:
    try:
        pm.register(module, name=name)
    except (pluggy.PluginValidationError, ValueError) as exc:
        raise PluginError(f"plugin {name!r}: {exc}") from exc
