"""tools/convert_from_hf.py and tools/convert_to_hf.py end to end on a tiny tied-embedding Llama.

HF -> megatron_ext (for TP2) -> HF through the command lines is bit-identical; the megatron_ext
model built from the imported checkpoint gives the HF model's logits; bad input ends with a
one-line error and exit status 1.
"""

from __future__ import annotations

import importlib.util
import json
import os
import stat
from pathlib import Path

import pytest
import torch
import yaml

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("convert_tools") / "hf"
    model.save_pretrained(path)
    return path, model


@pytest.mark.timeout(300)
def test_convert_tools_roundtrip_and_megatron_logits(hf_model, tmp_path, capsys):
    from safetensors.torch import load_file

    from megatron_ext.convert.megatron_model import (
        load_checkpoint_model,
        logits,
        single_process_megatron,
    )

    path, model = hf_model
    run = tmp_path / "run"
    assert (
        _tool("convert_from_hf")(["--hf-dir", str(path), "--output", str(run), "--target-tp", "2"])
        == 0
    )
    ckpt = run / "checkpoints" / "iter_0000000"
    assert (run / "checkpoints" / "latest").read_text().strip() == ckpt.name
    for name in (
        "metadata.json",
        "common.pt",
        "config.yaml",
        "run_state.json",
        "checkpoint.json",
        "versions.json",
    ):
        assert (ckpt / name).is_file(), name
    section = yaml.safe_load((ckpt / "config.yaml").read_text())["model"]
    assert section["untie_embeddings_and_output_weights"] is False
    assert section["num_query_groups"] == 2
    assert json.loads((ckpt / "run_state.json").read_text())["step"] == 0

    shared = tmp_path / "shared"  # a group-shared directory: set-group-ID
    shared.mkdir()
    shared.chmod(0o2775)
    out = shared / "hf_back"
    umask = os.umask(0o022)
    try:
        assert _tool("convert_to_hf")(["--checkpoint", str(run), "--output", str(out)]) == 0
    finally:
        os.umask(umask)
    # As any file the user writes (not mkdtemp's 0700 / safetensors' 0600), in the group's folder.
    assert stat.S_IMODE(out.stat().st_mode) == 0o2755
    assert {stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()} == {0o644}
    original = load_file(path / "model.safetensors")
    returned = {}
    for file in out.glob("*.safetensors"):
        returned.update(load_file(file))
    assert sorted(returned) == sorted(original)
    assert all(torch.equal(returned[k], original[k]) for k in original)

    tokens = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with single_process_megatron():
        megatron, cfg = load_checkpoint_model(run)
        ours = logits(megatron, tokens)
    assert cfg.vocab_size == 300 and ours.shape[-1] == 300  # 300 = 2 x 2 x 75: no padding at TP2
    with torch.no_grad():
        theirs = model(tokens).logits
    assert (ours - theirs).abs().max().item() < 1e-4


def test_convert_tools_bad_input_is_one_line_error(hf_model, tmp_path, capsys):
    to_hf, from_hf = _tool("convert_to_hf"), _tool("convert_from_hf")
    # 2 key/value heads cannot be split over 4 tensor-parallel ranks.
    args = ["--hf-dir", str(hf_model[0]), "--output", str(tmp_path / "r4"), "--target-tp", "4"]
    assert from_hf(args) == 1
    assert "model.num_query_groups" in capsys.readouterr().err
    assert to_hf(["--checkpoint", str(tmp_path / "nothing"), "--output", str(tmp_path / "o")]) == 1
    assert "error:" in capsys.readouterr().err
    (tmp_path / "mistral").mkdir()
    (tmp_path / "mistral" / "config.json").write_text(
        json.dumps(
            {
                "model_type": "mistral",
                "hidden_size": 32,
                "num_attention_heads": 4,
                "num_hidden_layers": 2,
                "intermediate_size": 64,
                "vocab_size": 100,
            }
        )
    )
    assert from_hf(["--hf-dir", str(tmp_path / "mistral"), "--output", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "only 'llama'" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()
