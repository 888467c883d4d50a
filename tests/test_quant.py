"""Group-wise weight quantization: the formats' bytes, the round trip, and the eager reference."""

from __future__ import annotations

import pytest
import torch
from models import FAMILIES, tiny_model

from hscompile.errors import ConfigError
from hscompile.ir.quant import QuantScheme, weight_scheme
from hscompile.ops.quant import dequantize, pack_int4, quantize, unpack_int4
from hscompile.quantize import quantized_weight_names, reference


def _weight(shape=(48, 256), dtype=torch.bfloat16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * 0.05).to(dtype)


@pytest.mark.parametrize("name", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_round_trip_is_within_half_a_step_of_each_group(name, dtype):
    weight = _weight(dtype=dtype)
    scheme = QuantScheme(name, 64)
    q = quantize(weight, scheme)
    back = dequantize(q)
    assert back.dtype == dtype and back.shape == weight.shape
    step = q.scales.float().repeat_interleave(64, dim=-1)
    # Half a step, plus the rounding of the result to the weight's dtype.
    slack = back.float().abs() * torch.finfo(dtype).eps + 1e-12
    assert ((back.float() - weight.float()).abs() <= step / 2 + slack).all()
    assert torch.equal(dequantize(quantize(back, scheme)), back) or name == "int4"  # int8 absmax is kept


def test_stored_bytes_are_what_the_format_says_and_meet_the_ratios_for_bf16():
    shape = (576, 1536)
    weight = _weight(shape)
    plain = weight.numel() * weight.element_size()
    for name, most in (("int8", 0.55), ("int4", 0.30)):
        scheme = QuantScheme(name, 64)
        q = quantize(weight, scheme)
        assert q.nbytes == scheme.packed_bytes(shape, torch.bfloat16)
        assert q.nbytes / plain <= most
    assert QuantScheme("int8", 64).packed_bytes(shape, torch.bfloat16) == 576 * 1536 + 576 * 24 * 2
    assert QuantScheme("int4", 64).packed_bytes(shape, torch.bfloat16) == 576 * 1536 // 2 + 576 * 24 * 4


def test_int4_packs_two_values_a_byte():
    values = torch.randint(0, 16, (3, 10), dtype=torch.uint8)
    packed = pack_int4(values)
    assert packed.shape == (3, 5) and torch.equal(unpack_int4(packed), values)


def test_a_constant_group_round_trips_exactly():
    weight = torch.zeros(4, 128, dtype=torch.bfloat16)
    weight[1] = 0.5
    for name in ("int8", "int4"):
        assert torch.equal(dequantize(quantize(weight, QuantScheme(name, 64))), weight)


def test_bad_schemes_and_group_sizes_are_refused_with_what_would_be_valid():
    with pytest.raises(ConfigError, match="weight_quant must be one of none, int8, int4"):
        weight_scheme("int3")
    with pytest.raises(ConfigError, match="even for int4"):
        QuantScheme("int4", 33)
    with pytest.raises(ConfigError, match="at least 2"):
        QuantScheme("int8", 0)
    with pytest.raises(ConfigError, match=r"does not divide the last dimension \(96\) of weight 'w' .*32, 48, 96"):
        quantize(_weight((4, 96)), QuantScheme("int8", 64), "w")
    assert weight_scheme("none") is None


@pytest.mark.parametrize("family", FAMILIES)
def test_the_reference_replaces_only_the_layers_projections_by_their_round_trip(family):
    model = tiny_model(family, layers=2, hidden=64)
    names = set(quantized_weight_names(model))
    assert names and all(".0." in n or ".1." in n for n in names)
    ref = reference(model, weight_quant="int4", quant_group_size=32)
    original = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        if name in names:
            expected = dequantize(quantize(original[name], QuantScheme("int4", 32)))
            assert torch.equal(p, expected) and not torch.equal(p, original[name]), name
        else:
            assert torch.equal(p, original[name]), f"{name} must stay exact"


def test_the_reference_names_the_weight_a_group_size_does_not_fit():
    model = tiny_model("llama", layers=2, hidden=64)
    with pytest.raises(ConfigError, match=r"of weight 'model\.layers\.0\..*sizes that divide it"):
        reference(model, weight_quant="int8", quant_group_size=48)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_rows_round_trip_at_any_width_and_row_count(rows, dtype):
    from hscompile.ops.quant import dequantize, dequantize_rows, quantize, quantize_rows

    x = torch.randn(rows, 2, 3, 17, generator=torch.Generator().manual_seed(rows)).to(dtype)  # odd widths
    packed = quantize_rows(x, 17)  # the scales start unaligned in each row
    assert packed.dtype == torch.uint8 and packed.shape == (rows, 2 * 3 * 17 + 2 * 3 * dtype.itemsize)
    back = dequantize_rows(packed, (2, 3, 17), 17, dtype)
    # The same round trip as a weight's, group by group: one formula for both.
    assert torch.equal(back, dequantize(quantize(x, QuantScheme("int8", 17))))
