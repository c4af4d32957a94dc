"""Data stages: sources -> formats -> tokenize -> packing, each usable on its own.

``prepare_data`` (in :mod:`sftune.data.one_source`) runs them all.
"""

from sftune.data.formats import FormattedExample, choose_format
from sftune.data.packing import BatchPlan, best_fit_decreasing, collate
from sftune.data.one_source import PreparedData, TokenizedSet, prepare_data
from sftune.data.report import DataReport
from sftune.data.sources import load_source

__all__ = ["BatchPlan", "DataReport", "FormattedExample", "PreparedData", "TokenizedSet", "best_fit_decreasing",
           "choose_format", "collate", "load_source", "prepare_data"]
