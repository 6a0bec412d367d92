"""The images and videos an API request names, decoded safely: data: URIs, optional http(s) URLs,
media-dir paths.

A server reachable by robots and apps must not become a way to read its disk, probe its network or
exhaust its memory, so every source has a fence:
- ``data:`` URIs (base64 png, jpeg, webp, gif, bmp) are always accepted;
- ``http(s)://`` URLs only with ``api_allow_remote_images``; each host is resolved first and every
  address must be public (private, loopback, link-local, multicast, reserved addresses are refused
  before any connection is made, unless inside ``api_trusted_networks``); the connection then goes
  to the checked address (no second DNS lookup to rebind), redirects are checked the same way, and
  the download is bounded in bytes and time;
- other strings are paths inside ``api_media_dir`` (relative to it, or absolute within it); ``..``
  and symlinks that lead out of it are refused, as are ``file://`` URLs;
- the decoder only tries the five formats, reads the image size from the header and refuses an
  image over ``api_max_image_pixels`` before decoding its pixels (decompression bombs);
- memory is bounded per request, not only per image: the pixels a request asks to decode are
  summed (``api_max_request_pixels``), and an image much larger than the model will look at is
  reduced while it is decoded (JPEG's DCT scaling, Pillow's ``reduce``) to no less than twice the
  model's ``image_max_pixels`` per side, so sixteen 6000x6000 images never sit in memory at full size.

Videos follow the same fences: a ``video_url`` (a video file: data:video/<type>;base64, a remote URL
or a media-dir path, bounded like an image's bytes) or a list of frame image URLs (each one loaded as
an image). Frames are chosen as in training (video_fps, video_maxlen), each frame's size is checked
against ``api_max_image_pixels`` from the header and every chosen frame is charged to the request's
``api_max_request_pixels``, and frames much larger than ``video_max_pixels`` are shrunk while they
are decoded. A video file costs more than its chosen frames (every frame up to the last chosen one
is decoded), so a `DecodeAllowance` bounds what a request's files may decode: frames, pixels (from
the header before decoding, then each frame at its real size, which a stream may change mid-file;
FFmpeg refuses a frame over ``api_max_image_pixels`` before allocating it) and time; a data URI's
bytes must be the container its type declares (FFmpeg would sniff any).

Every refusal is a `RequestError` whose message names the message and part it came from.

    policy = ImagePolicy.from_args(cfg.api)
    image = load_image("data:image/jpeg;base64,/9j/4AAQ...", policy, where="messages[0].content[0]")
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import http.client
import io
import ipaddress
import math
import re
import socket
import ssl
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urljoin, urlsplit

from PIL import Image

from eqakit.data.video import (
    Video,
    VideoError,
    VideoSource,
    check_frame_size,
    decode,
    from_frames,
    probe,
    reduced,
)
from eqakit.engine.params import RequestError
from eqakit.errors import ConfigError

if TYPE_CHECKING:
    from eqakit.config.args import ApiArguments
    from eqakit.data.encode import VideoBudget

MiB = 1 << 20
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
DECODED_FORMATS = {*FORMATS, "MPO"}  # Pillow names some camera JPEGs MPO
MEDIA_TYPES = {"png", "jpeg", "jpg", "pjpeg", "webp", "gif", "bmp", "x-ms-bmp"}
# A video data URI's declared type -> the FFmpeg demuxers its bytes may be read as (AVI bytes
# labelled video/mp4 are refused, not sniffed and accepted).
VIDEO_TYPES = {
    "mp4": "mov,mp4",
    "quicktime": "mov,mp4",
    "webm": "matroska,webm",
    "x-matroska": "matroska,webm",
    "x-msvideo": "avi",
    "avi": "avi",
    "mpeg": "mpegts",
    "mp2t": "mpegts",
    "ogg": "ogg",
    "x-flv": "flv",
}
MAX_REDIRECTS = 3
NAT64 = ipaddress.ip_network("64:ff9b::/96")
SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class ImagePolicy:
    """Where request images may come from, and how large they may be."""

    media_dir: Path | None = None  # resolved; None refuses local paths
    allow_remote: bool = False
    trusted_networks: tuple[IPNetwork, ...] = ()
    timeout_s: float = 10.0
    max_bytes: int = 20 * MiB
    max_pixels: int = 40_000_000
    max_request_pixels: int = 80_000_000
    target_pixels: int | None = None  # the model's image_max_pixels: larger images are reduced toward it

    @classmethod
    def from_args(cls, args: ApiArguments, target_pixels: int | None = None) -> ImagePolicy:
        """The policy of a config's api_* keys; raises ConfigError for a missing media dir or a bad network."""
        media_dir = None
        if args.api_media_dir:
            media_dir = Path(args.api_media_dir).expanduser().resolve()
            if not media_dir.is_dir():
                raise ConfigError(f"api_media_dir: {args.api_media_dir!r} is not a directory")
        networks = []
        for item in (args.api_trusted_networks or "").split(","):
            if not item.strip():
                continue
            try:
                networks.append(ipaddress.ip_network(item.strip(), strict=False))
            except ValueError:
                raise ConfigError(
                    f"api_trusted_networks: {item.strip()!r} is not a network; use CIDR such as 10.0.0.0/8"
                ) from None
        return cls(
            media_dir=media_dir,
            allow_remote=args.api_allow_remote_images,
            trusted_networks=tuple(networks),
            timeout_s=args.api_remote_timeout,
            max_bytes=int(args.api_max_image_mb * MiB),
            max_pixels=args.api_max_image_pixels,
            max_request_pixels=args.api_max_request_pixels,
            target_pixels=target_pixels,
        )


class PixelAllowance:
    """What one request may still decode, in pixels (``api_max_request_pixels``, summed over its images)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def charge(self, width: int, height: int, where: str) -> None:
        self.used += width * height
        if self.used > self.limit:
            raise _refuse(
                where,
                f"the request's images add up to more than {self.limit} pixels (api_max_request_pixels); "
                "send fewer or smaller images",
            )


class RecentImages:
    """Recently decoded data-URI images, keyed by a hash of the URI, bounded in decoded bytes.

    OpenEQA clients send an episode's frames again with every question about it; decoding them once
    keeps that work (and the GIL time it takes from the engine) off the other questions. Only data
    URIs are kept: their content is their name. The images are shared, so nobody may modify them.
    """

    def __init__(self, max_bytes: int = 256 * MiB) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[bytes, Image.Image] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: bytes) -> Image.Image | None:
        with self._lock:
            image = self._items.get(key)
            if image is not None:
                self._items.move_to_end(key)
            return image

    def put(self, key: bytes, image: Image.Image) -> None:
        size = image.width * image.height * 3
        with self._lock:
            if key in self._items or size > self.max_bytes:
                return
            self._items[key] = image
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.width * old.height * 3


def load_image(
    url: str,
    policy: ImagePolicy,
    where: str,
    recent: RecentImages | None = None,
    allowance: PixelAllowance | None = None,
) -> Image.Image:
    """The RGB image behind an ``image_url`` (raises RequestError naming ``where`` when refused or bad).

    ``allowance`` is the request's pixel budget; each image decoded is charged its source size.
    """
    url = url.strip()
    match = SCHEME.match(url)
    scheme = match.group(1).lower() if match else ""
    decode = functools.partial(
        decode_image,
        max_pixels=policy.max_pixels,
        where=where,
        target_pixels=policy.target_pixels,
        allowance=allowance,
    )
    if scheme == "data":
        key = hashlib.blake2b(url.encode(), digest_size=16).digest()
        image = recent.get(key) if recent is not None else None
        if image is None:
            image = decode(_from_data_uri(url, where))
            if recent is not None:
                recent.put(key, image)
        elif allowance is not None:
            allowance.charge(*image.size, where)
        return image
    return decode(_read_url(url, scheme, policy, where, "image"))


def _read_url(url: str, scheme: str, policy: ImagePolicy, where: str, medium: str) -> bytes:
    """The bytes behind a URL that is not a data: URI: a remote one (when allowed) or a media-dir path."""
    if scheme in ("http", "https"):
        return _fetch(url, policy, where)
    if scheme == "file":
        raise _refuse(where, f"file:// URLs are not accepted; send the {medium} as a data: URI (base64)")
    if len(scheme) > 1:
        raise _refuse(where, f"unsupported URL scheme {scheme!r}; send a data: URI (base64)")
    return _read_local(url, policy, where)


def decode_image(
    data: bytes,
    max_pixels: int,
    where: str,
    *,
    target_pixels: int | None = None,
    allowance: PixelAllowance | None = None,
) -> Image.Image:
    """Decode png/jpeg/webp/gif/bmp bytes to RGB, refusing an oversized image before reading its pixels.

    With ``target_pixels`` an image over four times that size is reduced by a whole factor while
    decoding (it stays at least twice the target per side, so the processor's own resize still has
    detail to work from).
    """
    kinds = "png, jpeg, webp, gif or bmp"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(FORMATS))
    except Image.DecompressionBombError:
        raise _refuse(where, f"the image is larger than {max_pixels} pixels (api_max_image_pixels)") from None
    except Exception:  # any parser failure means the bytes are not one of the accepted formats
        kind = _sniff(data)
        if kind is not None:
            raise _refuse(where, f"the {kind} image is truncated or corrupt") from None
        raise _refuse(where, f"the data is not a {kinds} image") from None
    if image.format not in DECODED_FORMATS:
        raise _refuse(where, f"the data is a {image.format} image; send {kinds}")
    width, height = image.size
    if width < 1 or height < 1:
        raise _refuse(where, f"the image is {width}x{height} pixels")
    if width * height > max_pixels:
        raise _refuse(
            where,
            f"the image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
            "(api_max_image_pixels); send a smaller image",
        )
    if allowance is not None:
        allowance.charge(width, height, where)
    factor = _reduction(width, height, target_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if factor > 1 and image.format in ("JPEG", "MPO"):
                image.draft("RGB", (width // factor, height // factor))  # decoded at 1/2, 1/4 or 1/8 scale
            image.load()  # the first frame of an animated gif/webp
            if factor > 1:
                image = _reduce(image, factor, width)
            return image.convert("RGB")
    except Exception as exc:  # truncated or corrupt pixel data, whatever the decoder raises
        raise _refuse(where, f"the {image.format.lower()} image is truncated or corrupt ({exc})") from None


class DecodeAllowance:
    """What one request's video files may still cost to decode, over all of them: frames and pixels
    decoded (``api_max_decoded_frames``, ``api_max_decoded_pixels``; every frame up to the last
    chosen one is decoded, chosen or not) and wall time (``api_video_timeout``, from when the request
    was read, queueing included). Charged from a video's header before it is decoded, then frame by
    frame at each frame's real size (a stream may grow mid-file); `cancel` (its client left) stops
    decoding at the next frame. Used from one thread at a time."""

    def __init__(self, max_frames: int, max_pixels: int, timeout_s: float) -> None:
        self.max_frames, self.max_pixels, self.timeout_s = max_frames, max_pixels, timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.frames = self.pixels = 0
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    def expect(self, frames: int, width: int, height: int) -> None:
        """Refuse, before decoding, a video whose header shows it would exceed what is left."""
        self._check(self.frames + frames, self.pixels + frames * width * height)

    def frame(self, width: int, height: int) -> None:
        """Charge one decoded frame (`eqakit.data.video.decode`'s ``on_frame``)."""
        self.frames += 1
        self.pixels += width * height
        self._check(self.frames, self.pixels)

    def _check(self, frames: int, pixels: int) -> None:
        if self._cancelled.is_set():
            raise VideoError("the client went away")
        if frames > self.max_frames:
            raise VideoError(
                f"decoding the request's videos takes {frames} frames, more than {self.max_frames} "
                "(api_max_decoded_frames; every frame up to the last one sampled is decoded); send "
                "a shorter video or its frames as a list of images"
            )
        if pixels > self.max_pixels:
            raise VideoError(
                f"decoding the request's videos takes {pixels} pixels, more than {self.max_pixels} "
                "(api_max_decoded_pixels; every frame up to the last one sampled is decoded); send "
                "a shorter or smaller video"
            )
        if time.monotonic() > self.deadline:
            raise VideoError(
                f"the request's videos took longer than {self.timeout_s:g} s to decode "
                "(api_video_timeout; the server may be busy); send a shorter or smaller video"
            )


def load_video(
    url: str,
    policy: ImagePolicy,
    where: str,
    budget: VideoBudget,
    allowance: PixelAllowance,
    decoding: DecodeAllowance,
) -> Video:
    """The video file behind a ``video_url``: its frames chosen by ``budget`` (video_fps,
    video_maxlen) and decoded, no larger than needed, within ``decoding`` (raises RequestError
    naming ``where``)."""
    url = url.strip()
    match = SCHEME.match(url)
    scheme = match.group(1).lower() if match else ""
    if scheme == "data":
        data = _from_data_uri(url, where, "video")
        declared = url[len("data:") :].partition(",")[0].split(";")[0].strip().lower()
        source = VideoSource(data=data, containers=VIDEO_TYPES[declared.partition("/")[2]])
    else:
        source = VideoSource(data=_read_url(url, scheme, policy, where, "video"))
    try:
        header = probe(source, budget.fps, budget.maxlen)
        check_frame_size(header, policy.max_pixels, "api_max_image_pixels")
        decoded = max(header.indices) + 1
        decoding.expect(decoded, *header.size)
        info = reduced(header, budget.max_pixels)
        allowance.charge(info.size[0] * len(set(info.indices)), info.size[1], where)
        return Video(info, tuple(decode(source, info, decoding.frame, policy.max_pixels)))
    except VideoError as exc:
        raise _refuse(where, str(exc).replace(source.describe(), "the video")) from None


def video_from_frames(frames: list[Image.Image], budget: VideoBudget, where: str) -> Video:
    """A video sent as a list of frame images (already decoded and checked one by one)."""
    try:
        return from_frames(frames, budget.fps, budget.maxlen)
    except VideoError as exc:
        raise _refuse(where, str(exc)) from None


def _reduction(width: int, height: int, target_pixels: int | None) -> int:
    """The whole factor an image may be shrunk by per side and still keep 4x ``target_pixels``."""
    if target_pixels is None or width * height <= 4 * target_pixels:
        return 1
    return max(1, int(math.sqrt(width * height / (4 * target_pixels))))


def _reduce(image: Image.Image, factor: int, width: int) -> Image.Image:
    """``image`` reduced to about 1/``factor`` of the source ``width`` (a JPEG draft may have done part)."""
    left = image.width * factor // width
    if left <= 1:
        return image
    if image.mode == "1":
        image = image.convert("L")
    elif image.mode not in ("L", "LA", "RGB", "RGBA", "I", "F"):  # palette and other modes reduce() refuses
        image = image.convert("RGBA" if image.has_transparency_data else "RGB")
    return image.reduce(left)


def _sniff(data: bytes) -> str | None:
    """The format a file's magic bytes announce (to call a broken header truncated, not "not an image")."""
    if data.startswith(b"\x89PNG"):
        return "png"
    if data.startswith(b"\xff\xd8"):
        return "jpeg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "webp"
    return "bmp" if data.startswith(b"BM") else None


def _refuse(where: str, reason: str) -> RequestError:
    return RequestError(f"{where}: {reason}", param=where)


def _from_data_uri(url: str, where: str, medium: str = "image") -> bytes:
    header, comma, payload = url[len("data:") :].partition(",")
    if not comma:
        raise _refuse(where, f"malformed data URI: expected data:{medium}/<type>;base64,<data>")
    media_type, *options = [p.strip().lower() for p in header.split(";")]
    kind, _, subtype = media_type.partition("/")
    if kind != medium or subtype not in (MEDIA_TYPES if medium == "image" else VIDEO_TYPES):
        accepted = (
            "image/png, jpeg, webp, gif or bmp"
            if medium == "image"
            else "video/mp4, webm, quicktime, x-matroska, x-msvideo, mp2t, ogg or x-flv"
        )
        raise _refuse(where, f"unsupported data URI type {media_type or '(none)'!r}; send {accepted}")
    if "base64" not in options:
        raise _refuse(where, f"data URIs must be base64-encoded (data:{medium}/<type>;base64,<data>)")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        payload = re.sub(r"\s+", "", payload)  # line-wrapped base64 (GNU base64 wraps at 76 columns)
        payload += "=" * (-len(payload) % 4)  # or base64 without its padding
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise _refuse(where, "the data URI is not valid base64") from None
    if not data:
        raise _refuse(where, "the data URI holds no data")
    return data


def _read_local(path: str, policy: ImagePolicy, where: str) -> bytes:
    if policy.media_dir is None:
        raise _refuse(
            where,
            "local image paths are disabled on this server; send the image as a data: URI (base64) "
            "(the server's api_media_dir setting enables paths inside one directory)",
        )
    if not path or "\x00" in path:
        raise _refuse(where, "the image path is empty or invalid")
    root = policy.media_dir
    try:
        resolved = (root / path).resolve()  # follows symlinks and '..' as the OS would
    except (OSError, RuntimeError, ValueError):
        raise _refuse(where, "the image path cannot be resolved") from None
    if not resolved.is_relative_to(root):
        raise _refuse(where, "the image path leads outside the server's media directory")
    shown = path if len(path) <= 200 else f"{path[:200]}..."
    try:
        if not resolved.is_file():
            raise _refuse(where, f"no image file {shown!r} in the server's media directory")
        size = resolved.stat().st_size
        if size > policy.max_bytes:
            raise _refuse(
                where,
                f"the image file is {size} bytes, over the limit of {policy.max_bytes} (api_max_image_mb)",
            )
        return resolved.read_bytes()
    except OSError as exc:  # a name too long for the file system, a permission, a vanished file
        raise _refuse(where, f"the image file {shown!r} cannot be read ({exc.strerror or exc})") from None


# ---- remote images ---------------------------------------------------------------------------------


def _allowed(ip: IPAddress, trusted: tuple[IPNetwork, ...]) -> bool:
    """Public addresses only (IPv4 inside IPv6 judged as IPv4), unless the server trusts the network."""
    if any(ip in net for net in trusted if net.version == ip.version):
        return True
    if isinstance(ip, ipaddress.IPv6Address):
        inner = ip.ipv4_mapped or (ipaddress.IPv4Address(ip.packed[-4:]) if ip in NAT64 else None)
        if inner is not None:
            return _allowed(inner, trusted)
    return ip.is_global and not ip.is_multicast


def _resolve(host: str, port: int, policy: ImagePolicy, where: str) -> str:
    """One address of ``host`` to connect to; every address it resolves to must be allowed."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise _refuse(where, f"cannot resolve the image URL's host {host!r}") from None
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    refused = [ip for ip in addresses if not _allowed(ip, policy.trusted_networks)]
    if refused or not addresses:
        raise _refuse(
            where,
            f"the image URL's host {host!r} resolves to a non-public address ({refused[0] if refused else 'none'}); "
            "private, loopback and link-local addresses are refused",
        )
    return str(addresses[0])


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to an address checked beforehand (the Host header keeps the name)."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """The TLS variant: certificate and SNI are checked against the host name, not the address."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.address = address

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _fetch(url: str, policy: ImagePolicy, where: str) -> bytes:
    if not policy.allow_remote:
        raise _refuse(
            where,
            "image URLs are disabled on this server; send the image as a data: URI (base64) "
            "(the server's api_allow_remote_images setting enables http(s) URLs)",
        )
    deadline = time.monotonic() + policy.timeout_s
    for _ in range(MAX_REDIRECTS + 1):
        try:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            raise _refuse(where, f"the image URL is malformed ({exc})") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise _refuse(where, "image URLs must be http(s)://host/path")
        address = _resolve(parts.hostname, port, policy, where)
        kind = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
        connection = kind(parts.hostname, port, address, policy.timeout_s)
        try:
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            connection.request("GET", target, headers={"User-Agent": "eqakit", "Accept": "image/*"})
            sock = connection.sock  # the response may take it over from the connection
            response = connection.getresponse()
            if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                url = urljoin(url, response.getheader("Location", ""))
                continue
            if response.status != 200:
                raise _refuse(where, f"the image URL answered HTTP {response.status}")
            return _read_bounded(response, sock, policy, deadline, where)
        except TimeoutError:
            raise _refuse(where, f"fetching the image URL took longer than {policy.timeout_s:g} s") from None
        except (OSError, http.client.HTTPException) as exc:
            raise _refuse(where, f"could not fetch the image URL ({type(exc).__name__}: {exc})") from None
        finally:
            connection.close()
    raise _refuse(where, f"the image URL redirected more than {MAX_REDIRECTS} times")


def _read_bounded(
    response: http.client.HTTPResponse, sock: socket.socket, policy: ImagePolicy, deadline: float, where: str
) -> bytes:
    """The body, refused once it passes the byte cap or the deadline (a slow drip cannot hold a request)."""
    declared = response.getheader("Content-Length")
    if declared and declared.isdigit() and int(declared) > policy.max_bytes:
        raise _refuse(
            where, f"the image is {declared} bytes, over the limit of {policy.max_bytes} (api_max_image_mb)"
        )
    chunks: list[bytes] = []
    size = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _refuse(where, f"fetching the image URL took longer than {policy.timeout_s:g} s")
        sock.settimeout(left)
        chunk = response.read1(64 * 1024)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > policy.max_bytes:
            raise _refuse(
                where, f"the image is over the limit of {policy.max_bytes} bytes (api_max_image_mb)"
            )
        chunks.append(chunk)
