"""mkdocs-gen-files script: writes the generated pages into the site being built (see docgen.py).

Nothing is written into docs/ itself: the pages exist only in the build (models/index.md is
hand-written; its table is appended in the build).
"""

import sys
from pathlib import Path

import mkdocs_gen_files

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(HERE), str(ROOT)]  # docgen, and the benchmarks' own table functions

import docgen

from napari_deepwarp.cli import build_parser
from napari_deepwarp.core.checkpoint import shipped_checkpoints
from napari_deepwarp.core.models.registry import available_models, create_model

written = []


def write(path: str, text: str) -> None:
    with mkdocs_gen_files.open(path, "w") as f:
        f.write(text)
    written.append(path)


write("reference/cli.md", docgen.cli_reference(build_parser()))

models = available_models()
cards = shipped_checkpoints()
with mkdocs_gen_files.open("models/index.md", "a") as f:  # after the hand-written introduction
    f.write("\n" + docgen.models_table(models, cards))
write("models/checkpoints.md", docgen.checkpoints_page(cards))
for name, cls in models.items():
    parameters = sum(p.numel() for p in create_model(name).parameters())
    mine = [(p, c) for p, c in cards if c["architecture"] == name]
    write(f"models/{name}.md", docgen.model_page(name, cls, parameters, mine))

write("benchmarks/index.md", docgen.benchmarks_page())
# tests/test_docs.py checks mkdocs.yml's nav against this list
assert sorted(written) == sorted(docgen.generated_pages(models)), written

# The screenshots that resources/make_screenshots.py makes, used by the widget tour.
for png in sorted((ROOT / "resources" / "screenshots").glob("*.png")):
    with mkdocs_gen_files.open(f"images/{png.name}", "wb") as f:
        f.write(png.read_bytes())
