"""The command line: ``sftune train | preview | eval | generate | chat | export | verify | report | config | ui |
distill-prepare``.

``train`` and ``preview`` take a RECIPE (a YAML path or a built-in name) followed by ``key=value``
overrides; the after-training commands take a run directory (or any model). User errors print one
short message and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from sftune.errors import SftuneError

EPILOG = """recipes: a YAML file or a built-in name (quickstart, imdb, codealpaca, alpaca).
overrides: dotted keys, e.g. data.path=train.jsonl data.max_length=256 train.lr=1e-4 lora.enabled=true
list every key with: sftune config --keys"""


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", help="YAML recipe path or built-in name (quickstart, imdb, codealpaca, alpaca)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.max_length=256")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sftune", description="Supervised fine-tuning of causal language models, correct by construction.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    from sftune import __version__

    parser.add_argument("--version", action="version", version=f"sftune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune a model from a recipe", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Fine-tune a model. Checkpoints, metrics.jsonl and the final model go to "
                                   "train.output_dir. Ctrl-C saves a checkpoint; train.resume=true continues. "
                                   "SIGTERM saves a checkpoint and exits with status 75 (requeue); "
                                   "train.resume=auto continues when there is something to continue.")
    _add_recipe_args(p)
    p.add_argument("--trl-config", metavar="FILE", help="run a `trl sft` YAML config (TRL 1.x keys) instead")
    p.set_defaults(subparser=p)

    p = sub.add_parser("distill-prepare", help="run a distillation teacher once and save its top-k log-probabilities",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Tokenize the recipe's data as training will, run distill.teacher over it and "
                                   "write the teacher's top distill.prepare_top_k token ids and log-probabilities at "
                                   "every trained position to --out (sharded Arrow; a rerun skips finished shards; "
                                   "data.sources: one directory per source under OUT/sources; data.streaming: each "
                                   "source's first pass, keyed by file and row). "
                                   "Train with distill.saved=OUT.")
    _add_recipe_args(p)
    p.add_argument("--out", required=True, help="directory for the saved top-k rows")
    p.set_defaults(subparser=p)

    p = sub.add_parser("preview", help="show training examples as the model sees them, and a dataset report",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Show the first N training sequences with trained tokens highlighted, then "
                                   "the dataset report (kept / skipped / truncated, lengths, loss fraction).")
    _add_recipe_args(p)
    p.set_defaults(subparser=p)
    p.add_argument("-n", type=int, default=3, help="number of sequences to show (default 3)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per sequence: input_ids, labels, position_ids, text")

    p = sub.add_parser("generate", help="generate with a trained run (its prompt template is applied)",
                       description="Generate completions. MODEL_OR_RUN is a training output directory (the "
                                   "training prompt template or chat template is applied automatically), a model "
                                   "directory or a hub id.")
    p.add_argument("model", metavar="MODEL_OR_RUN")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one user message / instruction")
    src.add_argument("--file", help="JSONL rows with the training data's columns; writes JSONL with 'generated'")
    p.add_argument("--out", help="where to write the JSONL outputs of --file (default: stdout)")
    p.add_argument("--as-training-set", action="store_true",
                   help="with --file: write rows to train on (sequence-level distillation): 'messages' with the "
                        "generation as the last assistant turn for chat rows, else 'prompt' (as rendered) and "
                        "'completion'")
    _add_generation_args(p)
    p.add_argument("--batch-size", type=int, default=16, help="prompts per batch (left-padded), default 16")
    p.add_argument("--raw", action="store_true", help="send --prompt as is, without the training template")
    p.add_argument("--tools", metavar="FILE", help="JSON list of tool schemas rendered into every chat prompt")
    p.add_argument("--image", metavar="FILE", action="append",
                   help="an image shown with --prompt (vision-language models; repeat for several)")

    p = sub.add_parser("chat", help="interactive chat with a trained run (works with a pipe too)",
                       description="A multi-turn REPL for chat-format models; single-turn for prompt/completion "
                                   "models. Tokens stream as they are generated. /reset clears the history, /exit "
                                   "quits. Reads stdin, so `echo hi | sftune chat RUN` works.")
    p.add_argument("model", metavar="MODEL_OR_RUN")
    _add_generation_args(p, default_tokens=256)
    p.add_argument("--tools", metavar="FILE", help="JSON list of tool schemas rendered into the chat prompt")
    p.add_argument("--image", metavar="FILE", action="append",
                   help="an image shown with the first message (vision-language models; repeat for several)")

    p = sub.add_parser("eval", help="loss, perplexity and exact match on held-out data (optionally vs a baseline)",
                       description="Evaluate on held-out data: loss and perplexity over the completion tokens, and "
                                   "for prompt/completion or chat data exact match and a normalised contains-match "
                                   "of greedy generations. --baseline evaluates a second model on the same data "
                                   "and prompts, to show what SFT changed. Prints a table and writes JSON.")
    p.add_argument("model", metavar="MODEL_OR_RUN")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="data settings when MODEL is not a run, e.g. data.template=qa")
    p.add_argument("--data", required=True, help="held-out data: a file, directory or hub dataset id")
    p.add_argument("--split", default=None, help="split of --data (default: the run's data.split)")
    p.add_argument("--baseline", help="a second model (e.g. the base model) evaluated the same way")
    p.add_argument("--limit", type=int, default=200, help="rows used (default 200)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", help="JSON results path (default: RUN/eval.json, or ./eval.json)")

    p = sub.add_parser("export", help="merge LoRA and save a standalone Hugging Face model (or GGUF + Ollama)",
                       description="Merge a LoRA adapter into its base weights (if the run has one) and save "
                                   "safetensors, the tokenizer and its chat / prompt template, generation stops at "
                                   "the end-of-turn token and sftune_lineage.json, so "
                                   "transformers.pipeline('text-generation', OUT) and DPO / reward trainers prompt "
                                   "as trained. --format gguf also writes OUT/model-QUANT.gguf (llama.cpp) and an "
                                   "Ollama Modelfile. --verify checks the exported template against the run's own "
                                   "prompts, token by token (and the GGUF's logits).")
    p.add_argument("model", metavar="RUN")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--format", default="hf", choices=["hf", "gguf"],
                   help="hf (default): safetensors; gguf: also a GGUF file and an Ollama Modelfile")
    p.add_argument("--quant", default="f16", choices=["f16", "bf16", "q8_0"], help="GGUF weight type (default f16)")
    p.add_argument("--verify", action="store_true",
                   help="check that the exported chat template gives the token ids sftune trained with "
                        "(exit status 1 when not)")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload to the Hugging Face hub (needs network "
                                                            "and a token)")

    p = sub.add_parser("verify", help="check a run's checkpoints and final model against their digests",
                       description="Check every checkpoint of RUN_DIR and its final model against the digests "
                                   "recorded when they were written: intact or damaged (which file), and which "
                                   "checkpoint a resume would take. Exit status 1 when something is damaged.")
    p.add_argument("model", metavar="RUN_DIR")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")

    p = sub.add_parser("report", help="rebuild a run's report.md and plots",
                       description="Rebuild output_dir/report.md and its PNG plots from metrics.jsonl, "
                                   "data_report.json and final_metrics.json.")
    p.add_argument("model", metavar="RUN")

    p = sub.add_parser("config", help="print the resolved config, or every config key",
                       description="Print a recipe's resolved config as YAML, or with --keys every key with its "
                                   "default and meaning.")
    p.add_argument("recipe", nargs="?", help="YAML recipe path or built-in name")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--keys", action="store_true", help="list every config key with its default and description")

    p = sub.add_parser("ui", help="a local web dashboard: runs, live charts, compare, data preview, chat",
                       description="Serve a dashboard over the runs under RUNS_DIR (default: runs) on 127.0.0.1. "
                                   "--host exposes it to other machines, always behind a token. Needs "
                                   "pip install 'sftune[ui]'.")
    p.add_argument("runs_dir", nargs="?", default="runs", metavar="RUNS_DIR")
    p.add_argument("--port", type=int, default=None, help="port (default 7860, or a free one)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: this machine "
                                                       "only); any other host requires a token")
    p.add_argument("--token", default=os.environ.get("SFTUNE_UI_TOKEN"),
                   help="access token (default $SFTUNE_UI_TOKEN; generated when --host is not local)")
    return parser


def _add_generation_args(p: argparse.ArgumentParser, default_tokens: int = 128) -> None:
    p.add_argument("--max-new-tokens", type=int, default=default_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)


def cmd_generate(args) -> int:
    from sftune.data.formats import BadRow
    from sftune.data.sources import read_json_rows
    from sftune.errors import DataError, RowSkip
    from pathlib import Path

    from sftune.inference import load_for_inference
    from sftune.console import out
    from sftune.vision_inference import with_images

    loaded = load_for_inference(args.model)
    loaded.use_tools(args.tools)
    images = image_args(args, loaded)
    if args.prompt is not None:
        text = with_images(args.prompt, len(images[0])) if images else args.prompt
        prompts = [text if args.raw else loaded.prompt_from_text(text)]
        rows = None
    else:
        rows = read_json_rows(args.file)
        prompts, images = [], []
        for i, r in enumerate(rows):
            try:
                prompt, shown = loaded.prompt_and_images(r, Path(args.file).parent)
            except (RowSkip, BadRow, DataError) as e:
                reason = getattr(e, "reason", None) or getattr(e, "message", None) or str(e)
                raise DataError(f"cannot build a prompt: {reason}", source=args.file, row=i,
                                column=getattr(e, "column", None), hint=getattr(e, "hint", None)) from None
            prompts.append(prompt)
            images.append(shown)
    outputs = loaded.generate(prompts, images=images or None, max_new_tokens=args.max_new_tokens,
                              batch_size=args.batch_size, temperature=args.temperature, top_p=args.top_p)
    if rows is None:
        out.print(outputs[0], markup=False, highlight=False)
        return 0
    from sftune.safeio import dumps

    made = [training_row(r, p, g) if args.as_training_set else {**r, "prompt": p, "generated": g}
            for r, p, g in zip(rows, prompts, outputs)]
    lines = [dumps(row, ensure_ascii=False) for row in made]
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    else:
        for line in lines:
            out.print(line, markup=False, highlight=False)
    return 0


def training_row(row: dict, prompt: str, generated: str) -> dict:
    """A generated row as training data (``sftune generate --as-training-set``): chat rows keep their
    messages up to the last user turn and get the generation as the assistant's answer; other rows
    become prompt (as the model saw it) / completion."""
    messages = row.get("messages")
    if isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages):
        keep = list(messages)
        while keep and keep[-1].get("role") == "assistant":
            keep.pop()
        return {"messages": keep + [{"role": "assistant", "content": generated}]}
    return {"prompt": prompt, "completion": generated}


def cmd_chat(args) -> int:
    from sftune.inference import chat, load_for_inference
    from sftune.vision_inference import load_image_files

    loaded = load_for_inference(args.model)
    loaded.use_tools(args.tools)
    chat(loaded, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
         images=load_image_files(args.image))
    return 0


def image_args(args, loaded) -> list[list]:
    """``sftune generate --image``: ``[images of --prompt]``, or [] without; refused where unusable."""
    from sftune.vision_inference import load_image_files, need_images_model

    images = load_image_files(args.image)
    need_images_model(loaded.fmt, args.model, images)
    if images and (args.file or args.raw):
        raise SftuneError(f"--image goes with --prompt{'' if args.file else ' without --raw'}: "
                          + ("rows of --file give their own images (an images column or image parts)" if args.file
                             else "the chat template places the image, so the prompt cannot be sent raw"))
    return [images] if images else []


def cmd_eval(args) -> int:
    from sftune.evaluate import run_eval

    run_eval(args.model, args.data, split=args.split, baseline=args.baseline, overrides=args.overrides,
             limit=args.limit, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, out=args.out)
    return 0


def cmd_export(args) -> int:
    from sftune.export.hf import export_run
    from sftune.export.verify import verify_export
    from sftune.console import console

    from rich.markup import escape

    out = export_run(args.model, args.out, dtype=args.dtype, push_to_hub=args.push_to_hub, format=args.format,
                     quant=args.quant)
    task = "image-text-to-text" if (out / "processor_config.json").is_file() else "text-generation"  # vision: processor
    console.print(f"exported to [bold]{escape(str(out))}[/]: load it with "
                  f"transformers.pipeline('{task}', '{escape(str(out))}')")
    if args.format == "gguf":
        console.print(f"GGUF: {out}/model-{args.quant}.gguf; Ollama: ollama create NAME -f {out}/Modelfile",
                      markup=False)
    if args.verify:
        result = verify_export(args.model, out)
        for line in result.lines:
            console.print(escape(line), highlight=False, soft_wrap=True)
        console.print("[bold green]verify: PASS[/]" if result.ok else "[bold red]verify: FAIL[/]")
        return 0 if result.ok else 1
    return 0


def cmd_verify(args) -> int:
    from pathlib import Path

    from sftune.console import out
    from sftune.integrity import describe, verify_run
    from sftune.safeio import dumps

    if not Path(args.model).is_dir():
        raise SftuneError(f"'{args.model}' is not a run directory")
    report = verify_run(args.model)
    for line in [dumps(report)] if args.json else describe(report):
        out.print(line, markup=False, highlight=False, soft_wrap=True)
    return 0 if report["ok"] else 1


def cmd_report(args) -> int:
    from sftune.run_report import build_report
    from sftune.console import console

    console.print(f"wrote {build_report(args.model)}", markup=False)
    return 0


def _no_recipe(args) -> bool:
    """``sftune train`` / ``sftune preview`` alone: the usage and the recipes, not an argparse error."""
    if args.recipe:
        return False
    from sftune.config import builtin_recipes

    args.subparser.print_usage(sys.stderr)
    sys.stderr.write(f"give a recipe: a YAML file or a built-in name ({', '.join(builtin_recipes())}), "
                     f"then optional key=value overrides.\n  for example: sftune {args.command} quickstart\n")
    return True


def cmd_train(args) -> int:
    from sftune.config import load_config
    from sftune.runlock import refuse_if_locked

    if getattr(args, "trl_config", None):  # a `trl sft` YAML, through the TRL 1.x front
        if args.recipe or args.overrides:
            raise SftuneError("--trl-config takes the whole run from the YAML: drop the recipe and overrides")
        from sftune.compat.trl_yaml import run_trl_config

        return run_trl_config(args.trl_config)
    if _no_recipe(args):
        return 2
    cfg = load_config(args.recipe, args.overrides)
    refuse_if_locked(cfg.train.output_dir)  # a busy output directory is refused before the training stack loads
    from sftune.cluster import exit_status
    from sftune.training import train

    again = [o for o in args.overrides if o.partition("=")[0].strip() != "train.resume"]
    command = " ".join(shlex.quote(a) for a in ["sftune", "train", args.recipe, *again, "train.resume=true"])
    return exit_status(train(cfg), resume_hint=command)


def cmd_distill_prepare(args) -> int:
    from sftune.config import load_config
    from sftune.console import console
    from sftune.distill.saved import prepare_saved

    if _no_recipe(args):
        return 2
    prepare_saved(load_config(args.recipe, args.overrides), args.out, console)
    return 0


def cmd_preview(args) -> int:
    from sftune.config import load_config
    from sftune.preview import preview

    if _no_recipe(args):
        return 2
    cfg = load_config(args.recipe, args.overrides)
    preview(cfg, n=args.n, as_json=args.json)
    return 0


def cmd_config(args) -> int:
    from rich.markup import escape

    from sftune.config import config_to_yaml, describe_keys, load_config
    from sftune.console import out

    if args.keys or not args.recipe:
        for key, default, desc in describe_keys():
            out.print(f"[bold]{escape(key)}[/] = {escape(default)}\n    {escape(desc)}")
        return 0
    out.print(config_to_yaml(load_config(args.recipe, args.overrides)), markup=False)
    return 0


def cmd_ui(args) -> int:
    from sftune.dashboard.server import serve

    serve(args.runs_dir, host=args.host, port=args.port, token=args.token)
    return 0


COMMANDS = {"train": cmd_train, "preview": cmd_preview, "config": cmd_config, "generate": cmd_generate,
            "chat": cmd_chat, "eval": cmd_eval, "export": cmd_export, "report": cmd_report, "verify": cmd_verify,
            "ui": cmd_ui, "distill-prepare": cmd_distill_prepare}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    # key=value overrides may come before or after options such as "-n 3"
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = list(getattr(args, "overrides", None) or []) + extra
    if not args.command:
        parser.print_help()
        return 0
    from sftune.console import console, quiet_third_party

    quiet_third_party()
    try:
        return COMMANDS[args.command](args)
    except SftuneError as e:
        from rich.markup import escape

        console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130
    except RuntimeError as e:  # a collective failed because another rank died: one line, not a traceback
        from sftune.cluster import peer_lost

        why = peer_lost(e)
        if why is None:
            raise
        from rich.markup import escape

        console.print(f"[bold red]error:[/] {escape(why)}", highlight=False, soft_wrap=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
