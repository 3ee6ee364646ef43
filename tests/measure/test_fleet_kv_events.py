"""Reading vLLM's KV-cache events (which replica holds which prefix), without a server.

Needs ``msgspec`` (vLLM's event encoding), and ``zmq`` for the subscriber: the whole module is
skipped without msgspec, so the routing verdict's tables (``tests/cachetest/test_fleet_verdict.py``) run
in every test command whatever is installed.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from echo_env.errors import EngineError

msgspec = pytest.importorskip("msgspec")

B = 4
SHARED = [1, 2, 3, 4, 5, 6, 7, 8]


def prompt(group: int) -> list[int]:
    own = [100 + 10 * group + i for i in range(8)]
    return SHARED + own + [900 + group, 901, 902]


def stored(hashes: list[int], parent: int | None, tokens: list[int], size: int = B) -> dict[str, Any]:
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent, "token_ids": tokens,
            "block_size": size, "lora_id": None, "medium": "CPU"}  # fmt: skip


def frames(seq: int, *events: dict[str, Any]) -> list[bytes]:
    return [b"kv", seq.to_bytes(8, "big"), msgspec.msgpack.encode([1700000000.0, list(events)])]


def test_decode_message_reads_vllms_three_frames() -> None:
    from echo_env.measure.kv_events import decode_message

    msg = decode_message(frames(7, stored([11], None, SHARED[:4])))
    assert (msg.seq, msg.timestamp, msg.events[0]["type"]) == (7, 1700000000.0, "BlockStored")
    with pytest.raises(EngineError, match="3 frames"):
        decode_message([b"kv"])
    with pytest.raises(EngineError, match="timestamp"):
        decode_message([b"kv", b"\0" * 8, msgspec.msgpack.encode({"x": 1})])


def test_replica_blocks_follow_store_remove_and_clear() -> None:
    from echo_env.measure.kv_events import ReplicaBlocks, decode_message

    state = ReplicaBlocks()
    state.apply(decode_message(frames(1, stored([11, 12], None, SHARED))))
    state.apply(decode_message(frames(2, stored([13], 12, prompt(0)[8:12]))))
    assert (state.stored, len(state.blocks)) == (3, 3)
    state.apply(decode_message(frames(5, {"type": "BlockRemoved", "block_hashes": [13], "medium": "CPU"})))
    assert (state.removed, state.gaps, len(state.blocks)) == (1, 2, 2)
    state.apply(decode_message(frames(6, {"type": "AllBlocksCleared"})))
    assert (state.cleared, state.blocks) == (1, {})


def test_census_finds_the_prefix_holders_and_the_duplicated_blocks() -> None:
    from echo_env.measure.kv_events import ReplicaBlocks, block_census, decode_message

    a, b = ReplicaBlocks(), ReplicaBlocks()
    # Both replicas store the shared 2 blocks (under different hashes) and one group block each.
    a.apply(decode_message(frames(1, stored([11, 12, 13], None, prompt(0)[:12]))))
    b.apply(decode_message(frames(1, stored([21, 22, 23], None, prompt(1)[:12]))))
    census = block_census({"http://a": a, "http://b": b}, shared_prefix=SHARED, block_size=B)
    assert census.prefix_holders == ("http://a", "http://b")
    assert (census.blocks, census.duplicated, census.distinct, census.shared_prefix_blocks) == ((3, 3), 2, 4, 2)
    assert census.duplicated_share == pytest.approx(0.5)
    only_b = block_census({"http://a": ReplicaBlocks(), "http://b": b}, shared_prefix=SHARED, block_size=B)
    assert only_b.prefix_holders == ("http://b",) and only_b.duplicated == 0


def test_a_block_whose_chain_was_not_seen_is_left_out() -> None:
    from echo_env.measure.kv_events import ReplicaBlocks, decode_message

    state = ReplicaBlocks()
    state.apply(decode_message(frames(1, stored([13], 12, prompt(0)[8:12]))))  # parent 12 stored before we listened
    assert state.content_keys() == set()


def test_subscriber_reads_a_publisher_over_ipc(tmp_path: Any) -> None:
    zmq = pytest.importorskip("zmq")
    from echo_env.measure.kv_events import KVEventSubscriber

    endpoint = f"ipc://{tmp_path}/replica-0.sock"
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.bind(endpoint)

    async def run() -> KVEventSubscriber:
        async with KVEventSubscriber({"http://a": endpoint}) as sub:
            for seq in range(1, 4):
                pub.send_multipart(frames(seq, stored([seq], seq - 1 or None, [seq] * B)))
                await asyncio.sleep(0.05)
        return sub

    try:
        sub = asyncio.run(run())
    finally:
        pub.close(linger=0)
        ctx.term()
    state = sub.states["http://a"]
    assert (state.messages, state.stored, state.gaps, sub.errors) == (3, 3, 0, [])
    assert sub.census().blocks == (3,)
