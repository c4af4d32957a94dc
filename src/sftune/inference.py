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

from sftune.config import SFTConfig, validate_config
from sftune.data.formats import Format, MessagesFormat, PromptCompletionFormat, TextFormat
from sftune.errors import DataError, SftuneError


@dataclass
class Loaded:
    """A model ready for inference, with the format it was trained on (``None`` if unknown)."""

    model: torch.nn.Module
    tokenizer: object
    cfg: SFTConfig | None
    fmt: Format | None
    path: str

    @property
    def is_chat(self) -> bool:
        return isinstance(self.fmt, MessagesFormat) or (self.fmt is None and bool(self.tokenizer.chat_template))

    @property
    def add_bos(self) -> bool:
        return not self.is_chat

    def prompt_from_text(self, text: str, history: list[dict] | None = None) -> str:
        """The full prompt for a user message (and earlier turns, for chat models)."""
        if isinstance(self.fmt, PromptCompletionFormat):
            return self.fmt.prompt_from_text(text)
        if self.is_chat:
            messages = list(history or []) + [{"role": "user", "content": text}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text

    def prompt_from_row(self, row: dict) -> str:
        """The prompt for a data row with the training columns (the reference completion is dropped)."""
        from sftune.evaluate import prompt_and_reference

        if self.fmt is None:
            text = row.get("prompt") or row.get("text") or row.get("instruction")
            if not isinstance(text, str):
                raise DataError("cannot build a prompt from this row: the model has no sftune config; "
                                "give rows a 'prompt' column")
            return self.prompt_from_text(text)
        if isinstance(self.fmt, TextFormat):
            return row.get(self.fmt.column) or ""
        return prompt_and_reference(self.fmt, row).prompt


def _format_for(cfg: SFTConfig, tokenizer) -> Format | None:
    from sftune.data.formats import choose_format

    d = cfg.data
    if d.format == "auto" and not (d.template or d.prompt or d.completion):
        return None  # a custom (Python) format: not rebuildable; fall back to the chat template
    try:
        return choose_format(d, [], tokenizer)
    except SftuneError:
        return None


def load_for_inference(path: str, *, dtype: str = "auto", device: str | None = None) -> Loaded:
    """Load a run directory, a model directory or a hub id, with its tokenizer and training format."""
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftune.model import resolve_path

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
    cfg = None
    if (p / "sftune_config.yaml").exists():
        cfg = validate_config(yaml.safe_load((p / "sftune_config.yaml").read_text()) or {},
                              str(p / "sftune_config.yaml"))
    torch_dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16,
                   "float16": torch.float16}[dtype]
    if torch_dtype == "auto" and not torch.cuda.is_available():
        torch_dtype = torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if (p / "adapter_config.json").exists():
            from peft import AutoPeftModelForCausalLM

            model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SftuneError(f"could not load '{path}': {first}\n  → give a training output directory, a model "
                          "directory or a hub id") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(dev).eval()
    fmt = _format_for(cfg, tokenizer) if cfg is not None else None
    return Loaded(model, tokenizer, cfg, fmt, path)


class _Streamer:
    """Prints new text as it is generated (stdout), cutting at stop tokens."""

    def __init__(self, tokenizer, stops: set[int], out=sys.stdout):
        self.tokenizer, self.stops, self.out = tokenizer, stops, out
        self.ids: list[int] = []
        self.printed = 0
        self.first = True
        self.stopped = False

    def put(self, value):
        if self.first:  # the prompt
            self.first = False
            return
        for t in value.reshape(-1).tolist():
            if self.stopped or t in self.stops:
                self.stopped = True
                return
            self.ids.append(t)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)

    def end(self):
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        self.out.write(text[self.printed:] + "\n")
        self.out.flush()


def chat(loaded: Loaded, *, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
         stdin=None, stdout=None) -> int:
    """A multi-turn REPL (single-turn for prompt/completion models). ``/reset`` and ``/exit``."""
    from sftune.evaluate import generate, stop_token_ids
    from sftune.ui import console

    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    interactive = stdin.isatty()
    multi_turn = loaded.is_chat
    mode = "multi-turn chat" if multi_turn else "single-turn (each message is a new prompt)"
    console.print(f"[bold]sftune chat[/] with {loaded.path}: {mode}. /reset clears history, /exit quits.")
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
        prompt = loaded.prompt_from_text(message, history if multi_turn else None)
        streamer = _Streamer(loaded.tokenizer, set(stop_token_ids(loaded.tokenizer)), stdout)
        reply = generate(loaded.model, loaded.tokenizer, [prompt], max_new_tokens=max_new_tokens, batch_size=1,
                         temperature=temperature, top_p=top_p, add_bos=loaded.add_bos, streamer=streamer)[0]
        turns += 1
        if multi_turn:
            history += [{"role": "user", "content": message}, {"role": "assistant", "content": reply}]
    return turns
