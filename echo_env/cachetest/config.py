"""Settings of the prefix-cache test (``echo-prefix test key=value ...``), validated in one place."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from echo_env.cachetest.fleet_checks import FleetRules
from echo_env.cachetest.results import Rules
from echo_env.config import MAX_AGENTS, check_agents, check_max_tokens, flat_values
from echo_env.errors import ConfigError
from echo_env.launch.target import ServerTarget


@dataclass(frozen=True)
class PrefixTestConfig:
    """Settings of ``echo-prefix test`` (each is a ``key=value`` on the command line)."""

    server: ServerTarget = field(default_factory=ServerTarget)
    """Which server: ``base_url``, ``model_name``, ``api_key``, ``metrics_url``, ``block_size``, ..."""
    api: Literal["completions", "chat"] = "completions"
    """``completions`` sends the plain transcript; ``chat`` the chat messages."""
    batch_size: int = 16
    """Distinct prompts (groups) of the hit-rate burst."""
    group_size: int = 8
    """Agents per prompt."""
    max_tokens: int = 32
    """Generation limit per request."""
    temperature: float = 0.0
    """Sampling temperature."""
    seed: int = 0
    """Seeds the words and sampling."""
    turns: int = 1
    """Words per agent in one conversation; turns > 1 measures history reuse on each later turn."""
    long_answer: bool = False
    """Answers without the newline stop, up to ``max_tokens`` (e.g. ``max_tokens=300``): with
    ``turns>1`` the next turn follows an answer of many cache blocks, where dropped answer
    blocks cost most."""
    chat_template: str | None = None
    """``api=chat``: a Jinja chat template (text, or a path to a file) sent with each request;
    vLLM must run with ``--trust-request-chat-template``. None: the model's own."""
    ttft_burst: int = 8
    """Requests in each small warm and control burst of a TTFT repeat."""
    max_repeats: int = 8
    """TTFT repeats at most; the test stops earlier once the interval decides."""
    rules: Rules = field(default_factory=Rules)
    """The verdict's thresholds: ``hit_fraction``, ``min_effect``, ``confidence``, ``min_repeats``, ..."""
    fleet: FleetRules = field(default_factory=FleetRules)
    """Fleets: the routing verdict's thresholds (``affinity_fraction``, ``max_share``, ...)."""
    compare_without_cache: bool = False
    """Also run the workload with caching off (embedded: restart; your server: baseline_url)."""
    baseline_url: str | None = None
    """A second server of the same model started without prefix caching."""
    prompt_format: Literal["text", "tokens"] = "text"
    """``tokens`` sends token ids from the model's local tokenizer (completions only)."""
    align_prefix: Literal["off", "auto", "pad", "trim"] = "off"
    """Pad or trim the system prompt's worked examples so the shared prefix ends just past a
    cache-block boundary (``auto``: whichever changes fewer)."""
    vary_before_prefix: bool = False
    """Spoil the test on purpose: an agent id before the shared text, as a template that
    stamps a date or id would. The test must then FAIL and say where prompts differ."""
    check_outputs: bool = False
    """Compare a prompt's greedy answer (with logprobs) served from the cache with a fresh computation
    (3 short requests). Off by default: on the 2-core CPU engine the first logprobs request of a server
    costs ~14 s once, which would push the default run past its 60 s budget."""
    weight_update: str | None = None
    """Check for stale KV across a weight update: ``reload``, ``pause_reload_resume``, ``reload_reset``
    (vLLM dev mode; the embedded engine starts in it), or a shell command of yours that updates the weights."""
    weights_path: str | None = None
    """The new weights' folder for the built-in weight updates (default, embedded engine: the default model
    with one layer perturbed, written into the cache folder)."""
    isolation: bool = False
    """Check that ``cache_salt`` keeps tenants apart (same salt hits, another does not) and report the TTFT
    side channel."""
    out_dir: str | None = None
    """Where results go; default ``echo_prefix_results/<time>-<id>``."""
    wandb_project: str | None = None
    """Log the summary to this wandb project (if wandb is installed)."""
    wandb_name: str | None = None
    """The wandb run name."""
    debug: bool = False
    """Show tracebacks and per-phase timing logs."""

    def __post_init__(self) -> None:
        for key in ("batch_size", "group_size", "ttft_burst", "max_repeats", "turns"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.batch_size * self.group_size < 2:
            raise ConfigError("the test needs at least 2 agents: raise batch_size or group_size")
        self._check_sizes()
        if self.rules.min_repeats > self.max_repeats:
            raise ConfigError(
                f"min_repeats={self.rules.min_repeats}, max_repeats={self.max_repeats}: raise max_repeats to "
                "min_repeats or more"
            )
        check_max_tokens(self.max_tokens)
        if not 0.0 <= self.temperature <= 10.0:
            raise ConfigError(f"temperature={self.temperature} is out of range: use 0 to 10")
        if self.baseline_url is not None and not self.baseline_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"baseline_url={self.baseline_url!r} is not an http(s) URL: e.g. http://127.0.0.1:8001/v1"
            )
        self._check_answer_keys()
        if self.chat_template is not None and self.api != "chat":
            raise ConfigError("chat_template applies to api=chat only: add api=chat or drop chat_template")
        if self.api == "chat" and self.prompt_format == "tokens":
            raise ConfigError("prompt_format=tokens needs api=completions")
        if self.baseline_url is not None and self.server.base_url is None:
            raise ConfigError("baseline_url compares two servers of yours: set base_url too")
        if self.compare_without_cache and self.server.base_url is not None and self.baseline_url is None:
            raise ConfigError(
                "compare_without_cache with your own server needs baseline_url= (a second server started with "
                "--no-enable-prefix-caching)"
            )

    def _check_answer_keys(self) -> None:
        from echo_env.cachetest.weights import BUILT_IN_UPDATES

        if self.weight_update is not None and not self.weight_update.strip():
            raise ConfigError(f"weight_update is empty: use one of {', '.join(BUILT_IN_UPDATES)} or a command")
        # Without weights_path only the embedded default model can be perturbed here.
        custom = self.server.base_url is not None or self.server.model_name not in (None, "default")
        if self.weight_update in BUILT_IN_UPDATES and custom and self.weights_path is None:
            raise ConfigError(
                f"weight_update={self.weight_update} needs weights_path= (a folder of safetensors the server can "
                "read) unless it runs the embedded default model"
            )
        if self.weight_update is not None and self.server.replicas > 1:
            raise ConfigError("weight_update checks one server: use replicas=1")

    def _check_sizes(self) -> None:
        """Bound what cannot work on any machine before a server starts (see :data:`MAX_AGENTS`)."""
        check_agents(self.batch_size, self.group_size)
        ttft_prompts = 2 * self.ttft_burst * self.max_repeats
        if ttft_prompts > MAX_AGENTS:
            raise ConfigError(
                f"ttft_burst={self.ttft_burst} x max_repeats={self.max_repeats} x 2 (warm and control) is "
                f"{ttft_prompts:,} TTFT prompts, over the limit of {MAX_AGENTS:,}: they are built and tokenized "
                "before the first request; lower max_repeats or ttft_burst"
            )
        if self.turns > 1:
            from echo_env.envs.gym_env import check_turns
            from echo_env.envs.task import EchoTask

            check_turns(EchoTask(), self.turns, 1)  # an episode's words differ: no more turns than words

    @property
    def agents(self) -> int:
        """Agents of the hit-rate burst (the cold one included)."""
        return self.batch_size * self.group_size

    def public(self) -> dict[str, Any]:
        """The settings as written to reports: flat keys (as typed on the command line), the API key left out."""
        data = flat_values(self)
        data["api_key"] = "***" if self.server.api_key else None
        return data
