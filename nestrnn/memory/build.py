"""Turning a memory specification (name, dict, instance or factory) into a MemoryFunction."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch

from nestrnn.memory.base import MemoryFunction

MemorySpec = MemoryFunction | str | Mapping[str, Any] | Callable[..., MemoryFunction]


def inherited_options(
    bias: bool,
    forget_bias: float | None,
    recurrent_init: str,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """The options of a layer that its memory functions inherit (see ``build_memory``)."""
    return {
        "bias": bias,
        "forget_bias": forget_bias,
        "recurrent_init": recurrent_init,
        "device": device,
        "dtype": dtype,
    }


def place_memory(
    memory: MemoryFunction,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> MemoryFunction:
    """``memory.to(device, dtype)`` for a memory its factory did not build there, else ``memory``
    itself: ``Module.to`` swaps every tensor, even one already in place, which fails for the
    parameters of a model built under ``FakeTensorMode`` (shape-only tooling)."""
    wanted = None if device is None else torch.device(device)
    if all(
        (wanted is None or t.device == wanted)
        and (dtype is None or not t.is_floating_point() or t.dtype == dtype)
        for t in (*memory.parameters(), *memory.buffers())
    ):
        return memory
    return memory.to(device=device, dtype=dtype)


def accepts_option(factory: Callable[..., Any], option: str) -> bool:
    """Whether ``factory`` (a memory function's class or builder) takes the keyword ``option``."""
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return option in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )


def build_memory(
    spec: MemorySpec, hidden_size: int, inherited: Mapping[str, Any] | None = None
) -> MemoryFunction:
    """Build a memory function of width ``hidden_size`` from ``spec``.

    ``spec`` is a registered name (``"nested"``), a dict ``{"name": ..., **options}`` (an OmegaConf
    DictConfig works too), a MemoryFunction instance (used as is), or a callable
    ``factory(hidden_size) -> MemoryFunction``. ``inherited`` holds layer-wide options (``inherited_options``:
    ``bias``, ``forget_bias``, ``recurrent_init``, ``device``, ``dtype``, and a nested level's
    ``outer_candidate_activation``) passed to registered factories that accept them and were not
    given them explicitly.
    """
    from nestrnn.registry import get_memory

    if isinstance(spec, MemoryFunction):
        memory = spec
    elif isinstance(spec, (str, Mapping)):
        if isinstance(spec, str):
            name, options = spec, {}
        else:
            options = dict(spec)
            name = options.pop("name", None)
            if not isinstance(name, str):
                raise ValueError(
                    f"a memory given as a dict needs a 'name' key with a registered name, got {spec!r}"
                )
        factory = get_memory(name).factory
        for key, value in (inherited or {}).items():
            if key not in options and accepts_option(factory, key):
                options[key] = value
        try:
            inspect.signature(factory).bind(hidden_size, **options)
        except TypeError as error:
            raise TypeError(f"invalid options for memory {name!r}: {error}") from None
        except ValueError:
            pass  # no signature to check (a builtin); the call below reports bad options
        memory = factory(hidden_size, **options)
    elif callable(spec):
        memory = spec(hidden_size)
    else:
        raise TypeError(
            "memory must be a registered name, a {'name': ..., **options} dict, a MemoryFunction "
            f"or a factory callable, got {type(spec).__name__}"
        )
    if not isinstance(memory, MemoryFunction):
        raise TypeError(f"memory factory returned {type(memory).__name__}, not a MemoryFunction")
    if memory.hidden_size != hidden_size:
        raise ValueError(
            f"memory has hidden_size {memory.hidden_size} but the layer's hidden_size is {hidden_size}"
        )
    return memory
