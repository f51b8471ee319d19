"""The experiment config: every section of a training run, and the checks across sections.

An experiment is a YAML file whose top-level keys are the sections below; the command line
overrides any field with ``--section.field=value``. ``validate_experiment`` collects every problem
(within and across sections) into one ``ConfigError`` that names the field, the value, the rule and
the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_ext.checkpoint.config import CheckpointConfig
from megatron_ext.config.errors import ConfigError, ProblemCollector
from megatron_ext.data.config import DataConfig
from megatron_ext.models.config import ModelConfig, PrecisionConfig
from megatron_ext.monitoring.config import MonitoringConfig
from megatron_ext.parallel.config import ParallelConfig
from megatron_ext.training.optimizer import OptimizerConfig
from megatron_ext.training.schedule_config import ScheduleConfig


@dataclass(kw_only=True)
class TokenizerConfig:
    """The tokenizer the datasets were written with (checked against the model's vocabulary)."""

    tokenizer_type: Literal["none", "SentencePieceTokenizer", "HuggingFaceTokenizer"] = "none"
    """`none` trains on the ids as they are; otherwise the tokenizer is loaded and checked."""
    tokenizer_model: str | None = None
    """Path of the SentencePiece .model or Hugging Face tokenizer directory."""


@dataclass(kw_only=True)
class TrainingConfig:
    """Evaluation and run-length controls of the loop."""

    eval_interval: int = 50
    """Compute the validation loss every this many steps (0: never; always at the end)."""
    eval_iters: int = 2
    """Validation batches per evaluation (fixed batches: every evaluation sees the same tokens)."""
    exit_after_steps: int | None = None
    """Stop (with a checkpoint) after this many steps in this invocation; for time-limited jobs."""

    def validate(self, problems: ProblemCollector) -> None:
        for name in ("eval_interval", "eval_iters"):
            value = getattr(self, name)
            problems.check(
                value >= 0, f"training.{name}", value, "must be >= 0", "use 0 to turn it off"
            )
        problems.check(
            self.exit_after_steps is None or self.exit_after_steps >= 1,
            "training.exit_after_steps",
            self.exit_after_steps,
            "must be at least 1 (the run stops after that many steps)",
            "use null to run to the end",
        )


@dataclass(kw_only=True)
class ExperimentConfig:
    """A whole training run."""

    run_dir: str = "runs/tiny"
    """Where metrics, checkpoints, logs and the resolved config go."""
    seed: int = 1234
    """Seed of model initialisation and dropout."""
    model: ModelConfig = field(default_factory=ModelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)


def validate_experiment(
    cfg: ExperimentConfig, world_size: int, *, check_files: bool = True
) -> None:
    """Raise one ConfigError listing every problem of ``cfg`` on ``world_size`` processes."""
    from megatron_ext.training.schedules import check_schedule

    problems = ProblemCollector()
    par = cfg.parallel
    par.validate(problems, world_size)
    cfg.model.validate(
        problems,
        par.tensor_model_parallel_size,
        par.pipeline_model_parallel_size,
        par.virtual_pipeline_model_parallel_size,
    )
    cfg.optimizer.validate(problems)
    cfg.data.validate(problems, check_files=check_files)
    if check_files:
        from megatron_ext.data.provenance import dataset_problems

        problems.problems.extend(dataset_problems(cfg.data, cfg.model.vocab_size))
    cfg.checkpoint.validate(problems)
    cfg.monitoring.validate(problems)
    cfg.training.validate(problems)
    model_parallel = (
        par.tensor_model_parallel_size
        * par.pipeline_model_parallel_size
        * par.context_parallel_size
    )
    if model_parallel > 0 and world_size % model_parallel == 0:
        try:
            check_schedule(
                cfg.schedule,
                world_size // model_parallel,
                interleaved_stages=par.pipeline_model_parallel_size
                if par.virtual_pipeline_model_parallel_size
                else None,
                sequence_shards=par.tensor_model_parallel_size if par.sequence_parallel else 1,
            )
        except ConfigError as exc:
            problems.problems.extend(exc.problems)
    else:
        cfg.schedule.validate(problems)
    problems.check(
        cfg.schedule.seq_length <= cfg.model.seq_length,
        "schedule.seq_length",
        cfg.schedule.seq_length,
        f"exceeds the model's context model.seq_length={cfg.model.seq_length}",
        "raise model.seq_length (RoPE has no learned positions) or lower schedule.seq_length",
    )
    problems.check(
        cfg.precision.fp8 == "none" or cfg.model.transformer_impl != "local",
        "precision.fp8",
        cfg.precision.fp8,
        "FP8 GEMMs are Transformer Engine's; model.transformer_impl=local has none",
        "set model.transformer_impl=auto (or transformer_engine), or precision.fp8=none",
    )
    problems.check(
        cfg.precision.fp8 == "none" or cfg.precision.dtype == "bf16",
        "precision.fp8",
        cfg.precision.fp8,
        "FP8 GEMMs run inside a bf16 model",
        "set precision.dtype=bf16 or precision.fp8=none",
    )
    problems.check(
        cfg.data.eod_token_id is None or cfg.data.eod_token_id < cfg.model.vocab_size,
        "data.eod_token_id",
        cfg.data.eod_token_id,
        f"must be a token id below model.vocab_size={cfg.model.vocab_size}",
        "use the tokenizer's end-of-document id",
    )
    problems.check(
        not cfg.data.reset_position_ids,
        "data.reset_position_ids",
        cfg.data.reset_position_ids,
        "the model's rotary embeddings take each token's position from its place in the "
        "sequence (megatron-core reads position ids only for learned absolute embeddings), so "
        "reset positions would change nothing that is trained",
        "set data.reset_position_ids=false (data.eod_mask_loss still keeps a document's first "
        "token from being predicted from the previous document)",
    )
    problems.check(
        cfg.tokenizer.tokenizer_type == "none" or cfg.tokenizer.tokenizer_model is not None,
        "tokenizer.tokenizer_model",
        cfg.tokenizer.tokenizer_model,
        f"tokenizer_type={cfg.tokenizer.tokenizer_type} needs the tokenizer's path",
        "set tokenizer.tokenizer_model or tokenizer.tokenizer_type=none",
    )
    problems.raise_if_any()
