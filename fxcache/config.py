"""Cache method configs: frozen keyword-only dataclasses, validated on construction, with a registry."""

from __future__ import annotations

import dataclasses
import difflib
import enum
import hashlib
import json
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

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """Base of every method config. Steps count up from 0 within one generation.

    Subclasses set `method`, validate in `_validate`, and implement `step_kind(step)`. Step counts (`interval`,
    `warmup_steps`, `num_steps`) are at most `MAX_STEPS` (10000): larger ones only mean "never" and would make
    schedules and exports unbounded.
    """

    method: ClassVar[str] = ""
    version: ClassVar[int] = 1

    def __post_init__(self) -> None:
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
