import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# The three code paths of Lamb and Lars: the single-tensor reference, the multi-tensor path, and the
# default (the fused kernel where it can be built).
PATHS = [dict(foreach=False), dict(foreach=True, fused=False), dict()]
PATH_IDS = ["reference", "foreach", "default"]


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


def assert_compiled_step_matches_eager(cls, kw, steps=4):
    """``cls(params, **kw).step()`` compiled as ONE graph (``fullgraph=True``: no graph break, no
    host sync) gives the parameters of the eager step on a small MLP, over ``steps`` steps."""
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    twin = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    twin.load_state_dict(model.state_dict())
    opt, opt_twin = cls(model.parameters(), **kw), cls(twin.parameters(), **kw)

    @torch.compile(fullgraph=True)
    def compiled_step():
        opt.step()

    for _ in range(steps):
        xb, yb = torch.randn(32, 8), torch.randn(32, 1)
        for m in (model, twin):
            m.zero_grad()
            torch.nn.functional.mse_loss(m(xb), yb).backward()
        compiled_step()
        opt_twin.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)  # the update, with update_in_grad
