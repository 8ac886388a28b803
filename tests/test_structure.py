"""lccompress.structure: channel groups and physical shrinking, checked against independent truth.

For every model: the groups found are compared with the groups written out by hand, and for random
kept sets the shrunk model must compute what a copy with the removed channels' producers zeroed
computes (atol 1e-5), have exactly the parameter count of a hand-written formula, never group the
logits layer, and export to ONNX and run in onnxruntime with the same output."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lccompress.errors import ConfigError
from lccompress.structure import ChannelGroup, Slice, channel_groups, shrink

torch.set_num_threads(1)


# --- models --------------------------------------------------------------------------------------

class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 300), nn.Linear(300, 100), nn.Linear(100, 10)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(F.relu(self.fc1(x)))))


class LeNet(nn.Module):
    def __init__(self, hard_coded_view: bool = False):
        super().__init__()
        self.hard = hard_coded_view
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 5, padding=2), nn.Conv2d(6, 16, 5)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc1, self.fc2, self.fc3 = nn.Linear(16 * 5 * 5, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(self.act(self.conv1(x)))
        x = F.avg_pool2d(F.relu(self.conv2(x)), 2)
        x = x.view(-1, 16 * 5 * 5) if self.hard else x.view(x.size(0), -1)
        return self.fc3(F.gelu(self.fc2(torch.tanh(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv_b, self.bn_b = nn.Conv2d(cout, cout, 3, 1, 1, bias=stride > 1), nn.BatchNorm2d(cout)
        self.short = None
        if stride > 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn_a(self.conv_a(x)))
        y = self.bn_b(self.conv_b(y))
        return F.relu(y + (x if self.short is None else self.short(x)))


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.b1, self.b2, self.b3 = Block(8, 8), Block(8, 8), Block(8, 16, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        x = self.b3(self.b2(self.b1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.c = nn.Conv2d(10, 8, 3, padding=1)
        self.fc = nn.Linear(18 * 4 * 4, 10)

    def forward(self, x):
        y = F.relu(self.bn(torch.cat([self.a(x), self.b(x)], dim=1)))
        z = torch.cat((y, F.leaky_relu(self.c(y), 0.1)), 1)
        return self.fc(F.max_pool2d(z, 2).flatten(1))


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.dw, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8)
        self.pw, self.bn3 = nn.Conv2d(8, 12, 1), nn.BatchNorm2d(12)
        self.dw2, self.bn4 = nn.Conv2d(12, 24, 3, padding=1, groups=12), nn.BatchNorm2d(24)  # multiplier 2
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu6(self.bn2(self.dw(x)))
        x = F.silu(self.bn3(self.pw(x)))
        x = F.hardtanh(self.bn4(self.dw2(x)))
        return self.fc(x.mean((2, 3)))


class SigmoidNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        x = torch.sigmoid(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(nn.functional.dropout(x, 0.2, self.training).flatten(1))


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Non-default BatchNorm statistics and affine parameters, then eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.randn(m.num_features, generator=g))
                    m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


# Each case: model, input shape, logits layer, the groups by hand as {key producer: (channels,
# all producer modules)}, and the parameter count as a formula of the kept counts by key.
CASES = {
    "mlp": (MLP, (4, 64), "fc3", {
        "fc1": (300, {"fc1"}), "fc2": (100, {"fc2"}),
    }, lambda k: 64 * k["fc1"] + k["fc1"] + k["fc1"] * k["fc2"] + k["fc2"] + k["fc2"] * 10 + 10),
    "lenet": (LeNet, (2, 1, 28, 28), "fc3", {
        "conv1": (6, {"conv1"}), "conv2": (16, {"conv2"}), "fc1": (120, {"fc1"}), "fc2": (84, {"fc2"}),
    }, lambda k: 25 * k["conv1"] + k["conv1"] + k["conv1"] * 25 * k["conv2"] + k["conv2"]
        + k["conv2"] * 25 * k["fc1"] + k["fc1"] + k["fc1"] * k["fc2"] + k["fc2"] + k["fc2"] * 10 + 10),
    "resnet": (ResNet, (2, 3, 8, 8), "fc", {
        "stem": (8, {"stem", "stem_bn", "b1.conv_b", "b1.bn_b", "b2.conv_b", "b2.bn_b"}),
        "b1.conv_a": (8, {"b1.conv_a", "b1.bn_a"}),
        "b2.conv_a": (8, {"b2.conv_a", "b2.bn_a"}),
        "b3.conv_a": (16, {"b3.conv_a", "b3.bn_a"}),
        "b3.conv_b": (16, {"b3.conv_b", "b3.bn_b", "b3.short.0", "b3.short.1"}),
    }, lambda k: 27 * k["stem"] + 2 * k["stem"]
        + 2 * (k["stem"] * 9 * k["b1.conv_a"] + 2 * k["b1.conv_a"] + k["b1.conv_a"] * 9 * k["stem"] + 2 * k["stem"])
        + k["stem"] * 9 * k["b3.conv_a"] + 2 * k["b3.conv_a"]
        + k["b3.conv_a"] * 9 * k["b3.conv_b"] + k["b3.conv_b"] + 2 * k["b3.conv_b"]
        + k["stem"] * k["b3.conv_b"] + 2 * k["b3.conv_b"] + k["b3.conv_b"] * 10 + 10),
    "concat": (Concat, (2, 3, 8, 8), "fc", {
        "a": (4, {"a", "bn"}), "b": (6, {"b", "bn"}), "c": (8, {"c"}),
    }, lambda k: 28 * k["a"] + 28 * k["b"] + 2 * (k["a"] + k["b"]) + (k["a"] + k["b"]) * 9 * k["c"] + k["c"]
        + (k["a"] + k["b"] + k["c"]) * 16 * 10 + 10),
    "depthwise": (Depthwise, (2, 3, 8, 8), "fc", {
        "conv1": (8, {"conv1", "bn1", "dw", "bn2"}), "pw": (12, {"pw", "bn3", "dw2", "bn4"}),
    }, lambda k: 28 * k["conv1"] + 2 * k["conv1"] + 9 * k["conv1"] + 2 * k["conv1"]
        + k["conv1"] * k["pw"] + k["pw"] + 2 * k["pw"] + 2 * k["pw"] * 10 + 4 * k["pw"] + 2 * k["pw"] * 10 + 10),
    "sigmoid": (SigmoidNet, (2, 3, 8, 8), "fc", {
        "conv2": (8, {"conv2"}),
    }, lambda k: 27 * 6 + 6 + 6 * 9 * k["conv2"] + k["conv2"] + k["conv2"] * 16 * 10 + 10),
}


def producer_modules(g: ChannelGroup) -> set[str]:
    return {s.name.rpartition(".")[0] for s in g.producers}


def by_key(groups, expected):
    """{key: group} where the group's producers are exactly the hand-written set for key."""
    out = {}
    for g in groups:
        keys = [k for k, (_, mods) in expected.items() if producer_modules(g) == mods]
        assert len(keys) == 1, f"unexpected group {sorted(producer_modules(g))}"
        out[keys[0]] = g
    return out


def zero_removed(model, groups, kept):
    """A copy with every producer slice of the removed channels zeroed (the invariant's premise)."""
    z = copy.deepcopy(model)
    params = dict(z.named_parameters())
    with torch.no_grad():
        for g, k in zip(groups, kept):
            removed = sorted(set(range(g.channels)) - set(k.tolist()))
            for s in g.producers:
                for c in removed:
                    params[s.name].narrow(s.dim, s.offset + c * s.per, s.per).zero_()
    return z


def onnx_output(model, x):
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), f, dynamo=False)
    import onnxruntime as ort

    sess = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


def nparams(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("case", list(CASES))
def test_shrink_matches_zeroed_copy(case):
    make, shape, logits, expected, formula = CASES[case]
    torch.manual_seed(0)
    model = randomize(make(), 1)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    groups, notes = channel_groups(model, (x,))
    found = by_key(groups, expected)
    assert {k: g.channels for k, g in found.items()} == {k: c for k, (c, _) in expected.items()}
    # the logits are never grouped, and the reason is listed
    assert all(s.name.rpartition(".")[0] != logits for g in groups for s in g.producers)
    assert any(note.startswith(logits) and "model output" in note and "\n" not in note for note in notes)
    assert model.training is False and channel_groups(model, (x,)) == (groups, notes)  # deterministic

    gen = torch.Generator().manual_seed(3)
    for trial in range(2):
        kept = []
        for g in groups:
            n = 1 if trial == 0 else int(torch.randint(1, g.channels + 1, (1,), generator=gen))
            kept.append(torch.randperm(g.channels, generator=gen)[:n].sort().values)
        small = shrink(model, groups, kept)
        zeroed = zero_removed(model, groups, kept)
        with torch.no_grad():
            y_small, y_zero, y_full = small(x), zeroed(x), model(x)
        torch.testing.assert_close(y_small, y_zero, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(y_full, y_zero, atol=1e-4)  # the removed channels mattered
        counts = {k: len(kept[groups.index(g)]) for k, g in found.items()}
        assert nparams(small) == formula(counts)
        assert nparams(model) == formula({k: c for k, (c, _) in expected.items()})
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # input unchanged
        # a second analysis of the shrunk model sees the kept sizes (a depthwise conv left with one
        # channel is an ordinary conv, so its groups split)
        if case != "depthwise" or min(counts.values()) > 1:
            again = by_key(channel_groups(small, (x,))[0], expected)
            assert {k: g.channels for k, g in again.items()} == counts
        torch.testing.assert_close(onnx_output(small, x), y_small, atol=1e-5, rtol=1e-4)


def test_group_details():
    """Slices written out by hand for the concat / flatten / depthwise cases."""
    torch.manual_seed(0)
    groups, _ = channel_groups(randomize(Concat(), 0), (torch.randn(1, 3, 8, 8),))
    g = {next(iter(producer_modules(g) - {"bn"})): g for g in groups}
    assert g["b"].producers == (Slice("b.weight", 0), Slice("b.bias", 0), Slice("bn.weight", 0, 1, 4),
                                Slice("bn.bias", 0, 1, 4))
    assert g["b"].buffers == (Slice("bn.running_mean", 0, 1, 4), Slice("bn.running_var", 0, 1, 4))
    assert set(g["b"].consumers) == {Slice("c.weight", 1, 1, 4), Slice("fc.weight", 1, 16, 64)}
    assert g["c"].consumers == (Slice("fc.weight", 1, 16, 160),)

    groups, _ = channel_groups(randomize(Depthwise(), 0), (torch.randn(1, 3, 8, 8),))
    pw = next(g for g in groups if "pw" in producer_modules(g))
    assert Slice("dw2.weight", 0, 2, 0) in pw.producers and Slice("bn4.weight", 0, 2, 0) in pw.producers
    assert pw.consumers == (Slice("fc.weight", 1, 2, 0),)
    small = shrink(randomize(Depthwise(), 0), groups, [torch.tensor([1, 5]), torch.tensor([0, 3, 11])])
    assert (small.dw.in_channels, small.dw.out_channels, small.dw.groups) == (2, 2, 2)
    assert (small.dw2.in_channels, small.dw2.out_channels, small.dw2.groups) == (3, 6, 3)
    assert (small.pw.in_channels, small.pw.out_channels, small.bn4.num_features, small.fc.in_features) == (2, 3, 6, 6)

    groups, _ = channel_groups(LeNet(), (torch.randn(1, 1, 28, 28),))
    conv2 = next(g for g in groups if producer_modules(g) == {"conv2"})
    assert conv2.consumers == (Slice("fc1.weight", 1, 25, 0),)


# --- not prunable, or refused --------------------------------------------------------------------

class Permuted(MLP):
    def forward(self, x):
        h = F.relu(self.fc1(x))
        return self.fc3(F.relu(self.fc2(h[:, torch.arange(299, -1, -1)])))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.c3(F.relu(self.c2(F.relu(self.c1(x))))).amax((-1, -2)))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))

    def forward(self, x):
        a = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2), dim=-1)
        return self.o(torch.matmul(a, self.v(x)))


class Quirks(nn.Module):
    """One channel group for each thing that must stop pruning."""

    def __init__(self):
        super().__init__()
        self.plus_one, self.bn_plain, self.no_affine = nn.Linear(6, 5), nn.Linear(6, 5), nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5, affine=False)
        self.shared = nn.Linear(5, 5)
        self.norm, self.ln = nn.Linear(6, 5), nn.LayerNorm(5)
        self.ok = nn.Linear(6, 5)
        self.head = nn.Linear(25, 3)

    def forward(self, x):
        a = self.plus_one(x) + 1.0
        b = self.bn(self.no_affine(x))
        c = self.shared(self.shared(F.relu(self.bn_plain(x))))
        d = self.ln(self.norm(x))
        e = F.relu(self.ok(x))
        return self.head(torch.cat([a, b, c, d, e], 1)) + e.size(0)


def test_unsupported_channels_are_listed():
    groups, notes = channel_groups(LeNet(hard_coded_view=True), (torch.randn(2, 1, 28, 28),))
    assert {frozenset(producer_modules(g)) for g in groups} == {frozenset({"conv1"}), frozenset({"fc1"}),
                                                                frozenset({"fc2"})}
    assert any(n.startswith("conv2 (16 channels)") and "hard-coded" in n for n in notes)

    groups, notes = channel_groups(Permuted(), (torch.randn(3, 64),))
    assert [producer_modules(g) for g in groups] == [{"fc2"}]
    assert any(n.startswith("fc1 (300 channels)") and "getitem" in n for n in notes)

    groups, notes = channel_groups(Grouped(), (torch.randn(1, 3, 9, 9),))
    assert [producer_modules(g) for g in groups] == [{"c3"}]
    assert sum("grouped convolution (groups=2)" in n for n in notes) == 2

    groups, notes = channel_groups(Attention(), (torch.randn(2, 5, 8),))
    assert groups == [] and len(notes) == 4

    groups, notes = channel_groups(Quirks(), (torch.randn(4, 6),))
    assert [producer_modules(g) for g in groups] == [{"ok"}]
    text = "\n".join(notes)
    for why in ("is added to values outside the group", "BatchNorm without affine", "shared is called 2 times",
                "LayerNorm", "model output"):
        assert why in text
    assert all("\n" not in n for n in notes)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return x


def one_line_config_error(fn, *args, match):
    with pytest.raises(ConfigError, match=match) as e:
        fn(*args)
    assert "\n" not in str(e.value)


def test_refused_models():
    one_line_config_error(channel_groups, Branchy(), (torch.randn(2, 4),), match="cannot trace Branchy")
    one_line_config_error(channel_groups, MLP(), (torch.randn(2, 65),), match="does not run through MLP")
    one_line_config_error(channel_groups, MLP(), ([1.0] * 64,), match="tuple of tensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(MLP())
    one_line_config_error(channel_groups, scripted, (torch.randn(2, 64),), match="TorchScript")


def test_kept_sets_are_checked():
    model = MLP()
    groups, _ = channel_groups(model, (torch.randn(2, 64),))
    ok = [torch.arange(10), torch.arange(5)]
    shrink(model, groups, ok)
    bad = {
        "kept sets for 2": [torch.arange(10)],
        "outside 0..99": [torch.arange(10), torch.tensor([3, 100])],
        "outside 0..299": [torch.tensor([-1, 2]), torch.arange(5)],
        "sorted ascending": [torch.tensor([4, 2]), torch.arange(5)],
        "without repeats": [torch.tensor([2, 2]), torch.arange(5)],
        "empty": [torch.arange(10), torch.zeros(0, dtype=torch.long)],
        "integer tensor": [torch.arange(10.0), torch.arange(5)],
        "more than the group": [torch.arange(10), torch.arange(101)],
    }
    for match, kept in bad.items():
        one_line_config_error(shrink, model, groups, kept, match=match)
    # a group that does not belong to the model
    alien = ChannelGroup(300, (Slice("nope.weight", 0),), (), (), ("nope",))
    one_line_config_error(shrink, model, [alien], [torch.arange(3)], match="nope.weight is not a parameter")
    twice = groups[0]
    one_line_config_error(shrink, model, [twice, twice], [torch.arange(3), torch.arange(3)], match="overlaps")


class Hidden(nn.Module):
    """Channels used in ways a module-level view misses: a tied weight, a weight read directly,
    pooling along the channel axis, a forward hook."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 6)
        self.b.weight = nn.Parameter(torch.randn(6, 6))
        self.tied = nn.Linear(6, 6)
        self.tied.weight = self.b.weight
        self.direct, self.pooled, self.hooked = nn.Linear(4, 5), nn.Linear(4, 5), nn.Linear(4, 5)
        self.pool = nn.AvgPool1d(3, 1, 1)
        self.hooked.register_forward_hook(lambda m, i, o: o * 2)
        self.ok = nn.Linear(4, 5)
        self.head = nn.Linear(6 + 5 + 5 + 5 + 5, 2)

    def forward(self, x):
        t = self.tied(F.relu(self.b(F.relu(self.a(x)))))
        d = F.relu(self.direct(x)) + x @ self.direct.weight.T * 0
        p = self.pool(F.relu(self.pooled(x)))
        h = F.relu(self.hooked(x))
        return self.head(torch.cat([t, d, p, h, F.relu(self.ok(x))], -1))


def test_hidden_uses_stop_pruning():
    model = Hidden().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups, notes = channel_groups(model, (torch.randn(3, 4),))
    assert [producer_modules(g) for g in groups] == [{"ok"}]
    text = "\n".join(notes)
    for why in ("b.weight is shared with tied.weight", "direct.weight is used directly", "pool (AvgPool1d) works "
                "along the channel axis", "hooked (Linear) has forward hooks"):
        assert why in text
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_train_mode_is_restored_and_statistics_untouched():
    model = ResNet().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    channel_groups(model, (torch.randn(1, 3, 8, 8),))  # batch 1 would fail BatchNorm in train mode
    assert all(m.training for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
