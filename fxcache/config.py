"""Cache method configs: frozen keyword-only dataclasses, validated on construction, with a registry."""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import hashlib
import json
import math
import types
import typing
from typing import ClassVar

from .errors import ConfigError, UnknownOptionError


class StepKind(str, enum.Enum):
    """What one model call computes."""

    FULL = "full"  # everything; fills the caches
    PARTIAL = "partial"  # token-wise units on k tokens, attention from cache
    REUSE = "reuse"  # every unit from cache, current gates (FORA)
    SKIP = "skip"  # no block: cached head input + current timestep (DuCa aggressive)
    FORECAST = "forecast"  # every unit from its Taylor expansion around the last FULL step (TaylorSeer)
    CLUSTER = "cluster"  # forecast, plus one token per cluster recomputed and propagated (ClusCa)
    RESIDUAL = "residual"  # some blocks replaced by the residual they added at the last computed step (FBCache,
    #                        DBCache, TeaCache, MagCache)

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """Base of every method config. Steps count up from 0 within one generation.

    Subclasses set `method`, validate in `_validate`, and implement `step_kind(step)`. Before `_validate` runs,
    every field annotated int, float (finite), str or bool, or one of those or None, holds a value of that type
    and every str field named in `CHOICES` one of its values (`field_specs`), or a `ConfigError` names the field,
    the value and what it accepts; `_validate` checks ranges and how fields combine. Step counts (`interval`,
    `warmup_steps`, `num_steps`) are at most `MAX_STEPS` (10000): larger ones only mean "never" and would make
    schedules and exports unbounded.
    """

    method: ClassVar[str] = ""
    version: ClassVar[int] = 1
    #: field name -> the values a str field takes (merged over the class's bases: mixins add theirs)
    CHOICES: ClassVar[dict] = {}

    def __post_init__(self) -> None:
        for spec in field_specs(type(self)):  # types and choices first: `_validate` compares and looks values up
            spec.check(type(self).__name__, getattr(self, spec.name))
            if spec.type is tuple and isinstance(getattr(self, spec.name), list):  # a list of numbers is taken
                object.__setattr__(self, spec.name, tuple(getattr(self, spec.name)))
        self._validate()

    def _validate(self) -> None:  # pragma: no cover - overridden
        pass

    def step_kind(self, step: int) -> StepKind:
        raise NotImplementedError

    @property
    def kinds(self) -> frozenset[StepKind]:
        """The step kinds this method's schedule can emit (its variants are built from this)."""
        raise NotImplementedError

    @property
    def fresh_ratio(self) -> float:
        """Fraction of each token-wise unit's tokens recomputed on a PARTIAL step."""
        return 0.0

    @property
    def taylor_order(self) -> int | None:
        """m for methods that keep Taylor factors F_0..F_m per unit (TaylorSeer, ClusCa); None otherwise."""
        return None

    @property
    def taylor_warmup(self) -> int:
        """W of the Taylor bookkeeping: derivatives only from computed steps s >= W - 1."""
        return self.warmup

    @property
    def draw_seed(self) -> int:
        """Seed of the random draws a variant makes (token choice, k-means start), reseeded every generation so that
        runs repeat; 0 for methods that draw nothing."""
        return 0

    @property
    def horizon(self) -> int:
        """Steps within which `step_kind` emits every kind it ever emits: how far the compile-time variant list looks
        (methods with a cycle override it with a bound of their own)."""
        return MAX_STEPS

    @property
    def planned_steps(self) -> int | None:
        """The sampler step count the schedule is written for (`num_steps` of schedules that count the steps),
        None when it fits any step count."""
        return None

    @property
    def warmup(self) -> int:
        """W: leading FULL steps (every method here has `warmup_steps`)."""
        return int(getattr(self, "warmup_steps", 1))

    def every_call_computed(self) -> "CacheConfig":
        """This config with every call computed (what `fxcache check` compares with the uncached model)."""
        return dataclasses.replace(self, interval=1)

    def every_call_reused(self) -> "CacheConfig":
        """This config caching as much as it can (what `fxcache check` runs to see the cached path run): itself
        for a fixed schedule."""
        return self

    def tokens_for(self, tokens: int) -> int:
        """k: how many of `tokens` rows a PARTIAL step recomputes (static per compiled variant)."""
        r = self.fresh_ratio
        if r <= 0.0:
            return 0
        return min(tokens, max(1, int(r * tokens + 1e-9)))

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"method": self.method, "version": self.version, **d}

    @classmethod
    def from_dict(cls, data: dict) -> "CacheConfig":
        data = dict(data)
        method = data.pop("method", cls.method)
        data.pop("version", None)
        target = get_method(method) if cls is CacheConfig else cls
        return target(**data)

    def cache_key(self) -> str:
        payload = json.dumps(self.to_dict(), sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


#: the field types `CacheConfig` checks, what each accepts (for the message) and the test of a value
_TYPES = {
    int: ("an int", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    float: ("a finite number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and _finite(v)),
    str: ("a str", lambda v: isinstance(v, str)),
    bool: ("True or False", lambda v: isinstance(v, bool)),
    tuple: ("a non-empty list of finite numbers",
            lambda v: isinstance(v, (tuple, list)) and len(v) > 0 and all(_TYPES[float][1](x) for x in v)),
}


def _finite(v) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an int beyond any float
        return False


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """What `CacheConfig` checks of one field before the config's own `_validate`: its annotated type (int, float,
    str or bool; None for any other, which it leaves to `_validate`), whether None is accepted, and the values a
    str field takes (`CHOICES`)."""

    name: str
    type: type | None
    optional: bool
    choices: tuple = ()

    @property
    def accepted(self) -> str:
        said = f"one of {', '.join(self.choices)}" if self.choices else _TYPES[self.type][0]
        return f"None or {said}" if self.optional else said

    def check(self, owner: str, value) -> None:
        if self.type is None or (value is None and self.optional):
            return
        if not _TYPES[self.type][1](value):
            raise ConfigError(f"{owner}.{self.name} must be {self.accepted}, got {value!r} "
                              f"(a {type(value).__name__})")
        if self.choices and value not in self.choices:
            raise ConfigError(f"{owner}.{self.name} must be {self.accepted}, got {value!r}")


@functools.lru_cache(maxsize=None)
def field_specs(cls: type) -> tuple[FieldSpec, ...]:
    """The `FieldSpec` of every field of config class `cls`, from its annotations and `CHOICES`."""
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):  # annotations this module cannot resolve: left to the config's `_validate`
        hints = {}
    choices: dict = {}
    for base in reversed(cls.__mro__):
        choices.update(vars(base).get("CHOICES", {}))
    specs = []
    for f in dataclasses.fields(cls):
        hint = hints.get(f.name)
        args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        kinds = [tuple if typing.get_origin(a) is tuple else a for a in args if a is not type(None)]
        kind = kinds[0] if len(kinds) == 1 and kinds[0] in _TYPES else None
        specs.append(FieldSpec(f.name, kind, type(None) in args, tuple(choices.get(f.name, ()))))
    return tuple(specs)


_METHODS: dict[str, type[CacheConfig]] = {}


def register_method(cls: type[CacheConfig]) -> type[CacheConfig]:
    """Class decorator: make `cls` available as `cache_backend(cls.method)`."""
    name = cls.method.lower()
    if not name:
        raise ConfigError(f"{cls.__name__} has no `method` name")
    if name in _METHODS and _METHODS[name] is not cls:
        raise ConfigError(
            f"cache method {name!r} is already registered by {_METHODS[name].__module__}.{_METHODS[name].__name__}"
        )
    _METHODS[name] = cls
    return cls


def method_names() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> type[CacheConfig]:
    if not isinstance(name, str):
        raise ConfigError(f"a cache method is a name or a config instance, not {type(name).__name__}")
    cls = _METHODS.get(name.lower())
    if cls is None:
        close = difflib.get_close_matches(name.lower(), _METHODS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown cache method {name!r}{hint} Registered: {', '.join(method_names())}")
    return cls


def preset_options(name: str, preset: str, num_steps: int) -> dict:
    """The options of method `name`'s `preset` for a `num_steps`-step sampler: a preset that fixes the paper's step
    count (its schedule is a table over the steps) is given `num_steps` instead."""
    options = dict(get_method(name).PRESETS[preset])
    if "num_steps" in options:
        options["num_steps"] = num_steps
    return options


def make_config(name: str, *, preset: str | None = None, **options) -> CacheConfig:
    """`get_method(name)(**options)`, with unknown options named next to the valid ones.

    `preset`: a model family whose published settings start the config (the method's `PRESETS`); `options`
    override single fields of it.
    """
    cls = get_method(name)
    if preset is not None:
        presets = getattr(cls, "PRESETS", {})
        if not isinstance(preset, str) or preset.lower() not in presets:
            raise ConfigError(f"unknown preset {preset!r} for cache method {cls.method!r}; "
                              f"presets: {', '.join(sorted(presets)) or 'none'}")
        options = {**presets[preset.lower()], **options}
    fields = [f.name for f in dataclasses.fields(cls)]
    for key in options:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UnknownOptionError(
                f"unknown option {key!r} for cache method {cls.method!r}{hint}; valid options: {', '.join(fields)}"
            )
    return cls(**options)


SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes seeds up to this
#: the most sampler steps a config, an export or a manifest covers (DDPM's 1000 is the most in common use); also
#: bounds step counts of options (interval, warm-up), whose larger values mean the same as this
MAX_STEPS = 10_000
STEPS_WHY = "a step count; samplers run at most a few thousand steps"


def check_seed(owner: str, value) -> None:
    check_int(owner, "seed", value, minimum=0, maximum=SEED_MAX, why="a 64-bit generator seed")


def check_int(owner: str, name: str, value, *, minimum: int, maximum: int | None = None, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{owner}.{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{owner}.{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{owner}.{name} must be <= {maximum}{f' ({why})' if why else ''}, got {value}")


def check_fraction(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ConfigError(f"{owner}.{name} must be a number in [0, 1], got {value!r}")


#: what a saved config file holds: a config as `CacheConfig.to_dict()` writes it, or a calibration file
#: (`fxcache.calibrate(...).save(path)`) whose "config" entry is one
CONFIG_FILE_SUFFIX = ".json"


def config_path(value) -> str | None:
    """The file `value` names when it names a config file (an `os.PathLike`, or a str ending in ".json"), else None:
    a str that does not end so is a method name (no method name does)."""
    import os

    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, str) and value.lower().endswith(CONFIG_FILE_SUFFIX):
        return value
    return None


def load_config(path, **options) -> CacheConfig:
    """The config saved in the JSON file `path`: one written by `fxcache.calibrate(...).save(path)` (its "config"
    entry) or a config's `to_dict()` as JSON (`{"method": "fora", "interval": 3}`; fields left out take their
    defaults). `options` override single fields, as with a preset. A missing or unreadable file, a file that is not
    JSON, one without a "method", an unknown method or option, or a file written for a newer version of the method's
    config is a `ConfigError` naming the file."""
    import os

    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"no such config file: {path!r} (write one with fxcache.calibrate(...).save(path), or "
                          f"json.dump(config.to_dict(), f))") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config file {path!r} is not JSON: {exc.msg} at line {exc.lineno} column "
                          f"{exc.colno}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path!r} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    if isinstance(data, dict) and isinstance(data.get("config"), dict):
        data = data["config"]  # a calibration file
    if not isinstance(data, dict) or not isinstance(data.get("method"), str):
        raise ConfigError(f"config file {path!r} names no method: it holds a config as CacheConfig.to_dict() writes "
                          f"it ({{\"method\": \"fora\", \"interval\": 3, ...}}) or a calibration file with a "
                          f"\"config\" entry")
    fields = dict(data)
    name, version = fields.pop("method"), fields.pop("version", None)
    try:
        cls = get_method(name)
        if version is not None and (isinstance(version, bool) or not isinstance(version, int)
                                    or version > cls.version):
            raise ConfigError(f"version {version!r} of the {cls.method} config is not one this fxcache reads (it "
                              f"reads up to {cls.version}): the file was written by a newer fxcache")
        return make_config(name, **{**fields, **options})
    except ConfigError as exc:
        raise type(exc)(f"config file {path!r}: {exc}") from None
