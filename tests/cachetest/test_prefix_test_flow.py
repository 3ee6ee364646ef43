"""The test's flow against local stand-in servers: the command opens and closes each server, grading is a step."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_servers import FakeOpenAIServer

import echo_env.commands.test as test_command
from echo_env.cachetest.config import PrefixTestConfig
from echo_env.cachetest.record import NullSink
from echo_env.commands.test import run_test
from echo_env.config import build
from echo_env.launch.target import OpenServer, ServerTarget, open_target


def test_the_command_opens_each_server_and_closes_it_before_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []

    @contextlib.contextmanager
    def recording(target: ServerTarget, **kwargs: Any) -> Iterator[OpenServer]:
        label = "cache_on" if kwargs["caching"] else "cache_off"
        events.append(f"open {label}")
        with open_target(target, **kwargs) as server:
            yield server
        events.append(f"close {label}")

    monkeypatch.setattr(test_command, "open_target", recording)
    with FakeOpenAIServer() as fake, FakeOpenAIServer() as baseline:
        config = build(
            PrefixTestConfig, base_url=fake.base_url, baseline_url=baseline.base_url, batch_size=2, group_size=2,
            ttft_burst=2, min_repeats=2, max_repeats=2, timeout_s=5, out_dir=str(tmp_path),
        )  # fmt: skip
        result = run_test(config, NullSink())
        sent_on, sent_off = fake.completions_received, baseline.completions_received
    assert events == ["open cache_on", "close cache_on", "open cache_off", "close cache_off"]
    assert sent_on > 0 and sent_off > 0
    assert [r.label for r in result.runs] == ["cache_on", "cache_off"] and result.error is None


def test_the_warm_burst_is_graded_after_it_ends() -> None:
    with FakeOpenAIServer() as fake:
        config = build(
            PrefixTestConfig, base_url=fake.base_url, batch_size=2, group_size=2, ttft_burst=2, min_repeats=2,
            max_repeats=2, timeout_s=5,
        )  # fmt: skip
        result = run_test(config, NullSink())
    main = result.main
    assert main is not None
    warm = next(p for p in main.pooled if p.name == "warm")
    # The stand-in echoes every word: all four agents (the cold one included) are graded correct.
    assert warm.mean_reward == 1.0
    assert next(p for p in main.pooled if p.name == "ttft_warm").mean_reward is None  # TTFT bursts are not graded
