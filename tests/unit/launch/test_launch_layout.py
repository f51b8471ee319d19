import pytest

from megatron_ext.launch.layout import (
    ParallelLayout,
    advise_layout,
    config_path_from_args,
    read_parallel_layout,
)


def test_reads_parallel_section_and_command_line_overrides(tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text("model: {num_layers: 2}\nparallel:\n  tensor_model_parallel_size: 4\n")
    layout = read_parallel_layout(str(config))
    assert (layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size) == (4, 1)
    args = ["--config", str(config), "--parallel.pipeline_model_parallel_size=2"]
    assert config_path_from_args(args) == str(config)
    layout = read_parallel_layout(config_path_from_args(args), args)
    assert (layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size) == (4, 2)
    assert "--parallel.pipeline_model_parallel_size=2" in layout.source


def test_bad_values_are_clear_errors(tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text("parallel:\n  tensor_model_parallel_size: two\n")
    with pytest.raises(ValueError, match="parallel.tensor_model_parallel_size"):
        read_parallel_layout(str(config))
    with pytest.raises(ValueError, match="positive integer"):
        read_parallel_layout(None, ["--parallel.tensor_model_parallel_size=0"])


def test_tp_inside_nvlink_and_divisible_world_is_fine():
    notes, warnings = advise_layout(
        ParallelLayout(8, 2), nnodes=4, gpus_per_node=8, nvlink_domain_size=8
    )
    assert warnings == []
    assert notes == [
        "world size 32 = TP 8 x PP 2 x DP 2",
        "TP=8 stays inside one NVLink domain of 8 GPUs",
    ]


def test_tp_across_nodes_warns():
    _, warnings = advise_layout(
        ParallelLayout(16, 1), nnodes=4, gpus_per_node=8, nvlink_domain_size=8
    )
    assert len(warnings) == 1 and "crosses the inter-node network" in warnings[0]


def test_tp_not_dividing_node_warns():
    _, warnings = advise_layout(
        ParallelLayout(3, 1), nnodes=3, gpus_per_node=8, nvlink_domain_size=8
    )
    assert any("straddle two nodes" in w for w in warnings)


def test_world_size_not_divisible_warns():
    _, warnings = advise_layout(
        ParallelLayout(8, 3), nnodes=4, gpus_per_node=8, nvlink_domain_size=8
    )
    assert warnings[0].startswith("world size 32 (4 nodes x 8) is not divisible by TP x PP")


def test_pcie_only_and_small_nvlink_domains_warn():
    _, pcie = advise_layout(ParallelLayout(2, 1), nnodes=1, gpus_per_node=4, nvlink_domain_size=1)
    assert "over PCIe" in pcie[0]
    _, pairs = advise_layout(ParallelLayout(4, 1), nnodes=1, gpus_per_node=4, nvlink_domain_size=2)
    assert "does not fit the NVLink domains of 2" in pairs[0]
    _, cpu = advise_layout(ParallelLayout(1, 1), nnodes=2, gpus_per_node=1, nvlink_domain_size=None)
    assert cpu == []
