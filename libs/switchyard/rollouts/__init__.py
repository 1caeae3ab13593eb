"""Safe rollouts and experiments (docs/rollouts.md): pure decision cores (analysis, canary,
experiments), the rollout state kept in NATS KV (state), tables (report) and the CLI (cli).
The router's side — version resolution, the canary loop, shadow mirroring — is
services/router/rollouts.py."""
