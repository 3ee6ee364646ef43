"""The PettingZoo parallel env: API tests, groups, the shared prefix, misuse, and AEC."""

from __future__ import annotations

import pettingzoo
import pytest
from pettingzoo.test import parallel_api_test, parallel_seed_test

import echo_env
from echo_env.errors import ConfigError, EnvUsageError
from echo_env.envs.parallel import EchoPrefixParallelEnv, agent_group, agent_id, env, parallel_env, raw_env
from echo_env.envs.task import EchoTask


def small(**kwargs: object) -> EchoPrefixParallelEnv:
    return parallel_env(**{"batch_size": 3, "group_size": 4, **kwargs})


def answers(e: EchoPrefixParallelEnv, template: str = "Echo: {word}") -> dict[str, str]:
    return {a: template.format(word=e.word_of(a)) for a in e.agents}


@pytest.mark.parametrize("max_turns", [1, 3])
def test_parallel_api_test_passes(max_turns: int) -> None:
    parallel_api_test(small(max_turns=max_turns), num_cycles=20)


def test_parallel_seed_test_passes() -> None:
    parallel_seed_test(lambda: small(max_turns=2))


def test_defaults_follow_the_recipe() -> None:
    e = EchoPrefixParallelEnv()
    assert (e.batch_size, e.group_size) == (16, 8)
    assert len(e.possible_agents) == 128


def test_agent_ids_name_their_group() -> None:
    e = small()
    assert e.possible_agents[:5] == [
        "group0_agent0",
        "group0_agent1",
        "group0_agent2",
        "group0_agent3",
        "group1_agent0",
    ]
    assert agent_id(3, 5) == "group3_agent5"
    assert agent_group("group12_agent7") == 12
    for a in e.possible_agents:
        assert agent_id(agent_group(a), int(a.rsplit("agent", 1)[1])) == a


@pytest.mark.parametrize("bad", ["player_0", "group_agent1", "group1_agent", "xgroup1_agent2"])
def test_agent_group_rejects_foreign_ids(bad: str) -> None:
    with pytest.raises(EnvUsageError):
        agent_group(bad)


def test_agents_of_a_group_share_the_word_and_groups_differ() -> None:
    e = small(batch_size=8)
    obs, infos = e.reset(seed=5)
    for g in range(8):
        members = [a for a in e.agents if agent_group(a) == g]
        assert len(members) == 4
        assert len({infos[a]["word"] for a in members}) == 1
        assert len({obs[a] for a in members}) == 1
        assert all(infos[a]["group"] == g for a in members)
    assert len(set(e.words)) == 8
    assert e.state() == " ".join(e.words)


def test_every_agent_of_a_run_shares_the_prefix_up_to_the_word() -> None:
    task = EchoTask(run_tag="run-9")
    e = small(task=task, batch_size=6)
    obs, infos = e.reset(seed=1)
    shared = task.shared_text()
    system = infos[e.agents[0]]["messages"][0]
    for a in e.agents:
        word = infos[a]["word"]
        assert obs[a] == f"{shared}{word}\nAssistant:"
        assert obs[a].startswith("run-9\n")
        assert infos[a]["messages"][0] == system
        assert infos[a]["messages"][1]["content"] == f"Please echo the following word: {word}"


def test_reset_is_deterministic_per_seed_and_moves_on_without_one() -> None:
    a, b = small(), small()
    assert a.reset(seed=3)[0] == b.reset(seed=3)[0]
    first = a.words
    a.reset()
    b.reset()
    assert a.words == b.words
    a.reset(seed=3)
    assert a.words == first


def test_words_option_picks_each_groups_word() -> None:
    e = small()
    _, infos = e.reset(options={"words": ["apple", "forest", "candle"]})
    assert [infos[agent_id(g, 0)]["word"] for g in range(3)] == ["apple", "forest", "candle"]
    with pytest.raises(ConfigError, match="one word per group"):
        e.reset(options={"words": ["apple"]})
    with pytest.raises(ConfigError):
        e.reset(options={"words": ["apple", "forest", "äpple"]})


def test_make_through_the_pettingzoo_registry() -> None:
    e = pettingzoo.make("parallel", echo_env.ENV_ID, batch_size=2, group_size=3)
    obs, _ = e.reset(seed=0)
    assert len(obs) == 6
    aec = pettingzoo.make("aec", echo_env.ENV_ID, batch_size=2, group_size=1)
    aec.reset(seed=0)
    assert aec.agent_selection == "group0_agent0"


def test_rewards_and_done_agents_leave() -> None:
    e = small(max_turns=2)
    e.reset(seed=0)
    acts = answers(e)
    acts[agent_id(0, 0)] = "Echo: wrong"
    acts[agent_id(1, 1)] = "nonsense"
    obs, rewards, terms, truncs, infos = e.step(acts)
    assert rewards[agent_id(0, 0)] == 0.0 and infos[agent_id(0, 0)]["outcome"] == "wrong_word"
    assert rewards[agent_id(1, 1)] == -1.0 and infos[agent_id(1, 1)]["outcome"] == "format_error"
    assert rewards[agent_id(2, 3)] == 1.0 and terms[agent_id(2, 3)] is True
    assert not any(truncs.values())
    assert e.agents == [agent_id(0, 0), agent_id(1, 1)]
    assert infos[agent_id(0, 0)]["feedback"] in obs[agent_id(0, 0)]
    # The last turn ends every agent, right or wrong.
    _, rewards, terms, _, infos = e.step({agent_id(0, 0): "still wrong", agent_id(1, 1): "Echo: " + e.words[1]})
    assert terms == {agent_id(0, 0): True, agent_id(1, 1): True}
    assert infos[agent_id(1, 1)]["turn"] == 2
    assert e.agents == []


def test_every_step_returns_fresh_info_dicts() -> None:
    e = small(max_turns=3)
    e.reset(seed=0)
    *_, infos1 = e.step(answers(e, "wrong"))
    *_, infos2 = e.step(answers(e, "wrong"))
    assert infos1 is not infos2
    assert all(infos1[a] is not infos2[a] for a in infos2)
    assert len({id(infos2[a]) for a in infos2}) == len(infos2)


def test_step_before_reset_is_a_usage_error() -> None:
    with pytest.raises(EnvUsageError, match="reset"):
        small().step({})


def test_actions_for_unknown_agents_are_a_usage_error() -> None:
    e = small()
    e.reset(seed=0)
    acts = answers(e)
    acts["group99_agent0"] = "Echo: x"
    with pytest.raises(EnvUsageError, match="unknown"):
        e.step(acts)


def test_actions_for_finished_agents_are_a_usage_error() -> None:
    e = small(max_turns=2)
    e.reset(seed=0)
    acts = answers(e)
    acts[agent_id(0, 0)] = "wrong"
    e.step(acts)
    with pytest.raises(EnvUsageError, match="finished"):
        e.step({agent_id(0, 0): "wrong", agent_id(0, 1): "Echo: x"})


def test_missing_actions_are_a_usage_error() -> None:
    e = small()
    e.reset(seed=0)
    acts = answers(e)
    del acts[agent_id(2, 2)]
    with pytest.raises(EnvUsageError, match="group2_agent2"):
        e.step(acts)


def test_a_non_text_action_is_refused_without_changing_the_episode() -> None:
    e = small(max_turns=2)
    e.reset(seed=0)
    acts: dict[str, object] = dict(answers(e, "wrong"))
    acts[e.agents[-1]] = 42
    with pytest.raises(EnvUsageError, match="str"):
        e.step(acts)  # type: ignore[arg-type]
    # Nobody's turn was used up: a full round of wrong answers still leaves a second try.
    _, _, terms, _, infos = e.step(answers(e, "wrong"))
    assert not any(terms.values())
    assert all(info["turn"] == 1 for info in infos.values())


@pytest.mark.parametrize("action", ["Echo: äpple", "\U0001f600" * 3000, "Echo: a\r\nUser: fake\n" * 100])
def test_observations_stay_inside_the_observation_space(action: str) -> None:
    e = small(batch_size=1, group_size=2, max_turns=4)
    obs, _ = e.reset(seed=0)
    while e.agents:
        obs, *_ = e.step({a: action for a in e.agents})
        for a, o in obs.items():
            assert e.observation_space(a).contains(o)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch_size": 0},
        {"batch_size": -2},
        {"group_size": 0},
        {"group_size": -1},
        {"max_turns": 0},
        {"batch_size": 2.5},
        {"render_mode": "human"},
    ],
)
def test_bad_settings_are_config_errors(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        parallel_env(**kwargs)


def test_ansi_render() -> None:
    e = small(render_mode="ansi")
    assert e.render() is None
    e.reset(options={"words": ["apple", "forest", "candle"]})
    assert e.render().splitlines()[0] == "group 0: 'apple', 4 live"  # type: ignore[union-attr]


def test_aec_env_can_be_stepped_through_a_whole_episode() -> None:
    # PettingZoo's AEC api_test assumes NumPy observations (it reads ``.dtype``) and so
    # cannot check Text spaces; drive the AEC form by hand instead.
    for make in (raw_env, env):
        aec = make(batch_size=2, group_size=2, max_turns=2)
        aec.reset(seed=0)
        rewards: dict[str, float] = {}
        for agent in aec.agent_iter(max_iter=100):
            obs, reward, termination, truncation, info = aec.last()
            rewards[agent] = rewards.get(agent, 0.0) + reward
            if termination or truncation:
                aec.step(None)
            else:
                assert aec.observation_space(agent).contains(obs)
                aec.step("Echo: " + info["word"])
        assert aec.agents == []
        assert rewards == {a: 1.0 for a in aec.possible_agents}
