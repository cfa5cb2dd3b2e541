"""The micro-world: a tiny synthetic visual question-answering world, generated deterministically from a seed.

Each image is a dark square split into a 2×2 grid; 1–4 cells hold one coloured shape each (5 colours × 3 shapes,
no (colour, shape) pair twice in a scene). From the scenes we write, in LLaVA-1.5 JSON format:

* ``pretrain.json`` – one caption per training image (stage 1),
* ``instruct.json`` – 2–4 question/answer turns per training image (stage 2),
* ``eval.json``     – one question per *held-out* image, with ``question_type``, the gold ``answer`` and the
  scene's ``caption`` (for text-only checks),
* ``pope.json``     – existence questions on held-out images sampled as POPE does, with ``pope_sampling``.

The training scenes carry a language prior that can mislead, as real data does (``COMPANIONS``): six objects are
common, and each comes with its companion in most scenes, so the captions the LMs read and the stage-2 answers say
"a red circle" and "a blue square" together. ``pope.json`` probes it: for every held-out image one present object
("yes") and, per sampling, one absent one ("no") – *random* (any absent object), *popular* (an absent common object)
or *adversarial* (the absent companion of an object that is present), so that a model that leans on text says "yes"
to the usual companion that is not there.

Answers are one or two words from a closed vocabulary (``ANSWERS``). ``eval.json`` is drawn without the prior
(uniform scenes) and every question template is answer-balanced, so a model that ignores the image cannot beat the
per-type chance level (``chance_level``); its existence questions are half "no", half of those adversarial by
attribute (the absent object shares its colour or its shape with an object that is present).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from PIL import Image, ImageDraw

from factory.constants import IMAGE_MARKER
from factory.errors import FactoryError
from factory.model.loading import node_get

# Bump when the generated content changes, so cached worlds are regenerated.
GENERATOR_VERSION = 4

COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 200),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")  # grid cells in reading order
COUNT_WORDS = ("one", "two", "three", "four")
QUESTION_TYPES = ("color", "shape", "count", "position", "existence")
ANSWERS: Dict[str, Tuple[str, ...]] = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "count": COUNT_WORDS,
    "position": POSITIONS,
    "existence": ("yes", "no"),
}

# Question templates: (key, question type, text). Text fields are filled from the scene.
TEMPLATES: Tuple[Tuple[str, str, str], ...] = (
    ("color_at", "color", "What color is the shape in the {pos}?"),
    ("color_of", "color", "What color is the {shape}?"),
    ("shape_at", "shape", "What shape is in the {pos}?"),
    ("shape_of", "shape", "Which shape is {color}?"),
    ("count", "count", "How many shapes are there?"),
    ("where", "position", "Where is the {color} {shape}?"),
    ("exists", "existence", "Is there a {color} {shape} in the image?"),
)

# The language prior: companion pairs. Their six objects are drawn COMMON_WEIGHT times as often as the other nine,
# and a drawn one brings its companion along with probability COMPANION_RATE when the scene has room for it.
COMPANIONS: Tuple[Tuple[Tuple[str, str], Tuple[str, str]], ...] = (
    (("red", "circle"), ("blue", "square")),
    (("green", "triangle"), ("yellow", "circle")),
    (("purple", "square"), ("red", "triangle")),
)
COMPANION_RATE = 0.8
COMMON_WEIGHT = 3
POPE_SAMPLINGS = ("random", "popular", "adversarial")

DEFAULT_SIZES = {"num_train_images": 2000, "num_eval_images": 500, "num_pope_images": 100, "image_size": 32}
MANIFEST = "manifest.json"
_SUPERSAMPLE = 4  # shapes are drawn 4× larger and downsampled, so small images keep clean anti-aliased edges

Obj = Tuple[str, str, int]  # (colour, shape, cell index)


def chance_level(question_type: str) -> float:
    """Accuracy (0–1) of guessing uniformly from the closed answer set of a question type."""
    return 1.0 / len(ANSWERS[question_type])


# ----------------------------------------------------------------------------------------------- scenes and images
ALL_OBJECTS: Tuple[Tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)
COMPANION_OF: Dict[Tuple[str, str], Tuple[str, str]] = {**dict(COMPANIONS), **{b: a for a, b in COMPANIONS}}


def _random_scene(rng: random.Random, num_objects: Optional[int] = None, prior: bool = True) -> List[Obj]:
    """A scene of `num_objects` (default 1–4 at random) objects in distinct cells. With `prior` the objects follow
    the world's language prior (common objects, companions together: the training scenes); without it they are
    uniform (the eval.json scenes, where no prior can help)."""
    num = num_objects or rng.randint(1, len(POSITIONS))
    if prior:
        pairs: List[Tuple[str, str]] = []
        while len(pairs) < num:
            left = [o for o in ALL_OBJECTS if o not in pairs]
            obj = rng.choices(left, weights=[COMMON_WEIGHT if o in COMPANION_OF else 1 for o in left])[0]
            pairs.append(obj)
            partner = COMPANION_OF.get(obj)
            if partner and partner not in pairs and len(pairs) < num and rng.random() < COMPANION_RATE:
                pairs.append(partner)
        rng.shuffle(pairs)  # companions land in any two cells, not always side by side
    else:
        pairs = rng.sample(ALL_OBJECTS, num)
    cells = sorted(rng.sample(range(len(POSITIONS)), num))
    return [(c, s, cell) for (c, s), cell in zip(pairs, cells)]


def _render(scene: List[Obj], image_size: int, rng: random.Random) -> Image.Image:
    big = image_size * _SUPERSAMPLE
    shade = rng.randint(20, 45)
    img = Image.new("RGB", (big, big), (shade, shade, shade))
    draw = ImageDraw.Draw(img)
    cell = big / 2
    for colour, shape, idx in scene:
        # Jitter size, placement and shade so that no two images are pixel-identical and the encoder must
        # generalise, while every shape stays well inside its own cell.
        size = cell * rng.uniform(0.55, 0.8)
        x0 = (idx % 2) * cell + rng.uniform(0.05 * cell, cell * 0.95 - size)
        y0 = (idx // 2) * cell + rng.uniform(0.05 * cell, cell * 0.95 - size)
        fill = tuple(max(0, min(255, v + rng.randint(-15, 15))) for v in COLORS[colour])
        box = (x0, y0, x0 + size, y0 + size)
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(x0 + size / 2, y0), (x0 + size, y0 + size), (x0, y0 + size)], fill=fill)
    return img.resize((image_size, image_size), Image.LANCZOS)


def caption(scene: List[Obj]) -> str:
    """'Two shapes: a red circle in the top left and a blue square in the bottom right.'"""
    parts = [f"a {c} {s} in the {POSITIONS[i]}" for c, s, i in scene]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    noun = "shape" if len(scene) == 1 else "shapes"
    return f"{COUNT_WORDS[len(scene) - 1].capitalize()} {noun}: {listed}."


# ----------------------------------------------------------------------------------------------------- questions
def _question(scene: List[Obj], template: str, rng: random.Random, answer: Optional[str] = None):
    """A (question, answer) for `template` about `scene`, optionally forced to `answer`; None if impossible."""
    by_cell = {i: (c, s) for c, s, i in scene}
    colours = [c for c, _, _ in scene]
    shapes = [s for _, s, _ in scene]
    text = {k: t for k, _, t in TEMPLATES}[template]
    options: List[Tuple[Dict[str, str], str]] = []  # (fields, answer)
    if template == "color_at":
        options = [({"pos": POSITIONS[i]}, c) for i, (c, _) in by_cell.items()]
    elif template == "color_of":  # only shapes that occur once, so the question has one answer
        options = [({"shape": s}, c) for c, s, _ in scene if shapes.count(s) == 1]
    elif template == "shape_at":
        options = [({"pos": POSITIONS[i]}, s) for i, (_, s) in by_cell.items()]
    elif template == "shape_of":
        options = [({"color": c}, s) for c, s, _ in scene if colours.count(c) == 1]
    elif template == "count":
        options = [({}, COUNT_WORDS[len(scene) - 1])]
    elif template == "where":
        options = [({"color": c, "shape": s}, POSITIONS[i]) for c, s, i in scene]
    elif template == "exists":
        present = {(c, s) for c, s, _ in scene}
        want = answer or rng.choice(("yes", "no"))
        if want == "yes":
            options = [({"color": c, "shape": s}, "yes") for c, s in sorted(present)]
        else:
            absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
            # Half of the "no" questions are adversarial: the absent object shares a colour or a shape with the scene.
            near = [(c, s) for c, s in absent if c in colours or s in shapes]
            pool = near if near and rng.random() < 0.5 else absent
            options = [({"color": c, "shape": s}, "no") for c, s in pool]
    if answer is not None:
        options = [o for o in options if o[1] == answer]
    if not options:
        return None
    fields, ans = rng.choice(options)
    return text.format(**fields), ans


def _pope_negative(scene: List[Obj], sampling: str, rng: random.Random) -> Optional[Tuple[str, str]]:
    """An object absent from `scene`, drawn as POPE's `sampling` draws its negatives; None if there is none."""
    present = {(c, s) for c, s, _ in scene}
    absent = [o for o in ALL_OBJECTS if o not in present]
    if sampling == "popular":  # the most frequent objects of the training scenes
        absent = [o for o in absent if o in COMPANION_OF]
    elif sampling == "adversarial":  # the objects that co-occur most with what is there
        absent = sorted({COMPANION_OF[o] for o in present if o in COMPANION_OF} - present)
    return rng.choice(absent) if absent else None


def _pope_rows(num_images: int, image_size: int, seed: int, images: Path) -> List[Dict[str, Any]]:
    """POPE-style existence questions on held-out scenes drawn with the prior: per image one present object and,
    per sampling, one absent one (so each sampling is half "yes", half "no", and shares its "yes" rows)."""
    rng = random.Random(f"microworld-{seed}-pope")
    text = {k: t for k, _, t in TEMPLATES}["exists"]
    rows = []
    for n in range(num_images):
        while True:  # rejection sampling: an adversarial negative needs a companion missing from the scene
            scene = _random_scene(rng, rng.randint(1, len(POSITIONS) - 1))
            negatives = {s: _pope_negative(scene, s, rng) for s in POPE_SAMPLINGS}
            if all(negatives.values()):
                break
        name = f"pope_{n:05d}.png"
        _render(scene, image_size, rng).save(images / name)
        colour, shape, _ = rng.choice(scene)
        for sampling in POPE_SAMPLINGS:
            for (c, s), answer in (((colour, shape), "yes"), (negatives[sampling], "no")):
                rows.append({"id": f"mw-pope-{sampling}-{n:05d}-{answer}", "image": name,
                             "conversations": _conversation([(text.format(color=c, shape=s), answer)]),
                             "question_type": "existence", "pope_sampling": sampling, "answer": answer,
                             "caption": caption(scene)})
    return rows


def _conversation(turns: List[Tuple[str, str]]) -> List[Dict[str, str]]:
    conv = []
    for k, (q, a) in enumerate(turns):
        conv.append({"from": "human", "value": f"{IMAGE_MARKER}\n{q}" if k == 0 else q})
        conv.append({"from": "gpt", "value": a})
    return conv


# ---------------------------------------------------------------------------------------------------- generation
def _validate_sizes(num_train_images: int, num_eval_images: int, num_pope_images: int, image_size: int) -> None:
    for key, value, low in (("num_train_images", num_train_images, 1), ("num_eval_images", num_eval_images, 1),
                            ("num_pope_images", num_pope_images, 0), ("image_size", image_size, 8)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise FactoryError(
                f"Micro-world setting `{key}` must be an integer ≥ {low}, got {value!r}. Fix `data.sizes.{key}` "
                f"in configs/data/microworld.yaml or on the command line (e.g. data.sizes.{key}={max(low, 32)})."
            )


def generate_microworld(root, seed: int = 0, num_train_images: int = DEFAULT_SIZES["num_train_images"],
                        num_eval_images: int = DEFAULT_SIZES["num_eval_images"],
                        num_pope_images: int = DEFAULT_SIZES["num_pope_images"],
                        image_size: int = DEFAULT_SIZES["image_size"]) -> Path:
    """Write images/, pretrain.json, instruct.json, eval.json, pope.json, manifest.json under `root` (same seed →
    same bytes)."""
    _validate_sizes(num_train_images, num_eval_images, num_pope_images, image_size)
    root = Path(root)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)

    # Independent streams per split: changing the eval size never changes the training data.
    train_rng = random.Random(f"microworld-{seed}-train")
    pretrain, instruct = [], []
    templates_by_type = {t: [k for k, qt, _ in TEMPLATES if qt == t] for t in QUESTION_TYPES}
    for n in range(num_train_images):
        scene = _random_scene(train_rng)
        name = f"train_{n:05d}.png"
        _render(scene, image_size, train_rng).save(images / name)
        # The plain (stage-1) template keeps only the image and the caption; the short prompt makes the entry a
        # valid conversation for the chat templates too.
        pretrain.append({"id": f"mw-train-{n:05d}", "image": name,
                         "conversations": _conversation([("Describe the image.", caption(scene))])})
        turns = []
        for qtype in train_rng.sample(QUESTION_TYPES, train_rng.randint(2, 4)):
            for key in train_rng.sample(templates_by_type[qtype], len(templates_by_type[qtype])):
                qa = _question(scene, key, train_rng)
                if qa:
                    turns.append(qa)
                    break
        instruct.append({"id": f"mw-train-{n:05d}", "image": name, "conversations": _conversation(turns)})

    eval_rng = random.Random(f"microworld-{seed}-eval")
    evaluation = []
    # Round-robin over the question types (equal shares, also in any prefix of the file) and, within a type, over
    # its templates; each template cycles through its answer set in a shuffled order, so answers are balanced per
    # template (to within one) and a model that cannot see stays at chance.
    answer_queues: Dict[str, List[str]] = {}
    for n in range(num_eval_images):
        qtype = QUESTION_TYPES[n % len(QUESTION_TYPES)]
        key = templates_by_type[qtype][(n // len(QUESTION_TYPES)) % len(templates_by_type[qtype])]
        if not answer_queues.get(key):
            answer_queues[key] = eval_rng.sample(ANSWERS[qtype], len(ANSWERS[qtype]))
        want = answer_queues[key].pop()
        num_objects = None
        if qtype == "count":
            num_objects = COUNT_WORDS.index(want) + 1
        while True:  # rejection sampling; every (template, answer) is reachable within a few draws
            scene = _random_scene(eval_rng, num_objects, prior=False)
            qa = _question(scene, key, eval_rng, answer=want)
            if qa:
                break
        name = f"eval_{n:05d}.png"
        _render(scene, image_size, eval_rng).save(images / name)
        evaluation.append({"id": f"mw-eval-{n:05d}", "image": name, "conversations": _conversation([qa]),
                           "question_type": qtype, "template": key, "answer": qa[1],
                           # the scene written out, for text-only checks (an LM reading the scene in place of the
                           # image: scripts/microworld_check.py); never shown to a model that is evaluated on images
                           "caption": caption(scene)})

    pope = _pope_rows(num_pope_images, image_size, seed, images)
    for fname, data in (("pretrain.json", pretrain), ("instruct.json", instruct), ("eval.json", evaluation),
                        ("pope.json", pope)):
        (root / fname).write_text(json.dumps(data, indent=1) + "\n")
    manifest = dict(_settings(seed, num_train_images, num_eval_images, num_pope_images, image_size),
                    counts={"pretrain": len(pretrain), "instruct": len(instruct), "eval": len(evaluation),
                            "pope": len(pope)})
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return root


def _settings(seed, num_train_images, num_eval_images, num_pope_images, image_size) -> Dict[str, Any]:
    return {"generator_version": GENERATOR_VERSION, "seed": seed, "num_train_images": num_train_images,
            "num_eval_images": num_eval_images, "num_pope_images": num_pope_images, "image_size": image_size}


def _read_manifest(root: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def ensure_microworld(data_cfg) -> Path:
    """Generate the micro-world into `data_cfg.root` unless a world with the same settings is already there.

    Reads `root` (relative paths are relative to the current directory), `generate`, `seed` and `sizes`
    ({num_train_images, num_eval_images, num_pope_images, image_size}). Returns the absolute root. Safe when several
    processes of one distributed job call it at once: each writes into a private temporary folder that is moved
    into place atomically.
    """
    root_value = node_get(data_cfg, "root")
    if not root_value:
        raise FactoryError("The micro-world data config has no `root`: set `data.root` "
                           "(e.g. data.root=data/microworld).")
    root = Path(str(root_value)).expanduser().resolve()
    sizes = dict(DEFAULT_SIZES)
    sizes.update({k: node_get(node_get(data_cfg, "sizes", {}) or {}, k) for k in DEFAULT_SIZES
                  if node_get(node_get(data_cfg, "sizes", {}) or {}, k) is not None})
    seed = node_get(data_cfg, "seed", 0)
    wanted = _settings(seed, **sizes)

    manifest = _read_manifest(root)
    if manifest is not None and {k: manifest.get(k) for k in wanted} == wanted:
        return root
    if not node_get(data_cfg, "generate", True):
        if manifest is None and (root / "eval.json").is_file():
            return root  # a world someone placed there by hand; use it as is
        raise FactoryError(
            f"No micro-world with settings {wanted} at {root} and `data.generate` is false. Set data.generate=true "
            f"to generate it, or point data.root at a folder written by factory.data.microworld."
        )
    if root.exists() and manifest is None and any(root.iterdir()):
        raise FactoryError(
            f"{root} exists and is not empty but holds no micro-world {MANIFEST}, so it is not ours to overwrite. "
            f"Point data.root at a new or empty folder (e.g. data.root=data/microworld)."
        )

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        generate_microworld(tmp, seed=seed, **sizes)
        if root.exists() and (manifest is not None or not any(root.iterdir())):
            # A stale world we wrote earlier (or an empty folder); another process may already have replaced it.
            current = _read_manifest(root)
            if current is not None and {k: current.get(k) for k in wanted} == wanted:
                return root
            shutil.rmtree(root, ignore_errors=True)
        try:
            os.replace(tmp, root)
        except OSError:
            current = _read_manifest(root)  # lost the race to a sibling process writing the same world
            if current is None or {k: current.get(k) for k in wanted} != wanted:
                raise FactoryError(f"Could not move the generated micro-world into {root}; check write permissions.")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
