"""Per-run record files: one JSON line per finished request, one per replica lifetime.

Layout of a run directory (all files optional except requests.jsonl for a report):

    <run_dir>/requests.jsonl   one RequestRecord per line, appended by the router
    <run_dir>/replicas.jsonl   one ReplicaUsage per line, appended by the router when a
                               replica leaves the registry and for every live one at shutdown
    <run_dir>/spans.jsonl      one span per line (contract in `switchyard.reporting.tail`)

Writers append with line buffering, one `write()` per record, under a lock, so the router
may call them from any thread or straight from the event loop (a local append of one short
line; no await needed). Readers skip lines they cannot parse (a run killed mid-write leaves
a torn last line) and say how many they skipped.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Sequence, TypeVar

import numpy as np

log = logging.getLogger(__name__)
T = TypeVar("T")

REQUESTS_FILE = "requests.jsonl"
REPLICAS_FILE = "replicas.jsonl"
SPANS_FILE = "spans.jsonl"

#: Most inter-token gaps kept per request; longer lists are thinned evenly (see `cap_samples`).
ITL_CAP = 1024

#: Front ends a request can come through (`RequestRecord.request_type`); any other string is
#: accepted too and reported as is.
REQUEST_CHAT = "chat"
REQUEST_COMPLETION = "completion"
REQUEST_GRPC = "grpc"

STATUS_OK = "ok"


@dataclass(slots=True, kw_only=True)
class RequestRecord:
    """One finished request, as the router saw it. Times are seconds.

    - ``started_unix_s``: wall clock (``time.time()``) when the router accepted the request.
    - ``ttft_s``: accepted → first token chunk; None when no token was produced.
    - ``e2e_s``: accepted → last byte / terminal event (errors included).
    - ``queue_wait_s``: time in the batcher queue, as reported back to the router.
    - ``prompt_tokens`` counts every prompt token, cached ones included;
      ``cached_prompt_tokens`` is the part served from a prefix cache (<= prompt_tokens).
    - ``status``: "ok", or the error code name (e.g. "RESOURCE_EXHAUSTED", "UNAVAILABLE").
    - ``inter_token_s``: gaps between successive token chunks, in order, at most ITL_CAP
      (the writer thins longer lists evenly); empty for 0–1 chunks.
    - ``model`` is the model that served the request; ``requested_model`` the name the client
      asked for when that differs (a virtual model such as ``smollm2-auto``), and
      ``difficulty`` the score that made the choice.
    """

    request_id: str
    tenant: str
    model: str
    replica_id: str = ""
    request_type: str = ""
    started_unix_s: float = 0.0
    ttft_s: float | None = None
    e2e_s: float = 0.0
    queue_wait_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    finish_reason: str = ""
    status: str = STATUS_OK
    inter_token_s: list[float] = field(default_factory=list)
    trace_id: str | None = None
    requested_model: str = ""
    difficulty: float | None = None
    failovers: int = 0  # times the router moved the request to another replica

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        itl = cap_samples(self.inter_token_s, ITL_CAP)
        out["inter_token_s"] = np.round(np.asarray(itl, dtype=float), 7).tolist() if itl else []
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RequestRecord":
        """Build from a parsed line; unknown keys are ignored (newer writers may add some)."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known and (v is not None or k in _NULLABLE)}
        for k in _FLOATS & kwargs.keys():
            kwargs[k] = float(kwargs[k])
        for k in _INTS & kwargs.keys():
            kwargs[k] = int(kwargs[k])
        for k in _STRS & kwargs.keys():
            kwargs[k] = str(kwargs[k])
        if kwargs.get("ttft_s") is not None:
            kwargs["ttft_s"] = float(kwargs["ttft_s"])
        kwargs["inter_token_s"] = [float(x) for x in (kwargs.get("inter_token_s") or [])]
        return cls(**kwargs)

    @staticmethod
    def gaps(chunk_times: Sequence[float]) -> list[float]:
        """Inter-token gaps from the times successive token chunks were sent."""
        return [b - a for a, b in zip(chunk_times, chunk_times[1:])]


_FLOATS = {"started_unix_s", "e2e_s", "queue_wait_s"}
_INTS = {"prompt_tokens", "completion_tokens", "cached_prompt_tokens"}
_STRS = {"request_id", "tenant", "model", "replica_id", "request_type", "finish_reason", "status"}
_NULLABLE = {"ttft_s", "trace_id"}


@dataclass(slots=True, frozen=True)
class ReplicaUsage:
    """One stretch of time a replica was in the router's registry (wall clock, seconds)."""

    replica_id: str
    model: str
    start_unix_s: float
    end_unix_s: float

    @property
    def seconds(self) -> float:
        return max(0.0, self.end_unix_s - self.start_unix_s)

    def to_dict(self) -> dict[str, Any]:
        return {"replica_id": self.replica_id, "model": self.model,
                "start_unix_s": self.start_unix_s, "end_unix_s": self.end_unix_s}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ReplicaUsage":
        return cls(replica_id=str(data["replica_id"]), model=str(data["model"]),
                   start_unix_s=float(data["start_unix_s"]), end_unix_s=float(data["end_unix_s"]))


def cap_samples(samples: Sequence[float], cap: int = ITL_CAP) -> list[float]:
    """At most `cap` samples, kept evenly spaced over the list (first and last kept), so a
    long generation's early and late gaps are both represented."""
    n = len(samples)
    if n <= cap:
        return list(samples)
    if cap <= 1:
        return list(samples[:cap])
    step = (n - 1) / (cap - 1)
    return [samples[round(i * step)] for i in range(cap)]


class JsonlAppender:
    """Thread-safe, line-buffered append of JSON objects to one file (opened lazily)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._fh: IO[str] | None = None

    def append(self, obj: dict[str, Any]) -> None:
        line = json.dumps(obj, separators=(",", ":"), default=_json_default) + "\n"
        with self._lock:
            if self._fh is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fh = open(self.path, "a", buffering=1, encoding="utf-8")
            self._fh.write(line)

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


class RecordWriter:
    """Appends RequestRecords to <run_dir>/requests.jsonl and ReplicaUsage lines to
    <run_dir>/replicas.jsonl.

        writer = RecordWriter(run_dir)
        writer.write(RequestRecord(request_id=..., tenant=..., model=..., ...))  # per request
        writer.write_replica(ReplicaUsage(replica_id, model, joined_unix_s, left_unix_s))
        writer.close()                                                           # at shutdown

    Cheap enough to call once per finished request from the event loop; safe from threads.
    It never raises on odd values: a non-finite ttft_s is written as null, other non-finite
    floats as NaN/Infinity (Python's json reads them back; the report ignores them).
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self._requests = JsonlAppender(self.run_dir / REQUESTS_FILE)
        self._replicas = JsonlAppender(self.run_dir / REPLICAS_FILE)

    def write(self, record: RequestRecord) -> None:
        data = record.to_dict()
        if data["ttft_s"] is not None and not math.isfinite(data["ttft_s"]):
            data["ttft_s"] = None
        self._requests.append(data)

    def write_replica(self, usage: ReplicaUsage) -> None:
        self._replicas.append(usage.to_dict())

    def close(self) -> None:
        self._requests.close()
        self._replicas.close()

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def iter_jsonl(path: Path) -> Iterator[dict[str, Any] | None]:
    """Parsed objects of a JSONL file; None for a line that is not a JSON object."""
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                yield None
                continue
            yield obj if isinstance(obj, dict) else None


def load_jsonl(path: Path, parse: Callable[[dict[str, Any]], T]) -> tuple[list[T], int]:
    """(parsed objects, number of lines skipped as unreadable) from a JSON-lines file; a line
    cut off when a run was killed is skipped and counted, not fatal."""
    items: list[T] = []
    bad = 0
    for obj in iter_jsonl(path):
        try:
            if obj is None:
                raise ValueError("not a JSON object")
            items.append(parse(obj))
        except (TypeError, ValueError, KeyError):
            bad += 1
    if bad:
        log.warning("%s: skipped %d unreadable line(s)", path, bad)
    return items, bad


def load_records(path: Path) -> tuple[list[RequestRecord], int]:
    """(records, number of lines skipped as unreadable) from a requests.jsonl file."""
    return load_jsonl(path, RequestRecord.from_dict)


def load_replicas(path: Path) -> tuple[list[ReplicaUsage], int]:
    """(usages, number of lines skipped) from a replicas.jsonl file."""
    return load_jsonl(path, ReplicaUsage.from_dict)


def read_records(run_dir: Path) -> list[RequestRecord]:
    """All request records of a run (<run_dir>/requests.jsonl; FileNotFoundError if absent)."""
    return load_records(Path(run_dir) / REQUESTS_FILE)[0]


def read_replicas(run_dir: Path) -> list[ReplicaUsage]:
    """Replica lifetimes of a run (<run_dir>/replicas.jsonl); [] when the file is absent."""
    path = Path(run_dir) / REPLICAS_FILE
    return load_replicas(path)[0] if path.exists() else []


def replica_seconds(usages: Sequence[ReplicaUsage]) -> dict[str, tuple[str, float]]:
    """replica_id → (model, seconds alive). Lines for the same replica are merged as a union
    of intervals, so a replica appended both when it left and again at shutdown is not
    counted twice, while a replica that left and rejoined gets both stretches."""
    by_replica: dict[str, list[ReplicaUsage]] = {}
    for u in usages:
        by_replica.setdefault(u.replica_id, []).append(u)
    out: dict[str, tuple[str, float]] = {}
    for rid, items in by_replica.items():
        intervals = [(u.start_unix_s, u.end_unix_s) for u in items if u.end_unix_s > u.start_unix_s]
        out[rid] = (items[-1].model, interval_union_length(intervals))
    return out


def derive_replica_usage(records: Sequence[RequestRecord]) -> list[ReplicaUsage]:
    """Fallback when a run has no replicas.jsonl: each replica alive from the start of the
    first request it served to the end of the last one. An underestimate (idle time before
    and after is missing) — the report says so when it uses this."""
    spans: dict[str, list[float]] = {}
    models: dict[str, str] = {}
    for r in records:
        if not r.replica_id:
            continue
        end = r.started_unix_s + max(r.e2e_s, 0.0)
        lo_hi = spans.setdefault(r.replica_id, [r.started_unix_s, end])
        lo_hi[0], lo_hi[1] = min(lo_hi[0], r.started_unix_s), max(lo_hi[1], end)
        models[r.replica_id] = r.model
    return [ReplicaUsage(rid, models[rid], lo, hi) for rid, (lo, hi) in sorted(spans.items())]


def interval_union_length(intervals: Sequence[tuple[float, float]]) -> float:
    """Total length covered by a set of [start, end] intervals (overlaps counted once)."""
    total, cur_lo, cur_hi = 0.0, None, None
    for lo, hi in sorted((a, b) for a, b in intervals if b > a):
        if cur_hi is None or lo > cur_hi:
            if cur_hi is not None:
                total += cur_hi - cur_lo  # type: ignore[operator]
            cur_lo, cur_hi = lo, hi
        else:
            cur_hi = max(cur_hi, hi)
    if cur_hi is not None:
        total += cur_hi - cur_lo  # type: ignore[operator]
    return total
