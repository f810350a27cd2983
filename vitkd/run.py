"""A classification run, built: :class:`Run` (everything a training run is made of) and :func:`build_run`.

The dense tasks build the same :class:`Run` (:func:`vitkd.dense.run.build_dense_run`), so the loop, the checkpoints,
the logs and the export are shared. Around it: the accelerator (:mod:`vitkd.devices`), the run dir
(:mod:`vitkd.rundir`), the reports (:mod:`vitkd.reports`), the student export (:mod:`vitkd.export`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader

from .build import (build_data, build_distiller, build_losses, build_models, build_optimizer, build_scheduler,
                    build_student, eval_data_config, student_data_spec, use_plain_attention_if_needed)
from .config import Config, ConfigError
from .data import BatchMixer, DataSpec, dataset_targets
from .ddp import StepModule, launcher_compile_kwargs, sync_buffers_if_needed
from .devices import idle_parameters_until_of
from .distiller import Distiller, LossEntry, idle_parameters_until
from .evaluation import evaluate, evaluate_teacher
from .export import check_label_names
from .finetune import load_finetune_weights, open_source, use_source_architecture
from .losses import RunContext
from .models import Teacher
from .teacher_cache import TeacherCache
from .training import EpochBatches, TrainState
from .validate import scaled_lr

__all__ = ['Run', 'build_run']


@dataclass
class Run:
    """Everything a training run is made of."""
    student: torch.nn.Module            # unwrapped student (for evaluation and export)
    teacher: Optional[Teacher]
    distiller: torch.nn.Module          # prepared (possibly DDP-wrapped) Distiller
    distiller_unwrapped: Distiller
    optimizer: torch.optim.Optimizer    # Accelerate's wrapper of the timm optimizer
    scheduler: Scheduler
    train_loader: DataLoader            # prepared, host batches (see vitkd.training.EpochBatches)
    batches: EpochBatches
    val_loader: DataLoader
    spec: DataSpec
    state: TrainState
    ema: Optional[ModelEmaV3]
    lr: float
    global_batch: int
    steps_per_epoch: int
    student_params: int
    data_config: dict                   # the evaluation preprocessing (recorded with the exported student)
    teacher_cache: Optional[TeacherCache] = None
    step_module: Optional[StepModule] = None  # DDP's search for unused parameters while steps need it; compilation
    evaluate_student: Optional[Callable[[torch.nn.Module], dict]] = None  # validation metrics of a student model
    evaluate_teacher: Optional[Callable[[], dict]] = None                 # the teacher's own metrics ('teacher_*')
    best_metric: str = 'avg_top1'       # the validation metric checkpoints/best keeps the highest of


def build_run(cfg: Config, accelerator: Accelerator, entries: Optional[list[LossEntry]] = None) -> Run:
    """Data, models, losses, optimizer and schedule of a run, on the accelerator's device and prepared.

    Order matters on a GPU: the student and the teacher are on the device before the distiller is built (a method's
    ``setup`` probes both with one batch and builds its parts from the shapes), the distiller is on the device before
    the optimizer (fused AdamW on CUDA needs its parameters there) and the EMA copy is made after ``prepare`` (timm's
    EMA then updates with one fused kernel per step instead of falling back to per-tensor updates).
    """
    if entries is None:  # the methods, built once (main builds them first: the accelerator's DDP settings need them)
        entries = build_losses(cfg)
    use_plain_attention_if_needed(entries)
    finetune = open_source(cfg.finetune, cfg) if cfg.finetune else None
    if finetune is not None:
        use_source_architecture(cfg, finetune, accelerator.print)
    set_seed(cfg.seed)  # models and distillation parts start identical on every process (a random teacher too)
    probe = build_student(cfg, num_classes=1)  # only for the data config (input size, mean/std)
    input_size, mean, std, _ = student_data_spec(cfg, probe)
    del probe
    train_loader, val_loader, spec = build_data(cfg, input_size, mean, std, accelerator.num_processes)
    teacher, student = build_models(cfg, spec, accelerator.device, accelerator.mixed_precision)
    if finetune is not None:
        load_finetune_weights(student, finetune, accelerator.print)
    if teacher is not None:
        try:  # a warning only: a teacher may name the same classes otherwise (ImageNet synsets vs words)
            check_label_names([str(c) for c in spec.classes], (teacher.model.pretrained_cfg or {}).get('label_names'))
        except ConfigError as e:
            accelerator.print(f'warning: {e}')
    device = accelerator.device
    steps_per_epoch = max(1, len(train_loader) // (accelerator.num_processes * cfg.grad_accum_steps))
    distiller = build_distiller(cfg, student, teacher, spec, len(train_loader.dataset), steps_per_epoch,
                                accelerator.num_processes, dataset_targets(train_loader.dataset), entries)
    distiller.to(device)  # parts a method's setup built on the host
    distiller.prepare_for_run(RunContext(cfg=cfg, teacher=teacher, spec=spec, accelerator=accelerator))
    set_seed(cfg.seed + accelerator.process_index)  # per-process streams from here on (dropout, drop-path)
    global_batch = cfg.batch_size * accelerator.num_processes * cfg.grad_accum_steps
    lr = scaled_lr(cfg, global_batch)
    optimizer = build_optimizer(cfg, distiller, lr, fused=device.type == 'cuda')
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    distiller, optimizer, val_loader = accelerator.prepare(distiller, optimizer, val_loader)
    sync_buffers_if_needed(distiller)  # DDP settings and why: vitkd.ddp
    train_loader = accelerator.prepare_data_loader(train_loader, device_placement=False)
    ema = None
    if cfg.model_ema:
        ema = ModelEmaV3(accelerator.unwrap_model(distiller, keep_torch_compile=False).student,
                         decay=cfg.model_ema_decay, device=device)
    state = TrainState(max_steps=cfg.max_steps)  # scheduler, state and EMA are checkpointed by vitkd.checkpoint
    # keep_torch_compile=False: with True, Accelerate re-points a compiled wrapper at the unwrapped module (DDP lost)
    unwrapped = accelerator.unwrap_model(distiller, keep_torch_compile=False)
    teacher_cache = None
    if cfg.teacher_cache:
        teacher_cache = TeacherCache.for_run(cfg, unwrapped, accelerator, len(train_loader.dataset), spec.input_size)
    return Run(student=unwrapped.student, teacher=teacher, distiller=distiller, distiller_unwrapped=unwrapped,
               optimizer=optimizer, scheduler=scheduler, train_loader=train_loader,
               evaluate_student=lambda model: evaluate(model, val_loader, accelerator),
               evaluate_teacher=lambda: evaluate_teacher(teacher, val_loader, accelerator),
               batches=EpochBatches(train_loader, accelerator, BatchMixer(cfg, spec.num_classes), teacher_cache,
                                   cfg.epochs, cfg.log_every),
               val_loader=val_loader, spec=spec, state=state, ema=ema, lr=lr, global_batch=global_batch,
               steps_per_epoch=steps_per_epoch,
               student_params=sum(p.numel() for p in unwrapped.student.parameters()),
               data_config=eval_data_config(cfg, spec.input_size, spec.mean, spec.std), teacher_cache=teacher_cache,
               step_module=step_module(cfg, accelerator, entries))


def step_module(cfg: Config, accelerator: Accelerator, entries: list[LossEntry]) -> StepModule:
    """DDP's unused-parameter search while steps need it, and with ``--compile-student`` compilation from the first step
    that can leave no parameter idle and whose weights no longer ramp up (:mod:`vitkd.ddp` says why; a run whose every
    step can leave one idle is trained eagerly, and says so)."""
    compile_from = None
    if cfg.compile_student:
        compile_from = max(idle_parameters_until(entries, cfg.epochs, cfg.task_weight),
                           max((e.warmup_epochs for e in entries), default=0.0))
    if compile_from == math.inf:
        accelerator.print('--compile-student: every step of this run can leave a parameter without gradient, which a '
                          'compiled step would give a zero gradient instead: the module is trained eagerly')
    return StepModule(accelerator, idle_parameters_until_of(cfg, entries), compile_from, launcher_compile_kwargs())
