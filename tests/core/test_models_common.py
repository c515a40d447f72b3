"""What every registered architecture must do, whatever its paper."""

import pytest
import torch

from napari_deepwarp.core.checkpoint import load_checkpoint
from napari_deepwarp.core.models import available_models, create_model
from napari_deepwarp.resources import checkpoints_dir


def _fields_in_both_modes(model) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    moving, fixed = (torch.rand(1, 1, 32, 32, 32, generator=g) for _ in range(2))
    with torch.no_grad():
        trained = model.train()(moving, fixed).displacement
        evaluated = model.eval()(moving, fixed).displacement
    return trained, evaluated


@pytest.mark.parametrize("name", sorted(available_models()))
def test_a_network_is_evaluated_as_it_was_trained(name, one_thread):
    """No running statistics (batch norm's averages over training pairs) and no dropout: a
    checkpoint then registers a pair at inference exactly as it did during training, where one
    pair per batch normalises with its own statistics."""
    torch.manual_seed(0)
    trained, evaluated = _fields_in_both_modes(create_model(name))
    assert trained.abs().max() > 0
    torch.testing.assert_close(evaluated, trained, rtol=1e-4, atol=1e-9)


def test_batch_norm_running_statistics_would_be_caught(one_thread):
    torch.manual_seed(0)
    trained, evaluated = _fields_in_both_modes(create_model("conv2warp", norm="batch"))
    assert not torch.allclose(evaluated, trained, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("path", sorted(checkpoints_dir().glob("*.pt")), ids=lambda p: p.name)
def test_no_shipped_checkpoint_keeps_running_statistics(path):
    model, _ = load_checkpoint(path)
    kept = [
        name
        for name, module in model.named_modules()
        if getattr(module, "track_running_stats", False) or isinstance(module, torch.nn.Dropout)
    ]
    assert not kept, f"{path.name}: {kept} behave differently in eval() than in training"
