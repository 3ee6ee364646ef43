"""Secrets out of everything a run writes or prints: config keys, URL passwords, bearer tokens.

Every file the package writes (``summary.json``, ``requests.jsonl``, ``phases.csv``,
rollout and benchmark results) and the console summary go through :func:`redact`, so an
API key never lands in a file a user might attach to a bug report.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

REDACTED = "***"
"""What a secret value is replaced with."""

# A key is secret when its last word names a credential. Anchoring at the end is what
# keeps the many token *counts* (``prompt_tokens``, ``max_tokens``) and ``token_plan``
# readable while ``hf_token``, ``api_key`` and ``wandb_api_key`` are hidden.
_SECRET_KEY_RE = re.compile(
    r"(?:^|_)(?:token|api_?key|(?:access|secret|private)_?key|secret|password|passwd|"
    r"authorization|auth|bearer|credentials?|cookie)$"
)
# Credentials can also hide inside values: ``https://user:pass@host`` and header text.
# The bounded scheme keeps the scan linear: an unbounded one backtracks quadratically
# over a long run of letters (a prompt, a padded config value).
_URL_USERINFO_RE = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]{0,15}://)(?P<user>[^/@\s:]*):(?P<pw>[^/@\s]+)@")
_BEARER_RE = re.compile(r"(?i)\b(bearer\s+)[^\s\"',]+")


def is_secret_key(name: str) -> bool:
    """Whether a mapping key names a credential whose value must not be written.

    ``api_key``, ``Authorization``, ``hf_token``, ``wandb-api-key`` are secret;
    ``prompt_tokens``, ``max_tokens``, ``token_plan`` and ``tokenized_by`` are not.

    Args:
        name: The key, in any case, with ``-`` or ``_`` between words.

    Returns:
        True when the value under this key should be replaced by :data:`REDACTED`.
    """
    return bool(_SECRET_KEY_RE.search(name.strip().lower().replace("-", "_")))


def redact_text(text: str) -> str:
    """``text`` without URL passwords (``http://user:***@host``) and bearer tokens (``Bearer ***``).

    Args:
        text: Any text: a URL, an error message, a whole console report.

    Returns:
        The text with those secrets replaced by :data:`REDACTED`.
    """
    text = _URL_USERINFO_RE.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)
    return _BEARER_RE.sub(lambda m: f"{m.group(1)}{REDACTED}", text)


def redact(obj: Any) -> Any:
    """A copy of ``obj`` with every secret replaced by ``"***"``.

    Values under secret keys (see :func:`is_secret_key`) are replaced whatever their
    type, except None, which stays None so the file still tells "no key was set" from
    "a key was set". Strings anywhere also lose URL passwords and bearer tokens.

    Args:
        obj: Any JSON-like value: mappings, sequences, strings, numbers, None.

    Returns:
        A new object of the same shape; ``obj`` is not modified.
    """
    if isinstance(obj, Mapping):
        return {
            key: (REDACTED if value is not None and is_secret_key(str(key)) else redact(value))
            for key, value in obj.items()
        }
    if isinstance(obj, list | tuple):
        return [redact(item) for item in obj]
    if isinstance(obj, str):
        return redact_text(obj)
    return obj
