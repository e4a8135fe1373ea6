#!/usr/bin/env bash
# One device call: install the carried wheels, run the GPU parity tests, then benchmark the Table 1 rows.
#   (on this machine) mkdir -p .whl/lab && cp ../shared/wheels/device-cp312/*.whl .whl/ && cp ../shared/wheels/device-cp312/lab/*.whl .whl/lab/
#   device run, carry [".whl"]:  bash experiments/performance/gpu_session.sh <phase>
# Phases: tests | decode | train | all. Results go to $OUT (logs, bench.db with the MLflow runs).
set -uo pipefail
phase=${1:-all}
OUT=${OUT:-/tmp/arch_lab_out}
mkdir -p "$OUT" /tmp/site
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl .whl/lab/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
bench() { timeout 150 python3 -m arch_lab.bench logger.tracking_uri="sqlite:///$OUT/bench.db" hydra.run.dir="/tmp/bench_runs/$RANDOM" "$@" 2>&1 | grep -v Warning | tail -25; }

if [[ $phase == tests || $phase == all ]]; then
  timeout 200 python3 -m pytest -m gpu tests/test_ops_ssm_gpu_parity.py tests/test_model_gpu_parity.py -q -p no:cacheprovider 2>&1 | tail -30 > "$OUT/gpu_tests.txt"
  tail -5 "$OUT/gpu_tests.txt"
fi
if [[ $phase == decode || $phase == all ]]; then
  # The paper's protocol: 8k context, batch 128 halved on OOM; decode throughput, bandwidth bound, cache.
  for row in transformer mamba roadmap_a roadmap_b roadmap_c roadmap_d roadmap_e; do
    extra=(); [[ $row == transformer ]] && extra=(measure=[decode,hf])
    bench model=${row}_300m context=8192 batch=128 new_tokens=32 prefill_chunk=1024 measure=[decode] "${extra[@]}" \
      +tags.row=$row +tags.study=performance | tee -a "$OUT/bench_decode.txt"
  done
fi
if [[ $phase == train || $phase == all ]]; then
  # Training throughput and MFU at ~300M, sequence 2048, bf16: the hybrid (E) against the equal-size Llama.
  for row in roadmap_e transformer; do
    bench model=${row}_300m measure=[train] train_seq_len=2048 train_batch=8 train_steps=6 +tags.row=$row \
      +tags.study=performance | tee -a "$OUT/bench_train.txt"
  done
fi
ls -la "$OUT"
