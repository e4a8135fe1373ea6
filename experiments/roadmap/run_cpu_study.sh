#!/usr/bin/env bash
# The Table 1 roadmap at the tiny size on a CPU (the lab's default MQAR task and training recipe), every row
# and seed as one `python -m arch_lab` run in one MLflow experiment, then the head-ratio sweep (Table 9 rows 1-4).
#   bash experiments/roadmap/run_cpu_study.sh <store dir> [seeds...]
# then:  python -m arch_lab.report --tracking-uri sqlite:///<store dir>/mlruns.db --experiment roadmap --out <dir>
set -uo pipefail
store=${1:-roadmap_store}; shift || true
seeds=("$@"); [[ ${#seeds[@]} -eq 0 ]] && seeds=(0 1)
mkdir -p "$store"
cd "$store"
for seed in "${seeds[@]}"; do
  for exp in roadmap_transformer roadmap_mamba roadmap_step1_sequential roadmap_step1 roadmap_step2_local_global \
             roadmap_step2 roadmap_step3; do
    python -m arch_lab experiment=$exp seed=$seed logger.experiment_name=roadmap +tags.seed=$seed +tags.task=mqar \
      trainer.enable_progress_bar=false hydra.run.dir="runs/${exp}_s${seed}" 2>&1 | grep -E "finished|Error|\[ERROR\]" | cut -c1-400
  done
done
python -m arch_lab -m hparams_search=head_ratio experiment=roadmap_step2 logger.experiment_name=roadmap \
  trainer.enable_progress_bar=false hydra.sweep.dir=runs/head_ratio 2>&1 | grep -E "finished|Error|\[ERROR\]|HYDRA\] study" | cut -c1-400
