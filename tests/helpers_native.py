"""What the tests of native code share: the one convention for what they need (a compiler, a
built library), and a reader of the kernel's C header.

Native code must build in CI (``NESTRNN_REQUIRE_NATIVE=1``, set by .ci/run): there a test whose
compiler or library is missing FAILS, saying what is missing; elsewhere it is skipped. Every
native test states its needs through ``require``, ``require_program`` or ``needs_program``,
never through a plain ``pytest.skip`` or ``skipif``.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import pytest

from nestrnn.ops.common.build_cache import NativeStatus

Test = TypeVar("Test", bound=Callable[..., object])


def unavailable(reason: str) -> None:
    """Skip the test for ``reason``, or fail it where native code must run
    (``NESTRNN_REQUIRE_NATIVE=1``)."""
    if os.environ.get("NESTRNN_REQUIRE_NATIVE") == "1":
        pytest.fail(f"{reason} (NESTRNN_REQUIRE_NATIVE=1: it must be here)")
    pytest.skip(reason)


def require(found: NativeStatus, what: str) -> None:
    """Go on only where the native library ``what`` is available (see ``unavailable``)."""
    if not found.available:
        unavailable(f"{what} unavailable: {found.reason}")


def require_program(program: str | None, what: str) -> str:
    """``program``'s path (a name looked up on PATH), where it is found (see ``unavailable``)."""
    path = shutil.which(program) if program else None
    if path is None:
        unavailable(f"no {what} ({program or 'none given'})")
    return path


def needs_program(program: str, what: str) -> Callable[[Test], Test]:
    """Decorate a test that needs ``program`` (say ``cc``): ``require_program`` before it runs."""

    def decorate(test: Test) -> Test:
        @functools.wraps(test)
        def run(*args, **kwargs):
            require_program(program, what)
            return test(*args, **kwargs)

        return run  # type: ignore[return-value]

    return decorate


# ----------------------------------------------------------------------------- the C header


@dataclass(frozen=True)
class Declaration:
    """A parameter or struct field: its C type, spaces normalised (``const int64_t *``), and
    name."""

    type: str
    name: str


@dataclass
class Header:
    """What a C header of the kernel's plain style declares (``parse_header``)."""

    defines: dict[str, int] = field(default_factory=dict)
    enums: dict[str, dict[str, int]] = field(default_factory=dict)
    structs: dict[str, list[Declaration]] = field(default_factory=dict)
    #: name -> (return type, parameters), for prototypes and function-pointer typedefs alike
    functions: dict[str, tuple[str, list[Declaration]]] = field(default_factory=dict)
    pointer_types: dict[str, tuple[str, list[Declaration]]] = field(default_factory=dict)


_IDENTIFIER = r"[A-Za-z_]\w*"


def _c_type(text: str) -> str:
    """``const  float*`` -> ``const float *``: one space between words, stars joined."""
    words = re.sub(r"\s*\*\s*", " * ", text).split()
    return re.sub(r"\* (?=\*)", "*", " ".join(words))


def _declaration(text: str) -> Declaration:
    found = re.fullmatch(rf"\s*(.*?[\s*])({_IDENTIFIER})\s*", text, re.S)
    if not found or not found.group(1).strip():
        raise ValueError(f"not a named declaration: {text.strip()!r}")
    return Declaration(_c_type(found.group(1)), found.group(2))


def _parameters(text: str) -> list[Declaration]:
    return [] if text.strip() == "void" else [_declaration(part) for part in text.split(",")]


def parse_header(text: str) -> Header:
    """Parse the plain C of nlstm_kernel.h: integer ``#define``s, enums with explicit values,
    ``typedef struct``s, function prototypes and function-pointer typedefs, every parameter
    named. Anything else (but include guards, includes and ``extern "C"``) is an error, so that a
    declaration this parser cannot read is never silently left out of a check."""
    header = Header()
    text = re.sub(r"/\*.*?\*/|//[^\n]*", " ", text, flags=re.S)
    rest = []
    for line in text.splitlines():
        directive = re.match(r"\s*#\s*(\w+)\s*(.*)", line)
        if directive is None:
            rest.append(line)
            continue
        kind, body = directive.group(1), directive.group(2).strip()
        if kind == "define":  # an integer constant, or an include guard's name alone
            value = re.fullmatch(rf"({_IDENTIFIER})(?:\s+(-?\d+))?", body)
            if value is None:
                raise ValueError(f"not an integer constant: {line.strip()!r}")
            if value.group(2) is not None:
                header.defines[value.group(1)] = int(value.group(2))
        elif kind not in ("ifndef", "ifdef", "endif", "include"):
            raise ValueError(f"unexpected directive: {line.strip()!r}")
    text = "\n".join(rest)
    text = re.sub(r'extern\s+"C"\s*\{|^\s*\}\s*$', " ", text, flags=re.M)

    def enum(found: re.Match) -> str:
        values = {}
        for item in filter(str.strip, found.group(2).split(",")):
            name, value = (part.strip() for part in item.split("="))
            values[name] = int(value)
        header.enums[found.group(1)] = values
        return " "

    def struct(found: re.Match) -> str:
        if found.group(1) != found.group(3):
            raise ValueError(f"struct {found.group(1)} is typedef'd as {found.group(3)}")
        fields = found.group(2).split(";")
        if fields[-1].strip():
            raise ValueError(f"struct {found.group(1)}: a field without ';'")
        header.structs[found.group(1)] = [_declaration(f) for f in fields[:-1]]
        return " "

    def pointer_type(found: re.Match) -> str:
        header.pointer_types[found.group(2)] = (
            _c_type(found.group(1)),
            _parameters(found.group(3)),
        )
        return " "

    def function(found: re.Match) -> str:
        header.functions[found.group(2)] = (_c_type(found.group(1)), _parameters(found.group(3)))
        return " "

    text = re.sub(rf"\benum\s+({_IDENTIFIER})\s*\{{([^}}]*)\}}\s*;", enum, text)
    text = re.sub(
        rf"\btypedef\s+struct\s+({_IDENTIFIER})\s*\{{([^}}]*)\}}\s*({_IDENTIFIER})\s*;",
        struct,
        text,
    )
    text = re.sub(
        rf"\btypedef\s+([\w\s*]+?)\(\s*\*\s*({_IDENTIFIER})\s*\)\s*\(([^)]*)\)\s*;",
        pointer_type,
        text,
    )
    text = re.sub(rf"([\w\s*]+?[\s*])({_IDENTIFIER})\s*\(([^)]*)\)\s*;", function, text)
    if text.strip():
        raise ValueError(f"unparsed text in the header: {text.strip()[:200]!r}")
    return header
