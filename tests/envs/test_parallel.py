"""The PettingZoo parallel env: API tests, groups, the shared prefix, turns, sessions, misuse, and AEC."""

from __future__ import annotations

import pettingzoo
import pytest
from pettingzoo.test import parallel_api_test, parallel_seed_test

import echo_env
from echo_env.envs.parallel import EchoPrefixParallelEnv, agent_group, agent_id, env, parallel_env, raw_env
from echo_env.envs.task import EchoTask
from echo_env.errors import ConfigError, EnvUsageError


def small(**kwargs: object) -> EchoPrefixParallelEnv:
    return parallel_env(**{"batch_size": 3, "group_size": 4, **kwargs})


def answers(e: EchoPrefixParallelEnv, template: str = "Echo: {word}") -> dict[str, str]:
    return {a: template.format(word=e.word_of(a)) for a in e.agents}


@pytest.mark.parametrize(("max_turns", "turns"), [(1, 1), (3, 1), (1, 3), (2, 3)])
def test_parallel_api_test_passes(max_turns: int, turns: int) -> None:
    parallel_api_test(small(max_turns=max_turns, turns=turns), num_cycles=20)


@pytest.mark.parametrize(("max_turns", "turns"), [(2, 1), (1, 3), (2, 2)])
def test_parallel_seed_test_passes(max_turns: int, turns: int) -> None:
    parallel_seed_test(lambda: small(max_turns=max_turns, turns=turns))


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
    assert (infos[agent_id(1, 1)]["turn"], infos[agent_id(1, 1)]["attempt"]) == (0, 2)
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
    assert all(info["attempt"] == 1 for info in infos.values())


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
        {"turns": 0},
        {"turns": 2, "max_turns": 200},
        {"turns": 3, "task": EchoTask(words=("alpha", "beta"))},
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


@pytest.mark.parametrize("turns", [1, 3])
def test_aec_env_can_be_stepped_through_a_whole_episode(turns: int) -> None:
    # PettingZoo's AEC api_test assumes NumPy observations (it reads ``.dtype``) and so
    # cannot check Text spaces; drive the AEC form by hand instead.
    for make in (raw_env, env):
        aec = make(batch_size=2, group_size=2, max_turns=2, turns=turns)
        aec.reset(seed=0)
        rewards: dict[str, float] = {}
        for agent in aec.agent_iter(max_iter=100):
            obs, reward, termination, truncation, info = aec.last()
            rewards[agent] = rewards.get(agent, 0.0) + reward
            if termination or truncation:
                aec.step(None)
            else:
                assert aec.observation_space(agent).contains(obs)
                aec.step("Echo: " + (info["next_word"] if "next_word" in info else info["word"]))
        assert aec.agents == []
        assert rewards == {a: float(turns) for a in aec.possible_agents}


# --- multi-turn episodes ------------------------------------------------------------------


def test_a_group_gets_the_same_word_at_each_turn_and_different_words_across_turns() -> None:
    e = small(batch_size=4, turns=3)
    obs, infos = e.reset(seed=2)
    words = e.episode_words
    one_turn = small(batch_size=4)
    one_turn.reset(seed=2)
    assert [ws[0] for ws in words] == e.words == one_turn.words
    assert all(len(set(ws)) == 3 for ws in words)
    for turn in range(3):
        asked = {a: (infos[a]["word"] if turn == 0 else infos[a]["next_word"]) for a in e.agents}
        for a in e.agents:
            assert asked[a] == words[agent_group(a)][turn] == e.word_of(a)
            assert e.turn_of(a) == turn
        # Identical answers keep a group's prompts identical, turn after turn.
        for g in range(4):
            assert len({obs[a] for a in e.agents if agent_group(a) == g}) == 1
        obs, _, terms, _, infos = e.step({a: " Echo: " + e.word_of(a) for a in e.agents})
        assert all(terms.values()) == (turn == 2)
    assert e.agents == []
    assert e.state() == " ".join("/".join(ws) for ws in words)


def test_turn_words_are_seeded_and_the_first_words_match_a_one_turn_env() -> None:
    a, b = small(turns=3), small(turns=3)
    a.reset(seed=9)
    b.reset(seed=9)
    assert a.episode_words == b.episode_words
    one = small()
    one.reset(seed=9)
    assert a.words == one.words
    a.reset()
    one.reset()
    assert a.words == one.words
    assert a.episode_words != b.episode_words


def test_agents_of_a_group_move_on_at_their_own_pace() -> None:
    e = small(batch_size=1, group_size=2, turns=2, max_turns=2)
    e.reset(options={"words": [["apple", "forest"]]})
    fast, slow = agent_id(0, 0), agent_id(0, 1)
    obs, _, _, _, infos = e.step({fast: " Echo: apple", slow: " Echo: apples"})
    assert (infos[fast]["next_word"], infos[slow]["next_word"]) == ("forest", "apple")
    assert obs[fast].endswith("Correct! Echo matched. Please echo the following word: forest\nAssistant:")
    assert obs[slow].endswith("Please echo the following word: apple\nAssistant:")
    _, _, terms, _, infos = e.step({fast: " Echo: forest", slow: " Echo: apple"})
    assert terms == {fast: True, slow: False}
    assert (infos[slow]["turn"], infos[slow]["attempt"], infos[slow]["next_word"]) == (0, 2, "forest")
    assert e.agents == [slow]
    _, _, terms, _, infos = e.step({slow: " Echo: forest"})
    assert terms == {slow: True} and infos[slow]["turn"] == 1


def test_observations_and_messages_extend_turn_after_turn() -> None:
    e = small(batch_size=2, group_size=2, turns=3, max_turns=2)
    obs, infos = e.reset(seed=0)
    replies = [" Echo: {w}", "Echo: {w}\n", " echo {w}", " Echo: {w}"]
    step = 0
    while e.agents:
        acts = {a: replies[(step + i) % len(replies)].format(w=e.word_of(a)) for i, a in enumerate(e.agents)}
        next_obs, _, terms, _, next_infos = e.step(acts)
        for a, reply in acts.items():
            assert next_obs[a].startswith(obs[a] + reply)
            old = infos[a]["messages"]
            assert next_infos[a]["messages"][: len(old)] == old
            assert next_infos[a]["messages"][len(old)] == {"role": "assistant", "content": reply}
            assert next_obs[a].endswith("\nAssistant:") != terms[a]
        obs, infos = next_obs, next_infos
        step += 1
    assert 3 <= step <= 6


def test_session_ids_are_per_agent_stable_over_turns_and_new_each_episode() -> None:
    e = small(turns=2)
    _, infos = e.reset(seed=5)
    first = {a: infos[a]["session_id"] for a in e.agents}
    assert len(set(first.values())) == len(first)
    assert first[agent_id(1, 2)] == e.session_id(agent_id(1, 2)) == "seed5-ep0-group1_agent2"
    while e.agents:
        _, _, _, _, infos = e.step({a: " Echo: " + e.word_of(a) for a in e.agents})
        assert all(infos[a]["session_id"] == first[a] for a in infos)
    _, infos = e.reset()
    assert infos[agent_id(1, 2)]["session_id"] == "seed5-ep1-group1_agent2"
    assert small(turns=2).reset(seed=5)[1] == small(turns=2).reset(seed=5)[1]
    unseeded = small()
    unseeded.reset()
    assert unseeded.session_id(agent_id(0, 0)).startswith("run")
    with pytest.raises(EnvUsageError):
        unseeded.session_id("group99_agent0")
    with pytest.raises(EnvUsageError, match="reset"):
        small().session_id(agent_id(0, 0))


def test_words_option_takes_a_list_per_group_with_several_turns() -> None:
    e = small(turns=2)
    e.reset(options={"words": [["apple", "forest"], ["candle", "apple"], ["garden", "window"]]})
    assert e.episode_words == [["apple", "forest"], ["candle", "apple"], ["garden", "window"]]
    with pytest.raises(ConfigError, match="list of 2 different words"):
        e.reset(options={"words": ["apple", "forest", "candle"]})
    with pytest.raises(ConfigError, match="different words"):
        e.reset(options={"words": [["apple", "apple"], ["candle", "apple"], ["garden", "window"]]})
    with pytest.raises(ConfigError, match="one word per group"):
        e.reset(options={"words": [["apple", "forest"]]})


def test_ansi_render_lists_every_turns_word() -> None:
    e = small(render_mode="ansi", turns=2)
    e.reset(options={"words": [["apple", "forest"], ["candle", "apple"], ["garden", "window"]]})
    assert e.render().splitlines()[0] == "group 0: 'apple' 'forest', 4 live"  # type: ignore[union-attr]
