"""A family's config as a typed object, made from its rows of the settings table.

``config_class(family)`` builds one frozen dataclass per family from ``domgen.settings.SETTINGS``: every row is a field
(``train.epochs`` is the field ``epochs`` of the nested section class ``train``) whose type comes from the row's kind,
whose default is the row's default and whose metadata is the row itself (help, range, choices, flag). Nothing is written
twice: the table stays the one home of a setting, and a row added there is a field here.

``typed(cfg, family)`` checks and completes a config dict with ``settings.validate`` (the same one DomgenError sentence
for a wrong value) and returns the instance a family's code reads: ``cfg.source``, ``cfg.train.epochs``. The instance
keeps the validated dict it was made from: ``as_dict()`` is what run hashes, MLflow params and checkpoints see, the very
dict they saw before these classes existed, so every finished run is found again.
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from domgen import settings
from domgen.errors import DomgenError

# row kind -> field type; a nullable row, or one whose None default means "not set", may also be None
KIND_TYPES = {"int": int, "float": float, "bool": bool, "switch": bool | str, "choice": str, "str": str, "path": str,
              "names": tuple[str, ...], "floats": tuple[float, ...], "ints": tuple[int, ...], "bools": tuple[bool, ...],
              "mapping": Mapping[str, Any]}


def field_type(row: settings.Setting):
    kind = KIND_TYPES[row.kind]
    return kind | None if row.nullable or row.default is None else kind


def _frozen(value):
    """A validated value as a field holds it: lists as tuples, mappings read-only, so an instance cannot change."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: _frozen(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


def _thawed(value):
    """A field's value as a config dict holds it (what ``validate`` checks)."""
    if isinstance(value, Mapping):
        return {k: _thawed(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thawed(v) for v in value]
    return value


class Section:
    """A frozen, typed view of one section of a validated config; its fields are the section's rows."""

    __slots__ = ("_data",)
    _family: str
    _path: tuple[str, ...]
    _children: dict[str, type]

    def as_dict(self) -> dict:
        """A copy of the validated dict this was made from (a row left to a None default stays absent): what is hashed,
        logged as params and written into checkpoints."""
        return copy.deepcopy(self._data)

    def __reduce__(self):
        # a generated class is found again by its family and path: a worker process makes it from the same table
        return _rebuild, (self._family, self._path, self._data)


class FamilyConfig(Section):
    """A family's typed config. Derived configs come from ``replace``, ``without`` and ``attach``; none changes this one."""

    __slots__ = ()

    def replace(self, **changes) -> FamilyConfig:
        """A copy with ``changes`` (dotted keys: ``replace(**{"pseudolabel.ci_min": 0.9})``) checked as a profile's values
        are; what was attached stays attached."""
        rows, attached = self._split()
        for dotted, value in changes.items():
            *parents, last = dotted.split(".")
            node = rows
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = _thawed(value)
        return typed(rows, self._family).attach(**attached)

    def without(self, *keys: str) -> FamilyConfig:
        """A copy with ``keys`` (rows or whole sections) back to not set: at their table defaults, absent where that is None."""
        rows, attached = self._split()
        for dotted in keys:
            *parents, last = dotted.split(".")
            node = rows
            for part in parents:
                node = node.get(part, {})
            node.pop(last, None)
        return typed(rows, self._family).attach(**attached)

    def attach(self, **extra) -> FamilyConfig:
        """A copy carrying ``extra`` top-level keys that are no setting (``content_digest``: the contents of the files the
        paths name): in ``as_dict``, so in hashes and params; read back with ``attached``."""
        rows = sorted(set(extra) & set(self.__dataclass_fields__))
        if rows:
            raise ValueError(f"{', '.join(rows)} are settings, not attachments; change them with replace()")
        return _make(type(self), {**self.as_dict(), **copy.deepcopy(extra)})

    def attached(self, key: str):
        """A copy of what ``attach`` put under ``key``, or of what a config taken with ``check=False`` carries there (the
        ``dg`` of a compared method's model); None if nothing."""
        return copy.deepcopy(self._data.get(key))

    def _split(self) -> tuple[dict, dict]:
        data = self.as_dict()
        rows = {k: v for k, v in data.items() if k in self.__dataclass_fields__}
        return rows, {k: v for k, v in data.items() if k not in rows}


def _make(cls: type, data: dict) -> Section:
    """An instance of ``cls`` over ``data``; a row ``data`` lacks reads as its default (None: not set)."""
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in cls._children:
            values[f.name] = _make(cls._children[f.name], data.get(f.name) or {})
        else:
            values[f.name] = _frozen(data[f.name] if f.name in data else f.metadata["row"].default)
    out = cls(**values)
    object.__setattr__(out, "_data", data)
    return out


def _rebuild(family: str, path: tuple[str, ...], data: dict) -> Section:
    cls = config_class(family)
    for name in path:
        cls = cls._children[name]
    return _make(cls, data)


def _camel(words) -> str:
    return "".join(w.capitalize() for word in words for w in word.replace("-", "_").split("_"))


def _section_class(family: str, path: tuple[str, ...], rows: dict[str, settings.Setting]) -> type:
    """The class of one section: a field per row directly in it, a nested section class per sub-section."""
    base = FamilyConfig if not path else Section
    fields, children = [], {}
    for name in dict.fromkeys(key.split(".")[0] for key in rows):
        if hasattr(base, name):
            raise ValueError(f"a {family} row named {'.'.join((*path, name))} would hide {base.__name__}.{name}; rename the row")
        if name in rows:
            row = rows[name]
            default = _frozen(row.default)
            # a read-only mapping is unhashable, which dataclasses take for mutable: a factory hands it out
            given = {"default_factory": lambda d=default: d} if isinstance(default, Mapping) else {"default": default}
            fields.append((name, field_type(row), dataclasses.field(metadata={"row": row}, **given)))
        else:
            children[name] = _section_class(family, (*path, name),
                                            {k.split(".", 1)[1]: s for k, s in rows.items() if k.split(".")[0] == name})
            fields.append((name, children[name]))
    name = _camel([family, *path]) + ("Config" if not path else "")
    return dataclasses.make_dataclass(name, fields, bases=(base,), frozen=True, slots=True, kw_only=True,
                                      namespace={"__module__": __name__, "_family": family, "_path": path, "_children": children})


_CLASSES: dict[str, tuple[list, type]] = {}


def config_class(family: str) -> type[FamilyConfig]:
    """The typed config class of ``family``, made from its rows once (and again when they change, as a test patching
    the table changes them)."""
    rows = [s for (fam, _), s in settings.TABLE.items() if fam == family]
    if not rows:
        raise DomgenError(f"{family} has no settings rows; add them to SETTINGS in domgen/settings.py")
    if family not in _CLASSES or _CLASSES[family][0] != rows:
        _CLASSES[family] = (rows, _section_class(family, (), {s.key: s for s in rows}))
    return _CLASSES[family][1]


def typed(cfg: Mapping | FamilyConfig, family: str, check: bool = True) -> FamilyConfig:
    """``cfg`` as ``family``'s typed config. A dict (a profile read in Python: ``load_profile`` + ``apply_overrides``) is
    checked and completed as ``settings.validate`` does on the command line, so it hashes as the same command does; a
    typed config of ``family`` is returned as it is.

    ``check=False``: a dict domgen made itself from checked values (a checkpoint's record, the leave-one-out round of a
    compared method), taken as it is, unchecked and uncompleted, so the runs made from it keep their hashes; a row it
    lacks (one added since) reads as its table default."""
    cls = config_class(family)
    if isinstance(cfg, FamilyConfig):
        if cfg._family != family:
            raise DomgenError(f"a {cfg._family} config cannot run as {family}; run it with `domgen {cfg._family}`")
        return cfg
    if not check:
        return _make(cls, copy.deepcopy(dict(cfg)))
    named = cfg.get("family") or family
    if named != family:
        raise DomgenError(f"the config is a {named} config, not a {family} one; run it with `domgen {named}` or give family: {family}")
    return _make(cls, settings.validate(copy.deepcopy(dict(cfg)), family=family))
