"""Secrets from the environment: the passphrase variables and their one reader.

Passphrases never come from argv (``ps`` would show them) nor from config files (they
are shared and versioned); they come from an environment variable, read at the
composition layer only (cores never read env). These names are the defaults every
command and the node runtime agree on.
"""

from __future__ import annotations

import os
from collections.abc import Callable

#: node identity key passphrase (``ca issue``, ``sentry run``, ``node run``, ``publish``…)
PASS_ENV = "PQCNET_NODE_PASSPHRASE"
#: mesh CA key passphrase (``ca …``, a node's ``control_plane.ca_dir``)
CA_PASS_ENV = "PQCNET_CA_PASSPHRASE"
#: tenant issuer key passphrase (``assertion keygen/issue``, ``sidecar``)
ISSUER_PASS_ENV = "PQCNET_ISSUER_PASSPHRASE"


def env_passphrase(name: str, *,
                   missing: Callable[[str], Exception] | None = None) -> bytes | None:
    """``$name`` as bytes; None when unset or empty — or, with ``missing``, raise
    ``missing(message)`` when the variable is unset (a passphrase was promised)."""
    value = os.environ.get(name)
    if value is None and missing is not None:
        raise missing(f"${name} is not set (it holds the key passphrase)")
    return value.encode() if value else None


__all__ = ["CA_PASS_ENV", "ISSUER_PASS_ENV", "PASS_ENV", "env_passphrase"]
