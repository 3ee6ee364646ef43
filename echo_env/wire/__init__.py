"""Talking to a running server: requests, streams, server facts and counters. Nothing here starts a server."""
