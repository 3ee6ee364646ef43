"""The rollout loop: every agent's LLM call in one batch, then one env step."""
