import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def clone_params(params, requires_grad=True):
    return [p.detach().clone().requires_grad_(requires_grad) for p in params]


def set_grads(params_lists, grads):
    for params in params_lists:
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()


def assert_same(a, b, rtol=0.0, atol=0.0):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


def assert_states_equal(opt_a, params_a, opt_b, params_b, rtol=0.0, atol=0.0):
    for pa, pb in zip(params_a, params_b):
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=rtol, atol=atol, msg=lambda m: f"state {k!r}: {m}")
