"""Evaluation: top-1/top-5 of the student's heads and of the frozen teacher on a validation loader."""
from __future__ import annotations

import torch

from .models import student_head_logits

__all__ = ['evaluate', 'evaluate_teacher']


def _topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> torch.Tensor:
    """[B, len(ks) + 1] 0/1: label within the top-k of each row, then whether the row counts (label ≥ 0: an
    unreadable validation image comes with label -1, see :class:`vitkd.data.EvalDataset`)."""
    kmax = min(max(ks), logits.shape[-1])
    hit = logits.topk(kmax, dim=-1).indices == labels[:, None]  # [B, kmax]
    return torch.stack([*(hit[:, :min(k, kmax)].any(dim=-1) for k in ks), labels >= 0], dim=-1).float()


@torch.no_grad()
def evaluate(student, loader, accelerator) -> dict:
    """Top-1/top-5 (%) of the class head, the distillation head and their average (the DeiT metric).

    ``student`` is an unwrapped timm model. Per-sample hits are gathered with ``gather_for_metrics`` so each
    validation sample is counted once whatever the number of processes. Students without a distillation head
    report ``cls`` only (= ``avg``).
    """
    student.eval()
    hits = {'cls': [], 'dist': [], 'avg': []}
    for images, labels in loader:
        with accelerator.autocast():
            final = student.forward_features(images)
            z_cls, z_dist = student_head_logits(student, final)
        z_cls = z_cls.float()
        heads = {'cls': z_cls}
        if z_dist is not None:
            heads['dist'] = z_dist.float()
            heads['avg'] = (z_cls + z_dist.float()) / 2
        for name, logits in heads.items():
            hits[name].append(accelerator.gather_for_metrics(_topk_correct(logits, labels)))
    return _summarise(hits)


def _summarise(hits: dict) -> dict:
    out = {}
    for name, parts in hits.items():
        if not parts:
            continue
        h = torch.cat(parts)
        if not h[:, -1].all():
            out['unreadable'] = int((h[:, -1] == 0).sum())
            h = h[h[:, -1] > 0]  # gathered first (equal shapes on every process), then the unreadable images dropped
        out[f'{name}_top1'] = 100.0 * h[:, 0].mean().item()
        out[f'{name}_top5'] = 100.0 * h[:, 1].mean().item()
        out['samples'] = h.shape[0]
    if 'avg_top1' not in out and 'cls_top1' in out:
        out['avg_top1'], out['avg_top5'] = out['cls_top1'], out['cls_top5']
    return out


@torch.no_grad()
def evaluate_teacher(teacher, loader, accelerator) -> dict:
    """Top-1/top-5 (%) of the frozen teacher on the same validation loader."""
    hits = {'teacher': []}
    for images, labels in loader:
        with accelerator.autocast():
            logits = teacher.model(teacher.prepare_input(images)).float()
        hits['teacher'].append(accelerator.gather_for_metrics(_topk_correct(logits, labels)))
    return _summarise(hits)
