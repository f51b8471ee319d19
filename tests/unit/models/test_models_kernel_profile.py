"""benchmarks/kernel_profile.py: kernel names into categories, and the per-step summary."""

from __future__ import annotations

import pytest

from benchmarks.kernel_profile import categorise, markdown_lines, summarise


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
