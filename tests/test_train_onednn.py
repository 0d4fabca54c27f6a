"""fp32 CPU matmuls on oneDNN (phiforge/train/onednn.py): the same numbers as torch's, gradients included."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import tiny_config

from phiforge.errors import ConfigError
from phiforge.model import Phi
from phiforge.train import onednn
from phiforge.train.config import TrainConfig, from_dict
from phiforge.train.parallel import CausalLMLoss, Dist, prepare_model

pytestmark = pytest.mark.skipif(not onednn.available(), reason="torch built without oneDNN")


@pytest.mark.parametrize("shape,k,n,bias", [((6, 40), 40, 24, True), ((3, 5, 16), 16, 48, True),
                                             ((2, 7, 48), 48, 16, False)])
def test_onednn_linear_matches_float64(shape, k, n, bias):
    """Forward and all three gradients, for K < N and K > N (grad_weight's two orders) and 3-d inputs."""
    g = torch.Generator().manual_seed(k * n)
    x = torch.randn(*shape, generator=g, requires_grad=True)
    w = torch.randn(n, k, generator=g, requires_grad=True)
    b = torch.randn(n, generator=g, requires_grad=True) if bias else None
    gy = torch.randn(*shape[:-1], n, generator=g)
    y = onednn.OneDNNLinear.apply(x, w, b)
    y.backward(gy)
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    bd = b.detach().double().requires_grad_() if bias else None
    ref = torch.nn.functional.linear(xd, wd, bd)
    ref.backward(gy.double())
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.double(), ref, **tol)
    torch.testing.assert_close(x.grad.double(), xd.grad, **tol)
    torch.testing.assert_close(w.grad.double(), wd.grad, **tol)
    if bias:
        torch.testing.assert_close(b.grad.double(), bd.grad, **tol)


def test_swapped_linears_fall_back_outside_cpu_fp32():
    lin = nn.Linear(8, 4)
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = lin(x)
    assert onednn.use_onednn_linears(nn.Sequential(lin, nn.ReLU())) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        swapped = lin(x)
    assert swapped.dtype == torch.bfloat16 and torch.equal(swapped, plain)  # autocast: F.linear as before
    torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
    assert lin.double()(x.double()).dtype == torch.float64  # fp64 goes to torch


def _step(cpu_matmul: str):
    torch.manual_seed(0)
    model = prepare_model(CausalLMLoss(Phi(tiny_config())), TrainConfig(max_steps=1, cpu_matmul=cpu_matmul), Dist())
    ids = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(1))
    loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    return model, loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_prepare_model_uses_onednn_on_cpu_and_trains_the_same():
    fast, loss, grads = _step("auto")
    plain, loss_t, grads_t = _step("torch")
    assert fast.onednn and not plain.onednn
    torch.testing.assert_close(loss, loss_t, rtol=1e-5, atol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_t[name], rtol=1e-4, atol=1e-6, msg=name)


def test_cpu_matmul_setting_is_checked():
    with pytest.raises(ConfigError, match="cpu_matmul"):
        from_dict({"cpu_matmul": "mkl", "max_steps": 1}).validate()
