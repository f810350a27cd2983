"""The processes of a run: the accelerator (precision, accumulation, DDP's settings, the device's switches) and how
many threads and loader workers each process gets.

:func:`make_accelerator` is the first thing a command builds (after the methods: DDP's settings depend on them);
:func:`default_num_workers` sizes the loaders from the cores a process may count as its own (:func:`cpu_share`, under
a Slurm allocation: :func:`loader_workers`).
"""
from __future__ import annotations

import math
import os
import socket
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, gather_object, set_seed

from .build import build_losses
from .config import Config, ConfigError
from .cpu_malloc import tune_malloc
from .ddp import ddp_kwargs, launcher_compile_kwargs
from .distiller import LossEntry, idle_parameters_until
from .rundir import name_output_dir

__all__ = ['make_accelerator', 'idle_parameters_until_of', 'cpu_share', 'loader_workers', 'default_num_workers']


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
        torch.set_num_threads(len(own_cores()))  # `accelerate launch` sets OMP_NUM_THREADS=1 by default
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


def own_cores() -> set[int]:
    """The cores this process may run on: its CPU affinity where the platform has one (a container's cpuset, ``taskset``,
    Slurm's binding), else every core. ``os.cpu_count()`` counts the host's cores, so a run given 2 of a 64-core host
    would start 64 threads."""
    return set(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else set(range(os.cpu_count() or 1))


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
    own = own_cores()
    local = [own]
    if accelerator.num_processes > 1:
        host = socket.gethostname()
        local = [set(cores) for name, cores in gather_object([(host, sorted(own))]) if name == host]
    slurm = os.environ.get('SLURM_CPUS_PER_TASK')
    tasks_here = int(os.environ.get('SLURM_NTASKS_PER_NODE', '1').split('(')[0] or 1)
    return loader_workers(cpu_share(own, local), int(slurm) if slurm and slurm.isdigit() else None,
                          max(1, len(local) // max(1, tasks_here)))
