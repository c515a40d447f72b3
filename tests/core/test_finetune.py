"""Instance optimisation: a copy is tuned, the source is untouched, stop and cancel work."""

from types import SimpleNamespace

import torch
from conftest import run_generator

from napari_deepwarp.core.checkpoint import (
    finetuned_card,
    load_checkpoint,
    make_card,
    override_loss,
    save_checkpoint,
)
from napari_deepwarp.core.finetune import FinetuneSettings, finetune_network
from napari_deepwarp.core.models.blocks import gaussian_smooth
from napari_deepwarp.core.models.registry import create_model
from napari_deepwarp.core.progress import Progress

SMALL = {"enc_channels": (4, 8, 8, 8), "dec_channels": (8, 8, 8, 8, 8, 4)}


def test_tunes_a_copy_and_leaves_the_source_unchanged(registration_pair, one_thread):
    moving, fixed, _moving_labels, _fixed_labels, _ = registration_pair()
    model = create_model("voxelmorph", **SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    events, result = run_generator(
        finetune_network(model, moving, fixed, FinetuneSettings(steps=12))
    )
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert result.model is not model and result.steps_run == 12 == len(events)
    assert all(isinstance(e, Progress) and e.loss is not None for e in events)
    assert any(e.preview is not None for e in events)
    assert result.displacement.shape == (1, 3, *moving.shape[2:])
    assert result.displacement.abs().max() > 1e-3  # it moved


def test_similarity_and_weight_can_replace_the_model_loss(registration_pair, one_thread):
    moving, fixed, *_ = registration_pair()
    model = create_model("voxelmorph", **SMALL)
    settings = FinetuneSettings(steps=4, similarity="mse", reg_weight=0.0, level_sigmas=())
    events, _ = run_generator(finetune_network(model, moving, fixed, settings))
    expected_first = float(((moving - fixed) ** 2).mean())  # the untrained field is ~0
    assert abs(events[0].loss - expected_first) < 1e-3


def test_a_network_trained_with_another_loss_is_fine_tuned_with_it(
    registration_pair, one_thread, tmp_path
):
    """`deepwarp train --similarity mse --reg-weight 0` records that loss in the card; fine-tuning
    without a similarity continues with it, not with VoxelMorph's own local NCC, and the tuned
    network's card says so."""
    moving, fixed, *_ = registration_pair()
    model = create_model("voxelmorph", **SMALL)
    mse = float(((moving - fixed) ** 2).mean())  # the untrained field is ~0
    settings = FinetuneSettings(steps=2, level_sigmas=())
    first_losses = {}
    for loss in ("own", "override"):
        card = make_card(model, **({"loss": override_loss("mse", 0.0)} if loss != "own" else {}))
        loaded, _ = load_checkpoint(save_checkpoint(tmp_path / f"{loss}.pt", model, card))
        events, result = run_generator(finetune_network(loaded, moving, fixed, settings))
        first_losses[loss] = events[0].loss
        if loss == "own":
            assert loaded.trained_objective is None
            continue
        assert loaded.trained_objective == ("mse", 0.0)
        run = SimpleNamespace(
            model=result.model,
            metrics={"finetune_steps": 2, "seconds": {"finetune": 1.0}},
            working_grid=None,
            working_field=None,
        )
        assert finetuned_card(run, "fixed <- moving", "test")["loss"] == override_loss("mse", 0.0)
    assert abs(first_losses["override"] - mse) < 1e-3
    assert abs(first_losses["own"] - mse) > 1e-2  # local NCC is another number altogether


def test_early_stop_when_the_loss_stops_improving(registration_pair, one_thread):
    moving, *_ = registration_pair()
    model = create_model("voxelmorph", **SMALL)
    settings = FinetuneSettings(steps=200, level_sigmas=(), patience=5, min_delta=0.5)
    _, result = run_generator(finetune_network(model, moving, moving, settings))
    assert result.stopped_early and result.steps_run < 20


def test_closing_the_generator_cancels(registration_pair, one_thread):
    moving, fixed, *_ = registration_pair()
    gen = finetune_network(
        create_model("voxelmorph", **SMALL), moving, fixed, FinetuneSettings(steps=50)
    )
    next(gen)
    gen.close()  # what the widget's cancel does; nothing is left running


def test_gaussian_smooth_keeps_constants_and_mass():
    x = torch.full((1, 1, 9, 10, 11), 0.3)
    assert torch.allclose(gaussian_smooth(x, 1.5), x)
    spike = torch.zeros(1, 1, 21, 21, 21)
    spike[0, 0, 10, 10, 10] = 1.0
    assert abs(float(gaussian_smooth(spike, 2.0).sum()) - 1.0) < 1e-5


def test_a_step_reads_one_number_from_the_device(registration_pair, one_thread, monkeypatch):
    """Inside the fine-tuning and refinement loops the only read of a tensor's value is the
    step's loss (progress and early stop need it; fine-tuning reads the gradient's norm with it): on a GPU every read waits for the queue.
    The loss terms, the supervision's included, stay tensors. (Adam's step counters are CPU
    tensors whatever the device, so its .item() calls are not reads from the GPU.)"""
    from napari_deepwarp.core.refine import RefineSettings, refine_field
    from napari_deepwarp.core.supervision import Supervision

    moving, fixed, moving_labels, fixed_labels, _ = registration_pair()
    onehot = [
        torch.nn.functional.one_hot(t[:, 0], 8).permute(0, 4, 1, 2, 3).float()
        for t in (moving_labels, fixed_labels)
    ]
    supervision = Supervision(moving_labels=onehot[0], fixed_labels=onehot[1])
    reads = []
    for name in ("__float__", "tolist", "__bool__", "__int__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name):
            reads.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    model = create_model("voxelmorph", **SMALL)
    steps = 5
    tune = FinetuneSettings(steps=steps, level_sigmas=(), labels_weight=1.0, preview_every=0)
    run_generator(finetune_network(model, moving, fixed, tune, supervision))
    assert reads == ["tolist"] * steps  # the loss and the gradient's norm, together
    reads.clear()
    refine = RefineSettings(steps=steps, levels=(1,), labels_weight=1.0, preview_every=0)
    run_generator(refine_field(moving, fixed, None, refine, supervision))
    assert reads == ["__float__"] * steps


class _NanGradientOnSecondBackward(torch.autograd.Function):
    """Identity; its second backward pass returns NaN, as a bfloat16 CPU backward now and then
    gives a non-finite weight gradient (see :func:`precision.guarded_step`)."""

    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        _NanGradientOnSecondBackward.calls += 1
        return grad * float("nan") if _NanGradientOnSecondBackward.calls == 2 else grad


def test_a_step_with_a_non_finite_gradient_is_skipped(registration_pair, one_thread):
    moving, fixed, *_ = registration_pair()
    model = create_model("voxelmorph", **SMALL)
    _NanGradientOnSecondBackward.calls = 0
    model.flow.register_forward_hook(lambda m, i, out: _NanGradientOnSecondBackward.apply(out))
    settings = FinetuneSettings(steps=4, level_sigmas=(), preview_every=0)
    _, result = run_generator(finetune_network(model, moving, fixed, settings))
    assert _NanGradientOnSecondBackward.calls == 4
    assert result.skipped_steps == 1 and result.steps_run == 4
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    assert torch.isfinite(result.displacement).all()
    assert all(torch.isfinite(torch.tensor(result.losses)))
