#!/usr/bin/env bash
# The Table 1 roadmap at the `small` size (~17M parameters, all rows within 1% of each other) and the Table 9
# head-ratio sweep, trained with the lab's own commands on one GPU. Runs go in parallel (a 17M model leaves an H100
# mostly idle), each into its own SQLite store under $STORES (SQLite takes one writer at a time), tagged row/seed/task.
#   bash experiments/roadmap/run_study.sh mqar "0 1" [rows...]     # Table 1 rows, MQAR recall by slice
#   bash experiments/roadmap/run_study.sh text "0 1" [rows...]     # perplexity (valid, gutenberg test, wikitext2),
#                                                                    passkey
#   bash experiments/roadmap/run_study.sh head_ratio "0 1"         # Table 9 rows 1-4: B with 0, 2, 3, 6 heads on MQAR
# then:  python -m arch_lab.report --tracking-uri $STORES/*.db but optuna_*.db (as sqlite:/// URIs) --experiment roadmap \
#          --bench-uri ... --out <dir>
#        python -m arch_lab.merge_stores --from <the same URIs> --to sqlite:///study.db --experiment roadmap
# Decode speed measured here is not reported (parallel runs share the GPU; the sweep keeps it only as an objective):
# Table 1 and Table 9 take it from the 300M bench (experiments/performance/gpu_session.sh decode ratio).
set -uo pipefail
task=${1:-mqar}; seeds=(${2:-0}); shift $(( $# < 2 ? $# : 2 ))
OUT=${OUT:-/tmp/arch_lab_out}
STORES=${STORES:-$OUT/stores}
LOGS=${LOGS:-$OUT/logs}
RUNS=${RUNS:-/tmp/roadmap_runs}  # each run's Hydra directory (checkpoints, .hydra/)
mkdir -p "$STORES" "$LOGS"
rows=("$@"); [[ ${#rows[@]} -eq 0 ]] && rows=(transformer mamba roadmap_a roadmap_b roadmap_c roadmap_d roadmap_e)
declare -A experiment=([transformer]=roadmap_transformer [mamba]=roadmap_mamba [roadmap_a]=roadmap_step1_sequential \
  [roadmap_b]=roadmap_step1 [roadmap_c]=roadmap_step2_local_global [roadmap_d]=roadmap_step2 [roadmap_e]=roadmap_step3)
# Same recipe and token budget for every row. MQAR (conf/data/mqar_roadmap_v128.yaml): 1200 steps of 64 x 256 tokens
# (19.7M tokens) at lr 5e-4; text: 800 steps of 16 x 512 (6.6M tokens). MQAR_STEPS / MQAR_LR / TEXT_STEPS change
# them and MQAR_DATA the MQAR data config (mqar_roadmap: the first study's vocabulary-256 task). MAX_TIME=DD:HH:MM:SS
# (unset by default) stops training at a wall-clock limit, e.g. to fit a device call; runs it stops early train fewer
# steps than the others (the report's steps column shows it).
mqar=(data=${MQAR_DATA:-mqar_roadmap_v128} trainer.max_steps=${MQAR_STEPS:-1200} trainer.val_check_interval=200
      optim.lr=${MQAR_LR:-5e-4})
text=(data=text_gutenberg data.seq_len=512 data.batch_size=16 data.max_train_tokens=7000000
      data.max_eval_tokens=262144 trainer.max_steps=${TEXT_STEPS:-800} trainer.val_check_interval=400 optim.lr=2e-3
      eval.passkey.seq_len=512 eval.passkey.num_per_depth=20)
common=(trainer=${TRAINER:-gpu} trainer.enable_progress_bar=false logger.experiment_name=roadmap)
[[ -n ${MAX_TIME:-} ]] && common+=(trainer.max_time=$MAX_TIME)
# OVERRIDES (space-separated Hydra overrides) go last on every run's command line, so they win; SUFFIX is added to
# the run names (stores, logs) so variants of one row can run side by side, e.g. an lr probe:
#   OVERRIDES="optim.lr=2e-3" SUFFIX=_lr2e-3 bash experiments/roadmap/run_study.sh mqar 0 transformer roadmap_b
extra=(${OVERRIDES:-}); suffix=${SUFFIX:-}
# RUN_TIMEOUT_S (unset by default) sends each run SIGTERM after that many seconds: the lab stops it after the current
# step and marks it KILLED, so its store is complete when a device call's hard limit would otherwise cut it mid-write.
launch=(); [[ -n ${RUN_TIMEOUT_S:-} ]] && launch=(timeout -k 30 "$RUN_TIMEOUT_S")
export OMP_NUM_THREADS=1

if [[ $task == head_ratio ]]; then
  # The head_ratio sweep's grid (0, 2, 3, 6 heads: the paper's 0, 4, 8, 16 of 16 at 300M, scaled to d_model 384),
  # one grid point per process so the points train side by side (each its own study storage and store).
  for seed in "${seeds[@]}"; do
    for heads in 0 2 3 6; do
      name=head_ratio_h${heads}_$seed$suffix
      "${launch[@]}" python3 -m arch_lab -m hparams_search=head_ratio experiment=roadmap_step1 model=roadmap_b_small \
        "model.n_heads=choice($heads)" "${mqar[@]}" "${common[@]}" seed=$seed +tags.seed=$seed +tags.task=mqar \
        hydra.sweeper.storage="sqlite:///$STORES/optuna_$name.db" logger.tracking_uri="sqlite:///$STORES/$name.db" \
        hydra.sweep.dir="$RUNS/$name" "${extra[@]}" >"$LOGS/$name.log" 2>&1 &
    done
  done
else
  [[ $task == mqar ]] && data=("${mqar[@]}") || data=("${text[@]}")
  data+=(eval.decode.enabled=false)
  for seed in "${seeds[@]}"; do
    for row in "${rows[@]}"; do
      name=${row}_${task}_${seed}$suffix
      "${launch[@]}" python3 -m arch_lab experiment=${experiment[$row]} model=${row}_small "${data[@]}" \
        "${common[@]}" seed=$seed logger.tracking_uri="sqlite:///$STORES/$name.db" +tags.seed=$seed +tags.task=$task \
        hydra.run.dir="$RUNS/$name" "${extra[@]}" >"$LOGS/$name.log" 2>&1 &
    done
  done
fi
wait
# each run's outcome: finished, or its one-line error or interrupt (a run past RUN_TIMEOUT_S ends KILLED)
grep -hE "finished|Error|\[ERROR\]" "$LOGS"/*.log | cut -c1-300
