#!/usr/bin/env bash
# One 2-GPU device call (about 3-5 minutes): (1) DDP on 2 GPUs against 1 GPU at the same global batch — both loss
# curves side by side, their largest difference, tokens/s of each; (2) FSDP training the hymba_1_5b preset on 2 GPUs —
# the loss over 20 steps and the peak memory of each GPU; with FSDP_SINGLE=1 also one GPU at the same global batch,
# compared curve against curve.
#   (on this machine) mkdir -p .whl/lab && cp ../shared/wheels/device-cp312/*.whl .whl/ && cp ../shared/wheels/device-cp312/lab/*.whl .whl/lab/
#   device run, kind nvidia-h200-x2, carry [".whl"]:  bash experiments/performance/ddp_check.sh [ddp|fsdp|all]
# Results go to $OUT: ddp.db (MLflow runs tagged study=ddp_check and case=single|ddp|fsdp), one log per run,
# summary.txt (exit status and wall time of each run), ddp_compare.txt, fsdp.txt.
set -uo pipefail
phase=${1:-all}
source experiments/device_env.sh
# NVLink multicast stays off (the machine sets these; Lightning's launcher passes the environment on to every rank).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__,
'gpus', torch.cuda.device_count())" | tee -a "$OUT/gpu.txt"
DB="sqlite:///$OUT/ddp.db"

# lab CASE TIMEOUT_S OVERRIDES...: one `python -m arch_lab` run into $DB, tagged case=CASE.
lab() {
  local case=$1 limit=$2 start=$SECONDS
  shift 2
  # On timeout SIGABRT makes Python's faulthandler print every thread's stack into the log: where it hung.
  PYTHONFAULTHANDLER=1 timeout -s ABRT -k 15 "$limit" python3 -m arch_lab logger.tracking_uri="$DB" \
    hydra.run.dir="/tmp/ddp_check/$case" trainer.enable_progress_bar=false +tags.study=ddp_check +tags.case="$case" \
    "$@" > "$OUT/$case.log" 2>&1
  echo "$case: exit $? after $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
  grep -E "run [0-9a-f]+ finished|peak GPU memory|Error|error:" "$OUT/$case.log" | tail -6
}

if [[ $phase == ddp || $phase == all ]]; then
  # Same data order, same global batch of 64: one GPU at 64 against two GPUs at 32 each. 200 steps, bf16-mixed.
  SMALL=(model=roadmap_e_small data=mqar_zoology data.train_examples=20000 data.test_examples=512
         trainer.max_steps=${DDP_STEPS:-200} trainer.log_every_n_steps=1 trainer.val_check_interval=100 trainer.limit_val_batches=4
         eval.decode.enabled=false eval.analysis.enabled=false)
  lab single ${RUN_TIMEOUT_S:-180} "${SMALL[@]}" trainer=gpu data.batch_size=64
  lab ddp ${RUN_TIMEOUT_S:-180} "${SMALL[@]}" trainer=ddp trainer.devices=2 data.batch_size=32
  python3 -m arch_lab.compare_runs --tracking-uri "$DB" case=single case=ddp --every 10 --tolerance 0.05 2>&1 \
    | tee "$OUT/ddp_compare.txt"
fi
if [[ $phase == fsdp || $phase == all ]]; then
  # Hymba-1.5B at a global batch of 8: FSDP over both GPUs (one unit per decoder block, activation checkpointing,
  # 4 sequences per GPU) against one GPU at 8 (plain, no checkpointing: it fits), same data order. Sequence 512
  # (+128 meta tokens), FSDP_STEPS steps; no checkpoint (val_check_interval > max_steps).
  BIG=(model=hymba_1_5b data=mqar_zoology data.seq_len=512 data.train_examples=1000 data.test_examples=64
       trainer.max_steps=${FSDP_STEPS:-20} trainer.log_every_n_steps=1 trainer.val_check_interval=100
       trainer.limit_val_batches=2 optim.lr=3e-4 optim.warmup_steps=5 optim.schedule=constant
       eval.decode.enabled=false eval.analysis.enabled=false)
  lab fsdp ${FSDP_TIMEOUT_S:-220} "${BIG[@]}" trainer=fsdp trainer.devices=2 data.batch_size=4
  refs=(case=fsdp)
  if [[ -n ${FSDP_SINGLE:-} ]]; then
    lab single_1p5b ${FSDP_TIMEOUT_S:-220} "${BIG[@]}" trainer=gpu data.batch_size=8
    refs=(case=single_1p5b case=fsdp --tolerance 0.05)
  fi
  python3 -m arch_lab.compare_runs --tracking-uri "$DB" "${refs[@]}" --every 1 2>&1 | tee "$OUT/fsdp.txt"
fi
ls -la "$OUT"
