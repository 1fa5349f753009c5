"""The status UI: a Bottle app reading the hub's gRPC API (see app.create_app and server.serve)."""
