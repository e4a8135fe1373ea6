#!/usr/bin/env bash
# The Table 1 roadmap at the `small` size (~17M parameters, all rows within 1% of each other), trained with the
# lab's own command on one GPU; every run lands in one MLflow experiment ("roadmap"), tagged row/seed.
#   bash experiments/roadmap/run_study.sh <task: mqar|text> <seed> [rows...]
# then:  python -m arch_lab.report --tracking-uri sqlite:///$OUT/roadmap.db --out experiments/roadmap
set -uo pipefail
task=${1:-mqar}; seed=${2:-0}; shift 2 || true
OUT=${OUT:-/tmp/arch_lab_out}
rows=("$@"); [[ ${#rows[@]} -eq 0 ]] && rows=(transformer mamba roadmap_a roadmap_b roadmap_c roadmap_d roadmap_e)
declare -A experiment=([transformer]=roadmap_transformer [mamba]=roadmap_mamba [roadmap_a]=roadmap_step1_sequential \
  [roadmap_b]=roadmap_step1 [roadmap_c]=roadmap_step2_local_global [roadmap_d]=roadmap_step2 [roadmap_e]=roadmap_step3)
if [[ $task == mqar ]]; then
  data=(data=mqar_zoology trainer.max_steps=600 trainer.val_check_interval=200 optim.lr=1e-3)
else
  data=(data=text_gutenberg data.seq_len=512 data.batch_size=32 data.max_train_tokens=8000000 data.max_eval_tokens=262144
        trainer.max_steps=800 trainer.val_check_interval=400 optim.lr=2e-3 eval.passkey.seq_len=512)
fi
for row in "${rows[@]}"; do
  python3 -m arch_lab experiment=${experiment[$row]} model=${row}_small "${data[@]}" trainer=gpu seed=$seed \
    logger.tracking_uri="sqlite:///$OUT/roadmap.db" logger.experiment_name=roadmap +tags.seed=$seed +tags.task=$task \
    eval.decode.batch=64 eval.decode.context=1024 eval.decode.new_tokens=32 trainer.enable_progress_bar=false \
    hydra.run.dir="/tmp/roadmap_runs/${row}_${task}_${seed}" 2>&1 | grep -E "finished|Error|error" | tail -3
done
