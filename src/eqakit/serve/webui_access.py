"""Who may use the web UI, and where it may write.

The page runs models, trains and writes files, so it is guarded three ways:

- `HostCheck`: a request must name, in its Host header, a name this server was started for
  (loopback addresses and ``localhost``, the --host address, each --allowed-host). A web page on
  another site cannot then reach the UI by pointing its own name at 127.0.0.1 (DNS rebinding): the
  browser still sends that site's name. An address typed as digits cannot be rebound, so a server
  bound to all interfaces (0.0.0.0, ::) takes any IP address as Host.
- An access key (`access_key`): the API server's ``API_KEY`` convention, or --access-key-file.
  Gradio's login page asks for it (any user name, the key as password) and its cookie then opens
  every Gradio route; `AccessGate` refuses the few /gradio_api routes Gradio leaves open without a
  login (run history, streams, cancel, heartbeat). A page bound beyond loopback needs one to start.
- `WriteRoots`: the tabs that write or run (Train, Evaluate, Export, Save config) take paths only
  inside the directories the page was started with: the working directory, the command line's
  config's directory and each --allow-dir. Paths are resolved first (``..``, symlinks), so a path
  that only looks inside is refused too.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from pathlib import Path
from typing import Any

from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from eqakit.errors import EqakitError
from eqakit.serve.webui_model import UIError

WILDCARDS = {"0.0.0.0", "::", ""}  # --host values that bind every interface
# The keys of a train, predict or export config that name a place the run writes to.
WRITE_KEYS = ("output_dir", "export_dir", "logging_dir", "cache_dir")
# Gradio routes under /gradio_api that answer without a login: the one launch() itself calls.
OPEN_API_PATHS = {"/gradio_api/startup-events"}


def host_name(host: str) -> str:
    """The name in a Host header (or a --host value), lower case, without its port or IPv6 brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) is this machine only: 127.0.0.0/8, ::1 or localhost."""
    name = host_name(host)
    address = _ip(name)
    return name == "localhost" if address is None else address.is_loopback


class HostCheck:
    """ASGI middleware: answers 400 to a request whose Host header names no host this server serves.

    ``bound`` is the --host address; ``allowed`` are the --allowed-host names (a reverse proxy's or
    a LAN name).
    """

    def __init__(self, app: ASGIApp, bound: str, allowed: Iterable[str] = ()) -> None:
        self.app = app
        self.any_address = host_name(bound) in WILDCARDS
        self.names = {host_name(bound), "localhost", *(host_name(a) for a in allowed)} - WILDCARDS

    def allows(self, host: str) -> bool:
        name = host_name(host)
        address = _ip(name)
        if address is not None and (address.is_loopback or self.any_address):
            return True
        return name in self.names

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
        if self.allows(host):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            name = host_name(host) or "(none)"
            message = (
                f"eqakit webui: Host {name} is not served here; "
                f"start eqakit webui with --allowed-host {name} to serve it\n"
            )
            await PlainTextResponse(message, status_code=400)(scope, receive, send)


class AccessGate:
    """ASGI middleware for a page with an access key: /gradio_api routes need Gradio's login cookie.

    Gradio checks the login on the routes that run the app's functions, read its files and take
    uploads; this closes the others it leaves open. The cookie is Gradio's own (set by its /login,
    which `access_key`'s check answers), looked up in the Gradio app's tokens.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (
            scope["type"] not in ("http", "websocket")
            or not path.startswith("/gradio_api/")
            or path in OPEN_API_PATHS
            or self.logged_in(scope)
        ):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            message = "eqakit webui: log in first: open the page and give the access key as the password\n"
            await PlainTextResponse(message, status_code=401)(scope, receive, send)

    @staticmethod
    def logged_in(scope: Scope) -> bool:
        gradio_app = scope["app"]  # set by Starlette before its middleware runs
        cookie = SimpleCookie()
        for key, value in scope["headers"]:
            if key == b"cookie":
                try:
                    cookie.load(value.decode("latin-1"))
                except CookieError:
                    return False
        names = (f"access-token-{gradio_app.cookie_id}", f"access-token-unsecure-{gradio_app.cookie_id}")
        return any(name in cookie and cookie[name].value in gradio_app.tokens for name in names)


def access_key(key_file: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The page's access key: the first line of --access-key-file, else ``API_KEY`` (as `eqakit api`
    reads it), else None. A key file that cannot be read or is empty is an EqakitError."""
    if key_file is None:
        return environ.get("API_KEY") or None
    try:
        key = Path(key_file).expanduser().read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise EqakitError(f"--access-key-file {key_file}: cannot read it ({exc})") from None
    if not key:
        raise EqakitError(f"--access-key-file {key_file} is empty: write the access key in it")
    return key


def key_check(key: str) -> Callable[[str, str], bool]:
    """Gradio's ``auth``: any user name, the key as password, compared in constant time."""
    expected = key.encode()

    def check(username: str, password: str) -> bool:  # any user name: the key alone opens the page
        return hmac.compare_digest(password.encode(), expected)

    return check


@dataclass(frozen=True)
class WriteRoots:
    """The directories the page's writing and running tabs may use (resolved, no duplicates)."""

    dirs: tuple[Path, ...]

    @classmethod
    def at_start(cls, config: str | None, allow_dirs: Iterable[str] = ()) -> WriteRoots:
        """The working directory now, ``config``'s directory, and each --allow-dir (which must exist)."""
        dirs = [Path.cwd().resolve()]
        if config is not None:
            dirs.append(Path(config).expanduser().resolve().parent)
        for given in allow_dirs:
            path = Path(given).expanduser().resolve()
            if not path.is_dir():
                raise EqakitError(f"--allow-dir {given}: not a directory")
            dirs.append(path)
        return cls(tuple(dict.fromkeys(dirs)))

    def check(self, path: str, what: str) -> Path:
        """``path`` resolved, or a UIError naming it and the allowed directories if it lies outside them."""
        try:
            target = Path(path.strip()).expanduser().resolve()
        except (OSError, ValueError, RuntimeError) as exc:  # a NUL byte, a symlink loop
            raise UIError(f"{what} {path.strip()!r} is not a usable path ({exc})") from None
        if any(target.is_relative_to(root) for root in self.dirs):
            return target
        shown = path.strip() if str(target) == path.strip() else f"{path.strip()} (that is {target})"
        allowed = ", ".join(str(d) for d in self.dirs)
        raise UIError(
            f"{what} {shown} is outside the directories this page may write to ({allowed}); "
            "start eqakit webui with --allow-dir DIR to add one"
        )

    def check_keys(self, keys: Mapping[str, Any]) -> None:
        """Every key of a run's config that names where it writes (`WRITE_KEYS`) lies inside; raises UIError."""
        for key in WRITE_KEYS:
            value = keys.get(key)
            if isinstance(value, str) and value.strip():
                self.check(value, key)
