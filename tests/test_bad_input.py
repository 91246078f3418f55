"""Bad input is refused in one sentence, and nobody is let in.

The sweep: real adapters of every method (made in code on the bundled stories260K), each
corrupted in every way below — the folder, adapter_config.json, the safetensors file and its
tensors, deltatune's own files, an adapter made for another base model. Every corruption goes
through ``dt.load_adapter`` (a DeltatuneError, and the model as it was) and through the CLI
(``info``, ``generate``, and in turn ``merge``, ``eval`` or ``predict``): exit status 1 and one
line on stderr, never a traceback. docs/bad-input.md lists what is checked and the counts.

Then: adapter names, pickles (a malicious one never runs), YAML tags, remote code, the network,
and CLI arguments that used to end in a traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltatune as dt
from deltatune.cli import main
from deltatune.config import parse_overrides, read_yaml
from deltatune.errors import DeltatuneError
from deltatune.methods.protocol import DeltaModule
from deltatune.pretrained import bundled, load_causal_lm, load_model

from conftest import logits_of, tiny_llama

MODEL = bundled("stories260K")
CONFIG, WEIGHTS, METHOD_FILE = "adapter_config.json", "adapter_model.safetensors", "deltatune_method.json"

# every method that writes an adapter folder (full fine-tuning writes a model folder: see MODEL_CASES)
ADAPTER_METHODS: dict[str, Callable[[], dt.Method]] = {
    "lora": lambda: dt.LoRA(rank=2, targets=["q_proj", "v_proj"]),
    "lora-bias-embedding": lambda: dt.LoRA(rank=2, targets=["embed_tokens", "o_proj"], bias="all"),
    "qlora": lambda: dt.QLoRA(rank=2, targets=["q_proj", "v_proj"], block_size=32, scaler_block_size=4),
    "prompt": lambda: dt.PromptTuning(num_virtual_tokens=3),
    "ptuning": lambda: dt.PTuning(num_virtual_tokens=3, encoder_hidden_size=8),
    "prefix": lambda: dt.PrefixTuning(num_virtual_tokens=3, projection_hidden_size=8),
    "ptuning-v2": lambda: dt.PTuningV2(num_virtual_tokens=3),
    "freeze": lambda: dt.FreezeTuning(trainable_layers=1),
    "adapter": lambda: dt.Adapter(preset="houlsby", bottleneck_size=4),
}
LORA_LIKE = ("lora", "lora-bias-embedding", "qlora")
# corruptions every method meets in the same code (the folder, the files as files) run on three of them
SOME = ("lora", "ptuning", "freeze")


def make_adapter(folder: Path, method: dt.Method, base: torch.nn.Module) -> Path:
    """Save ``method`` on ``base`` with every adapter tensor moved off its init (as if trained)."""
    model = dt.wrap(base, method)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.adapter_parameters("default").values():
            if param.is_floating_point():
                param.add_(0.01 * torch.randn(param.shape, generator=generator).to(param.dtype))
    dt.save(model, folder)
    return folder


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, Path]:
    """One healthy adapter folder per method on stories260K, and the same methods on a tiny Llama
    (another base model: other sizes, other layer count) under ``foreign-<method>``."""
    root = tmp_path_factory.mktemp("pristine")
    folders = {}
    for name, make in ADAPTER_METHODS.items():
        folders[name] = make_adapter(root / name, make(), load_causal_lm(MODEL))
        folders[f"foreign-{name}"] = make_adapter(root / f"foreign-{name}", make(), tiny_llama())
    return folders


# --- corruptions ---------------------------------------------------------------------------
DELETE = object()


@dataclass(frozen=True)
class Corruption:
    name: str
    category: str
    change: Callable[[Path], None]
    methods: tuple[str, ...] = tuple(ADAPTER_METHODS)
    needs_model: bool = False  # only a load on the base model can tell (info reads the folder alone)
    source: str = ""  # "foreign": start from the adapter made on the tiny Llama


def write_config(value: Any) -> Callable[[Path], None]:
    return lambda folder: (folder / CONFIG).write_text(json.dumps(value), encoding="utf-8")


def write_bytes(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_bytes(data)


def remove(name: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).unlink()


def edit_config(**changes: Any) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
        for key, value in changes.items():
            if value is DELETE:
                config.pop(key, None)
            else:
                config[key] = value
        (folder / CONFIG).write_text(json.dumps(config), encoding="utf-8")
    return change


def edit_tensors(edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        tensors = load_file(str(folder / WEIGHTS))
        save_file(edit(dict(tensors)), str(folder / WEIGHTS))
    return change


def on_first(edit: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], None]:
    """Apply ``edit`` to the first tensor (in key order) of the weights file."""
    def apply(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        key = sorted(tensors)[0]
        tensors[key] = edit(tensors[key])
        return tensors
    return edit_tensors(apply)


def poisoned(value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def edit(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        tensor.view(-1)[0] = value
        return tensor
    return edit


def edit_header(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    """Rewrite the safetensors JSON header, keeping the data bytes."""
    def change(folder: Path) -> None:
        raw = (folder / WEIGHTS).read_bytes()
        length = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8:8 + length])
        edit(header)
        text = json.dumps(header).encode()
        (folder / WEIGHTS).write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length:])
    return change


def first_entry(header: dict[str, Any]) -> dict[str, Any]:
    return header[sorted(k for k in header if k != "__metadata__")[0]]


def truncate(name: str, keep: float) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        raw = (folder / name).read_bytes()
        (folder / name).write_bytes(raw[:int(len(raw) * keep)])
    return change


def wider(tensor: torch.Tensor) -> torch.Tensor:
    """One more column: the shape no module of the base model has."""
    return torch.cat([tensor, tensor[..., :1]], dim=-1)


def lora_rank(rank: int) -> Callable[[Path], None]:
    """Every lora_A / lora_B pair at ``rank``, a consistent adapter of another rank than the config's."""
    def apply(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for key, tensor in list(tensors.items()):
            if "lora_A" in key or key.endswith("lora_embedding_A"):
                tensors[key] = torch.randn(rank, tensor.shape[1])
            elif "lora_B" in key or key.endswith("lora_embedding_B"):
                tensors[key] = torch.randn(tensor.shape[0], rank)
        return tensors
    return edit_tensors(apply)


def drop_first(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    del tensors[sorted(tensors)[0]]
    return tensors


def deeply_nested(depth: int = 100_000) -> bytes:
    return ("[" * depth + "]" * depth).encode()


def pickle_only(folder: Path) -> None:
    """The weights as a pickle (what old peft wrote), no safetensors file."""
    torch.save(load_file(str(folder / WEIGHTS)), folder / "adapter_model.bin")
    (folder / WEIGHTS).unlink()


def clear_folder(folder: Path) -> None:
    for path in folder.iterdir():
        path.unlink()


def replace_by_file(folder: Path) -> None:
    shutil.rmtree(folder)
    folder.write_text("not a folder")


PROMPTS = ("prompt", "ptuning", "prefix", "ptuning-v2")
PREFIXES = ("prefix", "ptuning-v2")

CORRUPTIONS = [
    # the folder
    Corruption("folder-missing", "folder", lambda folder: shutil.rmtree(folder)),
    Corruption("folder-is-a-file", "folder", replace_by_file),
    Corruption("folder-empty", "folder", clear_folder),
    # adapter_config.json: the file itself
    Corruption("config-missing", "config file", remove(CONFIG)),
    Corruption("config-empty", "config file", write_bytes(CONFIG, b"")),
    Corruption("config-garbage", "config file", write_bytes(CONFIG, b"{peft_type: LORA,,")),
    Corruption("config-list", "config file", write_config(["LORA"])),
    Corruption("config-string", "config file", write_config("LORA")),
    Corruption("config-null", "config file", write_config(None)),
    Corruption("config-number", "config file", write_config(3)),
    Corruption("config-not-utf8", "config file", write_bytes(CONFIG, b'{"peft_type": "\xff\xfe"}')),
    Corruption("config-deeply-nested", "config file", write_bytes(CONFIG, deeply_nested())),
    Corruption("config-is-a-folder", "config file", lambda folder: ((folder / CONFIG).unlink(), (folder / CONFIG).mkdir())),
    # adapter_config.json: values every method reads
    Corruption("peft-type-missing", "config values", edit_config(peft_type=DELETE)),
    Corruption("peft-type-unknown", "config values", edit_config(peft_type="NOT_A_METHOD")),
    Corruption("peft-type-number", "config values", edit_config(peft_type=123)),
    Corruption("peft-type-list", "config values", edit_config(peft_type=["LORA"])),
    Corruption("task-type-list", "config values", edit_config(task_type=["CAUSAL_LM"])),
    Corruption("deltatune-method-list", "config values", edit_config(deltatune_method=["lora"])),
    Corruption("modules-to-save-number", "config values", edit_config(modules_to_save=5),
               methods=tuple(m for m in ADAPTER_METHODS if m != "freeze")),
    Corruption("modules-to-save-absent", "config values", edit_config(modules_to_save=["no_such_module"]),
               methods=tuple(m for m in ADAPTER_METHODS if m != "freeze"), needs_model=True),
    # LoRA's values
    *[Corruption(f"lora-{label}", "config values", edit_config(**change), methods=LORA_LIKE,
                 needs_model=needs_model) for label, change, needs_model in [
        ("r-0", {"r": 0}, False), ("r-negative", {"r": -8}, False), ("r-text", {"r": "abc"}, False),
        ("r-fraction", {"r": 1.5}, False), ("r-true", {"r": True}, False), ("r-huge", {"r": 10**12}, False),
        ("r-missing-and-rank-differs", {"r": DELETE}, True),
        ("alpha-text", {"lora_alpha": "abc"}, False), ("alpha-1e308", {"lora_alpha": 1e308}, True),
        ("alpha-nan", {"lora_alpha": float("nan")}, False), ("alpha-negative", {"lora_alpha": -1}, False),
        ("targets-number", {"target_modules": 123}, False), ("targets-bad-regex", {"target_modules": "(["}, False),
        ("targets-list-of-numbers", {"target_modules": [1, 2]}, False),
        ("targets-absent", {"target_modules": ["no_such_proj"]}, True),
        ("targets-empty-list", {"target_modules": []}, False),
        ("rank-pattern-text", {"rank_pattern": "abc"}, False),
        ("rank-pattern-zero", {"rank_pattern": {"q_proj": 0}}, False),
        ("rank-pattern-bad-regex", {"rank_pattern": {"([": 2}}, False),
        ("alpha-pattern-text-value", {"alpha_pattern": {"q_proj": "x"}}, False),
        ("dropout-2", {"lora_dropout": 2}, False), ("rslora-text", {"use_rslora": "yes"}, False),
        ("bias-unknown", {"bias": "some"}, False), ("use-dora", {"use_dora": True}, False),
    ]],
    Corruption("qlora-quantization-text", "config values", edit_config(deltatune_quantization="nf4"), methods=("qlora",)),
    Corruption("qlora-block-size-odd", "config values",
               edit_config(deltatune_quantization={"block_size": 3, "scaler_block_size": 4}), methods=("qlora",)),
    # prompt learning's values
    *[Corruption(f"virtual-tokens-{label}", "config values", edit_config(num_virtual_tokens=value), methods=PROMPTS)
      for label, value in [("0", 0), ("negative", -3), ("text", "abc"), ("huge", 10**12), ("1e308", 1e308),
                           ("missing", DELETE), ("list", [3])]],
    Corruption("virtual-tokens-differ", "config values", edit_config(num_virtual_tokens=5), methods=PROMPTS,
               needs_model=True),
    Corruption("submodules-text", "config values", edit_config(num_transformer_submodules="x"), methods=PROMPTS),
    *[Corruption(f"ptuning-{label}", "config values", edit_config(**change), methods=("ptuning",)) for label, change in [
        ("encoder-hidden-0", {"encoder_hidden_size": 0}), ("encoder-hidden-huge", {"encoder_hidden_size": 10**12}),
        ("encoder-type-unknown", {"encoder_reparameterization_type": "GRU"}),
        ("encoder-type-number", {"encoder_reparameterization_type": 5}),
        ("encoder-layers-text", {"encoder_num_layers": "two"}),
        ("template-number", {"deltatune_template": 5}), ("verbalizer-text", {"deltatune_verbalizer": "abc"}),
    ]],
    *[Corruption(f"prefix-{label}", "config values", edit_config(**change), methods=PREFIXES) for label, change in [
        ("projection-text", {"prefix_projection": "yes"}), ("encoder-hidden-huge", {"encoder_hidden_size": 10**12}),
        ("encoder-hidden-text", {"encoder_hidden_size": "wide"}), ("cross-prefix-text", {"deltatune_cross_prefix": "no"}),
    ]],
    # freeze and bottleneck adapters: deltatune's own configs
    *[Corruption(f"freeze-{label}", "config values", edit_config(**change), methods=("freeze",),
                 needs_model=needs_model) for label, change, needs_model in [
        ("layers-text", {"trainable_layers": "abc"}, False), ("layers-missing", {"trainable_layers": DELETE}, False),
        ("layers-fraction", {"trainable_layers": 1.5}, False), ("modules-number", {"modules": 123}, False),
        ("modules-bad-regex", {"modules": "(["}, False), ("layers-differ", {"trainable_layers": 2}, True),
    ]],
    *[Corruption(f"adapter-{label}", "config values", edit_config(**change), methods=("adapter",),
                 needs_model=needs_model) for label, change, needs_model in [
        ("preset-unknown", {"preset": "lotsa"}, False), ("size-0", {"bottleneck_size": 0}, False),
        ("size-huge", {"bottleneck_size": 10**12}, False), ("size-text", {"bottleneck_size": "x"}, False),
        ("factor-0", {"bottleneck_size": None, "reduction_factor": 0}, False),
        ("scale-text", {"scale": "x"}, False), ("layers-text", {"layers": "abc"}, False),
        ("layers-out-of-range", {"layers": [40]}, True), ("activation-number", {"activation": 5}, False),
        ("size-differs", {"bottleneck_size": 8}, True),
    ]],
    # the safetensors file
    Corruption("weights-missing", "weights file", remove(WEIGHTS)),
    Corruption("weights-empty", "weights file", write_bytes(WEIGHTS, b"")),
    Corruption("weights-truncated-half", "weights file", truncate(WEIGHTS, 0.5)),
    Corruption("weights-truncated-last-byte", "weights file", truncate(WEIGHTS, 0.999)),
    Corruption("weights-garbage", "weights file", write_bytes(WEIGHTS, b"\x89PNG not a tensor file" * 50)),
    Corruption("weights-header-length-huge", "weights file",
               lambda folder: (folder / WEIGHTS).write_bytes(struct.pack("<Q", 2**62) + (folder / WEIGHTS).read_bytes()[8:])),
    Corruption("weights-header-shape-huge", "weights file",
               edit_header(lambda header: first_entry(header).update(shape=[10**9, 10**9]))),
    Corruption("weights-header-offsets-past-end", "weights file",
               edit_header(lambda header: first_entry(header).update(data_offsets=[0, 10**15]))),
    Corruption("weights-header-dtype-unknown", "weights file",
               edit_header(lambda header: first_entry(header).update(dtype="F128"))),
    Corruption("weights-is-a-folder", "weights file", lambda folder: ((folder / WEIGHTS).unlink(), (folder / WEIGHTS).mkdir())),
    Corruption("weights-pickle-only", "weights file", pickle_only),
    # the tensors
    Corruption("tensor-nan", "tensors", on_first(poisoned(float("nan")))),
    Corruption("tensor-inf", "tensors", on_first(poisoned(float("inf")))),
    Corruption("tensor-minus-inf", "tensors", on_first(poisoned(float("-inf")))),
    Corruption("tensor-int8", "tensors", on_first(lambda t: (t * 100).to(torch.int8))),
    Corruption("tensor-bool", "tensors", on_first(lambda t: t > 0)),
    Corruption("tensor-complex", "tensors", on_first(lambda t: t.to(torch.complex64))),
    Corruption("tensor-scalar", "tensors", on_first(lambda t: t.reshape(-1)[0].clone())),
    Corruption("tensor-flattened", "tensors", on_first(lambda t: t.reshape(1, -1) if t.dim() == 1 else t.reshape(-1)),
               needs_model=True),
    Corruption("tensor-wrong-shape", "tensors", on_first(wider), needs_model=True),
    Corruption("tensor-extra-key", "tensors",
               edit_tensors(lambda tensors: {**tensors, "base_model.model.no_such_module.weight": torch.zeros(2, 2)}),
               needs_model=True),
    Corruption("tensor-missing-key", "tensors", edit_tensors(drop_first), needs_model=True),
    Corruption("tensors-none", "tensors", edit_tensors(lambda tensors: {}), needs_model=True),
    Corruption("lora-rank-64-under-r-2", "tensors", lora_rank(64), methods=LORA_LIKE, needs_model=True),
    Corruption("lora-rank-1-under-r-2", "tensors", lora_rank(1), methods=LORA_LIKE, needs_model=True),
    # an adapter made for another base model (a tiny Llama: other sizes and layer count)
    Corruption("another-base-model", "another base model", lambda folder: None, needs_model=True, source="foreign"),
    # deltatune's own files
    Corruption("method-json-list", "deltatune files", write_bytes(METHOD_FILE, b'["lora"]')),
    Corruption("method-json-garbage", "deltatune files", write_bytes(METHOD_FILE, b"{method: ")),
    Corruption("method-json-unknown-method", "deltatune files",
               write_bytes(METHOD_FILE, b'{"method": "bitfit", "settings": {}}')),
    Corruption("method-json-settings-list", "deltatune files",
               write_bytes(METHOD_FILE, b'{"method": "lora", "settings": [1]}')),
    Corruption("composition-json-list", "deltatune files", write_bytes("deltatune_composition.json", b'["a"]')),
    Corruption("composition-json-escapes", "deltatune files",
               write_bytes("deltatune_composition.json", b'{"adapters": ["../x", "y"]}')),
]

GENERIC = ("folder", "config file", "weights file", "deltatune files")  # the same code for every method
CASES = [(corruption, method) for corruption in CORRUPTIONS for method in corruption.methods
         if corruption.category not in GENERIC or method in SOME]
CASE_IDS = [f"{corruption.category.replace(' ', '_')}:{corruption.name}-{method}" for corruption, method in CASES]


def corrupted(pristine: dict[str, Path], tmp_path: Path, corruption: Corruption, method: str) -> Path:
    folder = tmp_path / "adapter"
    shutil.copytree(pristine[f"{corruption.source}-{method}" if corruption.source else method], folder)
    corruption.change(folder)
    return folder


def snapshot(model: torch.nn.Module) -> tuple[list[str], dict[str, torch.Tensor], dict[str, bool]]:
    """What a refused load must leave as it was: the module tree, every tensor, and what trains."""
    return ([f"{path}:{type(module).__name__}" for path, module in model.named_modules()],
            {key: value.clone() for key, value in model.state_dict().items()},
            {key: param.requires_grad for key, param in model.named_parameters()})


def same(before: tuple, after: tuple) -> bool:
    return (before[0] == after[0] and before[2] == after[2] and before[1].keys() == after[1].keys()
            and all(torch.equal(before[1][k], after[1][k]) for k in before[1]))


def one_clean_line(err: str) -> bool:
    """What the CLI prints for a refused input: one line, ``deltatune: error: ...``, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    return len(lines) == 1 and lines[0].startswith("deltatune: error: ") and "Traceback" not in err


COMMANDS = ("merge", "eval", "predict")


def cli_call(command: str, folder: Path, tmp_path: Path) -> list[str]:
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "Once", "completion": " upon"}\n', encoding="utf-8")
    return {
        "generate": ["generate", "--model", str(MODEL), "--adapter", str(folder), "--prompt", "Once",
                     "--max-new-tokens", "2"],
        "merge": ["merge", "--model", str(MODEL), "--adapter", str(folder), "--output", str(tmp_path / "merged")],
        "eval": ["eval", "--model", str(MODEL), "--adapter", str(folder), "--data", str(data), "--max-new-tokens", "2"],
        "predict": ["predict", "--model", str(MODEL), "--adapter", str(folder), "--data", str(data),
                    "--output", str(tmp_path / "predictions.jsonl")],
        "info": ["info", str(folder)],
    }[command]


@pytest.mark.parametrize("corruption,method", CASES, ids=CASE_IDS)
def test_a_corrupt_adapter_is_refused_in_one_sentence_and_changes_nothing(corruption, method, pristine, tmp_path,
                                                                          capsys):
    """dt.load_adapter: a DeltatuneError, and the model exactly as it was. The CLI: exit status 1
    and one line on stderr from ``generate``, from one of merge/eval/predict in turn, and from
    ``info`` (which reads the folder without a model, so it judges only what the folder shows)."""
    folder = corrupted(pristine, tmp_path, corruption, method)
    base = load_causal_lm(MODEL)
    before = snapshot(base)
    with pytest.raises(DeltatuneError) as refused:
        dt.load_adapter(base, folder)
    assert "\n" not in str(refused.value)
    assert not any(isinstance(module, DeltaModule) for module in base.modules())
    assert same(before, snapshot(base))

    other = COMMANDS[CASES.index((corruption, method)) % len(COMMANDS)]  # each command gets a third of the cases
    for command in ("generate", other) + (() if corruption.needs_model else ("info",)):
        capsys.readouterr()
        code = main(cli_call(command, folder, tmp_path))
        out, err = capsys.readouterr()
        assert code == 1 and one_clean_line(err), f"{command}: exit {code}\n{err}"
        assert "loads in peft" not in out
    assert not (tmp_path / "merged").exists() and not (tmp_path / "predictions.jsonl").exists()


# --- the training state: what load_adapter(..., trainable=True) reads ------------------------
STATE = "adapter_training_state.safetensors"


def edit_state(edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        save_file(edit(dict(load_file(str(folder / STATE)))), str(folder / STATE))
    return change


def first_state(edit: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], None]:
    def apply(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        key = sorted(tensors)[0]
        return {**tensors, key: edit(tensors[key])}
    return edit_state(apply)


STATE_CORRUPTIONS = {
    "truncated": truncate(STATE, 0.5),
    "nan": first_state(poisoned(float("nan"))),
    "int8": first_state(lambda t: t.to(torch.int8)),
    "wrong-shape": first_state(wider),
    "missing-key": edit_state(drop_first),
    "extra-key": edit_state(lambda tensors: {**tensors, "no.such.parameter": torch.zeros(2)}),
    "settings-unknown": write_bytes(METHOD_FILE, b'{"method": "prefix", "settings": {"rank": 4}}'),
    "settings-invalid": write_bytes(METHOD_FILE, b'{"method": "prefix", "settings": {"num_virtual_tokens": 0}}'),
}


@pytest.mark.parametrize("method", ["ptuning", "prefix"])
@pytest.mark.parametrize("corruption", list(STATE_CORRUPTIONS))
def test_a_corrupt_training_state_is_refused_and_changes_nothing(corruption, method, pristine, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(pristine[method], folder)
    STATE_CORRUPTIONS[corruption](folder)
    base = load_causal_lm(MODEL)
    before = snapshot(base)
    with pytest.raises(DeltatuneError) as refused:
        dt.load_adapter(base, folder, trainable=True)
    assert "\n" not in str(refused.value) and same(before, snapshot(base))


# --- a whole model folder (full fine-tuning's output, or any base model) ------------------------
@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """What full fine-tuning writes: a model folder with its tokenizer and deltatune_method.json."""
    folder = tmp_path_factory.mktemp("full") / "run"
    model = make_adapter(folder, dt.FullFineTuning(), load_causal_lm(MODEL))
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(MODEL / name, folder / name)
    return model


def edit_json(name: str, **changes: Any) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        value = json.loads((folder / name).read_text(encoding="utf-8"))
        value.update(changes)
        (folder / name).write_text(json.dumps(value), encoding="utf-8")
    return change


def only_pickled_weights(folder: Path) -> None:
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


MODEL_CORRUPTIONS = {
    "weights-truncated": truncate("model.safetensors", 0.5),
    "weights-missing": remove("model.safetensors"),
    "weights-garbage": write_bytes("model.safetensors", b"not tensors" * 20),
    "weights-pickle-only": only_pickled_weights,
    "weights-lack-layers": edit_json("config.json", num_hidden_layers=7),
    "config-list": write_bytes("config.json", b"[1, 2]"),
    "config-garbage": write_bytes("config.json", b"{{{"),
    "config-not-utf8": write_bytes("config.json", b'{"model_type": "\xff"}'),
    "config-architectures-number": edit_json("config.json", architectures=5),
    "config-hidden-size-text": edit_json("config.json", hidden_size="big"),
    "config-model-type-unknown": edit_json("config.json", model_type="no_such_architecture"),
    "tokenizer-config-list": write_bytes("tokenizer_config.json", b"[1]"),
    "generation-config-garbage": write_bytes("generation_config.json", b"{x"),
    "method-json-list": write_bytes(METHOD_FILE, b'["full"]'),
}


@pytest.mark.parametrize("corruption", list(MODEL_CORRUPTIONS))
def test_a_corrupt_model_folder_is_one_sentence_in_every_command(corruption, full_run, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(full_run, folder)
    MODEL_CORRUPTIONS[corruption](folder)
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "Once", "completion": " upon"}\n', encoding="utf-8")
    commands = [["generate", "--model", str(folder), "--prompt", "Once", "--max-new-tokens", "2"],
                ["eval", "--model", str(folder), "--data", str(data), "--max-new-tokens", "2"],
                ["generate", "--model", str(MODEL), "--adapter", str(folder), "--prompt", "Once"]]
    if corruption == "method-json-list":  # deltatune's own file: only info reads it
        commands = [["info", str(folder)]]
    for argv in commands:
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 1 and one_clean_line(err), f"{argv[0]}: exit {code}\n{err}"


# --- adapter names ---------------------------------------------------------------------------
BAD_NAMES = ["../x", "", "x.y", "/abs/x", "a/b", "..", ".hidden", "__base__", "x\n", None, 3]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_an_unusable_adapter_name_is_refused_before_anything_changes(name, input_ids):
    model = dt.wrap(tiny_llama(), dt.LoRA(rank=2))
    before = snapshot(model)
    with pytest.raises(DeltatuneError, match="Adapter name .* is not usable"):
        model.add_adapter(name, dt.LoRA(rank=2))
    assert same(before, snapshot(model)) and list(model.methods) == ["default"]
    model.add_adapter("second", dt.LoRA(rank=2))  # the model still takes adapters, and merges them
    model.set_adapter(["default", "second"])
    assert torch.allclose(logits_of(dt.merge(model), input_ids), logits_of(tiny_llama(), input_ids), atol=1e-6)


@pytest.mark.parametrize("name", ["../x", "", "x.y", "/abs/x"], ids=repr)
def test_load_adapter_and_wrap_refuse_an_unusable_name_and_leave_the_model_as_it_was(name, pristine):
    base = load_causal_lm(MODEL)
    before = snapshot(base)
    with pytest.raises(DeltatuneError, match="Adapter name .* is not usable"):
        dt.load_adapter(base, pristine["lora"], adapter_name=name)
    with pytest.raises(DeltatuneError, match="Adapter name .* is not usable"):
        dt.wrap(base, dt.LoRA(rank=2), name)
    assert same(before, snapshot(base))
    assert not any(isinstance(module, DeltaModule) for module in base.modules())


def test_a_method_refused_half_way_through_leaves_the_model_as_it_was(input_ids):
    """LoRA wraps its target layers before it looks for modules_to_save: the refusal takes them out again."""
    base = tiny_llama()
    before = snapshot(base)
    with pytest.raises(DeltatuneError, match="modules_to_save"):
        dt.wrap(base, dt.LoRA(rank=2, modules_to_save=("no_such_module",)))
    assert same(before, snapshot(base))
    model = dt.wrap(base, dt.LoRA(rank=2))  # the same name again, and a merge: nothing was left behind
    assert torch.equal(logits_of(dt.merge(model), input_ids), logits_of(tiny_llama(), input_ids))


def test_a_refused_load_keeps_the_adapters_a_model_already_has(pristine, tmp_path, input_ids):
    model = dt.load_adapter(load_causal_lm(MODEL), pristine["lora"], "first")
    expected, before = logits_of(model, input_ids), snapshot(model)
    broken = tmp_path / "broken"
    shutil.copytree(pristine["adapter"], broken)
    edit_tensors(drop_first)(broken)  # found only after the first modules took their tensors
    with pytest.raises(DeltatuneError, match="has no tensor"):
        dt.load_adapter(model, broken, "second")
    assert list(model.methods) == ["first"] and model.active_adapters == ("first",)
    assert same(before, snapshot(model)) and torch.equal(logits_of(model, input_ids), expected)


def test_a_qlora_adapter_that_does_not_fit_leaves_the_base_unquantised(pristine, tmp_path):
    """QLoRA quantises the base for good: a misfit tensor is found on plain LoRA first."""
    broken = tmp_path / "broken"
    shutil.copytree(pristine["qlora"], broken)
    on_first(wider)(broken)
    base = load_causal_lm(MODEL)
    before = snapshot(base)
    with pytest.raises(DeltatuneError, match="has shape"):
        dt.load_adapter(base, broken)
    assert same(before, snapshot(base))


# --- pickles: refused unless allowed, and then tensors only ----------------------------------
class Payload:
    """What a malicious pickle carries: unpickling it calls Path.touch(marker)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def malicious_pickle(path: Path, marker: Path, key: str) -> None:
    torch.save({key: torch.zeros(2), "payload": Payload(marker)}, path)
    torch.load(path, weights_only=False)  # the control: a plain load runs the payload ...
    assert marker.exists()
    marker.unlink()  # ... so its marker not existing afterwards means it never ran


def test_a_pickled_adapter_is_refused_and_its_payload_never_runs(pristine, tmp_path, capsys):
    folder, marker = tmp_path / "adapter", tmp_path / "payload-ran"
    shutil.copytree(pristine["lora"], folder)
    (folder / WEIGHTS).unlink()
    malicious_pickle(folder / "adapter_model.bin", marker, "base_model.model.lm_head.weight")
    with pytest.raises(DeltatuneError, match="adapter_model.bin, a pickle, which can run code"):
        dt.load_adapter(load_causal_lm(MODEL), folder)
    with pytest.raises(DeltatuneError, match="is not a plain file of tensors"):
        dt.load_adapter(load_causal_lm(MODEL), folder, allow_pickle=True)
    for flags in ([], ["--allow-pickle"]):
        for argv in (["info", str(folder)], cli_call("generate", folder, tmp_path)):
            assert main(argv + flags) == 1 and one_clean_line(capsys.readouterr().err)
    assert not marker.exists()


def test_allow_pickle_reads_the_tensors_of_a_plain_pickled_adapter(pristine, tmp_path, input_ids, capsys):
    folder = tmp_path / "adapter"
    shutil.copytree(pristine["lora"], folder)
    torch.save(load_file(str(folder / WEIGHTS)), folder / "adapter_model.bin")  # what old peft wrote
    (folder / WEIGHTS).unlink()
    loaded = dt.load_adapter(load_causal_lm(MODEL), folder, allow_pickle=True)
    expected = dt.load_adapter(load_causal_lm(MODEL), pristine["lora"])
    assert torch.equal(logits_of(loaded, input_ids), logits_of(expected, input_ids))
    assert main(cli_call("generate", folder, tmp_path) + ["--allow-pickle"]) == 0
    assert main(cli_call("generate", folder, tmp_path)) == 1 and "--allow-pickle" in capsys.readouterr().err


def model_copy(folder: Path) -> Path:
    shutil.copytree(MODEL, folder)
    return folder


def test_a_model_folder_of_pickled_weights_is_refused_and_its_payload_never_runs(tmp_path, capsys):
    folder, marker = model_copy(tmp_path / "model"), tmp_path / "payload-ran"
    (folder / "model.safetensors").unlink()
    malicious_pickle(folder / "pytorch_model.bin", marker, "model.embed_tokens.weight")
    with pytest.raises(DeltatuneError, match="only as pickle files .*pytorch_model.bin"):
        load_model(folder)
    with pytest.raises(DeltatuneError, match="hold more than tensors"):
        load_model(folder, allow_pickle=True)
    for flags in ([], ["--allow-pickle"]):
        assert main(["generate", "--model", str(folder), "--prompt", "Once"] + flags) == 1
        assert one_clean_line(capsys.readouterr().err)
    assert not marker.exists()


def test_allow_pickle_loads_a_model_folder_of_plain_pickled_weights(tmp_path, input_ids):
    folder = model_copy(tmp_path / "model")
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    assert torch.equal(logits_of(load_model(folder, allow_pickle=True), input_ids),
                       logits_of(load_model(MODEL), input_ids))


def test_no_source_file_loads_yaml_or_pickles_unsafely():
    """Every YAML read is yaml.safe_load; every torch.load says weights_only=True; nothing unpickles directly."""
    import re

    unsafe = re.compile(r"yaml\.(load|unsafe_load|full_load)\(|pickle\.loads?\(|Unpickler\(|torch\.load\((?![^)]*weights_only=True)")
    source = Path(dt.__file__).parent
    found = [f"{path.relative_to(source)}: {line.strip()}" for path in sorted(source.rglob("*.py"))
             for line in path.read_text(encoding="utf-8").splitlines() if unsafe.search(line)]
    assert not found, found


# --- YAML: the safe loader only --------------------------------------------------------------
PYTHON_TAG = "!!python/object/apply:pathlib.Path.touch [{marker}]"


def test_a_python_tag_in_a_yaml_config_is_an_error_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    config = tmp_path / "run.yaml"
    config.write_text(f"model: m\nrank: {PYTHON_TAG.format(marker=marker)}\n", encoding="utf-8")
    with pytest.raises(DeltatuneError, match="is not valid YAML"):
        read_yaml(config)
    assert main(["train", "--config", str(config)]) == 1 and one_clean_line(capsys.readouterr().err)
    overrides = parse_overrides([f"rank={PYTHON_TAG.format(marker=marker)}"])  # kept as text, never constructed
    assert overrides == {"rank": PYTHON_TAG.format(marker=marker)}
    assert main(["train", "--model", "m", "--data", "d", "--output", str(tmp_path / "o"),
                 f"rank={PYTHON_TAG.format(marker=marker)}"]) == 1
    assert "rank must be a whole number" in capsys.readouterr().err
    assert not marker.exists()


# --- remote code: only with trust_remote_code=True -------------------------------------------
CUSTOM_CODE = '''from pathlib import Path
Path(__file__).with_name("custom-code-ran").touch()
from transformers import LlamaConfig, LlamaForCausalLM
class EvilConfig(LlamaConfig):
    model_type = "evil"
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
'''


@pytest.mark.parametrize("model_type", ["llama", "evil"])
def test_a_model_folder_with_custom_code_does_not_run_it_unless_trusted(model_type, tmp_path, capsys):
    """``auto_map`` names the folder's own Python files; without trust_remote_code they are never
    imported: a known model type loads with transformers' own classes, an unknown one is refused."""
    folder = model_copy(tmp_path / "model")
    for name in ("configuration_evil.py", "modeling_evil.py"):
        (folder / name).write_text(CUSTOM_CODE, encoding="utf-8")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config.update(model_type=model_type, auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                                   "AutoModelForCausalLM": "modeling_evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    code = main(["generate", "--model", str(folder), "--prompt", "Once", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert (code, one_clean_line(err)) == ((0, False) if model_type == "llama" else (1, True)), err
    if model_type == "evil":
        with pytest.raises(DeltatuneError):
            load_model(folder)
    assert not (folder / "custom-code-ran").exists()


# --- the network: never ------------------------------------------------------------------------
def test_nothing_is_fetched_from_the_network(pristine, tmp_path, monkeypatch, capsys):
    """With every connection refused, loading and generating work as before, and a hub name is
    refused as a missing folder rather than downloaded."""
    def no_network(*args, **kwargs):
        raise AssertionError(f"deltatune tried to reach the network: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    folder = tmp_path / "adapter"
    shutil.copytree(pristine["lora"], folder)
    edit_config(base_model_name_or_path="meta-llama/Llama-2-7b-hf")(folder)  # an adapter naming a hub model
    assert main(cli_call("generate", folder, tmp_path)) == 0
    assert main(["generate", "--model", "meta-llama/Llama-2-7b-hf", "--prompt", "x"]) == 1
    assert "never downloaded" in capsys.readouterr().err
    with pytest.raises(DeltatuneError, match="could not load a tokenizer"):
        dt.wrap(tiny_llama(), dt.PromptTuning(num_virtual_tokens=2, init="text", init_text="Hi", tokenizer_path="gpt2"))


# --- command-line arguments that used to end in a traceback ------------------------------------
def write_text(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


CLI_CASES = {  # name: (argv with {tmp} and {model} and {adapter} and {data}, words in the one-line error)
    "generate-max-new-tokens-0": ("generate --model {model} --prompt Once --max-new-tokens 0", "--max-new-tokens must be at least 1"),
    "generate-max-new-tokens-negative": ("generate --model {model} --prompt Once --max-new-tokens -3", "--max-new-tokens must be at least 1"),
    "generate-temperature-negative": ("generate --model {model} --prompt Once --temperature -1", "--temperature must be a finite number"),
    "generate-temperature-nan": ("generate --model {model} --prompt Once --temperature nan", "--temperature must be a finite number"),
    "generate-temperature-inf": ("generate --model {model} --prompt Once --temperature inf", "--temperature must be a finite number"),
    "generate-escapes-trailing-backslash": ("generate --model {model} --escapes --prompt abc\\", "--prompt has a broken escape"),
    "generate-escapes-short-hex": ("generate --model {model} --escapes --prompt abc\\x4", "--prompt has a broken escape"),
    "generate-escapes-lone-surrogate": ("generate --model {model} --escapes --prompt a\\ud800b", "which is not a character"),
    "generate-lone-surrogate": ("generate --model {model} --prompt a\udc80b", "which is not a character"),
    "eval-max-new-tokens-0": ("eval --model {model} --data {data} --max-new-tokens 0", "--max-new-tokens must be at least 1"),
    "eval-batch-size-0": ("eval --model {model} --data {data} --batch-size 0", "--batch-size must be at least 1"),
    "eval-seed-too-big": (f"eval --model {{model}} --data {{data}} --seed {10**30}", "--seed must be a whole number"),
    "eval-json-is-a-folder": ("eval --model {model} --data {data} --json {tmp}", "is a folder; name a file"),
    "eval-json-under-a-file": ("eval --model {model} --data {data} --json {data}/metrics.json", "is a file, not a folder"),
    "predict-batch-size-0": ("predict --model {model} --data {data} --output {tmp}/p.jsonl --batch-size 0", "--batch-size must be at least 1"),
    "predict-output-is-a-folder": ("predict --model {model} --data {data} --output {tmp}", "is a folder; name a file"),
    "merge-output-is-a-file": ("merge --model {model} --adapter {adapter} --output {data}", "is a file"),
    "merge-output-under-a-file": ("merge --model {model} --adapter {adapter} --output {data}/merged", "is a file, not a folder"),
    "train-output-is-a-file": ("train --model {model} --data {data} --output {data}", "is a file"),
    "train-output-under-a-file": ("train --model {model} --data {data} --output {data}/run", "is a file, not a folder"),
    "demo-output-is-a-file": ("demo --output {data}", "is a file"),
    "extract-output-under-a-file": ("extract --base {model} --tuned {adapter} --rank 2 --output {data}/x", "is a file, not a folder"),
    "compare-max-new-tokens-0": ("compare --max-new-tokens 0", "--max-new-tokens must be at least 1"),
    "config-is-a-folder": ("train --config {tmp}", "is not a file"),
    "config-not-utf8": ("train --config {tmp}/latin1.yaml", "is not UTF-8"),
    "config-a-list": ("train --config {tmp}/list.yaml", "must be a mapping"),
    "config-deeply-nested": ("train --config {tmp}/nested.yaml", "Config file"),
    "info-of-a-model-folder": ("info {model}", "has no adapter_config.json"),
    "info-of-nothing": ("info {tmp}/nothing", "does not exist"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_a_bad_command_line_is_one_sentence_and_exit_1(case, pristine, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "Once", "completion": " upon"}\n', encoding="utf-8")
    write_text(tmp_path / "latin1.yaml", "model: caf\xe9\n".encode("latin-1"))
    write_text(tmp_path / "list.yaml", b"- model\n- data\n")
    write_text(tmp_path / "nested.yaml", b"[" * 5000 + b"]" * 5000)
    template, words = CLI_CASES[case]
    values = {"tmp": tmp_path, "model": MODEL, "adapter": pristine["lora"], "data": data}
    argv = [part.format(**values) for part in template.split(" ")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert one_clean_line(err) and words in err, err


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes whatever the permissions say, so a refusal "
                                                 "cannot be seen when the tests run as root")
@pytest.mark.parametrize("command", ["merge", "train", "eval-json", "predict", "config"])
def test_a_folder_or_file_without_permission_is_one_sentence(command, pristine, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "Once", "completion": " upon"}\n', encoding="utf-8")
    locked = tmp_path / "locked"
    locked.mkdir()
    config = tmp_path / "run.yaml"
    config.write_text("model: m\n", encoding="utf-8")
    argv = {"merge": ["merge", "--model", str(MODEL), "--adapter", str(pristine["lora"]), "--output", str(locked / "m")],
            "train": ["train", "--model", str(MODEL), "--data", str(data), "--output", str(locked / "run")],
            "eval-json": ["eval", "--model", str(MODEL), "--data", str(data), "--json", str(locked / "m.json")],
            "predict": ["predict", "--model", str(MODEL), "--data", str(data), "--output", str(locked / "p.jsonl")],
            "config": ["train", "--config", str(config)]}[command]
    os.chmod(locked, 0o555)
    os.chmod(config, 0)
    try:
        assert main(argv) == 1
    finally:
        os.chmod(locked, 0o755)
        os.chmod(config, 0o644)
    err = capsys.readouterr().err
    assert one_clean_line(err) and ("cannot be written" in err or "cannot be read" in err), err


def test_escapes_keep_every_other_character(capsys):
    assert main(["generate", "--model", str(MODEL), "--escapes", "--prompt", "café\\n中", "--max-new-tokens", "1"]) == 0
    assert capsys.readouterr().out.startswith("café\n中")


# --- info: "loads in peft: yes" only for what deltatune loads ---------------------------------
def test_info_says_loads_in_peft_only_for_an_adapter_deltatune_loads(pristine, tmp_path, capsys):
    assert main(["info", str(pristine["lora"])]) == 0
    assert "loads in peft  yes" in capsys.readouterr().out
    folder = tmp_path / "adapter"
    shutil.copytree(pristine["lora"], folder)
    on_first(poisoned(float("nan")))(folder)
    assert main(["info", str(folder)]) == 1
    out, err = capsys.readouterr()
    assert "loads in peft" not in out and "NaN or infinite" in err
