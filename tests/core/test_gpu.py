"""The out-of-memory fallback, driven by a fake run that runs out of memory (no GPU needed)."""

import pytest
import torch

from napari_deepwarp.core.gpu import (
    is_out_of_memory,
    release_memory,
    smaller_settings,
    with_oom_fallback,
)
from napari_deepwarp.core.pipeline import RegistrationSettings
from napari_deepwarp.core.progress import Progress


class Result:
    def __init__(self, settings):
        self.settings, self.metrics = settings, {}


def drain(gen):
    events = []
    try:
        while True:
            events.append(next(gen))
    except StopIteration as stop:
        return stop.value, events


def fake_run(fail_while):
    calls = []

    def run(settings):
        calls.append(settings)
        yield Progress(0, 1, "working")
        if fail_while(settings):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return Result(settings)

    return run, calls


def test_out_of_memory_is_recognised():
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory"))
    assert not is_out_of_memory(RuntimeError("shapes do not match"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_shrinks_the_working_grid_then_falls_back_to_the_cpu():
    s = RegistrationSettings(device="cuda", max_size=96)
    sizes = []
    while s is not None:
        sizes.append((s.device, s.max_size))
        s = smaller_settings(s, shrink=0.5, min_size=32)
    assert sizes == [("cuda", 96), ("cuda", 48), ("cpu", 48)]
    fixed = smaller_settings(RegistrationSettings(device="cuda", working_spacing=2.0, max_size=64))
    assert fixed.working_spacing == pytest.approx(2.0 / 0.75) and fixed.device == "cuda"


def test_fallback_retries_until_it_fits_and_records_it():
    run, calls = fake_run(lambda s: s.device == "cuda" and s.max_size > 50)
    result, events = drain(with_oom_fallback(run, RegistrationSettings(device="cuda")))
    assert [c.max_size for c in calls] == [96, 72, 54, 40]
    notes = [e.message for e in events if e.stage == "fallback"]
    assert len(notes) == 3 and "retrying at 72" in notes[0]
    assert result.metrics["oom_fallback"]["max_size"] == 40


def test_fallback_to_cpu_and_other_errors_pass_through():
    run, _ = fake_run(lambda s: s.device == "cuda")
    result, events = drain(with_oom_fallback(run, RegistrationSettings(device="cuda"), 0.5, 64))
    assert result.settings.device == "cpu" and "on the CPU" in events[-2].message
    run, _ = fake_run(lambda s: True)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        drain(with_oom_fallback(run, RegistrationSettings(device="cpu")))

    def broken(settings):
        yield Progress(0, 1, "x")
        raise ValueError("not memory")

    with pytest.raises(ValueError):
        drain(with_oom_fallback(broken, RegistrationSettings()))
    release_memory()  # a no-op without accelerators; must not fail
    release_memory("cpu")


def test_release_memory_takes_every_device_setting():
    for device in (None, "auto", "cpu", torch.device("cpu")):
        release_memory(device)  # no error, whatever the user chose
