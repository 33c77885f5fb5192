"""Procedurally drawn scenes with exact captions: the data of the text-to-image reference, and the exact checks of
what a generated image shows.

A scene is one group of 1-3 shapes of one kind and one colour in one half of a 32x32 RGB canvas, captioned
"a picture of two red circles on the left". Captions vary compositionally (count x colour x shape x position:
3 x 6 x 3 x 4 = 216 prompts), so a caption is a real prompt and prompt adherence is a set of exact checks:
`detect` finds the shapes (connected components of bright pixels) and reads their count, colour (nearest palette
entry), shape (`_shape`: top-heavy or not, how much of its bounding box it fills) and position (which half holds
every centroid).
"""

from __future__ import annotations

import dataclasses
import itertools
import random

import torch

SIZE = 32
COUNTS = ("one", "two", "three")
COLOURS = {  # name -> RGB 0-255; all far apart and bright on the black background
    "red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240),
    "yellow": (240, 220, 40), "magenta": (220, 60, 220), "cyan": (40, 210, 220),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
ATTRIBUTES = ("count", "colour", "shape", "position")
PREFIX = "a picture of"


@dataclasses.dataclass(frozen=True)
class Scene:
    count: int  # 1..3
    colour: str
    shape: str
    position: str

    def caption(self) -> str:
        noun = self.shape + ("s" if self.count > 1 else "")
        return f"{PREFIX} {COUNTS[self.count - 1]} {self.colour} {noun} {POSITIONS[self.position]}"


def all_scenes() -> list[Scene]:
    """Every caption's scene, in a fixed order."""
    return [Scene(n, c, s, p) for n, c, s, p in itertools.product((1, 2, 3), COLOURS, SHAPES, POSITIONS)]


def parse(caption: str) -> Scene:
    """The scene a caption asks for; ValueError naming the grammar for anything else."""
    words = caption.strip().lower().split()
    prefix = PREFIX.split()
    ok = len(words) == len(prefix) + 6 and words[:len(prefix)] == prefix
    if ok:
        count, colour, noun, *where = words[len(prefix):]
        position = next((k for k, v in POSITIONS.items() if v == " ".join(where)), None)
        shape = noun[:-1] if noun.endswith("s") and noun[:-1] in SHAPES else noun
        count_n = COUNTS.index(count) + 1 if count in COUNTS else 0
        ok = (count_n and colour in COLOURS and shape in SHAPES and position is not None
              and noun == shape + ("s" if count_n > 1 else ""))
    if not ok:
        raise ValueError(f"{caption!r} is not a scene caption: expected '{PREFIX} COUNT COLOUR SHAPE(S) POSITION' "
                         f"with COUNT in {COUNTS}, COLOUR in {tuple(COLOURS)}, SHAPE in {SHAPES}, POSITION in "
                         f"{tuple(POSITIONS.values())}")
    return Scene(count_n, colour, shape, position)


def vocabulary() -> list[str]:
    """Every word a caption can use, sorted."""
    words = set(PREFIX.split()) | set(COUNTS) | set(COLOURS) | {s + e for s in SHAPES for e in ("", "s")}
    for phrase in POSITIONS.values():
        words |= set(phrase.split())
    return sorted(words)


def _region(position: str) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the half the group lies in (1-pixel margin)."""
    h = SIZE // 2
    return {"left": (1, 1, h - 1, SIZE - 1), "right": (h + 1, 1, SIZE - 1, SIZE - 1),
            "top": (1, 1, SIZE - 1, h - 1), "bottom": (1, h + 1, SIZE - 1, SIZE - 1)}[position]


def _mask(shape: str, size: int) -> torch.Tensor:
    c = (size - 1) / 2
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                          indexing="ij")
    if shape == "square":
        return torch.ones(size, size, dtype=torch.bool)
    if shape == "circle":
        return (x - c) ** 2 + (y - c) ** 2 <= (size / 2) ** 2
    # an upward triangle: apex at the top centre, base the bottom row
    return (x - c).abs() <= (y + 1) / 2


def draw(scene: Scene, rng: random.Random) -> torch.Tensor:
    """(3, 32, 32) in [-1, 1]: the scene's shapes (7-9 pixels wide, 6-8 for three), not touching, on black."""
    x0, y0, x1, y1 = _region(scene.position)
    for _ in range(1000):
        boxes = []
        for _ in range(scene.count):
            s = rng.randint(7, 9) if scene.count < 3 else rng.randint(6, 8)
            bx, by = rng.randint(x0, x1 - s), rng.randint(y0, y1 - s)
            if all(bx + s < ox or ox + os_ < bx or by + s < oy or oy + os_ < by  # a pixel's gap at least
                   for ox, oy, os_ in boxes):
                boxes.append((bx, by, s))
        if len(boxes) == scene.count:
            break
    else:  # pragma: no cover - three 9-pixel shapes always fit a 14x30 half
        raise RuntimeError(f"could not place {scene}")
    img = torch.full((3, SIZE, SIZE), -1.0)
    colour = torch.tensor(COLOURS[scene.colour], dtype=torch.float32) / 127.5 - 1
    for bx, by, s in boxes:
        m = _mask(scene.shape, s)
        img[:, by:by + s, bx:bx + s][:, m] = colour[:, None]
    return img


def dataset(n: int, seed: int = 0) -> tuple[torch.Tensor, list[Scene]]:
    """`n` random scenes (uniform over the 216 captions) and their images (n, 3, 32, 32)."""
    rng = random.Random(seed)
    scenes = all_scenes()
    picked = [rng.choice(scenes) for _ in range(n)]
    return torch.stack([draw(s, rng) for s in picked]), picked


def _components(mask: torch.Tensor) -> list[list[tuple[int, int]]]:
    """4-connected components of a (H, W) bool mask, as pixel lists."""
    h, w = mask.shape
    seen = torch.zeros_like(mask)
    m, out = mask.tolist(), []
    seen_l = seen.tolist()
    for y in range(h):
        for x in range(w):
            if not m[y][x] or seen_l[y][x]:
                continue
            stack, comp = [(y, x)], []
            seen_l[y][x] = True
            while stack:
                cy, cx = stack.pop()
                comp.append((cy, cx))
                for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                    if 0 <= ny < h and 0 <= nx < w and m[ny][nx] and not seen_l[ny][nx]:
                        seen_l[ny][nx] = True
                        stack.append((ny, nx))
            out.append(comp)
    return out


MIN_PIXELS = 12  # a component smaller than this is a speck, not a shape (the smallest shape has 24 pixels)


def _shape(ys: torch.Tensor, xs: torch.Tensor) -> str:
    """A component's shape: a triangle holds far fewer pixels in the top half of its bounding box than in the
    bottom half (drawn: at most 0.5; circles and squares 1); of the others a square fills its box (drawn: 1.0)
    and a circle does not (drawn: at most 0.89 at 6 pixels). Each margin is over a pixel wide at the smallest size."""
    top, bottom = int(ys.min()), int(ys.max())
    mid = (top + bottom) / 2
    upper, lower = int((ys < mid).sum()), int((ys > mid).sum())
    if upper < 0.7 * max(lower, 1):
        return "triangle"
    fill = len(ys) / float((bottom - top + 1) * (int(xs.max()) - int(xs.min()) + 1))
    return "square" if fill >= 0.94 else "circle"


def detect(image: torch.Tensor) -> dict:
    """What a (3, 32, 32) image in [-1, 1] shows: count, colour, shape and position of its shapes (None where the
    image shows no shape, or its shapes disagree on colour or kind)."""
    img = image.detach().float().clamp(-1, 1)
    mask = img.max(0).values > 0
    comps = [c for c in _components(mask) if len(c) >= MIN_PIXELS]
    if not comps:
        return dict(count=0, colour=None, shape=None, position=None)
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 127.5 - 1
    colours, shapes, centres = set(), set(), []
    for comp in comps:
        ys = torch.tensor([p[0] for p in comp])
        xs = torch.tensor([p[1] for p in comp])
        mean = img[:, ys, xs].mean(1)
        colours.add(list(COLOURS)[int((palette - mean).norm(dim=1).argmin())])
        shapes.add(_shape(ys, xs))
        centres.append((float(xs.float().mean()), float(ys.float().mean())))
    h = SIZE / 2 - 0.5
    sides = {"left": all(x < h for x, _ in centres), "right": all(x > h for x, _ in centres),
             "top": all(y < h for _, y in centres), "bottom": all(y > h for _, y in centres)}
    held = [k for k, v in sides.items() if v]
    return dict(count=len(comps), colour=colours.pop() if len(colours) == 1 else None,
                shape=shapes.pop() if len(shapes) == 1 else None, position=held)


def adherence(images: torch.Tensor, scenes: list[Scene]) -> dict[str, float]:
    """Fraction of images whose shapes match the caption, per attribute and all four together ("all")."""
    hits = {a: 0 for a in ATTRIBUTES + ("all",)}
    for img, scene in zip(images, scenes):
        d = detect(img)
        ok = dict(count=d["count"] == scene.count, colour=d["colour"] == scene.colour,
                  shape=d["shape"] == scene.shape, position=scene.position in (d["position"] or []))
        for a in ATTRIBUTES:
            hits[a] += ok[a]
        hits["all"] += all(ok.values())
    n = max(1, len(scenes))
    return {a: v / n for a, v in hits.items()}
