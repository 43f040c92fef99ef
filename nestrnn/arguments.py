"""Checks of constructor arguments, with the exception types and messages of ``torch.nn.LSTM``
(so that code catching nn.LSTM's errors catches ours)."""

from __future__ import annotations

from typing import Any


def check_int(value: Any, name: str, minimum: int = 1) -> None:
    """``value`` must be an int (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
    if value < minimum:
        if minimum == 1:
            raise ValueError(f"{name} must be greater than zero")
        raise ValueError(f"{name} must be at least {minimum}, got {value}")


def check_bool(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} should be of type bool, got: {type(value).__name__}")
