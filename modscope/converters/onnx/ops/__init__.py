"""The ONNX op handlers, one module per op family; each family module's ``ops`` (an `OpSet`) lists its handlers.

A family may merge helper modules' handlers into its own ``ops`` (`nn` those of `nn_attention`, `nn_sequence`,
`nn_sampling` and `nn_resize`; `linalg` those of `deform_col2im`); `util` and `window_geometry` hold helpers shared
by several families. The compiler (`modscope.converters.onnx.compiler` and its neighbours) builds a table from
`FAMILY_MODULES` (`modscope.converters.onnx.default_table`); handlers never import the compiler.
"""

#: the op family modules whose ``ops`` make up the default table, in the order their handlers are registered.
FAMILY_MODULES = (
    "elementwise",
    "activation",
    "linalg",
    "misc",
    "shape",
    "indexing",
    "reduction",
    "sequence",
    "normalization",
    "pooling",
    "nn",
    "signal",
    "recurrent",
    "control_flow",
    "quantization",
    "detection",
    "ml",
    "ml_linear",
    "contrib_transformer",
    "contrib_quantized",
)
