"""Run settings in closed form: layering, flat = sectioned = dotted, methods lists, the run record."""

from __future__ import annotations

import dataclasses

import pytest

import deltatune as dt
from deltatune.config import (RUN_DEFAULTS, TRAIN_KEYS, build_run, build_runs, merge_settings,
                              normalise_settings, parse_overrides, read_yaml)
from deltatune.errors import DeltatuneError
from deltatune.train import TrainConfig
from deltatune.validation import require_bool, require_choice, require_int, require_number, require_positive_int

PATHS = {"model": "m", "data": "d.jsonl", "output": "out"}


# --- layers --------------------------------------------------------------------------------
def test_layers_merge_in_order_defaults_file_flags_overrides():
    file = {"model": "from-file", "data": "d.jsonl", "rank": 4, "alpha": 8, "learning_rate": 1e-4, "max_steps": 50}
    flags = {"model": "from-flag", "max_steps": 10}
    overrides = {"method.rank": 16, "train.learning_rate": 1e-3}
    assert merge_settings(RUN_DEFAULTS, file, flags, overrides) == {
        **RUN_DEFAULTS, "model": "from-flag", "data": "d.jsonl",
        "method": {"rank": 16, "alpha": 8},
        "train": {"learning_rate": 1e-3, "max_steps": 10},
    }


def test_flat_sectioned_and_dotted_forms_normalise_alike():
    flat = {"model": "m", "method": "lora", "rank": 8, "learning_rate": 2e-4}
    sectioned = {"model": "m", "method": {"name": "lora", "rank": 8}, "train": {"learning_rate": 2e-4}}
    dotted = {"model": "m", "method.name": "lora", "method.rank": 8, "train.learning_rate": 2e-4}
    mixed = {"model": "m", "method": {"name": "lora"}, "rank": 8, "train.learning_rate": 2e-4}
    expected = {"model": "m", "method": {"name": "lora", "rank": 8}, "train": {"learning_rate": 2e-4}}
    for form in (flat, sectioned, dotted, mixed):
        assert normalise_settings(form) == expected
    assert normalise_settings(expected) == expected  # the normalised form is a fixed point


def test_sections_merge_key_by_key_but_values_and_methods_lists_are_replaced_whole():
    first = {"method": {"name": "lora", "rank": 4, "rank_pattern": {"q_proj": 2}}, "train": {"seed": 1},
             "methods": ["lora", "prefix"]}
    second = {"alpha": 32, "rank_pattern": {"v_proj": 8}, "max_steps": 3, "methods": ["prompt"]}
    assert merge_settings(first, second) == {
        "method": {"name": "lora", "rank": 4, "alpha": 32, "rank_pattern": {"v_proj": 8}},
        "train": {"seed": 1, "max_steps": 3}, "methods": [{"name": "prompt"}]}


def test_sectioned_and_flat_files_build_the_same_run():
    flat = {**PATHS, "method": "lora", "rank": 8, "alpha": 16, "targets": ["q_proj"], "learning_rate": "2e-4",
            "max_steps": 300}
    sectioned = {**PATHS, "method": {"name": "lora", "rank": 8, "alpha": 16, "targets": ["q_proj"]},
                 "train": {"learning_rate": "2e-4", "max_steps": 300}}
    run = build_run(sectioned)
    assert run == build_run(flat)
    assert run.method == dt.LoRA(rank=8, alpha=16.0, targets=("q_proj",))
    assert run.train == TrainConfig(learning_rate=2e-4, max_steps=300)
    assert (run.model, run.data, run.output, run.method_name) == ("m", "d.jsonl", "out", "lora")


def test_defaults_fill_what_is_not_given_and_null_means_the_default():
    run = build_run({**PATHS, "eval_data": None, "rank": None, "train": {"seed": None}})
    assert run.method_name == "lora" and run.method == dt.LoRA()
    assert run.train == TrainConfig(**dt.LoRA.training_defaults)  # the method's own defaults under the user's
    assert (run.eval_data, run.eval_fraction, run.dtype, run.trust_remote_code) == (None, 0.05, "auto", False)


@pytest.mark.parametrize("layer, words", [
    ({"rank": 8, "method": {"rank": 16}}, "rank: 8 and method.rank: 16"),
    ({"learning_rate": 1e-3, "train": {"learning_rate": 1e-4}}, "learning_rate: 0.001 and train.learning_rate: 0.0001"),
    ({"method": "lora", "method.name": "prefix"}, "method: 'lora' and method.name: 'prefix'"),
    ({"train": {"seed": 1}, "train.seed": 2}, "train.seed: 1 and train.seed: 2"),
])
def test_one_key_given_twice_with_different_values_names_both(layer, words):
    with pytest.raises(DeltatuneError, match=words):
        merge_settings(layer)


def test_one_key_given_twice_with_the_same_value_is_fine():
    assert merge_settings({"rank": 8, "method": {"rank": 8}}) == {"method": {"rank": 8}}


def test_a_later_layer_may_change_what_an_earlier_one_set():
    assert merge_settings({"rank": 8}, {"method": {"rank": 16}}) == {"method": {"rank": 16}}


# --- overrides -----------------------------------------------------------------------------
def test_flat_and_dotted_overrides_say_the_same():
    file = {**PATHS, "method": {"name": "lora", "rank": 4}, "train": {"learning_rate": 1e-4}}
    flat = build_run(merge_settings(file, parse_overrides(["rank=16", "learning_rate=1e-3", "targets=[q_proj]"])))
    dotted = build_run(merge_settings(file, parse_overrides(
        ["method.rank=16", "train.learning_rate=1e-3", "method.targets=[q_proj]"])))
    assert flat == dotted
    assert flat.method == dt.LoRA(rank=16, targets=("q_proj",)) and flat.train.learning_rate == 1e-3


@pytest.mark.parametrize("override", ["method=prefix", "method.name=prefix"])
def test_an_override_changes_the_method(override):
    run = build_run(merge_settings({**PATHS, "method": "lora"}, parse_overrides([override, "num_virtual_tokens=4"])))
    assert run.method_name == "prefix" and run.method == dt.PrefixTuning(num_virtual_tokens=4)


def test_override_that_is_not_key_equals_value():
    with pytest.raises(DeltatuneError, match="not of the form key=value"):
        parse_overrides(["rank"])


# --- several methods -----------------------------------------------------------------------
def test_methods_list_gives_one_run_per_method_with_its_own_train_and_folder():
    settings = {**PATHS, "train": {"learning_rate": 1e-3, "max_steps": 20},
                "methods": [{"name": "lora", "rank": 8}, {"name": "prefix", "num_virtual_tokens": 20},
                            {"name": "lora", "rank": 2, "train": {"learning_rate": 1e-5}}]}
    runs = build_runs(settings)
    assert [run.method for run in runs] == [dt.LoRA(rank=8), dt.PrefixTuning(num_virtual_tokens=20), dt.LoRA(rank=2)]
    assert [run.train.learning_rate for run in runs] == [1e-3, 1e-3, 1e-5]
    assert {run.train.max_steps for run in runs} == {20}
    assert [run.output for run in runs] == ["out/lora", "out/prefix", "out/lora-2"]


def test_a_method_entry_train_wins_even_over_a_later_shared_override():
    file = {**PATHS, "methods": [{"name": "lora", "train": {"learning_rate": 1e-5}}, "prompt"]}
    full, prompt = build_runs(merge_settings(file, parse_overrides(["train.learning_rate=3e-2"])))
    assert (full.train.learning_rate, prompt.train.learning_rate) == (1e-5, 3e-2)


def test_a_single_method_is_a_list_of_one_in_either_form():
    as_method = build_runs({**PATHS, "method": {"name": "prefix", "num_virtual_tokens": 5}})
    as_list = build_runs({**PATHS, "methods": [{"name": "prefix", "num_virtual_tokens": 5}]})
    assert as_method == as_list and len(as_list) == 1 and as_list[0].output == "out"
    assert build_run({**PATHS, "methods": ["prompt"]}).method_name == "prompt"


@pytest.mark.parametrize("settings, words", [
    ({"methods": ["lora", "prefix"]}, r"list 2 methods \(lora, prefix\) but a run trains one"),
    ({"method": "lora", "methods": ["prefix"]}, "both method.name and a methods list"),
    ({"rank": 4, "methods": ["lora"]}, "both method.rank and a methods list"),
    ({"methods": []}, "methods must be a non-empty list"),
    ({"methods": "lora"}, "methods must be a non-empty list"),
    ({"methods": [{"name": "lora", "learning_rate": 1e-3}]}, "'learning_rate' is a training setting.*under train"),
    ({"methods": [{"name": "lora", "output": "x"}]}, "'output' is a run setting.*top level"),
    ({"methods": [{"name": "bitfit"}]}, "Unknown method 'bitfit'; choose one of: lora, "),
])
def test_methods_errors(settings, words):
    with pytest.raises(DeltatuneError, match=words):
        build_run({**PATHS, **settings})


# --- unknown keys and bad values -----------------------------------------------------------
@pytest.mark.parametrize("settings, words", [
    ({"rnak": 4}, "Unknown setting 'rnak' for method lora; valid keys: alpha.*rank.*learning_rate.*model"),
    ({"method": {"name": "prefix", "rank": 4}}, "Unknown setting 'rank' for method prefix; valid keys: .*num_virtual"),
    ({"train": {"rank": 4}}, "'rank' is a method setting, not a training one; put it under method"),
    ({"train": {"learning_rat": 1}}, "Unknown training setting 'learning_rat'; valid keys under train: max_steps"),
    ({"trian.seed": 1}, "'trian.seed' names no section; dotted keys start with method. or train."),
    ({"train": [1]}, "train must be a mapping of settings"),
    ({"method": "nope"}, "Unknown method 'nope'"),
    ({"rank": "many"}, r"rank must be a whole number \(like 8\), got .many.: fix the config"),
    ({"rank": 2.5}, r"rank must be a whole number \(like 8\), got 2.5"),
    ({"bf16": "yes"}, "bf16 must be true or false, got .yes."),
    ({"learning_rate": 0}, "learning_rate is 0"),
    ({"eval_fraction": 1.5}, "eval_fraction must be a number of at least 0 and below 1, got 1.5"),
    ({"trust_remote_code": "yes"}, "trust_remote_code must be true or false, got 'yes'"),
    ({"output": None}, "No output given; pass --output PATH"),
])
def test_unknown_keys_and_bad_values_are_one_sentence(settings, words):
    with pytest.raises(DeltatuneError, match=words):
        build_run({**PATHS, **settings})


def test_no_method_field_shares_a_name_with_a_run_or_train_key():
    """Flat keys are routed by name, so a method field may not reuse one (nor ``name`` or ``train``)."""
    reserved = {*RUN_DEFAULTS, *TRAIN_KEYS, "name", "train", "method", "methods"}
    for cls in dt.METHODS.values():
        assert not reserved & {f.name for f in dataclasses.fields(cls)}, cls.__name__


# --- the run record ------------------------------------------------------------------------
@pytest.mark.parametrize("method", [
    {"name": "lora", "rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj"], "rank_pattern": {"v_proj": 2}},
    {"name": "prompt", "num_virtual_tokens": 4, "init": "text", "init_text": "Describe:"},
    {"name": "ptuning", "template": "{prompt:2} {text} Answer:", "verbalizer": {"no": "bad", "yes": "good"}},
    {"name": "prefix", "num_virtual_tokens": 3, "modules_to_save": ["score"]},
    {"name": "ptuning-v2"},
])
def test_run_record_reads_back_as_the_same_run(method, tmp_path):
    run = build_run({**PATHS, "eval_data": "e.jsonl", "trust_remote_code": True, "method": method,
                     "train": {"learning_rate": "1e-5", "max_steps": 7, "lr_schedule": "linear"}})
    record = tmp_path / "deltatune_run.yaml"
    record.write_text(run.to_yaml(), encoding="utf-8")
    again = build_run(merge_settings(read_yaml(record)))  # what `deltatune train --config record` does
    assert again == run and again.to_yaml() == run.to_yaml()


def test_run_record_is_the_sectioned_form_with_every_setting():
    settings = build_run({**PATHS, "rank": 4, "max_steps": 7}).as_settings()
    assert list(settings) == [*RUN_DEFAULTS, "method", "train"]
    assert settings["method"] == {"name": "lora", **dataclasses.asdict(dt.LoRA(rank=4)), "modules_to_save": []}
    assert settings["train"] == dataclasses.asdict(TrainConfig(**dt.LoRA.training_defaults, max_steps=7))


# --- validation helpers --------------------------------------------------------------------
@pytest.mark.parametrize("check, message", [
    (lambda: require_int("seed", -1, minimum=0), "seed must be a whole number of at least 0, got -1: fix the config"),
    (lambda: require_int("seed", True, minimum=0),
     "seed must be a whole number of at least 0, got True: fix the config"),
    (lambda: require_positive_int("rank", 2.0), "rank must be a whole number of at least 1, got 2.0: fix the config"),
    (lambda: require_number("dropout", 1, minimum=0, below=1),
     "dropout must be a number of at least 0 and below 1, got 1: fix the config"),
    (lambda: require_number("weight_decay", float("nan"), minimum=0),
     "weight_decay must be a number of at least 0, got nan: fix the config"),
    (lambda: require_number("scale", "2"), "scale must be a finite number, got '2': fix the config"),
    (lambda: require_number("ratio", 3, below=2), "ratio must be a number below 2, got 3: fix the config"),
    (lambda: require_choice("init", "zeros", ("kaiming", "gaussian")),
     "init 'zeros' is unknown: use one of kaiming, gaussian"),
    (lambda: require_bool("bf16", "yes"), "bf16 must be true or false, got 'yes': fix the config"),
])
def test_validation_messages(check, message):
    with pytest.raises(DeltatuneError) as raised:
        check()
    assert str(raised.value) == message


def test_validation_returns_what_it_accepts():
    assert require_int("seed", 0, minimum=0) == 0 and require_positive_int("rank", 3) == 3
    assert require_number("dropout", 0.5, minimum=0, below=1) == 0.5 and require_number("x", -2) == -2
    assert require_choice("init", "kaiming", ("kaiming",)) == "kaiming" and require_bool("bf16", False) is False
