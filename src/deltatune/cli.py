"""The ``deltatune`` command: train, merge, generate, info, demo.

Every error a person can fix is one line on stderr and exit status 1 — never a traceback.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from deltatune.errors import DeltatuneError
from deltatune.validation import require_writable_path

if TYPE_CHECKING:
    from deltatune.peft_format import AdapterFiles

def cmd_train(args: argparse.Namespace) -> None:
    from deltatune.config import build_run, merge_settings, parse_overrides, read_yaml
    from deltatune.distributed import is_main_process, launch
    from deltatune.runner import run_training

    flags = {"model": args.model, "data": args.data, "eval_data": args.eval_data, "method": args.method,
             "output": args.output, "max_steps": args.max_steps, "task": args.task}
    run = build_run(merge_settings(read_yaml(args.config) if args.config else {},
                                   {k: v for k, v in flags.items() if v is not None},
                                   parse_overrides(args.overrides)))
    require_writable_path("--output", run.output, folder=True)
    if args.nproc is not None:  # settings checked once, here; then torchrun runs this command again in N processes
        status = launch(args.nproc, args.argv)
        if status:
            raise DeltatuneError(f"the {args.nproc} training processes stopped with exit status {status}; the first "
                                 "error above says why")
        return
    result = run_training(run, resume=args.resume, progress=not args.quiet, overwrite=args.overwrite)
    finite = math.isfinite(result.train_loss)  # nan when --resume found the run already finished
    summary = {"output": run.output, "steps": result.step, "train_loss": round(result.train_loss, 4) if finite else None,
               "eval_loss": round(result.eval_losses[-1][1], 4) if result.eval_losses else None,
               "tokens_per_s": round(result.tokens_per_s)}
    if is_main_process():
        print(json.dumps(summary))


def cmd_merge(args: argparse.Namespace) -> None:
    from deltatune.atomic import check_output_folder, files_into
    from deltatune.merge_report import merge_with_report, prompt_ids
    from deltatune.nf4_model import save_model_folder
    from deltatune.pretrained import load_trained, write_labels

    check_output_folder(args.output, overwrite=args.overwrite, reads=(args.model, args.adapter))
    require_writable_path("--output", args.output, folder=True)
    model, tokenizer, task, labels = load_trained(args.model, args.adapter, args.dtype, args.trust_remote_code,
                                                  allow_pickle=args.allow_pickle)
    load_base = lambda: load_trained(args.model, None, args.dtype, args.trust_remote_code, task=task,
                                     allow_pickle=args.allow_pickle)[0]
    merged, report = merge_with_report(model, args.adapter, load_base, prompt_ids(tokenizer),  # dt.merge, measured
                                       requantize=args.requantize)
    with files_into(args.output) as staging:
        save_model_folder(merged, staging, replacing=args.output)  # plain safetensors, or NF4 with --requantize
        tokenizer.save_pretrained(staging)
        if labels is not None:
            write_labels(staging, labels)
    print(f"merged model written to {args.output}")
    for difference in report:
        print(difference.line())


def cmd_generate(args: argparse.Namespace) -> None:
    from deltatune.generation import generate_text
    from deltatune.predict import generate_seq2seq
    from deltatune.pretrained import load_trained

    prompt = _prompt_text(args.prompt, args.escapes)
    _check_sampling(args)
    model, tokenizer, task, _ = load_trained(args.model, args.adapter, args.dtype, args.trust_remote_code,
                                             allow_pickle=args.allow_pickle)
    if task == "classification":
        raise DeltatuneError(f"{args.adapter or args.model} is a classifier, which generates no text; "
                             "use deltatune predict --data FILE --output FILE.jsonl instead.")
    sampling = {"max_new_tokens": args.max_new_tokens, "do_sample": args.temperature > 0,
                "temperature": args.temperature or 1.0}
    if task == "seq2seq":  # the decoder writes a new text: print it alone
        if args.chat:
            raise DeltatuneError(f"{args.adapter or args.model} is an encoder-decoder, which has no chat template; "
                                 "leave out --chat.")
        print(generate_seq2seq(model, tokenizer, [prompt], **sampling)[0])
        return
    if args.chat:  # the prompt is the user's turn; the reply is printed alone
        from deltatune.data import Example
        from deltatune.predict import predict_texts

        turn = Example(prompt="", completion="", messages=(("user", prompt), ("assistant", "")))
        print(predict_texts(model, tokenizer, [(turn, None)], **sampling)[0]["prediction"])
        return
    [text] = generate_text(model, tokenizer, [prompt], **sampling)
    print(prompt + text)


def cmd_predict(args: argparse.Namespace) -> None:
    import torch

    from deltatune.predict import write_jsonl
    from deltatune.pretrained import load_trained

    require_writable_path("--output", args.output)
    _at_least("--batch-size", args.batch_size, 1)
    if args.max_length is not None:
        _at_least("--max-length", args.max_length, 1)
    if args.limit is not None:
        _at_least("--limit", args.limit, 1)
    _check_sampling(args)
    _check_seed(args.seed)
    model, tokenizer, task, labels = load_trained(args.model, args.adapter, args.dtype, args.trust_remote_code,
                                                  allow_pickle=args.allow_pickle)
    torch.manual_seed(args.seed)  # sampling (--temperature > 0) repeats run to run
    if task == "classification":
        rows, summary = _predict_labels(args, model, tokenizer, labels)
    else:
        rows, summary = _predict_texts(args, model, tokenizer, task)
    write_jsonl(rows, args.output)
    print(json.dumps({"output": args.output, "examples": len(rows), **summary}, ensure_ascii=False))


def _predict_labels(args: argparse.Namespace, model: Any, tokenizer: Any, labels: Any) -> tuple[list, dict]:
    """``deltatune predict`` for a classifier: the label and every label's probability, per record."""
    from deltatune.predict import accuracy, predict_labels, trained_settings
    from deltatune.task_data import iter_classification_records

    trained = trained_settings(args.adapter or args.model)  # columns and max_length default to the run's own
    columns = {key: getattr(args, key) or trained.get(key) for key in ("text_column", "text_pair_column")}
    records = list(itertools.islice(iter_classification_records(  # the file is read up to --limit only
        args.data, **columns, label_column=args.label_column or trained.get("label_column"),
        require_labels=args.label_column is not None,  # else labels, when present, give accuracy
        columns=_columns(args.columns) or trained.get("columns")), args.limit))
    max_length = args.max_length or trained.get("train", {}).get("max_length") or 512
    rows = predict_labels(model, tokenizer, records, labels, batch_size=args.batch_size, max_length=max_length)
    share = accuracy(rows)
    return rows, {"accuracy": None if share is None else round(share, 4)}


def _predict_texts(args: argparse.Namespace, model: Any, tokenizer: Any, task: str) -> tuple[list, dict]:
    """``deltatune predict`` for a decoder or an encoder-decoder: one generation per prompt (source)."""
    from deltatune.data import load_prompts
    from deltatune.predict import predict_seq2seq, predict_texts
    from deltatune.task_data import iter_seq2seq_records

    sampling = {"max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
                "do_sample": args.temperature > 0, "temperature": args.temperature or 1.0}
    if task == "seq2seq":
        records = list(itertools.islice(iter_seq2seq_records(args.data, _columns(args.columns), require_targets=False),
                                        args.limit))
        return predict_seq2seq(model, tokenizer, records, **sampling), {}
    if Path(args.data).suffix.lower() in (".tsv", ".csv"):
        raise DeltatuneError(f"{args.adapter or args.model} is a {task} model: predict continues the prompts of a "
                             f"JSONL or JSON file ({{\"prompt\": ...}} per line), and {args.data} is a table; to "
                             "predict labels, train a classifier (task=classification)")
    return predict_texts(model, tokenizer, load_prompts(args.data, args.limit), **sampling), {}


def cmd_eval(args: argparse.Namespace) -> None:
    import torch

    from deltatune.data import load_examples
    from deltatune.evaluation import evaluate, infer_task, is_chinese
    from deltatune.pretrained import load_trained

    _check_sampling(args)
    _at_least("--batch-size", args.batch_size, 1)
    _check_seed(args.seed)
    if args.json:
        require_writable_path("--json", args.json)
    model, tokenizer, task, head_labels = load_trained(args.model, args.adapter, args.dtype, args.trust_remote_code,
                                                       allow_pickle=args.allow_pickle)
    if task in ("classification", "seq2seq"):
        _eval_task_model(args, model, tokenizer, task, head_labels)
        return
    examples = load_examples(args.data, limit=args.limit)
    labels = [label.strip() for label in args.labels.split(",") if label.strip()] if args.labels else None
    eval_task = args.task or infer_task(examples, labels)
    chinese = eval_task == "generation" and is_chinese([example.completion for example in examples])
    torch.manual_seed(args.seed)  # sampling (--temperature > 0) repeats run to run
    with warnings.catch_warnings(record=True) as caught:  # e.g. how many examples max_length cut
        warnings.simplefilter("always", UserWarning)
        metrics = evaluate(model, tokenizer, examples, task=eval_task, labels=labels,
                           max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, max_length=args.max_length,
                           do_sample=args.temperature > 0, temperature=args.temperature or 1.0, chinese=chinese)
    for warning in caught:
        if issubclass(warning.category, UserWarning) and not issubclass(warning.category, FutureWarning):
            print(f"deltatune: warning: {warning.message}", file=sys.stderr)
    notes = {"accuracy": "label with the highest log-likelihood after the prompt", "f1": "macro over the labels",
             "bleu": "sacrebleu corpus BLEU, tokenize=" + ("zh: Chinese, by characters" if chinese else "13a"),
             "rouge_l": "rouge-score ROUGE-L F, best reference per prompt" + (
                 ", over characters (Chinese)" if chinese else ""),
             "loss": "mean cross-entropy per completion token", "perplexity": "exp(loss)",
             "examples": f"records in {args.data}" + (f", {len({e.prompt for e in examples})} distinct prompts"
                                                      if eval_task == "generation" and not any(
                                                          e.messages for e in examples) else "")}
    _show_metrics(metrics, notes, args.json)


def _prompt_text(prompt: str, escapes: bool) -> str:
    """--prompt as text; with --escapes, \\n, \\t, \\xHH and \\uXXXX read as the characters they name
    (every other character, é or 中 alike, stays as it is)."""
    if escapes:
        try:
            prompt = prompt.encode("latin-1", "backslashreplace").decode("unicode_escape")
        except UnicodeDecodeError as error:
            raise DeltatuneError(f"--prompt has a broken escape at position {error.start} ({error.reason}); write \\\\ "
                                 "for a backslash, or leave out --escapes.") from None
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as error:
        raise DeltatuneError(f"--prompt holds {prompt[error.start]!r} at position {error.start}, which is not a "
                             "character (bytes the terminal could not decode); pass UTF-8 text.") from None
    return prompt


def _check_sampling(args: argparse.Namespace) -> None:
    """--max-new-tokens and --temperature, checked before a model is loaded."""
    _at_least("--max-new-tokens", args.max_new_tokens, 1)
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise DeltatuneError(f"--temperature must be a finite number of at least 0 (0 is greedy), got "
                             f"{args.temperature}: pass e.g. --temperature 0.7")


def _check_seed(seed: int) -> None:
    if not 0 <= seed < 2**63:
        raise DeltatuneError(f"--seed must be a whole number from 0 to 2**63 - 1, got {seed}: pass e.g. --seed 0")


def _at_least(flag: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise DeltatuneError(f"{flag} must be at least {minimum}, got {value}: pass e.g. {flag} {max(minimum, 8)}")


def _columns(value: str | None) -> tuple[str, ...] | None:
    """``--columns text,label``: the names of a headerless table's columns."""
    from deltatune.config import table_columns

    return table_columns(value)


def _eval_task_model(args: argparse.Namespace, model: Any, tokenizer: Any, task: str, head_labels: Any) -> None:
    """``deltatune eval`` for a classification head or an encoder-decoder, on that task's records."""
    from deltatune.data import require_limit
    from deltatune.evaluation import evaluate_classifier, evaluate_seq2seq, is_chinese
    from deltatune.task_data import load_classification_records, load_seq2seq_records

    require_limit(args.limit)
    if task == "classification":
        records = load_classification_records(args.data, columns=_columns(args.columns))[:args.limit]
        metrics = evaluate_classifier(model, tokenizer, records, head_labels, batch_size=args.batch_size,
                                      max_length=args.max_length)
        notes = {"accuracy": "the classification head's most probable label", "f1": "macro over the labels",
                 "examples": f"records in {args.data}"}
    else:
        records = load_seq2seq_records(args.data, _columns(args.columns))[:args.limit]
        chinese = is_chinese([record.target for record in records])
        metrics = evaluate_seq2seq(model, tokenizer, records, max_new_tokens=args.max_new_tokens,
                                   batch_size=args.batch_size, max_length=args.max_length,
                                   do_sample=args.temperature > 0, temperature=args.temperature or 1.0, chinese=chinese)
        notes = {"bleu": "sacrebleu corpus BLEU, tokenize=" + ("zh: Chinese, by characters" if chinese else "13a"),
                 "rouge_l": "rouge-score ROUGE-L F, best reference per source" + (
                     ", over characters (Chinese)" if chinese else ""),
                 "loss": "mean cross-entropy per target token", "perplexity": "exp(loss)",
                 "examples": f"records in {args.data}, {len({r.source for r in records})} distinct sources"}
    _show_metrics(metrics, notes, args.json)


def _show_metrics(metrics: dict[str, Any], notes: dict[str, str], json_path: str | None) -> None:
    from deltatune.atomic import atomic_write_text

    for key, value in metrics.items():
        shown = (f"{value:.4f}" if abs(value) < 1e6 else f"{value:.4e}") if isinstance(value, float) else str(value)
        print(f"{key:<11} {shown:>10}  {notes[key]}")
    if json_path:
        finite = {key: (value if math.isfinite(value) else None) for key, value in metrics.items()}
        atomic_write_text(json_path, json.dumps(finite, indent=2) + "\n")


INFO_KEYS = {  # peft config keys worth showing, in order, for whichever method wrote them
    "r": "rank", "lora_alpha": "alpha", "target_modules": "targets", "use_rslora": "rsLoRA",
    "num_virtual_tokens": "virtual tokens", "prefix_projection": "prefix MLP", "encoder_reparameterization_type":
    "prompt encoder", "num_layers": "layers", "modules_to_save": "trained in full",
    "deltatune_template": "template", "deltatune_verbalizer": "verbalizer",
    "deltatune_encoder_prefix": "encoder prefix", "deltatune_cross_prefix": "cross-attention prefix",
    "deltatune_quantized_base": "quantised base",
    "preset": "preset", "bottleneck_size": "bottleneck size", "reduction_factor": "reduction factor",
    "activation": "activation", "scale": "scale", "layer_norm": "inner layer norm", "layers": "adapted layers",
    "trainable_layers": "trainable layers", "modules": "named modules", "trained_modules": "trained modules",
}


def cmd_info(args: argparse.Namespace) -> None:
    from deltatune.peft_format import read_adapter, read_method_description

    folder = Path(args.adapter)
    described = read_method_description(folder) if folder.is_dir() else None
    if described and not (folder / "adapter_config.json").exists() and (folder / "config.json").is_file():
        _model_folder_info(folder, described)  # full fine-tuning: a whole model folder
        return
    read = read_adapter(folder, args.allow_pickle)  # every file checked first: info shows only what loads
    if read[0][0] is None:
        _adapter_info(read[0][1])
        return
    print(f"composition  {' + '.join(name for name, _ in read)} (active together, in this order; one adapter "
          "folder each)")
    for name, files in read:
        print(f"\n[{name}]  {files.folder}")
        _adapter_info(files)


def _adapter_info(files: AdapterFiles) -> None:
    from deltatune.peft_format import TRAINING_STATE_NAME
    from deltatune.runner import RUN_RECORD

    folder, config, tensors, described = files.folder, files.config, files.tensors, files.described or {}
    rows: dict[str, Any] = {"method": f"{config.get('peft_type')}" + (f" ({described['method']})" if described else "")}
    rows.update({label: config[key] for key, label in INFO_KEYS.items() if config.get(key) not in (None, [], {})})
    rows["parameters"] = f"{sum(t.numel() for t in tensors.values()):,}"
    rows["tensors"] = len(tensors)
    rows["base model"] = config.get("base_model_name_or_path")
    rows["task"] = config.get("task_type")
    rows["loads in peft"] = ("no: " + config["deltatune_peft_incompatible"]) if config.get(
        "deltatune_peft_incompatible") else "yes"
    if (folder / TRAINING_STATE_NAME).is_file():
        rows["training state"] = f"{TRAINING_STATE_NAME} (resume with load_adapter(..., trainable=True))"
    if (folder / RUN_RECORD).is_file():
        rows["trained with"] = str(folder / RUN_RECORD)
    width = max(len(k) for k in rows)
    for key, value in rows.items():
        if value is not None:
            print(f"{key:<{width}}  {value}")


def _model_folder_info(folder: Path, described: dict[str, Any]) -> None:
    from safetensors import SafetensorError, safe_open

    from deltatune.runner import RUN_RECORD

    shards = sorted(folder.glob("model*.safetensors"))
    count = 0
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as weights:
                count += sum(math.prod(weights.get_slice(key).get_shape()) for key in weights.keys())
        except (SafetensorError, OSError) as error:
            raise DeltatuneError(f"{shard} is not a readable safetensors file ({error}); save the model again.") from None
    rows = {"method": f"{described['method']} (a whole model folder: load it with from_pretrained)",
            "settings": json.dumps(described.get("settings", {})), "parameters": f"{count:,}",
            "loads in peft": "no: peft has no format for a whole fine-tuned model"}
    if (folder / RUN_RECORD).is_file():
        rows["trained with"] = str(folder / RUN_RECORD)
    width = max(len(k) for k in rows)
    for key, value in rows.items():
        print(f"{key:<{width}}  {value}")


def cmd_extract(args: argparse.Namespace) -> None:
    from deltatune.extract import extract_folder

    require_writable_path("--output", args.output, folder=True)
    for line in extract_folder(args.base, args.tuned, args.output, rank=args.rank, energy=args.energy,
                               include_other=args.include_other, overwrite=args.overwrite,
                               trust_remote_code=args.trust_remote_code):
        print(line)


def cmd_compare(args: argparse.Namespace) -> None:
    from deltatune.compare import bundled_settings, compare, parse_methods, split_method_options
    from deltatune.config import merge_settings, parse_overrides, read_yaml

    _at_least("--max-new-tokens", args.max_new_tokens, 1)
    _at_least("--eval-examples", args.eval_examples, 0)
    methods = parse_methods(args.methods)
    shared, per_method = split_method_options(parse_overrides(args.overrides), methods)
    defaults = bundled_settings()
    if args.data or args.model:  # the bundled held-out file belongs to the bundled data only
        defaults.pop("eval_data")
    flags = {"model": args.model, "data": args.data, "eval_data": args.eval_data, "output": args.output,
             "max_steps": args.max_steps}
    settings = merge_settings(defaults, read_yaml(args.config) if args.config else {},
                              {k: v for k, v in flags.items() if v is not None}, shared)
    compare(settings, methods, per_method, overwrite=args.overwrite, progress=not args.quiet,
            eval_examples=args.eval_examples, max_new_tokens=args.max_new_tokens)


def cmd_demo(args: argparse.Namespace) -> None:
    from deltatune.demo import run_demo

    require_writable_path("--output", args.output, folder=True)
    run_demo(output=args.output, max_steps=args.max_steps, progress=not args.quiet)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltatune", description="Adapt a pretrained transformer by learning a small delta.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train an adapter; the output folder is a peft adapter",
                                description="Settings: --config YAML, then flags, then key=value overrides "
                                            "(e.g. rank=16 learning_rate=1e-3 targets=[q_proj,v_proj]).")
    train.add_argument("--model", help="local Hugging Face model folder, or a .gguf file")
    train.add_argument("--data", help="JSONL (prompt/completion or text) or an Alpaca JSON array")
    train.add_argument("--eval-data", dest="eval_data", help="held-out data (default: a seeded split of --data)")
    train.add_argument("--method", help="tuning method (default: lora)")
    train.add_argument("--task", help="causal-lm, classification or seq2seq (default: from the model's config, else "
                                      "causal-lm); see docs/tasks.md")
    train.add_argument("--output", help="output folder: adapter, run config, metrics, checkpoints")
    train.add_argument("--max-steps", dest="max_steps", type=int)
    train.add_argument("--config", help="YAML file of settings")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    train.add_argument("--overwrite", action="store_true",
                       help="write into an --output that holds files, replacing deltatune's own (others are kept)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument("--nproc", type=int, help="train on N processes of this machine: launches torchrun "
                                                 "(for several machines run torchrun -m deltatune train yourself); "
                                                 "docs/distributed.md")
    train.add_argument("overrides", nargs="*", metavar="key=value")
    train.set_defaults(func=cmd_train)

    merge = commands.add_parser("merge", help="fold an adapter into the base weights; writes a plain model folder")
    merge.add_argument("--model", required=True)
    merge.add_argument("--adapter", required=True)
    merge.add_argument("--output", required=True)
    merge.add_argument("--overwrite", action="store_true",
                       help="write into an --output that holds files, replacing same-named files (others are kept)")
    merge.add_argument("--requantize", action="store_true",
                       help="store the merged linear weights in NF4 again and report the error that adds; writes "
                            "deltatune's NF4 folder (deltatune loads it, transformers alone does not)")
    merge.set_defaults(func=cmd_merge)

    generate = commands.add_parser("generate", help="generate text, greedy by default")
    generate.add_argument("--model", required=True)
    generate.add_argument("--adapter")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    generate.add_argument("--escapes", action="store_true", help="read \\n and \\t in --prompt as escapes")
    generate.add_argument("--chat", action="store_true", help="send --prompt as the user's turn through the "
                          "tokenizer's chat template (a model trained on messages records) and print the reply")
    generate.set_defaults(func=cmd_generate)

    evaluation = commands.add_parser(
        "eval", help="score a model on data: accuracy/F1, BLEU/ROUGE-L, loss/perplexity",
        description="The task follows the data: --labels makes it classification (each completion is a label; the "
                    "most likely label after the prompt is the prediction); prompt/completion, E2E MR||text and "
                    "AdvertiseGen data are generation (BLEU, ROUGE-L; examples sharing a prompt are one item with "
                    "several references); plain text is scored by loss and perplexity only. A classifier (accuracy, "
                    "F1) or an encoder-decoder (BLEU, ROUGE-L, loss) reads its own task's records.")
    evaluation.add_argument("--model", required=True)
    evaluation.add_argument("--adapter")
    evaluation.add_argument("--data", required=True, help="data in any training format (JSONL, JSON array, MR||text)")
    evaluation.add_argument("--json", help="also write the metrics to this file as one JSON object")
    evaluation.add_argument("--labels", help="comma-separated label words (classification), e.g. positive,negative")
    evaluation.add_argument("--task", choices=("classification", "generation", "lm"), help="default: from the data")
    evaluation.add_argument("--limit", type=int, help="score the first N records only")
    evaluation.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=64)
    evaluation.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    evaluation.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature > 0)")
    evaluation.add_argument("--batch-size", dest="batch_size", type=int, default=16)
    evaluation.add_argument("--max-length", dest="max_length", type=int, default=1024,
                            help="tokens per example for the loss (cut from the right)")
    evaluation.add_argument("--columns", help="column names of a TSV/CSV without a header row, e.g. text,label")
    evaluation.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto")
    evaluation.add_argument("--trust-remote-code", dest="trust_remote_code", action="store_true",
                            help="run the model folder's own Python code (only for folders you trust)")
    evaluation.set_defaults(func=cmd_eval)

    predict = commands.add_parser(
        "predict", help="run a trained model over a file: a JSON line per record (a classifier's label and every "
        "label's probability, or a generation per prompt)",
        description="A classifier writes each record's label and every label's probability (and the accuracy, when "
                    "the records have labels). A decoder continues each prompt of a JSONL or JSON file, laid out as "
                    "training laid it out: prompt, Alpaca instruction/input, AdvertiseGen content, a chat ending on a "
                    "user turn, or text to continue; an encoder-decoder reads source (or prompt). A record's own "
                    "answer, where it has one, is written beside the generation as reference.")
    predict.add_argument("--model", required=True, help="the base model folder (or a trained model folder)")
    predict.add_argument("--adapter", help="the output folder of a training run")
    predict.add_argument("--data", required=True, help="a classifier: TSV, CSV or JSONL records (text, optional "
                         "text_pair, optional label); a generator: JSONL or a JSON array of prompts")
    predict.add_argument("--output", required=True, help="JSONL file to write")
    predict.add_argument("--limit", type=int, help="the first N records only")
    predict.add_argument("--text-column", dest="text_column", help="default: the run's own, else text or sentence")
    predict.add_argument("--columns", help="column names of a TSV/CSV without a header row, e.g. text,label "
                                           "(default: the run's own)")
    predict.add_argument("--text-pair-column", dest="text_pair_column")
    predict.add_argument("--label-column", dest="label_column", help="default: the run's own, else label (optional)")
    predict.add_argument("--batch-size", dest="batch_size", type=int, default=32)
    predict.add_argument("--max-length", dest="max_length", type=int,
                         help="a classifier: cut texts to this many tokens (default: the run's max_length, else 512)")
    predict.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=64,
                         help="a generator: tokens to write per prompt at most")
    predict.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    predict.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature > 0)")
    predict.set_defaults(func=cmd_predict)

    for sub in (merge, generate, predict):
        sub.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto")
        sub.add_argument("--trust-remote-code", dest="trust_remote_code", action="store_true",
                         help="run the model folder's own Python code (only for folders you trust)")

    info = commands.add_parser("info", help="method, rank, targets, size and base model of an adapter")
    info.add_argument("adapter")
    info.set_defaults(func=cmd_info)

    for sub in (merge, generate, evaluation, predict, info):
        sub.add_argument("--allow-pickle", dest="allow_pickle", action="store_true",
                         help="read weights saved as pickles (.bin), tensors only (weights_only=True); only for "
                              "files you trust — convert them to safetensors instead where you can")

    extract = commands.add_parser(
        "extract", help="turn a fine-tuned model (or a mergeable adapter) into a LoRA adapter by truncated SVD",
        description="Each changed linear weight's difference dW = U S V^T becomes B = U_r S_r^(1/2), "
                    "A = S_r^(1/2) V_r^T with alpha = r (scale 1); see docs/extract.md.")
    extract.add_argument("--base", required=True, help="the base model folder the tuned model was fine-tuned from")
    extract.add_argument("--tuned", required=True, help="a fully fine-tuned model folder, or an adapter folder of a "
                                                        "mergeable method (lora, freeze): merged onto --base first")
    keep = extract.add_mutually_exclusive_group(required=True)
    keep.add_argument("--rank", type=int, help="directions kept in every layer (fewer where a layer has fewer)")
    keep.add_argument("--energy", type=float, help="per layer, the fewest directions keeping this share of "
                                                   "the squared singular values, e.g. 0.9")
    extract.add_argument("--output", required=True, help="folder for the LoRA adapter (peft format)")
    extract.add_argument("--include-other", dest="include_other", action="store_true",
                         help="also save tensors that differ but are not linear weights (norms, embeddings, biases)")
    extract.add_argument("--overwrite", action="store_true",
                         help="write into an --output that holds files, replacing same-named files (others are kept)")
    extract.add_argument("--trust-remote-code", dest="trust_remote_code", action="store_true",
                         help="run the model folder's own Python code (only for folders you trust)")
    extract.set_defaults(func=cmd_extract)

    compare = commands.add_parser(
        "compare", help="train every method on one task and compare them: a table, results.json and report.html",
        description="With no arguments: every method on the bundled E2E data with the bundled stories260K model. "
                    "key=value settings are shared by every run (batch_size=8); method.key=value goes to one "
                    "method only (lora.rank=16, prefix.num_virtual_tokens=20).")
    compare.add_argument("--model", help="local Hugging Face model folder (default: the bundled stories260K)")
    compare.add_argument("--data", help="training data (default: the bundled E2E sample)")
    compare.add_argument("--eval-data", dest="eval_data", help="held-out data (default: a seeded split of --data)")
    compare.add_argument("--methods", help="comma-separated methods (default: every method)")
    compare.add_argument("--max-steps", dest="max_steps", type=int, help="steps per method (default 100)")
    compare.add_argument("--output", help="folder for results.json, report.html and one run folder per method")
    compare.add_argument("--eval-examples", dest="eval_examples", type=int, default=64,
                         help="held-out examples scored with the task's metric: BLEU/ROUGE-L or accuracy/F1 "
                              "(default 64; 0 skips; the held-out loss always uses them all)")
    compare.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=64,
                         help="tokens generated per held-out prompt for BLEU and ROUGE-L (default 64)")
    compare.add_argument("--config", help="YAML file of shared settings")
    compare.add_argument("--overwrite", action="store_true",
                         help="write into an --output that holds files, replacing deltatune's own (others are kept)")
    compare.add_argument("--quiet", action="store_true", help="no progress bars")
    compare.add_argument("overrides", nargs="*", metavar="key=value")
    compare.set_defaults(func=cmd_compare)

    demo = commands.add_parser("demo", help="the main job on bundled defaults: LoRA on E2E with stories260K")
    demo.add_argument("--output", default="runs/demo")
    demo.add_argument("--max-steps", dest="max_steps", type=int, default=300)
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what --nproc hands on to torchrun
    warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecation notices are not the user's concern
    try:
        args.func(args)
    except DeltatuneError as error:
        print(f"deltatune: error: {error}", file=sys.stderr)
        return getattr(error, "exit_code", 1)  # training stopped by SIGINT/SIGTERM: 130/143, as a shell's
    except KeyboardInterrupt:
        print("deltatune: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
