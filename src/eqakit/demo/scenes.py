"""Synthetic rooms for `eqakit synth`: what stands in a room, as plain data.

A scene holds the room type, wall and floor, a door and a window with their states, a row of objects
along the back wall (each in one floor slot, small items on top of another object) and the camera
path's parameters. The question generator (questions.py) reads every answer off these facts and the
renderer (render.py) draws exactly them, so answers always match the frames.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

RGB = tuple[int, int, int]

# Object body colours. The names are the answers, so every colour must read as its name at a glance.
COLORS: dict[str, RGB] = {
    "Red": (205, 35, 35),
    "Orange": (240, 135, 25),
    "Yellow": (240, 210, 35),
    "Green": (40, 160, 60),
    "Blue": (40, 85, 210),
    "Purple": (125, 55, 170),
    "Pink": (240, 125, 180),
    "Brown": (115, 70, 35),
}
WALL_COLORS: dict[str, RGB] = {
    "White": (242, 242, 236),
    "Beige": (226, 208, 172),
    "Light blue": (186, 212, 236),
    "Light green": (198, 230, 190),
    "Gray": (168, 168, 168),
}
DOOR_COLORS: dict[str, RGB] = {
    "Brown": (125, 80, 45),
    "White": (248, 248, 248),
    "Gray": (110, 110, 118),
    "Blue": (55, 85, 160),
}
FLOORS = ("Wood", "Carpet", "Tile")
ROOMS = ("kitchen", "bedroom", "living room", "office")
SMALL_ITEMS = ("mug", "book", "vase", "laptop")  # stand on a support (SUPPORT_TOPS) or on the floor
ZOOM_RANGE = (1.05, 1.25)  # room height / view height
# Kinds a small item can stand on, and the height of their top above the floor line (room units).
SUPPORT_TOPS = {"table": 0.68, "stool": 0.62, "chair": 0.58, "box": 0.56, "sofa": 0.45}


@dataclass(frozen=True)
class Kind:
    """What the renderer and the question templates need to know about one type of object."""

    name: str  # how questions and answers name it
    tall: bool = False  # reaches the window's height, so it never stands under the window
    colored: bool = True  # has one body colour from COLORS; the others are drawn in fixed colours


KINDS: dict[str, Kind] = {
    "ball": Kind("ball"),
    "box": Kind("box"),
    "basket": Kind("basket"),
    "cone": Kind("cone"),
    "lamp": Kind("lamp", tall=True),
    "chair": Kind("chair"),
    "stool": Kind("stool"),
    "sofa": Kind("sofa"),
    "table": Kind("table"),
    "plant": Kind("plant"),
    "tv": Kind("TV", colored=False),
    "bed": Kind("bed"),
    "fridge": Kind("fridge", tall=True),
    "stove": Kind("stove"),
    "bookshelf": Kind("bookshelf", tall=True),
    "mug": Kind("mug"),
    "book": Kind("book"),
    "vase": Kind("vase"),
    "laptop": Kind("laptop", colored=False),
}


@dataclass(frozen=True)
class Thing:
    """One object in the room: on the floor in a slot, or on top of the support standing in that slot."""

    kind: str
    slot: int
    color: str | None = None
    support: str | None = None  # kind of the object it stands on
    lit: bool = False  # lamps and TVs: switched on


@dataclass(frozen=True)
class Scene:
    """Everything the frames show, and the camera path that shows it."""

    room: str
    slots: int
    wall: str
    floor: str
    door_color: str
    door_slot: int
    door_open: bool
    window_slot: int
    window_open: bool
    night: bool
    things: tuple[Thing, ...]
    frames: int
    pan_right: bool
    zoom: float  # room height / view height: how close the camera stands
    bob_phase: float
    detail_seed: int  # stars, carpet speckles


def sample_scene(rng: random.Random) -> Scene:
    """Draw a random room whose objects make every question template answerable one way only.

    Each object type appears at most once and each colour at most once, so "the lamp" and "the red
    object" always name one thing; at most one object serves each function (sit, store, light...).
    """
    room = rng.choice(ROOMS)
    slots = rng.randint(7, 9)
    door_slot = rng.randrange(slots)
    window_slot = rng.choice([s for s in range(slots) if s != door_slot])
    required = {
        "kitchen": rng.choice((["fridge"], ["stove"], ["fridge", "stove"])),
        "bedroom": ["bed"] + (["tv"] if rng.random() < 0.3 else []),
        "living room": ["sofa"] + (["tv"] if rng.random() < 0.7 else []),
        "office": ["bookshelf"],
    }[room]
    optional = []
    if room != "living room" and rng.random() < 0.8:
        optional.append(rng.choice(("chair", "stool")))
    for kind, p in (("lamp", 0.75), (rng.choice(("box", "basket")), 0.6), ("ball", 0.5), ("cone", 0.4)):
        if rng.random() < p:
            optional.append(kind)
    for kind, p in (("plant", 0.6), ("table", 0.75)):
        if kind not in required and rng.random() < p:
            optional.append(kind)
    rng.shuffle(optional)
    kinds = required + optional[: max(0, slots - 3 - len(required))]

    free = [s for s in range(slots) if s != door_slot]
    rng.shuffle(free)
    placed: list[tuple[str, int]] = []
    for kind in sorted(kinds, key=lambda k: not KINDS[k].tall):  # tall ones first, away from the window
        slot = next(s for s in free if not (KINDS[kind].tall and s == window_slot))
        free.remove(slot)
        placed.append((kind, slot))
    items: list[tuple[str, int, str | None]] = []
    if rng.random() < 0.9:  # one small item, on some support or, failing that, on the floor
        item = "laptop" if room == "office" else rng.choice(SMALL_ITEMS[:3])
        supports = [(kind, slot) for kind, slot in placed if kind in SUPPORT_TOPS]
        support, slot = rng.choice(supports) if supports else (None, free[0])
        items.append((item, slot, support))

    palette = list(COLORS)
    rng.shuffle(palette)
    things = []
    for kind, slot, support in [(kind, slot, None) for kind, slot in placed] + items:
        color = palette.pop() if KINDS[kind].colored else None
        lit = kind in ("lamp", "tv") and rng.random() < 0.5
        things.append(Thing(kind, slot, color, support=support, lit=lit))
    things.sort(key=lambda t: (t.slot, t.support is not None))
    return Scene(
        room=room,
        slots=slots,
        wall=rng.choice(list(WALL_COLORS)),
        floor=rng.choice(FLOORS),
        door_color=rng.choice(list(DOOR_COLORS)),
        door_slot=door_slot,
        door_open=rng.random() < 0.5,
        window_slot=window_slot,
        window_open=rng.random() < 0.5,
        night=rng.random() < 0.5,
        things=tuple(things),
        frames=rng.randint(20, 60),
        pan_right=rng.random() < 0.5,
        zoom=rng.uniform(*ZOOM_RANGE),
        bob_phase=rng.random(),
        detail_seed=rng.getrandbits(32),
    )
