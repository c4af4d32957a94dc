"""The data of a run: one source, a weighted mixture of sources, or a stream.

:func:`prepare` is what training and ``sftune preview`` call. It chooses the chain's first stages
from the config and returns a :class:`~sftune.data.pipeline.PreparedData` either way:

* one source (the top-level ``data.*`` keys): :func:`sftune.data.pipeline.prepare_data`;
* ``data.sources``: each source through ``prepare_data`` (cached), then one epoch of the mixture
  (:mod:`sftune.data.mixture`, where the semantics are written down);
* ``data.streaming``: the first window of the stream (:mod:`sftune.data.stream`); the batches
  then come from the stream itself.
"""

from __future__ import annotations

from sftune.config import DataConfig
from sftune.data.formats import Format
from sftune.data.mixture import mix_prepared, resolve_sources
from sftune.data.pipeline import PreparedData, prepare_data
from sftune.data.position import signature
from sftune.data.sources import Source
from sftune.data.stream import prepare_stream
from sftune.errors import ConfigError


def prepare(cfg: DataConfig, tokenizer, max_length: int, *, source: Source | None = None,
            fmt: Format | None = None, seed: int = 42) -> PreparedData:
    """The run's data as configured; ``seed`` is ``train.seed`` (the mixture's and the stream's).
    ``source`` / ``fmt`` (the Python front-ends' rows and format) apply to one source only."""
    if (cfg.sources or cfg.streaming) and (source is not None or fmt is not None):
        raise ConfigError("data.sources and data.streaming read the data from the config: do not pass rows or a "
                          "format from Python as well (give them as data.sources entries)")
    if cfg.streaming:
        data = prepare_stream(cfg, tokenizer, max_length, seed)
    elif cfg.sources:
        specs = resolve_sources(cfg)
        prepared = [prepare_data(spec.cfg, tokenizer, max_length) for spec in specs]
        train, eval_set, report, eval_report = mix_prepared(prepared, specs, seed)
        data = PreparedData(train, eval_set, report, eval_report, prepared[0].fmt, prepared[0].source, max_length)
    else:
        return prepare_data(cfg, tokenizer, max_length, source=source, fmt=fmt)
    data.signature = signature(resolve_sources(cfg), tokenizer, max_length, cfg, seed)
    return data
