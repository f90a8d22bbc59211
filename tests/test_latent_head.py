"""Tests for latent_head.py: PCA fit against known spectra, the heads' init and training behaviour, losses,
baselines, and strict save/load. CPU, tiny sizes, seconds.
    .venv/bin/python -m pytest -q tests/test_latent_head.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import latent_head as lh

LAM = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.05], dtype=torch.float64)  # known spectrum, d = 8

# ---- helpers ---------------------------------------------------------------------------------------------------------


def known_data(n=500, offset=100.0, seed=0):
    """Rows whose SAMPLE covariance is exactly Q diag(LAM) Q^T (whitened noise, random rotation Q), mean = mu."""
    g = torch.Generator().manual_seed(seed)
    d = LAM.numel()
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    z = z - z.mean(0)
    L = torch.linalg.cholesky(z.T @ z / (n - 1))
    z = torch.linalg.solve_triangular(L, z.T, upper=False).T  # sample cov of z is now exactly I
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    mu = offset + torch.randn(d, generator=g, dtype=torch.float64)  # large offset exercises the shifted sums
    return z * LAM.sqrt() @ Q.T + mu, Q, mu


def fit(x, chunks=1, variance=0.95):
    f = lh.PCAFitter(x.shape[-1])
    for part in torch.tensor_split(x, chunks):
        f.update(part)
    return f.finish(variance)


def small_basis(d=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(400, d, generator=g) * torch.linspace(2.0, 0.05, d) + torch.randn(d, generator=g)
    return fit(x, variance=0.9)


# ---- PCA fit ---------------------------------------------------------------------------------------------------------


def test_pca_recovers_known_spectrum():
    x, Q, mu = known_data()
    b = fit(x)
    torch.testing.assert_close(b.eigenvalues, LAM, rtol=1e-9, atol=1e-9)  # unbiased (n-1) covariance
    torch.testing.assert_close(b.eigenvalues, torch.linalg.eigvalsh(torch.cov(x.T)).flip(0), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(b.mu.double(), mu, rtol=0, atol=1e-4)
    # cumulative ratios 0.503 0.755 0.881 0.943 0.975 ...: 95% needs 5 components, 50% needs 1, 100% all 8
    k_for = lambda variance: lh.k_for(b.eigenvalues, variance)  # noqa: E731
    assert b.k == 5 and k_for(0.95) == 5 and k_for(0.5) == 1 and k_for(1.0) == 8
    for k in range(0, 9):
        assert b.relmse(k) == pytest.approx(1 - LAM[:k].sum().item() / LAM.sum().item(), abs=1e-12)
    assert b.relmse() == pytest.approx(1 - 15.5 / 15.9, abs=1e-12)
    # P_k spans the top-5 rotated axes: same projector (sign-free) and orthonormal columns
    Qk = Q[:, :5].float()
    torch.testing.assert_close(b.P_k @ b.P_k.T, Qk @ Qk.T, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.P_k.T @ b.P_k, torch.eye(5), atol=1e-5, rtol=0)
    assert b.P_k.dtype == torch.float32 and b.eigenvalues.dtype == torch.float64


def test_streaming_fit_equals_one_shot():
    x, _, _ = known_data(n=301, seed=3)
    one, many = fit(x), fit(x.reshape(7, 43, 8), chunks=5)  # uneven chunks, and (..., d) input
    torch.testing.assert_close(many.eigenvalues, one.eigenvalues, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(many.P_k, one.P_k, rtol=0, atol=1e-6)  # the sign convention makes vectors equal
    torch.testing.assert_close(many.mu, one.mu, rtol=0, atol=1e-5)


def test_fitter_errors():
    f = lh.PCAFitter(8)
    with pytest.raises(ValueError, match="dim 8.*\\(3, 5\\)"):
        f.update(torch.randn(3, 5))
    f.update(torch.randn(1, 8))
    with pytest.raises(ValueError, match="at least 2 rows.*found 1"):
        f.finish()
    with pytest.raises(ValueError, match="identical"):
        g = lh.PCAFitter(4)
        g.update(torch.ones(5, 4))
        g.finish()
    with pytest.raises(ValueError, match="non-finite"):
        lh.PCAFitter(2).update(torch.tensor([[1.0, float("nan")]]))


def test_project_reconstruct_round_trip():
    b = small_basis()
    c = torch.randn(2, 3, b.k)
    v = b.reconstruct(c)  # in the affine span by construction
    torch.testing.assert_close(b.project(v), c, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.reconstruct(b.project(v)), v, atol=1e-5, rtol=0)
    assert b.project(v.bfloat16()).dtype == torch.float32


# ---- heads -----------------------------------------------------------------------------------------------------------


def test_pca_head_starts_as_projection():
    b = small_basis()
    head = lh.PCAHead(b, 16, adapter_hidden=8)
    h = torch.randn(2, 3, 16)
    P, mu = b.P_k.double(), b.mu.double()
    want = (h.double() - mu) @ P @ P.T + mu  # Eq. 1 at init: projection onto the affine PCA subspace
    torch.testing.assert_close(head(h).double(), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(head.coeffs(h).double(), (h.double() - mu) @ P, atol=1e-6, rtol=0)
    # precision policy: bf16 input and autocast still compute and return fp32
    hb = h.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(hb)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, head(hb.float()), atol=0, rtol=0)


def test_pca_head_adapter_trains_buffers_fixed():
    torch.manual_seed(0)
    b = small_basis()
    head = lh.PCAHead(b, 16, adapter_hidden=8)
    names = {n for n, _ in head.named_parameters()}
    assert "P_k" not in names and "mu" not in names and {"P_k", "mu"} <= set(head.state_dict())
    P0, mu0 = head.P_k.clone(), head.mu.clone()
    h, target = torch.randn(4, 16), torch.randn(4, 16)
    before = head(h).detach()
    opt = torch.optim.SGD(head.adapter.parameters(), lr=0.1)
    lh.latent_loss(head(h), target).backward()
    assert head.adapter.down_proj.weight.grad.abs().sum() > 0  # the zero-init output still gets a gradient
    assert head.adapter.gate_proj.weight.grad.abs().sum() == 0  # ... while gate/up wait one step (down is 0)
    opt.step()
    assert (head(h) - before).abs().max() > 1e-4
    assert torch.equal(head.P_k, P0) and torch.equal(head.mu, mu0)
    # the output never leaves the PCA subspace: its residual after projection is zero
    v = head(h).detach()
    torch.testing.assert_close(b.reconstruct(b.project(v)), v, atol=1e-5, rtol=0)


def test_full_and_raw_heads():
    h = torch.randn(2, 3, 16).bfloat16()
    full = lh.FullHead(16, hidden=8)
    torch.testing.assert_close(full(h), h.float(), atol=0, rtol=0)  # residual + zero-init = identity at init
    assert full(h).dtype == torch.float32
    plain = lh.FullHead(16, hidden=8, residual=False)
    assert plain(h).shape == (2, 3, 16) and plain(h).abs().sum() > 0
    raw = lh.RawFeedback()
    assert list(raw.parameters()) == [] and torch.equal(raw(h), h.float())
    assert isinstance(lh.make_head("raw", 16), lh.RawFeedback)
    assert isinstance(lh.make_head("full", 16), lh.FullHead)
    with pytest.raises(ValueError, match="basis"):
        lh.make_head("pca", 16)
    with pytest.raises(ValueError, match="unknown latent head kind 'foo'"):
        lh.make_head("foo", 16)


# ---- losses and baselines --------------------------------------------------------------------------------------------


def test_latent_loss_hand_computed():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    target = torch.tensor([[0.0, 0.0], [3.0, 2.0]]).bfloat16()
    # per latent, summed over d (Eq. 2 as written): 1 + 4 = 5 and 0 + 4 = 4 -> mean 4.5, sum 9
    assert lh.latent_loss(pred, target, over_d="sum").item() == pytest.approx(4.5)
    assert lh.latent_loss(pred, target, reduction="sum", over_d="sum").item() == pytest.approx(9.0)
    # the default divides each latent's error by d = 2: 2.5 and 2 -> mean 2.25, sum 4.5
    assert lh.latent_loss(pred, target).item() == pytest.approx(2.25)
    assert lh.latent_loss(pred, target, reduction="sum").item() == pytest.approx(4.5)
    with pytest.raises(ValueError, match="over_d 'max'"):
        lh.latent_loss(pred, target, over_d="max")
    empty = torch.zeros(0, 2, requires_grad=True)
    z = lh.latent_loss(empty, torch.zeros(0, 2))
    assert z.item() == 0.0 and z.requires_grad
    with pytest.raises(ValueError, match=r"\(2, 2\).*\(2, 3\)"):
        lh.latent_loss(pred, torch.zeros(2, 3))


def test_noise_latents_match_eigenvalues():
    b = small_basis()
    g = torch.Generator().manual_seed(0)
    v = lh.noise_latents(b, (40, 500), generator=g)
    assert v.shape == (40, 500, 16) and v.dtype == torch.float32
    c = b.project(v).reshape(-1, b.k).double()
    torch.testing.assert_close(c.var(0), b.eigenvalues[: b.k], rtol=0.05, atol=0)  # 20000 draws: ~1% std error
    torch.testing.assert_close(v.mean((0, 1)), b.mu, rtol=0, atol=0.05)
    again = lh.noise_latents(b, (40, 500), generator=torch.Generator().manual_seed(0))
    assert torch.equal(v, again)


def test_ema_norm_hand_computed():
    ema = lh.EMANorm(decay=0.5)
    with pytest.raises(RuntimeError, match="seed"):
        ema(torch.ones(3))
    # two rows of three positions; row 0's image tokens have norms 1 and 3, row 1's the norm 4 (text norms ignored)
    x = torch.tensor([[[1.0, 0.0], [0.0, 3.0], [9.0, 9.0]], [[7.0, 7.0], [0.0, 4.0], [5.0, 5.0]]])
    is_image = torch.tensor([[True, True, False], [False, True, False]])
    ema.seed(x, is_image)
    torch.testing.assert_close(ema.mean, torch.tensor([[2.0], [4.0]]))
    v = torch.tensor([[3.0, 4.0], [0.0, -1.0]]).bfloat16()
    torch.testing.assert_close(ema(v), torch.tensor([[1.2, 1.6], [0.0, -4.0]]))   # norms 2 and 4, direction kept
    assert ema(v).dtype == torch.float32
    # token by token, only the rows that fed: row 0 folds in norm 10 -> 0.5 * 2 + 0.5 * 10 = 6; row 1 is untouched
    ema.update(torch.tensor([[6.0, 8.0], [100.0, 0.0]]), torch.tensor([True, False]))
    torch.testing.assert_close(ema.mean, torch.tensor([[6.0], [4.0]]))
    ema.update(torch.tensor([[0.0, 2.0], [0.0, 8.0]]), torch.tensor([True, True]))   # 0.5 * 6 + 1 = 4, 2 + 4 = 6
    torch.testing.assert_close(ema.mean, torch.tensor([[4.0], [6.0]]))
    # the same steps as a plain recurrence over a longer stream
    ema2, m = lh.EMANorm(decay=0.9).seed(x[:1], is_image[:1]), 2.0
    for r in torch.randn(50, 2):
        ema2.update(r[None], torch.tensor([True]))
        m = 0.9 * m + 0.1 * float(r.norm())
    assert ema2.mean.item() == pytest.approx(m, rel=1e-5)
    # n samples per prompt: each row's mean repeated
    torch.testing.assert_close(lh.EMANorm().seed(x, is_image, repeat=2).mean, torch.tensor([[2.0], [2.0], [4.0], [4.0]]))


def test_valr_loss_and_projector():
    a = torch.randn(5, 7)
    assert lh.valr_loss(a, a).item() == pytest.approx(-1.0, abs=1e-6)
    assert lh.valr_loss(a, -3 * a).item() == pytest.approx(1.0, abs=1e-6)
    proj = lh.VaLRProjector(16, 12, hidden=8)
    h = torch.randn(2, 3, 16).bfloat16()
    out = proj(h)
    assert out.shape == (2, 3, 12) and out.dtype == torch.float32
    lh.valr_loss(out, torch.randn(2, 3, 12)).backward()
    assert proj.fc1.weight.grad.abs().sum() > 0


def test_upsample_latents_hand_computed():
    # K = 3 latents -> P = 5 patches: patch p sits at t = p * 2 / 4 = 0, .5, 1, 1.5, 2 on the latent index
    f = torch.tensor([[[0.0, 10.0], [4.0, 2.0], [8.0, 6.0]]])                 # (1, K=3, d=2)
    up = lh.upsample_latents(f, 5)
    assert torch.equal(up, torch.tensor([[[0.0, 10.0], [2.0, 6.0], [4.0, 2.0], [6.0, 4.0], [8.0, 6.0]]]))
    assert torch.equal(lh.upsample_latents(f, 3), f)                              # P = K: identity
    assert torch.equal(lh.upsample_latents(f[:, :1], 4), f[:, :1].expand(1, 4, 2))  # K = 1: copied to every patch
    # K = 2 -> P = 4: t = 0, 1/3, 2/3, 1
    g = lh.upsample_latents(torch.tensor([[[0.0], [3.0]]]), 4)
    torch.testing.assert_close(g, torch.tensor([[[0.0], [1.0], [2.0], [3.0]]]))


def test_repa_loss_hand_computed_and_mean_over_encoders():
    torch.manual_seed(0)
    feats = torch.randn(2, 3, 8)                                                  # (n_blocks=2, K=3, D=8)
    projs = {"a": lh.VaLRProjector(8, 4, hidden=6), "b": lh.VaLRProjector(8, 5, hidden=6)}
    targets = {"a": torch.randn(2, 5, 4), "b": torch.randn(2, 3, 5)}             # P = 5 and P = 3 patches
    # by hand for encoder a: -(1/NP) sum over blocks and patches of cos(psi(upsampled)[p], target[p])
    cos = [F.cosine_similarity(projs["a"](lh.upsample_latents(feats, 5))[i, p], targets["a"][i, p], dim=0)
           for i in range(2) for p in range(5)]
    one = lh.repa_loss(feats, {"a": targets["a"]}, projs)
    assert one.item() == pytest.approx(-sum(cos).item() / 10, abs=1e-6)
    # two encoders (VaLR-M) == the mean of the two single-encoder losses; "sum" is the same summed over blocks
    two = lh.repa_loss(feats, targets, projs)
    each = [lh.repa_loss(feats, {n: targets[n]}, projs) for n in ("a", "b")]
    assert two.item() == pytest.approx((each[0].item() + each[1].item()) / 2, abs=1e-6)
    assert lh.repa_loss(feats, targets, projs, reduction="sum").item() == pytest.approx(2 * two.item(), abs=1e-6)
    # aligned targets give -1; an empty batch gives a graph-connected zero
    with torch.no_grad():
        aligned = projs["a"](lh.upsample_latents(feats, 5)) * 3.0
    assert lh.repa_loss(feats, {"a": aligned}, projs).item() == pytest.approx(-1.0, abs=1e-6)
    empty = lh.repa_loss(feats[:0], {"a": targets["a"][:0]}, projs, reduction="sum")
    empty.backward()
    assert empty.item() == 0.0 and projs["a"].fc1.weight.grad is not None


# ---- save / load -----------------------------------------------------------------------------------------------------


def test_basis_save_load(tmp_path):
    x, _, _ = known_data()
    b = fit(x)
    p = tmp_path / "pca.safetensors"
    b.save(p)
    r = lh.PCABasis.load(p)
    assert (r.k, r.d, r.variance) == (5, 8, 0.95) and r.relmse() == b.relmse()
    for n in ("P_k", "mu", "eigenvalues"):
        assert torch.equal(getattr(r, n), getattr(b, n))
    bad = tmp_path / "bad.safetensors"
    save_file({"P_k": torch.zeros(8, 5), "mu": torch.zeros(7), "eigenvalues": torch.zeros(8, dtype=torch.float64)},
              str(bad), metadata={"format": "gap-pca", "d": "8", "k": "5", "variance": "0.95"})
    with pytest.raises(ValueError, match="bad.safetensors.*mu \\(7,\\)"):
        lh.PCABasis.load(bad)
    save_file({"P_k": torch.zeros(8, 5)}, str(bad), metadata={"format": "gap-pca", "d": "8", "k": "5"})
    with pytest.raises(ValueError, match="bad.safetensors.*expected tensors"):
        lh.PCABasis.load(bad)
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="bad.safetensors.*not a readable"):
        lh.PCABasis.load(bad)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        lh.PCABasis.load(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("kind", ["pca", "full", "raw"])
def test_head_save_load(tmp_path, kind):
    torch.manual_seed(0)
    b = small_basis()
    head = lh.make_head(kind, 16, basis=b, hidden=8)
    for p in head.parameters():  # move off the init so a load that silently re-inits would be caught
        p.data.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "latent_head.safetensors"
    lh.save_head(head, path)
    again = lh.load_head(path, basis=b if kind == "pca" else None, kind=kind)
    h = torch.randn(3, 16)
    assert type(again) is type(head)
    assert torch.equal(again(h), head(h))
    if kind == "pca":
        assert torch.equal(lh.load_head(path)(h), head(h))  # self-contained: P_k / mu live in the file


def test_head_load_errors(tmp_path):
    b = small_basis()
    path = tmp_path / "head.safetensors"
    lh.save_head(lh.PCAHead(b, 16, adapter_hidden=8), path)
    with pytest.raises(ValueError, match="head.safetensors.*kind 'pca', expected full"):
        lh.load_head(path, kind="full")
    other = small_basis(seed=7)
    with pytest.raises(ValueError, match="head.safetensors.*do not match the given basis"):
        lh.load_head(path, basis=other)
    # tensors whose shapes disagree with the metadata (hidden 8 stored, 4 claimed)
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        t, meta = {n: f.get_tensor(n) for n in f.keys()}, f.metadata()
    save_file(t, str(path), metadata={**meta, "hidden": "4"})
    with pytest.raises(ValueError, match="head.safetensors.*cannot load a 'pca'"):
        lh.load_head(path)
    save_file(t, str(path), metadata={**meta, "kind": "bogus"})
    with pytest.raises(ValueError, match="head.safetensors.*kind 'bogus'"):
        lh.load_head(path)
    t.pop("adapter.down_proj.weight")
    save_file(t, str(path), metadata=meta)
    with pytest.raises(ValueError, match="(?s)head.safetensors.*down_proj"):
        lh.load_head(path)
    lh.save_head(lh.RawFeedback(), path)
    with pytest.raises(ValueError, match="expected 'gap-pca'"):
        lh.PCABasis.load(path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x, _, _ = known_data()
    f = lh.PCAFitter(8)
    f.update(x.cuda())
    b_gpu, b_cpu = f.finish(), fit(x)
    torch.testing.assert_close(b_gpu.eigenvalues, b_cpu.eigenvalues, rtol=1e-9, atol=1e-9)
    b = b_cpu.cuda()
    h = torch.randn(2, 3, 8, device="cuda", dtype=torch.bfloat16)
    for kind in ("pca", "full", "raw"):
        head = lh.make_head(kind, 8, basis=b_cpu, hidden=4)
        torch.testing.assert_close(head.cuda()(h).cpu(), head.cpu()(h.cpu()), atol=1e-5, rtol=1e-5)
    v = lh.noise_latents(b, (4,), generator=torch.Generator("cuda").manual_seed(0))
    assert v.device.type == "cuda" and v.shape == (4, 8)
    ema = lh.EMANorm().seed(v[None], torch.ones(1, 4, dtype=torch.bool, device="cuda"))
    assert ema(h[0, :1]).device.type == "cuda"
    assert lh.latent_loss(v, v).item() == 0.0
