"""
GAP training: LM loss + lambda_latent x latent MSE (Eq. 2) with teacher forcing, on a prepared folder.

    python prepare.py synthetic --out data/synthetic        # once: tiny model + data, no download
    python train.py                                          # tiny model on data/synthetic (CPU is fine)
    python train.py --data data/tiles/prepared --model checkpoints/tiles-base --lambda-latent 100 ...  # `make demo`
    torchrun --standalone --nproc_per_node=8 train.py --data DIR --model CKPT [--fsdp] [--compile]

One process runs the same code as torchrun (RANK / LOCAL_RANK / WORLD_SIZE). Defaults are the paper's: AdamW lr 1e-5
(head 1e-5), weight decay 0.01 on matrices, cosine schedule with 3% warmup, global batch 128, micro-batch 1, 2 epochs,
bf16 on CUDA, seed 12345. The output folder is a loadable checkpoint for sample.py and eval.py.

Precision, one policy: on CPU everything is fp32. On CUDA with --fsdp the decoder blocks, the embedding and
[norm, lm_head] are FSDP2 units with bf16 parameters for compute and fp32 gradient reduction over fp32 master shards;
the frozen ViT is a bf16 replica outside the sharded units; the latent head and VaLR projectors stay fp32. Without
--fsdp (DDP or one GPU) bf16 autocast runs over fp32 weights. Activation checkpointing and torch.compile are on by
default on CUDA. Checkpoints are sharded (torch.distributed.checkpoint) and crash-safe; --resume continues exactly.

Teacher forcing (README "The latent loop"): the input at latent pad j is the target v_j; the head reads h̄ at the
position before pad j and predicts v̂_j; L = L_LM + lambda_latent * L_latent, each summed and divided by its global
count (tokens, latents) over the whole optimizer step and all ranks. Records whose base-model accuracy is > tau lose
their latent spans at load time (plain text supervision), so one prepared folder serves any tau.

VaLR (README "Reproducing VaLR"): a `prepare.py build --layout valr` folder has no targets, so its latent inputs are
the model's own outputs fed back (sample.rollout_latents, no latent MSE); --repa-layer / --repa-weight /
--repa-encoders add L_REPA (latent_head.repa_loss) against the folder's --external encoder features.
"""

import contextlib
import dataclasses
import json
import math
import os
import pickle
import shutil
import signal
import time
import warnings
from datetime import timedelta
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import latent_head as lh
import model
import prepare
import sample

from dataloader import MicroBatches, Records, collate, loader, step_plan  # noqa: F401  (train.X API)

# one process saves and loads DCP checkpoints without a process group, which is exactly what it means to do: torch
# warns about it at every save and load otherwise
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


@dataclass
class TrainConfig:
    data: str = field(default="data/synthetic/prepared", metadata={"help": "a folder written by `prepare.py build`"})
    model: str = field(default="data/synthetic/model",
                       metadata={"help": "HF checkpoint folder (config.json + safetensors)"})
    out: str = field(default="out/gap",
                     metadata={"help": "final checkpoint folder (+ checkpoints/ and metrics.jsonl inside)"})
    latent_head: str = field(default="pca",
                             metadata={"help": "pca (GAP) | full (d->d ablation) | raw (output-as-input baseline)"})
    lambda_latent: float = field(default=1.0, metadata={"min": 0, "help": "weight of L_latent (Eq. 2)"})
    latent_loss: str = field(default="mean", metadata={
        "help": "squared error of one latent: mean over its d dims (lambda 1.0 safe at any d) | sum (Eq. 2 as "
                "written: ~d x larger)", "choices": lh.LATENT_LOSS_OVER_D})
    tau: float = field(default=0.0, metadata={"help": "keep latent spans only for records with accuracy <= tau; "
                                                      "< 0 strips every span (plain CoT: VaLR stage 1)"})
    scheduled_sampling: float = field(default=0.0,
                                      metadata={"min": 0, "max": 1,
                                                "help": "probability of feeding the model's own detached latent (2nd pass)"})
    repa_layer: int = field(default=-1, metadata={"min": -1, "help": "VaLR REPA: align this layer's latent features "
                                                                      "(-1: off; the paper's 12 of 28 layers, 2 for 4)"})
    repa_weight: float = field(default=0.0, metadata={"min": 0, "help": "VaLR REPA: weight of L_REPA (the paper: 0.5)"})
    repa_encoders: str = field(default="auto", metadata={
        "help": "REPA targets: comma list of `prepare.py build --external` names (2 = VaLR-M), or gap (the aux-image "
                "ViT targets); auto = every external encoder of --data, else gap"})
    lr: float = field(default=1e-5, metadata={"min": 0, "help": "backbone learning rate"})
    head_lr: float = field(default=1e-5, metadata={"min": 0, "help": "latent head (and VaLR projector) learning rate"})
    weight_decay: float = field(default=0.01, metadata={"min": 0, "help": "on matrices only"})
    warmup_ratio: float = field(default=0.03,
                                metadata={"min": 0, "max": 1, "help": "fraction of the steps with linear warmup"})
    grad_clip: float = field(default=1.0, metadata={"above": 0, "help": "max global gradient norm"})
    epochs: int = field(default=2, metadata={"min": 1, "help": "passes over the records"})
    global_batch: int = field(default=128,
                              metadata={"min": 1,
                                        "help": "examples per optimizer step, over all ranks and accumulation steps"})
    micro_batch: int = field(default=1, metadata={"min": 1, "help": "examples per forward"})
    train_vision: bool = field(default=False, metadata={"help": "the ViT + merger stay frozen unless set"})
    compile: bool = field(default=None, metadata={"help": "torch.compile each decoder block (default: on with CUDA)"})
    fsdp: bool = field(default=False,
                       metadata={"help": "FSDP2: shard params/grads/optimizer per decoder block (7B on 80 GB)"})
    activation_checkpointing: bool = field(default=None,
                                           metadata={"help": "recompute blocks in backward (default: on with CUDA)"})
    checkpoint_every: int = field(default=1, metadata={
        "min": 1, "help": "with activation checkpointing, recompute every k-th block only (2: half, selective)"})
    device: str = prepare.device_option()
    workers: int = field(default=2, metadata={"min": 0,
                                              "help": "DataLoader worker processes (0: load in the training process)"})
    save_every: int = field(default=0, metadata={"min": 0, "help": "checkpoint every N steps (0: only at the end)"})
    resume: bool = field(default=False, metadata={
        "help": "continue exactly from the latest complete checkpoint in OUT/checkpoints (none yet: start at step 0)"})
    allow_config_change: bool = field(default=False, metadata={
        "help": "with --resume: continue although options that change the result differ from the checkpoint's"})
    stop_after: int = field(default=0,
                            metadata={"min": 0,
                                      "help": "stop after this many steps (simulates an interruption; 0: run all)"})
    export_dtype: str = field(default="auto", metadata={"help": "final weights: bf16 on CUDA and fp32 on CPU by "
                                                                "default", "choices": ["auto", "bf16", "fp32"]})
    dist_timeout: int = field(default=1800, metadata={"min": 1, "help": "seconds a collective may wait before failing"})
    seed: int = 12345
    log_every: int = field(default=1, metadata={"min": 1, "help": "print a log line every N steps"})


def parse_args(argv=None):
    p = prepare.Parser(description=__doc__)
    prepare.add_options(p, TrainConfig)   # one flag per field (the same generator as every gap script)
    return TrainConfig(**vars(p.parse_args(argv)))


# ---------------------------------------------------------------------------------------------------------------
# ---- distributed (torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; one process runs the same code) ----


def dist_init(cfg):
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = prepare.resolve_device(cfg.device)   # auto / cuda -> cuda:LOCAL_RANK (made current); cuda:N as given
    cuda = device.type == "cuda"
    if (world > 1 or cfg.fsdp) and not dist.is_initialized():   # (a caller running several trainings may have)
        # an explicit timeout (NCCL's default is 10 min) and device_id, which binds the NCCL communicator to this GPU
        # up front instead of guessing it at the first collective. FSDP needs a group even on one device: without
        # torchrun's rendezvous variables, a one-rank group on an in-process store
        store = None if "MASTER_ADDR" in os.environ else dist.HashStore()
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=cfg.dist_timeout),
                                device_id=device if cuda else None, store=store,
                                rank=rank if store else -1, world_size=world if store else -1)
    return rank, world, device


# a sum, not an average: the loss parts and counts are global sums, divided once every rank's share is in
def all_sum(x, world):
    if world > 1:
        dist.all_reduce(x)
    return x


def barrier(world):
    if world > 1:
        dist.barrier()


def print0(*a, rank=0, **k):
    if rank == 0:
        print(*a, **k, flush=True)


def test_kill(point, step):
    """Test hook: GAP_TEST_KILL_AT=<point>:<step> SIGKILLs this process right here (tests/test_train.py uses it to
    prove a kill -9 mid-save or mid-swap leaves a checkpoint that --resume takes). Nothing else reads it."""
    if os.environ.get("GAP_TEST_KILL_AT") == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------------------------
# ---- the model being trained: the VLM, the latent head, and (optionally) the VaLR projector ----

LOSS_CHUNK = 1024   # logits rows upcast to fp32 at once: 1024 x 152064 x 4 B = 0.62 GB, whatever the sequence length


def ce_sum(logits, target):
    # fp32: bf16 keeps 8 mantissa bits, too few for a log-sum-exp over 152,064 logits
    return F.cross_entropy(logits.float(), target, reduction="sum")


def lm_loss_sum(lm_head, h, pos, target, chunk=LOSS_CHUNK):
    """Cross-entropy summed over the supervised positions only: h (N, D) flat, pos (n_sup,) rows of h whose next token
    is supervised, target (n_sup,). The logits exist only for those rows (a 8k-token sample with 1k response tokens
    needs 1k x 152064, not 8k x 152064), in the compute dtype; the fp32 softmax runs `chunk` rows at a time and is
    recomputed in backward, so at most one chunk of fp32 logits is ever alive. lm_head is called once (an FSDP
    unit's hooks fire once per forward)."""
    logits = lm_head(h.index_select(0, pos))                                 # (n_sup, V)
    if logits.shape[0] <= chunk:   # one chunk (or none: the sum of an empty tensor keeps lm_head in the graph)
        return ce_sum(logits, target)
    return sum(checkpoint(ce_sum, logits[i:i + chunk], target[i:i + chunk], use_reentrant=False)
               for i in range(0, logits.shape[0], chunk))


class GAP(nn.Module):
    def __init__(self, vlm, head, projectors=None, repa_layer=-1, n_latents=1, latent_loss="mean", own_latents=False):
        super().__init__()
        self.vlm, self.head, self.repa_layer, self.n_latents = vlm, head, repa_layer, n_latents
        self.own_latents = own_latents   # no latent targets in the folder: feed the model's own (VaLR)
        self.valr = nn.ModuleDict(projectors) if projectors else None   # {encoder name ("gap": ViT targets): psi}
        self.latent_loss = latent_loss   # mean | sum over the d dims of one latent (see lh.latent_loss)

    def forward(self, batch, pad_id, ss_prob=0.0):
        """The loss terms of one micro-batch -> (lm_sum, latent_sum, valr_sum): sums (valr_sum over latent spans);
        the caller divides by the step's global counts over all micro-batches and ranks."""
        m, ids = self.vlm, batch["input_ids"]
        x = m.embed(ids, batch["pixel_values"], batch["image_grid_thw"])   # (B, T, D)
        B, T, D = x.shape
        pos, lat = batch["position_ids"], batch["latent_pos"]               # (3, B, T), (n_lat,) flat pad positions
        prev = lat - 1                                                      # the head reads h̄ before each pad
        v = batch["targets"]                                                # (n_lat, d) fp32, row-major order
        if v is not None:
            if ss_prob > 0:
                # scheduled sampling: a no-grad teacher-forced pass predicts every latent, then a random subset of
                # the inputs is replaced by those detached predictions for the pass that is trained
                with torch.no_grad():
                    h0 = m.decode(x.flatten(0, 1).index_copy(0, lat, v.to(x.dtype)).view(B, T, D), pos)
                    v_own = self.head(h0.flatten(0, 1)[prev]).float()
                pick = torch.rand(v.shape[0], device=v.device) < ss_prob
                v_in = torch.where(pick[:, None], v_own, v)
            else:
                v_in = v
            x = x.flatten(0, 1).index_copy(0, lat, v_in.to(x.dtype)).view(B, T, D)   # input at pad j is v_j
        elif self.own_latents:
            # no targets (a --layout valr folder): output-as-input, the latents generation would feed, each the
            # head's feedback from h̄ before it, rolled out without grad through the KV cache with the text as given
            # (called on every micro-batch, latents or not: under FSDP the ranks must make the same forward calls)
            is_lat = ids == pad_id                                          # (B, T)
            v_own = sample.rollout_latents(m, self.head, x, pos, is_lat, sync_calls=dist.is_initialized())
            x = x.masked_scatter(is_lat[..., None], v_own.to(x.dtype))
        use_valr = self.valr is not None
        h, layers = m.decode(x, pos, return_layers=True) if use_valr else (m.decode(x, pos), None)
        h = h.flatten(0, 1)                                                 # (B*T, D)
        lm_sum = lm_loss_sum(m.lm_head, h, batch["sup_pos"], batch["sup_tgt"])
        if v is None:   # every span stripped, or no targets (VaLR: no latent MSE): run the head on no rows, so
            v = h.new_zeros(0, D, dtype=torch.float32)                      # DDP/FSDP still see its parameters used
        v_hat = self.head(h[prev] if v.shape[0] else h[:0])                 # Eq. 1, (n_lat, d) fp32
        lat_sum = lh.latent_loss(v_hat, v, reduction="sum", over_d=self.latent_loss)   # Eq. 2, summed over latents
        valr_sum = h.new_zeros((), dtype=torch.float32)
        if use_valr:
            # REPA: latent j's features are the --repa-layer state where it is produced (the position before pad j,
            # as for the head), K per span; "gap" aligns to the aux-image ViT targets, the others to --external ones
            K = self.n_latents
            feats = layers[self.repa_layer].flatten(0, 1)[prev].view(-1, K, D)   # (n_spans, K, D)
            ext = batch["external"]
            targets = {n: (v.view(-1, K, v.shape[-1]) if n == "gap" else ext[n].to(h.device) if n in ext
                           else h.new_zeros(0, 1, p.d_target)) for n, p in self.valr.items()}   # (n_spans, P, d)
            valr_sum = lh.repa_loss(feats, targets, self.valr, reduction="sum")
        return lm_sum, lat_sum, valr_sum


def sum_gradients_hook(_, bucket):
    # DDP's default hook averages over ranks; the loss is already divided by the global counts, so reduce by sum
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])


def shard(gap, cfg, cuda):
    """FSDP2 units: each decoder block, the embedding, [norm, lm_head] (one unit: it runs last and its gradients
    are needed first, so it is not resharded after forward), the latent head and VaLR projectors (fp32), the root.
    On CUDA the units compute with bf16 copies of their fp32 shards and reduce gradients in fp32; on CPU all fp32."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    vlm = gap.vlm
    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cuda else MixedPrecisionPolicy()
    fp32 = MixedPrecisionPolicy()
    for layer in vlm.model.layers:
        fully_shard(layer, mp_policy=bf16)
    if vlm.cfg.tie_word_embeddings:   # 3B: one tensor is both the embedding and lm_head, so they share a unit
        fully_shard([vlm.model.embed_tokens, vlm.model.norm, vlm.lm_head], mp_policy=bf16, reshard_after_forward=False)
    else:
        fully_shard(vlm.model.embed_tokens, mp_policy=bf16)
        fully_shard([vlm.model.norm, vlm.lm_head], mp_policy=bf16, reshard_after_forward=False)
    if cfg.train_vision:
        fully_shard(vlm.visual, mp_policy=bf16)
    for extra in [gap.head, *(gap.valr.values() if gap.valr else [])]:   # each called as a module: own unit
        if any(True for _ in extra.parameters()):
            fully_shard(extra, mp_policy=fp32)
    # the frozen ViT (670M parameters at 7B, 1.3 GB in bf16) is replicated: sharding it would add an all-gather per
    # forward for weights that never change
    frozen = set() if cfg.train_vision else set(vlm.visual.parameters())
    fully_shard(gap, mp_policy=fp32, ignored_params=frozen)
    for m in gap.modules():
        if isinstance(m, FSDPModule):
            # reduce-scatter sums instead of averaging: the loss is already divided by the global counts (NCCL
            # does it as PREMUL_SUM(1); gloo has no PREMUL_SUM, so plain SUM there)
            m.set_gradient_divide_factor(1.0)
            if not cuda:
                m.set_force_sum_reduction_for_comms(True)


def speedups(vlm, cfg, cuda):
    """Activation checkpointing (every --checkpoint-every-th block) and torch.compile per block, each on by default on
    CUDA. Both wrap a block in place, so state_dict keys stay the checkpoint's names."""
    if cuda if cfg.activation_checkpointing is None else cfg.activation_checkpointing:
        for layer in vlm.model.layers[::cfg.checkpoint_every]:   # keep only the block's input; recompute in backward
            layer.forward = (lambda f: lambda *a: checkpoint(f, *a, use_reentrant=False))(layer.forward)
    if cuda if cfg.compile is None else cfg.compile:
        for layer in vlm.model.layers:
            # per block: each compiled region stays inside one FSDP unit, its all-gather hooks outside
            layer.compile()


def check_replica_fits(model_dir, n_train, have, gpu):
    """Without --fsdp every GPU holds fp32 weights, fp32 gradients and AdamW's two moments: 16 bytes per trained
    parameter (a 7B: 8.3B x 16 = 133 GB, more than any one GPU). Refuse before the first step runs out of memory."""
    need = 16 * n_train
    # 10% headroom: activations, the CUDA context and allocator fragmentation need the rest
    if need > 0.9 * have:
        raise prepare.DataError(f"{model_dir}: {n_train / 1e9:.1f}B trained parameters need {need / 2 ** 30:.0f} GiB "
                                f"of weights, gradients and AdamW state per GPU without sharding, more than the "
                                f"{have / 2 ** 30:.0f} GiB of {gpu}: use --fsdp")


def build(cfg, records, device, world):
    cuda = device.type == "cuda"
    vlm = model.load_pretrained(cfg.model, dtype=torch.float32, device=device)   # fp32 master weights
    vocab = vlm.cfg.text.vocab_size
    if max(records.start_id, records.pad_id, records.end_id) >= vocab:
        raise prepare.DataError(f"latent token ids {records.start_id}..{records.end_id} from {cfg.data}/manifest.json "
                                f"are >= the embedding's {vocab} rows in {cfg.model}")
    d, n_layers = vlm.cfg.text.hidden_size, vlm.cfg.text.num_hidden_layers
    if cfg.latent_head == "pca" and records.manifest.get("pca") is None:
        raise prepare.DataError(f"--latent-head pca: {cfg.data} has no PCA basis (a --layout valr build has no aux-image "
                         f"targets); use --latent-head raw (VaLR's output-as-input)")
    basis = lh.PCABasis.load(Path(cfg.data) / "pca.safetensors") if cfg.latent_head == "pca" else None
    head = lh.make_head(cfg.latent_head, d, basis).to(device)
    projectors = {}
    if cfg.repa_layer >= 0:
        if cfg.repa_layer > n_layers:
            raise prepare.DataError(f"--repa-layer {cfg.repa_layer} > {n_layers} layers (VaLR's layer 12 of 28 scales to "
                             f"{round(12 * n_layers / 28)} for {n_layers})")
        projectors = {name: lh.VaLRProjector(d, dim).to(device) for name, dim in repa_encoders(cfg, records).items()}
    for p in vlm.visual.parameters():
        p.requires_grad_(cfg.train_vision)
    if cuda and not cfg.train_vision:
        vlm.visual.to(torch.bfloat16)   # frozen: no fp32 master copy needed (PatchEmbed casts pixels to its dtype)
    speedups(vlm, cfg, cuda)
    gap = GAP(vlm, head, projectors, cfg.repa_layer, records.n_latents, cfg.latent_loss,
              own_latents=not records.manifest["shards"])
    n_train = sum(p.numel() for p in gap.parameters() if p.requires_grad)
    if cuda and not cfg.fsdp:
        check_replica_fits(cfg.model, n_train, torch.cuda.get_device_properties(device).total_memory,
                           torch.cuda.get_device_name(device))
    if cfg.fsdp:
        shard(gap, cfg, cuda)
        wrapped = gap
    elif world > 1:
        wrapped = nn.parallel.DistributedDataParallel(gap, device_ids=[device.index] if cuda else None)
        wrapped.register_comm_hook(None, sum_gradients_hook)
    else:
        wrapped = gap
    # two parameter groups (backbone lr, head lr), weight decay on matrices only (not norms, biases)
    groups = []
    for params, lr in ((vlm.parameters(), cfg.lr), ([*head.parameters(), *(gap.valr.parameters() if gap.valr else [])], cfg.head_lr)):
        params = [p for p in params if p.requires_grad]
        groups += [dict(params=[p for p in params if p.dim() >= 2], lr=lr, weight_decay=cfg.weight_decay),
                   dict(params=[p for p in params if p.dim() < 2], lr=lr, weight_decay=0.0)]
    groups = [g for g in groups if g["params"]]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, fused=cuda)
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    return gap, wrapped, opt, basis


def repa_encoders(cfg, records):
    """--repa-encoders -> {name: feature dim}: names of the folder's --external encoders, or gap (its ViT targets)."""
    have = {n: e["dim"] for n, e in records.manifest.get("external", {}).items()}
    if records.manifest["shards"]:
        have["gap"] = records.manifest["target_dim"]
    names = cfg.repa_encoders.split(",") if cfg.repa_encoders != "auto" else \
        [n for n in have if n != "gap"] or ["gap"]
    missing = [n for n in names if n not in have]
    if missing:
        raise prepare.DataError(f"--repa-encoders {cfg.repa_encoders}: {cfg.data} has no {', '.join(missing)} targets; it "
                         f"has {', '.join(have) or 'none'} (prepare.py build --external NAME=FILE adds encoders)")
    return {n: have[n] for n in names}


def lr_factor(step, total, warmup_ratio):
    # linear warmup from 1 / warmup (not 0: step 0 moves the weights too), then a cosine from 1 down to 0 at `total`
    warmup = max(1, math.ceil(total * warmup_ratio))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ---------------------------------------------------------------------------------------------------------------
# ---- checkpoints: sharded, crash-safe, resumable ----
#
# OUT/checkpoints/step-00000040/ holds the torch.distributed.checkpoint shards (each rank writes its own part of the
# model and optimizer state), rng-<rank>.pt (every rank's RNG) and meta.json. A save writes into tmp-step-N/, and
# only when every rank has finished does rank 0 rename it to step-N/ (one atomic rename: a folder named step-* is
# always complete), then move older ones aside and delete them. A kill -9 at any moment leaves the previous step-*
# folder, or the new one, or both; --resume takes the newest and the next save clears whatever a killed save left.


def latest_checkpoint(out):
    """-> (step, folder) of the newest complete checkpoint, or None."""
    found = []
    for p in (Path(out) / "checkpoints").glob("step-*"):
        # torch.distributed.checkpoint writes .metadata once every shard is written: without it the save never finished
        if (p / "meta.json").exists() and (p / ".metadata").exists():
            found.append((read_meta(p)["step"], p))
    return max(found) if found else None


def read_meta(folder):
    """A checkpoint's meta.json (step, world size, config). It is written before the folder gets its step-* name, so
    an unreadable one is damage, not an interrupted save: named, never skipped."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        meta["step"] = int(meta["step"])
        return meta
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise prepare.data_error(folder / "meta.json", "file", f"expected a checkpoint's meta.json, found an "
                                                              f"unreadable one ({type(e).__name__}: {e})") from None


def rng_state(device):
    rng = dict(torch=torch.get_rng_state())   # all training randomness (scheduled sampling) draws from torch
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def save_checkpoint(gap, opt, cfg, step, rank, world, device):
    from torch.distributed.checkpoint.state_dict import get_state_dict
    root = Path(cfg.out) / "checkpoints"
    tmp, final = root / f"tmp-step-{step:08d}", root / f"step-{step:08d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(world)
    model_sd, optim_sd = get_state_dict(gap, opt)   # sharded (DTensor) with FSDP: nothing is gathered
    dcp.save(dict(model=model_sd, optim=optim_sd), checkpoint_id=tmp)   # every rank writes its shards, rank 0 .metadata
    torch.save(rng_state(device), tmp / f"rng-{rank}.pt")
    test_kill("mid-save", step)
    barrier(world)
    if rank == 0:
        meta = dict(step=step, world=world, config=dataclasses.asdict(cfg))
        with open(tmp / "meta.json", "w") as f:
            f.write(json.dumps(meta, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)        # the commit point
        test_kill("swap", step)
        for old in root.iterdir():    # older checkpoints and what killed saves left behind
            if old != final:
                trash = root / f"trash-{old.name}"
                if not old.name.startswith("trash-"):
                    os.replace(old, trash)   # out of the step-* namespace first, so a half-deleted one is never seen
                shutil.rmtree(trash if trash.exists() else old, ignore_errors=True)
    barrier(world)


class DCPMetadataUnpickler(pickle.Unpickler):
    """torch.distributed.checkpoint reads a checkpoint's .metadata with a plain pickle.load, which would run whatever
    a tampered file names. --resume first reads it through this unpickler, which admits only what a DCP .metadata
    holds: the checkpoint's own metadata classes, torch.Size, dtypes, layouts and paths. Nothing else is called."""

    ALLOWED = {("pathlib", "PosixPath"), ("torch", "Size"), ("torch.serialization", "_get_layout")}

    def find_class(self, module, name):
        obj = super().find_class(module, name)
        dcp_class = module.startswith("torch.distributed.checkpoint.") and isinstance(obj, type)
        if dcp_class or (module, name) in self.ALLOWED or (module == "torch" and isinstance(obj, torch.dtype)):
            return obj
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def load_checkpoint(gap, opt, cfg, rank, device):
    """Restore the newest complete checkpoint -> its step; with none yet, say so and return 0 (a restart script can
    always pass --resume)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    found = latest_checkpoint(cfg.out)
    if found is None:
        print0(f"--resume: no complete checkpoint in {cfg.out}/checkpoints yet; starting from step 0", rank=rank)
        return 0
    step, folder = found
    model_sd, optim_sd = get_state_dict(gap, opt)
    state = dict(model=model_sd, optim=optim_sd)
    try:   # .metadata first, safely: a tampered one must not run code, a damaged one would make dcp.load log twice
        with open(folder / ".metadata", "rb") as f:
            DCPMetadataUnpickler(f).load()
        dcp.load(state, checkpoint_id=folder)   # in place, each rank reading the shards it owns
    except (Exception, dcp.api.CheckpointException) as e:   # a cut-short shard or .metadata (several error types)
        e = next(iter(e.failures.values()))[0] if isinstance(e, dcp.api.CheckpointException) else e   # rank's own
        raise prepare.data_error(folder, "checkpoint", f"expected readable shards and .metadata, found "
                                 f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    set_state_dict(gap, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng = read_state(folder / f"rng-{rank}.pt")   # RNG byte tensors only (weights_only: nothing executed)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)
    print0(f"resumed from {folder} (step {step})", rank=rank)
    return step


def export(gap, cfg, records, basis, rank, device):
    """The final folder: HF-layout model (bf16 on CUDA) + tokenizer + latent head (fp32) + PCA basis + gap.json (what
    sample.py reads). Each sharded tensor is gathered once, in order, on every rank; rank 0 keeps a CPU copy. The
    files go to OUT/export.tmp first and are then renamed into OUT one by one, gap.json last: a folder with a
    gap.json is a complete export (a kill before that leaves the last checkpoint, and --resume exports again)."""
    from torch.distributed.tensor import DTensor
    dtype = prepare.resolve_dtype(cfg.export_dtype, device)
    state = {}
    for k, v in gap.state_dict().items():
        v = v.full_tensor() if isinstance(v, DTensor) else v   # a collective: every rank joins, same order
        if rank == 0:
            state[k] = v.detach().cpu()
    if rank != 0:
        return
    out = Path(cfg.out)
    tmp = out / "export.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (out / "gap.json").unlink(missing_ok=True)
    model.save_pretrained(gap.vlm, tmp,
                          state_dict={k[4:]: v.to(dtype) for k, v in state.items() if k.startswith("vlm.")})
    # tokenizer (with the latent tokens), chat template, processor and generation configs: a complete hub folder
    prepare.write_hub_files(tmp, prepare.load_tokenizer(cfg.data), gap.vlm.cfg, records.pixels, base=cfg.model)
    if cfg.latent_head != "raw":   # a plain CPU copy of the head, filled from the full state
        head = lh.make_head(cfg.latent_head, gap.vlm.cfg.text.hidden_size, basis)
        head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")}, strict=True)
        lh.save_head(head, tmp / "latent_head.safetensors")
    if basis is not None:
        basis.save(tmp / "pca.safetensors")
    gap_json = dict(latent_head=cfg.latent_head, n_latents=records.n_latents, tau=cfg.tau,
                    latent_ids=dict(start=records.start_id, pad=records.pad_id, end=records.end_id),
                    vision_norm=records.manifest.get("target_norm"), lambda_latent=cfg.lambda_latent, latent_loss=cfg.latent_loss,
                    image_min_pixels=records.pixels[0], image_max_pixels=records.pixels[1])
    (tmp / "gap.json").write_text(json.dumps(gap_json, indent=2) + "\n")
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == "gap.json"):
        os.replace(f, out / f.name)
    tmp.rmdir()


# ---------------------------------------------------------------------------------------------------------------
# ---- inputs that must agree: output paths, tokenizer, the config of the run being resumed ----

# Options that do not change what a run computes: where it writes, how often it saves or logs, how it is executed
# (activation checkpointing and FSDP are exact; the device changes rounding only). Any other difference between a
# checkpoint's config and the resuming run's would silently splice two different runs together.
RESUME_FREE = ("out", "resume", "allow_config_change", "save_every", "stop_after", "log_every", "device", "compile",
               "activation_checkpointing", "checkpoint_every", "fsdp", "workers", "export_dtype", "dist_timeout")


def read_state(path, mmap=False):
    """torch.load of a state file (weights_only: tensors and plain values, nothing executed), naming the file when
    it is cut short or is not a state file at all (torch's own error names neither)."""
    try:
        return torch.load(path, weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise prepare.data_error(path, "file", f"expected a torch state file, found an unreadable one "
                                               f"({str(e).splitlines()[0]})") from None


def check_resume_config(cfg, saved, where):
    """Refuse to resume under options that change the result, listing each with its old and new value."""
    now = dataclasses.asdict(cfg)
    same = lambda k, a, b: os.path.realpath(a) == os.path.realpath(b) if k in ("data", "model") else a == b
    changed = [f"--{k.replace('_', '-')} {saved[k]} -> {now[k]}" for k in now
               if k not in RESUME_FREE and k in saved and not same(k, saved[k], now[k])]
    if changed and not cfg.allow_config_change:
        raise prepare.data_error(where, "config", f"expected the options the checkpoint was trained with, found "
                                 f"{', '.join(changed)} (pass --allow-config-change to resume anyway)")
    if changed:
        print0(f"resuming with changed options: {', '.join(changed)} (--allow-config-change)")


def check_inputs(cfg):
    """Before any work: outputs never overwrite inputs, the model reads the token ids the data was prepared with,
    and --resume continues the same run."""
    out = os.path.realpath(cfg.out)
    for name in ("model", "data"):
        if out == os.path.realpath(getattr(cfg, name)):
            raise prepare.data_error(cfg.out, "--out", f"expected a folder other than --{name} (the export writes "
                                                      f"config.json, model.safetensors, ... into it), found --{name}")
    mine, theirs = Path(cfg.data) / "tokenizer.json", Path(cfg.model) / "tokenizer.json"
    if theirs.is_file() and prepare.load_tokenizer(mine).to_str() != prepare.load_tokenizer(theirs).to_str():
        a, b = (prepare.load_tokenizer(p).get_vocab() for p in (mine, theirs))
        diff = sorted(set(a.items()) ^ set(b.items()))
        found = (f"{len(diff)} differing vocabulary entries (e.g. {diff[0][0]!r})" if diff else
                 "the same vocabulary with another normalizer, pre-tokenizer or merges")
        raise prepare.data_error(theirs, "tokenizer", f"expected the tokenizer {mine} was prepared with, found "
                                                      f"{found}; run prepare.py build with this --model")
    found = latest_checkpoint(cfg.out) if cfg.resume else None
    if found:
        check_resume_config(cfg, read_meta(found[1]).get("config", {}), found[1] / "meta.json")


# ---------------------------------------------------------------------------------------------------------------
# ---- throughput: model FLOPs utilisation ----

# dense bf16 tensor-core peak per GPU (NVIDIA datasheets, no 2:4 sparsity); the first name found in the device name wins
PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
              ("B200", 2250e12), ("A100", 312e12))


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    # the first name that matches ("H100 PCIe" before "H100"); an unknown GPU reports no MFU rather than a wrong one
    return next((v for k, v in PEAK_FLOPS if k in name), None)


def train_flops(text, lengths, n_sup):
    """Model FLOPs of one forward + backward over sequences of `lengths` tokens with n_sup supervised positions:
      6 x (matmul parameters of the decoder blocks) x tokens      2 FLOPs per multiply-add, x3 for forward + backward
    + 6 x d x V x n_sup                                           lm_head runs at supervised positions only
    + 6 x L x n_heads x head_dim x sum(T^2)                       causal attention: QK^T and AV are each T^2/2 x hd
                                                                  multiply-adds per head forward, x2 FLOPs, x3
    Recomputation (activation checkpointing) and the frozen ViT's forward are not counted: MFU counts the model's work.
    """
    d, hd, L = text.hidden_size, text.head_dim, text.num_hidden_layers
    # per block: Q and O are d x (heads x hd), K and V d x (KV heads x hd), the SwiGLU MLP three d x ffn matrices
    block = d * hd * (2 * text.num_attention_heads + 2 * text.num_key_value_heads) + 3 * d * text.intermediate_size
    lengths = np.asarray(lengths, dtype=np.float64)
    return 6 * L * block * lengths.sum() + 6 * d * text.vocab_size * n_sup \
        + 6 * L * text.num_attention_heads * hd * (lengths ** 2).sum()


# ---------------------------------------------------------------------------------------------------------------
# ---- the loop ----


class NonFiniteLoss(prepare.DataError, FloatingPointError):
    """Raised on every rank at the same step (the flags are all-reduced first) and printed as one line: a diverged
    run is caused by its data or options, not by a bug in gap."""


def step_geometry(cfg, records, world):
    """-> (accum, total): micro-batches per rank per step, and optimizer steps in the run."""
    per_rank = cfg.global_batch // world
    if cfg.global_batch % world or per_rank % cfg.micro_batch:
        raise prepare.DataError(f"--global-batch {cfg.global_batch} must split into {world} ranks x micro-batches of "
                                f"{cfg.micro_batch}")
    steps_per_epoch = len(records) // cfg.global_batch
    if steps_per_epoch == 0:
        raise prepare.DataError(f"{cfg.data}: {len(records)} records < --global-batch {cfg.global_batch}")
    return per_rank // cfg.micro_batch, steps_per_epoch * cfg.epochs


def open_metrics(out, step, resume):
    """metrics.jsonl for appending (rank 0). On --resume, rows logged after the checkpoint's step are dropped: those
    steps run again."""
    path = out / "metrics.jsonl"
    rows = path.read_text().splitlines() if resume and path.exists() else []
    path.write_text("".join(r + "\n" for r in rows if json.loads(r)["step"] <= step))
    return open(path, "a")


def step_counts(records, cfg, step, world):
    """The step's global counts come from the plan on the host (every rank computes the same): each micro-batch's
    sums are divided by the same numbers, with no collective before the first forward.
    -> (plan, record indices of the step, supervised tokens, latents, latent spans)."""
    plan = step_plan(records, cfg, step, world)
    every = [i for micro in plan for idx in micro for i in idx]
    n_tok, n_lat = int(records.n_sup[every].sum()), int(records.n_lat[every].sum())
    return plan, every, n_tok, n_lat, n_lat / records.n_latents   # L_REPA is a mean over spans (each over its patches)


def forward_backward(wrapped, batches, records, cfg, plan, counts, step, accum, rank, world, device, autocast):
    """The `accum` micro-batches of one step on this rank: forward, loss, backward. -> the (lm, latent, valr) loss
    sums over all ranks. One collective and one host sync per step; a non-finite loss on any rank stops every rank
    here, before the optimizer step."""
    n_tok, n_lat, n_spans = counts
    sums = torch.zeros(3, dtype=torch.float64, device=device)            # lm, latent, valr loss sums (fp64: exact)
    bad = torch.zeros(world, accum, dtype=torch.float64, device=device)   # non-finite flags, one per micro-batch
    for j in range(accum):
        b = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in next(batches).items()}
        # DDP all-reduces gradients inside backward(): skip it on every micro-batch but the last (FSDP2 and one
        # process have no no_sync; FSDP2 reduce-scatters per backward, which accumulation needs anyway)
        sync = j == accum - 1 or not isinstance(wrapped, nn.parallel.DistributedDataParallel)
        with wrapped.no_sync() if not sync else contextlib.nullcontext(), autocast:
            lm_sum, lat_sum, valr_sum = wrapped(b, records.pad_id, cfg.scheduled_sampling)
            # divide the sums by the step's global counts, not per micro-batch: with masked SFT and accumulation a
            # mean of micro-batch means over-weights short responses. Gradients are then summed over ranks.
            loss = lm_sum / max(n_tok, 1) + cfg.lambda_latent * lat_sum / max(n_lat, 1) \
                + cfg.repa_weight * valr_sum / max(n_spans, 1)
            loss.backward()
        part = torch.stack([lm_sum.detach(), lat_sum.detach(), valr_sum.detach()]).double()
        sums += part
        # on the device: no host sync per micro-batch
        bad[rank, j] = (~torch.isfinite(torch.cat([part, loss.detach()[None].double()])).all()).double()
    flat = all_sum(torch.cat([sums, bad.flatten()]), world).tolist()
    flags = np.asarray(flat[3:]).reshape(world, accum)
    if flags.any():   # every rank sees the same flags, so every rank stops here
        r, j = (int(x) for x in np.argwhere(flags)[0])
        raise NonFiniteLoss(
            f"non-finite loss at step {step} (rank {r}, micro-batch {j}), batch ids "
            f"{[records.ids[i] for i in plan[j][r]]}: lm {flat[0]} latent {flat[1]}; the last good checkpoint "
            f"is in {Path(cfg.out)}/checkpoints (train.py --resume continues from it)")
    return flat[:3]


def log_step(metrics, bar, cfg, gap, records, step, total, sums, counts, every, gnorm, lr, dt, world, device):
    """One metrics.jsonl row per step (rank 0: metrics is None elsewhere), a log line every --log-every steps."""
    n_tok, n_lat, n_spans = counts
    lm, lat, valr = sums[0] / max(n_tok, 1), sums[1] / max(n_lat, 1), sums[2] / max(n_spans, 1)
    tok_s = float(records.length[every].sum()) / dt
    peak, cuda = peak_flops(device), device.type == "cuda"
    # MFU = model FLOPs of the step (all ranks) / (seconds x peak FLOP/s x ranks); see train_flops
    mfu = train_flops(gap.vlm.cfg.text, records.length[every], n_tok) / (dt * peak * world) if peak else None
    mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else None
    if metrics is None:
        return
    metrics.write(json.dumps(dict(step=step, lm_loss=lm, latent_loss=lat, valr_loss=valr, lr=lr, grad_norm=gnorm,
                                  tokens_per_s=tok_s, mfu=mfu, peak_mem_gib=mem, latents_fed=n_lat)) + "\n")
    metrics.flush()
    if step % cfg.log_every == 0 or step == total:
        fields = [f"step {step}/{total}", f"lm {lm:.4f}", f"latent {lat:.4f}"]
        fields += [f"valr {valr:.4f}"] if cfg.repa_layer >= 0 else []
        fields += [f"lr {lr:.2e}", f"{tok_s:.0f} tok/s"] + ([f"mfu {mfu:.1%}"] if mfu else [])
        fields += ([f"peak {mem:.1f} GiB"] if cuda else []) + [f"eta {(total - step) * dt:.0f}s"]
        bar.write(" | ".join(fields))


def setup_line(gap, records, cfg, world, accum, total, device):
    """The start-up line: parameter counts, records, how a step splits over ranks and micro-batches."""
    n_params = sum(p.numel() for p in gap.parameters())
    n_train = sum(p.numel() for p in gap.parameters() if p.requires_grad)
    return (f"params {n_params / 1e6:.2f}M ({n_train / 1e6:.2f}M trained) | records {len(records)} "
            f"({sum(records.strip)} stripped by tau={cfg.tau}) | {world} rank(s) x {accum} accumulation x "
            f"micro-batch {cfg.micro_batch} = {cfg.global_batch} | {total} steps | {device}")


def save_or_stop(gap, opt, cfg, step, total, rank, world, device):
    """Checkpoints inside the run: every --save-every steps, and before an early stop (--stop-after: -> True)."""
    if cfg.save_every and step % cfg.save_every == 0 and step < total:
        save_checkpoint(gap, opt, cfg, step, rank, world, device)
    if cfg.stop_after and step >= cfg.stop_after and step < total:
        save_checkpoint(gap, opt, cfg, step, rank, world, device)
        print0(f"stopped after step {step} (--stop-after); continue with --resume", rank=rank)
        return True
    return False


def main(cfg):
    # ---- setup: processes, records, batch geometry, model and optimizer, resume ----
    prepare.check_options(cfg)
    owned = not dist.is_initialized()
    rank, world, device = dist_init(cfg)
    torch.manual_seed(cfg.seed)
    records = Records(cfg.data, cfg.tau)
    check_inputs(cfg)
    accum, total = step_geometry(cfg, records, world)
    gap, wrapped, opt, basis = build(cfg, records, device, world)
    print0(setup_line(gap, records, cfg, world, accum, total, device), rank=rank)
    step = load_checkpoint(gap, opt, cfg, rank, device) if cfg.resume else 0
    cuda = device.type == "cuda"
    # DDP / one GPU: bf16 autocast over fp32 weights; FSDP2 casts per unit instead (MixedPrecisionPolicy); CPU: fp32
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda and not cfg.fsdp)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = open_metrics(out, step, cfg.resume) if rank == 0 else None
    batches = iter(loader(MicroBatches(records, cfg, gap.vlm.cfg, rank, world), step, cfg, pin=cuda))
    bar = tqdm(total=total, initial=step, disable=rank != 0, desc="train", dynamic_ncols=True)

    # ---- training loop: one iteration is one optimizer step over `accum` micro-batches on each of `world` ranks ----
    while step < total:
        t0 = time.time()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        plan, every, *counts = step_counts(records, cfg, step, world)
        for g in opt.param_groups:   # warmup then cosine, the same factor for the backbone and the head group
            g["lr"] = g["base_lr"] * lr_factor(step, total, cfg.warmup_ratio)
        sums = forward_backward(wrapped, batches, records, cfg, plan, counts, step, accum, rank, world, device,
                                autocast)
        # clip on the global gradient norm (DDP: identical on every rank after the all-reduce; FSDP2: DTensor gradients,
        # so the norm is taken over all shards)
        gnorm = float(nn.utils.clip_grad_norm_(gap.parameters(), cfg.grad_clip))
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        log_step(metrics, bar, cfg, gap, records, step, total, sums, counts, every, gnorm, opt.param_groups[0]["lr"],
                 time.time() - t0, world, device)
        bar.update(1)
        if save_or_stop(gap, opt, cfg, step, total, rank, world, device):
            break
    else:   # the loop ran to the end: a final checkpoint (unless this step has one), then the loadable export
        if latest_checkpoint(cfg.out) is None or latest_checkpoint(cfg.out)[0] != step:
            save_checkpoint(gap, opt, cfg, step, rank, world, device)
        export(gap, cfg, records, basis, rank, device)
        print0(f"wrote {out} (model, tokenizer, latent head, PCA basis, gap.json)", rank=rank)

    # ---- teardown ----
    bar.close()
    del batches   # stops the DataLoader's workers
    if metrics:
        metrics.close()
    if owned and dist.is_initialized():
        dist.destroy_process_group()
    return gap


if __name__ == "__main__":
    prepare.run_main(lambda argv: main(parse_args(argv)))
