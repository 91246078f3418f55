"""A run's settings: bundled defaults < YAML file < command-line flags < ``key=value`` overrides.

The settings have three parts: run keys (``model``, ``data``, ``output``, ...) at the top level,
a ``method`` section (``name`` and the method's fields, like ``rank``) and a ``train`` section
(``TrainConfig``'s fields, like ``learning_rate``)::

    model: path/to/model
    data: data.jsonl
    output: out/
    method: {name: lora, rank: 8, alpha: 16}
    train: {learning_rate: 2e-4, max_steps: 300}

The flat form says the same: ``method: lora``, ``rank: 8``, ``learning_rate: 2e-4`` at the top
level, each key routed to its section; so do dotted keys (``method.rank: 8``, ``train.max_steps``).
A file may instead list several methods, ``methods: [{name: lora, rank: 8}, {name: prefix}]``,
sharing the run keys and ``train``; an entry's own ``train:`` wins over the shared one (even over a
later ``train.KEY=...`` override), and each method's run writes to ``output/<name>``. Values are
YAML: ``targets=[q_proj,v_proj]``, ``rank=16``, ``bf16=true``; ``null`` means the default.

A method name joining registered names with ``+`` (``prefix+adapter``) is a composition: the
parts train together in one run (methods/composition.py). Each part's options carry its name,
``prefix.num_virtual_tokens=20 adapter.preset=parallel`` (or ``method: {name: prefix+adapter,
prefix: {num_virtual_tokens: 20}}``); the run has one learning rate, from ``train`` or else the
first part's training default.

``merge_settings`` turns any mix of these forms into one normalised mapping; ``build_runs``
validates that into one ``RunConfig`` per method.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import yaml

from deltatune.data import TRUNCATE_POLICIES
from deltatune.distributed import STRATEGIES
from deltatune.errors import DeltatuneError
from deltatune.methods import METHODS, Method, method_class
from deltatune.methods.composition import Composition
from deltatune.plain_data import plain_data
from deltatune.train import TrainConfig
from deltatune.validation import require_bool, require_choice, require_number

RUN_DEFAULTS: dict[str, Any] = {
    "model": None,
    "data": None,
    "output": None,
    "eval_data": None,
    "eval_fraction": 0.05,
    "dtype": "auto",
    "trust_remote_code": False,
    # the task (causal-lm, classification, seq2seq; null: from the model's config) and, for
    # classification, the columns and label list (null: found by name, labels sorted) — see task_data
    "task": None,
    "text_column": None,
    "text_pair_column": None,
    "label_column": None,
    "labels": None,
    "columns": None,  # the column names of a TSV/CSV table without a header row (its first row is data)
    # how examples longer than max_length are cut (right, left) or skipped, and whether short
    # examples are packed into full rows (attention kept inside each example) — see data
    "truncate": "right",
    "packing": False,
    # under torchrun: ddp (every process holds the model), fsdp (FSDP2 shards it) or auto (ddp while
    # it fits one device) — see deltatune.distributed and docs/distributed.md
    "strategy": "auto",
}
DEFAULT_METHOD = "lora"
TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))


@dataclass(frozen=True)
class RunConfig:
    model: str
    data: str
    output: str
    method_name: str
    method: Method | Composition
    train: TrainConfig
    eval_data: str | None = None
    eval_fraction: float = 0.05
    dtype: str = "auto"
    trust_remote_code: bool = False
    task: str | None = None
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    labels: tuple[str | int, ...] | None = None
    columns: tuple[str, ...] | None = None
    truncate: str = "right"
    packing: bool = False
    strategy: str = "auto"

    def as_settings(self) -> dict[str, Any]:
        """Every setting of the run, in the normalised sectioned form ``build_run`` reads back."""
        run_keys = {key: getattr(self, key) for key in RUN_DEFAULTS}
        method = {"name": self.method_name, **self.method.describe()}
        return plain_data({**run_keys, "method": method, "train": dataclasses.asdict(self.train)})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.as_settings(), sort_keys=False)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML settings file, read with the safe loader: plain data only (a ``!!python/...`` tag is an error)."""
    path = Path(path)
    if not path.is_file():
        state = "is not a file" if path.exists() else "does not exist"
        raise DeltatuneError(f"Config file {str(path)!r} {state}; check the path given to --config.")
    try:
        loaded = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except OSError as error:
        raise DeltatuneError(f"Config file {path} cannot be read ({error.strerror or error}); check its permissions.") from None
    except UnicodeDecodeError as error:
        raise DeltatuneError(f"Config file {path} is not UTF-8 text (byte {error.start}); save it as UTF-8.") from None
    except yaml.YAMLError as error:
        raise DeltatuneError(f"Config file {path} is not valid YAML ({str(error).splitlines()[0]}); fix it.") from None
    except RecursionError:
        raise DeltatuneError(f"Config file {path} nests lists or mappings too deeply to be settings; fix it.") from None
    if not isinstance(loaded, dict):
        raise DeltatuneError(f"Config file {path} must be a mapping of key: value lines.")
    return loaded


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs (``rank=16``, ``train.learning_rate=1e-3``) as a mapping of YAML values."""
    settings = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise DeltatuneError(f"Override {pair!r} is not of the form key=value (for example rank=16).")
        try:
            settings[key.strip()] = yaml.safe_load(text) if text else ""
        except (yaml.YAMLError, RecursionError):  # not YAML (nor a !!python tag, which safe_load never runs): text
            settings[key.strip()] = text
    return settings


# --- layers: any mix of flat, sectioned and dotted keys -> one normalised mapping -----------
def merge_settings(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Normalise each layer, then merge them in order: a later layer wins key by key.

    The result has run keys at the top level and the sections ``method`` (``name``, the
    method's keys and its own ``train``), ``train`` and ``methods`` (a list of method sections),
    each present only when some layer gave it. Sections merge key by key; a ``methods`` list is
    replaced whole. Within one layer, a key given twice (flat and in its section) with different
    values is an error naming both.
    """
    merged: dict[str, Any] = {}
    for layer in layers:
        _merge_into(merged, normalise_settings(layer))
    return merged


def normalise_settings(layer: Mapping[str, Any]) -> dict[str, Any]:
    """One layer in the sectioned form: flat keys routed to their section, dotted keys split."""
    normal: dict[str, Any] = {}
    written: dict[tuple[str, ...], str] = {}  # where each value came from, for conflict messages
    for key, value in layer.items():
        for path, item, as_written in _routed(str(key), value):
            _put(normal, written, path, item, as_written)
    return normal


def _routed(key: str, value: Any) -> Iterator[tuple[tuple[str, ...], Any, str]]:
    """(path in the normalised mapping, value, the key as the user wrote it) for one top-level key."""
    section, dot, rest = key.partition(".")
    if dot:
        if section in METHODS:  # one part's option in a composition: prefix.num_virtual_tokens
            yield ("method", key), value, key
            return
        if section not in ("method", "train"):
            raise DeltatuneError(f"Setting {key!r} names no section; dotted keys start with method. or train. "
                                 f"(like method.rank or train.learning_rate), or with a method's name for one part "
                                 f"of a composition (like prefix.num_virtual_tokens).")
        key, value = section, {rest: value}
    if key == "methods":
        yield ("methods",), _method_list(value), key
    elif key == "train":
        for name, item in _section_mapping("train", value).items():
            yield ("train", str(name)), item, f"train.{name}"
    elif key == "method":
        for path, item, as_written in _method_section(value):
            yield ("method", *path), item, "method" if as_written == "method" else f"method.{as_written}"
    elif key in RUN_DEFAULTS:
        yield (key,), value, key
    elif key in TRAIN_KEYS:
        yield ("train", key), value, key
    else:
        yield ("method", key), value, key


def _method_section(value: Any) -> Iterator[tuple[tuple[str, ...], Any, str]]:
    """A method given as its name, or as a mapping of ``name``, its own keys and its own ``train``."""
    if not isinstance(value, Mapping):
        yield ("name",), value, "method"
        return
    for key, item in value.items():
        section, dot, rest = str(key).partition(".")
        if section == "train" and dot:
            yield ("train", rest), item, str(key)
        elif key == "train":
            for name, train_item in _section_mapping("train", item).items():
                yield ("train", str(name)), train_item, f"train.{name}"
        else:
            yield (str(key),), item, str(key)


def _method_list(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, (list, tuple)) or not value:
        raise DeltatuneError(f"methods must be a non-empty list like [{{name: lora, rank: 8}}, {{name: prefix}}], "
                             f"got {value!r}.")
    return [normalise_settings({"method": entry}).get("method", {}) for entry in value]


def _section_mapping(name: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise DeltatuneError(f"{name} must be a mapping of settings like {name}: {{learning_rate: 2e-4}}, "
                             f"got {value!r}.")
    return value


def _put(normal: dict[str, Any], written: dict[tuple[str, ...], str], path: tuple[str, ...], value: Any,
         as_written: str) -> None:
    place = normal
    for part in path[:-1]:
        place = place.setdefault(part, {})
    if path in written and place[path[-1]] != value:
        raise DeltatuneError(f"{written[path]}: {place[path[-1]]!r} and {as_written}: {value!r} set the same "
                             f"setting to different values; keep one of them.")
    place[path[-1]] = value
    written[path] = as_written


def _merge_into(merged: dict[str, Any], layer: Mapping[str, Any],
                sections: tuple[str, ...] = ("method", "train")) -> None:
    """Sections merge key by key (a method's own ``train`` too); every other value is replaced whole."""
    for key, value in layer.items():
        if key in sections and key in merged:
            _merge_into(merged[key], value, sections=("train",) if key == "method" else ())
        else:
            merged[key] = copy.deepcopy(value)


# --- validation: normalised settings -> RunConfig --------------------------------------------
def build_runs(settings: Mapping[str, Any]) -> list[RunConfig]:
    """One RunConfig per method; with several methods, each writes to ``output/<method name>``.

    ``settings`` may be in any form ``merge_settings`` reads; bundled defaults fill the gaps.
    A repeated method name gets a numbered folder: ``lora``, ``lora-2``.
    """
    merged = merge_settings(RUN_DEFAULTS, settings)
    if "method" in merged and "methods" in merged:
        given = ", ".join(f"method.{key}" for key in merged["method"])
        raise DeltatuneError(f"The settings give both {given} and a methods list; put method settings inside each "
                             f"methods entry, or use method alone.")
    run_keys = {**RUN_DEFAULTS, **_given({key: merged[key] for key in RUN_DEFAULTS})}
    for key in ("model", "data", "output"):
        if not run_keys[key]:
            raise DeltatuneError(f"No {key} given; pass --{key} PATH (or {key}: in the config file).")
    sections = [_given(section) for section in merged.get("methods") or [merged.get("method", {})]]
    names = [str(section.get("name", DEFAULT_METHOD)) for section in sections]
    outputs = [run_keys["output"]] if len(sections) == 1 else [
        str(Path(run_keys["output"]) / folder) for folder in _folders(names)]
    shared_train = _given(merged.get("train", {}))
    return [_build_one({**run_keys, "output": output}, shared_train, name, section)
            for output, name, section in zip(outputs, names, sections)]


def build_run(settings: Mapping[str, Any]) -> RunConfig:
    """Validate settings for one method into a RunConfig; an unknown key names the valid ones."""
    runs = build_runs(settings)
    if len(runs) > 1:
        names = ", ".join(run.method_name for run in runs)
        raise DeltatuneError(f"The settings list {len(runs)} methods ({names}) but a run trains one; "
                             f"keep one entry under methods, or use method instead.")
    return runs[0]


def _build_one(run_keys: Mapping[str, Any], shared_train: Mapping[str, Any], name: str,
               section: Mapping[str, Any]) -> RunConfig:
    """One run: the method's own ``train`` settings win over the shared ones."""
    method_settings = {key: value for key, value in section.items() if key not in ("name", "train")}
    eval_data, eval_fraction = run_keys["eval_data"], _coerce("eval_fraction", run_keys["eval_fraction"], 0.05)
    method = _method_config(name, method_settings)
    return RunConfig(
        model=str(run_keys["model"]), data=str(run_keys["data"]), output=str(run_keys["output"]),
        method_name=name, method=method,
        train=_train_config({**method.training_defaults, **shared_train, **_given(section.get("train", {}))}),
        eval_data=None if eval_data is None else str(eval_data),
        eval_fraction=require_number("eval_fraction", eval_fraction, minimum=0, below=1),
        dtype=str(run_keys["dtype"]),
        trust_remote_code=require_bool("trust_remote_code", run_keys["trust_remote_code"]),
        **_task_settings(run_keys),
        truncate=require_choice("truncate", run_keys["truncate"], TRUNCATE_POLICIES),
        packing=require_bool("packing", run_keys["packing"]),
        strategy=require_choice("strategy", run_keys["strategy"], STRATEGIES),
    )


def _task_settings(run_keys: Mapping[str, Any]) -> dict[str, Any]:
    """``task``, the classification columns and ``labels``, checked."""
    from deltatune.pretrained import TASKS

    task = run_keys["task"]
    if task is not None and task not in TASKS:
        raise DeltatuneError(f"task {task!r} is unknown: use one of {', '.join(TASKS)} (or leave it out to read it "
                             "from the model's config).")
    columns = {key: run_keys[key] for key in ("text_column", "text_pair_column", "label_column")}
    for key, value in columns.items():
        if value is not None and not isinstance(value, str):
            raise DeltatuneError(f"{key} must be a column name, got {value!r}: fix the config")
    labels = run_keys["labels"]
    if labels is not None:
        if isinstance(labels, str):
            labels = [label.strip() for label in labels.split(",")]
        if not isinstance(labels, (list, tuple)) or len(labels) < 2 or not all(
                isinstance(label, (str, int)) and not isinstance(label, bool) for label in labels):
            raise DeltatuneError(f"labels must list at least two labels like [negative, positive], got {labels!r}: "
                                 "fix the config")
        labels = tuple(labels)
    return {"task": task, **columns, "labels": labels, "columns": table_columns(run_keys["columns"])}


def table_columns(value: Any) -> tuple[str, ...] | None:
    """``columns``: names for a headerless table's columns, as a list or ``text,label``."""
    if value is None:
        return None
    names = [name.strip() for name in value.split(",")] if isinstance(value, str) else value
    if (not isinstance(names, (list, tuple)) or not names
            or not all(isinstance(name, str) and name.strip() for name in names)):
        raise DeltatuneError(f"columns must name a headerless table's columns, like [text, label], got {value!r}: "
                             "fix the config")
    repeated = [name for name, count in Counter(names).items() if count > 1]
    if repeated:
        raise DeltatuneError(f"columns names {repeated[0]!r} twice: give every column its own name")
    return tuple(name.strip() for name in names)


def _train_config(settings: Mapping[str, Any]) -> TrainConfig:
    unknown = sorted(set(settings) - set(TRAIN_KEYS))
    if unknown and any(unknown[0] in _field_names(cls) for cls in METHODS.values()):
        raise DeltatuneError(f"{unknown[0]!r} is a method setting, not a training one; put it under method.")
    if unknown:
        raise DeltatuneError(f"Unknown training setting {unknown[0]!r}; valid keys under train: "
                             f"{', '.join(TRAIN_KEYS)}.")
    defaults = dataclasses.asdict(TrainConfig())
    return TrainConfig(**{key: _coerce(key, value, defaults[key]) for key, value in settings.items()})


def _method_config(name: str, settings: Mapping[str, Any]) -> Method | Composition:
    if "+" in name:
        return _composition_config(name, settings)
    method_cls = method_class(name)
    own = f"{name}."  # the method's own name as a namespace (adapter.preset with method adapter) is allowed
    settings = {key[len(own):] if key.startswith(own) else key: value for key, value in settings.items()}
    fields = {f.name: f for f in dataclasses.fields(method_cls)}
    unknown = sorted(set(settings) - set(fields))
    if unknown:
        raise DeltatuneError(_unknown_method_key(unknown[0], name, sorted(fields)))
    defaults = {key: f.default for key, f in fields.items() if f.default not in (dataclasses.MISSING, None)}
    kwargs = {key: _coerce(key, value, defaults[key]) if key in defaults else value for key, value in settings.items()}
    try:
        return method_cls(**kwargs)
    except TypeError as error:
        raise DeltatuneError(f"Method settings are not valid: {error}.") from None


def _composition_config(name: str, settings: Mapping[str, Any]) -> Composition:
    """``prefix+adapter``: each part built from the settings that carry its name."""
    parts = name.split("+")
    if not all(parts):
        raise DeltatuneError(f"Method {name!r} has an empty part; join method names with '+', like prefix+adapter.")
    for part in parts:
        method_class(part)
    repeated = sorted({part for part in parts if parts.count(part) > 1})
    if repeated:
        raise DeltatuneError(f"Method {name!r} names {repeated[0]} twice; one run composes different methods "
                             "(two adapters of one method compose in Python: add_adapter, then set_adapter([a, b])).")
    per_part: dict[str, dict[str, Any]] = {part: {} for part in parts}
    for key, value in settings.items():
        head, dot, rest = key.partition(".")
        if dot and head in per_part:
            per_part[head][rest] = value
        elif key in per_part and isinstance(value, Mapping):
            per_part[key].update(value)
        elif head in METHODS:
            raise DeltatuneError(f"Setting {key!r} is for method {head}, which is not part of {name}; "
                                 f"drop it or add {head} to the method.")
        else:
            raise DeltatuneError(f"Setting {key!r} does not say which part of {name} it is for; prefix it with the "
                                 f"method's name, like {parts[0]}.{key}={value}.")
    return Composition(tuple((part, _method_config(part, _given(per_part[part]))) for part in parts))


def _unknown_method_key(key: str, name: str, method_keys: list[str]) -> str:
    head, dot, _ = key.partition(".")
    if dot and head in METHODS:
        return (f"{key!r} is an option of method {head}, but the run's method is {name}; "
                f"compose them with method {name}+{head}, or drop it.")
    if key in TRAIN_KEYS:
        return f"{key!r} is a training setting, not a {name} one; put it under train (shared, or this method's own)."
    if key in RUN_DEFAULTS:
        return f"{key!r} is a run setting, not a {name} one; put it at the top level of the settings."
    return (f"Unknown setting {key!r} for method {name}; valid keys: {', '.join(method_keys)} (method {name}), "
            f"{', '.join(TRAIN_KEYS)} (train), {', '.join(RUN_DEFAULTS)} (run).")


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _given(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings actually given: ``None`` (YAML ``null``) means "use the default"."""
    return {key: value for key, value in settings.items() if value is not None}


def _folders(names: Sequence[str]) -> list[str]:
    seen: Counter[str] = Counter()
    folders = []
    for name in names:
        seen[name] += 1
        folders.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return folders


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Match the type of the field's default (YAML reads ``1e-4`` as text, ``3`` as an int)."""
    if isinstance(default, bool):
        return require_bool(key, value)
    if not isinstance(default, (int, float)) or isinstance(value, bool):
        return value  # not a number field, or a bool the field's own check will refuse
    wanted = "a whole number" if isinstance(default, int) else "a number"
    try:
        number = float(value)
        if isinstance(default, int):
            if number != int(number):
                raise ValueError
            return int(number)
        return number
    except (TypeError, ValueError, OverflowError):
        raise DeltatuneError(f"{key} must be {wanted} (like {default!r}), got {value!r}: fix the config") from None
