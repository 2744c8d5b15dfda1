"""The plain-row graph: the same model for rows that hold one sequence each, without an attention bias.

The tree graph (graph.py) handles every layout through MultiHeadAttention with an additive bias built
from `attn_end`. A bias rules out flash attention on CUDA and costs a [B, 1, S, S] tensor per batch. When
a batch is a set of independent sequences, one per row, right-padded, causal attention with per-row
lengths says everything: GroupQueryAttention does exactly that (flash kernels on CUDA, its own rotary
embedding from the same cos/sin cache, and grouped K/V heads without repeating them).

The plain graph is derived from the tree graph by rewriting its attention blocks rather than by building
the decoder a second time: it reuses the tree graph's initializers (the same external data file when there
is one), so an export streams the weights once and a large model's weights are on disk once.

Plain contract (docs/graph-contract.md):
  inputs   input_ids [B, S] int64, seq_lens [B] int64, step_positions [B, K] int64
  output   step_scores [B, K] float32
Row b holds one sequence in positions 0 .. seq_lens[b]-1; the rest is padding that no real token sees.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from stepscore.errors import ExportError
from stepscore.runtime.bundle import INPUTS, OUTPUTS, PLAIN_INPUTS

MS_DOMAIN = "com.microsoft"


def derive_plain_graph(tree_path: Path, out_path: Path, num_heads: int, num_kv_heads: int) -> Path:
    """Write the plain-row variant of the tree graph at `tree_path` to `out_path` (same directory, so the
    external data reference, if any, resolves to the same file)."""
    if tree_path.parent != out_path.parent:
        raise ValueError("the plain graph must sit next to the tree graph: they share the external data file")
    model = onnx.load(str(tree_path), load_external_data=False)
    graph = model.graph
    by_output: dict[str, onnx.NodeProto] = {out: node for node in graph.node for out in node.output}
    input_ids, position_ids, attn_end, step_positions = INPUTS
    seq_lens = PLAIN_INPUTS[1]

    mha_nodes = [n for n in graph.node if n.op_type == "MultiHeadAttention"]
    if not mha_nodes:
        raise ExportError(f"{tree_path}: no MultiHeadAttention node to rewrite")
    drop: set[int] = set()  # ids of nodes replaced by GroupQueryAttention
    new_nodes: dict[int, list[onnx.NodeProto]] = {}

    # Per-batch GQA inputs: seqlens_k is "total length - 1" per row (int32), total_sequence_length the
    # padded row length S as an int32 scalar.
    prologue = [
        helper.make_node("Sub", [seq_lens, "/plain/one_i64"], ["/plain/lens_minus_one"], name="/plain/Sub"),
        helper.make_node("Cast", ["/plain/lens_minus_one"], ["/plain/seqlens_k"], name="/plain/Cast", to=TensorProto.INT32),
        helper.make_node("Shape", [input_ids], ["/plain/shape"], name="/plain/Shape", start=1, end=2),
        helper.make_node("Cast", ["/plain/shape"], ["/plain/total_1d"], name="/plain/total_cast", to=TensorProto.INT32),
        helper.make_node("Squeeze", ["/plain/total_1d"], ["/plain/total_len"], name="/plain/total_len"),
    ]
    constants = [numpy_helper.from_array(np.array(1, dtype=np.int64), "/plain/one_i64")]

    def producer(name: str, op: str) -> onnx.NodeProto:
        node = by_output.get(name)
        if node is None or node.op_type != op:
            raise ExportError(f"{tree_path}: expected {name!r} to come from {op}, found {node.op_type if node else None}")
        return node

    def unrepeat(name: str) -> str:
        # Grouped K/V heads were repeated (Reshape -> Expand -> Reshape) for MultiHeadAttention; GQA takes
        # them as they are.
        node = by_output[name]
        if node.op_type != "Reshape" or by_output.get(node.input[0]) is None or by_output[node.input[0]].op_type != "Expand":
            return name
        expand = by_output[node.input[0]]
        split = producer(expand.input[0], "Reshape")
        drop.update({id(node), id(expand), id(split)})
        return str(split.input[0])

    for mha in mha_nodes:
        attrs = {a.name: helper.get_attribute_value(a) for a in mha.attribute}
        q_rot = producer(mha.input[0], "RotaryEmbedding")
        k_rot = producer(unrepeat(mha.input[1]), "RotaryEmbedding")
        value = unrepeat(mha.input[2])
        drop.update({id(mha), id(q_rot), id(k_rot)})
        cos_cache, sin_cache = q_rot.input[2], q_rot.input[3]
        prefix = mha.name.rsplit("/", 1)[0]
        gqa = helper.make_node(
            "GroupQueryAttention",
            [q_rot.input[0], k_rot.input[0], value, "", "", "/plain/seqlens_k", "/plain/total_len", cos_cache, sin_cache],
            [mha.output[0], f"{prefix}/present_key", f"{prefix}/present_value"],
            name=f"{prefix}/GroupQueryAttention",
            domain=MS_DOMAIN,
            num_heads=num_heads,
            kv_num_heads=num_kv_heads,
            scale=float(attrs["scale"]),
            do_rotary=1,
            rotary_interleaved=0,
        )
        new_nodes[id(mha)] = [gqa]

    nodes: list[onnx.NodeProto] = list(prologue)
    for node in graph.node:
        if node.name.startswith("/mask/"):
            continue  # the attn_end -> bias expansion has no use without a bias
        if id(node) in drop:
            nodes.extend(new_nodes.get(id(node), []))
            continue
        nodes.append(node)

    used = {name for node in nodes for name in node.input}
    initializers = [t for t in graph.initializer if t.name in used] + constants
    inputs = {i.name: i for i in graph.input}
    new_inputs = [
        inputs[input_ids],
        helper.make_tensor_value_info(seq_lens, TensorProto.INT64, ["batch"]),
        inputs[step_positions],
    ]
    if position_ids in used or attn_end in used:
        raise ExportError(f"{tree_path}: position_ids or attn_end still used after the rewrite")
    new_graph = helper.make_graph(nodes, "stepscore-plain", new_inputs, list(graph.output), initializers)
    plain = helper.make_model(new_graph, opset_imports=list(model.opset_import), producer_name="stepscore")
    plain.ir_version = model.ir_version
    assert tuple(o.name for o in plain.graph.output) == OUTPUTS
    onnx.save_model(plain, str(out_path))
    return out_path
