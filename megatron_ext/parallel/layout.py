"""The parallel layout: one object owns all degrees and the sizes derived from them."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_ext.parallel.config import ParallelConfig


@dataclass(frozen=True)
class ParallelLayout:
    """Degrees of a run on ``world_size`` processes; ``dp`` is derived."""

    world_size: int
    tp: int
    pp: int
    cp: int = 1
    vpp: int | None = None

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int) -> ParallelLayout:
        return cls(
            world_size=world_size,
            tp=cfg.tensor_model_parallel_size,
            pp=cfg.pipeline_model_parallel_size,
            cp=cfg.context_parallel_size,
            vpp=cfg.virtual_pipeline_model_parallel_size,
        )

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.cp

    @property
    def dp(self) -> int:
        return self.world_size // self.model_parallel_size

    @property
    def num_model_chunks(self) -> int:
        return self.vpp or 1

    def describe(self) -> str:
        vpp = f" x VPP{self.vpp}" if self.vpp else ""
        cp = f" x CP{self.cp}" if self.cp > 1 else ""
        return f"TP{self.tp} x PP{self.pp}{vpp}{cp} x DP{self.dp} on {self.world_size} processes"
