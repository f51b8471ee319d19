"""Configuration of the training data: which indexed datasets, how they are blended and split.

The section is ``data`` in an experiment YAML, e.g.::

    data:
      data_path: [runs/demo/tokens/web_text_document, runs/demo/tokens/code_text_document]
      blend_weights: [0.7, 0.3]
      split: "98,2"
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from megatron_ext.config.errors import ProblemCollector


@dataclass(kw_only=True)
class DataConfig:
    """Where the tokens come from and how they are ordered; see docs/data_and_schedules.md."""

    data_path: list[str] = field(default_factory=list)
    """Prefixes of Megatron indexed datasets (``PREFIX.bin`` + ``PREFIX.idx``), one per dataset."""

    blend_weights: list[float] | None = None
    """Share of training tokens per dataset (same order as ``data_path``, normalised to sum 1).
    None blends by size: every token of every dataset once per epoch."""

    split: str = "98,2"
    """Document split per dataset as ``train,valid`` or ``train,valid,test`` proportions.
    Test documents are held out: neither trained on nor evaluated."""

    split_seed: int = 1234
    """Seed of the document split. Kept apart from ``seed`` so that changing the training
    seed never moves documents between train and validation."""

    seed: int = 1234
    """Seed of the per-epoch document shuffle."""

    shuffle: bool = True
    """Shuffle documents within each dataset every epoch. False keeps the corpus order."""

    eod_token_id: int | None = None
    """Id of the end-of-document token; needed by ``append_eod``, ``eod_mask_loss`` and
    ``reset_position_ids``."""

    append_eod: bool = False
    """Insert ``eod_token_id`` after every document while reading. Use it for datasets written
    without an end-of-document token, so that documents stay separated in the stream."""

    eod_mask_loss: bool = False
    """Give zero loss weight to positions whose input token is ``eod_token_id``, i.e. to the
    prediction of a document's first token from the end of the previous document (Megatron's
    ``--eod-mask-loss``). Predicting the end-of-document token itself is always trained."""

    reset_position_ids: bool = False
    """Restart position ids after every end-of-document token (Megatron's
    ``--reset-position-ids``). The batches carry them; a training run refuses the setting, since
    the model's rotary embeddings do not read position ids (``validate_experiment``)."""

    index_cache_dir: str | None = None
    """Directory where the data index (split, per-epoch orders, blended epochs) is written once
    and memory-mapped by every process, instead of being built in each process's memory
    (about 90 bytes per training document). Set it for corpora of many millions of documents;
    on a shared filesystem the whole job builds each part once, on a node-local disk each node
    does. See docs/data_and_schedules.md."""

    num_workers: int = 1
    """Background threads that read batches ahead of the step; 0 reads in the training loop."""

    prefetch_batches: int = 2
    """How many steps' batches may be prepared ahead (bound of the prefetch queue)."""

    pin_memory: bool | None = None
    """Pin prefetched batches in host memory for non-blocking copies; None pins when CUDA is
    available."""

    def validate(self, problems: ProblemCollector, *, check_files: bool = True) -> None:
        """Add every problem of this section to ``problems`` (field names prefixed ``data.``)."""
        problems.check(
            len(self.data_path) > 0,
            "data.data_path",
            self.data_path,
            "at least one dataset prefix is needed",
            "set data.data_path to the prefixes written by tools/preprocess_data.py",
        )
        if check_files:
            for i, prefix in enumerate(self.data_path):
                missing = [p for p in (prefix + ".bin", prefix + ".idx") if not os.path.isfile(p)]
                problems.check(
                    not missing,
                    f"data.data_path[{i}]",
                    prefix,
                    f"missing file(s) {', '.join(missing)}",
                    "give the prefix without .bin/.idx, as written by tools/preprocess_data.py",
                )
        if self.blend_weights is not None:
            if len(self.blend_weights) != len(self.data_path):
                problems.add(
                    "data.blend_weights",
                    self.blend_weights,
                    f"needs one weight per data_path entry ({len(self.data_path)})",
                    "give as many weights as prefixes, or null to blend by size",
                )
            bad = [w for w in self.blend_weights if not w > 0]
            problems.check(
                not bad,
                "data.blend_weights",
                self.blend_weights,
                "weights must be positive",
                "remove datasets you do not want instead of giving them weight 0",
            )
        try:
            parse_split(self.split)
        except ValueError as exc:
            problems.add("data.split", self.split, str(exc), 'write it like "98,2" or "969,30,1"')
        needs_eod = [
            name
            for name in ("append_eod", "eod_mask_loss", "reset_position_ids")
            if getattr(self, name)
        ]
        if needs_eod:
            problems.check(
                self.eod_token_id is not None and self.eod_token_id >= 0,
                "data.eod_token_id",
                self.eod_token_id,
                f"{', '.join('data.' + n for n in needs_eod)} need(s) the end-of-document id",
                "set data.eod_token_id to the tokenizer's eod id",
            )
        if self.index_cache_dir is not None:
            problems.check(
                bool(self.index_cache_dir) and not os.path.isfile(self.index_cache_dir),
                "data.index_cache_dir",
                self.index_cache_dir,
                "must name a directory (it is created when missing)",
                "give a directory path, or null to keep the index in memory",
            )
        problems.check(
            self.num_workers >= 0,
            "data.num_workers",
            self.num_workers,
            "must be >= 0",
            "use 0 for synchronous loading or a small positive number of threads",
        )
        problems.check(
            self.prefetch_batches >= 1,
            "data.prefetch_batches",
            self.prefetch_batches,
            "must be >= 1",
            "use 2 (one step being consumed, one being prepared)",
        )


def parse_split(split: str) -> tuple[float, float, float]:
    """``"98,2"`` -> (0.98, 0.02, 0.0); ``"969,30,1"`` -> normalised three parts."""
    parts = [p.strip() for p in str(split).split(",")]
    if len(parts) not in (2, 3):
        raise ValueError("split needs 2 or 3 comma-separated proportions (train,valid[,test])")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError("split proportions must be numbers") from None
    if any(v < 0 for v in values) or values[0] <= 0:
        raise ValueError("split proportions must be >= 0 with a positive train part")
    if len(values) == 2:
        values.append(0.0)
    total = sum(values)
    return values[0] / total, values[1] / total, values[2] / total
