"""Typed options: a value's type, range and choices written once, as a type hint, and checked from it.

A learner's options are dataclass fields or constructor parameters with hints such as
``Annotated[int, AtLeast(0)]``, ``Literal["cg", "neumann"]`` or ``Annotated[str | None, REGEX]``.
:meth:`Key.of` reads a hint into a :class:`Key` (what the value accepts), :func:`keys_of` reads every
field or parameter of a class, and :func:`check_fields` checks a dataclass instance against its own
hints. The constructors (``__post_init__``) and the command line's schema (:mod:`metaloop.cli.schema`)
use the same keys, so a bad value gets the same one-line message from Python and from the CLI.
Imports only the standard library.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

__all__ = [
    "AtLeast", "Hint", "REGEX", "Key", "keys_of", "parameter_hints", "accepts_none", "constructors", "check_arguments",
    "check_fields",
]


@dataclass(frozen=True)
class AtLeast:
    """Annotation: the number is at least ``minimum``."""

    minimum: float


@dataclass(frozen=True)
class Hint:
    """Annotation: a short phrase added to the message of a refused value (what the option means)."""

    text: str


@dataclass(frozen=True)
class _Regex:
    """Annotation: the string is a regular expression."""


REGEX = _Regex()


@dataclass(frozen=True)
class Key:
    """The accepted values of one option or configuration key."""

    kind: str  # "int", "number", "bool", "str", "regex" or "choice"
    minimum: float | None = None
    optional: bool = False
    choices: tuple[str, ...] = ()
    hint: str = ""
    callable_ok: bool = False  # a choice that may also be given as a callable (in Python, not in a configuration)

    @classmethod
    def of(cls, hint: Any) -> Key | None:
        """Returns the key a type hint describes, or None for a hint with no checkable values (a module, a callable).

        ``X | None`` is optional; a union of a ``Literal`` and a callable (a solver given by name or as a
        function) accepts the literal's choices, the only values a configuration can write. A union of
        several kinds (``int | float``, ``bool | Literal["warn"]``) is None: a hint is never read as
        stricter than it is.

        Examples:
            >>> Key.of(Annotated[int, AtLeast(1)])
            Key(kind='int', minimum=1, optional=False, choices=(), hint='', callable_ok=False)
            >>> Key.of(Literal["cg", "neumann"] | None).choices
            ('cg', 'neumann')
        """
        extras: tuple[Any, ...] = ()
        if typing.get_origin(hint) is Annotated:
            hint, *rest = typing.get_args(hint)
            extras = tuple(rest)
        members = list(typing.get_args(hint)) if typing.get_origin(hint) in (Union, types.UnionType) else [hint]
        optional = type(None) in members
        members = [m for m in members if m is not type(None)]
        literals = [m for m in members if typing.get_origin(m) is Literal]
        callables = [m for m in members if typing.get_origin(m) is collections.abc.Callable or m is collections.abc.Callable]
        callable_ok = bool(callables)
        if literals and len(literals) + len(callables) < len(members):
            return None  # choices or another type (Lightning's `bool | Literal["warn"]`): not one checkable kind
        if any(isinstance(c, bool) for m in literals for c in typing.get_args(m)):
            return None  # `Literal[True, False, "all"]`: a boolean is never a choice (a choice compares by its text)
        if literals:
            key = cls("choice", choices=tuple(str(c) for m in literals for c in typing.get_args(m)), callable_ok=callable_ok)
        elif len(members) != 1 or members[0] not in _KINDS:
            return None
        else:
            key = cls(_KINDS[members[0]])
        minimum = next((e.minimum for e in extras if isinstance(e, AtLeast)), None)
        text = next((e.text for e in extras if isinstance(e, Hint)), "")
        kind = "regex" if REGEX in extras else key.kind
        return cls(kind, minimum=minimum, optional=optional, choices=key.choices, hint=text, callable_ok=key.callable_ok)

    def check(self, name: str, value: Any) -> str | None:
        """Returns what is wrong with ``value`` for the key ``name``, in one line, or None.

        Examples:
            >>> Key("int", minimum=0).check("inner.steps", 5) is None
            True
            >>> Key("bool").check("inner.first_order", "no")
            "inner.first_order='no' is not accepted (not a boolean); use true or false"
        """
        if value is None:
            return None if self.optional else f"{name} is null; {self.accepted()}"
        if self.callable_ok and callable(value):
            return None
        problem = self._type_problem(value)
        if problem is None and self.minimum is not None and value < self.minimum:
            problem = f"it is below {self.minimum:g}"
        if problem is None:
            return None
        return f"{name}={value!r} is not accepted ({problem}); {self.accepted()}"

    def _type_problem(self, value: Any) -> str | None:
        if self.kind == "bool":
            return None if isinstance(value, bool) else "not a boolean"
        if self.kind == "int":
            return None if isinstance(value, int) and not isinstance(value, bool) else "not a whole number"
        if self.kind == "number":
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                return "not a number"
            # nan passes every range check and fails only at the first step, blamed on a learning rate too large
            return None if math.isfinite(value) else "not a finite number"
        if self.kind == "choice":
            # YAML reads `32` as a number; a choice compares by its text (booleans are never a choice)
            return None if not isinstance(value, bool) and str(value) in self.choices else "not one of the choices"
        if not isinstance(value, str):
            return "not a string"
        if self.kind == "regex":
            try:
                re.compile(value)
            except re.error as err:
                return f"not a regular expression: {err}"
        return None

    def accepted(self) -> str:
        """Returns a phrase saying what the key accepts."""
        what = {
            "bool": "use true or false",
            "int": "use a whole number",
            "number": "use a finite number, e.g. 0.01 or 1e-3",
            "str": "use a string",
            "regex": "use a regular expression, e.g. '^head\\.'",
            "choice": f"use one of {', '.join(self.choices)}",
        }[self.kind]
        if self.minimum is not None:
            what += f" >= {self.minimum:g}"
        if self.optional:
            what += " (or null)"
        return what + (f" ({self.hint})" if self.hint else "")


_KINDS: dict[Any, str] = {bool: "bool", int: "int", float: "number", str: "str"}


def keys_of(obj: type | Callable[..., Any], prefix: str = "") -> dict[str, Key]:
    """Returns the keys of a dataclass's fields, or of a callable's parameters, by dotted name.

    A field whose type is itself a dataclass contributes its own fields under ``name.``; fields and
    parameters whose hints have no checkable values are left out. For a class that is not a dataclass,
    the parameters of ``__init__`` along the method resolution order while a constructor passes
    ``**kwargs`` on (a subclass that declares only its own options).
    """
    keys: dict[str, Key] = {}
    for name, hint in parameter_hints(obj).items():
        inner = _dataclass_in(hint)
        if inner is not None:
            keys.update(keys_of(inner, f"{prefix}{name}."))
        elif (key := Key.of(hint)) is not None:
            keys[f"{prefix}{name}"] = key
    return keys


def parameter_hints(obj: type | Callable[..., Any]) -> dict[str, Any]:
    """Returns the type hint of each field of a dataclass, or of each named parameter a call of ``obj`` takes.

    A class's parameters are those of its :func:`constructors` (the first constructor that declares a name
    gives its hint); parameters without a hint, or whose hints name what their module cannot see, are left out.
    """
    if dataclasses.is_dataclass(obj):
        hints = typing.get_type_hints(obj, include_extras=True)
        return {field.name: hints[field.name] for field in dataclasses.fields(obj)}
    found: dict[str, Any] = {}
    for function in constructors(obj):
        try:
            hints = typing.get_type_hints(function, include_extras=True)
        except (NameError, TypeError):
            continue  # hints that name what this module cannot see: nothing to check from them
        for name, parameter in inspect.signature(function).parameters.items():
            if name not in found and name in hints and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                found[name] = hints[name]
    return found


def accepts_none(hint: Any) -> bool:
    """True if a value of type hint ``hint`` may be None (``X | None``, ``Optional[X]``, ``Any``, or None itself).

    Examples:
        >>> accepts_none(Annotated[int | None, AtLeast(1)]), accepts_none(float)
        (True, False)
    """
    if typing.get_origin(hint) is Annotated:
        hint = typing.get_args(hint)[0]
    if hint is Any or hint is None or hint is type(None):
        return True
    return typing.get_origin(hint) in (Union, types.UnionType) and any(accepts_none(m) for m in typing.get_args(hint))


def constructors(obj: type | Callable[..., Any]) -> list[Callable[..., Any]]:
    """Returns the functions whose parameters a call of ``obj`` accepts: a class's ``__init__`` along its bases.

    The bases are followed while a constructor passes ``**kwargs`` on (a subclass that declares only its own
    options); a callable that is not a class is its own constructor.

    Examples:
        >>> class Base:
        ...     def __init__(self, steps: int) -> None: ...
        >>> class Learner(Base):
        ...     def __init__(self, *args, lslr: bool = True, **kwargs) -> None: ...
        >>> [f.__qualname__ for f in constructors(Learner)]
        ['Learner.__init__', 'Base.__init__']
    """
    if not isinstance(obj, type):
        return [obj]
    found = []
    for cls in obj.__mro__:
        init = cls.__dict__.get("__init__")
        if init is None or cls is object:
            continue
        found.append(init)
        kinds = {p.kind for p in inspect.signature(init).parameters.values()}
        if inspect.Parameter.VAR_KEYWORD not in kinds:
            break
    return found


def _dataclass_in(hint: Any) -> type | None:
    """Returns the dataclass a hint names (alone, or in a union with None or a mapping), or None."""
    if typing.get_origin(hint) is Annotated:
        hint = typing.get_args(hint)[0]
    members = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)
    found = [m for m in members if isinstance(m, type) and dataclasses.is_dataclass(m)]
    return found[0] if len(found) == 1 else None


def check_fields(instance: Any) -> None:
    """Raises ``ValueError`` naming every field of the dataclass ``instance`` whose value its hint does not accept.

    Nested dataclass fields are checked by their own ``__post_init__``; each problem is one clause,
    ``name=value is not accepted (why); use ...``.
    """
    keys = keys_of(type(instance))
    problems = []
    for name, key in keys.items():
        if "." in name:
            continue
        problem = key.check(name, getattr(instance, name))
        if problem:
            problems.append(problem)
    if problems:
        raise ValueError("; ".join(problems))


def check_arguments(function: Callable[..., Any], **values: Any) -> None:
    """Raises ``ValueError`` naming every argument in ``values`` whose value ``function``'s hint for it does not accept.

    A constructor checks its own keyword options against its own hints (see :func:`keys_of`), so the type,
    range and choices of an option are written once, in its signature.
    """
    keys = keys_of(function)
    problems = [p for name, value in values.items() if name in keys and (p := keys[name].check(name, value))]
    if problems:
        raise ValueError("; ".join(problems))
