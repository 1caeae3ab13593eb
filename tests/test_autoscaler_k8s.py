"""The Kubernetes backend against a real HTTP server playing the API server (port 0): the
official client's requests — paths, verbs, patch bodies and content types — are recorded and
checked, and the fake API server applies them to its Deployment scales. No cluster runs here
(deploy/README.md says what this does and does not verify)."""

from __future__ import annotations

import json
from pathlib import Path
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest

pytest.importorskip("kubernetes")
from kubernetes import client  # noqa: E402

from services.autoscaler.scaling import ModelScaling  # noqa: E402
from services.autoscaler.core import Autoscaler, ColdStartStore, default_policy_factory  # noqa: E402
from services.autoscaler.kubernetes import KubernetesBackend  # noqa: E402
from switchyard.fleet.view import FleetView  # noqa: E402
from switchyard.runtime.lifecycle import READY, STARTING  # noqa: E402

pytestmark = [pytest.mark.unit]
SCALE = "/apis/apps/v1/namespaces/{ns}/deployments/{name}/scale"


class FakeApiServer:
    """Deployment scales in memory, served over HTTP as the API server does; every request kept."""

    def __init__(self) -> None:
        self.scales: dict[tuple[str, str], dict[str, int]] = {}  # (ns, name) → {"spec": n, "status": n}
        self.requests: list[dict[str, object]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _scale_key(self) -> tuple[str, str] | None:
                parts = self.path.split("?")[0].strip("/").split("/")
                # apis/apps/v1/namespaces/<ns>/deployments/<name>/scale
                if len(parts) == 8 and parts[:3] == ["apis", "apps", "v1"] and parts[5] == "deployments" \
                        and parts[7] == "scale":
                    return parts[4], parts[6]
                return None

            def _reply(self, code: int, body: dict[str, object]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                outer.requests.append({"method": self.command, "path": self.path.split("?")[0],
                                       "content_type": self.headers.get("Content-Type"), "body": body})
                key = self._scale_key()
                if key is None or key not in outer.scales:
                    self._reply(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                                      "code": 404, "message": f"{self.path} not found"})
                    return
                scale = outer.scales[key]
                if self.command == "PATCH":
                    scale["spec"] = int(body["spec"]["replicas"])  # type: ignore[index]
                self._reply(200, {"kind": "Scale", "apiVersion": "autoscaling/v1",
                                  "metadata": {"name": key[1], "namespace": key[0]},
                                  "spec": {"replicas": scale["spec"]},
                                  "status": {"replicas": scale["status"], "selector": "app=x"}})

            do_GET = do_PATCH = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api_server() -> Iterator[FakeApiServer]:
    server = FakeApiServer()
    yield server
    server.close()


def backend_for(server: FakeApiServer) -> KubernetesBackend:
    configuration = client.Configuration(host=server.url)
    return KubernetesBackend(client.AppsV1Api(client.ApiClient(configuration)), "switchyard")


def test_add_and_remove_patch_the_deployment_scale(api_server: FakeApiServer) -> None:
    api_server.scales[("switchyard", "switchyard-replica-tiny-llama")] = {"spec": 1, "status": 1}
    backend = backend_for(api_server)
    rid = backend.add_replica("tiny-llama")
    assert rid == "switchyard-replica-tiny-llama/1"
    path = SCALE.format(ns="switchyard", name="switchyard-replica-tiny-llama")
    get, patch = api_server.requests
    assert (get["method"], get["path"]) == ("GET", path)
    assert (patch["method"], patch["path"]) == ("PATCH", path)
    assert patch["body"] == {"spec": {"replicas": 2}}
    assert patch["content_type"] in ("application/merge-patch+json", "application/strategic-merge-patch+json")
    assert api_server.scales[("switchyard", "switchyard-replica-tiny-llama")]["spec"] == 2
    # The pod count lags the spec: one exists (ready as far as Kubernetes goes), one is starting.
    assert [r.state for r in backend.replicas("tiny-llama")] == [READY, STARTING]
    backend.remove_replica("tiny-llama", "switchyard-replica-tiny-llama/0")
    assert api_server.requests[-1]["body"] == {"spec": {"replicas": 1}}
    api_server.scales[("switchyard", "switchyard-replica-tiny-llama")] = {"spec": 0, "status": 0}
    n = len(api_server.requests)
    backend.remove_replica("tiny-llama", "any")  # at zero: read, no patch below zero
    assert [r["method"] for r in api_server.requests[n:]] == ["GET"]


def test_autoscaler_converges_a_deployment_to_its_minimum(api_server: FakeApiServer) -> None:
    api_server.scales[("switchyard", "switchyard-replica-small")] = {"spec": 0, "status": 0}
    backend = backend_for(api_server)
    scaler = Autoscaler([ModelScaling.parse("small=2:4:reactive"), ModelScaling.parse("missing=1:2")], backend,
                        FleetView(), ColdStartStore(None, 10.0), default_policy_factory({}))
    decisions = scaler.tick(now=100.0)
    assert decisions["small"].replicas == 2
    assert "missing" not in decisions  # its Deployment does not exist: logged, the other model still scaled
    patches = [r["body"] for r in api_server.requests if r["method"] == "PATCH"]
    assert patches == [{"spec": {"replicas": 1}}, {"spec": {"replicas": 2}}]
    scaler.tick(now=101.0)  # two asked for (starting: no pod heartbeats yet): nothing more to do
    assert [r["body"] for r in api_server.requests if r["method"] == "PATCH"] == patches


def test_manifests_name_the_deployments_the_backend_scales_and_grant_only_that() -> None:
    import yaml

    from services.autoscaler.config import AutoscalerConfig
    from switchyard.config import load_config

    k8s = Path(__file__).resolve().parents[1] / "deploy" / "k8s"
    docs = [d for f in sorted(k8s.glob("*.yaml")) if f.name != "kustomization.yaml"
            for d in yaml.safe_load_all(f.read_text()) if d]
    listed = yaml.safe_load((k8s / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(f.name for f in k8s.glob("*.yaml") if f.name != "kustomization.yaml")
    by_kind: dict[str, dict[str, dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    scaler = by_kind["Deployment"]["switchyard-autoscaler"]["spec"]["template"]["spec"]
    container = scaler["containers"][0]
    argv = container["command"][container["command"].index("services.autoscaler") + 1:]
    env = {e["name"]: e["value"] for e in container["env"]}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        config = load_config(AutoscalerConfig, argv)  # validated as the service reads it
    assert config.backend == "kubernetes"
    backend = KubernetesBackend(client.AppsV1Api(), config.k8s_namespace, config.k8s_deployment)
    for scaling in config.scaling():
        deployment = by_kind["Deployment"][backend.deployment_name(scaling.model)]
        assert deployment["metadata"]["namespace"] == config.k8s_namespace
        pod = deployment["spec"]["template"]["spec"]
        worker = next(c for c in pod["containers"] if c["name"] == "worker")
        assert f"/models/{scaling.model}" in worker["command"]
    (role,) = by_kind["Role"].values()
    assert role["rules"] == [{"apiGroups": ["apps"], "resources": ["deployments/scale"],
                              "verbs": ["get", "patch", "update"]}]
    (binding,) = by_kind["RoleBinding"].values()
    assert binding["subjects"][0]["name"] == scaler["serviceAccountName"] and binding["roleRef"]["name"] == role["metadata"]["name"]
