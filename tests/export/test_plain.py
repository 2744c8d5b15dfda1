"""The plain-row graph (stepscore.export.plain): structure, weights shared with the tree graph, parity with it,
and export without it when onnxruntime's GroupQueryAttention cannot take the model's head size."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from stepscore.errors import ConfigError
from stepscore.runtime.backend import OrtBackend
from stepscore.runtime.bundle import OUTPUTS, PLAIN_INPUTS, load_bundle
from stepscore.runtime.engine import SyncEngine
from stepscore.runtime.packing import PackOptions, pack
from stepscore.runtime.types import Formatted, ScoreRequest
from tests.helpers.tiny_models import KINDS


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_plain_graph_replaces_biased_attention_with_gqa(tiny_bundle: Callable[..., Path], precision: str) -> None:
    bundle = tiny_bundle("rlhflow", precision)
    manifest = load_bundle(bundle).manifest
    assert manifest.graph.plain_file == "model_plain.onnx"
    model = onnx.load(str(bundle / "model_plain.onnx"))
    layers, heads, kv = manifest.model.num_layers, manifest.model.num_heads, manifest.model.num_kv_heads
    assert heads > kv  # grouped K/V heads: GQA takes them without the tree graph's repeat
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["GroupQueryAttention"] == layers
    for gone in ("MultiHeadAttention", "RotaryEmbedding", "Expand", "Range", "Where"):
        assert ops[gone] == 0, gone  # rotary runs inside GQA; no mask is built
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * layers - 1
    for node in model.graph.node:
        if node.op_type == "GroupQueryAttention":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attrs["num_heads"] == heads and attrs["kv_num_heads"] == kv and attrs["do_rotary"] == 1
    assert tuple(i.name for i in model.graph.input) == PLAIN_INPUTS
    assert tuple(o.name for o in model.graph.output) == OUTPUTS
    # the same weights, by the same names, as the tree graph
    tree = {t.name for t in onnx.load(str(bundle / "model.onnx")).graph.initializer}
    plain = {t.name for t in model.graph.initializer}
    assert {n for n in tree if n.startswith("model.layers.")} <= plain


@pytest.mark.parametrize("kind", KINDS)
def test_plain_graph_equals_tree_graph_on_padded_rows(tiny_bundle: Callable[..., Path], kind: str) -> None:
    bundle = tiny_bundle(kind)
    vocab = load_bundle(bundle).manifest.model.vocab_size
    rng = np.random.default_rng(1)
    items = []
    for n in (5, 37, 64, 20, 1):  # uneven lengths: most rows end in padding
        ids = rng.integers(1, vocab, size=n).astype(np.int32)
        reads = np.unique(np.append(rng.integers(0, n, size=3), n - 1)).astype(np.int32)
        items.append(Formatted(ids, reads))
    tree_backend = OrtBackend(bundle / "model.onnx")
    both = OrtBackend(bundle / "model.onnx", plain_graph_path=bundle / "model_plain.onnx")
    batch = pack(items, PackOptions(plain_cost=0.0))
    assert batch.seq_lens is not None
    # the same batch through the tree graph (its attn_end and position_ids) and through the plain graph
    np.testing.assert_allclose(both.run(batch), tree_backend.run(batch), atol=1e-5, rtol=0)
    # the plain graph alone (as export's validation loads it): same scores, and it refuses tree batches
    alone = OrtBackend(None, plain_graph_path=bundle / "model_plain.onnx")
    np.testing.assert_allclose(alone.run(batch), both.run(batch), atol=0, rtol=0)
    with pytest.raises(ConfigError, match="only the plain-row graph"):
        alone.run(pack(items, PackOptions()))
    with pytest.raises(ConfigError, match="needs a graph"):
        OrtBackend(None)


def test_external_data_is_shared_not_copied(tmp_path: Path, tiny_model: Callable[[str], Path]) -> None:
    from stepscore.export.pipeline import export_model

    out = tmp_path / "ext"
    export_model(str(tiny_model("qwen-prm")), out, precision="fp32", progress=lambda _: None)
    manifest = load_bundle(out).manifest
    assert manifest.validation["max_abs_diff_plain"] is not None and manifest.validation["passed"] is True
    plain = onnx.load(str(out / "model_plain.onnx"), load_external_data=False)
    locations = {e.value for t in plain.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"}
    assert (out / "model_plain.onnx").stat().st_size < (out / "model.onnx.data").stat().st_size / 4
    with SyncEngine(out) as engine:  # serving from it loads both graphs from the one data file
        assert engine.score(ScoreRequest("p?", [["a step.", "another."]])).candidates[0].step_scores


def test_head_size_gqa_cannot_take_exports_without_plain_graph(
    tmp_path: Path, tiny_model: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from stepscore.errors import ConfigError
    from stepscore.export.pipeline import export_model
    from stepscore.runtime.config import EngineConfig

    # the same weights read as 4 heads of 8 (K/V: 2 of 8) instead of 2 heads of 16
    model = tmp_path / "heads8"
    shutil.copytree(tiny_model("trl"), model)
    config = json.loads((model / "config.json").read_text())
    config.update(num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "bundle"
    export_model(str(model), out, precision="fp32", progress=print)
    assert "no plain-row graph" in capsys.readouterr().out
    bundle = load_bundle(out)
    assert bundle.manifest.graph.plain_file is None and not (out / "model_plain.onnx").exists()
    # the cached graph falls back to MultiHeadAttention, validated in increments all the same
    assert bundle.manifest.graph.cached_attention == "MultiHeadAttention"
    assert bundle.manifest.validation["max_abs_diff_incremental"] <= 1e-5
    assert bundle.manifest.validation["max_abs_diff_plain"] is None
    with SyncEngine(out) as engine:  # auto: every batch through the tree graph
        assert len(engine.score(ScoreRequest("p?", [["one.", "two."]])).candidates[0].step_scores) == 2
    with pytest.raises(ConfigError, match="no plain-row graph"):
        SyncEngine(out, config=EngineConfig(plain_rows="always"))
