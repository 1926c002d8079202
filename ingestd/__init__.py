"""ingestd: a sensor telemetry ingestion daemon (MQTT in, transactional batches out)."""

__version__ = "0.1.0"
