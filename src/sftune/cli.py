"""The command line: ``sftune train | preview | config`` (and the after-training commands).

Every command takes a RECIPE (a YAML path or a built-in name) followed by ``key=value``
overrides. User errors print one short message and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from sftune.errors import SftuneError

EPILOG = """recipes: a YAML file or a built-in name (quickstart, imdb, codealpaca, alpaca).
overrides: dotted keys, e.g. data.path=train.jsonl data.max_length=256 train.lr=1e-4 lora.enabled=true
list every key with: sftune config --keys"""


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="YAML recipe path or built-in name (quickstart, imdb, codealpaca, alpaca)")
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
                                   "train.output_dir. Ctrl-C saves a checkpoint; train.resume=true continues.")
    _add_recipe_args(p)

    p = sub.add_parser("preview", help="show training examples as the model sees them, and a dataset report",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Show the first N training sequences with trained tokens highlighted, then "
                                   "the dataset report (kept / skipped / truncated, lengths, loss fraction).")
    _add_recipe_args(p)
    p.add_argument("-n", type=int, default=3, help="number of sequences to show (default 3)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per sequence: input_ids, labels, position_ids, text")

    p = sub.add_parser("config", help="print the resolved config, or every config key",
                       description="Print a recipe's resolved config as YAML, or with --keys every key with its "
                                   "default and meaning.")
    p.add_argument("recipe", nargs="?", help="YAML recipe path or built-in name")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--keys", action="store_true", help="list every config key with its default and description")
    return parser


def cmd_train(args) -> int:
    from sftune.config import load_config
    from sftune.train import train

    cfg = load_config(args.recipe, args.overrides)
    result = train(cfg)
    return 130 if result.interrupted else 0


def cmd_preview(args) -> int:
    from sftune.config import load_config
    from sftune.preview import preview

    cfg = load_config(args.recipe, args.overrides)
    preview(cfg, n=args.n, as_json=args.json)
    return 0


def cmd_config(args) -> int:
    from sftune.config import config_to_yaml, describe_keys, load_config
    from sftune.ui import out

    if args.keys or not args.recipe:
        for key, default, desc in describe_keys():
            out.print(f"[bold]{key}[/] = {default}\n    {desc}")
        return 0
    out.print(config_to_yaml(load_config(args.recipe, args.overrides)), markup=False)
    return 0


COMMANDS = {"train": cmd_train, "preview": cmd_preview, "config": cmd_config}


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
    from sftune.ui import console

    try:
        return COMMANDS[args.command](args)
    except SftuneError as e:
        from rich.markup import escape

        console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
