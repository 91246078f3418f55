"""Property tests: any value of any setting gives a valid object or one clear DeltatuneError.

Over every field of every registered method (``deltatune.METHODS``), every ``TrainConfig`` field
and every run setting, hypothesis draws values of every shape — wrong types, huge and negative
numbers, NaN, broken regular expressions, nested lists — and checks one property: building the
method (and putting it on a tiny model), or the run through ``build_run``, either works or raises
``DeltatuneError`` with a one-line message. Never another exception.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import deltatune as dt
from deltatune.config import RUN_DEFAULTS, TRAIN_KEYS, build_run, merge_settings, parse_overrides
from deltatune.errors import DeltatuneError

from conftest import tiny_llama

PATHS = {"model": "m", "data": "d.jsonl", "output": "out"}
FAST = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None,
                derandomize=True)  # the same examples every run: a failure is never a matter of luck

# values a config file can hold, and the odd ones Python callers pass
WORDS = st.sampled_from(["", " ", "abc", "([", "*", "all-linear", "q_proj", "v_proj", ".*", "model.layers.1", "lstm",
                         "mlp", "houlsby", "parallel", "gelu", "random", "text", "kaiming", "pissa", "none", "all",
                         "{prompt:2} {text}", "{text}", "{prompt:0}", "float16", "bf16", "auto", "\udc80", "true"])
NUMBERS = st.one_of(st.integers(min_value=-3, max_value=70), st.sampled_from([0, -1, 10**12, 2**63, 10**400 // 10**370]),
                    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e308, -0.0, 0.5, 1e-300]))
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, WORDS, st.text(max_size=6))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.one_of(WORDS, st.text(max_size=4)), inner,
                                                                       max_size=3)), max_leaves=6)

METHOD_FIELDS = [(name, field.name) for name, cls in dt.METHODS.items() for field in dataclasses.fields(cls)]
INJECTED_FIELDS = METHOD_FIELDS


def one_sentence(error: DeltatuneError) -> None:
    assert str(error) and "\n" not in str(error), repr(str(error))


def build_and_inject(cls: type, settings_: dict) -> None:
    """The method from ``settings_``, then on a tiny Llama: each step works or says why in one sentence."""
    try:
        method = cls(**settings_)
    except DeltatuneError as error:
        one_sentence(error)
        return
    try:
        dt.wrap(tiny_llama(), method)
    except DeltatuneError as error:
        one_sentence(error)


@pytest.mark.parametrize("method,field", INJECTED_FIELDS, ids=[f"{m}.{f}" for m, f in METHOD_FIELDS])
@FAST
@given(value=VALUES)
def test_any_value_of_one_method_field_builds_or_is_refused_in_one_sentence(method, field, value):
    build_and_inject(dt.METHODS[method], {field: value})


@pytest.mark.parametrize("method", list(dt.METHODS))
@FAST
@given(data=st.data())
def test_any_mix_of_method_fields_builds_or_is_refused_in_one_sentence(method, data):
    fields = [f.name for f in dataclasses.fields(dt.METHODS[method])]
    chosen = data.draw(st.dictionaries(st.sampled_from(fields), VALUES, max_size=4) if fields else st.just({}))
    build_and_inject(dt.METHODS[method], chosen)


def build_or_refuse(settings_: dict) -> None:
    try:
        build_run(settings_)
    except DeltatuneError as error:
        one_sentence(error)


@pytest.mark.parametrize("method,field", METHOD_FIELDS, ids=[f"{m}.{f}" for m, f in METHOD_FIELDS])
@FAST
@given(value=VALUES)
def test_any_method_setting_in_a_run_config_builds_or_is_refused(method, field, value):
    build_or_refuse({**PATHS, "method": {"name": method, field: value}})


@pytest.mark.parametrize("key", TRAIN_KEYS)
@FAST
@given(value=VALUES)
def test_any_training_setting_builds_or_is_refused(key, value):
    build_or_refuse({**PATHS, "train": {key: value}})


@pytest.mark.parametrize("key", list(RUN_DEFAULTS))
@FAST
@given(value=VALUES)
def test_any_run_setting_builds_or_is_refused(key, value):
    build_or_refuse({**PATHS, key: value})


@FAST
@given(layer=st.dictionaries(st.one_of(WORDS, st.sampled_from(["method", "methods", "train", "method.rank",
                                                                 "train.seed", "lora.rank", "prefix+adapter"])),
                             VALUES, max_size=4))
def test_any_settings_layer_merges_or_is_refused(layer):
    try:
        build_run(merge_settings(PATHS, layer))
    except DeltatuneError as error:
        one_sentence(error)


@FAST
@given(pairs=st.lists(st.text(max_size=12), max_size=4))
def test_any_command_line_override_parses_or_is_refused(pairs):
    try:
        build_run(merge_settings(PATHS, parse_overrides(pairs)))
    except DeltatuneError as error:
        one_sentence(error)
