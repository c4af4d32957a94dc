"""What a config key is to the rest of sftune, declared on its field in the schema.

A field's annotation carries its roles (``path: PerSource[str | None]``); :func:`sftune.config.keys_with`
lists the keys of a role. The code that needs to know (the cluster's resume check, the data
position's signature, the tokenization cache key) reads them from there, not from lists of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict

T = TypeVar("T")


@dataclass(frozen=True)
class Role:
    """A role of a config key (a marker in the field's ``Annotated`` metadata)."""

    name: str


PER_SOURCE = Role("per_source")
"""A ``data.sources`` entry may set it for itself; it is part of a source's data signature, which
a resume of a mixture or a stream must match (:mod:`sftune.data.position`)."""
TOKENIZATION = Role("tokenization")
"""It changes how rows are rendered and tokenized: part of the tokenization cache key
(:mod:`sftune.data.one_source`)."""
UNTRAINED = Role("untrained")
"""It does not change what is trained: a restart may change it and still resume (:mod:`sftune.cluster`)."""

PerSource = Annotated[T, PER_SOURCE]
Tokenizing = Annotated[T, PER_SOURCE, TOKENIZATION]
Untrained = Annotated[T, UNTRAINED]


class Section(BaseModel):
    """A config section: unknown keys refused, each field's docstring its documentation, and
    :attr:`section_roles` for roles every key of the section has (``eval``: all untrained)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)
    section_roles: ClassVar[tuple[Role, ...]] = ()
    """Roles of every key of the section."""
