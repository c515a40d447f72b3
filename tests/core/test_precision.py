"""Mixed precision: what "auto" resolves to, and that the network (only) runs in it."""

import dataclasses

import pytest
import torch
from conftest import run_generator
from test_pipeline import FIXED_GRID, MOVING_GRID, blobs, drain

from napari_deepwarp.core import precision
from napari_deepwarp.core.checkpoint import default_checkpoint, load_checkpoint
from napari_deepwarp.core.finetune import FinetuneSettings, finetune_network
from napari_deepwarp.core.io import InputError
from napari_deepwarp.core.models.blocks import ConvBlock
from napari_deepwarp.core.models.registry import create_model
from napari_deepwarp.core.pipeline import NonFiniteField, RegistrationSettings, register


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bfloat16_only_where_the_cpu_computes_it_natively(monkeypatch, native):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    expected = torch.bfloat16 if native else torch.float32
    assert precision.resolve_precision("auto", "cpu") == expected
    assert precision.resolve_precision("float32", "cpu") == torch.float32  # asked for: given
    assert precision.resolve_precision("bfloat16", "cpu") == torch.bfloat16


def test_auto_on_cuda_follows_native_bfloat16_support(monkeypatch):
    """An emulated bfloat16 (GPUs before Ampere) is slower than float32: auto stays float32."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpus = {
        "ampere": (lambda including_emulation=True: True, torch.bfloat16),
        "turing": (lambda including_emulation=True: including_emulation, torch.float32),
        "none": (lambda including_emulation=True: False, torch.float32),
    }
    for supported, expected in gpus.values():
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
        assert precision.resolve_precision("auto", "cuda") == expected
    assert precision.resolve_precision("auto", "mps") == torch.float32


def test_an_unknown_precision_names_the_choices():
    with pytest.raises(InputError, match="unknown precision 'half'.*float32, bfloat16"):
        precision.resolve_precision("half", "cpu")


def test_autocast_runs_convolutions_in_the_dtype_and_float32_is_untouched():
    conv = torch.nn.Conv3d(1, 2, 3)
    x = torch.rand(1, 1, 6, 6, 6)
    with precision.autocast("cpu", torch.bfloat16):
        assert conv(x).dtype == torch.bfloat16
    with precision.autocast("cpu", torch.float32):
        assert conv(x).dtype == torch.float32
    assert precision.precision_name(torch.bfloat16) == "bfloat16"


@pytest.fixture(scope="module")
def trained_runs():
    """The default shipped network on an oblique blob pair, in float32 and in bfloat16."""
    fixed, _ = blobs(FIXED_GRID)
    moving, _ = blobs(MOVING_GRID, seed=1)
    model, _ = load_checkpoint(default_checkpoint())
    base = RegistrationSettings(model=model.name, device="cpu", max_size=32, affine=False)
    return {
        name: drain(register(fixed, moving, dataclasses.replace(base, precision=name), model))
        for name in ("float32", "bfloat16")
    }


def test_bfloat16_changes_the_prediction_by_a_fraction_of_a_voxel(trained_runs):
    f32, bf16 = (trained_runs[k] for k in ("float32", "bfloat16"))
    assert f32.metrics["precision"] == "float32" and bf16.metrics["precision"] == "bfloat16"
    assert bf16.working_field.dtype == torch.float32  # everything after the network is float32
    assert bf16.displacement.dtype == f32.displacement.dtype
    moved = f32.working_field.abs().max()
    assert moved > 0.3  # the network moves something, so the comparison means something
    diff = (bf16.working_field - f32.working_field).abs()
    assert 0 < diff.max() < 0.1 * moved  # ran in bfloat16 (not identical), and close
    assert diff.mean() < 0.01 * moved


def test_the_affine_stage_alone_reports_no_network_precision():
    fixed, _ = blobs(FIXED_GRID)
    settings = RegistrationSettings(model="affine", device="cpu", precision="bfloat16")
    assert drain(register(fixed, fixed, settings)).metrics["precision"] is None


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_fine_tuning_in_low_precision_keeps_float32_weights_and_field(
    registration_pair, one_thread, low
):
    """float16 goes through a gradient scaler; both must still learn."""
    moving, fixed, *_ = registration_pair()
    model = create_model("voxelmorph", enc_channels=(4, 8, 8, 8), dec_channels=(8, 8, 8, 8, 8, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = FinetuneSettings(steps=6, level_sigmas=(), patience=100)
    runs = {}
    for dtype in (torch.float32, low):
        events, runs[dtype] = run_generator(
            finetune_network(model, moving, fixed, settings, dtype=dtype)
        )
        runs[dtype].losses = [e.loss for e in events]
    tuned = runs[low]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.dtype == torch.float32 for p in tuned.model.parameters())
    assert tuned.displacement.dtype == torch.float32
    reduced, full = tuned.losses, runs[torch.float32].losses
    assert reduced != full  # the forward passes ran in low precision
    assert all(abs(a - b) < 0.05 * abs(b) for a, b in zip(reduced, full))
    assert reduced[-1] < reduced[0]  # and it still learns


def test_a_channels_last_architecture_runs_in_that_layout_with_the_same_field(monkeypatch):
    """VoxelMorph is marked channels-last (measured faster); the layout must not change the
    result beyond float rounding."""
    fixed, _ = blobs(FIXED_GRID)
    moving, _ = blobs(MOVING_GRID, seed=1)
    torch.manual_seed(0)
    model = create_model("voxelmorph")
    with torch.no_grad():
        model.flow.conv.weight.normal_(0, 0.05)  # a visible field, as a trained network gives
    settings = RegistrationSettings(
        model="voxelmorph", device="cpu", max_size=32, affine=False, precision="float32"
    )
    assert model.channels_last
    fields = {}
    for layout in (True, False):
        monkeypatch.setattr(type(model), "channels_last", layout)
        fields[layout] = drain(register(fixed, moving, settings, model)).working_field
        weight = model.flow.conv.weight
        assert weight.is_contiguous(memory_format=torch.channels_last_3d) == layout
        assert weight.is_contiguous() != layout
    assert fields[True].abs().max() > 0.1
    torch.testing.assert_close(fields[True], fields[False], atol=1e-4, rtol=1e-4)


def test_a_bfloat16_conv_two_voxels_deep_has_the_float32_weight_gradient():
    """A U-Net's bottleneck on a working grid 32 voxels deep: oneDNN's bfloat16 weight gradient
    is garbage there (up to 1e31), so :class:`ConvBlock` runs that convolution in float32."""
    torch.manual_seed(0)
    block = ConvBlock(32, 32)
    x = torch.randn(1, 32, 2, 4, 4)
    reference = torch.autograd.grad(block(x).square().sum(), block.conv.weight)[0]
    for _ in range(3):
        with precision.autocast("cpu", torch.bfloat16):
            out = block(x)
        grad = torch.autograd.grad(out.float().square().sum(), block.conv.weight)[0]
        assert (grad - reference).abs().max() < 1e-3 * reference.abs().max()


@pytest.mark.parametrize("if_worse", ["keep", "affine"])
def test_a_non_finite_field_is_never_handed_back(if_worse):
    fixed, _ = blobs(FIXED_GRID)
    moving, _ = blobs(MOVING_GRID)
    model = create_model("voxelmorph", enc_channels=(4, 8, 8, 8), dec_channels=(8,) * 5 + (4,))
    model.flow.register_forward_hook(lambda m, i, out: out * float("nan"))
    settings = RegistrationSettings(
        model="voxelmorph", device="cpu", max_size=32, if_worse=if_worse
    )
    with pytest.raises(NonFiniteField, match=r"after the network is not finite \(100.0 %.*float32"):
        drain(register(fixed, moving, settings, model))
