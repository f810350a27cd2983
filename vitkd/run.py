"""Run plumbing for main.py: the accelerator, the output dir, building everything, logging, checkpoints, export."""
from __future__ import annotations

import csv
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from .build import (BatchMixer, build_data, build_distiller, build_optimizer, build_scheduler, build_student,
                    build_teacher, scaled_lr, student_data_spec)
from .config import Config, ConfigError

__all__ = ['make_accelerator', 'prepare_output_dir', 'build_run', 'Run', 'MetricLogger', 'save_checkpoint',
           'export_student', 'eval_student', 'format_heads', 'summary_table']

RUN_MARKER = 'config.yaml'


def make_accelerator(cfg: Config) -> Accelerator:
    """Accelerator with the run's precision and accumulation; one CPU process uses every core."""
    if cfg.mixed_precision == 'fp16' and not torch.cuda.is_available():
        raise ConfigError('--mixed-precision fp16 needs a GPU; on CPU use bf16 or no')
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum_steps,
                              cpu=not torch.cuda.is_available())
    if accelerator.device.type == 'cpu' and accelerator.num_processes == 1:
        torch.set_num_threads(os.cpu_count() or 1)  # `accelerate launch` sets OMP_NUM_THREADS=1 by default
    set_seed(cfg.seed + accelerator.process_index)
    return accelerator


def prepare_output_dir(cfg: Config, accelerator: Accelerator) -> Path:
    """The run dir; refuse one that already holds a run unless --resume or --overwrite (nothing is deleted)."""
    if cfg.output_dir is None:
        methods = '+'.join(m.split(':')[0] if isinstance(m, str) else m.get('name', 'm') for m in cfg.distill)
        cfg.output_dir = str(Path('output') / f'{cfg.student.replace("/", "_")}-{methods}-{time.strftime("%Y%m%d-%H%M%S")}')
    out = Path(cfg.output_dir)
    if (out / RUN_MARKER).exists() and not (cfg.resume or cfg.overwrite):
        raise ConfigError(f'--output-dir {out} already holds a run; pass --resume auto to continue it, --overwrite '
                          'to train into it anyway, or another --output-dir')
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return out


@dataclass
class Run:
    """Everything a training run is made of."""
    student: torch.nn.Module        # unwrapped student (for evaluation and export)
    teacher: Any
    distiller: Any                  # prepared (possibly DDP-wrapped) Distiller
    distiller_unwrapped: Any
    optimizer: Any
    scheduler: Any
    train_loader: Any
    val_loader: Any
    mixer: BatchMixer
    spec: Any
    state: Any
    ema: Any
    lr: float
    global_batch: int
    student_params: int


def build_run(cfg: Config, accelerator: Accelerator) -> Run:
    from engine import TrainState
    probe = build_student(cfg, num_classes=1)  # only for the data config (input size, mean/std)
    input_size, mean, std, _ = student_data_spec(cfg, probe)
    del probe
    train_loader, val_loader, spec = build_data(cfg, input_size, mean, std, accelerator.num_processes)
    student = build_student(cfg, spec.num_classes)
    teacher = build_teacher(cfg, spec.num_classes, mean, std)
    if teacher is not None:
        teacher.to(accelerator.device)
    steps_per_epoch = max(1, len(train_loader) // (accelerator.num_processes * cfg.grad_accum_steps))
    distiller = build_distiller(cfg, student, teacher, spec, len(train_loader.dataset), steps_per_epoch,
                                accelerator.num_processes)
    global_batch = cfg.batch_size * accelerator.num_processes * cfg.grad_accum_steps
    lr = scaled_lr(cfg, global_batch)
    optimizer = build_optimizer(cfg, distiller, lr)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    ema = None
    if cfg.model_ema:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(student, decay=cfg.model_ema_decay, device=accelerator.device)
    distiller, optimizer, train_loader, val_loader = accelerator.prepare(distiller, optimizer, train_loader, val_loader)
    accelerator.register_for_checkpointing(scheduler)
    state = TrainState(max_steps=cfg.max_steps)
    accelerator.register_for_checkpointing(state)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    unwrapped = accelerator.unwrap_model(distiller)
    return Run(student=unwrapped.student, teacher=teacher, distiller=distiller, distiller_unwrapped=unwrapped,
               optimizer=optimizer, scheduler=scheduler, train_loader=train_loader, val_loader=val_loader,
               mixer=BatchMixer(cfg, spec.num_classes), spec=spec, state=state, ema=ema, lr=lr,
               global_batch=global_batch, student_params=sum(p.numel() for p in unwrapped.student.parameters()))


class MetricLogger:
    """Per-step and per-epoch records as JSONL (``log.jsonl``) and CSV (``epochs.csv``) in the run dir."""

    def __init__(self, out_dir: Path, accelerator: Accelerator):
        self.out_dir, self.main = out_dir, accelerator.is_main_process
        self.jsonl = open(out_dir / 'log.jsonl', 'a') if self.main else None

    def step(self, record: dict) -> None:
        if self.jsonl:
            self.jsonl.write(json.dumps({'kind': 'step', **record}) + '\n')
            self.jsonl.flush()

    def epoch(self, epoch: int, train: dict, val: dict) -> None:
        if not self.main:
            return
        record = {'epoch': epoch, **{f'train_{k}': v for k, v in train.items()}, **{f'val_{k}': v for k, v in val.items()}}
        self.jsonl.write(json.dumps({'kind': 'epoch', **record}) + '\n')
        self.jsonl.flush()
        path = self.out_dir / 'epochs.csv'
        rows = list(csv.DictReader(path.open())) if path.exists() else []
        rows.append({k: str(v) for k, v in record.items()})
        fields = sorted({k for r in rows for k in r}, key=lambda k: (k != 'epoch', k))
        with path.open('w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    def finish(self) -> None:
        if self.jsonl:
            self.jsonl.close()


def save_checkpoint(r: Run, out_dir: Path, accelerator: Accelerator) -> Path:
    """Full training state through Accelerate, written to a temporary folder then renamed (never half-written)."""
    final = out_dir / 'checkpoints' / f'epoch_{r.state.epoch:04d}'
    tmp = final.with_name(final.name + '.tmp')
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def export_student(r: Run, out_dir: Path, accelerator: Accelerator, metrics: dict) -> Path:
    """The student alone in timm's format (config.json + model.safetensors), no distillation parts."""
    from timm.models import save_for_hf
    export = out_dir / 'student'
    if accelerator.is_main_process:
        student = r.student
        cfg = dict(getattr(student, 'pretrained_cfg', {}) or {})
        cfg.update(mean=list(r.spec.mean), std=list(r.spec.std), input_size=list(r.spec.input_size),
                   num_classes=r.spec.num_classes)
        student.pretrained_cfg = cfg
        save_for_hf(student, export, safe_serialization=True)
    accelerator.wait_for_everyone()
    return export


def format_heads(metrics: dict) -> str:
    parts = [f'{h} {metrics[f"{h}_top1"]:.2f}%' for h in ('cls', 'dist', 'avg') if f'{h}_top1' in metrics]
    if 'ema_avg_top1' in metrics:
        parts.append(f'ema avg {metrics["ema_avg_top1"]:.2f}%')
    return 'top-1 ' + ', '.join(parts)


def summary_table(cfg: Config, summary: dict) -> str:
    s, t = summary['student'], summary['teacher']
    rows = [('teacher', f'{t["teacher_top1"]:.2f}' if t else '-', f'{t["teacher_top5"]:.2f}' if t else '-')]
    for head in ('cls', 'dist', 'avg'):
        if f'{head}_top1' in s:
            rows.append((f'student {head}', f'{s[f"{head}_top1"]:.2f}', f'{s[f"{head}_top5"]:.2f}'))
    lines = [f'{"":<14}{"top-1":>8}{"top-5":>8}'] + [f'{a:<14}{b:>8}{c:>8}' for a, b, c in rows]
    lines.append(f'{summary["epochs_run"]} epochs, {summary["steps"]} steps, {summary["train_seconds"]:.0f} s '
                 f'({summary["stop_reason"]})')
    return '\n'.join(lines)


def eval_student(cfg: Config, accelerator: Accelerator) -> int:
    """--eval-student: evaluate an exported/saved student on the validation set."""
    raise ConfigError('--eval-student is not available yet')
