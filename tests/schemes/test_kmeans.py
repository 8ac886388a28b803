"""1-D k-means at scale, certified: against brute force on tiny inputs and an exact O(k·n²) DP
written here on n ≤ 3,000 (normal, Laplace, bimodal, heavy ties, fp16 values, trained weights),
both through the default summary and a deliberately coarse one (the path large tensors take)."""

import itertools

import numpy as np
import pytest
import torch

import lccompress as lcc
from lccompress.schemes.quantize import kmeans_1d


def exact_sse(x: np.ndarray, k: int) -> float:
    """The optimum: clusters are runs of the sorted data; D_c(j) = min_i D_{c−1}(i) + SSE(i, j),
    each layer one (n+1) × (n+1) numpy minimum."""
    x = np.sort(x.astype(np.float64))
    n = x.size
    s1, s2 = np.concatenate([[0], np.cumsum(x)]), np.concatenate([[0], np.cumsum(x * x)])
    i, j = np.arange(n + 1)[:, None], np.arange(n + 1)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        cost = np.where(i < j, s2[j] - s2[i] - (s1[j] - s1[i]) ** 2 / np.maximum(j - i, 1), np.inf)
    D = cost[0].copy()
    for _ in range(1, k):
        D = np.min(D[:, None] + cost, axis=0)
    return float(D[n])


def sse_of(x: torch.Tensor, codebook: torch.Tensor) -> float:
    """Σ minⱼ (xᵢ − cⱼ)², nearest centroid by brute force."""
    x, c = x.double().reshape(-1, 1), codebook.double().reshape(1, -1)
    return float(((x - c) ** 2).min(1).values.sum())


def _data(name: str, n: int, seed: int, ref=None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if name == "normal":
        return torch.randn(n, generator=g)
    if name == "laplace":
        return torch.sign(torch.rand(n, generator=g) - 0.5) * -torch.log(torch.rand(n, generator=g))
    if name == "bimodal":
        return torch.cat([torch.randn(n // 3, generator=g) * 0.1 - 1, torch.randn(n - n // 3, generator=g) * 0.4 + 2])
    if name == "ties":
        return torch.round(torch.randn(n, generator=g) * 20) / 20  # ~160 distinct values, heavy ties
    if name == "fp16":
        return (torch.randn(n, generator=g) * 0.05).half().float()
    if name == "heavy":
        return torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g))
    raise ValueError(name)


def test_brute_force_on_tiny_inputs():
    g = torch.Generator().manual_seed(0)
    for n, k in ((7, 2), (8, 3), (6, 4)):
        for _ in range(3):
            x = torch.randn(n, generator=g)
            xd = x.double()
            best = min(sum(float(((xd[torch.tensor(lab) == j] - xd[torch.tensor(lab) == j].mean()) ** 2).sum())
                           for j in set(lab)) for lab in itertools.product(range(k), repeat=n))
            for bins in (None, 2 * k):
                assert sse_of(x, kmeans_1d(x, k, bins=bins)) <= best * (1 + 1e-9) + 1e-12


@pytest.mark.parametrize("name", ["normal", "laplace", "bimodal", "ties", "fp16", "heavy"])
@pytest.mark.parametrize("k,bins", [(2, None), (4, 32), (8, None), (8, 64), (16, 128)])
def test_within_1e_4_of_the_exact_optimum(name, k, bins):
    x = _data(name, 1500, seed=k)
    got = sse_of(x, kmeans_1d(x, k, bins=bins))
    assert got <= exact_sse(x.numpy(), k) * (1 + 1e-4) + 1e-12


def test_larger_input_and_trained_weights(digits_ref):
    model, _ = digits_ref
    w = model.fc1.weight.detach().reshape(-1)[:3000]
    for x, k in ((w, 16), (_data("heavy", 3000, 5), 32), (_data("bimodal", 2500, 64), 64)):
        exact = exact_sse(x.numpy(), k)
        for bins in (None, 16 * k):
            assert sse_of(x, kmeans_1d(x, k, bins=bins)) <= exact * (1 + 1e-4) + 1e-12


@pytest.mark.parametrize("name,k,n", [("normal", 128, 3000), ("heavy", 256, 1200), ("ties", 256, 1200)])
def test_large_k_within_1e_4_of_the_exact_optimum(name, k, n):
    """k up to 256; at n = 3000 > 16·k the default summary (16 points per cluster, the path large
    tensors take) is coarser than the data."""
    x = _data(name, n, seed=k + 1)
    assert sse_of(x, kmeans_1d(x, k, bins=16 * k)) <= exact_sse(x.numpy(), k) * (1 + 1e-4) + 1e-9


def _lloyd_np(x: np.ndarray, c: np.ndarray, iters: int = 1000) -> float:
    """Plain Lloyd with nearest-centroid assignment, written here."""
    for _ in range(iters):
        z = np.abs(x[:, None] - c[None, :]).argmin(1)
        new = np.array([x[z == j].mean() if (z == j).any() else c[j] for j in range(c.size)])
        if np.array_equal(new, c):
            break
        c = new
    return float(((x - c[np.abs(x[:, None] - c[None, :]).argmin(1)]) ** 2).sum())


@pytest.mark.parametrize("name", ["normal", "bimodal", "heavy"])
def test_warm_start_is_never_worse_than_lloyd_from_it(name):
    x = _data(name, 2000, seed=1)
    cold = lcc.Codebook(k=8).compress(x)
    y = x + 0.05 * torch.randn(2000, generator=torch.Generator().manual_seed(2))
    warm = lcc.Codebook(k=8).compress(y, cold)
    got = sse_of(y, warm["codebook"])
    assert got <= _lloyd_np(y.double().numpy(), cold["codebook"].double().numpy()) * (1 + 1e-9)
    assert got <= exact_sse(y.numpy(), 8) * (1 + 1e-3)


def test_codes_point_to_the_nearest_entry_and_memory_types():
    x = _data("heavy", 5000, 3)
    th = lcc.Codebook(k=256).compress(x)
    c = th["codebook"].double()
    nearest = (x.double()[:, None] - c[None, :]).abs().min(1).values
    assert torch.allclose((x.double() - c[th["codes"].long()]).abs(), nearest, atol=1e-6)
    assert th["codes"].dtype == torch.uint8 and th["codebook"].dtype == torch.float32
    h = x.half()  # half inputs keep their dtype in the codebook
    assert lcc.Codebook(k=4).compress(h)["codebook"].dtype == torch.float16


def test_fewer_distinct_values_than_k():
    x = torch.tensor([1.0, 1.0, 2.0, 5.0, 5.0, 5.0])
    c = kmeans_1d(x, 4)
    assert sse_of(x, c) == 0.0 and c.numel() == 4


def test_manifests_of_older_versions_still_name_a_codebook():
    """Older files record `exact_limit`; it is accepted and dropped."""
    s = lcc.scheme_from_dict({"scheme": "codebook", "k": 4, "exact_limit": 2_000_000})
    assert s == lcc.Codebook(k=4) and s.to_dict() == {"scheme": "codebook", "k": 4, "bins": 0}


def test_prefix_sums_exact_through_blocks():
    """Above 4,096 values the prefix sums come from float64 sums of blocks of 32 plus the partial
    block at each position (a last partial block included): they match a float64 cumsum."""
    from lccompress.schemes.quantize import _Prefix

    g = torch.Generator().manual_seed(3)
    for n in (4097, 5003, 70_000):
        xs = torch.sort(torch.randn(n, generator=g)).values
        p = torch.cat([torch.tensor([0, 1, 31, 32, 33, n - 1, n]), torch.randint(0, n + 1, (2000,), generator=g)])
        s1, s2 = _Prefix(xs).at(p)
        c1 = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(xs.double(), 0)])
        c2 = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(xs.double() ** 2, 0)])
        torch.testing.assert_close(s1, c1[p], rtol=0, atol=1e-9)
        torch.testing.assert_close(s2, c2[p], rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("k", [3, 16, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_assign_by_table_matches_binary_search(k, dtype):
    """`assign` by cells and a table is exact: the same codes as torch.bucketize, values at and
    next to every midpoint and far outside the codebook included."""
    from lccompress.schemes.quantize import assign

    x = _data("heavy", 200_000, 7).to(dtype)
    c = kmeans_1d(x, k)
    mid = ((c[:-1] + c[1:]) / 2).to(dtype)
    edge = torch.cat([mid, torch.nextafter(mid, torch.full_like(mid, 1e30)), torch.nextafter(mid, torch.full_like(mid, -1e30)),
                      torch.tensor([-1e30, 1e30, 0.0], dtype=dtype)])
    xx = torch.cat([x, edge, x[:20_000]])
    assert torch.equal(assign(xx, c), torch.bucketize(xx, mid, right=True, out_int32=True))


def test_short_dp_is_the_exact_dp():
    """The DP restricted to short clusters (windows of the layers it needs) returns splits as
    good as the dense exact DP over the same summary points, or gives up."""
    from lccompress.schemes.quantize import _dp_dense, _dp_short, _seg

    g = torch.Generator().manual_seed(4)
    for m, k in ((300, 40), (500, 64), (256, 16)):
        v = torch.sort(torch.randn(m, generator=g) * torch.exp(torch.randn(m, generator=g))).values.double()
        cnt = torch.randint(1, 50, (m,), generator=g).double()
        z = torch.zeros(1, dtype=torch.float64)
        s0, s1, s2 = (torch.cat([z, torch.cumsum(t, 0)]) for t in (cnt, v * cnt, v * v * cnt))
        cost = lambda p: float(_seg(s0, s1, s2, p[:-1], p[1:]).sum())  # noqa: E731
        best = cost(_dp_dense(s0, s1, s2, k))
        for B in (16, 3 * m // (2 * k) + 1, 4 * m // k):
            p = _dp_short(s0, s1, s2, k, B)
            if p is not None:
                assert p.numel() == k + 1 and cost(p) <= best * (1 + 1e-12)


@pytest.mark.parametrize("name", ["normal", "laplace", "heavy"])
def test_warm_start_beyond_the_block_size_is_never_worse_than_lloyd_from_it(name):
    """n = 12,000 (prefix sums by blocks): warm C steps with k = 8 and 16, never worse than
    plain Lloyd from the last codebook."""
    x = _data(name, 12_000, seed=3)
    y = x + 0.02 * torch.randn(12_000, generator=torch.Generator().manual_seed(4))
    for k in (8, 16):
        cold = lcc.Codebook(k=k).compress(x)
        got = sse_of(y, lcc.Codebook(k=k).compress(y, cold)["codebook"])
        assert got <= _lloyd_np(y.double().numpy(), cold["codebook"].double().numpy()) * (1 + 1e-9)
