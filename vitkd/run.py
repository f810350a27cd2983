"""Run plumbing for main.py: the accelerator, the output dir, building everything, logging, checkpoints, export."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from timm.scheduler.scheduler import Scheduler
from torch.utils.data import DataLoader

from .build import (BatchMixer, build_data, build_distiller, build_eval_loader, build_losses, build_models,
                    build_optimizer, build_scheduler, build_student, eval_data_config, scaled_lr, student_data_spec,
                    use_plain_attention_if_needed)
from .checkpoint import CheckpointError, check_label_names, export_model, folded_student, load_student, resolve_resume
from .config import Config, ConfigError
from .cpu_malloc import tune_malloc
from .data import DataSpec, build_eval_dataset, dataset_targets
from .ddp import StepModule, ddp_kwargs, launcher_compile_kwargs, sync_buffers_if_needed
from .distiller import Distiller, LossEntry, idle_parameters_until
from .errors import RunDirError
from .evaluation import evaluate, evaluate_teacher
from .finetune import load_finetune_weights, open_source, use_source_architecture
from .hf_data import HFOptions
from .losses import RunContext
from .models import Teacher, set_fused_attention
from .plots import plot_run
from .progress import rounded, warmup_warning
from .rundir import RunFinished, RunLock, check_unlocked, check_writable, finished_state
from .teacher_cache import TeacherCache
from .training import EpochBatches, TrainState
from .validate import distill_spec

if TYPE_CHECKING:
    from timm.utils import ModelEmaV3

__all__ = ['make_accelerator', 'cpu_share', 'loader_workers', 'default_num_workers', 'check_output_dir',
           'prepare_output_dir', 'build_run', 'Run', 'MetricLogger', 'export_student', 'eval_student', 'format_heads',
           'format_faults', 'summary_table']

RUN_MARKER = 'config.yaml'


def make_accelerator(cfg: Config, entries: Optional[list[LossEntry]] = None) -> Accelerator:
    """Accelerator with the run's precision and accumulation, and the process settings of its device.

    Precision: ``--mixed-precision`` when given (command line or YAML), else the launcher's (``accelerate launch
    --mixed_precision``, or its config file: Accelerate reads ``ACCELERATE_MIXED_PRECISION``), else ``no``. The
    effective value is written back into ``cfg`` (so ``config.yaml`` records it) and printed at start.

    CUDA: TF32 for fp32 matmuls and convolutions (``--no-cuda-tf32`` turns it off) and cuDNN autotuning
    (``--no-cudnn-benchmark``); loader batches are copied to the device without blocking the host. CPU: one process
    uses every core; CPU processes get the tuned glibc heap (:func:`vitkd.cpu_malloc.tune_malloc`) unless
    ``--cpu-malloc system``.

    On N processes ``--batch-size`` is per process and Accelerate's default sharding (``split_batches=False``) gives
    process p the loader batches p, p + N, …: optimizer step s trains on batches sN … sN + N − 1, i.e. on exactly the
    samples, in the same order, that one process with batch N·B trains on at step s (the augmentation of each sample is
    seeded by its index, whatever process loads it). DDP's settings and why: :mod:`vitkd.ddp` (its search for unused
    parameters starts on only when some step can leave a parameter without gradient, or with ``--ddp-find-unused``).

    Compilation: the launcher's ``--dynamo_backend`` turns ``--compile-student`` on (written back into ``cfg``) and
    gives its settings; Accelerate itself compiles nothing (:class:`vitkd.ddp.StepModule` compiles the prepared module
    from the first step that leaves no parameter idle).
    """
    from accelerate.utils import DataLoaderConfiguration
    cuda = torch.cuda.is_available()
    requested = cfg.mixed_precision or os.environ.get('ACCELERATE_MIXED_PRECISION') or 'no'
    if requested not in ('no', 'bf16', 'fp16'):
        raise ConfigError(f'mixed precision {requested!r} (from the launcher) is not one of no, bf16, fp16')
    if requested == 'fp16' and not cuda:
        raise ConfigError('--mixed-precision fp16 needs a GPU; on CPU use bf16 or no')
    if requested == 'bf16' and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError(f'--mixed-precision bf16: this GPU ({torch.cuda.get_device_name()}) cannot do bf16; use fp16 '
                          'or no')
    until = 0.0 if cfg.eval_student else idle_parameters_until_of(cfg, entries)
    if launcher_compile_kwargs() is not None:
        if cfg.task != 'classify':
            raise ConfigError(f'the launcher\'s dynamo backend compiles classification runs only: launch --task '
                              f'{cfg.task} with --dynamo_backend no')
        cfg.compile_student = True
    name_output_dir(cfg)
    accelerator = Accelerator(mixed_precision=requested, gradient_accumulation_steps=cfg.grad_accum_steps,
                              log_with=cfg.log_with, project_dir=cfg.output_dir, cpu=not cuda, dynamo_backend='no',
                              dataloader_config=DataLoaderConfiguration(non_blocking=cuda),
                              kwargs_handlers=[ddp_kwargs(find_unused_parameters=until > 0)])
    cfg.mixed_precision = accelerator.mixed_precision
    if accelerator.device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = cfg.cuda_tf32
        torch.backends.cudnn.allow_tf32 = cfg.cuda_tf32
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    if accelerator.device.type == 'cpu' and cfg.cpu_malloc == 'tuned':
        tune_malloc()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif accelerator.device.type == 'cpu' and accelerator.num_processes == 1:
        torch.set_num_threads(os.cpu_count() or 1)  # `accelerate launch` sets OMP_NUM_THREADS=1 by default
    if cfg.num_workers is None:
        cfg.num_workers = default_num_workers(accelerator)
    set_seed(cfg.seed + accelerator.process_index)
    return accelerator


def idle_parameters_until_of(cfg: Config, entries: Optional[list[LossEntry]] = None) -> float:
    """The epoch from which DDP needs no search for unused parameters (:func:`vitkd.distiller.idle_parameters_until`;
    ``--ddp-find-unused`` forces it on for the whole run, ``--no-ddp-find-unused`` off)."""
    if cfg.ddp_find_unused is not None:
        return math.inf if cfg.ddp_find_unused else 0.0
    return idle_parameters_until(entries if entries is not None else build_losses(cfg), cfg.epochs, cfg.task_weight)


def cpu_share(own: set[int], local: list[set[int]]) -> float:
    """The cores one process may count as its own: each core it may run on, divided by the processes on this machine
    that may run on it (``local``: every local process's CPU affinity, this one's included).

    Processes that share one set (``accelerate launch`` on a whole machine, or in one Slurm task) split it evenly;
    processes bound to their own cores (``srun --cpu-bind``, per-rank NUMA binding) keep theirs whole.
    """
    return sum(1.0 / max(1, sum(core in cores for cores in local)) for core in own)


def loader_workers(cores: float, slurm_cpus_per_task: Optional[int] = None, processes_per_task: int = 1) -> int:
    """Loader workers of one process: its cores less one for the process itself, at least 1, at most 16.

    ``slurm_cpus_per_task`` (``SLURM_CPUS_PER_TASK``) caps the cores where Slurm allocated fewer than the affinity
    shows (no CPU binding), shared by the processes a task launched. A GPU step of DeiT-S consumes thousands of images
    per second; one core decodes and augments a few hundred, so every core the process owns is put to work.
    """
    if slurm_cpus_per_task:
        cores = min(cores, slurm_cpus_per_task / max(1, processes_per_task))
    return max(1, min(16, int(cores) - 1))


def default_num_workers(accelerator: Accelerator) -> int:
    """``--num-workers`` when unset: :func:`loader_workers` of this process's :func:`cpu_share` (the processes of a
    machine exchange their CPU affinities once, at start) under the Slurm allocation, if any."""
    from accelerate.utils import gather_object
    own = set(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else set(range(os.cpu_count() or 1))
    local = [own]
    if accelerator.num_processes > 1:
        host = socket.gethostname()
        local = [set(cores) for name, cores in gather_object([(host, sorted(own))]) if name == host]
    slurm = os.environ.get('SLURM_CPUS_PER_TASK')
    tasks_here = int(os.environ.get('SLURM_NTASKS_PER_NODE', '1').split('(')[0] or 1)
    return loader_workers(cpu_share(own, local), int(slurm) if slurm and slurm.isdigit() else None,
                          max(1, len(local) // max(1, tasks_here)))


def name_output_dir(cfg: Config) -> None:
    """Default run dir: the run of ``--resume <checkpoint or run dir>``, else output/<student>-<methods>-<time>."""
    if cfg.output_dir is None and cfg.eval_student:
        cfg.output_dir = str(eval_output_dir(cfg))
    if cfg.output_dir is None and cfg.resume not in (None, 'auto'):
        resolve_resume(cfg, log=lambda *_: None)  # fills output_dir with the checkpoint's run dir (or fails)
    if cfg.output_dir is None:
        methods = '+'.join(distill_spec(cfg).names)
        cfg.output_dir = str(Path('output') / f'{cfg.student.replace("/", "_")}-{methods}-{time.strftime("%Y%m%d-%H%M%S")}')


# What a run writes into its dir; ``--overwrite`` moves a previous run's copies aside (see prepare_output_dir).
RUN_OUTPUTS = (RUN_MARKER, 'checkpoints', 'student', 'student_ema', 'log.jsonl', 'epochs.csv', 'summary.json',
               'curves.png', 'hub.json', 'nonfinite_step*.json')


def check_output_dir(cfg: Config, check_lock: bool = True) -> Path:
    """The run dir (named if unset); refuse one that already holds a run unless --resume or --overwrite, one that
    cannot be written (:func:`vitkd.rundir.check_writable`) and, with ``check_lock``, one another live run holds.

    Writes nothing: ``main`` calls it before building anything and creates the dir only once every check passed.
    """
    name_output_dir(cfg)
    out = Path(cfg.output_dir)
    check_writable(out)
    if (out / RUN_MARKER).exists() and not (cfg.resume or cfg.overwrite):
        raise ConfigError(f'--output-dir {out} already holds a run; pass --resume auto to continue it, --overwrite '
                          'to train into it anyway, or another --output-dir')
    if check_lock:
        check_unlocked(out)
    return out


def prepare_output_dir(cfg: Config, accelerator: Accelerator) -> Path:
    """Create and lock the run dir (after :func:`check_output_dir`'s refusal rules). Nothing is deleted.

    With ``--overwrite`` (and no ``--resume``) a previous run's outputs are moved into ``replaced-<time>/`` inside the
    dir first: its checkpoints must never be mistaken for this run's by ``--resume auto`` or pruned by its saves.
    A resumed run that already finished raises :class:`vitkd.rundir.RunFinished` (nothing is written). The main
    process decides and every process raises the same error, so a multi-process run ends with one exit code.
    """
    from accelerate.utils import broadcast_object_list

    out = check_output_dir(cfg, check_lock=False)
    failure = None
    if accelerator.is_main_process:
        try:
            summary = finished_state(out, resolve_resume(cfg, log=lambda *_: None), cfg.epochs, cfg.max_steps) \
                if cfg.resume else None
            if summary is not None:
                raise RunFinished(f'{out} is a finished run ({summary.get("epochs_run")} epochs, {summary.get("steps")} '
                                  f'steps; {summary.get("stop_reason", "done")}): nothing to resume and nothing was '
                                  'changed; raise --epochs to train it further, or use another --output-dir')
            out.mkdir(parents=True, exist_ok=True)
            RunLock(out).acquire()
            if cfg.overwrite and not cfg.resume and (out / RUN_MARKER).exists():
                old = [p for pattern in RUN_OUTPUTS for p in sorted(out.glob(pattern))]
                aside = out / f'replaced-{time.strftime("%Y%m%d-%H%M%S")}'
                aside.mkdir()
                for path in old:
                    os.replace(path, aside / path.name)
                accelerator.print(f'--overwrite: the previous run\'s outputs in {out} were moved to {aside}')
        except (RunFinished, RunDirError) as e:
            failure = (type(e).__name__, str(e))
        except OSError as e:
            failure = ('RunDirError', f'--output-dir {out}: {e.strerror or e}')
    failure = broadcast_object_list([failure])[0]
    if failure is not None:
        raise {'RunFinished': RunFinished, 'RunDirError': RunDirError}[failure[0]](failure[1])
    return out


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
        from timm.utils import ModelEmaV3
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


class MetricLogger:
    """Per-step and per-epoch records as JSONL (``log.jsonl``) and CSV (``epochs.csv``) in the run dir, and to the
    ``--log-with`` trackers.

    Each tracker value goes to the optimizer step it belongs to: training terms to their step, an epoch's validation
    metrics to the global step at which that epoch ended (``step``), so the curves of a tracker line up with
    ``log.jsonl``. ``epochs.csv`` (the summary a person reads) has its numbers rounded to what they measure
    (:func:`vitkd.progress.rounded`); ``log.jsonl`` and the trackers keep them exact. A warm-up that does not end before
    the run is warned about once, here, before training starts.
    """

    def __init__(self, out_dir: Path, accelerator: Accelerator, cfg: Optional[Config] = None,
                 steps_per_epoch: Optional[int] = None):
        self.out_dir, self.main, self.accelerator = out_dir, accelerator.is_main_process, accelerator
        self.jsonl = open(out_dir / 'log.jsonl', 'a') if self.main else None
        self.trackers = bool(cfg and cfg.log_with)
        self.last_step = 0
        if self.trackers:  # flat, tracker-friendly hyper-parameters
            hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                       for k, v in dataclasses.asdict(cfg).items() if v is not None}
            accelerator.init_trackers('vitkd', config=hparams)
        warning = warmup_warning(cfg, steps_per_epoch) if cfg is not None else None
        if warning:
            accelerator.print(warning)

    def step(self, record: dict) -> None:
        self.last_step = record['step']
        if self.trackers:
            self.accelerator.log({f'train/{k}': v for k, v in record.items() if k != 'step'}, step=record['step'])
        if self.jsonl:
            self.jsonl.write(json.dumps({'kind': 'step', **record}) + '\n')
            self.jsonl.flush()

    def epoch(self, epoch: int, train: dict, val: dict, step: Optional[int] = None) -> None:
        """One epoch's means and validation metrics; ``step``: the global optimizer step at which the epoch ended
        (default: the last step logged by :meth:`step`)."""
        step = self.last_step if step is None else step
        if self.trackers and val:
            self.accelerator.log({f'val/{k}': v for k, v in val.items()}, step=step)
        if not self.main:
            return
        record = {'epoch': epoch, 'step': step, **{f'train_{k}': v for k, v in train.items()},
                  **{f'val_{k}': v for k, v in val.items()}}
        self.jsonl.write(json.dumps({'kind': 'epoch', **record}) + '\n')
        self.jsonl.flush()
        path = self.out_dir / 'epochs.csv'
        rows = list(csv.DictReader(path.open())) if path.exists() else []
        rows.append({k: str(v) for k, v in rounded(record).items()})
        fields = sorted({k for r in rows for k in r}, key=lambda k: ({'epoch': 0, 'step': 1}.get(k, 2), k))
        with path.open('w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    def finish(self) -> None:
        if self.jsonl:
            self.jsonl.close()


def export_student(r: Run, out_dir: Path, accelerator: Accelerator, metrics: dict) -> Path:
    """The student alone in timm's format (config.json + model.safetensors, the data's class names as
    ``label_names``), no distillation parts; the EMA student beside it (``student_ema/``) when EMA is on. Written
    atomically (``.tmp`` then renamed). The class names are checked against the teacher's when it records them."""
    export = out_dir / 'student'
    labels = [str(c) for c in r.spec.classes] if getattr(r.spec, 'classes', None) else None
    teacher_model = getattr(r.teacher, 'model', None)
    check_label_names(labels, getattr(teacher_model, 'pretrained_cfg', {}).get('label_names'))
    failure = None
    if accelerator.is_main_process:
        try:
            export_model(folded_student(r.distiller_unwrapped), export, r.data_config, labels)
            if r.ema is not None:
                export_model(folded_student(r.distiller_unwrapped, r.ema.module), out_dir / 'student_ema',
                             r.data_config, labels)
        except OSError as e:
            failure = (e.errno, e.strerror or str(e), e.filename)
    from accelerate.utils import broadcast_object_list
    failure = broadcast_object_list([failure])[0]  # every process raises the main process's failure (one exit code)
    if failure is not None:
        raise OSError(*failure)
    return export


def run_costs(r: Run, train_stats: dict) -> dict:
    """Throughput, trainable parameters beyond the student (projectors, adapters, banks' heads), peak memory."""
    import resource
    extra = sum(p.numel() for p in r.distiller_unwrapped.parameters()) - r.student_params
    peak = (torch.cuda.max_memory_allocated() / 2 ** 20 if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux: KiB
    return dict(img_per_s=round(train_stats.get('img_per_s', 0.0), 1), extra_params=extra,
                peak_memory_mb=round(peak, 1), peak_memory_kind='cuda_allocated' if torch.cuda.is_available() else 'rss')


def plot_curves(out_dir: Path, cfg: Config, accelerator: Accelerator) -> None:
    """``curves.png`` in the run dir: loss terms, lr, accuracy per head (main process)."""
    if accelerator.is_main_process and (out_dir / 'log.jsonl').exists():
        methods = ' + '.join(m.name if m.weight is None else f'{m.name}:{m.weight:g}' for m in distill_spec(cfg))
        plot_run(out_dir / 'log.jsonl', out_dir / 'curves.png', f'{cfg.student} ← {cfg.teacher} ({methods})')


# Integer counts in an epoch's training stats (not means).
COUNTS = ('samples', 'skipped_steps', 'corrupt_images')


def format_faults(train_stats: dict) -> str:
    """'3 unreadable images skipped, 1 non-finite optimizer step skipped' (empty when the epoch had none)."""
    parts = []
    if train_stats.get('corrupt_images'):
        n = train_stats['corrupt_images']
        parts.append(f'{n} unreadable image{"s" * (n != 1)} skipped (see the warnings above)')
    if train_stats.get('skipped_steps'):
        n = train_stats['skipped_steps']
        parts.append(f'{n} optimizer step{"s" * (n != 1)} skipped for non-finite values (nonfinite_step*.json)')
    return ', '.join(parts)


DENSE_METRICS = ('mAP', 'AP50', 'AP75', 'mIoU', 'pixel_acc')  # the headline numbers of dense runs, in percent


def format_heads(metrics: dict, prefix: str = '') -> str:
    """The validation line: top-1 per head (classification) or the dense metrics (``prefix``: ``teacher_``)."""
    dense = [f'{k} {metrics[prefix + k]:.2f}' for k in DENSE_METRICS if prefix + k in metrics]
    if dense:
        return ', '.join(dense)
    parts = [f'{h} {metrics[f"{h}_top1"]:.2f}%' for h in ('cls', 'dist', 'avg') if f'{h}_top1' in metrics]
    if 'ema_avg_top1' in metrics:
        parts.append(f'ema avg {metrics["ema_avg_top1"]:.2f}%')
    return 'top-1 ' + ', '.join(parts)


def summary_table(cfg: Config, summary: dict) -> str:
    s, t = summary['student'], summary['teacher']
    dense = [k for k in DENSE_METRICS if k in s]
    if dense:
        rows = [('teacher', *(f'{t["teacher_" + k]:.2f}' if t else '-' for k in dense)),
                ('student', *(f'{s[k]:.2f}' for k in dense))]
        lines = [f'{"":<10}' + ''.join(f'{k:>10}' for k in dense)] + [f'{r[0]:<10}' + ''.join(f'{v:>10}' for v in r[1:])
                                                                      for r in rows]
        lines.append(f'{summary["epochs_run"]} epochs, {summary["steps"]} steps, {summary["train_seconds"]:.0f} s '
                     f'({summary["stop_reason"]})')
        return '\n'.join(lines)
    rows = [('teacher', f'{t["teacher_top1"]:.2f}' if t else '-', f'{t["teacher_top5"]:.2f}' if t else '-')]
    for head in ('cls', 'dist', 'avg'):
        if f'{head}_top1' in s:
            rows.append((f'student {head}', f'{s[f"{head}_top1"]:.2f}', f'{s[f"{head}_top5"]:.2f}'))
    lines = [f'{"":<14}{"top-1":>8}{"top-5":>8}'] + [f'{a:<14}{b:>8}{c:>8}' for a, b, c in rows]
    lines.append(f'{summary["epochs_run"]} epochs, {summary["steps"]} steps, {summary["train_seconds"]:.0f} s '
                 f'({summary["stop_reason"]})')
    return '\n'.join(lines)


def eval_output_dir(cfg: Config) -> Path:
    """Default dir of ``--eval-student``, named after what it evaluates and on what: ``output/eval-<run>_student-
    <dataset>-<time>``, ``eval-<run>_step_00000468-…`` for a checkpoint, ``eval-org_name-…`` for ``hf-hub:org/name``
    (not after the training options, which an evaluation does not use)."""
    spec = str(cfg.student_ckpt or 'student')
    parts = spec[len('hf-hub:'):].split('/') if spec.startswith('hf-hub:') else Path(spec).resolve().parts
    named = [part for part in parts if part not in ('checkpoints', '/')][-2:]
    evaluated = '_'.join(re.sub(r'[^A-Za-z0-9.+-]+', '-', part) for part in named) or 'student'
    return Path('output') / f'eval-{evaluated}-{cfg.dataset}-{time.strftime("%Y%m%d-%H%M%S")}'


def eval_student(cfg: Config, accelerator: Accelerator) -> int:
    """--eval-student: top-1/top-5 of the cls head, the dist head and their average for ``--student-ckpt``.

    The student loads strictly (:func:`vitkd.checkpoint.load_student`); the preprocessing is the one recorded in
    its config.json (else the data set's / the student's, as in training). Prints a table and writes
    ``eval_student.json`` in the output dir. On N processes each validation sample is counted once.
    """
    from timm.data import create_transform
    if not cfg.student_ckpt:
        raise ConfigError('--eval-student needs --student-ckpt (an exported folder, a checkpoint folder, a run dir, '
                          'a .safetensors file with --student, or hf-hub:org/name)')
    val = build_eval_dataset(cfg.dataset, cfg.data_path, None, cfg.skip_corrupt,  # transform set below
                             hf=HFOptions.from_config(cfg))
    model, pretrained_cfg, source = load_student(cfg.student_ckpt, cfg, num_classes=len(val.classes))
    if model.num_classes != len(val.classes):
        raise CheckpointError(f'student {source} has a {model.num_classes}-way head, the validation set '
                              f'{len(val.classes)} classes')
    if {'input_size', 'mean', 'std'} <= set(pretrained_cfg):
        data_config = {k: pretrained_cfg[k] for k in ('input_size', 'mean', 'std', 'crop_pct', 'interpolation')
                       if k in pretrained_cfg}
    else:
        input_size, mean, std, _ = student_data_spec(cfg, model)
        data_config = eval_data_config(cfg, input_size, mean, std)
    val.dataset.transform = create_transform(tuple(data_config['input_size']), is_training=False,
                                             crop_pct=data_config.get('crop_pct', cfg.eval_crop_ratio),
                                             interpolation=data_config.get('interpolation', 'bicubic'),
                                             mean=tuple(data_config['mean']), std=tuple(data_config['std']))
    loader = build_eval_loader(val, cfg)
    loader = accelerator.prepare(loader)
    if accelerator.device.type == 'cpu':  # the attention path training evaluated with (build_run): the same numbers
        set_fused_attention(model, False)
    metrics = evaluate(model.to(accelerator.device), loader, accelerator)
    out_dir = Path(cfg.output_dir or eval_output_dir(cfg))
    report = dict(student_ckpt=cfg.student_ckpt, source=source, architecture=getattr(model, 'pretrained_cfg', {})
                  .get('architecture', type(model).__name__), num_classes=model.num_classes, dataset=cfg.dataset,
                  data_path=cfg.data_path, data_config={k: list(v) if isinstance(v, tuple) else v
                                                         for k, v in data_config.items()},
                  processes=accelerator.num_processes, metrics=metrics)
    rows = [f'{"":<6}{"top-1":>8}{"top-5":>8}'] + [f'{h:<6}{metrics[f"{h}_top1"]:>8.2f}{metrics[f"{h}_top5"]:>8.2f}'
                                                   for h in ('cls', 'dist', 'avg') if f'{h}_top1' in metrics]
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / 'eval_student.json').write_text(json.dumps(report, indent=2) + '\n')
    accelerator.print(f'student {source} on {metrics["samples"]} {cfg.dataset} validation images\n' + '\n'.join(rows))
    accelerator.print(f'wrote {out_dir / "eval_student.json"}')
    accelerator.wait_for_everyone()  # every process leaves together: none tears the group down under another
    accelerator.end_training()
    return 0
