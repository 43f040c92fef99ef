"""The CPU kernel's interface has one definition, nlstm_kernel.h: native.py's ctypes mirror of it
(argument struct, every function's argument and return types, the ABI version), the step nodes'
function types and the activation codes are checked against that file as written.

No compiler needed: the header is read as text (``helpers_native.parse_header``)."""

from __future__ import annotations

import ctypes

import pytest
from helpers_native import Declaration, parse_header

from nestrnn.activations import ACTIVATION_TABLE
from nestrnn.ops.common import native

HEADER = parse_header(native.HEADER.read_text())
SUFFIXES = {"f32": "float", "f64": "double"}


def ctypes_of(c_type: str) -> type | None:
    """The ctypes type native.py must use for ``c_type``: element and matrix pointers travel as
    ``c_void_p`` (addresses as integers), the argument struct by pointer, text as ``c_char_p``."""
    if c_type.endswith("*"):
        pointee = c_type.removeprefix("const ").removesuffix(" *")
        return {"char": ctypes.c_char_p, "nlstm_args": ctypes.POINTER(native.Args)}.get(
            pointee, ctypes.c_void_p
        )
    scalars = {
        "void": None,
        "int": ctypes.c_int,
        "int32_t": ctypes.c_int32,
        "int64_t": ctypes.c_int64,
    }
    return scalars[c_type]


def test_the_abi_version_is_the_header_s():
    assert HEADER.defines["NLSTM_ABI_VERSION"] == native.ABI_VERSION


def test_the_argument_struct_mirror_is_the_header_s():
    fields = HEADER.structs["nlstm_args"]
    assert [name for name, _ in native.Args._fields_] == [f.name for f in fields]
    for (name, kind), declared in zip(native.Args._fields_, fields, strict=True):
        assert kind == ctypes_of(declared.type), f"Args.{name}: {kind} for {declared.type}"


def expected_signatures() -> dict[str, tuple[type | None, list[type | None]]]:
    """native.SIGNATURES as the header declares them: every prototype, through ``ctypes_of``."""
    return {
        name: (ctypes_of(returns), [ctypes_of(p.type) for p in parameters])
        for name, (returns, parameters) in HEADER.functions.items()
    }


def mirrored_signatures() -> dict[str, tuple[type | None, list[type]]]:
    """native.SIGNATURES, its ``{}`` names filled with each dtype's suffix."""
    mirrored = {}
    for name, signature in native.SIGNATURES.items():
        for suffix in SUFFIXES if "{}" in name else [""]:
            mirrored[name.format(suffix)] = signature
    return mirrored


def test_every_function_of_the_header_is_bound_with_its_types():
    expected, mirrored = expected_signatures(), mirrored_signatures()
    assert sorted(mirrored) == sorted(expected)  # nothing missing, nothing extra
    for name, (returns, parameters) in expected.items():
        got_returns, got_parameters = mirrored[name]
        assert got_returns == returns, f"{name} returns {returns}, mirrored as {got_returns}"
        assert got_parameters == parameters, (
            f"{name}: argtypes {got_parameters}, header {parameters}"
        )
    assert {f"nlstm_{name}_{{}}" for name in native.STEP_FUNCTIONS} <= set(native.SIGNATURES)


def erased(parameters: list[Declaration], element: str) -> list[Declaration]:
    """``parameters`` with pointers to ``element`` as void pointers (what the step nodes call)."""
    return [Declaration(p.type.replace(f"{element} *", "void *"), p.name) for p in parameters]


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_the_step_nodes_function_types_are_the_prototypes_type_erased(suffix):
    """step_nodes.cpp calls the outer steps of either dtype through the header's ``*_fn`` types:
    each is its prototypes with the element pointers as void pointers."""
    assert HEADER.pointer_types
    for name, (returns, parameters) in HEADER.pointer_types.items():
        function = f"{name.removesuffix('_fn')}_{suffix}"
        want_returns, want_parameters = HEADER.functions[function]
        assert returns == want_returns, name
        assert parameters == erased(want_parameters, SUFFIXES[suffix]), name


def test_the_activation_codes_are_the_table_s():
    codes = HEADER.enums["nlstm_activation"]
    count = codes.pop("NLSTM_ACT_COUNT")
    assert {name.removeprefix("NLSTM_ACT_").lower(): code for name, code in codes.items()} == {
        name: activation.code for name, activation in ACTIVATION_TABLE.items()
    }
    assert count == len(ACTIVATION_TABLE)


@pytest.mark.parametrize(
    "text",
    [
        "int f(int);",  # an unnamed parameter
        "int f(int a)",  # no semicolon
        "#define N (1 + 2)",  # not a plain integer where one is read
        "struct s { int a; };",  # a struct that is not typedef'd
        "#if X",
    ],
)
def test_the_parser_refuses_what_it_cannot_read(text):
    """A declaration the parser cannot read fails the checks above rather than escaping them."""
    with pytest.raises(ValueError):
        parse_header(text)
