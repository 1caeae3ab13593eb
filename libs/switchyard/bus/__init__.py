"""NATS bus: subjects, the JetStream request queue, the nats-server process, headers."""
