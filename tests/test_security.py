"""Internal traffic is authenticated (issue 10 §1): NATS users with subject permissions per
service, worker gRPC behind a per-replica token. Real nats-server, real nats-py clients."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path
from typing import Any, Iterator

import grpc
import nats
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nats.aio.client import Client

from switchyard.bus import subjects
from switchyard.bus.auth import NatsUser, batcher_user, observer_user, router_user
from switchyard.bus.queue import ensure_request_stream, flushed, pull_subscription, recent_cancels
from switchyard.bus.server import NatsServer
from switchyard.runtime.stack import LocalStack
from switchyard.v1 import bus_pb2, generate_pb2, generate_pb2_grpc, worker_pb2, worker_pb2_grpc

from conftest import TINY, start_stack

MODEL = TINY
MINE, OTHER = f"{MODEL}-0", f"{MODEL}-1"


@pytest.fixture(scope="module")
def users() -> dict[str, NatsUser]:
    # "auditor" exists only here: it hears everything, to show what forged messages reached
    return {"router": router_user(), "observer": observer_user(),
            MINE: batcher_user(MINE, MODEL), OTHER: batcher_user(OTHER, MODEL),
            "auditor": NatsUser("auditor", "auditor-password", subscribe=(">",))}


@pytest.fixture(scope="module")
def server(users: dict[str, NatsUser]) -> Iterator[NatsServer]:
    with NatsServer(users=list(users.values())) as srv:
        yield srv


class Session:
    """A connection as one user, recording the errors the server sends it."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.nc: Client | None = None

    async def open(self, url: str, user: NatsUser | None = None, **kw: Any) -> Client:
        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc))
        creds = {"user": user.user, "password": user.password, "inbox_prefix": user.inbox_prefix} if user else {}
        self.nc = await nats.connect(url, error_cb=on_error, allow_reconnect=False, connect_timeout=2,
                                     max_reconnect_attempts=0, **creds, **kw)
        return self.nc

    def violations(self) -> list[str]:
        return [e for e in self.errors if "permissions violation" in e.lower()]


async def _heard(server: NatsServer, users: dict[str, NatsUser], subject: str,
                 publish: Any, settle_s: float = 0.3) -> list[bytes]:
    """What an auditor listening on `subject` receives while `publish()` runs."""
    observer = await Session().open(server.url, users["auditor"])
    try:
        sub = await observer.subscribe(subject)
        await flushed(observer)
        await publish()
        await asyncio.sleep(settle_s)
        got = []
        while True:
            try:
                got.append((await sub.next_msg(timeout=0.05)).data)
            except nats.errors.TimeoutError:
                return got
    finally:
        await observer.close()


def test_config_file_is_private_and_url_carries_no_secret(server: NatsServer, users: dict[str, NatsUser]) -> None:
    assert server.config_path is not None
    assert stat.S_IMODE(server.config_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(server.config_path.parent.stat().st_mode) & 0o077 == 0
    assert all(u.password not in server.url for u in users.values())
    assert all(u.password not in repr(u) for u in users.values())


def test_unauthenticated_and_wrong_password_clients_cannot_connect(server: NatsServer, users: dict[str, NatsUser]) -> None:
    async def attempt(**kw: Any) -> None:
        with pytest.raises(Exception):
            nc = await Session().open(server.url, **kw)
            await nc.close()

    async def main() -> None:
        await attempt()
        await attempt(user="router", password="not-the-password")
        await attempt(user=users[MINE].user, password=users[OTHER].password)
    asyncio.run(main())


def test_batcher_cannot_forge_another_replicas_heartbeat_nor_dispatch(server: NatsServer, users: dict[str, NatsUser]) -> None:
    async def main() -> None:
        batcher = Session()
        nc = await batcher.open(server.url, users[MINE])
        forged = bus_pb2.LoadReport(replica_id=OTHER, model=MODEL).SerializeToString()
        own = bus_pb2.LoadReport(replica_id=MINE, model=MODEL).SerializeToString()

        async def publish_heartbeats() -> None:
            await nc.publish(subjects.load_subject(MODEL, OTHER), forged)
            await nc.publish(subjects.load_subject("other-model", MINE), forged)  # its replica, another model
            await nc.publish(subjects.load_subject(MODEL, MINE), own)
            await flushed(nc)
        assert await _heard(server, users, subjects.LOAD_ALL, publish_heartbeats) == [own]

        async def publish_dispatch() -> None:
            await nc.publish(subjects.request_subject(OTHER), bus_pb2.DispatchRequest(request_id="x").SerializeToString())
            await nc.publish(subjects.cancel_subject(OTHER), bus_pb2.CancelRequest(request_id="x").SerializeToString())
            # nor a router's usage report, which would charge tenants on every router
            await nc.publish(subjects.peers_subject("router-x"), bus_pb2.RouterUsage(router_id="router-x").SerializeToString())
            await flushed(nc)
        assert await _heard(server, users, "switchyard.>", publish_dispatch) == []  # observer hears only load
        assert len(batcher.violations()) >= 5
        await nc.close()

        # Nor did anything reach the request stream: the router sees it empty.
        router = await Session().open(server.url, users["router"])
        js = router.jetstream()
        await ensure_request_stream(js)
        assert (await js.stream_info(subjects.REQUEST_STREAM)).state.messages == 0
        await router.close()
    asyncio.run(main())


def test_batcher_cannot_subscribe_beyond_its_own_subjects(server: NatsServer, users: dict[str, NatsUser]) -> None:
    async def main() -> None:
        router = await Session().open(server.url, users["router"])
        batcher = Session()
        nc = await batcher.open(server.url, users[MINE])
        # its own cancel subject is fine
        sub = await nc.subscribe(subjects.cancel_subject(MINE))
        await flushed(nc)
        await router.publish(subjects.cancel_subject(MINE), b"c")
        await flushed(router)
        assert (await sub.next_msg(timeout=5)).data == b"c"
        for subject in (">", "switchyard.>", "switchyard.reply.>", "switchyard.load.>", subjects.PEERS_ALL,
                        subjects.cancel_subject(OTHER),
                        f"_INBOX.{users[OTHER].user}.>", f"_INBOX.{users['router'].user}.>", "_INBOX.>", "$JS.>"):
            sub = await nc.subscribe(subject)
            await flushed(nc)
            await router.publish(subject.replace(">", "x"), b"secret")
            await flushed(router)
            with pytest.raises(nats.errors.TimeoutError):
                await sub.next_msg(timeout=0.2)
        assert sum("subscription" in v for v in batcher.violations()) == 10
        await nc.close()
        await router.close()
    asyncio.run(main())


def test_routers_hear_each_others_usage_reports(server: NatsServer, users: dict[str, NatsUser]) -> None:
    async def main() -> None:
        one, other = await Session().open(server.url, users["router"]), await Session().open(server.url, users["router"])
        sub = await other.subscribe(subjects.PEERS_ALL)
        await flushed(other)
        report = bus_pb2.RouterUsage(router_id="router-a", epoch=7).SerializeToString()
        await one.publish(subjects.peers_subject("router-a"), report)
        await flushed(one)
        msg = await sub.next_msg(timeout=5)
        assert (msg.subject, msg.data) == ("switchyard.peers.router-a", report)
        await one.close()
        await other.close()
    asyncio.run(main())


def test_router_cannot_publish_heartbeats_and_observer_cannot_publish(server: NatsServer, users: dict[str, NatsUser]) -> None:
    async def main() -> None:
        router, observer = Session(), Session()
        rnc = await router.open(server.url, users["router"])
        onc = await observer.open(server.url, users["observer"])

        async def forge() -> None:
            fake = bus_pb2.LoadReport(replica_id="fake-0", model=MODEL).SerializeToString()
            await rnc.publish(subjects.load_subject(MODEL, "fake-0"), fake)
            await onc.publish(subjects.load_subject(MODEL, "fake-0"), fake)
            await onc.publish(subjects.cancel_subject(MINE), b"c")
            await onc.publish(subjects.request_subject(MINE), b"r")
            await flushed(rnc)
            await flushed(onc)
        assert await _heard(server, users, "switchyard.>", forge) == []
        assert router.violations() and len(observer.violations()) >= 3
        await rnc.close()
        await onc.close()
    asyncio.run(main())


def test_each_batcher_consumes_only_its_own_queue(server: NatsServer, users: dict[str, NatsUser]) -> None:
    async def main() -> None:
        router = await Session().open(server.url, users["router"])
        rjs = router.jetstream()
        await ensure_request_stream(rjs)
        await rjs.publish(subjects.request_subject(MINE), b"for-mine")
        await rjs.publish(subjects.request_subject(OTHER), b"for-other")
        await router.publish(subjects.cancel_subject(MINE), bus_pb2.CancelRequest(request_id="c1").SerializeToString())
        await flushed(router)
        await asyncio.sleep(0.1)

        mine = Session()
        nc = await mine.open(server.url, users[MINE])
        js = nc.jetstream(timeout=1.0)
        await ensure_request_stream(js)  # batchers may create the streams (not change them)
        cancels = await recent_cancels(js, MINE)
        assert bus_pb2.CancelRequest(request_id="c1").SerializeToString() in cancels
        assert cancels == await recent_cancels(js, MINE)  # read again from the start (consumer re-made)
        psub = await pull_subscription(js, MINE, max_ack_pending=4)
        msgs = await psub.fetch(batch=1, timeout=2)
        assert [m.data for m in msgs] == [b"for-mine"]
        await msgs[0].ack()
        await psub.unsubscribe()
        # The other replica's queue: no consumer on it, and no ephemeral one on the whole stream.
        with pytest.raises(Exception):
            await pull_subscription(js, OTHER, max_ack_pending=4)
        with pytest.raises(Exception):
            await js.pull_subscribe(subjects.request_subject(OTHER), stream=subjects.REQUEST_STREAM)
        with pytest.raises(Exception):
            await js.delete_stream(subjects.REQUEST_STREAM)
        assert mine.violations()
        await nc.close()
        info = await rjs.stream_info(subjects.REQUEST_STREAM)
        assert info.state.messages == 1  # the other replica's request is still there
        await router.close()
    asyncio.run(main())


# ---- the whole stack with NATS users and worker tokens ------------------------------------

@pytest.fixture(scope="module")
def secure_stack(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    stack = start_stack(tiny_models_dir, {TINY: 1}, tmp_path_factory.mktemp("secure-stack-logs"), internal_auth=True)
    yield stack
    stack.stop()


@pytest.mark.integration
def test_stack_serves_with_nats_users_and_worker_tokens(secure_stack: LocalStack) -> None:
    with grpc.insecure_channel(secure_stack.router_address) as channel:
        req = generate_pb2.GenerateRequest(model=TINY, text="hello world", max_tokens=8,
                                           stop=generate_pb2.StopConditions(ignore_eos=True))
        events = list(generate_pb2_grpc.GenerationStub(channel).Generate(req, timeout=60))
    assert events[-1].HasField("final") and events[-1].final.usage.completion_tokens == 8
    # Anonymous clients cannot reach the stack's NATS; the observer reads heartbeats only.
    async def bus() -> None:
        with pytest.raises(Exception):
            await Session().open(secure_stack.nats.url)  # type: ignore[union-attr]
        nc = await nats.connect(secure_stack.nats.url, **secure_stack.nats_observer)  # type: ignore[union-attr]
        sub = await nc.subscribe(subjects.LOAD_ALL)
        assert bus_pb2.LoadReport.FromString((await sub.next_msg(timeout=5)).data).replica_id == f"{TINY}-0"
        await nc.close()
    asyncio.run(bus())
    # No secret on any command line, nor in any log.
    secrets_ = [u.password for u in secure_stack.nats.users]  # type: ignore[union-attr]
    secrets_ += [env["SWITCHYARD_AUTH_TOKEN"] for env in secure_stack._secret_env.values() if "SWITCHYARD_AUTH_TOKEN" in env]
    for svc in secure_stack.services():
        cmdline = Path(f"/proc/{svc.process.pid}/cmdline").read_bytes().decode(errors="replace")
        assert not any(s in cmdline for s in secrets_), svc.name
        assert svc.log_path is not None and not any(s in svc.log_path.read_text() for s in secrets_), svc.name


@pytest.mark.integration
def test_worker_refuses_calls_without_its_token(secure_stack: LocalStack) -> None:
    worker = secure_stack.workers[0]
    token = secure_stack._secret_env[worker.name]["SWITCHYARD_AUTH_TOKEN"]
    assert secure_stack.worker_metadata(worker) == (("authorization", f"Bearer {token}"),)
    with grpc.insecure_channel(f"{secure_stack.spec.internal_host}:{worker.port}") as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        calls = [lambda md: stub.Step(worker_pb2.StepRequest(), timeout=5, metadata=md),
                 lambda md: stub.AddSequences(worker_pb2.AddSequencesRequest(sequences=[worker_pb2.SequenceSpec(
                     sequence_id="intruder", prompt_token_ids=[1, 2, 3])]), timeout=5, metadata=md),
                 lambda md: stub.Info(worker_pb2.InfoRequest(), timeout=5, metadata=md),
                 lambda md: stub.RemoveSequences(worker_pb2.RemoveSequencesRequest(all=True), timeout=5, metadata=md)]
        for call in calls:
            for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", token),)):
                with pytest.raises(grpc.RpcError) as err:
                    call(metadata)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Health stays open (the batcher and probes check it without a token); the token works.
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert stub.Info(worker_pb2.InfoRequest(), timeout=5, metadata=(("authorization", f"Bearer {token}"),)).model == TINY


def test_a_user_added_while_running_can_connect_within_its_permissions(tmp_path: Path) -> None:
    """A replica added at runtime (lifecycle backend, autoscaler) gets a NATS user by a config
    reload: it connects, is confined like the others, and existing connections stay up."""
    observer = observer_user()
    with NatsServer(users=[observer], log_path=tmp_path / "nats.log") as srv:
        late = batcher_user("late-0", MODEL)

        async def main() -> None:
            watcher = await nats.connect(srv.url, user=observer.user, password=observer.password,
                                         inbox_prefix=observer.inbox_prefix, allow_reconnect=False)
            with pytest.raises(Exception):  # not a user yet
                await nats.connect(srv.url, user=late.user, password=late.password, allow_reconnect=False)
            srv.add_users([late])
            assert "Reloaded server configuration" in (tmp_path / "nats.log").read_text()
            nc = await nats.connect(srv.url, user=late.user, password=late.password,
                                    inbox_prefix=late.inbox_prefix, allow_reconnect=False)
            sub = await watcher.subscribe(subjects.LOAD_ALL)
            await flushed(watcher)
            await nc.publish(subjects.load_subject(MODEL, "late-0"), b"own heartbeat")
            await nc.publish(subjects.load_subject(MODEL, OTHER), b"forged")  # denied
            await nc.flush()
            assert (await sub.next_msg(timeout=5)).data == b"own heartbeat"
            with pytest.raises(nats.errors.TimeoutError):
                await sub.next_msg(timeout=0.5)
            assert watcher.is_connected  # the reload kept existing connections
            await nc.close()
            await watcher.close()
        asyncio.run(main())
