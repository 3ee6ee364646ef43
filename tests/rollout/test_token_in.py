"""Token-in multi-turn prompts and the per-step history-reuse info, with a character tokenizer (no server)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from echo_env.envs.task import EchoTask, Turn
from echo_env.rollout.token_in import ReuseLog, TokenHistory

BOS = 1


class CharTokenizer:
    """One token per character, a BOS in front of whole prompts; ``"\\n\\n"`` generated as one token (2)."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [ord(c) for c in text]
        return {"input_ids": [BOS, *ids] if add_special_tokens else ids}

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        return "".join("\n\n" if i == 2 else "" if i == BOS else chr(i) for i in ids)


def test_the_next_prompt_is_the_last_prompt_ids_plus_the_generated_ids_plus_the_new_text() -> None:
    task = EchoTask(system_prompt="Echo words.", words=("river", "stone"))
    first = task.transcript("river")
    history = TokenHistory(CharTokenizer())
    ids = history.prompt_ids("a0", first)
    assert ids == [BOS, *map(ord, first)]
    # The server generated " Echo: river" then "\n\n" (one token), and stopped at "\n": the text drops it.
    generated = [*map(ord, " Echo: river"), 2]
    history.record("a0", first, ids, " Echo: river", generated)
    second = task.transcript("river", [Turn(" Echo: river", "Correct! Echo matched.", "stone")])
    appended = history.prompt_ids("a0", second)
    assert appended[: len(ids) + len(generated)] == [*ids, *generated]
    # The generated "\n\n" stands for the newline the transcript puts after a reply.
    assert CharTokenizer().decode(appended[len(ids) + len(generated) :]).startswith("User: Correct!")
    # Text tokenized again would have two "\n" tokens where the model generated one "\n\n".
    assert history.prompt_ids("a1", second) != appended


def test_another_conversation_is_tokenized_whole() -> None:
    history = TokenHistory(CharTokenizer())
    history.record("a0", "Hello", [BOS, *map(ord, "Hello")], " there", None)
    assert history.prompt_ids("a0", "Goodbye") == [BOS, *map(ord, "Goodbye")]
    # Without the server's ids the reply is tokenized alone, and appended all the same.
    assert history.prompt_ids("a0", "Hello there\nUser: ok")[:12] == [BOS, *map(ord, "Hello there")]


def test_reuse_log_says_per_turn_whether_the_prompt_extended_the_last_one() -> None:
    log = ReuseLog()
    assert log.observe("a0", [1, 5, 6], [7, 8], 0) == {"turn": 0, "cached_tokens": 0, "extended": None}
    assert log.observe("a0", [1, 5, 6, 7, 8, 9], [10], 4) == {"turn": 1, "cached_tokens": 4, "extended": True}
    assert log.observe("a0", [1, 5, 6, 7, 9, 9, 10], [11], 4)["extended"] is False
    assert log.observe("a0", None, None, None)["extended"] is None
    log.forget()
    assert log.observe("a0", [1], [2], 0)["turn"] == 0


def test_the_verifiers_adapter_records_history_reuse_per_trajectory_step() -> None:
    from types import SimpleNamespace

    from echo_env.integrations.verifiers_env import history_reuse

    def step(prompt: list[int], completion: list[int], cached: int) -> dict[str, Any]:
        usage = SimpleNamespace(prompt_tokens_details=SimpleNamespace(cached_tokens=cached))
        tokens = {"prompt_ids": prompt, "completion_ids": completion}
        return {"response": SimpleNamespace(usage=usage), "tokens": tokens}

    first = step([1, 5], [6], 0)
    assert history_reuse({"trajectory": []}, first) == {"turn": 0, "cached_tokens": 0, "extended": None}
    second = step([1, 5, 6, 7], [8], 2)
    assert history_reuse({"trajectory": [first]}, second) == {"turn": 1, "cached_tokens": 2, "extended": True}
    rewritten = step([1, 5, 9, 7], [8], 2)
    assert history_reuse({"trajectory": [first]}, rewritten)["extended"] is False


def test_multi_turn_runs_ask_for_token_ids_and_single_turn_runs_ask_for_nothing_more(tmp_path: Any) -> None:
    import pytest

    from echo_env.cachetest.config import PrefixTestConfig
    from echo_env.cachetest.turns import request_fields, stop_strings
    from echo_env.errors import ConfigError

    vllm = SimpleFacts("vllm")
    assert request_fields(PrefixTestConfig(), vllm) == {}  # type: ignore[arg-type]
    assert request_fields(PrefixTestConfig(turns=2), vllm) == {"return_token_ids": True}  # type: ignore[arg-type]
    assert request_fields(PrefixTestConfig(turns=2), SimpleFacts("llamacpp")) == {}  # type: ignore[arg-type]
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages }}")
    fields = request_fields(PrefixTestConfig(api="chat", chat_template=str(template)), vllm)  # type: ignore[arg-type]
    assert fields == {"chat_template": "{{ messages }}"}
    with pytest.raises(ConfigError, match="cannot read it"):
        request_fields(PrefixTestConfig(api="chat", chat_template=str(tmp_path / "no")), vllm)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="api=chat only"):
        PrefixTestConfig(chat_template="{{ x }}")
    assert stop_strings(PrefixTestConfig()) == ("\n",) and stop_strings(PrefixTestConfig(long_answer=True)) == ()


class SimpleFacts:
    """The part of ServerFacts ``request_fields`` reads."""

    def __init__(self, kind: str) -> None:
        self.kind = type("Kind", (), {"name": kind})()
