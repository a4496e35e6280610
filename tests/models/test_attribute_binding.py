"""``bind_attributes``: the same module, found without ``nn.Module.__getattr__``."""

from __future__ import annotations

import torch
from torch import nn

from rillet.models.attribute_binding import bind_attributes


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4, bias=False))


def test_bound_attributes_are_the_registered_objects_and_results_do_not_change() -> None:
    model = _model()
    x = torch.randn(3, 8)
    before = model(x)
    bind_attributes(model)
    first = model[0]
    assert isinstance(first, nn.Linear)
    assert vars(first)["weight"] is first._parameters["weight"]
    assert vars(model[2])["bias"] is None
    assert vars(model)["0"] is first
    assert torch.equal(model(x), before)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in _model().named_parameters()]


def test_a_later_assignment_still_wins() -> None:
    model = _model()
    bind_attributes(model)
    first = model[0]
    assert isinstance(first, nn.Linear)
    zeros = nn.Parameter(torch.zeros(8, 8))
    first.weight = zeros
    assert first.weight is zeros
    assert first._parameters["weight"] is zeros
    assert torch.equal(first(torch.ones(1, 8)), first.bias.detach()[None])
