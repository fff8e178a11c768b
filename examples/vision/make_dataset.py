"""Write the coloured-shapes caption data: PNGs of one shape each and ms-swift rows that caption them.

    python examples/vision/make_dataset.py                       # -> output/vision-data/{images/,train.jsonl,test.jsonl}
    python examples/vision/make_dataset.py --train 2000 --test 200 --seed 1 --out /tmp/shapes

Every picture is a small or large red/green/blue/yellow/purple circle/square/triangle at a random place on a
light background, and its caption says exactly that ("a large blue triangle"): 30 captions, which only the
picture tells apart. The output depends only on the flags; the test split has its own seeded stream.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (50, 80, 220), "yellow": (235, 200, 30),
           "purple": (140, 60, 170)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.3, "large": 0.6}  # the shape's width as a share of the picture's
QUESTION = "<image>What is in the picture?"
PIXELS = 112


def caption(size: str, colour: str, shape: str) -> str:
    return f"a {size} {colour} {shape}"


def draw(size: str, colour: str, shape: str, rng: random.Random):
    """One PIL picture: the shape at a random place, on a random light background."""
    from PIL import Image, ImageDraw

    background = tuple(rng.randint(225, 255) for _ in range(3))
    image = Image.new("RGB", (PIXELS, PIXELS), background)
    width = int(PIXELS * SIZES[size] * rng.uniform(0.85, 1.15))
    left, top = rng.randint(2, PIXELS - width - 2), rng.randint(2, PIXELS - width - 2)
    box = [left, top, left + width, top + width]
    pen = ImageDraw.Draw(image)
    if shape == "circle":
        pen.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        pen.rectangle(box, fill=COLOURS[colour])
    else:
        pen.polygon([(left + width / 2, top), (left, top + width), (left + width, top + width)], fill=COLOURS[colour])
    return image


def write_split(name: str, count: int, seed: int, out: Path) -> None:
    """`count` rows cycling through every caption (so each split holds them all equally), pictures drawn at random."""
    rng = random.Random(seed)
    kinds = [(size, colour, shape) for size in SIZES for colour in COLOURS for shape in SHAPES]
    rows = []
    for index in range(count):
        kind = kinds[index % len(kinds)]
        path = Path("images") / f"{name}-{index:05d}.png"
        draw(*kind, rng).save(out / path)
        rows.append({"query": QUESTION, "response": caption(*kind), "images": [str(path)]})
    rng.shuffle(rows)
    (out / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=900)
    parser.add_argument("--test", type=int, default=90)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="output/vision-data")
    args = parser.parse_args()
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    write_split("train", args.train, args.seed, out)
    write_split("test", args.test, args.seed + 10_000, out)
    print(f"wrote {args.train} training and {args.test} test rows with their pictures to {out}")


if __name__ == "__main__":
    main()
