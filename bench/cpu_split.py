"""CPU time per process of the stack under a concurrency-32 load (client, router, batcher,
worker, nats-server), from /proc/PID/stat.

    .venv/bin/python bench/cpu_split.py [DECODE_STEPS]
"""
import asyncio, os, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent))
from stack_overhead import through_stack, MODEL
from rich.progress import Progress
from switchyard.model.tiny import build_tiny_model
from switchyard.runtime.stack import LocalStack, StackSpec
steps = sys.argv[1] if len(sys.argv) > 1 else "1"
models = Path(tempfile.mkdtemp()); build_tiny_model(models, name=MODEL)
tick = os.sysconf("SC_CLK_TCK")
def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / tick
spec = StackSpec(models_dir=models, replicas={MODEL: 1}, max_batch_size=64, worker_threads=1, log_dir=Path(tempfile.mkdtemp()),
                 batcher_args=("--decode-steps", steps))
with LocalStack(spec) as st, Progress(transient=True) as p:
    pids = {"client": os.getpid(), "router": st.router.process.pid, "batcher": st.batchers[0].process.pid,
            "worker": st.workers[0].process.pid, "nats": st.nats.process.pid}
    asyncio.run(through_stack(st.router_address, "cpu split", 4, 16, 8, p, "warm"))
    before = {k: cpu(v) for k, v in pids.items()}; t0 = time.time()
    _, tps = asyncio.run(through_stack(st.router_address, "cpu split", 32, 320, 64, p, "load"))
    wall = time.time() - t0
    after = {k: cpu(v) for k, v in pids.items()}
print(f"decode_steps={steps} tok/s={tps:.0f} wall={wall:.1f}s")
for k in pids: print(f"  {k:8s} {100*(after[k]-before[k])/wall:5.0f}% of a core")
