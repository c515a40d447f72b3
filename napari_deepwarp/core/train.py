"""Training: the model's own loss (its paper's), Adam, checkpoints, exact resume, validation.

:func:`train` is a generator like the rest of the core: it yields :class:`Progress` after every
step (``loss`` = running mean) and returns a :class:`TrainResult`. What it writes:

- ``output`` (``.pt``): the network with its model card, every ``checkpoint_every`` steps and at
  the end (atomic). The card records the data, steps, exact command, hardware and duration, and
  the latest validation Dice; a resumed training also lists every run (``training.legs``: its
  command, hardware, steps and duration), since each may have had its own options.
- ``output.with_suffix(".state.pt")``: everything for an exact resume (weights, Adam state, step,
  random states, elapsed time), written with the checkpoint. Batches depend only on
  ``(seed, step, rank)`` (:mod:`datasets`) and the torch random state is saved, so
  ``resume=True`` continues bit for bit.
- ``log`` (JSON lines, default ``output.with_suffix(".log.jsonl")``): one line per ``log_every``
  steps with the loss and its terms, and one per validation with ``val_dice``. On resume, lines
  after the resumed step are dropped so that the log reads as one run.

Distributed: started under ``torchrun`` (``WORLD_SIZE`` > 1), each process trains a
``DistributedDataParallel`` replica on its own batches (gloo on CPU, nccl on CUDA, one GPU per
local rank); rank 0 validates and writes. The effective batch is ``batch_size * world_size``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from napari_deepwarp.core import losses, spatial
from napari_deepwarp.core.checkpoint import (
    hardware,
    load_checkpoint,
    make_card,
    override_loss,
    save_checkpoint,
)
from napari_deepwarp.core.datasets import (
    SynthSource,
    VolumeSource,
    mean_dice,
    validation_pairs,
)
from napari_deepwarp.core.io import InputError
from napari_deepwarp.core.models.registry import RegistrationModel, create_model
from napari_deepwarp.core.precision import (
    autocast,
    guarded_step,
    precision_name,
    resolve_precision,
)
from napari_deepwarp.core.progress import Progress
from napari_deepwarp.core.spatial import warp
from napari_deepwarp.core.synth import SynthSettings


@dataclass
class TrainSettings:
    """model: registry name (default ``voxelmorph``, or ``init``'s architecture), with ``config``
    overrides; init: a checkpoint to start from instead of random weights. When ``model`` names
    another architecture than ``init``'s, ``init``'s weights are loaded into ``model`` (strictly:
    the two must have the same layers, e.g. ``voxelmorph`` -> ``mi_unet``), a warm start that
    keeps ``model``'s own loss. ``config`` overrides of ``init``'s own architecture apply on top
    of its config; they may drop a part of the network (LinDef's ``use_affine=false``) but not
    add or reshape a layer.
    data: ``"synth"``, a folder of volumes or a CSV (see :mod:`datasets`); shape: training grid
    (z, y, x); similarity: None for the model's own loss, else a name of
    :data:`losses.SIMILARITY_LOSSES` plus ``reg_weight`` x diffusion; labels_weight: adds a soft
    Dice term on the pairs' label maps (as SynthMorph does; 0: off); field_weight: adds the mean
    squared endpoint error (voxels^2) to the true field of synthetic pairs, the supervised
    endpoint-error loss of optical-flow networks (FlowNet) (0: off); affine_weight: for a model
    with a linear part (LinDef), adds the mean squared distance (voxels^2) between the field of
    its affine and that of the affine closest to the true field (:func:`spatial.fit_affine`), so
    that the linear branch, not the deformable one, learns the pair's rotation, scale and shift
    (0: off); contrast: synthetic pairs
    with the ``"same"`` per-label intensities on both sides (for same-modality losses) or
    ``"independent"`` ones (for multi-modal losses such as MI); synth: overrides of
    :class:`SynthSettings` fields (e.g. smaller affine jitter for pairs that the affine stage
    has already aligned); validation: None for
    synthetic labelled pairs, else a CSV/folder of labelled volumes; cache: folder for
    preprocessed real pairs (default: next to ``output``); grad_clip: largest gradient norm (a
    step with a non-finite loss or gradient is skipped); time_limit_s: stop (and save) after the
    first step past this many seconds of this run, so a training fits a time budget;
    precision: the forward passes' autocast precision (:mod:`precision`; ``"auto"`` is bfloat16
    where the device computes it natively). The default stays float32 so that a recorded
    training command gives the same run; weights and Adam are float32 in every case."""

    model: str | None = None
    output: str | Path = "model.pt"
    config: dict = field(default_factory=dict)
    init: str | Path | None = None
    data: str = "synth"
    shape: tuple[int, int, int] = (64, 64, 64)
    steps: int = 1000
    batch_size: int = 1
    learning_rate: float = 1e-4
    grad_clip: float = 10.0
    similarity: str | None = None
    reg_weight: float = 1.0
    labels_weight: float = 0.0
    field_weight: float = 0.0
    affine_weight: float = 0.0
    contrast: str = "same"
    synth: dict = field(default_factory=dict)
    checkpoint_every: int = 100
    validate_every: int = 100
    validation: str | Path | None = None
    validation_count: int = 4
    log: str | Path | None = None
    log_every: int = 10
    resume: bool = False
    time_limit_s: float | None = None
    seed: int = 0
    device: str = "cpu"
    precision: str = "float32"
    cache: str | Path | None = None
    command: str | None = None
    modality: str = "any (trained on random contrasts)"
    intensity_preset: str = "auto"
    working_spacing_mm: float | None = None
    name: str | None = None
    description: str | None = None


@dataclass
class TrainResult:
    """The trained network (unwrapped), the steps run in all, the last validation Dice."""

    model: RegistrationModel
    steps: int
    val_dice: float | None
    val_dice_before: float | None
    seconds: float
    checkpoint: Path | None


def state_path(output: str | Path) -> Path:
    return Path(output).with_suffix(".state.pt")


def log_path(settings: TrainSettings) -> Path:
    return Path(settings.log) if settings.log else Path(settings.output).with_suffix(".log.jsonl")


class _Distributed:
    """Rank, world size and device; sets up the process group under torchrun."""

    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "cuda" and not torch.cuda.is_available():
            raise InputError("--device cuda: no CUDA GPU is available here; use --device cpu")
        self.device = torch.device(f"cuda:{local}" if device == "cuda" else device)
        if device == "cuda":
            torch.cuda.set_device(self.device)
        self.started = False
        if self.world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend)
            self.started = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.started:
            torch.distributed.destroy_process_group()


def _objective(model: RegistrationModel, settings: TrainSettings):
    """``loss(output, batch) -> (total, terms)``: the model's own loss or the override, plus
    the optional label term."""
    if settings.similarity is None:
        image_loss = model.loss
    else:
        similarity = losses.similarity_loss(settings.similarity)

        def image_loss(output, moving, fixed):
            sim = similarity(warp(moving, output.displacement), fixed)
            reg = losses.diffusion_loss(output.displacement)
            total = sim + settings.reg_weight * reg
            terms = {"similarity": sim.detach(), "regularisation": reg.detach()}
            return total, terms

    def loss(output, batch):
        total, terms = image_loss(output, batch["moving"], batch["fixed"])
        if settings.labels_weight > 0 and "fixed_labels" in batch:
            term = _labels_term(output.displacement, batch["moving_labels"], batch["fixed_labels"])
            total = total + settings.labels_weight * term
            terms = {**terms, "labels": term.detach()}
        if settings.field_weight > 0:
            term = (output.displacement - batch["field"]).square().sum(1).mean()
            total = total + settings.field_weight * term
            terms = {**terms, "field": term.detach()}
        if settings.affine_weight > 0:
            term = _affine_term(output, batch["field"])
            total = total + settings.affine_weight * term
            terms = {**terms, "affine": term.detach()}
        return total, terms

    return loss


def _affine_term(output, true_field: torch.Tensor) -> torch.Tensor:
    """Mean squared distance (voxels^2) between the fields of the output's affine and of the
    affine closest to ``true_field``."""
    if output.affine is None:
        raise InputError(
            "--affine-weight needs a model with a linear part (LinDef with use_affine=true)"
        )
    shape = tuple(true_field.shape[2:])
    target = spatial.affine_to_field(spatial.fit_affine(true_field), shape)
    return (spatial.affine_to_field(output.affine.float(), shape) - target).square().sum(1).mean()


def _labels_term(u: torch.Tensor, moving_labels: torch.Tensor, fixed_labels: torch.Tensor):
    """``1 - mean soft Dice`` of the one-hot moving labels warped by ``u`` and the fixed ones."""
    n = int(max(moving_labels.max(), fixed_labels.max())) + 1

    def onehot(labels):
        return torch.nn.functional.one_hot(labels[:, 0], n).permute(0, 4, 1, 2, 3).float()

    return losses.soft_dice_loss(warp(onehot(moving_labels), u), onehot(fixed_labels))


def _source(settings: TrainSettings, model: RegistrationModel):
    if settings.data == "synth":
        field = settings.field_weight > 0 or settings.affine_weight > 0
        synth = synth_settings(settings)
        _check_axes(synth, model)
        _check_takes_effect(synth)
        return SynthSource(synth, settings.seed, field)
    for name in ("field_weight", "affine_weight"):
        if getattr(settings, name) > 0:
            flag = "--" + name.replace("_", "-")
            raise InputError(
                f"{flag} needs --data synth: only synthetic pairs come with their true field"
            )
    shape, cache = tuple(settings.shape), _cache(settings)
    return VolumeSource(settings.data, shape, cache, settings.seed, axes=model.working_axes)


def _check_takes_effect(synth: SynthSettings) -> None:
    """An error for a ``--synth`` setting that the others leave without effect."""
    if synth.dark > 0 and synth.background == 0:
        raise InputError(
            "--synth dark paints a tissue as dark as the background, but there is none: "
            "give --synth background=0.9 (say) too, or drop dark"
        )
    if synth.anatomy_zoom > 1 and not synth.anatomy:
        raise InputError(
            "--synth anatomy_zoom magnifies --synth anatomy=FILE: give one, or drop it"
        )
    if synth.anatomy_zoom > 1 and not synth.fixed_affine:
        raise InputError(
            "--synth anatomy_zoom crops the anatomy, but fixed_affine=false asks for a fixed side "
            "framed as register frames it; drop one of the two"
        )
    if synth.fov > 0 and not 0 < synth.fov_depth <= 0.5:
        raise InputError(
            f"--synth fov_depth={synth.fov_depth} cuts no slab or more than half an axis: "
            "give a fraction of the axis between 0 and 0.5 (default 0.25)"
        )


def _check_axes(synth: SynthSettings, model: RegistrationModel) -> None:
    """An error unless anatomy pairs are framed as the network's working grid will be: a
    network that works upright (``working_axes="world"``) learns from upright pairs only."""
    if not synth.anatomy or synth.world_axes == (model.working_axes == "world"):
        return
    if synth.world_axes:
        raise InputError(
            "--synth world_axes=true makes upright pairs, but this network works on the fixed "
            "image's axes; give --config 'working_axes=\"world\"' too, or drop world_axes"
        )
    raise InputError(
        'this network works along the world\'s axes (working_axes="world"): train it on '
        "upright pairs with --synth world_axes=true"
    )


def synth_settings(settings: TrainSettings) -> SynthSettings:
    """The synthetic-pair settings of a training run, or an error naming a bad override."""
    known = {f.name for f in dataclasses.fields(SynthSettings)}
    unknown = sorted(set(settings.synth) - known)
    if unknown:
        raise InputError(f"--synth: no setting(s) {unknown}; known: {', '.join(sorted(known))}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.synth.items()}
    defaults = SynthSettings()
    for key, value in values.items():
        wanted = type(getattr(defaults, key))
        if wanted is float and type(value) is int:
            values[key] = float(value)
        elif type(value) is not wanted:
            kind, example = {
                int: ("a whole number", "8"),
                float: ("a number", "2.5"),
                bool: ("true or false", "true"),
                tuple: ("a [low, high] pair", "[0.1,0.5]"),
                str: ("a file path", "tissues.nii.gz"),
            }[wanted]
            raise InputError(
                f"--synth {key}={json.dumps(value)}: {key} takes {kind} "
                f"(for example {key}={example})"
            )
    return SynthSettings(
        **{"shape": tuple(settings.shape), "same_contrast": settings.contrast == "same", **values}
    )


def _cache(settings: TrainSettings) -> Path:
    return Path(settings.cache) if settings.cache else Path(settings.output).parent / "cache"


def _out_of_time(settings: TrainSettings, t0: float, dist: _Distributed) -> bool:
    """Whether the time budget is spent; under torchrun, rank 0 decides for all."""
    if settings.time_limit_s is None:
        return False
    flag = torch.tensor([float(time.perf_counter() - t0 > settings.time_limit_s)])
    if dist.world > 1:
        flag = flag.to(dist.device)
        torch.distributed.broadcast(flag, 0)
    return bool(flag.item())


def validate(model: RegistrationModel, pairs: list[dict], device) -> tuple[float, float]:
    """Mean Dice after and before registration over labelled pairs on the training grid."""
    after, before = [], []
    model.eval()
    with torch.no_grad():
        for pair in pairs:
            moving, fixed = pair["moving"].to(device), pair["fixed"].to(device)
            u = model(moving, fixed).displacement
            labels = pair["moving_labels"].to(device).float()
            warped = warp(labels, u, mode="nearest").long()
            after.append(mean_dice(pair["fixed_labels"], warped))
            before.append(mean_dice(pair["fixed_labels"], pair["moving_labels"]))
    model.train()
    return float(np.nanmean(after)), float(np.nanmean(before))


def _trim_log(path: Path, last_step: int) -> None:
    """Keep the log lines of steps up to ``last_step`` (the resumed point)."""
    if not path.exists():
        return
    kept = [
        ln
        for ln in path.read_text(encoding="utf-8").splitlines()
        if ln and json.loads(ln)["step"] <= last_step
    ]
    path.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")


def _build(settings: TrainSettings) -> tuple[RegistrationModel, dict | None]:
    name = settings.model
    if settings.init:
        model, card = load_checkpoint(settings.init)
        same = name is None or name == card["architecture"]
        if same and not settings.config:
            return model.train(), card
        # --config overrides apply on top of the checkpoint's own config (e.g. a loss weight)
        config = {**card["config"], **settings.config} if same else settings.config
        target = _create(card["architecture"] if same else name, config)
        try:
            _load_kept_weights(target, model, drop_allowed=same)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            if same:
                raise InputError(
                    f"--config {settings.config} changes the layers of the network in --init "
                    f"{settings.init} ({first}); starting from a checkpoint, only settings that "
                    f"shape no weights (such as loss weights) or that drop a part of the network "
                    f"(such as use_affine=false) can change"
                ) from None
            raise InputError(
                f"--init {settings.init} holds a {card['architecture']!r} network whose weights "
                f"do not fit --model {name!r} ({first}); start {name!r} from "
                f"one of its own checkpoints, or leave out --model"
            ) from None
        return target.train(), card
    return _create(name or "voxelmorph", settings.config).train(), None


def _load_kept_weights(
    target: RegistrationModel, parent: RegistrationModel, drop_allowed: bool
) -> None:
    """Load ``parent``'s weights into ``target``; with ``drop_allowed``, weights of layers that
    ``target`` no longer has (e.g. ``--config use_affine=false`` drops LinDef's affine head) are
    left out, and layers that ``target`` adds (``use_affine=true``) keep their own
    initialisation, but only where that leaves the prediction unchanged (LinDef's affine head
    starts as the exact identity), so training starts from what the checkpoint learnt. Any other
    new or reshaped layer raises RuntimeError."""
    weights = parent.state_dict()
    if not drop_allowed:
        target.load_state_dict(weights, strict=True)
        return
    own = target.state_dict()
    missing = [k for k in own if k not in weights]
    target.load_state_dict({**own, **{k: v for k, v in weights.items() if k in own}}, strict=True)
    if not missing:
        return
    if not _same_prediction(target, parent):
        raise RuntimeError(f"new layers without weights in the checkpoint: {', '.join(missing)}")
    print(
        "deepwarp: note: layers new to --init start from their identity initialisation: "
        + ", ".join(missing),
        file=sys.stderr,
    )


def _same_prediction(a: RegistrationModel, b: RegistrationModel) -> bool:
    """Whether two networks predict the same displacement (1e-5 voxels) on a random pair."""
    side = max(16, 2 * int(a.size_multiple), 2 * int(b.size_multiple))
    g = torch.Generator().manual_seed(0)
    pair = [torch.rand(1, 1, side, side, side, generator=g) for _ in range(2)]
    modes = a.training, b.training
    a.eval()
    b.eval()
    with torch.no_grad():
        same = torch.allclose(a(*pair).displacement, b(*pair).displacement, atol=1e-5)
    a.train(modes[0])
    b.train(modes[1])
    return bool(same)


def _create(name: str, config: dict) -> RegistrationModel:
    try:
        return create_model(name, **config)
    except (KeyError, ValueError, TypeError) as exc:
        raise InputError(f"--model {name}: {exc}") from None


def train(settings: TrainSettings) -> Generator[Progress, None, TrainResult]:
    """Train (or resume training) a network; see the module docstring for what is written."""
    dist = _Distributed(settings.device)
    try:
        return (yield from _train(settings, dist))
    finally:
        dist.close()


def _train(settings: TrainSettings, dist: _Distributed):
    torch.manual_seed(settings.seed)
    output = Path(settings.output)
    model, parent_card = _build(settings)
    model.to(dist.device)
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    dtype = resolve_precision(settings.precision, dist.device)
    # float16 needs its loss scaled so that small gradients survive; a no-op otherwise.
    scaler = torch.amp.GradScaler(dist.device.type, enabled=dtype == torch.float16)
    start, elapsed, earlier_legs = 0, 0.0, []
    val_dice = val_before = None
    if settings.resume and state_path(output).exists():
        state = torch.load(state_path(output), map_location=dist.device, weights_only=True)
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        for group in optimiser.param_groups:  # the state holds the last run's rate, not this one's
            group["lr"] = settings.learning_rate
        torch.set_rng_state(state["rng"].cpu())
        start, elapsed = int(state["step"]), float(state["elapsed"])
        val_dice, val_before = state.get("val_dice"), state.get("val_dice_before")
        earlier_legs = list(state.get("legs") or [_unrecorded_leg(start, elapsed)])
    elif settings.resume:
        raise InputError(f"--resume: {state_path(output)} does not exist; start without --resume")
    if start >= settings.steps:
        raise InputError(f"{output}: already trained for {start} steps; ask for more with --steps")
    source = _source(settings, model)
    objective = _objective(model, settings)
    net = model
    if dist.world > 1:
        ids = [dist.device.index] if dist.device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    val_pairs, val_description = ([], "")
    if dist.main:
        val_pairs, val_description = validation_pairs(
            settings.validation,
            tuple(settings.shape),
            _cache(settings),
            synth_settings(settings),
            count=settings.validation_count,
            axes=model.working_axes,
        )
        if settings.resume:
            _trim_log(log_path(settings), start)
        elif log_path(settings).exists():
            log_path(settings).unlink()
    log = open(log_path(settings), "a", encoding="utf-8") if dist.main else None  # noqa: SIM115
    running, t0, skipped = None, time.perf_counter(), 0
    try:
        for step in range(start + 1, settings.steps + 1):
            batch = source.batch(step, dist.rank, settings.batch_size, dist.device)
            optimiser.zero_grad(set_to_none=True)
            with autocast(dist.device, dtype):
                output_ = net(batch["moving"], batch["fixed"])
                loss, terms = objective(output_, batch)
            scaler.scale(loss).backward()
            # A spike must not wreck a long run: clip the gradient norm, and skip a step whose
            # loss or gradient is not finite (every process skips it: DDP averaged the grads).
            value, stepped = guarded_step(
                optimiser, scaler, model.parameters(), loss, settings.grad_clip
            )
            if not stepped:
                skipped += 1
                terms = {**terms, "skipped_steps": skipped}
            out_of_time = _out_of_time(settings, t0, dist)
            last = step == settings.steps or out_of_time
            running = value if running is None else 0.95 * running + 0.05 * value
            now = elapsed + time.perf_counter() - t0
            if log and (step % settings.log_every == 0 or last):
                logged = {k: float(v) if torch.is_tensor(v) else v for k, v in terms.items()}
                log.write(
                    json.dumps({"step": step, "loss": value, **logged, "seconds": now}) + "\n"
                )
                log.flush()
            if dist.main and (step % settings.validate_every == 0 or last):
                val_dice, val_before = validate(model, val_pairs, dist.device)
                record = {"step": step, "val_dice": val_dice, "val_dice_before": val_before}
                log.write(json.dumps({**record, "seconds": now}) + "\n")
                log.flush()
            if dist.main and (step % settings.checkpoint_every == 0 or last):
                legs = [*earlier_legs, _leg(settings, dist, start, step, now - elapsed)]
                card = _card(
                    settings,
                    model,
                    source,
                    step,
                    now,
                    dist,
                    val_description,
                    val_dice,
                    val_before,
                    parent_card,
                    legs,
                )
                save_checkpoint(output, model, card)
                state = {
                    "model": model.state_dict(),
                    "optimiser": optimiser.state_dict(),
                    "rng": torch.get_rng_state(),
                    "step": step,
                    "elapsed": now,
                    "val_dice": val_dice,
                    "val_dice_before": val_before,
                    "legs": legs,
                }
                tmp = state_path(output).with_suffix(".tmp")
                torch.save(state, tmp)
                tmp.replace(state_path(output))
            yield Progress(step, settings.steps, "training", stage="train", loss=running)
            if out_of_time:
                break
    finally:
        if log:
            log.close()
    dist.barrier()
    seconds = elapsed + time.perf_counter() - t0
    return TrainResult(model, step, val_dice, val_before, seconds, output if dist.main else None)


def _leg(settings, dist, first_step: int, last_step: int, seconds: float) -> dict:
    """One run of a (possibly resumed) training: its command, machine, steps and duration."""
    world = f" x {dist.world} processes" if dist.world > 1 else ""
    return {
        "command": settings.command,
        "hardware": hardware(dist.device) + world,
        "precision": precision_name(resolve_precision(settings.precision, dist.device)),
        "learning_rate": settings.learning_rate,
        "steps": [first_step + 1, last_step],
        "duration_s": round(seconds, 1),
    }


def _unrecorded_leg(steps: int, seconds: float) -> dict:
    """A run saved before states recorded their legs: only its steps and duration are known."""
    return {"command": None, "hardware": None, "steps": [1, steps], "duration_s": round(seconds, 1)}


def _card(
    settings,
    model,
    source,
    step,
    seconds,
    dist,
    val_description,
    val_dice,
    val_before,
    parent_card,
    legs,
) -> dict:
    metrics = {}
    if val_dice is not None:
        metrics = {
            "validation": val_description,
            "validation_mean_dice": round(val_dice, 4),
            "validation_mean_dice_before": round(val_before, 4),
            "validation_step": step,
        }
    fields = {
        "working_spacing_mm": settings.working_spacing_mm,
        "working_shape": list(settings.shape),
        "intensity_preset": settings.intensity_preset,
        "modality": settings.modality,
        "training": {
            "data": source.description,
            "steps": step,
            "batch_size": settings.batch_size * dist.world,
            "learning_rate": settings.learning_rate,
            "grad_clip": settings.grad_clip,
            "command": settings.command,
            "hardware": legs[-1]["hardware"],
            "precision": legs[-1]["precision"],
            "duration_s": round(seconds, 1),
        },
        "metrics": metrics,
    }
    if len(legs) > 1:  # resumed: every run that made these weights, in order
        fields["training"]["legs"] = legs
    if settings.similarity is not None:
        fields["loss"] = override_loss(settings.similarity, settings.reg_weight)
    extra_terms = {}
    if settings.labels_weight > 0:
        extra_terms["labels"] = {"name": "soft_dice", "weight": settings.labels_weight}
    if settings.field_weight > 0:
        extra_terms["field"] = {
            "name": "squared endpoint error to the true synthetic field (voxels^2)",
            "weight": settings.field_weight,
        }
    if settings.affine_weight > 0:
        extra_terms["affine"] = {
            "name": "squared distance to the affine closest to the true synthetic field (voxels^2)",
            "weight": settings.affine_weight,
        }
    if extra_terms:
        describe = getattr(model, "loss_description", None)
        base = fields.get("loss") or (describe() if callable(describe) else {})
        fields["loss"] = {**base, **extra_terms}
    if settings.data == "synth":
        fields["training"]["synthetic_pairs"] = dataclasses.asdict(synth_settings(settings))
    if settings.name:
        fields["name"] = settings.name
    if settings.description:
        fields["description"] = settings.description
    if parent_card is not None and settings.init:
        from napari_deepwarp.core.checkpoint import parent_reference

        fields["parent"] = parent_reference(settings.init)
    return make_card(model, **fields)
