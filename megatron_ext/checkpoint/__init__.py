"""Checkpoints: atomic dist_checkpointing saves, exact resume, resharding and preemption.

Entry points: ``save_checkpoint`` / ``load_checkpoint`` (``manager``), ``CheckpointConfig``
(``config``) and ``PreemptionHandler`` (``preemption``); see docs/checkpoints.md.
"""
