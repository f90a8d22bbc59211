"""Latent heads for GAP: what maps the decoder's final-normed hidden state h̄ to the next latent input.

GAP's head (Eq. 1) predicts PCA coefficients c_t = F(h̄_t) and reconstructs v̂_t = P_k c_t + mu, where P_k (d, k)
and mu (d,) are the top-k principal directions and the mean of the auxiliary-image vision embeddings (the targets).
Also here: the streaming PCA fit (k from explained variance, RelMSE of Eq. 7), the latent loss (Eq. 2), and the
baselines/ablations: the full-dimension head (d -> d), output-as-input feedback, EMA norm calibration, noise latents
and VaLR's middle-layer alignment to vision encoders (REPA). Nothing here runs on its own; it is exercised by
    python prepare.py build --data F.jsonl --model CKPT --out DIR [--pca-variance 0.95]   # fits and saves the basis
    python train.py                                                                       # trains the head (tiny, CPU)
    torchrun --standalone --nproc_per_node=8 train.py --data DIR --model CKPT             # the real run
    .venv/bin/python -m pytest -q tests/test_latent_head.py

Precision policy: PCA statistics are accumulated in float64; everything a head computes -- the coefficients, the
reconstruction, losses, norms -- runs in float32 whatever the input dtype (h̄ is bf16 in training) and even under
autocast (the @fp32 decorator below, the one place that enforces it for the heads). Outputs are float32; the caller
casts v̂ to the trunk's dtype when it feeds it back. Why:
v̂ = P_k c + mu adds small learned corrections to a mean of norm ~tens, and bf16's 8-bit mantissa alone would cost
~0.4% of that norm, the same order as the PCA truncation error we are trying to learn below. Keep the head modules
themselves in fp32 (train.py casts only the trunk): a bf16 copy of P_k would already have lost those bits.
"""
import functools
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

import model
from model import DataError   # a bad file is the user's input: one line, not a traceback

# ---- PCA basis -------------------------------------------------------------------------------------------------------


def k_for(lam, variance):
    """Eq. 7: the smallest k whose cumulative explained variance sum(lam[:k]) / sum(lam) reaches `variance`
    (0.95 -> 629 of 3584 for the paper's 7B); lam descending."""
    if not 0.0 < variance <= 1.0:
        raise ValueError(f"explained variance must be in (0, 1], found {variance}")
    lam = lam.double().cpu()
    ratio = lam.cumsum(0) / lam.sum()
    # the 1e-12 slack lets variance=1.0 land on the last non-zero eigenvalue despite float64 rounding in cumsum
    return min(int((ratio < variance - 1e-12).sum()) + 1, lam.numel())


class PCABasis(nn.Module):
    """P_k (d, k), mu (d,) as float32 buffers; all d eigenvalues (descending, float64) for k_for / relmse / noise."""

    def __init__(self, P_k, mu, eigenvalues, variance=0.95):
        super().__init__()
        d, k = P_k.shape
        if mu.shape != (d,) or eigenvalues.shape != (d,) or not 1 <= k <= d:
            raise ValueError(f"PCABasis: expected P_k (d, k) with 1 <= k <= d, mu (d,), eigenvalues (d,); found "
                             f"P_k {tuple(P_k.shape)}, mu {tuple(mu.shape)}, eigenvalues {tuple(eigenvalues.shape)}")
        self.register_buffer("P_k", P_k.float().contiguous())
        self.register_buffer("mu", mu.float().contiguous())
        # float64 so that k_for() picks the same k as the fit did (the 95% boundary can sit within fp32 rounding)
        self.register_buffer("eigenvalues", eigenvalues.double().contiguous())
        self.d, self.k, self.variance = d, k, float(variance)   # the explained variance k was picked for

    def relmse(self, k=None):
        """Eq. 7: RelMSE(k) = 1 - sum_{i<=k} lambda_i / sum_i lambda_i, the relative error of the k-truncation."""
        k = self.k if k is None else k
        lam = self.eigenvalues.cpu()
        return float(1.0 - lam[:k].sum() / lam.sum())

    def project(self, v):
        """c = P_k^T (v - mu), (..., d) -> (..., k) in fp32."""
        return (v.float() - self.mu) @ self.P_k

    def reconstruct(self, c):
        """v = P_k c + mu, (..., k) -> (..., d) in fp32."""
        return c.float() @ self.P_k.T + self.mu

    def save(self, path):
        meta = {"format": "gap-pca", "d": str(self.d), "k": str(self.k), "variance": repr(self.variance),
                "relmse": repr(self.relmse())}
        tensors = {"P_k": self.P_k, "mu": self.mu, "eigenvalues": self.eigenvalues}
        _atomic_save({n: t.detach().cpu().contiguous() for n, t in tensors.items()}, path, meta)

    @classmethod
    def load(cls, path, device="cpu"):
        t, meta = _read(path, "gap-pca")
        if set(t) != {"P_k", "mu", "eigenvalues"}:
            raise DataError(f"{path}: expected tensors P_k, mu, eigenvalues; found {sorted(t)}")
        try:
            k, d = int(meta["k"]), int(meta["d"])
            if t["P_k"].shape != (d, k):
                raise ValueError(f"P_k should be (d={d}, k={k}) per the metadata, found {tuple(t['P_k'].shape)}")
            basis = cls(t["P_k"], t["mu"], t["eigenvalues"], float(meta.get("variance", "nan")))
        except (KeyError, ValueError) as e:
            raise DataError(f"{path}: bad PCA basis (metadata {meta}): {e}") from None
        return basis.to(device)


class PCAFitter:
    """Streaming PCA: update() on chunks of target embeddings (any (..., dim)), finish() -> PCABasis.

    Accumulates count, sum and x^T x in float64 around a shift (the first chunk's mean): the textbook
    x^T x - n mu mu^T cancels catastrophically when |mu| >> std, and shifting costs nothing. The covariance is
    the unbiased one, divided by n - 1 (like torch.cov and sklearn), so the eigenvalues are the per-component
    variances noise_latents() samples with.
    """

    def __init__(self, dim):
        self.dim, self.n = dim, 0
        self.shift = self.sum = self.xtx = None

    @torch.no_grad()
    def update(self, x):
        if x.shape[-1] != self.dim:
            raise ValueError(f"PCAFitter: expected rows of dim {self.dim}, found shape {tuple(x.shape)}")
        x = x.reshape(-1, self.dim).double()  # (n, d)
        if x.shape[0] == 0:
            return
        if not torch.isfinite(x).all():
            raise ValueError(f"PCAFitter: non-finite values in a chunk of {x.shape[0]} rows")
        if self.shift is None:
            self.shift = x.mean(0)
            self.sum = torch.zeros_like(self.shift)
            self.xtx = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=x.device)
        x = x.to(self.shift.device) - self.shift
        self.n += x.shape[0]
        self.sum += x.sum(0)
        self.xtx += x.T @ x

    @torch.no_grad()
    def finish(self, variance=0.95):
        if self.n < 2:
            raise ValueError(f"PCAFitter: need at least 2 rows to estimate a covariance, found {self.n}")
        m = self.sum / self.n  # mean of the shifted rows
        cov = (self.xtx - self.n * torch.outer(m, m)) / (self.n - 1)  # (d, d), unbiased
        lam, V = torch.linalg.eigh((cov + cov.T) / 2)  # ascending; symmetrise against rounding
        lam, V = lam.flip(0).clamp(min=0.0), V.flip(1)  # descending; tiny negatives are rounding, not variance
        if lam.sum() <= 0:
            raise ValueError(f"PCAFitter: all {self.n} rows are identical, there is no variance to keep")
        # eigh's sign per vector is arbitrary: make the largest-|.| entry positive so fits are reproducible
        idx = V.abs().argmax(0)
        V = V * torch.sign(V[idx, torch.arange(self.dim, device=V.device)])
        k = k_for(lam, variance)  # Eq. 7: keeps RelMSE(k) <= 1 - variance
        return PCABasis(V[:, :k].cpu(), (self.shift + m).cpu(), lam.cpu(), variance)


# ---- heads -----------------------------------------------------------------------------------------------------------


def fp32(forward):
    """The heads' precision policy in one place: forward runs with autocast off, on an fp32 copy of its input, so
    with the fp32 parameters every head keeps (train.py casts only the trunk, FSDP2 gives the heads an fp32 policy,
    sample.py loads them as fp32) the output is fp32 whether h̄ arrives in bf16 or under bf16 autocast."""
    @functools.wraps(forward)
    def run(self, h):
        with torch.autocast(h.device.type, enabled=False):
            return forward(self, h.float())
    return run


def zero_init_output(mlp):
    # like LoRA's B = 0: the MLP's output starts at exactly 0; gate/up get gradients from the second step on
    nn.init.zeros_(mlp.down_proj.weight)
    return mlp


class PCAHead(nn.Module):
    """GAP's head (Eq. 1): c_t = F(h̄_t) = projector(h̄) + adapter(h̄); v̂_t = P_k c_t + mu.

    The projector starts as P_k^T (h - mu) (weight P_k^T, bias -P_k^T mu) and the adapter's output is zero, so at
    init v̂ is exactly the projection of h̄ onto the affine PCA subspace; both are trainable. P_k and mu are copied
    from the basis into persistent, non-trainable buffers, so latent_head.safetensors alone runs sample.py, and the
    output always stays in the subspace the targets live in (what keeps latents on the vision manifold).
    """

    kind = "pca"

    def __init__(self, basis, d_model, adapter_hidden=None):
        super().__init__()
        if basis.d != d_model:
            # Qwen2.5-VL's merger outputs the text width (3584 for 7B), so the PCA init below is always defined
            raise ValueError(f"PCAHead: basis dim {basis.d} != d_model {d_model}")
        self.d_model, self.k = d_model, basis.k
        self.hidden = adapter_hidden or max(d_model // 4, 1)  # 896 for 7B: ~9.2M params with the projector
        self.register_buffer("P_k", basis.P_k.detach().float().clone())
        self.register_buffer("mu", basis.mu.detach().float().clone())
        self.projector = nn.Linear(d_model, self.k)
        with torch.no_grad():
            self.projector.weight.copy_(self.P_k.T)
            self.projector.bias.copy_(-(self.P_k.T @ self.mu))
        self.adapter = zero_init_output(model.SwiGLU(d_model, self.hidden, bias=False, out=self.k))

    @fp32
    def coeffs(self, h):
        """c_t (..., k) in fp32 (Eq. 1)."""
        return self.projector(h) + self.adapter(h)

    @fp32
    def forward(self, h):
        return self.coeffs(h) @ self.P_k.T + self.mu  # Eq. 1: v̂_t = P_k c_t + mu


class FullHead(nn.Module):
    """Ablation "LH" (no PCA): v̂ = h̄ + SwiGLU(h̄), d -> d, fp32.

    Residual with a zero-init output, so it starts as output-as-input (RawFeedback) exactly as the PCA head starts
    as the PCA projection of h̄: the ablation then differs only in the subspace constraint. residual=False gives a
    plain SwiGLU from a random init (its output starts near 0, far from any target).
    """

    kind = "full"

    def __init__(self, d_model, hidden=None, residual=True):
        super().__init__()
        self.d_model, self.hidden, self.residual = d_model, hidden or max(d_model // 4, 1), bool(residual)
        self.mlp = model.SwiGLU(d_model, self.hidden, bias=False)
        if self.residual:
            zero_init_output(self.mlp)

    @fp32
    def forward(self, h):
        return h + self.mlp(h) if self.residual else self.mlp(h)


class RawFeedback(nn.Module):
    """Output-as-input (Coconut / Monet): feed h̄ back unchanged. No parameters; fp32 like the other heads."""

    kind = "raw"

    @fp32
    def forward(self, h):
        return h


class EMANorm:
    """EMA norm calibration (the paper's training-free baseline): rescale each fed-back latent to a running mean L2
    norm that starts in the vision-embedding regime, fixing the norm mismatch between h̄ and the vision inputs (the
    paper measures Monet-7B's hidden states at ~8.7x the norm of its vision inputs, ~546x for text, and raw
    output-as-input feeds them back unchanged).

    One running mean m per row, a (B, 1) fp32 tensor (no host sync to read or update it):
      seed(x, is_image)  m = the mean norm of the row's query-image embeddings (the merger outputs as placed in the
                         sequence), computed once after prefill
      __call__(v)        v * m / ||v||: direction kept, norm set to m
      update(v, rows)    token by token, for the rows that fed a latent at this step: m <- decay m + (1 - decay) ||v||
    sample.py feeds the rescaled latent and folds that same vector back in, so m stays the image's norm up to
    rounding; the update is what a caller that feeds anything else (an unscaled latent, a second image) relies on.
    decay 0.99 averages over the last ~1 / (1 - 0.99) = 100 tokens.
    """

    def __init__(self, decay=0.99, eps=1e-6):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMANorm: decay must be in [0, 1), found {decay}")
        self.decay, self.eps, self.mean = decay, eps, None

    @torch.no_grad()
    def seed(self, x, is_image, repeat=1):
        """x (B, T, D) input embeddings, is_image (B, T) bool -> m (B * repeat, 1); each row's mean is repeated
        `repeat` times (sample.generate's n_samples rows per prompt)."""
        norms = x.float().norm(dim=-1) * is_image                               # (B, T), 0 off the image
        mean = norms.sum(1) / is_image.sum(1).clamp(min=1)                      # (B,)
        self.mean = mean.repeat_interleave(repeat)[:, None]                     # (B * repeat, 1)
        return self

    @torch.no_grad()
    def update(self, v, rows):
        """Fold in the vectors v (B, D) the rows marked by rows (B,) bool fed at this step."""
        new = self.decay * self.mean + (1 - self.decay) * v.float().norm(dim=-1, keepdim=True)   # (B, 1)
        self.mean = torch.where(rows[:, None], new, self.mean)

    def __call__(self, v):
        if self.mean is None:
            raise RuntimeError("EMANorm: seed() it with the query image's embeddings before rescaling")
        v = v.float()
        return v * (self.mean.to(v.device) / v.norm(dim=-1, keepdim=True).clamp(min=self.eps))


def noise_latents(basis, shape, generator=None):
    """Noise baseline: c ~ N(0, diag(lambda_1..lambda_k)), then v = P_k c + mu. shape = leading dims; -> (*shape, d)."""
    std = basis.eigenvalues[: basis.k].float().sqrt()  # per-component std of the fitted targets
    c = torch.randn(*shape, basis.k, generator=generator, device=basis.P_k.device) * std
    return basis.reconstruct(c)


# ---- losses and VaLR alignment ---------------------------------------------------------------------------------------


LATENT_LOSS_OVER_D = ("mean", "sum")


def latent_loss(pred, target, reduction="mean", over_d="mean"):
    """Eq. 2: squared error per latent, averaged over latents, in fp32.

    over_d says how one latent's d squared errors are reduced. "sum" is Eq. 2 as written (a squared L2 norm). "mean"
    (the default) divides that by d, so lambda_latent = 1.0 stays sane at every scale: at 7B the vision embeddings
    have norm ~50 and d = 3584, so the summed error of an untrained head is ~10^3 x the LM loss and swamps it (in
    this repo's synthetic miniature, with a trained ViT, it starts near 1,500 per latent and the model emits
    garbage at lambda 1). reduction="sum" returns the total over latents so train.py can divide by the global
    latent count across micro-batches and ranks (a global mean, not a mean of micro-batch means). With no latents
    at all (every span stripped by tau) it returns a graph-connected zero.
    """
    if pred.shape != target.shape:
        raise ValueError(f"latent_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    if over_d not in LATENT_LOSS_OVER_D:
        raise ValueError(f"latent_loss: over_d {over_d!r}: expected mean or sum")
    err = (pred.float() - target.float()).pow(2)                                  # (..., d)
    err = err.mean(-1) if over_d == "mean" else err.sum(-1)                       # (...,) one value per latent
    if err.numel() == 0:
        return pred.float().sum() * 0.0
    return err.sum() if reduction == "sum" else err.mean()


class VaLRProjector(nn.Module):
    """VaLR's projector psi: Linear-GELU-Linear (LLaVA projector shape) from a middle layer's hidden state at the
    latent positions (train.py picks the layer with --repa-layer) to one encoder's feature dim; one per encoder."""

    def __init__(self, d_model, d_target, hidden=None):
        super().__init__()
        self.d_model, self.d_target, self.hidden = d_model, d_target, hidden or d_model
        self.fc1 = nn.Linear(d_model, self.hidden)
        self.fc2 = nn.Linear(self.hidden, d_target)

    @fp32
    def forward(self, h):
        return self.fc2(F.gelu(self.fc1(h)))


def valr_loss(pred, target, reduction="mean"):
    """-cosine similarity per row (-1 aligned, +1 opposite), averaged (or summed) over rows; fp32.
    Graph-connected zero if empty, so DDP/FSDP still see the projector used."""
    if pred.shape != target.shape:
        raise ValueError(f"valr_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    cos = F.cosine_similarity(pred.float(), target.float(), dim=-1, eps=1e-8)
    if cos.numel() == 0:
        return pred.float().sum() * 0.0
    return -cos.sum() if reduction == "sum" else -cos.mean()


def upsample_latents(f, P):
    """A block's K latent features -> the encoder's P patches: (n, K, d) -> (n, P, d) fp32, linear interpolation
    along the latent index. Patch p sits at t = p (K - 1) / (P - 1), so the first patch is latent 0 and the last
    patch latent K-1, and takes (1 - frac(t)) f[floor t] + frac(t) f[floor t + 1]; P = K is the identity, K = 1 copies
    the one latent to every patch, P = 1 takes latent 0. VaLR does not say how it upsamples (K = 16 latents to 256
    DINOv3 patches); this is the simplest rule that uses every latent and keeps their order."""
    f = f.float()
    if f.shape[1] == P:
        return f
    return F.interpolate(f.transpose(1, 2), size=P, mode="linear", align_corners=True).transpose(1, 2)


def repa_loss(features, targets, projectors, reduction="mean"):
    """VaLR's alignment: L_REPA = -(1/NP) sum_{i,p} cos(psi(F_MLLM^i)[p], F_phi^i[p]), the mean over encoders
    (VaLR-M) with one projector psi each. The K features of each block are upsampled to the encoder's P patches first.

    features: (n_blocks, K, D), the --repa-layer states of each block's latents; targets: {name: (n_blocks, P, d)};
    projectors: {name: VaLRProjector}. reduction="sum" sums over blocks (each block the mean over its P patches), so
    train.py can divide by the global block count across micro-batches and ranks."""
    losses = []
    for name, target in targets.items():
        P = target.shape[1]
        pred = projectors[name](upsample_latents(features, P))              # (n_blocks, P, d)
        losses.append(valr_loss(pred, target, "sum") / P if reduction == "sum" else valr_loss(pred, target))
    return torch.stack(losses).mean()


# ---- make / save / load ----------------------------------------------------------------------------------------------

KINDS = ("pca", "full", "raw")


def make_head(kind, d_model, basis=None, hidden=None):
    if kind == "pca":
        if basis is None:
            raise ValueError("make_head('pca'): needs the PCA basis (DIR/pca.safetensors from prepare.py build)")
        return PCAHead(basis, d_model, adapter_hidden=hidden)
    if kind == "full":
        return FullHead(d_model, hidden=hidden)
    if kind == "raw":
        return RawFeedback()
    raise ValueError(f"unknown latent head kind {kind!r}, expected one of {KINDS}")


def save_head(head, path):
    meta = {"format": "gap-latent-head", "kind": head.kind}
    for name in ("d_model", "hidden", "k", "residual"):
        if hasattr(head, name):
            meta[name] = str(int(getattr(head, name)))
    _atomic_save({n: t.detach().cpu().contiguous() for n, t in head.state_dict().items()}, path, meta)


def load_head(path, basis=None, kind=None, device="cpu"):
    """Strict: the file's kind must be known (and equal `kind` if given), every tensor present with its shape; with
    a basis, a PCA head's stored P_k / mu must match it (a head trained against another PCA fit is meaningless)."""
    t, meta = _read(path, "gap-latent-head")
    file_kind = meta.get("kind")
    if file_kind not in KINDS or (kind is not None and file_kind != kind):
        raise DataError(f"{path}: latent head kind {file_kind!r}, expected {kind or ' or '.join(KINDS)}")
    try:
        d_model, hidden = int(meta.get("d_model", 0)), int(meta.get("hidden", 0)) or None
        if file_kind == "pca":
            k = int(meta["k"])
            # a placeholder basis of the stored shapes; load_state_dict fills P_k and mu from the file
            stub = PCABasis(torch.zeros(d_model, k), torch.zeros(d_model), torch.zeros(d_model))
            head = PCAHead(stub, d_model, adapter_hidden=hidden)
        elif file_kind == "full":
            head = FullHead(d_model, hidden=hidden, residual=bool(int(meta["residual"])))
        else:
            head = RawFeedback()
        head.load_state_dict(t, strict=True)
    except (KeyError, ValueError, RuntimeError) as e:
        raise DataError(f"{path}: cannot load a {file_kind!r} latent head from metadata {meta}: {e}") from None
    if file_kind == "pca" and basis is not None:
        same = basis.P_k.shape == head.P_k.shape and torch.allclose(basis.P_k.cpu(), head.P_k, atol=1e-6)
        if not (same and torch.allclose(basis.mu.cpu(), head.mu, atol=1e-6)):
            raise DataError(f"{path}: the head's P_k {tuple(head.P_k.shape)} / mu do not match the given basis "
                             f"P_k {tuple(basis.P_k.shape)}: trained against a different pca.safetensors?")
    return head.to(device)


def _atomic_save(tensors, path, meta):
    # write then rename, so a crash never leaves a half-written file behind
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def _read(path, fmt):
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file (expected a {fmt} safetensors file)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            t = {n: f.get_tensor(n) for n in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or non-safetensors files
        raise DataError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("format") != fmt:
        raise DataError(f"{path}: metadata format {meta.get('format')!r}, expected {fmt!r}")
    return t, meta
