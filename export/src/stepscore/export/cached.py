"""The cached graph: the tree graph continued from K/V the prefix cache holds, returning the new tokens' K/V.

A search sends the same chain again with one more step; the prefix cache (stepscore.runtime.prefixcache)
keeps each step's K/V, so only the new tokens run. This graph is the tree graph (graph.py) with each
attention block given the cached tokens as a past:

  inputs   input_ids, position_ids, attn_end, step_positions   the new tokens, as in the tree graph, with
                                                               `position_ids` absolute (past length + depth)
           past_len [B] int64                                  how many past tokens row b continues
           past_key.{l}, past_value.{l} [B, KV, P, D]          per layer, rows padded to the longest past
  outputs  step_scores [B, K] float32
           present_key.{l}, present_value.{l} [B, KV, S, D]    the new tokens' K (after rotary) and V

Every new token sees the whole valid past of its row (the rows' cached prefixes are their ancestors) and,
among the new tokens, what `attn_end` allows. K/V are stored per K/V head (a grouped-query model keeps
heads / kv_heads times less) and repeated for MultiHeadAttention inside the graph, the same way the tree
graph repeats the new tokens' K/V.

Like the plain-row graph (plain.py) it is derived from the tree graph by rewriting its attention blocks, so
it reuses the tree graph's initializers and external data file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from stepscore.errors import ExportError
from stepscore.runtime.bundle import INPUTS, OUTPUTS, PAST_LEN, cached_inputs, cached_outputs

MS_DOMAIN = "com.microsoft"
_BIAS = "/mask/attn_bias/output_0"  # the tree graph's [B, 1, S, S] bias (graph.py, _Decoder.attention_bias)


def derive_cached_graph(tree_path: Path, out_path: Path, num_heads: int, num_kv_heads: int, head_dim: int) -> Path:
    """Write the cached variant of the tree graph at `tree_path` to `out_path` (same directory: the external
    data reference, if any, resolves to the same file)."""
    model, by_output, mha_nodes = _tree_graph(tree_path, out_path)
    graph = model.graph
    layers = len(mha_nodes)
    in_names, out_names = cached_inputs(layers), cached_outputs(layers)
    group = num_heads // num_kv_heads
    elem = next(t.data_type for t in graph.initializer if t.name == "/mask/neg_f")  # the model dtype
    nodes: list[onnx.NodeProto] = []
    constants = [
        numpy_helper.from_array(np.array([0, num_kv_heads, 1, -1, head_dim], np.int64), "/cached/past_shape5"),
        numpy_helper.from_array(np.array([1, 1, group, 1, 1], np.int64), "/cached/past_expand"),
        numpy_helper.from_array(np.array([0, num_heads, -1, head_dim], np.int64), "/cached/past_shape4"),
        numpy_helper.from_array(np.array([0, 0, num_kv_heads, head_dim], np.int64), "/cached/new_shape4"),
        numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), "/cached/len_shape"),
        numpy_helper.from_array(np.array([1, 1, 1, -1], np.int64), "/cached/idx_shape"),
        numpy_helper.from_array(np.array(0, np.int64), "/cached/zero"),
        numpy_helper.from_array(np.array(1, np.int64), "/cached/one"),
    ]

    def add(op: str, inputs: list[str], name: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [f"{name}/output_0"], name=name, **attrs))
        return f"{name}/output_0"

    # The bias over [past | new]: a past slot is visible to every new token of its row iff it is below the
    # row's past length; the new tokens keep the tree bias.
    past_count = add("Shape", [in_names[5]], "/cached/past_count", start=2, end=3)
    p_idx = add("Range", ["/cached/zero", add("Squeeze", [past_count], "/cached/P"), "/cached/one"], "/cached/Range")
    p_idx = add("Reshape", [p_idx, "/cached/idx_shape"], "/cached/p_idx")
    valid = add("Less", [p_idx, add("Reshape", [PAST_LEN, "/cached/len_shape"], "/cached/len")], "/cached/valid")
    past_bias = add("Where", [valid, "/mask/zero_f", "/mask/neg_f"], "/cached/past_bias1")  # [B, 1, 1, P]
    bias_rows = add("Shape", [_BIAS], "/cached/bias_rows", start=0, end=3)  # [B, 1, S]
    full_shape = add("Concat", [bias_rows, past_count], "/cached/past_bias_shape", axis=0)
    past_bias = add("Expand", [past_bias, full_shape], "/cached/past_bias")
    bias = add("Concat", [past_bias, _BIAS], "/cached/attn_bias", axis=3)  # [B, 1, S, P + S]

    rewritten: dict[int, onnx.NodeProto] = {}
    for layer, mha in enumerate(mha_nodes):
        prefix = mha.name.rsplit("/", 1)[0]
        past_kv: list[str] = []
        for which, source in (("key", mha.input[1]), ("value", mha.input[2])):
            nodes.append(_present(add, _unrepeated(by_output, source), which, layer, prefix))
            past = f"past_{which}.{layer}"
            if group > 1:
                past = add("Reshape", [past, "/cached/past_shape5"], f"{prefix}/past_{which}_split")
                past = add("Expand", [past, "/cached/past_expand"], f"{prefix}/past_{which}_repeat")
                past = add("Reshape", [past, "/cached/past_shape4"], f"{prefix}/past_{which}_merge")
            past_kv.append(past)
        attrs = {a.name: helper.get_attribute_value(a) for a in mha.attribute}
        rewritten[id(mha)] = helper.make_node(
            "MultiHeadAttention",
            [mha.input[0], mha.input[1], mha.input[2], "", "", bias, past_kv[0], past_kv[1]],
            # present outputs unused (present_key.{l} holds the new tokens only), but onnxruntime's CPU kernel
            # masks the past correctly only when they are asked for (checked with onnxruntime 1.32)
            [mha.output[0], f"{prefix}/mha_present_key", f"{prefix}/mha_present_value"],
            name=mha.name,
            domain=MS_DOMAIN,
            **attrs,
        )

    body = _topological([rewritten.get(id(node), node) for node in graph.node] + nodes, graph, constants)
    inputs = {i.name: i for i in graph.input}
    past_shape: list[str | int | None] = ["batch", num_kv_heads, "past", head_dim]
    new_shape: list[str | int | None] = ["batch", num_kv_heads, "sequence", head_dim]
    new_inputs = [inputs[name] for name in INPUTS] + [helper.make_tensor_value_info(PAST_LEN, TensorProto.INT64, ["batch"])]
    new_inputs += [helper.make_tensor_value_info(name, elem, past_shape) for name in in_names[len(INPUTS) + 1 :]]
    outputs = list(graph.output) + [helper.make_tensor_value_info(n, elem, new_shape) for n in out_names[len(OUTPUTS) :]]
    new_graph = helper.make_graph(body, "stepscore-cached", new_inputs, outputs, list(graph.initializer) + constants)
    cached = helper.make_model(new_graph, opset_imports=list(model.opset_import), producer_name="stepscore")
    cached.ir_version = model.ir_version
    onnx.save_model(cached, str(out_path))
    return out_path


def derive_cached_graph_gqa(tree_path: Path, out_path: Path, num_heads: int, num_kv_heads: int) -> Path:
    """The cached graph through GroupQueryAttention (same contract as `derive_cached_graph`).

    MultiHeadAttention needs as many K/V heads as query heads: the past is repeated per query head in the
    graph and concatenated with the new K/V, per layer and per run. GroupQueryAttention reads grouped K/V as
    they are, takes each row's past length itself (`query_seqlens`: row b's chunk continues its own past,
    however long the others are) and indexes the bias by absolute key position. Needs a head size that is a
    multiple of 16 on the CPU (pipeline.GQA_HEAD_MULTIPLE)."""
    model, by_output, mha_nodes = _tree_graph(tree_path, out_path)
    graph = model.graph
    layers = len(mha_nodes)
    in_names, out_names = cached_inputs(layers), cached_outputs(layers)
    elem = next(t.data_type for t in graph.initializer if t.name == "/mask/neg_f")
    nodes: list[onnx.NodeProto] = []
    constants = [
        numpy_helper.from_array(np.array([0, 0, num_kv_heads, -1], np.int64), "/cached/new_shape4"),
        numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), "/cached/len_shape"),
        numpy_helper.from_array(np.array([1, 1, 1, -1], np.int64), "/cached/idx_shape"),
        numpy_helper.from_array(np.array(0, np.int64), "/cached/zero"),
        numpy_helper.from_array(np.array(1, np.int64), "/cached/one"),
        numpy_helper.from_array(np.array([1], np.int64), "/cached/one_1d"),
    ]

    def add(op: str, inputs: list[str], name: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [f"{name}/output_0"], name=name, **attrs))
        return f"{name}/output_0"

    # GroupQueryAttention's per-row lengths: row b holds past_len[b] cached tokens and S new ones (padding
    # included: it sits at the end of the row, after every real token, so no real token sees it).
    s_1d = add("Shape", [INPUTS[0]], "/cached/S", start=1, end=2)
    p_1d = add("Shape", [in_names[5]], "/cached/P", start=2, end=3)
    rows = add("Shape", [INPUTS[0]], "/cached/B", start=0, end=1)
    total = add("Sub", [add("Add", [PAST_LEN, add("Squeeze", [s_1d], "/cached/S0")], "/cached/T"), "/cached/one"], "/cached/T1")
    seqlens_k = add("Cast", [total], "/cached/seqlens_k", to=TensorProto.INT32)
    t_max = add("Add", [p_1d, s_1d], "/cached/Tmax")  # an upper bound of every row's total
    total_len = add("Squeeze", [add("Cast", [t_max], "/cached/Tmax32", to=TensorProto.INT32)], "/cached/total_len")
    q_lens = add("Cast", [add("Expand", [s_1d, rows], "/cached/q_lens64")], "/cached/query_seqlens", to=TensorProto.INT32)
    # The bias over absolute key positions [0, Tmax): a row's past is visible to all its new tokens, its new
    # tokens keep the tree bias, shifted right by the row's past length.
    col = add(
        "Reshape",
        [
            add("Range", ["/cached/zero", add("Squeeze", [t_max], "/cached/T0"), "/cached/one"], "/cached/Range"),
            "/cached/idx_shape",
        ],
        "/cached/col",
    )
    rel = add("Sub", [col, add("Reshape", [PAST_LEN, "/cached/len_shape"], "/cached/len")], "/cached/rel")  # [B,1,1,T]
    s_last = add("Sub", [add("Squeeze", [s_1d], "/cached/S1"), "/cached/one"], "/cached/S_last")
    idx = add("Max", [add("Min", [rel, s_last], "/cached/rel_hi"), "/cached/zero"], "/cached/rel_clip")
    bias_rows = add("Shape", [_BIAS], "/cached/bias_rows", start=0, end=3)  # [B, 1, S]
    idx = add(
        "Expand",
        [
            idx,
            add("Concat", [bias_rows, add("Shape", [col], "/cached/T_1d", start=3, end=4)], "/cached/idx_full_shape", axis=0),
        ],
        "/cached/idx_full",
    )
    shifted = add("GatherElements", [_BIAS, idx], "/cached/shifted", axis=3)
    in_past = add("Less", [rel, "/cached/zero"], "/cached/in_past")
    bias = add("Where", [in_past, "/mask/zero_f", shifted], "/cached/attn_bias")  # [B, 1, S, Tmax]

    rewritten: dict[int, onnx.NodeProto] = {}
    for layer, mha in enumerate(mha_nodes):
        prefix = mha.name.rsplit("/", 1)[0]
        kv = [_unrepeated(by_output, mha.input[1]), _unrepeated(by_output, mha.input[2])]
        for which, source in zip(("key", "value"), kv, strict=True):
            nodes.append(_present(add, source, which, layer, prefix))
        attrs = {a.name: helper.get_attribute_value(a) for a in mha.attribute}
        gqa_inputs = [mha.input[0], kv[0], kv[1], f"past_key.{layer}", f"past_value.{layer}", seqlens_k, total_len]
        gqa_inputs += ["", "", "", bias, "", "", "", "", "", q_lens]  # cos, sin, position_ids, bias, ..., query_seqlens
        rewritten[id(mha)] = helper.make_node(
            "GroupQueryAttention",
            gqa_inputs,
            [mha.output[0], f"{prefix}/gqa_present_key", f"{prefix}/gqa_present_value"],
            name=f"{prefix}/GroupQueryAttention",
            domain=MS_DOMAIN,
            num_heads=num_heads,
            kv_num_heads=num_kv_heads,
            scale=float(attrs["scale"]),
        )

    body = _topological([rewritten.get(id(node), node) for node in graph.node] + nodes, graph, constants)
    body = _live(body, set(OUTPUTS) | set(out_names))
    inputs = {i.name: i for i in graph.input}
    past_shape: list[str | int | None] = ["batch", num_kv_heads, "past", None]
    new_shape: list[str | int | None] = ["batch", num_kv_heads, "sequence", None]
    new_inputs = [inputs[name] for name in INPUTS] + [helper.make_tensor_value_info(PAST_LEN, TensorProto.INT64, ["batch"])]
    new_inputs += [helper.make_tensor_value_info(name, elem, past_shape) for name in in_names[len(INPUTS) + 1 :]]
    outputs = list(graph.output) + [helper.make_tensor_value_info(n, elem, new_shape) for n in out_names[len(OUTPUTS) :]]
    used = {name for node in body for name in node.input}
    initializers = [t for t in [*graph.initializer, *constants] if t.name in used]
    new_graph = helper.make_graph(body, "stepscore-cached", new_inputs, outputs, initializers)
    cached = helper.make_model(new_graph, opset_imports=list(model.opset_import), producer_name="stepscore")
    cached.ir_version = model.ir_version
    onnx.save_model(cached, str(out_path))
    return out_path


def _tree_graph(tree_path: Path, out_path: Path) -> tuple[onnx.ModelProto, dict[str, onnx.NodeProto], list[onnx.NodeProto]]:
    """The tree graph to rewrite (weights left in their file), each value's producer, its attention nodes."""
    if tree_path.parent != out_path.parent:
        raise ValueError("the cached graph must sit next to the tree graph: they share the external data file")
    model = onnx.load(str(tree_path), load_external_data=False)
    by_output: dict[str, onnx.NodeProto] = {out: node for node in model.graph.node for out in node.output}
    mha_nodes = [n for n in model.graph.node if n.op_type == "MultiHeadAttention"]
    if not mha_nodes or _BIAS not in by_output:
        raise ExportError(f"{tree_path}: no MultiHeadAttention with the tree bias to rewrite")
    return model, by_output, mha_nodes


def _unrepeated(by_output: dict[str, onnx.NodeProto], name: str) -> str:
    """The K or V before the tree graph repeated its grouped heads for MultiHeadAttention (Reshape -> Expand ->
    Reshape): the cache keeps grouped heads as they are."""
    node = by_output[name]
    if node.op_type == "Reshape" and by_output.get(node.input[0]) is not None:
        expand = by_output[node.input[0]]
        if expand.op_type == "Expand":
            return str(by_output[expand.input[0]].input[0])
    return name


def _present(add: Callable[..., str], source: str, which: str, layer: int, prefix: str) -> onnx.NodeProto:
    """The output present_{which}.{layer} [B, kv_heads, S, head_dim]: the new tokens' K (rotated) or V."""
    new = add("Reshape", [source, "/cached/new_shape4"], f"{prefix}/{which}_bnsh_shape")
    return helper.make_node(
        "Transpose", [new], [f"present_{which}.{layer}"], name=f"{prefix}/present_{which}", perm=[0, 2, 1, 3]
    )


def _live(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """`nodes` without those no output depends on (the repeat of grouped K/V heads MultiHeadAttention needed)."""
    needed = set(outputs)
    keep: list[onnx.NodeProto] = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
    return keep[::-1]


def _topological(nodes: list[onnx.NodeProto], graph: onnx.GraphProto, constants: list[TensorProto]) -> list[onnx.NodeProto]:
    """`nodes` in an order where every input is produced before it is used (ONNX requires it; the rewritten
    attention nodes now read values built after them in the list)."""
    ready = {i.name for i in graph.input} | {t.name for t in [*graph.initializer, *constants]} | {PAST_LEN, ""}
    ready |= {n for n in (i for node in nodes for i in node.input) if n.startswith(("past_key.", "past_value."))}
    pending, out = list(nodes), []
    while pending:
        left = []
        for node in pending:
            if all(i in ready for i in node.input):
                out.append(node)
                ready.update(node.output)
            else:
                left.append(node)
        if len(left) == len(pending):
            raise ExportError(f"cached graph: {len(left)} nodes have inputs nothing produces (first: {left[0].name})")
        pending = left
    return out
