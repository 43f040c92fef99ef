"""The plugin registry: memory functions, tasks and run loggers, from built-ins, installed packages and scripts.

Sources, in the order their registrations apply:

1. built-in plugin modules (``BUILTIN_PLUGINS``), which use the same hooks as everyone else;
2. installed distributions with an entry point in the group ``nestrnn`` (skipped when the
   environment variable ``NESTRNN_DISABLE_PLUGINS`` is set to a non-empty value other than "0");
3. ``@register_memory`` / ``@register_task`` decorators in the user's own code (scripts).

Each kind loads on its first use. The first memory lookup imports the built-in memory plugins and
the installed plugins and calls their ``register_memories`` hooks; the built-in task modules, and the
data and training code they need, wait for the first task lookup. Entry points are discovered once,
when the registry is built; an installed plugin is imported on the first use of any kind, because
only its module says which hooks it implements.

A plugin that fails to import or whose hook raises (an exception, or ``SystemExit``) is recorded in
``failures`` with its name and distribution; it never stops the others. So is one that implements a
hook that does not exist (``register_memory``, say), which pluggy would silently never call.

An installed plugin is imported, and its hooks called, in a daemon thread that the registry waits
for at most ``NESTRNN_PLUGIN_TIMEOUT`` seconds (30 by default): one that hangs (a network call at
import) is recorded as timed out, with a warning, and left behind; a daemon thread never keeps the
process alive. Anything it raises, ``KeyboardInterrupt`` included, is then the plugin's fault and
recorded like the rest; a real Ctrl-C reaches the waiting main thread and stops the program. What
plugin code prints while it loads goes to standard error (:mod:`nestrnn.output`). Two providers of one name
make that name unusable: looking it up raises an error that names both. A script definition may not
take a name another script definition holds unless it asks with ``replace=True``, which also takes
the name from plugins. Script registrations apply after the plugins' whenever the registry is built,
so a registry built before a script registers and one built after it hold the same names.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import math
import os
import threading
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pluggy

from nestrnn import hookspecs
from nestrnn.errors import UserError
from nestrnn.output import stdout_to_stderr

ENTRY_POINT_GROUP = "nestrnn"
DISABLE_ENV = "NESTRNN_DISABLE_PLUGINS"
TIMEOUT_ENV = "NESTRNN_PLUGIN_TIMEOUT"
DEFAULT_TIMEOUT = 30.0
"""Seconds an installed plugin's import, or one of its hooks, may take before it is left behind."""
BUILTIN_PLUGINS: dict[str, tuple[str, ...]] = {
    "nestrnn.memory.builtin": ("memory",),
    "nestrnn.tasks": ("task",),
}
"""The built-in plugin modules and the kinds each provides; each is imported on first use of one."""
KINDS = tuple(hookspecs.HOOKS)
RETIRED_NAMES: dict[tuple[str, str], str] = {
    ("memory", "triton_nested"): "another name for 'nested', removed: use 'nested'",
}
"""Names that earlier releases registered, and what to use instead (configs and checkpoints
may still name them)."""
PLUGIN_ERRORS = (Exception, SystemExit)
"""What a built-in plugin's import or hook may raise without stopping nestrnn (Ctrl-C still stops
it); an installed plugin runs in a thread of its own, where whatever it raises is its failure."""


class RegistryError(LookupError):
    """An unknown, ambiguous or already taken memory function or task name."""


@dataclass(frozen=True)
class Provider:
    """Where a registration came from: a plugin, or a definition decorated in a script.

    ``plugin`` is the plugin's name, or for a script the definition's ``module.qualname``.
    """

    plugin: str
    distribution: str | None = None
    version: str | None = None
    builtin: bool = False
    script: bool = False

    def describe(self) -> str:
        if self.script:
            return self.plugin
        if self.distribution:
            return f"plugin {self.plugin!r} from {self.distribution} {self.version or ''}".strip()
        return f"plugin {self.plugin!r}"


@dataclass(frozen=True)
class Entry:
    """One registered memory function or task.

    ``replace`` marks a script registration made with ``replace=True``: it wins over every other
    provider of its name.
    """

    name: str
    kind: str
    factory: Callable[..., Any]
    provider: Provider
    description: str = ""
    replace: bool = False


@dataclass
class Failure:
    """A plugin that could not be loaded or whose hook raised."""

    provider: Provider
    error: str


@dataclass(frozen=True)
class PluginSource:
    """A plugin to import when a kind it may provide is first used.

    ``kinds`` is None for an installed plugin: what it provides is known only once it is imported.
    """

    provider: Provider
    load: Callable[[], Any]
    kinds: tuple[str, ...] | None = None

    def may_provide(self, kind: str) -> bool:
        return self.kinds is None or kind in self.kinds


class Registry:
    """Registered memory functions and tasks, loaded one kind at a time.

    ``names`` and ``get`` load the kind they are asked about; ``report`` loads every kind. The
    attributes hold what the kinds loaded so far registered: ``entries`` (kind -> name -> entry),
    ``conflicts`` ((kind, name) -> the providers of an unusable name), ``failures`` and ``plugins``
    (the plugins imported).
    """

    def __init__(
        self,
        sources: Iterable[PluginSource] = (),
        scripts: list[Entry] | None = None,
        *,
        external_plugins_disabled: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
        self.conflicts: dict[tuple[str, str], list[Provider]] = {}
        self.failures: list[Failure] = []
        self.plugins: list[Provider] = []
        self.external_plugins_disabled = external_plugins_disabled
        self.timeout = timeout
        self._scripts = scripts if scripts is not None else []
        self._pending: list[PluginSource] = []
        self._hook_entries: dict[str, list[Entry]] = {kind: [] for kind in KINDS}
        self._loaded: set[str] = set()
        self._manager = pluggy.PluginManager(ENTRY_POINT_GROUP)
        self._manager.add_hookspecs(hookspecs)
        for source in sources:
            if any(s.provider.plugin == source.provider.plugin for s in self._pending):
                message = f"plugin name {source.provider.plugin!r} is already taken"
                self.failures.append(Failure(source.provider, message))
            else:
                self._pending.append(source)

    @classmethod
    def discover(cls, scripts: list[Entry] | None = None) -> Registry:
        """The built-in plugins and the installed ones (unless disabled), none imported yet."""
        version = _version("nestrnn")
        sources = [
            PluginSource(
                Provider(module, "nestrnn", version, builtin=True),
                functools.partial(importlib.import_module, module),
                kinds,
            )
            for module, kinds in BUILTIN_PLUGINS.items()
        ]
        disabled = external_plugins_disabled()
        timeout = DEFAULT_TIMEOUT if disabled else plugin_timeout()
        if not disabled:
            for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                dist = entry_point.dist
                provider = Provider(
                    entry_point.name, dist.name if dist else None, dist.version if dist else None
                )
                sources.append(PluginSource(provider, entry_point.load))
        return cls(sources, scripts, external_plugins_disabled=disabled, timeout=timeout)

    def load(self, kind: str) -> None:
        """Import the plugins that may provide ``kind`` and call their hook for it, once."""
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
        with _locked():
            if kind in self._loaded:
                return
            self._loaded.add(kind)  # first: a plugin that looks names up meanwhile must not recurse
            self._import_plugins(kind)
            hook = getattr(self._manager.hook, hookspecs.HOOKS[kind])
            implementations = {impl.plugin_name: impl for impl in hook.get_hookimpls()}
            for provider in self.plugins:
                if provider.plugin in implementations:
                    self._call_hook(implementations[provider.plugin].function, kind, provider)
            self._resolve(kind)

    def refresh(self, kind: str) -> None:
        """Apply the script registrations again after one changed (if ``kind`` is loaded)."""
        with _locked():
            if kind in self._loaded:
                self._resolve(kind)

    def names(self, kind: str) -> list[str]:
        """The usable names of ``kind``, sorted."""
        self.load(kind)
        return sorted(self.entries[kind])

    def get(self, kind: str, name: str) -> Entry:
        """The entry called ``name``; a clear error when it is unknown or registered twice."""
        self.load(kind)
        providers = self.conflicts.get((kind, name))
        if providers:
            listed = " and ".join(p.describe() for p in providers)
            raise RegistryError(
                f"{kind} name {name!r} is registered by more than one provider: {listed}; "
                f"{_conflict_advice(kind, name, providers)}"
            )
        try:
            return self.entries[kind][name]
        except KeyError:
            known = ", ".join(self.names(kind)) or "none"
            retired = RETIRED_NAMES.get((kind, name))
            name_hint = f" ({retired})" if retired else ""
            failed = ", ".join(dict.fromkeys(f.provider.plugin for f in self.failures))
            hint = f" (plugins with errors: {failed}; see `nestrnn plugins`)" if failed else ""
            raise RegistryError(
                f"unknown {kind} {name!r}{name_hint}; known {kind} names: {known}{hint}"
            ) from None

    def provided_by(self, provider: Provider) -> dict[str, list[str]]:
        """What ``provider`` registered, by kind (every kind is loaded first)."""
        self._load_all()
        found = {
            kind: sorted(n for n, e in self.entries[kind].items() if e.provider == provider)
            for kind in KINDS
        }
        for (kind, name), providers in self.conflicts.items():
            if provider in providers:
                found[kind].append(name)
        return found

    def report(self) -> dict[str, Any]:
        """Everything ``nestrnn plugins --json`` shows (every kind is loaded first)."""
        self._load_all()
        return {
            "plugins": [
                {
                    "name": p.plugin,
                    "distribution": p.distribution,
                    "version": p.version,
                    "builtin": p.builtin,
                    "registered": self.provided_by(p),
                }
                for p in sorted(self.plugins, key=lambda p: not p.builtin)
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
            "external_plugins_disabled": self.external_plugins_disabled,
        }

    def _load_all(self) -> None:
        for kind in KINDS:
            self.load(kind)

    def _import_plugins(self, kind: str) -> None:
        """Import and register the pending plugins that may provide ``kind``."""
        for source in [s for s in self._pending if s.may_provide(kind)]:
            self._pending.remove(source)
            plugin, error = self._run_plugin_code(source.load, source.provider, "its import")
            if error is None:
                try:
                    self._manager.register(plugin, name=source.provider.plugin)
                except PLUGIN_ERRORS as failure:  # hook implementations pluggy cannot accept
                    error = _describe_error(failure)
            if error is not None:  # a broken plugin must not take the others down
                self.failures.append(Failure(source.provider, error))
                continue
            self.plugins.append(source.provider)
            unknown = sorted(
                caller.name
                for caller in self._manager.get_hookcallers(plugin) or []
                if caller.name not in hookspecs.HOOKS.values()
            )
            if unknown:  # pluggy would call them never, silently: a misspelled name, most likely
                hooks = ", ".join(hookspecs.HOOKS.values())
                message = f"implements no hook called {', '.join(unknown)}; the hooks are {hooks}"
                self.failures.append(Failure(source.provider, message))

    def _call_hook(self, hook: Callable[..., None], kind: str, provider: Provider) -> None:
        """Call one plugin's hook; if it raises, that plugin registers nothing of ``kind``."""
        added: list[Entry] = []

        def register(name: str, factory: Callable[..., Any], description: str = "") -> None:
            added.append(_make_entry(name, kind, factory, provider, description))

        name = hookspecs.HOOKS[kind]
        _, error = self._run_plugin_code(functools.partial(hook, register=register), provider, name)
        if error is not None:
            self.failures.append(Failure(provider, f"{name}: {error}"))
            return
        self._hook_entries[kind] += added

    def _run_plugin_code(
        self, call: Callable[[], Any], provider: Provider, what: str
    ) -> tuple[Any, str | None]:
        """``call()``'s result and None, or None and why it failed, with what it prints on stderr.

        A built-in plugin runs here. An installed one runs in a daemon thread, waited for at most
        ``self.timeout`` seconds: Python cannot stop a thread, but it can stop waiting for one.
        """
        with stdout_to_stderr():
            if provider.builtin:
                try:
                    return call(), None
                except PLUGIN_ERRORS as error:
                    return None, _describe_error(error)
            outcome = _call_in_thread(call, provider.plugin, self.timeout)
        if outcome is None:
            message = (
                f"timed out: {what} did not finish within {self.timeout:g} s "
                f"(set {TIMEOUT_ENV} to wait longer)"
            )
            warnings.warn(f"{provider.describe()} {message}; skipping it", RuntimeWarning, 2)
            return None, message
        result, failure = outcome
        return (None, _describe_error(failure)) if failure is not None else (result, None)

    def _resolve(self, kind: str) -> None:
        """Rebuild ``kind``'s names from its plugins' registrations, then the scripts'."""
        table: dict[str, Entry] = {}
        conflicts: dict[str, list[Provider]] = {}
        scripts = [e for e in self._scripts if e.kind == kind]
        for entry in self._hook_entries[kind] + scripts:
            if entry.replace:
                table[entry.name] = entry
                conflicts.pop(entry.name, None)
            elif entry.name in conflicts:
                if entry.provider not in conflicts[entry.name]:
                    conflicts[entry.name].append(entry.provider)
            elif entry.name in table and table[entry.name].provider != entry.provider:
                conflicts[entry.name] = [table.pop(entry.name).provider, entry.provider]
            else:
                table[entry.name] = entry
        self.entries[kind] = table
        self.conflicts = {key: p for key, p in self.conflicts.items() if key[0] != kind}
        self.conflicts.update({(kind, name): p for name, p in conflicts.items()})


def external_plugins_disabled() -> bool:
    """Whether ``NESTRNN_DISABLE_PLUGINS`` asks for the built-in plugins only."""
    return os.environ.get(DISABLE_ENV, "") not in ("", "0")


def plugin_timeout() -> float:
    """The seconds ``NESTRNN_PLUGIN_TIMEOUT`` gives each installed plugin's import and hooks."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise UserError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {text!r}")
    return seconds


def _call_in_thread(
    call: Callable[[], Any], name: str, timeout: float
) -> tuple[Any, BaseException | None] | None:
    """``call()`` in a daemon thread: its result and None, or None and what it raised, or None
    when it has not finished after ``timeout`` seconds (the thread is left running)."""
    outcome: list[tuple[Any, BaseException | None]] = []

    def run() -> None:
        _delegate.holds_lock = True  # the thread waiting for this one holds _lock for it
        try:
            outcome.append((call(), None))
        except BaseException as error:  # here even KeyboardInterrupt is the plugin's; Ctrl-C
            outcome.append((None, error))  # goes to the main thread, waiting in join below

    thread = threading.Thread(target=run, name=f"nestrnn plugin {name}", daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else None


def _conflict_advice(kind: str, name: str, providers: list[Provider]) -> str:
    if any(p.script for p in providers):
        return (
            f"register yours under another name, or with register_{kind}({name!r}, "
            "replace=True) to override the others"
        )
    return f"uninstall one of them, or set {DISABLE_ENV}=1 to load the built-ins only"


def _describe_error(error: BaseException) -> str:
    if isinstance(error, SystemExit):
        return f"SystemExit: the plugin called sys.exit({error.code!r})"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _make_entry(
    name: str,
    kind: str,
    factory: Callable[..., Any],
    provider: Provider,
    description: str,
    replace: bool = False,
) -> Entry:
    if not isinstance(name, str) or not name:
        raise TypeError(f"a {kind} name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise TypeError(f"the {kind} {name!r} must be registered with a callable, got {factory!r}")
    doc = (getattr(factory, "__doc__", None) or "").strip().splitlines()
    return Entry(name, kind, factory, provider, description or (doc[0] if doc else ""), replace)


_lock = threading.RLock()  # guards the registry and the script registrations
_delegate = threading.local()  # holds_lock: a plugin's thread, run while its waiter holds _lock


def _locked() -> contextlib.AbstractContextManager[Any]:
    """``_lock``; in a plugin's thread, nothing: the thread waiting for it holds the lock already,
    and a plugin that looks names up while it loads would otherwise wait for itself, then time out.
    A thread left behind after its timeout keeps this pass: only a hung plugin that wakes up later
    and then registers or looks up names could race the main thread."""
    return contextlib.nullcontext() if getattr(_delegate, "holds_lock", False) else _lock


_registry: Registry | None = None
_script_entries: list[Entry] = []  # one per (kind, name); kept when the registry is rebuilt


def get_registry() -> Registry:
    """The process-wide registry: plugins are discovered on first call, each kind loaded on use."""
    global _registry
    with _locked():
        if _registry is None:
            _registry = Registry.discover(_script_entries)
        return _registry


def reset_registry() -> None:
    """Forget the built registry (the next use rebuilds it); script registrations are kept."""
    global _registry
    with _locked():
        _registry = None


def _script_provider(factory: Any) -> Provider:
    module = getattr(factory, "__module__", None) or "__main__"
    qualname = getattr(factory, "__qualname__", None) or type(factory).__qualname__
    return Provider(f"{module}.{qualname}", script=True)


def _register_script(kind: str, name: str, description: str, replace: bool) -> Callable[[Any], Any]:
    def decorator(factory: Any) -> Any:
        entry = _make_entry(name, kind, factory, _script_provider(factory), description, replace)
        with _locked():
            held = next((e for e in _script_entries if (e.kind, e.name) == (kind, name)), None)
            # the same definition again (a re-run notebook cell, a reloaded module) replaces itself
            if held is not None and held.provider != entry.provider and not replace:
                raise RegistryError(
                    f"{kind} name {name!r} is already registered by {held.provider.describe()}; "
                    f"register {entry.provider.describe()} under another name, or with "
                    f"register_{kind}({name!r}, replace=True) to replace it"
                )
            if held is not None:
                _script_entries.remove(held)
            _script_entries.append(entry)
            if _registry is not None:
                _registry.refresh(kind)
        return factory

    return decorator


def register_memory(
    name: str, description: str = "", *, replace: bool = False
) -> Callable[[Any], Any]:
    """Decorator registering a memory-function factory (or MemoryFunction subclass) by name.

    A name another definition registered, here or in a plugin, is an error (at once, or for a
    plugin's name when it is looked up) unless ``replace=True``: then this definition wins.
    """
    return _register_script("memory", name, description, replace)


def register_task(
    name: str, description: str = "", *, replace: bool = False
) -> Callable[[Any], Any]:
    """Decorator registering a task class by name; ``replace`` as in :func:`register_memory`."""
    return _register_script("task", name, description, replace)


def register_logger(
    name: str, description: str = "", *, replace: bool = False
) -> Callable[[Any], Any]:
    """Decorator registering a run logger class or factory by name (enabled with
    ``log.loggers=[name]``); ``replace`` as in :func:`register_memory`."""
    return _register_script("logger", name, description, replace)


def memory_names() -> list[str]:
    """The usable memory-function names, sorted."""
    return get_registry().names("memory")


def task_names() -> list[str]:
    """The usable task names, sorted."""
    return get_registry().names("task")


def get_memory(name: str) -> Entry:
    """The memory function registered as ``name``."""
    return get_registry().get("memory", name)


def get_task(name: str) -> Entry:
    """The task registered as ``name``."""
    return get_registry().get("task", name)


def logger_names() -> list[str]:
    """The usable run-logger names, sorted."""
    return get_registry().names("logger")


def get_logger(name: str) -> Entry:
    """The run logger registered as ``name``."""
    return get_registry().get("logger", name)
