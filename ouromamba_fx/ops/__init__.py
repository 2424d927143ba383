"""The vocabulary of the graphs: every ``ouromamba::*`` custom op, one family per module.

Each op is a ``torch.library`` custom op with a schema, a fake implementation (shapes for
``torch.compile``), a plain-torch ``*_ref`` twin that defines its numbers, and its kernels by
device (C++ in :mod:`ouromamba_fx.kernels.cpu`, Triton in :mod:`ouromamba_fx.kernels.triton`).
Importing this package registers all of them. Models, capture and passes use the ops of the
reference graph; the lowering rewrites them into the fused ones.

========================= =========================================== ======================
op (``ouromamba::``)      Python function                             module
========================= =========================================== ======================
quantize, dequantize      :func:`quantize`, :func:`dequantize`        :mod:`.quant`
quantize_per_token        :func:`quantize_per_token`                  :mod:`.quant`
quantize_mixed            :func:`quantize_mixed` (reference graph)    :mod:`.mixed`
mixed_fake_quant          :func:`mixed_fake_quant` (one C++ pass)     :mod:`.mixed`
outlier_mask              :func:`site_outlier_mask`                   :mod:`.mixed`
outlier_split             :func:`outlier_split`                       :mod:`.mixed`
int8_linear               :func:`int8_linear`                         :mod:`.int8_linear`
w8a8_linear               :func:`w8a8_linear`                         :mod:`.int8_linear`
w4a4o8_linear             :func:`w4a4o8_linear_masked`                :mod:`.w4a4o8_linear`
w4a4o8_linear_rt          :func:`w4a4o8_linear_detect`                :mod:`.w4a4o8_linear`
w4a4o8_linear_mixed       :func:`w4a4o8_linear_detect_requant`        :mod:`.w4a4o8_linear`
causal_conv1d_silu        :func:`causal_conv1d_silu`                  :mod:`.conv1d_silu`
causal_conv1d_silu_codes  :func:`causal_conv1d_silu_codes`            :mod:`.conv1d_silu`
selective_scan(_bwd)      :func:`selective_scan`                      :mod:`.scan`
selective_scan_cl         :func:`selective_scan_channels_last`        :mod:`.scan`
selective_scan_dt         :func:`selective_scan_dt`                   :mod:`.scan`
selective_scan_q          :func:`selective_scan_reparam`              :mod:`.scan_quant`
selective_scan_qi         :func:`selective_scan_int8_inputs`          :mod:`.scan_quant`
========================= =========================================== ======================

The qualified op names are stable (saved profiles and benchmark tables refer to them); the Python
names say what each variant does. Besides the ops, :mod:`.gemm` picks the exact integer GEMM of
this CPU, :mod:`.int8_conv2d` holds the integer Conv2d of the lowering (plain torch around it),
:mod:`.int4` packs int4 weights and :mod:`.dispatch` holds the ops' CUDA implementations
(and the switch that runs them on CPU tensors, Triton interpreted, for tests).
"""

from ouromamba_fx.ops import (conv1d_silu, dispatch, gemm, int4, int8_conv2d, int8_linear, mixed, quant, scan,
                              scan_quant, w4a4o8_linear)

__all__ = ["conv1d_silu", "dispatch", "gemm", "int4", "int8_conv2d", "int8_linear", "mixed", "quant", "scan",
           "scan_quant", "w4a4o8_linear"]
