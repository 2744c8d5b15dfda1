"""stepscore's runtime: scores step chains from an exported bundle with onnxruntime (never torch).

`bundle` reads bundles, `formatting` turns problems and steps into token ids, `scheduler` owns the queue,
`packing` lays candidates out in rows, `backend` runs them, `engine` ties it together behind `score()`;
`service` is the gRPC server, `client` its Python clients, `bench` the benchmark harness and
`default_model` the embedded arithmetic PRM. docs/architecture.md maps a request's path through them.
"""
