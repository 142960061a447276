"""Generic config machinery: typed fields with bounds, building from dicts, one validation pass.

A config is a tree of dataclasses (sections). What a field may hold is said once,
where the field is declared:

- its type: `int`, `float`, `bool`, `str`, `X | None`, a `Literal[...]` of choices, a
  nested section, or a list of sections (data.sources);
- its bounds and whether it is unsafe to change on resume, as metadata from `setting()`;
- checks that involve several fields, in the section's `check(self, cfg) -> list[str]`
  (`cfg` is the root object being validated).

`build()` turns nested dicts (YAML) into sections, collecting unknown keys and wrong
types; `validate()` walks a built tree once and collects every type, choice, bound
and cross-field problem. Nothing here knows nemoe's sections (nemoe.config does).
"""

from __future__ import annotations

import dataclasses
import hashlib
import operator
import types
import typing
from dataclasses import MISSING, field, fields, is_dataclass

# Bound name -> (comparison that must hold, symbol in messages). Lower bounds first.
_BOUNDS = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<="), "lt": (operator.lt, "<")}


def setting(default=MISSING, *, factory=MISSING, ge=None, gt=None, le=None, lt=None, unsafe: bool = False):
    """A dataclass field with its rules as metadata.

    ge / gt / le / lt: bounds the value must satisfy (None: no bound); unsafe: changing it
    on resume would make a checkpoint mean something else (see `is_unsafe`).
    """
    meta = {name: bound for name, bound in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if bound is not None}
    if unsafe:
        meta["unsafe"] = True
    return field(default=default, default_factory=factory, metadata=meta)


def join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


# --------------------------------------------------------------------------- #
# Coercion: a YAML value -> the field's type, or a problem
# --------------------------------------------------------------------------- #

def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def spell_choices(choices) -> str:
    """(1, 2) -> '1 or 2'; ('a', 'b', 'c') -> 'one of a, b, c'."""
    words = [str(c) for c in choices]
    return " or ".join(words) if len(words) <= 2 else f"one of {', '.join(words)}"


def _list_item(tp):
    """The item type of `list[X]`, else None."""
    return typing.get_args(tp)[0] if typing.get_origin(tp) is list else None


def coerce(value, tp, where: str, problems: list[str], choices: bool = True):
    """`value` as type `tp`; on failure record one problem (and return None).

    choices=False (while building) takes a Literal's value at the choices' type without
    checking that it is one of them: like bounds, that is `validate()`'s job.
    """
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        if not choices:
            return coerce(value, type(typing.get_args(tp)[0]), where, problems)
        return _coerce_choice(value, typing.get_args(tp), where, problems)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, typing.get_args(tp), where, problems, choices)
    if origin is list:
        return _coerce_list(value, _list_item(tp), where, problems, choices)
    if is_dataclass(tp):
        return build(tp, value, where, problems)
    out = _coerce_scalar(value, tp)
    if out is None:
        problems.append(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return out


def _coerce_scalar(value, tp):
    """bool / int / float / str from a YAML scalar (None when it is not one); other types pass."""
    if tp is bool:
        return value if isinstance(value, bool) else None
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():  # 1e6 in YAML is a float
            return int(value)
        return None
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                return None
        return None
    if tp is str:
        return value if isinstance(value, str) else None
    return value


def _coerce_choice(value, choices: tuple, where: str, problems: list[str]):
    for choice in choices:  # coerced to the choice's type, so True is not 1 and 2.0 is 2
        out = _coerce_scalar(value, type(choice))
        if out is not None and out == choice:
            return choice
    problems.append(f"{where} must be {spell_choices(choices)}, got {value!r}")
    return None


def _coerce_union(value, args: tuple, where: str, problems: list[str], choices: bool):
    if value is None and type(None) in args:
        return None
    for arg in args:
        if arg is type(None):
            continue
        sub: list[str] = []
        out = coerce(value, arg, where, sub, choices)
        if not sub:
            return out
    problems.append(f"{where}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    return None


def _coerce_list(value, item, where: str, problems: list[str], choices: bool):
    if not isinstance(value, (list, tuple)):
        problems.append(f"{where}: expected a list, got {value!r}")
        return None
    return [coerce(v, item, f"{where}[{i}]", problems, choices) for i, v in enumerate(value)]


# --------------------------------------------------------------------------- #
# Building sections from nested dicts
# --------------------------------------------------------------------------- #

def build(cls, raw, where: str, problems: list[str]):
    """A `cls` section from a mapping (None: all defaults); unknown keys and wrong types become problems.

    A key with a value of the wrong type keeps its default, so the section can still be
    built. Choices and bounds are left to `validate()`.
    """
    if isinstance(raw, cls):
        return raw
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{where or 'config'}: expected a mapping of keys, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in fields(cls) if f.init]
    kwargs = {}
    for key, value in raw.items():
        if key not in valid:
            what = "unknown key (valid keys" if where else "unknown section (valid"
            problems.append(f"{join(where, str(key))}: {what}: {', '.join(valid)})")
            continue
        before = len(problems)
        out = coerce(value, hints[key], join(where, key), problems, choices=False)
        if len(problems) == before:
            kwargs[key] = out
    return cls(**kwargs)


# --------------------------------------------------------------------------- #
# The validation pass: types and choices, bounds, then each section's check()
# --------------------------------------------------------------------------- #

def validate(section, where: str = "", cfg=None) -> list[str]:
    """Every problem in a built section tree, one readable line each (empty when usable).

    `cfg` (default: `section`) is what each section's `check(cfg)` receives.
    """
    cfg = section if cfg is None else cfg
    found: list[str] = []
    hints = typing.get_type_hints(type(section))
    for f in fields(section):
        value, tp, path = getattr(section, f.name), hints[f.name], join(where, f.name)
        item = _list_item(tp)
        if is_dataclass(tp):
            found += validate(value, path, cfg)
        elif item is not None and is_dataclass(item):
            found += _list_problems(value, item, path, cfg)
        else:
            before = len(found)
            coerce(value, tp, path, found)
            if len(found) == before and value is not None:
                found += bound_problems(value, f.metadata, path)
    check = getattr(section, "check", None)
    return found + (check(cfg) if check is not None else [])


def _list_problems(value, item, where: str, cfg) -> list[str]:
    if not isinstance(value, list):
        return [f"{where}: expected a list, got {value!r}"]
    found = []
    for i, entry in enumerate(value):
        if isinstance(entry, item):
            found += validate(entry, f"{where}[{i}]", cfg)
        else:
            found.append(f"{where}[{i}]: expected a mapping of keys, got {entry!r}")
    return found


def bound_problems(value, meta, where: str) -> list[str]:
    """'train.lr must be > 0, got -1.0' when `value` breaks a bound in `meta` (a field's metadata)."""
    bounds = [(name, meta[name]) for name in _BOUNDS if name in meta]
    if not bounds or all(_BOUNDS[name][0](value, bound) for name, bound in bounds):
        return []
    if len(bounds) == 2:  # a lower and an upper bound: interval notation
        (lo_name, lo), (hi_name, hi) = bounds
        rule = f"in {'[' if lo_name == 'ge' else '('}{lo}, {hi}{']' if hi_name == 'le' else ')'}"
    else:
        rule = " and ".join(f"{_BOUNDS[name][1]} {bound}" for name, bound in bounds)
    return [f"{where} must be {rule}, got {value!r}"]


# --------------------------------------------------------------------------- #
# Seeds, flattened views, resume safety
# --------------------------------------------------------------------------- #

def derive_seed(run_seed: int, section: str) -> int:
    """A stable seed in [0, 2**31) for `section` from the run seed (same inputs, same seed, any process)."""
    digest = hashlib.blake2b(f"{run_seed}/{section}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 2**31


def resolve_seeds(section, run_seed: int, where: str = "") -> None:
    """Set every `seed` field left None in the section tree to `derive_seed(run_seed, its section)`.

    A section's label is its dotted path, or the field's `seed_label` metadata where one is given:
    a section moved to a new path keeps its old label, so its derived seed does not change."""
    for f in fields(section):
        value = getattr(section, f.name)
        if is_dataclass(value):
            resolve_seeds(value, run_seed, f.metadata.get("seed_label", join(where, f.name)))
        elif f.name == "seed" and value is None:
            setattr(section, f.name, derive_seed(run_seed, where))


def field_at(cls, key: str) -> dataclasses.Field | None:
    """The field a dotted key names in a section class tree (None: no such field)."""
    *sections, name = key.split(".")
    for part in sections:
        cls = typing.get_type_hints(cls).get(part)
        if not is_dataclass(cls):
            return None
    return next((f for f in fields(cls) if f.name == name), None)


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested dicts -> {"section.key": value}; lists (data.sources) stay whole values."""
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def changes(saved: dict, now: dict, ignore=(), defaults: dict | None = None) -> list[tuple[str, object, object]]:
    """(key, saved value, new value) for every flattened key that differs, except `ignore`.

    defaults: flattened values of keys `saved` lacks (settings added after it was written)."""
    a, b = {**(defaults or {}), **flatten(saved)}, flatten(now)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if k not in ignore and a.get(k) != b.get(k)]
