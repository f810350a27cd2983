"""Train the small teacher that vitkd ships for its embedded default (``checkpoints/fmnist_regnety_002``).

A timm ``regnety_002`` (1 input channel, 10 classes) trained from scratch on Fashion-MNIST at 28 px with light
augmentation, AdamW and a per-step cosine schedule, seeded; saved with timm's ``save_for_hf`` (config.json +
model.safetensors) so it loads through the same ``create_teacher`` path as a Hub teacher. Prints test accuracy
and wall time, and writes them to ``<out>/training.json``.

    python scripts/train_teacher.py --epochs 6 --out checkpoints/fmnist_regnety_002
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.data import create_transform
from timm.models import save_for_hf
from timm.optim import create_optimizer_v2
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vitkd.data import DATASET_STATS, build_datasets  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--arch', default='regnety_002')
    p.add_argument('--epochs', type=int, default=6)
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--lr', type=float, default=4e-3)
    p.add_argument('--weight-decay', type=float, default=0.05)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--data-path', default=None, help='Fashion-MNIST folder (default: Debian\'s files)')
    p.add_argument('--out', default='checkpoints/fmnist_regnety_002')
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    stats = DATASET_STATS['fashion_mnist']
    train_tf = create_transform(stats['input_size'], is_training=True, scale=(0.7, 1.0), ratio=(0.9, 1.1), hflip=0.5,
                                color_jitter=None, mean=stats['mean'], std=stats['std'], interpolation='bilinear')
    eval_tf = create_transform(stats['input_size'], is_training=False, crop_pct=1.0, mean=stats['mean'],
                               std=stats['std'], interpolation='bilinear')
    train, val = build_datasets('fashion_mnist', args.data_path, train_tf, eval_tf)
    gen = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(train, args.batch_size, shuffle=True, drop_last=True, generator=gen, num_workers=1)
    val_loader = DataLoader(val, 500)

    model = timm.create_model(args.arch, num_classes=stats['num_classes'], in_chans=stats['input_size'][0],
                              pretrained_cfg_overlay=dict(mean=stats['mean'], std=stats['std'],
                                                          input_size=stats['input_size'], crop_pct=1.0,
                                                          interpolation='bilinear', num_classes=stats['num_classes']))
    optimizer = create_optimizer_v2(model, 'adamw', lr=args.lr, weight_decay=args.weight_decay)
    total_steps = args.epochs * len(train_loader)
    start = time.time()
    step = 0
    for epoch in range(args.epochs):
        model.train()
        for images, labels, _ in train_loader:
            for g in optimizer.param_groups:  # per-step cosine with a 200-step linear warm-up
                g['lr'] = args.lr * min(1.0, (step + 1) / 200) * 0.5 * (1 + math.cos(math.pi * step / total_steps))
            loss = F.cross_entropy(model(images), labels, label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        acc = evaluate(model, val_loader)
        print(f'epoch {epoch}: loss {loss.item():.3f} test top-1 {acc:.2f}% ({time.time() - start:.0f}s)', flush=True)
    elapsed = time.time() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_for_hf(model, out, safe_serialization=True)
    record = dict(arch=args.arch, dataset='fashion_mnist', epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                  weight_decay=args.weight_decay, seed=args.seed, threads=args.threads, test_top1=round(acc, 2),
                  train_seconds=round(elapsed), torch=torch.__version__, timm=timm.__version__)
    (out / 'training.json').write_text(json.dumps(record, indent=2) + '\n')
    print(json.dumps(record))


@torch.no_grad()
def evaluate(model, loader) -> float:
    model.eval()
    correct = total = 0
    for images, labels in loader:
        correct += (model(images).argmax(-1) == labels).sum().item()
        total += len(labels)
    return 100.0 * correct / total


if __name__ == '__main__':
    main()
