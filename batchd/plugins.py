"""The plugin manager and the registry of task types.

Every task, the builtin ones included, comes from a plugin. Plugins are found in three places:

- the ``batchd`` entry-point group of installed distributions (the builtins are entry points of
  batchd's own distribution);
- ``*.py`` files in ``plugins_dir``, one-off plugins that need no packaging, named by file stem;
- ``BATCHD_LOAD_PLUGINS=a,b`` restricts the entry-point plugins to those names (empty: none), and
  the ``disabled_plugins`` setting skips plugins of either kind by name.

``BATCHD_TRACE_PLUGINS=1`` logs every hook call to the ``batchd.plugins`` logger.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import inspect
import logging
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

import pluggy
from pydantic import BaseModel

from batchd import hookspecs
from batchd.manifest import COMMON_FIELDS
from batchd.task import Task

if TYPE_CHECKING:
    from batchd.config import Settings

ENTRY_POINT_GROUP = "batchd"
#: Comma list of the entry-point plugins to load; set but empty loads none.
LOAD_PLUGINS_ENV_VAR = "BATCHD_LOAD_PLUGINS"
#: ``1`` logs every hook call (with its arguments and results) to the ``batchd.plugins`` logger.
TRACE_PLUGINS_ENV_VAR = "BATCHD_TRACE_PLUGINS"

log = logging.getLogger("batchd.plugins")

_Function = TypeVar("_Function", bound=Callable[..., Any])


class PluginError(Exception):
    """A plugin failed to load or registered something invalid; the message names the plugin."""


@dataclass(frozen=True)
class PluginInfo:
    """One loaded plugin, as ``batchd plugins`` shows it."""

    name: str
    version: str | None  # the distribution's version; None for a plugins_dir file
    source: str  # "entry point DIST", or the plugins_dir file's path
    hooks: list[str]
    tasks: list[str]


@dataclass
class _TaskRegistry:
    tasks: dict[str, Task] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)  # task name → name of the plugin that registered it


def _cached_per_environment(function: _Function) -> _Function:
    """Like ``functools.cache``, but the plugin environment variables are part of the key.

    They choose which plugins load and whether hooks are traced, so a call under another
    environment must not get what was built for the previous one. As with ``functools.cache``,
    ``__wrapped__`` is the uncached function.
    """

    @functools.cache
    def cached(environment: tuple[str | None, ...], *args: Any, **kwargs: Any) -> Any:
        return function(*args, **kwargs)

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        environment = tuple(os.environ.get(name) for name in (LOAD_PLUGINS_ENV_VAR, TRACE_PLUGINS_ENV_VAR))
        return cached(environment, *args, **kwargs)

    wrapper.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


def tasks_for(settings: Settings) -> dict[str, Task]:
    """The tasks of the plugins ``settings`` selects (``plugins_dir``, ``disabled_plugins``)."""
    return get_tasks(settings.plugins_dir, frozenset(settings.disabled_plugins))


def task_owners(settings: Settings) -> dict[str, str]:
    """The plugin that registered each task of the plugins ``settings`` selects, by task name."""
    return dict(_task_registry(settings.plugins_dir, frozenset(settings.disabled_plugins)).owners)


def plugins_for(settings: Settings) -> list[PluginInfo]:
    """The plugins ``settings`` selects, described for ``batchd plugins``."""
    return describe_plugins(settings.plugins_dir, frozenset(settings.disabled_plugins))


@_cached_per_environment
def get_plugin_manager(plugins_dir: Path | None = None, disabled: frozenset[str] = frozenset()) -> pluggy.PluginManager:
    """The plugin manager with the selected entry-point plugins and ``plugins_dir`` modules registered.

    Cached per arguments and plugin environment variables: plugins are imported once per process.

    :param disabled: names of plugins (entry-point names or plugins_dir file stems) not to load.
    :raises PluginError: a plugin fails to import or implements a hook that does not exist, or
        ``BATCHD_LOAD_PLUGINS`` names an unknown entry point.
    """
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    if os.environ.get(TRACE_PLUGINS_ENV_VAR) == "1":
        # Tracing is on before any plugin is registered so registration hooks show up too.
        pm.trace.root.setwriter(lambda line: log.info("%s", line.rstrip("\n")))
        pm.enable_tracing()
    entry_points = {point.name: point for point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    plugin_files = sorted(Path(plugins_dir).glob("*.py")) if plugins_dir is not None else []
    unknown_disabled = disabled - entry_points.keys() - {path.stem for path in plugin_files}
    if unknown_disabled:
        # Not an error: uninstalling a plugin must not stop a daemon whose config disables it.
        log.warning("disabled_plugins names plugins that are not installed: %s", ", ".join(sorted(unknown_disabled)))
    for name in _selected_entry_points(entry_points.keys()):
        if name in disabled:
            continue
        # Loaded one by one, in the order of the names, from the one scan of the installed distributions
        # above: a failure names its plugin, and hooks are called in the same order whatever is installed
        # (pluggy's load_setuptools_entrypoints scans every distribution again at each call: 5 ms each).
        try:
            pm.register(entry_points[name].load(), name=name)
        except Exception as exc:
            raise PluginError(f"plugin {name!r} ({entry_points[name].value}) failed to load: {exc}") from exc
    for path in plugin_files:
        if path.stem not in disabled:
            _register_file(pm, path)
    try:
        pm.check_pending()  # a misspelt hook name must fail loudly, not be ignored
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {_plugin_label(pm, exc.plugin)}: {exc}") from exc
    return pm


def single_plugin_callers(pm: pluggy.PluginManager, hook_name: str) -> dict[str, pluggy.HookCaller]:
    """A hook caller per plugin implementing ``hook_name``, each reaching that plugin alone.

    pluggy stops a hook call at the first exception, so a host that must call every plugin
    whatever the others do calls them one by one; going through hook callers (rather than the
    implementation functions) keeps argument selection and ``BATCHD_TRACE_PLUGINS`` working.
    """
    implementations = getattr(pm.hook, hook_name).get_hookimpls()
    callers = {}
    for impl in implementations:
        others = [other.plugin for other in implementations if other is not impl]
        callers[impl.plugin_name] = pm.subset_hook_caller(hook_name, remove_plugins=others)
    return callers


def _selected_entry_points(available: Iterable[str]) -> list[str]:
    """The entry-point names to load: all of them, or those ``BATCHD_LOAD_PLUGINS`` lists."""
    available = sorted(available)
    selection = os.environ.get(LOAD_PLUGINS_ENV_VAR)
    if selection is None:
        return available
    wanted = [name.strip() for name in selection.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in available]
    if unknown:
        raise PluginError(
            f"{LOAD_PLUGINS_ENV_VAR} names unknown plugins: {', '.join(unknown)}"
            f" (available: {', '.join(available) or 'none'})"
        )
    return wanted


def get_tasks(plugins_dir: Path | None = None, disabled: frozenset[str] = frozenset()) -> dict[str, Task]:
    """All registered tasks by name. Cached; treat the result as read-only.

    The arguments select plugins as for :func:`get_plugin_manager`.
    """
    return _task_registry(plugins_dir, disabled).tasks


def describe_plugins(plugins_dir: Path | None = None, disabled: frozenset[str] = frozenset()) -> list[PluginInfo]:
    """Each loaded plugin with its version, source, hooks and tasks, sorted by name."""
    pm = get_plugin_manager(plugins_dir, disabled)
    owners = _task_registry(plugins_dir, disabled).owners
    entry_points = {point.name: point for point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    described = []
    for name, plugin in pm.list_name_plugin():
        point = entry_points.get(name)
        # (a plugins_dir file may have an entry point's name, when that entry point is not loaded)
        loaded_from = getattr(inspect.getmodule(plugin), "__name__", None)
        dist = point.dist if point is not None and loaded_from == point.module else None
        described.append(
            PluginInfo(
                name=name,
                version=dist.version if dist else None,
                source=f"entry point {dist.name}" if dist else plugin.__file__,
                hooks=sorted(caller.name for caller in pm.get_hookcallers(plugin) or ()),
                tasks=sorted(task for task, owner in owners.items() if owner == name),
            )
        )
    return sorted(described, key=lambda info: info.name)


@_cached_per_environment
def _task_registry(plugins_dir: Path | None, disabled: frozenset[str]) -> _TaskRegistry:
    pm = get_plugin_manager(plugins_dir, disabled)
    registry = _TaskRegistry()
    hook = pm.hook.register_tasks
    implementations = hook.get_hookimpls()
    # Each implementation is called alone, with its own register(), so errors can name the
    # plugin at fault; calling through a hook caller (not impl.function) keeps tracing working.
    for impl in implementations:
        others = [other.plugin for other in implementations if other is not impl]
        try:
            pm.subset_hook_caller(hook.name, remove_plugins=others)(register=_Register(registry, impl.plugin_name))
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(f"plugin {impl.plugin_name!r}: register_tasks failed: {exc!r}") from exc
    return registry


class _Register:
    """The ``register`` callback handed to one plugin's ``register_tasks``."""

    def __init__(self, registry: _TaskRegistry, plugin: str):
        self.registry = registry
        self.plugin = plugin

    def __call__(self, task: Task) -> None:
        problem = _task_problem(task)
        if problem:
            raise PluginError(f"plugin {self.plugin!r} registered an invalid task {task!r}: {problem}")
        if task.name in self.registry.tasks:
            raise PluginError(
                f"plugin {self.plugin!r} registered task {task.name!r},"
                f" already registered by plugin {self.registry.owners[task.name]!r}"
            )
        self.registry.tasks[task.name] = task
        self.registry.owners[task.name] = self.plugin

    def __repr__(self) -> str:  # what BATCHD_TRACE_PLUGINS shows as the argument
        return f"<register for plugin {self.plugin!r}>"


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
    if task.kind not in ("generate", "embed"):
        return f'kind must be "generate" or "embed", not {task.kind!r}'
    clashes = sorted(set(COMMON_FIELDS) & task.Params.model_fields.keys())
    if clashes:
        return f"Params fields {clashes} clash with common manifest fields"
    return None


def _import_file(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"batchd_plugins_dir.{path.stem}", path)
    if spec is None or spec.loader is None:
        raise PluginError(f"plugin file {path} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    # In sys.modules, as an imported module would be: pydantic resolves a model's postponed
    # annotations (``from __future__ import annotations``) through its module there.
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[spec.name]
        raise PluginError(f"plugin file {path} failed to load: {exc!r}") from exc
    return module


def _register_file(pm: pluggy.PluginManager, path: Path) -> None:
    """Register a plugins_dir module under its file stem, the name ``disabled_plugins`` uses."""
    module = _import_file(path)
    try:
        pm.register(module, name=path.stem)
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {path.stem!r} ({path}): {exc}") from exc
    except ValueError as exc:  # pluggy's "Plugin name already registered"
        taken_by = _plugin_label(pm, pm.get_plugin(path.stem))
        raise PluginError(f"plugin file {path}: its name is taken by plugin {taken_by}; rename the file") from exc


def _plugin_label(pm: pluggy.PluginManager, plugin: object) -> str:
    """A plugin's name and where its code lives, for error messages."""
    return f"{pm.get_name(plugin)!r} ({getattr(plugin, '__file__', plugin)!r})"
