"""Kubernetes backend of the lifecycle API: one Deployment per model (its pods each run a
worker+batcher pair), sized through the Deployment's scale subresource with the official
`kubernetes` client — `read_namespaced_deployment_scale` / `patch_namespaced_deployment_scale`
(the same endpoint `kubectl scale` and the HPA use; RBAC: get/patch on deployments/scale).

Kubernetes picks which pod goes on a scale-down; the pod gets SIGTERM, and the batcher drains
(stops pulling, finishes running requests within its grace; the router re-dispatches what
was queued for it), so `remove_replica` drains *a* replica of the model, not necessarily the
one named. Replicas are reported per index of the scale: the first `status.replicas` as ready
(pods that exist; the fleet view says which take traffic), the rest up to `spec.replicas` as
starting. A pod that cannot start is Kubernetes' to retry (CrashLoopBackOff); it shows here
as starting and never in the fleet view, so the autoscaler never counts it as capacity."""

from __future__ import annotations

import logging
import time

from kubernetes import client, config as kube_config

from switchyard.runtime.lifecycle import READY, STARTING, FleetBackend, Replica

log = logging.getLogger(__name__)


class KubernetesBackend(FleetBackend):
    def __init__(self, api: client.AppsV1Api, namespace: str, deployment: str = "switchyard-replica-{model}") -> None:
        self.api = api
        self.namespace = namespace
        self.deployment = deployment
        self._asked_at: dict[str, float] = {}  # model → when its scale was last raised

    @classmethod
    def from_environment(cls, namespace: str, deployment: str) -> "KubernetesBackend":
        """In a pod: its service account; elsewhere: the local kubeconfig."""
        try:
            kube_config.load_incluster_config()
        except kube_config.ConfigException:
            kube_config.load_kube_config()
        return cls(client.AppsV1Api(), namespace, deployment)

    def deployment_name(self, model: str) -> str:
        return self.deployment.replace("{model}", model.replace("_", "-").replace(".", "-").lower())

    def _scale(self, model: str) -> client.V1Scale:
        return self.api.read_namespaced_deployment_scale(self.deployment_name(model), self.namespace)

    def _set(self, model: str, replicas: int) -> None:
        name = self.deployment_name(model)
        self.api.patch_namespaced_deployment_scale(name, self.namespace, {"spec": {"replicas": replicas}})
        log.info("deployment %s/%s scaled to %d", self.namespace, name, replicas)

    def replicas(self, model: str) -> list[Replica]:
        scale = self._scale(model)
        wanted = scale.spec.replicas or 0
        existing = min((scale.status.replicas or 0) if scale.status else 0, wanted)
        name, asked = self.deployment_name(model), self._asked_at.get(model, 0.0)
        return [Replica(f"{name}/{i}", model, READY if i < existing else STARTING, asked)
                for i in range(wanted)]

    def add_replica(self, model: str) -> str:
        wanted = (self._scale(model).spec.replicas or 0) + 1
        self._set(model, wanted)
        self._asked_at[model] = time.monotonic()
        return f"{self.deployment_name(model)}/{wanted - 1}"

    def remove_replica(self, model: str, replica_id: str) -> None:
        wanted = self._scale(model).spec.replicas or 0
        if wanted > 0:
            self._set(model, wanted - 1)
