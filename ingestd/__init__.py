"""ingestd: a sensor telemetry ingestion daemon (MQTT in, transactional batches out)."""

__version__ = "0.1.0"
# `ingestd --help` and pyproject.toml's `description` (a test holds them equal,
# and to the format registry and the store engines).
DESCRIPTION = (
    "Sensor telemetry ingestion daemon: MQTT in (JSON, plain values, InfluxDB line protocol, "
    "SenML, Sparkplug B, Homie), transactional batches out to SQLite or PostgreSQL, nothing lost."
)
