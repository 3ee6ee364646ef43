"""Multi-turn history reuse, proven token by token, on the embedded vLLM engine (and one stand-in).

- ``turns=3`` with the transcript rendered as text next to token-in (``prompt_format=tokens``:
  the last prompt's ids + the generated ids + the new turn's ids);
- ``api=chat`` with a chat template that strips earlier assistant turns' text (FAIL,
  naming the first differing token and the cause) and with the model's own template (PASS);
- a server that keeps no cache blocks filled by generated tokens: FAIL naming that.

The last one runs on the stand-in server of ``tests/fake_servers.py``: no real server can be
made to drop the blocks of generated tokens on demand, and the stand-in's toy cache keeps
prompt blocks only. It needs no engine, so it runs offline.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_servers import FakeOpenAIServer

from echo_env.cachetest.config import PrefixTestConfig
from echo_env.cachetest.results import TestResult
from echo_env.commands.test import run_prefix_test
from echo_env.config import build

SMALL = {"batch_size": 2, "group_size": 2, "ttft_burst": 2, "min_repeats": 2, "max_repeats": 2}
"""Four agents and two short TTFT repeats: the history checks decide before the TTFT gain."""


def _run(base_url: str, out: Path, **overrides: Any) -> TestResult:
    config = build(PrefixTestConfig, base_url=base_url, out_dir=str(out), **{**SMALL, **overrides})
    return run_prefix_test(config, show_progress=False)


def _check(result: TestResult, name: str) -> Any:
    return next(c for c in result.decision.checks if c.name == name)


@pytest.fixture()
def standin() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as server:
        yield server


def test_a_server_that_drops_the_answers_blocks_fails_naming_that(standin: FakeOpenAIServer, tmp_path: Path) -> None:
    # 240-character answers (15 of the stand-in's 16-token blocks) with no newline: the next
    # prompt extends prompt + answer exactly, and its hits stop at the end of the last prompt.
    standin.reply = lambda prompt: " Echo:" + " river" * 40
    result = _run(standin.base_url, tmp_path, turns=2, long_answer=True, max_tokens=256)
    assert (result.verdict, result.decision.reason_id) == ("FAIL", "answer_blocks_kept"), result.decision.reason
    assert "does not keep the cache blocks filled by generated tokens" in result.decision.reason
    history = result.runs[0].evidence.history
    assert history[0].extension.share == 1.0 and history[0].extension.generated_by == "retokenized"
    assert history[0].ceiling is not None and history[0].prompt_only_ceiling is not None
    assert history[0].ceiling > history[0].prompt_only_ceiling + 0.03  # 240 of ~2,500 tokens
    assert result.exit_code == 1


def _strip_template(engine: Any) -> str:
    """The model's own chat template, except that earlier assistant turns lose their text.

    As templates that strip reasoning drop a whole think block; here the whole reply goes,
    so the break does not depend on what the model happens to answer.
    """
    from echo_env.launch.model import load_tokenizer

    template = str(load_tokenizer(engine.served_model_name).chat_template)
    own = "{{ message['content'] | trim }}"
    assert own in template
    return template.replace(own, "{{ '' if message['role'] == 'assistant' else message['content'] | trim }}")


def _evidence(result: TestResult) -> str:
    """What a failed assertion shows: every check and the turns' history evidence."""
    checks = "; ".join(f"{c.name}={c.outcome} ({c.detail[:160]})" for c in result.decision.checks)
    return f"{result.decision.reason}\n{checks}\n{[h.to_json() for h in result.runs[0].evidence.history]}"


@pytest.mark.engine
def test_three_turns_as_text_and_as_token_ids(engine: Any, tmp_path: Path) -> None:
    results = {fmt: _run(engine.base_url, tmp_path / fmt, turns=3, prompt_format=fmt) for fmt in ("text", "tokens")}
    for fmt, result in results.items():
        history = result.runs[0].evidence.history
        assert [h.phase for h in history] == ["turn1", "turn2"], fmt
        assert all(h.extension.agent_turns == 4 and h.extension.generated_by == "server" for h in history)
        assert _check(result, "history_extends").outcome == "pass", _evidence(result)
        assert _check(result, "answer_blocks_kept").outcome in ("pass", "skip")
        assert result.decision.reason_id not in ("history_extends", "answer_blocks_kept", "history_reuse")
    # Token-in extends exactly; the text rendering breaks at the answer's stop token at worst.
    assert all(h.extension.share == 1.0 for h in results["tokens"].runs[0].evidence.history)
    for h in results["text"].runs[0].evidence.history:
        b = h.extension.first_break
        assert b is None or (b.cause in ("whitespace", "retokenized") and b.lost_tokens == 0), b


@pytest.mark.engine
def test_a_chat_template_that_strips_earlier_answers_fails_naming_the_token(engine: Any, tmp_path: Path) -> None:
    result = _run(engine.base_url, tmp_path, api="chat", turns=2, chat_template=_strip_template(engine))
    assert (result.verdict, result.decision.reason_id) == ("FAIL", "history_extends"), _evidence(result)
    assert "the history was rewritten before the answer's end" in result.decision.reason
    assert "keep earlier assistant turns as generated" in result.decision.reason
    b = result.runs[0].evidence.history[0].extension.first_break
    assert b is not None and b.position == b.prompt_tokens, _evidence(result)
    assert b.actual_text is not None and b.actual_text.startswith("<end_of_turn>"), _evidence(result)
    assert f"token {b.position}" in result.decision.reason


@pytest.mark.engine
def test_the_models_own_chat_template_passes_history(engine: Any, tmp_path: Path) -> None:
    result = _run(engine.base_url, tmp_path, api="chat", turns=2)
    assert _check(result, "history_extends").outcome == "pass", _evidence(result)
    assert result.decision.reason_id not in ("history_extends", "answer_blocks_kept", "history_reuse")
    history = result.runs[0].evidence.history[0]
    assert history.extension.agent_turns == 4 and history.extension.generated_by == "server"
