"""The ``deepwarp`` command: register, warp, models, demo.

A thin shell over :mod:`napari_deepwarp.core`: it parses arguments, reads files, drains the
core's progress generators into terminal progress bars, and writes the outputs. Bad input ends
with one line ``deepwarp: error: FILE: problem; fix`` and exit code 2, with nothing written.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2


class _Bars:
    """One tqdm bar per stage, shown only for stages that last longer than a second."""

    def __init__(self, quiet: bool = False):
        self.quiet, self.stage, self.bar = quiet, None, None

    def update(self, event) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        if event.stage != self.stage or self.bar is None:
            self.close()
            self.stage = event.stage
            self.bar = tqdm(
                total=event.total,
                desc=event.stage or "working",
                delay=1.0,
                leave=False,
                file=sys.stderr,
                dynamic_ncols=True,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total} [{elapsed}<{remaining}] "
                "{postfix}",
            )
        self.bar.total = event.total
        self.bar.n = event.step
        postfix = event.message if event.loss is None else f"{event.message} loss={event.loss:.4f}"
        self.bar.set_postfix_str(postfix, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def drain(generator, quiet: bool = False):
    """Run a core generator to the end, showing its progress; return its result."""
    bars = _Bars(quiet)
    try:
        while True:
            bars.update(next(generator))
    except StopIteration as stop:
        return stop.value
    finally:
        bars.close()


# --- register ---------------------------------------------------------------------------------
def _add_register(sub) -> None:
    p = sub.add_parser("register", help="register MOVING to FIXED and write the results to OUTDIR")
    p.add_argument("fixed", help="fixed image (NIfTI, NRRD, MHA/MHD or a DICOM folder)")
    p.add_argument("moving", help="moving image, registered onto the fixed image's grid")
    p.add_argument("-o", "--output", required=True, help="output folder")
    _add_method_options(p)
    p.add_argument("--fixed-labels", help="label map on the fixed image (for Dice)")
    p.add_argument("--moving-labels", help="label map on the moving image (propagated)")
    p.add_argument(
        "--landmarks",
        nargs=2,
        metavar=("FIXED_POINTS", "MOVING_POINTS"),
        help="corresponding landmarks (CSV of x,y,z mm LPS, or Slicer .fcsv): TRE is reported, "
        "and --finetune/--refine are pulled towards them (see --landmarks-weight)",
    )
    p.add_argument(
        "--landmarks-weight",
        type=float,
        default=0.1,
        help="weight of the landmark distance term (per mm) in --finetune/--refine; 0: report only",
    )
    p.add_argument(
        "--save-finetuned",
        metavar="CKPT",
        help="with --finetune: save the tuned network as a checkpoint whose card names its "
        "parent and this pair",
    )
    p.set_defaults(func=cmd_register)


def _add_method_options(p) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="registry name (see `deepwarp models`) or 'affine' for the affine stage "
        "alone; default: the checkpoint's architecture, else the best shipped model",
    )
    p.add_argument(
        "--checkpoint",
        help="checkpoint file (.pt) with a model card; default: the model's shipped checkpoint; "
        "'none': the untrained network",
    )
    p.add_argument("--no-affine", action="store_true", help="skip the affine pre-alignment")
    p.add_argument(
        "--affine-from",
        choices=["images", "labels"],
        default="images",
        help="align the images (mutual information) or, where intensities cannot be related "
        "(MR to ultrasound), the two label maps; Dice is then no longer an independent check",
    )
    p.add_argument(
        "--finetune",
        type=int,
        default=0,
        metavar="STEPS",
        help="instance optimisation: Adam steps on a copy of the network for this pair",
    )
    p.add_argument(
        "--refine",
        type=int,
        default=0,
        metavar="STEPS",
        help="field refinement: optimise the displacement itself, coarse to fine (fast)",
    )
    p.add_argument(
        "--refine-similarity",
        choices=["auto", "lncc", "mi"],
        default="auto",
        help="similarity of --refine (auto: mutual information for a multi-modal model such as "
        "mi_unet, local NCC otherwise)",
    )
    p.add_argument("--lr", type=float, default=None, help="fine-tuning learning rate")
    p.add_argument(
        "--similarity",
        default=None,
        choices=["ncc", "lncc", "ncc_ssd", "mi", "mse"],
        help="fine-tuning similarity instead of the model's own loss (with --reg-weight)",
    )
    p.add_argument(
        "--reg-weight",
        type=float,
        default=1.0,
        help="weight of the diffusion regulariser when --similarity is given",
    )
    p.add_argument(
        "--labels-weight",
        type=float,
        default=0.0,
        help="supervise --finetune/--refine with the label maps: weight of a soft Dice term "
        "(needs --fixed-labels and --moving-labels)",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    _add_precision(p, "auto", "the network's compute precision")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--modality",
        default="auto",
        choices=["auto", "mr", "ct"],
        help="intensity preset (auto: CT recognised by its Hounsfield range)",
    )
    p.add_argument(
        "--working-spacing",
        type=float,
        default=None,
        metavar="MM",
        help="isotropic spacing of the network's working grid",
    )
    p.add_argument(
        "--max-size",
        type=int,
        default=None,
        help="largest working-grid side when the spacing is chosen automatically (default: the "
        "checkpoint's training size, or 96 with --refine or without a checkpoint)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _add_precision(p, default: str, what: str) -> None:
    """``--precision`` for register (default auto) and train (default float32)."""
    p.add_argument(
        "--precision",
        default=default,
        choices=["auto", "float32", "bfloat16", "float16"],
        help=f"{what}. auto: bfloat16 where the device computes it natively (recent GPUs, CPUs "
        "with AVX512-BF16 or AMX), else float32. float16 is for GPUs: most CPUs emulate it, "
        "many times slower than float32",
    )


def _settings_and_model(args):
    import torch

    from napari_deepwarp.core.checkpoint import (
        below_affine_stage,
        default_checkpoint,
        load_checkpoint,
    )
    from napari_deepwarp.core.finetune import FinetuneSettings
    from napari_deepwarp.core.io import InputError
    from napari_deepwarp.core.models.registry import available_models
    from napari_deepwarp.core.pipeline import AFFINE_ONLY, RegistrationSettings
    from napari_deepwarp.core.refine import RefineSettings

    model, card = None, None
    checkpoint = args.checkpoint
    if checkpoint is None and args.model != AFFINE_ONLY:
        checkpoint = default_checkpoint(args.model)  # the best shipped one without --model
    if checkpoint and checkpoint != "none":
        model, card = load_checkpoint(checkpoint, device="cpu")
        if args.model and args.model != card["architecture"]:
            raise InputError(
                f"{checkpoint}: checkpoint holds a {card['architecture']!r} model but "
                f"--model {args.model} was given; drop --model or give a matching checkpoint"
            )
    args.resolved_checkpoint = checkpoint if card else None
    name = args.model or (card["architecture"] if card else "voxelmorph")
    if name != AFFINE_ONLY and name not in available_models():
        raise InputError(
            f"unknown model {name!r}; choose one of: {', '.join([*available_models(), AFFINE_ONLY])}"
        )
    if name == AFFINE_ONLY and args.no_affine:
        raise InputError("--model affine with --no-affine would do nothing; drop one of them")
    finetune = FinetuneSettings(steps=max(0, args.finetune), seed=args.seed)
    if args.lr:
        finetune.learning_rate = args.lr
    finetune.similarity, finetune.reg_weight = args.similarity, args.reg_weight
    spacing = args.working_spacing or (card or {}).get("working_spacing_mm")
    refine = RefineSettings(steps=max(0, args.refine), similarity=args.refine_similarity)
    landmarks_weight = (
        getattr(args, "landmarks_weight", 0.0) if getattr(args, "landmarks", None) else 0.0
    )
    for tuning in (finetune, refine):
        tuning.labels_weight, tuning.landmarks_weight = args.labels_weight, landmarks_weight
    if args.labels_weight > 0 and not (
        getattr(args, "fixed_labels", None) and getattr(args, "moving_labels", None)
    ):
        raise InputError(
            "--labels-weight needs label maps on both sides; add --fixed-labels and "
            "--moving-labels, or drop --labels-weight"
        )
    if (args.labels_weight > 0 or landmarks_weight > 0) and finetune.steps == refine.steps == 0:
        raise InputError(
            "--labels-weight / --landmarks supervise fine-tuning or refinement; add "
            "--refine STEPS or --finetune STEPS (or --landmarks-weight 0 to only report TRE)"
        )
    settings = RegistrationSettings(
        model=name,
        affine=not args.no_affine,
        affine_from=getattr(args, "affine_from", "images"),
        device=args.device,
        precision=args.precision,
        seed=args.seed,
        modality=args.modality,
        working_spacing=spacing,
        max_size=_max_size(args, card),
        finetune=finetune,
        refine=refine,
    )
    if (
        name != AFFINE_ONLY
        and model is None
        and finetune.steps == 0
        and args.refine == 0
        and not args.quiet
    ):
        print(
            f"deepwarp: note: no --checkpoint for {name!r} and no --finetune: an untrained "
            "network predicts an almost-zero deformation; add --refine 150 or --finetune 100 (or a checkpoint)",
            file=sys.stderr,
        )
    caveat = below_affine_stage(card) if card else None
    if caveat and finetune.steps == 0 and args.refine == 0:
        print(f"deepwarp: warning: {args.resolved_checkpoint}: {caveat}", file=sys.stderr)
    torch.manual_seed(args.seed)
    return settings, model


def _max_size(args, card: dict | None) -> int:
    """--max-size, else the checkpoint's working size (see ``checkpoint.working_size``)."""
    from napari_deepwarp.core.checkpoint import working_size

    return args.max_size or working_size(card, refining=args.refine > 0)


def cmd_register(args) -> int:
    from napari_deepwarp.core.gpu import release_memory, with_oom_fallback
    from napari_deepwarp.core.io import InputError, read_landmarks, read_volume
    from napari_deepwarp.core.pipeline import register, write_result

    settings, model = _settings_and_model(args)
    if args.save_finetuned and settings.finetune.steps == 0:
        raise InputError("--save-finetuned needs --finetune STEPS (there is nothing tuned to save)")
    fixed = read_volume(args.fixed)
    moving = read_volume(args.moving)
    fixed_labels = read_volume(args.fixed_labels, labels=True) if args.fixed_labels else None
    moving_labels = read_volume(args.moving_labels, labels=True) if args.moving_labels else None
    points = [read_landmarks(path) for path in args.landmarks] if args.landmarks else [None, None]

    def run(s):
        return register(fixed, moving, s, model, fixed_labels, moving_labels, *points)

    # a GPU that runs out of memory retries on a smaller grid, then the CPU, and says so
    result = drain(with_oom_fallback(run, settings), args.quiet)
    release_memory(settings.device)
    written = write_result(result, args.output)
    if args.save_finetuned:
        written.append(_save_finetuned(args, result))
    if not args.quiet:
        _summary(result.metrics, written)
    return 0


def _save_finetuned(args, result):
    """Write the fine-tuned copy with a card: its parent, the pair, the steps and the time."""
    from napari_deepwarp.core.checkpoint import finetuned_card, save_checkpoint

    tuned_on = f"fixed {Path(args.fixed).resolve()}, moving {Path(args.moving).resolve()}"
    command = "deepwarp " + " ".join(args.argv)
    card = finetuned_card(result, tuned_on, command, args.resolved_checkpoint)
    return save_checkpoint(args.save_finetuned, result.model, card)


def _summary(metrics: dict, written) -> None:
    parts = [f"folding {metrics['folding_percent']:.3f}%"]
    for stage in ("before", "affine", "after"):
        if metrics.get(f"mean_dice_{stage}") is not None:
            parts.append(f"Dice {stage} {metrics[f'mean_dice_{stage}']:.3f}")
    for stage in ("before", "affine", "after"):
        if metrics.get(f"tre_{stage}_mm") is not None:
            parts.append(f"TRE {stage} {metrics[f'tre_{stage}_mm']:.2f} mm")
    where = metrics["device"]
    if metrics.get("precision"):
        where += f" ({metrics['precision']})"
    parts.append(f"{metrics['seconds']['total']:.1f} s on {where}")
    print("; ".join(parts))
    print("wrote " + ", ".join(str(p) for p in written))


# --- warp -------------------------------------------------------------------------------------
def _add_warp(sub) -> None:
    p = sub.add_parser("warp", help="apply a saved transform to another image or label map")
    p.add_argument("image", help="image or label map in the moving image's space")
    p.add_argument(
        "-t",
        "--transform",
        required=True,
        help="transform.h5 or displacement.nii.gz written by `deepwarp register`",
    )
    p.add_argument("-r", "--reference", required=True, help="the fixed image (defines the grid)")
    p.add_argument("-o", "--output", required=True, help="output file")
    p.add_argument(
        "--labels", action="store_true", help="nearest-neighbour interpolation, labels kept exactly"
    )
    p.set_defaults(func=cmd_warp)


def cmd_warp(args) -> int:
    import SimpleITK as sitk

    from napari_deepwarp.core import io

    transform = io.read_transform(args.transform)
    image = io.read_volume(args.image, labels=args.labels)
    reference = io.read_volume(args.reference)
    src = image.to_sitk()
    out = sitk.Resample(
        src,
        reference.grid.reference_image(src.GetPixelID()),
        transform,
        sitk.sitkNearestNeighbor if args.labels else sitk.sitkLinear,
        0.0,
        src.GetPixelID(),
    )
    io.write_image(out, args.output)
    print(f"wrote {args.output}")
    return 0


# --- models -----------------------------------------------------------------------------------
def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list the registered architectures and shipped checkpoints")
    p.set_defaults(func=cmd_models)


def cmd_models(args) -> int:
    from napari_deepwarp.core.checkpoint import shipped_checkpoints
    from napari_deepwarp.core.models.registry import available_models

    shipped = shipped_checkpoints()
    print("affine        the affine pre-alignment alone (rigid then affine, Mattes MI)")
    for name, cls in available_models().items():
        doc = (cls.description or (cls.__doc__ or "").strip().splitlines()[0]).strip()
        print(f"{name:<13} {doc}")
        mine = [(path, card) for path, card in shipped if card["architecture"] == name]
        if not mine:
            print(f"{'':<16}no shipped checkpoint (runs untrained; use --refine or train one)")
        for path, card in mine:
            print(f"{'':<16}{_card_summary(path, card)}")
    return 0


def _card_summary(path, card: dict) -> str:
    """One line for a checkpoint: file, default mark, data, steps, size, hardware, Dice."""
    from napari_deepwarp.core.checkpoint import (
        below_affine_stage,
        benchmark_dice,
        config_changes,
        similarity_names,
    )

    training, metrics = card.get("training") or {}, card.get("metrics") or {}
    parts = [path.name + (" (default)" if card.get("default") else "")]
    if training.get("data"):
        parts.append(str(training["data"]))
    if training.get("steps") is not None:
        parts.append(f"{training['steps']} steps")
    if card.get("working_shape"):
        parts.append("shape " + "x".join(str(n) for n in card["working_shape"]))
    if card.get("inference_size"):
        parts.append(f"runs at {card['inference_size']} voxels")
    if training.get("duration_s") is not None:
        parts.append(f"{training['duration_s'] / 60:.0f} min on {training.get('hardware')}")
    if metrics.get("validation_mean_dice") is not None:
        parts.append(f"validation Dice {metrics['validation_mean_dice']:.3f}")
    if benchmark_dice(metrics):
        parts.append(benchmark_dice(metrics))
    trained_with, own = similarity_names(card)
    if trained_with and own and trained_with != own:
        parts.append(f"trained with {trained_with} + diffusion, not its paper's {own}")
    changed = config_changes(card)
    if changed:
        parts.append(f"config {changed}")
    if below_affine_stage(card):
        parts.append("prediction alone not clearly above the affine stage: use with --refine")
    return "; ".join(parts)


# --- train ------------------------------------------------------------------------------------
def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a network (synthetic pairs or your volumes) into a checkpoint with a card",
        description="Train with the model's own loss and Adam; under torchrun, data-parallel.",
    )
    p.add_argument(
        "--model",
        help="registry name (see `deepwarp models`; default: voxelmorph, or --init's "
        "architecture); with --init of another architecture with the same layers, its weights "
        "are loaded into this one",
    )
    p.add_argument(
        "--data",
        default="synth",
        help="'synth' (random label maps and contrasts), a folder of volumes (label maps named "
        "NAME_labels.nii.gz beside NAME_t1.nii.gz), or a CSV: image[,labels] or "
        "fixed,moving[,fixed_labels,moving_labels]",
    )
    p.add_argument("--steps", type=int, required=True, help="optimiser steps in all")
    p.add_argument("-o", "--output", required=True, help="checkpoint to write (.pt)")
    p.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=[64, 64, 64],
        metavar=("D", "H", "W"),
        help="training grid (z, y, x)",
    )
    p.add_argument("--batch-size", type=int, default=1, help="pairs per step and process")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate")
    p.add_argument("--grad-clip", type=float, default=10.0, help="largest gradient norm per step")
    p.add_argument(
        "--similarity",
        choices=["ncc", "lncc", "ncc_ssd", "mi", "mse"],
        help="replace the model's own loss by this similarity + --reg-weight x diffusion",
    )
    p.add_argument("--reg-weight", type=float, default=1.0)
    p.add_argument(
        "--labels-weight",
        type=float,
        default=0.0,
        help="add a soft Dice term on the pairs' label maps (synthetic pairs always have them)",
    )
    p.add_argument(
        "--field-weight",
        type=float,
        default=0.0,
        help="synthetic pairs: add the squared endpoint error to their true field (supervised "
        "flow loss, FlowNet style), e.g. to start a coarse-to-fine network off the identity",
    )
    p.add_argument(
        "--contrast",
        choices=["same", "independent"],
        default="same",
        help="synthetic pairs: one contrast on both sides (same-modality losses) or independent "
        "contrasts (multi-modal losses such as MI)",
    )
    p.add_argument(
        "--synth",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="synthetic-pair setting (core.synth.SynthSettings), e.g. rotation=3 or displacement=3",
    )
    p.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model config override (VALUE as JSON, e.g. reg_weight=2 or channels=[8,16])",
    )
    p.add_argument(
        "--init", help="start from this checkpoint's weights (see --model) instead of random ones"
    )
    p.add_argument("--checkpoint-every", type=int, default=100, metavar="K")
    p.add_argument("--validate-every", type=int, default=100, metavar="K")
    p.add_argument(
        "--validation",
        help="CSV or folder of labelled volumes for validation Dice (default: synthetic pairs)",
    )
    p.add_argument("--log", help="JSON-lines log (default: OUTPUT with .log.jsonl)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT's saved state")
    p.add_argument(
        "--time-limit",
        type=float,
        metavar="MINUTES",
        help="stop and save after this many minutes (the card records the steps run)",
    )
    p.add_argument("--cache", help="folder for preprocessed real pairs (default: beside OUTPUT)")
    p.add_argument("--working-spacing", type=float, help="mm per training voxel, for the card")
    p.add_argument("--name", help="short name for the card")
    p.add_argument("--description", help="one line for the card")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    _add_precision(
        p,
        "float32",
        "mixed-precision forward passes, weights staying float32 (default float32, "
        "so that recorded commands repeat)",
    )
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


def _config_overrides(items: list[str]) -> dict:
    import json

    from napari_deepwarp.core.io import InputError

    config = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--config {item!r}: write KEY=VALUE, e.g. reg_weight=2")
        try:
            config[key] = json.loads(value)
        except json.JSONDecodeError:
            config[key] = value
    return config


def cmd_train(args) -> int:
    import shlex

    import torch

    from napari_deepwarp.core.train import TrainSettings, train

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    argv = getattr(args, "argv", None) or sys.argv[1:]
    settings = TrainSettings(
        model=args.model,
        output=args.output,
        config=_config_overrides(args.config),
        init=args.init,
        data=args.data,
        shape=tuple(args.shape),
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        grad_clip=args.grad_clip,
        similarity=args.similarity,
        reg_weight=args.reg_weight,
        labels_weight=args.labels_weight,
        field_weight=args.field_weight,
        contrast=args.contrast,
        synth=_config_overrides(args.synth),
        checkpoint_every=args.checkpoint_every,
        validate_every=args.validate_every,
        validation=args.validation,
        log=args.log,
        resume=args.resume,
        time_limit_s=None if args.time_limit is None else 60.0 * args.time_limit,
        seed=args.seed,
        device=device,
        precision=args.precision,
        cache=args.cache,
        command="deepwarp " + shlex.join(argv),
        working_spacing_mm=args.working_spacing,
        name=args.name,
        description=args.description,
    )
    result = drain(train(settings), args.quiet or int(os.environ.get("RANK", "0")) > 0)
    if result.checkpoint is not None and not args.quiet:
        dice = (
            f"; validation Dice {result.val_dice_before:.3f} -> {result.val_dice:.3f}"
            if result.val_dice is not None
            else ""
        )
        print(f"wrote {result.checkpoint} after {result.steps} steps, {result.seconds:.0f} s{dice}")
    return 0


# --- demo -------------------------------------------------------------------------------------
def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="register the built-in sample pair and show it in napari")
    p.add_argument("-o", "--output", default="deepwarp-demo", help="output folder")
    p.add_argument("--refine", type=int, default=150, metavar="STEPS", help="field refinement")
    p.add_argument("--finetune", type=int, default=0, metavar="STEPS", help="network fine-tuning")
    p.add_argument("--max-size", type=int, default=64, help="largest working-grid side")
    p.add_argument("--no-viewer", action="store_true", help="do not open napari")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.set_defaults(func=cmd_demo)


def _has_display() -> bool:
    return sys.platform in ("darwin", "win32") or bool(
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    )


def cmd_demo(args) -> int:
    from napari_deepwarp.resources import sample_pair_paths

    paths = sample_pair_paths()
    reg_args = build_parser().parse_args(
        [
            "register",
            str(paths["fixed"]),
            str(paths["moving"]),
            "-o",
            args.output,
            "--fixed-labels",
            str(paths["fixed_labels"]),
            "--moving-labels",
            str(paths["moving_labels"]),
            "--finetune",
            str(args.finetune),
            "--refine",
            str(args.refine),
            "--max-size",
            str(args.max_size),
            "--device",
            args.device,
        ]
    )
    cmd_register(reg_args)
    if args.no_viewer or not _has_display():
        if not args.no_viewer:
            print("no display found: not opening napari (results are in the output folder)")
        return 0
    import napari
    from napari.layers import Layer

    from napari_deepwarp.core.io import read_volume
    from napari_deepwarp.layers import layer_data

    viewer = napari.Viewer(title="napari-deepwarp demo")
    viewer.open_sample("napari-deepwarp", "sample_pair")
    warped = read_volume(Path(args.output) / "warped.nii.gz")
    warped.name = "warped moving (deepwarp demo)"
    viewer.add_layer(
        Layer.create(*layer_data(warped, "image", colormap="magenta", blending="additive"))
    )
    viewer.layers["sample moving"].visible = False
    # the dock widget, with the sample pair already chosen: Run registers it again, live
    viewer.window.add_plugin_dock_widget("napari-deepwarp", "Deformable registration")
    napari.run()
    return 0


# --- entry point ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from napari_deepwarp.batch import add_register_batch

    parser = argparse.ArgumentParser(
        prog="deepwarp",
        description="Deep-learning deformable registration of 3D medical volumes.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_register(sub)
    _add_warp(sub)
    _add_models(sub)
    _add_train(sub)
    _add_demo(sub)
    add_register_batch(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    from napari_deepwarp.core.io import InputError

    try:
        errors: tuple[type[BaseException], ...] = (InputError,)
        from napari_deepwarp.core.checkpoint import CheckpointError

        errors = (InputError, CheckpointError)
    except ImportError:
        pass
    try:
        return args.func(args)
    except errors as exc:
        print(f"deepwarp: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("deepwarp: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
