"""Hugging Face export and import against the real TP2xPP2 model, over gloo on CPU.

One spawn of 4 processes (TP2 x PP2) does two jobs:

1. Export side: a tiny GQA model (4 query heads, 2 key/value heads, vocabulary 500 padded to 512)
   trains 4 steps on multilingual text tokenized by a freshly trained megatron_ext tokenizer and
   is saved with ``megatron_ext.checkpoint`` (model + distributed optimizer state). Its logits on a
   multilingual batch are computed by the TP2xPP2 pipeline itself (forward only; the two TP ranks
   of the last stage each hold half of the padded vocabulary). Each rank also keeps its local
   ``linear_fc1`` / ``linear_qkv`` shards, to check how ``torch_dist`` stores them.
2. Import side: a random ``LlamaForCausalLM`` converted with ``convert_from_hf`` (saved at TP1) is
   loaded by ``megatron_ext.checkpoint`` for finetuning at TP2xPP2, saved again from that layout,
   and trains one step: its loss is the first training loss in megatron_ext. A second process
   group (TP2 x PP2 x virtual PP2) loads that re-saved checkpoint and saves it once more.

The checks: exported HF logits equal the pipeline's (fp32, < 1e-4); greedy generation of 32 tokens
is identical between transformers and the megatron_ext model (built at TP1 from the checkpoint,
full recompute per token); HF -> megatron_ext (TP2xPP2, and TP2xPP2xVPP2) -> HF is bit-identical;
the first training loss equals the HF model's loss on that batch; the exported tokenizer gives the
training tokenizer's ids on held-out text in other languages.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from functools import partial
from pathlib import Path

import pytest
import torch

from megatron_ext.data.batches import split_micro_batches

SEQ, MICRO_BATCH, NUM_MICRO, TRAIN_STEPS = 32, 2, 2, 4
VOCAB = 500
TRAIN_LANGS = (
    "en_Latn",
    "fr_Latn",
    "ru_Cyrl",
    "ar_Arab",
    "hi_Deva",
    "zh_Hans",
    "ja_Jpan",
    "ko_Kore",
)
HELDOUT_LANGS = ("de_Latn", "el_Grek", "tr_Latn", "uk_Cyrl", "he_Hebr", "th_Thai")
MODEL_A = dict(
    num_layers=4,
    hidden_size=64,
    ffn_hidden_size=96,
    num_attention_heads=4,
    num_query_groups=2,
    seq_length=64,
    vocab_size=VOCAB,
    rotary_base=50000,
    norm_epsilon=1e-6,
    transformer_impl="local",
)


def _texts(langs: tuple[str, ...]) -> list[str]:
    """UDHR sample texts shipped in gflanguages, one string per (language, field)."""
    import gflanguages

    languages = gflanguages.LoadLanguages()
    texts = []
    for lang in langs:
        for _, value in languages[lang].sample_text.ListFields():
            text = " ".join(str(value).split())
            if len(text) > 20:
                texts.append(text)
    return texts


# ---- the spawned processes -------------------------------------------------------------------
def _logits_step(captured: list, data_iterator, model):
    batch = next(data_iterator)
    output = model(
        input_ids=batch["tokens"], position_ids=batch["position_ids"], attention_mask=None
    )

    def keep(output_tensor):
        captured.append(output_tensor.detach().clone())
        return output_tensor.sum() * 0.0, {}

    return output, keep


def _trainer(model_cfg, par, ctx, lr):
    from megatron_ext.models.builder import build_model
    from megatron_ext.models.config import PrecisionConfig
    from megatron_ext.training.optimizer import OptimizerConfig, prepare_for_training

    precision = PrecisionConfig()
    chunks = build_model(model_cfg, par, precision, ctx.device)
    ddp, optimizer = prepare_for_training(chunks, par, precision, OptimizerConfig(), lr, lr)
    return chunks, ddp, optimizer


def _export_job(root: Path, inputs: dict, par, ctx) -> None:
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_ext.checkpoint.config import CheckpointConfig
    from megatron_ext.checkpoint.manager import save_checkpoint
    from megatron_ext.models.config import ModelConfig
    from megatron_ext.training.step import train_step

    model_cfg = ModelConfig(**MODEL_A)
    chunks, ddp, optimizer = _trainer(model_cfg, par, ctx, 1e-2)
    last = parallel_state.is_pipeline_last_stage()
    for step_batches in inputs["train"]:
        train_step(ddp, optimizer, step_batches, SEQ, ctx.torch_device, ctx.pp_group(), last)
    config = {"model": asdict(model_cfg), "tokenizer": inputs["tokenizer_section"]}
    save_checkpoint(
        CheckpointConfig(), root / "run_a", TRAIN_STEPS, ddp, optimizer, None, {}, config, ctx
    )

    shards = {}
    for layer in chunks[0].decoder.layers:
        index = layer.layer_number - 1
        shards[index] = {
            "fc1": layer.mlp.linear_fc1.weight.detach().clone(),
            "qkv": layer.self_attention.linear_qkv.weight.detach().clone(),
        }
    torch.save({"tp_rank": ctx.tp_rank, "layers": shards}, root / f"shards_rank{ctx.rank}.pt")

    batch = inputs["eval"]
    captured: list = []
    get_forward_backward_func()(
        forward_step_func=partial(_logits_step, captured),
        data_iterator=iter([batch]),
        model=ddp[0],
        num_microbatches=1,
        seq_length=batch["tokens"].shape[1],
        micro_batch_size=batch["tokens"].shape[0],
        forward_only=True,
    )
    if last:
        torch.save(captured[0], root / f"logits_tp{ctx.tp_rank}.pt")


def _import_job(root: Path, inputs: dict, par, ctx) -> None:
    import yaml
    from megatron.core import parallel_state

    from megatron_ext.checkpoint.config import CheckpointConfig
    from megatron_ext.checkpoint.manager import load_checkpoint, save_checkpoint
    from megatron_ext.config.loader import from_dict
    from megatron_ext.models.config import ModelConfig
    from megatron_ext.training.step import train_step

    converted = Path(inputs["converted"])
    config = yaml.safe_load((converted / "config.yaml").read_text())
    model_cfg = from_dict(ModelConfig, config["model"])
    _, ddp, optimizer = _trainer(model_cfg, par, ctx, 1e-3)
    load_checkpoint(
        CheckpointConfig(load=str(converted), finetune=True),
        root / "run_b",
        ddp,
        optimizer,
        None,
        ctx,
        {"model": config["model"]},
    )
    save_checkpoint(CheckpointConfig(), root / "run_c", 0, ddp, optimizer, None, {}, config, ctx)
    last = parallel_state.is_pipeline_last_stage()
    result = train_step(
        ddp, optimizer, inputs["finetune"], SEQ, ctx.torch_device, ctx.pp_group(), last
    )
    if ctx.rank == 0:
        (root / "finetune_loss.json").write_text(json.dumps({"loss": result.loss}))


def _virtual_pipeline_job(root: Path, par, ctx) -> None:
    """The imported model loaded and saved again by TP2 x PP2 x virtual PP2 (one layer a chunk)."""
    import yaml

    from megatron_ext.checkpoint.config import CheckpointConfig
    from megatron_ext.checkpoint.manager import load_checkpoint, save_checkpoint
    from megatron_ext.config.loader import from_dict
    from megatron_ext.models.config import ModelConfig

    config = yaml.safe_load(
        (root / "run_c" / "checkpoints" / "iter_0000000" / "config.yaml").read_text()
    )
    model_cfg = from_dict(ModelConfig, config["model"])
    _, ddp, optimizer = _trainer(model_cfg, par, ctx, 1e-3)
    assert len(ddp) == 2
    load_checkpoint(
        CheckpointConfig(load=str(root / "run_c" / "checkpoints"), finetune=True),
        root / "run_d",
        ddp,
        optimizer,
        None,
        ctx,
        {"model": config["model"]},
    )
    save_checkpoint(CheckpointConfig(), root / "run_d", 0, ddp, optimizer, None, {}, config, ctx)


def worker(rank: int, ports: list[int], root: str) -> None:
    import logging

    from megatron_ext.parallel.config import ParallelConfig
    from megatron_ext.parallel.init import destroy_parallel, initialize_parallel

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    inputs = torch.load(Path(root) / "inputs.pt", weights_only=False)
    for phase, vpp in enumerate((None, 2)):
        os.environ.update(
            {
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": "4",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(ports[phase]),
            }
        )
        par = ParallelConfig(
            device="cpu",
            tensor_model_parallel_size=2,
            pipeline_model_parallel_size=2,
            virtual_pipeline_model_parallel_size=vpp,
        )
        ctx = initialize_parallel(par, seed=1234)
        try:
            if vpp is None:
                _export_job(Path(root), inputs, par, ctx)
                _import_job(Path(root), inputs, par, ctx)
            else:
                _virtual_pipeline_job(Path(root), par, ctx)
        finally:
            destroy_parallel()


# ---- the parent: inputs, the spawn, the checks -----------------------------------------------
def _micro_batches(ids: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    return split_micro_batches(ids, MICRO_BATCH)


def _train_tokenizer(root: Path) -> Path:
    from megatron_ext.tokenizer.training import TokenizerTrainingConfig, train_tokenizer

    corpus = root / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as out:
        for lang in TRAIN_LANGS:
            for text in _texts((lang,)):
                out.write(
                    json.dumps({"text": text, "source_lang": lang}, ensure_ascii=False) + "\n"
                )
    cfg = TokenizerTrainingConfig(
        vocab_size=VOCAB, compare_unbalanced=False, num_threads=1, heldout_fraction=0.0
    )
    return Path(train_tokenizer([str(corpus)], root / "tokenizer", cfg).output_dir)


def _random_hf_llama(path: Path, tokenizer_dir: Path) -> None:
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=20000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # non-trivial norm weights, so a mix-up would show
                param.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(tokenizer_dir / name, path / name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch.multiprocessing as mp

    from megatron_ext.convert.from_hf import convert_from_hf
    from megatron_ext.parallel.ports import find_free_ports
    from megatron_ext.tokenizer.loading import SentencePieceTokenizer

    root = tmp_path_factory.mktemp("convert")
    tokenizer_dir = _train_tokenizer(root)
    tokenizer = SentencePieceTokenizer(tokenizer_dir / "tokenizer.model")
    stream = [i for text in _texts(TRAIN_LANGS) for i in tokenizer.tokenize(text) + [tokenizer.eod]]
    need = TRAIN_STEPS * NUM_MICRO * MICRO_BATCH * (SEQ + 1)
    stream = (stream * (need // len(stream) + 1))[:need]
    train = torch.tensor(stream).view(TRAIN_STEPS, NUM_MICRO * MICRO_BATCH, SEQ + 1)
    # The longest sample text of four held-out languages (different scripts), SEQ tokens each.
    eval_ids = torch.stack(
        [
            torch.tensor(tokenizer.tokenize(max(_texts((lang,)), key=len))[:SEQ])
            for lang in HELDOUT_LANGS[:4]
        ]
    )
    _random_hf_llama(root / "hf_src", tokenizer_dir)
    converted = convert_from_hf(root / "hf_src", root / "run_b", tensor_model_parallel_size=2)
    finetune_ids = torch.tensor(stream[: NUM_MICRO * MICRO_BATCH * (SEQ + 1)]).view(-1, SEQ + 1)
    inputs = {
        "train": [_micro_batches(step) for step in train],
        "eval": {
            "tokens": eval_ids,
            "position_ids": torch.arange(eval_ids.shape[1]).expand_as(eval_ids),
        },
        "finetune": _micro_batches(finetune_ids),
        "converted": str(converted),
        "tokenizer_section": {
            "tokenizer_type": "SentencePieceTokenizer",
            "tokenizer_model": str(tokenizer_dir / "tokenizer.model"),
        },
    }
    torch.save(inputs, root / "inputs.pt")
    ports = find_free_ports(2)
    mp.spawn(worker, args=(ports, str(root)), nprocs=4, join=True)
    return root, inputs, tokenizer_dir


@pytest.fixture(scope="module")
def exported(runs):
    from megatron_ext.convert.to_hf import convert_to_hf

    root, _, _ = runs
    return convert_to_hf(root / "run_a", root / "hf_a", max_shard_size="100KB")


def _hf_model(path: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _all_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.mark.timeout(600)
def test_convert_exported_logits_match_tp2pp2_pipeline(runs, exported):
    root, inputs, _ = runs
    pipeline = torch.cat([torch.load(root / f"logits_tp{r}.pt") for r in (0, 1)], dim=-1)
    assert pipeline.shape[-1] == 512  # vocabulary 500 padded to 128 x TP
    assert len(list(exported.glob("model-*.safetensors"))) > 1
    with torch.no_grad():
        hf_logits = _hf_model(exported)(inputs["eval"]["tokens"]).logits
    assert hf_logits.shape[-1] == VOCAB
    diff = (hf_logits - pipeline[..., :VOCAB]).abs().max().item()
    assert diff < 1e-4, diff


@pytest.mark.timeout(600)
def test_convert_exported_greedy_generation_identical(runs, exported):
    from megatron_ext.convert.megatron_model import (
        greedy_generate,
        load_checkpoint_model,
        single_process_megatron,
    )

    root, inputs, _ = runs
    prompts = inputs["eval"]["tokens"][:2, :8]
    with single_process_megatron():
        model, cfg = load_checkpoint_model(root / "run_a")
        ours = greedy_generate(model, prompts, 32, cfg.vocab_size)
    hf = _hf_model(exported)
    hf.generation_config.eos_token_id = None  # 32 tokens, as the megatron side decodes
    theirs = hf.generate(prompts, max_new_tokens=32, do_sample=False)
    assert theirs.shape == (2, 8 + 32)
    assert torch.equal(theirs, ours)


@pytest.mark.timeout(600)
def test_convert_torch_dist_stores_fc1_and_qkv_layout_independent(runs):
    from megatron_ext.convert import llama
    from megatron_ext.convert.dist_reader import DistCheckpointReader, resolve_checkpoint_dir

    root, _, _ = runs
    reader = DistCheckpointReader(resolve_checkpoint_dir(root / "run_a"))
    ffn, rows = MODEL_A["ffn_hidden_size"], reader.shape(llama.QKV)[1]
    seen = 0
    for rank in range(4):
        shard = torch.load(root / f"shards_rank{rank}.pt")
        r = shard["tp_rank"]
        for layer, local in shard["layers"].items():
            fc1 = reader.read(llama.FC1, index=layer)
            half = ffn // 2  # per-rank gate (and up) rows at TP2
            # In memory: [gate_r; up_r]. Stored: all gate rows, then all up rows.
            assert torch.equal(local["fc1"][:half], fc1[r * half : (r + 1) * half])
            assert torch.equal(local["fc1"][half:], fc1[ffn + r * half : ffn + (r + 1) * half])
            qkv = reader.read(llama.QKV, index=layer)
            assert torch.equal(local["qkv"], qkv[r * rows // 2 : (r + 1) * rows // 2])
            seen += 1
    assert seen == 2 * MODEL_A["num_layers"]  # every layer, from both TP ranks


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "layout_run", ["run_b", "run_c", "run_d"], ids=["import_tp1", "tp2pp2", "tp2pp2vpp2"]
)
def test_convert_hf_roundtrip_through_parallel_layout_bit_identical(runs, tmp_path, layout_run):
    from megatron_ext.convert.to_hf import convert_to_hf

    root, _, _ = runs
    back = convert_to_hf(root / layout_run, tmp_path / "hf_back")
    if layout_run == "run_b":  # the import carries the tokenizer in its checkpoint directory
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            assert (back / name).read_bytes() == (root / "hf_src" / name).read_bytes(), name
    original, returned = _all_tensors(root / "hf_src"), _all_tensors(back)
    assert sorted(original) == sorted(returned)
    for name, tensor in original.items():
        assert returned[name].dtype == tensor.dtype
        assert torch.equal(returned[name], tensor), name
    src = json.loads((root / "hf_src" / "config.json").read_text())
    out = json.loads((back / "config.json").read_text())
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rope_parameters",
        "rms_norm_eps",
        "tie_word_embeddings",
        "max_position_embeddings",
    ):
        assert out[key] == src[key], key


@pytest.mark.timeout(600)
def test_convert_imported_model_trains_from_hf_loss(runs):
    root, inputs, _ = runs
    hf = _hf_model(root / "hf_src")
    losses = []
    with torch.no_grad():
        for mb in inputs["finetune"]:
            logits = hf(mb["tokens"]).logits
            losses.append(
                torch.nn.functional.cross_entropy(logits.flatten(0, 1), mb["labels"].flatten())
            )
    hf_loss = torch.stack(losses).mean().item()
    ours = json.loads((root / "finetune_loss.json").read_text())["loss"]
    assert ours == pytest.approx(hf_loss, rel=1e-5, abs=1e-6)


@pytest.mark.timeout(600)
def test_convert_exported_tokenizer_matches_training_tokenizer(runs, exported):
    from transformers import AutoTokenizer

    from megatron_ext.tokenizer.loading import SentencePieceTokenizer

    _, _, tokenizer_dir = runs
    training = SentencePieceTokenizer(tokenizer_dir / "tokenizer.model")
    hf = AutoTokenizer.from_pretrained(exported, local_files_only=True)
    texts = _texts(HELDOUT_LANGS)
    assert len(texts) > 20
    for text in texts:
        assert hf(text, add_special_tokens=False)["input_ids"] == training.tokenize(text), text
    config = json.loads((exported / "config.json").read_text())
    assert config["eos_token_id"] == training.eod
    assert config["bos_token_id"] == training.bos
