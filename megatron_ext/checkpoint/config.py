"""Checkpoint configuration (section ``checkpoint``).

The recipe saves every 1,000 steps::

    checkpoint:
      interval: 1000
      keep_last: 3
      allow_changes: []      # e.g. ["schedule.train_steps"] to extend a finished run

The defaults below run the tiny CPU job.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_ext.config.errors import ProblemCollector


@dataclass(kw_only=True)
class CheckpointConfig:
    """When and where checkpoints are written, and what a resume may change."""

    interval: int = 10
    """Save every this many optimizer steps (the recipe: 1,000; 0 disables periodic saves)."""

    save_dir: str | None = None
    """Directory holding ``iter_XXXXXXX/`` checkpoints and the ``latest`` pointer
    (None: ``<run_dir>/checkpoints``)."""

    load: str | None = None
    """What to resume from. None: the newest complete checkpoint of ``save_dir`` if there is one,
    else start fresh. A path: either a checkpoint directory (``.../iter_0001000``) or a save
    directory (its ``latest`` is used); it must exist. A path outside ``save_dir`` is where the
    run starts: once the run has its own ``latest``, it resumes from that (a restarted job keeps
    its progress). A path inside ``save_dir`` is always taken."""

    keep_last: int | None = None
    """Keep only this many newest complete checkpoints (None keeps all). The checkpoint that
    ``latest`` points to is never deleted."""

    save_on_exit: bool = True
    """Save at the end of training and when stopping early (``exit_after_steps``, a stability
    stop). A preemption signal (SIGTERM, SIGUSR1) always saves."""

    allow_changes: list[str] = field(default_factory=list)
    """Config fields or sections (``schedule.train_steps``, ``data``) that a resume may change
    relative to the checkpoint's config; every allowed change is logged. The parallel layout,
    ``checkpoint``, ``monitoring`` and ``run_dir`` may always change."""

    finetune: bool = False
    """Load only the model weights from ``load`` and start a new run at step 0 with a fresh
    optimizer, LR schedule and data position. Only the ``model`` section must match. Applies to
    the run's first start, like ``load``."""

    optimizer_gather_on_cpu: bool = False
    """Gather the distributed optimizer state for saving over gloo onto data-parallel rank 0
    only (less host memory on the other ranks, a slower save). By default every data-parallel
    rank receives the gathered state of its model shard in host memory (over the device's
    communicator, bucket by bucket) and the ranks write in parallel."""

    check_free_space: bool = True
    """Before each save, refuse it on every rank, with an error giving the sizes, when the save
    directory's filesystem has less free space than the newest checkpoint takes (a save that
    runs out of space part-way can leave some ranks waiting for the others). Set false where the
    filesystem's free-space report means nothing (some network or FUSE mounts report zero)."""

    async_save: bool = False
    """Write checkpoints in the background. Training waits while the optimizer state is gathered
    and the tensors are staged to host memory; forked writer processes then write the files
    while the next steps run, and the checkpoint is verified and published (``latest``) at the
    first step boundary after every rank's writer finished. One save is in flight at a time; the
    end of training and a preemption wait for it. The staged copy (each rank's share of the
    checkpoint, in host memory) is held until the writers finish."""

    def validate(self, problems: ProblemCollector) -> None:
        problems.check(
            self.interval >= 0,
            "checkpoint.interval",
            self.interval,
            "must be >= 0",
            "use 1000 as in the recipe, or 0 to save only at the end",
        )
        problems.check(
            self.keep_last is None or self.keep_last >= 1,
            "checkpoint.keep_last",
            self.keep_last,
            "must be >= 1 or null",
            "use null to keep every checkpoint, or a positive count",
        )
        problems.check(
            not self.finetune or self.load is not None,
            "checkpoint.finetune",
            self.finetune,
            "finetuning needs the checkpoint to start from",
            "set checkpoint.load=<checkpoint directory>",
        )
        for index, item in enumerate(self.allow_changes):
            problems.check(
                isinstance(item, str) and item != "" and not item.startswith("."),
                f"checkpoint.allow_changes[{index}]",
                item,
                "must be a dotted config path such as schedule.train_steps",
                "name a section (data) or a field (schedule.train_steps)",
            )

    def resolved_save_dir(self, run_dir: str | object) -> str:
        """``save_dir``, or ``<run_dir>/checkpoints`` when it is unset."""
        from pathlib import Path

        return str(
            Path(self.save_dir) if self.save_dir is not None else Path(run_dir) / "checkpoints"
        )
