"""Method configs and the registry: validation, serialisation, cache keys, `cache_backend` argument handling."""

from __future__ import annotations

import dataclasses
import math
import re
from fractions import Fraction
from typing import ClassVar

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import fxcache
import fxcache.config as config_module
from fxcache import CacheConfig, ConfigError, DuCaConfig, FORAConfig, StepKind, cache_backend
from fxcache.config import get_method, method_names, register_method

# -- strategies ----------------------------------------------------------------------------------------------------

intervals = st.integers(min_value=1, max_value=1000)
warmups = st.integers(min_value=1, max_value=1000)
seeds = st.integers(min_value=0, max_value=2**63 - 1)
ratios = st.one_of(
    st.floats(min_value=0.0, max_value=1.0, allow_nan=False, allow_infinity=False),
    st.sampled_from([0, 1]),
)

orders = st.integers(min_value=0, max_value=8)
weights = st.floats(min_value=0.0, max_value=10.0, allow_nan=False)
step_counts = st.one_of(st.none(), st.integers(min_value=1, max_value=1000))

fora_configs = st.builds(FORAConfig, interval=intervals, warmup_steps=warmups)
duca_configs = st.builds(DuCaConfig, interval=intervals, ratio=ratios, warmup_steps=warmups, seed=seeds,
                         num_steps=step_counts)
toca_configs = st.builds(fxcache.ToCaConfig, interval=intervals, fresh_ratio=ratios, warmup_steps=warmups,
                         score=st.sampled_from(["random", "vnorm", "attention"]), staleness_weight=weights,
                         spatial_grid=st.integers(0, 4), ratio_schedule=st.sampled_from(["flat", "flux"]),
                         seed=seeds)
taylor_configs = st.builds(fxcache.TaylorSeerConfig, interval=intervals, order=orders, warmup_steps=warmups)
clusca_configs = st.builds(fxcache.ClusCaConfig, interval=intervals, order=orders, clusters=st.integers(1, 64),
                           gamma=st.floats(min_value=0.0, max_value=1.0), warmup_steps=warmups, seed=seeds)
configs = st.one_of(fora_configs, duca_configs, toca_configs, taylor_configs, clusca_configs)

# a valid value for each field that differs from most draws, and a generator of alternatives
field_values = {
    "interval": intervals,
    "warmup_steps": warmups,
    "ratio": ratios,
    "fresh_ratio": ratios,
    "seed": seeds,
    "schedule": st.just("counter"),  # the other schedules need num_steps; tested in test_schedules
    "num_steps": st.integers(min_value=1, max_value=1000),
    "order": orders,
    "clusters": st.integers(1, 64),
    "gamma": st.floats(min_value=0.0, max_value=1.0),
    "kmeans_iters": st.integers(0, 200),
    "score": st.sampled_from(["random", "staleness", "knorm", "vnorm", "similarity", "attention"]),
    "prefer": st.sampled_from(["low", "high"]),
    "staleness_weight": weights,
    "spatial_grid": st.integers(0, 8),
    "spatial_bonus": weights,
    "ratio_schedule": st.sampled_from(["flat", "flux", "opensora"]),
    "step_buckets": st.integers(1, 50),
    "rows": st.sampled_from(["each", "shared"]),
    "anchor": st.sampled_from(["exact", "ref"]),
    "draws": st.sampled_from(["shared", "per_unit"]),
    "kmeans": st.sampled_from(["fixed", "ref"]),
}


def fields_of(config) -> list[str]:
    return [f.name for f in dataclasses.fields(config)]


# -- frozen, keyword-only ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [FORAConfig(), DuCaConfig()])
def test_configs_are_frozen(config):
    for name in fields_of(config):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(config, name, getattr(config, name))


@pytest.mark.parametrize(
    "make",
    [
        lambda: FORAConfig(3),
        lambda: FORAConfig(3, 1),
        lambda: DuCaConfig(5),
        lambda: DuCaConfig(5, 0.9),
    ],
)
def test_configs_are_keyword_only(make):
    with pytest.raises(TypeError):
        make()


def test_defaults():
    assert (FORAConfig().interval, FORAConfig().warmup_steps) == (3, 1)
    d = DuCaConfig()
    assert (d.interval, d.ratio, d.warmup_steps, d.seed) == (5, 0.9, 1, 0)
    assert FORAConfig.method == "fora" and DuCaConfig.method == "duca"


# -- serialisation -------------------------------------------------------------------------------------------------


@given(config=configs)
def test_to_dict_from_dict_round_trip(config):
    data = config.to_dict()
    assert data["method"] == config.method
    assert data["version"] == config.version
    assert set(data) == {"method", "version", *fields_of(config)}
    again = type(config).from_dict(data)
    assert type(again) is type(config)
    assert again == config


@given(config=configs)
def test_base_from_dict_dispatches_on_method(config):
    again = CacheConfig.from_dict(config.to_dict())
    assert type(again) is type(config)
    assert again == config


@given(config=configs)
def test_from_dict_does_not_mutate_its_argument(config):
    data = config.to_dict()
    snapshot = dict(data)
    CacheConfig.from_dict(data)
    assert data == snapshot


def test_base_from_dict_unknown_method():
    with pytest.raises(ConfigError, match="nope"):
        CacheConfig.from_dict({"method": "nope"})


# -- cache keys ----------------------------------------------------------------------------------------------------


@given(config=configs)
def test_cache_key_is_stable_for_equal_configs(config):
    key = config.cache_key()
    assert isinstance(key, str) and key
    assert config.cache_key() == key
    rebuilt = type(config)(**{name: getattr(config, name) for name in fields_of(config)})
    assert rebuilt == config and rebuilt.cache_key() == key
    assert CacheConfig.from_dict(config.to_dict()).cache_key() == key
    assert dataclasses.replace(config).cache_key() == key


@pytest.mark.parametrize(
    "a, b",
    [
        (DuCaConfig(ratio=1), DuCaConfig(ratio=1.0)),
        (DuCaConfig(ratio=0), DuCaConfig(ratio=0.0)),
        (DuCaConfig(ratio=0.0), DuCaConfig(ratio=-0.0)),
    ],
    ids=["int-1-vs-float-1", "int-0-vs-float-0", "zero-vs-negative-zero"],
)
def test_cache_key_is_equal_for_equal_configs_of_different_spelling(a, b):
    assert a == b
    assert a.cache_key() == b.cache_key()


@given(config=configs, data=st.data())
def test_cache_key_changes_when_any_field_changes(config, data):
    name = data.draw(st.sampled_from(fields_of(config)))
    value = data.draw(field_values[name])
    assume(value != getattr(config, name))
    changed = dataclasses.replace(config, **{name: value})
    assert changed != config
    assert changed.cache_key() != config.cache_key()


def test_cache_key_depends_on_method():
    fora, duca = FORAConfig(interval=5, warmup_steps=1), DuCaConfig(interval=5, warmup_steps=1)
    assert fora.cache_key() != duca.cache_key()


# -- validation ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [FORAConfig, DuCaConfig])
@pytest.mark.parametrize(
    "field, value",
    [
        ("interval", 0),
        ("interval", -3),
        ("interval", 2.5),
        ("interval", 3.0),
        ("interval", True),
        ("interval", "3"),
        ("warmup_steps", 0),
        ("warmup_steps", False),
        ("warmup_steps", 1.5),
    ],
)
def test_invalid_int_fields(cls, field, value):
    with pytest.raises(ConfigError, match=field):
        cls(**{field: value})


@pytest.mark.parametrize(
    "field, value",
    [
        ("ratio", -0.1),
        ("ratio", 1.5),
        ("ratio", "a"),
        ("ratio", True),
        ("ratio", None),
        ("ratio", math.nan),
        ("seed", -1),
        ("seed", 0.5),
        ("seed", True),
    ],
)
def test_invalid_duca_fields(field, value):
    with pytest.raises(ConfigError, match=field):
        DuCaConfig(**{field: value})


def wrong_values(spec, off=None) -> st.SearchStrategy:
    """Values a field of `spec`'s annotated type must refuse: other types (None where it is not allowed, a bool for
    an int, a float for an int, a str for a number, containers), non-finite and negative numbers (no option of a
    registered method takes a negative, but for the value `off` that a config's `OFF_VALUES` declares: cache-dit's
    -1 for "no limit"), and strs that are none of a field's choices."""
    others = [st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
              st.tuples(st.integers()), st.binary(max_size=3), st.complex_numbers(allow_nan=False, max_magnitude=9)]
    if not spec.optional:
        others.append(st.none())
    if spec.type is int:
        negative = st.integers(max_value=-1) if off is None else st.integers(max_value=-1).filter(lambda v: v != off)
        others += [st.booleans(), st.floats(), st.text(max_size=3), negative]
    elif spec.type is float:
        others += [st.booleans(), st.text(max_size=3), st.sampled_from([math.nan, math.inf, -math.inf]),
                   st.floats(max_value=-1e-300), st.integers(max_value=-1), st.sampled_from([10**400, -10**400])]
    elif spec.type is tuple:  # a list of finite numbers
        others = [o for o in others if o is not others[0] and o is not others[2]]
        others += [st.booleans(), st.integers(), st.text(max_size=3), st.just([]), st.just(()),
                   st.lists(st.sampled_from([math.nan, math.inf, "a", None]), min_size=1, max_size=3)]
    elif spec.type is str:
        others += [st.booleans(), st.integers(), st.floats(),
                   st.text(max_size=6).filter(lambda v: v not in spec.choices)]
    return st.one_of(others)


FIELDS = [(name, spec) for name in method_names() for spec in config_module.field_specs(get_method(name))]


def test_every_field_of_every_method_has_a_checked_type_and_every_str_field_its_choices():
    for name, spec in FIELDS:
        assert spec.type in (int, float, str, tuple), (name, spec)
        assert spec.type is not str or spec.choices, (name, spec)


@pytest.mark.parametrize("method, spec", FIELDS, ids=[f"{m}.{s.name}" for m, s in FIELDS])
@given(data=st.data())
def test_a_wrong_value_for_any_field_is_a_config_error_naming_it(method, spec, data):
    """Any wrong-typed (or negative, non-finite, unknown) value of any option of any registered method is a
    ConfigError that names the option and the value, never another exception (a list for ratio_schedule was an
    unhashable TypeError)."""
    cls = get_method(method)
    value = data.draw(wrong_values(spec, getattr(cls, "OFF_VALUES", {}).get(spec.name)))
    with pytest.raises(ConfigError) as info:
        cls(**{spec.name: value})
    assert f"{cls.__name__}.{spec.name}" in str(info.value) and repr(value)[:20] in str(info.value)


@pytest.mark.parametrize("value, says", [([1], "got [1] (a list)"), ({}, "got {} (a dict)"),
                                         (None, "got None (a NoneType)")])
def test_an_unhashable_ratio_schedule_is_named_with_the_schedules(value, says):
    with pytest.raises(ConfigError, match=r"ToCaConfig\.ratio_schedule must be one of flat, flux, dit-ddim50, "
                                          r"dit-ddpm250, pixart, opensora, " + re.escape(says)):
        fxcache.ToCaConfig(ratio_schedule=value)


def test_the_type_checks_follow_the_annotations_of_a_new_method():
    """A method registered elsewhere gets the same checks from its annotations, with its own choices."""

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Probe(CacheConfig):
        CHOICES: ClassVar[dict] = {"mode": ("a", "b")}
        interval: int = 2
        scale: float | None = None
        mode: str = "a"
        extra: tuple = ()  # a type the base class does not check

    with pytest.raises(ConfigError, match=r"Probe\.interval must be an int, got 2\.0 \(a float\)"):
        Probe(interval=2.0)
    with pytest.raises(ConfigError, match=r"Probe\.scale must be None or a finite number, got 'x' \(a str\)"):
        Probe(scale="x")
    with pytest.raises(ConfigError, match=r"Probe\.mode must be one of a, b, got 'c'"):
        Probe(mode="c")
    assert Probe(extra=[1], scale=1).scale == 1


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        FORAConfig(interval=0)


@given(interval=st.integers(max_value=0))
def test_any_non_positive_interval_is_rejected(interval):
    with pytest.raises(ConfigError, match="interval"):
        DuCaConfig(interval=interval)


# -- token counts --------------------------------------------------------------------------------------------------


def test_fresh_ratio_is_the_complement_of_ratio():
    assert DuCaConfig(ratio=0.9).fresh_ratio == pytest.approx(0.1)
    assert DuCaConfig(ratio=0.0).fresh_ratio == pytest.approx(1.0)
    assert DuCaConfig(ratio=1.0).fresh_ratio == 0.0
    assert FORAConfig().fresh_ratio == 0.0


@given(per_mille=st.integers(0, 1000), tokens=st.integers(0, 20000))
def test_tokens_for_is_floor_of_fresh_fraction(per_mille, tokens):
    ratio = per_mille / 1000
    config = DuCaConfig(ratio=ratio)
    fresh = 1 - Fraction(per_mille, 1000)  # exact, free of float rounding
    expected = 0 if fresh == 0 else min(tokens, max(1, math.floor(fresh * tokens)))
    assert config.tokens_for(tokens) == expected


@pytest.mark.parametrize(
    "tokens, k",
    [(1, 1), (5, 1), (10, 1), (19, 1), (20, 2), (30, 3), (256, 25), (1024, 102), (4096, 409)],
)
def test_tokens_for_paper_default(tokens, k):
    assert DuCaConfig(ratio=0.9).tokens_for(tokens) == k


@given(tokens=st.integers(0, 20000))
def test_tokens_for_is_zero_without_partial_recompute(tokens):
    assert DuCaConfig(ratio=1.0).tokens_for(tokens) == 0
    assert DuCaConfig(ratio=1).tokens_for(tokens) == 0
    assert FORAConfig().tokens_for(tokens) == 0
    assert DuCaConfig(ratio=0.0).tokens_for(tokens) == tokens


# -- registry and cache_backend ------------------------------------------------------------------------------------


def test_registered_methods():
    names = method_names()
    assert {"fora", "duca"} <= set(names)
    assert names == sorted(names)
    assert get_method("fora") is FORAConfig
    assert get_method("DUCA") is DuCaConfig


def test_cache_backend_by_name_uses_defaults():
    backend = cache_backend("fora")
    assert isinstance(backend, fxcache.CacheBackend)
    assert backend.config == FORAConfig()
    assert type(backend.config) is FORAConfig


def test_cache_backend_default_method_is_duca():
    assert cache_backend().config == DuCaConfig()


def test_cache_backend_by_name_is_case_insensitive_and_takes_options():
    backend = cache_backend("DuCa", interval=4, ratio=0.8)
    assert backend.config == DuCaConfig(interval=4, ratio=0.8)
    assert backend.config.warmup_steps == 1


def test_cache_backend_with_config_instance():
    config = DuCaConfig(interval=6, ratio=0.75, warmup_steps=3, seed=7)
    backend = cache_backend(config, lowering="eager")
    assert backend.config is config
    assert backend.lowering == "eager"


def test_cache_backend_validates_options():
    with pytest.raises(ConfigError, match="interval"):
        cache_backend("fora", interval=0)


@pytest.mark.parametrize("typo, suggestion", [("dcua", "duca"), ("froa", "fora"), ("Duka", "duca")])
def test_unknown_method_suggests_the_closest(typo, suggestion):
    with pytest.raises(ConfigError) as info:
        cache_backend(typo)
    message = str(info.value)
    assert typo in message
    assert f"did you mean {suggestion!r}" in message
    for name in method_names():
        assert name in message


def test_unknown_method_without_a_close_match_lists_methods():
    with pytest.raises(ConfigError) as info:
        cache_backend("zzzzzzzz")
    message = str(info.value)
    assert "did you mean" not in message
    for name in method_names():
        assert name in message


def test_method_must_be_a_name_or_config():
    with pytest.raises(ConfigError):
        cache_backend(3)
    with pytest.raises(ConfigError):
        get_method(None)


def test_unknown_option_names_option_fields_and_closest():
    with pytest.raises(TypeError) as info:
        cache_backend("duca", intervall=4)
    message = str(info.value)
    assert "'intervall'" in message
    assert "did you mean 'interval'" in message
    for name in ("interval", "ratio", "warmup_steps", "seed"):
        assert name in message.split("valid options:")[1]


def test_unknown_option_for_fora_lists_fora_fields_only():
    with pytest.raises(TypeError) as info:
        cache_backend("fora", ratio=0.5)
    message = str(info.value)
    assert "'ratio'" in message
    valid = message.split("valid options:")[1]
    assert "interval" in valid and "warmup_steps" in valid
    assert "seed" not in valid


def test_config_instance_with_options_points_to_replace():
    with pytest.raises(TypeError, match=r"dataclasses\.replace"):
        cache_backend(DuCaConfig(), interval=3)


def test_unknown_lowering_lists_registered_ones():
    with pytest.raises(ConfigError) as info:
        cache_backend("fora", lowering="nope")
    message = str(info.value)
    assert "nope" in message
    assert "eager" in message and "inductor" in message


def test_lowering_names():
    assert {"eager", "inductor"} <= set(fxcache.lowering_names())


def test_registering_an_existing_method_name_raises():
    before = dict(config_module._METHODS)
    try:

        @dataclasses.dataclass(frozen=True, kw_only=True)
        class Impostor(FORAConfig):
            method = "fora"

        with pytest.raises(ConfigError, match="fora"):
            register_method(Impostor)

        @dataclasses.dataclass(frozen=True, kw_only=True)
        class ShoutingImpostor(FORAConfig):
            method = "FORA"

        with pytest.raises(ConfigError, match="fora"):
            register_method(ShoutingImpostor)

        assert get_method("fora") is FORAConfig
        assert register_method(FORAConfig) is FORAConfig  # re-registering the same class is a no-op
        assert config_module._METHODS == before
    finally:
        config_module._METHODS.clear()
        config_module._METHODS.update(before)


def test_registering_a_nameless_method_raises():
    before = dict(config_module._METHODS)
    try:

        @dataclasses.dataclass(frozen=True, kw_only=True)
        class Nameless(CacheConfig):
            pass

        with pytest.raises(ConfigError, match="Nameless"):
            register_method(Nameless)
        assert config_module._METHODS == before
    finally:
        config_module._METHODS.clear()
        config_module._METHODS.update(before)


def test_registering_a_new_method_makes_it_available():
    name = "test-only-always-full"
    assert name not in config_module._METHODS
    try:

        @register_method
        @dataclasses.dataclass(frozen=True, kw_only=True)
        class AlwaysFull(CacheConfig):
            method = name
            interval: int = 1

            @property
            def kinds(self):
                return frozenset({StepKind.FULL})

            def step_kind(self, step):
                return StepKind.FULL

        assert name in method_names()
        backend = cache_backend(name, interval=2, lowering="eager")
        assert type(backend.config) is AlwaysFull and backend.config.interval == 2
        assert CacheConfig.from_dict(backend.config.to_dict()) == backend.config
    finally:
        config_module._METHODS.pop(name, None)
    assert name not in method_names()
