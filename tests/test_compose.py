"""docker-compose.yml must run what `switchyard up` runs.

The expectation is derived from the code, not copied: `switchyard up` is invoked with its default
options (typer's CliRunner) while LocalStack records the processes it would spawn instead of
spawning them — the nats-server argv, and each worker, batcher and router with its module and
flags. `compose_drift()` then compares the compose file with that plan and with the service
config dataclasses (services/*/config.py, read through switchyard.config.load_config), and
returns the problems it finds; the real file must have none, and every mutation in MUTATIONS
(a dropped replica, a changed port, a misspelled flag, …) must be reported.

Compose service names: `worker-<variant>-<i>` / `batcher-<variant>-<i>` where the variant is the
model's key in switchyard.model.convert.MODEL_NAMES (int4, fp32); the batcher's replica id is
LocalStack's `<model>-<i>`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib
import inspect
import io
import os
import re
import shlex
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator
from unittest import mock
from urllib.parse import urlparse

import pytest
import yaml

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"

# Fields LocalStack sets that a container does not: the port file (compose waits on healthchecks),
# and the ONNX Runtime thread count (LocalStack divides this host's cores between its workers).
NOT_COMPARED = {"port_file", "threads"}
# SWITCHYARD_* variables read outside the config dataclasses (logging set-up, span file).
NON_CONFIG_ENV = {"SWITCHYARD_LOG_LEVEL", "SWITCHYARD_SPANS_FILE"}
ANY_ADDRESS = "0.0.0.0"
OTLP_GRPC_PORT = 4317
JAEGER_UI_PORT = 16686
PROMETHEUS_CONFIG = "/etc/prometheus/prometheus.yml"
FAKE_PORT_BASE = 41000  # ports the recording LocalStack hands out instead of real ones


# --------------------------------------------------------------------------------------------
# what `switchyard up` starts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Process:
    local_name: str       # LocalStack's name: worker-smollm2-135m-instruct-int4-0
    compose_name: str     # worker-int4-0
    module: str           # services.worker
    args: tuple[str, ...]
    model: str | None
    port: int             # the port the recording LocalStack reported for it


@dataclass(frozen=True)
class Plan:
    spec: Any             # the StackSpec `up` built
    processes: tuple[Process, ...]
    nats_argv: tuple[str, ...]
    nats_url: str
    # argument values that were paths in `up`'s working folder, other than the model folders:
    # "file" (an input `up` prepared, e.g. the dev tenants file) or "dir" (an output, e.g. the run folder)
    host_paths: tuple[tuple[str, str], ...] = ()

    def by_compose_name(self) -> dict[str, Process]:
        return {p.compose_name: p for p in self.processes}


@contextlib.contextmanager
def _chdir(path: str) -> Iterator[None]:  # contextlib.chdir is Python ≥ 3.11
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


class _Captured(Exception):
    """Raised by the recording LocalStack.start once `up` has handed it the whole stack."""


@functools.lru_cache(maxsize=None)
def local_plan() -> Plan:
    """Run `switchyard up` with its defaults, recording what LocalStack would spawn."""
    from typer.testing import CliRunner

    from switchyard import cli
    from switchyard.bus import server as bus_server
    from switchyard.model.config import MANIFEST_FILE
    from switchyard.model.convert import MODEL_NAMES
    from switchyard.runtime import stack as stack_mod

    defaults = {name: getattr(p.default, "default", p.default)
                for name, p in inspect.signature(cli.up).parameters.items()}
    served = cli.parse_serve(defaults["serve"])
    variant_of = {model: variant for variant, model in MODEL_NAMES.items()}
    spawned: list[tuple[str, str, list[str], int]] = []
    captured: dict[str, Any] = {}

    class RecordedService:
        def __init__(self, name: str, port: int) -> None:
            self.name, self.port = name, port

        def wait_port(self, timeout_s: float) -> int:
            return self.port

    def spawn(self: Any, name: str, module: str, args: list[str], port_file: bool = True) -> RecordedService:
        port = FAKE_PORT_BASE + len(spawned)
        spawned.append((name, module, list(args), port))
        return RecordedService(name, port)

    class RecordedNats(bus_server.NatsServer):
        def start(self) -> "RecordedNats":
            captured["nats_argv"], captured["nats_url"] = tuple(self.argv()), self.url
            self.stop()  # nothing runs; removes the temporary store folder
            return self

    def start(self: Any, timeout_s: float = 180.0) -> None:
        self._start(timeout_s)
        captured["spec"] = self.spec
        self._tmp.cleanup()
        raise _Captured

    # `up` runs with no options at all, in an empty folder: its relative defaults (models/,
    # runs/…) land there, and what it creates there (dev tenant, run folder) is classified.
    with tempfile.TemporaryDirectory(prefix="switchyard-compose-test-") as tmp, _chdir(tmp):
        for model in served:  # `up` refuses to start without the model folders
            folder = Path(defaults["models_dir"]) / model
            folder.mkdir(parents=True)
            (folder / MANIFEST_FILE).write_text("{}")
        sigterm = signal.getsignal(signal.SIGTERM)  # `up` installs its own handler
        try:
            with mock.patch.object(stack_mod.LocalStack, "start", start), \
                    mock.patch.object(stack_mod.LocalStack, "_spawn", spawn), \
                    mock.patch.object(stack_mod.LocalStack, "wait_ready", lambda self, timeout_s: None), \
                    mock.patch.object(stack_mod, "NatsServer", RecordedNats), \
                    mock.patch.object(bus_server, "nats_server_binary", lambda: "nats-server"):
                result = CliRunner().invoke(cli.app, ["up"])
        finally:
            signal.signal(signal.SIGTERM, sigterm)
        if not isinstance(result.exception, _Captured):
            raise AssertionError(f"`switchyard up` did not reach LocalStack.start: {result.exception!r}\n{result.output}")
        spec = captured["spec"]
        host_paths: dict[str, str] = {}
        for _name, _module, args, _port in spawned:
            for value in args:
                path = Path(value).resolve()
                if value.startswith("-") or not path.exists() or not path.is_relative_to(Path(tmp).resolve()) \
                        or path.is_relative_to(Path(spec.models_dir).resolve()):
                    continue
                host_paths[value] = "dir" if path.is_dir() else "file"

    processes = []
    for local_name, module, args, port in spawned:
        role = module.rsplit(".", 1)[-1]
        model, compose_name = None, local_name
        for m, count in spec.replicas.items():
            for i in range(count):
                if local_name == f"{role}-{m}-{i}":
                    model, compose_name = m, f"{role}-{variant_of.get(m, m)}-{i}"
        processes.append(Process(local_name, compose_name, module, tuple(args), model, port))
    return Plan(spec, tuple(processes), captured["nats_argv"], captured["nats_url"], tuple(sorted(host_paths.items())))


# --------------------------------------------------------------------------------------------
# reading compose entries
# --------------------------------------------------------------------------------------------


def _command(svc: dict) -> list[str]:
    cmd = svc.get("command")
    if cmd is None:
        return []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def _module(cmd: list[str]) -> str | None:
    return cmd[cmd.index("-m") + 1] if "-m" in cmd[:-1] else None


def _environment(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _interpolate(value: str) -> str:
    """Compose's ${VAR:-default} / ${VAR-default} → the default (the file as shipped)."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


def _ports(svc: dict) -> list[tuple[str | None, str]]:
    """(published, target) pairs."""
    out: list[tuple[str | None, str]] = []
    for p in svc.get("ports") or []:
        if isinstance(p, dict):
            published = p.get("published")
            out.append((None if published is None else str(published), str(p.get("target"))))
            continue
        parts = str(p).split("/")[0].split(":")
        out.append((parts[-2] if len(parts) >= 2 else None, parts[-1]))
    return out


def _mounts(svc: dict) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) per volume entry."""
    out = []
    for v in svc.get("volumes") or []:
        if isinstance(v, dict):
            out.append((str(v.get("source", "")), str(v.get("target", "")), bool(v.get("read_only", False))))
            continue
        parts = str(v).split(":")
        if len(parts) == 1:
            out.append(("", parts[0], False))
        else:
            out.append((parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
    return out


def _named(source: str) -> bool:
    return bool(source) and not source.startswith((".", "/", "~", "$"))


def _depends(svc: dict) -> dict[str, str]:
    dep = svc.get("depends_on") or {}
    if isinstance(dep, list):
        return {name: "service_started" for name in dep}
    return {name: (cond or {}).get("condition", "service_started") for name, cond in dep.items()}


def _under(path: str, folder: str) -> bool:
    return PurePosixPath(path) == PurePosixPath(folder) or PurePosixPath(folder) in PurePosixPath(path).parents


def _same(a: Any, b: Any) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)


# --------------------------------------------------------------------------------------------
# service configs
# --------------------------------------------------------------------------------------------


def config_class(module: str) -> type:
    """The one config dataclass defined in services/<name>/config.py."""
    mod = importlib.import_module(f"{module}.config")
    classes = [c for c in vars(mod).values()
               if inspect.isclass(c) and dataclasses.is_dataclass(c) and c.__module__ == mod.__name__]
    assert len(classes) == 1, f"{mod.__name__} defines {classes}, expected one config dataclass"
    return classes[0]


def _flags(args: list[str]) -> tuple[dict[str, str], list[str]]:
    """`--flag value` / `--flag=value` pairs → {flag: value}, and the tokens that are not."""
    flags: dict[str, str] = {}
    stray: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        if token.startswith("--") and "=" in token:
            name, value = token.split("=", 1)
            flags[name] = value
        elif token.startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("--"):
            flags[token] = args[i + 1]
            i += 1
        else:
            stray.append(token)
        i += 1
    return flags, stray


@dataclass
class Settings:
    config: Any                    # the config dataclass instance (None when it does not load)
    explicit: dict[str, str]       # field → value set by a flag or SWITCHYARD_* variable
    problems: list[str]


def load_settings(cls: type, args: list[str], env: dict[str, str], who: str) -> Settings:
    """Read `args` and the SWITCHYARD_* part of `env` the way the service does (load_config),
    without validate() (it checks files that exist only in the containers)."""
    from switchyard.config import env_name, flag_name, load_config

    fields = {f.name for f in dataclasses.fields(cls)}
    problems: list[str] = []
    flags, stray = _flags(args)
    explicit: dict[str, str] = {}
    if stray:
        problems.append(f"{who}: command has arguments that are not `--flag value`: {stray}")
    for flag, value in flags.items():
        field = flag[2:].replace("-", "_")
        if field not in fields or flag_name(field) != flag:
            problems.append(f"{who}: flag {flag} is not a field of {cls.__name__}")
        else:
            explicit.setdefault(field, _interpolate(value))
    switchyard_env = {k: _interpolate(v) for k, v in env.items() if k.startswith("SWITCHYARD_")}
    for key, value in switchyard_env.items():
        field = key[len("SWITCHYARD_"):].lower()
        if key in NON_CONFIG_ENV:
            continue
        if field not in fields or env_name(field) != key:
            problems.append(f"{who}: environment variable {key} is not a field of {cls.__name__}")
        elif field not in explicit:  # flags win over env, as in load_config
            explicit[field] = value
    config = None
    if not problems:
        clean_env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHYARD_")}
        argv = [a for flag, value in flags.items() for a in (flag, _interpolate(value))]
        try:
            with mock.patch.dict(os.environ, {**clean_env, **switchyard_env}, clear=True), \
                    mock.patch.object(cls, "validate", lambda self: None, create=True), \
                    contextlib.redirect_stderr(io.StringIO()) as err:
                config = load_config(cls, argv)
        except SystemExit:
            problems.append(f"{who}: {cls.__name__} rejects the command line: {err.getvalue().strip()}")
        except ValueError as exc:
            problems.append(f"{who}: {cls.__name__} cannot read its settings: {exc}")
    return Settings(config, explicit, problems)


def _tracing_name(module: str) -> str | None:
    """The service name the server passes to setup_tracing (its Jaeger service when run locally)."""
    source = inspect.getsource(importlib.import_module(f"{module}.server"))
    found = re.search(r"setup_tracing\(\s*[\"']([^\"']+)[\"']", source)
    return found.group(1) if found else None


# --------------------------------------------------------------------------------------------
# the checker
# --------------------------------------------------------------------------------------------


# Services compose runs that `switchyard up` starts only on request (--autoscale runs the
# autoscaler in its own process); their flags and SWITCHYARD_* variables are still checked.
ON_REQUEST = {"autoscaler": "services.autoscaler"}


def compose_drift(compose: dict, base_dir: Path = REPO) -> list[str]:
    """Problems of `compose` (a loaded docker-compose.yml) against `switchyard up`; [] if none."""
    from switchyard.model.convert import MODEL_NAMES

    plan = local_plan()
    spec = plan.spec
    problems: list[str] = []
    services: dict[str, dict] = compose.get("services") or {}
    expected = plan.by_compose_name()

    def image_of(name: str) -> str:
        return str(services[name].get("image", ""))

    def find(predicate: Callable[[str, dict], bool], what: str) -> str | None:
        found = [n for n, s in services.items() if predicate(n, s)]
        if len(found) != 1:
            problems.append(f"expected one {what} service, found {found}")
            return None
        return found[0]

    nats = find(lambda n, s: str(s.get("image", "")).split(":")[0].split("/")[-1] == "nats", "NATS (image nats)")
    jaeger = find(lambda n, s: str(s.get("image", "")).startswith("jaegertracing/"), "Jaeger")
    prometheus = find(lambda n, s: str(s.get("image", "")).startswith("prom/prometheus"), "Prometheus")
    converter = find(lambda n, s: (c := _command(s)) and _module(c) == "switchyard.cli"
                     and c[c.index("switchyard.cli") + 1:c.index("switchyard.cli") + 3] == ["model", "convert"],
                     "model converter (python -m switchyard.cli model convert)")

    # --- the models volume, written by the converter --------------------------------------
    models_mount, models_volume = None, None
    if converter:
        flags, _ = _flags(_command(services[converter])[_command(services[converter]).index("convert") + 1:])
        models_mount = flags.get("--models-dir")
        mounted = [(src, ro) for src, tgt, ro in _mounts(services[converter]) if tgt == models_mount]
        if not models_mount:
            problems.append(f"{converter}: `model convert` has no --models-dir")
        elif not mounted or not _named(mounted[0][0]) or mounted[0][1]:
            problems.append(f"{converter}: --models-dir {models_mount} is not a writable named volume")
        else:
            models_volume = mounted[0][0]
        for model in spec.replicas:
            if model not in MODEL_NAMES.values():
                problems.append(f"`switchyard up` serves {model}, which `model convert` does not build")

    # --- the replicas and the router: names, modules ----------------------------------------
    actual = {n: _module(_command(s)) for n, s in services.items()
              if (_module(_command(s)) or "").startswith("services.")}
    for name, proc in expected.items():
        if name not in services:
            problems.append(f"{name}: missing (`switchyard up` starts {proc.local_name}: python -m {proc.module})")
        elif actual.get(name) != proc.module:
            problems.append(f"{name}: runs python -m {actual.get(name) or _command(services[name])}, "
                            f"`switchyard up` runs {proc.module} for {proc.local_name}")
    for name, module in actual.items():
        if name in ON_REQUEST:  # up starts it only when asked (checked below against its config)
            s = load_settings(config_class(ON_REQUEST[name]), _command(services[name])[3:], _environment(services[name]), name)
            problems += s.problems if module == ON_REQUEST[name] else [f"{name}: runs {module}, not {ON_REQUEST[name]}"]
            continue
        if name not in expected:
            problems.append(f"{name}: runs {module}, but `switchyard up` starts no such process "
                            f"(it starts {sorted(expected)})")

    present = {n: p for n, p in expected.items() if n in services}
    settings: dict[str, Settings] = {}
    for name, proc in present.items():
        cmd = _command(services[name])
        if cmd[:1] not in (["python"], ["python3"]):
            problems.append(f"{name}: command should start with python -m {proc.module}, not {cmd[:3]}")
        module = _module(cmd)
        args = cmd[cmd.index(module) + 1:] if module else []
        s = load_settings(config_class(proc.module), args, _environment(services[name]), name)
        settings[name] = s
        problems += s.problems

    # --- each setting LocalStack passes, as the container must set it -----------------------
    nats_port = urlparse(plan.nats_url).port
    host_paths = dict(plan.host_paths)
    local_by_port = {p.port: p for p in plan.processes}
    for name, proc in present.items():
        svc, mine = services[name], settings[name]
        local_flags, _ = _flags(list(proc.args))
        mounts = _mounts(svc)
        depends = _depends(svc)
        for flag, local_value in local_flags.items():
            field = flag[2:].replace("-", "_")
            if field in NOT_COMPARED:
                continue
            value = mine.explicit.get(field)
            if value is None:
                problems.append(f"{name}: does not set {field} (LocalStack passes {flag} {local_value})")
                continue
            if local_value == spec.host:  # a listen address: all interfaces, or nothing reaches it
                if value != ANY_ADDRESS:
                    problems.append(f"{name}: {field} is {value}; in a container it must be {ANY_ADDRESS}")
            elif local_value == plan.nats_url:
                want = f"nats://{nats}:{nats_port}"
                if value != want:
                    problems.append(f"{name}: {field} is {value}, expected {want}")
            elif re.fullmatch(rf"{re.escape(spec.host)}:\d+", local_value):  # another process's address
                target = local_by_port.get(int(local_value.rsplit(":", 1)[1]))
                other = settings.get(target.compose_name) if target else None
                port = other.explicit.get("port") if other else None
                want = f"{target.compose_name}:{port}" if target else "?"
                if value != want:
                    problems.append(f"{name}: {field} is {value}, expected {want} (LocalStack: {local_value})")
                elif target and depends.get(target.compose_name) is None:
                    problems.append(f"{name}: does not depend_on {target.compose_name}")
            elif _under(local_value, str(spec.models_dir)):
                relative = PurePosixPath(Path(local_value).relative_to(spec.models_dir).as_posix())
                want = str(PurePosixPath(models_mount or "?") / relative) if str(relative) != "." else models_mount
                if value != want:
                    problems.append(f"{name}: {field} is {value}, expected {want}")
                if not any(src == models_volume and tgt == models_mount for src, tgt, _ in mounts):
                    problems.append(f"{name}: does not mount the models volume {models_volume} at {models_mount}")
                if converter and depends.get(converter) != "service_completed_successfully":
                    problems.append(f"{name}: must depend_on {converter} (condition service_completed_successfully)")
            elif local_value in host_paths and host_paths[local_value] == "file":
                # an input `up` prepares (the dev tenants file): a one-shot job must write it first
                holders = [src for src, tgt, _ in mounts if _named(src) and _under(value, tgt)]
                writers = [d for d, cond in depends.items() if cond == "service_completed_successfully"
                           and d in services and any(src in holders for src, _, ro in _mounts(services[d]) if not ro)]
                if not holders or not writers:
                    problems.append(f"{name}: {field} {value} is not on a named volume written by a job it "
                                    f"depends on (service_completed_successfully), as `up` prepares {local_value}")
            elif local_value in host_paths:
                # an output folder of `up` (the run folder): a writable named volume keeps it
                if not any(_named(src) and _under(value, tgt) and not ro for src, tgt, ro in mounts):
                    problems.append(f"{name}: {field} {value} is not on a writable named volume "
                                    f"(`up` passes its folder {local_value})")
            elif field.endswith("port") and local_value == "0":  # LocalStack picks free ports
                if not value.isdigit() or not 0 < int(value) < 65536:
                    problems.append(f"{name}: {field} must be a fixed port, not {value}")
            elif not _same(value, local_value):
                problems.append(f"{name}: {field} is {value}, LocalStack passes {local_value}")
            if field.endswith("port") and local_value.isdigit() and int(local_value) > 0:
                # a fixed port of `switchyard up` (router gRPC / HTTP): published on the same host port
                if (local_value, value) not in _ports(svc):
                    problems.append(f"{name}: {field} {value} must be published on host port {local_value} "
                                    f"(`switchyard up` default), ports are {svc.get('ports')}")

        # healthchecks probe a port this service listens on
        own_ports = {v for f, v in mine.explicit.items() if f.endswith("port")}
        for port in re.findall(r"(?:127\.0\.0\.1|localhost):(\d+)", " ".join(map(str, (svc.get("healthcheck") or {}).get("test", [])))):
            if port not in own_ports:
                problems.append(f"{name}: healthcheck probes port {port}, which it does not listen on ({sorted(own_ports)})")

        # every Switchyard service talks to NATS or to a process that does
        if proc.module != "services.worker" and nats and depends.get(nats) is None:
            problems.append(f"{name}: does not depend_on {nats}")

    # --- NATS: the same server options as `switchyard up` (JetStream, store, port) ----------
    if nats:
        cmd = _command(services[nats])
        local_opts = [a for a in plan.nats_argv if a.startswith("-")]
        for opt in local_opts:
            if opt in ("-a", "-c"):  # listen address: the image listens on all interfaces; -c: the
                continue  # generated NATS users, which compose opts out of (docs/security.md)
            if opt not in cmd:
                problems.append(f"{nats}: command lacks {opt} (`switchyard up` runs {' '.join(plan.nats_argv)})")
        if "-js" not in cmd and "--jetstream" not in cmd:
            problems.append(f"{nats}: JetStream is off (-js)")
        if "-p" in cmd[:-1] and cmd[cmd.index("-p") + 1] != str(nats_port):
            problems.append(f"{nats}: listens on {cmd[cmd.index('-p') + 1]}, `switchyard up` uses {nats_port}")
        if "-sd" in cmd[:-1]:
            store = cmd[cmd.index("-sd") + 1]
            if not any(_named(src) and tgt == store for src, tgt, _ in _mounts(services[nats])):
                problems.append(f"{nats}: JetStream store {store} is not on a named volume")
        if (str(nats_port), str(nats_port)) not in _ports(services[nats]):
            problems.append(f"{nats}: port {nats_port} is not published (as `switchyard up` serves it)")

    # --- tracing: OTLP to Jaeger, one service name per role ---------------------------------
    if jaeger:
        env = _environment(services[jaeger])
        if env.get("COLLECTOR_OTLP_ENABLED", "").lower() != "true":
            problems.append(f"{jaeger}: COLLECTOR_OTLP_ENABLED must be true")
        if (str(JAEGER_UI_PORT), str(JAEGER_UI_PORT)) not in _ports(services[jaeger]):
            problems.append(f"{jaeger}: UI port {JAEGER_UI_PORT} is not published")
    for name, proc in present.items():
        env = _environment(services[name])
        want = f"http://{jaeger}:{OTLP_GRPC_PORT}"
        if env.get("OTEL_EXPORTER_OTLP_ENDPOINT") != want:
            problems.append(f"{name}: OTEL_EXPORTER_OTLP_ENDPOINT is {env.get('OTEL_EXPORTER_OTLP_ENDPOINT')}, expected {want}")
        service_name = _tracing_name(proc.module) or f"switchyard-{proc.module.rsplit('.', 1)[-1]}"
        if env.get("OTEL_SERVICE_NAME") != service_name:
            problems.append(f"{name}: OTEL_SERVICE_NAME is {env.get('OTEL_SERVICE_NAME')}, expected {service_name}")
        if f"service.instance.id={name}" not in env.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
            problems.append(f"{name}: OTEL_RESOURCE_ATTRIBUTES lacks service.instance.id={name}")

    # --- metrics: every Switchyard service exposes /metrics and Prometheus scrapes it -------
    if prometheus:
        sources = [src for src, tgt, _ in _mounts(services[prometheus]) if tgt == PROMETHEUS_CONFIG]
        targets: set[str] = set()
        if not sources:
            problems.append(f"{prometheus}: nothing mounted at {PROMETHEUS_CONFIG}")
        else:
            path = Path(sources[0]) if Path(sources[0]).is_absolute() else base_dir / sources[0]
            if not path.is_file():
                problems.append(f"{prometheus}: config {path} does not exist")
            else:
                config = yaml.safe_load(path.read_text()) or {}
                for job in config.get("scrape_configs") or []:
                    for group in job.get("static_configs") or []:
                        targets.update(str(t) for t in group.get("targets") or [])
        if (str(9090), str(9090)) not in _ports(services[prometheus]):
            problems.append(f"{prometheus}: port 9090 is not published")
        for name in present:
            port = settings[name].explicit.get("metrics_port")
            if port is None:
                problems.append(f"{name}: sets no metrics_port, so Prometheus has nothing to scrape")
            elif f"{name}:{port}" not in targets:
                problems.append(f"{name}: Prometheus does not scrape {name}:{port}")
        for target in sorted(targets):
            host = target.rsplit(":", 1)[0]
            if host not in services and host not in ("localhost", "127.0.0.1"):
                problems.append(f"{prometheus}: scrapes {target}, which is no compose service")
            elif host in present and target != f"{host}:{settings[host].explicit.get('metrics_port')}":
                problems.append(f"{prometheus}: scrapes {target}, but {host} serves metrics on "
                                f"{settings[host].explicit.get('metrics_port')}")

    # --- depends_on targets exist; service_healthy needs a healthcheck ----------------------
    for name, svc in services.items():
        for dep, cond in _depends(svc).items():
            if dep not in services:
                problems.append(f"{name}: depends_on {dep}, which is no service")
            elif cond == "service_healthy" and not services[dep].get("healthcheck"):
                problems.append(f"{name}: waits for {dep} to be healthy, but {dep} has no healthcheck")

    # --- images: every service that runs project code is built from an existing Dockerfile --
    for name in [*present, *([converter] if converter else [])]:
        if not services[name].get("build"):
            problems.append(f"{name}: has no build (it runs Switchyard code: build it from deploy/Dockerfile)")
    for name, svc in services.items():
        build = svc.get("build")
        if not build:
            continue
        build = {"context": build} if isinstance(build, str) else build
        context = base_dir / str(build.get("context", "."))
        dockerfile = context / str(build.get("dockerfile", "Dockerfile"))
        if not dockerfile.is_file():
            problems.append(f"{name}: Dockerfile {dockerfile} does not exist")
            continue
        stages = re.findall(r"^\s*FROM\s+\S+\s+AS\s+(\S+)", dockerfile.read_text(), flags=re.I | re.M)
        if build.get("target") and build["target"] not in stages:
            problems.append(f"{name}: build target {build['target']} is no stage of {dockerfile} ({stages})")

    # --- named volumes are declared -----------------------------------------------------------
    declared = set((compose.get("volumes") or {}).keys())
    for name, svc in services.items():
        for src, _, _ in _mounts(svc):
            if _named(src) and src not in declared:
                problems.append(f"{name}: volume {src} is not declared under volumes:")
    return problems


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def test_plan_is_derived_from_switchyard_up() -> None:
    """Guards the derivation itself: the recorded plan has every replica `up` serves."""
    from switchyard.cli import DEFAULT_SERVE, parse_serve
    plan = local_plan()
    assert plan.spec.replicas == parse_serve(DEFAULT_SERVE)
    modules = [p.module for p in plan.processes]
    total = sum(plan.spec.replicas.values())
    assert modules.count("services.worker") == modules.count("services.batcher") == total
    assert modules.count("services.router") == 1
    assert "-js" in plan.nats_argv


def test_compose_matches_switchyard_up(compose: dict) -> None:
    problems = compose_drift(compose)
    assert problems == [], "docker-compose.yml drifted from `switchyard up`:\n" + "\n".join(problems)


def test_every_compose_service_is_explained(compose: dict) -> None:
    """Only the Switchyard processes, their one-shot jobs and the observability back ends."""
    plan = local_plan()
    allowed = set(plan.by_compose_name()) | {"nats", "model-init", "tenant-init", "jaeger", "prometheus"} | set(ON_REQUEST)
    assert set(compose["services"]) == allowed


def _set_arg(svc: dict, flag: str, value: str) -> None:
    cmd = list(svc["command"])
    cmd[cmd.index(flag) + 1] = value
    svc["command"] = cmd


def _rename_arg(svc: dict, old: str, new: str) -> None:
    svc["command"] = [new if a == old else a for a in svc["command"]]


def _drop_arg(svc: dict, flag: str) -> None:
    cmd = list(svc["command"])
    i = cmd.index(flag)
    svc["command"] = cmd[:i] + cmd[i + 2:]


def _mutate_prometheus(c: dict, tmp: Path) -> None:
    config = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    for job in config["scrape_configs"]:
        for group in job["static_configs"]:
            group["targets"] = [t for t in group["targets"] if t != "batcher-fp32-0:9090"]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    c["services"]["prometheus"]["volumes"] = [f"{tmp / 'prometheus.yml'}:{PROMETHEUS_CONFIG}:ro"]


def _replace(svc: dict, key: str, **changes: Any) -> None:
    svc[key] = {**svc[key], **changes}  # a new dict: anchors share the old one between services


S = "services"
MUTATIONS: dict[str, tuple[Callable[[dict, Path], Any], str]] = {
    "drop a replica": (lambda c, t: [c[S].pop("worker-int4-1"), c[S].pop("batcher-int4-1")], "worker-int4-1"),
    "drop a batcher only": (lambda c, t: c[S].pop("batcher-fp32-0"), "batcher-fp32-0"),
    "extra replica": (lambda c, t: c[S].__setitem__("worker-fp32-1", copy.deepcopy(c[S]["worker-fp32-0"])), "worker-fp32-1"),
    "router published port": (lambda c, t: c[S]["router"].__setitem__("ports", ["50051:50051", "8080:8000"]), "8000"),
    "router gRPC port": (lambda c, t: _set_arg(c[S]["router"], "--grpc-port", "50052"), "grpc_port"),
    "router HTTP off": (lambda c, t: _set_arg(c[S]["router"], "--http-port", "-1"), "http_port"),
    "misspelled flag": (lambda c, t: _rename_arg(c[S]["batcher-int4-0"], "--replica-id", "--replica-idd"), "--replica-idd"),
    "underscored flag": (lambda c, t: _rename_arg(c[S]["batcher-int4-0"], "--replica-id", "--replica_id"), "--replica_id"),
    "abbreviated flag": (lambda c, t: _rename_arg(c[S]["router"], "--tenants-file", "--tenants"), "--tenants"),
    "misspelled env": (lambda c, t: c[S]["batcher-int4-0"]["environment"].__setitem__(
        "SWITCHYARD_MAX_BATCHSIZE", c[S]["batcher-int4-0"]["environment"].pop("SWITCHYARD_MAX_BATCH_SIZE")),
        "SWITCHYARD_MAX_BATCHSIZE"),
    "unreadable value": (lambda c, t: c[S]["worker-int4-0"]["environment"].__setitem__("SWITCHYARD_MAX_SEQUENCES", "many"),
                         "worker-int4-0"),
    "other batch size": (lambda c, t: c[S]["batcher-fp32-0"]["environment"].__setitem__("SWITCHYARD_MAX_BATCH_SIZE", "8"),
                         "max_batch_size"),
    "wrong module": (lambda c, t: _rename_arg(c[S]["worker-int4-0"], "services.worker", "services.batcher"), "services.batcher"),
    "wrong replica id": (lambda c, t: _set_arg(c[S]["batcher-int4-1"], "--replica-id", "smollm2-135m-instruct-int4-0"),
                         "replica_id"),
    "batcher on the wrong worker": (lambda c, t: _set_arg(c[S]["batcher-int4-1"], "--worker", "worker-int4-0:50061"),
                                    "batcher-int4-1"),
    "worker port without its batcher": (lambda c, t: c[S]["worker-fp32-0"]["environment"].__setitem__("SWITCHYARD_PORT", "50062"),
                                        "batcher-fp32-0"),
    "worker on loopback": (lambda c, t: c[S]["worker-fp32-0"]["environment"].__setitem__("SWITCHYARD_HOST", "127.0.0.1"),
                           "host"),
    "metrics on loopback": (lambda c, t: c[S]["router"]["environment"].__setitem__("SWITCHYARD_METRICS_HOST", "127.0.0.1"),
                            "metrics_host"),
    "wrong model folder": (lambda c, t: _set_arg(c[S]["worker-fp32-0"], "--model-dir", "/models/smollm2-135m-instruct-int4"),
                           "model_dir"),
    "router without tenants": (lambda c, t: _drop_arg(c[S]["router"], "--tenants-file"), "tenants_file"),
    "router before the models": (lambda c, t: c[S]["router"]["depends_on"].pop("model-init"), "model-init"),
    "nats without JetStream": (lambda c, t: c[S]["nats"].__setitem__("command", [a for a in c[S]["nats"]["command"] if a != "-js"]),
                               "-js"),
    "nats on another port": (lambda c, t: _set_arg(c[S]["nats"], "-p", "4223"), "nats"),
    "wrong NATS URL": (lambda c, t: c[S]["router"]["environment"].__setitem__("SWITCHYARD_NATS_URL", "nats://localhost:4222"),
                       "nats_url"),
    "jaeger OTLP off": (lambda c, t: c[S]["jaeger"]["environment"].__setitem__("COLLECTOR_OTLP_ENABLED", "false"),
                        "COLLECTOR_OTLP_ENABLED"),
    "no OTLP endpoint": (lambda c, t: c[S]["router"]["environment"].pop("OTEL_EXPORTER_OTLP_ENDPOINT"),
                         "OTEL_EXPORTER_OTLP_ENDPOINT"),
    "metrics port drift": (lambda c, t: c[S]["worker-int4-1"]["environment"].__setitem__("SWITCHYARD_METRICS_PORT", "9091"),
                           "worker-int4-1"),
    "no metrics port": (lambda c, t: c[S]["batcher-int4-0"]["environment"].pop("SWITCHYARD_METRICS_PORT"), "metrics_port"),
    "prometheus misses a target": (_mutate_prometheus, "batcher-fp32-0"),
    "missing Dockerfile": (lambda c, t: _replace(c[S]["router"], "build", dockerfile="deploy/Dockerfile.missing"),
                           "Dockerfile.missing"),
    "missing build stage": (lambda c, t: _replace(c[S]["model-init"], "build", target="converter"), "converter"),
    "healthcheck on another port": (lambda c, t: _replace(c[S]["worker-int4-0"], "healthcheck",
                                                         test=["CMD", "switchyard-healthcheck", "grpc", "127.0.0.1:50062"]),
                                    "healthcheck"),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_drift_is_reported(compose: dict, mutation: str, tmp_path: Path) -> None:
    """Self-check of compose_drift: each mutation of the real file is a reported problem."""
    mutate, mentions = MUTATIONS[mutation]
    mutated = copy.deepcopy(compose)
    mutate(mutated, tmp_path)
    problems = compose_drift(mutated)
    assert problems, f"compose_drift missed: {mutation}"
    assert any(mentions in p for p in problems), f"{mutation}: no problem mentions {mentions!r}: {problems}"


def test_dockerfile_stages_and_files() -> None:
    """The image builds what the compose file runs: protobufs generated, project installed,
    a non-root user, the healthcheck script, and the converter stage with the GGUF wheel."""
    text = (REPO / "deploy" / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim|^ARG PYTHON_IMAGE=python:3\.11-slim", text, re.M)
    assert "grpc_tools.protoc -I protos" in text
    assert re.search(r"pip install --no-deps \.", text)
    assert re.search(r"^USER switchyard", text, re.M)
    from switchyard.model.gguf_source import WHEEL_PACKAGE
    assert WHEEL_PACKAGE in text
    for copied in re.findall(r"^COPY\s+(?:--\S+\s+)*(\S+)\s", text, re.M):
        assert (REPO / copied).exists(), f"Dockerfile copies {copied}, which does not exist"
