"""A run's settings: bundled defaults < YAML file < command-line flags < ``key=value`` overrides.

Keys are flat. Run keys (model, data, output, ...) are listed below; every other key is a
field of the training config (``learning_rate``, ``max_steps``, ...) or of the chosen method's
config (``rank``, ``alpha``, ``targets``, ...). Values are YAML: ``targets=[q_proj,v_proj]``,
``rank=16``, ``bf16=true``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from deltatune.errors import DeltatuneError
from deltatune.methods import Method, method_class
from deltatune.plain_data import plain_data
from deltatune.train import TrainConfig

RUN_DEFAULTS: dict[str, Any] = {
    "model": None,
    "data": None,
    "eval_data": None,
    "eval_fraction": 0.05,
    "method": "lora",
    "output": None,
    "dtype": "auto",
    "trust_remote_code": False,
}


@dataclass(frozen=True)
class RunConfig:
    model: str
    data: str
    output: str
    method_name: str
    method: Method
    train: TrainConfig
    eval_data: str | None = None
    eval_fraction: float = 0.05
    dtype: str = "auto"
    trust_remote_code: bool = False
    settings: Mapping[str, Any] = field(default_factory=dict)  # everything, as given, for the record

    def to_yaml(self) -> str:
        return yaml.safe_dump(plain_data(dict(self.settings)), sort_keys=True)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise DeltatuneError(f"Config file {str(path)!r} does not exist; check the path given to --config.")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise DeltatuneError(f"Config file {path} is not valid YAML ({str(error).splitlines()[0]}); fix it.") from None
    if not isinstance(loaded, dict):
        raise DeltatuneError(f"Config file {path} must be a mapping of key: value lines.")
    return loaded


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    settings = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise DeltatuneError(f"Override {pair!r} is not of the form key=value (for example rank=16).")
        try:
            settings[key.strip()] = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            settings[key.strip()] = text
    return settings


def _fields(cls: type) -> dict[str, Any]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Match the type of the field's default (YAML reads ``1e-4`` as text, ``3`` as an int)."""
    try:
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError
            return value
        if isinstance(default, float) and not isinstance(value, bool):
            return float(value)
        if isinstance(default, int) and not isinstance(value, bool):
            if float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
    except (TypeError, ValueError):
        kind = type(default).__name__
        raise DeltatuneError(f"Setting {key}={value!r} must be a {kind} (like {default!r}).") from None
    return value


def build_run(settings: Mapping[str, Any]) -> RunConfig:
    """Validate merged settings into a RunConfig; an unknown key names the valid ones."""
    merged = {**RUN_DEFAULTS, **{k: v for k, v in settings.items() if v is not None}}
    method_cls = method_class(str(merged["method"]))
    train_fields, method_fields = _fields(TrainConfig), _fields(method_cls)
    unknown = sorted(set(merged) - set(RUN_DEFAULTS) - set(train_fields) - set(method_fields))
    if unknown:
        valid = sorted({*RUN_DEFAULTS, *train_fields, *method_fields})
        raise DeltatuneError(f"Unknown setting {unknown[0]!r} for method {merged['method']}; valid keys: {', '.join(valid)}.")
    for key in ("model", "data", "output"):
        if not merged[key]:
            raise DeltatuneError(f"No {key} given; pass --{key} PATH (or {key}: in the config file).")
    train_defaults = dataclasses.asdict(TrainConfig())
    train = TrainConfig(**{k: _coerce(k, merged[k], train_defaults[k]) for k in train_fields if k in merged})
    method_defaults = {f.name: f.default for f in dataclasses.fields(method_cls) if f.default is not dataclasses.MISSING}
    method_kwargs = {k: _coerce(k, merged[k], method_defaults[k]) if method_defaults.get(k) is not None else merged[k]
                     for k in method_fields if k in merged}
    try:
        method = method_cls(**method_kwargs)
    except TypeError as error:
        raise DeltatuneError(f"Method settings are not valid: {error}.") from None
    return RunConfig(model=str(merged["model"]), data=str(merged["data"]), output=str(merged["output"]),
                     method_name=str(merged["method"]), method=method, train=train,
                     eval_data=merged["eval_data"], eval_fraction=_coerce("eval_fraction", merged["eval_fraction"], 0.05),
                     dtype=str(merged["dtype"]), trust_remote_code=bool(merged["trust_remote_code"]),
                     settings=merged)
