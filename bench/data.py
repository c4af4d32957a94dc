"""Data preparation at scale: sftune (in memory and streaming) beside TRL's SFTTrainer preparation.

    python bench/data.py                          # 100k rows, every mode once (a few minutes on 2 cores)
    python bench/data.py --rows 100000,1000000 --repeats 3
    python bench/data.py --modes sftune --rows 200000 --repeats 3 --src /tmp/old/src   # another checkout

Rows are Alpaca rows (``../shared/data/alpaca_5000.json``) repeated with variations (the k-th copy
of a row gets `` (variant k)`` after its instruction and its output, so no two rows are equal),
written once as JSONL. Every measurement runs in a fresh child process with an empty
``HF_DATASETS_CACHE`` (cold cache: the JSON is converted to Arrow and tokenized from scratch), with
the real GPT-2 tokenizer (``../shared/models/gpt2-tokenizer``), Alpaca prompt template, loss on the
response, ``max_length`` 1024.

Modes:
  sftune     ``sftune preview``'s path: ``load_config`` -> ``load_tokenizer`` -> ``prepare_data``
             (load, render, tokenize with labels, data report), sftune's default ``num_proc``
  streaming  the same with ``data.streaming=true``: one pass of the rows through the stream (read,
             shuffle buffer, format, tokenize); "not available" when this version has no such key
  trl        TRL's ``SFTTrainer`` as a user runs it: the rows mapped to prompt/completion with the
             same Alpaca template, then ``SFTTrainer(...)`` (its dataset preparation: tokenization,
             completion mask, truncation) with a tiny GPT-2 model, TRL's defaults otherwise
  trl_np     the same with ``dataset_num_proc`` equal to sftune's default ``num_proc``
  before     ``sftune`` on another checkout's source tree (``--before PATH/src``), interleaved with
             the others so that both see the same machine load

Reported per mode and size: preparation seconds (from loading the rows to prepared data, after
imports and the tokenizer), the CPU seconds of that preparation (user + system of the process, its
threads and its worker processes: the work done, which machine load inflates far less than wall
time; the JSON also has ``cpu_total``, imports included), rows/s,
tokens/s (tokens of the prepared examples), and peak memory:
the proportional set size (PSS) summed over the child and its worker processes, sampled every
0.2 s. The table gives the median and the range over ``--repeats``; JSON goes to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TOKENIZER = SHARED / "models" / "gpt2-tokenizer"
ALPACA = SHARED / "data" / "alpaca_5000.json"
MAX_LENGTH = 1024
MODES = ("sftune", "streaming", "trl", "trl_np", "before")


# ----------------------------------------------------------------------------- rows


def make_rows(n: int, workdir: Path) -> Path:
    """``n`` Alpaca-like rows as JSONL (written once per size and reused)."""
    path = workdir / f"alpaca_{n}.jsonl"
    if path.exists():
        return path
    base = json.loads(ALPACA.read_text())
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for i in range(n):
            r, k = base[i % len(base)], i // len(base)
            tag = f" (variant {k})" if k else ""
            f.write(json.dumps({"instruction": r["instruction"] + tag, "input": r["input"],
                                "output": r["output"] + tag}) + "\n")
    tmp.rename(path)
    return path


# ----------------------------------------------------------------------------- children


def cpu_seconds() -> float:
    """User + system CPU of this process (all threads) and of the workers it has waited for."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def default_num_proc(n_rows: int) -> int | None:
    """sftune's default ``data.num_proc`` (``sftune.data.one_source._num_proc``)."""
    try:
        from sftune.config import DataConfig
        try:
            from sftune.data.one_source import _num_proc
        except ImportError:  # an older checkout: data/pipeline.py
            from sftune.data.pipeline import _num_proc

        return _num_proc(DataConfig(), n_rows)
    except ImportError:
        return None


def child_sftune(path: str, streaming: bool) -> dict:
    from sftune.config import load_config
    from sftune.errors import ConfigError
    from sftune.model import load_tokenizer

    try:
        from sftune.data.chain import prepare
    except ImportError:  # an older checkout: the one-source pipeline
        from sftune.data.pipeline import prepare_data as prepare

    over = {"model.path": str(TOKENIZER), "data.path": path, "data.template": "alpaca",
            "data.max_length": MAX_LENGTH}
    if streaming:
        over["data.streaming"] = True
    try:
        cfg = load_config(None, over)
    except ConfigError as e:
        if streaming and "streaming" in str(e) and "max_steps" not in str(e):  # an unknown key, not a refusal
            return {"unavailable": f"data.streaming is not a key of this version ({str(e).splitlines()[0][:120]})"}
        raise
    tok, _ = load_tokenizer(cfg)
    start, cpu = time.perf_counter(), cpu_seconds()
    data = prepare(cfg.data, tok, MAX_LENGTH)
    rows = data.report.rows_read
    if getattr(data, "stream", None) is None:
        examples, tokens = len(data.train), int(data.train.lengths.sum())
    else:  # a stream: read one pass of the rows through the chain (format, tokenize)
        stream = data.stream()
        with open(path, "rb") as f:
            rows = sum(1 for _ in f)
        examples = tokens = 0
        while stream.counts[0]["rows_read"] < rows:
            examples += 1
            tokens += len(stream.next_example().ids)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    return {"seconds": seconds, "cpu": cpu, "examples": examples, "tokens": tokens, "rows": rows}


def child_trl(path: str, num_proc: int | None) -> dict:
    import datasets
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
    from trl import SFTConfig, SFTTrainer

    from sftune.data.templates import NAMED_TEMPLATES

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    tok.pad_token = tok.eos_token
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=MAX_LENGTH, n_embd=32, n_layer=1, n_head=2))
    tpl = NAMED_TEMPLATES["alpaca"]
    work = tempfile.mkdtemp()
    args = SFTConfig(output_dir=work, max_length=MAX_LENGTH, report_to=[], use_cpu=True, save_strategy="no",
                     dataset_num_proc=num_proc)
    start, cpu = time.perf_counter(), cpu_seconds()

    def to_pc(row):
        prompt, completion = tpl.render({"instruction": row["instruction"], "input": row["input"] or "",
                                         "output": row["output"]})
        return {"prompt": prompt, "completion": completion}

    ds = datasets.load_dataset("json", data_files=path, split="train")
    ds = ds.map(to_pc, remove_columns=ds.column_names, num_proc=num_proc)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    train = trainer.train_dataset
    tokens = sum(len(x) for x in train.with_format("arrow")["input_ids"].to_pylist()) if len(train) else 0
    return {"seconds": seconds, "cpu": cpu, "examples": len(train), "tokens": tokens, "rows": len(ds)}


def child_main(mode: str, path: str, num_proc: int | None) -> None:
    if mode in ("sftune", "streaming"):
        res = child_sftune(path, streaming=mode == "streaming")
    else:
        res = child_trl(path, num_proc if mode == "trl_np" else None)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            res["main_hwm"] = int(line.split()[1]) * 1024
    print("RESULT " + json.dumps(res), flush=True)


# ----------------------------------------------------------------------------- memory of a process tree


def _tree(root: int) -> list[int]:
    parents = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
                parents[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += [c for c, pp in parents.items() if pp == p]
    return out


def _pss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakMemory:
    """Peak PSS summed over a process and its descendants, sampled on a thread."""

    def __init__(self, pid: int, every: float = 0.2):
        self.pid, self.every, self.peak = pid, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(_pss(p) for p in _tree(self.pid)))
            self._stop.wait(self.every)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def measure(mode: str, path: Path, num_proc: int | None, src: Path, timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src), HF_DATASETS_CACHE=tempfile.mkdtemp(prefix="bench-data-cache-"))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "sftune" if mode == "before" else mode,
           "--data", str(path),
           "--num-proc", str(num_proc or 0)]
    wall = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    mem = PeakMemory(proc.pid)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        mem.stop()
        return {"error": f"timed out after {timeout:.0f} s"}
    peak = mem.stop()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the child and every worker it waited for
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    subprocess.run(["rm", "-rf", env["HF_DATASETS_CACHE"]], check=False)
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"error": (err or out).strip().splitlines()[-1] if (err or out).strip() else f"exit {proc.returncode}",
                "trace": err[-3000:]}
    res = json.loads(lines[-1][len("RESULT "):])
    if "unavailable" not in res:
        res.update(peak_pss=peak, cpu_total=cpu, wall=time.perf_counter() - wall,
                   rows_per_s=res["rows"] / res["seconds"],
                   tokens_per_s=res["tokens"] / res["seconds"])
    return res


# ----------------------------------------------------------------------------- main


def _fmt_range(values: list[float], f: str) -> str:
    if not values:
        return ""
    med = statistics.median(values)
    if len(values) == 1:
        return format(med, f)
    return f"{format(med, f)} ({format(min(values), f)}-{format(max(values), f)})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="100000", help="comma-separated sizes (default 100000)")
    parser.add_argument("--modes", default="sftune,streaming,trl,trl_np",
                        help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--repeats", type=int, default=1, help="runs per mode and size (median and range reported)")
    parser.add_argument("--src", default=str(ROOT / "src"), help="the sftune source tree to measure (PYTHONPATH)")
    parser.add_argument("--before", help="another sftune source tree, measured as the mode 'before'")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "sftune-bench-data"),
                        help="where the generated JSONL rows are kept between runs")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per measurement")
    parser.add_argument("--out", default=str(ROOT / "bench" / "data_results.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--num-proc", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args.child, args.data, args.num_proc or None)
        return 0
    if not TOKENIZER.exists() or not ALPACA.exists():
        print(f"needs ../shared (the GPT-2 tokenizer and alpaca_5000.json) beside the repository: {SHARED} is missing")
        return 2
    sys.path.insert(0, args.src)
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    sizes = [int(s) for s in args.rows.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    if args.before and "before" not in modes:
        modes.append("before")
    if "before" in modes and not args.before:
        parser.error("the mode 'before' needs --before PATH (another checkout's src)")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    machine = f"{os.cpu_count()} CPU cores, {platform.machine()}, Python {platform.python_version()}"
    console.print(f"{machine}; src {args.src}; {args.repeats} repeat(s)")
    results = {"date": time.strftime("%Y-%m-%d"), "machine": machine, "src": args.src, "before": args.before,
               "max_length": MAX_LENGTH,
               "repeats": args.repeats, "runs": {}}
    for n in sizes:
        path = make_rows(n, workdir)
        num_proc = default_num_proc(n)
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        for rep in range(args.repeats):
            for m in modes:  # interleaved, so machine load drifts hit every mode alike
                console.print(f"[bold]{n:,} rows[/] {m} (run {rep + 1}/{args.repeats}) …")
                r = measure(m, path, num_proc, Path(args.before if m == "before" else args.src), args.timeout)
                if "error" in r:
                    console.print(f"[red]{m} failed: {r['error']}[/]\n{r.get('trace', '')}")
                elif "unavailable" in r:
                    console.print(f"[yellow]{m}: not available[/] ({r['unavailable']})")
                else:
                    console.print(f"  {r['seconds']:.1f} s ({r['cpu']:.1f} CPU s), {r['rows_per_s']:,.0f} rows/s, "
                                  f"{r['tokens_per_s']:,.0f} tokens/s, peak {r['peak_pss'] / 2**30:.2f} GB")
                runs[m].append(r)
                results["runs"][str(n)] = runs
                Path(args.out).write_text(json.dumps(results, indent=2))  # after every run: a partial result survives
        results["runs"][str(n)] = runs
        t = Table(title=f"{n:,} rows (num_proc {num_proc or 1} for sftune and trl_np), median (min-max) "
                        f"of {args.repeats}", title_justify="left")
        for col in ("mode", "seconds", "CPU seconds", "rows/s", "tokens/s", "peak memory (GB)", "examples", "vs trl",
                    "vs trl (CPU)"):
            t.add_column(col, justify="right")
        trl_s = [r["seconds"] for r in runs.get("trl", []) if "seconds" in r]
        trl_cpu = [r["cpu"] for r in runs.get("trl", []) if "seconds" in r]
        for m, rs in runs.items():
            ok = [r for r in rs if "seconds" in r]
            if not ok:
                why = next((r.get("unavailable") or r.get("error") for r in rs), "")
                t.add_row(m, "not available" if any("unavailable" in r for r in rs) else "failed", "", "", "", "", "",
                          "", str(why)[:40])
                continue
            secs = [r["seconds"] for r in ok]
            ratio = f"{statistics.median(trl_s) / statistics.median(secs):.2f}x" if trl_s and m != "trl" else ""
            cpu_ratio = (f"{statistics.median(trl_cpu) / statistics.median([r['cpu'] for r in ok]):.2f}x"
                         if trl_cpu and m != "trl" else "")
            t.add_row(m, _fmt_range(secs, ".1f"), _fmt_range([r["cpu"] for r in ok], ".1f"),
                      _fmt_range([r["rows_per_s"] for r in ok], ",.0f"),
                      _fmt_range([r["tokens_per_s"] for r in ok], ",.0f"),
                      _fmt_range([r["peak_pss"] / 2**30 for r in ok], ".2f"), f"{ok[0]['examples']:,}", ratio,
                      cpu_ratio)
        console.print(t)
    Path(args.out).write_text(json.dumps(results, indent=2))
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
