"""Who is asking: API tokens (stored as SHA-256 hashes in a YAML file, e.g. a mounted Kubernetes secret), a
trusted reverse proxy's user header, or nobody; roles viewer < submitter < admin; CSRF on cookie posts.

Tokens file:  `tokens: [{name: alice, role: submitter, sha256: <hex of sha256(token)>}]`
(`alignlab dashboard --tokens FILE --new-token alice:submitter` appends one and prints the token once).
A token arrives as `Authorization: Bearer <token>` (scripts) or in the HttpOnly cookie the login form sets
(browsers). A post authenticated by an ambient credential (cookie, proxy header, or no auth on 127.0.0.1)
must carry the CSRF token of that credential (form field `csrf` or header `X-CSRF-Token`); bearer posts need
none, a browser never adds that header on its own. Tokens never go into URLs, logs or error messages.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from pathlib import Path

import yaml
from fastapi import HTTPException, Request

ROLES = ("viewer", "submitter", "admin")
COOKIE = "alignlab_token"


@dataclass(frozen=True)
class User:
    name: str
    role: str
    via: str  # "bearer", "cookie", "proxy" or "none" (authentication off)
    credential: str  # what the CSRF token is bound to (a token hash, the proxy user, or "local")

    def can(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def load_tokens(path: Path) -> dict[str, tuple[str, str]]:
    """sha256 hex -> (name, role) from the tokens file; ValueError naming the file and the bad entry."""
    if not path.is_file():
        raise ValueError(f"tokens file {path} does not exist; create it with "
                         f"`alignlab dashboard --tokens {path} --new-token NAME:ROLE`")
    tree = yaml.safe_load(path.read_text()) or {}
    entries = tree.get("tokens") if isinstance(tree, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected `tokens:` with a list of {{name, role, sha256}} entries")
    out = {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) != {"name", "role", "sha256"}:
            raise ValueError(f"{path}: tokens[{index}] must have exactly the keys name, role, sha256")
        if entry["role"] not in ROLES:
            raise ValueError(f"{path}: tokens[{index}].role {entry['role']!r} must be one of {list(ROLES)}")
        digest = str(entry["sha256"]).lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"{path}: tokens[{index}].sha256 must be 64 hex digits (sha256 of the token)")
        out[digest] = (str(entry["name"]), entry["role"])
    return out


def add_token(path: Path, name: str, role: str) -> str:
    """Append a new random token for `name` with `role` to the tokens file (created); returns the token."""
    if role not in ROLES:
        raise ValueError(f"role {role!r} must be one of {list(ROLES)}")
    tree = (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
    token = secrets.token_urlsafe(32)
    tree.setdefault("tokens", []).append({"name": name, "role": role, "sha256": hash_token(token)})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    path.chmod(0o600)
    return token


class Authenticator:
    def __init__(self, tokens: dict[str, tuple[str, str]] | None, proxy_header: str | None, proxy_role: str,
                 secret_key: bytes | None):
        self.tokens = tokens
        self.proxy_header = proxy_header
        self.proxy_role = proxy_role
        self.secret = secret_key or secrets.token_bytes(32)

    @property
    def enabled(self) -> bool:
        return self.tokens is not None or self.proxy_header is not None

    def identify(self, request: Request) -> User | None:
        if not self.enabled:
            return User("local", "admin", "none", "local")
        if self.proxy_header and request.headers.get(self.proxy_header):
            name = request.headers[self.proxy_header]
            return User(name, self.proxy_role, "proxy", f"proxy:{name}")
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            return self._by_token(header[7:].strip(), "bearer")
        if request.cookies.get(COOKIE):
            return self._by_token(request.cookies[COOKIE], "cookie")
        return None

    def _by_token(self, token: str, via: str) -> User | None:
        digest = hash_token(token)
        found = (self.tokens or {}).get(digest)
        return User(found[0], found[1], via, digest) if found else None

    def check_login(self, token: str) -> bool:
        return self._by_token(token, "cookie") is not None

    def csrf_token(self, user: User) -> str:
        return hmac.new(self.secret, f"csrf:{user.credential}".encode(), hashlib.sha256).hexdigest()

    def check_csrf(self, user: User, presented: str | None) -> None:
        if user.via == "bearer":
            return
        if not presented or not hmac.compare_digest(presented, self.csrf_token(user)):
            raise HTTPException(403, "missing or wrong CSRF token: reload the page and post the form again")

    def require(self, request: Request, role: str) -> User:
        """The user, or 401 (unknown) / 403 (role too low)."""
        user = self.identify(request)
        if user is None:
            raise HTTPException(401, "authentication required: send `Authorization: Bearer <token>` or log in",
                                headers={"WWW-Authenticate": "Bearer"})
        if not user.can(role):
            raise HTTPException(403, f"role {user.role!r} may not do this; it needs {role!r}")
        return user
