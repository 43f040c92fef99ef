"""The plugin hooks. Plugins implement them with ``@nestrnn.hookimpl``.

Each hook receives a ``register`` callback; call it once per thing the plugin provides. Built-in
memory functions and tasks register through these same hooks.

The registry calls a kind's hook when that kind is first looked up: ``register_memories`` when a
layer first builds a memory function by name, ``register_tasks`` when a task is first looked up,
``register_loggers`` when a run names a logger in ``log.loggers`` (``nestrnn plugins`` loads them
all). A plugin module is imported before any of them, so keep its top level light and import heavy
code (data loading, models, a tracking service's client) inside the hook, as :mod:`nestrnn.tasks`
does.

An installed plugin's import and hooks run in a thread of their own, each given
``NESTRNN_PLUGIN_TIMEOUT`` seconds (30 by default) before nestrnn carries on without the plugin;
being off the main thread, they cannot install signal handlers. What they print goes to stderr.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

hookspec = pluggy.HookspecMarker("nestrnn")
hookimpl = pluggy.HookimplMarker("nestrnn")


@hookspec
def register_memories(register: Callable[..., None]) -> None:
    """Register memory functions: ``register(name, factory, description="")``.

    ``factory(hidden_size, **options)`` returns a :class:`nestrnn.memory.MemoryFunction`; a
    MemoryFunction subclass is itself a factory.
    """


@hookspec
def register_tasks(register: Callable[..., None]) -> None:
    """Register tasks: ``register(name, task_class, description="")``.

    See :mod:`nestrnn.tasks` for the task interface.
    """


@hookspec
def register_loggers(register: Callable[..., None]) -> None:
    """Register run loggers: ``register(name, factory, description="")``.

    ``factory()`` returns a :class:`nestrnn.engine.tracking.Logger` (a Logger subclass is itself
    a factory); a run enables it with ``log.loggers=[name]``. Import the tracking service's client
    inside the factory or the logger's ``start``, not at the plugin's top level.
    """


HOOKS: dict[str, str] = {
    "memory": "register_memories",
    "task": "register_tasks",
    "logger": "register_loggers",
}
"""The hook each kind of registered thing comes from."""
