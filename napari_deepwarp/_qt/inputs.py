"""Reading the dock's choices: the layer choosers (auto-picked by name and order) and the
request a run is given (volumes copied from the layers, settings, label names). A mixin of
:class:`.widget.DeepwarpWidget`; it uses the dock's ``viewer``, ``records`` and Setup controls.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from napari.layers import Image

from napari_deepwarp.core.finetune import FinetuneSettings
from napari_deepwarp.core.io import InputError, check_image, check_labels_match
from napari_deepwarp.core.pipeline import AFFINE_ONLY, RegistrationSettings
from napari_deepwarp.core.refine import RefineSettings, refine_settings
from napari_deepwarp.layers import LABEL_WORDS, data_to_world, volume_from_layer

from .checkpoint_choice import BROWSE
from .setup_tab import NONE, REFINING, ROLES, SIMILARITIES
from .worker import RunRequest


def _ours(layer) -> dict | None:
    """The ``deepwarp`` marker of a layer this widget made (None for the user's layers)."""
    meta = getattr(layer, "metadata", None) or {}
    return meta.get("deepwarp")


class InputChoice:
    # --- layer choosers -------------------------------------------------------------------
    def _on_inserted(self, event) -> None:
        event.value.events.name.connect(self.refresh_layers)
        self.refresh_layers()

    def refresh_layers(self, *_) -> None:
        """Refill the choosers; keep the user's choices, auto-pick the others by name and order."""
        layers = [
            layer for layer in self.viewer.layers if (_ours(layer) or {}).get("kind") != "preview"
        ]
        picked: dict[str, str] = {}
        for role, (kind, optional) in ROLES.items():
            box = self.choosers[role]
            names = [layer.name for layer in layers if isinstance(layer, kind)]
            current = box.currentText()
            if role in self._user_chosen and (current in names or current == NONE):
                choice = current
            else:
                self._user_chosen.discard(role)
                choice = self._auto_pick(role, layers, picked)
            picked[role] = choice
            box.blockSignals(True)
            box.clear()
            box.addItems(([NONE] if optional else []) + names)
            box.setCurrentText(choice if choice else "")
            if not optional and not choice:
                box.setCurrentIndex(-1)
            box.blockSignals(False)
        self._pair_changed()

    @staticmethod
    def _auto_pick(role: str, layers: list, picked: dict) -> str:
        kind, optional = ROLES[role]
        side = role.split()[0]
        other = "moving" if side == "fixed" else "fixed"
        candidates = [
            layer.name for layer in layers if isinstance(layer, kind) and not _ours(layer)
        ]
        if kind is Image:
            candidates = [n for n in candidates if not any(w in n.lower() for w in LABEL_WORDS)]
        named = [n for n in candidates if side in n.lower() and other not in n.lower()]
        if named:
            return named[0]
        if optional:
            unnamed = [
                n for n in candidates if "fixed" not in n.lower() and "moving" not in n.lower()
            ]
            if len(candidates) >= 2 and len(unnamed) == len(candidates):
                return candidates[0] if side == "fixed" else candidates[1]
            return NONE
        taken = picked.get("fixed") if side == "moving" else None
        rest = [n for n in candidates if n != taken and other not in n.lower()]
        rest = rest or [n for n in candidates if n != taken]
        return rest[0] if rest else ""

    def chosen(self, role: str):
        """The layer chosen for ``role`` (None for none)."""
        name = self.choosers[role].currentText()
        if not name or name == NONE or name not in self.viewer.layers:
            return None
        return self.viewer.layers[name]

    def _pair(self) -> tuple[str, str]:
        return self.choosers["fixed"].currentText(), self.choosers["moving"].currentText()

    def _pair_changed(self, *_):
        if hasattr(self, "compare"):
            self.compare.set_records(self.records, self._pair())

    # --- a run ----------------------------------------------------------------------------
    def build_request(self) -> RunRequest:
        """Read the chosen layers into volumes (copies) and the settings; ``InputError`` on a
        bad choice (nothing is changed)."""
        fixed_layer, moving_layer = self.chosen("fixed"), self.chosen("moving")
        if fixed_layer is None or moving_layer is None:
            raise InputError("choose a fixed and a moving image layer (3D images)")
        if fixed_layer is moving_layer:
            raise InputError(
                f"{fixed_layer.name}: fixed and moving are the same layer; "
                "choose two different images"
            )
        for layer in (fixed_layer, moving_layer):
            _check_3d(layer)
        fixed, moving = _image_volume(fixed_layer), _image_volume(moving_layer)
        check_image(fixed, "fixed")
        check_image(moving, "moving")
        labels = {}
        for side, image_layer, image in (
            ("fixed", fixed_layer, fixed),
            ("moving", moving_layer, moving),
        ):
            layer = self.chosen(f"{side} labels")
            if layer is None:
                labels[side] = None
                continue
            _check_3d(layer)
            if tuple(layer.data.shape) != tuple(image_layer.data.shape):
                raise InputError(
                    f"{layer.name}: {side} labels have shape {tuple(layer.data.shape)} but "
                    f"{image_layer.name} has {tuple(image_layer.data.shape)}; choose the label "
                    "layer drawn on that image"
                )
            vol = volume_from_layer(layer)
            check_labels_match(vol, image, side)
            labels[side] = vol
        fixed_points, moving_points = self._landmarks()
        settings = self._settings(labels, fixed_points is not None)
        if settings.affine and settings.affine_from == "labels" and None in labels.values():
            raise InputError(
                "affine from labels: choose a label layer for both fixed and moving, or let the "
                "affine stage align the images"
            )
        checkpoint = self.checkpoint.currentData()
        use_checkpoint = checkpoint not in ("", BROWSE) and settings.model != AFFINE_ONLY
        return RunRequest(
            number=len(self.records) + 1,
            name=self._run_name(settings, Path(checkpoint) if use_checkpoint else None),
            fixed=fixed,
            moving=moving,
            settings=settings,
            checkpoint=Path(checkpoint) if use_checkpoint else None,
            fixed_labels=labels["fixed"],
            moving_labels=labels["moving"],
            fixed_landmarks=fixed_points,
            moving_landmarks=moving_points,
            pair=(fixed_layer.name, moving_layer.name),
            label_names=self._names(),
        )

    def _landmarks(self):
        layers = [self.chosen("fixed points"), self.chosen("moving points")]
        if layers == [None, None]:
            return None, None
        if None in layers:
            raise InputError("landmarks: choose a Points layer for both fixed and moving, or none")
        points = []
        for layer in layers:
            if layer.ndim != 3:
                raise InputError(f"{layer.name}: landmarks must be 3D points, got {layer.ndim}D")
            m = data_to_world(
                layer.affine, layer.scale, layer.translate, layer.rotate, layer.shear, 3
            )
            data = np.asarray(layer.data, float)
            world_zyx = data @ m[:3, :3].T + m[:3, 3]
            points.append(world_zyx[:, ::-1].copy())  # (x, y, z) mm LPS
        if len(points[0]) != len(points[1]) or len(points[0]) == 0:
            raise InputError(
                f"landmarks: {layers[0].name} has {len(points[0])} points and {layers[1].name} "
                f"{len(points[1])}; give the same (non-zero) number of corresponding points"
            )
        return points[0], points[1]

    def _settings(self, labels: dict, landmarks: bool) -> RegistrationSettings:
        mode = self.mode.currentData()
        steps = self.steps.value()
        finetune = FinetuneSettings(steps=steps if mode == "finetune" else 0)
        if mode == "refine_accurate":  # the preset's own steps per level
            refine = refine_settings("accurate")
        else:
            refine = RefineSettings(steps=steps if mode == "refine" else 0)
        target = finetune if mode == "finetune" else refine
        similarity = self.similarity.currentText()
        if similarity != SIMILARITIES[0]:
            target.similarity = similarity
            if similarity == "lncc" and mode == "finetune":
                target.similarity_kwargs = {"window": 7}
            elif mode in REFINING:
                target.similarity_kwargs = {"window": 7} if similarity == "lncc" else {}
        target.reg_weight = self.reg_weight.value()
        if labels["fixed"] is not None and labels["moving"] is not None:
            target.labels_weight = self.labels_weight.value()
        if landmarks:
            target.landmarks_weight = self.landmarks_weight.value()
        return RegistrationSettings(
            model=self.model.currentText(),
            affine=self.affine.isChecked(),
            affine_from=self.affine_from.currentText(),
            device=self.device.currentText(),
            precision=self.precision.currentText(),
            max_size=self.max_size.value(),
            finetune=finetune,
            refine=refine,
        )

    def _run_name(self, settings: RegistrationSettings, checkpoint: Path | None) -> str:
        parts = [f"run {len(self.records) + 1}", settings.model]
        if settings.model != AFFINE_ONLY:
            parts.append(checkpoint.stem if checkpoint else "untrained")
        if settings.finetune.steps:
            parts.append(f"finetune {settings.finetune.steps}")
        if settings.refine.steps:
            parts.append(f"refine {settings.refine.preset or settings.refine.steps}")
        for tuned, default in (
            (settings.finetune, FinetuneSettings()),
            (settings.refine, refine_settings(settings.refine.preset or "fast")),
        ):
            if tuned.steps and tuned.similarity != default.similarity:
                parts.append(str(tuned.similarity))
            if tuned.steps and tuned.reg_weight != default.reg_weight:
                parts.append(f"reg {tuned.reg_weight:g}")
        if not settings.affine and settings.model != AFFINE_ONLY:
            parts.append("no affine")
        elif settings.affine and settings.affine_from == "labels":
            parts.append("affine from labels")
        if settings.model != AFFINE_ONLY and settings.precision != "auto":
            parts.append(settings.precision)
        return " · ".join(parts)


def _check_3d(layer) -> None:
    if getattr(layer, "rgb", False) or layer.ndim != 3:
        raise InputError(
            f"{layer.name}: the layer is {layer.ndim}D with shape {tuple(layer.data.shape)}"
            f"{' (RGB)' if getattr(layer, 'rgb', False) else ''}; deepwarp registers 3D volumes "
            "(z, y, x) — choose a 3D layer"
        )
    if min(layer.data.shape) < 2:
        raise InputError(f"{layer.name}: shape {tuple(layer.data.shape)} is a single slice")


def _image_volume(layer):
    vol = volume_from_layer(layer)
    vol.array = vol.array.astype(np.float32, copy=False)
    return vol
