"""A real monitored training run (TP1xDP2, distributed optimizer, gloo) with planted faults.

Eight steps through ``train_step`` with the monitor's update gate, TensorBoard and wandb (offline)
on, and per-layer statistics every 2 steps:

- steps 1-4, 7: normal updates;
- step 5: a forward hook on DP rank 0 writes NaN into the first layer's MLP output (NaN loss);
- step 6: a gradient hook on DP rank 1 writes NaN into one weight gradient (finite loss, NaN norm);
- step 8: a forward hook multiplies the logits by 40 (a loss spike; on_spike=stop).

Checked: the NaN steps are skipped with every parameter bit-identical; step 7 trains again; the
spike stops the run without an update; metrics.jsonl, the TensorBoard event file and the wandb
offline run file (read back with their own readers) hold the logged scalars.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from megatron_ext.data.batches import split_micro_batches

GLOBAL_BATCH, MICRO_BATCH, SEQ, VOCAB = 4, 1, 32, 4000
STEPS = 8


def _micro_batches(step: int, dp_rank: int, dp: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(500 + step)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=gen)
    per_rank = GLOBAL_BATCH // dp
    mine = tokens[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    return split_micro_batches(mine, MICRO_BATCH)


def _plant(step: int, model: torch.nn.Module, dp_rank: int) -> list:
    """Hooks that corrupt this step (see the module docstring); returns their handles."""
    if step == 5 and dp_rank == 0:
        mlp = model.decoder.layers[0].mlp
        return [mlp.register_forward_hook(lambda m, i, out: (out[0] * math.nan, out[1]))]
    if step == 6 and dp_rank == 1:
        weight = model.decoder.layers[1].mlp.linear_fc1.weight

        def poison(grad: torch.Tensor) -> torch.Tensor:
            grad = grad.clone()
            grad.view(-1)[3] = math.nan
            return grad

        return [weight.register_hook(poison)]
    if step == 8:
        out_layer = model.output_layer
        return [out_layer.register_forward_hook(lambda m, i, out: (out[0] * 40.0, out[1]))]
    return []


def worker(rank: int, port: int, root: str) -> None:
    import logging
    import time

    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    from megatron.core import parallel_state

    from megatron_ext.models.builder import build_model
    from megatron_ext.models.config import ModelConfig, PrecisionConfig
    from megatron_ext.monitoring import MonitoringConfig, TrainingMonitor
    from megatron_ext.parallel.config import ParallelConfig
    from megatron_ext.parallel.init import destroy_parallel, initialize_parallel
    from megatron_ext.training.optimizer import OptimizerConfig, prepare_for_training
    from megatron_ext.training.step import train_step

    parallel = ParallelConfig(device="cpu", use_distributed_optimizer=True)
    ctx = initialize_parallel(parallel, seed=7)
    try:
        model_cfg, precision = ModelConfig(), PrecisionConfig()
        chunks = build_model(model_cfg, parallel, precision, ctx.device)
        ddp, optimizer = prepare_for_training(
            chunks, parallel, precision, OptimizerConfig(), 1e-3, 1e-4
        )
        cfg = MonitoringConfig(
            activation_stats_interval=2,
            tensorboard=True,
            wandb=True,
            spike_min_steps=3,
            spike_window=10,
            spike_method="ratio",
            loss_spike_threshold=1.5,
            grad_norm_spike_threshold=100.0,
            on_spike="stop",
            on_nonfinite="skip",
        )
        monitor = TrainingMonitor(cfg, root, ctx, ddp, model_cfg, run_config={"test": True})
        outcomes = {}
        for step in range(1, STEPS + 1):
            before = [p.detach().clone() for p in chunks[0].parameters()]
            handles = _plant(step, chunks[0], ctx.dp_rank)
            monitor.start_step(step)
            start = time.perf_counter()
            result = train_step(
                ddp,
                optimizer,
                _micro_batches(step, ctx.dp_rank, ctx.layout.dp),
                SEQ,
                ctx.torch_device,
                ctx.pp_group(),
                parallel_state.is_pipeline_last_stage(),
                allow_update=monitor.update_gate(step),
            )
            elapsed = time.perf_counter() - start
            for handle in handles:
                handle.remove()
            scalars = {
                "loss": result.loss,
                "grad_norm": result.grad_norm,
                "seq_length": SEQ,
                "global_batch_size": GLOBAL_BATCH,
                "skipped": result.skipped,
            }
            record = monitor.end_step(step, scalars, {"step_time": elapsed})
            after = list(chunks[0].parameters())
            outcomes[step] = {
                "unchanged": all(torch.equal(a, b) for a, b in zip(before, after)),
                "finite": all(bool(torch.isfinite(p).all()) for p in after),
                "skipped": result.skipped,
                "stop": monitor.stop_requested,
                "tokens_per_s": record.get("tokens_per_s"),
                "step_time": elapsed,
            }
            if monitor.stop_requested:
                break
        monitor.close()
        (Path(root) / f"outcomes{rank}.json").write_text(json.dumps(outcomes))
    finally:
        destroy_parallel()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    import torch.multiprocessing as mp

    from megatron_ext.parallel.ports import find_free_port

    root = tmp_path_factory.mktemp("monitoring_demo")
    mp.spawn(worker, args=(find_free_port(), str(root)), nprocs=2, join=True)
    outcomes = [json.loads((root / f"outcomes{r}.json").read_text()) for r in range(2)]
    return root, outcomes


@pytest.mark.timeout(600)
def test_nonfinite_steps_are_skipped_and_spike_stops(demo_run):
    root, outcomes = demo_run
    for rank_outcomes in outcomes:
        steps = {int(k): v for k, v in rank_outcomes.items()}
        assert sorted(steps) == list(range(1, 9))
        for step in (1, 2, 3, 4, 7):
            assert not steps[step]["skipped"] and not steps[step]["unchanged"], step
        for step in (5, 6):
            assert steps[step]["skipped"] and steps[step]["unchanged"], step
        assert steps[8]["stop"] and steps[8]["skipped"] and steps[8]["unchanged"]
        assert all(s["finite"] for s in steps.values())
    from megatron_ext.monitoring.sinks import read_jsonl

    records, bad = read_jsonl(root / "metrics.jsonl")
    assert bad == [] and [r["step"] for r in records] == list(range(1, 9))
    assert math.isnan(records[4]["loss"]) and "non-finite loss" in records[4]["stability"]
    assert math.isfinite(records[5]["loss"]) and "non-finite grad_norm" in records[5]["stability"]
    assert records[7]["stability"].startswith("stop: loss spike")
    # tokens/s is the step's tokens over the measured step time.
    step1 = {int(k): v for k, v in outcomes[0].items()}[1]
    assert records[0]["tokens_per_s"] == pytest.approx(GLOBAL_BATCH * SEQ / step1["step_time"])
    assert records[0]["step_time_ms"] == pytest.approx(1000 * step1["step_time"])
    layer_records, bad = read_jsonl(root / "activation_stats.jsonl")
    assert [r["step"] for r in layer_records] == [2, 4, 6, 8] and bad == []
    assert len(layer_records[0]["layers"]) == 4


def test_tensorboard_and_wandb_hold_the_scalars(demo_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_ext.monitoring.sinks import read_jsonl
    from megatron_ext.monitoring.wandb_offline import find_run_file, read_history

    root, _ = demo_run
    records, _ = read_jsonl(root / "metrics.jsonl")
    finite_loss = {r["step"]: r["loss"] for r in records if math.isfinite(r["loss"])}

    events = EventAccumulator(str(root / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    tb_loss = {e.step: e.value for e in events.Scalars("train/loss")}
    assert {s: v for s, v in tb_loss.items() if math.isfinite(v)} == pytest.approx(finite_loss)
    assert "layers/residual_rms/003" in tags and "train/param_norm" in tags
    assert [e.step for e in events.Scalars("layers/grad_norm/000")] == [2, 4, 6, 8]

    rows = read_history(find_run_file(root))
    wandb_loss = {r["_step"]: r["train/loss"] for r in rows if "train/loss" in r}
    assert {s: v for s, v in wandb_loss.items() if s in finite_loss} == pytest.approx(finite_loss)
    assert sorted(wandb_loss) == list(range(1, 9))
    layer_rows = [r for r in rows if "layers/attention_rms/000" in r]
    assert [r["_step"] for r in layer_rows] == [2, 4, 6, 8]


def test_plot_run_on_the_demo(demo_run, tmp_path):
    import importlib.util

    tool = Path(__file__).resolve().parents[2] / "tools" / "plot_run.py"
    spec = importlib.util.spec_from_file_location("plot_run", tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    root, _ = demo_run
    assert module.main([str(root), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
    assert (tmp_path / "layers.png").stat().st_size > 10_000
