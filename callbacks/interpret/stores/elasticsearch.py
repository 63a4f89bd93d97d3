"""ElasticsearchStore: one index per SAE, named by ``sae_index_name``, created with the explicit mapping
``es_mapping`` of the scorers' fields (the SAE's metadata, with the scorers, goes into the mapping's ``_meta``; a run
with scorers new to the index adds their fields to the mapping). A connection error, 429 or 5xx is retried
with exponential backoff (a certificate that fails verification is not: it fails the same way again); what still
fails raises ``LatentStoreError``, one line that says what to check and never contains the API key.
"""

from __future__ import annotations

import logging
import os
import random
import re
import ssl
import time
from pathlib import Path

from jsonargparse.typing import SecretStr

from neurolight.callbacks.interpret.stores.base import (
    LatentStore,
    LatentStoreError,
    check_same_sae,
    field_types,
    json_safe,
    merge_scorers,
    one_line,
    scorers_of,
)

RETRY_STATUSES = (429, 500, 502, 503, 504)
"""Answers worth retrying: the cluster is busy or briefly unavailable."""

log = logging.getLogger(__name__)


def es_mapping(scorers) -> dict:
    """The explicit mapping (``properties``) of an index holding the fields of ``scorers``."""
    return {"properties": {field: {"type": kind} for field, kind in field_types(scorers).items()}}


def _compat8_node_class():
    """An HTTP node that asks for the version-8 REST API: the 9.x client sends ``compatible-with=9``, which 8.x
    servers reject (``media_type_header_exception``); 8.x and 9.x servers both accept ``compatible-with=8``."""
    from elastic_transport import HttpHeaders, Urllib3HttpNode

    class Compat8HttpNode(Urllib3HttpNode):
        def perform_request(self, method, target, body=None, headers=None, **kwargs):
            if headers:
                headers = HttpHeaders(headers)
                for name in ("accept", "content-type"):
                    if name in headers:
                        headers[name] = re.sub(r"compatible-with=\d+", "compatible-with=8", headers[name])
            return super().perform_request(method, target, body=body, headers=headers, **kwargs)

    return Compat8HttpNode


class ElasticsearchStore(LatentStore):
    def __init__(
        self,
        server_address: str,
        api_key: SecretStr | str | None = None,
        api_key_env: str | None = "ES_API_KEY",
        ssl_cert: str | None = None,
        verify_certs: bool = True,
        request_timeout: float = 30.0,
        max_retries: int = 5,
        retry_backoff: float = 1.0,
        number_of_shards: int = 1,
        number_of_replicas: int | None = None,
    ) -> None:
        """
        Args:
            server_address: The server's URL with scheme and port, e.g. ``https://es.example.org:9200``.
            api_key: Elasticsearch API key (the encoded form). Shown and saved as ``**********`` in configs;
                prefer ``api_key_env`` so it is never on a command line.
            api_key_env: Environment variable read for the key when ``api_key`` is not given (default
                ``ES_API_KEY``); null: connect without a key.
            ssl_cert: CA certificate file (PEM) of the server; certificates are verified against it (or the
                public CAs of ``certifi`` when null), so a server with a private CA needs it.
            verify_certs: Verify the server's certificate. Only turn off for a throw-away test server.
            request_timeout: Seconds per request.
            max_retries: Retries of a request after a connection error, timeout, 429 or 5xx, with exponential
                backoff (between half and all of ``retry_backoff`` * 2^attempt seconds, at most 60 s).
            retry_backoff: Base of the backoff, in seconds.
            number_of_shards: Shards of a newly created index (one SAE's latents fit in one).
            number_of_replicas: Replicas of a newly created index; null: the server's default.
        """
        if "://" not in server_address:
            raise ValueError(
                f"server_address '{server_address}' needs a scheme: https://{server_address} (or http:// for a "
                "server without TLS)"
            )
        if ssl_cert is not None and not Path(ssl_cert).expanduser().is_file():
            raise FileNotFoundError(f"ssl_cert '{ssl_cert}' is not a file; give the PEM CA file of the server")
        if api_key is None and api_key_env:
            api_key = os.environ.get(api_key_env) or None
        self.server_address = server_address.rstrip("/")
        self._api_key = SecretStr(api_key) if isinstance(api_key, str) else api_key
        self.api_key_env = api_key_env
        self.ssl_cert = ssl_cert
        self.verify_certs = verify_certs
        self.request_timeout = request_timeout
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.number_of_shards = number_of_shards
        self.number_of_replicas = number_of_replicas
        self._client = None

    def __repr__(self) -> str:
        key = "'**********'" if self._api_key is not None else None
        return f"ElasticsearchStore(server_address={self.server_address!r}, api_key={key})"

    def _connect(self):
        from elasticsearch import Elasticsearch

        return Elasticsearch(
            self.server_address,
            api_key=self._api_key.get_secret_value() if self._api_key is not None else None,
            ca_certs=str(Path(self.ssl_cert).expanduser()) if self.ssl_cert else None,
            verify_certs=self.verify_certs,
            request_timeout=self.request_timeout,
            max_retries=0,  # _call retries, with backoff, whatever the client version
            retry_on_status=(),
            node_class=_compat8_node_class(),
        )

    def _call(self, what: str, request):
        """Runs ``request(client)``, retrying connection errors, timeouts, 429 and 5xx with exponential backoff;
        turns what still fails into one line that says what to check."""
        from elastic_transport import ConnectionError, ConnectionTimeout, TlsError
        from elasticsearch import ApiError

        if self._client is None:
            raise RuntimeError("ElasticsearchStore is not open; call open(index, metadata) first")
        for attempt in range(self.max_retries + 1):
            retry = True
            try:
                return request(self._client)
            except TlsError as error:
                retry, reason = False, self._tls_error_reason(error)  # a retry meets the same certificate
            except ConnectionTimeout:
                reason = f"no answer within {self.request_timeout} s"
            except ConnectionError as error:
                cause = re.search(r"\[Errno [^\]]+\][^)'\"]*", repr(error))
                reason = (
                    f"cannot connect ({cause.group(0) if cause else one_line(error)}): check server_address and "
                    "that the server is running and reachable from this machine"
                )
            except ApiError as error:
                retry, reason = error.meta.status in RETRY_STATUSES, self._api_error_reason(error)
            if not retry or attempt == self.max_retries:
                break
            delay = self._backoff(attempt)
            log.warning(
                f"Elasticsearch at {self.server_address}, {what}: {reason}; retry {attempt + 1} in {delay:.1f} s"
            )
            time.sleep(delay)
        tries = f" (after {self.max_retries} retries)" if retry and self.max_retries else ""
        raise LatentStoreError(f"Elasticsearch at {self.server_address}, {what}{tries}: {reason}") from None

    def _backoff(self, attempt: int) -> float:
        # Equal jitter: https://aws.amazon.com/blogs/architecture/exponential-backoff-and-jitter/
        ceiling = min(60.0, self.retry_backoff * 2**attempt)
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def _tls_error_reason(self, error) -> str:
        from urllib3.util.ssl_match_hostname import CertificateError

        # str(TlsError) is just "TLS error" once the transport has dropped its causes; the reason is further down
        # the chain: OpenSSL's verification error, or urllib3's own host name check (it runs that one itself after
        # the handshake when it cannot leave it to OpenSSL).
        cause = error
        while cause is not None and not isinstance(cause, (ssl.SSLCertVerificationError, CertificateError)):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            return (
                f"TLS failed ({one_line(error.message)}): check that the server speaks https at this address (or use "
                "http:// for a server without TLS)"
            )
        why = one_line(getattr(cause, "verify_message", None) or cause)
        if isinstance(cause, CertificateError) or "mismatch" in why:  # OpenSSL: "Hostname/IP address mismatch, ..."
            return (
                f"the server's TLS certificate could not be verified ({why}): use a server_address whose host is "
                "one the certificate names"
            )
        against = f"ssl_cert '{self.ssl_cert}'" if self.ssl_cert else "the default public CAs (certifi)"
        return (
            f"the server's TLS certificate could not be verified ({why}) against {against}: give the CA file (PEM) "
            "that signed it as ssl_cert"
        )

    def _api_error_reason(self, error) -> str:
        status = error.meta.status
        if status == 401:
            source = "api_key" if self.api_key_env is None else f"api_key or ${self.api_key_env}"
            given = "was rejected" if self._api_key is not None else "is missing"
            return f"401 unauthorized: the API key {given}; check {source}"
        if status == 403:
            return (
                f"403 forbidden: the API key may not use index '{self.index}'; it needs the create_index, index "
                "and read privileges on it"
            )
        detail = error.body.get("error", error.message) if isinstance(error.body, dict) else error.message
        if isinstance(detail, dict):
            detail = f"{detail.get('type')}: {detail.get('reason')}"
        return f"{status} {one_line(detail)}"

    def open(self, index: str, metadata: dict, create: bool = True) -> None:
        self.close()
        self._client = self._connect()
        self.index = index
        if self._call(f"checking index '{index}'", lambda es: es.indices.exists(index=index)):
            mapping = self._call(f"reading the mapping of '{index}'", lambda es: es.indices.get_mapping(index=index))
            mappings = next(iter(mapping.values()))["mappings"]
            fields = mappings.get("properties", {})
            if fields.get("latent", {}).get("type") != "integer":
                raise LatentStoreError(
                    f"index '{index}' on {self.server_address} exists but has no integer 'latent' field, so it is not "
                    "a neurolight latent index; delete it or store this SAE elsewhere"
                )
            stored = mappings.get("_meta", {}).get("neurolight_sae")
            check_same_sae(f"index '{index}' on {self.server_address}", stored, metadata)
            self.scorers = merge_scorers(stored, metadata) if create else scorers_of(stored)
            if create and (self.scorers != scorers_of(stored) or set(self.fields) - set(fields)):
                self._add_scorers(stored)
            return
        if not create:
            raise LatentStoreError(
                f"Elasticsearch at {self.server_address} has no index '{index}': interpret the SAE's latents first, "
                "or name the index they went to"
            )
        self.scorers = scorers_of(metadata)
        settings = {"number_of_shards": self.number_of_shards}
        if self.number_of_replicas is not None:
            settings["number_of_replicas"] = self.number_of_replicas
        mappings = {"_meta": {"neurolight_sae": json_safe({**metadata, "scorers": self.scorers})}}
        mappings |= es_mapping(self.scorers)

        def create_index(es):
            from elasticsearch import BadRequestError

            try:
                es.indices.create(index=index, mappings=mappings, settings=settings)
            except BadRequestError as error:
                # Another DDP rank (or a concurrent run) created it between our check and now.
                if error.error != "resource_already_exists_exception":
                    raise

        self._call(f"creating index '{index}'", create_index)

    def _add_scorers(self, stored: dict | None) -> None:
        """Adds the fields of this run's new scorers to the mapping, and the scorers to its ``_meta``."""
        meta = {"neurolight_sae": json_safe({**(stored or {}), "scorers": list(self.scorers)})}
        self._call(
            f"adding the fields of scorers {list(self.scorers)} to '{self.index}'",
            lambda es: es.indices.put_mapping(index=self.index, meta=meta, **es_mapping(self.scorers)),
        )

    def _scan(self, what: str, source) -> list[dict]:
        """Every document of the index (``_source`` filtered by ``source``), by latent, paged with search_after."""
        self._call(f"refreshing '{self.index}'", lambda es: es.indices.refresh(index=self.index))
        hits, after = [], None
        while True:
            page = self._call(
                what,
                lambda es, after=after: es.search(
                    index=self.index, size=1000, sort=[{"latent": "asc"}], source=source, search_after=after
                ),
            )["hits"]["hits"]
            hits += [hit["_source"] for hit in page]
            if len(page) < 1000:
                return hits
            after = page[-1]["sort"]

    def stored_latents(self) -> set[int]:
        return {int(doc["latent"]) for doc in self._scan(f"listing latents of '{self.index}'", ["latent"])}

    def documents(self) -> list[dict]:
        fields = self.fields
        return [{field: doc.get(field) for field in fields} for doc in self._scan(f"reading '{self.index}'", True)]

    def upsert(self, documents: list[dict]) -> None:
        """One bulk request of ``index`` operations (id = latent: replaces); items the server rejected for load
        (429) are sent again with backoff, any other rejected item raises."""
        self._check_fields(documents)
        pending = list(documents)
        for attempt in range(self.max_retries + 1):
            operations = []
            for doc in pending:
                operations += [{"index": {"_index": self.index, "_id": str(doc["latent"])}}, doc]
            result = self._call(
                f"storing {len(pending)} latents in '{self.index}'",
                lambda es, operations=operations: es.bulk(operations=operations),
            )
            if not result["errors"]:
                return
            failed = [(doc, item["index"]) for doc, item in zip(pending, result["items"]) if "error" in item["index"]]
            fatal = [item for _, item in failed if item["status"] != 429]
            if fatal:
                error = fatal[0]["error"]
                raise LatentStoreError(
                    f"Elasticsearch at {self.server_address} rejected latent {fatal[0]['_id']} of '{self.index}' "
                    f"({len(fatal)} of {len(pending)} rejected): {error.get('type')}: {one_line(error.get('reason'))}"
                )
            pending = [doc for doc, _ in failed]
            if attempt < self.max_retries:
                time.sleep(self._backoff(attempt))
        raise LatentStoreError(
            f"Elasticsearch at {self.server_address} kept answering 429 (too many requests) for {len(pending)} "
            f"latents after {self.max_retries} retries; retry later or lower the load on the cluster"
        )

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def describe(self) -> str:
        return f"Elasticsearch {self.server_address} (index '{self.index}')"
