"""Baseline consumers for the benchmark: each runs as its own process."""

from __future__ import annotations

import argparse


def arguments(*, db: bool = False) -> argparse.Namespace:
    """The command line every baseline consumer takes."""
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--expect", type=int, required=True, help="stop after this many messages")
    p.add_argument("--qos", type=int, default=1)
    p.add_argument("--client-id", required=True)
    if db:
        p.add_argument("--db", required=True)
    return p.parse_args()
