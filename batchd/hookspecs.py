"""Hook specifications of batchd plugins.

Plugins implement these with ``from batchd import hookimpl`` and are found through the
``batchd`` entry-point group (or a ``plugins_dir`` of one-off modules). Hooks accept any subset
of the documented arguments, so new arguments can be added without breaking plugins.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from batchd.task import Task

hookspec = pluggy.HookspecMarker("batchd")


# --- Registration hooks, called once when the plugin registry is first used -------------------


@hookspec
def register_tasks(register: Callable[[Task], None]) -> None:
    """Register task types: call ``register(task)`` once per :class:`batchd.task.Task` instance.

    :param register: validates the task and adds it under ``task.name``; a name already taken by
        another plugin is an error.
    """
