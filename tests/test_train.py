import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from deltatune.data import IGNORE_INDEX
from deltatune.errors import DeltatuneError
from deltatune.train import TrainConfig, learning_rate_factor, train

STORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K"
TRAINABLE = ("lm_head.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight")


def tiny_model(attention_dropout: float = 0.0) -> LlamaForCausalLM:
    """A 2-layer Llama with an "adapter": only TRAINABLE parameters require grad."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=128, max_position_embeddings=64,
        attention_dropout=attention_dropout, attn_implementation="eager",
    )
    model = LlamaForCausalLM(config)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in TRAINABLE)
    return model


def tiny_examples(count: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """Sequences of 6 to 12 tokens; the first 1 to 3 are a prompt (label IGNORE_INDEX)."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(count):
        length = int(torch.randint(6, 13, (1,), generator=generator))
        prompt_length = int(torch.randint(1, 4, (1,), generator=generator))
        ids = torch.randint(3, 128, (length,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt_length + ids[prompt_length:]})
    return examples


def save_trainable(model, folder: Path) -> None:
    """Stands in for a method's adapter saver."""
    weights = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    save_file(weights, str(folder / "adapter.safetensors"))


def config(**overrides) -> TrainConfig:
    settings = dict(max_steps=6, batch_size=4, learning_rate=1e-2, eval_every=0, log_every=1, seed=1)
    return TrainConfig(**{**settings, **overrides})


def weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def read_metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


# --- config --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"max_steps": 0}, "max_steps"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"warmup_steps": 7}, "warmup_steps"),
        ({"lr_schedule": "step"}, "lr_schedule 'step' is unknown"),
        ({"max_grad_norm": -1}, "max_grad_norm"),
        ({"bf16": "yes"}, "bf16"),
    ],
)
def test_nonsense_config_is_one_sentence_error(overrides, words):
    with pytest.raises(DeltatuneError, match=words):
        config(**overrides)


def test_schedule_values_at_known_steps():
    cosine = dict(warmup_steps=4, max_steps=20, schedule="cosine")
    assert [learning_rate_factor(s, **cosine) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert learning_rate_factor(4, **cosine) == 1.0
    assert learning_rate_factor(12, **cosine) == pytest.approx(0.5)  # progress 8/16: 0.5 * (1 + cos(pi/2))
    assert learning_rate_factor(19, **cosine) == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 16)))
    linear = dict(warmup_steps=4, max_steps=20, schedule="linear")
    assert learning_rate_factor(12, **linear) == 0.5 and learning_rate_factor(19, **linear) == 1 / 16
    assert learning_rate_factor(19, warmup_steps=0, max_steps=20, schedule="constant") == 1.0


def test_learning_rates_used_follow_the_schedule(tmp_path):
    train(tiny_model(), tiny_examples(16), [], config(max_steps=10, warmup_steps=3), tmp_path,
          pad_token_id=0, save_model=save_trainable, progress=False)
    used = [line["lr"] for line in read_metrics(tmp_path)]
    expected = [1e-2 * learning_rate_factor(s, warmup_steps=3, max_steps=10, schedule="cosine") for s in range(10)]
    assert used == pytest.approx(expected, rel=1e-12)


# --- what training changes -----------------------------------------------------------------


def test_only_trainable_parameters_change(tmp_path):
    model = tiny_model()
    before = weights(model)
    train(model, tiny_examples(16), [], config(), tmp_path, pad_token_id=0, save_model=save_trainable, progress=False)
    after = weights(model)
    for name in before:
        if name in TRAINABLE:
            assert not torch.equal(before[name], after[name]), name
        else:
            assert torch.equal(before[name], after[name]), name


def test_loss_goes_down_on_a_memorisation_task(tmp_path):
    examples = tiny_examples(4)
    result = train(tiny_model(), examples, examples, config(max_steps=15, eval_every=15, learning_rate=3e-2),
                   tmp_path, pad_token_id=0, save_model=save_trainable, progress=False)
    losses = [line["loss"] for line in read_metrics(tmp_path) if "loss" in line]
    assert losses[-1] < 0.5 * losses[0]
    assert result.eval_losses[-1][1] < 0.5 * losses[0]


def test_gradient_accumulation_equals_the_large_batch(tmp_path):
    examples = tiny_examples(16)  # uneven lengths: micro-batches must be weighted by token count
    large, accumulated = tiny_model(), tiny_model()
    train(large, examples, [], config(max_steps=3, batch_size=8), tmp_path / "large",
          pad_token_id=0, save_model=save_trainable, progress=False)
    train(accumulated, examples, [], config(max_steps=3, batch_size=4, gradient_accumulation_steps=2),
          tmp_path / "accumulated", pad_token_id=0, save_model=save_trainable, progress=False)
    # Not bit-exact: the two runs pad to different lengths and sum the loss in another
    # order, so float32 rounding differs by a few ulps; 1e-6 is far below any real bug.
    for name, parameter in large.named_parameters():
        torch.testing.assert_close(parameter, dict(accumulated.named_parameters())[name], atol=1e-6, rtol=0)


def test_gradient_checkpointing_gives_the_same_weights(tmp_path):
    plain, checkpointed = tiny_model(), tiny_model()
    train(plain, tiny_examples(16), [], config(max_steps=2), tmp_path / "plain",
          pad_token_id=0, save_model=save_trainable, progress=False)
    train(checkpointed, tiny_examples(16), [], config(max_steps=2, gradient_checkpointing=True), tmp_path / "ckpt",
          pad_token_id=0, save_model=save_trainable, progress=False)
    for name, parameter in plain.named_parameters():
        # Recomputing the forward pass runs the same kernels on the same inputs: exact.
        assert torch.equal(parameter, dict(checkpointed.named_parameters())[name]), name


def test_gradient_checkpointing_on_a_model_without_it_is_an_error(tmp_path):
    class Bare(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(2))

    with pytest.raises(DeltatuneError, match="Bare cannot checkpoint gradients"):
        train(Bare(), tiny_examples(4), [], config(gradient_checkpointing=True), tmp_path,
              pad_token_id=0, save_model=save_trainable, progress=False)


def test_bf16_autocast_trains(tmp_path):
    result = train(tiny_model(), tiny_examples(8), tiny_examples(4, seed=1), config(max_steps=2, bf16=True), tmp_path,
                   pad_token_id=0, save_model=save_trainable, progress=False)
    assert math.isfinite(result.train_loss) and math.isfinite(result.eval_losses[-1][1])


def test_no_trainable_parameters_or_no_examples_are_errors(tmp_path):
    frozen = tiny_model().requires_grad_(False)
    with pytest.raises(DeltatuneError, match="no trainable parameters"):
        train(frozen, tiny_examples(4), [], config(), tmp_path,
              pad_token_id=0, save_model=save_trainable, progress=False)
    with pytest.raises(DeltatuneError, match="no training examples"):
        train(tiny_model(), [], [], config(), tmp_path, pad_token_id=0, save_model=save_trainable, progress=False)


# --- checkpoints, metrics, resume ----------------------------------------------------------


class Crash(Exception):
    pass


def test_checkpoints_are_atomic_and_only_the_newest_two_are_kept(tmp_path):
    result = train(tiny_model(), tiny_examples(16), [], config(max_steps=6, save_every=2), tmp_path,
                   pad_token_id=0, save_model=save_trainable, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-6", "metrics.jsonl"]
    assert result.checkpoint == tmp_path / "checkpoint-6"
    assert sorted(p.name for p in result.checkpoint.iterdir()) == [
        "adapter.safetensors", "optimizer.pt", "rng.pt", "trainable.safetensors", "trainer_state.json",
    ]
    state = json.loads((result.checkpoint / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["config"]["save_every"] == 2


def test_metrics_lines_parse_with_eval_loss_when_evaluated(tmp_path):
    train(tiny_model(), tiny_examples(16), tiny_examples(5, seed=1), config(max_steps=6, eval_every=3, log_every=2),
          tmp_path, pad_token_id=0, save_model=save_trainable, progress=False)
    metrics = read_metrics(tmp_path)
    assert [line["step"] for line in metrics] == [0, 2, 3, 4, 6]  # step 0: eval before training
    assert [line["step"] for line in metrics if "eval_loss" in line] == [0, 3, 6]
    for line in metrics[1:]:
        assert {"step", "loss", "lr", "tokens_per_s"} <= line.keys()
        assert all(math.isfinite(line[key]) for key in line)


def test_resume_after_a_crash_equals_the_uninterrupted_run_bit_exactly(tmp_path):
    examples, held_out = tiny_examples(10), tiny_examples(3, seed=1)
    # Dropout draws from the global RNG, so this only matches if the RNG state is restored.
    settings = config(max_steps=7, save_every=3, eval_every=2, gradient_accumulation_steps=2, batch_size=3)

    uninterrupted = tiny_model(attention_dropout=0.3)
    train(uninterrupted, examples, held_out, settings, tmp_path / "whole",
          pad_token_id=0, save_model=save_trainable, progress=False)

    saves = []

    def crash_on_second_save(model, folder):
        saves.append(folder)
        if len(saves) == 2:
            raise Crash()
        save_trainable(model, folder)

    with pytest.raises(Crash):
        train(tiny_model(attention_dropout=0.3), examples, held_out, settings, tmp_path / "split",
              pad_token_id=0, save_model=crash_on_second_save, progress=False)
    assert sorted(p.name for p in (tmp_path / "split").iterdir()) == ["checkpoint-3", "metrics.jsonl"]

    resumed = tiny_model(attention_dropout=0.3)
    result = train(resumed, examples, held_out, settings, tmp_path / "split",
                   pad_token_id=0, save_model=save_trainable, resume=True, progress=False)
    assert result.step == 7
    for name, parameter in uninterrupted.named_parameters():
        assert torch.equal(parameter, dict(resumed.named_parameters())[name]), name
    whole, split = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "split")
    assert [line["step"] for line in split] == list(range(0, 8))  # step 0: eval before training
    def losses(metrics):
        return [(line.get("loss"), line.get("eval_loss")) for line in metrics]

    assert losses(split) == losses(whole)


def test_resume_without_checkpoint_and_fresh_run_over_checkpoints_are_errors(tmp_path):
    with pytest.raises(DeltatuneError, match="no checkpoint to resume from .*drop --resume"):
        train(tiny_model(), tiny_examples(4), [], config(), tmp_path, pad_token_id=0,
              save_model=save_trainable, resume=True, progress=False)
    train(tiny_model(), tiny_examples(4), [], config(max_steps=1), tmp_path, pad_token_id=0,
          save_model=save_trainable, progress=False)
    with pytest.raises(DeltatuneError, match="already holds checkpoints"):
        train(tiny_model(), tiny_examples(4), [], config(max_steps=1), tmp_path, pad_token_id=0,
              save_model=save_trainable, progress=False)


def test_resume_checks_parameter_names_and_settings(tmp_path):
    train(tiny_model(), tiny_examples(4), [], config(max_steps=2, save_every=1), tmp_path, pad_token_id=0,
          save_model=save_trainable, progress=False)
    other = tiny_model()
    other.model.layers[0].mlp.up_proj.weight.requires_grad_(True)
    with pytest.raises(DeltatuneError, match="no weights for trainable parameter model.layers.0.mlp.up_proj.weight"):
        train(other, tiny_examples(4), [], config(max_steps=2), tmp_path, pad_token_id=0,
              save_model=save_trainable, resume=True, progress=False)
    fewer = tiny_model()
    fewer.lm_head.weight.requires_grad_(False)
    with pytest.raises(DeltatuneError, match="holds lm_head.weight, which is not trainable"):
        train(fewer, tiny_examples(4), [], config(max_steps=2), tmp_path, pad_token_id=0,
              save_model=save_trainable, resume=True, progress=False)
    with pytest.raises(DeltatuneError, match="batch_size=4 but this run has 2"):
        train(tiny_model(), tiny_examples(4), [], config(max_steps=2, batch_size=2), tmp_path, pad_token_id=0,
              save_model=save_trainable, resume=True, progress=False)


def test_stories260k_learns_a_file_of_examples_end_to_end(tmp_path):
    if not STORIES.is_dir():
        pytest.skip(f"../shared/models/stories260K not present: {STORIES} is needed for this test")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltatune.data import load_examples, tokenize_examples
    from deltatune.train import evaluate

    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    model = AutoModelForCausalLM.from_pretrained(STORIES)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith("model.layers.4."))
    records = [{"prompt": f"Tom had {n} red balls.", "completion": f" Tom gave {n} balls to Sue."}
               for n in ("two", "three", "four", "five")]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    examples = tokenize_examples(load_examples(data), tokenizer, max_length=64)
    settings = TrainConfig(max_steps=20, batch_size=4, learning_rate=1e-2, eval_every=20, seed=0)
    before = evaluate(model, examples, settings, pad_token_id=tokenizer.eos_token_id)
    result = train(model, examples, examples, settings, tmp_path / "run", pad_token_id=tokenizer.eos_token_id,
                   save_model=save_trainable, progress=False)
    assert result.eval_losses[-1][1] < 0.5 * before


def test_group_by_length_trains_on_batches_of_similar_length(tmp_path):
    """group_by_length changes only the batch order: every example is still seen once an epoch,
    and batches hold less padding than seeded random batches."""
    from deltatune.data import batch_indices

    lengths = [3 + (7 * i) % 50 for i in range(64)]
    plain = batch_indices(64, 8, seed=0)
    grouped = batch_indices(64, 8, seed=0, lengths=lengths)

    def padding(batches):
        return sum(max(lengths[i] for i in batch) * len(batch) - sum(lengths[i] for i in batch) for batch in batches)

    first_plain = [next(plain) for _ in range(8)]
    first_grouped = [next(grouped) for _ in range(8)]
    assert sorted(i for batch in first_grouped for i in batch) == list(range(64))
    assert padding(first_grouped) < padding(first_plain) / 2
    assert TrainConfig(group_by_length=True).group_by_length is True
    with pytest.raises(DeltatuneError, match="group_by_length"):
        TrainConfig(group_by_length="yes")
