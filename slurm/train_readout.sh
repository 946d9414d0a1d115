#!/bin/bash
# Train a Readout Bottleneck on a SLURM cluster: `sbatch slurm/train_readout.sh [readout.fit arguments]`.
#
#   CONFIG=configs/resnet50.yaml RUN_DIR=runs/r50-a sbatch slurm/train_readout.sh --trainer.max_epochs 12
#   sbatch --nodes=4 --time=48:00:00 slurm/train_readout.sh      # sbatch options beat the headers below
#   CONFIG=configs/custom.yaml PYTHONPATH=$PWD sbatch slurm/train_readout.sh \
#       --model.classifier my_package.models:build --model.weights_path my-weights.safetensors
#                                                                 # your own classifier (README)
#
# Environment (all optional):
#   CONFIG         the readout.fit config (default configs/resnet50.yaml)
#   RUN_DIR        one directory for the run's logs, checkpoints and bundle (<RUN_DIR>/export, whatever the
#                  config's export_dir says) (default runs/<config>-<job id>);
#                  it stays the same across requeues, so a requeued job resumes from it
#   GPUS_PER_NODE  processes (GPUs) per node (default SLURM_NTASKS_PER_NODE, set by --ntasks-per-node)
#   PYTHON         the interpreter (default .venv/bin/python if there is one, else python)
#
# Checked before anything starts: GPUs per node (--gres) against processes per node (--ntasks-per-node);
# readout.fit checks data.num_workers against --cpus-per-task (`auto` takes cpus-per-task - 1).
# Memory: 4 GB per core (32 GB per process with 8 cores) is an estimate for ImageNet loaders (8 workers,
# shuffle buffers of JPEG bytes) plus a CUDA process, not a measurement; raise it where a job is killed
# for memory. CPU nodes: sbatch --gres=none slurm/train_readout.sh --trainer.accelerator cpu ...
#
# One process per GPU, started by srun, so Lightning uses its SLURMEnvironment: ranks from SLURM_PROCID
# and the address of the first node. 90 s before the time limit SLURM sends SIGUSR1; readout.fit (not
# Lightning's own handler) finishes the running step, all ranks agree, rank 0 saves
# <RUN_DIR>/hpc_ckpt_<n>.ckpt and calls `scontrol requeue $SLURM_JOB_ID`, and every rank exits 0. The job
# comes back with the same id, so the same RUN_DIR, and `--ckpt_path last` resumes from the newest of
# hpc_ckpt_*.ckpt and last*.ckpt there (step, optimiser, μ/σ statistics, position in the data).
#
#SBATCH --job-name=readout
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=8
#SBATCH --mem-per-cpu=4G
#SBATCH --time=24:00:00
#SBATCH --signal=SIGUSR1@90
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-.}"
CONFIG=${CONFIG:-configs/resnet50.yaml}
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-1}}
# One process per GPU: SLURM_GPUS_ON_NODE is what --gres=gpu:N (or --gpus-per-node) gave this node.
if [[ -n "${SLURM_GPUS_ON_NODE:-}" && "${SLURM_GPUS_ON_NODE}" != "0" \
      && "${SLURM_GPUS_ON_NODE}" != "$GPUS_PER_NODE" ]]; then
    echo "error: this node has ${SLURM_GPUS_ON_NODE} GPU(s) (--gres=gpu:${SLURM_GPUS_ON_NODE}) but starts" \
        "${GPUS_PER_NODE} process(es) (--ntasks-per-node=${GPUS_PER_NODE}): ask for as many of each," \
        "e.g. sbatch --ntasks-per-node=${SLURM_GPUS_ON_NODE} --gres=gpu:${SLURM_GPUS_ON_NODE}" >&2
    exit 2
fi
if [[ -n "${SLURM_JOB_ID:-}" && -z "${SLURM_GPUS_ON_NODE:-}${CUDA_VISIBLE_DEVICES:-}" ]]; then
    echo "note: no GPU was given to this job (--gres=none?): pass --trainer.accelerator cpu" \
        "--trainer.precision 32-true unless the config says so" >&2
fi
NUM_NODES=${SLURM_NNODES:-1}
RUN_DIR=${RUN_DIR:-runs/$(basename "$CONFIG" .yaml)-${SLURM_JOB_ID:-local}}
# srun does not inherit --cpus-per-task from sbatch since SLURM 22.05; the data loaders want them.
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi

echo "$(date -Is) job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}): ${NUM_NODES} node(s) x" \
    "${GPUS_PER_NODE} process(es), ${CONFIG}, run directory ${RUN_DIR}"

# --kill-on-bad-exit: a rank that dies takes the others with it instead of leaving them waiting in NCCL.
# srun runs in the background so that this shell can pass on what only it receives (`scancel -b -s USR1`
# signals the batch shell alone; by default bash would die of it, and the job with it): srun forwards
# the signal to every task, where readout.fit saves, requeues and exits 0.
srun --kill-on-bad-exit=1 "$PYTHON" -m readout.fit \
    --config "$CONFIG" \
    --trainer.num_nodes "$NUM_NODES" \
    --trainer.devices "$GPUS_PER_NODE" \
    --run_dir "$RUN_DIR" \
    --export_dir "$RUN_DIR/export" \
    --ckpt_path last \
    "$@" &
SRUN_PID=$!
# shellcheck disable=SC2329  # invoked by the traps below
forward() { kill -s "$1" "$SRUN_PID" 2>/dev/null || true; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM
# `wait` returns early (code > 128) each time a trapped signal arrives; wait again until srun is gone.
while true; do
    status=0
    wait "$SRUN_PID" || status=$?
    kill -0 "$SRUN_PID" 2>/dev/null || break
done
exit "$status"
