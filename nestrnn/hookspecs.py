"""The plugin hooks. Plugins implement them with ``@nestrnn.hookimpl``.

Each hook receives a ``register`` callback; call it once per thing the plugin provides. Built-in
memory functions and tasks register through these same hooks.

The registry calls a kind's hook when that kind is first looked up: ``register_memories`` when a
layer first builds a memory function by name, ``register_tasks`` when a task is first looked up. A
plugin module is imported before either, so keep its top level light and import heavy code (data
loading, models) inside the hook, as :mod:`nestrnn.tasks` does.

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


HOOKS: dict[str, str] = {"memory": "register_memories", "task": "register_tasks"}
"""The hook each kind of registered thing comes from."""
