"""Composition: several methods active on one model at once, each its own named adapter.

He et al. 2021 (arXiv 2110.04366) combine methods that change different places of a layer: a
prefix in attention plus a parallel adapter beside the feed-forward block ("mix-and-match").
Here any adapters may run together when the protocol allows it; their deltas add up:

    h = f(x; W, δ_1, ..., δ_k)    e.g. prefix + parallel adapter: attention over [P_k; K], [P_v; V],
                                  feed-forward output + s·bottleneck(x)
    two LoRAs on one layer:       h = W x + s_1·B_1 A_1 x + s_2·B_2 A_2 x  (summed)
    two serial bottlenecks:       h ← h + b_2(h + b_1(h))                  (stacked, in the order given)

Which adapters compose is read from the protocol, never from method names
(``Capabilities`` and ``DeltaModule.composition_conflict``):

- an adapter that is not ``reversible`` (full, freeze) changed the base weights in place, so it
  runs alone;
- at most one adapter ``rewrites_call`` (prompt, P-tuning, prefix, P-Tuning v2 each expect the
  model's call as the user made it);
- a module that runs one adapter at a time (a trained copy of a classifier's head, a trained
  bias) can belong to only one of them.

``Composition`` is the form a run's config takes (``--method prefix+adapter``): ``wrap`` adds each
part as an adapter named after it and activates them all. In Python, ``add_adapter`` each part
and ``set_adapter([a, b])`` does the same.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from deltatune.errors import DeltatuneError
from deltatune.methods.protocol import Method
from deltatune.plain_data import plain_data


def composition_problem(parts: Sequence[tuple[str, Method]]) -> str | None:
    """Why these (adapter name, method) pairs cannot be active together, as one sentence; None if they can."""
    for name, method in parts:
        if not method.capabilities().reversible:
            return (f"Adapter {name!r} ({method.cli_name}) trains the base weights in place, so it cannot be active "
                    "with other adapters; train it alone (or merge it into a model folder and put the others on that).")
    rewriting = [(name, method) for name, method in parts if method.capabilities().rewrites_call]
    if len(rewriting) > 1:
        named = " and ".join(f"{name!r} ({method.cli_name})" for name, method in rewriting)
        return (f"Adapters {named} both rewrite the model's input (virtual tokens or a key/value prefix), so only one "
                "of them can be active at a time; combine one of them with a layer method (lora, adapter) instead.")
    return None


@dataclass(frozen=True)
class Composition:
    """Methods to run together, as (adapter name, method) pairs in the order they apply.

    ``Composition({"prefix": dt.PrefixTuning(), "adapter": dt.Adapter(preset="parallel")})``.
    """

    parts: tuple[tuple[str, Method], ...]

    def __post_init__(self) -> None:
        parts = self.parts.items() if isinstance(self.parts, Mapping) else self.parts
        parts = tuple((name, method) for name, method in parts)
        if len(parts) < 2:
            raise DeltatuneError(f"A composition needs at least two methods, got {len(parts)}; "
                                 "use the method alone instead.")
        for name, method in parts:
            if not isinstance(method, Method):
                raise DeltatuneError(f"Composition part {name!r} is a {type(method).__name__}, not a method; "
                                     "pass methods such as deltatune.LoRA(rank=8).")
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", name) or name == "__base__":
                raise DeltatuneError(f"Composition part name {name!r} is not usable as an adapter name; "
                                     "use letters, digits, '_' and '-'.")
        names = [name for name, _ in parts]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise DeltatuneError(f"The composition names {repeated[0]!r} twice; give each part its own name.")
        problem = composition_problem(parts)
        if problem:
            raise DeltatuneError(problem)
        object.__setattr__(self, "parts", parts)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.parts]

    @property
    def cli_name(self) -> str:
        return "+".join(method.cli_name for _, method in self.parts)

    @property
    def training_defaults(self) -> dict[str, Any]:
        """The parts' training defaults; where two set the same key, the first part's wins.
        The trainer runs one optimizer with one learning rate for every part."""
        merged: dict[str, Any] = {}
        for _, method in reversed(self.parts):
            merged.update(method.training_defaults)
        return merged

    def encode_prompt(self, tokenizer: Any, text: str) -> list[int]:
        """The prompt as the part that places virtual tokens in the text lays it out (a P-tuning
        template), else [BOS] + the prompt's tokens."""
        for _, method in self.parts:
            if type(method).encode_prompt is not Method.encode_prompt:
                return method.encode_prompt(tokenizer, text)
        return self.parts[0][1].encode_prompt(tokenizer, text)

    def describe(self) -> dict[str, Any]:
        """Each part's settings under its name (plain data)."""
        return plain_data({name: method.describe() for name, method in self.parts})
