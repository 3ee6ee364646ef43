"""Talking to inference servers: the client, the embedded engine and model, server kinds and their metrics."""
