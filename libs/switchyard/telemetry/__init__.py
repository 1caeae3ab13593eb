"""Telemetry shared by the services: OpenTelemetry tracing set-up and context propagation
(gRPC metadata, NATS headers), span file export, Prometheus metrics endpoint."""
