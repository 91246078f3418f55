"""The ``deltatune`` command: train, merge, generate, info, demo.

Every error a person can fix is one line on stderr and exit status 1 — never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

from deltatune.errors import DeltatuneError

def cmd_train(args: argparse.Namespace) -> None:
    from deltatune.config import build_run, merge_settings, parse_overrides, read_yaml
    from deltatune.runner import run_training

    flags = {"model": args.model, "data": args.data, "eval_data": args.eval_data, "method": args.method,
             "output": args.output, "max_steps": args.max_steps}
    run = build_run(merge_settings(read_yaml(args.config) if args.config else {},
                                   {k: v for k, v in flags.items() if v is not None},
                                   parse_overrides(args.overrides)))
    result = run_training(run, resume=args.resume, progress=not args.quiet, overwrite=args.overwrite)
    summary = {"output": run.output, "steps": result.step, "train_loss": round(result.train_loss, 4),
               "eval_loss": round(result.eval_losses[-1][1], 4) if result.eval_losses else None,
               "tokens_per_s": round(result.tokens_per_s)}
    print(json.dumps(summary))


def cmd_merge(args: argparse.Namespace) -> None:
    import deltatune as dt
    from deltatune.atomic import check_output_folder, files_into
    from deltatune.pretrained import load_causal_lm, load_tokenizer

    check_output_folder(args.output, overwrite=args.overwrite, reads=(args.model, args.adapter))
    model = dt.load_adapter(load_causal_lm(args.model, args.dtype, args.trust_remote_code), args.adapter)
    merged = dt.merge(model)
    with files_into(args.output) as staging:
        merged.save_pretrained(staging)
        load_tokenizer(args.model, args.trust_remote_code).save_pretrained(staging)
    print(f"merged model written to {args.output}")


def cmd_generate(args: argparse.Namespace) -> None:
    import deltatune as dt
    from deltatune.generation import generate_text
    from deltatune.pretrained import load_causal_lm, load_tokenizer

    model = load_causal_lm(args.model, args.dtype, args.trust_remote_code)
    if args.adapter:
        model = dt.load_adapter(model, args.adapter)
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    prompt = args.prompt.encode("utf-8").decode("unicode_escape") if args.escapes else args.prompt
    [text] = generate_text(model, tokenizer, [prompt], max_new_tokens=args.max_new_tokens,
                           do_sample=args.temperature > 0, temperature=args.temperature or 1.0)
    print(prompt + text)


INFO_KEYS = {  # peft config keys worth showing, in order, for whichever method wrote them
    "r": "rank", "lora_alpha": "alpha", "target_modules": "targets", "use_rslora": "rsLoRA",
    "num_virtual_tokens": "virtual tokens", "prefix_projection": "prefix MLP", "encoder_reparameterization_type":
    "prompt encoder", "num_layers": "layers", "modules_to_save": "trained in full",
    "deltatune_template": "template", "deltatune_verbalizer": "verbalizer",
    "deltatune_encoder_prefix": "encoder prefix", "deltatune_cross_prefix": "cross-attention prefix",
}


def cmd_info(args: argparse.Namespace) -> None:
    from deltatune.peft_format import TRAINING_STATE_NAME, read_adapter_folder, read_method_description
    from deltatune.runner import RUN_RECORD

    folder = Path(args.adapter)
    described = read_method_description(args.adapter) or {}
    if described and not (folder / "adapter_config.json").exists() and (folder / "config.json").is_file():
        _model_folder_info(folder, described)  # full or freeze tuning: a whole model folder
        return
    config, tensors = read_adapter_folder(args.adapter)
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
    from safetensors import safe_open

    from deltatune.runner import RUN_RECORD

    shards = sorted(folder.glob("model*.safetensors"))
    count = 0
    for shard in shards:
        with safe_open(str(shard), framework="pt") as weights:
            count += sum(math.prod(weights.get_slice(key).get_shape()) for key in weights.keys())
    rows = {"method": f"{described['method']} (a whole model folder: load it with from_pretrained)",
            "settings": json.dumps(described.get("settings", {})), "parameters": f"{count:,}",
            "loads in peft": "no: peft has no format for a whole fine-tuned model"}
    if (folder / RUN_RECORD).is_file():
        rows["trained with"] = str(folder / RUN_RECORD)
    width = max(len(k) for k in rows)
    for key, value in rows.items():
        print(f"{key:<{width}}  {value}")


def cmd_demo(args: argparse.Namespace) -> None:
    from deltatune.demo import run_demo

    run_demo(output=args.output, max_steps=args.max_steps, progress=not args.quiet)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltatune", description="Adapt a pretrained transformer by learning a small delta.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train an adapter; the output folder is a peft adapter",
                                description="Settings: --config YAML, then flags, then key=value overrides "
                                            "(e.g. rank=16 learning_rate=1e-3 targets=[q_proj,v_proj]).")
    train.add_argument("--model", help="local Hugging Face model folder")
    train.add_argument("--data", help="JSONL (prompt/completion or text) or an Alpaca JSON array")
    train.add_argument("--eval-data", dest="eval_data", help="held-out data (default: a seeded split of --data)")
    train.add_argument("--method", help="tuning method (default: lora)")
    train.add_argument("--output", help="output folder: adapter, run config, metrics, checkpoints")
    train.add_argument("--max-steps", dest="max_steps", type=int)
    train.add_argument("--config", help="YAML file of settings")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    train.add_argument("--overwrite", action="store_true",
                       help="write into an --output that holds files, replacing deltatune's own (others are kept)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument("overrides", nargs="*", metavar="key=value")
    train.set_defaults(func=cmd_train)

    merge = commands.add_parser("merge", help="fold an adapter into the base weights; writes a plain model folder")
    merge.add_argument("--model", required=True)
    merge.add_argument("--adapter", required=True)
    merge.add_argument("--output", required=True)
    merge.add_argument("--overwrite", action="store_true",
                       help="write into an --output that holds files, replacing same-named files (others are kept)")
    merge.set_defaults(func=cmd_merge)

    generate = commands.add_parser("generate", help="generate text, greedy by default")
    generate.add_argument("--model", required=True)
    generate.add_argument("--adapter")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    generate.add_argument("--escapes", action="store_true", help="read \\n and \\t in --prompt as escapes")
    generate.set_defaults(func=cmd_generate)

    for sub in (merge, generate):
        sub.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto")
        sub.add_argument("--trust-remote-code", dest="trust_remote_code", action="store_true",
                         help="run the model folder's own Python code (only for folders you trust)")

    info = commands.add_parser("info", help="method, rank, targets, size and base model of an adapter")
    info.add_argument("adapter")
    info.set_defaults(func=cmd_info)

    demo = commands.add_parser("demo", help="the main job on bundled defaults: LoRA on E2E with stories260K")
    demo.add_argument("--output", default="runs/demo")
    demo.add_argument("--max-steps", dest="max_steps", type=int, default=300)
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecation notices are not the user's concern
    try:
        args.func(args)
    except DeltatuneError as error:
        print(f"deltatune: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("deltatune: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
