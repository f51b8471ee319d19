"""Reading torch_dist checkpoints without a process group, and the export's refusals.

The checkpoints here are written with ``torch.distributed.checkpoint`` in a single process (no
process group) with megatron-core's key names and a ``metadata.json`` naming ``torch_dist``;
the multi-process megatron-core saves are covered in tests/distributed/test_convert_parity.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from megatron_ext.convert import llama
from megatron_ext.convert.dist_reader import DistCheckpointReader, resolve_checkpoint_dir
from megatron_ext.convert.hf_files import ShardedSafetensorsWriter, parse_size
from megatron_ext.convert.to_hf import convert_to_hf

MODEL = dict(
    num_layers=2,
    hidden_size=8,
    ffn_hidden_size=12,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=10,
    seq_length=16,
)
PADDED = 16


def _tensors(untied: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    L, H, F = MODEL["num_layers"], MODEL["hidden_size"], MODEL["ffn_hidden_size"]
    tensors = {
        llama.EMBEDDING: torch.randn(PADDED, H, generator=gen),
        llama.QKV_NORM: torch.rand(L, H, generator=gen),
        llama.QKV: torch.randn(L, 16, H, generator=gen),
        llama.PROJ: torch.randn(L, H, H, generator=gen),
        llama.FC1_NORM: torch.rand(L, H, generator=gen),
        llama.FC1: torch.randn(L, 2 * F, H, generator=gen),
        llama.FC2: torch.randn(L, H, F, generator=gen),
        llama.FINAL_NORM: torch.rand(H, generator=gen),
    }
    if untied:
        tensors[llama.OUTPUT_LAYER] = torch.randn(PADDED, H, generator=gen)
    return tensors


def _write_checkpoint(
    run: Path, step: int, tensors: dict, model: dict | None = None, backend: str = "torch_dist"
) -> Path:
    from torch.distributed.checkpoint import FileSystemWriter, save

    ckpt = run / "checkpoints" / f"iter_{step:07d}"
    ckpt.mkdir(parents=True)
    save(dict(tensors), storage_writer=FileSystemWriter(str(ckpt)), no_dist=True)
    (ckpt / "metadata.json").write_text(json.dumps({"sharded_backend": backend}))
    (ckpt / "config.yaml").write_text(yaml.safe_dump({"model": model or MODEL}))
    (run / "checkpoints" / "latest").write_text(ckpt.name + "\n")
    return ckpt


def test_convert_reader_reads_regions_without_process_group(tmp_path):
    tensors = _tensors()
    ckpt = _write_checkpoint(tmp_path, 5, tensors)
    reader = DistCheckpointReader(ckpt)
    assert reader.shape(llama.QKV) == (2, 16, 8)
    assert torch.equal(reader.read(llama.QKV), tensors[llama.QKV])
    assert torch.equal(reader.read(llama.QKV, index=1), tensors[llama.QKV][1])
    assert torch.equal(reader.read(llama.EMBEDDING, rows=10), tensors[llama.EMBEDDING][:10])
    with pytest.raises(ValueError, match="outside"):
        reader.read(llama.QKV, index=2)
    with pytest.raises(ValueError, match="holds no tensor"):
        reader.read("decoder.nothing")


def test_convert_reader_refuses_other_backends(tmp_path):
    ckpt = _write_checkpoint(tmp_path, 1, _tensors(), backend="zarr")
    with pytest.raises(ValueError, match="zarr"):
        DistCheckpointReader(ckpt)
    with pytest.raises(ValueError, match="no metadata.json"):
        DistCheckpointReader(tmp_path)


def test_convert_resolves_run_dirs_iterations_and_latest(tmp_path):
    first = _write_checkpoint(tmp_path, 1, _tensors())
    second = _write_checkpoint(tmp_path, 2, _tensors())
    assert resolve_checkpoint_dir(tmp_path) == second
    assert resolve_checkpoint_dir(tmp_path / "checkpoints") == second
    assert resolve_checkpoint_dir(tmp_path, iteration=1) == first
    assert resolve_checkpoint_dir(first) == first
    with pytest.raises(ValueError, match="available: \\['iter_0000001', 'iter_0000002'\\]"):
        resolve_checkpoint_dir(tmp_path, iteration=3)
    (tmp_path / "checkpoints" / "latest").write_text("iter_0000009\n")
    with pytest.raises(ValueError, match="no complete checkpoint"):
        resolve_checkpoint_dir(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        resolve_checkpoint_dir(tmp_path / "missing")


def _exported(path: Path) -> dict[str, torch.Tensor]:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    tensors = {}
    for file in set(index["weight_map"].values()):
        tensors.update(load_file(path / file))
    assert set(tensors) == set(index["weight_map"])
    return tensors


@pytest.mark.parametrize("untied", [True, False])
def test_convert_export_maps_every_tensor(tmp_path, untied):
    tensors = _tensors(untied)
    model = {**MODEL, "untie_embeddings_and_output_weights": untied, "apply_layernorm_1p": True}
    _write_checkpoint(tmp_path / "run", 3, tensors, model)
    out = convert_to_hf(tmp_path / "run", tmp_path / "hf", dtype="bf16", max_shard_size=600)
    hf = _exported(out)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    assert all(t.dtype == torch.bfloat16 for t in hf.values())
    bf16 = lambda t: t.to(torch.bfloat16)  # noqa: E731
    assert torch.equal(hf[llama.HF_EMBEDDING], bf16(tensors[llama.EMBEDDING][:10]))
    assert (llama.HF_LM_HEAD in hf) == untied
    if untied:
        assert torch.equal(hf[llama.HF_LM_HEAD], bf16(tensors[llama.OUTPUT_LAYER][:10]))
    # apply_layernorm_1p stores gamma - 1: the export adds the 1 back.
    assert torch.equal(hf[llama.HF_FINAL_NORM], bf16(tensors[llama.FINAL_NORM] + 1))
    layer1 = "model.layers.1."
    assert torch.equal(hf[layer1 + "input_layernorm.weight"], bf16(tensors[llama.QKV_NORM][1] + 1))
    q, k, v = llama.split_qkv(tensors[llama.QKV][1], llama.AttentionShape(4, 2, 2))
    assert torch.equal(hf[layer1 + "self_attn.k_proj.weight"], bf16(k))
    assert torch.equal(hf[layer1 + "mlp.up_proj.weight"], bf16(tensors[llama.FC1][1][12:]))
    assert torch.equal(hf[layer1 + "mlp.down_proj.weight"], bf16(tensors[llama.FC2][1]))
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is (not untied)
    assert config["vocab_size"] == 10 and config["num_key_value_heads"] == 2
    assert config["dtype"] == "bfloat16"
    assert (out / "generation_config.json").is_file()


@pytest.mark.parametrize(
    "extra,model_change,message",
    [
        ({"decoder.layers.self_attention.linear_qkv.bias": torch.zeros(2, 16)}, {}, "biases"),
        ({"embedding.position_embeddings.weight": torch.zeros(16, 8)}, {}, "absolute position"),
        ({"decoder.layers.mlp.experts.weight1": torch.zeros(2, 8)}, {}, "mixture-of-experts"),
        ({"decoder.layers.mlp.mystery.weight": torch.zeros(2, 8)}, {}, "does not know"),
        ({}, {"normalization": "LayerNorm"}, "normalization='LayerNorm'"),
        ({}, {"add_bias_linear": True}, "add_bias_linear"),
        ({}, {"position_embedding_type": "learned_absolute"}, "learned_absolute"),
        ({}, {"some_new_switch": 3}, "unknown model fields"),
        ({}, {"ffn_hidden_size": 16}, "does not match its config.yaml"),
        ({}, {"vocab_size": 17}, "at least 17 rows"),
    ],
)
def test_convert_export_refuses_what_llama_cannot_represent(tmp_path, extra, model_change, message):
    _write_checkpoint(tmp_path / "run", 1, {**_tensors(), **extra}, {**MODEL, **model_change})
    with pytest.raises(ValueError, match=message):
        convert_to_hf(tmp_path / "run", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    assert not list(tmp_path.glob(".hf.tmp-*"))


def test_convert_export_refuses_non_empty_output_and_replaces_with_overwrite(tmp_path):
    _write_checkpoint(tmp_path / "run", 1, _tensors())
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "old.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        convert_to_hf(tmp_path / "run", tmp_path / "hf")
    convert_to_hf(tmp_path / "run", tmp_path / "hf", overwrite=True)
    assert not (tmp_path / "hf" / "old.txt").exists()
    assert (tmp_path / "hf" / "config.json").is_file()


def test_convert_sharded_writer_plans_shards_and_index(tmp_path):
    shapes = [("a", (10,)), ("b", (20,)), ("c", (5,)), ("d", (30,))]
    writer = ShardedSafetensorsWriter(tmp_path, shapes, torch.float32, max_shard_size=100)
    for name, shape in reversed(shapes):  # shards are written once complete, in any order
        writer.add(name, torch.full(shape, float(len(name))))
    files = writer.finish()
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 4 * 65
    assert index["weight_map"] == {"a": files[0], "b": files[1], "c": files[1], "d": files[2]}
    with pytest.raises(ValueError, match="shape"):
        ShardedSafetensorsWriter(tmp_path, shapes, torch.float32, 100).add("a", torch.zeros(3))


@pytest.mark.parametrize(
    "text,size", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("1000", 1000)]
)
def test_convert_parse_size(text, size):
    assert parse_size(text) == size


def test_convert_parse_size_rejects_garbage():
    with pytest.raises(ValueError, match="5GB"):
        parse_size("five gigs")


def test_convert_reads_a_training_run_config_and_its_relative_tokenizer(tmp_path, monkeypatch):
    """config.yaml as the training loop writes it (every section), tokenizer path relative."""
    from megatron_ext.config.loader import to_dict
    from megatron_ext.convert.run_files import find_tokenizer_dir, run_model
    from megatron_ext.models.config import ModelConfig
    from megatron_ext.training.experiment import ExperimentConfig, TokenizerConfig

    experiment = ExperimentConfig(
        run_dir="runs/tiny",
        model=ModelConfig(**MODEL),
        tokenizer=TokenizerConfig(
            tokenizer_type="SentencePieceTokenizer", tokenizer_model="runs/demo/tokenizer"
        ),
    )
    config = to_dict(experiment)
    start = tmp_path / "work"
    ckpt = _write_checkpoint(start / "runs" / "tiny", 7, _tensors())
    (ckpt / "config.yaml").write_text(yaml.safe_dump(config))
    (start / "runs" / "demo" / "tokenizer").mkdir(parents=True)
    assert run_model(config, ckpt / "config.yaml").config == ModelConfig(**MODEL)
    monkeypatch.chdir(tmp_path)  # not where training ran: found from run_dir
    assert find_tokenizer_dir(ckpt, config) == start / "runs" / "demo" / "tokenizer"
    config["tokenizer"]["tokenizer_model"] = "runs/elsewhere"
    with pytest.raises(ValueError, match="runs/elsewhere, which does not exist"):
        find_tokenizer_dir(ckpt, config)


@pytest.mark.parametrize("layout", ["safetensors_index", "bin", "bin_index"])
def test_convert_hf_weights_reads_every_file_layout(tmp_path, layout):
    from safetensors.torch import save_file

    from megatron_ext.convert.hf_files import HFWeights

    tensors = {"a.weight": torch.arange(6.0).view(2, 3), "b.weight": torch.ones(4)}
    if layout == "bin":
        torch.save(tensors, tmp_path / "pytorch_model.bin")
    else:
        files = {}
        for i, (name, tensor) in enumerate(tensors.items()):
            file = f"part{i}.safetensors" if layout == "safetensors_index" else f"part{i}.bin"
            if layout == "safetensors_index":
                save_file({name: tensor}, tmp_path / file)
            else:
                torch.save({name: tensor}, tmp_path / file)
            files[name] = file
        index = (
            "model.safetensors.index.json"
            if layout == "safetensors_index"
            else ("pytorch_model.bin.index.json")
        )
        (tmp_path / index).write_text(json.dumps({"weight_map": files}))
    weights = HFWeights(tmp_path)
    assert sorted(weights.names()) == sorted(tensors)
    assert all(torch.equal(weights.get(n), t) for n, t in tensors.items())
    with pytest.raises(ValueError, match="holds no tensor"):
        weights.get("c.weight")


def test_convert_hf_weights_reports_missing_files(tmp_path):
    from megatron_ext.convert.hf_files import HFWeights

    with pytest.raises(ValueError, match="no model.safetensors"):
        HFWeights(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "gone.safetensors"}})
    )
    with pytest.raises(ValueError, match="gone.safetensors, which is missing"):
        HFWeights(tmp_path)
