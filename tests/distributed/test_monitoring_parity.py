"""Per-layer statistics under TP2xPP2xDP2 equal those of a direct single-process computation.

One spawn of 8 processes over gloo runs two phases:

0. rank 0 alone (TP1, world size 1): build the tiny model, save it with dist_checkpointing, and
   compute the reference directly: full activation tensors captured from a plain forward over the
   whole global batch, statistics with torch on the concatenated float64 values, per-layer
   gradient norms from ``param.grad`` of a plain backward, and the parameter norm.
1. all 8 ranks (TP2xPP2xDP2): load those weights, then for two set-ups -- no sequence parallelism
   with the plain DDP optimizer, and sequence parallelism with the distributed optimizer -- run one
   monitored statistics step through megatron-core's schedules and report what the monitor found.

The test compares every layer's mean, std, RMS, abs max and gradient norm, the parameter norm, and
checks that the per-layer gradient norms add up to the optimizer's global gradient norm.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from megatron_ext.data.batches import split_micro_batches

GLOBAL_BATCH, MICRO_BATCH, SEQ, VOCAB = 8, 2, 32, 4000
SITES = ("attention", "mlp", "residual")


def _global_batch() -> torch.Tensor:
    gen = torch.Generator().manual_seed(2024)
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=gen)


def _micro_batches(tokens: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    return split_micro_batches(tokens, MICRO_BATCH)


def _env(rank: int, world: int, port: int) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )


def _reference(root: Path, port: int) -> None:
    from megatron.core import dist_checkpointing

    from megatron_ext.models.builder import build_model
    from megatron_ext.models.config import ModelConfig, PrecisionConfig
    from megatron_ext.parallel.config import ParallelConfig
    from megatron_ext.parallel.init import destroy_parallel, initialize_parallel

    _env(0, 1, port)
    parallel = ParallelConfig(device="cpu")
    ctx = initialize_parallel(parallel, seed=1234)
    try:
        model = build_model(ModelConfig(), parallel, PrecisionConfig(), ctx.device)[0]
        (root / "ckpt").mkdir()
        dist_checkpointing.save(model.sharded_state_dict(), str(root / "ckpt"))
        captured: dict[tuple[int, str], list[torch.Tensor]] = {}
        handles = []
        for layer in model.decoder.layers:
            index = layer.layer_number - 1
            for site, module in zip(SITES, (layer.self_attention, layer.mlp, layer)):
                store = captured.setdefault((index, site), [])
                handles.append(
                    module.register_forward_hook(
                        lambda m, i, out, store=store: store.append(out[0].detach().clone())
                    )
                )
        batches = _micro_batches(_global_batch())
        for mb in batches:
            per_token = model(
                input_ids=mb["tokens"],
                position_ids=mb["position_ids"],
                attention_mask=None,
                labels=mb["labels"],
            )
            (per_token.float().mean() / len(batches)).backward()
        for handle in handles:
            handle.remove()
        reference: dict = {"layers": {}, "grad_norm": {}}
        for (index, site), tensors in captured.items():
            x = torch.cat([t.reshape(-1) for t in tensors]).double()
            reference["layers"][f"{index}/{site}"] = {
                "mean": x.mean().item(),
                "std": x.std(unbiased=False).item(),
                "rms": x.square().mean().sqrt().item(),
                "abs_max": x.abs().max().item(),
                "count": x.numel(),
            }
        layer_sq = [0.0] * len(model.decoder.layers)
        total_sq = 0.0
        param_sq = 0.0
        for name, param in model.named_parameters():
            grad_sq = param.grad.double().square().sum().item()
            total_sq += grad_sq
            param_sq += param.detach().double().square().sum().item()
            if name.startswith("decoder.layers."):
                layer_sq[int(name.split(".")[2])] += grad_sq
        reference["grad_norm"] = {str(i): math.sqrt(v) for i, v in enumerate(layer_sq)}
        reference["total_grad_norm"] = math.sqrt(total_sq)
        reference["param_norm"] = math.sqrt(param_sq)
        (root / "reference.json").write_text(json.dumps(reference))
    finally:
        destroy_parallel()


def _monitored_step(ctx, root: Path, sequence_parallel: bool, distributed_optimizer: bool) -> dict:
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_ext.models.builder import build_model
    from megatron_ext.models.config import ModelConfig, PrecisionConfig
    from megatron_ext.monitoring import MonitoringConfig, TrainingMonitor
    from megatron_ext.monitoring.norms import param_norm
    from megatron_ext.parallel.config import ParallelConfig
    from megatron_ext.training.optimizer import OptimizerConfig, prepare_for_training
    from megatron_ext.training.step import train_step

    parallel = ParallelConfig(
        device="cpu",
        tensor_model_parallel_size=2,
        pipeline_model_parallel_size=2,
        sequence_parallel=sequence_parallel,
        use_distributed_optimizer=distributed_optimizer,
    )
    model_cfg, precision = ModelConfig(), PrecisionConfig()
    chunks = build_model(model_cfg, parallel, precision, ctx.device)
    state = dist_checkpointing.load(chunks[0].sharded_state_dict(), str(root / "ckpt"))
    chunks[0].load_state_dict(state)
    # The schedule hooks do the DP/TP gradient reduction.
    ddp, optimizer = prepare_for_training(
        chunks, parallel, precision, OptimizerConfig(), 1e-3, 1e-4
    )
    run_dir = root / f"run_sp{int(sequence_parallel)}"
    cfg = MonitoringConfig(activation_stats_interval=1, tensorboard=False)
    monitor = TrainingMonitor(cfg, run_dir, ctx, ddp, model_cfg)

    per_rank = GLOBAL_BATCH // ctx.layout.dp
    tokens = _global_batch()[ctx.dp_rank * per_rank : (ctx.dp_rank + 1) * per_rank]
    norm_before = param_norm(monitor.parts, ctx.torch_device)
    assert monitor.start_step(1)
    result = train_step(
        ddp,
        optimizer,
        _micro_batches(tokens),
        SEQ,
        ctx.torch_device,
        ctx.pp_group(),
        parallel_state.is_pipeline_last_stage(),
        allow_update=monitor.update_gate(1),
    )
    record = monitor.end_step(1, {"loss": result.loss, "grad_norm": result.grad_norm}, {})
    monitor.close()
    return {
        "record": record,
        "layer_stats": monitor.last_layer_stats,
        "updated": not result.skipped,
        "param_norm_before": norm_before,
        "grad_norm": result.grad_norm,
    }


def _parallel_phase(rank: int, root: Path, port: int) -> None:
    from megatron_ext.parallel.config import ParallelConfig
    from megatron_ext.parallel.init import destroy_parallel, initialize_parallel

    _env(rank, 8, port)
    parallel = ParallelConfig(
        device="cpu", tensor_model_parallel_size=2, pipeline_model_parallel_size=2
    )
    ctx = initialize_parallel(parallel, seed=99)
    try:
        results = {
            "plain": _monitored_step(ctx, root, False, False),
            "sp_distopt": _monitored_step(ctx, root, True, True),
        }
        (root / f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        destroy_parallel()


def worker(rank: int, ports: list[int], root: str) -> None:
    import logging

    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    if rank == 0:
        _reference(Path(root), ports[0])
    _parallel_phase(rank, Path(root), ports[1])


@pytest.fixture(scope="module")
def parity_runs(tmp_path_factory):
    import torch.multiprocessing as mp

    from megatron_ext.parallel.ports import find_free_ports

    root = tmp_path_factory.mktemp("monitoring_parity")
    ports = find_free_ports(2)
    mp.spawn(worker, args=(ports, str(root)), nprocs=8, join=True)
    reference = json.loads((root / "reference.json").read_text())
    ranks = [json.loads((root / f"rank{r}.json").read_text()) for r in range(8)]
    return root, reference, ranks


@pytest.mark.timeout(600)
@pytest.mark.parametrize("setup", ["plain", "sp_distopt"])
def test_layer_stats_match_single_process(parity_runs, setup):
    root, reference, ranks = parity_runs
    stats = ranks[0][setup]["layer_stats"]
    assert len(stats["layers"]) == 4
    for entry in stats["layers"]:
        for site in SITES:
            expected = reference["layers"][f"{entry['layer']}/{site}"]
            got = entry[site]
            for key in ("mean", "std", "rms", "abs_max"):
                assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), (
                    setup,
                    entry["layer"],
                    site,
                    key,
                )
            assert got["frac_nonfinite"] == 0.0
            assert got["frac_near_e4m3_max"] == 0.0
        assert entry["grad_norm"] == pytest.approx(
            reference["grad_norm"][str(entry["layer"])], rel=1e-4
        )
    # Every rank holds the same, global numbers.
    for other in ranks[1:]:
        assert other[setup]["layer_stats"] == stats


@pytest.mark.parametrize("setup", ["plain", "sp_distopt"])
def test_norms_are_global(parity_runs, setup):
    root, reference, ranks = parity_runs
    result = ranks[0][setup]
    stats = result["layer_stats"]
    squares = [e["grad_norm"] ** 2 for e in stats["layers"]]
    squares += [v**2 for v in stats["grad_norm_other"].values()]
    assert math.sqrt(sum(squares)) == pytest.approx(result["grad_norm"], rel=1e-5)
    assert result["grad_norm"] == pytest.approx(reference["total_grad_norm"], rel=1e-4)
    assert result["param_norm_before"] == pytest.approx(reference["param_norm"], rel=1e-6)
    assert result["record"]["param_norm"] != result["param_norm_before"]
    assert result["updated"]
    assert 0 < result["record"]["update_to_weight"] < 0.1
    # Only the logging rank (last stage, TP 0, DP 0) writes, one record per step.
    lines = (
        (root / f"run_sp{int(setup == 'sp_distopt')}" / "metrics.jsonl").read_text().splitlines()
    )
    assert len(lines) == 1 and json.loads(lines[0])["step"] == 1
