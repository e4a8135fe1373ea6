# Sourced by the device-call scripts: install the carried wheels into /tmp/site (the device image has torch,
# lightning and triton; .whl/ holds mamba-ssm, causal-conv1d and the lab's other needs) and make this checkout
# importable without installing it, including the Hydra sweeper plugin that pyproject.toml maps into the
# `hydra_plugins` namespace (python -m arch_lab imports it at start-up).
# Sourced once before scripts that run side by side (one per GPU), it installs once: they would race on /tmp/site.
OUT=${OUT:-/tmp/arch_lab_out}
mkdir -p "$OUT"
if [[ -z ${ARCH_LAB_DEVICE_ENV:-} ]]; then
  # A device call's $OUT should start empty, but a machine has handed back an earlier lease's gpu0/ and gpu1/ (seen
  # 2026-11-28: files from hours before, appended to by this call's benches). What is older than a device call can
  # last is moved aside (not deleted), so only this call's results come back, those of an earlier script in it too.
  leftovers=$(find "$OUT" -mindepth 1 -maxdepth 1 -mmin +30)
  if [[ -n $leftovers ]]; then
    aside=$(mktemp -d /tmp/arch_lab_stale_out.XXXXXX)
    echo "device_env: moving what an earlier lease left in $OUT to $aside:" $leftovers >&2
    mv $leftovers "$aside"/
  fi
  unset leftovers aside
  mkdir -p /tmp/site/hydra_plugins
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl .whl/lab/*.whl 2>&1 | grep -v "already exists" | tail -2
  ln -sfn "$PWD/arch_lab/sweep/hydra_plugin" /tmp/site/hydra_plugins/arch_lab_optuna_sweeper
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  if python3 -c "import hydra_plugins.arch_lab_optuna_sweeper, mamba_ssm, causal_conv1d"; then
    export ARCH_LAB_DEVICE_ENV=1  # only once it works: a later `source` installs again
  else
    echo "device_env: imports failed" >&2
  fi
fi
