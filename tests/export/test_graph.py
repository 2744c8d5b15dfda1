"""Graph structure, checked on CPU: fused ops, fp16 body with an fp32 head, names, external data."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto

from stepscore.runtime.bundle import INPUTS, OUTPUTS, load_bundle


def _model(bundle: Path) -> onnx.ModelProto:
    return onnx.load(str(bundle / "model.onnx"))


@pytest.mark.parametrize("kind", ["qwen-prm", "rlhflow"])
def test_fp16_graph_is_fused_with_fp32_head(tiny_bundle: Callable[..., Path], kind: str) -> None:
    bundle = tiny_bundle(kind, "fp16")
    model = _model(bundle)
    layers = load_bundle(bundle).manifest.model.num_layers
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["MultiHeadAttention"] == layers
    assert ops["RotaryEmbedding"] == 2 * layers
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * layers - 1
    assert ops["QuickGelu"] == layers
    # no unfused attention left: no Softmax except the head's, no MatMul between q and k
    assert ops["Softmax"] <= 1
    inits = {t.name: t for t in model.graph.initializer}
    body = [t for n, t in inits.items() if n.startswith("model.layers.") and n.endswith(".weight")]
    assert body and all(t.data_type == TensorProto.FLOAT16 for t in body)
    head = [t for n, t in inits.items() if n.startswith("head.")]
    assert head and all(t.data_type == TensorProto.FLOAT for t in head)
    assert inits["model.norm.weight"].data_type == TensorProto.FLOAT  # final norm runs in fp32
    casts = [n for n in model.graph.node if n.op_type == "Cast"]
    assert {n.name for n in casts} == {"/readout/cast_mlp", "/readout/cast_residual"}
    # the read-out gathers step positions before the head: no [batch, seq, vocab] tensor anywhere
    assert any(n.op_type == "GatherND" for n in model.graph.node)
    lm_rows = [t for n, t in inits.items() if n == "head.0.weight"]
    if kind == "rlhflow":
        assert list(lm_rows[0].dims) == [32, 2]  # hidden x the two candidate rows of the LM head


def test_graph_contract_and_names(tiny_bundle: Callable[..., Path]) -> None:
    model = _model(tiny_bundle("trl", "fp32"))
    assert tuple(i.name for i in model.graph.input) == INPUTS
    assert tuple(o.name for o in model.graph.output) == OUTPUTS
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    names = [n.name for n in model.graph.node]
    assert "/model/layers.0.self_attn/MultiHeadAttention" in names
    assert len(set(names)) == len(names)


def test_external_data_bundle_loads_and_scores(tmp_path: Path, tiny_model: Callable[[str], Path]) -> None:
    from stepscore.export.pipeline import export_model

    out = tmp_path / "ext"
    export_model(str(tiny_model("skywork")), out, precision="fp32", progress=lambda _: None)
    manifest = load_bundle(out).manifest
    assert manifest.graph.data_file == "model.onnx.data"
    assert (out / "model.onnx.data").stat().st_size > (out / "model.onnx").stat().st_size
    assert manifest.validation["passed"] is True
