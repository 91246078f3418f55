"""Score a model on data: accuracy and macro F1, corpus BLEU and ROUGE-L, loss and perplexity.

Which metrics apply follows the task:

- ``classification``: a causal LM picks, for each prompt, the label whose completion it finds
  most likely: score(label) = Σ log p(token | prompt, earlier tokens) over the label's tokens and
  EOS (the completion exactly as training lays it out). → ``accuracy`` and ``f1`` (macro), both
  in [0, 1]. ``classification_metrics`` takes any labels (ints from a classifier head too).
- ``generation``: greedy continuations (left-padded batches) are compared with the completions.
  Examples that share a prompt are one item with several references (E2E: one meaning
  representation, many texts). → ``bleu`` (sacrebleu corpus BLEU, references of unequal number
  padded with None as sacrebleu allows) and ``rouge_l`` (rouge-score ROUGE-L F-measure against
  the best-scoring reference of each item, averaged over items), both in [0, 100]. Chinese
  references are scored by characters: sacrebleu's ``zh`` tokenizer, and ROUGE-L over characters
  (rouge-score's default tokenizer drops every non-ASCII character).
- every task: ``loss`` (mean cross-entropy per completion token, token-weighted over the whole
  set, as the training loop's held-out loss) and ``perplexity`` = exp(loss).

``evaluate`` returns one flat dict of these keys plus ``examples`` (records scored). The
lower-level functions take plain lists, so another module (``compare``, a classifier's
evaluation) can call them on its own predictions. Models of the other tasks
(``deltatune.pretrained.TASKS``) have their own entry points on their own records
(``deltatune.task_data``): ``evaluate_classifier`` (a classification head: accuracy and macro F1)
and ``evaluate_seq2seq`` (an encoder–decoder: BLEU, ROUGE-L, and loss on the target tokens).
"""

from __future__ import annotations

import math
from typing import Any, Hashable, Sequence

import torch
from torch import nn

from deltatune.data import IGNORE_INDEX, Example, collate, prompt_ids, tokenize_examples
from deltatune.errors import DeltatuneError
from deltatune.generation import generate_ids, prompt_encoder
from deltatune.pretrained import pad_token_id

TASKS = ("classification", "generation", "lm")
METRIC_KEYS = ("accuracy", "f1", "bleu", "rouge_l", "loss", "perplexity", "examples")
CHINESE_SHARE = 1 / 3  # references are "Chinese" when at least this share of their characters are CJK


# --- metrics on plain lists --------------------------------------------------------------------


def classification_metrics(predicted: Sequence[Hashable], gold: Sequence[Hashable]) -> dict[str, float]:
    """Accuracy and macro F1 (both in [0, 1]) of predicted against gold labels.

    Macro F1 is the unweighted mean over every label seen in ``gold`` or ``predicted`` of
    F1 = 2·TP / (2·TP + FP + FN), a label's F1 being 0 when it has no TP, FP or FN to speak of
    (scikit-learn's ``f1_score(average="macro")``, which is not a dependency here).
    """
    if len(predicted) != len(gold) or not gold:
        raise DeltatuneError(f"classification metrics need as many predictions as gold labels (at least one), got "
                             f"{len(predicted)} and {len(gold)}: pass one prediction per example")
    scores = []
    for label in sorted(set(gold) | set(predicted), key=repr):
        tp = sum(p == label and g == label for p, g in zip(predicted, gold))
        fp = sum(p == label and g != label for p, g in zip(predicted, gold))
        fn = sum(p != label and g == label for p, g in zip(predicted, gold))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    accuracy = sum(p == g for p, g in zip(predicted, gold)) / len(gold)
    return {"accuracy": accuracy, "f1": sum(scores) / len(scores)}


def is_chinese(texts: Sequence[str]) -> bool:
    """Whether at least a third of the non-space characters of ``texts`` are CJK ideographs."""
    characters = [c for text in texts for c in text if not c.isspace()]
    cjk = sum("\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf" for c in characters)
    return bool(characters) and cjk >= CHINESE_SHARE * len(characters)


class _Characters:
    """rouge-score tokenizer: every non-space character is a token (for Chinese)."""

    def tokenize(self, text: str) -> list[str]:
        return [c for c in text if not c.isspace()]


def generation_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
                       chinese: bool | None = None) -> dict[str, float]:
    """Corpus BLEU and ROUGE-L (both in [0, 100]) of ``hypotheses[i]`` against ``references[i]``.

    BLEU is sacrebleu's ``corpus_bleu`` with every item's references (items with fewer are
    padded with None, which sacrebleu skips); ROUGE-L is rouge-score's F-measure against the
    reference that scores best (``RougeScorer.score_multi``), averaged over items. ``chinese``
    (default: ``is_chinese`` of the references) scores by characters: sacrebleu ``tokenize="zh"``
    and ROUGE-L over characters; otherwise BLEU uses sacrebleu's ``13a`` and ROUGE-L
    rouge-score's default tokenizer (lower-cased ASCII words).
    """
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(hypotheses) != len(references) or not hypotheses or not all(references):
        raise DeltatuneError(f"generation metrics need one list of at least one reference per hypothesis, got "
                             f"{len(hypotheses)} hypotheses and {len(references)} reference lists: pass them paired")
    if chinese is None:
        chinese = is_chinese([text for refs in references for text in refs])
    widest = max(len(refs) for refs in references)
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(widest)]
    bleu = sacrebleu.corpus_bleu(list(hypotheses), streams, tokenize="zh" if chinese else "13a").score
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Characters() if chinese else None)
    rouge = [scorer.score_multi(list(refs), hypothesis)["rougeL"].fmeasure
             for hypothesis, refs in zip(hypotheses, references)]
    return {"bleu": bleu, "rouge_l": 100 * sum(rouge) / len(rouge)}


# --- model scoring -----------------------------------------------------------------------------


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _token_log_likelihoods(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each label token given the tokens before it, which positions count), both (batch, length-1)."""
    device = _device(model)
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    targets = batch["labels"][:, 1:].to(device)
    counted = targets != IGNORE_INDEX
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * counted, counted


@torch.no_grad()
def lm_loss(model: nn.Module, tokenized_examples: Sequence[dict[str, list[int]]], *, pad_token_id: int,
            batch_size: int = 8) -> dict[str, float]:
    """Mean cross-entropy per labelled token over all examples (token-weighted) and its exp.

    ``tokenized_examples`` are ``data.tokenize_examples`` items: only tokens with a label
    (the completions; a chat's assistant turns) count.
    """
    if not tokenized_examples:
        raise DeltatuneError("there are no examples to score: add data, or raise max_length so some fit")
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(tokenized_examples), batch_size):
        batch = collate(tokenized_examples[start:start + batch_size], pad_token_id)
        picked, counted = _token_log_likelihoods(model, batch)
        total -= float(picked.sum())
        count += int(counted.sum())
    loss = total / max(1, count)
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 709 else math.inf}


@torch.no_grad()
def label_scores(model: nn.Module, prompts: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]], *,
                 pad_token_id: int, batch_size: int = 8) -> torch.Tensor:
    """(prompts, candidates) log-likelihoods: Σ log p(candidate token | prompt, earlier tokens)."""
    model.eval()
    pairs = [(list(p), list(c)) for p in prompts for c in candidates]
    scores = []
    for start in range(0, len(pairs), batch_size):
        items = [{"input_ids": p + c, "labels": [IGNORE_INDEX] * len(p) + c} for p, c in pairs[start:start + batch_size]]
        picked, _ = _token_log_likelihoods(model, collate(items, pad_token_id))
        scores.append(picked.sum(-1).cpu())
    return torch.cat(scores).view(len(prompts), len(candidates))


def predict_label_words(model: nn.Module, tokenizer: Any, examples: Sequence[Example], labels: Sequence[str], *,
                   batch_size: int = 8) -> list[str]:
    """For each example, the label whose completion (as written in the data, plus EOS) is most likely."""
    encode = prompt_encoder(model, tokenizer)
    forms = {label: next((e.completion for e in examples if e.completion.strip() == label), label) for label in labels}
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    candidates = [tokenizer(forms[label], add_special_tokens=False)["input_ids"] + eos for label in labels]
    prompts = [prompt_ids(example, tokenizer, encode) for example in examples]
    scores = label_scores(model, prompts, candidates, pad_token_id=pad_token_id(tokenizer), batch_size=batch_size)
    return [labels[int(best)] for best in scores.argmax(-1)]


def generate_for_examples(model: nn.Module, tokenizer: Any, examples: Sequence[Example], *,
                          max_new_tokens: int = 64, batch_size: int = 16, do_sample: bool = False,
                          temperature: float = 1.0) -> tuple[list[str], list[list[str]]]:
    """(one generation per distinct prompt, that prompt's references), in order of first appearance."""
    encode = prompt_encoder(model, tokenizer)
    groups: dict[tuple[int, ...], list[str]] = {}
    for example in examples:
        groups.setdefault(tuple(prompt_ids(example, tokenizer, encode)), []).append(example.completion.strip())
    new_ids = generate_ids(model, list(groups), pad_token_id=pad_token_id(tokenizer),
                           eos_token_id=tokenizer.eos_token_id, max_new_tokens=max_new_tokens,
                           batch_size=batch_size, do_sample=do_sample, temperature=temperature)
    hypotheses = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in new_ids]
    return hypotheses, list(groups.values())


def infer_task(examples: Sequence[Example], labels: Sequence[str] | None = None) -> str:
    """``classification`` with labels; ``lm`` when no example has a prompt (plain text); else ``generation``."""
    if labels:
        return "classification"
    if all(not e.prompt and e.messages is None for e in examples):
        return "lm"
    return "generation"


def evaluate(model: nn.Module, tokenizer: Any, examples: Sequence[Example], *, task: str | None = None,
             labels: Sequence[str] | None = None, max_new_tokens: int = 64, batch_size: int = 8,
             max_length: int = 1024, do_sample: bool = False, temperature: float = 1.0,
             chinese: bool | None = None) -> dict[str, float | int]:
    """Score ``model`` on ``examples`` (``data.load_examples``); see the module docstring.

    ``task`` is ``classification`` (needs ``labels``: the completion of each example is its
    label), ``generation`` or ``lm``; by default ``infer_task``. Every task adds ``loss`` and
    ``perplexity``; the result has ``examples`` and the task's keys from ``METRIC_KEYS``.
    ``max_length`` cuts long examples for the loss (from the right, as training does).
    """
    task = task or infer_task(examples, labels)
    if task not in TASKS:
        raise DeltatuneError(f"Unknown evaluation task {task!r}; use one of {', '.join(TASKS)}.")
    if not examples:
        raise DeltatuneError("there are no examples to evaluate: add data")
    metrics: dict[str, float | int] = {"examples": len(examples)}
    if task == "classification":
        if not labels or len(set(labels)) < 2:
            raise DeltatuneError(f"classification needs at least two distinct labels, got {labels!r}: pass "
                                 f"--labels like positive,negative")
        gold = [example.completion.strip() for example in examples]
        for number, value in enumerate(gold, 1):
            if value not in labels:
                raise DeltatuneError(f"example {number} has completion {value!r}, which is not one of the labels "
                                     f"{', '.join(labels)}: add it to --labels or fix that example")
        predicted = predict_label_words(model, tokenizer, examples, labels, batch_size=batch_size)
        metrics.update(classification_metrics(predicted, gold))
    elif task == "generation":
        hypotheses, references = generate_for_examples(
            model, tokenizer, examples, max_new_tokens=max_new_tokens, batch_size=batch_size,
            do_sample=do_sample, temperature=temperature)
        metrics.update(generation_metrics(hypotheses, references, chinese=chinese))
    tokenized = tokenize_examples(examples, tokenizer, max_length, prompt_encoder(model, tokenizer))
    metrics.update(lm_loss(model, tokenized, pad_token_id=pad_token_id(tokenizer), batch_size=batch_size))
    return {key: metrics[key] for key in METRIC_KEYS if key in metrics}


# --- the other tasks: a classification head, an encoder-decoder ------------------------------


def evaluate_classifier(model: nn.Module, tokenizer: Any, records: Sequence[Any], labels: Sequence[Any], *,
                        batch_size: int = 32, max_length: int = 512) -> dict[str, float | int]:
    """Accuracy and macro F1 of a classification head on labelled ``task_data.ClassificationRecord`` s;
    ``labels`` is the head's label list (class ``i`` is ``labels[i]``)."""
    from deltatune.predict import predict_labels

    unlabelled = next((record for record in records if record.label is None), None)
    if unlabelled is not None:
        raise DeltatuneError(f"{unlabelled.where or 'a record'} has no label to score against: give every record "
                             f"its label")
    if not records:
        raise DeltatuneError("there are no examples to evaluate: add data")
    rows = predict_labels(model, tokenizer, records, labels, batch_size=batch_size, max_length=max_length)
    metrics = classification_metrics([str(row["label"]) for row in rows], [str(record.label) for record in records])
    return {**metrics, "examples": len(records)}


@torch.no_grad()
def evaluate_seq2seq(model: nn.Module, tokenizer: Any, records: Sequence[Any], *, max_new_tokens: int = 64,
                     batch_size: int = 8, max_length: int = 1024, do_sample: bool = False, temperature: float = 1.0,
                     chinese: bool | None = None) -> dict[str, float | int]:
    """BLEU and ROUGE-L of an encoder–decoder's outputs (records sharing a source are one item with
    several references), and its loss and perplexity on the target tokens (token-weighted)."""
    from deltatune.predict import generate_seq2seq
    from deltatune.task_data import collate_seq2seq, tokenize_seq2seq

    if not records:
        raise DeltatuneError("there are no examples to evaluate: add data")
    groups: dict[str, list[str]] = {}
    for record in records:
        groups.setdefault(record.source, []).append(record.target.strip())
    sources = list(groups)
    hypotheses = [text.strip() for text in generate_seq2seq(model, tokenizer, sources, max_new_tokens=max_new_tokens,
                                                            do_sample=do_sample, temperature=temperature,
                                                            batch_size=batch_size)]
    metrics: dict[str, float | int] = dict(generation_metrics(hypotheses, list(groups.values()), chinese=chinese))
    items = tokenize_seq2seq(records, tokenizer, max_length)
    device, total, count = _device(model), 0.0, 0
    for start in range(0, len(items), batch_size):
        batch = {key: value.to(device) for key, value in collate_seq2seq(items[start:start + batch_size],
                                                                         pad_token_id(tokenizer)).items()}
        logits = model(**batch).logits  # the decoder's logits line up with the labels (no shift)
        total += float(torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), batch["labels"],
                                                         ignore_index=IGNORE_INDEX, reduction="sum"))
        count += int((batch["labels"] != IGNORE_INDEX).sum())
    loss = total / max(1, count)
    metrics.update(loss=loss, perplexity=math.exp(loss) if loss < 709 else math.inf, examples=len(records))
    return {key: metrics[key] for key in METRIC_KEYS if key in metrics}
