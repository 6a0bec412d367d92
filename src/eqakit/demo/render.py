"""Drawing synthetic scenes: a room panorama, and the frames of a camera panning across it.

The room is drawn once as a wide panorama at the output resolution; each frame is a crop of it along
a camera path that pans from one side wall to the other while bobbing a little, so every object is in
some frame and left/right in a picture is left/right in the room. Frames are plain crops, not
resampled, which keeps them crisp and their PNG encoding (most of the cost) cheap.

Room units: the room is 3 units high (ceiling at the top, floor at the bottom) and each floor slot is
at least 1 unit wide. Objects stand on a common floor line in front of the back wall.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageOps

from eqakit.demo.scenes import COLORS, DOOR_COLORS, RGB, SUPPORT_TOPS, WALL_COLORS, Scene

ROOM_H, CEIL, HORIZON, BASE, SIDE = 3.0, 0.15, 1.95, 2.45, 0.4
OUTLINE: RGB = (30, 30, 30)


@dataclass(frozen=True)
class Camera:
    """Where one frame looks: the view's centre in room units and the scene's zoom."""

    x: float
    y: float
    zoom: float


def render_frames(scene: Scene, size: tuple[int, int]) -> Iterator[tuple[Image.Image, Camera]]:
    """Yield each frame of the scene at `size` (width, height) with the camera that took it."""
    width, height = size
    aspect = width / height
    room_w = max(scene.slots + 2 * SIDE, ROOM_H * aspect * 1.6)  # wide enough to pan over
    scale = height * scene.zoom / ROOM_H  # pixels per room unit
    panorama = _draw_room(scene, room_w, scale)
    for index in range(scene.frames):
        cam = _camera(scene, index, aspect, room_w)
        left = min(max(0, round(cam.x * scale - width / 2)), panorama.width - width)
        top = min(max(0, round(cam.y * scale - height / 2)), panorama.height - height)
        yield panorama.crop((left, top, left + width, top + height)), cam


def depth_frame(cam: Camera, size: tuple[int, int]) -> Image.Image:
    """A 16-bit depth image (millimetres) like the real datasets store: far wall at the top, floor near."""
    ramp = ImageOps.invert(Image.linear_gradient("L")).resize(size)
    near = int(1500 / cam.zoom)
    return ramp.convert("I").point(lambda v: near + v * 12).convert("I;16")


def pose_text(cam: Camera) -> str:
    """A 4x4 camera-to-world matrix as the real datasets' pose .txt files hold it."""
    yaw = (cam.x - 4.0) * 0.05
    rows = (
        (math.cos(yaw), 0.0, math.sin(yaw), cam.x),
        (0.0, 1.0, 0.0, 1.5 - (cam.y - ROOM_H / 2)),
        (-math.sin(yaw), 0.0, math.cos(yaw), 3.0 / cam.zoom),
        (0.0, 0.0, 0.0, 1.0),
    )
    return "".join(" ".join(f"{v:.6f}" for v in row) + "\n" for row in rows)


def _slot_x(scene: Scene, slot: int, room_w: float) -> float:
    """Centre of a floor slot in room units."""
    return SIDE + (slot + 0.5) * (room_w - 2 * SIDE) / scene.slots


def _camera(scene: Scene, index: int, aspect: float, room_w: float) -> Camera:
    linear = index / max(1, scene.frames - 1)
    eased = linear * linear * (3 - 2 * linear)
    along = eased if scene.pan_right else 1 - eased
    view_h = ROOM_H / scene.zoom
    view_w = view_h * aspect
    slack = (ROOM_H - view_h) / 2
    y = ROOM_H / 2 + 0.8 * slack * math.sin(2 * math.pi * (2 * linear + scene.bob_phase))
    return Camera(view_w / 2 + along * (room_w - view_w), y, scene.zoom)


def _shade(color: RGB, amount: float) -> RGB:
    """Mix towards white (amount > 0) or black (amount < 0)."""
    target = 255 if amount > 0 else 0
    return tuple(round(c + (target - c) * abs(amount)) for c in color)  # type: ignore[return-value]


class _Pen:
    """ImageDraw in room units, with the dark outline every object gets so it stands off the wall."""

    def __init__(self, image: Image.Image, scale: float) -> None:
        self.draw = ImageDraw.Draw(image)
        self.scale = scale
        self.width = max(1, round(scale * 0.012))

    def _xy(self, *coords: float) -> list[float]:
        return [c * self.scale for c in coords]

    def rect(
        self, x0: float, y0: float, x1: float, y1: float, fill: RGB, outline: RGB | None = OUTLINE
    ) -> None:
        self.draw.rectangle(self._xy(x0, y0, x1, y1), fill=fill, outline=outline, width=self.width)

    def ellipse(
        self, x0: float, y0: float, x1: float, y1: float, fill: RGB, outline: RGB | None = OUTLINE
    ) -> None:
        self.draw.ellipse(self._xy(x0, y0, x1, y1), fill=fill, outline=outline, width=self.width)

    def poly(self, points: list[tuple[float, float]], fill: RGB, outline: RGB | None = OUTLINE) -> None:
        self.draw.polygon(
            [(x * self.scale, y * self.scale) for x, y in points],
            fill=fill,
            outline=outline,
            width=self.width,
        )

    def line(self, x0: float, y0: float, x1: float, y1: float, fill: RGB, width: float) -> None:
        self.draw.line(self._xy(x0, y0, x1, y1), fill=fill, width=max(1, round(width * self.scale)))


def _draw_room(scene: Scene, room_w: float, scale: float) -> Image.Image:
    size = (math.ceil(room_w * scale), math.ceil(ROOM_H * scale))
    image = Image.new("RGB", size, _shade(WALL_COLORS[scene.wall], 0.4))  # the ceiling
    pen = _Pen(image, scale)
    rng = random.Random(scene.detail_seed)
    wall = WALL_COLORS[scene.wall]
    pen.rect(SIDE, CEIL, room_w - SIDE, HORIZON, wall, outline=None)
    side = _shade(wall, -0.15)
    pen.poly([(0, 0), (SIDE, CEIL), (SIDE, HORIZON), (0, HORIZON + 0.35)], side)
    pen.poly([(room_w, 0), (room_w - SIDE, CEIL), (room_w - SIDE, HORIZON), (room_w, HORIZON + 0.35)], side)
    _draw_floor(pen, scene.floor, room_w, rng)
    pen.line(SIDE, HORIZON, room_w - SIDE, HORIZON, _shade(wall, -0.4), 0.03)
    _draw_window(pen, _slot_x(scene, scene.window_slot, room_w), scene.window_open, scene.night, rng)
    _draw_door(pen, _slot_x(scene, scene.door_slot, room_w), DOOR_COLORS[scene.door_color], scene.door_open)
    for thing in scene.things:
        color = COLORS[thing.color] if thing.color else OUTLINE
        base = BASE - SUPPORT_TOPS[thing.support] if thing.support else BASE
        _DRAW[thing.kind](pen, _slot_x(scene, thing.slot, room_w), base, color, thing.lit)
    return image


def _draw_floor(pen: _Pen, floor: str, room_w: float, rng: random.Random) -> None:
    outline = [(0, HORIZON + 0.35), (SIDE, HORIZON), (room_w - SIDE, HORIZON), (room_w, HORIZON + 0.35)]
    base = {"Wood": (165, 112, 68), "Carpet": (150, 62, 62), "Tile": (214, 214, 208)}[floor]
    pen.poly([*outline, (room_w, ROOM_H), (0, ROOM_H)], base, outline=None)
    if floor == "Wood":
        for i, y in enumerate((2.02, 2.12, 2.25, 2.42, 2.62, 2.85)):
            pen.line(0, y, room_w, y, _shade(base, -0.3), 0.012)
            for x in range(i % 2, math.ceil(room_w), 2):
                pen.line(x + 0.3, y, x + 0.3, y + 0.1, _shade(base, -0.3), 0.012)
    elif floor == "Carpet":
        for _ in range(int(room_w * 60)):
            x, y = rng.uniform(0, room_w), rng.uniform(HORIZON + 0.05, ROOM_H)
            pen.rect(x, y, x + 0.02, y + 0.02, _shade(base, 0.2), outline=None)
    else:
        for y in (2.05, 2.2, 2.4, 2.65, 2.95):
            pen.line(0, y, room_w, y, (150, 150, 150), 0.015)
        for i in range(-4, math.ceil(room_w * 2) + 4):
            x = i * 0.5
            pen.line(x, HORIZON, x + (x - room_w / 2) * 0.6, ROOM_H, (150, 150, 150), 0.015)


def _draw_window(pen: _Pen, x: float, is_open: bool, night: bool, rng: random.Random) -> None:
    x0, y0, x1, y1 = x - 0.4, 0.45, x + 0.4, 1.25
    frame = (250, 250, 250)
    pen.rect(x0 - 0.05, y0 - 0.05, x1 + 0.05, y1 + 0.05, frame)
    pen.rect(x0, y0, x1, y1, (20, 25, 60) if night else (135, 195, 240))
    if night:
        for _ in range(8):
            sx, sy = rng.uniform(x0 + 0.05, x1 - 0.05), rng.uniform(y0 + 0.05, y1 - 0.3)
            pen.rect(sx, sy, sx + 0.02, sy + 0.02, (250, 250, 210), outline=None)
        pen.ellipse(x1 - 0.3, y0 + 0.08, x1 - 0.12, y0 + 0.26, (235, 235, 210), outline=None)
    else:
        pen.ellipse(x0 + 0.1, y0 + 0.08, x0 + 0.3, y0 + 0.28, (255, 225, 80), outline=None)
    pen.rect(x0, y1 - 0.2, x1, y1, (60, 140, 60) if not night else (15, 40, 20), outline=None)  # a hedge
    if is_open:  # casements swung open to both sides: an empty frame with flaps beside it
        glass = (200, 225, 240)
        pen.poly([(x0, y0), (x0 - 0.22, y0 + 0.08), (x0 - 0.22, y1 - 0.08), (x0, y1)], glass, outline=frame)
        pen.poly([(x1, y0), (x1 + 0.22, y0 + 0.08), (x1 + 0.22, y1 - 0.08), (x1, y1)], glass, outline=frame)
    else:  # closed panes: a cross of glazing bars and a reflection
        pen.line(x, y0, x, y1, frame, 0.05)
        pen.line(x0, (y0 + y1) / 2, x1, (y0 + y1) / 2, frame, 0.05)
        pen.line(x0 + 0.08, y0 + 0.3, x0 + 0.3, y0 + 0.08, (235, 245, 250), 0.02)


def _draw_door(pen: _Pen, x: float, color: RGB, is_open: bool) -> None:
    x0, y0, x1, y1 = x - 0.36, 0.55, x + 0.36, HORIZON
    pen.rect(x0 - 0.05, y0 - 0.05, x1 + 0.05, y1, (235, 235, 230))
    if is_open:  # a dark doorway with the door panel swung into the room
        pen.rect(x0, y0, x1, y1, (45, 40, 40))
        pen.poly([(x0, y0), (x0 + 0.22, y0 - 0.12), (x0 + 0.22, y1 + 0.2), (x0, y1)], color)
    else:
        pen.rect(x0, y0, x1, y1, color)
        pen.rect(x0 + 0.1, y0 + 0.1, x1 - 0.1, y0 + 0.6, _shade(color, -0.15))
        pen.rect(x0 + 0.1, y0 + 0.75, x1 - 0.1, y1 - 0.1, _shade(color, -0.15))
        pen.ellipse(x1 - 0.14, 1.25, x1 - 0.06, 1.33, (215, 175, 50))


def _ball(pen: _Pen, x: float, base: float, c: RGB, lit: bool) -> None:
    pen.ellipse(x - 0.22, base - 0.44, x + 0.22, base, c)
    pen.ellipse(x - 0.12, base - 0.36, x - 0.02, base - 0.26, _shade(c, 0.6), outline=None)


def _box(pen: _Pen, x: float, base: float, c: RGB, lit: bool) -> None:
    pen.rect(x - 0.31, base - 0.5, x + 0.31, base, c)
    pen.rect(x - 0.33, base - 0.56, x + 0.33, base - 0.44, _shade(c, -0.25))


def _basket(pen: _Pen, x: float, base: float, c: RGB, lit: bool) -> None:
    pen.draw.arc(
        pen._xy(x - 0.22, base - 0.7, x + 0.22, base - 0.25),
        180,
        360,
        fill=_shade(c, -0.3),
        width=pen.width * 3,
    )
    pen.poly([(x - 0.3, base - 0.42), (x + 0.3, base - 0.42), (x + 0.24, base), (x - 0.24, base)], c)
    for y in (0.3, 0.18, 0.08):
        pen.line(x - 0.27, base - y, x + 0.27, base - y, _shade(c, -0.3), 0.015)


def _cone(pen: _Pen, x: float, base: float, c: RGB, lit: bool) -> None:
    pen.poly([(x - 0.25, base - 0.05), (x + 0.25, base - 0.05), (x, base - 0.75)], c)
    pen.poly(
        [(x - 0.16, base - 0.3), (x + 0.16, base - 0.3), (x + 0.12, base - 0.42), (x - 0.12, base - 0.42)],
        (245, 245, 245),
    )
    pen.rect(x - 0.3, base - 0.06, x + 0.3, base, _shade(c, -0.3))


def _lamp(pen: _Pen, x: float, base: float, c: RGB, lit: bool) -> None:
    top = base - 1.6
    if lit:  # a halo around the shade and a cone of light below it
        pen.ellipse(x - 0.45, top - 0.2, x + 0.45, top + 0.55, (255, 240, 160), outline=None)
        pen.poly(
            [(x - 0.25, top + 0.35), (x + 0.25, top + 0.35), (x + 0.55, top + 1.1), (x - 0.55, top + 1.1)],
            (255, 246, 190),
            outline=None,
        )
    pen.line(x, top + 0.3, x, base - 0.05, (90, 90, 90), 0.04)
    pen.ellipse(x - 0.2, base - 0.07, x + 0.2, base, (70, 70, 70))
    pen.ellipse(x - 0.06, top + 0.3, x + 0.06, top + 0.42, (255, 255, 200) if lit else (120, 120, 120))
    pen.poly(
        [(x - 0.15, top), (x + 0.15, top), (x + 0.25, top + 0.35), (x - 0.25, top + 0.35)],
        c,
    )


def _chair(pen: _Pen, x: float, base: float, c: RGB, lit: bool) -> None:
    dark = _shade(c, -0.3)
    pen.rect(x - 0.25, base - 0.5, x - 0.2, base, dark)
    pen.rect(x + 0.2, base - 0.5, x + 0.25, base, dark)
    pen.rect(x - 0.24, base - 1.05, x + 0.24, base - 0.58, c)
    pen.rect(x - 0.28, base - 0.58, x + 0.28, base - 0.48, c)


def _stool(pen: _Pen, x: float, base: float, c: RGB, lit: bool) -> None:
    for leg in (-0.2, 0.0, 0.2):
        pen.line(x + leg * 0.6, base - 0.56, x + leg, base, _shade(c, -0.35), 0.04)
    pen.ellipse(x - 0.28, base - 0.66, x + 0.28, base - 0.52, c)


def _sofa(pen: _Pen, x: float, base: float, c: RGB, lit: bool) -> None:
    pen.rect(x - 0.42, base - 0.1, x - 0.38, base, OUTLINE)
    pen.rect(x + 0.38, base - 0.1, x + 0.42, base, OUTLINE)
    pen.rect(x - 0.42, base - 0.82, x + 0.42, base - 0.4, _shade(c, -0.15))
    pen.rect(x - 0.47, base - 0.45, x + 0.47, base - 0.1, c)
    pen.rect(x - 0.47, base - 0.62, x - 0.37, base - 0.1, c)
    pen.rect(x + 0.37, base - 0.62, x + 0.47, base - 0.1, c)
    pen.line(x, base - 0.45, x, base - 0.2, _shade(c, -0.3), 0.012)


def _table(pen: _Pen, x: float, base: float, c: RGB, lit: bool) -> None:
    top = base - SUPPORT_TOPS["table"]
    pen.rect(x - 0.4, top + 0.08, x - 0.34, base, _shade(c, -0.2))
    pen.rect(x + 0.34, top + 0.08, x + 0.4, base, _shade(c, -0.2))
    pen.rect(x - 0.45, top, x + 0.45, top + 0.08, c)


def _plant(pen: _Pen, x: float, base: float, c: RGB, lit: bool) -> None:
    for dx, dy, rx, ry in (
        (-0.14, 0.7, 0.1, 0.28),
        (0.14, 0.7, 0.1, 0.28),
        (0.0, 0.85, 0.1, 0.3),
        (-0.22, 0.5, 0.12, 0.1),
        (0.22, 0.5, 0.12, 0.1),
    ):
        pen.ellipse(x + dx - rx, base - dy - ry, x + dx + rx, base - dy + ry, (30, 115, 45))
    pen.poly([(x - 0.2, base - 0.36), (x + 0.2, base - 0.36), (x + 0.15, base), (x - 0.15, base)], c)


def _tv(pen: _Pen, x: float, base: float, c: RGB, lit: bool) -> None:
    pen.rect(x - 0.42, base - 0.35, x + 0.42, base, (95, 70, 50))
    pen.rect(x - 0.05, base - 0.42, x + 0.05, base - 0.35, (25, 25, 25))
    pen.rect(x - 0.46, base - 0.98, x + 0.46, base - 0.42, (25, 25, 25))
    x0, y0, x1, y1 = x - 0.41, base - 0.93, x + 0.41, base - 0.47
    if lit:  # a bright picture: sky, sun and a hill
        pen.rect(x0, y0, x1, y1, (80, 165, 240), outline=None)
        pen.poly(
            [(x - 0.15, y1), (x + 0.12, y1 - 0.2), (x1, y1 - 0.12), (x1, y1)], (70, 180, 80), outline=None
        )
        pen.rect(x0, y1 - 0.05, x1, y1, (70, 180, 80), outline=None)
        pen.ellipse(x0 + 0.08, y0 + 0.06, x0 + 0.2, y0 + 0.18, (255, 230, 90), outline=None)
    else:  # a dark screen with a faint reflection
        pen.rect(x0, y0, x1, y1, (38, 38, 44), outline=None)
        pen.line(x0 + 0.1, y1 - 0.05, x0 + 0.35, y0 + 0.05, (70, 70, 78), 0.02)


def _bed(pen: _Pen, x: float, base: float, c: RGB, lit: bool) -> None:
    pen.rect(x - 0.47, base - 0.85, x - 0.4, base, _shade(c, -0.3))
    pen.rect(x - 0.45, base - 0.5, x + 0.46, base - 0.33, (240, 240, 236))
    pen.rect(x - 0.42, base - 0.35, x + 0.47, base - 0.08, c)
    pen.rect(x - 0.15, base - 0.53, x + 0.47, base - 0.3, _shade(c, 0.3))
    pen.ellipse(x - 0.4, base - 0.64, x - 0.17, base - 0.47, (250, 250, 250))
    pen.rect(x + 0.42, base - 0.1, x + 0.47, base, OUTLINE)


def _fridge(pen: _Pen, x: float, base: float, c: RGB, lit: bool) -> None:
    pen.rect(x - 0.35, base - 1.7, x + 0.35, base, c)
    pen.line(x - 0.35, base - 1.15, x + 0.35, base - 1.15, OUTLINE, 0.015)
    pen.rect(x + 0.22, base - 1.5, x + 0.26, base - 1.25, (190, 190, 190))
    pen.rect(x + 0.22, base - 1.0, x + 0.26, base - 0.6, (190, 190, 190))


def _stove(pen: _Pen, x: float, base: float, c: RGB, lit: bool) -> None:
    pen.rect(x - 0.375, base - 0.85, x + 0.375, base, c)
    pen.rect(x - 0.39, base - 0.9, x + 0.39, base - 0.85, (50, 50, 50))
    for dx in (-0.25, -0.08, 0.08, 0.25):
        pen.ellipse(x + dx - 0.035, base - 0.8, x + dx + 0.035, base - 0.73, (40, 40, 40))
    pen.rect(x - 0.27, base - 0.62, x + 0.27, base - 0.2, (40, 40, 40))
    pen.line(x - 0.2, base - 0.67, x + 0.2, base - 0.67, (200, 200, 200), 0.025)


def _bookshelf(pen: _Pen, x: float, base: float, c: RGB, lit: bool) -> None:
    pen.rect(x - 0.4, base - 1.6, x + 0.4, base, c)
    pen.rect(x - 0.34, base - 1.54, x + 0.34, base - 0.06, _shade(c, -0.45))
    spines = ((95, 62, 40), (155, 135, 100), (72, 72, 72), (185, 172, 150), (120, 95, 70))
    for row in range(4):
        shelf = base - 0.06 - row * 0.37
        pen.rect(x - 0.34, shelf - 0.04, x + 0.34, shelf, c, outline=None)
        left = x - 0.32
        for i in range(6):
            width, height = 0.05 + 0.02 * ((row + i) % 3), 0.22 + 0.03 * ((row * 2 + i) % 3)
            pen.rect(left, shelf - 0.04 - height, left + width, shelf - 0.04, spines[(row + i) % len(spines)])
            left += width + 0.015


def _mug(pen: _Pen, x: float, base: float, c: RGB, lit: bool) -> None:
    pen.draw.arc(pen._xy(x + 0.03, base - 0.16, x + 0.16, base - 0.04), 270, 90, fill=c, width=pen.width * 3)
    pen.rect(x - 0.08, base - 0.19, x + 0.08, base, c)


def _book(pen: _Pen, x: float, base: float, c: RGB, lit: bool) -> None:
    pen.rect(x - 0.17, base - 0.09, x + 0.17, base, c)
    pen.rect(x - 0.14, base - 0.065, x + 0.17, base - 0.025, (245, 245, 235), outline=None)


def _vase(pen: _Pen, x: float, base: float, c: RGB, lit: bool) -> None:
    pen.rect(x - 0.045, base - 0.4, x + 0.045, base - 0.2, c)
    pen.ellipse(x - 0.11, base - 0.26, x + 0.11, base, c)


def _laptop(pen: _Pen, x: float, base: float, c: RGB, lit: bool) -> None:
    pen.rect(x - 0.17, base - 0.32, x + 0.17, base - 0.03, (55, 55, 60))
    pen.rect(x - 0.14, base - 0.29, x + 0.14, base - 0.06, (120, 170, 220), outline=None)
    pen.rect(x - 0.22, base - 0.04, x + 0.22, base, (90, 90, 95))


_DRAW: dict[str, Callable[[_Pen, float, float, RGB, bool], None]] = {
    "ball": _ball,
    "box": _box,
    "basket": _basket,
    "cone": _cone,
    "lamp": _lamp,
    "chair": _chair,
    "stool": _stool,
    "sofa": _sofa,
    "table": _table,
    "plant": _plant,
    "tv": _tv,
    "bed": _bed,
    "fridge": _fridge,
    "stove": _stove,
    "bookshelf": _bookshelf,
    "mug": _mug,
    "book": _book,
    "vase": _vase,
    "laptop": _laptop,
}
