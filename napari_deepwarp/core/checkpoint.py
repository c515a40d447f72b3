"""Checkpoints: one ``.pt`` file with a network's weights and its model card.

The file is a plain dict that ``torch.load(path, weights_only=True)`` reads (no pickled classes)::

    {"format": "napari-deepwarp-checkpoint", "format_version": 1,
     "state_dict": {parameter name: tensor}, "card": {...}}

The *card* holds only JSON-able values (str, int, float, bool, None, lists, dicts with str
keys) and says what the weights are and how to use them:

========================  ============================================================================
``architecture``          registry name of the model (``napari_deepwarp.core.models``)
``config``                the model's config dataclass as a dict (tuples become lists)
``working_spacing_mm``    spacing of the working grid: a float (isotropic mm) or ``[x, y, z]``; None
``working_shape``         working grid ``[z, y, x]``, or an int (the largest side); None
``intensity_preset``      intensity normalisation the weights expect (e.g. ``"mr"``, ``"ct"``); None
``modality``              what the network was trained on, in words (e.g. ``"T1w brain MR"``); None
``loss``                  the training loss: names and weights (default: the model's own description)
``training``              ``{"data", "steps", "command", "hardware", "duration_s"}`` (values or None)
``metrics``               what was measured on the developers' data, ``{name: value}``
``software``              ``{"napari_deepwarp", "torch", "python"}`` versions that wrote the file
``created``               ISO 8601 date and time (UTC)
``parent``                None, or the parent checkpoint of a fine-tuned one (:func:`parent_reference`)
``tuned_on``              None, or a description of the pair a fine-tuned checkpoint was tuned on
========================  ============================================================================

All of these fields are required (values may be None where the table says so); a card may carry
further fields (``name``, ``description``, ``license``, ...).

:func:`load_checkpoint` uses ``torch.load(weights_only=True)`` only, rebuilds the model from
``card["architecture"]`` and ``card["config"]`` through the registry, checks every parameter name
and shape against the weights, loads them strictly and returns the model in ``eval()`` mode. A file
that is not a checkpoint, an unknown architecture, a config that does not match the weights or a
missing card field raise :class:`CheckpointError` (a ``ValueError``) with a one-line message that
names the file and the field. Config fields that do not shape any parameter (e.g. the loss) cannot
be checked against the weights.

:func:`save_checkpoint` is atomic: it writes a temporary file in the target's folder and renames
it over the target (``os.replace``), so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import re
import tempfile
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from napari_deepwarp.core.errors import CheckpointError
from napari_deepwarp.core.models.registry import (
    RegistrationModel,
    available_models,
    build_config,
    create_model,
    get_model_class,
)

FORMAT = "napari-deepwarp-checkpoint"
FORMAT_VERSION = 1

#: fields every card has (values may be None where documented)
CARD_FIELDS = (
    "architecture",
    "config",
    "working_spacing_mm",
    "working_shape",
    "intensity_preset",
    "modality",
    "loss",
    "training",
    "metrics",
    "software",
    "created",
    "parent",
    "tuned_on",
)
TRAINING_FIELDS = ("data", "steps", "command", "hardware", "duration_s")

PathLike = str | os.PathLike


# --- small helpers ---------------------------------------------------------------------------


def file_sha256(path: PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (for provenance: a fine-tuned checkpoint's parent)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


def parent_reference(path: PathLike) -> dict[str, Any]:
    """``{"name", "sha256", "architecture"}`` of a checkpoint, for a child card's ``parent``."""
    card = read_card(path)
    return {
        "name": Path(path).name,
        "sha256": file_sha256(path),
        "architecture": card["architecture"],
    }


def software_versions() -> dict[str, str]:
    """Versions of napari-deepwarp, torch and Python, as a card's ``software`` field."""
    from napari_deepwarp import __version__

    return {
        "napari_deepwarp": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def hardware(device: torch.device) -> str:
    """The machine in words: CPU model and threads, or the GPU's name."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU: {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def working_size(card: dict | None, refining: bool = False) -> int:
    """The largest working-grid side to run a checkpoint at: the card's ``inference_size`` (a
    size chosen on held-out pairs; the networks are fully convolutional), else the size it was
    trained at (the resolution it learnt), or 96 without a card. Field refinement gains from a
    finer grid, so when refining, at least 96."""
    shape = (card or {}).get("working_shape")
    trained = max(shape) if isinstance(shape, list) else shape
    trained = (card or {}).get("inference_size") or trained
    if trained is None or refining:
        return max(96, int(trained or 0))
    return int(trained)


def finetuned_card(result, tuned_on: str, command: str, parent: PathLike | None = None) -> dict:
    """The card of a network fine-tuned on one pair by ``pipeline.register`` (``result``): its
    parent checkpoint (None: fitted from scratch), the pair, steps, time, hardware, what it
    reached on the pair, and the working grid it was tuned on."""
    metrics, grid = result.metrics, result.working_grid
    parent_card = read_card(parent) if parent else {}
    tuned_with = getattr(result.model, "trained_objective", None)
    device = result.working_field.device if result.working_field is not None else "cpu"
    return make_card(
        result.model,
        working_spacing_mm=None if grid is None else float(grid.spacing[0]),
        working_shape=None if grid is None else list(grid.shape),
        intensity_preset=parent_card.get("intensity_preset"),
        modality=parent_card.get("modality"),
        training={
            "data": f"instance optimisation on one pair: {tuned_on}",
            "steps": metrics["finetune_steps"],
            "command": command,
            "hardware": hardware(torch.device(device)),
            "duration_s": round(metrics["seconds"].get("finetune", 0.0), 1),
        },
        metrics={
            k: metrics[k]
            for k in ("mean_dice_after", "folding_percent", "ncc_after")
            if metrics.get(k) is not None
        },
        parent=parent_reference(parent) if parent else None,
        tuned_on=tuned_on,
        **({"loss": override_loss(*tuned_with)} if tuned_with else {}),
    )


def override_loss(similarity: str, reg_weight: float) -> dict[str, Any]:
    """The card's ``loss`` for a similarity + diffusion that replaces a model's own loss."""
    return {
        "similarity": {"name": similarity},
        "regulariser": {"name": "diffusion", "on": "displacement"},
        "weights": {"similarity": 1.0, "regularisation": float(reg_weight)},
    }


def _jsonable(value: Any, where: str) -> Any:
    """``value`` with tuples as lists and numpy scalars as Python ones; refuse anything else."""
    if value is None:
        return None
    # Exact built-in types: subclasses (numpy.float64, torch's TorchVersion) would not load
    # under weights_only=True.
    for kind in (bool, int, float, str):
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for key, v in value.items():
            if not isinstance(key, str):
                raise TypeError(f"card field '{where}' has a non-string key {key!r}")
            out[key] = _jsonable(v, f"{where}.{key}")
        return out
    item = getattr(value, "item", None)  # numpy / torch scalars
    if callable(item) and getattr(value, "ndim", None) == 0:
        return _jsonable(item(), where)
    raise TypeError(
        f"card field '{where}' holds a {type(value).__name__}, which is not JSON-able "
        "(use str, int, float, bool, None, lists or dicts)"
    )


def _config_dict(model: RegistrationModel) -> dict[str, Any]:
    return _jsonable(model.config_dict(), "config")


# --- cards -----------------------------------------------------------------------------------


def make_card(model: RegistrationModel, **fields: Any) -> dict[str, Any]:
    """A complete card for ``model``: defaults for every field, updated by ``fields``.

    ``architecture`` and ``config`` come from the model (giving them is an error unless they
    agree); ``software`` and ``created`` default to the running versions and now; ``loss``
    defaults to ``model.loss_description()`` where the model has one; ``training`` given as a
    partial dict fills in the rest of its fields with None. Extra fields are kept. Every value
    must be JSON-able (tuples become lists); a ``TypeError`` names the field that is not.
    """
    describe = getattr(model, "loss_description", None)
    card: dict[str, Any] = {
        "architecture": model.name,
        "config": _config_dict(model),
        "working_spacing_mm": None,
        "working_shape": None,
        "intensity_preset": None,
        "modality": None,
        "loss": describe() if callable(describe) else None,
        "training": dict.fromkeys(TRAINING_FIELDS),
        "metrics": {},
        "software": software_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "parent": None,
        "tuned_on": None,
    }
    for key, value in fields.items():
        value = _jsonable(value, key)
        if key in ("architecture", "config") and value != card[key]:
            raise ValueError(
                f"card field '{key}' ({value!r}) does not describe the model; it comes from the "
                f"model ({card[key]!r}), leave it out"
            )
        if key == "training" and isinstance(value, dict):
            card["training"].update(value)
        else:
            card[key] = value
    return _jsonable(card, "card")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_card(card: Any, source: str) -> dict[str, Any]:
    """Refuse a card with missing or ill-typed fields (message names the field)."""
    if not isinstance(card, dict):
        raise CheckpointError(f"{source}: field 'card' is a {type(card).__name__}, not a dict")
    missing = [f for f in CARD_FIELDS if f not in card]
    if missing:
        raise CheckpointError(
            f"{source}: card field {missing[0]!r} is missing"
            + (f" (also missing: {', '.join(missing[1:])})" if len(missing) > 1 else "")
        )

    def bad(field: str, expected: str) -> CheckpointError:
        return CheckpointError(
            f"{source}: card field {field!r} should be {expected}, got {card[field]!r}"
        )

    if not isinstance(card["architecture"], str) or not card["architecture"]:
        raise bad("architecture", "a registry name (str)")
    if not isinstance(card["config"], dict):
        raise bad("config", "a dict of config fields")
    spacing = card["working_spacing_mm"]
    if spacing is not None and not (
        (_is_number(spacing) and spacing > 0)
        or (
            isinstance(spacing, list)
            and len(spacing) == 3
            and all(_is_number(s) and s > 0 for s in spacing)
        )
    ):
        raise bad("working_spacing_mm", "None, a positive number or [x, y, z] mm")
    shape = card["working_shape"]
    if shape is not None and not (
        (isinstance(shape, int) and not isinstance(shape, bool) and shape > 0)
        or (
            isinstance(shape, list)
            and len(shape) == 3
            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
        )
    ):
        raise bad("working_shape", "None, a positive int or [z, y, x]")
    for field in ("intensity_preset", "modality"):
        if card[field] is not None and not isinstance(card[field], str):
            raise bad(field, "None or a str")
    for field in ("training", "metrics", "software"):
        if not isinstance(card[field], dict):
            raise bad(field, "a dict")
    if not isinstance(card["created"], str):
        raise bad("created", "an ISO 8601 date (str)")
    return card


# --- reading ---------------------------------------------------------------------------------


def _load_failure(exc: Exception) -> str:
    """The informative part of a ``torch.load`` error, on one line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    marker = "WeightsUnpickler error:"
    if marker in text:  # torch's weights_only refusal says what it met after this marker
        text = text.split(marker, 1)[1]
    lines = [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.strip().startswith("Check the documentation")
    ]
    reason = lines[0] if lines else type(exc).__name__
    reason = reason.split(" Please use ", 1)[0].rstrip(".")
    # never pass on torch's advice to reload with weights_only=False (it runs the file's code)
    return "unreadable" if "weights_only" in reason else reason


def _refusal(path: Path, exc: Exception) -> str:
    """One line for a file that torch cannot load weights-only: code (pickled objects), a plain
    pickle, or not a torch file at all. Names the file and the fix, and never repeats torch's
    advice to load with ``weights_only=False``."""
    reason = _load_failure(exc)
    fix = (
        "napari-deepwarp loads weights-only checkpoints: save one with napari_deepwarp's "
        "save_checkpoint (a state dict and its card) or `deepwarp train`"
    )
    found = re.search(r"GLOBAL ([\w.]+)", reason)
    with open(path, "rb") as f:
        magic = f.read(4)
    if found:
        return (
            f"{path}: not a napari-deepwarp checkpoint: it holds Python objects (code, e.g. "
            f"{found.group(1)}), not only weights; {fix}"
        )
    if magic[:1] == b"\x80" and magic[:4] != b"PK\x03\x04":
        return (
            f"{path}: not a napari-deepwarp checkpoint: a plain Python pickle, which can hold "
            f"code, not a weights-only torch file; {fix}"
        )
    return f"{path}: not a napari-deepwarp checkpoint (not a torch file: {reason}); {fix}"


def _load_payload(path: PathLike, mmap: bool) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            try:
                payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError:
                if not mmap:
                    raise
                # Files in torch's legacy (non-zip) format cannot be memory-mapped.
                payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read means "not a checkpoint"
        raise CheckpointError(_refusal(path, exc)) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{path}: not a napari-deepwarp checkpoint (field 'format' is {found!r}, "
            f"expected {FORMAT!r})"
        )
    version = payload.get("format_version")
    if not isinstance(version, int) or version < 1 or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: field 'format_version' is {version!r}; this napari-deepwarp reads "
            f"version {FORMAT_VERSION} (a newer napari-deepwarp may read it)"
        )
    for field, kind in (("card", dict), ("state_dict", dict)):
        if not isinstance(payload.get(field), kind):
            raise CheckpointError(f"{path}: field {field!r} is missing or not a dict")
    return payload


def read_card(path: PathLike) -> dict[str, Any]:
    """The card of a checkpoint, checked for its required fields, without building the model."""
    payload = _load_payload(path, mmap=True)
    return _check_card(payload["card"], str(path))


def shipped_checkpoints(folder: PathLike | None = None) -> list[tuple[Path, dict[str, Any]]]:
    """``(path, card)`` of every checkpoint in ``folder`` (default: the shipped
    ``resources/checkpoints``), sorted by architecture then file name.

    A file whose card cannot be read is left out with a warning, so one bad file never hides
    the others.
    """
    if folder is None:
        from napari_deepwarp.resources import checkpoints_dir

        folder = checkpoints_dir()
    folder = Path(folder)
    found = []
    for path in sorted(folder.glob("*.pt")) if folder.is_dir() else []:
        try:
            found.append((path, read_card(path)))
        except (CheckpointError, OSError, RuntimeError) as exc:
            warnings.warn(f"skipping checkpoint {path}: {exc}", stacklevel=2)
    return sorted(found, key=lambda item: (item[1]["architecture"], item[0].name))


#: Dice above the affine stage alone that counts as "beats it" (run-to-run noise is ~0.001)
AFFINE_MARGIN = 0.01


def benchmark_dice(metrics: dict[str, Any]) -> str | None:
    """``"Mindboggle Dice 0.527 (affine stage alone 0.419)"`` from a card's metrics, or None."""
    dice = metrics.get("mindboggle_mean_dice")
    if dice is None:
        return None
    affine = metrics.get("mindboggle_mean_dice_affine_stage")
    return f"Mindboggle Dice {dice:.3f}" + (
        "" if affine is None else f" (affine stage alone {affine:.3f})"
    )


def below_affine_stage(card: dict[str, Any]) -> str | None:
    """A warning when the card's own benchmark shows this checkpoint's prediction not above the
    affine stage alone by more than :data:`AFFINE_MARGIN` (mean Dice on the Mindboggle pairs,
    same run), else None."""
    metrics = card.get("metrics") or {}
    dice = metrics.get("mindboggle_mean_dice")
    affine = metrics.get("mindboggle_mean_dice_affine_stage")
    if dice is None or affine is None or dice > affine + AFFINE_MARGIN:
        return None
    return (
        f"on the Mindboggle benchmark this checkpoint's prediction (Dice {dice:.3f}) is not "
        f"clearly above the affine stage alone ({affine:.3f}; it must beat it by more than "
        f"{AFFINE_MARGIN}); refine the field (--refine 150) or "
        "fine-tune, or pick the default checkpoint"
    )


def _plain(value: Any) -> Any:
    """Lists for tuples, recursively: a card holds lists where a config holds tuples."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _changed_fields(cls: type[RegistrationModel], values: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``values`` (config fields) that differ from ``cls``'s default config."""
    defaults = {k: _plain(v) for k, v in dataclasses.asdict(cls.config_class()).items()}
    return {k: v for k, v in values.items() if k in defaults and _plain(v) != defaults[k]}


def config_changes(card: dict[str, Any]) -> str | None:
    """The card's config fields that differ from its architecture's defaults, written as
    ``deepwarp train --config`` takes them (``use_affine=false, alpha=0.001``); None when there
    are none or the architecture is not registered."""
    cls = available_models().get(card.get("architecture"))
    if cls is None or not dataclasses.is_dataclass(cls.config_class):
        return None
    changed = _changed_fields(cls, card.get("config") or {})
    return ", ".join(f"{k}={json.dumps(_plain(v))}" for k, v in changed.items()) or None


def default_checkpoint(
    architecture: str | None = None,
    folder: PathLike | None = None,
    multimodal: bool | None = None,
) -> Path | None:
    """The shipped checkpoint to use when the user names none.

    With ``architecture``: its checkpoint whose card says ``"default": true``, else its first.
    Without: the card marked default across all architectures (the best measured one), else
    None. ``multimodal``: only architectures that are (True) or are not (False) multi-modal
    (``RegistrationModel.multimodal``); for two modalities the one marked default among them,
    else the first. None also when nothing is shipped or nothing fits.
    """
    models = available_models()
    candidates = [
        (path, card)
        for path, card in shipped_checkpoints(folder)
        if (architecture is None or card["architecture"] == architecture)
        and card["architecture"] in models
        and (multimodal is None or models[card["architecture"]].multimodal == multimodal)
    ]
    for path, card in candidates:
        if card.get("default"):
            return path
    first = candidates[0][0] if candidates else None
    return first if architecture is not None or multimodal else None


def _config_summary(cls: type[RegistrationModel], config: Any) -> str:
    """The config fields that differ from the architecture's defaults, as ``a=1, b=(2, 3)``.

    A config of defaults only is shown by its sequence-valued fields (layer widths and the like).
    """
    values = dataclasses.asdict(config)
    diffs = [f"{k}={v!r}" for k, v in _changed_fields(cls, values).items()]
    if diffs:
        return ", ".join(diffs)
    # All defaults: show the sequence-valued fields, which usually shape the layers.
    shaping = [f"{k}={v!r}" for k, v in values.items() if isinstance(v, (tuple, list))]
    return "defaults" + (": " + ", ".join(shaping) if shaping else "")


def _check_weights(
    model: RegistrationModel, state: dict[str, Any], summary: str, source: str
) -> None:
    """Every parameter and buffer of the card's model is in the weights with the same shape."""
    expected = model.state_dict()
    prefix = f"{source}: card field 'config' ({summary}) does not match the weights:"
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: field 'state_dict' holds {name!r}, not a tensor")
    for name, tensor in expected.items():
        if name not in state:
            raise CheckpointError(
                f"{prefix} the card's model has parameter {name!r} "
                f"{tuple(tensor.shape)}, the weights lack it"
            )
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{prefix} parameter {name!r} has shape {tuple(state[name].shape)}, "
                f"the card's model expects {tuple(tensor.shape)}"
            )
    extra = [name for name in state if name not in expected]
    if extra:
        raise CheckpointError(
            f"{prefix} the weights have parameter {extra[0]!r} "
            f"{tuple(state[extra[0]].shape)}, the card's model has none"
            + (f" ({len(extra) - 1} more)" if len(extra) > 1 else "")
        )


def load_checkpoint(
    path: PathLike, device: str | torch.device = "cpu"
) -> tuple[RegistrationModel, dict[str, Any]]:
    """``(model, card)`` from a checkpoint: the model rebuilt from its card, weights loaded
    strictly, moved to ``device`` and in ``eval()`` mode.

    Raises :class:`CheckpointError` naming the file and the field when the file is not a
    checkpoint, a card field is missing, the architecture is unknown, or the config does not
    match the weights; ``FileNotFoundError`` when there is no file.
    """
    source = str(path)
    payload = _load_payload(path, mmap=False)
    card = _check_card(payload["card"], source)
    name = card["architecture"]
    if name not in available_models():
        raise CheckpointError(
            f"{source}: card field 'architecture' names unknown model {name!r}; "
            f"known models: {', '.join(available_models())}"
        )
    cls = get_model_class(name)
    try:
        config = build_config(cls, card["config"])
        model = cls(config)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{source}: card field 'config' is not a valid {name!r} config: {exc}"
        ) from None
    state = payload["state_dict"]
    _check_weights(model, state, _config_summary(cls, config), source)
    model.load_state_dict(state, strict=True)
    model.trained_objective = trained_objective(card, model)
    return model.to(device).eval(), card


def similarity_names(
    card: dict[str, Any], model: RegistrationModel | None = None
) -> tuple[str | None, str | None]:
    """The similarity the card says the weights were trained with, and the architecture's own
    (``model``, else one built from the card); None where unknown."""
    trained_with = ((card.get("loss") or {}).get("similarity") or {}).get("name")
    try:
        model = model or create_model(card["architecture"], **card.get("config", {}))
        own = (model.loss_description().get("similarity") or {}).get("name")
    except (KeyError, TypeError, ValueError, AttributeError):
        own = None
    return trained_with, own


def trained_objective(card: dict[str, Any], model: RegistrationModel) -> tuple[str, float] | None:
    """``(similarity, diffusion weight)`` when the card's loss replaced the architecture's own
    (``deepwarp train --similarity S --reg-weight W``), else None."""
    from napari_deepwarp.core.losses import SIMILARITY_LOSSES

    loss = card.get("loss") or {}
    regulariser = loss.get("regulariser") or {}
    name, own = similarity_names(card, model)
    if name == own or name not in SIMILARITY_LOSSES:
        return None
    if regulariser.get("name") != "diffusion" or regulariser.get("on") != "displacement":
        return None
    return name, float((loss.get("weights") or {}).get("regularisation", 1.0))


# --- writing ---------------------------------------------------------------------------------


def save_checkpoint(
    path: PathLike, model: RegistrationModel, card: dict[str, Any] | None = None
) -> Path:
    """Write ``model``'s weights and ``card`` (default: :func:`make_card`) to ``path``, atomically.

    The card must describe the model (its ``architecture`` and ``config``) and have every field
    of :data:`CARD_FIELDS`; a ``ValueError`` (``TypeError`` for a value that is not JSON-able)
    names the field otherwise. The folder is created if
    needed. Returns the path written.
    """
    path = Path(path)
    if card is None:
        card = make_card(model)
    elif not isinstance(card, dict):
        raise TypeError(f"the card must be a dict, got {type(card).__name__}")
    else:
        card = {key: _jsonable(value, key) for key, value in card.items()}
    _check_card(card, "card to save")
    if card["architecture"] != model.name:
        raise ValueError(
            f"card field 'architecture' is {card['architecture']!r} but the model is {model.name!r}"
        )
    if card["config"] != _config_dict(model):
        raise ValueError(
            f"card field 'config' ({card['config']!r}) does not describe the model's config "
            f"({_config_dict(model)!r})"
        )
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "state_dict": state,
        "card": card,
    }
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp makes the file private (0600); a checkpoint is a shareable file.
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable where the platform allows
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


__all__ = [
    "CARD_FIELDS",
    "FORMAT",
    "FORMAT_VERSION",
    "CheckpointError",
    "default_checkpoint",
    "file_sha256",
    "finetuned_card",
    "hardware",
    "load_checkpoint",
    "make_card",
    "parent_reference",
    "read_card",
    "save_checkpoint",
    "shipped_checkpoints",
    "software_versions",
    "working_size",
]
