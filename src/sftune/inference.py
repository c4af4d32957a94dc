"""Talking to a trained model: load a run (or any model), build prompts as in training, generate, chat.

A *run* is a training output directory: it holds ``sftune_config.yaml`` with the data format, so
prompts are built with the same template (or chat template) the model was trained on, without the
user re-typing it. A plain model directory or hub id works too: its chat template is used when it
has one, and the raw text otherwise.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from rich.markup import escape

from sftune.config import Config, validate_config
from sftune.data.formats import BadRow, Format, format_from_identity
from sftune.digests import check_model
from sftune.errors import DataError, RowSkip, SftuneError
from sftune.generation import Streamer, generate_with
from sftune.model import load_pretrained, resolve_path
from sftune.threads import for_inference
from sftune.vision_inference import need_images_model, prompt_images, row_and_images, with_images
from sftune.console import console


@dataclass
class Loaded:
    """A model ready for inference, with the format it was trained on (for a plain model: its chat
    template, or raw text). The format owns the prompt contract: prompts, BOS rule, stop tokens."""

    model: torch.nn.Module
    tokenizer: object
    cfg: Config | None
    fmt: Format
    path: str

    @property
    def is_chat(self) -> bool:
        return self.fmt.is_chat

    @property
    def add_bos(self) -> bool:
        return self.fmt.add_bos

    def prompt_from_text(self, text: str, history: list[dict] | None = None, tools: list[dict] | None = None) -> str:
        """The full prompt for a user message (and earlier turns, for chat models), with ``tools``
        (tool schemas; default: those given to :meth:`use_tools`) rendered by the chat template."""
        if tools is not None:
            self._need_chat("tools")
            return self.fmt.prompt_from_text(text, history, tools=tools)
        return self.fmt.prompt_from_text(text, history)

    def use_tools(self, path: str | None) -> None:
        """``--tools FILE``: every prompt of this model renders these tool schemas (rows without a
        tools column of their own included)."""
        if path:
            from sftune.data.tools import read_tools_file

            self._need_chat("--tools")
            self.fmt.tools = read_tools_file(path)

    def _need_chat(self, what: str) -> None:
        if not hasattr(self.fmt, "tools"):
            raise SftuneError(f"{what} needs a chat model: {self.path} prompts with the {self.fmt.name} format, "
                              "which has no chat template to render tool schemas")

    def prompt_from_row(self, row: dict) -> str:
        """The prompt for a data row (only the prompt's columns are needed)."""
        try:
            return self.fmt.prompt(row)
        except (BadRow, RowSkip) as e:
            reason = e.message if isinstance(e, BadRow) else e.reason
            raise DataError(f"cannot build a prompt from this row: {reason}",
                            column=getattr(e, "column", None)) from None

    def prompt_and_images(self, row: dict, base: Path | None = None) -> tuple[str, list]:
        """A data row's prompt and the images it shows (``base``: where relative image paths are)."""
        try:
            row, images = row_and_images(self.fmt, row, base)
            prompt = self.prompt_from_row(row)
            return prompt, prompt_images(self.fmt, prompt, images)
        except BadRow as e:
            raise DataError(f"cannot build a prompt from this row: {e.message}", column=e.column, hint=e.hint) from None

    def generate(self, prompts: list[str], images: list[list] | None = None, **kwargs) -> list[str]:
        """Completions of ``prompts``; ``images``: each prompt's images (image-text-to-text models)."""
        return generate_with(self.fmt, self.model, self.tokenizer, prompts, images=images, **kwargs)


def _has_weights(p: Path) -> bool:
    return any(p.glob("*.safetensors")) or any(p.glob("*.bin")) or any(p.glob("*.safetensors.index.json"))


def load_for_inference(path: str, *, dtype: str = "auto", device: str | None = None, init_seed: int = 42) -> Loaded:
    """Load a run directory, a model directory or a hub id, with its tokenizer and training format.

    A built-in model without weights (``builtin:quickstart``) is initialised from its config with
    ``init_seed``, exactly as a from-scratch run with that ``train.seed`` starts: the untrained
    baseline of such a run."""
    builtin = path.startswith("builtin:")
    path = resolve_path(path)
    p = Path(path)
    if not p.exists() and path.startswith(("/", ".", "~")):
        raise SftuneError(f"'{path}' does not exist\n  → give a training output directory, a model directory "
                          "or a hub id")
    if p.is_file():
        raise SftuneError(f"'{path}' is a file; give a training output directory, a model directory or a hub id")
    if (p / "sftune_config.yaml").exists() and not any(
            (p / f).exists() for f in ("config.json", "adapter_config.json")):
        ckpts = sorted((p / "checkpoints").glob("step-*")) if (p / "checkpoints").is_dir() else []
        where = f"; its newest checkpoint is {ckpts[-1].name}" if ckpts else ""
        raise SftuneError(f"the run '{path}' has no final model: it was interrupted or stopped before the end"
                          f"{where}\n  → finish it with `sftune train {p / 'sftune_config.yaml'} train.resume=true`")
    check_model(p)  # the files the final save wrote, as it wrote them (sftune.digests)
    cfg = None
    if (p / "sftune_config.yaml").exists():
        cfg = validate_config(yaml.safe_load((p / "sftune_config.yaml").read_text()) or {},
                              str(p / "sftune_config.yaml"))
    model, tokenizer = load_pretrained(path, dtype=dtype, init_seed=init_seed if builtin and not _has_weights(p)
                                       else None)
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(dev).eval()
    for_inference(dev)  # CPU threads from the idle cores (sftune.threads)
    fmt = format_from_identity(cfg.data if cfg is not None else None, tokenizer)
    return Loaded(model, tokenizer, cfg, fmt, path)


def chat(loaded: Loaded, *, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
         stdin=None, stdout=None, images: list | None = None) -> int:
    """A multi-turn REPL (single-turn for prompt/completion models). ``/reset`` and ``/exit``.
    ``images`` (``--image``): shown with the first message of each conversation."""
    images = images or []
    need_images_model(loaded.fmt, loaded.path, images)
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    interactive = stdin.isatty()
    multi_turn = loaded.is_chat
    mode = "multi-turn chat" if multi_turn else "single-turn (each message is a new prompt)"
    console.print(f"[bold]sftune chat[/] with {escape(str(loaded.path))}: {mode}. /reset clears history, /exit quits.")
    history: list[dict] = []
    turns = 0
    while True:
        if interactive:
            console.print("[bold cyan]you>[/] ", end="")
        line = stdin.readline()
        if not line:
            break
        message = line.rstrip("\n")
        if not message.strip():
            continue
        if message.strip() == "/exit":
            break
        if message.strip() == "/reset":
            history = []
            console.print("[dim](history cleared)[/]")
            continue
        if images and not (multi_turn and history):
            message = with_images(message, len(images))  # the conversation's first message shows the images
        prompt = loaded.prompt_from_text(message, history if multi_turn else None)
        streamer = Streamer(loaded.tokenizer, set(loaded.fmt.stop_ids(loaded.tokenizer)), stdout)
        reply = loaded.generate([prompt], images=[images] if images else None, max_new_tokens=max_new_tokens,
                                batch_size=1, temperature=temperature, top_p=top_p, streamer=streamer)[0]
        turns += 1
        if multi_turn:
            history += [{"role": "user", "content": message}, {"role": "assistant", "content": reply}]
    return turns
