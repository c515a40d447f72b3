"""The documentation cannot drift: what its generated pages say is checked without building it.

The site itself (`mkdocs build --strict`) is built by `.ci/run`; these checks are cheap.
"""

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
pytestmark = pytest.mark.skipif(not (DOCS / "scripts").is_dir(), reason="not a source checkout")


@pytest.fixture(scope="module")
def docgen():
    sys.path[:0] = [str(DOCS / "scripts"), str(ROOT)]
    try:
        import docgen

        yield docgen
    finally:
        sys.path.remove(str(DOCS / "scripts"))
        sys.path.remove(str(ROOT))


def _nav_pages() -> list[str]:
    yaml = pytest.importorskip("yaml", reason="PyYAML comes with mkdocs: pip install '.[docs]'")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))

    def walk(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)
        elif isinstance(node, dict):
            for value in node.values():
                yield from walk(value)

    return list(walk(config["nav"]))


def test_cli_reference_lists_every_subcommand_and_option(docgen):
    from napari_deepwarp.cli import build_parser

    parser = build_parser()
    page = docgen.cli_reference(parser)
    subcommands = docgen.subcommands(parser)
    assert {"register", "register-batch", "warp", "train", "models", "demo"} <= set(subcommands)
    for name, sub in subcommands.items():
        section = page.split(f"## {name} {{#{name}}}", 1)[1].split("\n## ", 1)[0]
        for action in sub._actions:
            for option in action.option_strings or [action.dest]:
                assert f"`{option}`" in section, f"{name} {option} missing from the CLI page"


def test_every_model_has_a_page_in_the_navigation(docgen):
    from napari_deepwarp.core.models.registry import available_models

    nav = _nav_pages()
    for name, cls in available_models().items():
        assert f"models/{name}.md" in nav, f"mkdocs.yml's nav has no page for model {name!r}"
        page = docgen.model_page(name, cls, None, [])
        assert f"`{name}`" in page and "## Paper and implementation choices" in page


def test_every_page_in_the_navigation_exists_or_is_generated(docgen):
    from napari_deepwarp.core.models.registry import available_models

    generated = set(docgen.generated_pages(available_models()))
    for page in _nav_pages():
        assert page in generated or (DOCS / page).is_file(), f"nav names a missing page {page}"


def test_benchmark_figures_come_from_script_json(docgen):
    files = sorted(docgen.BENCHMARK_DATA.glob("*.json"))
    assert files, "no benchmark JSON in docs/benchmarks/data"
    page = docgen.benchmarks_page()
    for path in files:
        report = json.loads(path.read_text(encoding="utf-8"))
        assert path.stem.split("-")[0] in docgen.RENDERERS, f"no renderer for {path.name}"
        for field in ("command", "machine", "date"):
            assert report.get(field), f"{path.name} has no {field}"
        assert report["command"].startswith("python -m benchmarks.")
        assert report["command"] in page


def test_model_docstrings_become_markdown(docgen):
    text = docgen.rst_to_markdown("See :func:`~a.b` and :class:`C`. Loss::\n\n    L = 1\n")
    assert text == "See `a.b` and `C`. Loss:\n\n    L = 1\n"


def test_ci_builds_the_docs_with_warnings_as_errors():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^pip install -q \"\.\[docs\]\" && mkdocs build --strict$", ci, re.MULTILINE)


def test_readme_is_short_and_links_into_the_docs():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 160
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / link).is_file(), f"README links to a missing page {link}"
