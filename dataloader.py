"""
gap's training data: a prepared folder (`prepare.py build`) read into packed arrays, latent spans stripped by tau,
each optimizer step's records planned as a pure function of (seed, step) and balanced by length across ranks, and
micro-batches collated by DataLoader workers (images decoded, M-RoPE positions and loss indices built on the host).
train.py imports it; it runs nothing on its own.

    .venv/bin/python -m pytest -q tests/test_train.py -k "dataloader or strip or balancing"
"""
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import model
import prepare


class Records:
    """The prepared folder: records.jsonl (token ids, labels, image path) and targets-*.safetensors (per record id,
    (n_spans, N, d)). Spans of records with accuracy > tau are stripped here, so any tau reuses one folder.

    Token ids and labels are packed into two int32 numpy arrays with offsets (8 bytes per token, instead of ~70 as
    Python int lists), which DataLoader workers share with the training process copy-on-write: nothing in them is
    a Python object whose reference count a worker would touch."""

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
        # a manifest without image limits: 56x56 px (4 image tokens, one per 28x28 px) to 28x28x1280 px (1,280 tokens)
        self.pixels = (self.manifest.get("image_min_pixels", 56 * 56), self.manifest.get("image_max_pixels", 28 * 28 * 1280))
        self.ids, self.images, self.accuracy, tokens, labels, lengths = [], [], [], [], [], [0]
        self.where, seen, path = {}, {}, folder / "records.jsonl"
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
            self.ids.append(r["id"])
            self.images.append(r["image"])
            self.accuracy.append(r.get("accuracy"))
            tokens.append(np.asarray(r["input_ids"], dtype=np.int32))
            labels.append(np.asarray(r["labels"], dtype=np.int32))
            lengths.append(len(r["input_ids"]))
        self.tokens = np.concatenate(tokens) if tokens else np.zeros(0, np.int32)
        self.labels = np.concatenate(labels) if labels else np.zeros(0, np.int32)
        self.offsets = np.cumsum(lengths)                                    # record i: [offsets[i], offsets[i+1])
        for shard in self.manifest["shards"]:
            with model.open_safetensors(folder / shard) as f:
                self.where.update({k: folder / shard for k in f.keys()})
        # external encoder features (VaLR's REPA targets): {name: {record id: shard}}, (n_spans, P, d) per record
        self.external = {name: {} for name in self.manifest.get("external", {})}
        for name, ext in self.manifest.get("external", {}).items():
            for shard in ext["shards"]:
                with model.open_safetensors(folder / shard) as f:
                    self.external[name].update({k: folder / shard for k in f.keys()})
        # tau < 0 strips every span (the no-latent baseline); else a record the base model already solves more
        # often than tau is trained as plain text, and one never scored (accuracy null) keeps its spans
        self.strip = [tau < 0 or (a is not None and a > tau) for a in self.accuracy]
        # per record after stripping: tokens, supervised next-token targets, latent pads (what a step's global
        # counts, throughput and length balancing need, without loading a single image)
        self.length, self.n_sup, self.n_lat = (np.zeros(len(self), np.int64) for _ in range(3))
        for i in range(len(self)):
            ids, lab = self.raw(i)
            keep = ~np.isin(ids, (self.start_id, self.pad_id, self.end_id)) if self.strip[i] else slice(None)
            self.length[i] = len(ids[keep])
            # [1:]: position t predicts label t + 1, so the first label is never a target
            self.n_sup[i] = (lab[keep][1:] != -100).sum()
            self.n_lat[i] = 0 if self.strip[i] else (ids == self.pad_id).sum()

    def __len__(self):
        return len(self.ids)

    def raw(self, i):
        """-> (input_ids, labels) of record i as stored (before stripping), int32 numpy views."""
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.tokens[a:b], self.labels[a:b]

    def get(self, i):
        """-> dict(input_ids, labels (T,), image path, targets (n_latents_total, d) float32 or None, external
        {name: (n_spans, P, d) float32} or None). A --layout valr folder has no targets: its latents are fed back."""
        # astype copies: the shared int32 arrays stay untouched (no copy-on-write pages), and the embedding wants int64
        ids, labels = (torch.from_numpy(x.astype(np.int64)) for x in self.raw(i))
        rid, image = self.ids[i], self.images[i]
        n_spans = int((ids == self.start_id).sum())
        if self.strip[i] or n_spans == 0:
            keep = (ids != self.start_id) & (ids != self.pad_id) & (ids != self.end_id)
            return dict(id=rid, input_ids=ids[keep], labels=labels[keep], image=image, targets=None, external=None)
        external = {}
        for name, where in self.external.items():
            with model.open_safetensors(where[rid]) as f:
                external[name] = f.get_tensor(rid).float()                      # (n_spans, P, d)
            if external[name].shape[0] != n_spans:
                raise prepare.DataError(f"{self.folder}: record {rid!r} has {n_spans} spans but external '{name}' "
                                        f"features of shape {tuple(external[name].shape)}")
        if not self.manifest["shards"]:
            return dict(id=rid, input_ids=ids, labels=labels, image=image, targets=None, external=external)
        if rid not in self.where:
            raise prepare.DataError(f"{self.folder}: record {rid!r} has {n_spans} latent span(s) but no targets "
                                    f"tensor")
        with model.open_safetensors(self.where[rid]) as f:
            t = f.get_tensor(rid)                                            # (n_spans, N, d) bf16
        n_pads = int((ids == self.pad_id).sum())
        if t.shape[0] != n_spans or t.shape[0] * t.shape[1] != n_pads:
            raise prepare.DataError(f"{self.folder}: record {rid!r} has {n_spans} spans / {n_pads} latent pads but "
                                    f"targets of shape {tuple(t.shape)}")
        return dict(id=rid, input_ids=ids, labels=labels, image=image, targets=t.flatten(0, 1).float(),
                    external=external)


def collate(examples, vlm_cfg, pad_id, pixels=(56 * 56, 28 * 28 * 1280)):
    """Right-pad a micro-batch and build everything the forward needs, on the host (in a DataLoader worker): pixel
    values, M-RoPE positions, the flat indices of supervised positions and latent pads. With causal attention no real
    token ever sees the right padding, so no mask is needed."""
    T = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), T), vlm_cfg.bos_token_id, dtype=torch.long)   # <|endoftext|>, Qwen's pad
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    mask = torch.zeros(len(examples), T, dtype=torch.long)
    pv, grids, targets = [], [], []
    for b, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[b, :n], labels[b, :n], mask[b, :n] = e["input_ids"], e["labels"], 1
        p, g = model.preprocess_image(e["image"], *pixels)   # the limits prepare.py counted image tokens with
        pv.append(p)
        grids.append(g)
        if e["targets"] is not None:
            targets.append(e["targets"])
    grid = torch.cat(grids)
    pos, _ = model.get_position_ids(vlm_cfg, ids, grid, mask)                         # (3, B, T)
    # position t predicts token t+1: the LM loss reads h̄ at the positions whose next label is supervised
    sup = F.pad(labels[:, 1:] != -100, (0, 1)).flatten()                           # (B*T,)
    ext = [e["external"] for e in examples if e["external"]]
    return dict(input_ids=ids, labels=labels, attention_mask=mask, position_ids=pos, pixel_values=torch.cat(pv), image_grid_thw=grid,
                sup_pos=sup.nonzero().squeeze(1), sup_tgt=labels.flatten().roll(-1)[sup],
                latent_pos=(ids.flatten() == pad_id).nonzero().squeeze(1),          # row-major, like the targets
                targets=torch.cat(targets) if targets else None, ids=[e["id"] for e in examples],
                external={n: torch.cat([x[n] for x in ext]) for n in ext[0]} if ext else {})   # (n_spans, P, d)


def step_plan(records, cfg, step, world):
    """plan[j][r]: the records of rank r's j-th micro-batch in optimizer step `step`. A pure function of (seed, step),
    so resuming needs only the step number. Each epoch is a seeded permutation; each global batch is sorted by
    length (longest first) and dealt out so that the world x micro_batch examples of accumulation step j are
    consecutive in that order: every rank runs a micro-batch of about the same length at the same time, and FSDP's
    per-block collectives do not wait for the longest rank. Every example is used exactly once per epoch."""
    G, per = cfg.global_batch, world * cfg.micro_batch
    epoch, s = divmod(step, len(records) // G)
    perm = torch.randperm(len(records), generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
    batch = sorted(perm[s * G:(s + 1) * G], key=lambda i: -records.length[i])   # stable: ties keep perm order
    # slice j holds the j-th `per` longest; stride `world` deals it out, so rank r gets every world-th of neighbours
    return [[batch[j * per + r:(j + 1) * per:world] for r in range(world)] for j in range(G // per)]


class MicroBatches(torch.utils.data.Dataset):
    """Item k = (step, j) -> this rank's collated j-th micro-batch of that step (images decoded, positions built)."""

    def __init__(self, records, cfg, vlm_cfg, rank, world):
        self.records, self.cfg, self.vlm_cfg, self.rank, self.world = records, cfg, vlm_cfg, rank, world
        self.accum = cfg.global_batch // (world * cfg.micro_batch)

    def __len__(self):
        # whole global batches only: steps per epoch x epochs x micro-batches per step
        return len(self.records) // self.cfg.global_batch * self.cfg.epochs * self.accum

    def __getitem__(self, k):
        step, j = divmod(k, self.accum)
        idx = step_plan(self.records, self.cfg, step, self.world)[j][self.rank]
        return collate([self.records.get(i) for i in idx], self.vlm_cfg, self.records.pad_id, self.records.pixels)


def loader(data, start_step, cfg, pin):
    """Micro-batches from `start_step` on, in order: workers decode images and build positions ahead of the GPU
    (prefetch 4 micro-batches each), pinned memory lets the copy to the device overlap compute."""
    order = range(start_step * data.accum, len(data))   # the sampler: the order is a pure function of the step
    # its own generator: the DataLoader draws a worker seed when it starts, which would otherwise consume the global
    # RNG (scheduled sampling's) at a different point in a resumed run than in an uninterrupted one
    # batch_size=None: each item is already a collated micro-batch, so the DataLoader adds no batching of its own
    return torch.utils.data.DataLoader(data, batch_size=None, sampler=order, num_workers=cfg.workers, pin_memory=pin,
                                       prefetch_factor=4 if cfg.workers else None,
                                       generator=torch.Generator().manual_seed(cfg.seed))
