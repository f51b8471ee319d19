"""benchmarks/kernel_profile.py: kernel names into categories, the per-step summary and the idle
time between kernels."""

from __future__ import annotations

import pytest
import torch

from benchmarks.kernel_profile import (
    categorise,
    idle_gaps,
    markdown_lines,
    profile_steps,
    short_name,
    summarise,
)


@pytest.mark.parametrize(
    "name,category",
    [
        ("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT", "gemm"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "gemm"),
        ("cutlass3x_sm90_tensorop_s64x128x16gemm_bf16_bf16_f32", "gemm"),
        ("aten::mm", "gemm"),
        (
            "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel",
            "attention",
        ),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention"),
        (
            "void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 2>>",
            "optimizer",
        ),
        ("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0", "triton"),
        ("_rms_norm_forward_kernel", "elementwise/reduction"),
        ("Memcpy DtoD (Device -> Device)", "copy"),
        (
            "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>",
            "copy",
        ),
        (
            "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>",
            "elementwise/reduction",
        ),
        ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "communication"),
        ("void at::native::index_elementwise_kernel_gather", "elementwise/reduction"),
        ("some_unknown_kernel", "other"),
    ],
)
def test_categorise_real_kernel_names(name, category):
    assert categorise(name) == category


def test_summarise_divides_by_steps_and_ranks():
    times = {"nvjet_a": 4000.0, "triton_poi_fused_b": 1000.0, "nvjet_c": 2000.0, "misc": 1000.0}
    out = summarise(times, steps=2, top=2)
    assert out["total_ms"] == 4.0
    assert out["categories_ms"] == {"gemm": 3.0, "triton": 0.5, "other": 0.5}
    assert list(out["categories_ms"]) == ["gemm", "triton", "other"]
    assert out["top_kernels_ms"] == [["nvjet_a", 2.0], ["nvjet_c", 1.0]]
    with pytest.raises(ValueError, match="steps"):
        summarise(times, steps=0)


def test_markdown_lists_profiled_runs_only():
    profile = summarise({"nvjet_a": 3000.0, "flash_fwd": 1000.0}, steps=1)
    records = [
        {"variant": "megatron_ext", "shape": "4096x2", "step_s_mean": 0.15, "profile": profile},
        {"variant": "hf_eager", "shape": "4096x2", "status": "skipped"},
    ]
    text = "\n".join(markdown_lines(records))
    assert "| megatron_ext | 4096x2 | 150.0 | 4.0 | 3.0 | 1.0 |" in text
    assert "hf_eager" not in text
    assert "- 3.00 [gemm] `nvjet_a`" in text
    assert markdown_lines(records[1:]) == []


def test_idle_gaps_groups_gaps_by_their_neighbours_and_ignores_overlaps():
    # Two steps: a 0.5 ms gap before each update (host behind), 0.1 ms between the steps, and an
    # overlapping kernels on a second stream that must not count as idle time.
    intervals = []
    for t0 in (0.0, 10_000.0):
        intervals += [
            (t0, t0 + 4000.0, "gemm"),
            (t0 + 500.0, t0 + 1500.0, "inside_the_gemm"),
            (t0 + 2000.0, t0 + 4200.0, "side_stream"),
            (t0 + 4200.0, t0 + 5000.0, "norm"),
            (t0 + 5500.0, t0 + 9900.0, "update"),
        ]
    out = idle_gaps(intervals, steps=2)
    assert out["span_ms"] == pytest.approx(19.9 / 2)
    assert out["idle_ms"] == pytest.approx((0.5 * 2 + 0.1) / 2)
    assert out["gaps"] == [["norm", "update", 1.0, 0.5], ["update", "gemm", 0.5, 0.05]]
    assert idle_gaps([], steps=1) == {"span_ms": 0.0, "idle_ms": 0.0, "gaps": []}
    with pytest.raises(ValueError, match="steps"):
        idle_gaps(intervals, steps=0)


def test_profile_steps_on_cpu_reports_operator_time_and_gaps():
    weight = torch.randn(64, 64, requires_grad=True)

    def step(index: int) -> float:
        loss = (torch.randn(8, 64) @ weight).square().mean()
        loss.backward()
        return float(loss)

    out = profile_steps(step, first_index=0, steps=2, device="cpu")
    assert out["steps"] == 2 and out["total_ms"] > 0
    idle = out["idle"]
    assert 0 <= idle["idle_ms"] <= idle["span_ms"] and idle["span_ms"] > 0
    records = [{"variant": "megatron_ext", "shape": "8x1", "step_s_mean": 0.01, "profile": out}]
    text = "\n".join(markdown_lines(records))
    assert "Idle time between kernels" in text and "- megatron_ext at 8x1:" in text


def test_short_names_keep_kernels_of_one_template_apart():
    fused = (
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::"
        "(anonymous namespace)::FusedOptimizerTensorListMetadata<4>, at::native::(anonymous "
        "namespace)::FusedAdamMathFunctor<float, 4, (at::native::ADAM_MODE)1, false>>"
    )
    norm = (
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::"
        "(anonymous namespace)::TensorListMetadata<1>, at::native::LpNormFunctor<float, "
        "(at::native::NormType)1, float, 1, 1, 0>, float>"
    )
    assert short_name(fused) != short_name(norm)
    assert short_name(norm).startswith("multi_tensor_apply_kernel<TensorListMetadata<1>, LpNorm")
    assert short_name("triton_poi_fused_add_0") == "triton_poi_fused_add_0"
