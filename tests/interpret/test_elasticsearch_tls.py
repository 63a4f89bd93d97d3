"""The Elasticsearch store over https: a loopback proxy with a certificate of a throwaway CA in front of noida-db
(which only speaks plain http); the server must be verified before the API key is sent."""

from __future__ import annotations

import logging
import re
import shutil
import time

import pytest
from elasticsearch import Elasticsearch

from neurolight.callbacks.interpret.stores.base import LatentStoreError, sae_index_name, to_document
from neurolight.callbacks.interpret.stores.elasticsearch import ElasticsearchStore
from tests.helpers.noida import FaultProxy, make_test_ca, server_tls_context
from tests.helpers.store_documents import META, SECRET, expected_document, interpretation, without_time


@pytest.fixture(scope="module")
def test_ca(tmp_path_factory):
    """(CA certificate, server certificate, server key) of a throwaway CA; the certificate names 127.0.0.1."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed; the TLS tests make their throwaway CA with it")
    return make_test_ca(tmp_path_factory.mktemp("tls"))


def test_elasticsearch_store__over_https_verifies_the_server_against_ssl_cert_and_round_trips_documents(
    es_address, test_ca
):
    ca, cert, key = test_ca
    index = sae_index_name({**META, "layer_id": 5})
    with FaultProxy(es_address, tls=server_tls_context(cert, key)) as proxy:
        assert proxy.address.startswith("https://127.0.0.1:")
        store = ElasticsearchStore(proxy.address, api_key_env=None, ssl_cert=str(ca))
        store.open(index, META)
        store.upsert([to_document(interpretation(latent), index, META) for latent in (4, 1)])
        assert without_time(store.documents()) == [expected_document(latent, index) for latent in (1, 4)]
        store.close()
    paths = {path.split("?")[0] for _, path, _ in proxy.requests}
    assert paths == {f"/{index}", "/_bulk", f"/{index}/_refresh", f"/{index}/_search"}  # every call went over https
    assert Elasticsearch(es_address).count(index=index)["count"] == 2  # and they reached the server behind it


TLS_FAILURES = {
    "no ssl_cert": (
        r"\(unable to get local issuer certificate\) against the default public CAs \(certifi\)",
        "give the CA file (PEM) that signed it as ssl_cert",
    ),
    "ssl_cert of another CA": (
        r"\(unable to get local issuer certificate\) against ssl_cert '[^']+/other/ca\.pem'",
        "give the CA file (PEM) that signed it as ssl_cert",
    ),
    # OpenSSL or urllib3 checks the name, depending on the versions; both name the address and the certificate's.
    "certificate for another host": (
        r"\([^()]*'127\.0\.0\.1'[^()]*\)",
        "use a server_address whose host is one the certificate names",
    ),
}


@pytest.mark.parametrize("case", TLS_FAILURES)
def test_elasticsearch_store__unverifiable_certificate_fails_at_once_in_one_line_and_the_key_is_never_sent(
    case, test_ca, tmp_path, caplog, capsys
):
    caplog.set_level(logging.DEBUG)
    ca, cert, key = test_ca
    ssl_cert = None
    if case == "ssl_cert of another CA":
        ssl_cert = str(make_test_ca(tmp_path / "other")[0])
    elif case == "certificate for another host":
        ca, cert, key = make_test_ca(tmp_path / "other", names="DNS:es.example.org")
        ssl_cert = str(ca)
    with FaultProxy(None, fail_status=401, tls=server_tls_context(cert, key)) as proxy:
        # A retry would sleep at least half of retry_backoff first: 2.5 s.
        store = ElasticsearchStore(proxy.address, api_key=SECRET, ssl_cert=ssl_cert, max_retries=5, retry_backoff=5)
        start = time.perf_counter()
        with pytest.raises(LatentStoreError) as error:
            store.open("some-index", META)
        elapsed = time.perf_counter() - start
    assert elapsed < 2.5 and "retry" not in caplog.text  # a certificate failure is not retried
    assert proxy.requests == []  # the API key was never sent to the unverified server
    message = str(error.value)
    assert "\n" not in message
    why, fix = TLS_FAILURES[case]
    prefix = f"Elasticsearch at {proxy.address}, checking index 'some-index': the server's TLS certificate could not "
    assert re.fullmatch(f"{re.escape(prefix)}be verified {why}: {re.escape(fix)}", message), message
    captured = capsys.readouterr()
    for text in (message, repr(store), caplog.text, captured.out, captured.err):
        assert SECRET not in text


def test_elasticsearch_store__https_to_a_plain_http_server_fails_at_once_and_says_to_check_the_scheme(es_address):
    address = es_address.replace("http://", "https://")
    store = ElasticsearchStore(address, api_key=SECRET, max_retries=5, retry_backoff=5)
    start = time.perf_counter()
    with pytest.raises(LatentStoreError) as error:
        store.open("some-index", META)
    assert time.perf_counter() - start < 2.5  # not retried: a retry would sleep at least 2.5 s first
    prefix = f"Elasticsearch at {address}, checking index 'some-index': TLS failed ("
    fix = "): check that the server speaks https at this address (or use http:// for a server without TLS)"
    # OpenSSL's words for a plain http answer differ between versions ("wrong version number", ...).
    assert re.fullmatch(f"{re.escape(prefix)}.+{re.escape(fix)}", str(error.value)), str(error.value)
