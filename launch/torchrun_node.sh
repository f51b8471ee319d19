#!/usr/bin/env bash
# Start training with torchrun on this node: a single-node run by default, or one node of a
# multi-node job started by hand on every node (node 0's address as the rendezvous endpoint).
#
#   launch/torchrun_node.sh -- --config examples/configs/tiny_cpu.yaml
#   launch/torchrun_node.sh --nnodes 2 --node-rank 1 --rdzv-endpoint node0:29500 \
#       --rdzv-id exp1 -- --config recipe.yaml
#   DRY_RUN=1 launch/torchrun_node.sh -- --config recipe.yaml      # print, start nothing
#
# Options before `--` are those of `python -m megatron_ext.launch.plan --help` (--dry-run,
# --nproc-per-node, --entry, --shutdown-timeout, recorded-topology inputs...); everything after
# `--` goes to `python -m megatron_ext.train`. The environment (NCCL, OMP, ...) is derived from
# this node's topology and printed with its reasons; variables you export yourself win.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
exec "$PYTHON" -m megatron_ext.launch.plan "$@"
