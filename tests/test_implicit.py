"""lccompress.implicit: the equilibrium network, checked against independent truth.

The forward must equal 1,000 plain Picard steps in float64; the implicit gradients must equal
those of an explicitly unrolled float64 network (and pass gradcheck); a divergent A must raise the
clear error; the ONNX graph must run in onnxruntime with the torch output at two batch sizes;
project_ must equal a bisection-found soft threshold; and Adam on the backward must lower a loss."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from lccompress.errors import ConfigError
from lccompress.implicit import ImplicitNet

torch.set_num_threads(1)


def net(p=5, n=8, q=3, *, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    return ImplicitNet(p, n, q, **kw).to(dtype)


def unrolled(m, u, steps):
    """The same network with the fixed point replaced by `steps` Picard steps, differentiated by autograd."""
    u = u.flatten(1)
    x = torch.zeros(u.shape[0], m.state, dtype=u.dtype)
    for _ in range(steps):
        x = torch.relu(x @ m.A.T + u @ m.B.T)
    return x @ m.C.T + u @ m.D.T + m.bias


@pytest.mark.parametrize("tol, atol", [(1e-6, 2e-6), (1e-12, 1e-11)])
def test_forward_is_the_fixed_point(tol, atol):
    m = net(tol=tol)
    u = torch.randn(6, 5, dtype=torch.float64)
    x = torch.zeros(6, 8, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(1000):
            x = torch.relu(x @ m.A.T + u @ m.B.T)
        truth = x @ m.C.T + u @ m.D.T + m.bias
        # stopping at step size ≤ tol·(1 + max|x|) leaves an error ≤ that·‖A‖∞/(1 − ‖A‖∞)
        torch.testing.assert_close(m(u), truth, atol=atol, rtol=0)
    assert m.residual(u) <= 1e-6
    assert abs(m.well_posedness() - m.A.abs().sum(1).max().item()) < 1e-12
    assert m.well_posedness() == pytest.approx(0.5)
    # extra input dims are flattened after the batch dim
    m4 = net(p=12)
    u4 = torch.randn(2, 3, 4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(m4(u4), m4(u4.reshape(2, 12)))


def test_gradients_equal_unrolled_network():
    m = net()
    g = torch.Generator().manual_seed(1)
    u = torch.randn(4, 5, dtype=torch.float64, generator=g)
    w = torch.randn(4, 3, dtype=torch.float64, generator=g)  # a generic linear loss

    def grads(fn):
        ui = u.clone().requires_grad_()
        m.zero_grad()
        (fn(ui) * w).sum().backward()
        return [t.grad.clone() for t in (m.A, m.B, m.C, m.D, m.bias, ui)]

    implicit, explicit = grads(m), grads(lambda ui: unrolled(m, ui, 200))
    for name, a, b in zip(("A", "B", "C", "D", "bias", "u"), implicit, explicit):
        assert (a - b).norm() <= 1e-6 * b.norm(), name
    assert implicit[0].abs().sum() > 0  # A really gets a gradient


def test_gradcheck_tiny():
    m = net(p=3, n=4, q=2, tol=1e-13, max_iter=1000)
    u = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u, A, B: torch.func.functional_call(m, {"A": A, "B": B}, (u,)),
                                    (u, m.A.detach().clone().requires_grad_(), m.B.detach().clone().requires_grad_()))


def test_divergent_A_raises_clear_error():
    m = net(p=3, n=4, q=2, dtype=torch.float32)
    with torch.no_grad():
        m.A.copy_(1.5 * torch.eye(4))
        m.B.copy_(torch.ones(4, 3))
    u = torch.rand(5, 3) + 0.1  # positive: x_k grows like 1.5^k
    with pytest.raises(ConfigError, match=r"did not converge in 300 iterations \(‖A‖∞ = 1\.5 ≥ 1: not well-posed"):
        m(u)
    assert m.well_posedness() == pytest.approx(1.5)


def test_adjoint_cap_raises_clear_error():
    m = net(p=3, n=4, q=2)
    with torch.no_grad():
        m.A.copy_(0.9 * torch.eye(4))  # both iterations contract at rate 0.9
        m.B.copy_(torch.ones(4, 3))
    u = torch.rand(2, 3, dtype=torch.float64) + 0.1
    y = m(u)  # the forward converges within 300 steps
    m.max_iter = 20  # the backward reads the cap when it runs: 0.9^20 is too slow
    with pytest.raises(ConfigError, match=r"adjoint \(backward\) fixed point did not converge in 20 iterations "
                                          r"\(‖A‖∞ = 0\.9 < 1 .*raise max_iter"):
        y.sum().backward()


def test_onnx_matches_torch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    m = net(p=6, n=10, q=4, dtype=torch.float32).eval()
    path = tmp_path / "implicit.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (torch.randn(2, 6),), str(path), dynamo=False, opset_version=18,
                          input_names=["u"], output_names=["y"], dynamic_axes={"u": {0: "batch"}, "y": {0: "batch"}})
    import onnx

    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert not ops & {"Loop", "If", "Scan"}, ops  # a static graph
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (3, 17):
        u = torch.randn(batch, 6)
        with torch.no_grad():
            want = m(u)
        got = torch.from_numpy(sess.run(None, {"u": u.numpy()})[0])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_project_is_l1_ball_projection():
    m = net(n=6)
    with torch.no_grad():
        m.A.copy_(torch.randn(6, 6, dtype=torch.float64))
        m.A[0] = 0.01  # inside the ball: unchanged
    before = m.A.detach().clone()
    m.project_(0.9)
    for i in range(6):
        v = before[i]
        if v.abs().sum() <= 0.9:
            torch.testing.assert_close(m.A[i].detach(), v)
            continue
        lo, hi = 0.0, float(v.abs().max())  # soft threshold θ with Σ max(|v|-θ, 0) = 0.9, by bisection
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if (v.abs() - mid).clamp_min(0).sum() > 0.9 else (lo, mid)
        torch.testing.assert_close(m.A[i].detach(), v.sign() * (v.abs() - lo).clamp_min(0), atol=1e-12, rtol=0)
    assert m.well_posedness() <= 0.9 + 1e-12


def test_training_lowers_loss():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(128, 4, generator=g)
    y = (X[:, 0] * X[:, 1] > 0).long() + (X[:, 2] > 0.5).long()  # nonlinear, 3 classes
    m = net(p=4, n=16, q=3, dtype=torch.float32)
    opt = torch.optim.Adam(m.parameters(), lr=2e-2)
    with torch.no_grad():
        first = F.cross_entropy(m(X), y).item()
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(m(X), y).backward()
        opt.step()
        m.project_(0.95)
    with torch.no_grad():
        last = F.cross_entropy(m(X), y).item()
    assert last < 0.8 * first, (first, last)
    assert m.well_posedness() <= 0.95 + 1e-6


def test_a_fixed_point_that_stops_converging_in_training_is_handled_by_the_nan_guard():
    """A training chunk in which the implicit layer's state stops converging (an L step pushed
    ‖A‖∞ past 1) is rolled back and retried at half the learning rate, like non-finite values."""
    from lccompress.errors import DivergenceError, NotConverged
    from lccompress.train import Guard, OptStepper, train_loop

    torch.manual_seed(0)
    net = ImplicitNet(6, 8, 3)
    X = torch.randn(64, 6)
    y = torch.randint(0, 3, (64,))
    loader = [(X[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    calls = {"n": 0}

    def objective(x, t):  # the second batch fails once, as a non-converging forward would
        calls["n"] += 1
        if calls["n"] == 2:
            raise NotConverged("the implicit layer's fixed point did not converge")
        loss = torch.nn.functional.cross_entropy(x(net), t)
        return loss, loss

    start = {k: v.clone() for k, v in net.state_dict().items()}
    guard = Guard()
    stepper = OptStepper([(list(net.parameters()), 0.01)], optimizer="sgd")
    train_loop(objective, loader, stepper, iterations=4, device=torch.device("cpu"), guard=guard, chunk=4)
    assert guard.failures == 1 and guard.scale == 0.5
    # the chunk restarted from the saved weights: a clean run at half the rate on the batches that
    # came after the failure gives the same weights
    again = ImplicitNet(6, 8, 3)
    again.load_state_dict(start)
    opt = OptStepper([(list(again.parameters()), 0.005)], optimizer="sgd")
    rest = loader[2:] + loader
    for x, t in rest[:4]:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(again(x), t).backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))

    # weights pushed out of the well-posed region at every rate: DivergenceError, one line
    with torch.no_grad():
        net.A.copy_(torch.eye(8) * 0.99)
    stepper = OptStepper([(list(net.parameters()), 50.0)], optimizer="sgd", momentum=0.0)
    with pytest.raises(DivergenceError):
        train_loop(lambda x, t: _push(net, x), loader, stepper, iterations=40, device=torch.device("cpu"),
                   guard=Guard(), chunk=4)


def _push(net, x):
    """A loss that rewards a larger A: its steps take ‖A‖∞ past 1 and the forward stops converging."""
    loss = -net.A.diagonal().sum() * 10 + 0 * x(net).sum()
    return loss, loss
