"""Question templates for synthetic scenes, one small set per OpenEQA category.

Every answer is read off the scene the frames show, and the scenes vary objects, colours, states and
places so that no template has a usual answer: a model that ignores the frames and learns the most
common answer per question is right far less than half the time. Answers are short (1-4 words) so a
small model can learn the templates; object localization answers carry four paraphrases as
`extra_answers`, as OpenEQA's do.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from eqakit.data.openeqa_categories import OPENEQA_CATEGORIES
from eqakit.demo.scenes import KINDS, Scene, Thing

OR, AR, OSR, OL, SU, FR, WK = OPENEQA_CATEGORIES

LOCATIONS: dict[str, tuple[str, str, str, str]] = {
    "Under the window": (
        "Below the window",
        "Beneath the window",
        "By the window",
        "On the floor under the window",
    ),
    "Next to the door": ("Beside the door", "By the door", "Near the door", "Close to the door"),
    "Next to the table": ("Beside the table", "By the table", "Near the table", "Close to the table"),
    "In the left corner": (
        "Left corner of the room",
        "In the corner on the left",
        "At the far left",
        "On the far left",
    ),
    "In the right corner": (
        "Right corner of the room",
        "In the corner on the right",
        "At the far right",
        "On the far right",
    ),
}

# (question, kinds that answer it): a scene holds at most one object of each set.
FUNCTIONS: tuple[tuple[str, frozenset[str]], ...] = (
    ("What could I sit on?", frozenset({"chair", "stool", "sofa"})),
    ("What could I turn on to read at night?", frozenset({"lamp"})),
    ("What could I put my toys in?", frozenset({"box", "basket"})),
    ("What could I throw to a dog?", frozenset({"ball"})),
    ("What could I use to keep milk cold?", frozenset({"fridge"})),
    ("What could I cook dinner on?", frozenset({"stove"})),
    ("Where could I put my cup down?", frozenset({"table"})),
    ("Where could I take a nap?", frozenset({"bed", "sofa"})),
    ("Where could I find something to read?", frozenset({"bookshelf"})),
)
ROOM_KINDS = {
    "kitchen": {"fridge", "stove"},
    "bedroom": {"bed"},
    "living room": {"sofa"},
    "office": {"bookshelf"},
}
ROOM_ANSWERS = {
    "kitchen": "A kitchen",
    "bedroom": "A bedroom",
    "living room": "A living room",
    "office": "An office",
}


# Questions about the whole room, asked in every episode: their answers are visible at a glance
# (wall and floor colour, a dark or bright doorway and window, the room's big furniture), so the
# demo's tiny model can learn to read them from a few hundred episodes, which is what shows that
# fine-tuning taught it to look at the frames.
GLANCE = frozenset(
    {
        "What color are the walls?",
        "What is the floor made of?",
        "Is the door open or closed?",
        "Is it day or night outside?",
        "What kind of room is this?",
    }
)


@dataclass(frozen=True)
class SceneQuestion:
    """One question about a scene, with the answer its frames show."""

    category: str
    question: str
    answer: str
    extra_answers: tuple[str, ...] = ()


def ask(scene: Scene, rng: random.Random) -> list[SceneQuestion]:
    """About 11 questions (8-14) about the scene, at least one per category, in category order.

    Every episode asks the GLANCE questions, then one random question per category that has none
    yet, then random others.
    """
    pools = {category: [] for category in OPENEQA_CATEGORIES}
    chosen = []
    for question in candidates(scene):
        (chosen if question.question in GLANCE else pools[question.category]).append(question)
    for pool in pools.values():
        rng.shuffle(pool)
    asked = {q.category for q in chosen}
    chosen += [pool.pop() for category, pool in pools.items() if pool and category not in asked]
    for _ in range(rng.randint(8, 14) - len(chosen)):
        open_pools = [pool for pool in pools.values() if pool]
        if not open_pools:
            break
        chosen.append(rng.choice(open_pools).pop())
    return sorted(chosen, key=lambda q: OPENEQA_CATEGORIES.index(q.category))


def candidates(scene: Scene) -> list[SceneQuestion]:
    """Every question the templates can ask about this scene, each with its one right answer."""
    floor = [t for t in scene.things if not t.support]
    by_kind = {t.kind: t for t in scene.things}
    questions: list[SceneQuestion] = []

    # object recognition: name a thing picked out by its colour or its place
    for t in scene.things:
        if t.color and not (t.color == "Green" and "plant" in by_kind):  # plant leaves are green too
            questions.append(SceneQuestion(OR, f"What is the {t.color.lower()} object?", _a(t)))
    for t in scene.things:
        if t.support:
            questions.append(SceneQuestion(OR, f"What is on the {KINDS[t.support].name}?", _a(t)))
    for place, slots in (
        ("under the window", {scene.window_slot}),
        ("next to the door", {scene.door_slot - 1, scene.door_slot + 1}),
        ("in the left corner", {0}),
        ("in the right corner", {scene.slots - 1}),
    ):
        there = [t for t in floor if t.slot in slots]
        if len(there) == 1:
            questions.append(SceneQuestion(OR, f"What is {place}?", _a(there[0])))

    # attribute recognition
    for t in scene.things:
        if t.color:
            noun = "plant pot" if t.kind == "plant" else KINDS[t.kind].name
            questions.append(SceneQuestion(AR, f"What color is the {noun}?", t.color))
    questions.append(SceneQuestion(AR, "What color are the walls?", scene.wall))
    questions.append(SceneQuestion(AR, "What color is the door?", scene.door_color))
    questions.append(SceneQuestion(AR, "What is the floor made of?", scene.floor))

    # object state recognition
    for kind in ("lamp", "tv"):
        if kind in by_kind:
            questions.append(
                SceneQuestion(
                    OSR, f"Is the {KINDS[kind].name} on or off?", "On" if by_kind[kind].lit else "Off"
                )
            )
    questions.append(
        SceneQuestion(OSR, "Is the door open or closed?", "Open" if scene.door_open else "Closed")
    )
    questions.append(
        SceneQuestion(OSR, "Is the window open or closed?", "Open" if scene.window_open else "Closed")
    )
    questions.append(
        SceneQuestion(
            OSR,
            "Which is open, the door or the window?",
            _which("The door", scene.door_open, "The window", scene.window_open),
        )
    )
    if "lamp" in by_kind and "tv" in by_kind:
        lamp, tv = by_kind["lamp"].lit, by_kind["tv"].lit
        questions.append(
            SceneQuestion(
                OSR, "Which is switched on, the lamp or the TV?", _which("The lamp", lamp, "The TV", tv)
            )
        )

    # object localization
    for t in scene.things:
        place = _location(scene, t, by_kind.get("table"))
        if place:
            questions.append(
                SceneQuestion(OL, f"Where is the {KINDS[t.kind].name}?", place, _paraphrases(place))
            )

    # spatial understanding: left/right/between along the back wall, the door included
    row: list[tuple[int, str, str]] = [(t.slot, f"the {KINDS[t.kind].name}", _the(t)) for t in floor]
    row = sorted([*row, (scene.door_slot, "the door", "The door")])
    for (_, left_ref, left_answer), (_, right_ref, right_answer) in zip(row, row[1:], strict=False):
        questions.append(SceneQuestion(SU, f"What is to the left of {right_ref}?", left_answer))
        questions.append(SceneQuestion(SU, f"What is to the right of {left_ref}?", right_answer))
    for (_, left_ref, _), (_, _, middle), (_, right_ref, _) in zip(row, row[1:], row[2:], strict=False):
        questions.append(SceneQuestion(SU, f"What is between {left_ref} and {right_ref}?", middle))

    # functional reasoning
    for question, kinds in FUNCTIONS:
        useful = [t for t in scene.things if t.kind in kinds]
        if len(useful) == 1:
            questions.append(SceneQuestion(FR, question, _the(useful[0])))

    # world knowledge
    questions.append(SceneQuestion(WK, "What kind of room is this?", ROOM_ANSWERS[scene.room]))
    questions.append(SceneQuestion(WK, "Is it day or night outside?", "Night" if scene.night else "Day"))
    typical = [t for t in scene.things if t.kind in ROOM_KINDS[scene.room]]
    if len(typical) == 1:
        questions.append(
            SceneQuestion(
                WK,
                f"Which object here is usually found in {ROOM_ANSWERS[scene.room].lower()}?",
                _the(typical[0]),
            )
        )
    return questions


def _location(scene: Scene, thing: Thing, table: Thing | None) -> str | None:
    """The one place description that fits, or None when none or several do."""
    if thing.support:
        return f"On the {KINDS[thing.support].name}"
    places = []
    if thing.slot == scene.window_slot:
        places.append("Under the window")
    if abs(thing.slot - scene.door_slot) == 1:
        places.append("Next to the door")
    if table and thing is not table and abs(thing.slot - table.slot) == 1:
        places.append("Next to the table")
    if thing.slot == 0:
        places.append("In the left corner")
    if thing.slot == scene.slots - 1:
        places.append("In the right corner")
    return places[0] if len(places) == 1 else None


def _paraphrases(place: str) -> tuple[str, str, str, str]:
    if place in LOCATIONS:
        return LOCATIONS[place]
    support = place.removeprefix("On the ")
    return (
        f"On top of the {support}",
        f"Sitting on the {support}",
        f"Resting on the {support}",
        f"Placed on the {support}",
    )


def _which(first: str, first_true: bool, second: str, second_true: bool) -> str:
    return {(True, True): "Both", (True, False): first, (False, True): second, (False, False): "Neither"}[
        (first_true, second_true)
    ]


def _a(thing: Thing) -> str:
    name = KINDS[thing.kind].name
    return f"{'An' if name[0] in 'aeiou' else 'A'} {name}"


def _the(thing: Thing) -> str:
    name = KINDS[thing.kind].name
    return f"The {thing.color.lower()} {name}" if thing.color else f"The {name}"
