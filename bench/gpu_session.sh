#!/bin/bash
# One GPU session's checks (issue 13 §6) through ../shared/gpu's kit, in priority order, each
# bounded so that all of them fit the device time; a step cut short still leaves its log.
#     bash .gpuN/recv.sh && source /tmp/gpukit/env.sh && bash bench/gpu_session.sh [measure|diagnose|stack]
# measure (default): int4.json, stack.json, fp32.json (bench/gpu_bench.py), the anchor
# (transformers on the same GGUF), profile.json; diagnose: replay.json (bench/engine_replay.py)
# and *profile.json (bench/stack_profile.py with py-spy: stage the kit with GPU_EXTRA_PACKAGES
# naming py-spy); stack: replay.json, stack.json (warm default twice, pipeline depth 3, 2 decode steps
# per call, prompts waiting 8 steps, separate worker; device memory with each stack up),
# stack_profile.json and sampled.json after a change to the stack. Every step's output, time and exit code go to steps.log; all under $OUT,
# which brings back at most 8 files.
set -u
: "${OUT:?set OUT to the folder that comes back}"
BUDGET=${GPU_SESSION_S:-470}  # seconds for all steps together
T0=$SECONDS

step() {  # NAME CAP_S COMMAND...: run for at most CAP_S (less when the budget is nearly spent)
  local name=$1 cap=$2 t rc s
  shift 2
  t=$((BUDGET - (SECONDS - T0)))
  ((t > cap)) && t=$cap
  if ((t < 20)); then echo "skip $name: out of time" | tee -a "$OUT/steps.log"; return; fi
  echo "== $name (at most ${t} s) $(date -u +%T)" | tee -a "$OUT/steps.log"
  s=$SECONDS
  timeout -k 5 "$t" "$@" >>"$OUT/steps.log" 2>&1  # one log: $OUT brings back at most 8 files
  rc=$?
  # a stack cut short leaves its processes behind: they hold ports and device memory
  pkill -9 -f "services\.(router|batcher|worker)" 2>/dev/null
  pkill -9 -x nats-server 2>/dev/null
  echo "   $name: exit $rc after $((SECONDS - s)) s" | tee -a "$OUT/steps.log"
}

PLAN=${1:-measure}
if [ "$PLAN" = stack ]; then  # the engine under the stack's pattern, the stack's settings, its profile, sampling
  step replay 40 python3 bench/engine_replay.py --provider cuda --configs graph+prefix-device --out "$OUT/replay.json"
  step stack 170 python3 bench/gpu_bench.py --provider cuda --variants int4 --only decode,cuda_graph,stack \
    --stack-configs 2/1/4/colocated/graph,2/1/4/colocated/graph,3/1/4/colocated/graph,2/2/4/colocated/graph,2/1/4/colocated/graph/w8,2/1/4/graph \
    --out "$OUT/stack.json"
  step stack-profile 50 python3 bench/stack_profile.py --provider cuda --placement colocated \
    --out /tmp/stack-profile
  cp /tmp/stack-profile/stack_profile.json "$OUT/" 2>/dev/null
  step sampled 60 python3 bench/gpu_bench.py --provider cuda --variants int4 --only sampled --out "$OUT/sampled.json"
  nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
  echo "done in $((SECONDS - T0)) s" | tee -a "$OUT/steps.log"
  exit 0
fi
if [ "$PLAN" = diagnose ]; then
  step stack-profile 65 python3 bench/stack_profile.py --provider cuda --placement colocated \
    --out /tmp/stack-profile
  cp /tmp/stack-profile/stack_profile.json "$OUT/" 2>/dev/null
  step replay 70 python3 bench/engine_replay.py --provider cuda \
    --configs plain,prefix-device,graph+prefix-device --out "$OUT/replay.json"
  step eager-stack 55 python3 bench/stack_profile.py --provider cuda --placement colocated \
    --worker-args="--cuda-graph off" --out /tmp/eager-stack
  cp /tmp/eager-stack/stack_profile.json "$OUT/eager_stack_profile.json" 2>/dev/null
  step noprefix-stack 50 python3 bench/stack_profile.py --provider cuda --placement colocated \
    --worker-args="--prefix-cache-mib 0" --out /tmp/noprefix-stack
  cp /tmp/noprefix-stack/stack_profile.json "$OUT/noprefix_stack_profile.json" 2>/dev/null
  echo "done in $((SECONDS - T0)) s" | tee -a "$OUT/steps.log"
  exit 0
fi
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
step int4 170 python3 bench/gpu_bench.py --provider cuda --variants int4 --skip-stack --out "$OUT/int4.json"
step stack 210 python3 bench/gpu_bench.py --provider cuda --variants int4 --only decode,stack \
  --stack-configs 2/1/4/colocated,2/1/4,2/4/4/colocated,2/1/1 --out "$OUT/stack.json"
step fp32 100 python3 bench/gpu_bench.py --provider cuda --variants fp32 --skip-stack \
  --only correctness,decode,cuda_graph,ttft --out "$OUT/fp32.json"
step anchor 90 env PYTHONPATH=/tmp/gpukit/gguf-only python3 /tmp/gpukit/kit/hf_anchor.py \
  /tmp/gpukit/kit/model.gguf models/smollm2-135m-instruct/tokenizer.json
step profile 60 bash -c "python3 bench/gpu_bench.py --provider cuda --variants int4 --only profile --profile \
  --out /tmp/gpuprof/profile.json; rc=\$?; cp /tmp/gpuprof/profile.json '$OUT/'; exit \$rc"
echo "done in $((SECONDS - T0)) s" | tee -a "$OUT/steps.log"
