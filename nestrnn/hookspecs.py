"""The plugin hooks. Plugins implement them with ``@nestrnn.hookimpl``.

Each hook receives a ``register`` callback; call it once per thing the plugin provides. Built-in
memory functions and tasks register through these same hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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


HOOK_KINDS: dict[str, Any] = {"register_memories": "memory", "register_tasks": "task"}
