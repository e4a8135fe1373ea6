#!/usr/bin/env bash
# Device calls for the GPU measurements: install the carried wheels, then run one or more phases.
#   (on this machine) mkdir -p .whl/lab && cp ../shared/wheels/device-cp312/*.whl .whl/ && cp ../shared/wheels/device-cp312/lab/*.whl .whl/lab/
#                     python experiments/roadmap/carry_data.py        # text data for the roadmap phases -> .data/
#   device run, carry [".whl", ".data"]:  bash experiments/performance/gpu_session.sh <phase> [phase...]
# Phases:
#   tests       GPU parity tests (kernels vs references, full model fast vs reference path, CUDA-graph decoding)
#   decode      Table 1 rows at 300M: decode at 8k context, batch 128 halved on OOM (+ HF generate for the Transformer)
#   ratio       Table 9 rows 1-4 at 300M: the parallel hybrid (B) with 0, 4, 8, 16 attention heads, same protocol
#   profile     kernels of decode steps (no CUDA graph), 300M, 8k context (PROFILE_ROWS, default "roadmap_e mamba")
#   train       training tokens/s and MFU at 300M, sequence 2048, bf16: E against the equal-size Llama, eager and compiled
#   train_profile  as train, then the kernels of 3 more training steps (rows: PROFILE_ROWS, default roadmap_e)
#   step        pieces of a decode step side by side (decode_step_bench.py): the Mamba-1 heads' step fused and
#               unfused (rows E and Mamba), the LM head in both layouts; STEP_VARIANTS: more launches of the
#               fused step (StepBlocks: conv rows x channels x warps x state rows x channels x warps)
#   scan        the Mamba-1 selective scan's kernels side by side at row E's training shape (scan_kernel_bench.py;
#               SCAN_CONFIGS: extra Triton launches BLOCK_DxCHUNKxWARPSxAHEADxUNROLLxSEGMENT)
#   scan_ncu    Nsight Compute's occupancy, scheduler, warp-stall and memory sections for the Triton scan's output
#               and backward kernels (one launch each, from scan_kernel_bench.py), and the warp stalls by source
#               line (ncu_source_lines.py, into scan_ncu_lines.txt)
#   step_ncu    the same sections for the fused Mamba-1 decode step's three kernels, one launch each, rows
#               PROFILE_ROWS (default "roadmap_e mamba"), from decode_step_bench.py
#   mqar        the roadmap study (experiments/roadmap/run_study.sh): every Table 1 row on MQAR, seeds $SEEDS
#   text        the same rows on text (perplexities, passkey), seeds $SEEDS
#   head_ratio  the Table 9 head-ratio sweep on MQAR, seeds $SEEDS
# TRAIN_COMPILE picks the train phases' modes (default "false true"; train_profile: "true"), TRAIN_SCAN_KERNELS the
# Mamba-1 scan kernels their SSM rows run with, one bench each (default "triton"), DECODE_COMPILE the
# decode phase's (compile_decode; default "false"; each row runs its modes back to back, HF generate with the first),
# DECODE_SCAN_KERNELS the scan kernels of the decode phase's SSM rows (default "triton": the fused decode step;
# "mamba_ssm": mamba_ssm's and causal_conv1d's step kernels), one bench each, DECODE_BRANCHES how the hybrid rows
# (B-E) run a layer's two branches in a decode step (default "concurrent": two CUDA streams; "sequential"), one each.
# Each bench stops after BENCH_TIMEOUT_S (default 150) or when BUDGET_S (default 540) seconds of the call are spent,
# whichever comes first.
# BENCH_OVERRIDES (space-separated Hydra overrides) go last on every bench's command line, e.g. "model.ssm=mamba2
# model.ssm_inner=1024 model.param_budget=null +tags.variant=mamba2" to measure the rows with Mamba-2 heads (value
# heads of 128, within FlexAttention's limit). On a fresh machine mamba-ssm's SSD kernels first compile every Triton
# autotune configuration (1-2 minutes): give such benches BENCH_TIMEOUT_S=450. TESTS_SELECT (a pytest -k
# expression) runs part of the parity tests (the whole suite ran past 500 s on an H200: split it over two calls,
# or over two GPUs with A as in RESULTS.md; the larger half, TESTS_SELECT="not ($A)", took 336-429 s); TESTS_TIMEOUT_S
# (default 540) stops them;
# DECODE_ROWS picks the decode phase's rows (keep transformer among them: ratios are taken within one call). SEEDS
# defaults to "0 1". The study phases (mqar, text, head_ratio) joined by "+" run side by side on the one GPU (e.g.
# text+head_ratio); all other phases run one after another. Each study run gets SIGTERM after RUN_TIMEOUT_S
# (default 500) and ends KILLED, so the stores come back whole even when MQAR_STEPS / TEXT_STEPS ask for more than a
# device call holds; MQAR_DATA picks the MQAR data config (run_study.sh).
# Results go to $OUT: bench_logs/ (one full log per bench, and the profile phases' step timelines beside it:
# <log>_decode_profile_timeline.txt, <log>_train_profile_timeline.txt), bench.db (MLflow bench runs), stores.tar.gz
# (the study's MLflow stores and artifacts).
# On two GPUs (kind nvidia-h200-x2) two sessions run side by side, one per GPU, each with its own $OUT and settings:
#   source experiments/device_env.sh      # installs once, for both
#   CUDA_VISIBLE_DEVICES=0 OUT=$OUT/gpu0 TESTS_SELECT=... bash experiments/performance/gpu_session.sh tests &
#   CUDA_VISIBLE_DEVICES=1 OUT=$OUT/gpu1 bash experiments/performance/gpu_session.sh step decode & wait
set -uo pipefail
source experiments/device_env.sh
export ARCH_LAB_DATA_ROOT=$PWD/.data
if [[ " ${*//+/ } " =~ " "(tests|text|mqar|head_ratio)" " && ! -d .data/gutenberg ]]; then  # before the GPU time
  echo "gpu_session: the tests and study phases read the shared data from .data/: run" \
       "'python experiments/roadmap/carry_data.py' here and carry [\".whl\", \".data\"]" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
start=$SECONDS repo=$PWD
bench() {  # one bench run, into $OUT/bench.db; stop before the device call's 10-minute limit
  local left=$(( ${BUDGET_S:-540} - (SECONDS - start) )) limit=${BENCH_TIMEOUT_S:-150}
  if (( left <= 0 )); then echo "skipped (time): $*"; return; fi
  (( limit > left )) && limit=$left  # the last bench gets what is left of BUDGET_S, not more
  # Output goes to a file, not a pipe: torch.compile's worker processes outlive a timed-out bench and would hold
  # a pipe open until the device call's own limit.
  mkdir -p "$OUT/bench_logs"
  local log=$OUT/bench_logs/$(date +%H%M%S)_$RANDOM.log started=$(mktemp)
  timeout -k 10 $limit python3 -m arch_lab.bench logger.tracking_uri="sqlite:///$OUT/bench.db" \
    hydra.run.dir="/tmp/bench_runs/$RANDOM" "$@" ${BENCH_OVERRIDES:-} >"$log" 2>&1 \
    || echo "bench exited with $? (timeout: 124): $*"
  grep -vi warning "$log" | tail -22
  # The profiled step's timelines are MLflow artifacts under ./mlruns, which does not come back from the device:
  # keep this bench's beside its log.
  find mlruns -name '*_timeline.txt' -newer "$started" 2>/dev/null | while read -r timeline; do
    cp "$timeline" "${log%.log}_$(basename "$timeline")"
  done
  rm -f "$started"
}
run_tests() {
  timeout -k 10 ${TESTS_TIMEOUT_S:-540} python3 -m pytest -m gpu tests/test_ops_ssm_gpu_parity.py \
    tests/test_model_gpu_parity.py -q -p no:cacheprovider -rA ${TESTS_SELECT:+-k "$TESTS_SELECT"} \
    >"$OUT/gpu_tests.txt" 2>&1
  tail -5 "$OUT/gpu_tests.txt"
}
ncu_kernels() {  # Nsight Compute's occupancy, scheduler, warp-stall and memory sections: <kernel regex> <launches>
  # <name> <command...>; the sections go to $OUT/<name>.txt, the warp stalls by source line to $OUT/<name>_lines.txt
  local ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu | tail -1) kernels=$1 count=$2 name=$3
  shift 3
  timeout -k 10 ${BENCH_TIMEOUT_S:-150} "$ncu" --clock-control none -k "$kernels" -c $count \
    --section LaunchStats --section Occupancy --section SchedulerStats --section WarpStateStats \
    --section MemoryWorkloadAnalysis --section SpeedOfLight --section SourceCounters --import-source yes \
    --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' -o "$OUT/$name" "$@" \
    >"$OUT/$name.log" 2>&1
  "$ncu" -i "$OUT/$name.ncu-rep" --page details >"$OUT/$name.txt" 2>&1
  "$ncu" -i "$OUT/$name.ncu-rep" --page source --csv --print-source cuda,sass \
    | python3 experiments/performance/ncu_source_lines.py >"$OUT/${name}_lines.txt"
  rm -f "$OUT/$name.ncu-rep"
  grep -v "^==PROF==\|[Ww]arning" "$OUT/$name.log" | tail -5
  grep -v "[Ww]arning" "$OUT/$name.txt" | tail -150
  cat "$OUT/${name}_lines.txt"
}
protocol=(context=8192 batch=128 new_tokens=32 prefill_chunk=1024 measure=[decode])

for phase in "$@"; do
  case $phase in
  tests)
    run_tests ;;
  decode)
    modes=(${DECODE_COMPILE:-false})
    for row in ${DECODE_ROWS:-transformer mamba roadmap_a roadmap_b roadmap_c roadmap_d roadmap_e}; do
      for compile in "${modes[@]}"; do
        for scan in $([[ $row == transformer ]] && echo triton || echo ${DECODE_SCAN_KERNELS:-triton}); do
          for branches in $([[ $row =~ ^roadmap_[b-e]$ ]] && echo ${DECODE_BRANCHES:-concurrent} || echo concurrent); do
            extra=(); [[ $row == transformer && $compile == "${modes[0]}" ]] && extra=(measure=[decode,hf])
            bench model=${row}_300m "${protocol[@]}" "${extra[@]}" compile_decode=$compile scan_kernel=$scan \
              decode_branches=$branches +tags.row=$row +tags.study=performance +tags.compiled_decode=$compile \
              +tags.scan_kernel=$scan +tags.decode_branches=$branches | tee -a "$OUT/bench_decode.txt"
          done
        done
      done
    done ;;
  ratio)
    for heads in 0 4 8 16; do
      bench model=roadmap_b_300m model.n_heads=$heads model.n_kv_heads=$heads "${protocol[@]}" \
        +tags.study=head_ratio +tags.n_heads=$heads | tee -a "$OUT/bench_ratio.txt"
    done ;;
  profile)  # what one decode step of the SSM-heavy rows spends its time on (kernels of eager steps), 300M, 8k context
    for row in ${PROFILE_ROWS:-roadmap_e mamba}; do
      bench model=${row}_300m "${protocol[@]/measure=\[decode\]/measure=[decode,profile]}" +tags.row=$row \
        +tags.study=profile | tee -a "$OUT/bench_profile.txt"
    done ;;
  train|train_profile)
    [[ $phase == train ]] && rows="transformer roadmap_e" || rows=${PROFILE_ROWS:-roadmap_e}
    for compile in ${TRAIN_COMPILE:-$([[ $phase == train ]] && echo false true || echo true)}; do
      for row in $rows; do
        for scan in $([[ $row == transformer ]] && echo mamba_ssm || echo ${TRAIN_SCAN_KERNELS:-triton}); do
          bench model=${row}_300m measure=[$phase] profile_steps=3 train_seq_len=2048 train_batch=8 train_steps=6 \
            compile=$compile scan_kernel=$scan +tags.row=$row +tags.study=performance +tags.compiled=$compile \
            +tags.scan_kernel=$scan | tee -a "$OUT/bench_$phase.txt"
        done
      done
    done ;;
  step)
    timeout -k 10 ${BENCH_TIMEOUT_S:-150} python3 experiments/performance/decode_step_bench.py \
      ${STEP_VARIANTS:+--variants $STEP_VARIANTS} --out "$OUT/decode_step_bench.json" 2>&1 | grep -vi warning | tee "$OUT/decode_step_bench.txt" ;;
  scan)
    timeout -k 10 ${BENCH_TIMEOUT_S:-150} python3 experiments/performance/scan_kernel_bench.py \
      ${SCAN_CONFIGS:+--configs $SCAN_CONFIGS} --out "$OUT/scan_kernel_bench.json" 2>&1 \
      | grep -vi warning | tee "$OUT/scan_kernel_bench.txt" ;;
  scan_ncu)  # hardware counters (occupancy, warp stalls, issue) of the Triton scan's output and backward kernels
    ncu_kernels 'regex:^_scan_(fwd|bwd)' 3 scan_ncu \
      python3 experiments/performance/scan_kernel_bench.py --warmup 0 --iters 1 ;;
  step_ncu)  # the same counters for the fused Mamba-1 decode step's three kernels, one launch each, per row
    for row in ${PROFILE_ROWS:-roadmap_e mamba}; do
      ncu_kernels 'regex:^_(conv_xproj|xproj_reduce|state_update)_kernel' 3 step_ncu_$row \
        python3 experiments/performance/decode_step_bench.py --rows $row --iters 1 --repeats 1
    done ;;
  *)  # study tasks, side by side when joined by "+"
    # A fresh directory per call: the machine can keep /tmp and the checkout's ignored files (./mlruns) from earlier
    # calls, and their runs must not come back mixed into this call's. The runs start there, so MLflow puts their
    # artifacts in its ./mlruns, beside the stores.
    study_dir=${study_dir:-$(mktemp -d /tmp/study.XXXXXX)}
    export STORES=$study_dir/stores RUNS=$study_dir/runs LOGS=$OUT/logs RUN_TIMEOUT_S=${RUN_TIMEOUT_S:-500}
    for task in ${phase//+/ }; do
      case $task in
      mqar|text|head_ratio)
        (cd "$study_dir" && bash "$repo/experiments/roadmap/run_study.sh" $task "${SEEDS:-0 1}") & ;;
      *) echo "unknown phase $task" \
           "(tests|decode|ratio|profile|train|train_profile|step|scan|scan_ncu|step_ncu|mqar|text|head_ratio)"
         wait  # the study tasks already started end as they would, and their stores still come back
         unknown_phase=2
         break 2 ;;
      esac
    done
    wait ;;
  esac
  echo "phase $phase done at ${SECONDS}s"
done
if [[ -n ${study_dir:-} ]]; then  # the stores and the runs' artifacts (plots, layer plans, configs)
  tar czf "$OUT/stores.tar.gz" --exclude='*.lock' -C "$study_dir" stores $( [[ -d $study_dir/mlruns ]] && echo mlruns )
  (cd "$OUT" && tar czf logs.tar.gz logs && rm -rf logs)
fi
ls -la "$OUT"
exit ${unknown_phase:-0}
