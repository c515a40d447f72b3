#!/usr/bin/env bash
# One training leg of issue 18 on a lent GPU, sized to about 8 minutes of device time:
#
#   bash resources/training/gpu_leg.sh lindef_keypoints   # or lindef_affine, mi_unet_mm, conv2warp
#
# Writes LEG.pt (its card holds the command, the hardware and the steps), LEG.log.jsonl and
# LEG.out under $OUT (default bench_out/gpu_leg). Copy them back and evaluate them on the
# development machine, never on the lent one (it has no shared data):
#
#   python -m benchmarks.checkpoints_mindboggle --pairs 1:2,3:4,5:1 --refine-pairs '' \
#     --finetune-pairs '' --finetune-steps '' --checkpoints LEG.pt
#
# The legs train at 96^3 (what the issue asks of a GPU leg) and start from a shipped checkpoint;
# all but lindef_keypoints in bfloat16. lindef_keypoints trains LinDef's keypoint detector alone,
# in float32, with resources/training/pretrain_keypoints.py (the current plan for LinDef's own
# affine branch; see the training record): SHAPE=32 trains it on LinDef's working grid instead,
# and its --no-affine figures come from
# `python -m benchmarks.own_affine_mindboggle --pairs 2:3,4:5 --checkpoints LEG.pt`.
# Environment: MINUTES (training time, default 7), SHAPE (grid side, default 96),
# DEVICE (default cuda; `DEVICE=cpu SHAPE=32 MINUTES=0.2` is a dry run of the script itself).
# ANATOMY: the brain template's tissue map that the conv2warp and lindef legs draw brain-shaped
# pairs from (default bench_out/mni_tissues.nii.gz; make it here with
# `python resources/training/template_tissues.py bench_out/mni_tissues.nii.gz`, which needs
# nilearn). What the machine needs carried along: benchmarks/device_env.sh and ANATOMY.
set -euo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/device_env.sh
leg="${1:-lindef_keypoints}"
minutes="${MINUTES:-7}" n="${SHAPE:-96}" device="${DEVICE:-cuda}" out="${OUT:-bench_out/gpu_leg}"
anatomy="${ANATOMY:-bench_out/mni_tissues.nii.gz}"
scale() { python3 -c "print(round($1 * $n / 48, 2))"; }  # a length given at 48^3, at n^3
whole() { python3 -c "print(max(2, round($1 * $n / 48)))"; }  # the same, a whole number
if [ "$leg" != mi_unet_mm ] && [ ! -f "$anatomy" ]; then
  echo "gpu_leg.sh: no tissue map at $anatomy (ANATOMY); make it with resources/training/template_tissues.py"
  exit 2
fi
if [ "$device" = cuda ]; then
  python3 -c "import SimpleITK, torch; assert torch.cuda.is_available(), 'no CUDA GPU'" \
    || { echo "gpu_leg.sh: SimpleITK or a CUDA GPU is missing (see benchmarks/device_env.sh)"; exit 2; }
fi
common=(--data synth --steps 1000000 --time-limit "$minutes" --shape "$n" "$n" "$n"
  --grad-clip 10 --checkpoint-every 200 --validate-every 500 --synth background=0.9
  --synth "label_grid=$(whole 12)" --precision bfloat16 --device "$device" --seed 96 -q)
case "$leg" in
  lindef_keypoints)  # the recipe's pairs (upright, both sides posed, 20 degrees, 10 %), at n^3
    cmd=(python3 resources/training/pretrain_keypoints.py
      --init resources/checkpoints/lindef_noaffine_brain.pt --anatomy "$anatomy" --shape "$n"
      --translation "$(scale 7.5)" --displacement "$(scale 3)" --minutes "$minutes"
      --world-axes --fixed-affine --config deformable_after_affine=true
      --device "$device" --seed 96 -o "$out/$leg.pt") ;;
  lindef_affine)  # the coupled network, misaligned as native-space brains are; its head reads
    # first moments, both ways, in two passes (see the LinDef docstring and the training record)
    args=(--model lindef --init resources/checkpoints/lindef_noaffine_brain.pt
      --config use_affine=true --config 'affine_pooling="moments"' --config affine_symmetric=true
      --config affine_iterations=2 --contrast same --similarity lncc --reg-weight 1
      --labels-weight 1 --field-weight 0.2 --lr 1e-4 --synth rotation=20
      --synth "translation=$(scale 8)" --synth scaling=0.1 --synth shear=0.03
      --synth "displacement=$(scale 2.25)" --synth still=0.1 --synth "anatomy=$anatomy"
      --synth anatomy_parts=4) ;;
  mi_unet_mm)  # two modalities: independent label-wise contrasts (30 % shared), MI + soft Dice;
    # on blobs, since brain-shaped pairs of two contrasts made it bold on T1/T2 brains; a
    # quarter of the images with one tissue as dark as the background (fifteenth session), half
    # the moving images cut to a smaller field of view (sixteenth)
    args=(--model mi_unet --init resources/checkpoints/mi_unet_synth_bg.pt --contrast independent
      --labels-weight 4 --lr 1e-4 --synth rotation=2 --synth "translation=$(scale 1)"
      --synth scaling=0.02 --synth shear=0.01 --synth "displacement=$(scale 2.25)"
      --synth still=0.3 --synth merge=0.6 --synth same=0.3 --synth dark=0.25 --synth fov=0.5) ;;
  conv2warp)
    args=(--model conv2warp --init resources/checkpoints/conv2warp_brain.pt --contrast same
      --similarity lncc --reg-weight 1 --labels-weight 1 --field-weight 0.1 --lr 1e-4
      --synth rotation=2 --synth "translation=$(scale 1)" --synth scaling=0.02
      --synth shear=0.01 --synth "displacement=$(scale 2.25)" --synth still=0.1
      --synth "anatomy=$anatomy" --synth anatomy_parts=4) ;;
  *) echo "gpu_leg.sh: unknown leg '$leg'; use lindef_keypoints, lindef_affine, mi_unet_mm or conv2warp"
    exit 2 ;;
esac
if [ -z "${cmd+x}" ]; then
  cmd=(python3 -m napari_deepwarp.cli train "${common[@]}" "${args[@]}" --name "$leg"
    --description "$leg, one ${minutes}-minute leg at ${n}^3 on $device (resources/training/gpu_leg.sh)"
    -o "$out/$leg.pt")
fi
mkdir -p "$out"
"${cmd[@]}" 2>&1 | tee "$out/$leg.out"
if [ -f "$out/$leg.log.jsonl" ]; then tail -n 3 "$out/$leg.log.jsonl"; else echo "no log line yet (a dry run)"; fi
