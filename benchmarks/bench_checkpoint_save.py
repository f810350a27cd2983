"""How long a checkpoint holds up training: a foreground save against a background one (``vitkd/async_save.py``).

A DeiT-S student (``deit_small_distilled_patch16_224`` at 32 px: DeiT-S's 22 M parameters) with VkD and EMA, after one
AdamW step (so the optimizer holds its two moments), saved ``--rounds`` times each way into a fresh run dir:

* ``foreground_s`` — ``Checkpointer.save()`` writing everything before it returns (what training waits for);
* ``background_stall_s`` — ``Checkpointer(background=True).save()``: the host copy and the RNG files, after which
  training goes on; ``background_write_s`` — the rest, on the writer thread, until ``wait()`` returns.

Reported: the median and the quartiles over the rounds of each, the checkpoint's size, the machine.

    python benchmarks/bench_checkpoint_save.py --out docs/bench/checkpoint_save.json
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common as C

import numpy as np
import torch
from PIL import Image

from vitkd.arguments import parse_args
from vitkd.checkpoint import Checkpointer
from vitkd.devices import make_accelerator
from vitkd.run import build_run


def make_data(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split in ('train', 'val'):
        for c in range(2):
            folder = root / split / f'c{c}'
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f'{i}.png')
    return root


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob('*') if p.is_file()) / 2 ** 20


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--rounds', type=int, default=7)
    p.add_argument('--out', default='output/bench_checkpoint_save.json')
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir='.') as tmp:
        tmp = Path(tmp)
        cfg, _ = parse_args(['--data-path', str(make_data(tmp / 'data')), '--input-size', '32', '--student',
                             'deit_small_distilled_patch16_224', '--student-kwargs', 'img_size=32', '--teacher',
                             'regnety_002', '--no-teacher-pretrained', '--distill', 'vkd', '--batch-size', '4',
                             '--num-workers', '0', '--model-ema', '--keep-last', '1', '--output-dir', str(tmp / 'run')])
        accelerator = make_accelerator(cfg)
        r = build_run(cfg, accelerator)
        for param in r.distiller_unwrapped.parameters():
            param.grad = torch.randn_like(param) * 1e-3
        r.optimizer.step()
        times = {'foreground_s': [], 'background_stall_s': [], 'background_write_s': []}
        size = 0.0
        for k in range(args.rounds):
            r.state.step = k + 1
            fg = Checkpointer(cfg, r, tmp / f'fg{k}', accelerator)
            start = time.perf_counter()
            saved = fg.save()
            times['foreground_s'].append(time.perf_counter() - start)
            size = folder_mb(saved)
            bg = Checkpointer(cfg, r, tmp / f'bg{k}', accelerator, background=True)
            start = time.perf_counter()
            bg.save()
            submitted = time.perf_counter()
            bg.wait()
            times['background_stall_s'].append(submitted - start)
            times['background_write_s'].append(time.perf_counter() - submitted)
            for folder in (tmp / f'fg{k}', tmp / f'bg{k}'):
                shutil.rmtree(folder)
    report = dict(setup=dict(student='deit_small_distilled_patch16_224 (32 px)', method='vkd', ema=True,
                             checkpoint_mb=round(size, 1), rounds=args.rounds, device=str(accelerator.device),
                             machine=C.machine(), date=time.strftime('%Y-%m-%d')),
                  median={k: statistics.median(v) for k, v in times.items()},
                  quartiles={k: C.quartiles(v) for k, v in times.items()}, seconds=times)
    for k, v in report['median'].items():
        low, high = report['quartiles'][k]
        print(f'{k:<20}{v:8.3f} s  [{low:.3f}–{high:.3f}]')
    print(f'checkpoint {size:.0f} MB')
    C.write_report(report, args.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
