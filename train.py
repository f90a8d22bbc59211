"""
GAP training: LM loss + lambda_latent x latent MSE (Eq. 2) with teacher forcing, on a prepared folder.

    python prepare.py synthetic --out data/synthetic        # once: tiny model + data, no download
    python train.py                                          # tiny model on data/synthetic (CPU is fine)
    python train.py --global-batch 16 --micro-batch 16 --lr 5e-3 --head-lr 5e-3 --epochs 8   # `make demo`
    torchrun --standalone --nproc_per_node=8 train.py --data DIR --model CKPT [--fsdp] [--compile]

One process runs the same code as torchrun (RANK / LOCAL_RANK / WORLD_SIZE). Defaults are the paper's: AdamW lr 1e-5
(head 1e-5), weight decay 0.01 on matrices, cosine schedule with 3% warmup, global batch 128, micro-batch 1, 2 epochs,
bf16 autocast on CUDA, seed 12345. The output folder is a loadable checkpoint for sample.py and eval.py.

Teacher forcing (DESIGN "Latent loop"): the input at latent pad j is the target v_j; the head reads h̄ at the
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
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import latent_head as lh
import model as qm
import prepare
import sample


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
    compile: bool = field(default=False, metadata={"help": "torch.compile each decoder block"})
    fsdp: bool = field(default=False,
                       metadata={"help": "FSDP2: shard params/grads/optimizer per decoder block (7B on 80 GB)"})
    activation_checkpointing: bool = field(default=False, metadata={"help": "recompute each block in backward"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    save_every: int = field(default=0, metadata={"min": 0, "help": "checkpoint every N steps (0: only at the end)"})
    resume: bool = field(default=False, metadata={"help": "continue from OUT/checkpoints/last exactly"})
    allow_config_change: bool = field(default=False, metadata={
        "help": "with --resume: continue although options that change the result differ from the checkpoint's"})
    stop_after: int = field(default=0,
                            metadata={"min": 0,
                                      "help": "stop after this many steps (simulates an interruption; 0: run all)"})
    seed: int = 12345
    log_every: int = field(default=1, metadata={"min": 1, "help": "print a log line every N steps"})


def parse_args(argv=None):
    p = prepare.Parser(description=__doc__)
    prepare.add_options(p, TrainConfig)   # one flag per field (the same generator as every gap script)
    return TrainConfig(**vars(p.parse_args(argv)))


# ---------------------------------------------------------------------------------------------------------------
# ---- distributed (torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; one process runs the same code) ----


def dist_init(cfg):
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    cuda = torch.cuda.is_available() if cfg.device == "auto" else cfg.device == "cuda"
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    return rank, world, device


def all_sum(x, world):
    if world > 1:
        dist.all_reduce(x)
    return x


def print0(*a, rank=0, **k):
    if rank == 0:
        print(*a, **k, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# ---- data: prepared records, latent targets, stripping by tau ----


class Records:
    """The prepared folder: records.jsonl (token ids, labels, image path) and targets-*.safetensors (per record id,
    (n_spans, N, d)). Spans of records with accuracy > tau are stripped here, so any tau reuses one folder."""

    def __init__(self, folder, tau):
        folder = Path(folder)
        if not (folder / "records.jsonl").exists():
            hint = " (run `python prepare.py synthetic --out data/synthetic` first)" if "synthetic" in str(folder) else ""
            raise FileNotFoundError(f"{folder}/records.jsonl not found: not a prepared folder{hint}")
        self.folder, self.tau = folder, tau
        try:   # prepare.py writes the manifest last: without it the build did not finish
            self.manifest = json.loads((folder / "manifest.json").read_text())
            ids = self.manifest["latent_ids"]
            self.start_id, self.pad_id, self.end_id = ids["start"], ids["pad"], ids["end"]
            self.n_latents = self.manifest["n_latents"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise prepare.data_error(folder / "manifest.json", "manifest", "expected the manifest of a finished "
                                     f"`prepare.py build`, found {type(e).__name__}: {e}") from None
        self.pixels = (self.manifest.get("image_min_pixels", 56 * 56), self.manifest.get("image_max_pixels", 28 * 28 * 1280))
        self.records, self.where, seen, path = [], {}, {}, folder / "records.jsonl"
        for line_no, line in prepare.jsonl_lines(path):
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise prepare.data_error(path, "json", f"expected valid JSON, found an error ({e})", line=line_no)
            for key in ("id", "image", "input_ids", "labels"):
                if key not in r:
                    raise prepare.data_error(path, key, "expected a value, found it missing", line=line_no)
            bad = lambda name, what: prepare.data_error(path, name, what, line=line_no, rid=r["id"])
            if len(r["input_ids"]) != len(r["labels"]):
                raise bad("labels", f"expected {len(r['input_ids'])} labels like input_ids, found {len(r['labels'])}")
            if r["id"] in seen:   # ids key the targets: a repeated one would train on another record's latents
                raise bad("id", f"expected a unique id, found the id of line {seen[r['id']]} again")
            seen[r["id"]] = line_no
            self.records.append(r)
        for shard in self.manifest["shards"]:
            with qm.open_safetensors(folder / shard) as f:
                self.where.update({k: folder / shard for k in f.keys()})
        # external encoder features (VaLR's REPA targets): {name: {record id: shard}}, (n_spans, P, d) per record
        self.external = {name: {} for name in self.manifest.get("external", {})}
        for name, ext in self.manifest.get("external", {}).items():
            for shard in ext["shards"]:
                with qm.open_safetensors(folder / shard) as f:
                    self.external[name].update({k: folder / shard for k in f.keys()})
        self.strip = [tau < 0 or (r.get("accuracy") is not None and r["accuracy"] > tau) for r in self.records]

    def __len__(self):
        return len(self.records)

    def get(self, i):
        """-> dict(input_ids, labels (T,), image path, targets (n_latents_total, d) float32 or None, external
        {name: (n_spans, P, d) float32} or None). A --layout valr folder has no targets: its latents are fed back."""
        r = self.records[i]
        ids, labels = torch.tensor(r["input_ids"]), torch.tensor(r["labels"])
        n_spans = int((ids == self.start_id).sum())
        if self.strip[i] or n_spans == 0:
            keep = (ids != self.start_id) & (ids != self.pad_id) & (ids != self.end_id)
            return dict(id=r["id"], input_ids=ids[keep], labels=labels[keep], image=r["image"], targets=None,
                        external=None)
        external = {}
        for name, where in self.external.items():
            with qm.open_safetensors(where[r["id"]]) as f:
                external[name] = f.get_tensor(r["id"]).float()                  # (n_spans, P, d)
            if external[name].shape[0] != n_spans:
                raise prepare.DataError(f"{self.folder}: record {r['id']!r} has {n_spans} spans but external '{name}' "
                                        f"features of shape {tuple(external[name].shape)}")
        if not self.manifest["shards"]:
            return dict(id=r["id"], input_ids=ids, labels=labels, image=r["image"], targets=None, external=external)
        if r["id"] not in self.where:
            raise prepare.DataError(f"{self.folder}: record {r['id']!r} has {n_spans} latent span(s) but no targets "
                                    f"tensor")
        with qm.open_safetensors(self.where[r["id"]]) as f:
            t = f.get_tensor(r["id"])                                        # (n_spans, N, d) bf16
        n_pads = int((ids == self.pad_id).sum())
        if t.shape[0] != n_spans or t.shape[0] * t.shape[1] != n_pads:
            raise prepare.DataError(f"{self.folder}: record {r['id']!r} has {n_spans} spans / {n_pads} latent pads but "
                                    f"targets of shape {tuple(t.shape)}")
        return dict(id=r["id"], input_ids=ids, labels=labels, image=r["image"], targets=t.flatten(0, 1).float(),
                    external=external)


def collate(examples, fill_id, pixels=(56 * 56, 28 * 28 * 1280)):
    """Right-pad a micro-batch: with causal attention no real token ever sees the padding, so no mask is needed."""
    T = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), T), fill_id, dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    mask = torch.zeros(len(examples), T, dtype=torch.long)
    pv, grids, targets = [], [], []
    for b, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[b, :n], labels[b, :n], mask[b, :n] = e["input_ids"], e["labels"], 1
        p, g = qm.preprocess_image(e["image"], *pixels)   # the limits prepare.py counted image tokens with
        pv.append(p)
        grids.append(g)
        if e["targets"] is not None:
            targets.append(e["targets"])
    d = dict(input_ids=ids, labels=labels, attention_mask=mask, pixel_values=torch.cat(pv),
             image_grid_thw=torch.cat(grids), ids=[e["id"] for e in examples])
    d["targets"] = torch.cat(targets) if targets else None
    ext = [e["external"] for e in examples if e["external"]]
    d["external"] = {name: torch.cat([x[name] for x in ext]) for name in ext[0]} if ext else {}   # (n_spans, P, d)
    return d


def step_indices(n, cfg, step, world):
    """The examples of optimizer step `step` (epoch-wise permutations from the seed): a pure function of the step,
    so resuming needs only the step number. Each rank takes every world-th example of the global batch."""
    steps_per_epoch = n // cfg.global_batch
    epoch, s = divmod(step, steps_per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
    return perm[s * cfg.global_batch:(s + 1) * cfg.global_batch]


# ---------------------------------------------------------------------------------------------------------------
# ---- the model being trained: the VLM, the latent head, and (optionally) VaLR's REPA projectors ----


class GAP(nn.Module):
    def __init__(self, vlm, head, projectors=None, repa_layer=-1, n_latents=1, latent_loss="mean"):
        super().__init__()
        self.vlm, self.head, self.repa_layer, self.n_latents = vlm, head, repa_layer, n_latents
        self.valr = nn.ModuleDict(projectors) if projectors else None   # {encoder name ("gap": ViT targets): psi}
        self.latent_loss = latent_loss   # mean | sum over the d dims of one latent (see lh.latent_loss)

    def forward(self, batch, pad_id, ss_prob=0.0):
        """-> (lm_sum, latent_sum, valr_sum): sums over this micro-batch (valr_sum over latent spans); the caller
        divides by global counts."""
        m, ids = self.vlm, batch["input_ids"]
        x = m.embed(ids, batch["pixel_values"], batch["image_grid_thw"])   # (B, T, D)
        pos, _ = m.position_ids(ids, batch["image_grid_thw"], batch["attention_mask"])
        lat = ids == pad_id                                                 # (B, T) latent pads
        prev = F.pad(lat[:, 1:], (0, 1))                                    # (B, T) the position before each pad
        v = batch["targets"]                                                # (n_lat, d) in row-major order
        if v is not None:
            if ss_prob > 0:
                # scheduled sampling: a no-grad teacher-forced pass predicts every latent, then a random subset of
                # the inputs is replaced by those detached predictions for the pass that is trained
                with torch.no_grad():
                    h0 = m.decode(x.masked_scatter(lat[..., None], v.to(x.dtype)), pos)
                    v_own = self.head(h0[prev]).float()
                pick = torch.rand(v.shape[0], device=v.device) < ss_prob
                v_in = torch.where(pick[:, None], v_own, v)
            else:
                v_in = v
            x = x.masked_scatter(lat[..., None], v_in.to(x.dtype))          # teacher forcing: input at pad j is v_j
        elif bool(lat.any()):
            # no targets (a --layout valr folder): output-as-input, the latents generation would feed, each the
            # head's feedback from h̄ before it, rolled out without grad through the KV cache with the text as given
            x = x.masked_scatter(lat[..., None], sample.rollout_latents(m, self.head, x, pos, lat).to(x.dtype))
        use_valr = self.valr is not None
        h, layers = m.decode(x, pos, return_layers=True) if use_valr else (m.decode(x, pos), None)
        logits = m.lm_head(h[:, :-1]).float()                               # (B, T-1, V): predicts token t+1
        lm_sum = F.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100,
                                 reduction="sum")
        if v is None:   # every span stripped, or no targets (VaLR: no latent MSE): run the head on no rows, so
            v = h.new_zeros(0, h.shape[-1], dtype=torch.float32)            # DDP/FSDP still see its parameters used
        v_hat = self.head(h[prev] if v.shape[0] else h[:, :0].flatten(0, 1))   # Eq. 1, (n_lat, d) fp32
        lat_sum = lh.latent_loss(v_hat, v, reduction="sum", over_d=self.latent_loss)   # Eq. 2, summed over latents
        valr_sum = h.new_zeros((), dtype=torch.float32)
        if use_valr:
            # REPA: latent j's features are the --repa-layer state where it is produced (the position before pad j,
            # as for the head), K per span; "gap" aligns to the aux-image ViT targets, the others to --external ones
            K = self.n_latents
            feats = layers[self.repa_layer][prev].view(-1, K, h.shape[-1])   # (n_spans, K, D)
            ext = batch["external"]
            targets = {n: (v.view(-1, K, v.shape[-1]) if n == "gap" else ext[n].to(h.device) if n in ext
                           else h.new_zeros(0, 1, p.d_target)) for n, p in self.valr.items()}   # (n_spans, P, d)
            valr_sum = lh.repa_loss(feats, targets, self.valr, reduction="sum")
        return lm_sum, lat_sum, valr_sum


def build(cfg, records, device, rank, world):
    vlm = qm.load_pretrained(cfg.model, dtype=torch.float32, device=device)   # fp32 master weights; bf16 autocast
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
    if cfg.activation_checkpointing:
        for layer in vlm.model.layers:   # recompute each block in backward; state_dict keys stay the same
            layer.forward = (lambda f: lambda *a: checkpoint(f, *a, use_reentrant=False))(layer.forward)
    if cfg.compile:
        for layer in vlm.model.layers:   # in-place Module.compile keeps the uncompiled names for saving
            layer.compile()
    gap = GAP(vlm, head, projectors, cfg.repa_layer, records.n_latents, cfg.latent_loss)
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard
        for layer in vlm.model.layers:
            fully_shard(layer)
        fully_shard(gap)
        wrapped = gap
    elif world > 1:
        wrapped = nn.parallel.DistributedDataParallel(gap, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        wrapped = gap
    # two parameter groups (backbone lr, head lr), weight decay on matrices only (not norms, biases)
    groups = []
    for params, lr in ((vlm.parameters(), cfg.lr), ([*head.parameters(), *(gap.valr.parameters() if gap.valr else [])], cfg.head_lr)):
        params = [p for p in params if p.requires_grad]
        groups += [dict(params=[p for p in params if p.dim() >= 2], lr=lr, weight_decay=cfg.weight_decay),
                   dict(params=[p for p in params if p.dim() < 2], lr=lr, weight_decay=0.0)]
    groups = [g for g in groups if g["params"]]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, fused=device.type == "cuda")
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
    warmup = max(1, math.ceil(total * warmup_ratio))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ---------------------------------------------------------------------------------------------------------------
# ---- checkpoints: atomic, complete, resumable ----


def full_state(gap, opt, cfg):
    """Full (unsharded) model and optimizer state dicts; opt may be None."""
    if cfg.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        if opt is None:
            return get_model_state_dict(gap, options=options), None
        return get_state_dict(gap, opt, options=options)
    return gap.state_dict(), opt.state_dict() if opt is not None else None


def save_checkpoint(gap, opt, cfg, step, rank):
    model_sd, opt_sd = full_state(gap, opt, cfg)
    if rank != 0:
        return
    root = Path(cfg.out) / "checkpoints"
    tmp, final = root / f"tmp-{step}", root / "last"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model_sd.items()
               if not (k == "vlm.lm_head.weight" and gap.vlm.cfg.tie_word_embeddings)}, tmp / "model.safetensors")
    rng = dict(torch=torch.get_rng_state())   # all training randomness (scheduled sampling) draws from torch
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(dict(optimizer=opt_sd, step=step, rng=rng, config=dataclasses.asdict(cfg)), tmp / "state.pt")
    old = root / "old"
    if final.exists():
        final.rename(old)       # swap, then delete: a crash leaves either the old or the new one whole
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(gap, opt, cfg):
    root = Path(cfg.out) / "checkpoints" / "last"
    if not (root / "state.pt").exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {root}")
    with qm.open_safetensors(root / "model.safetensors") as f:
        model_sd = {k: f.get_tensor(k) for k in f.keys()}
    if gap.vlm.cfg.tie_word_embeddings:
        model_sd["vlm.lm_head.weight"] = model_sd["vlm.model.embed_tokens.weight"]
    # weights_only: optimizer tensors, ints, floats and RNG byte tensors only; nothing in it is ever executed
    state = read_state(root / "state.pt")
    if cfg.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
        set_state_dict(gap, opt, model_state_dict=model_sd, optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
    else:
        gap.load_state_dict(model_sd, strict=True)
        opt.load_state_dict(state["optimizer"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state["step"]


def export(gap, cfg, records, basis, rank):
    """The final folder: HF-layout model + tokenizer + latent head + PCA basis + gap.json (what sample.py reads)."""
    model_sd, _ = full_state(gap, None, cfg)   # with FSDP a collective that gathers the shards: every rank joins
    if rank != 0:
        return
    out = Path(cfg.out)
    qm.save_pretrained(gap.vlm, out, state_dict={k[4:]: v for k, v in model_sd.items() if k.startswith("vlm.")})
    # tokenizer (with the latent tokens), chat template, processor and generation configs: a complete hub folder
    prepare.write_hub_files(out, prepare.load_tokenizer(cfg.data), gap.vlm.cfg, records.pixels, base=cfg.model)
    if cfg.latent_head != "raw":   # a plain CPU copy of the head, filled from the full state
        head = lh.make_head(cfg.latent_head, gap.vlm.cfg.text.hidden_size, basis)
        head.load_state_dict({k[5:]: v for k, v in model_sd.items() if k.startswith("head.")}, strict=True)
        lh.save_head(head, out / "latent_head.safetensors")
    if basis is not None:
        basis.save(out / "pca.safetensors")
    gap_json = dict(latent_head=cfg.latent_head, n_latents=records.n_latents, tau=cfg.tau,
                    latent_ids=dict(start=records.start_id, pad=records.pad_id, end=records.end_id),
                    vision_norm=records.manifest.get("target_norm"), lambda_latent=cfg.lambda_latent, latent_loss=cfg.latent_loss,
                    image_min_pixels=records.pixels[0], image_max_pixels=records.pixels[1])
    (out / "gap.json").write_text(json.dumps(gap_json, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# ---- inputs that must agree: output paths, tokenizer, the config of the run being resumed ----

# Options that do not change what a run computes: where it writes, how often it saves or logs, how it is executed
# (activation checkpointing and FSDP are exact; the device changes rounding only). Any other difference between a
# checkpoint's config and the resuming run's would silently splice two different runs together.
RESUME_FREE = ("out", "resume", "allow_config_change", "save_every", "stop_after", "log_every", "device", "compile",
               "activation_checkpointing", "fsdp")


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
    state = Path(cfg.out) / "checkpoints" / "last" / "state.pt"
    if cfg.resume and state.is_file():   # mmap: reads the config, not the optimizer tensors
        check_resume_config(cfg, read_state(state, mmap=True).get("config", {}), state)


# ---------------------------------------------------------------------------------------------------------------
# ---- the loop ----

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}   # dense bf16


def main(cfg):
    prepare.check_options(cfg)
    rank, world, device = dist_init(cfg)
    torch.manual_seed(cfg.seed)
    records = Records(cfg.data, cfg.tau)
    check_inputs(cfg)
    per_rank = cfg.global_batch // world
    if cfg.global_batch % world or per_rank % cfg.micro_batch:
        raise prepare.DataError(f"--global-batch {cfg.global_batch} must split into {world} ranks x micro-batches of "
                         f"{cfg.micro_batch}")
    accum = per_rank // cfg.micro_batch
    steps_per_epoch = len(records) // cfg.global_batch
    if steps_per_epoch == 0:
        raise prepare.DataError(f"{cfg.data}: {len(records)} records < --global-batch {cfg.global_batch}")
    total = steps_per_epoch * cfg.epochs
    gap, wrapped, opt, basis = build(cfg, records, device, rank, world)
    n_params = sum(p.numel() for p in gap.parameters())
    n_train = sum(p.numel() for p in gap.parameters() if p.requires_grad)
    print0(f"params {n_params / 1e6:.2f}M ({n_train / 1e6:.2f}M trained) | records {len(records)} "
           f"({sum(records.strip)} stripped by tau={cfg.tau}) | {world} rank(s) x {accum} accumulation x "
           f"micro-batch {cfg.micro_batch} = {cfg.global_batch} | {total} steps | {device}", rank=rank)
    fill_id = gap.vlm.cfg.bos_token_id   # <|endoftext|>, Qwen's pad token, fills the right padding
    step = load_checkpoint(gap, opt, cfg) if cfg.resume else 0
    # bf16 autocast on CUDA over fp32 master weights (the heads compute in fp32 inside); plain fp32 on CPU
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    peak = next((v for k, v in PEAK_FLOPS.items() if device.type == "cuda" and k in torch.cuda.get_device_name()), None)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = open(out / "metrics.jsonl", "a" if cfg.resume else "w") if rank == 0 else None
    bar = tqdm(total=total, initial=step, disable=rank != 0, desc="train", dynamic_ncols=True)
    while step < total:
        t0 = time.time()
        idx = step_indices(len(records), cfg, step, world)[rank::world]
        micro = [collate([records.get(i) for i in idx[j:j + cfg.micro_batch]], fill_id, records.pixels)
                 for j in range(0, len(idx), cfg.micro_batch)]
        # global counts first, so every micro-batch's sum is divided by the same number (STYLE 17)
        counts = torch.tensor([sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro),
                               sum(int((b["input_ids"] == records.pad_id).sum()) for b in micro)],   # latents
                              dtype=torch.float64, device=device)
        n_tok, n_lat = all_sum(counts, world).tolist()
        n_spans = n_lat / records.n_latents   # L_REPA is a mean over spans (each the mean over its patches)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(step, total, cfg.warmup_ratio)
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        for j, b in enumerate(micro):
            b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
            sync = j == len(micro) - 1 or not isinstance(wrapped, nn.parallel.DistributedDataParallel)
            ctx = wrapped.no_sync() if not sync else contextlib.nullcontext()   # all-reduce on the last only
            with ctx, autocast:
                lm_sum, lat_sum, valr_sum = wrapped(b, records.pad_id, cfg.scheduled_sampling)
                loss = lm_sum / max(n_tok, 1) + cfg.lambda_latent * lat_sum / max(n_lat, 1) \
                    + cfg.repa_weight * valr_sum / max(n_spans, 1)
                # DDP averages gradients over ranks; the loss is already a global mean, so undo that average
                (loss * (world if world > 1 and not cfg.fsdp else 1)).backward()
            sums += torch.stack([lm_sum.detach(), lat_sum.detach(), valr_sum.detach()]).double()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at step {step}, batch ids {b['ids']}: lm {lm_sum.item()} "
                                         f"latent {lat_sum.item()}; the last good checkpoint is in {out}/checkpoints")
        if cfg.fsdp and world > 1:   # FSDP2 reduce-scatters with an average; the loss is a global mean already
            for p in gap.parameters():
                if p.grad is not None:
                    p.grad.mul_(world)
        gnorm = nn.utils.clip_grad_norm_(gap.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        sums = all_sum(sums, world)
        lm, lat, valr = sums[0].item() / max(n_tok, 1), sums[1].item() / max(n_lat, 1), sums[2].item() / max(n_spans, 1)
        dt = time.time() - t0
        tok_s = sum(int(b["attention_mask"].sum()) for b in micro) * world / dt
        mfu = 6 * n_train * tok_s / (peak * world) if peak else None
        row = dict(step=step, lm_loss=lm, latent_loss=lat, valr_loss=valr, lr=opt.param_groups[0]["lr"],
                   grad_norm=float(gnorm), tokens_per_s=tok_s, mfu=mfu, n_latents=int(n_lat))
        if rank == 0:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            if step % cfg.log_every == 0 or step == total:
                eta = (total - step) * dt
                bar.write(f"step {step}/{total} | lm {lm:.4f} | latent {lat:.4f}" + (f" | valr {valr:.4f}" if
                          cfg.repa_layer >= 0 else "") + f" | lr {row['lr']:.2e} | {tok_s:.0f} tok/s" +
                          (f" | mfu {mfu:.1%}" if mfu else "") + f" | eta {eta:.0f}s")
        bar.update(1)
        if cfg.save_every and step % cfg.save_every == 0 and step < total:
            save_checkpoint(gap, opt, cfg, step, rank)
        if cfg.stop_after and step >= cfg.stop_after and step < total:
            save_checkpoint(gap, opt, cfg, step, rank)
            print0(f"stopped after step {step} (--stop-after); continue with --resume", rank=rank)
            break
    else:
        save_checkpoint(gap, opt, cfg, step, rank)
        export(gap, cfg, records, basis, rank)
        print0(f"wrote {out} (model, tokenizer, latent head, PCA basis, gap.json)", rank=rank)
    bar.close()
    if metrics:
        metrics.close()
    if world > 1:
        dist.destroy_process_group()
    return gap


if __name__ == "__main__":
    prepare.run_main(lambda argv: main(parse_args(argv)))
