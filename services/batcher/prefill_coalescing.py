"""Prefill coalescing: on a GPU worker, new prompts wait a few decode steps for each other.

A prefill run on a GPU costs its kernel launches, not its tokens (H200, SmolLM2 int4: ~6 ms for
one prompt or sixteen), and every decoding sequence waits for it. Under a closed-loop load the
newcomers arrive a few per step; prefilling each trickle as it comes stalls the whole batch
once per step, waiting until a group has gathered stalls it once per group. The group asked
for grows with the batch — the stall it spares is batch size × run time — so a lightly loaded
worker makes nobody wait, and nobody waits more than ``max_wait_steps`` steps.
(text-generation-inference's router makes the same trade with waiting_served_ratio and
max_waiting_tokens.) On a CPU a prefill costs per token: nothing to gain there.

Off unless asked for (`--prefill-wait-steps N`): on an H200 at 256 closed-loop streams, waiting
up to 8 steps measured 35,310 and 24,404 tok/s against 26,432 and 26,528 without (same run,
docs/benchmarks.md) — no gain beyond the run-to-run spread; the stack's arrivals already come in
groups there (requests that finish together come back together).
"""

from __future__ import annotations

from dataclasses import dataclass

# Decoding sequences per newcomer a group waits for: 256 decoding → groups of 16, < 32 → no wait.
DECODING_PER_NEWCOMER = 16


@dataclass(frozen=True)
class PrefillCoalescing:
    """When prompts not yet started wait for more (pure: the scheduler asks it each step)."""

    max_wait_steps: int  # 0: never wait
    decoding_per_newcomer: int = DECODING_PER_NEWCOMER

    def group(self, decoding: int) -> int:
        """Newcomers worth one prefill run next to ``decoding`` sequences."""
        return max(1, decoding // self.decoding_per_newcomer)

    def hold(self, decoding: int, waiting: int, waiting_tokens: int, budget: int, oldest_wait: int) -> bool:
        """True to let the ``waiting`` prompts (``waiting_tokens`` in all, the oldest held for
        ``oldest_wait`` steps already) wait another step: others decode, they are fewer than a
        group, they do not fill the step's prompt-token ``budget``, and none has waited its
        max_wait_steps."""
        if self.max_wait_steps <= 0 or decoding == 0 or waiting == 0:
            return False
        return waiting < self.group(decoding) and waiting_tokens < budget and oldest_wait < self.max_wait_steps
