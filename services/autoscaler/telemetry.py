"""The autoscaler's Prometheus metrics."""

from prometheus_client import Counter, Gauge

DESIRED = Gauge("switchyard_autoscaler_desired_replicas", "Replicas the policy wants", ["model"])
READY = Gauge("switchyard_autoscaler_ready_replicas", "Live replicas taking traffic (fleet view)", ["model"])
STARTING = Gauge("switchyard_autoscaler_starting_replicas", "Replicas asked for and not live yet", ["model"])
DECISIONS = Counter("switchyard_autoscaler_decisions", "Decisions per model and reason", ["model", "reason"])
START_FAILURES = Counter("switchyard_autoscaler_start_failures", "Replicas that failed to start", ["model"])
COLD_START = Gauge("switchyard_autoscaler_cold_start_seconds", "Last measured cold start (process start → serving)",
                   ["model"])
SERVICE_RATE = Gauge("switchyard_autoscaler_service_rate_per_replica",
                     "Completions/s per replica at capacity the policy uses (measured from heartbeats once seen "
                     "saturated, else configured)", ["model"])
