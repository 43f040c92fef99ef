"""The plugin registry: memory functions and tasks, from built-ins, installed packages and scripts.

Sources, in load order:

1. built-in plugin modules (``BUILTIN_PLUGINS``), which use the same hooks as everyone else;
2. installed distributions with an entry point in the group ``nestrnn`` (skipped when the
   environment variable ``NESTRNN_DISABLE_PLUGINS`` is set to a non-empty value other than "0");
3. ``@register_memory`` / ``@register_task`` decorators in the user's own code.

A plugin that fails to import or whose hook raises (an exception, or ``SystemExit``) is recorded in ``failures`` with its name and the
reason; it never stops the others. Two providers of one name make that name unusable: looking it up
raises an error that names both.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from nestrnn import hookspecs

ENTRY_POINT_GROUP = "nestrnn"
DISABLE_ENV = "NESTRNN_DISABLE_PLUGINS"
BUILTIN_PLUGINS = (
    "nestrnn.memory.builtin",
    "nestrnn.plugins.triton_nested",
    "nestrnn.tasks",
)
KINDS = ("memory", "task")
PLUGIN_ERRORS = (Exception, SystemExit)
"""What a plugin's import or hook may raise without stopping nestrnn (Ctrl-C still stops it)."""


class RegistryError(LookupError):
    """An unknown or ambiguous memory function or task name."""


@dataclass(frozen=True)
class Provider:
    """Where a registration came from."""

    plugin: str
    distribution: str | None = None
    version: str | None = None
    builtin: bool = False

    def describe(self) -> str:
        if self.distribution:
            return f"plugin {self.plugin!r} from {self.distribution} {self.version or ''}".strip()
        return f"plugin {self.plugin!r}"


@dataclass(frozen=True)
class Entry:
    """One registered memory function or task."""

    name: str
    kind: str
    factory: Callable[..., Any]
    provider: Provider
    description: str = ""


@dataclass
class Failure:
    """A plugin that could not be loaded or whose hook raised."""

    provider: Provider
    error: str


@dataclass
class Registry:
    entries: dict[str, dict[str, Entry]] = field(default_factory=lambda: {k: {} for k in KINDS})
    conflicts: dict[tuple[str, str], list[Provider]] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    plugins: list[Provider] = field(default_factory=list)

    def add(self, entry: Entry) -> None:
        """Add ``entry``; a second provider of the same name makes a conflict."""
        table = self.entries[entry.kind]
        existing = table.get(entry.name)
        key = (entry.kind, entry.name)
        if key in self.conflicts:
            self.conflicts[key].append(entry.provider)
        elif existing is not None and existing.provider != entry.provider:
            self.conflicts[key] = [existing.provider, entry.provider]
            del table[entry.name]
        else:
            table[entry.name] = entry

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries[kind])

    def get(self, kind: str, name: str) -> Entry:
        """The entry called ``name``; a clear error when it is unknown or registered twice."""
        providers = self.conflicts.get((kind, name))
        if providers:
            listed = " and ".join(p.describe() for p in providers)
            raise RegistryError(
                f"{kind} name {name!r} is registered by more than one plugin: {listed}; "
                f"uninstall one of them or disable plugins with {DISABLE_ENV}=1"
            )
        try:
            return self.entries[kind][name]
        except KeyError:
            known = ", ".join(self.names(kind)) or "none"
            raise RegistryError(f"unknown {kind} {name!r}; known {kind} names: {known}") from None

    def provided_by(self, provider: Provider) -> dict[str, list[str]]:
        """What ``provider`` registered, by kind."""
        found = {
            kind: sorted(n for n, e in self.entries[kind].items() if e.provider == provider)
            for kind in KINDS
        }
        for (kind, name), providers in self.conflicts.items():
            if provider in providers:
                found[kind].append(name)
        return found

    def report(self) -> dict[str, Any]:
        """Everything ``nestrnn plugins --json`` shows."""
        return {
            "plugins": [
                {
                    "name": p.plugin,
                    "distribution": p.distribution,
                    "version": p.version,
                    "builtin": p.builtin,
                    "registered": self.provided_by(p),
                }
                for p in self.plugins
            ],
            "failures": [
                {
                    "name": f.provider.plugin,
                    "distribution": f.provider.distribution,
                    "version": f.provider.version,
                    "error": f.error,
                }
                for f in self.failures
            ],
            "conflicts": [
                {"kind": kind, "name": name, "providers": [p.describe() for p in providers]}
                for (kind, name), providers in sorted(self.conflicts.items())
            ],
            "external_plugins_disabled": external_plugins_disabled(),
        }


def external_plugins_disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "") not in ("", "0")


def _describe_error(error: BaseException) -> str:
    if isinstance(error, SystemExit):
        return f"SystemExit: the plugin called sys.exit({error.code!r})"
    return f"{type(error).__name__}: {error}"


def _builtin_provider(module: str) -> Provider:
    return Provider(module, "nestrnn", _version("nestrnn"), builtin=True)


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _load_plugins(manager: pluggy.PluginManager, registry: Registry) -> dict[str, Provider]:
    """Register built-in and entry-point plugins with ``manager``; failures go to the registry."""
    providers: dict[str, Provider] = {}
    candidates: list[tuple[Provider, Callable[[], Any]]] = [
        (_builtin_provider(name), lambda name=name: importlib.import_module(name))
        for name in BUILTIN_PLUGINS
    ]
    if not external_plugins_disabled():
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = entry_point.dist
            provider = Provider(
                entry_point.name, dist.name if dist else None, dist.version if dist else None
            )
            candidates.append((provider, entry_point.load))
    for provider, load in candidates:
        if provider.plugin in providers:
            registry.failures.append(
                Failure(provider, f"plugin name {provider.plugin!r} is already taken")
            )
            continue
        try:
            manager.register(load(), name=provider.plugin)
        except PLUGIN_ERRORS as error:  # a broken plugin must not take the others down
            registry.failures.append(Failure(provider, _describe_error(error)))
            continue
        providers[provider.plugin] = provider
        registry.plugins.append(provider)
    return providers


def _call_hooks(
    manager: pluggy.PluginManager, registry: Registry, providers: dict[str, Provider]
) -> None:
    """Call every plugin's hooks one at a time, so that one raising only loses that plugin."""
    for hook_name, kind in hookspecs.HOOK_KINDS.items():
        for impl in getattr(manager.hook, hook_name).get_hookimpls():
            provider = providers[impl.plugin_name]
            added: list[Entry] = []

            def register(
                name: str,
                factory: Callable[..., Any],
                description: str = "",
                _kind: str = kind,
                _provider: Provider = provider,
                _added: list[Entry] = added,
            ) -> None:
                _added.append(_make_entry(name, _kind, factory, _provider, description))

            try:
                impl.function(register=register)
            except PLUGIN_ERRORS as error:
                registry.failures.append(
                    Failure(provider, f"{hook_name}: {_describe_error(error)}")
                )
                continue
            for entry in added:
                registry.add(entry)


def _make_entry(
    name: str, kind: str, factory: Callable[..., Any], provider: Provider, description: str
) -> Entry:
    if not isinstance(name, str) or not name:
        raise TypeError(f"a {kind} name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise TypeError(f"the {kind} {name!r} must be registered with a callable, got {factory!r}")
    doc = (getattr(factory, "__doc__", None) or "").strip().splitlines()
    return Entry(name, kind, factory, provider, description or (doc[0] if doc else ""))


_lock = threading.RLock()
_registry: Registry | None = None
_script_entries: list[Entry] = []


def get_registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _registry
    with _lock:
        if _registry is None:
            registry = Registry()
            manager = pluggy.PluginManager(ENTRY_POINT_GROUP)
            manager.add_hookspecs(hookspecs)
            providers = _load_plugins(manager, registry)
            _call_hooks(manager, registry, providers)
            for entry in _script_entries:
                registry.add(entry)
            _registry = registry
        return _registry


def reset_registry() -> None:
    """Forget the built registry (the next use rebuilds it); script registrations are kept."""
    global _registry
    with _lock:
        _registry = None


def _script_decorator(kind: str, name: str, description: str) -> Callable[[Any], Any]:
    def decorator(factory: Any) -> Any:
        module = getattr(factory, "__module__", None) or "__main__"
        entry = _make_entry(name, kind, factory, Provider(f"script:{module}"), description)
        with _lock:
            _script_entries[:] = [e for e in _script_entries if e.name != name or e.kind != kind]
            _script_entries.append(entry)
            if _registry is not None:
                _registry.add(entry)  # the same provider registering again replaces its entry
        return factory

    return decorator


def register_memory(name: str, description: str = "") -> Callable[[Any], Any]:
    """Decorator registering a memory-function factory (or MemoryFunction subclass) by name."""
    return _script_decorator("memory", name, description)


def register_task(name: str, description: str = "") -> Callable[[Any], Any]:
    """Decorator registering a task class by name."""
    return _script_decorator("task", name, description)


def memory_names() -> list[str]:
    return get_registry().names("memory")


def task_names() -> list[str]:
    return get_registry().names("task")


def get_memory(name: str) -> Entry:
    return get_registry().get("memory", name)


def get_task(name: str) -> Entry:
    return get_registry().get("task", name)
