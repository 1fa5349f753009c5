"""The EventBus hub: verified, durable, back-pressured ingest over mTLS gRPC."""
