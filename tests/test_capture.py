from collections import Counter

import pytest
import torch
import torch.nn as nn

from ouromamba_fx import capture
from ouromamba_fx.capture import SCAN_OP, scan_nodes
from ouromamba_fx.tags import ROLES, tag
from ouromamba_fx.errors import CaptureError
from ouromamba_fx.models import MambaMixer


def test_reference_graph_has_one_scan_node_per_direction_and_layer(reference):
    gm = capture(reference)
    gm.graph.lint()
    scans = scan_nodes(gm)
    assert len(scans) == 2 * reference.cfg.depth == 16
    # no unrolled recurrence: no exp/mul chains per time-step, just one op call per scan
    assert sum(1 for n in gm.graph.nodes if n.target is SCAN_OP) == 16
    by_layer = Counter((tag(n)["layer"], tag(n)["direction"]) for n in scans)
    assert by_layer == Counter({(i, d): 1 for i in range(8) for d in ("fwd", "bwd")})


def test_linear_and_conv_stay_modules_with_roles(reference):
    gm = capture(reference)
    tagged = [n for n in gm.graph.nodes if tag(n) is not None]
    roles = Counter(tag(n)["role"] for n in tagged)
    assert roles == {"in_proj": 8, "out_proj": 8, "conv1d": 16, "x_proj": 16, "dt_proj": 16, "scan": 16,
                     "head": 1}  # the classifier is tagged too (not in the default roles)
    assert set(roles) <= set(ROLES)
    for n in tagged:
        t = tag(n)
        if t["role"] in ("scan", "head"):
            continue
        assert n.op == "call_module"
        mod = gm.get_submodule(n.target)
        assert isinstance(mod, nn.Conv1d if t["role"] == "conv1d" else nn.Linear)
        assert n.target.startswith(f"layers.{t['layer']}.mixer.")
        assert n.target.endswith("_b") == (t["direction"] == "bwd")
        assert (t["direction"] is None) == (t["role"] in ("in_proj", "out_proj"))


def test_traced_graph_matches_eager(reference):
    gm = capture(reference, example_inputs=(torch.randn(2, 3, 32, 32),))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), reference(x), rtol=0, atol=0)
    assert all("tensor_meta" in n.meta for n in gm.graph.nodes if n.op == "call_module")


def test_any_model_using_the_mixer_is_captured():
    class Tagger(nn.Module):  # a non-Vim model: two unidirectional mixers and one bidirectional
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(6, 16)
            self.blocks = nn.Sequential(MambaMixer(16, d_state=4, bimamba=False),
                                        MambaMixer(16, d_state=4, bimamba=False),
                                        MambaMixer(16, d_state=4))
            self.out = nn.Linear(16, 3)

        def forward(self, x):
            return self.out(self.blocks(self.embed(x)))

    model = Tagger().eval()
    gm = capture(model)
    scans = scan_nodes(gm)
    assert [(tag(n)["layer"], tag(n)["direction"]) for n in scans] == [(0, "fwd"), (1, "fwd"), (2, "fwd"), (2, "bwd")]
    assert tag(next(n for n in gm.graph.nodes if n.target == "embed")) is None
    x = torch.randn(2, 7, 6)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


class DataDependent(nn.Module):
    def forward(self, x):
        if x.mean() > 0:  # data-dependent control flow: not traceable
            return x * 2
        return x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.mixer = MambaMixer(8, d_state=2)
        self.gate = DataDependent()

    def forward(self, x):
        return self.gate(self.mixer(x))


def test_untraceable_module_is_named_with_operation_and_fix():
    with pytest.raises(CaptureError) as info:
        capture(Net())
    msg = str(info.value)
    assert "'gate' (DataDependent)" in msg
    assert "control flow" in msg
    assert "x.mean() > 0" in msg  # the offending line
    assert "leaf_modules=['gate']" in msg


def test_leaf_module_makes_it_traceable():
    net = Net().eval()
    gm = capture(net, leaf_modules=["gate"])
    assert any(n.op == "call_module" and n.target == "gate" for n in gm.graph.nodes)
    x = torch.randn(1, 5, 8)
    torch.testing.assert_close(gm(x), net(x), rtol=0, atol=0)
    with pytest.raises(CaptureError, match="not found"):
        capture(net, leaf_modules=["nope"])
