"""Training that a user can trust: Noise2Noise and Noise2Void on particle stacks.

- Noise2Noise (Lehtinen et al. 2018; seeds 002/003): the network maps one noisy copy to the other
  (L2). Validation loss: the same loss on held-out pairs, E|f(a) - b|^2 = E|f(a) - x|^2 + sigma^2,
  so it ranks models exactly as the true error does.
- Noise2Void (Krull et al. 2019): single noisy images; a few % of pixels are replaced (by a random
  neighbour, or with N2V2's `median` by the median of their neighbourhood, against checkerboard
  artefacts) and the loss is taken on those pixels only. Validation: the same masked loss on
  held-out images (again the true error plus sigma^2 in expectation, for pixel-independent noise).

Training samples square crops with flips and 90-degree rotations: by default the whole box
(``crop=0``), which keeps every particle centred where it was picked, so the network learns that
the box's edges are background and cleans them (P10, 64 px, SNR 0.1: N2N 23.8 dB on random 48-px
crops, 25.8 on whole boxes); a smaller crop is cheaper per step for large boxes. A
checkpoint is written atomically after every epoch (weights, architecture, optimiser, epoch, RNG
states, history) and `resume=True` continues from it; the best model by validation loss is kept
as model.pt; early stopping ends training after `patience` epochs without improvement.
Mixed precision (bfloat16 autocast) is used on CUDA.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from cryosift.denoise.model_io import load_checkpoint, save_checkpoint, save_model
from cryosift.denoise.networks import UNet, UNetConfig, snr_condition
from cryosift.errors import CryosiftError
from cryosift.malloc import keep_freed_memory
from cryosift.progress import progress

log = logging.getLogger("cryosift")


@dataclass
class TrainConfig:
    """Resolved training parameters (recorded in the model folder)."""

    method: str = "n2v"  # "n2n" or "n2v"
    epochs: int = 30
    batch_size: int = 32
    crop: int = 0  # px; 0 = the whole box (see the module docstring)
    lr: float = 1e-3
    val_fraction: float = 0.1
    patience: int = 5
    steps_per_epoch: int | None = None  # default: one pass over the training images
    mask_fraction: float = 0.02  # N2V: fraction of pixels masked per crop
    n2v_replace: str = "uniform"  # N2V: "uniform" neighbour or "median" (N2V2)
    seed: int = 0
    depth: int = 4
    width: int = 16
    # weight each image's loss by 1 / (variance of its noisy input): every image counts alike
    # whatever its SNR and scale (for training sets that mix SNRs, like the general model's)
    per_image_weight: bool = False
    # exponential moving average of the weights (Polyak averaging); 0 = off. Validation and
    # model.pt use the averaged weights, which smooth out the gradient noise of noisy targets.
    ema: float = 0.0
    # N2N: each training pair is used in either direction (a -> b or b -> a, at random per
    # image), so the network sees both noise realisations as inputs: twice the training inputs
    swap_pairs: bool = True
    # learning rate: "plateau" halves it after 2 epochs without validation progress; "cosine"
    # decays it to 0 over all epochs x steps, so the last steps average out the gradient noise
    # (no reliance on a validation loss that, at SNR 0.01, is itself noisy to ~5%)
    schedule: str = "plateau"
    # condition the U-Net on the stack's SNR (1) or not (0): for training sets that mix SNRs
    conditions: int = 0
    # s.d. of Gaussian noise added to each training image's condition value at every step (in
    # the units of networks.snr_condition: 0.2 ~ a factor 1.5 in SNR), so that a network trained
    # on a few discrete SNRs responds smoothly to the SNRs between and around them
    condition_jitter: float = 0.0
    # start from this model's weights (a folder, .pt or shipped name such as "general") and
    # fine-tune them on the stack; its architecture replaces depth, width and conditions
    init: str = ""
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.method not in ("n2n", "n2v"):
            raise CryosiftError(f"unknown training method {self.method!r} (n2n or n2v)")
        if self.epochs < 1 or self.batch_size < 1 or self.crop < 0 or 0 < self.crop < 8:
            raise CryosiftError(
                "--epochs and --batch-size must be >= 1 and the crop 0 (whole box) or >= 8 px"
            )
        if not 0 < self.val_fraction < 0.5:
            raise CryosiftError("--val-fraction must lie in (0, 0.5)")
        if self.n2v_replace not in ("uniform", "median"):
            raise CryosiftError("--n2v-replace must be uniform or median")
        if not 0 < self.mask_fraction < 0.5:
            raise CryosiftError("--mask-fraction must lie in (0, 0.5)")
        if self.schedule not in ("plateau", "cosine"):
            raise CryosiftError("--schedule must be plateau or cosine")
        if not 0 <= self.ema < 1:
            raise CryosiftError("--ema must lie in [0, 1)")
        if not (0 <= self.condition_jitter < 10):
            raise CryosiftError("condition_jitter must lie in [0, 10)")
        if self.conditions not in (0, 1):
            raise CryosiftError("conditions must be 0 or 1 (the stack's SNR)")


def batch_for_box(box: int, crop: int = 0, per_64px: int = 32, least: int = 8) -> int:
    """Batch size for crops of ``crop`` px (0: the whole ``box``) that holds about as many
    pixels as ``per_64px`` crops of 64 px (never fewer than ``least`` images), so a step
    costs about the same at any box size."""
    c = box if crop <= 0 else min(crop, box)
    return max(least, round(per_64px * (64 / c) ** 2)) if c > 64 else per_64px


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flip and 90-degree rotation of a whole batch (same for paired stacks: caller)."""
    k = int(torch.randint(0, 4, (1,), generator=gen))
    x = torch.rot90(x, k, dims=(-2, -1))
    if bool(torch.randint(0, 2, (1,), generator=gen)):
        x = torch.flip(x, dims=(-1,))
    return x


def _crops(
    stacks: list[np.ndarray], idx: np.ndarray, crop: int, gen: torch.Generator
) -> list[torch.Tensor]:
    """The same random crop (and augmentation) of images idx from each stack: (B, 1, c, c);
    ``crop`` 0 (or >= the box): the whole images."""
    box = stacks[0].shape[-1]
    c = box if crop <= 0 else min(crop, box)
    y0 = torch.randint(0, box - c + 1, (len(idx),), generator=gen)
    x0 = torch.randint(0, box - c + 1, (len(idx),), generator=gen)
    rows = y0[:, None] + torch.arange(c)[None]
    cols = x0[:, None] + torch.arange(c)[None]
    out = []
    state = gen.get_state()
    for s in stacks:
        t = torch.as_tensor(np.asarray(s[idx], dtype=np.float32))
        t = t[torch.arange(len(idx))[:, None, None], rows[:, :, None], cols[:, None, :]]
        gen.set_state(state)  # identical augmentation for every stack of the pair
        out.append(_augment(t, gen)[:, None])
    return out


def _swap_pairs(batch: list[torch.Tensor], gen: torch.Generator) -> list[torch.Tensor]:
    """Exchange input and target of a random half of the pairs: both are noisy copies of the
    same image with independent noise, so b -> a is as valid a Noise2Noise pair as a -> b."""
    a, b = batch
    flip = (torch.rand(len(a), generator=gen) < 0.5)[:, None, None, None]
    return [torch.where(flip, b, a), torch.where(flip, a, b)]


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    """Reflect indices that fall off [0, n-1] back into it (-1 -> 1, n -> n-2)."""
    i = i.abs()
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)


def n2v_mask(
    x: torch.Tensor, fraction: float, mode: str, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blind-spot input and mask: `fraction` of pixels replaced by a random neighbour (within a
    5x5 window, never itself) or, for `median`, the median of their 3x3 neighbourhood without
    the centre (N2V2). Returns (masked input, boolean mask)."""
    b, _, h, w = x.shape
    mask = torch.rand(x.shape, generator=gen) < fraction
    if mode == "median":
        pad = F.pad(x, (1, 1, 1, 1), mode="reflect")
        patches = pad.unfold(2, 3, 1).unfold(3, 3, 1).reshape(b, 1, h, w, 9)
        ring = torch.cat([patches[..., :4], patches[..., 5:]], dim=-1)
        repl = ring.median(dim=-1).values
    else:
        dy = torch.randint(-2, 3, x.shape, generator=gen)
        dx = torch.randint(-2, 3, x.shape, generator=gen)
        same = (dy == 0) & (dx == 0)
        dx = torch.where(same, torch.ones_like(dx), dx)
        # reflect at the borders (never clamp: that would map a pixel onto itself)
        yy = _reflect(torch.arange(h)[None, None, :, None] + dy, h)
        xx = _reflect(torch.arange(w)[None, None, None, :] + dx, w)
        bi = torch.arange(b)[:, None, None, None].expand_as(yy)
        repl = x[bi, torch.zeros_like(yy), yy, xx]
    return torch.where(mask, repl, x), mask


def _loss(
    model,
    cfg: TrainConfig,
    batch: list[torch.Tensor],
    gen: torch.Generator,
    device: torch.device,
    cond: torch.Tensor | None = None,
) -> torch.Tensor:
    """The method's loss on a batch, averaged per image first (weighted by 1 / variance of the
    noisy input with ``per_image_weight``).

    The weight depends only on the input, whose noise is independent of the target's, so for
    Noise2Noise the minimiser stays E[clean | input] pixel by pixel (Lehtinen et al. 2018's
    argument holds for any input-dependent weight); for Noise2Void, the variance of a whole
    crop barely depends on the 2% of pixels that are masked. ``cond``: the images' condition
    values (B, conditions) for a conditioned U-Net."""
    x = batch[0].to(device)
    if cond is not None:
        cond = cond.to(device)
    if cfg.method == "n2n":
        err = (model(x, cond) - batch[1].to(device)) ** 2
        per_image = err.mean(dim=(1, 2, 3))
    else:
        inp, mask = n2v_mask(batch[0], cfg.mask_fraction, cfg.n2v_replace, gen)
        mask = mask.to(device).float()
        err = (model(inp.to(device), cond) - x) ** 2 * mask
        per_image = err.sum(dim=(1, 2, 3)) / mask.sum(dim=(1, 2, 3)).clamp_min(1)
    if cfg.per_image_weight:
        # i.e. the loss in units of each input's own standard deviation (~1 for noisy images)
        return (per_image / x.float().var(dim=(1, 2, 3)).clamp_min(1e-12)).mean()
    if cfg.method == "n2v":  # every masked pixel counts alike (as before weights existed)
        return err.sum() / mask.sum().clamp_min(1)
    return per_image.mean()


class WeightAverage:
    """Exponential moving average of a model's parameters (Polyak averaging).

    The decay ramps up as min(decay, (1 + t) / (10 + t)) so the early average is not dominated
    by the random initial weights. ``swap()`` exchanges the live and averaged weights (for
    validation and saving), and swapping again restores training.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.model, self.decay, self.steps = model, decay, 0
        self.shadow = [p.detach().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for s, p in zip(self.shadow, self.model.parameters(), strict=True):
            s.lerp_(p.detach(), 1 - d)

    @torch.no_grad()
    def swap(self) -> None:
        for s, p in zip(self.shadow, self.model.parameters(), strict=True):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError("weight average does not match the model")
        for s, t in zip(self.shadow, state["shadow"], strict=True):
            s.copy_(t)


def train_denoiser(
    images: np.ndarray,
    model_dir: Path,
    cfg: TrainConfig,
    images_b: np.ndarray | None = None,
    device: torch.device | str = "cpu",
    resume: bool = False,
    pixel_size: float | None = None,
    provenance: dict | None = None,
    snr: np.ndarray | float | None = None,
) -> dict:
    """Train a denoiser on `images` (and `images_b` for N2N) into `model_dir`; returns a summary.

    A conditioned U-Net (``cfg.conditions``, or an ``cfg.init`` model that is) is given each
    image's SNR: ``snr`` per image (N,) or for the whole stack, estimated from the stack when
    None. With ``cfg.init`` the network starts from that model's weights and architecture (cfg's
    depth, width and conditions are set from it).

    model_dir holds checkpoint.pt (every epoch), model.pt (best weights + architecture), and
    training.json (parameters, per-epoch history, best epoch, timing).
    """
    cfg.validate()
    init_state = _adopt_init(cfg) if cfg.init else None
    keep_freed_memory()  # every step's activations and gradients reuse the heap (malloc.py)
    device = torch.device(device)
    if cfg.method == "n2n":
        if images_b is None:
            raise CryosiftError("n2n needs a second noisy copy of every image (--pairs)")
        if images_b.shape != images.shape:
            raise CryosiftError(f"pairs differ: {images.shape} vs {images_b.shape}")
    n = len(images)
    if n < 4:
        raise CryosiftError(f"need at least 4 images to train, got {n}")
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(cfg.seed).permutation(n)
    n_val = max(1, int(round(cfg.val_fraction * n)))
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    stacks = [images] if cfg.method == "n2v" else [images, images_b]
    cond = _condition_values(cfg, images, snr)

    torch.manual_seed(cfg.seed)
    model = UNet(_architecture(cfg))
    if init_state is not None:
        model.load_state_dict(init_state)
    model = model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    steps = cfg.steps_per_epoch or max(1, len(train_idx) // cfg.batch_size)
    if cfg.schedule == "cosine":
        total_steps = cfg.epochs * steps
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total_steps) / total_steps))
        )
    else:
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=2)
    gen = torch.Generator().manual_seed(cfg.seed)
    average = WeightAverage(model, cfg.ema) if cfg.ema > 0 else None
    start_epoch, history, best = 0, [], (math.inf, -1)
    ckpt_path = model_dir / "checkpoint.pt"
    if resume:
        if not ckpt_path.is_file():
            raise CryosiftError("--resume: no checkpoint.pt in the model folder", model_dir)
        ck = load_checkpoint(ckpt_path)
        # --epochs and --patience may change on resume (train on for more epochs); nothing else
        extendable = ("epochs", "patience")
        saved = ck["train_config"]
        if not isinstance(saved, dict) or {
            k: v for k, v in saved.items() if k not in extendable
        } != {k: v for k, v in asdict(cfg).items() if k not in extendable}:
            raise CryosiftError(
                "--resume: the checkpoint was trained with other parameters", ckpt_path
            )
        try:
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            if average is not None:
                average.load_state_dict(ck["weight_average"])
            gen.set_state(ck["generator"])
            torch.set_rng_state(ck["torch_rng"])
            start_epoch, history = int(ck["epoch"]) + 1, list(ck["history"])
            best = (float(ck["best_val"]), int(ck["best_epoch"]))
        except Exception as exc:  # a damaged or hand-made checkpoint: any of these may fail
            detail = " ".join(str(exc).split()) or type(exc).__name__
            raise CryosiftError(f"--resume: corrupt checkpoint ({detail})", ckpt_path) from exc
        log.info("resuming from epoch %d", start_epoch)

    autocast = device.type == "cuda"
    t0 = time.time()
    val_gen_seed = cfg.seed + 1_000_003
    for epoch in range(start_epoch, cfg.epochs):
        if best[1] >= 0 and epoch - best[1] > cfg.patience:
            log.info("early stop: no validation improvement for %d epochs", cfg.patience)
            break
        model.train()
        total = 0.0
        for _ in progress(range(steps), total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}"):
            pick = train_idx[
                torch.randint(0, len(train_idx), (cfg.batch_size,), generator=gen).numpy()
            ]
            pick = np.sort(pick)
            batch = _crops(stacks, pick, cfg.crop, gen)
            if cfg.method == "n2n" and cfg.swap_pairs:
                batch = _swap_pairs(batch, gen)
            c = None if cond is None else torch.from_numpy(cond[pick])
            if c is not None and cfg.condition_jitter:
                c = c + cfg.condition_jitter * torch.randn(c.shape, generator=gen)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = _loss(model, cfg, batch, gen, device, c)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if average is not None:
                average.update()
            if cfg.schedule == "cosine":
                sched.step()
            total += float(loss.detach())
        if average is not None:
            average.swap()  # validate and save the averaged weights
        val = validation_loss(model, cfg, stacks, val_idx, device, val_gen_seed, cond=cond)
        if cfg.schedule == "plateau":
            sched.step(val)
        history.append(
            {
                "epoch": epoch,
                "train_loss": total / steps,
                "val_loss": val,
                "lr": opt.param_groups[0]["lr"],
                "seconds": time.time() - t0,
            }
        )
        log.info("epoch %d: train %.5g, validation %.5g", epoch + 1, total / steps, val)
        if val < best[0]:
            best = (val, epoch)
            save_model(model_dir / "model.pt", model, _meta(cfg, pixel_size, images.shape[-1]))
        if average is not None:
            average.swap()  # back to the live weights, which the optimiser state belongs to
        save_checkpoint(
            ckpt_path,
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "generator": gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "epoch": epoch,
                "history": history,
                "best_val": best[0],
                "best_epoch": best[1],
                "train_config": asdict(cfg),
                **({"weight_average": average.state_dict()} if average is not None else {}),
            },
        )
    summary = {
        "train_config": asdict(cfg),
        "history": history,
        "best_epoch": best[1],
        "best_val_loss": best[0],
        "n_train": int(len(train_idx)),
        "n_val": int(n_val),
        "seconds": time.time() - t0,
        "device": str(device),
        "provenance": provenance or {},
    }
    from cryosift.io.atomic import atomic_write_json

    atomic_write_json(model_dir / "training.json", summary)
    return summary


def _meta(cfg: TrainConfig, pixel_size: float | None, box: int) -> dict:
    return {
        "method": cfg.method,
        "architecture": _architecture(cfg).to_dict(),
        "pixel_size": pixel_size,
        "train_box": box,
        **({"init": cfg.init} if cfg.init else {}),
    }


def _architecture(cfg: TrainConfig) -> UNetConfig:
    return UNetConfig(depth=cfg.depth, width=cfg.width, conditions=cfg.conditions)


def _adopt_init(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The weights of the ``cfg.init`` model; cfg takes its architecture."""
    from cryosift.denoise.model_io import load_model

    model, meta = load_model(cfg.init)
    if not isinstance(model, UNet):
        raise CryosiftError(f"--init {cfg.init}: not a U-Net denoiser (n2n/n2v/general)")
    cfg.depth, cfg.width = model.config.depth, model.config.width
    cfg.conditions = model.config.conditions
    return model.state_dict()


def _condition_values(
    cfg: TrainConfig, images: np.ndarray, snr: np.ndarray | float | None
) -> np.ndarray | None:
    """(N, 1) float32 condition values of a conditioned U-Net (None otherwise)."""
    if not cfg.conditions:
        return None
    if snr is None:
        from cryosift.denoise.cwf import estimate_snr

        snr = estimate_snr(images)
        log.info("estimated SNR of the training stack: %.4g", snr)
    values = np.broadcast_to(np.asarray(snr, dtype=np.float64), (len(images),))
    if not np.isfinite(values).all():
        raise CryosiftError("the SNR of every training image must be a finite number")
    return np.fromiter((snr_condition(v) for v in values), np.float32, len(values))[:, None]


@torch.no_grad()
def validation_loss(
    model,
    cfg: TrainConfig,
    stacks: list[np.ndarray],
    idx: np.ndarray,
    device: torch.device,
    seed: int,
    batch: int = 64,
    cond: np.ndarray | None = None,
) -> float:
    """The method's own loss on held-out images (whole images, fixed masks for N2V)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for start in range(0, len(idx), batch):
        sel = idx[start : start + batch]
        tensors = [torch.as_tensor(np.asarray(s[sel], dtype=np.float32))[:, None] for s in stacks]
        c = None if cond is None else torch.from_numpy(cond[sel])
        loss = _loss(model, cfg, tensors, gen, device, c)
        total += float(loss) * len(sel)
        count += len(sel)
    return total / count
