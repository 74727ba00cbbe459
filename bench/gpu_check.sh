#!/usr/bin/env bash
# One-GPU check of the scale-out configs, a few minutes in all. Each run trains a few steps on one card
# (devices=1) and prints its loss, peak GPU memory, training tokens/s and the export's reload check:
#   bf16_single   trainer=gpu with the default recipe (qad_q4_mix: torchao fake-quant under bf16 autocast)
#   fsdp, zero2, zero3   the bare distillation (~experiment) under FSDP, ZeRO-2 and ZeRO-3; FSDP and ZeRO-3
#                 gather the student before its export, which is verified (export.verify=true throughout)
#   fsdp_prune_qat, zero3_prune_qat   callbacks=[prune,qat]: refused at start-up, naming the strategy
#   zero3_offload ZeRO-3 with the optimizer in host memory (DeepSpeed compiles its CPU Adam on first use)
#
#   bash bench/gpu_check.sh [STEPS] [OVERRIDE ...]     (a CUDA build of torch; DeepSpeed: pip install -e ".[deepspeed]")
# OVERRIDEs go to every run, e.g. another teacher: teacher=llama teacher.path=/models/SmolLM2-135M-Instruct.
# GPU_CHECK_RUNS="fsdp zero3" runs a subset; GPU_CHECK_LOGS=DIR keeps each run's whole log there;
# GPU_CHECK_TIMEOUT=SECONDS stops a run that takes longer (default 900); GPU_CHECK_DEADLINE=SECONDS (since the
# script started) skips the runs that would start after it and shortens the one that would run past it. Compare each "peak" line with the memory formula in
# docs/scale_out.md (N=1), then record the output with the date and the GPU model in bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${1:-20}"
shift || true
EXTRA=("$@")
STAMP="$(date +%Y%m%d_%H%M%S)"
RUNS="${GPU_CHECK_RUNS:-bf16_single fsdp fsdp_prune_qat zero2 zero3 zero3_prune_qat zero3_offload}"
OUT="$(mktemp -d)"
[ -n "${GPU_CHECK_LOGS:-}" ] && mkdir -p "$GPU_CHECK_LOGS"
trap 'rm -rf "$OUT"' EXIT

python - <<'PY'
import torch
assert torch.cuda.is_available(), "bench/gpu_check.sh needs a CUDA GPU"
print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| bf16:", torch.cuda.is_bf16_supported())
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
date -u

# A callback that prints what each run measured; written here so this script is self-contained.
cat > "$OUT/gpu_peak.py" <<'PY'
import time

import lightning.pytorch as pl
import torch

WARM = 3  # steps left out of the throughput: CUDA context, allocator growth, first kernels


class Peak(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        torch.cuda.reset_peak_memory_stats()
        self.tokens, self.started = 0, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.started is None and trainer.global_step >= WARM:
            torch.cuda.synchronize()
            self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.started is not None:
            self.tokens += int(batch["input_ids"].numel()) * trainer.world_size

    def on_train_end(self, trainer, pl_module):
        torch.cuda.synchronize()
        gib = torch.cuda.max_memory_allocated() / 2**30
        local = lambda m: sum(getattr(p, "ds_tensor", p).numel() for p in m.parameters())
        loss = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items() if k.endswith("loss")}
        print(f"step {trainer.global_step} {loss}", flush=True)
        print(f"peak {gib:.2f} GiB allocated (local teacher params {local(pl_module.teacher)}, "
              f"local student params {local(pl_module.student)})", flush=True)
        if self.started is not None and self.tokens:
            rate = self.tokens / (time.perf_counter() - self.started)
            print(f"throughput {rate:,.0f} training tokens/s over the steps after the first {WARM}", flush=True)
PY

run() {
  local name="$1"; shift
  case " $RUNS " in *" $name "*) ;; *) return 0 ;; esac
  local limit="${GPU_CHECK_TIMEOUT:-900}" left=$((${GPU_CHECK_DEADLINE:-1000000} - SECONDS))
  if [ "$left" -lt 30 ]; then echo "=== $name: skipped, ${left} s left before GPU_CHECK_DEADLINE"; return 0; fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "=== $name: $* (timeout ${limit} s)"
  local start=$SECONDS
  PYTHONPATH="$OUT:${PYTHONPATH:-}" timeout "$limit" python train.py "$@" \
    trainer.max_steps="$STEPS" trainer.val_check_interval="$STEPS" trainer.limit_val_batches=2 \
    callbacks.model_checkpoint.every_n_train_steps="$STEPS" eval.enabled=false export.verify=true \
    callbacks.progress_bar=null "+callbacks.peak._target_=gpu_peak.Peak" \
    "run_name=gpu_check_${name}_${STAMP}" ${EXTRA[@]+"${EXTRA[@]}"} 2>&1 \
    | tee "${GPU_CHECK_LOGS:-$OUT}/$name.log" | grep -E "^step |^peak |^throughput |ConfigError|Error|error|exported|verified|gathered" || true
  echo "--- $name: $((SECONDS - start)) s"
}

run bf16_single trainer=gpu
run fsdp trainer=fsdp trainer.devices=1 "~experiment"
run fsdp_prune_qat trainer=fsdp trainer.devices=1 "~experiment" "callbacks=[prune,qat]"
if python -c "import deepspeed" 2>/dev/null; then
  run zero2 trainer=deepspeed_stage_2 trainer.devices=1 "~experiment"
  run zero3 trainer=deepspeed_stage_3 trainer.devices=1 "~experiment"
  run zero3_prune_qat trainer=deepspeed_stage_3 trainer.devices=1 "~experiment" "callbacks=[prune,qat]"
  run zero3_offload trainer=deepspeed_stage_3 trainer.devices=1 "~experiment" trainer.strategy.offload_optimizer=true
  # ZeRO-2 keeps the student whole and ZeRO-3 gathers it after training, from the same start, data and
  # optimizer: the two exports should differ by bf16 rounding only, far less than what training moved.
  python - "logs/train/runs/gpu_check_zero2_${STAMP}/student" "logs/train/runs/gpu_check_zero3_${STAMP}/student" \
    <<'PY' || true
import sys
from pathlib import Path

from safetensors.torch import load_file

a, b = (Path(d) / "model.safetensors" for d in sys.argv[1:3])
if a.exists() and b.exists():
    wa, wb = load_file(a), load_file(b)
    rel = {k: float((wa[k].float() - wb[k].float()).norm() / wa[k].float().norm()) for k in wa}
    worst = max(rel, key=rel.get)
    print(f"zero3 export vs zero2 export: {len(rel)} tensors, same names: {set(wa) == set(wb)}, "
          f"largest relative difference {rel[worst]:.2e} ({worst})")
PY
else
  echo "=== DeepSpeed not installed: pip install -e '.[deepspeed]' to run the ZeRO-2/3 checks"
fi

# 2:4 weight sparsity: a student linear's shape at batch x 128 tokens, dense fp16 against torchao's
# semi-structured kernel on the same 2:4-pruned weight (callbacks=sparsity pattern=2:4, docs/sparsity.md).
python - <<'PY'
import torch
from torchao.sparsity import SemiSparseWeightConfig, sparsify_
from torchao.sparsity.utils import mask_creator

def timed(fn, reps=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps

for out_f, in_f in ((1536, 576), (576, 1536), (14336, 4096), (4096, 14336)):
    dense = torch.nn.Linear(in_f, out_f, bias=False).half().cuda()
    with torch.no_grad():
        dense.weight.mul_(mask_creator(dense.weight, 2, 4).to(dense.weight.dtype))
    sparse = torch.nn.Sequential(torch.nn.Linear(in_f, out_f, bias=False)).half().cuda()
    sparse[0].weight.data.copy_(dense.weight)
    sparsify_(sparse, SemiSparseWeightConfig())
    x = torch.randn(16 * 128, in_f, device="cuda", dtype=torch.half)
    with torch.no_grad():
        diff = (sparse(x) - dense(x)).abs().max().item()
        d, sp = timed(lambda: dense(x)), timed(lambda: sparse(x))
    print(f"2:4 linear {out_f}x{in_f}: dense {d:.3f} ms, semi-structured {sp:.3f} ms, speed-up {d / sp:.2f}x, max|diff| {diff:.2e}")
PY
