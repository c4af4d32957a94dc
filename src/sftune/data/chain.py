"""The data chain behind one seam: :func:`prepare` a run's examples, :func:`plan` its batches.

Training, ``sftune preview``, eval loss and the TRL fronts call these two functions and nothing
else of the chain, so they cannot disagree about the data.

:func:`prepare` chooses the chain's first stages from the config, resolves the sources once
(:func:`~sftune.data.mixture.resolve_sources`) and returns a
:class:`~sftune.data.one_source.PreparedData` either way:

* one source (the top-level ``data.*`` keys): :func:`sftune.data.one_source.prepare_data`;
* ``data.sources``: each source through ``prepare_data`` (cached), then one epoch of the mixture
  (:mod:`sftune.data.mixture`, where the semantics are written down);
* ``data.streaming``: the first window of the stream (:mod:`sftune.data.stream`) and the factory
  of the run's streams; the batches then come from a stream itself.

:func:`plan` turns prepared data into a :class:`DataPlan`: this rank's batches of a step, the data
position in checkpoints and its restore, the report (packing, per-source accounting), and the
run's progress through the data (the epoch; a stream has none: examples and tokens seen).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sftune.config import DataConfig
from sftune.data.formats import Format
from sftune.data.mixture import fill_trained, mix_prepared, resolve_sources
from sftune.data.packing import Batches, BatchPlan
from sftune.data.one_source import PreparedData, describe_plan, prepare_data
from sftune.data.position import restore_position, save_position, signature
from sftune.data.sources import Source
from sftune.data.stream import StreamBatches, prepare_stream
from sftune.errors import ConfigError


def prepare(cfg: DataConfig, tokenizer, max_length: int, *, source: Source | None = None,
            fmt: Format | None = None, seed: int = 42) -> PreparedData:
    """The run's data as configured; ``seed`` is ``train.seed`` (the mixture's and the stream's).
    ``source`` / ``fmt`` (the Python front-ends' rows and format) apply to one source only."""
    if (cfg.sources or cfg.streaming) and (source is not None or fmt is not None):
        raise ConfigError("data.sources and data.streaming read the data from the config: do not pass rows or a "
                          "format from Python as well (give them as data.sources entries)")
    if not (cfg.sources or cfg.streaming):
        return prepare_data(cfg, tokenizer, max_length, source=source, fmt=fmt)
    specs = resolve_sources(cfg)  # once: the stream, the mixture and the signature read the same specs
    if cfg.streaming:
        data = prepare_stream(cfg, tokenizer, max_length, seed, specs)
    else:
        prepared = [prepare_data(spec.cfg, tokenizer, max_length) for spec in specs]
        train, eval_set, report, eval_report = mix_prepared(prepared, specs, seed)
        data = PreparedData(train, eval_set, report, eval_report, prepared[0].fmt, prepared[0].source, max_length,
                            formats=[p.fmt for p in prepared])
    data.signature = signature(specs, tokenizer, max_length, cfg, seed)
    return data


@dataclass
class DataPlan:
    """A run's data from the first step to the last: built by :func:`plan`."""

    data: PreparedData
    plan: BatchPlan
    """The batch plan (steps, micro-batches, row layout); a stream's describes its first window."""
    batches: Batches | StreamBatches
    """This rank's micro-batches of a step."""
    total_steps: int

    @property
    def report(self):
        return self.data.report

    @property
    def streamed(self) -> bool:
        return isinstance(self.batches, StreamBatches)

    def __call__(self, step: int) -> list:
        """This rank's micro-batches (:class:`~sftune.data.packing.Batch`) of optimizer step ``step``."""
        return self.batches(step)

    def rows(self, step: int):
        """Step ``step``'s example set and this rank's micro-batches, each as rows of example indices:
        what :meth:`__call__` collates (preview shows these)."""
        return self.batches.rows(step)

    def epoch(self, step: int) -> float | None:
        """Epochs done after ``step`` steps (None for a stream: it has no length)."""
        return None if self.streamed else step / self.plan.steps_per_epoch

    def progress(self, step: int) -> dict:
        """How far the run is through its data, for the metrics: the epoch, or for a stream the
        examples and tokens trained so far."""
        return self.batches.seen() if self.streamed else {"epoch": round(self.epoch(step), 4)}

    def position_files(self, step: int) -> dict[str, bytes]:
        """Files for the checkpoint of ``step``: the data position (:mod:`sftune.data.position`)."""
        state = self.batches.state_at(step) if self.streamed else None
        return save_position(self.data.signature, state, step)

    def restore(self, checkpoint: str | Path, step: int) -> None:
        """Refuse a resume whose data changed; continue a stream from its checkpoint's position."""
        state = restore_position(self.data.signature, checkpoint)
        if self.streamed:
            self.batches.restore(state, step)

    def finish(self) -> list[dict] | None:
        """A streamed run's report from what it read and trained; its per-source lines (None in memory)."""
        if not self.streamed:
            return None
        self.batches.fill_report(self.data.report)
        return self.data.report.sources


def require_steps(cfg) -> None:
    """Refuse to train a stream without ``train.max_steps`` (a stream has no length to count epochs in)."""
    if cfg.data.streaming and cfg.train.max_steps is None:
        raise ConfigError("data.streaming=true needs train.max_steps (a stream has no length to count epochs "
                          "in): set train.max_steps=N")


def plan(cfg, data: PreparedData, pad_id: int, *, layout: str = "rows", rank: int = 0, world: int = 1,
         hidden_size: int = 768, bucket: int = 0, training: bool = True) -> DataPlan:
    """The :class:`DataPlan` of ``data`` (from :func:`prepare`) for this rank, under ``cfg`` (a
    :class:`~sftune.config.Config`), with the row ``layout`` the model takes (``sftune.probe``).
    Fills the report's packing figures and, for a mixture, what each source trains. ``training``
    False (preview) lets a stream go without ``train.max_steps``: nothing is trained."""
    t = cfg.train
    if training:
        require_steps(cfg)
    batch_plan = BatchPlan.build(data.train.lengths, batch_size=t.batch_size, grad_accum=t.grad_accum,
                                 world_size=world, packing=cfg.data.packing, max_length=data.max_length,
                                 seed=t.seed, layout=layout, hidden_size=hidden_size, bucket=bucket)
    describe_plan(data.report, batch_plan)
    total_steps = batch_plan.total_steps(t.max_steps, t.epochs)
    if data.stream is not None:
        batches = StreamBatches(data.stream(), batch_plan, pad_id, rank, world)
    else:
        fill_trained(data.report, batch_plan, data.train, total_steps)  # per source of data.sources
        batches = Batches(batch_plan, data.train, pad_id, rank, world)
    return DataPlan(data, batch_plan, batches, total_steps)
