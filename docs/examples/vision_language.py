"""The traffic-light figure: an image plus a prompt through two vision-language models,
token similarity at layers 1, 5, 14 and 23, the image beside the grid.

The shape of the figures that started probescope, drawn offline from two tiny Llava
models with random weights (the builders the tests use, a CLIP vision tower and a Llama
decoder of 24 and 28 blocks). With real checkpoints, name their folders instead::

    python docs/examples/vision_language.py            # writes docs/images/vision_language_similarity.png
    python docs/examples/vision_language.py OUT_DIR
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tiny model builders are the tests' own

import vlm_models  # noqa: E402

import probescope  # noqa: E402

IMAGE = HERE / "traffic_light.png"
MODELS = {"small": dict(layers=24, width=32, seed=1), "large": dict(layers=28, width=64, seed=2)}

CONFIG = """\
[[models]]
name = "small"
path = "models/small"

[[models]]
name = "large"
path = "models/large"

[inputs]
prompts = ["Provide a one-sentence caption for the image:"]
images = ["traffic_light.png"]

[[probes]]
use = "token_similarity"
layers = [1, 5, 14, 23]

[[renderers]]
use = "similarity_grid"
output = "vision_language_similarity.png"
max_token_labels = 64

[output]
dir = "results"
"""


def draw_traffic_light(path: Path) -> Path:
    """A 120 x 200 traffic light (red on) against the sky, drawn with Pillow."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (120, 200), (150, 195, 235))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 170, 120, 200], fill=(95, 95, 100))  # road
    draw.rectangle([56, 120, 64, 185], fill=(60, 60, 60))  # pole
    draw.rounded_rectangle([36, 14, 84, 124], radius=8, fill=(35, 35, 35))  # housing
    lamps = [(230, 40, 30), (95, 80, 20), (20, 70, 30)]  # red lit; amber and green dark
    for i, colour in enumerate(lamps):
        y = 33 + 35 * i
        draw.ellipse([47, y - 12, 73, y + 12], fill=colour)
    image.save(path, optimize=True)
    return path


def main(out: Path = ROOT / "docs" / "images") -> Path:
    """Build the models, run the config, copy the figure to ``out``; return its path."""
    if not IMAGE.is_file():
        draw_traffic_light(IMAGE)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, size in MODELS.items():
            vlm_models.llava(size["seed"], layers=size["layers"], width=size["width"]).save(work / "models" / name)
        shutil.copy(IMAGE, work / IMAGE.name)
        (work / "vision_language.toml").write_text(CONFIG)
        probescope.run(work / "vision_language.toml")
        out.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(work / "results" / "vision_language_similarity.png", out))


if __name__ == "__main__":
    print(main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "images"))
