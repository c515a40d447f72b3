"""The documentation pages that are generated, so that they cannot drift from the code.

Pure functions from objects to Markdown; ``gen_pages.py`` calls them at build time (through
mkdocs-gen-files) and ``tests/test_docs.py`` checks them without building the site:

* :func:`cli_reference`: every subcommand and option of ``deepwarp``, from its argparse parser;
* :func:`model_page`, :func:`models_table`, :func:`checkpoints_page`: one page per registered
  architecture (its module docstring: the paper and what this implementation chose), and the
  shipped checkpoints' model cards;
* :func:`benchmarks_page`: the tables of the benchmark scripts, rendered by the scripts' own
  ``markdown`` functions from the JSON they wrote into ``docs/benchmarks/data/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCHMARK_DATA = ROOT / "docs" / "benchmarks" / "data"


def generated_pages(model_names) -> list[str]:
    """The pages that exist only in the build (``gen_pages.py`` writes exactly these)."""
    fixed = ["reference/cli.md", "models/checkpoints.md", "benchmarks/index.md"]
    return fixed + [f"models/{name}.md" for name in model_names]


def _cell(text: object) -> str:
    """A Markdown table cell: no pipes, no line breaks."""
    return " ".join(str(text).split()).replace("|", "\\|")


# --- command line -----------------------------------------------------------------------------
def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """``{name: subparser}`` of a parser's subcommands, in the order they were added."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _subcommand_help(parser: argparse.ArgumentParser) -> dict[str, str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {a.dest: a.help or "" for a in action._choices_actions}
    return {}


def _argument(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    if action.choices is not None:
        return "{" + ",".join(map(str, action.choices)) + "}"
    if not action.option_strings and action.metavar is None:
        return ""  # a positional argument: its name says it
    if isinstance(action.metavar, tuple):
        return " ".join(action.metavar)
    name = action.metavar or (action.dest if not action.option_strings else action.dest.upper())
    if action.nargs in ("+", "*"):
        return f"{name} ..."
    if isinstance(action.nargs, int) and action.nargs > 1:
        return " ".join([name] * action.nargs)
    return name


def _default(action: argparse.Action) -> str:
    if action.required or action.nargs == 0 or action.default in (None, argparse.SUPPRESS):
        return "required" if action.required else ""
    return f"`{action.default}`"


def _help(action: argparse.Action, prog: str) -> str:
    text = action.help or ""
    if "%" in text:
        text = text % {**vars(action), "prog": prog}
    return text


def _options_table(parser: argparse.ArgumentParser) -> list[str]:
    rows = ["| argument | value | default | what it does |", "|---|---|---|---|"]
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
            continue
        name = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.dest}`"
        value = _argument(action)
        cells = [
            name,
            f"`{value}`" if value else "",
            _default(action),
            _help(action, parser.prog),
        ]
        rows.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return rows


def cli_reference(parser: argparse.ArgumentParser) -> str:
    """The command line reference: usage, description and a table of options per subcommand."""
    helps = _subcommand_help(parser)
    lines = [
        f"# `{parser.prog}` command line reference",
        "",
        (
            "Generated from the argparse parsers (`napari_deepwarp.cli.build_parser()`) when the "
            f"documentation is built; `{parser.prog} COMMAND --help` prints the same."
        ),
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    for name in subcommands(parser):
        lines.append(f"| [`{name}`](#{name}) | {_cell(helps.get(name, ''))} |")
    for name, sub in subcommands(parser).items():
        lines += ["", f"## {name} {{#{name}}}", "", helps.get(name, "")]
        if sub.description:
            lines += ["", sub.description.strip()]
        lines += ["", "```text", sub.format_usage().strip(), "```", ""]
        lines += _options_table(sub)
    return "\n".join(lines) + "\n"


# --- models -----------------------------------------------------------------------------------
_ROLE = re.compile(r":(?:func|class|mod|meth|data|attr|obj):`~?([^`]+)`")


def rst_to_markdown(text: str) -> str:
    """The little reStructuredText our docstrings use, as Markdown: roles become code, ``::``
    becomes ``:`` (the indented block after it stays a code block)."""
    text = _ROLE.sub(r"`\1`", text)
    text = re.sub(r"::\n", ":\n", text)
    return text


def _config_rows(cls) -> list[str]:
    if not dataclasses.is_dataclass(cls.config_class):
        return []
    rows = ["| config field | default |", "|---|---|"]
    for f in dataclasses.fields(cls.config_class):
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else f.default_factory()  # type: ignore[misc]
            if f.default_factory is not dataclasses.MISSING
            else "required"
        )
        rows.append(f"| `{f.name}` | `{_cell(default)}` |")
    return rows


def _checkpoint_name(path: Path, card: dict) -> str:
    return card.get("name") or path.stem


def _value(value: object) -> str:
    """A card value for a table cell: strings as they are, the rest as JSON."""
    return _cell(value if isinstance(value, str) else json.dumps(value))


def model_page(name: str, cls, parameters: int | None, cards: list[tuple[Path, dict]]) -> str:
    """One architecture: its summary, use, config defaults, the module docstring (paper and the
    choices this implementation made where the paper is vague), and its shipped checkpoints."""
    module = inspect.getmodule(cls)
    doc = inspect.getdoc(module) or ""
    title, _, body = doc.partition("\n")
    display, _, summary = title.strip().rstrip(".").partition(": ")
    lines = [
        f"# {display}" if summary else f"# `{name}`",
        "",
        *([f"{summary[0].upper()}{summary[1:]}.", ""] if summary else []),
        f"Registry name `{name}`; module `{module.__name__}`, class `{cls.__name__}`."
        + (f" {parameters:,} parameters at the default config." if parameters else "")
        + (
            " Trained for pairs of different contrasts (mutual information)."
            if cls.multimodal
            else ""
        )
        + (
            f" The working grid must be a multiple of {cls.size_multiple} voxels along each axis"
            " (`forward` pads other sizes and crops back)."
            if cls.size_multiple > 1
            else " Any working-grid size works as it is."
        ),
        "",
        "```bash",
        f"deepwarp register fixed.nii.gz moving.nii.gz -o out/ --model {name}",
        "```",
        "",
        "## Paper and implementation choices",
        "",
        (
            "From the module's docstring: the reference, what the network does, and what this "
            "implementation chose where the paper is vague."
        ),
        "",
        rst_to_markdown(body.strip()),
        "",
        "## Configuration",
        "",
        (
            "Change a field with `deepwarp train --config FIELD=VALUE` (a change that would add or "
            "reshape a layer is refused when starting from a checkpoint)."
        ),
        "",
        *_config_rows(cls),
        "",
        "## Shipped checkpoints",
        "",
    ]
    if not cards:
        lines.append(
            "None: the network runs untrained (use `--refine`, or train one, see "
            "[Training your own model](../guides/training.md))."
        )
    else:
        lines.append(
            "Their model cards, as the files hold them (generated from "
            "`resources/checkpoints/*.pt`; all shipped checkpoints side by side: "
            "[Shipped checkpoints](checkpoints.md))."
        )
    for path, card in cards:
        lines += ["", checkpoint_card(path, card, level=3)]
    return "\n".join(lines) + "\n"


def models_table(models: dict, cards: list[tuple[Path, dict]]) -> str:
    """The table of architectures (name, summary, shipped checkpoints), appended to the
    hand-written ``docs/models/index.md`` at build time."""
    lines = [
        "| model | what it is | shipped checkpoints |",
        "|---|---|---|",
    ]
    for name, cls in models.items():
        doc = inspect.getdoc(inspect.getmodule(cls)) or ""
        summary = cls.description or doc.partition("\n")[0]
        mine = [
            f"[`{p.name}`]({name}.md#{_checkpoint_name(p, c)})"
            for p, c in cards
            if c["architecture"] == name
        ]
        lines.append(f"| [`{name}`]({name}.md) | {_cell(summary)} | {', '.join(mine) or '-'} |")
    return "\n".join(lines) + "\n"


_CARD_SCALARS = (
    "description",
    "architecture",
    "default",
    "working_shape",
    "inference_size",
    "working_spacing_mm",
    "intensity_preset",
    "modality",
    "created",
    "tuned_on",
)


def checkpoint_card(path: Path, card: dict, level: int = 2) -> str:
    """One checkpoint's model card as Markdown: every field, as the file holds it."""
    name = _checkpoint_name(path, card)
    training = dict(card.get("training") or {})
    command = training.pop("command", None)
    lines = [
        f"{'#' * level} `{path.name}` {{#{name}}}",
        "",
        "| field | value |",
        "|---|---|",
    ]
    for key in _CARD_SCALARS:
        if key in card:
            lines.append(f"| {key} | {_value(card[key])} |")
    for key in ("steps", "duration_s", "hardware", "data", "learning_rate", "batch_size"):
        if key in training:
            lines.append(f"| training: {key} | {_value(training.pop(key))} |")
    for key, value in (card.get("metrics") or {}).items():
        lines.append(f"| metrics: {key} | {_value(value)} |")
    for key in ("software", "parent"):
        lines.append(f"| {key} | {_value(card.get(key))} |")
    if command:
        lines += ["", "Trained with:", "", "```bash", command, "```"]
    lines += [
        "",
        '??? note "Loss, configuration and the rest of the training record"',
        "",
        "    ```json",
        *(
            "    " + line
            for line in json.dumps(
                {"loss": card.get("loss"), "config": card.get("config"), "training": training},
                indent=2,
            ).splitlines()
        ),
        "    ```",
    ]
    return "\n".join(lines) + "\n"


def _number(metrics: dict, key: str) -> str:
    value = metrics.get(key)
    return "-" if value is None else f"{value:.3f}"


def checkpoints_page(cards: list[tuple[Path, dict]]) -> str:
    """Every shipped checkpoint side by side, from its card (``resources/checkpoints/*.pt``)."""
    lines = [
        "# Shipped checkpoints",
        "",
        (
            "Generated from the model cards inside `resources/checkpoints/*.pt`, read with the "
            "project's own checkpoint reader (`torch.load(weights_only=True)`); each model's "
            "page shows its checkpoints' whole cards, with the exact training command. "
            "`deepwarp models` prints a one-line summary of each. Without `--model`, "
            "`deepwarp register` picks the best shipped checkpoint for the pair. The Mindboggle "
            "figures were measured by `benchmarks.checkpoints_mindboggle` with the commands each "
            "card records (`mindboggle_commands`), mean Dice over the ~98 labels; the training "
            "histories behind these checkpoints are in "
            "[Historical records](../benchmarks/history.md#shipped-checkpoints)."
        ),
        "",
        (
            "| checkpoint | model | trained | runs at | Mindboggle Dice | affine stage alone | "
            "with `--refine 150` | validation Dice (synthetic) |"
        ),
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for path, card in cards:
        metrics, training = card.get("metrics") or {}, card.get("training") or {}
        name, arch = _checkpoint_name(path, card), card["architecture"]
        trained = f"{training.get('steps')} steps, {(training.get('duration_s') or 0) / 60:.0f} min"
        cells = [
            f"[`{path.name}`]({arch}.md#{name})" + (" (default)" if card.get("default") else ""),
            f"[`{arch}`]({arch}.md)",
            trained,
            str(card.get("inference_size") or "-"),
            _number(metrics, "mindboggle_mean_dice"),
            _number(metrics, "mindboggle_mean_dice_affine_stage"),
            _number(metrics, "mindboggle_mean_dice_refine"),
            _number(metrics, "validation_mean_dice"),
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


# --- benchmarks -------------------------------------------------------------------------------
def _render_run(report: dict) -> str:
    from benchmarks.run import markdown

    return markdown(report)


def _render_checkpoints(report: dict) -> str:
    from benchmarks.checkpoints_mindboggle import markdown

    return markdown(report)


def _render_affine(report: dict) -> str:
    from benchmarks.affine_mindboggle import markdown

    return markdown(report["pairs"])


def _render_multimodal(report: dict) -> str:
    from benchmarks.multimodal import markdown

    return markdown(report["rows"])


def _render_budget(report: dict) -> str:
    from benchmarks.budget import table

    return table(report)


def _render_gpu(report: dict) -> str:
    from benchmarks.gpu import table

    return table(report)


def _render_verdict(report: dict) -> str:
    from benchmarks.verdict import table

    return table(report)


def _render_own_affine(report: dict) -> str:
    from benchmarks.own_affine_mindboggle import markdown

    return markdown(report)


def _render_refine(report: dict) -> str:
    from benchmarks.refine_mindboggle import table

    return table(report)


#: data file stem (before any ``-label``) -> (title, renderer)
RENDERERS = {
    "budget": (
        "Where a fresh deepwarp register spends its time (against ANTs affine)",
        _render_budget,
    ),
    "gpu": ("On a GPU", _render_gpu),
    "verdict": (
        "The default run against its affine stage: verdict, guard, --model auto",
        _render_verdict,
    ),
    "multimodal": ("Multi-modal pairs (prostate MR/ultrasound, spine T1/T2)", _render_multimodal),
    "run": ("Speed and memory, side by side", _render_run),
    "checkpoints_mindboggle": ("Every shipped checkpoint on Mindboggle", _render_checkpoints),
    "affine_mindboggle": ("The affine stage on Mindboggle", _render_affine),
    "own_affine_mindboggle": (
        "A network's own affine branch (LinDef) against the affine stage, native-space brains",
        _render_own_affine,
    ),
    "refine_mindboggle": (
        "Field refinement (fast, accurate) against FireANTs on Mindboggle",
        _render_refine,
    ),
}


def _machine(report: dict) -> str:
    machine = report.get("machine")
    if not isinstance(machine, dict):  # the benchmarks' one-line form (benchmarks/report.py)
        load = report.get("load_average_1min")
        return str(machine) + ("" if load is None else f"; load average {load:.1f} when written")
    m = machine  # benchmarks/run.py's machine_info()
    load = m.get("load_average_1min")
    return (
        f"{m.get('cpu')}, {m.get('cpu_count')} cores, {m.get('memory_gib', '?')} GiB, "
        f"torch {m.get('torch')}, {m.get('torch_threads')} threads, python {m.get('python')}; "
        f"CUDA: {m.get('cuda') or 'none'}"
        + ("" if load is None else f"; load average {load:.1f} at the start")
    )


def benchmarks_page(data: Path = BENCHMARK_DATA) -> str:
    """One section per JSON file in ``data``: its command, machine, date and table."""
    lines = [
        "# Benchmarks measured here",
        "",
        (
            "Every figure on this page is read from a JSON file that a benchmark script wrote "
            "(`docs/benchmarks/data/`), and rendered by that script's own table function when the "
            "documentation is built. Each section gives the command, the machine and the date. "
            "To refresh a section, run its command again (with `--out` pointing into "
            "`docs/benchmarks/data/`, see [How to run them](running.md)). Older measurements that "
            "were not re-run are kept, with their commands, in "
            "[Historical records](history.md)."
        ),
        "",
    ]
    for path in sorted(data.glob("*.json")):
        report = json.loads(path.read_text(encoding="utf-8"))
        script, _, label = path.stem.partition("-")
        title, render = RENDERERS[script]
        lines += [
            f"## {title}" + (f" ({label})" if label else ""),
            "",
            f"- command: `{report.get('command', 'not recorded')}`",
            f"- machine: {_machine(report)}",
            f"- date: {report.get('date', 'not recorded')}",
            f"- data: `docs/benchmarks/data/{path.name}`",
            "",
            render(report).strip(),
            "",
        ]
    return "\n".join(lines) + "\n"
