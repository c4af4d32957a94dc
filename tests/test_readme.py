"""The README works as written: every ``sftune`` command in its bash blocks that needs no hub runs
(with small step counts appended), and its Python blocks run.

The fast test checks every command against the parser and the config schema; the slow one runs
them in README order in a scratch directory laid out as the README assumes (``./my-gpt2``, a local
model directory, and ``../shared/data``).
"""

from __future__ import annotations

import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SHARED

README = Path(__file__).resolve().parents[1] / "README.md"
HUB_RECIPES = {"imdb", "codealpaca", "alpaca"}
# appended to keep the run short; the README's own arguments are kept as written
SHORT = {
    "quickstart": ["train.max_steps=60", "train.log_every=20", "eval.limit=20"],
    "other": ["train.max_steps=2", "train.batch_size=4", "data.limit=16", "data.max_length=64"],
}


def code_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def strip_comment(line: str) -> str:
    """The line without its trailing ``# comment`` (a ``#`` after whitespace, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def readme_commands() -> list[str]:
    """Shell commands of the bash blocks, in order: ``sftune ...`` (also after ``&&`` or ``|``) and the
    ``echo ... > file`` lines they depend on; launchers, pip and pytest lines are left out."""
    commands = []
    for block in code_blocks("bash"):
        for raw in block.splitlines():
            line = strip_comment(raw.strip())
            for part in (p.strip() for p in line.split("&&")):
                if part.startswith("sftune ") or (part.startswith("echo ") and ("sftune" in part or ">" in part)):
                    commands.append(part)
    return commands


def needs_hub(argv: list[str]) -> bool:
    return (len(argv) > 2 and argv[1] in ("train", "preview") and argv[2] in HUB_RECIPES
            and not any(a.startswith("data.path=") for a in argv))


def sftune_argv(command: str) -> list[str]:
    """The ``sftune`` part of a command (after a pipe), as argv."""
    return shlex.split(command.split("|")[-1].strip())


def test_readme_commands_parse_and_configs_load(tmp_path, monkeypatch):
    """Every README command is valid for the parser, and every recipe + overrides loads (offline)."""
    from sftune.cli import build_parser
    from sftune.config import load_config

    commands = readme_commands()
    monkeypatch.chdir(tmp_path)  # recipes the README writes with echo ... > FILE
    for command in commands:
        if command.startswith("echo ") and ">" in command and "sftune" not in command:
            subprocess.run(["bash", "-c", command], check=True, cwd=tmp_path)
    assert any(c.startswith("sftune train quickstart") for c in commands)
    assert any("--baseline builtin:quickstart" in c for c in commands)
    parser = build_parser()
    for command in commands:
        if "sftune" not in command:
            continue
        argv = sftune_argv(command)
        args, extra = parser.parse_known_args(argv[1:])
        assert not [e for e in extra if e.startswith("-") or "=" not in e], command
        if args.command in ("train", "preview") or (args.command == "config" and args.recipe):
            load_config(args.recipe, list(args.overrides or []) + extra)
        assert "BASE_MODEL" not in command and "…" not in command, f"not runnable as written: {command}"


def test_readme_python_api_is_callable():
    from sftune import load_config, train

    assert callable(train) and callable(load_config)
    blocks = code_blocks("python")
    assert any("from sftune import load_config, train" in b for b in blocks)
    api = next(b for b in blocks if "train(load_config(" in b)
    assert "train.output_dir=" in api and "runs/quickstart\"" not in api  # keeps runs/quickstart intact


def _make_local_model(path: Path) -> None:
    """``./my-gpt2``: a tiny GPT-2 with the real GPT-2 tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(str(SHARED / "models" / "gpt2-tokenizer"))
    config = GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(str(path))
    tok.save_pretrained(str(path))


@pytest.mark.slow
@pytest.mark.shared
def test_readme_runs_as_written(tmp_path, monkeypatch, capsys):
    from sftune.cli import main

    if not (SHARED / "data").exists() or not (SHARED / "models" / "gpt2-tokenizer").exists():
        pytest.skip("../shared is absent (only CI and developer machines have ../shared)")
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "shared").symlink_to(SHARED)
    _make_local_model(work / "my-gpt2")
    monkeypatch.chdir(work)

    ran = []
    for command in readme_commands():
        if "sftune" not in command:  # echo '...' > file
            subprocess.run(["bash", "-c", command], check=True, cwd=work)
            continue
        argv = sftune_argv(command)
        if needs_hub(argv):
            continue
        if argv[1] == "train":  # the short settings, but not over a key the README sets itself
            argv += [a for a in SHORT["quickstart" if argv[2] == "quickstart" else "other"]
                     if not any(b.startswith(a.split("=")[0] + "=") for b in argv)]
        if argv[1] == "eval":
            argv += ["--limit", "20"]
        if argv[1] == "ui":  # a server that runs until Ctrl-C: start it with uvicorn.run stubbed
            import uvicorn  # (tests/test_dashboard_*.py serve the dashboard for real)

            monkeypatch.setattr(uvicorn, "run", lambda app, **kw: None)
        stdin = ""
        if "|" in command:  # echo "..." | sftune ...
            stdin = subprocess.run(["bash", "-c", command.split("|")[0]], capture_output=True, text=True,
                                   check=True).stdout
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code = main(argv[1:])
        cap = capsys.readouterr()
        assert code == 0, f"{command}\n{cap.err[-3000:]}"
        assert "Traceback" not in cap.err
        ran.append(argv[1])
    assert {"train", "preview", "config", "generate", "chat", "eval", "export"} <= set(ran)
    assert (work / "runs" / "quickstart" / "model.safetensors").exists()
    assert (work / "out.jsonl").exists() and (work / "merged" / "config.json").exists()

    # the Python blocks, with a short run
    for block in code_blocks("python"):
        code = re.sub(r'"train\.max_steps=\d+"', '"train.max_steps=20", "eval.limit=20"', block)
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    assert (work / "runs" / "quickstart-200" / "model.safetensors").exists()
