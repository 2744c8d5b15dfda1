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
# Constants at least this large go to the external data file too (the rotary cache); smaller ones (shapes,
# axes) stay in the graph. Every parameter goes to the data file, whatever its size.
_EXTERNAL_MIN_BYTES = 1024
# External data offsets aligned to the page size let onnxruntime memory-map the weights.
_ALIGN = 4096


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

    def __init__(self, dtype: int, data_path: Path) -> None:
        self.dtype = dtype
        self.np_dtype: Any = np.float16 if dtype == TensorProto.FLOAT16 else np.float32
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.data_path = data_path
        self._data = data_path.open("wb")
        self._offset = 0
        self.num_parameters = 0

    def close(self) -> None:
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
        if count or arr.nbytes >= _EXTERNAL_MIN_BYTES:
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
) -> tuple[Path, Path, int]:
    """Write the graph (and its external data file) into `out_dir`.

    `weight(name)` returns a body tensor by its Hugging Face name without the `model.` prefix, as
    float32. Returns (graph path, data path, number of parameters).

    The weights always go to `<graph_name>.data`: the plain-row graph derived from this one points into
    the same file, so a bundle holds one copy of the weights; and a protobuf file cannot exceed 2 GB,
    while weights inside it would all be held in memory until it is written.
    """
    dtype = TensorProto.FLOAT16 if precision == "fp16" else TensorProto.FLOAT
    data_path = out_dir / f"{graph_name}.data"
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
    """The whole graph, stage by stage: attention bias, embedding, the layers, read-out, head."""
    d = _Decoder(w, spec, weight, rope)
    attn_bias = d.attention_bias()
    hidden = d.embed()
    residual = hidden
    mlp_out: str | None = None
    for layer in range(spec.num_layers):
        x, residual = d.input_norm(layer, hidden, mlp_out, residual)
        x, residual = d.post_attention_norm(layer, d.attention(layer, x, attn_bias), residual)
        mlp_out = d.mlp(layer, x)
    assert mlp_out is not None
    _head(w, d.readout(mlp_out, residual), head)


_I64 = np.int64


class _Decoder:
    """The decoder's stages, each writing its nodes through the writer. Node names are hierarchical
    (`/model/layers.0.self_attn/MultiHeadAttention`), initializer names are Hugging Face's."""

    def __init__(
        self, w: _Writer, spec: DecoderSpec, weight: WeightFn, rope: tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]
    ) -> None:
        self.w, self.spec, self.weight = w, spec, weight
        self.cos_sin = rope

    # -- attention bias from attn_end: allowed(i, j) = j <= i < attn_end[j] ------------------------

    def attention_bias(self) -> str:
        w = self.w
        input_ids, _, attn_end, _ = INPUTS
        seq_len = w.op(
            "Gather", [w.op("Shape", [input_ids], "/mask/Shape"), w.const("/mask/one", 1, _I64)], "/mask/seq_len", axis=0
        )
        arange = w.op("Range", [w.const("/mask/zero", 0, _I64), seq_len, w.const("/mask/step", 1, _I64)], "/mask/Range")
        q_idx = w.op("Reshape", [arange, w.const("/mask/q_shape", [1, -1, 1], _I64)], "/mask/q_idx")
        k_idx = w.op("Reshape", [arange, w.const("/mask/k_shape", [1, 1, -1], _I64)], "/mask/k_idx")
        causal = w.op("LessOrEqual", [k_idx, q_idx], "/mask/causal")
        end_k = w.op("Unsqueeze", [attn_end, w.const("/mask/axis1", [1], _I64)], "/mask/end_k")
        inside = w.op("Less", [q_idx, end_k], "/mask/inside")
        allowed = w.op("And", [causal, inside], "/mask/allowed")
        neg = float(np.finfo(w.np_dtype).min)
        zero_f, neg_f = w.const("/mask/zero_f", 0.0, w.np_dtype), w.const("/mask/neg_f", neg, w.np_dtype)
        bias3 = w.op("Where", [allowed, zero_f, neg_f], "/mask/Where")
        return w.op("Unsqueeze", [bias3, w.const("/mask/axis1b", [1], _I64)], "/mask/attn_bias")  # [B, 1, S, S]

    # -- embedding and the rotary cache ------------------------------------------------------------

    def embed(self) -> str:
        w = self.w
        # the cos/sin cache first: its initializers keep their place in the file
        self.cos_cache = w.weight("/model/rotary/cos_cache", self.cos_sin[0], count=False)
        self.sin_cache = w.weight("/model/rotary/sin_cache", self.cos_sin[1], count=False)
        table = w.weight("model.embed_tokens.weight", self.weight("embed_tokens.weight"))
        return w.op("Gather", [table, INPUTS[0]], "/model/embed_tokens/Gather", axis=0)

    # -- building blocks ---------------------------------------------------------------------------

    def linear(self, x: str, prefix: str, names: list[str], bias: bool) -> str:
        # HF Linear stores [out, in]; MatMul wants [in, out]. Merged projections concatenate outputs.
        w, weight = self.w, self.weight
        mat = np.concatenate([weight(f"{prefix}.{n}.weight") for n in names], axis=0).T
        merged = f"model.{prefix}.{'_'.join(names)}"
        y = w.op("MatMul", [x, w.weight(f"{merged}.weight", mat)], f"/model/{prefix}/{'_'.join(names)}/MatMul")
        if bias:
            vec = np.concatenate([weight(f"{prefix}.{n}.bias") for n in names], axis=0)
            y = w.op("Add", [y, w.weight(f"{merged}.bias", vec)], f"/model/{prefix}/{'_'.join(names)}/Add")
        return y

    def skip_norm(self, x: str, residual: str, gamma: str, name: str) -> tuple[str, str]:
        """(normed, new residual) = RMSNorm(x + residual), fused."""
        normed, _, _, summed = self.w.node(
            "SkipSimplifiedLayerNormalization",
            [x, residual, gamma],
            name,
            outputs=4,
            domain=MS_DOMAIN,
            epsilon=self.spec.rms_norm_eps,
        )
        return normed, summed

    # -- a layer -----------------------------------------------------------------------------------

    def input_norm(self, layer: int, hidden: str, mlp_out: str | None, residual: str) -> tuple[str, str]:
        """The layer's input norm; from the second layer on it also adds the previous MLP's output."""
        w, p = self.w, f"layers.{layer}"
        ln1 = w.weight(f"model.{p}.input_layernorm.weight", self.weight(f"{p}.input_layernorm.weight"))
        if mlp_out is None:
            x = w.op(
                "SimplifiedLayerNormalization",
                [hidden, ln1],
                f"/model/{p}/input_layernorm/SimplifiedLayerNorm",
                axis=-1,
                epsilon=self.spec.rms_norm_eps,
            )
            return x, residual
        return self.skip_norm(mlp_out, residual, ln1, f"/model/{p}/input_layernorm/SkipSimplifiedLayerNorm")

    def attention(self, layer: int, x: str, attn_bias: str) -> str:
        """Merged QKV projection, (Qwen3) q/k norms, rotary, MultiHeadAttention with the bias, o_proj."""
        w, spec = self.w, self.spec
        N, KV, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
        a = f"layers.{layer}.self_attn"
        qkv = self.linear(x, a, ["q_proj", "k_proj", "v_proj"], spec.qkv_bias)
        split = w.const(f"/model/{a}/split", [N * D, KV * D, KV * D], _I64)
        q, k, v = w.node("Split", [qkv, split], f"/model/{a}/Split", outputs=3, axis=-1)
        if spec.qk_norm:
            q = self.head_norm(q, f"{a}.q_norm", N)
            k = self.head_norm(k, f"{a}.k_norm", KV)
        q = self.rotary(q, f"/model/{a}/q_rotary", N)
        k = self.rotary(k, f"/model/{a}/k_rotary", KV)
        if KV != N:
            k, v = self.repeat_kv(k, v, a)
        attn = w.op(
            "MultiHeadAttention",
            [q, k, v, "", "", attn_bias],
            f"/model/{a}/MultiHeadAttention",
            domain=MS_DOMAIN,
            num_heads=N,
            scale=1.0 / math.sqrt(D),
        )
        return self.linear(attn, a, ["o_proj"], spec.o_bias)

    def head_norm(self, x: str, prefix: str, heads: int) -> str:
        # Qwen3's per-head RMS norm of q and k, applied before the rotary embedding.
        w, D = self.w, self.spec.head_dim
        shaped = w.op("Reshape", [x, w.const(f"/model/{prefix}/shape4", [0, 0, heads, D], _I64)], f"/model/{prefix}/Reshape")
        gamma = w.weight(f"model.{prefix}.weight", self.weight(f"{prefix}.weight"))
        normed = w.op(
            "SimplifiedLayerNormalization",
            [shaped, gamma],
            f"/model/{prefix}/SimplifiedLayerNormalization",
            axis=-1,
            epsilon=self.spec.rms_norm_eps,
        )
        shape3 = w.const(f"/model/{prefix}/shape3", [0, 0, heads * D], _I64)
        return w.op("Reshape", [normed, shape3], f"/model/{prefix}/Flatten")

    def rotary(self, x: str, name: str, heads: int) -> str:
        inputs = [x, INPUTS[1], self.cos_cache, self.sin_cache]
        return self.w.op("RotaryEmbedding", inputs, name, domain=MS_DOMAIN, num_heads=heads, interleaved=0)

    def repeat_kv(self, k: str, v: str, a: str) -> tuple[str, str]:
        # MultiHeadAttention wants as many K/V heads as query heads: repeat each KV head N/KV times.
        w, spec = self.w, self.spec
        N, KV, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
        shape5 = w.const(f"/model/{a}/kv_shape5", [0, 0, KV, 1, D], _I64)
        reps = w.const(f"/model/{a}/kv_expand", [1, 1, 1, N // KV, 1], _I64)
        shape3 = w.const(f"/model/{a}/kv_shape3", [0, 0, N * D], _I64)

        def repeat(x: str, which: str) -> str:
            heads = w.op("Reshape", [x, shape5], f"/model/{a}/{which}_split_heads")
            repeated = w.op("Expand", [heads, reps], f"/model/{a}/{which}_repeat")
            return w.op("Reshape", [repeated, shape3], f"/model/{a}/{which}_merge_heads")

        return repeat(k, "k"), repeat(v, "v")

    def post_attention_norm(self, layer: int, o: str, residual: str) -> tuple[str, str]:
        p = f"layers.{layer}"
        gamma = self.w.weight(f"model.{p}.post_attention_layernorm.weight", self.weight(f"{p}.post_attention_layernorm.weight"))
        return self.skip_norm(o, residual, gamma, f"/model/{p}/post_attention_layernorm/SkipSimplifiedLayerNorm")

    def mlp(self, layer: int, x: str) -> str:
        """silu(gate) * up, with gate and up in one MatMul; QuickGelu(alpha=1) is x * sigmoid(x)."""
        w, spec = self.w, self.spec
        m = f"layers.{layer}.mlp"
        gate_up = self.linear(x, m, ["gate_proj", "up_proj"], spec.mlp_bias)
        split = w.const(f"/model/{m}/split", [spec.intermediate_size] * 2, _I64)
        gate, up = w.node("Split", [gate_up, split], f"/model/{m}/Split", outputs=2, axis=-1)
        act = w.op("QuickGelu", [gate], f"/model/{m}/act_fn/QuickGelu", domain=MS_DOMAIN, alpha=1.0)
        return self.linear(w.op("Mul", [act, up], f"/model/{m}/Mul"), m, ["down_proj"], spec.mlp_bias)

    # -- read-out: gather the step positions first, then the final norm in fp32 ----------------------

    def readout(self, mlp_out: str, residual: str) -> str:
        w = self.w
        idx = w.op("Unsqueeze", [INPUTS[3], w.const("/readout/axis2", [2], _I64)], "/readout/idx")
        sel_mlp = w.op("GatherND", [mlp_out, idx], "/readout/gather_mlp", batch_dims=1)
        sel_res = w.op("GatherND", [residual, idx], "/readout/gather_residual", batch_dims=1)
        if w.dtype != TensorProto.FLOAT:
            sel_mlp = w.op("Cast", [sel_mlp], "/readout/cast_mlp", to=TensorProto.FLOAT)
            sel_res = w.op("Cast", [sel_res], "/readout/cast_residual", to=TensorProto.FLOAT)
        summed = w.op("Add", [sel_mlp, sel_res], "/readout/residual_add")
        return w.op(
            "SimplifiedLayerNormalization",
            [summed, w.weight("model.norm.weight", self.weight("norm.weight"), dtype=np.float32)],
            "/model/norm/SimplifiedLayerNorm",
            axis=-1,
            epsilon=self.spec.rms_norm_eps,
        )


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
