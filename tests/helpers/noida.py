"""A real Elasticsearch-compatible server for tests: ``noida-db`` (PyPI) on a free loopback port, and a loopback
proxy in front of it that can answer with errors (503, 401) to exercise retries and auth failures, or serve https
with a certificate of a throwaway CA (noida-db itself only speaks plain http)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _noida_executable() -> str:
    beside_python = Path(sys.executable).parent / "noida-db"
    found = str(beside_python) if beside_python.exists() else shutil.which("noida-db")
    if found is None:
        raise RuntimeError("noida-db is not installed; pip install noida-db (part of the test extra)")
    return found


@contextlib.contextmanager
def noida_elasticsearch(data_dir: Path, startup_s: float = 15.0) -> Iterator[str]:
    """Starts ``noida-db`` with only Elasticsearch on 127.0.0.1 and yields its address; stops it on exit."""
    port = free_port()
    log = (data_dir / "noida.log").open("w")
    command = [_noida_executable(), "start", "--data-dir", str(data_dir / "data"), "--host", "127.0.0.1"]
    command += ["--only", "elasticsearch", "--elasticsearch-port", str(port)]
    # The noida-db entry point is a Python wrapper that runs the server binary as its child: a session of its own
    # lets us stop both, not orphan the server.
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            try:
                with urllib.request.urlopen(address, timeout=1) as response:
                    if json.load(response)["version"]["number"]:
                        break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    log_file = data_dir / "noida.log"
                    raise RuntimeError(
                        f"noida-db did not start on {address} (exit code {process.poll()}); see {log_file}"
                    ) from None
                time.sleep(0.05)
        yield address
    finally:
        _stop_group(process)
        log.close()


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the wrapper and the server (both stop on it); SIGKILL if the wrapper is still there after 10 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def make_test_ca(directory: Path, names: str = "IP:127.0.0.1, DNS:localhost") -> tuple[Path, Path, Path]:
    """Writes a throwaway CA and a server certificate it signs, valid for ``names`` (a subjectAltName), with the
    ``openssl`` CLI; returns the paths of the CA certificate, the server certificate and the server key (PEM)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise FileNotFoundError("the openssl command is not installed; it makes the certificates of the TLS tests")
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    cert, key, request = directory / "server.pem", directory / "server.key", directory / "server.csr"
    extensions = directory / "server.ext"
    # Extensions as strict verification (VERIFY_X509_STRICT, on in Python >= 3.13's default context) wants them: a
    # critical CA:TRUE with keyCertSign on the CA, key identifiers linking the two, the names in subjectAltName.
    extensions.write_text(
        f"subjectAltName = {names}\n"
        "basicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature, keyEncipherment\n"
        "extendedKeyUsage = serverAuth\n"
        "subjectKeyIdentifier = hash\n"
        "authorityKeyIdentifier = keyid\n"
    )
    ec_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]  # EC: instant, unlike RSA
    make_ca = ["req", "-x509", *ec_key, "-keyout", ca_key, "-out", ca, "-days", "2"]
    make_ca += ["-subj", "/CN=neurolight throwaway test CA", "-addext", "basicConstraints=critical,CA:TRUE"]
    make_ca += ["-addext", "keyUsage=critical,keyCertSign,cRLSign"]
    make_request = ["req", "-new", *ec_key, "-keyout", key, "-out", request, "-subj", "/CN=neurolight test server"]
    sign = ["x509", "-req", "-in", request, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert]
    sign += ["-days", "2", "-extfile", extensions]
    for arguments in (make_ca, make_request, sign):
        command = [openssl, *map(str, arguments)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")
    return ca, cert, key


def server_tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


UNAUTHORIZED_BODY = {
    "error": {
        "root_cause": [{"type": "security_exception", "reason": "unable to authenticate with provided credentials"}],
        "type": "security_exception",
        "reason": "unable to authenticate with provided credentials and anonymous access is not allowed",
    },
    "status": 401,
}


class FaultProxy:
    """An HTTP proxy to ``upstream`` that first answers ``fail_next`` requests with ``fail_status`` (an
    Elasticsearch-style error body) and records every request's method, path and headers; ``upstream=None``
    answers every request with the failure. The next ``reject_bulk_next`` bulk requests get a 200 whose items are
    all rejected with 429 (a busy cluster's partial failure). With ``tls`` (see ``server_tls_context``) it serves
    https."""

    def __init__(
        self, upstream: str | None, fail_status: int = 503, fail_next: int = 0, tls: ssl.SSLContext | None = None
    ) -> None:
        self.upstream = upstream
        self.fail_status = fail_status
        self.fail_next = fail_next
        self.reject_bulk_next = 0
        self.requests: list[tuple[str, str, dict]] = []
        self.failed = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                proxy.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
                if proxy.upstream is None or proxy.fail_next > 0:
                    proxy.fail_next -= 1
                    proxy.failed += 1
                    status, headers, data = proxy._failure()
                elif proxy.reject_bulk_next > 0 and self.path.split("?")[0].endswith("/_bulk"):
                    proxy.reject_bulk_next -= 1
                    status, headers, data = proxy._rejected_bulk(body)
                else:
                    status, headers, data = proxy._forward(self.command, self.path, dict(self.headers), body)
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

            def log_message(self, *args) -> None:
                pass

        class Server(ThreadingHTTPServer):
            def finish_request(self, request, client_address) -> None:
                if tls is None:
                    return super().finish_request(request, client_address)
                # The handshake runs here, in the connection's own thread, not in accept(): a client that stalls or
                # refuses the certificate then blocks nobody else.
                request.settimeout(10)
                try:
                    connection = tls.wrap_socket(request, server_side=True)
                except (ssl.SSLError, OSError):  # the client refused the certificate: nothing to serve
                    return
                connection.settimeout(None)  # idle keep-alive connections stay open, as on the plain http proxy
                try:
                    super().finish_request(connection, client_address)
                finally:
                    connection.close()

        self.server = Server(("127.0.0.1", 0), Handler)
        scheme = "https" if tls is not None else "http"
        self.address = f"{scheme}://127.0.0.1:{self.server.server_port}"
        # A short poll: shutdown() waits for it, and every test stops a proxy.
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def _failure(self) -> tuple[int, list, bytes]:
        if self.fail_status == 401:
            body = UNAUTHORIZED_BODY
            headers = [("WWW-Authenticate", 'ApiKey realm="security"')]
        else:
            reason = f"injected failure {self.failed}"
            body = {"error": {"type": "unavailable_shards_exception", "reason": reason}, "status": self.fail_status}
            headers = []
        headers += [("content-type", "application/json"), ("X-Elastic-Product", "Elasticsearch")]
        return self.fail_status, headers, json.dumps(body).encode()

    def _rejected_bulk(self, body: bytes) -> tuple[int, list, bytes]:
        error = {"type": "es_rejected_execution_exception", "reason": "rejected execution (queue capacity 200)"}
        items = [
            {"index": {**json.loads(line)["index"], "status": 429, "error": error}}
            for line in body.decode().splitlines()[::2]
        ]
        data = json.dumps({"took": 1, "errors": True, "items": items}).encode()
        return 200, [("content-type", "application/json"), ("X-Elastic-Product", "Elasticsearch")], data

    def _forward(self, method: str, path: str, headers: dict, body: bytes) -> tuple[int, list, bytes]:
        host, port = self.upstream.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            connection.request(method, path, body=body or None, headers=headers)
            response = connection.getresponse()
            data = response.read()
            kept = [(k, v) for k, v in response.getheaders() if k.lower() not in ("content-length", "connection")]
            return response.status, kept, data
        finally:
            connection.close()

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
