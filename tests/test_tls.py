"""TLS end to end (issue 10 §1): the development CA (`switchyard certs`), and a whole stack
with TLS on every hop — gateway HTTP and gRPC, NATS with client certificates, worker gRPC with
the batcher's client certificate — plus NATS users and worker tokens. Real processes, real
clients (grpcio, the OpenAI SDK over httpx, nats-py, a raw socket)."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import stat
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import grpc
import httpx
import nats
import openai
import pytest
from typer.testing import CliRunner

from switchyard.bus import subjects
from switchyard.cli import app
from switchyard.config import ConfigError, load_config
from switchyard.runtime.stack import LocalStack
from switchyard.tls import CLIENT_ROLES, TlsDir, grpc_channel_credentials, make_dev_ca
from switchyard.v1 import bus_pb2, generate_pb2, generate_pb2_grpc, worker_pb2, worker_pb2_grpc

from conftest import TINY, start_stack


# ---- the development CA ---------------------------------------------------------------------

@pytest.mark.unit
def test_certs_command_writes_a_ca_and_private_keys_0600(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    result = CliRunner().invoke(app, ["certs", "--out", str(out), "--host", "switchyard.internal"])
    assert result.exit_code == 0, result.output
    tls = TlsDir(out).check()
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    keys = [tls.ca_key, tls.server_key, *(tls.client_key(r) for r in CLIENT_ROLES)]
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key.name
        assert b"PRIVATE KEY" in key.read_bytes()
    from cryptography import x509
    server = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "switchyard.internal"} <= set(sans.get_values_for_type(x509.DNSName))
    assert "127.0.0.1" in {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    ca = x509.load_pem_x509_certificate(tls.ca.read_bytes())
    for cert in (tls.server_cert, *(tls.client_cert(r) for r in CLIENT_ROLES)):
        x509.load_pem_x509_certificate(cert.read_bytes()).verify_directly_issued_by(ca)


@pytest.mark.unit
def test_service_configs_reject_missing_or_half_tls_settings(tmp_path: Path) -> None:
    from services.batcher.config import BatcherConfig
    from services.router.config import RouterConfig
    tls = make_dev_ca(tmp_path / "c")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(RouterConfig, ["--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(tls.server_key)])
    with pytest.raises(ConfigError, match="both a certificate and its key"):
        load_config(RouterConfig, ["--tls-cert", str(tls.server_cert)])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(BatcherConfig, ["--tls-ca", str(tmp_path / "missing-ca.pem")])
    with pytest.raises(ConfigError, match="server-key.pem is missing"):
        tls.server_key.unlink()
        TlsDir(tls.path).check()


# ---- the whole stack over TLS ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tls_stack(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    tmp = tmp_path_factory.mktemp("tls-stack")
    make_dev_ca(tmp / "certs")
    # heartbeat-misses 10: a loaded 2-core machine stalls processes longer than 3 × 0.2 s
    stack = start_stack(tiny_models_dir, {TINY: 1}, tmp, tls=tmp / "certs", internal_auth=True,
                        router_args=("--heartbeat-misses", "10"))
    yield stack
    stack.stop()


@pytest.mark.integration
def test_grpc_and_openai_sdk_requests_over_tls(tls_stack: LocalStack) -> None:
    assert tls_stack.http_url.startswith("https://")
    with tls_stack.grpc_channel() as channel:
        req = generate_pb2.GenerateRequest(model=TINY, text="hello world", max_tokens=6,
                                           stop=generate_pb2.StopConditions(ignore_eos=True))
        reply = generate_pb2_grpc.GenerationStub(channel).Complete(req, timeout=60)
    assert reply.summary.usage.completion_tokens == 6 and len(reply.token_ids) == 6
    http = httpx.Client(verify=tls_stack.ssl_context())
    client = openai.OpenAI(base_url=f"{tls_stack.http_url}/v1", api_key="unused", http_client=http, max_retries=0)
    chat = client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert chat.usage is not None and chat.usage.completion_tokens >= 1
    chunks = list(client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=5, stream=True))
    assert chunks and chunks[-1].choices[0].finish_reason in ("length", "stop")
    http.close()


@pytest.mark.integration
def test_gateway_refuses_plaintext_and_untrusted_clients(tls_stack: LocalStack) -> None:
    with grpc.insecure_channel(tls_stack.router_address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            generate_pb2_grpc.GenerationStub(channel).ListModels(generate_pb2.ListModelsRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    plain = tls_stack.http_url.replace("https://", "http://")
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):  # no HTTP answer in clear
        urllib.request.urlopen(f"{plain}/health", timeout=5).read()
    # A client that does not trust the dev CA cannot be fooled into talking to it either.
    with pytest.raises(urllib.error.URLError) as url_err:
        urllib.request.urlopen(f"{tls_stack.http_url}/health", timeout=5, context=ssl.create_default_context())
    assert isinstance(url_err.value.reason, ssl.SSLCertVerificationError)
    with urllib.request.urlopen(f"{tls_stack.http_url}/health", timeout=5, context=tls_stack.ssl_context()) as resp:
        assert json.loads(resp.read())["models"][TINY] == 1


@pytest.mark.integration
def test_nats_refuses_plaintext_and_clients_without_a_certificate(tls_stack: LocalStack) -> None:
    assert tls_stack.nats is not None
    host, port = tls_stack.nats.host, tls_stack.nats.port
    # Raw plaintext: the server announces TLS is required and drops a client that speaks clear.
    with socket.create_connection((host, port), timeout=5) as sock:
        info = json.loads(sock.recv(4096).decode().split(" ", 1)[1])
        assert info.get("tls_required") is True
        observer = tls_stack.nats.user("observer")
        sock.sendall(f'CONNECT {{"user":"{observer.user}","pass":"{observer.password}","verbose":false}}\r\n'
                     "SUB switchyard.load.> 1\r\nPING\r\n".encode())
        received = b""
        try:
            while chunk := sock.recv(4096):
                received += chunk
        except (ConnectionResetError, socket.timeout):
            pass
    assert b"PONG" not in received and b"MSG" not in received

    async def bus() -> None:
        kwargs = dict(tls_stack.nats_observer)
        no_cert = {**kwargs, "tls": tls_stack.ssl_context()}  # TLS, right password, no client certificate
        # Refused in the handshake: an SSL alert, or a reset when it lands after TLS 1.3's finish.
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await nats.connect(tls_stack.nats.url, allow_reconnect=False, connect_timeout=3, **no_cert)  # type: ignore[union-attr]
        assert tls_stack.nats.log_path is not None  # type: ignore[union-attr]
        assert "didn't provide a certificate" in tls_stack.nats.log_path.read_text()  # type: ignore[union-attr]
        nc = await nats.connect(tls_stack.nats.url, allow_reconnect=False, connect_timeout=3, **kwargs)  # type: ignore[union-attr]
        sub = await nc.subscribe(subjects.LOAD_ALL)
        assert bus_pb2.LoadReport.FromString((await sub.next_msg(timeout=5)).data).replica_id == f"{TINY}-0"
        await nc.close()
    asyncio.run(bus())


@pytest.mark.integration
def test_worker_requires_a_client_certificate_signed_by_the_ca(tls_stack: LocalStack, tmp_path: Path) -> None:
    tls = tls_stack.tls
    assert tls is not None
    worker = tls_stack.workers[0]
    address = f"{tls_stack.spec.internal_host}:{worker.port}"
    token = tls_stack.worker_metadata(worker)
    assert token  # the token check stays on behind TLS
    stranger = make_dev_ca(tmp_path / "other-ca")  # a valid-looking certificate from another CA
    refused = [grpc.ssl_channel_credentials(tls.ca.read_bytes()),  # no client certificate
               grpc_channel_credentials(tls.ca, stranger.client_cert("batcher"), stranger.client_key("batcher"))]
    for creds in refused:
        with grpc.secure_channel(address, creds) as channel:
            with pytest.raises(grpc.RpcError) as err:
                worker_pb2_grpc.WorkerStub(channel).Info(worker_pb2.InfoRequest(), timeout=5, metadata=token)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError):
            worker_pb2_grpc.WorkerStub(channel).Info(worker_pb2.InfoRequest(), timeout=5, metadata=token)
    ok = grpc_channel_credentials(tls.ca, tls.client_cert("batcher"), tls.client_key("batcher"))
    with grpc.secure_channel(address, ok) as channel:
        assert worker_pb2_grpc.WorkerStub(channel).Info(worker_pb2.InfoRequest(), timeout=5, metadata=token).model == TINY
