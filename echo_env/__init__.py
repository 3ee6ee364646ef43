"""echo_env: prove that prefix caching works in your inference engine, and measure it.

The workload is a multi-agent echo task whose agents all share one ~2 KB prompt prefix.
Importing the package registers ``EchoPrefix-v0`` with Gymnasium and ``EchoPrefix-v0``
(parallel and AEC) with PettingZoo. Server-facing parts (client, worker, engine,
prefix-cache test) live in their own modules and are imported only when used.
"""

from __future__ import annotations

from typing import Any

import gymnasium
import pettingzoo

from echo_env.envs.gym_env import EchoPrefixEnv
from echo_env.envs.parallel import EchoPrefixParallelEnv, agent_group, agent_id, env, parallel_env, raw_env
from echo_env.envs.task import EchoTask, Grade, default_system_prompt, default_words, grade, user_turn
from echo_env.envs.wrappers import ParallelTimingWrapper, TimingWrapper
from echo_env.errors import (
    ConfigError,
    EchoEnvError,
    EngineError,
    EnvUsageError,
    MetricsError,
    ModelError,
    ServerResponseError,
    ServerUnreachableError,
)

__version__ = "0.1.0"

ENV_ID = "EchoPrefix-v0"
"""The id under which the env is registered with Gymnasium and PettingZoo."""

if ENV_ID not in gymnasium.registry:
    gymnasium.register(id=ENV_ID, entry_point="echo_env.envs.gym_env:EchoPrefixEnv")
if ENV_ID not in pettingzoo.parallel_registry:
    pettingzoo.register("parallel", ENV_ID, entry_point="echo_env.envs.parallel:parallel_env")
if ENV_ID not in pettingzoo.aec_registry:
    pettingzoo.register("aec", ENV_ID, entry_point="echo_env.envs.parallel:env")


def load_environment(**kwargs: Any) -> Any:
    """The verifiers environment (``vf-eval echo-env``); see :mod:`echo_env.integrations.verifiers_env`."""
    from echo_env.integrations.verifiers_env import load_environment as load

    return load(**kwargs)


__all__ = [
    "ENV_ID",
    "ConfigError",
    "EchoEnvError",
    "EchoPrefixEnv",
    "EchoPrefixParallelEnv",
    "EchoTask",
    "EngineError",
    "EnvUsageError",
    "Grade",
    "MetricsError",
    "ModelError",
    "ParallelTimingWrapper",
    "ServerResponseError",
    "ServerUnreachableError",
    "TimingWrapper",
    "__version__",
    "agent_group",
    "agent_id",
    "default_system_prompt",
    "default_words",
    "env",
    "grade",
    "load_environment",
    "parallel_env",
    "raw_env",
    "user_turn",
]
