"""The parameter aliases that CUDA graph captures train through (vimdet.modeling.cuda_graphs): new
leaves on the parameters' memory, the same gradients, tied weights kept tied, and the module's own
parameters back afterwards, also after an error. CPU only: no graph is captured here."""

import pytest
import torch
from torch import nn

from vimdet.modeling.cuda_graphs import _leaf_aliases


def tied_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    model[2].weight = model[0].weight  # tied, as embeddings and heads can be
    return model


def test_aliases_share_memory_and_give_the_parameters_gradients():
    model = tied_model()
    params = tuple(model.parameters())
    x = torch.randn(3, 4)
    expected = torch.autograd.grad(model(x).square().sum(), params)
    with _leaf_aliases(model, params) as aliases:
        assert all(a is not p and a.is_leaf for a, p in zip(aliases, params))
        assert all(a.data_ptr() == p.data_ptr() for a, p in zip(aliases, params))
        assert model[2].weight is model[0].weight is aliases[0]  # still tied
        actual = torch.autograd.grad(model(x).square().sum(), aliases)
    for e, a in zip(expected, actual):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    assert tuple(model.parameters()) == params and all(p.grad is None for p in params)


def test_the_parameters_come_back_after_an_error():
    model = tied_model()
    params = tuple(model.parameters())
    with pytest.raises(RuntimeError, match="during the capture"):
        with _leaf_aliases(model, params[:1]):
            assert model[0].weight is not params[0] and model[0].bias is params[1]
            raise RuntimeError("during the capture")
    assert tuple(model.parameters()) == params
