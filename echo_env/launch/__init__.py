"""Starting servers: the embedded vLLM engine, fleets, llama-server, Prometheus, models they serve."""
