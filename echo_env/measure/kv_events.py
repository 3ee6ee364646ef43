"""Which replica holds which prefix: vLLM's KV-cache events, read while a phase runs.

Counters say how often a replica hit; KV events say what it holds. A vLLM replica
started with ``--kv-events-config`` (see :func:`echo_env.launch.fleet.kv_events_config`;
``FleetConfig(kv_events=True)`` sets one ``ipc://`` endpoint per replica) publishes every
block it stores, evicts or clears on a ZeroMQ PUB socket. A message is three frames:
the topic, an 8-byte big-endian sequence number, and a msgpack payload
``[timestamp, [event, ...]]`` whose events are maps with a ``type`` of ``BlockStored``
(``block_hashes``, ``parent_block_hash``, ``token_ids``, ``block_size``...),
``BlockRemoved`` (``block_hashes``) or ``AllBlocksCleared``.

:class:`KVEventSubscriber` listens to every replica during a phase and keeps each one's
blocks (:class:`ReplicaBlocks`); :func:`block_census` then says which replicas hold a
shared prefix and how many blocks are stored on more than one replica. Blocks are
compared by content (the tokens of the whole prefix up to the block, the chaining of
:func:`echo_env.measure.tokens.block_chain`), never by hash: replicas need not hash alike.
Only what happens while subscribed is seen, so subscribe before the phase, on caches
that start empty (``POST /reset_prefix_cache``) or whose earlier content does not matter.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from echo_env.errors import EngineError
from echo_env.measure.tokens import TokenIds, block_chain

TOPIC = "kv"
"""The topic the fleet's replicas publish on."""

_SETTLE_S = 0.3


@dataclass(frozen=True)
class EventMessage:
    """One decoded ZeroMQ message of a replica's KV-event stream."""

    seq: int
    """The publisher's sequence number (consecutive unless messages were dropped)."""
    timestamp: float
    """When the batch was made (Unix seconds)."""
    events: tuple[Mapping[str, Any], ...]
    """The events, as maps with a ``type``."""


def decode_message(frames: Sequence[bytes]) -> EventMessage:
    """Decode ``[topic, sequence, payload]`` as vLLM's ZeroMQ publisher sends them.

    Raises:
        EngineError: The message does not have that shape.
    """
    import msgspec

    if len(frames) != 3:
        raise EngineError(f"a KV-event message has 3 frames (topic, sequence, payload), got {len(frames)}")
    try:
        body = msgspec.msgpack.decode(frames[2])
    except msgspec.DecodeError as exc:
        raise EngineError(f"a KV-event payload is not msgpack: {exc}") from None
    if not isinstance(body, list | tuple) or len(body) < 2 or not isinstance(body[1], list | tuple):
        raise EngineError(f"a KV-event payload is not [timestamp, [event, ...]]: {str(body)[:120]}")
    events = tuple(e for e in body[1] if isinstance(e, Mapping))
    return EventMessage(seq=int.from_bytes(frames[1], "big"), timestamp=float(body[0]), events=events)


def _key(value: Any) -> Hashable:
    # Block hashes arrive as ints or bytes (or lists, from some hash schemes): make them hashable.
    return tuple(value) if isinstance(value, list) else value


@dataclass
class ReplicaBlocks:
    """One replica's cached blocks, rebuilt from its events."""

    blocks: dict[Hashable, tuple[Hashable, tuple[int, ...]]] = field(default_factory=dict)
    """Block hash to (parent block hash, the block's tokens)."""
    messages: int = 0
    """Messages received."""
    stored: int = 0
    """Blocks stored while subscribed."""
    removed: int = 0
    """Blocks evicted while subscribed."""
    cleared: int = 0
    """Times the whole cache was cleared."""
    gaps: int = 0
    """Messages missed (gaps in the sequence numbers)."""
    _last_seq: int | None = None

    def apply(self, message: EventMessage) -> None:
        """Update the blocks with one message's events."""
        self.messages += 1
        if self._last_seq is not None and message.seq > self._last_seq + 1:
            self.gaps += message.seq - self._last_seq - 1
        self._last_seq = message.seq
        for event in message.events:
            kind = event.get("type")
            if kind == "BlockStored":
                hashes = [_key(h) for h in event.get("block_hashes") or ()]
                tokens = list(event.get("token_ids") or ())
                size = int(event.get("block_size") or 0)
                parent = _key(event.get("parent_block_hash"))
                for i, h in enumerate(hashes):
                    self.blocks[h] = (parent, tuple(tokens[i * size : (i + 1) * size]))
                    parent = h
                self.stored += len(hashes)
            elif kind == "BlockRemoved":
                for h in event.get("block_hashes") or ():
                    if self.blocks.pop(_key(h), None) is not None:
                        self.removed += 1
            elif kind == "AllBlocksCleared":
                self.blocks.clear()
                self.cleared += 1

    def content_keys(self) -> set[Hashable]:
        """Every held block as a content key: the whole prefix up to it (as :func:`block_chain` builds keys).

        A block whose chain back to the first block was not seen (stored before the
        subscription) is left out.
        """
        memo: dict[Hashable, Hashable | None] = {}

        def key_of(h: Hashable, depth: int = 0) -> Hashable | None:
            if h in memo:
                return memo[h]
            entry = self.blocks.get(h)
            if entry is None or depth > 10_000:
                return None
            parent, tokens = entry
            if parent is None:
                key: Hashable | None = (None, tokens)
            else:
                up = key_of(parent, depth + 1)
                key = None if up is None else (up, tokens)
            memo[h] = key
            return key

        return {k for h in list(self.blocks) if (k := key_of(h)) is not None}


@dataclass(frozen=True)
class BlockCensus:
    """Where blocks sit across the fleet at one moment."""

    replicas: tuple[str, ...]
    """The replicas, as named when subscribing."""
    blocks: tuple[int, ...]
    """Distinct blocks each replica holds (those whose whole prefix was seen)."""
    duplicated: int
    """Distinct blocks held by two replicas or more."""
    shared_prefix_blocks: int
    """Whole blocks of the shared prefix asked about (0 when none was given)."""
    prefix_holders: tuple[str, ...]
    """Replicas that hold every whole block of that prefix."""
    distinct: int
    """Distinct blocks the fleet holds (a block on two replicas counts once)."""

    @property
    def duplicated_share(self) -> float | None:
        """Duplicated blocks over the distinct blocks the fleet holds."""
        return self.duplicated / self.distinct if self.distinct else None


def block_census(
    states: Mapping[str, ReplicaBlocks], shared_prefix: TokenIds | None = None, block_size: int = 128
) -> BlockCensus:
    """Which replicas hold a shared prefix, and how much the replicas store twice.

    Args:
        states: Each replica's blocks, by name (its URL).
        shared_prefix: Token ids of a prefix to look for (say, the system prompt as the
            server tokenizes it); only its whole blocks count.
        block_size: The cache block size in tokens.

    Returns:
        The census.
    """
    keys = {name: s.content_keys() for name, s in states.items()}
    holders: dict[Hashable, int] = {}
    for ks in keys.values():
        for k in ks:
            holders[k] = holders.get(k, 0) + 1
    prefix_keys = block_chain(shared_prefix, block_size, whole=True) if shared_prefix is not None else []
    holding = tuple(name for name, ks in keys.items() if prefix_keys and all(k in ks for k in prefix_keys))
    return BlockCensus(
        replicas=tuple(states),
        blocks=tuple(len(keys[name]) for name in states),
        duplicated=sum(1 for n in holders.values() if n > 1),
        shared_prefix_blocks=len(prefix_keys),
        prefix_holders=holding,
        distinct=len(holders),
    )


class KVEventSubscriber:
    """Listens to each replica's KV events while a phase runs (``async with``).

    Args:
        endpoints: Replica name (its URL) to its publisher endpoint (``ipc://...`` or
            ``tcp://127.0.0.1:PORT`` when the replica binds ``tcp://*:PORT``).
        topic: The topic the replicas publish on.
    """

    def __init__(self, endpoints: Mapping[str, str], topic: str = TOPIC) -> None:
        self.endpoints = dict(endpoints)
        self.topic = topic
        self.states: dict[str, ReplicaBlocks] = {name: ReplicaBlocks() for name in self.endpoints}
        """Each replica's blocks so far."""
        self.errors: list[str] = []
        """Messages that could not be decoded."""
        self._ctx: Any = None
        self._sockets: list[Any] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> KVEventSubscriber:
        try:
            import zmq
            import zmq.asyncio
        except ImportError:
            raise EngineError(
                "reading KV events needs pyzmq and msgspec (installed with vLLM): pip install pyzmq msgspec"
            ) from None
        self._ctx = zmq.asyncio.Context()
        for name, endpoint in self.endpoints.items():
            sock = self._ctx.socket(zmq.SUB)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt_string(zmq.SUBSCRIBE, self.topic)
            sock.connect(endpoint)
            self._sockets.append(sock)
            self._tasks.append(asyncio.create_task(self._read(name, sock)))
        # A SUB socket receives only after its connection is up ("slow joiner").
        await asyncio.sleep(_SETTLE_S)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # The publisher sends a step's events after the step: let the last ones arrive.
        await asyncio.sleep(_SETTLE_S)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for sock in self._sockets:
            sock.close(linger=0)
        if self._ctx is not None:
            self._ctx.term()
        self._tasks, self._sockets, self._ctx = [], [], None

    async def _read(self, name: str, sock: Any) -> None:
        state = self.states[name]
        while True:
            frames = await sock.recv_multipart()
            try:
                state.apply(decode_message(frames))
            except EngineError as exc:
                self.errors.append(f"{name}: {exc}")

    def census(self, shared_prefix: TokenIds | None = None, block_size: int = 128) -> BlockCensus:
        """:func:`block_census` of what was seen so far."""
        return block_census(self.states, shared_prefix, block_size)
