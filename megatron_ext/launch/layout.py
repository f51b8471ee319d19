"""Advice on the parallel layout against the hardware: TP inside NVLink, world size divisible.

Reads only the two layout fields from the experiment YAML (and their command-line overrides), so
the launcher never imports the training code:

    parallel:
      tensor_model_parallel_size: 8
      pipeline_model_parallel_size: 4
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import yaml

_FIELDS = ("tensor_model_parallel_size", "pipeline_model_parallel_size")


@dataclasses.dataclass
class ParallelLayout:
    """Tensor and pipeline degrees as the training run will see them."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    source: str = "defaults (TP=1, PP=1)"


def read_parallel_layout(config_path: str | None, train_args: Sequence[str] = ()) -> ParallelLayout:
    """TP / PP from ``parallel:`` in the YAML, then ``--parallel.<field>=N`` in ``train_args``."""
    values = {name: 1 for name in _FIELDS}
    sources = []
    if config_path:
        try:
            data = yaml.safe_load(Path(config_path).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{config_path} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{config_path}: top level must be a mapping")
        section = data.get("parallel") or {}
        if not isinstance(section, dict):
            raise ValueError(f"{config_path}: `parallel` must be a mapping")
        for name in _FIELDS:
            if name in section:
                values[name] = _positive_int(section[name], f"{config_path}: parallel.{name}")
        sources.append(config_path)
    for arg in train_args:
        for name in _FIELDS:
            prefix = f"--parallel.{name}="
            if arg.startswith(prefix):
                try:
                    value = yaml.safe_load(arg[len(prefix) :])
                except yaml.YAMLError as exc:
                    raise ValueError(f"{arg}: not valid YAML ({exc})") from exc
                values[name] = _positive_int(value, arg)
                sources.append(arg)
    return ParallelLayout(
        values[_FIELDS[0]],
        values[_FIELDS[1]],
        " + ".join(sources) if sources else ParallelLayout.source,
    )


def config_path_from_args(train_args: Sequence[str]) -> str | None:
    """The value of ``--config FILE`` / ``--config=FILE`` in the training arguments."""
    for i, arg in enumerate(train_args):
        if arg == "--config" and i + 1 < len(train_args):
            return train_args[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def advise_layout(
    layout: ParallelLayout,
    *,
    nnodes: int,
    gpus_per_node: int,
    nvlink_domain_size: int | None,
) -> tuple[list[str], list[str]]:
    """Notes and warnings for ``layout`` on ``nnodes`` x ``gpus_per_node`` ranks.

    ``nvlink_domain_size``: GPUs that all share direct NVLinks (None when unknown, e.g. on CPU;
    1 on a PCIe-only node).
    """
    tp, pp = layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size
    world = nnodes * gpus_per_node
    notes, warnings = [], []
    model_parallel = tp * pp
    if world % model_parallel:
        warnings.append(
            f"world size {world} ({nnodes} nodes x {gpus_per_node}) is not divisible by "
            f"TP x PP = {tp} x {pp} = {model_parallel}: the parallel groups cannot be formed; "
            "change the node count or parallel.tensor/pipeline_model_parallel_size"
        )
    else:
        notes.append(f"world size {world} = TP {tp} x PP {pp} x DP {world // model_parallel}")
    if tp > gpus_per_node:
        warnings.append(
            f"TP={tp} is larger than the {gpus_per_node} ranks per node: every tensor-parallel "
            "all-reduce crosses the inter-node network (several times per layer); keep "
            f"TP <= {gpus_per_node} and use PP / DP across nodes"
        )
    elif gpus_per_node % tp:
        warnings.append(
            f"TP={tp} does not divide the {gpus_per_node} ranks per node: some tensor-parallel "
            f"groups straddle two nodes; use a TP that divides {gpus_per_node}"
        )
    if nvlink_domain_size is not None and tp > 1 and tp <= gpus_per_node:
        if nvlink_domain_size <= 1:
            warnings.append(
                f"TP={tp} on GPUs without NVLink between them: tensor-parallel all-reduces run "
                "over PCIe; prefer TP=1 with more PP / DP on this hardware"
            )
        elif tp > nvlink_domain_size or nvlink_domain_size % tp:
            warnings.append(
                f"TP={tp} does not fit the NVLink domains of {nvlink_domain_size} GPUs: some "
                "tensor-parallel traffic goes over PCIe"
            )
        else:
            notes.append(f"TP={tp} stays inside one NVLink domain of {nvlink_domain_size} GPUs")
    return notes, warnings


def _positive_int(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: expected a positive integer, got {value!r}")
    return value
