"""Command-line client for the service: `python -m client submit|get`."""
