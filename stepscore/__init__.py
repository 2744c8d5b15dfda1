"""stepscore: a compiled, high-throughput scoring runtime for process reward models.

`stepscore.export` turns a trained PRM into a validated ONNX bundle; `stepscore.runtime` scores step
chains from a bundle with dynamic batching; `stepscore.v1` holds the generated gRPC API.
"""

__version__ = "0.1.0"
