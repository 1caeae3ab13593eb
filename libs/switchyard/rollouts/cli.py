"""`switchyard rollout start|status|promote|rollback|abort` and `switchyard experiment report`.

The commands talk to the rollout KV bucket on NATS directly (the same compare-and-set the
routers use), so they work with no router up; every router applies a change within a moment.
The same operations are served by the routers' admin API (/admin/rollouts, admin key)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Optional

import typer
from rich.console import Console

from .state import (FEEDBACK_BUCKET, SAMPLES_BUCKET, RolloutState, RolloutStore, StaleRevision, kv_key, new_rollout,
                    open_bucket, operate)

rollout_app = typer.Typer(help="Safe rollouts of model versions: canary, blue-green, shadow, A/B (docs/rollouts.md).",
                          no_args_is_help=True)
experiment_app = typer.Typer(help="A/B experiments: per-arm outcomes with Welch's t-test.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)

NATS_URL = typer.Option("nats://127.0.0.1:4222", envvar="SWITCHYARD_NATS_URL", help="NATS server URL")
NATS_USER = typer.Option("", envvar="SWITCHYARD_NATS_USER", help="NATS user (empty: none)")
NATS_PASSWORD = typer.Option("", envvar="SWITCHYARD_NATS_PASSWORD", help="NATS password (set it in the environment)")


async def _connect(url: str, user: str, password: str) -> Any:
    import nats
    kwargs: dict[str, Any] = {"servers": [url], "connect_timeout": 3, "max_reconnect_attempts": 0}
    if user:
        from switchyard.bus.auth import inbox_prefix
        kwargs.update(user=user, password=password, inbox_prefix=inbox_prefix(user))
    return await nats.connect(**kwargs)


def _run(coro: Any) -> Any:
    try:
        return asyncio.run(coro)
    except (ValueError, KeyError, StaleRevision) as exc:
        err.print(f"[red]error:[/] {exc.args[0] if isinstance(exc, KeyError) else exc}")
        raise typer.Exit(2) from None
    except OSError as exc:
        err.print(f"[red]error:[/] cannot reach NATS: {exc}")
        raise typer.Exit(3) from None


def status_table(state: RolloutState) -> Any:
    """C1's rollout table for one state (the canary's schedule when it is a canary)."""
    from .report import rollout_table
    controller = None
    if state.mode == "canary":
        from .analysis import Thresholds
        from .canary import CanaryController, CanaryPlan
        plan = CanaryPlan(steps=tuple(state.steps), step_duration_s=state.step_duration_s,
                          thresholds=Thresholds(**state.thresholds))
        outcome = {"promoted": "promoted", "rolled_back": "rolled_back"}.get(state.status, "running")
        controller = CanaryController(plan, step=min(state.step, len(plan.judged_steps) - 1),
                                      step_started_at=state.step_started_at, outcome=outcome,
                                      final_reason=state.reason)
    table = rollout_table(model=state.model, baseline=state.baseline, candidate=state.candidate, mode=state.mode,
                          weight=state.weight if state.running else float(state.active() == state.candidate),
                          state=state.status, reason=state.reason, controller=controller, now=time.time())
    return table


def _history_table(state: RolloutState) -> Any:
    from rich.table import Table
    table = Table(title="decisions", show_header=True, header_style="bold")
    for col in ("time (UTC)", "kind", "weight", "by", "reason"):
        table.add_column(col)
    for d in state.history[-10:]:
        table.add_row(time.strftime("%H:%M:%S", time.gmtime(d.at)), d.kind, f"{d.weight:.0%}", d.by, d.reason)
    return table


@rollout_app.command("start")
def start(
    model: str = typer.Argument(..., help="the model name clients ask for"),
    candidate: str = typer.Option(..., help="version to roll out (served as MODEL@CANDIDATE)"),
    baseline: str = typer.Option("", help="version serving now (default: the active one of the last rollout)"),
    mode: str = typer.Option("canary", help="canary, bluegreen, shadow or ab"),
    steps: str = typer.Option("0.01,0.05,0.25,0.5,1.0", help="canary weights, comma-separated"),
    step_duration_s: float = typer.Option(60.0, help="canary analysis interval per step"),
    max_error_rate_increase: float = typer.Option(0.02, help="canary: candidate - baseline error rate limit"),
    max_ttft_p99_ratio: float = typer.Option(1.5, help="canary: candidate / baseline TTFT p99 limit"),
    max_itl_p99_ratio: float = typer.Option(1.5, help="canary: candidate / baseline inter-token p99 limit"),
    min_requests: int = typer.Option(20, help="canary: requests per arm before a verdict"),
    shadow_fraction: float = typer.Option(0.1, help="shadow: share of requests copied to the candidate"),
    weight: float = typer.Option(0.5, help="ab: share of users in the candidate arm"),
    nats_url: str = NATS_URL, nats_user: str = NATS_USER, nats_password: str = NATS_PASSWORD,
) -> None:
    """Start a rollout (refused while another of the same model runs)."""
    try:
        step_list = [float(x) for x in steps.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"--steps must be numbers, got {steps!r}") from None

    async def go() -> RolloutState:
        nc = await _connect(nats_url, nats_user, nats_password)
        try:
            store = await RolloutStore.open(nc.jetstream())
            base = baseline
            if not base:
                current = await store.get(model)
                if current is None:
                    raise ValueError(f"no earlier rollout of {model}: name the serving version with --baseline")
                base = current[0].active()
            state = new_rollout(model, base, candidate, mode, steps=step_list, step_duration_s=step_duration_s,
                                thresholds={"max_error_rate_increase": max_error_rate_increase,
                                            "max_ttft_p99_ratio": max_ttft_p99_ratio,
                                            "max_itl_p99_ratio": max_itl_p99_ratio, "min_requests": min_requests},
                                shadow_fraction=shadow_fraction if mode == "shadow" else 0.0, weight=weight, by="cli")
            await store.put_new(state)
            return state
        finally:
            await nc.close()
    out.print(status_table(_run(go())))


@rollout_app.command("status")
def status(
    model: Optional[str] = typer.Argument(None, help="one model (default: every rollout)"),
    as_json: bool = typer.Option(False, "--json", help="print the raw states as JSON"),
    nats_url: str = NATS_URL, nats_user: str = NATS_USER, nats_password: str = NATS_PASSWORD,
) -> None:
    """Rollouts and their last decisions."""
    async def go() -> list[RolloutState]:
        nc = await _connect(nats_url, nats_user, nats_password)
        try:
            store = await RolloutStore.open(nc.jetstream())
            if model:
                got = await store.get(model)
                if got is None:
                    raise KeyError(f"no rollout of {model}")
                return [got[0]]
            return [s for s, _ in await store.all()]
        finally:
            await nc.close()
    states = _run(go())
    if as_json:
        out.print_json(json.dumps([json.loads(s.to_json()) for s in states]))
        return
    if not states:
        out.print("no rollouts")
    for state in states:
        out.print(status_table(state))
        out.print(_history_table(state))


def _action(action: str) -> Any:
    def command(
        model: str = typer.Argument(..., help="the model name clients ask for"),
        reason: str = typer.Option("", help="why (recorded with the decision)"),
        nats_url: str = NATS_URL, nats_user: str = NATS_USER, nats_password: str = NATS_PASSWORD,
    ) -> None:
        async def go() -> RolloutState:
            nc = await _connect(nats_url, nats_user, nats_password)
            try:
                store = await RolloutStore.open(nc.jetstream())
                state, _ = await store.change(model, lambda s: operate(s, action, "cli", reason))
                return state
            finally:
                await nc.close()
        out.print(status_table(_run(go())))
    command.__doc__ = {"promote": "All new traffic to the candidate (blue-green: the switch).",
                       "rollback": "All new traffic back to the baseline (also after a promotion).",
                       "abort": "Stop the rollout; the baseline serves."}[action]
    return command


for _name in ("promote", "rollback", "abort"):
    rollout_app.command(_name)(_action(_name))


async def experiment_samples(js: Any, model: str) -> dict[str, dict[str, list[float]]]:
    """Per arm (version): ttft_s, e2e_s, score lists, merged over every router's samples;
    scores joined from the feedback bucket by request id."""
    from nats.js.errors import KeyNotFoundError, NoKeysError
    samples_kv = await open_bucket(js, SAMPLES_BUCKET)
    feedback_kv = await open_bucket(js, FEEDBACK_BUCKET, ttl=7 * 86400)
    try:
        keys = [k for k in await samples_kv.keys() if k.startswith(kv_key(model) + ".")]
    except NoKeysError:
        keys = []
    arms: dict[str, dict[str, list[float]]] = {}
    for key in keys:
        payload = json.loads((await samples_kv.get(key)).value)
        for version, rows in payload.get("arms", {}).items():
            arm = arms.setdefault(version, {"ttft_s": [], "e2e_s": [], "score": [], "errors": []})
            for request_id, error, ttft, e2e, score in rows:
                arm["errors"].append(float(bool(error)))
                if not error:
                    arm["ttft_s"].append(ttft)
                    arm["e2e_s"].append(e2e)
                if score is None:
                    try:
                        score = json.loads((await feedback_kv.get(kv_key(request_id))).value)["score"]
                    except KeyNotFoundError:
                        score = None
                if score is not None:
                    arm["score"].append(float(score))
    return arms


def compare_arms(arms: dict[str, dict[str, list[float]]], baseline: str, candidate: str,
                 alpha: float = 0.05) -> list[Any]:
    """welch_compare per metric with at least 2 samples per arm."""
    from .experiments import welch_compare
    out_rows = []
    a, b = arms.get(baseline, {}), arms.get(candidate, {})
    for metric in ("ttft_s", "e2e_s", "score", "errors"):
        xa, xb = a.get(metric, []), b.get(metric, [])
        if len(xa) >= 2 and len(xb) >= 2:
            out_rows.append(welch_compare(xa, xb, metric, baseline, candidate, alpha))
    return out_rows


@experiment_app.command("report")
def experiment_report(
    model: str = typer.Argument(..., help="the model name clients ask for"),
    alpha: float = typer.Option(0.05, help="significance level"),
    as_json: bool = typer.Option(False, "--json", help="print the comparisons as JSON"),
    record: bool = typer.Option(True, help="record the verdict as a decision of the experiment (logs, metrics, "
                                "spans and `switchyard report` on every router)"),
    nats_url: str = NATS_URL, nats_user: str = NATS_USER, nats_password: str = NATS_PASSWORD,
) -> None:
    """Per metric (TTFT, e2e latency, client score, error rate): B - A, its CI, Welch's
    p-value and the per-arm n the observed effect needs; "significant" only when p < alpha."""
    async def go() -> tuple[RolloutState, list[Any]]:
        nc = await _connect(nats_url, nats_user, nats_password)
        try:
            js = nc.jetstream()
            got = await (await RolloutStore.open(js)).get(model)
            if got is None:
                raise KeyError(f"no experiment of {model}")
            state = got[0]
            arms = await experiment_samples(js, model)
            rows = compare_arms(arms, state.baseline, state.candidate, alpha)
            if record and rows:
                verdict = "; ".join(r.summary() for r in rows)
                await (await RolloutStore.open(js)).change(model, lambda s: s.record("verdict", verdict, "cli"))
            return state, rows
        finally:
            await nc.close()
    state, rows = _run(go())
    if as_json:
        out.print_json(json.dumps([{**r.__dict__, "confidence": r.confidence} for r in rows]))
        return
    if not rows:
        out.print(f"not enough samples yet in the experiment of {model} (2 per arm per metric at least)")
        return
    from .report import experiment_table
    out.print(experiment_table(rows, title=f"experiment {state.model}: {state.baseline} (A) vs {state.candidate} (B)"))
