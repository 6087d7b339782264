"""Train the embedded default model: a tiny VQ tokenizer and a tiny AiM on scikit-learn's handwritten digits.

    python scripts/train_digits.py --out aim_rt/data/digits            # CPU: a few minutes
    python scripts/train_digits.py --out /tmp/digits --device cuda     # faster on a GPU

Data: load_digits (1,797 8x8 images, 10 classes), upsampled to 32x32, dark ink on white, three channels, with
random small affine jitter (shift, rotation, scale) as augmentation. Stage 1: a VQ tokenizer of the LlamaGen
family (ch 32, ch_mult (1, 1, 1): 32x32 → 8x8 = 64 tokens, 128 l2-normalised codes), trained with an L2 +
codebook + commitment loss and dead-code restarts. Stage 2: an AiM (Mamba2 blocks, adaLN-group, null class for
CFG, raster order, position embeddings) trained with teacher forcing through the reference model's chunked path
and 10% label dropout. Stage 2 is trained in the position convention the default (official) sampler uses, token
k at position k + 1, so that sampling with the official semantics is consistent with training.

Everything is seeded; the run log and final numbers are written beside the checkpoint (train_log.json).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from aim_rt.config import AiMConfig, VQConfig
from aim_rt.loading import attach_vq, random_model, save_model
from aim_rt.vq import VQModel

IMAGE = 32
STAGE2 = AiMConfig(d_model=128, n_layer=4, vocab_size=128, num_classes=10, num_tokens=64, adaln_group=True,
                   num_groups=2, d_state=32, headdim=32)
TOKENIZER = VQConfig(n_embed=128, embed_dim=8, z_channels=32, ch=32, ch_mult=(1, 1, 1), num_res_blocks=1)
SAMPLING = {"cfg_scale": 2.0, "top_k": 0, "top_p": 0.9, "temperature": 1.0}


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, 32, 32) in [-1, 1] (white background, dark ink) and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # ink in [0, 1]
    x = F.interpolate(x, size=(IMAGE, IMAGE), mode="bilinear", align_corners=False)
    x = 1.0 - 2.0 * x.clamp(0, 1)  # ink -1, paper +1
    return x.repeat(1, 3, 1, 1), torch.tensor(d.target, dtype=torch.long)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Small random affine jitter; the border is paper (+1)."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=g) - 0.5) * math.radians(20)
    scale = 1 + (torch.rand(n, generator=g) - 0.5) * 0.2
    shift = (torch.rand(n, 2, generator=g) - 0.5) * 0.25
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x - 1, grid, align_corners=False, padding_mode="zeros") + 1


def quantize(vq: VQModel, x: torch.Tensor):
    z = F.normalize(vq.quant_conv(vq.encoder(x)), dim=1)
    codes = vq.codebook()
    ids = torch.einsum("bchw,nc->bnhw", z, codes).argmax(1)
    zq = codes[ids].permute(0, 3, 1, 2)
    return z, zq, ids


def train_vq(x, steps, batch, device, g, log):
    torch.manual_seed(0)
    vq = VQModel(TOKENIZER).to(device)
    opt = torch.optim.Adam(vq.parameters(), lr=2e-3)
    usage = torch.zeros(TOKENIZER.n_embed, device=device)
    for step in range(1, steps + 1):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        xb = augment(x[idx], g).to(device)
        z, zq, ids = quantize(vq, xb)
        rec = vq.decode_latent(z + (zq - z).detach())
        loss_rec = F.mse_loss(rec, xb)
        loss = loss_rec + F.mse_loss(zq, z.detach()) + 0.25 * F.mse_loss(z, zq.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
        usage = 0.99 * usage + 0.01 * torch.bincount(ids.flatten(), minlength=TOKENIZER.n_embed).float()
        if step % 100 == 0 and step < steps * 0.8:  # restart dead codes on random encoder outputs
            dead = (usage < 1e-3).nonzero().flatten()
            if len(dead):
                pool = z.detach().permute(0, 2, 3, 1).reshape(-1, TOKENIZER.embed_dim)
                pick = torch.randint(0, pool.shape[0], (len(dead),), generator=g).to(device)
                with torch.no_grad():
                    vq.quantize.embedding.weight[dead] = pool[pick]
                usage[dead] = 1.0
        if step % 200 == 0 or step == steps:
            log({"stage": "vq", "step": step, "rec_mse": round(loss_rec.item(), 5), "codes_used": int((usage > 1e-3).sum())})
    return vq.eval()


def train_stage2(tokenize, x, y, steps, batch, device, g, log, copies=16):
    # Tokenize `copies` augmented versions of the data set once; steps then draw from that table.
    table = torch.cat([torch.cat([tokenize(augment(x[i:i + 512], g).to(device)) for i in range(0, len(x), 512)])
                       for _ in range(copies)])
    table_labels = y.repeat(copies)
    log({"stage": "aim", "tokenized_sequences": int(table.shape[0])})
    model = random_model(STAGE2, seed=0).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    n = STAGE2.num_tokens
    for step in range(1, steps + 1):
        idx = torch.randint(0, table.shape[0], (batch,), generator=g)
        tokens = table[idx.to(device)]
        labels = table_labels[idx].to(device)
        drop = torch.rand(batch, generator=g).to(device) < 0.1  # label dropout: learn the null class for CFG
        labels = torch.where(drop, torch.full_like(labels, STAGE2.null_class), labels)
        cond = model.class_embedding(labels)
        # The default sampler's convention: token k at position k + 1.
        hidden = torch.cat([cond.unsqueeze(1), model.embed_tokens(tokens[:, :-1], torch.arange(1, n, device=device))], 1)
        logits, _ = model.forward_sequence(hidden, model.modulations(cond))
        loss = F.cross_entropy(logits.reshape(-1, STAGE2.vocab_size), tokens.reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps:
            log({"stage": "aim", "step": step, "loss": round(loss.item(), 4), "lr": round(sched.get_last_lr()[0], 6)})
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("aim_rt/data/digits"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--vq-steps", type=int, default=800)
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    records, t0 = [], time.time()

    def log(rec):
        rec["seconds"] = round(time.time() - t0, 1)
        records.append(rec)
        print(json.dumps(rec), flush=True)

    x, y = digits()
    vq = train_vq(x, args.vq_steps, args.batch, args.device, g, log)
    with torch.no_grad():
        _, _, ids = quantize(vq, x.to(args.device))
        rec = vq.decode_tokens(ids.flatten(1))
        vq_mse = F.mse_loss(rec, x.to(args.device)).item()
    t_vq = time.time() - t0

    def tokenize(images):
        with torch.no_grad():
            return quantize(vq, images)[2].flatten(1)

    model = train_stage2(tokenize, x, y, args.steps, args.batch, args.device, g, log)
    with torch.no_grad():
        tokens = tokenize(x.to(args.device))
        cond = model.class_embedding(y.to(args.device))
        n = STAGE2.num_tokens
        hidden = torch.cat([cond.unsqueeze(1), model.embed_tokens(tokens[:, :-1], torch.arange(1, n, device=args.device))], 1)
        logits, _ = model.forward_sequence(hidden, model.modulations(cond))
        nll = F.cross_entropy(logits.reshape(-1, STAGE2.vocab_size), tokens.reshape(-1)).item()

    model = model.cpu()
    attach_vq(model, vq.cpu())
    save_model(model, args.out, SAMPLING)
    summary = {
        "device": args.device, "torch": torch.__version__, "seed": args.seed,
        "vq_steps": args.vq_steps, "steps": args.steps, "batch": args.batch,
        "vq_seconds": round(t_vq, 1), "total_seconds": round(time.time() - t0, 1),
        "vq_recon_mse_clean_set": round(vq_mse, 5), "aim_nll_clean_set": round(nll, 4),
        "stage2_params": sum(p.numel() for n_, p in model.named_parameters() if not n_.startswith("vq.")),
        "vq_params": sum(p.numel() for p in model.vq.parameters()),
        "position_convention_trained": "official (token k at position k + 1)",
        "sampling_defaults": SAMPLING,
    }
    (args.out / "train_log.json").write_text(json.dumps({"summary": summary, "log": records}, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    sys.exit(main())
