"""Who may use the HTTP API, and how much of it at once (docs/api.md, "Access").

- An API that listens beyond loopback needs a bearer token, ``Authorization: Bearer KEY``,
  compared in constant time; a request without the right one gets 401. On loopback no token is
  needed (a given one is not looked at). The key comes from ``--api-key-file``, else from
  ``<state dir>/api.key``, created (0600, in a 0700 state dir) on the first start that needs it.
- ``/v1/down`` and ``/v1/tune`` answer only clients on this device (a loopback address): 403
  for any other, with or without the token. What a user types to tune stays on their device.
- Each client address has at most ``max_per_client`` requests in progress (streams included);
  one more gets 429 with ``Retry-After``.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from daemon.api.http import error_response, too_many_requests
from daemon.private_files import make_private_dir, write_private

log = logging.getLogger(__name__)

API_KEY_FILE_NAME = "api.key"
"""The key a node makes for itself, in its state dir."""
DEFAULT_MAX_PER_CLIENT = 8
"""Requests one client address may have in progress at once."""
RETRY_AFTER_S = 1
LOCAL_ONLY_PATHS = frozenset({"/v1/down", "/v1/tune"})
"""Routes only a client on this device may call: stopping the daemon, and tuning with its data."""
MIN_KEY_CHARS = 16
MAX_KEY_CHARS = 1024
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiKeyError(Exception):
    """The API key cannot be read or made; the message is one line for the user."""


def is_loopback_host(host: str) -> bool:
    """True when an API listening on ``host`` is reachable from this device only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost: it may resolve to anything
        return False


def is_loopback_client(remote: str | None) -> bool:
    """True when a request's peer address (``request.remote``) is on this device."""
    if not remote:
        return False
    try:
        address = ipaddress.ip_address(remote.partition("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


@dataclass(frozen=True)
class ApiKey:
    """The key an API beyond loopback checks, and where it is kept."""

    value: str
    path: Path
    created: bool
    """Made by this start (``<state dir>/api.key`` did not exist)."""

    def notice(self, api_url: str) -> str:
        """The start-up lines: the key itself when this start made it (once, as Jupyter
        prints its token), else where it is."""
        if self.created:
            return (f"meshllm: the API at {api_url} needs a key; clients send 'Authorization: Bearer KEY'.\n"
                    f"meshllm: made a new key, kept in {self.path} (meshllm commands on this device read it):\n"
                    f"    {self.value}")
        return (f"meshllm: the API at {api_url} needs the key in {self.path}; clients send "
                "'Authorization: Bearer KEY'")


def load_api_key(key_file: Path | None, state_dir: Path) -> ApiKey:
    """The key of ``--api-key-file`` when given (it must exist), else ``<state_dir>/api.key``,
    made when missing. Raises ApiKeyError."""
    if key_file is not None:
        return ApiKey(read_api_key(key_file), key_file, created=False)
    path = state_dir / API_KEY_FILE_NAME
    if path.exists():
        return ApiKey(read_api_key(path), path, created=False)
    value = secrets.token_urlsafe(32)
    try:
        make_private_dir(state_dir)
        write_private(path, (value + "\n").encode())
    except OSError as error:
        raise ApiKeyError(f"cannot write the API key {path}: {error.strerror or error}") from None
    return ApiKey(value, path, created=True)


def read_api_key(path: Path) -> str:
    """The key in ``path`` (surrounding white space dropped). Raises ApiKeyError."""
    try:
        raw = path.read_bytes()[:MAX_KEY_CHARS * 4]
    except OSError as error:
        raise ApiKeyError(f"cannot read the API key file {path}: {error.strerror or error}") from None
    return parse_api_key(raw, path)


def parse_api_key(raw: bytes, path: Path) -> str:
    """A key as a file holds it: 16..1024 visible ASCII characters, one word."""
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ApiKeyError(f"the API key file {path} is not ASCII text") from None
    if not MIN_KEY_CHARS <= len(text) <= MAX_KEY_CHARS or not all("!" <= c <= "~" for c in text):
        raise ApiKeyError(f"the API key file {path} must hold one word of {MIN_KEY_CHARS} to "
                          f"{MAX_KEY_CHARS} visible ASCII characters")
    return text


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header (None: no such header)."""
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def token_matches(given: str | None, key: str) -> bool:
    """Constant time in the content of the key (its length may show)."""
    if given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8", "replace"), key.encode("utf-8"))


class AccessGuard:
    """The middleware of the three rules above; ``api_key`` None: no token needed (loopback)."""

    def __init__(self, api_key: str | None, *, max_per_client: int = DEFAULT_MAX_PER_CLIENT) -> None:
        if max_per_client < 1:
            raise ValueError("max_per_client must be at least 1")
        self._api_key = api_key
        self._max_per_client = max_per_client
        self._in_progress: dict[str, int] = {}

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        remote = request.remote or "?"
        if _route_path(request) in LOCAL_ONLY_PATHS and not is_loopback_client(request.remote):
            log.warning("refused %s %s from %s: only a client on this device may call it",
                        request.method, request.path, remote)
            return error_response(403, f"{request.path} answers only clients on the daemon's own device",
                                  code="local_only")
        if self._api_key is not None and not token_matches(
                bearer_token(request.headers.get("Authorization")), self._api_key):
            return _unauthorized(request)
        count = self._in_progress.get(remote, 0)
        if count >= self._max_per_client:
            return too_many_requests(
                f"too many requests in progress from {remote} (at most {self._max_per_client} "
                f"at a time); retry after {RETRY_AFTER_S} s", code="too_many_requests", retry_after_s=RETRY_AFTER_S)
        self._in_progress[remote] = count + 1
        try:
            return await handler(request)
        finally:
            left = self._in_progress[remote] - 1
            if left:
                self._in_progress[remote] = left
            else:
                del self._in_progress[remote]


def _route_path(request: web.Request) -> str:
    """The path of the route that answers (the request's own path when none does)."""
    resource = request.match_info.route.resource
    return request.path if resource is None else resource.canonical


def _unauthorized(request: web.Request) -> web.Response:
    given = "Authorization" in request.headers
    message = ("the API key is wrong" if given else "this API needs a key") + \
        ": send 'Authorization: Bearer KEY' with the key in api.key in the daemon's state dir " \
        "(or the file of its --api-key-file); meshllm commands read it with --api-key-file FILE"
    response = error_response(401, message, code="invalid_api_key")
    response.headers["WWW-Authenticate"] = 'Bearer realm="meshllm"'
    return response
