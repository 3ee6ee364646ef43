"""The RL environment: the echo task, its Gymnasium and PettingZoo forms, and the timing wrappers.

``task`` holds the prompt, the words and the grading (pure); ``gym_env`` the
single-agent ``EchoPrefix-v0`` (``turns`` words per episode, ``max_turns`` attempts per
word); ``parallel`` the many-agent PettingZoo env whose agents share one prefix;
``wrappers`` put each request's latency into the info dicts.
"""

from echo_env.envs.gym_env import EchoPrefixEnv

__all__ = ["EchoPrefixEnv"]
