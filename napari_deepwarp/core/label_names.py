"""Label names from colour tables, and names attached to a run's per-label metrics (numpy only).

Three text formats are read, one label per line, ``#`` starting a comment:

- FreeSurfer ``FreeSurferColorLUT.txt`` and 3D Slicer colour tables (``.ctbl``, colour ``.txt``):
  ``value name R G B A`` (R, G, B, A in 0-255; Slicer writes A, FreeSurfer writes 0 meaning
  opaque, so A is kept as read and not used for display).
- ITK-SNAP label descriptions: ``IDX -R- -G- -B- -A-- VIS MSH "LABEL"`` (A in 0-1, the name in
  double quotes, spaces allowed).

:func:`read_label_names` detects the format per line. :func:`name_labels` adds the names to the
``labels_before/affine/after`` entries of a run's metrics and a ``label_names`` mapping, as
written to ``metrics.json``.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_deepwarp.core.errors import InputError

#: suffixes of files that may hold a colour table (the content decides)
SUFFIXES = (".txt", ".ctbl", ".lut", ".label")
_ITKSNAP = re.compile(
    r'^\s*(-?\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.eE+-]+)\s+(\d+)\s+(\d+)\s+"(.*)"'
)
_PLAIN = re.compile(r"^\s*(-?\d+)\s+(\S+)\s+(\d+)\s+(\d+)\s+(\d+)(?:\s+([\d.]+))?\s*$")


class LabelNamesError(InputError):
    """A file that is not a colour table (the message names the file and the line)."""


@dataclass
class LabelNames:
    """Names and colours of integer labels.

    ``names``: ``{value: name}``; ``colours``: ``{value: (r, g, b)}`` in 0-1 floats;
    ``source``: the file they came from (or a description).
    """

    names: dict[int, str] = field(default_factory=dict)
    colours: dict[int, tuple[float, float, float]] = field(default_factory=dict)
    source: str = ""

    def __len__(self) -> int:
        return len(self.names)

    def name(self, value) -> str:
        """The name of ``value`` (``"label 17"`` where the table has none)."""
        key = int(float(value))
        return self.names.get(key, f"label {key}")

    def features(self, values) -> dict[str, np.ndarray]:
        """A napari Labels layer's ``features`` table for the label ``values`` present: columns
        ``index`` and ``name`` (napari shows the row of the hovered label in the status bar)."""
        values = np.unique(np.asarray(values, dtype=np.int64))
        return {
            "index": values,
            "name": np.array([self.name(v) if v else "background" for v in values], dtype=object),
        }

    def colour_dict(self, values) -> dict:
        """``{value: (r, g, b, 1)}`` for napari's ``DirectLabelColormap``; 0 and labels without a
        colour in the table are left to the default (``None`` key: transparent)."""
        out: dict = {None: (0.0, 0.0, 0.0, 0.0), 0: (0.0, 0.0, 0.0, 0.0)}
        for v in np.unique(np.asarray(values, dtype=np.int64)):
            if int(v) in self.colours and v != 0:
                out[int(v)] = (*self.colours[int(v)], 1.0)
        return out


def parse_label_names(text: str, source: str = "") -> LabelNames:
    """Parse a colour table's text (any of the formats in the module docstring)."""
    table = LabelNames(source=source)
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0] if not _ITKSNAP.match(raw) else raw
        if not line.strip():
            continue
        m = _ITKSNAP.match(line)
        if m:
            value, rgb, name = int(m[1]), (m[2], m[3], m[4]), m[8]
        else:
            m = _PLAIN.match(line)
            if m is None:
                quoted = _quoted_plain(line)
                if quoted is None:
                    raise LabelNamesError(
                        f"{source or 'colour table'}: line {number} is not 'value name R G B A' "
                        f"nor ITK-SNAP's 'IDX R G B A VIS MSH \"LABEL\"': {raw.strip()[:80]!r}"
                    )
                value, name, rgb = quoted
            else:
                value, name, rgb = int(m[1]), m[2], (m[3], m[4], m[5])
        table.names[value] = name
        table.colours[value] = tuple(min(int(c), 255) / 255.0 for c in rgb)
    if not table.names:
        raise LabelNamesError(f"{source or 'colour table'}: no labels in it")
    return table


def _quoted_plain(line: str):
    """``value "a name with spaces" R G B [A]`` (some Slicer tables quote names)."""
    try:
        parts = shlex.split(line)
    except ValueError:
        return None
    if len(parts) in (5, 6) and all(p.lstrip("-").isdigit() for p in (parts[0], *parts[2:5])):
        return int(parts[0]), parts[1], tuple(parts[2:5])
    return None


def read_label_names(path) -> LabelNames:
    """Read a colour table file; :class:`LabelNamesError` if it is not one."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise LabelNamesError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    return parse_label_names(text, str(path))


def looks_like_label_names(path) -> bool:
    """Whether ``path`` is a readable colour table (for the napari reader, which must refuse
    other text files)."""
    path = Path(path)
    if not path.is_file() or not path.name.lower().endswith(SUFFIXES):
        return False
    try:
        return len(read_label_names(path)) > 0
    except LabelNamesError:
        return False


def name_labels(metrics: dict, names: LabelNames | None) -> dict:
    """Add label names to a run's metrics (in place; returned too).

    Every ``labels_before`` / ``labels_affine`` / ``labels_after`` entry (keyed by the label
    value as a string) gains ``"name"``, and ``metrics["label_names"]`` maps each value to its
    name, with ``metrics["label_names_source"]`` the table's file. ``names=None`` changes nothing.
    """
    if names is None:
        return metrics
    seen: dict[str, str] = {}
    for stage in ("before", "affine", "after"):
        for key, entry in (metrics.get(f"labels_{stage}") or {}).items():
            seen[key] = names.name(key)
            if isinstance(entry, dict):
                entry["name"] = seen[key]
    metrics["label_names"] = dict(sorted(seen.items(), key=lambda kv: int(float(kv[0]))))
    metrics["label_names_source"] = names.source
    return metrics
