"""``key=value`` command lines into config dataclasses."""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import pytest

from echo_env.config import describe, parse_overrides
from echo_env.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Demo:
    batch_size: int = 16
    temperature: float = 1.0
    debug: bool = False
    model_name: str = "default"
    api: Literal["chat", "completions"] = "completions"
    seed: Optional[int] = None  # noqa: UP045 - the old spelling must work too
    max_tokens: int | None = 16
    words: tuple[str, ...] = ()
    block_sizes: tuple[int, ...] = (16,)
    log_path: str | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")


def test_no_overrides_gives_the_defaults() -> None:
    assert parse_overrides(Demo, []) == Demo()


def test_each_type_is_read() -> None:
    cfg = parse_overrides(
        Demo,
        [
            "batch_size=32",
            "temperature=0.5",
            "debug=true",
            "model_name=google/gemma-3-1b-it",
            "api=chat",
            "seed=7",
            "max_tokens=none",
            "words=apple, river,candle",
            "block_sizes=16,128",
            "log_path=/tmp/x.log",
        ],
    )
    assert cfg == Demo(
        batch_size=32,
        temperature=0.5,
        debug=True,
        model_name="google/gemma-3-1b-it",
        api="chat",
        seed=7,
        max_tokens=None,
        words=("apple", "river", "candle"),
        block_sizes=(16, 128),
        log_path="/tmp/x.log",
    )


@pytest.mark.parametrize(("raw", "value"), [("true", True), ("1", True), ("Yes", True), ("off", False), ("0", False)])
def test_booleans(raw: str, value: bool) -> None:
    assert parse_overrides(Demo, [f"debug={raw}"]).debug is value


@pytest.mark.parametrize("raw", ["none", "None", "null", ""])
def test_optional_values_accept_none(raw: str) -> None:
    assert parse_overrides(Demo, [f"seed={raw}"]).seed is None
    assert parse_overrides(Demo, [f"log_path={raw}"]).log_path is None


def test_strings_keep_equals_signs_and_dashes_in_keys_work() -> None:
    assert parse_overrides(Demo, ["model_name=a=b"]).model_name == "a=b"
    assert parse_overrides(Demo, ["--batch-size=8"]).batch_size == 8


def test_empty_tuple() -> None:
    assert parse_overrides(Demo, ["words="]).words == ()


def test_starting_from_a_base_config() -> None:
    base = Demo(batch_size=4, debug=True)
    assert parse_overrides(Demo, ["temperature=0"], base=base) == Demo(batch_size=4, debug=True, temperature=0.0)


def test_unknown_key_suggests_the_closest_one() -> None:
    with pytest.raises(ConfigError, match="did you mean batch_size"):
        parse_overrides(Demo, ["batchsize=8"])
    with pytest.raises(ConfigError, match="known keys are api, batch_size"):
        parse_overrides(Demo, ["zzzzzz=1"])


@pytest.mark.parametrize("arg", ["batch_size", "32", "--debug"])
def test_malformed_argument_shows_the_form(arg: str) -> None:
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(Demo, [arg])


@pytest.mark.parametrize(
    ("arg", "fix"),
    [
        ("batch_size=many", "batch_size=8"),
        ("batch_size=1.5", "whole number"),
        ("temperature=hot", "temperature=0.5"),
        ("debug=maybe", "debug=true or debug=false"),
        ("api=grpc", "use one of chat, completions"),
        ("seed=abc", "seed=8"),
        ("block_sizes=16,big", "block_sizes=8"),
    ],
)
def test_bad_values_name_the_fix(arg: str, fix: str) -> None:
    with pytest.raises(ConfigError, match=fix):
        parse_overrides(Demo, [arg])


def test_the_config_validates_itself() -> None:
    with pytest.raises(ConfigError, match="at least 1"):
        parse_overrides(Demo, ["batch_size=0"])


def test_a_non_dataclass_is_a_programming_error() -> None:
    with pytest.raises(TypeError):
        parse_overrides(int, [])


def test_describe_lists_every_key_with_its_default() -> None:
    text = describe(Demo)
    assert "  batch_size=16" in text.splitlines()
    assert len(text.splitlines()) == len(dataclasses.fields(Demo))


def test_describe_shows_the_docstring_under_each_field() -> None:
    from echo_env.cachetest.runner import PrefixTestConfig

    lines = describe(PrefixTestConfig).splitlines()
    i = lines.index("  group_size=8")
    assert lines[i + 1].strip() == "Agents per prompt."
