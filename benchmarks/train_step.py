"""Training-step throughput on one GPU: megatron_ext against Hugging Face Llama baselines.

Every variant trains the same Llama shape (1.09B: hidden 2,048, 16 layers, 16 heads, SwiGLU 5,632,
vocabulary 65,536, untied embeddings) on random non-zero tokens, in bf16 with AdamW, one optimizer
step per micro-batch. Each (variant, shape) runs in its own process (a clean allocator, so the peak
memory is its own); warm-up steps, which include compilation, are excluded from the timing.

Variants (``--variants``; ``megatron_ext`` and the four Hugging Face variants are the comparison,
run first at every shape; the rest are attributions and candidates, run shape by shape):

  megatron_ext        the default build: local layers + SDPA; without Transformer Engine on a GPU
                      the fast path (each layer under torch.compile, chunked cross-entropy),
                      AdamW in one compiled kernel per weight that also writes the model's bf16
                      weight (optimizer.fused_param_copy) with the gradient clip inside it, and
                      the _foreach gradient norm (training/multi_tensor.py)
  hf_eager            transformers LlamaForCausalLM, SDPA attention, bf16 autocast, fused AdamW
  hf_liger            the same after Liger Kernel's apply_liger_kernel_to_llama (when importable)
  hf_compile          the same as hf_eager under torch.compile
  hf_compile_causal   hf_compile with SDPA's causal flag: under torch.compile (torch < 2.14)
                      transformers builds the full [s, s] causal mask and passes it to SDPA,
                      which then cannot use its flash kernel (hf_compile's attention took 3.3x
                      hf_eager's time in the 2026-11-27 runs); a registered attention function
                      drops the mask, as eager transformers itself does. A stronger baseline,
                      a few lines for a user
  megatron_ext_megatron_grad_ops  megatron_ext with megatron-core's local gradient norm and
                      clip fallbacks and the clip before the update (attribution)
  megatron_ext_wgrad_fusion  megatron_ext with model.wgrad_fusion=on: the weight-gradient GEMMs
                      accumulate straight into DDP's fp32 main_grad (a candidate for the default;
                      no faster on an H100 in the 2026-11-27 run 3, so an attribution now)
  megatron_ext_split_layers  megatron_ext with megatron-core's stock RowParallelLinear, whose
                      deprecation warning splits every compiled layer into pieces (attribution of
                      models/linear.py)
  megatron_ext_loss_read_first  megatron_ext with the host waiting for the backward before the
                      gradients are prepared, as when the step read its loss first (attribution;
                      on request: the predicted effect is below the run-to-run spread)
  megatron_ext_separate_param_copy  megatron_ext with torch's fused AdamW update followed by
                      megatron-core's copy of the fp32 weights into the model's bf16 weights
                      (optimizer.fused_param_copy=off; attribution of training/fused_param_copy.py)
  megatron_ext_plain  the fast path off (compile_layers=off, fused_cross_entropy=off)
  megatron_ext_foreach_adamw  megatron_ext with torch's default (multi-tensor foreach) AdamW
                      update, as megatron-core builds it without TE/apex (attribution)
  megatron_ext_cudnn_attention  megatron_ext with SDPA's cuDNN attention kernel put first in
                      the backend priority (a candidate; on request)
  megatron_ext_compile_only   compiled layers, megatron-core's cross-entropy (attribution)
  megatron_ext_loss_only      chunked cross-entropy, eager layers (attribution)

Reported per run: tokens/s, TFLOP/s and MFU against the card's dense bf16 peak (``--peak-tflops``
overrides; 989 for an H100 SXM)
with Megatron-LM's FLOP count (``num_floating_point_operations``: GEMMs of attention, SwiGLU MLP and
logits, attention scores not halved for causality, no embedding lookup) and with ``6 N + 12 L h s``
per token (the count behind earlier published percentages), peak allocated and reserved memory, and
the first/last loss, how many graphs ``torch.compile`` made and how many graph breaks it hit, and
where the GPU time of ``--profile-steps`` further steps goes (``benchmarks/kernel_profile.py``:
kernel time by category, the top kernels, and the GPU's idle time between kernels grouped by the
kernels on either side of each gap). For each shape, every variant's ratio to the
fastest Hugging Face variant. Results go to
``<out-dir>/train_step.json`` and ``train_step.md`` with the card and versions.

One GPU (about 8 minutes, most of it compilation)::

    python benchmarks/train_step.py --out-dir benchmarks/results --time-budget-s 480

``--jobs megatron_ext@4096x2,hf_liger@4096x2,...`` runs exactly those (variant, shape) pairs in that
order instead (``recipe_memory`` is the ``--memory-config`` job), for a budget that cannot hold
every pair.

CPU smoke run (tiny shape; the timings mean nothing)::

    python benchmarks/train_step.py --tiny --steps 2 --warmup 1 --shapes 32x2 \\
        --variants megatron_ext,hf_eager --out-dir /tmp/bench

With Transformer Engine installed (NVIDIA's PyTorch containers) the megatron_ext variant builds TE
layers instead (the fast path is then off; TE fuses those kernels itself); the same command
measures that path, and ``--fp8 e4m3`` (or ``hybrid``) adds FP8 GEMMs on Hopper.

Memory of a preset (model and precision from an experiment YAML, one GPU, the YAML's context and
micro-batch), next to the dry-run estimate for one GPU::

    python benchmarks/train_step.py --memory-config examples/configs/recipe_1b.yaml --variants none

Machines without a package index: megatron-core and Liger Kernel travel as wheels. On a machine
with pip access, for the target's Python (3.12 here)::

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \\
        --implementation cp --platform manylinux_2_28_x86_64 -d .whl \\
        megatron-core==0.16.1 liger-kernel==0.8.5

(``.whl/`` is git-ignored), copy the repository over and install them beside the site packages::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD

``tests/gpu/run_gpu_checks.sh`` does exactly that when ``.whl/`` is present.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.kernel_profile import markdown_lines, profile_steps  # noqa: E402

H100_BF16_DENSE_TFLOPS = 989.0

MODEL_1B = dict(
    num_layers=16,
    hidden_size=2048,
    ffn_hidden_size=5632,
    num_attention_heads=16,
    num_query_groups=16,
    vocab_size=65536,
)
MODEL_TINY = dict(
    num_layers=2,
    hidden_size=64,
    ffn_hidden_size=176,
    num_attention_heads=4,
    num_query_groups=4,
    vocab_size=512,
)

# name -> (priority, family, settings, cost in seconds on an H100 incl. start and compile: the
# wall time measured on 2026-11-27 with a margin; a fresh machine's first compile takes longer)
VARIANTS: dict[str, tuple[int, str, dict, float]] = {
    "megatron_ext": (0, "megatron_ext", {}, 40.0),
    "hf_eager": (0, "hf", {}, 25.0),
    "hf_liger": (0, "hf", {"liger": True}, 25.0),
    "hf_compile": (0, "hf", {"compile": True}, 70.0),
    "hf_compile_causal": (0, "hf", {"compile": True, "causal_flag": True}, 70.0),
    "megatron_ext_megatron_grad_ops": (1, "megatron_ext", {"megatron_grad_ops": True}, 40.0),
    "megatron_ext_split_layers": (1, "megatron_ext", {"stock_row_linear": True}, 45.0),
    "megatron_ext_loss_read_first": (2, "megatron_ext", {"wait_before_grad_prep": True}, 40.0),
    # A candidate for the default (switching it needs both shapes from the same run); measured no
    # faster next to the default on 2026-11-27, so it runs with the attributions.
    "megatron_ext_wgrad_fusion": (1, "megatron_ext", {"wgrad_fusion": "on"}, 45.0),
    "megatron_ext_plain": (
        1,
        "megatron_ext",
        {"compile_layers": "off", "fused_cross_entropy": "off"},
        25.0,
    ),
    "megatron_ext_separate_param_copy": (1, "megatron_ext", {"fused_param_copy": "off"}, 40.0),
    "megatron_ext_foreach_adamw": (1, "megatron_ext", {"fused_adamw": False}, 40.0),
    "megatron_ext_cudnn_attention": (2, "megatron_ext", {"sdpa_prefer": "cudnn"}, 40.0),
    "megatron_ext_compile_only": (
        2,
        "megatron_ext",
        {"compile_layers": "on", "fused_cross_entropy": "off"},
        40.0,
    ),
    "megatron_ext_loss_only": (
        2,
        "megatron_ext",
        {"compile_layers": "off", "fused_cross_entropy": "on"},
        25.0,
    ),
}
# Variant settings that are not ModelConfig fields.
STEP_SETTINGS = (
    "fused_adamw",
    "fused_param_copy",
    "sdpa_prefer",
    "megatron_grad_ops",
    "stock_row_linear",
    "wait_before_grad_prep",
)
# hf_eager first: the first job on a fresh machine ran with more GPU idle time than the same job
# later (24 against 7.5 ms per step, 2026-11-27), and hf_eager is never the fastest variant.
# hf_compile last among the baselines: it compiles longest and is never the fastest at 8,192 x 1.
# The attributions start with the suspect of run 3's GPU idle time (the per-weight update).
DEFAULT_VARIANTS = (
    "hf_eager,megatron_ext,hf_liger,hf_compile_causal,hf_compile,"
    "megatron_ext_separate_param_copy,megatron_ext_megatron_grad_ops,megatron_ext_split_layers,"
    "megatron_ext_wgrad_fusion,megatron_ext_plain,megatron_ext_foreach_adamw"
)


@dataclass(frozen=True)
class Shape:
    seq_length: int
    micro_batch: int

    @property
    def name(self) -> str:
        return f"{self.seq_length}x{self.micro_batch}"

    @property
    def tokens(self) -> int:
        return self.seq_length * self.micro_batch


def parse_shape(text: str) -> Shape:
    try:
        seq, batch = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r}: use SEQxBATCH, e.g. 4096x2") from None
    if seq < 2 or batch < 1:
        raise argparse.ArgumentTypeError(f"shape {text!r}: need seq >= 2 and batch >= 1")
    return Shape(seq, batch)


# ----------------------------------------------------------------------------- FLOP counts


def padded_vocab(vocab: int, multiple: int = 128) -> int:
    return -(-vocab // multiple) * multiple


def megatron_flops_per_step(model: dict, shape: Shape) -> float:
    """Megatron-LM's ``num_floating_point_operations`` for a dense GQA + SwiGLU decoder."""
    h, layers = model["hidden_size"], model["num_layers"]
    heads, groups = model["num_attention_heads"], model["num_query_groups"]
    s = shape.seq_length
    attention = 1 + groups / heads + s / h  # q/o + k/v projections, scores and context
    mlp = model["ffn_hidden_size"] / h * 1.5  # three SwiGLU GEMMs
    logits = padded_vocab(model["vocab_size"]) / (2 * layers * h)
    return 12 * shape.tokens * layers * h * h * (attention + mlp + logits)


def num_parameters(model: dict) -> int:
    h, f = model["hidden_size"], model["ffn_hidden_size"]
    head_dim = h // model["num_attention_heads"]
    kv = 2 * model["num_query_groups"] * head_dim * h
    per_layer = h * h * 2 + kv + 3 * h * f + 2 * h
    return model["num_layers"] * per_layer + 2 * padded_vocab(model["vocab_size"]) * h + h


def six_n_flops_per_step(model: dict, shape: Shape) -> float:
    """``6 N`` per token plus ``12 L h s`` for attention scores (no causal halving)."""
    attention = 12 * model["num_layers"] * model["hidden_size"] * shape.seq_length
    return shape.tokens * (6 * num_parameters(model) + attention)


# ----------------------------------------------------------------------------- workers


def _random_batches(shape: Shape, vocab: int, device: torch.device, count: int = 4):
    """Token ids drawn uniformly from [1, vocab): never all zeros, different every step."""
    gen = torch.Generator().manual_seed(1234)
    return [
        torch.randint(1, vocab, (shape.micro_batch, shape.seq_length + 1), generator=gen).to(device)
        for _ in range(count)
    ]


def _sdpa_preference(prefer: str | None):
    """SDPA's backends with ``prefer`` first (``cudnn``), or no change (None)."""
    if prefer is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = {"cudnn": SDPBackend.CUDNN_ATTENTION}[prefer]
    rest = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel([first, *rest], set_priority=True)


def _megatron_step_fn(
    model: dict, settings: dict, shape: Shape, device: str, extra_model=None, fp8: str = "none"
):
    from megatron_ext.models.builder import build_model
    from megatron_ext.models.config import ModelConfig, PrecisionConfig
    from megatron_ext.parallel.config import ParallelConfig
    from megatron_ext.parallel.init import initialize_parallel
    from megatron_ext.training.estimate import estimate_stages
    from megatron_ext.training.optimizer import OptimizerConfig, prepare_for_training
    from megatron_ext.training.step import train_step

    parallel = ParallelConfig(device=device, use_distributed_optimizer=True)
    ctx = initialize_parallel(parallel, seed=1234)
    if extra_model is not None:
        model_cfg, precision = extra_model
    else:
        model_fields = {k: v for k, v in settings.items() if k not in STEP_SETTINGS}
        model_cfg = ModelConfig(seq_length=shape.seq_length, **model, **model_fields)
        precision = PrecisionConfig(dtype="bf16" if device == "cuda" else "fp32", fp8=fp8)
    estimate = estimate_stages(
        model_cfg, parallel, precision, 1, shape.micro_batch, shape.seq_length
    )[0].total_gib
    if settings.get("stock_row_linear"):  # this worker process only: the layers before the fix
        from megatron.core.tensor_parallel.layers import RowParallelLinear

        from megatron_ext.models import specs

        specs.LocalRowParallelLinear = RowParallelLinear
    chunks = build_model(model_cfg, parallel, precision, device)
    ddp, optimizer = prepare_for_training(
        chunks,
        parallel,
        precision,
        OptimizerConfig(
            fused_adamw=settings.get("fused_adamw", True),
            fused_param_copy=settings.get("fused_param_copy", "auto"),
        ),
        peak_lr=1e-4,
        min_lr=1e-5,
    )
    if settings.get("wait_before_grad_prep"):
        _wait_before_grad_prep(optimizer, ctx.torch_device)
    megatron_grad_ops = settings.get("megatron_grad_ops", False)
    if megatron_grad_ops:  # the gradient norm and clip as megatron-core does them without TE/apex
        from megatron_ext.training import multi_tensor

        multi_tensor.restore()
    batches = _random_batches(shape, model_cfg.vocab_size, ctx.torch_device)
    positions = torch.arange(shape.seq_length, device=ctx.torch_device).expand(
        shape.micro_batch, shape.seq_length
    )
    loss_mask = torch.ones(shape.micro_batch, shape.seq_length, device=ctx.torch_device)

    def step(index: int) -> float:
        tokens = batches[index % len(batches)]
        micro = {
            "tokens": tokens[:, :-1],
            "labels": tokens[:, 1:],
            "loss_mask": loss_mask,
            "position_ids": positions,
        }
        # Inductor picks the SDPA kernel when it compiles (the warm-up steps), so the preference
        # must hold then as well as at run time.
        with _sdpa_preference(settings.get("sdpa_prefer")):
            result = train_step(
                ddp,
                optimizer,
                [micro],
                shape.seq_length,
                ctx.torch_device,
                ctx.pp_group(),
                True,
                clip_in_update=not megatron_grad_ops,
            )
        return result.loss

    return step, estimate


def _wait_before_grad_prep(optimizer, device: torch.device) -> None:
    """The host waits for the backward before megatron-core prepares the gradients, as it did
    when ``train_step`` read the loss first (attribution of the later loss read)."""
    prepare = optimizer.prepare_grads

    def waiting_prepare_grads():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return prepare()

    optimizer.prepare_grads = waiting_prepare_grads


def _hf_step_fn(model: dict, settings: dict, shape: Shape, device: str):
    if settings.get("liger"):
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()
    from transformers import LlamaConfig, LlamaForCausalLM

    attention = "sdpa"
    if settings.get("causal_flag"):
        attention = _register_causal_sdpa()
    config = LlamaConfig(
        vocab_size=model["vocab_size"],
        hidden_size=model["hidden_size"],
        intermediate_size=model["ffn_hidden_size"],
        num_hidden_layers=model["num_layers"],
        num_attention_heads=model["num_attention_heads"],
        num_key_value_heads=model["num_query_groups"],
        max_position_embeddings=shape.seq_length,
        tie_word_embeddings=False,
        use_cache=False,
        attn_implementation=attention,
    )
    torch.manual_seed(1234)
    with torch.device(device):  # initialise on the device: 1.1B parameters are slow on a CPU
        net = LlamaForCausalLM(config)  # fp32 weights; bf16 compute under autocast
    net.train()
    on_gpu = device == "cuda"
    optimizer = torch.optim.AdamW(
        net.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=on_gpu
    )
    forward = torch.compile(net) if settings.get("compile") else net
    batches = _random_batches(shape, model["vocab_size"], torch.device(device))

    def step(index: int) -> float:
        tokens = batches[index % len(batches)][:, :-1]
        with torch.autocast(device, dtype=torch.bfloat16, enabled=on_gpu):
            loss = forward(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.item())

    return step


def _register_causal_sdpa() -> str:
    """Register transformers' SDPA attention without its mask (``is_causal=True`` instead) as
    ``sdpa_causal``; training on unpadded sequences, the mask is the causal one, which SDPA's flag
    gives with the flash kernel. Returns the implementation's name."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def causal_sdpa(module, query, key, value, attention_mask, **kwargs):
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)

    AttentionInterface.register("sdpa_causal", causal_sdpa)
    AttentionMaskInterface.register("sdpa_causal", sdpa_mask)
    return "sdpa_causal"


def _memory_config(path: str):
    """(model dict for FLOPs, Shape, (ModelConfig, PrecisionConfig)) of an experiment YAML.

    The YAML's model and precision at its context and micro-batch, on one GPU (TP = PP = DP = 1:
    the distributed optimizer then holds all optimizer state, an upper bound for DP > 1).
    """
    from megatron_ext.config.loader import load_config
    from megatron_ext.training.experiment import ExperimentConfig

    cfg = load_config(ExperimentConfig, path, [])
    shape = Shape(cfg.model.seq_length, cfg.schedule.micro_batch_size)
    model = {key: getattr(cfg.model, key) for key in MODEL_1B}
    return model, shape, (cfg.model, cfg.precision)


def run_worker(args: argparse.Namespace) -> dict:
    """Build one variant, warm it up, time ``args.steps`` steps; never raises for OOM."""
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    extra_model = None
    if args.memory_config:
        model, shape, extra_model = _memory_config(args.memory_config)
        name, family, settings = "recipe_memory", "megatron_ext", {}
    else:
        model, shape = (MODEL_TINY if args.tiny else MODEL_1B), args.shape
        name = args.worker
        _, family, settings, _ = VARIANTS[name]
    record = {"variant": name, "shape": shape.name, "device": device, "status": "ok"}
    record["card"] = _card(device)
    if args.memory_config:
        record["config"] = args.memory_config
    started = time.perf_counter()
    try:
        if family == "megatron_ext":
            step, estimate = _megatron_step_fn(
                model, settings, shape, device, extra_model, args.fp8
            )
            record["dry_run_estimate_gib"] = round(estimate, 2)
        else:
            step = _hf_step_fn(model, settings, shape, device)
        losses = [step(i) for i in range(args.warmup)]
        record["warmup_s"] = round(time.perf_counter() - started, 1)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(args.steps):
            t0 = time.perf_counter()
            losses.append(step(args.warmup + i))
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    except torch.cuda.OutOfMemoryError as error:
        record.update(status="oom", error=str(error).splitlines()[0][:300])
        return record
    record["peak_tflops"] = args.peak_tflops or peak_tflops_of(record["card"])
    record.update(_measurements(model, shape, times, losses, record["peak_tflops"], device))
    from megatron_ext.models.fast_path import compile_counts

    record.update(compile_counts())
    if args.profile_steps:
        # After the timed steps, so the profiler's overhead stays out of the timing.
        try:
            record["profile"] = profile_steps(
                step, args.warmup + args.steps, args.profile_steps, device
            )
        except Exception as error:  # the measurement above stands without a profile
            record["profile_error"] = f"{type(error).__name__}: {error}"[:300]
    record["wall_s"] = round(time.perf_counter() - started, 1)
    return record


def _measurements(model, shape, times, losses, peak_tflops, device) -> dict:
    mean = sum(times) / len(times)
    out = {
        "steps": len(times),
        "step_s_mean": round(mean, 5),
        "step_s_median": round(statistics.median(times), 5),
        "tokens_per_s": round(shape.tokens / mean, 1),
        "tflops_megatron": round(megatron_flops_per_step(model, shape) / mean / 1e12, 2),
        "mfu_megatron": round(megatron_flops_per_step(model, shape) / mean / 1e12 / peak_tflops, 4),
        "mfu_6n": round(six_n_flops_per_step(model, shape) / mean / 1e12 / peak_tflops, 4),
        "first_loss": round(losses[0], 4),
        "last_loss": round(losses[-1], 4),
    }
    if not all(math.isfinite(loss) for loss in losses):
        out["status"] = "nonfinite_loss"
    if device == "cuda":
        out["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    return out


# ----------------------------------------------------------------------------- driver


def _available(name: str) -> str | None:
    """None when the variant can run here, else why not."""
    if VARIANTS[name][2].get("liger") and importlib.util.find_spec("liger_kernel") is None:
        return LIGER_MISSING
    return None


LIGER_MISSING = "liger_kernel is not installed"


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("triton", "transformers", "megatron-core", "liger-kernel"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    out["transformer_engine"] = importlib.util.find_spec("transformer_engine") is not None
    return out


def peak_tflops_of(card: str) -> float:
    """Dense bf16 TFLOP/s of the card the worker ran on (``monitoring.flops``' table), or the
    H100 SXM's where the card is not in it (a CPU smoke run)."""
    from megatron_ext.monitoring.flops import lookup_peak_flops

    peak = lookup_peak_flops(card)
    return peak / 1e12 if peak else H100_BF16_DENSE_TFLOPS


def _card(device: str) -> str:
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _run_one(args, job: dict, timeout_s: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="train_step_") as tmp:
        out_file = Path(tmp) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--result-file", str(out_file)]
        command += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
        if args.peak_tflops:
            command += ["--peak-tflops", str(args.peak_tflops)]
        command += ["--fp8", args.fp8]
        command += ["--profile-steps", str(args.profile_steps)]
        if job["variant"] == "recipe_memory":
            command += ["--memory-config", args.memory_config]
        else:
            command += ["--worker", job["variant"], "--shape", job["shape"]]
        command += ["--tiny"] * args.tiny + ["--cpu"] * args.cpu
        started = time.perf_counter()
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {**job, "status": "timeout", "error": f"no result within {timeout_s:.0f} s"}
        if out_file.exists():
            return json.loads(out_file.read_text())
        tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-3:]
        return {
            **job,
            "status": "failed",
            "error": " | ".join(tail)[-600:] or f"exit code {proc.returncode}",
            "wall_s": round(time.perf_counter() - started, 1),
        }


def plan_jobs(args) -> list[dict]:
    if args.jobs:
        return _explicit_jobs(args)
    names = [n for n in args.variants.split(",") if n and n != "none"]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    # The comparison (priority 0) variant by variant over the shapes; the attributions after it
    # shape by shape, so that a short budget still attributes the first shape completely.
    jobs = [
        {
            "variant": name,
            "shape": shape.name,
            "_key": (0, names.index(name), s)
            if VARIANTS[name][0] == 0
            else (VARIANTS[name][0], s, names.index(name)),
        }
        for s, shape in enumerate(args.shapes)
        for name in names
    ]
    if args.memory_config:
        jobs.append({"variant": "recipe_memory", "shape": "config", "_key": (1, 99, 0)})
    jobs.sort(key=lambda job: job.pop("_key"))
    return jobs


def _explicit_jobs(args) -> list[dict]:
    """``--jobs``: VARIANT@SHAPE (or recipe_memory) entries, run in exactly the given order."""
    jobs = []
    for entry in (part.strip() for part in args.jobs.split(",")):
        if not entry:
            continue
        if entry == "recipe_memory":
            if not args.memory_config:
                raise SystemExit("--jobs recipe_memory needs --memory-config")
            jobs.append({"variant": "recipe_memory", "shape": "config"})
            continue
        name, _, shape = entry.partition("@")
        if name not in VARIANTS:
            raise SystemExit(f"--jobs {entry!r}: unknown variant; choose from {sorted(VARIANTS)}")
        try:
            jobs.append({"variant": name, "shape": parse_shape(shape).name})
        except argparse.ArgumentTypeError as error:
            raise SystemExit(f"--jobs {entry!r}: {error}") from None
    return jobs


def run_driver(args, write) -> dict:
    """Run the planned jobs in order (``plan_jobs``); ``write(report)`` after each, so a cut-off
    run keeps all finished measurements."""
    jobs = plan_jobs(args)
    started = time.perf_counter()
    results = []
    report = {}
    for job in jobs:
        elapsed = time.perf_counter() - started
        if job["variant"] in VARIANTS:
            reason = _available(job["variant"])
        else:  # the preset's memory: a full-size model, never part of a tiny rehearsal
            reason = "not run with --tiny" if args.tiny else None
        cost = VARIANTS.get(job["variant"], (0, "", {}, 30.0))[3]
        remaining = args.time_budget_s - elapsed if args.time_budget_s else None
        # A job that most likely cannot finish would only be killed at the deadline.
        if reason is None and remaining is not None and remaining < max(20.0, 0.5 * cost):
            reason = f"time budget: {remaining:.0f} s left, about {cost:.0f} s needed"
        if reason is not None:
            results.append({**job, "status": "skipped", "error": reason})
        else:
            timeout = (
                min(args.variant_timeout_s, remaining) if remaining else args.variant_timeout_s
            )
            results.append(_run_one(args, job, timeout))
        print(_format_line(results[-1]), flush=True)
        report = _report(args, results, time.perf_counter() - started)
        write(report)
    return report


def _report(args, results: list[dict], total_s: float) -> dict:
    # The driver never touches CUDA itself (a context would hold GPU memory during the jobs): the
    # card is what the workers saw.
    cards = [r["card"] for r in results if "card" in r]
    on_cpu = args.cpu or not torch.cuda.is_available()
    return {
        "card": cards[0] if cards else (_card("cpu") if on_cpu else "not recorded (no job ran)"),
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "versions": _versions(),
        "settings": {
            "steps": args.steps,
            "warmup": args.warmup,
            "peak_tflops": args.peak_tflops
            or next((r["peak_tflops"] for r in results if "peak_tflops" in r), None),
            "model": MODEL_TINY if args.tiny else MODEL_1B,
            "dtype": "bf16" if torch.cuda.is_available() and not args.cpu else "fp32",
            "fp8": args.fp8,
        },
        "results": results,
        "ratios": compute_ratios(results),
        "total_s": round(total_s, 1),
    }


BASELINES = ("hf_eager", "hf_compile", "hf_compile_causal", "hf_liger")
"""The Hugging Face variants the best baseline is taken from; a target is only read where each
of them ran (``hf_liger`` is excused where Liger Kernel is not installed)."""


def compute_ratios(results: list[dict]) -> dict:
    """Per shape: the fastest Hugging Face variant, each variant's tokens/s ratio to it, and the
    baselines that did not run there (``missing_baselines``: name -> why)."""
    ratios = {}
    for shape in dict.fromkeys(r["shape"] for r in results):
        here = [r for r in results if r["shape"] == shape]
        done = [r for r in here if r["status"] == "ok"]
        hf = [r for r in done if r["variant"].startswith("hf_")]
        if not hf:
            continue
        best = max(hf, key=lambda r: r["tokens_per_s"])
        ratios[shape] = {
            "best_hf": best["variant"],
            "best_hf_tokens_per_s": best["tokens_per_s"],
            "ratio_to_best_hf": {
                r["variant"]: round(r["tokens_per_s"] / best["tokens_per_s"], 3) for r in done
            },
            "missing_baselines": _missing_baselines(here),
        }
    return ratios


def _missing_baselines(results: list[dict]) -> dict[str, str]:
    status = {r["variant"]: r for r in results}
    missing = {}
    for name in BASELINES:
        result = status.get(name)
        if result is None:
            missing[name] = "not run"
        elif result["status"] != "ok":
            if name == "hf_liger" and result.get("error") == LIGER_MISSING:
                continue
            missing[name] = result["status"]
    return missing


TARGET_RATIO = 1.25
"""The goal without Transformer Engine: this many times the best Hugging Face variant's tokens/s
at every shape, in one run."""
DEFAULT_CANDIDATES = ("megatron_ext", "megatron_ext_wgrad_fusion")
"""The default build and the candidate for the default, whose ratios the target is read from."""


def target_lines(ratios: dict, target: float = TARGET_RATIO) -> list[str]:
    """One line per measured candidate: its ratio at every shape of the run, and whether it
    reaches ``target`` at all of them (a shape where it did not run counts as missed). Where a
    baseline did not run, the best Hugging Face number is unknown: no ratio there reaches."""
    lines = []
    missing = {
        f"{name} at {shape} ({why})"
        for shape, r in ratios.items()
        for name, why in r.get("missing_baselines", {}).items()
    }
    for variant in DEFAULT_CANDIDATES:
        per_shape = {shape: r["ratio_to_best_hf"].get(variant) for shape, r in ratios.items()}
        if all(value is None for value in per_shape.values()):
            continue
        reached = all(value is not None and value >= target for value in per_shape.values())
        shapes = ", ".join(
            f"{shape} {'not measured' if value is None else f'{value:.3f}x'}"
            for shape, value in per_shape.items()
        )
        if reached and missing:
            verdict = f"not comparable to {target}x: no result of " + ", ".join(sorted(missing))
        else:
            verdict = f"{'reaches' if reached else 'misses'} {target}x at every shape"
        lines.append(f"{variant}: {shapes}: {verdict}")
    return lines


def _format_line(r: dict) -> str:
    head = f"{r['variant']:<26} {r['shape']:>7}"
    if r["status"] != "ok":
        return f"{head}  {r['status']}: {r.get('error', '')}"
    memory = f"{r['peak_allocated_gib']:6.1f} GiB" if "peak_allocated_gib" in r else "     -"
    return (
        f"{head}  {r['tokens_per_s']:>10.0f} tok/s  {r['tflops_megatron']:7.1f} TFLOP/s  "
        f"MFU {100 * r['mfu_megatron']:5.1f}% (6N: {100 * r['mfu_6n']:5.1f}%)  {memory}  "
        f"loss {r['first_loss']:.3f}->{r['last_loss']:.3f}"
    )


def to_markdown(report: dict) -> str:
    v = report["versions"]
    lines = [
        f"# Training-step benchmark ({report['date_utc']})",
        "",
        f"Card: {report['card']}. torch {v['torch']}, triton {v['triton']}, transformers "
        f"{v['transformers']}, megatron-core {v['megatron-core']}, liger-kernel "
        f"{v['liger-kernel']}, Transformer Engine "
        f"{'present' if v['transformer_engine'] else 'absent'}.",
        f"Steps timed: {report['settings']['steps']} after {report['settings']['warmup']} warm-up; "
        f"dtype {report['settings']['dtype']}, fp8 {report['settings']['fp8']}; MFU against "
        f"{report['settings']['peak_tflops']} TFLOP/s.",
        f"Command: `{report['command']}`",
        "",
        "| variant | shape | tokens/s | ratio to best HF | TFLOP/s (Megatron count) | MFU "
        "(Megatron) | MFU (6N+12Lhs) | peak alloc GiB | loss first->last | status |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in report["results"]:
        ratio = report["ratios"].get(r["shape"], {}).get("ratio_to_best_hf", {}).get(r["variant"])
        if r["status"] == "ok":
            lines.append(
                f"| {r['variant']} | {r['shape']} | {r['tokens_per_s']:.0f} | "
                f"{'' if ratio is None else f'{ratio:.3f}'} | {r['tflops_megatron']:.1f} | "
                f"{100 * r['mfu_megatron']:.1f}% | {100 * r['mfu_6n']:.1f}% | "
                f"{r.get('peak_allocated_gib', '-')} | {r['first_loss']:.3f}->{r['last_loss']:.3f}"
                f" | ok |"
            )
        else:
            lines.append(
                f"| {r['variant']} | {r['shape']} | | | | | | | | {r['status']}: "
                f"{r.get('error', '')[:160].replace('|', '/')} |"
            )
    targets = target_lines(report["ratios"])
    if targets:
        lines += ["", "Against the target (the best Hugging Face variant of each shape):", ""]
        lines += [f"- {line}" for line in targets]
    memory = [
        r for r in report["results"] if "peak_allocated_gib" in r and "dry_run_estimate_gib" in r
    ]
    if memory:
        lines += [
            "",
            "Memory of the megatron_ext runs on one GPU against the dry-run estimate:",
            "",
        ]
    for r in memory:
        lines.append(
            f"- {r.get('config', r['variant'])} at {r['shape']}: peak allocated "
            f"{r.get('peak_allocated_gib', '-')} GiB, reserved {r.get('peak_reserved_gib', '-')} "
            f"GiB; estimate {r['dry_run_estimate_gib']} GiB"
        )
    lines += _compile_lines(report["results"])
    lines += markdown_lines(report["results"])
    return "\n".join(lines) + "\n"


def _compile_lines(results: list[dict]) -> list[str]:
    compiled = [r for r in results if r.get("compiled_graphs")]
    if not compiled:
        return []
    lines = [
        "",
        "torch.compile in each job (graphs made; graph breaks, with their first reasons):",
        "",
    ]
    for r in compiled:
        reasons = "; ".join(r.get("graph_break_reasons", []))
        lines.append(
            f"- {r['variant']} at {r['shape']}: {r['compiled_graphs']} graphs, "
            f"{r['graph_breaks']} graph breaks" + (f" ({reasons})" if reasons else "")
        )
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated, or none")
    parser.add_argument(
        "--jobs",
        default=None,
        help="VARIANT@SEQxBATCH list (and recipe_memory) run in this order, instead of "
        "--variants x --shapes in priority order",
    )
    parser.add_argument(
        "--shapes",
        type=lambda text: [parse_shape(part) for part in text.split(",") if part],
        default=None,
        help="SEQxBATCH list (default 4096x2,8192x1; with --tiny 32x2,64x1)",
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation)")
    parser.add_argument(
        "--profile-steps",
        type=int,
        default=2,
        help="steps profiled after the timed ones (kernel time by category; 0: none)",
    )
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide model")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even with a GPU")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="dense bf16 peak for MFU (default: the card's, from monitoring.flops; 989 for an "
        "unknown card)",
    )
    parser.add_argument("--memory-config", default=None, help="experiment YAML to measure")
    parser.add_argument(
        "--fp8",
        default="none",
        choices=["none", "e4m3", "hybrid"],
        help="megatron_ext variants: FP8 GEMMs (needs Transformer Engine on Hopper)",
    )
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--time-budget-s", type=float, default=0.0, help="0: no budget")
    parser.add_argument("--variant-timeout-s", type=float, default=420.0)
    # Internal: one (variant, shape) in this process.
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--shape", type=parse_shape, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.profile_steps < 0:
        raise SystemExit("--steps must be >= 1, --warmup and --profile-steps >= 0")
    if args.result_file:
        record = run_worker(args)
        Path(args.result_file).write_text(json.dumps(record))
        return 0
    if args.shapes is None:
        args.shapes = [
            parse_shape(s) for s in ("32x2,64x1" if args.tiny else "4096x2,8192x1").split(",")
        ]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def write(report: dict) -> None:
        for name, text in (
            ("train_step.json", json.dumps(report, indent=2) + "\n"),
            ("train_step.md", to_markdown(report)),
        ):
            tmp = out_dir / f".{name}.tmp"
            tmp.write_text(text)
            tmp.replace(out_dir / name)

    report = run_driver(args, write)
    for shape, ratio in report["ratios"].items():
        others = ", ".join(
            f"{name} {value:.3f}x" for name, value in ratio["ratio_to_best_hf"].items()
        )
        print(f"{shape}: best HF = {ratio['best_hf']}; ratios: {others}")
    for line in target_lines(report["ratios"]):
        print(line)
    print(f"wrote {out_dir / 'train_step.json'} and {out_dir / 'train_step.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
