"""Every Python block in README.md runs, as a reader would copy it.

Each block runs in a fresh interpreter. A block that talks to a server names the
documented address ``http://127.0.0.1:8000/v1``; the test puts the session engine's
address in its place, and such blocks are marked ``engine``. The rest run offline.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"

PLACEHOLDER_URL = "http://127.0.0.1:8000/v1"
"""The server address README blocks use; replaced by the engine's for the test."""

PYTHON_BLOCK = re.compile(r"^```python\n(?P<code>.*?)^```$", re.M | re.S)

LIBRARIES = ("trl", "tinker_cookbook", "verifiers")
"""RL libraries a block may import; `make test` installs them (ECHO_ENV_REQUIRE_RL=1)."""


def readme_blocks(text: str) -> list[tuple[str, str]]:
    """``(id, code)`` of every Python block: the id is the heading above it and its number under it."""
    blocks, counts = [], dict[str, int]()
    for m in PYTHON_BLOCK.finditer(text):
        headings = re.findall(r"^#+ (.+)$", text[: m.start()], re.M)
        heading = re.sub(r"\W+", "-", headings[-1] if headings else "top").strip("-").lower()
        counts[heading] = counts.get(heading, 0) + 1
        blocks.append((f"{heading}-{counts[heading]}", m["code"]))
    return blocks


BLOCKS = readme_blocks(README.read_text())
OFFLINE = [pytest.param(code, id=name) for name, code in BLOCKS if PLACEHOLDER_URL not in code]
ONLINE = [pytest.param(code, id=name) for name, code in BLOCKS if PLACEHOLDER_URL in code]


def run_block(code: str, cwd: Path, timeout_s: float) -> None:
    """Run one block in a fresh interpreter in ``cwd``; fail with its output unless it exits 0."""
    for library in LIBRARIES:
        if re.search(rf"^\s*(from|import) {library}\b", code, re.M) and importlib.util.find_spec(library) is None:
            if os.environ.get("ECHO_ENV_REQUIRE_RL") == "1":
                pytest.fail(f"the block imports {library}, which is not installed: run `make install-rl`")
            pytest.skip(f"{library} is not installed (`make install-rl`)")
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"the README block did not finish in {timeout_s:.0f} s:\n{code}")
    if done.returncode != 0:
        pytest.fail(f"README block failed (exit {done.returncode}):\n{code}\n--- stderr:\n{done.stderr}")


def test_readme_has_offline_and_server_blocks() -> None:
    assert len(OFFLINE) >= 2 and len(ONLINE) >= 1, [name for name, _ in BLOCKS]


def test_block_extraction_reads_fences_and_headings() -> None:
    text = "# A\n\n```python\nprint(1)\n```\n\n## B c\n\n```bash\nls\n```\n\n```python\nx = 2\n```\n"
    assert readme_blocks(text) == [("a-1", "print(1)\n"), ("b-c-1", "x = 2\n")]


def test_a_failing_block_fails_the_test(tmp_path: Path) -> None:
    with pytest.raises(pytest.fail.Exception, match="ModuleNotFoundError"):
        run_block("import echo_env.worker\n", tmp_path, 60)


@pytest.mark.parametrize("code", OFFLINE)
def test_offline_block_runs(code: str, tmp_path: Path) -> None:
    run_block(code, tmp_path, 300)


@pytest.mark.engine
@pytest.mark.parametrize("code", ONLINE)
def test_server_block_runs(code: str, engine: Any, tmp_path: Path) -> None:
    run_block(code.replace(PLACEHOLDER_URL, engine.base_url), tmp_path, 300)
