"""CPU threads: as many as the machine gives now, measured, and re-checked during the run.

torch starts one OpenMP thread per core and every parallel region waits for its slowest thread.
When another process holds a core (a browser, a second notebook kernel, a parallel test run), the
thread on that core is descheduled and each of the thousands of parallel regions in a step waits
for it: the quickstart beside one busy loop ran at 0.05-0.21x its speed alone with torch's
default, and at ~0.7x with one thread fewer. So on CPU, with ``train.num_threads`` unset, sftune:

1. **starts from the idle cores**: the CPUs this process may run on (``os.sched_getaffinity``),
   capped by the cgroup CPU quota (``cpu.max``, or v1 ``cpu.cfs_quota_us``), less what other
   processes keep busy on them (``/proc/stat`` busy time over 0.25 s minus this process's own,
   from ``/proc/self/stat``; niced processes' time counts as free, they yield to us;
   ``os.getloadavg`` where there is no ``/proc``);
2. **measures the first steps** (seconds per trained token; the run's first step is warm-up) at
   that count, at one fewer when other processes use the CPU, and at one more when half a core
   beyond it looks idle, and keeps the fastest (within 5%, the fewest: gentler on the neighbours).
   A count is measured for 3 steps and 0.3 s, or one step of 2 s, and dropped after one step
   twice as slow as the best so far (and not tried again for 60 s, then 120 s, ...), so a bad
   count costs one step;
3. **re-checks** when steps get 1.5x slower than at the choice (a neighbour started), or, every
   30 s, when a core sits idle while we use fewer threads than we may (a neighbour left).

It says what it chose, and why, in one line. ``train.num_threads=N``, or ``OMP_NUM_THREADS`` in
the environment, pins the count and nothing is measured. On a GPU nothing changes.

**Results do not depend on the thread count beyond fp32 rounding.** torch does not promise
bit-equal results across thread counts (pytorch/pytorch#88718: MKL/oneDNN GEMM blocking and
ATen's parallel reductions split work by thread count, so the summation order changes), only the
usual fp32 rounding of a different order. Random numbers do not depend on it (CPU dropout draws
from one generator, skipping ahead per chunk). ``tests/test_threads.py`` trains a small model at
1 and 2 threads, and with the count switched every step: the losses agree to 1e-5 relative, the
weights to 1e-5 absolute after 4 AdamW steps at lr 1e-3 (AdamW divides by the gradient's scale, so
a near-zero gradient's rounding shows in its update). One count, run twice, is bit-exact. Over a
long run such rounding differences grow as any fp32 nondeterminism does: the runs stay
statistically the same, not bit-equal.

Inference (``sftune generate``, ``eval``, ``chat``, the dashboard's chat) starts from the idle
cores too (:func:`for_inference`); ``preview`` runs no torch computation.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# ----------------------------------------------------------------------------- what the machine gives


@dataclass(frozen=True)
class Sample:
    """One reading: per-CPU (busy, total) jiffies from ``/proc/stat`` and this process's jiffies."""

    cpus: dict[int, tuple[int, int]]
    own: int


def parse_proc_stat(text: str) -> dict[int, tuple[int, int]]:
    """``cpuN user nice system idle iowait irq softirq steal ...`` lines -> {N: (busy, total)}.
    Busy is user + system + irq + softirq + steal: idle and iowait are free, and so is ``nice``
    time (processes that lowered their priority yield the core to us); guest time is already
    inside user time and is not added twice."""
    cpus = {}
    for line in text.splitlines():
        parts = line.split()
        if not parts or not parts[0].startswith("cpu") or parts[0] == "cpu":
            continue
        try:
            n = int(parts[0][3:])
            values = [int(v) for v in parts[1:9]]
        except ValueError:
            continue
        total = sum(values)
        free = values[1] + values[3] + (values[4] if len(values) > 4 else 0)
        cpus[n] = (total - free, total)
    return cpus


def parse_self_stat(text: str) -> int:
    """utime + stime (jiffies, all threads) from ``/proc/self/stat``; the name may hold spaces."""
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of the whole line


def parse_cgroup_quota(cpu_max: str | None = None, cfs_quota: str | None = None,
                       cfs_period: str | None = None) -> float | None:
    """Cores allowed by a cgroup CPU quota: v2 ``cpu.max`` ("max 100000" or "150000 100000"), or
    v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota -1: none). ``None``: no quota."""
    try:
        if cpu_max is not None:
            quota, period = (cpu_max.split() + ["100000"])[:2]
            return None if quota == "max" else int(quota) / int(period)
        if cfs_quota is not None and cfs_period is not None:
            quota = int(cfs_quota)
            return None if quota <= 0 else quota / int(cfs_period)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def others_busy(a: Sample, b: Sample, cpus: set[int]) -> float | None:
    """Cores' worth of CPU time that other processes used on ``cpus`` between two samples."""
    busy = total = 0
    for n in cpus:
        if n in a.cpus and n in b.cpus:
            busy += b.cpus[n][0] - a.cpus[n][0]
            total += b.cpus[n][1] - a.cpus[n][1]
    seen = sum(1 for n in cpus if n in a.cpus and n in b.cpus)
    if not seen or total <= 0:
        return None
    per_cpu = total / seen  # jiffies that passed on each CPU
    return max(0.0, (busy - (b.own - a.own)) / per_cpu)


class Machine:
    """Reads what the machine gives this process. ``proc`` and ``cgroup`` roots and the affinity
    set can be replaced (the tests give fake files)."""

    def __init__(self, proc: str | Path = "/proc", cgroup: str | Path = "/sys/fs/cgroup",
                 affinity: set[int] | None = None):
        self.proc, self.cgroup = Path(proc), Path(cgroup)
        if affinity is None:
            try:
                affinity = set(os.sched_getaffinity(0))
            except (AttributeError, OSError):  # not Linux
                affinity = set(range(os.cpu_count() or 1))
        self.affinity = affinity

    def _read(self, path: Path) -> str | None:
        try:
            return path.read_text()
        except OSError:
            return None

    def quota(self) -> float | None:
        return parse_cgroup_quota(self._read(self.cgroup / "cpu.max"),
                                  self._read(self.cgroup / "cpu" / "cpu.cfs_quota_us")
                                  or self._read(self.cgroup / "cpu.cfs_quota_us"),
                                  self._read(self.cgroup / "cpu" / "cpu.cfs_period_us")
                                  or self._read(self.cgroup / "cpu.cfs_period_us"))

    def capacity(self) -> float:
        """Cores this process may use: its CPUs, capped by the cgroup quota."""
        quota = self.quota()
        return min(float(len(self.affinity)), quota) if quota else float(len(self.affinity))

    def sample(self) -> Sample | None:
        stat, own = self._read(self.proc / "stat"), self._read(self.proc / "self" / "stat")
        if stat is None or own is None:
            return None
        try:
            return Sample(parse_proc_stat(stat), parse_self_stat(own))
        except (ValueError, IndexError):
            return None

    def loadavg(self) -> float | None:
        text = self._read(self.proc / "loadavg")
        try:
            return float(text.split()[0]) if text else os.getloadavg()[0]
        except (ValueError, IndexError, OSError, AttributeError):
            return None


@dataclass
class Estimate:
    """Idle cores now, and how that was worked out (for the one-line message)."""

    idle: float
    capacity: float
    busy: float | None
    source: str

    def why(self) -> str:
        cap = f"{self.capacity:g} core{'s' if self.capacity != 1 else ''}"
        if self.busy is None:
            return f"{cap}, load unknown"
        return f"{cap}, other processes busy on {self.busy:.1f} ({self.source})"


def estimate_idle(machine: Machine, window_s: float = 0.25, sleep: Callable[[float], None] = time.sleep,
                  since: Sample | None = None) -> tuple[Estimate, Sample | None]:
    """Idle cores: capacity less the other processes' busy time over ``window_s`` (or since the
    sample ``since``, without waiting). Also returns the newest sample, for the next call."""
    capacity = machine.capacity()
    first = since or machine.sample()
    if first is not None:
        if since is None:
            sleep(window_s)
        second = machine.sample()
        busy = others_busy(first, second, machine.affinity) if second is not None else None
        if busy is not None:
            return Estimate(max(0.0, min(capacity, len(machine.affinity) - busy)), capacity, busy, "/proc/stat"), \
                second
    load = machine.loadavg()  # includes this process's own runnable thread
    if load is not None:
        busy = max(0.0, load - 1.0)
        return Estimate(max(0.0, min(capacity, len(machine.affinity) - busy)), capacity, busy, "load average"), None
    return Estimate(capacity, capacity, None, "none"), None


def threads_for(idle: float, cap: int) -> int:
    """Whole threads for ``idle`` cores, at least 1 and at most ``cap``."""
    return max(1, min(cap, math.floor(idle + 0.5)))


# ----------------------------------------------------------------------------- the choice, measured


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def candidates_for(est: Estimate | None, start: int, cap: int) -> list[int]:
    """The counts worth measuring: ``start``; one fewer when other processes use the CPU (or the
    load is unknown); one more when half a core beyond ``start`` or more looks idle (or unknown)."""
    unknown = est is None or est.busy is None
    out = [start]
    if start > 1 and (unknown or est.busy >= 0.1):
        out.append(start - 1)
    if start < cap and (unknown or est.idle - start >= 0.5):
        out.append(start + 1)
    return out


@dataclass
class ThreadTuner:
    """Picks the thread count from measured step times. The loop calls :meth:`begin` before a step
    and :meth:`end` after it (with the step's trained tokens); everything else happens in there,
    between steps. ``set_threads``, ``clock``, ``machine`` and ``say`` are replaceable (tests)."""

    cap: int
    start: int
    estimate: Estimate | None = None
    machine: Machine | None = None
    set_threads: Callable[[int], None] = _set_threads
    clock: Callable[[], float] = time.perf_counter
    say: Callable[[str], None] | None = None
    reason: str = "start"
    trial_steps: int = 3
    """Steps measured per candidate, and at least ``trial_s`` seconds of them; or one step of
    ``long_s``; or one step 2x slower than the best candidate so far (stop losing time there)."""
    trial_s: float = 0.3
    long_s: float = 2.0
    tolerance: float = 0.05
    """Within this fraction of the fastest, the fewest threads win."""
    slower: float = 1.5
    """Median of the last ``window`` steps this much slower than at the choice: re-check."""
    window: int = 5
    probe_s: float = 30.0
    """Every so often, look for an idle core while using fewer threads than ``cap``."""
    min_gap_steps: int = 10

    threads: int = 0
    phase: str = "trial"
    candidates: list[int] = field(default_factory=list)
    measured: dict[int, list[tuple[float, int]]] = field(default_factory=dict)
    recent: list[float] = field(default_factory=list)
    baseline: float = math.inf
    warm: bool = False
    since_check: int = 0
    history: list[tuple[int, str]] = field(default_factory=list)
    """(threads, why) for every decision, in order."""
    backoff_s: float = 60.0
    """A count found 2x slower is not tried again for this long (doubling each time it is)."""
    shunned: dict[int, tuple[float, float]] = field(default_factory=dict)
    """count -> (not before this clock time, the next back-off)."""
    _t0: float | None = None
    _last_probe: float = 0.0
    _sample: Sample | None = None
    _newer: tuple[float, Sample | None] = (0.0, None)

    def __post_init__(self):
        self.start = max(1, min(self.cap, self.start))
        self._begin_trial(candidates_for(self.estimate, self.start, self.cap), self.reason)
        self._last_probe = self.clock()
        self._sample = self.machine.sample() if self.machine else None

    # -- the loop's two calls

    def begin(self) -> None:
        self._t0 = self.clock()

    def end(self, tokens: int) -> None:
        if self._t0 is None:
            return
        self.record(self.clock() - self._t0, tokens)
        self._t0 = None

    # -- the decisions (no clock: the tests drive these directly)

    def record(self, seconds: float, tokens: int) -> None:
        """One step took ``seconds`` for ``tokens`` trained tokens at the current thread count."""
        if not self.warm:  # the run's first step pays for allocations and lazy initialisation
            self.warm = True
            return
        cost = seconds / max(tokens, 1)
        if self.phase == "trial":
            samples = self.measured.setdefault(self.threads, [])
            samples.append((seconds, tokens))
            total = sum(s for s, _ in samples)
            others = [self.cost(n) for n in self.measured if n != self.threads]
            if others and self.cost(self.threads) > 2 * min(others):  # a bad count: stop, and stay away a while
                wait = self.shunned.get(self.threads, (0.0, self.backoff_s))[1]
                self.shunned[self.threads] = (self.clock() + wait, 2 * wait)
                self._next_candidate()
            elif (len(samples) >= self.trial_steps and total >= self.trial_s) or total >= self.long_s:
                self._next_candidate()
            return
        self.since_check += 1
        self._keep_sample()
        self.recent = (self.recent + [cost])[-self.window:]
        if self.since_check < self.min_gap_steps or len(self.recent) < self.window:
            return
        median = statistics.median(self.recent)
        if median > self.slower * self.baseline:
            self._recheck(f"steps {median / self.baseline:.1f}x slower than at the choice")
        elif self.threads < self.cap and self.machine is not None and self.clock() - self._last_probe >= self.probe_s:
            self._probe()

    def _keep_sample(self) -> None:
        """Keep a machine sample 1-2 s old, so a re-check looks at the last seconds, not the run."""
        if self.machine is None:
            return
        now = self.clock()
        if now - self._newer[0] >= 1.0:
            self._sample, self._newer = self._newer[1] or self._sample, (now, self.machine.sample())

    def cost(self, n: int) -> float:
        """Median seconds per trained token measured at ``n`` threads (inf: not measured)."""
        samples = self.measured.get(n)
        return statistics.median(s / max(t, 1) for s, t in samples) if samples else math.inf

    def _begin_trial(self, candidates: list[int], reason: str) -> None:
        self.phase, self.reason, self.measured = "trial", reason, {}
        now = self.clock()
        self.candidates = [n for i, n in enumerate(candidates) if 1 <= n <= self.cap and n not in candidates[:i]
                           and (i == 0 or self.shunned.get(n, (0.0, 0.0))[0] <= now)]
        self._switch(self.candidates.pop(0))

    def _switch(self, n: int) -> None:
        if n != self.threads:
            self.set_threads(n)
        self.threads = n

    def _next_candidate(self) -> None:
        if self.candidates:
            self._switch(self.candidates.pop(0))
            return
        best = min(self.measured, key=self.cost)
        chosen = min(n for n in self.measured if self.cost(n) <= self.cost(best) * (1 + self.tolerance))
        before = self.history[-1][0] if self.history else None
        self._switch(chosen)
        self.phase, self.baseline, self.recent, self.since_check = "watch", self.cost(chosen), [], 0
        timings = ", ".join(f"{n}: {1e6 * self.cost(n):,.1f}" for n in sorted(self.measured))
        why = f"{self.reason}; measured ms per 1k tokens at {timings}" if len(self.measured) > 1 else self.reason
        self.history.append((chosen, why))
        if self.say and before != chosen:
            head = f"cpu threads: {chosen} of {self.cap}" if before is None else f"cpu threads: {before} -> {chosen}"
            self.say(f"{head} ({why})")

    def _recheck(self, reason: str) -> None:
        est, start = None, self.threads
        if self.machine is not None:
            est, self._sample = estimate_idle(self.machine, since=self._sample)
            start = threads_for(est.idle, self.cap)
            reason = f"{reason}; {est.why()}"
        self._last_probe = self.clock()
        candidates = candidates_for(est, start, self.cap)
        if self.threads not in candidates and len(candidates) < 3:
            candidates.append(self.threads)
        self._begin_trial(candidates, reason)

    def _probe(self) -> None:
        """A core idle while we use fewer threads than we may: try one more."""
        self._last_probe = self.clock()
        est, self._sample = estimate_idle(self.machine, since=self._sample)
        if est.busy is None:
            return
        # est.busy counts everyone but us; we keep about ``threads`` cores busy ourselves
        if est.capacity - est.busy - self.threads >= 0.5 and self.shunned.get(self.threads + 1, (0.0,))[0] <= self.clock():
            self._begin_trial([self.threads + 1, self.threads], f"a core became idle; {est.why()}")


class Pinned:
    """No tuning: the count was set by the user (or the device is not a CPU)."""

    def begin(self) -> None:
        pass

    def end(self, tokens: int) -> None:
        pass


def pinned_by_user(num_threads: int | None) -> int | None:
    """``train.num_threads``, else ``OMP_NUM_THREADS`` from the environment, else ``None``."""
    if num_threads:
        return num_threads
    try:
        env = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return None
    return env if env > 0 else None


def local_ranks() -> int:
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _print(message: str) -> None:
    from sftune.console import console

    console.print(message, markup=False, highlight=False)


def for_training(num_threads: int | None, device, main: bool = True, machine: Machine | None = None):
    """Set the starting thread count for a training run and return what the loop calls between
    steps: a :class:`ThreadTuner` on CPU with nothing pinned, else a :class:`Pinned` no-op. The
    main process says what it chose."""
    say = _print if main else None
    pinned = pinned_by_user(num_threads)
    if pinned:
        _set_threads(pinned)
        return Pinned()
    if getattr(device, "type", str(device)) != "cpu":
        return Pinned()
    machine = machine or Machine()
    est, _ = estimate_idle(machine)
    ranks = local_ranks()  # several CPU ranks on this machine share its cores
    cap = max(1, math.floor(est.capacity / ranks))
    start = threads_for(est.idle / ranks, cap)
    _set_threads(start)
    if cap == 1:
        return Pinned()
    return ThreadTuner(cap=cap, start=start, estimate=est, machine=machine, say=say, reason=est.why())


def for_inference(device=None, say: Callable[[str], None] | None = _print,
                  machine: Machine | None = None) -> int | None:
    """Set the thread count for generation on CPU from the idle cores (no steps to measure);
    ``OMP_NUM_THREADS`` pins it. Returns the count set, or ``None`` when nothing was changed."""
    if pinned_by_user(None) or (device is not None and getattr(device, "type", str(device)) != "cpu"):
        return None
    est, _ = estimate_idle(machine or Machine())
    n = threads_for(est.idle, max(1, math.floor(est.capacity)))
    _set_threads(n)
    if say:
        say(f"cpu threads: {n} ({est.why()})")
    return n
