"""Where interpreted latents go: an embedded SQLite file (the default, no server) or an Elasticsearch index.

Both stores hold one document per latent of one SAE, keyed by the latent index, so writing a latent again updates
it (a rerun or a resumed run never fails on an existing id)::

    {"sae": index, "model": str, "layer": int, "layer_type": str, "latent": int, "explanation": str,
     <the fields of the scorers that ran, e.g. "score": float | None, "detection_score": float | None>,
     "frequency": float, "max_activation": float, "top_tokens": [str], "explainer": str, "updated_at": ISO-8601 str}

The SAE's stored metadata names the scorers (``scorers``) whose fields the index holds: a run adds its own to those
already there, and the SQLite columns, the Elasticsearch mapping, the documents and the feature browser's columns
all follow from that list (``field_types``). A store written before scorers were recorded holds the fields of
``LEGACY_SCORERS``. A field that a scorer gained after a store was written (``detection_auroc``) is added to the
columns (mapping) by the next run that writes; until then, and in the documents written before, it reads as None.

Naming, documents and the store interface are here; the backends are ``sqlite.py`` and ``elasticsearch.py``.
"""

from __future__ import annotations

import json
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from neurolight.lightning_modules.interpret.scorers import score_fields

_LEADING_FIELDS = {
    "sae": "keyword",
    "model": "keyword",
    "layer": "integer",
    "layer_type": "keyword",
    "latent": "integer",
    "explanation": "text",
}
_TRAILING_FIELDS = {
    "frequency": "double",
    "max_activation": "float",
    "top_tokens": "keyword",
    "explainer": "keyword",
    "updated_at": "date",
}
LEGACY_SCORERS = ("simulation", "detection")
"""The scorers of a store whose metadata names none: stores written before scorers were recorded had the fixed
fields ``score`` and ``detection_score``, these scorers' fields but for the later ``detection_auroc``."""
# Elasticsearch rejects these in index names (plus upper case and a leading '-', '_' or '+').
_BAD_INDEX_CHARS = re.compile(r'[\\/*?"<>| ,#:]+')


class LatentStoreError(RuntimeError):
    """A store could not be reached or refused a request; the message is one line and never holds a secret."""


def check_same_sae(where: str, stored: dict | None, metadata: dict) -> None:
    """Refuse to add one SAE's interpretations to an index that holds another SAE's: the index name comes from
    hyperparameters, so two checkpoints of one run share it, and a rerun would skip latents explained for the
    other one."""
    old, new = (stored or {}).get("sae_fingerprint"), metadata.get("sae_fingerprint")
    if old and new and old != new:
        raise LatentStoreError(
            f"{where} holds the interpretations of another SAE ({stored.get('sae_checkpoint')}, fingerprint {old}); "
            f"this run interprets {metadata.get('sae_checkpoint')} (fingerprint {new}): delete that index, use "
            "another store, or give this SAE its own index with InterpretationWriter.index_name"
        )


def _short_float(value: float) -> str:
    """``2e-4`` rather than ``0.0002``, ``0.5`` rather than ``5e-1``: the way run names spell hyperparameters."""
    value = float(value)
    if value == 0 or 1e-2 <= abs(value) < 1e4:
        return f"{value:.4g}"
    mantissa, exponent = f"{value:.3e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def sae_index_name(metadata: dict) -> str:
    """The index (or SQLite ``sae`` key) of one SAE, from interpretation-samples metadata, e.g.
    ``smollm2-135m_mlp_sublayer_l15_576x2304_lr2e-4_spar0.5_topk``:
    model (last part of its name or path), layer type, layer, d_in x d_sae, learning rate, l1 coefficient
    (``spar``) and the architecture when known; lowercase, only characters Elasticsearch accepts."""
    required = ("model_name", "layer_type", "layer_id", "d_in", "d_sae")
    missing = [key for key in required if metadata.get(key) is None]
    if missing:
        raise ValueError(f"cannot name the SAE's index: metadata lacks {missing} (have {sorted(metadata)})")
    model = Path(str(metadata["model_name"]).rstrip("/")).name
    parts = [model, metadata["layer_type"], f"l{int(metadata['layer_id'])}", f"{metadata['d_in']}x{metadata['d_sae']}"]
    if metadata.get("learning_rate") is not None:
        parts.append(f"lr{_short_float(metadata['learning_rate'])}")
    if metadata.get("l1_coefficient") is not None:
        parts.append(f"spar{_short_float(metadata['l1_coefficient'])}")
    if metadata.get("architecture"):
        parts.append(str(metadata["architecture"]))
    if metadata.get("sae_name"):  # a member of a sweep: its siblings may share every setting above
        parts.append(str(metadata["sae_name"]))
    name = _BAD_INDEX_CHARS.sub("-", "_".join(str(part) for part in parts).lower()).lstrip("-_+.")
    return name.encode()[:255].decode(errors="ignore")


def scorers_of(metadata: dict | None) -> list[str]:
    """The scorers that an SAE's metadata names (``LEGACY_SCORERS`` when it names none)."""
    return list((metadata or {}).get("scorers", LEGACY_SCORERS))


def merge_scorers(stored: dict | None, metadata: dict) -> list[str]:
    """The scorers of an index once a run has opened it: those already stored, then the run's new ones (a new
    index: the run's)."""
    if stored is None:
        return scorers_of(metadata)
    return list(dict.fromkeys([*scorers_of(stored), *metadata.get("scorers", [])]))


def field_types(scorers: Sequence[str]) -> dict[str, str]:
    """Fields of a document and their Elasticsearch types: the SAE and latent, the scorers' fields in order, then
    the latent's statistics."""
    fields = {field.name: field.type for field in score_fields(scorers)}
    clash = sorted(set(fields) & (set(_LEADING_FIELDS) | set(_TRAILING_FIELDS)))
    if clash:
        raise ValueError(f"scorers {list(scorers)} write the document's own fields {clash}; rename their fields")
    return {**_LEADING_FIELDS, **fields, **_TRAILING_FIELDS}


def to_document(interpretation: dict, index: str, metadata: dict) -> dict:
    """A store document from one interpretation (the interpreter's ``predict_step`` dict) with the fields of the
    scorers that ``metadata`` names; NaN becomes None."""

    def number(value) -> float | None:
        return None if value is None or not math.isfinite(float(value)) else float(value)

    scores = {field.name: number(interpretation[field.name]) for field in score_fields(scorers_of(metadata))}
    return {
        "sae": index,
        "model": str(metadata["model_name"]),
        "layer": int(metadata["layer_id"]),
        "layer_type": str(metadata["layer_type"]),
        "latent": int(interpretation["latent"]),
        "explanation": str(interpretation["explanation"]),
        **scores,
        "frequency": float(interpretation["frequency"]),
        "max_activation": float(interpretation["max_activation"]),
        "top_tokens": [str(token) for token in interpretation["top_tokens"]],
        "explainer": str(interpretation["explainer"]),
        "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


class LatentStore(ABC):
    """One document per latent of the SAE opened with :meth:`open`; :meth:`upsert` replaces by latent."""

    index: str | None = None
    scorers: Sequence[str] = ()
    """The scorers whose fields the open index holds (set by :meth:`open`)."""

    @property
    def fields(self) -> dict[str, str]:
        """Fields of the open index's documents and their types (``field_types`` of ``scorers``)."""
        return field_types(self.scorers)

    @abstractmethod
    def open(self, index: str, metadata: dict, create: bool = True) -> None:
        """Connect and create the SAE's index/table if it does not exist yet, with the fields of the scorers that
        ``metadata`` names added to those it has. ``create=False`` (a reader): leave the store as it is, and fail
        when the index does not exist."""

    @abstractmethod
    def stored_latents(self) -> set[int]:
        """Latents that already have a document."""

    @abstractmethod
    def upsert(self, documents: list[dict]) -> None:
        """Insert or replace documents (id = latent); a field the document lacks becomes None."""

    @abstractmethod
    def documents(self) -> list[dict]:
        """Every document of the open index, sorted by latent, with every field of ``fields`` (None where unset)."""

    def _check_fields(self, documents: list[dict]) -> None:
        unknown = sorted({key for doc in documents for key in doc} - set(self.fields))
        if unknown:
            raise ValueError(
                f"documents carry fields {unknown} that index '{self.index}' (scorers {list(self.scorers)}) lacks; "
                "open it with metadata whose 'scorers' name the scorers that wrote them"
            )

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def describe(self) -> str:
        """Where the documents are, for messages (never a secret)."""


def one_line(value) -> str:
    return " ".join(str(value).split())


def json_safe(value):
    """JSON-safe metadata (paths and other objects as strings)."""
    return json.loads(json.dumps(value, default=str))
