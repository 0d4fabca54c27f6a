"""One module per CLI command (see phiforge/cli.py for the table and the two functions each defines)."""
