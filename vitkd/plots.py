"""The end-of-training picture: loss terms, learning rate and accuracy curves from the run's ``log.jsonl``."""
from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = ['read_log', 'plot_run']


def read_log(path: Path) -> tuple[list[dict], list[dict]]:
    """(step records, epoch records) from a ``log.jsonl`` written by :class:`vitkd.reports.MetricLogger`."""
    steps, epochs = [], []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            (steps if record.get('kind') == 'step' else epochs).append(record)
    return steps, epochs


def plot_run(log_path: Path, out_path: Path, title: str = '') -> Path:
    """Three panels — loss terms per step, learning rate per step, top-1 per epoch (train-time eval heads) — as PNG."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    steps, epochs = read_log(log_path)
    fig, (ax_loss, ax_lr, ax_acc) = plt.subplots(1, 3, figsize=(15, 4))
    skip = {'kind', 'epoch', 'step', 'lr', 'img_per_s', 'top1'}
    terms = sorted({k for r in steps for k in r if k not in skip})
    x = [r['step'] for r in steps]
    values = []
    for term in terms:
        ys = [r.get(term, float('nan')) for r in steps]
        values += [v for v in ys if isinstance(v, (int, float)) and math.isfinite(v)]
        ax_loss.plot(x, ys, label=term)
    # a log axis needs positive values: terms that reach zero or below (a converged loss, a signed term) go linear
    log_axis = bool(values) and all(v > 0 for v in values)
    ax_loss.set(title='loss terms (unweighted)', xlabel='step', yscale='log' if log_axis else 'linear')
    if terms:
        ax_loss.legend(fontsize=7)
    ax_lr.plot(x, [r.get('lr', float('nan')) for r in steps])
    ax_lr.set(title='learning rate', xlabel='step')
    heads = sorted({k for r in epochs for k in r if k.startswith('val_') and k.endswith('_top1')})
    for head in heads:
        ax_acc.plot([r['epoch'] for r in epochs], [r.get(head, float('nan')) for r in epochs], marker='o',
                    label=head[4:].replace('_top1', ''))
    train_acc = [r.get('train_top1') for r in epochs]
    if any(v is not None for v in train_acc):
        ax_acc.plot([r['epoch'] for r in epochs], train_acc, marker='x', linestyle='--', label='train')
    ax_acc.set(title='top-1 (%)', xlabel='epoch')
    if heads:
        ax_acc.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return Path(out_path)
