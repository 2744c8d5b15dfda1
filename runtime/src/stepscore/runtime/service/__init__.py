"""The gRPC service: translates between the public API (stepscore.v1) and the engine, and delegates.

Protobuf messages stop here: `convert` turns them into the runtime's types and back, `status` maps
stepscore's errors to gRPC status codes (the only place that does), `servicer` implements the RPCs,
`server` runs it all with health, reflection, auth, TLS, metrics and graceful shutdown.
"""
