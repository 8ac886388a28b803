"""Pruning's C step at scale: top-κ by selection equals the brute-force top-κ, ties included."""

import torch

import lccompress as lcc
from lccompress.schemes.prune import top_magnitude


def _brute(x: torch.Tensor, k: int) -> list[int]:
    """The k positions of largest |x|, equal magnitudes by position: a full sort written here."""
    order = sorted(range(x.numel()), key=lambda i: (-abs(float(x[i])), i))
    return sorted(order[:k])


def test_top_magnitude_is_the_brute_force_top_k():
    g = torch.Generator().manual_seed(0)
    for x in (torch.randn(300, generator=g), torch.round(torch.randn(300, generator=g) * 2),  # heavy ties
              torch.zeros(50), torch.randn(70, generator=g, dtype=torch.float64), torch.randn(40, generator=g).half()):
        for k in (1, 7, x.numel() // 2, x.numel() - 1, x.numel()):
            got = top_magnitude(x, k).tolist()
            assert len(got) == k == len(set(got))
            ref = _brute(x, k)
            mags = lambda idx: sorted(abs(float(x[i])) for i in idx)  # noqa: E731
            assert mags(got) == mags(ref)  # the same magnitudes: a top-κ set
            if x.dtype != torch.float16:
                assert got == ref  # and, on the CPU path, ties broken by position


def test_prune_keeps_exactly_kappa_of_a_tied_tensor():
    w = torch.tensor([[1.0, -1.0, 1.0], [0.5, -1.0, 0.0]])
    th = lcc.Prune(count=2).compress(w)
    assert th["indices"].tolist() == [0, 1] and th["values"].tolist() == [1.0, -1.0]
