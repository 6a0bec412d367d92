"""Images named by API requests (eqakit.serve.images): formats, bad bytes, media-dir fences, remote URLs.

Remote URLs are served by real HTTP servers on loopback addresses. The server on 127.0.0.2 is the
"trusted" one (api_trusted_networks); the one on 127.0.0.1 counts every request it gets, so a refusal
is shown to happen before any connection. Connection attempts are also recorded (the real
socket.create_connection still runs) to show that private addresses are never dialled.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eqakit.config.args import ApiArguments
from eqakit.engine import RequestError
from eqakit.errors import ConfigError
from eqakit.serve.images import ImagePolicy, RecentImages, decode_image, load_image

WHERE = "messages[0].content[1]"


def picture(size: tuple[int, int] = (40, 30), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png_claiming(width: int, height: int) -> bytes:
    data = bytearray(encoded(Image.new("L", (1, 1)), "PNG"))
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def refused(url: str, policy: ImagePolicy, needle: str) -> str:
    with pytest.raises(RequestError) as caught:
        load_image(url, policy, WHERE)
    message = str(caught.value)
    assert message.startswith(f"{WHERE}: ") and caught.value.param == WHERE
    assert needle in message, message
    return message


# ---- data URIs and decoding ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "mime", "kw"),
    [
        ("PNG", "image/png", {}),
        ("JPEG", "image/jpeg", {}),
        ("WEBP", "image/webp", {"lossless": True}),
        ("GIF", "image/gif", {}),
        ("BMP", "image/bmp", {}),
    ],
)
def test_data_uris_of_each_format_decode_to_rgb(fmt: str, mime: str, kw: dict) -> None:
    source = picture()
    image = load_image(data_uri(encoded(source, fmt, **kw), mime), ImagePolicy(), WHERE)
    assert image.mode == "RGB" and image.size == source.size
    if fmt in ("PNG", "BMP") or kw.get("lossless"):
        assert np.array_equal(np.asarray(image), np.asarray(source))


def test_wrapped_or_unpadded_base64_and_odd_modes_are_accepted() -> None:
    raw = base64.b64encode(encoded(picture(), "PNG")).decode()
    wrapped = "\n".join(raw[i : i + 76] for i in range(0, len(raw), 76))  # GNU base64's output
    assert load_image(f"data:image/png;base64,{wrapped}", ImagePolicy(), WHERE).size == (40, 30)
    assert load_image(f"data:image/png;base64,{raw.rstrip('=')}", ImagePolicy(), WHERE).size == (40, 30)
    for mode in ("RGBA", "L", "P", "1"):
        image = decode_image(encoded(picture().convert(mode), "PNG"), 10**6, WHERE)
        assert image.mode == "RGB"
    frames = [picture(seed=i) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    assert decode_image(buf.getvalue(), 10**6, WHERE).size == (40, 30)  # the first frame


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("data:image/png;base64,@@@@", "not valid base64"),
        ("data:image/png;base64,", "no data"),
        ("data:image/png,rawbytes", "base64"),
        ("data:image/png;base64", "malformed data URI"),
        ("data:text/plain;base64,aGVsbG8=", "unsupported data URI type"),
        ("data:image/svg+xml;base64,PHN2Zz4=", "unsupported data URI type"),
        (data_uri(b"hello, I am text"), "not a png, jpeg, webp, gif or bmp image"),
        (data_uri(encoded(picture(), "TIFF"), "image/png"), "not a png, jpeg, webp, gif or bmp image"),
        (data_uri(encoded(picture(), "JPEG")[:300], "image/jpeg"), "truncated or corrupt"),
        (data_uri(encoded(picture(), "PNG")[:-30]), "truncated or corrupt"),
        (data_uri(png_claiming(100_000, 100_000)), "api_max_image_pixels"),
        (data_uri(png_claiming(2000, 1000)), "2000x1000 = 2000000 pixels"),
        ("ftp://example.com/a.png", "unsupported URL scheme"),
        ("file:///etc/passwd", "file:// URLs are not accepted"),
    ],
)
def test_bad_image_data_is_refused_by_name(url: str, needle: str) -> None:
    refused(url, ImagePolicy(max_pixels=1_000_000), needle)


def test_a_bomb_is_refused_before_its_pixels_are_decoded() -> None:
    # 12000 x 12000 of a single colour: a few kB of PNG, 432 MB once decoded as RGB.
    bomb = encoded(Image.new("1", (12_000, 12_000)), "PNG")
    started = time.perf_counter()
    with pytest.raises(RequestError, match="api_max_image_pixels"):
        decode_image(bomb, 40_000_000, WHERE)
    assert time.perf_counter() - started < 0.5


def test_repeated_data_uris_are_decoded_once_within_a_byte_bound() -> None:
    recent = RecentImages(max_bytes=2 * 40 * 30 * 3)
    uris = [data_uri(encoded(picture(seed=i), "PNG")) for i in range(3)]
    first = load_image(uris[0], ImagePolicy(), WHERE, recent)
    assert load_image(uris[0], ImagePolicy(), WHERE, recent) is first
    load_image(uris[1], ImagePolicy(), WHERE, recent)
    load_image(uris[2], ImagePolicy(), WHERE, recent)  # evicts the least recently used: uris[0]
    again = load_image(uris[0], ImagePolicy(), WHERE, recent)
    assert again is not first and np.array_equal(np.asarray(again), np.asarray(first))
    with pytest.raises(RequestError):  # a bad URI is never remembered as good
        load_image("data:image/png;base64,@@", ImagePolicy(), WHERE, recent)


# ---- local paths -----------------------------------------------------------------------------------


@pytest.fixture
def media(tmp_path: Path) -> Path:
    root = tmp_path / "media"
    (root / "ep1").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    picture().save(root / "ep1" / "000.png")
    picture(seed=1).save(tmp_path / "outside" / "secret.png")
    (root / "link.png").symlink_to(tmp_path / "outside" / "secret.png")
    (root / "inner.png").symlink_to(root / "ep1" / "000.png")
    (root / "escape").symlink_to(tmp_path / "outside")
    return root


def test_paths_inside_the_media_dir_are_read(media: Path) -> None:
    policy = ImagePolicy(media_dir=media.resolve())
    for path in ("ep1/000.png", str(media / "ep1" / "000.png"), "ep1/../ep1/000.png", "inner.png"):
        assert load_image(path, policy, WHERE).size == (40, 30)


@pytest.mark.parametrize(
    ("path", "needle"),
    [
        ("../outside/secret.png", "outside the server's media directory"),
        ("ep1/../../outside/secret.png", "outside the server's media directory"),
        ("link.png", "outside the server's media directory"),
        ("escape/secret.png", "outside the server's media directory"),
        ("/etc/passwd", "outside the server's media directory"),
        ("../outside/missing.png", "outside the server's media directory"),  # no hint whether it exists
        ("ep1/missing.png", "no image file"),
        ("ep1", "no image file"),
        ("ep1/000.png\x00.txt", "empty or invalid"),
    ],
)
def test_paths_cannot_leave_the_media_dir(media: Path, path: str, needle: str) -> None:
    refused(path, ImagePolicy(media_dir=media.resolve()), needle)


def test_local_paths_are_refused_without_a_media_dir(media: Path) -> None:
    refused(str(media / "ep1" / "000.png"), ImagePolicy(), "local image paths are disabled")


def test_policy_from_config_checks_its_settings(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="api_media_dir"):
        ImagePolicy.from_args(ApiArguments(api_media_dir=str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match="api_trusted_networks: '10.0.0/8x'"):
        ImagePolicy.from_args(ApiArguments(api_trusted_networks="127.0.0.1/32, 10.0.0/8x"))
    policy = ImagePolicy.from_args(
        ApiArguments(api_trusted_networks="127.0.0.2/32,fd00::/8", api_max_image_mb=1)
    )
    assert [str(n) for n in policy.trusted_networks] == [
        "127.0.0.2/32",
        "fd00::/8",
    ] and policy.max_bytes == 1 << 20


# ---- remote URLs -----------------------------------------------------------------------------------


class Site:
    """A real HTTP server on a loopback address, counting the requests it gets."""

    def __init__(self, host: str, routes: dict[str, tuple[int, dict[str, str], bytes]]) -> None:
        site = self
        self.hits: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                site.hits.append(self.path)
                if self.path == "/slow":
                    self.send_response(200)
                    self.end_headers()
                    for _ in range(40):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(0.05)
                    return
                status, headers, body = routes.get(self.path, (404, {}, b"missing"))
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                if "Content-Length" not in headers and "Transfer-Encoding" not in headers:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if headers.get("Transfer-Encoding") == "chunked":
                    for i in range(0, len(body), 4096):
                        part = body[i : i + 4096]
                        self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                    self.wfile.write(b"0\r\n\r\n")
                else:
                    self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address) -> None:
                pass  # clients that hang up early (refused downloads) are expected here

        self.server = Server((host, 0), Handler)
        self.url = f"http://{host}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


PNG = encoded(picture(), "PNG")
BIG = encoded(picture((400, 400)), "PNG")  # ~480 kB of noise


@pytest.fixture(scope="module")
def local_site() -> Iterator[Site]:
    """On 127.0.0.1: never trusted, must never be reached."""
    site = Site("127.0.0.1", {"/a.png": (200, {}, PNG)})
    yield site
    site.close()


@pytest.fixture(scope="module")
def trusted_site(local_site: Site) -> Iterator[Site]:
    routes = {
        "/a.png": (200, {"Content-Type": "image/png"}, PNG),
        "/big.png": (200, {}, BIG),
        "/big-chunked.png": (200, {"Transfer-Encoding": "chunked"}, BIG),
        "/to-private": (302, {"Location": f"{local_site.url}/a.png"}, b""),
        "/loop": (302, {"Location": "/loop"}, b""),
        "/to-a": (301, {"Location": "/a.png"}, b""),
    }
    site = Site("127.0.0.2", routes)
    yield site
    site.close()


@pytest.fixture
def dialled(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every address a connection is opened to (the real create_connection still runs)."""
    calls: list[tuple[str, int]] = []
    real = socket.create_connection

    def spy(address, *args, **kwargs):
        calls.append(address)
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", spy)
    return calls


def remote(**kw) -> ImagePolicy:
    defaults = {"allow_remote": True, "trusted_networks": (ipaddress.ip_network("127.0.0.2/32"),)}
    return ImagePolicy(**{**defaults, "max_bytes": 200_000, "timeout_s": 1.0, **kw})


def test_remote_urls_are_off_unless_enabled(trusted_site: Site, dialled: list) -> None:
    refused(f"{trusted_site.url}/a.png", ImagePolicy(), "image URLs are disabled")
    assert dialled == [] and trusted_site.hits == []


def test_a_trusted_server_serves_images_and_redirects(trusted_site: Site, dialled: list) -> None:
    assert load_image(f"{trusted_site.url}/a.png", remote(), WHERE).size == (40, 30)
    assert load_image(f"{trusted_site.url}/to-a", remote(), WHERE).size == (40, 30)
    assert {host for host, _ in dialled} == {"127.0.0.2"}


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "localhost",
        "10.1.2.3",
        "169.254.169.254",
        "[::1]",
        "0.0.0.0",
        "[::ffff:127.0.0.1]",
        "2130706433",
        "100.64.0.1",
        "224.0.0.1",
        "192.168.1.1",
        "[fe80::1]",
        "[64:ff9b::a01:203]",
    ],
)
def test_private_addresses_are_refused_before_connecting(host: str, local_site: Site, dialled: list) -> None:
    port = local_site.url.rsplit(":", 1)[1]
    refused(f"http://{host}:{port}/a.png", remote(), "non-public address")
    assert dialled == [] and local_site.hits == []


def test_redirects_are_checked_like_the_first_url(
    trusted_site: Site, local_site: Site, dialled: list
) -> None:
    refused(f"{trusted_site.url}/to-private", remote(), "non-public address")
    assert local_site.hits == [] and {host for host, _ in dialled} == {"127.0.0.2"}
    refused(f"{trusted_site.url}/loop", remote(), "redirected more than 3 times")


@pytest.mark.parametrize(
    ("path", "needle"),
    [
        ("/big.png", "over the limit of 200000"),
        ("/big-chunked.png", "over the limit of 200000"),
        ("/slow", "longer than 1 s"),
        ("/missing.png", "HTTP 404"),
    ],
)
def test_remote_downloads_are_bounded(trusted_site: Site, path: str, needle: str) -> None:
    started = time.monotonic()
    refused(f"{trusted_site.url}{path}", remote(), needle)
    assert time.monotonic() - started < 3


def test_unresolvable_hosts_and_bad_ports_are_refused() -> None:
    refused("http://no-such-host.invalid/a.png", remote(), "cannot resolve")
    refused("http://example.com:99999/a.png", remote(), "malformed")
    refused("http://[::1/a.png", remote(), "malformed")
