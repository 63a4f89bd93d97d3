"""The default latent store: one embedded SQLite file, no server."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from neurolight.callbacks.interpret.stores.base import (
    LatentStore,
    LatentStoreError,
    check_same_sae,
    merge_scorers,
    scorers_of,
)

# The fields' Elasticsearch types as SQLite column types (a keyword list, top_tokens, is stored as JSON text).
_SQL_TYPES = {
    "keyword": "TEXT",
    "text": "TEXT",
    "date": "TEXT",
    "integer": "INTEGER",
    "float": "REAL",
    "double": "REAL",
}


class SQLiteStore(LatentStore):
    def __init__(self, path: str = "interpretations.sqlite", timeout: float = 60.0) -> None:
        """
        Args:
            path: SQLite file (created with its folder). One table ``latents`` holds every SAE, keyed by
                (``sae``, ``latent``), with a column per document field (those of every scorer that ran); table
                ``saes`` keeps each SAE's metadata, with the scorers. Read it with
                ``sqlite3 <path> "select latent, score, explanation from latents where sae = '<index>'"``.
            timeout: Seconds a writer waits for the file lock (DDP ranks write to the same file).
        """
        self.path = path
        self.timeout = timeout
        self._db: sqlite3.Connection | None = None

    def __repr__(self) -> str:
        return f"SQLiteStore(path={self.path!r})"

    def open(self, index: str, metadata: dict, create: bool = True) -> None:
        file = Path(self.path).expanduser()
        if not create and not file.is_file():
            raise LatentStoreError(f"no SQLite store at {file}; interpret the latents first")
        file.parent.mkdir(parents=True, exist_ok=True)
        self.close()
        self._db = sqlite3.connect(file, timeout=self.timeout)
        self._db.execute("PRAGMA journal_mode=WAL")  # readers (the browser, a user's query) never block a writer
        with self._db:
            if create:
                self._db.execute("CREATE TABLE IF NOT EXISTS saes (sae TEXT PRIMARY KEY, metadata TEXT NOT NULL)")
            stored = self._stored_metadata(index)
            check_same_sae(f"table entry '{index}' of {file}", stored, metadata)
            if not create:
                if stored is None:
                    raise LatentStoreError(f"{file} holds no SAE '{index}'; interpret its latents first")
                self.scorers = scorers_of(stored)
            else:
                self.scorers = merge_scorers(stored, metadata)
                self._create_columns()
                self._db.execute(
                    "INSERT INTO saes VALUES (?, ?) ON CONFLICT(sae) DO UPDATE SET metadata = excluded.metadata",
                    (index, json.dumps({**metadata, "scorers": self.scorers}, default=str)),
                )
        self.index = index

    def _stored_metadata(self, index: str) -> dict | None:
        if not self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'saes'").fetchone():
            return None
        row = self._db.execute("SELECT metadata FROM saes WHERE sae = ?", (index,)).fetchone()
        return json.loads(row[0]) if row else None

    def _create_columns(self) -> None:
        """The ``latents`` table with a column per field; columns of scorers new to the file are added."""
        columns = {name: _SQL_TYPES[kind] for name, kind in self.fields.items()}
        columns["sae"] += " NOT NULL"
        columns["latent"] += " NOT NULL"
        self._db.execute(
            f"CREATE TABLE IF NOT EXISTS latents ({', '.join(f'{n} {t}' for n, t in columns.items())}, "
            "PRIMARY KEY (sae, latent))"
        )
        present = {row[1] for row in self._db.execute("PRAGMA table_info(latents)")}
        for name, kind in self.fields.items():
            if name not in present:
                self._db.execute(f"ALTER TABLE latents ADD COLUMN {name} {_SQL_TYPES[kind]}")

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("SQLiteStore is not open; call open(index, metadata) first")
        return self._db

    def stored_latents(self) -> set[int]:
        rows = self._connection().execute("SELECT latent FROM latents WHERE sae = ?", (self.index,))
        return {int(latent) for (latent,) in rows}

    def upsert(self, documents: list[dict]) -> None:
        self._check_fields(documents)
        fields = list(self.fields)
        updates = ", ".join(f"{field} = excluded.{field}" for field in fields if field not in ("sae", "latent"))
        rows = [tuple(json.dumps(doc[f]) if f == "top_tokens" else doc.get(f) for f in fields) for doc in documents]
        try:
            with self._connection() as db:  # one transaction: a failed batch leaves the file as it was
                db.executemany(
                    f"INSERT INTO latents ({', '.join(fields)}) VALUES ({', '.join('?' * len(fields))}) "
                    f"ON CONFLICT(sae, latent) DO UPDATE SET {updates}",
                    rows,
                )
        except sqlite3.OperationalError as error:  # "database or disk is full", "attempt to write a readonly ..."
            raise LatentStoreError(
                f"SQLite store {Path(self.path).expanduser()} refused a write ({error}); free space or fix the "
                "file's permissions, then rerun: stored latents are kept and skipped"
            ) from error

    def documents(self) -> list[dict]:
        db = self._connection()
        # A reader leaves an older file as it is: a field its table lacks (one a scorer gained later) reads as None.
        present = {row[1] for row in db.execute("PRAGMA table_info(latents)")}
        fields = list(self.fields)
        columns = ", ".join(field if field in present else f"NULL AS {field}" for field in fields)
        cursor = db.execute(f"SELECT {columns} FROM latents WHERE sae = ? ORDER BY latent", (self.index,))
        documents = [dict(zip(fields, row)) for row in cursor]
        for doc in documents:
            doc["top_tokens"] = json.loads(doc["top_tokens"])
        return documents

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def describe(self) -> str:
        return f"SQLite {Path(self.path).expanduser()} (sae = '{self.index}')"
