#!/usr/bin/env bash
# One-GPU check of the scale-out configs, a few minutes in all: bf16 on one GPU, FSDP, DeepSpeed ZeRO-2 and
# ZeRO-3 (all with devices=1, so a single card suffices), each for a few steps on the embedded SmolLM2-135M
# teacher and its 6-layer copy, printing the loss and the peak GPU memory of each run.
#   bash bench/gpu_check.sh [STEPS]        (needs a CUDA build of torch; DeepSpeed: pip install -e ".[deepspeed]")
# Compare each "peak" line with the memory formula in docs/scale_out.md (N=1), then record the output with
# the date and the GPU model in bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${1:-20}"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

python - <<'PY'
import torch
assert torch.cuda.is_available(), "bench/gpu_check.sh needs a CUDA GPU"
print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| bf16:", torch.cuda.is_bf16_supported())
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
date -u

# A callback that prints the peak memory; written here so this script is self-contained.
cat > "$OUT/gpu_peak.py" <<'PY'
import lightning.pytorch as pl
import torch


class Peak(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        torch.cuda.reset_peak_memory_stats()

    def on_train_end(self, trainer, pl_module):
        gib = torch.cuda.max_memory_allocated() / 2**30
        n_t = sum(p.numel() for p in pl_module.teacher.parameters())
        n_s = sum(p.numel() for p in pl_module.student.parameters())
        loss = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items() if k.endswith("loss")}
        print(f"step {trainer.global_step} {loss}", flush=True)
        print(f"peak {gib:.2f} GiB allocated (local teacher params {n_t}, local student params {n_s})", flush=True)
PY

run() {
  local name="$1"; shift
  echo "=== $name: $*"
  local start=$SECONDS
  PYTHONPATH="$OUT:${PYTHONPATH:-}" python train.py "$@" \
    trainer.max_steps="$STEPS" trainer.val_check_interval="$STEPS" trainer.limit_val_batches=2 \
    callbacks.model_checkpoint.every_n_train_steps="$STEPS" eval.enabled=false \
    callbacks.progress_bar=null "+callbacks.peak._target_=gpu_peak.Peak" \
    "run_name=gpu_check_${name}_$(date +%H%M%S)" 2>&1 | grep -E "^step |^peak |Error|error|exported" || true
  echo "--- $name: $((SECONDS - start)) s"
}

run bf16_single trainer=gpu
run fsdp trainer=fsdp trainer.devices=1
if python -c "import deepspeed" 2>/dev/null; then
  run zero2 trainer=deepspeed_stage_2 trainer.devices=1
  # ZeRO-3 leaves the student partitioned and nothing gathers it yet, so its runs export nothing (a
  # ConfigError says so otherwise); FSDP's student is gathered and its export verified above.
  run zero3 trainer=deepspeed_stage_3 trainer.devices=1 export.enabled=false
  run zero3_offload trainer=deepspeed_stage_3 trainer.devices=1 trainer.strategy.offload_optimizer=true export.enabled=false
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
