"""The PyTorch reference the export gate compares against: the Hugging Face body, in fp32, plus the head.

The body is transformers' own implementation of the architecture (not our graph builder), so the gate
checks the builder against independent code. The head is applied from the same weights the graph uses.
Each candidate is scored alone, unpadded, with plain causal attention.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from stepscore.export.graph import HeadWeights
from stepscore.runtime.types import Formatted


class Reference:
    def __init__(self, model_dir: Path, head: HeadWeights) -> None:
        import torch
        import transformers
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_MAPPING

        self._torch = torch
        config = AutoConfig.from_pretrained(str(model_dir))
        body_cls: Any = MODEL_MAPPING[type(config)]
        tf_logging: Any = transformers.logging
        verbosity = tf_logging.get_verbosity()
        tf_logging.set_verbosity_error()  # the head's tensors are "unused" by the body: expected
        tf_logging.disable_progress_bar()  # export prints its own progress
        try:
            self.body = body_cls.from_pretrained(str(model_dir), config=config, dtype=torch.float32)
        finally:
            tf_logging.set_verbosity(verbosity)
        self.body.eval()
        self.head = head
        self.description = f"transformers {transformers.__version__} {body_cls.__name__} fp32 + head fp32"

    def scores(self, items: Sequence[Formatted]) -> list[npt.NDArray[np.float64]]:
        torch = self._torch
        out: list[npt.NDArray[np.float64]] = []
        with torch.no_grad():
            for item in items:
                ids = torch.as_tensor(item.ids.astype(np.int64))[None]
                hidden = self.body(input_ids=ids).last_hidden_state[0]
                x = hidden[torch.as_tensor(item.reads.astype(np.int64))].double()
                out.append(self._head(x.numpy()))
        return out

    def _head(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        layers = self.head.layers
        for i, (mat, bias) in enumerate(layers):
            x = x @ mat.astype(np.float64)
            if bias is not None:
                x = x + bias
            if i < len(layers) - 1:
                x = np.maximum(x, 0.0)
        rule = self.head.spec.score
        if rule in ("softmax1", "pair_softmax0"):
            z = np.exp(x - x.max(axis=-1, keepdims=True))
            p = z / z.sum(axis=-1, keepdims=True)
            return np.asarray(p[:, 1] if rule == "softmax1" else p[:, 0])
        v = x[:, 0]
        return np.asarray(1.0 / (1.0 + np.exp(-v)) if rule == "sigmoid" else v)

    def close(self) -> None:
        del self.body
