"""Observability: logging, the event-log observer, systemd notification."""
