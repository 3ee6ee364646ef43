"""The prefix-cache test: workload, phases, evidence, the pure verdict, and the runner."""
