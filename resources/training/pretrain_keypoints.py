"""Train LinDef's keypoint detector alone, on the true affine of synthetic brain-shaped pairs.

    python resources/training/pretrain_keypoints.py --init LINDEF.pt --anatomy TISSUES.nii.gz \
        --minutes 75 -o lindef_keypoints.pt [--config affine_iterations=4] [--resume]

Why: LinDef's own affine branch with ``affine_pooling="keypoints"`` learns rotation slowly
(about 0.3 of a 15-degree rotation after 4,000 steps), and a step of the whole network costs
1.4 to 2 s on this CPU where the detector alone costs 0.2 s. So the detector trains alone first.

What it does:

- The network is ``--init``'s LinDef (a "w/o Affine" one, such as ``lindef_noaffine_brain``)
  with ``use_affine=true, affine_pooling=keypoints, keypoint_size=--shape`` and ``--config`` on
  top; the detector
  starts as the identity, so the prediction is ``--init``'s at step 0. Starting from a
  checkpoint this script wrote, everything loads as it is.
- Only the detector's weights train (Adam, ``--lr``; a resumed leg keeps the saved rate
  unless ``--lr`` is given), on the mean squared distance (voxels^2)
  between the field of the keypoint affine and that of the affine closest to the true field
  (the ``--affine-weight`` term of ``deepwarp train``), plus ``--point-weight`` times the mean
  squared distance of each moving point from where that affine takes its fixed point,
  relative to the spread of the points (:func:`point_term`). The rest of the network is not run:
  the paper's pooled head must still be the identity, which is checked, so the branch's
  affine is the keypoint fit alone.
- Pairs: ``--anatomy``'s labels (:mod:`napari_deepwarp.core.synth`) with ``fixed_affine=False``
  (unless ``--fixed-affine``), so the fixed side fills the grid as the pipeline frames a fixed
  image and the moving side carries the whole misalignment (``--rotation`` degrees,
  ``--translation`` voxels, ``--scaling``, ``--shear``), as a pair meets the branch under
  ``deepwarp register --no-affine``; with ``--parts-per-side``, each side's tissues are cut into
  parts of its own, so that no part boundary is in both images; with ``--world-axes``, upright
  along the world's axes, for a network whose working grid lies so (``working_axes="world"``).
  Pair ``i`` comes from seed ``seed * 1_000_003 + i``, so a resumed run draws the pairs it
  would have drawn.

Writes ``-o`` (the checkpoint, with a card that records this command), ``-o`` with
``.state.pt`` (weights, Adam state and step, for ``--resume``) and ``.log.jsonl`` (both terms,
the share of the rotation read back, every ``--log-every`` steps).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

from napari_deepwarp.cli import _config_overrides
from napari_deepwarp.core import spatial
from napari_deepwarp.core.checkpoint import (
    hardware,
    load_checkpoint,
    make_card,
    parent_reference,
    save_checkpoint,
)
from napari_deepwarp.core.models.lindef import (
    LinDef,
    affine_from_keypoints,
    normalized_to_voxel_affine,
)
from napari_deepwarp.core.models.registry import create_model
from napari_deepwarp.core.synth import SynthSettings, synthetic_pair


def build(init: Path, overrides: dict) -> tuple[LinDef, dict]:
    """LinDef with a keypoint branch from ``init`` (see the module docstring), and its card."""
    parent, card = load_checkpoint(init)
    if card["architecture"] != "lindef":
        raise SystemExit(f"{init} holds a {card['architecture']!r} network, not lindef")
    config = {**card["config"], "use_affine": True, "affine_pooling": "keypoints", **overrides}
    model = create_model("lindef", **config)
    own = model.state_dict()
    kept = {k: v for k, v in parent.state_dict().items() if k in own}
    model.load_state_dict({**own, **kept}, strict=True)
    eye = torch.eye(3, 4).flatten()
    if model.affine.weight.abs().max() > 0 or not torch.equal(model.affine.bias.data, eye):
        raise SystemExit(f"{init}: its pooled affine head is trained; this script needs it unused")
    return model, card


def detector_affine(
    model: LinDef, moving: torch.Tensor, fixed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The keypoint fit for a pair ``(B, 1, D, H, W)``: its ``(B, 3, 4)`` voxel map, and the
    fixed and moving points ``(B, K, 3)`` in voxels (z, y, x)."""
    shape = tuple(fixed.shape[2:])
    q, p = model.keypoints(fixed), model.keypoints(moving)
    fitted = affine_from_keypoints(q, p, float(model.config.keypoint_ridge))
    scale = torch.tensor([(n - 1) / 2 for n in shape], device=fixed.device)
    return normalized_to_voxel_affine(fitted, shape), (q + 1) * scale, (p + 1) * scale


def point_term(target: torch.Tensor, fixed_points: torch.Tensor, moving_points: torch.Tensor):
    """Mean squared distance from each moving point to where ``target`` (the true ``(B, 3, 4)``
    voxel map) takes its fixed point, over the mean squared spread of the fixed points: each
    point learns to move with the anatomy (equivariance, as in Thewlis et al., ICCV 2017) with a
    gradient of its own. Relative to the spread because the centroid of the anatomy moves with
    it under any affine map: in absolute voxels, gathering every point there is the easy way
    down (a first leg did so, its points within 1-2 voxels of each other, and read no rotation).
    """
    mapped = fixed_points @ target[:, :, :3].transpose(1, 2) + target[:, None, :, 3]
    error = (moving_points - mapped).square().sum(-1).mean(-1)
    spread = (fixed_points - fixed_points.mean(1, keepdim=True)).square().sum(-1).mean(-1)
    return (error / spread.clamp_min(1e-6)).mean()


def rotation_read(predicted: torch.Tensor, target: torch.Tensor) -> float:
    """The share of ``target``'s rotation angle (of its linear part's polar factor) that
    ``predicted`` has, along ``target``'s axis: 1 reads it all, 0 none."""

    def rotation(a):
        u, _, vh = torch.linalg.svd(a[:, :, :3].double())
        return u @ vh

    r_t, r_p = rotation(target), rotation(predicted)
    angle_t = torch.arccos(((r_t.diagonal(dim1=1, dim2=2).sum(-1) - 1) / 2).clamp(-1, 1))
    along = (r_p @ r_t.transpose(1, 2)).diagonal(dim1=1, dim2=2).sum(-1)
    residual = torch.arccos(((along - 1) / 2).clamp(-1, 1))
    return float((1 - residual / angle_t.clamp_min(1e-6)).mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", type=Path, required=True)
    parser.add_argument("--anatomy", type=Path, required=True)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--config", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--shape", type=int, default=32)
    parser.add_argument("--rotation", type=float, default=20.0)
    parser.add_argument("--translation", type=float, default=5.0)
    parser.add_argument("--scaling", type=float, default=0.1)
    parser.add_argument("--shear", type=float, default=0.03)
    parser.add_argument("--displacement", type=float, default=2.0)
    parser.add_argument("--anatomy-parts", type=int, default=4)
    parser.add_argument(
        "--parts-per-side",
        action="store_true",
        help="cut each side into parts of its own (SynthSettings.parts_per_side), so that "
        "the two sides differ inside each tissue as two subjects do",
    )
    parser.add_argument(
        "--world-axes",
        action="store_true",
        help="upright pairs framed along the world's axes (SynthSettings.world_axes), and the "
        "network's working grid too (working_axes=world): the detector learns one orientation, "
        "not 48",
    )
    parser.add_argument(
        "--fixed-affine",
        action="store_true",
        help="give the fixed side an affine jitter too (SynthSettings.fixed_affine), so that "
        "the fixed brains are not all in the template's pose",
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="Adam's learning rate (default 1e-3); with --resume, the saved one unless given, "
        "so that a later leg can anneal it",
    )
    parser.add_argument("--point-weight", type=float, default=0.0)
    parser.add_argument("--steps", type=int, default=10**9)
    parser.add_argument(
        "--minutes", type=float, default=60.0, help="training time, resumed runs included"
    )
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--save-every", type=int, default=500)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = _config_overrides(args.config)  # as deepwarp train --config reads them
    # the detector reads the grid it trains on, whatever grid the rest works on at inference
    overrides = {"keypoint_size": args.shape, **overrides}
    if args.world_axes:
        overrides = {"working_axes": "world", **overrides}
    torch.manual_seed(args.seed)  # the detector's initial weights
    model, parent_card = build(args.init, overrides)
    device = torch.device(args.device)
    model.to(device)
    optimiser = torch.optim.Adam(
        model.keypoints.parameters(), lr=1e-3 if args.lr is None else args.lr
    )
    state_path = args.output.with_suffix(".state.pt")
    log_path = args.output.with_suffix(".log.jsonl")
    step, elapsed = 0, 0.0
    if args.resume and state_path.exists():
        state = torch.load(state_path, weights_only=True, map_location=device)
        model.keypoints.load_state_dict(state["detector"])
        optimiser.load_state_dict(state["optimiser"])
        step, elapsed = int(state["step"]), float(state["elapsed"])
        if args.lr is not None:  # the saved state holds the earlier leg's rate
            for group in optimiser.param_groups:
                group["lr"] = args.lr
        if log_path.exists():  # lines past the saved step were logged by a run that was stopped
            lines = log_path.read_text().splitlines(keepends=True)
            log_path.write_text("".join(ln for ln in lines if json.loads(ln)["step"] <= step))
    elif log_path.exists():
        log_path.unlink()
    synth = SynthSettings(
        shape=(args.shape,) * 3,
        anatomy=str(args.anatomy),
        anatomy_parts=args.anatomy_parts,
        parts_per_side=args.parts_per_side,
        background=0.9,
        same_contrast=True,
        rotation=args.rotation,
        translation=args.translation,
        scaling=args.scaling,
        shear=args.shear,
        displacement=args.displacement,
        fixed_affine=args.fixed_affine,
        world_axes=args.world_axes,
    )
    command = shlex.join(["python", "resources/training/pretrain_keypoints.py", *sys.argv[1:]])

    def save() -> None:
        training = {
            "data": f"synthetic pairs from {args.anatomy.name}, "
            f"{'both sides posed' if args.fixed_affine else 'fixed side framed'} "
            f"(rotation {args.rotation} deg, translation {args.translation} voxels, scaling "
            f"{args.scaling}{', parts cut per side' if args.parts_per_side else ''}"
            f"{', upright along the world axes' if args.world_axes else ''}); "
            "only the keypoint detector trained, on the true affine",
            "steps": step,
            "command": command,
            "hardware": hardware(device),
            "duration_s": round(elapsed, 1),
        }
        kept = ("working_shape", "working_spacing_mm", "intensity_preset", "modality", "loss")
        card = make_card(
            model,
            **{k: parent_card[k] for k in kept if k in parent_card},
            training=training,
            parent=parent_reference(args.init),
            name=args.output.stem,
            description=f"lindef with its affine branch fitted to keypoints, the detector "
            f"trained alone on the true affine of framed brain-shaped synthetic pairs; the rest "
            f"is {parent_card.get('name') or args.init.name}'s",
        )
        save_checkpoint(args.output, model, card)
        torch.save(
            {
                "detector": model.keypoints.state_dict(),
                "optimiser": optimiser.state_dict(),
                "step": step,
                "elapsed": elapsed,
            },
            state_path,
        )

    model.train()
    start, window = time.perf_counter() - elapsed, []
    while step < args.steps and time.perf_counter() - start < 60 * args.minutes:
        pair = synthetic_pair(synth, 1, args.seed * 1_000_003 + step, device, field=True)
        target = spatial.fit_affine(pair["field"]).float()
        predicted, fixed_points, moving_points = detector_affine(
            model, pair["moving"], pair["fixed"]
        )
        fields = [spatial.affine_to_field(a, synth.shape) for a in (predicted, target)]
        affine_loss = (fields[0] - fields[1]).square().sum(1).mean()
        points_loss = point_term(target, fixed_points, moving_points)
        loss = affine_loss + args.point_weight * points_loss
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        if math.isfinite(float(loss.detach())):
            torch.nn.utils.clip_grad_norm_(model.keypoints.parameters(), 10.0)
            optimiser.step()
        step += 1
        window.append(
            (
                float(affine_loss.detach()),
                float(points_loss.detach()),
                rotation_read(predicted.detach(), target),
            )
        )
        elapsed = time.perf_counter() - start
        if step % args.log_every == 0:
            means = [sum(column) / len(column) for column in zip(*window, strict=True)]
            line = {
                "step": step,
                "affine_loss": means[0],
                "point_loss": means[1],
                "rotation_read": means[2],
                "elapsed_s": round(elapsed, 1),
            }
            with log_path.open("a") as fh:
                fh.write(json.dumps(line) + "\n")
            window = []
        if step % args.save_every == 0:
            save()
    save()
    print(f"{args.output}: {step} steps in {elapsed / 60:.1f} minutes")


if __name__ == "__main__":
    main()
