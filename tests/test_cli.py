"""The command line as a user runs it: `switchyard up` in the foreground, `switchyard
generate` against it, Ctrl-C (SIGINT) stopping every process it started."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY, start_switchyard_up, up_grpc_address

pytestmark = pytest.mark.integration


def children_of(pid: int) -> set[int]:
    """All descendants of pid, from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_up_serves_generate_streams_and_ctrl_c_leaves_no_orphans(tiny_models_dir: Path, tmp_path: Path) -> None:
    up, output = start_switchyard_up(tmp_path, [
        "--models-dir", str(tiny_models_dir), "--serve", f"{TINY}=2", "--grpc-port", "0",
        "--http-port", "0", "--nats-port", "0", "--log-dir", "runs/logs", "--run-dir", "runs/run",
        "--routers", "2"])
    try:
        assert "Switchyard is up" in output, output
        grpc_address = up_grpc_address(output)
        assert "development API key: sy-" in output
        assert " router :" in output and " router-2 :" in output  # both routers' /metrics listed
        started = children_of(up.pid)
        assert len(started) >= 7  # nats-server, 2 workers, 2 batchers, 2 routers

        generate = subprocess.run(
            [sys.executable, "-m", "switchyard.cli", "generate", "--address", grpc_address,
             "--model", TINY, "--max-tokens", "12", "--no-chat", "hello"],
            cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert generate.returncode == 0, generate.stderr
        assert "FINISH_REASON_" in generate.stderr and "12 completion tokens" in generate.stderr

        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in started) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in started if alive(pid)], "processes outlived `switchyard up`"
    finally:
        if up.poll() is None:
            up.kill()


def test_up_refuses_a_port_in_use_before_starting_anything(tiny_models_dir: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        up = subprocess.run([sys.executable, "-m", "switchyard.cli", "up", "--models-dir", str(tiny_models_dir),
                             "--serve", f"{TINY}=1", "--grpc-port", "0", "--http-port", str(port),
                             "--nats-port", "0", "--log-dir", "runs/logs", "--run-dir", "runs/run"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert up.returncode == 2, up.stdout + up.stderr
    assert f"ports already in use: --http-port {port} (127.0.0.1)" in up.stderr
    assert not (tmp_path / "runs" / "logs").exists()  # refused before any process or log



def test_up_colocate_runs_one_process_per_replica_and_serves(tiny_models_dir: Path, tmp_path: Path) -> None:
    up, output = start_switchyard_up(tmp_path, [
        "--models-dir", str(tiny_models_dir), "--serve", f"{TINY}=2", "--grpc-port", "0", "--http-port", "-1",
        "--nats-port", "0", "--log-dir", "runs/logs", "--run-dir", "runs/run", "--colocate"])
    try:
        assert "Switchyard is up" in output, output
        started = children_of(up.pid)
        modules = sorted(m for pid in started for m in ("services.worker", "services.batcher", "services.router")
                         if m in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"))
        assert modules == ["services.batcher", "services.batcher", "services.router"]  # no worker process
        generate = subprocess.run(
            [sys.executable, "-m", "switchyard.cli", "generate", "--address", up_grpc_address(output),
             "--model", TINY, "--max-tokens", "9", "--no-chat", "hello"],
            cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert generate.returncode == 0, generate.stderr
        assert "9 completion tokens" in generate.stderr
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0
    finally:
        if up.poll() is None:
            up.kill()


def test_up_refuses_colocate_with_autoscale(tiny_models_dir: Path, tmp_path: Path) -> None:
    up = subprocess.run([sys.executable, "-m", "switchyard.cli", "up", "--models-dir", str(tiny_models_dir),
                         "--serve", f"{TINY}=1", "--colocate", "--autoscale", f"{TINY}=1:2", "--grpc-port", "0",
                         "--http-port", "0", "--nats-port", "0", "--log-dir", "runs/logs", "--run-dir", "runs/run"],
                        cwd=tmp_path, capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert up.returncode == 2, up.stdout + up.stderr
    assert "--colocate with --autoscale" in up.stdout + up.stderr
    assert not (tmp_path / "runs" / "logs").exists()
