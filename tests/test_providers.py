"""Truthful execution providers: CUDA asked for and not loadable is a refusal to start with the
reason, never a silent CPU worker; "auto" picks the CPU here and says why."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.worker import providers
from services.worker.providers import CPU, CUDA, ProviderError, assert_provider, choose_providers, elf_needed
from switchyard.model.config import MODEL_FILE

from conftest import TINY

REPO = Path(__file__).resolve().parents[1]
REASON = providers.cuda_unavailable_reason()
no_cuda_here = pytest.mark.skipif(REASON is None, reason="CUDA loads on this machine: nothing to refuse")


def _worker_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHYARD_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "libs"), env.get("PYTHONPATH", "")])
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Session:
    """What assert_provider reads of an InferenceSession: its provider list."""

    def __init__(self, names: list[str]) -> None:
        self._names = names

    def get_providers(self) -> list[str]:
        return self._names


@pytest.mark.unit
def test_cpu_is_cpu_and_bad_preference_is_an_error() -> None:
    assert choose_providers("cpu") == [CPU]
    with pytest.raises(ProviderError, match="auto, cpu, cuda"):
        choose_providers("gpu")


@pytest.mark.unit
def test_assert_provider_refuses_a_silent_fallback() -> None:
    assert_provider(_Session([CUDA, CPU]), [CUDA, CPU])
    assert_provider(_Session([CPU]), "cpu")
    assert_provider([CUDA, CPU], "cuda")
    with pytest.raises(ProviderError, match=r"asked ONNX Runtime for CUDAExecutionProvider but the session "
                                            r"runs on \['CPUExecutionProvider'\]"):
        assert_provider(_Session([CPU]), "cuda")
    with pytest.raises(ProviderError, match="for CPUExecutionProvider"):
        assert_provider(_Session([CUDA, CPU]), "cpu")


@pytest.mark.unit
def test_elf_needed_reads_a_real_library(tmp_path: Path) -> None:
    pybind = next((Path(ort.__file__).parent / "capi").glob("onnxruntime_pybind11_state*.so"))
    needed = elf_needed(pybind)
    assert "libc.so.6" in needed and "libstdc++.so.6" in needed
    if shutil.which("readelf"):  # binutils' reading of the same dynamic section
        out = subprocess.run(["readelf", "-d", str(pybind)], capture_output=True, text=True, check=True).stdout
        assert needed == re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)
    (tmp_path / "x.so").write_bytes(b"not an ELF file")
    assert elf_needed(tmp_path / "x.so") == []


@pytest.mark.unit
@no_cuda_here
def test_cuda_refused_with_the_reason_and_auto_falls_to_cpu(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ProviderError) as info:
        choose_providers("cuda")
    assert str(info.value) == f"--provider cuda cannot run: {REASON}"
    if CUDA not in ort.get_available_providers():
        assert "has no CUDAExecutionProvider" in REASON and "install onnxruntime-gpu" in REASON
    else:  # onnxruntime-gpu without the CUDA libraries or a driver: they are named
        assert "cannot load" in REASON and "missing libraries: " in REASON
    caplog.set_level("INFO", logger="services.worker.providers")
    assert choose_providers("auto") == [CPU]
    assert f"provider auto: CPU, because {REASON}" in caplog.text


@pytest.mark.unit
@pytest.mark.skipif(CUDA not in ort.get_available_providers() or REASON is None,
                    reason="needs onnxruntime-gpu on a machine where CUDA cannot load")
def test_real_session_falls_back_silently_and_is_caught(tiny_models_dir: Path) -> None:
    """What ORT itself does when CUDA cannot load: a CPU session, no exception."""
    session = ort.InferenceSession(str(tiny_models_dir / TINY / MODEL_FILE), providers=[CUDA, CPU])
    assert session.get_providers() == [CPU]
    with pytest.raises(ProviderError, match="falls back silently"):
        assert_provider(session, [CUDA, CPU])


@pytest.mark.integration
@no_cuda_here
def test_worker_asked_for_cuda_refuses_to_start(tiny_models_dir: Path, tmp_path: Path) -> None:
    """A real worker process: never SERVING, exits non-zero, its log says why."""
    port, port_file = _free_port(), tmp_path / "port.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.worker", "--model-dir", str(tiny_models_dir / TINY), "--port", str(port),
         "--provider", "cuda", "--port-file", str(port_file)],
        cwd=REPO, env=_worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    statuses = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            deadline = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    statuses.append(stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status)
                except grpc.RpcError as exc:
                    statuses.append(exc.code())
                time.sleep(0.02)
        rc = proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stdout.read().decode()  # type: ignore[union-attr]
    assert rc == 3, log
    assert health_pb2.HealthCheckResponse.SERVING not in statuses
    assert not port_file.exists()  # written only once serving
    assert "worker refuses to start: --provider cuda cannot run: " in log
    assert REASON.split(";")[0] in log, log


@pytest.mark.integration
@no_cuda_here
def test_colocated_replica_asked_for_cuda_refuses_to_start(tiny_models_dir: Path) -> None:
    """The engine inside a batcher (`--worker local`): it exits 3 with the reason before it
    connects anywhere (its NATS URL leads nowhere), never serving on the CPU instead."""
    import shlex
    proc = subprocess.run(
        [sys.executable, "-m", "services.batcher", "--worker", "local", "--nats-url", "nats://127.0.0.1:1",
         "--worker-flags", f"--model-dir {shlex.quote(str(tiny_models_dir / TINY))} --provider cuda"],
        cwd=REPO, env=_worker_env(), capture_output=True, text=True, timeout=120)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 3, log[-3000:]
    assert "batcher refuses to start: --provider cuda cannot run: " in log
    assert REASON.split(";")[0] in log, log[-3000:]


@pytest.mark.integration
def test_worker_on_auto_serves_on_what_it_says(tiny_models_dir: Path, tmp_path: Path) -> None:
    """auto: SERVING, Info names the provider the session really has, the log says which and why."""
    from switchyard.v1 import worker_pb2, worker_pb2_grpc

    port_file = tmp_path / "port.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.worker", "--model-dir", str(tiny_models_dir / TINY), "--port", "0",
         "--provider", "auto", "--port-file", str(port_file)],
        cwd=REPO, env=_worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text()) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read().decode()  # type: ignore[union-attr]
            time.sleep(0.05)
        port = json.loads(port_file.read_text())["grpc"]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
            info = worker_pb2_grpc.WorkerStub(ch).Info(worker_pb2.InfoRequest(), timeout=5)
        assert status == health_pb2.HealthCheckResponse.SERVING
        assert info.execution_provider == (CPU if REASON else CUDA)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stdout.read().decode()  # type: ignore[union-attr]
    assert ("provider auto: CPU, because" if REASON else "provider auto: CUDA") in log, log
