"""Implicit (equilibrium) networks: the state is a fixed point, not the output of a layer stack.

`ImplicitNet` (Négiar, Mahoney, El Ghaoui, Amos, Defazio, "Training sparse high capacity models
with implicit neural networks and Frank-Wolfe") maps an input u (batch, p) to

    x = relu(x Aᵀ + u Bᵀ)          the state x (batch, n), a fixed point
    ŷ = x Cᵀ + u Dᵀ + bias          the output (batch, q)

with A (n, n), B (n, p), C (q, n), D (q, p). relu is 1-Lipschitz, so x ↦ relu(x Aᵀ + u Bᵀ) is a
contraction in the ℓ∞ norm when ‖A‖∞ (the largest row ℓ1 norm) is < 1: the state is then unique
and Picard iteration x_{k+1} = relu(x_k Aᵀ + u Bᵀ) from x_0 = 0 converges to it geometrically,
with rate ‖A‖∞. `project_(kappa)` keeps training inside that region by projecting every row of A
onto the ℓ1 ball of radius kappa.

Forward solves the fixed point under torch.no_grad (stop: max|x_{k+1} − x_k| ≤ tol·(1 + max|x|));
iterates that do not settle within max_iter raise ConfigError naming ‖A‖∞.

Backward is implicit differentiation, the DEQ pattern of Bai, Kolter, Koltun (2019): one step
z = f(x*) = relu(x* Aᵀ + u Bᵀ) is recomputed with grad, so autograd supplies ∂f/∂A, ∂f/∂B, ∂f/∂u
at x*; a hook on z replaces the incoming gradient g by the solution y of the adjoint fixed point

    y = g + Jᵀ y,   J = ∂f/∂x at x*,   Jᵀy = (y ⊙ mask) A,   mask = (x* Aᵀ + u Bᵀ ≥ 0),

i.e. y = (I − Jᵀ)⁻¹ g, solved by the same iteration, tolerance and cap (it contracts in ℓ1 at rate
‖A‖∞). Only first derivatives are supported: the hook is not itself differentiable. At a
pre-activation of exactly 0 the derivative taken is relu'(0) = 1 (an element of relu's
subdifferential [0, 1]; torch's relu takes 0): otherwise a layer whose A and B are all zero, the
start of Frank-Wolfe training from zero (`fw.fw_grow`), would have a zero gradient everywhere.

ONNX export (and torch.jit tracing) takes a static path instead: exactly `export_iterations`
(default 50) unrolled Picard steps from x_0 = 0, no data-dependent control flow. Its error against
the fixed point is at most ‖A‖∞^k·‖x*‖∞ after k steps (0.5^50 ≈ 1e-15 at the initial ‖A‖∞ = 0.5);
raise `export_iterations` to about log(1e-7)/log(‖A‖∞) for an A closer to the boundary.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .errors import ConfigError, NotConverged
from .schemes.wellposed import project_rows


class ImplicitNet(nn.Module):
    """ŷ = x Cᵀ + u Dᵀ + bias with x = relu(x Aᵀ + u Bᵀ); see the module docstring."""

    def __init__(self, in_features: int, state: int, out_features: int, *, tol: float = 1e-6,
                 max_iter: int = 300, bias: bool = True) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("state", state), ("out_features", out_features),
                        ("max_iter", max_iter)):
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"ImplicitNet {name} must be a positive int, got {v!r}")
        if not tol > 0:
            raise ConfigError(f"ImplicitNet tol must be > 0, got {tol!r}")
        self.in_features, self.state, self.out_features = in_features, state, out_features
        self.tol, self.max_iter = float(tol), max_iter
        self.export_iterations = 50  # unrolled Picard steps in the ONNX / tracing path
        self.A = nn.Parameter(torch.empty(state, state))                 # (n, n)
        self.B = nn.Parameter(torch.empty(state, in_features))           # (n, p)
        self.C = nn.Parameter(torch.empty(out_features, state))          # (q, n)
        self.D = nn.Parameter(torch.empty(out_features, in_features))    # (q, p)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None  # (q,)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A random with ‖A‖∞ = 0.5; B, C, D, bias uniform(±1/√fan_in) as in nn.Linear."""
        self.A.normal_()
        self.A.mul_(0.5 / self.A.abs().sum(1).max().clamp_min(1e-12))
        self.B.uniform_(-1 / math.sqrt(self.in_features), 1 / math.sqrt(self.in_features))
        bound = 1 / math.sqrt(self.state + self.in_features)  # C and D read [x, u] together
        for t in (self.C, self.D) + ((self.bias,) if self.bias is not None else ()):
            t.uniform_(-bound, bound)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, state={self.state}, out_features={self.out_features}, "
                f"tol={self.tol}, max_iter={self.max_iter}, bias={self.bias is not None}")

    # --- diagnostics -----------------------------------------------------------------------------

    def well_posedness(self) -> float:
        """‖A‖∞, the largest row ℓ1 norm; < 1 guarantees a unique state and Picard convergence."""
        return float(self.A.detach().abs().sum(1).max())

    @torch.no_grad()
    def project_(self, kappa: float = 0.95) -> None:
        """Project every row of A onto the ℓ1 ball of radius kappa (Euclidean projection, Duchi et al.
        2008), so ‖A‖∞ ≤ kappa afterwards; rows already inside are unchanged."""
        if not 0 < kappa:
            raise ConfigError(f"project_ kappa must be > 0, got {kappa!r}")
        self.A.copy_(project_rows(self.A, kappa))

    @torch.no_grad()
    def residual(self, u: Tensor) -> float:
        """‖x − relu(x Aᵀ + u Bᵀ)‖ / ‖x‖ (Frobenius over the batch) at the converged state x;
        the absolute residual if x = 0."""
        u = u.flatten(1)                                                     # (batch, p)
        x = self._solve(u)
        r = float((x - torch.relu(x @ self.A.T + u @ self.B.T)).norm())
        nx = float(x.norm())
        return r / nx if nx > 0 else r

    # --- forward ---------------------------------------------------------------------------------

    def _not_converged(self, what: str) -> NotConverged:
        na = self.well_posedness()
        why = (f"‖A‖∞ = {na:.4g} ≥ 1: not well-posed; project_() A back below 1" if na >= 1 else
               f"‖A‖∞ = {na:.4g} < 1 but contracting too slowly for tol={self.tol:g}; raise max_iter")
        return NotConverged(f"the implicit layer's {what} did not converge in {self.max_iter} iterations ({why})")

    def _iterate(self, step, start: Tensor, what: str) -> Tensor:
        """Picard iteration v ← step(v) from `start` until max|Δv| ≤ tol·(1 + max|v|)."""
        v = start
        for _ in range(self.max_iter):
            nxt = step(v)
            delta, scale = float((nxt - v).abs().max()), float(nxt.abs().max())
            v = nxt
            if not math.isfinite(delta + scale):
                break
            if delta <= self.tol * (1 + scale):
                return v
        raise self._not_converged(what)

    @torch.no_grad()
    def _solve(self, u: Tensor) -> Tensor:
        """The fixed point x* (batch, n) for the input u (batch, p), without grad."""
        A = self.A.detach()
        bu = u.detach() @ self.B.detach().T                                  # (batch, n)
        if u.shape[0] == 0:
            return bu
        return self._iterate(lambda x: torch.relu(x @ A.T + bu), torch.zeros_like(bu), "fixed point")

    def forward(self, u: Tensor) -> Tensor:
        u = u.flatten(1)                                                     # (batch, p)
        if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
            x = self._unrolled(u)
        else:
            x = self._solve(u)                                               # (batch, n), no grad
            if torch.is_grad_enabled() and (u.requires_grad or self.A.requires_grad or self.B.requires_grad):
                x = self._attach(x, u)
        y = x @ self.C.T + u @ self.D.T                                      # (batch, q)
        return y + self.bias if self.bias is not None else y

    def _unrolled(self, u: Tensor) -> Tensor:
        """Exactly `export_iterations` Picard steps from x_0 = 0: a static graph."""
        bu = u @ self.B.T                                                    # (batch, n)
        x = torch.relu(bu)                                                   # step 1 from x_0 = 0
        for _ in range(self.export_iterations - 1):
            x = torch.relu(x @ self.A.T + bu)
        return x

    def _attach(self, x: Tensor, u: Tensor) -> Tensor:
        """One step z = f(x*) with grad to A, B, u, its incoming gradient g replaced by (I − Jᵀ)⁻¹ g."""
        pre = x @ self.A.T + u @ self.B.T                                    # (batch, n)
        z = pre.clamp(min=0)  # relu, with the derivative 1 at 0 (see the module docstring)
        mask = (pre >= 0).detach().to(pre.dtype)                             # relu'(pre), (batch, n)
        A = self.A.detach()

        def adjoint(g: Tensor | None) -> Tensor | None:
            if g is None:  # an undefined gradient stays undefined
                return None
            with torch.no_grad():
                return self._iterate(lambda y: g + (y * mask) @ A, g, "adjoint (backward) fixed point")

        z.register_hook(adjoint)
        return z
