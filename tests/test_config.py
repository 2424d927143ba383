import pytest

import ouromamba_fx as of
from ouromamba_fx.config import ActQuant, QuantConfig, WeightQuant, preset


@pytest.mark.parametrize("make,msg", [
    (lambda: ActQuant(bits=1), "bits must be in 2..8"),
    (lambda: ActQuant(granularity="per_channel"), "ActQuant.granularity"),
    (lambda: WeightQuant(method="gptq"), "WeightQuant.method"),
    (lambda: WeightQuant(min_ratio=0), "min_ratio"),
    (lambda: QuantConfig(roles=("in_proj", "norm")), r"unknown \['norm'\]"),
    (lambda: QuantConfig(scan_inputs=("h",)), "scan_inputs"),
    (lambda: QuantConfig(overrides={"layers.0.*": {"bits": 4}}), "overrides"),
    (lambda: QuantConfig(overrides={"*": {"act_bits": 9}}), "act_bits"),
    (lambda: QuantConfig(role_overrides={"norm": {"act_bits": 8}}), r"role_overrides: unknown roles \['norm'\]"),
    (lambda: QuantConfig(role_overrides={"mlp": {"act_bits": 1}}), r"role_overrides\['mlp'\]\.act_bits"),
    (lambda: QuantConfig(role_overrides={"mlp": {"skip": True}}), "leave 'mlp' out of QuantConfig.roles"),
    (lambda: QuantConfig(role_overrides=[("mlp", {"act_bits": 8})]), "role_overrides: expected a dict"),
])
def test_invalid_configs_are_rejected_with_the_field_named(make, msg):
    with pytest.raises(ValueError, match=msg):
        make()


def test_presets():
    assert (of.W8A8.weight.bits, of.W8A8.act.bits) == (8, 8)
    assert (of.W4A8.weight.bits, of.W4A8.act.bits) == (4, 8)
    assert (of.W6A6.weight.bits, of.W6A6.act.bits) == (6, 6)
    assert of.W4A4O8.act.bits == 4 and of.W4A4O8.outliers.bits == 8 and of.W4A8.outliers.bits == 16
    assert of.W8A8_RTN.act.granularity == "per_tensor" and "scan" not in of.W8A8_RTN.roles
    assert preset("W8A8") is of.W8A8
    with pytest.raises(KeyError, match="known: W8A8"):
        preset("W3A3")


def test_overrides_by_pattern_later_wins():
    cfg = of.W8A8.replace(overrides={"layers.*.mixer.out_proj": {"act_bits": 16},
                                     "layers.7.*": {"weight_bits": 4, "act_bits": 6},
                                     "layers.0.mixer.scan_b": {"skip": True}})
    act, w, skip = cfg.for_module("layers.7.mixer.out_proj")
    assert (act.bits, w.bits, skip) == (6, 4, False)
    act, w, skip = cfg.for_module("layers.3.mixer.out_proj")
    assert act.is_float and w.bits == 8
    assert cfg.for_module("layers.0.mixer.scan_b")[2] is True
    assert cfg.for_module("layers.0.mixer.scan")[2] is False


def test_role_overrides_apply_by_role_and_module_patterns_win():
    cfg = of.W4A8.replace(role_overrides={"conv2d": {"act_bits": 8, "weight_bits": 8}, "mlp": {"act_bits": 6}},
                          overrides={"levels.0.*": {"act_bits": 16}})
    act, w, skip = cfg.for_module("levels.1.blocks.0.conv1", "conv2d")
    assert (act.bits, w.bits, skip) == (8, 8, False)
    assert cfg.for_module("levels.1.blocks.0.conv1")[0].bits == 8  # no role given: the defaults
    assert cfg.for_module("levels.1.blocks.0.conv1")[1].bits == 4
    assert cfg.for_module("levels.0.blocks.0.conv1", "conv2d")[0].is_float  # the module pattern wins
    assert cfg.for_module("levels.2.blocks.0.mlp.fc1", "mlp")[0].bits == 6
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("name", sorted(of.PRESETS))
def test_presets_round_trip_through_plain_data(name):
    """to_dict gives plain data (role names as str, not Role members) that from_dict takes back."""
    cfg = of.PRESETS[name]
    d = cfg.to_dict()
    assert all(type(r) is str for r in d["roles"])
    assert of.QuantConfig.from_dict(d) == cfg
    assert of.QuantConfig(roles=(of.tags.Role.MLP, "attn")).roles == ("mlp", "attn")
