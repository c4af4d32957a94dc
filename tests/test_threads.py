"""sftune.threads: the idle-core estimate from fake /proc and cgroup files, the choice from fake step
times (no timing here), pinning, and the same results for any thread count."""

from __future__ import annotations

import math

import pytest
import torch

from sftune import threads as T

# /proc/stat: cpuN user nice system idle iowait irq softirq steal guest guest_nice
STAT = "cpu  0 0 0 0 0 0 0 0 0 0\ncpu0 {b0} 0 0 {i0} 0 0 0 0 0 0\ncpu1 {b1} 0 0 {i1} 0 0 0 0 0 0\nintr 1 2\n"
SELF = "1234 (python -c (x) y) R 1 1234 1234 0 -1 4194304 100 0 0 0 {ut} {st} 0 0 20 0 3 0 100 1000 100\n"


def write_proc(root, b0, i0, b1, i1, own):
    (root / "self").mkdir(parents=True, exist_ok=True)
    (root / "stat").write_text(STAT.format(b0=b0, i0=i0, b1=b1, i1=i1))
    (root / "self" / "stat").write_text(SELF.format(ut=own, st=0))


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_parsers():
    cpus = T.parse_proc_stat("cpu  9 9 9 9 9 9 9 9\ncpu0 10 1 2 80 5 1 1 0 3 0\ncpu3 1 0 0 9 0 0 0 0\n")
    assert cpus == {0: (14, 100), 3: (1, 10)}  # free: nice, idle, iowait; guest not added twice
    assert T.parse_self_stat(SELF.format(ut=7, st=5)) == 12  # the name holds spaces and parentheses
    assert T.parse_cgroup_quota("max 100000") is None
    assert T.parse_cgroup_quota("150000 100000\n") == 1.5
    assert T.parse_cgroup_quota(None, "-1", "100000") is None
    assert T.parse_cgroup_quota(None, "50000", "100000") == 0.5
    assert T.parse_cgroup_quota("garbage") is None


def test_idle_from_proc_stat_deltas(tmp_path):
    proc = tmp_path / "proc"
    write_proc(proc, 0, 0, 0, 0, own=0)
    machine = T.Machine(proc, tmp_path / "nocgroup", affinity={0, 1})

    def sleep(_):  # 100 jiffies pass: cpu1 fully busy with another process, cpu0 with 30 of ours
        write_proc(proc, 30, 70, 100, 0, own=30)

    est, _ = T.estimate_idle(machine, sleep=sleep)
    assert est.source == "/proc/stat" and est.capacity == 2
    assert est.busy == pytest.approx(1.0) and est.idle == pytest.approx(1.0)
    assert T.threads_for(est.idle, 2) == 1
    assert "busy on 1.0" in est.why()


def test_idle_counts_only_cpus_in_the_affinity_and_the_quota(tmp_path):
    proc, cg = tmp_path / "proc", tmp_path / "cg"
    cg.mkdir()
    write_proc(proc, 0, 0, 0, 0, own=0)
    machine = T.Machine(proc, cg, affinity={0})  # cpu1 is not ours: its load does not count
    est, _ = T.estimate_idle(machine, sleep=lambda _: write_proc(proc, 0, 100, 100, 0, own=0))
    assert est.busy == 0 and est.idle == 1 and est.capacity == 1

    (cg / "cpu.max").write_text("150000 100000\n")  # 1.5 cores of quota on 2 CPUs, all idle
    write_proc(proc, 0, 0, 0, 0, own=0)
    machine = T.Machine(proc, cg, affinity={0, 1})
    est, _ = T.estimate_idle(machine, sleep=lambda _: write_proc(proc, 0, 100, 0, 100, own=0))
    assert est.capacity == 1.5 and est.idle == 1.5 and T.threads_for(est.idle, math.floor(est.capacity)) == 1


def test_load_average_without_proc_stat(tmp_path):
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "loadavg").write_text("2.00 1.00 0.50 3/100 999\n")
    est, _ = T.estimate_idle(T.Machine(proc, tmp_path, affinity={0, 1, 2, 3}), sleep=lambda _: None)
    assert est.source == "load average" and est.busy == 1.0 and est.idle == 3.0


def test_threads_for_rounds_and_clamps():
    assert [T.threads_for(x, 4) for x in (0.0, 0.4, 0.6, 1.49, 1.5, 3.7, 9)] == [1, 1, 1, 1, 2, 4, 4]


def tuner(cap=2, start=2, busy=1.0, idle=None, **kw):
    calls, said = [], []
    est = T.Estimate(idle if idle is not None else cap - busy, cap, busy, "test")
    t = T.ThreadTuner(cap=cap, start=start, estimate=est, set_threads=calls.append, clock=lambda: 0.0,
                      say=said.append, reason=est.why(), **kw)
    return t, calls, said


def feed(t, seconds_at: dict[int, float], steps: int, tokens: int = 1000):
    for _ in range(steps):
        t.record(seconds_at[t.threads], tokens)


def test_measures_one_fewer_when_others_are_busy_and_keeps_the_fastest():
    t, calls, said = tuner(start=2, busy=1.0)
    assert calls == [2] and t.phase == "trial"
    feed(t, {2: 1.0, 1: 0.1}, 1)  # the run's first step is warm-up: not measured
    assert not t.measured
    feed(t, {2: 1.0, 1: 0.1}, 20)
    assert t.threads == 1 and t.phase == "watch" and calls == [2, 1]
    assert said and said[0].startswith("cpu threads: 1 of 2") and "busy on 1.0" in said[0]
    assert "2: 1,000.0" in said[0] and "1: 100.0" in said[0]  # ms per 1k tokens at each count


def test_stops_measuring_a_count_that_is_twice_as_slow():
    t, calls, _ = tuner(start=1, busy=0.5, idle=1.5, long_s=100.0)  # start 1; part of a core idle: try 2
    assert t.candidates == [2]
    feed(t, {1: 0.1, 2: 5.0}, 1 + 2)  # warm-up, then 2 steps at 1 thread: not enough yet
    assert t.threads == 1 and t.phase == "trial"
    feed(t, {1: 0.1, 2: 5.0}, 2)  # 3 steps and 0.3 s at 1; then one step at 2 is >2x slower: back to 1
    assert len(t.measured[2]) == 1 and t.threads == 1 and t.phase == "watch" and calls == [1, 2, 1]
    assert t.shunned[2] == (60.0, 120.0)  # not tried again for 60 s (the clock stands at 0 here)
    t._begin_trial([1, 2], "again")
    assert t.candidates == []


def test_no_trial_alone_and_ties_go_to_fewer_threads():
    t, calls, said = tuner(start=2, busy=0.0)  # nothing else running: nothing to try
    assert t.candidates == []
    feed(t, {2: 0.1}, 8)
    assert t.phase == "watch" and t.threads == 2 and said == ["cpu threads: 2 of 2 (2 cores, other processes "
                                                              "busy on 0.0 (test))"]
    t, calls, _ = tuner(start=2, busy=0.5)
    feed(t, {2: 0.100, 1: 0.103}, 30)  # within 5%: the fewest threads win
    assert t.threads == 1


class FakeMachine:
    """estimate_idle reads these; `busy` is what other processes keep busy, `own` our use."""

    def __init__(self, busy=0.0, own=1.0, cpus=2):
        self.affinity, self.busy, self.own, self.t = set(range(cpus)), busy, own, 0
        self.busy_jiffies = self.own_jiffies = 0.0

    def capacity(self):
        return float(len(self.affinity))

    def loadavg(self):
        return None

    def sample(self):
        self.t += 100  # 100 jiffies per CPU between samples, at the current load
        self.busy_jiffies += (self.busy + self.own) * 100 / len(self.affinity)
        self.own_jiffies += self.own * 100
        return T.Sample({n: (round(self.busy_jiffies), self.t) for n in self.affinity}, round(self.own_jiffies))


def test_rechecks_when_steps_get_slower():
    machine = FakeMachine(busy=0.0, own=2.0)
    t, calls, said = tuner(start=2, busy=0.0, machine=machine)
    feed(t, {2: 0.1}, 20)
    assert t.threads == 2 and t.phase == "watch"
    machine.busy, machine.own = 1.0, 1.0  # a neighbour takes a core: steps at 2 threads get 10x slower
    feed(t, {2: 1.0, 1: 0.15}, 3)  # the median of the last 5 steps turns at the third
    assert t.phase == "trial" and "slower than at the choice" in t.reason and t.threads == 1
    feed(t, {2: 1.0, 1: 0.15}, 10)
    assert t.threads == 1 and t.phase == "watch" and said[-1].startswith("cpu threads: 2 -> 1")


def test_probes_one_more_when_a_core_becomes_idle():
    machine = FakeMachine(busy=1.0, own=1.0)
    now = [0.0]
    calls, said = [], []
    est = T.Estimate(1.0, 2, 1.0, "test")
    t = T.ThreadTuner(cap=2, start=1, estimate=est, machine=machine, set_threads=calls.append,
                      clock=lambda: now[0], say=said.append, probe_s=30)
    feed(t, {1: 0.1}, 20)
    assert t.phase == "watch" and t.threads == 1
    now[0] = 40.0  # the neighbour is still there: no probe
    feed(t, {1: 0.1}, 1)
    assert t.phase == "watch"
    machine.busy = 0.0  # it left
    now[0] = 80.0
    feed(t, {1: 0.1}, 1)
    assert t.phase == "trial" and t.threads == 2 and "a core became idle" in t.reason
    feed(t, {1: 0.1, 2: 0.06}, 20)
    assert t.threads == 2 and said[-1].startswith("cpu threads: 1 -> 2")


def test_pinning(monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert isinstance(T.for_training(1, torch.device("cpu")), T.Pinned) and torch.get_num_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert isinstance(T.for_training(None, torch.device("cpu")), T.Pinned)
    assert T.for_inference(torch.device("cpu")) is None
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert isinstance(T.for_training(None, torch.device("meta")), T.Pinned)  # not a CPU: untouched


def test_auto_on_cpu_starts_from_the_idle_cores(tmp_path, monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    tuner_ = T.for_training(None, torch.device("cpu"), main=False, machine=FakeMachine(busy=1.0, own=0.0))
    assert isinstance(tuner_, T.ThreadTuner) and tuner_.threads == 1 and torch.get_num_threads() == 1
    assert T.for_inference(torch.device("cpu"), say=None, machine=FakeMachine(busy=0.0, own=0.0)) == 2
    assert torch.get_num_threads() == 2


# ----------------------------------------------------------------------------- same results


class Switching:
    """Stands in for the tuner: changes the thread count before every step (1, 2, 1, ...)."""

    def __init__(self):
        self.n = 0

    def begin(self):
        self.n += 1
        torch.set_num_threads(1 + self.n % 2)

    def end(self, tokens):
        pass


@pytest.fixture(scope="module")
def wider_model_dir(tmp_path_factory, tiny_tokenizer):
    """Wide enough (n_embd 128) that torch's kernels split work between threads."""
    from conftest import build_model_dir

    return build_model_dir(tmp_path_factory.mktemp("wide"), tiny_tokenizer, n_embd=128, n_head=4)


def train_with(model_dir, data, out, threads):
    from conftest import train_config
    from sftune.console import read_metrics
    from sftune.training import train

    cfg = train_config(model_dir, data, out, **{"train.max_steps": 4, "train.batch_size": 8,
                                                "train.num_threads": threads if isinstance(threads, int) else None,
                                                "eval.samples": 0})
    train(cfg)
    losses = [m["loss"] for m in read_metrics(out) if "loss" in m and not m.get("final")]
    from safetensors.torch import load_file

    return losses, load_file(str(out / "model.safetensors"))


def test_same_results_for_any_thread_count(wider_model_dir, qa_rows_file, tmp_path, monkeypatch, restore_threads):
    """torch promises fp32 rounding, not bits, across thread counts (pytorch#88718): the losses agree
    to fp32 rounding; the weights to rounding as AdamW scales it (a near-zero gradient's rounding can
    move its update by up to lr), here well under 1% of lr = 1e-3 per step."""
    one = train_with(wider_model_dir, qa_rows_file, tmp_path / "a", 1)
    two = train_with(wider_model_dir, qa_rows_file, tmp_path / "b", 2)
    monkeypatch.setattr(T, "for_training", lambda *a, **k: Switching())
    switching = train_with(wider_model_dir, qa_rows_file, tmp_path / "c", None)

    for other in (two, switching):
        assert other[0] == pytest.approx(one[0], rel=1e-5, abs=1e-6)
        for k in one[1]:
            torch.testing.assert_close(other[1][k], one[1][k], rtol=1e-5, atol=1e-5)


def test_generation_same_for_any_thread_count(wider_model_dir, restore_threads):
    """Greedy generation (sftune generate / eval / chat, the dashboard's chat) picks the same tokens
    at 1 and 2 threads."""
    from sftune.generation import generate
    from sftune.model import load_pretrained

    model, tok = load_pretrained(str(wider_model_dir))
    prompts = ["### Question: What is the capital", "def add(a, b):", "The quick brown"]
    outs = []
    for n in (1, 2):
        torch.set_num_threads(n)
        outs.append(generate(model.eval(), tok, prompts, max_new_tokens=12, batch_size=3))
    assert outs[0] == outs[1]
