"""The registration options that ``deepwarp register`` and ``register-batch`` share, and the
settings and network they turn into."""

from __future__ import annotations

import sys

from napari_deepwarp.cli_types import (
    non_negative_float,
    non_negative_int,
    output_names,
    positive_float,
    positive_int,
    refine_spec,
)


def add_method_options(p) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="registry name (see `deepwarp models`), 'affine' for the affine stage alone, or "
        "'auto': decide from the images whether the pair is one modality or two and use the best "
        "shipped checkpoint for that (the default, unless --checkpoint names one)",
    )
    p.add_argument(
        "--if-worse",
        choices=["keep", "affine", "fail"],
        default="affine",
        help="when the deformable stage leaves the pair worse than the affine stage did (by the "
        "pair's own similarity, and Dice where both label maps are given): hand back the affine "
        "stage's result (default), keep the deformable one, or fail with exit code 3 and write "
        "nothing",
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
        type=non_negative_int,
        default=0,
        metavar="STEPS",
        help="instance optimisation: Adam steps on a copy of the network for this pair",
    )
    p.add_argument(
        "--refine",
        type=refine_spec,
        nargs="?",
        const="fast",
        default=0,
        metavar="fast|accurate|STEPS",
        help="field refinement after the network: fast (alone: the network's grid, 150 steps, "
        "seconds), accurate (a 1.25 mm grid, diffeomorphic, inverse written; about a minute on a "
        "CPU) or a step count of fast",
    )
    p.add_argument(
        "--refine-similarity",
        choices=["auto", "lncc", "mi"],
        default="auto",
        help="similarity of --refine (auto: mutual information for a multi-modal model such as "
        "mi_unet, local NCC otherwise)",
    )
    p.add_argument("--lr", type=positive_float, default=None, help="fine-tuning learning rate")
    p.add_argument(
        "--similarity",
        default=None,
        choices=["ncc", "lncc", "ncc_ssd", "mi", "mse"],
        help="fine-tuning similarity instead of the model's own loss (with --reg-weight)",
    )
    p.add_argument(
        "--reg-weight",
        type=non_negative_float,
        default=1.0,
        help="weight of the diffusion regulariser when --similarity is given",
    )
    p.add_argument(
        "--labels-weight",
        type=non_negative_float,
        default=0.0,
        help="supervise --finetune/--refine with the label maps: weight of a soft Dice term "
        "(needs --fixed-labels and --moving-labels)",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    add_precision(p, "auto", "the network's compute precision")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--modality",
        default="auto",
        choices=["auto", "mr", "ct"],
        help="intensity preset (auto: CT recognised by its Hounsfield range)",
    )
    p.add_argument(
        "--working-spacing",
        type=positive_float,
        default=None,
        metavar="MM",
        help="isotropic spacing of the network's working grid",
    )
    p.add_argument(
        "--max-size",
        type=positive_int,
        default=None,
        help="largest working-grid side when the spacing is chosen automatically (default: the "
        "checkpoint's training size, or 96 with --refine or without a checkpoint)",
    )
    p.add_argument(
        "--outputs",
        type=output_names,
        default=None,
        metavar="NAMES",
        help="write only these files, comma-separated: warped, labels, displacement, transform, "
        "metrics (default: all; leaving out the displacement field saves most of the writing "
        "time)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def add_precision(p, default: str, what: str) -> None:
    """``--precision`` for register (default auto) and train (default float32)."""
    p.add_argument(
        "--precision",
        default=default,
        choices=["auto", "float32", "bfloat16", "float16"],
        help=f"{what}. auto: bfloat16 where the device computes it natively (recent GPUs, CPUs "
        "with AVX512-BF16 or AMX), else float32. float16 is for GPUs: most CPUs emulate it, "
        "many times slower than float32",
    )


def settings_and_model(args):
    import torch

    from napari_deepwarp.core.checkpoint import (
        below_affine_stage,
        default_checkpoint,
        load_checkpoint,
    )
    from napari_deepwarp.core.finetune import FinetuneSettings
    from napari_deepwarp.core.io import InputError
    from napari_deepwarp.core.models.registry import available_models
    from napari_deepwarp.core.pipeline import AFFINE_ONLY, AUTO, RegistrationSettings
    from napari_deepwarp.core.refine import refine_settings

    model, card = None, None
    checkpoint = args.checkpoint
    if checkpoint is None and args.model not in (None, AUTO, AFFINE_ONLY):
        checkpoint = default_checkpoint(args.model)
    if checkpoint and checkpoint != "none":
        model, card = load_checkpoint(checkpoint, device="cpu")
        if args.model not in (None, AUTO) and args.model != card["architecture"]:
            raise InputError(
                f"{checkpoint}: checkpoint holds a {card['architecture']!r} model but "
                f"--model {args.model} was given; drop --model or give a matching checkpoint"
            )
    args.resolved_checkpoint = checkpoint if card else None
    untrained = "voxelmorph" if checkpoint == "none" else AUTO  # the baseline, as before
    name = card["architecture"] if card else (args.model or untrained)
    if name not in (AFFINE_ONLY, AUTO) and name not in available_models():
        raise InputError(
            f"unknown model {name!r}; choose one of: "
            f"{', '.join([*available_models(), AFFINE_ONLY, AUTO])}"
        )
    if name == AFFINE_ONLY and args.no_affine:
        raise InputError("--model affine with --no-affine would do nothing; drop one of them")
    finetune = FinetuneSettings(steps=max(0, args.finetune), seed=args.seed)
    if args.lr:
        finetune.learning_rate = args.lr
    finetune.similarity, finetune.reg_weight = args.similarity, args.reg_weight
    spacing = args.working_spacing or (card or {}).get("working_spacing_mm")
    refine = refine_settings(args.refine, similarity=args.refine_similarity)
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
        if_worse=args.if_worse,
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
        name not in (AFFINE_ONLY, AUTO)
        and model is None
        and finetune.steps == 0
        and not args.refine
        and not args.quiet
    ):
        print(
            f"deepwarp: note: no --checkpoint for {name!r} and no --finetune: an untrained "
            "network predicts an almost-zero deformation; add --refine 150 or --finetune 100 (or a checkpoint)",
            file=sys.stderr,
        )
    caveat = below_affine_stage(card) if card else None
    if caveat and finetune.steps == 0 and not args.refine:
        print(f"deepwarp: warning: {args.resolved_checkpoint}: {caveat}", file=sys.stderr)
    torch.manual_seed(args.seed)
    return settings, model


def _max_size(args, card: dict | None) -> int | None:
    """--max-size, else the checkpoint's working size (see ``checkpoint.working_size``); None
    for ``--model auto``, whose checkpoint is chosen during the run."""
    from napari_deepwarp.core.checkpoint import working_size

    if args.max_size or (card is None and args.model in (None, "auto")):
        return args.max_size
    return working_size(card, refining=bool(args.refine))
