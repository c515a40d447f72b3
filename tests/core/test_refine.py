"""Field refinement: the field itself optimised coarse to fine."""

import torch
from conftest import mean_dice, run_generator

from napari_deepwarp.core import spatial
from napari_deepwarp.core.refine import RefineSettings, refine_field


def test_refinement_from_zero_recovers_the_known_deformation(registration_pair):
    moving, fixed, moving_labels, fixed_labels, truth = registration_pair()
    events, result = run_generator(refine_field(moving, fixed, None, RefineSettings(steps=90)))
    u = result.displacement
    assert u.shape == truth.shape
    warped = spatial.warp(moving_labels.float(), u, mode="nearest").long()
    before, after = mean_dice(fixed_labels, moving_labels), mean_dice(fixed_labels, warped)
    assert after > before + 0.08
    error_before = truth.norm(dim=1).mean()
    assert (u - truth).norm(dim=1).mean() < 0.6 * error_before
    assert float((spatial.jacobian_determinant(u) <= 0).float().mean()) < 0.01
    assert [e.stage for e in events] == ["refine"] * len(events)
    assert any(e.preview is not None and e.preview["displacement"].shape == u.shape for e in events)


def test_refinement_starts_from_the_given_field(registration_pair):
    moving, fixed, *_, truth = registration_pair()
    _, none = run_generator(
        refine_field(moving, fixed, truth, RefineSettings(steps=0, levels=(1,)))
    )
    assert torch.allclose(none.displacement, truth)
    events, result = run_generator(
        refine_field(moving, fixed, truth, RefineSettings(steps=3, levels=(1,)))
    )
    assert len(events) == 3 and (result.displacement - truth).abs().max() < 1.0


def test_stop_keeps_the_field_reached_so_far(registration_pair):
    from napari_deepwarp.core.progress import STOP

    moving, fixed, *_ = registration_pair()
    gen = refine_field(moving, fixed, None, RefineSettings(steps=60, levels=(2, 1)))
    events = [next(gen) for _ in range(3)]
    try:
        gen.send(STOP)
        raise AssertionError("the generator went on after STOP")
    except StopIteration as stop:
        result = stop.value
    assert [e.step for e in events] == [1, 2, 3]
    assert result.steps_run == 3 and result.stopped_early
    assert result.displacement.shape == (1, 3, *fixed.shape[2:])
    assert result.displacement.abs().max() > 0  # three steps of optimisation are kept


def test_plateau_waits_for_the_loss_to_stop_improving():
    from napari_deepwarp.core.progress import Plateau

    falling = Plateau(patience=3, min_delta=1e-3)
    assert not any(falling.update(1.0 - 0.01 * k) for k in range(50))  # improves every step
    flat = Plateau(patience=3, min_delta=1e-3)
    assert [flat.update(v) for v in (1.0, 1.0, 0.9999, 1.0)] == [False, False, False, True]


def test_early_stop_at_every_level_lets_a_falling_loss_run(registration_pair):
    moving, fixed, *_ = registration_pair()
    settings = RefineSettings(
        steps=30, levels=(2, 1), level_steps=(15, 15), early_stop="each", patience=5,
        learning_rate=0.02, preview_every=0,
    )  # fmt: skip
    _, result = run_generator(refine_field(moving, fixed, None, settings))
    assert result.steps_run == 30 and not result.stopped_early
