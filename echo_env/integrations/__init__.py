"""The echo task inside the RL libraries people already train with.

One module per library, each importing its library only when used, so the core install
stays small (the libraries come with the extras ``trl``, ``tinker`` and ``verifiers``):

- :mod:`echo_env.integrations.trl_grpo`: TRL's ``GRPOTrainer``: the echo dataset, a
  reward function on the task's grading, and a ``rollout_func`` that samples each group
  through :class:`echo_env.rollout.worker.RolloutWorker` against a vLLM server
  (single-turn).
- :mod:`echo_env.integrations.tinker_env`: tinker-cookbook's ``Env`` /
  ``EnvGroupBuilder`` / ``RLDataset`` / ``RLDatasetBuilder`` (``turns`` words per
  episode), plus a token completer that samples from any OpenAI-compatible server.
- :mod:`echo_env.integrations.verifiers_env`: ``load_environment(**kwargs)`` returning a
  verifiers ``SingleTurnEnv``, or a ``MultiTurnEnv`` with ``turns``/``max_turns``
  (``vf-eval echo-env`` finds it through ``echo_env.load_environment``).
- :mod:`echo_env.integrations.data`: what they share: dataset rows and batch grading.

``examples/grpo_loop.py`` shows the same group-relative advantages with no library.
"""
