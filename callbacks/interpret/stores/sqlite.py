"""The default latent store: one embedded SQLite file, no server."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from neurolight.callbacks.interpret.stores.base import DOCUMENT_FIELDS, LatentStore, check_same_sae


class SQLiteStore(LatentStore):
    def __init__(self, path: str = "interpretations.sqlite", timeout: float = 60.0) -> None:
        """
        Args:
            path: SQLite file (created with its folder). One table ``latents`` holds every SAE, keyed by
                (``sae``, ``latent``); table ``saes`` keeps each SAE's metadata. Read it with
                ``sqlite3 <path> "select latent, score, explanation from latents where sae = '<index>'"``.
            timeout: Seconds a writer waits for the file lock (DDP ranks write to the same file).
        """
        self.path = path
        self.timeout = timeout
        self._db: sqlite3.Connection | None = None

    def __repr__(self) -> str:
        return f"SQLiteStore(path={self.path!r})"

    def open(self, index: str, metadata: dict) -> None:
        file = Path(self.path).expanduser()
        file.parent.mkdir(parents=True, exist_ok=True)
        self.close()
        self._db = sqlite3.connect(file, timeout=self.timeout)
        self._db.execute("PRAGMA journal_mode=WAL")  # readers (the browser, a user's query) never block a writer
        with self._db:
            self._db.execute("CREATE TABLE IF NOT EXISTS saes (sae TEXT PRIMARY KEY, metadata TEXT NOT NULL)")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS latents (sae TEXT NOT NULL, model TEXT, layer INTEGER, layer_type TEXT, "
                "latent INTEGER NOT NULL, explanation TEXT, score REAL, detection_score REAL, frequency REAL, "
                "max_activation REAL, top_tokens TEXT, explainer TEXT, updated_at TEXT, PRIMARY KEY (sae, latent))"
            )
            row = self._db.execute("SELECT metadata FROM saes WHERE sae = ?", (index,)).fetchone()
            check_same_sae(f"table entry '{index}' of {file}", json.loads(row[0]) if row else None, metadata)
            self._db.execute(
                "INSERT INTO saes VALUES (?, ?) ON CONFLICT(sae) DO UPDATE SET metadata = excluded.metadata",
                (index, json.dumps(metadata, default=str)),
            )
        self.index = index

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("SQLiteStore is not open; call open(index, metadata) first")
        return self._db

    def stored_latents(self) -> set[int]:
        rows = self._connection().execute("SELECT latent FROM latents WHERE sae = ?", (self.index,))
        return {int(latent) for (latent,) in rows}

    def upsert(self, documents: list[dict]) -> None:
        columns = ", ".join(DOCUMENT_FIELDS)
        updates = ", ".join(
            f"{field} = excluded.{field}" for field in DOCUMENT_FIELDS if field not in ("sae", "latent")
        )
        rows = [
            tuple(json.dumps(doc[f]) if f == "top_tokens" else doc[f] for f in DOCUMENT_FIELDS) for doc in documents
        ]
        with self._connection() as db:
            db.executemany(
                f"INSERT INTO latents ({columns}) VALUES ({', '.join('?' * len(DOCUMENT_FIELDS))}) "
                f"ON CONFLICT(sae, latent) DO UPDATE SET {updates}",
                rows,
            )

    def documents(self) -> list[dict]:
        cursor = self._connection().execute(
            f"SELECT {', '.join(DOCUMENT_FIELDS)} FROM latents WHERE sae = ? ORDER BY latent", (self.index,)
        )
        documents = [dict(zip(DOCUMENT_FIELDS, row)) for row in cursor]
        for doc in documents:
            doc["top_tokens"] = json.loads(doc["top_tokens"])
        return documents

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def describe(self) -> str:
        return f"SQLite {Path(self.path).expanduser()} (sae = '{self.index}')"
