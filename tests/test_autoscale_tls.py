"""Autoscaling with TLS on every hop (issue 11 with issue 10 §1): the autoscaler reads heartbeats
and demand from a nats-server that requires TLS and a client certificate (its own `autoscaler`
role), and the replicas it adds start with the stack's TLS flags, so they join and serve.

The autoscaler runs exactly as `switchyard up --autoscale ... --tls DIR` runs it
(`switchyard.cli._start_autoscaler`: its loop in a thread of the process owning the stack,
the local lifecycle backend). Real processes, the tiny model."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from conftest import TINY, Load, start_stack, start_switchyard_up, up_grpc_address, wait_for_replicas
from services.autoscaler.config import AutoscalerConfig
from switchyard.config import ConfigError, load_config
from switchyard.runtime.lifecycle import READY
from switchyard.tls import TlsDir, add_missing_client_certs, make_dev_ca


@pytest.mark.unit
def test_autoscaler_config_rejects_half_or_missing_tls_settings(tmp_path: Path) -> None:
    tls = make_dev_ca(tmp_path / "certs")
    base = {"models": (f"{TINY}=1:2",)}
    with pytest.raises(ConfigError, match="both a certificate and its key"):
        load_config(AutoscalerConfig, ["--tls-ca", str(tls.ca), "--tls-client-cert", str(tls.client_cert("autoscaler"))],
                    **base)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(AutoscalerConfig, ["--tls-ca", str(tmp_path / "nope.pem")], **base)
    with pytest.raises(ConfigError, match="needs tls_ca"):
        load_config(AutoscalerConfig, ["--tls-client-cert", str(tls.client_cert("autoscaler")),
                                       "--tls-client-key", str(tls.client_key("autoscaler"))], **base)
    ok = load_config(AutoscalerConfig, ["--tls-ca", str(tls.ca), "--tls-client-cert", str(tls.client_cert("autoscaler")),
                                        "--tls-client-key", str(tls.client_key("autoscaler"))], **base)
    assert ok.tls_ca == tls.ca


@pytest.mark.unit
def test_a_folder_without_the_autoscaler_role_gets_its_certificate_from_the_same_ca(tmp_path: Path) -> None:
    tls = make_dev_ca(tmp_path / "certs")
    router_before = tls.client_cert("router").read_bytes()
    tls.client_cert("autoscaler").unlink()  # a folder made before the role existed
    tls.client_key("autoscaler").unlink()
    with pytest.raises(ConfigError, match="autoscaler.pem is missing"):
        TlsDir(tls.path).check()
    assert add_missing_client_certs(tls.path) == ["autoscaler"]
    TlsDir(tls.path).check()
    ca = x509.load_pem_x509_certificate(tls.ca.read_bytes())
    cert = x509.load_pem_x509_certificate(tls.client_cert("autoscaler").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert tls.client_key("autoscaler").stat().st_mode & 0o077 == 0
    assert tls.client_cert("router").read_bytes() == router_before  # the others are left as they were
    assert add_missing_client_certs(tls.path) == []


@pytest.mark.integration
def test_autoscale_with_tls_adds_a_replica_that_serves_over_tls(tiny_models_dir: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from switchyard.cli import _start_autoscaler
    make_dev_ca(tmp_path / "certs")
    monkeypatch.chdir(tmp_path)  # _start_autoscaler keeps cold starts in runs/cold_start.json
    stack = start_stack(tiny_models_dir, {TINY: 1}, tmp_path, tls=tmp_path / "certs", max_batch_size=2,
                        router_args=("--demand-interval-s", "0.2", "--heartbeat-misses", "10"))
    scaler = None
    try:
        assert stack.tls is not None
        scaler = _start_autoscaler(stack, f"{TINY}=1:2:reactive",
                                   "scale_up_window_s=0,scale_down_window_s=1,target_utilisation=1.0", "127.0.0.1")
        assert scaler.config.tls_client_cert == stack.tls.client_cert("autoscaler")  # type: ignore[union-attr]
        load = Load(stack, clients=8)  # 8 in flight over 2 slots: wants 4, max is 2
        try:
            wait_for_replicas(stack, 2, timeout_s=60)
            added = [e.detail for e in scaler.autoscaler.events if e.kind == "add"]
            assert len(added) == 1, scaler.autoscaler.events
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not any(
                    not isinstance(r, str) and r.summary.replica_id == added[0] for r in load.results):
                time.sleep(0.1)
        finally:
            results = load.stop()
        served_by_new = [r for r in results if not isinstance(r, str) and r.summary.replica_id == added[0]]
        assert served_by_new, "the replica added over TLS served no request"
        errors = [r for r in results if isinstance(r, str)]
        assert not errors, errors[:5]
        assert all(r.summary.usage.completion_tokens == 200 for r in results)  # type: ignore[union-attr]
        # The added replica's processes carry the stack's TLS flags: the worker serves TLS with
        # client verification, the batcher presents its certificate to the worker and to NATS.
        rec = scaler.backend._replicas[added[0]]  # type: ignore[attr-defined]
        assert rec.info.state == READY and rec.batcher is not None
        worker_argv = " ".join(map(str, rec.worker.process.args))
        batcher_argv = " ".join(map(str, rec.batcher.process.args))
        assert "--tls-cert" in worker_argv and "--tls-ca" in worker_argv
        assert "--tls-client-cert" in batcher_argv and "batcher.pem" in batcher_argv
        # A plaintext client cannot reach the new worker: its port speaks TLS only.
        with grpc.insecure_channel(f"127.0.0.1:{rec.worker.port}") as plain:
            with pytest.raises(grpc.FutureTimeoutError):
                grpc.channel_ready_future(plain).result(timeout=2)
    finally:
        if scaler is not None:
            scaler.stop()
        stack.stop()


@pytest.mark.integration
def test_switchyard_up_runs_autoscale_with_tls(tiny_models_dir: Path, tmp_path: Path) -> None:
    """The command a user types: no longer refused; the autoscaler connects to NATS over TLS
    with its own certificate (issued by `up` into the new folder), and the stack serves."""
    import signal
    import subprocess
    import sys

    up, output = start_switchyard_up(tmp_path, [
        "--models-dir", str(tiny_models_dir), "--serve", f"{TINY}=1", "--grpc-port", "0",
        "--http-port", "-1", "--nats-port", "0", "--log-dir", "runs/logs", "--run-dir", "runs/run",
        "--tls", "certs", "--autoscale", f"{TINY}=1:2:reactive", "--autoscale-options", "scale_down_window_s=5"])
    try:
        assert "Switchyard is up" in output, output
        grpc_address = up_grpc_address(output)
        assert "NATS over TLS" in output and f"autoscaling {TINY}=1:2:reactive" in output, output
        assert (tmp_path / "certs" / "autoscaler.pem").is_file()
        generate = subprocess.run(
            [sys.executable, "-m", "switchyard.cli", "generate", "--address", grpc_address,
             "--tls-ca", "certs/ca.pem", "--model", TINY, "--max-tokens", "8", "--no-chat", "hello"],
            cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert generate.returncode == 0, generate.stderr
        assert "8 completion tokens" in generate.stderr
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0
    finally:
        if up.poll() is None:
            up.kill()
