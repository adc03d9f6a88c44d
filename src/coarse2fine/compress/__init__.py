"""Product quantisation of any model's layers (METHODS.md §2.4): k-means on weight segments
(``quantize``), layers that store codes (``layers``), applying a spec to a model (``apply``)."""

from coarse2fine.compress.apply import (
    CompressionReport,
    LayerReport,
    apply_compression_structure,
    auto_k,
    auto_spec,
    compress_model,
    compression_of,
    load_compressed_state,
    model_bytes,
    parse_layer_spec,
    state_bytes,
)
from coarse2fine.compress.layers import PQConv2d, PQLinear
from coarse2fine.compress.quantize import (
    AXES,
    MAX_K,
    LayerSpec,
    Spec,
    compression_factor,
    dequantise,
    oriented,
    pq_buffers,
    product_quantize,
    reconstruct,
    relative_error,
)

__all__ = [
    "AXES",
    "MAX_K",
    "CompressionReport",
    "LayerReport",
    "LayerSpec",
    "PQConv2d",
    "PQLinear",
    "Spec",
    "apply_compression_structure",
    "auto_k",
    "auto_spec",
    "compress_model",
    "compression_factor",
    "compression_of",
    "dequantise",
    "load_compressed_state",
    "model_bytes",
    "oriented",
    "parse_layer_spec",
    "pq_buffers",
    "product_quantize",
    "reconstruct",
    "relative_error",
    "state_bytes",
]
