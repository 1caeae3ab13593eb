"""Running bench/reference_engines.py (llama.cpp, onnxruntime-genai) in the bench venv from a
benchmark in the project venv: its stdout is one JSON event per line (progress, result, error,
done); stderr is kept for the failure message."""

from __future__ import annotations

import json
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


@dataclass
class ProcessEnd:
    """How the reference process ended."""

    returncode: int
    stderr: str

    def failure(self) -> str | None:
        """'exit code N (signal S); stderr tail: …', or None when it exited 0."""
        if self.returncode == 0:
            return None
        sig = f" (signal {signal.Signals(-self.returncode).name})" if self.returncode < 0 else ""
        return f"exit code {self.returncode}{sig}; stderr tail: {self.stderr[-1500:].strip()}"


def run_events(cmd: list[str], cwd: Path, on_event: Callable[[dict[str, Any]], None]) -> ProcessEnd:
    """Run `cmd`, hand each JSON event of its stdout to `on_event` as it comes (lines that are
    not JSON are skipped), and return how it ended."""
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=cwd)
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            on_event(event)
        rc = proc.wait()
        err.seek(0)
        return ProcessEnd(rc, err.read())
