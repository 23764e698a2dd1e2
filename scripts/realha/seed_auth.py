"""Seed a fresh Home Assistant config dir with an owner and a long-lived access token.

Usage: python seed_auth.py CONFIG_DIR   (prints the bearer token on stdout)

Must run before HA starts for the first time in CONFIG_DIR: afterwards HA owns ``.storage``.
Onboarding is marked done so HA never asks, a shopping list (``todo.shopping_list``) is
configured, and no ``person`` is created (the refresh token
belongs to an owner user with no credentials, like the token a person would mint in the UI).
The token is the HS256 JWT HA itself would issue for that refresh token. Stdlib only.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

TEN_YEARS = 10 * 365 * 24 * 3600


def b64url(raw: bytes) -> bytes:
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


def seed(config_dir: Path) -> str:
    storage = config_dir / ".storage"
    if (storage / "auth").exists():
        sys.exit(f"{storage / 'auth'} exists: seed only a fresh config dir")
    storage.mkdir(parents=True, exist_ok=True)
    user_id, refresh_id = secrets.token_hex(16), secrets.token_hex(16)
    jwt_key = secrets.token_hex(64)
    auth = {
        "version": 1,
        "minor_version": 1,
        "key": "auth",
        "data": {
            "users": [
                {
                    "id": user_id,
                    "group_ids": ["system-admin"],
                    "is_owner": True,
                    "is_active": True,
                    "name": "agentgate tests",
                    "system_generated": False,
                    "local_only": False,
                }
            ],
            "groups": [
                {"id": "system-admin", "name": "Administrators"},
                {"id": "system-users", "name": "Users"},
                {"id": "system-read-only", "name": "Read Only"},
            ],
            "credentials": [],
            "refresh_tokens": [
                {
                    "id": refresh_id,
                    "user_id": user_id,
                    "client_id": None,
                    "client_name": "agentgate-realha",
                    "client_icon": None,
                    "token_type": "long_lived_access_token",
                    "created_at": datetime.now(UTC).isoformat(),
                    "access_token_expiration": float(TEN_YEARS),
                    "token": secrets.token_hex(64),
                    "jwt_key": jwt_key,
                    "last_used_at": None,
                    "last_used_ip": None,
                    "expire_at": None,
                    "credential_id": None,
                    "version": None,
                }
            ],
        },
    }
    onboarding = {
        "version": 4,
        "minor_version": 1,
        "key": "onboarding",
        "data": {"done": ["user", "core_config", "analytics", "integration"]},
    }
    # The shopping list (todo.shopping_list) is set up from a config entry only: its YAML
    # import opens a form nobody answers. HA adds its own entries (sun, demo) next to it.
    stamp = datetime.now(UTC).isoformat()
    config_entries = {
        "version": 1,
        "minor_version": 5,
        "key": "core.config_entries",
        "data": {
            "entries": [
                {
                    "created_at": stamp,
                    "data": {},
                    "disabled_by": None,
                    "discovery_keys": {},
                    "domain": "shopping_list",
                    "entry_id": secrets.token_hex(13).upper(),
                    "minor_version": 1,
                    "modified_at": stamp,
                    "options": {},
                    "pref_disable_new_entities": False,
                    "pref_disable_polling": False,
                    "source": "user",
                    "subentries": [],
                    "title": "Shopping list",
                    "unique_id": "shopping_list",
                    "version": 1,
                }
            ]
        },
    }
    (storage / "auth").write_text(json.dumps(auth, indent=2))
    (storage / "onboarding").write_text(json.dumps(onboarding, indent=2))
    (storage / "core.config_entries").write_text(json.dumps(config_entries, indent=2))

    now = int(time.time())
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    claims = {"iss": refresh_id, "iat": now, "exp": now + TEN_YEARS}
    payload = b64url(json.dumps(claims, separators=(",", ":")).encode())
    signature = b64url(hmac.new(jwt_key.encode(), header + b"." + payload, hashlib.sha256).digest())
    return (header + b"." + payload + b"." + signature).decode()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(seed(Path(sys.argv[1])))
