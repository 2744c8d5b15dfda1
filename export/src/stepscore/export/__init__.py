"""stepscore's export project (`stepscore-export`): a trained PRM -> a validated ONNX bundle.

Everything that needs torch, transformers or onnx lives here; the runtime reads the bundles it writes
through `stepscore.runtime.bundle` and never imports this package when serving.
"""

__version__ = "0.1.0"
