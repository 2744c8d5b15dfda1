"""Build the scoring graph directly from checkpoint weights, with onnxruntime's fused ops.

Rather than tracing PyTorch and pattern-matching fusions afterwards, the decoder is written here op by op
(in the manner of onnxruntime-genai's model builder): SimplifiedLayerNormalization and
SkipSimplifiedLayerNormalization for the RMS norms, RotaryEmbedding with a cos/sin cache covering every
position the model supports (packed rows need arbitrary position ids, which traced caches do not allow),
MultiHeadAttention fed an additive bias, QKV and gate/up projections merged into single MatMuls. The
graph is the same on every execution provider; the fp16 variant keeps the final norm and the head in
fp32. Weights stream from the checkpoint one tensor at a time into the external data file, so no model
copy is ever held in memory.

The graph contract (docs/graph-contract.md):
  inputs   input_ids [B, S] int64, position_ids [B, S] int64, attn_end [B, S] int64,
           step_positions [B, K] int64
  output   step_scores [B, K] float32
Token i of a row may attend to token j iff j <= i < attn_end[j]: with rows laid out in depth-first order
of a prefix tree, attn_end[j] is the end of j's subtree, which expresses causal rows, several sequences
packed into a row and shared prefixes with branches in one int per token.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from stepscore.errors import ExportError
from stepscore.runtime.bundle import INPUTS, OUTPUTS, Dimensions, HeadSpec, Precision

OPSET = 21
MS_DOMAIN = "com.microsoft"
# Tensors at least this large go to the external data file when one is used.
_EXTERNAL_MIN_BYTES = 1024
# External data offsets aligned to the page size let onnxruntime memory-map the weights.
_ALIGN = 4096
# Models larger than this keep their weights in `model.onnx.data` (smaller ones: one self-contained file).
EXTERNAL_DATA_BYTES = 256 << 20


@dataclass(frozen=True)
class DecoderSpec(Dimensions):
    """A Llama-style decoder (Llama, Mistral, Qwen2, Qwen3): its sizes, and the architecture's variations."""

    rms_norm_eps: float
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool


@dataclass(frozen=True)
class HeadWeights:
    """The read-out, already reduced to what the graph needs (float32)."""

    spec: HeadSpec
    layers: tuple[tuple[npt.NDArray[np.float32], npt.NDArray[np.float32] | None], ...]  # (W [in, out], b)


WeightFn = Callable[[str], npt.NDArray[np.float32]]


class _Writer:
    """Collects nodes and initializers; streams large initializers to the external data file."""

    def __init__(self, dtype: int, data_path: Path | None) -> None:
        self.dtype = dtype
        self.np_dtype: Any = np.float16 if dtype == TensorProto.FLOAT16 else np.float32
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.data_path = data_path
        self._data = data_path.open("wb") if data_path else None
        self._offset = 0
        self.num_parameters = 0

    def close(self) -> None:
        if self._data:
            self._data.close()

    def weight(self, name: str, array: npt.NDArray[Any], dtype: Any | None = None, count: bool = True) -> str:
        # converts (fp16) or reuses (fp32, already contiguous) without a needless copy; not
        # np.ascontiguousarray, which turns 0-d scalars into 1-d arrays
        arr = np.asarray(array, dtype=dtype if dtype is not None else self.np_dtype, order="C")
        if arr.dtype == np.float16 and array.dtype != np.float16:
            if not np.isfinite(arr).all() and np.isfinite(array).all():
                raise ExportError(
                    f"weight {name} has values beyond fp16's range (max |x| = {float(np.abs(array).max()):.4g}); "
                    "export with --precision fp32"
                )
        if count:
            self.num_parameters += int(arr.size)
        if self._data is not None and arr.nbytes >= _EXTERNAL_MIN_BYTES:
            pad = (-self._offset) % _ALIGN
            if pad:
                self._data.write(b"\0" * pad)
                self._offset += pad
            arr.tofile(self._data)  # straight from the array: no bytes copy of the tensor
            tensor = TensorProto()
            tensor.name = name
            tensor.data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
            tensor.dims.extend(arr.shape)
            tensor.data_location = TensorProto.EXTERNAL
            assert self.data_path is not None
            for key, value in (
                ("location", self.data_path.name),
                ("offset", str(self._offset)),
                ("length", str(arr.nbytes)),
            ):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            self._offset += arr.nbytes
        else:
            tensor = numpy_helper.from_array(arr, name)
        self.initializers.append(tensor)
        return name

    def const(self, name: str, value: Any, dtype: Any) -> str:
        return self.weight(name, np.asarray(value, dtype=dtype), dtype=dtype, count=False)

    def node(self, op: str, inputs: list[str], name: str, outputs: int = 1, domain: str = "", **attrs: Any) -> list[str]:
        outs = [f"{name}/output_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs

    def op(self, op: str, inputs: list[str], name: str, domain: str = "", **attrs: Any) -> str:
        return self.node(op, inputs, name, 1, domain, **attrs)[0]


def build_graph(
    spec: DecoderSpec,
    weight: WeightFn,
    rope_cos_sin: tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]],
    head: HeadWeights,
    precision: Precision,
    out_dir: Path,
    graph_name: str = "model.onnx",
    external_data: bool | None = None,
) -> tuple[Path, Path | None, int]:
    """Write the graph (and its external data file) into `out_dir`.

    `weight(name)` returns a body tensor by its Hugging Face name without the `model.` prefix, as
    float32. Returns (graph path, data path or None, number of parameters).
    """
    dtype = TensorProto.FLOAT16 if precision == "fp16" else TensorProto.FLOAT
    if external_data is None:
        bytes_per = 2 if precision == "fp16" else 4
        approx = (spec.vocab_size + spec.num_layers * 12 * spec.hidden_size) * spec.hidden_size * bytes_per
        # Protobuf files cannot exceed 2 GB, and weights inside the graph file are all held in memory
        # until it is written: past a small size they stream to the data file instead.
        external_data = approx > EXTERNAL_DATA_BYTES
    data_path = out_dir / f"{graph_name}.data" if external_data else None
    w = _Writer(dtype, data_path)
    try:
        _build(w, spec, weight, rope_cos_sin, head)
    finally:
        w.close()

    inputs = [
        helper.make_tensor_value_info(INPUTS[0], TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info(INPUTS[1], TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info(INPUTS[2], TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info(INPUTS[3], TensorProto.INT64, ["batch", "steps"]),
    ]
    outputs = [helper.make_tensor_value_info(OUTPUTS[0], TensorProto.FLOAT, ["batch", "steps"])]
    graph = helper.make_graph(w.nodes, "stepscore", inputs, outputs, w.initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
        producer_name="stepscore",
    )
    model.ir_version = 10
    path = out_dir / graph_name
    onnx.save_model(model, str(path))
    return path, data_path, w.num_parameters


def _build(
    w: _Writer,
    spec: DecoderSpec,
    weight: WeightFn,
    rope: tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]],
    head: HeadWeights,
) -> None:
    _H, N, KV, D = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
    i64 = np.int64
    input_ids, position_ids, attn_end, step_positions = INPUTS

    # --- attention bias from attn_end: allowed(i, j) = j <= i < attn_end[j] ------------------------
    seq_len = w.op("Gather", [w.op("Shape", [input_ids], "/mask/Shape"), w.const("/mask/one", 1, i64)], "/mask/seq_len", axis=0)
    arange = w.op("Range", [w.const("/mask/zero", 0, i64), seq_len, w.const("/mask/step", 1, i64)], "/mask/Range")
    q_idx = w.op("Reshape", [arange, w.const("/mask/q_shape", [1, -1, 1], i64)], "/mask/q_idx")
    k_idx = w.op("Reshape", [arange, w.const("/mask/k_shape", [1, 1, -1], i64)], "/mask/k_idx")
    causal = w.op("LessOrEqual", [k_idx, q_idx], "/mask/causal")
    end_k = w.op("Unsqueeze", [attn_end, w.const("/mask/axis1", [1], i64)], "/mask/end_k")
    inside = w.op("Less", [q_idx, end_k], "/mask/inside")
    allowed = w.op("And", [causal, inside], "/mask/allowed")
    neg = float(np.finfo(w.np_dtype).min)
    bias3 = w.op(
        "Where", [allowed, w.const("/mask/zero_f", 0.0, w.np_dtype), w.const("/mask/neg_f", neg, w.np_dtype)], "/mask/Where"
    )
    attn_bias = w.op("Unsqueeze", [bias3, w.const("/mask/axis1b", [1], i64)], "/mask/attn_bias")  # [B, 1, S, S]

    cos_cache = w.weight("/model/rotary/cos_cache", rope[0], count=False)
    sin_cache = w.weight("/model/rotary/sin_cache", rope[1], count=False)

    hidden = w.op(
        "Gather",
        [w.weight("model.embed_tokens.weight", weight("embed_tokens.weight")), input_ids],
        "/model/embed_tokens/Gather",
        axis=0,
    )

    def linear(x: str, prefix: str, names: list[str], bias: bool) -> str:
        # HF Linear stores [out, in]; MatMul wants [in, out]. Merged projections concatenate outputs.
        mat = np.concatenate([weight(f"{prefix}.{n}.weight") for n in names], axis=0).T
        merged = f"model.{prefix}.{'_'.join(names)}"
        y = w.op("MatMul", [x, w.weight(f"{merged}.weight", mat)], f"/model/{prefix}/{'_'.join(names)}/MatMul")
        if bias:
            vec = np.concatenate([weight(f"{prefix}.{n}.bias") for n in names], axis=0)
            y = w.op("Add", [y, w.weight(f"{merged}.bias", vec)], f"/model/{prefix}/{'_'.join(names)}/Add")
        return y

    def head_norm(x: str, prefix: str, heads: int) -> str:
        # Qwen3's per-head RMS norm of q and k, applied before the rotary embedding.
        shaped = w.op("Reshape", [x, w.const(f"/model/{prefix}/shape4", [0, 0, heads, D], i64)], f"/model/{prefix}/Reshape")
        gamma = w.weight(f"model.{prefix}.weight", weight(f"{prefix}.weight"))
        normed = w.op(
            "SimplifiedLayerNormalization",
            [shaped, gamma],
            f"/model/{prefix}/SimplifiedLayerNormalization",
            axis=-1,
            epsilon=spec.rms_norm_eps,
        )
        return w.op("Reshape", [normed, w.const(f"/model/{prefix}/shape3", [0, 0, heads * D], i64)], f"/model/{prefix}/Flatten")

    residual = hidden
    mlp_out: str | None = None
    for layer in range(spec.num_layers):
        p = f"layers.{layer}"
        ln1 = w.weight(f"model.{p}.input_layernorm.weight", weight(f"{p}.input_layernorm.weight"))
        if mlp_out is None:
            x = w.op(
                "SimplifiedLayerNormalization",
                [hidden, ln1],
                f"/model/{p}/input_layernorm/SimplifiedLayerNorm",
                axis=-1,
                epsilon=spec.rms_norm_eps,
            )
        else:
            x, _, _, residual = w.node(
                "SkipSimplifiedLayerNormalization",
                [mlp_out, residual, ln1],
                f"/model/{p}/input_layernorm/SkipSimplifiedLayerNorm",
                outputs=4,
                domain=MS_DOMAIN,
                epsilon=spec.rms_norm_eps,
            )

        # attention
        a = f"{p}.self_attn"
        qkv = linear(x, a, ["q_proj", "k_proj", "v_proj"], spec.qkv_bias)
        q, k, v = w.node(
            "Split", [qkv, w.const(f"/model/{a}/split", [N * D, KV * D, KV * D], i64)], f"/model/{a}/Split", outputs=3, axis=-1
        )
        if spec.qk_norm:
            q = head_norm(q, f"{a}.q_norm", N)
            k = head_norm(k, f"{a}.k_norm", KV)
        q = w.op(
            "RotaryEmbedding",
            [q, position_ids, cos_cache, sin_cache],
            f"/model/{a}/q_rotary",
            domain=MS_DOMAIN,
            num_heads=N,
            interleaved=0,
        )
        k = w.op(
            "RotaryEmbedding",
            [k, position_ids, cos_cache, sin_cache],
            f"/model/{a}/k_rotary",
            domain=MS_DOMAIN,
            num_heads=KV,
            interleaved=0,
        )
        if KV != N:
            # MultiHeadAttention wants as many K/V heads as query heads: repeat each KV head N/KV times.
            group = N // KV
            shape5 = w.const(f"/model/{a}/kv_shape5", [0, 0, KV, 1, D], i64)
            reps = w.const(f"/model/{a}/kv_expand", [1, 1, 1, group, 1], i64)
            shape3 = w.const(f"/model/{a}/kv_shape3", [0, 0, N * D], i64)
            k = w.op(
                "Reshape",
                [
                    w.op("Expand", [w.op("Reshape", [k, shape5], f"/model/{a}/k_split_heads"), reps], f"/model/{a}/k_repeat"),
                    shape3,
                ],
                f"/model/{a}/k_merge_heads",
            )
            v = w.op(
                "Reshape",
                [
                    w.op("Expand", [w.op("Reshape", [v, shape5], f"/model/{a}/v_split_heads"), reps], f"/model/{a}/v_repeat"),
                    shape3,
                ],
                f"/model/{a}/v_merge_heads",
            )
        attn = w.op(
            "MultiHeadAttention",
            [q, k, v, "", "", attn_bias],
            f"/model/{a}/MultiHeadAttention",
            domain=MS_DOMAIN,
            num_heads=N,
            scale=1.0 / math.sqrt(D),
        )
        o = linear(attn, f"{a}", ["o_proj"], spec.o_bias)

        ln2 = w.weight(f"model.{p}.post_attention_layernorm.weight", weight(f"{p}.post_attention_layernorm.weight"))
        x, _, _, residual = w.node(
            "SkipSimplifiedLayerNormalization",
            [o, residual, ln2],
            f"/model/{p}/post_attention_layernorm/SkipSimplifiedLayerNorm",
            outputs=4,
            domain=MS_DOMAIN,
            epsilon=spec.rms_norm_eps,
        )

        # MLP: silu(gate) * up, with gate and up in one MatMul; QuickGelu(alpha=1) is x * sigmoid(x).
        m = f"{p}.mlp"
        gate_up = linear(x, m, ["gate_proj", "up_proj"], spec.mlp_bias)
        gate, up = w.node(
            "Split",
            [gate_up, w.const(f"/model/{m}/split", [spec.intermediate_size] * 2, i64)],
            f"/model/{m}/Split",
            outputs=2,
            axis=-1,
        )
        act = w.op("QuickGelu", [gate], f"/model/{m}/act_fn/QuickGelu", domain=MS_DOMAIN, alpha=1.0)
        mlp_out = linear(w.op("Mul", [act, up], f"/model/{m}/Mul"), m, ["down_proj"], spec.mlp_bias)

    assert mlp_out is not None
    # --- read-out: gather the step positions first, then final norm and head in fp32 -------------------
    idx = w.op("Unsqueeze", [step_positions, w.const("/readout/axis2", [2], i64)], "/readout/idx")
    sel_mlp = w.op("GatherND", [mlp_out, idx], "/readout/gather_mlp", batch_dims=1)
    sel_res = w.op("GatherND", [residual, idx], "/readout/gather_residual", batch_dims=1)
    if w.dtype != TensorProto.FLOAT:
        sel_mlp = w.op("Cast", [sel_mlp], "/readout/cast_mlp", to=TensorProto.FLOAT)
        sel_res = w.op("Cast", [sel_res], "/readout/cast_residual", to=TensorProto.FLOAT)
    summed = w.op("Add", [sel_mlp, sel_res], "/readout/residual_add")
    final = w.op(
        "SimplifiedLayerNormalization",
        [summed, w.weight("model.norm.weight", weight("norm.weight"), dtype=np.float32)],
        "/model/norm/SimplifiedLayerNorm",
        axis=-1,
        epsilon=spec.rms_norm_eps,
    )
    _head(w, final, head)


def _head(w: _Writer, hidden: str, head: HeadWeights) -> None:
    x = hidden
    n = len(head.layers)
    for i, (mat, bias) in enumerate(head.layers):
        x = w.op("MatMul", [x, w.weight(f"head.{i}.weight", mat, dtype=np.float32)], f"/head/{i}/MatMul")
        if bias is not None:
            x = w.op("Add", [x, w.weight(f"head.{i}.bias", bias, dtype=np.float32)], f"/head/{i}/Add")
        if i < n - 1:
            x = w.op("Relu", [x], f"/head/{i}/Relu")
    rule = head.spec.score
    i64 = np.int64
    if rule in ("softmax1", "pair_softmax0"):
        probs = w.op("Softmax", [x], "/head/Softmax", axis=-1)
        index = 1 if rule == "softmax1" else 0
        score = w.op("Gather", [probs, w.const("/head/index", index, i64)], "/head/select", axis=-1)
    else:
        squeezed = w.op("Squeeze", [x, w.const("/head/axis", [-1], i64)], "/head/Squeeze")
        score = w.op("Sigmoid", [squeezed], "/head/Sigmoid") if rule == "sigmoid" else squeezed
    w.nodes.append(helper.make_node("Identity", [score], [OUTPUTS[0]], name="/head/output"))


def fused_op_counts(path: Path) -> dict[str, int]:
    """Op histogram of a graph (without loading external weights)."""
    model = onnx.load(str(path), load_external_data=False)
    return dict(Counter(node.op_type for node in model.graph.node))
