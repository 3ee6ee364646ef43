"""The prefix test's nested configs: the verdict's rules and the fleet's, set bare or dotted, each checking itself."""

from __future__ import annotations

import pytest

from echo_env.cachetest.config import PrefixTestConfig
from echo_env.cachetest.fleet_checks import FleetRules
from echo_env.cachetest.results import Rules
from echo_env.commands.rollout import RolloutConfig
from echo_env.config import MAX_TOKENS, build, describe, known_keys, parse_overrides
from echo_env.errors import ConfigError
from echo_env.rollout.worker import SamplingConfig


def test_the_keys_users_type_today_still_set_the_rules() -> None:
    config = parse_overrides(
        PrefixTestConfig, ["hit_fraction=0.8", "min_effect=1.5", "max_share=0.7", "affinity_fraction=0.6"]
    )
    assert (config.rules.hit_fraction, config.rules.min_effect) == (0.8, 1.5)
    assert (config.fleet.max_share, config.fleet.affinity_fraction) == (0.7, 0.6)
    assert config.rules.confidence == Rules().confidence  # the rest keep their defaults


def test_dotted_keys_reach_every_rule_including_the_tolerances_no_key_could_set() -> None:
    config = parse_overrides(
        PrefixTestConfig,
        ["rules.control_tolerance=0.1", "rules.traffic_tolerance=0.2", "fleet.min_gap=0.1", "rules.hit_fraction=0.7"],
    )
    assert (config.rules.control_tolerance, config.rules.traffic_tolerance) == (0.1, 0.2)
    assert (config.fleet.min_gap, config.rules.hit_fraction) == (0.1, 0.7)


def test_a_name_both_parts_have_is_the_verdicts_bare_and_the_fleets_dotted() -> None:
    config = parse_overrides(PrefixTestConfig, ["ceiling_tolerance=0.03", "fleet.ceiling_tolerance=0.04"])
    assert (config.rules.ceiling_tolerance, config.fleet.ceiling_tolerance) == (0.03, 0.04)
    assert known_keys(PrefixTestConfig)["ceiling_tolerance"][0] == "rules"


def test_build_takes_flat_keys_as_benchmarks_give_them() -> None:
    config = build(PrefixTestConfig, base_url="http://127.0.0.1:9/v1", min_repeats=2, max_repeats=2, max_share=0.6)
    assert (config.rules.min_repeats, config.max_repeats, config.fleet.max_share) == (2, 2, 0.6)
    assert config.server.base_url == "http://127.0.0.1:9/v1"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["rules.control_tolerance=1.5"], "control_tolerance=1.5 must be a share from 0 to 1"),
        (["hit_fraction=2"], "hit_fraction=2.0 must be a share from 0 to 1"),
        (["min_effect=0.9"], "min_effect=0.9 must be at least 1.0"),
        (["confidence=1"], "confidence=1.0 must be from 0.5 to below 1"),
        (["min_repeats=1"], "min_repeats=1: an interval over repeats needs min_repeats=2 or more"),
        (["logprob_tolerance=0"], "logprob_tolerance=0.0 must be above 0"),
        (["max_share=0"], "max_share=0.0 must be in (0, 1]"),
        (["fleet.min_gap=-0.1"], "min_gap must be zero or more"),
        (["min_repeats=5", "max_repeats=4"], "raise max_repeats to min_repeats or more"),
    ],
)
def test_each_part_checks_its_own_values_and_names_the_fix(args: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_overrides(PrefixTestConfig, args)
    assert needle in str(err.value)


def test_a_sub_config_refuses_a_bad_value_on_its_own() -> None:
    with pytest.raises(ConfigError, match=r"traffic_tolerance=-0\.1 must be a share"):
        Rules(traffic_tolerance=-0.1)
    with pytest.raises(ConfigError, match=r"affinity_fraction=1.5 must be in \(0, 1\]"):
        FleetRules(affinity_fraction=1.5)


def test_one_max_tokens_limit_for_the_test_and_rollout() -> None:
    assert PrefixTestConfig(max_tokens=MAX_TOKENS).max_tokens == MAX_TOKENS
    assert RolloutConfig(max_tokens=MAX_TOKENS).sampling().max_tokens == MAX_TOKENS
    needle = f"max_tokens={MAX_TOKENS + 1} is out of range: use 1 to {MAX_TOKENS}"
    for make in (
        lambda: PrefixTestConfig(max_tokens=MAX_TOKENS + 1),
        lambda: RolloutConfig(max_tokens=MAX_TOKENS + 1),
        lambda: SamplingConfig(max_tokens=MAX_TOKENS + 1),
    ):
        with pytest.raises(ConfigError) as err:
            make()
        assert needle in str(err.value)


def test_describe_lists_the_nested_keys_as_they_are_typed_with_their_docs() -> None:
    lines = describe(PrefixTestConfig).splitlines()
    for key in ("control_tolerance=0.05", "hit_fraction=0.9", "max_share=0.8", "fleet.ceiling_tolerance=0.02"):
        assert f"  {key}" in lines, key
    i = lines.index("  control_tolerance=0.05")
    assert "above its own ceiling" in lines[i + 1]
    typed = {line.strip().split("=", 1)[0] for line in lines if line.startswith("  ") and not line.startswith("    ")}
    # Every value a user can set is listed once, under the key that sets it.
    assert "rules" not in typed and "fleet" not in typed and "base_url" in typed
    assert typed <= set(known_keys(PrefixTestConfig))


def test_the_reported_config_keeps_flat_keys() -> None:
    public = build(PrefixTestConfig, api_key="sk-secret", min_effect=1.5, max_share=0.7).public()
    assert (public["min_effect"], public["max_share"], public["hit_fraction"]) == (1.5, 0.7, 0.9)
    assert public["control_tolerance"] == 0.05 and public["fleet.ceiling_tolerance"] == 0.02
    assert public["api_key"] == "***" and "rules" not in public and "server" not in public
