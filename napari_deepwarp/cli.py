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

from napari_deepwarp.cli_exits import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    EXIT_NOT_FINITE,
    EXIT_TERMINATED,
    EXIT_WORSE,
    OneLineParser,
    Terminated,
    on_sigterm,
    os_error,
    output_folder,
    show_notes,
)
from napari_deepwarp.cli_options import add_method_options, add_precision, settings_and_model
from napari_deepwarp.cli_types import (
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    refine_spec,
)


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
            if not sys.stderr.isatty():  # a log file: end the bar's line (each update drew it)
                print(file=sys.stderr)


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
    add_method_options(p)
    p.add_argument("--fixed-labels", help="label map on the fixed image (for Dice)")
    p.add_argument("--moving-labels", help="label map on the moving image (propagated)")
    p.add_argument(
        "--label-names",
        metavar="FILE",
        help="colour table naming the labels (FreeSurfer LUT, 3D Slicer .ctbl/.txt, ITK-SNAP "
        "label descriptions): names beside each label's Dice in metrics.json",
    )
    p.add_argument(
        "--landmarks",
        nargs=2,
        metavar=("FIXED_POINTS", "MOVING_POINTS"),
        help="corresponding landmarks (CSV of x,y,z mm LPS, or Slicer .fcsv): TRE is reported, "
        "and --finetune/--refine are pulled towards them (see --landmarks-weight)",
    )
    p.add_argument(
        "--landmarks-weight",
        type=non_negative_float,
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


def read_inputs(paths: dict, pool):
    """Start reading ``{name: (path or None, labels)}`` in ``pool`` after checking every file's
    header here (a missing or unreadable file fails at once, before torch is imported); returns
    a function that waits for them and gives ``({name: Volume or None}, seconds waited)``."""
    import time

    from napari_deepwarp.core.io import read_header, read_volume

    for path, _ in paths.values():
        if path is not None:
            read_header(path)
    futures = {
        name: None if path is None else pool.submit(read_volume, path, labels=labels)
        for name, (path, labels) in paths.items()
    }

    def wait() -> tuple[dict, float]:
        start = time.perf_counter()
        volumes = {name: f if f is None else f.result() for name, f in futures.items()}
        return volumes, time.perf_counter() - start

    return wait


def cmd_register(args) -> int:
    from concurrent.futures import ThreadPoolExecutor

    from napari_deepwarp.core.io import InputError, read_landmarks
    from napari_deepwarp.core.label_names import name_labels, read_label_names

    paths = {
        "fixed": (args.fixed, False),
        "moving": (args.moving, False),
        "fixed_labels": (args.fixed_labels, True),
        "moving_labels": (args.moving_labels, True),
    }
    points = [read_landmarks(path) for path in args.landmarks] if args.landmarks else [None, None]
    names = read_label_names(args.label_names) if args.label_names else None
    # The volumes are read (SimpleITK and ISA-L let go of the GIL) while torch is imported and
    # the network loaded.
    with ThreadPoolExecutor(2, thread_name_prefix="deepwarp-read") as pool:
        wait = read_inputs(paths, pool)
        from napari_deepwarp.core.gpu import release_memory, with_oom_fallback
        from napari_deepwarp.core.pipeline import (
            NonFiniteField,
            WorseThanBaseline,
            register,
            write_result,
        )

        settings, model = settings_and_model(args)
        if args.save_finetuned and settings.finetune.steps == 0:
            raise InputError(
                "--save-finetuned needs --finetune STEPS (there is nothing tuned to save)"
            )
        volumes, waited = wait()
    fixed, moving = volumes["fixed"], volumes["moving"]
    fixed_labels, moving_labels = volumes["fixed_labels"], volumes["moving_labels"]

    def run(s):
        return register(fixed, moving, s, model, fixed_labels, moving_labels, *points)

    # a GPU that runs out of memory retries on a smaller grid, then the CPU, and says so
    try:
        result = drain(with_oom_fallback(run, settings), args.quiet)
    except WorseThanBaseline as exc:
        print(f"deepwarp: {exc}; nothing written (--if-worse fail)", file=sys.stderr)
        return EXIT_WORSE
    except NonFiniteField as exc:
        print(f"deepwarp: error: {exc}; nothing written", file=sys.stderr)
        return EXIT_NOT_FINITE
    release_memory(settings.device)
    result.metrics["seconds"]["read_wait"] = waited  # reading not hidden behind the imports
    if result.metrics.get("auto", {}).get("path"):
        args.resolved_checkpoint = result.metrics["auto"]["path"]  # the parent of --save-finetuned
    name_labels(result.metrics, names)  # --label-names: structure names in metrics.json
    written = write_result(result, args.output, args.outputs)
    if args.save_finetuned:
        written.append(_save_finetuned(args, result))
    report_choices(result.metrics, args.quiet)
    if not args.quiet:
        _summary(result.metrics, written)
    return 0


def report_choices(metrics: dict, quiet: bool = False) -> None:
    """What ``--model auto`` chose and why (with the checkpoint's benchmark caveat, if any), and
    the verdict, one line each on stderr. A verdict other than "improved" is printed even with
    ``--quiet``: a run is never silently worse."""
    from napari_deepwarp.core.checkpoint import below_affine_stage, read_card

    auto = metrics.get("auto") or {}
    if auto and not quiet:
        print(f"deepwarp: auto: {auto['line']}", file=sys.stderr)
    caveat = below_affine_stage(read_card(auto["path"])) if auto.get("path") else None
    if caveat and not (metrics["finetune_steps"] or metrics["refine_steps"]):
        print(f"deepwarp: warning: {auto['checkpoint']}: {caveat}", file=sys.stderr)
    verdict = metrics.get("verdict")
    if verdict and (not quiet or verdict["word"] != "improved"):
        kind = "verdict" if verdict["word"] == "improved" else "warning"
        print(f"deepwarp: {kind}: {verdict['line']}", file=sys.stderr)


def _save_finetuned(args, result):
    """Write the fine-tuned copy with a card: its parent, the pair, the steps and the time (and
    what the network reached on the pair, even where the guard handed back the affine stage)."""
    from napari_deepwarp.core.checkpoint import finetuned_card, save_checkpoint
    from napari_deepwarp.core.pipeline import alternative

    if result.rejected is not None:
        result = drain(alternative(result), quiet=True)

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
    p.add_argument("--steps", type=positive_int, required=True, help="optimiser steps in all")
    p.add_argument("-o", "--output", required=True, help="checkpoint to write (.pt)")
    p.add_argument(
        "--shape",
        type=positive_int,
        nargs=3,
        default=[64, 64, 64],
        metavar=("D", "H", "W"),
        help="training grid (z, y, x)",
    )
    p.add_argument("--batch-size", type=positive_int, default=1, help="pairs per step and process")
    p.add_argument("--lr", type=positive_float, default=1e-4, help="Adam learning rate")
    p.add_argument(
        "--grad-clip", type=positive_float, default=10.0, help="largest gradient norm per step"
    )
    p.add_argument(
        "--similarity",
        choices=["ncc", "lncc", "ncc_ssd", "mi", "mse"],
        help="replace the model's own loss by this similarity + --reg-weight x diffusion",
    )
    p.add_argument("--reg-weight", type=non_negative_float, default=1.0)
    p.add_argument(
        "--labels-weight",
        type=non_negative_float,
        default=0.0,
        help="add a soft Dice term on the pairs' label maps (synthetic pairs always have them)",
    )
    p.add_argument(
        "--field-weight",
        type=non_negative_float,
        default=0.0,
        help="synthetic pairs: add the squared endpoint error to their true field (supervised "
        "flow loss, FlowNet style), e.g. to start a coarse-to-fine network off the identity",
    )
    p.add_argument(
        "--affine-weight",
        type=non_negative_float,
        default=0.0,
        help="synthetic pairs, a model with a linear part (LinDef): add the squared distance "
        "between its affine and the affine closest to the true field, so that the linear "
        "branch learns the rotation, scale and shift",
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
    p.add_argument("--checkpoint-every", type=positive_int, default=100, metavar="K")
    p.add_argument("--validate-every", type=positive_int, default=100, metavar="K")
    p.add_argument(
        "--validation",
        help="CSV or folder of labelled volumes for validation Dice (default: synthetic pairs)",
    )
    p.add_argument("--log", help="JSON-lines log (default: OUTPUT with .log.jsonl)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT's saved state")
    p.add_argument(
        "--time-limit",
        type=positive_float,
        metavar="MINUTES",
        help="stop and save after this many minutes (the card records the steps run)",
    )
    p.add_argument("--cache", help="folder for preprocessed real pairs (default: beside OUTPUT)")
    p.add_argument(
        "--working-spacing", type=positive_float, help="mm per training voxel, for the card"
    )
    p.add_argument("--name", help="short name for the card")
    p.add_argument("--description", help="one line for the card")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add_precision(
        p,
        "float32",
        "mixed-precision forward passes, weights staying float32 (default float32, "
        "so that recorded commands repeat)",
    )
    p.add_argument("--threads", type=positive_int, help="CPU threads for torch")
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
        affine_weight=args.affine_weight,
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
    p.add_argument(
        "--refine",
        type=refine_spec,
        default="fast",
        metavar="fast|accurate|STEPS",
        help="field refinement (0: off)",
    )
    p.add_argument(
        "--finetune", type=non_negative_int, default=0, metavar="STEPS", help="network fine-tuning"
    )
    p.add_argument("--max-size", type=positive_int, default=64, help="largest working-grid side")
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

    parser = OneLineParser(
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
    """Run a ``deepwarp`` command. Exit codes: 0 done; 2 bad input, a full disk or an output
    folder that cannot be written (one line ``deepwarp: error: ...``, nothing written); 3
    ``--if-worse fail``; 130 Ctrl-C; 143 SIGTERM (both remove what was being written)."""
    import signal
    import threading
    import warnings

    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    from napari_deepwarp.core.io import (
        InputError,
        InputNote,
        check_output_folder,
        remove_empty_folders,
    )

    try:
        errors: tuple[type[BaseException], ...] = (InputError,)
        from napari_deepwarp.core.errors import CheckpointError

        errors = (InputError, CheckpointError)
    except ImportError:
        pass
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if on_main_thread else None
    folder, created, done = None, [], False
    try:
        target = output_folder(args)
        if target is not None:
            folder = target[0]
            # the ranks of one torchrun share register-batch's folder: none may remove it
            shared = args.command == "register-batch" and os.environ.get("WORLD_SIZE", "1") != "1"
            created = check_output_folder(*target, shared=shared)
        with warnings.catch_warnings():
            warnings.simplefilter("always", InputNote)
            warnings.showwarning = show_notes(warnings.showwarning)
            code = args.func(args)
        done = code == 0
        return code
    except errors as exc:
        print(f"deepwarp: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:
        print(f"deepwarp: error: {os_error(exc, folder)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as exc:
        what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        print(f"deepwarp: {what}; nothing was written", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if not done:  # a failed run leaves no empty output folder it created
            remove_empty_folders(created)


if __name__ == "__main__":
    sys.exit(main())
