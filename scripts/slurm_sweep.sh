#!/usr/bin/env bash
# A Hydra multirun of lnull on Slurm through hydra-submitit-launcher (`pip install -e '.[slurm]'`):
#   PARTITION=gpu GPUS=1 scripts/slurm_sweep.sh +experiment=sweep_rank
# One Slurm job per run; shared stages are computed once in the store (run.root on a shared filesystem).
set -euo pipefail
exec lnull run -m hydra/launcher=submitit_slurm \
    hydra.launcher.partition="${PARTITION:-gpu}" \
    hydra.launcher.gpus_per_node="${GPUS:-1}" \
    hydra.launcher.tasks_per_node=1 \
    hydra.launcher.cpus_per_task="${CPUS:-16}" \
    hydra.launcher.timeout_min="${TIME_MIN:-1440}" \
    "$@"
