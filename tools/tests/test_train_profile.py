"""tools/train_profile.py without a GPU: kernels sorted into what they do by their names."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import train_profile as TP  # noqa: E402

# names as the profiler reported them for a ResNet-50 step on an H100
NAMES = {
    "void convolve_common_engine_float_NHWC<__nv_bfloat16, __nv_bfloat16, 128, 5, 5, 3, 3, 3, true>":
        "cuDNN / cuBLAS conv, matmul",
    "sm90_xmma_wgrad_indexed_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize64x64x64": "cuDNN / cuBLAS conv, matmul",
    "void cutlass::Kernel2<cutlass_80_tensorop_s16816gemm_bf16_64x64_64x6_nt_align8>": "cuDNN / cuBLAS conv, matmul",
    "conv_kernel": "fxsparse conv op",
    "triton_poi_fused__to_copy__unsafe_view_add_arange_bitwise_and_clone_index_put_mul_ones_permute_remainder_view_where_62":
        "kept-weight slice (scatter)",
    "triton_poi_fused__to_copy_add_bitwise_not_index_select_masked_fill_relu_scalar_tensor_squeeze_threshold_backward_view_24":
        "gradient expansion to full size",
    "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::TensorListMetadata<2>>": "optimizer",
    "Memcpy DtoD (Device -> Device)": "memory copy / fill",
    "triton_red_fused__native_batch_norm_legit_functional_14": "batch norm",
    "triton_poi_fused_add_max_pool2d_with_indices_max_pool2d_with_indices_backward_58": "other generated kernels",
    "some_vendor_kernel": "other",
}


def test_each_kernel_gets_its_category():
    for name, category in NAMES.items():
        assert TP.kernel_category(name) == category, name


def test_categories_add_up_to_the_kernel_time():
    per_kernel = {name: 0.5 + i for i, name in enumerate(NAMES)}
    cats = TP.by_category(per_kernel)
    assert abs(sum(cats.values()) - sum(per_kernel.values())) < 1e-9
    assert cats["cuDNN / cuBLAS conv, matmul"] == 0.5 + 1.5 + 2.5
