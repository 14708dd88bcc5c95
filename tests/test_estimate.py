"""FLOPs and memory estimate of a search step (l2b_fast.bench.estimate), held to real runs at tiny sizes."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from l2b_fast.bench import estimate
from l2b_fast.models import SPECS

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_taskonomy():
    return SPECS["taskonomy_resnet34"](
        width=1 / 32, input_size=16, children=2, branching="stage", aspp_channels=16, dropout=0.0
    )


def real_step(spec, batch: int) -> tuple[int, int]:
    """FLOPs and bytes of distinct non-parameter storages autograd saves, on real CPU tensors."""
    torch.manual_seed(0)
    model = spec.supernet(execution="per_child", backend="ref")
    model.train()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved, kept = {}, []

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        kept.append(tensor)
        return tensor

    counter = FlopCounterMode(display=False)
    with counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            outputs = model(spec.example_input(batch))
        sum(output.float().mean() for output in outputs.values()).backward()
    return counter.get_total_flops(), sum(saved.values())


@pytest.mark.parametrize("make_spec", [tiny_taskonomy, lambda: SPECS["celeba_branch_vgg"](width=1 / 8, input_size=32)])
def test_meta_counts_equal_a_real_step(make_spec):
    spec = make_spec()
    for batch in (1, 3):
        meta_flops, meta_saved, parameters = estimate.count_step(spec, batch)
        real_flops, real_saved = real_step(spec, batch)
        assert meta_flops == real_flops > 0
        assert meta_saved == real_saved > 0
    assert parameters == sum(p.numel() for p in spec.supernet(execution="per_child").parameters())


def test_estimate_scales_with_the_batch_and_adds_up():
    spec = tiny_taskonomy()
    one, eight = estimate.estimate(spec, 1), estimate.estimate(spec, 8, device_memory_gib=80)
    assert eight.flops_per_step == 8 * one.flops_per_step == 8 * estimate.count_step(spec, 1)[0]
    _, saved_one, _ = estimate.count_step(spec, 1)
    _, saved_eight, _ = estimate.count_step(spec, 8)
    assert eight.activation_bytes == saved_eight and one.activation_bytes == saved_one  # linear in the batch
    assert eight.weight_state_bytes == 16 * eight.parameters  # fp32 weights, gradients and Adam's two moments
    assert eight.peak_bytes == eight.weight_state_bytes + eight.activation_bytes + eight.workspace_bytes
    assert (
        eight.workspace_bytes
        == int(estimate.WORKSPACE_FRACTION * eight.activation_bytes) + estimate.WORKSPACE_FIXED_BYTES
    )
    assert eight.fits is True and one.fits is None
    assert estimate.estimate(spec, 8, device_memory_gib=0.5).fits is False
    text = estimate.format_estimate(eight)
    assert "does NOT fit" not in text and "fits in 80 GiB" in text and "per image" in text


def test_bf16_halves_the_activations_and_adds_weight_copies():
    spec = SPECS["celeba_branch_vgg"](width=1 / 8, input_size=32)
    fp32, bf16 = estimate.estimate(spec, 4, "fp32"), estimate.estimate(spec, 4, "bf16")
    assert bf16.flops_per_step == fp32.flops_per_step
    assert 0.45 < bf16.saved_bytes_per_image / fp32.saved_bytes_per_image < 0.55
    assert bf16.weight_state_bytes == fp32.weight_state_bytes + 2 * fp32.parameters


def test_input_size_rebuilds_the_model():
    spec = SPECS["celeba_branch_vgg"](width=1 / 8, input_size=32)
    larger = estimate.estimate(spec, 1, input_size=64)
    assert larger.input_size == (64, 64)
    assert larger.saved_bytes_per_image > 3 * estimate.estimate(spec, 1).saved_bytes_per_image


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (("not a spec", 1), "ModelSpec"),
        ((None, 0), "batch"),
        ((None, 1, "fp8"), "precision"),
    ],
)
def test_bad_input_fails_clearly(arguments, message):
    spec = SPECS["celeba_branch_vgg"](width=1 / 8, input_size=32)
    arguments = tuple(spec if a is None else a for a in arguments)
    with pytest.raises((TypeError, ValueError), match=message):
        estimate.estimate(*arguments)
    with pytest.raises(ValueError, match="device_memory_gib"):
        estimate.estimate(spec, 1, device_memory_gib=-1)


def test_dense_peaks_by_device_name_and_precision():
    assert estimate.peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert estimate.peak_tflops("NVIDIA H100 80GB HBM3", "fp32") == 494.7  # TF32 tensor cores
    assert estimate.peak_tflops("NVIDIA H100 80GB HBM3", "fp32", tf32=False) == 67.0
    assert estimate.peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.5
    assert estimate.peak_tflops("NVIDIA H200", "fp16") == 989.4
    assert estimate.peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") is None
    assert estimate.peak_tflops("Intel(R) Xeon(R) Processor", "fp32") is None
    with pytest.raises(ValueError, match="fp8"):
        estimate.peak_tflops("NVIDIA H200", "fp8")


def test_command_line_prints_the_estimate(capsys):
    assert (
        estimate.main(["--model", "celeba_deep_wide", "--option", "width=0.125", "--size", "32", "--batch", "2"]) == 0
    )
    assert "estimated peak per GPU" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        estimate.main(["--model", "celeba_deep_wide", "--option", "widthx=2"])
