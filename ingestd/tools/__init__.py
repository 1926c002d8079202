"""What the command line runs and the daemon never does: the data commands'
reports (`report`), a sample message explained (`explain`), sample publishers
(`simulate`).

Only `ingestd.cli` (and tests) import these; nothing the daemon runs imports
them, so they may import the daemon's modules but never the other way round.
"""
