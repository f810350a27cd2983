"""Pieces the training-step benchmarks share: synthetic batches, the vitkd and timm.task training steps, worker
processes that each run one variant, interleaved timing rounds and ratios with their spread.

Every timed variant runs in its own worker process (a fresh heap, its own CUDA context and peak-memory counter), as a
user runs it. The parent builds a variant in a worker, lets it take its warm-up steps, then times the variants in
rotated rounds, one worker computing at a time, so a change of machine load or clock hits every variant alike; a speed
ratio is the median of the per-round ratios (a drift of the machine's speed cancels within a round) with the
quartiles of those per-round ratios as its spread.
"""
from __future__ import annotations

import gc
import json
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# As main.py: OpenMP threads that spin while waiting crawl on shared cores (inherited by the worker processes).
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from timm.loss import SoftTargetCrossEntropy  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402

import vitkd  # noqa: E402,F401
from vitkd.distiller import Distiller, LossEntry  # noqa: E402
from vitkd.losses import Batch, RunInfo, create_loss  # noqa: E402
from vitkd.models import Teacher, set_fused_attention  # noqa: E402
from vitkd.teacher_cache import TeacherCache  # noqa: E402
from vitkd.training import NonFiniteGuard, TermMeter, TrainState  # noqa: E402

Tensors = tuple  # (images [B, C, H, W], soft targets [B, K], labels [B], indices [B]) on the device, indices on host
Step = Callable[[int], None]  # one full training step on batch number i (forward, backward, optimizer step)

# What engine.train_one_epoch does in a step besides forward, backward and the update (the ablation times each):
# the gradient norm (checked for non-finite values), the logged terms' device-side bookkeeping (TermMeter, train
# top-1), the non-finite guard's device record (NonFiniteGuard, --nan-policy stop).
STEP_EXTRAS = ('grad_norm', 'terms', 'guard')
# CUDA settings of every variant, vitkd's and timm's alike: what vitkd sets by default (--cuda-tf32,
# --cudnn-benchmark) and what timm's train.py users set (its docs recommend both for speed).
CUDA_TF32, CUDNN_BENCHMARK = True, True


def cuda_settings() -> dict:
    """Apply :data:`CUDA_TF32` and :data:`CUDNN_BENCHMARK` (on CUDA) and return them for the report."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = CUDA_TF32
        torch.backends.cudnn.allow_tf32 = CUDA_TF32
        torch.backends.cudnn.benchmark = CUDNN_BENCHMARK
    return dict(tf32=CUDA_TF32, cudnn_benchmark=CUDNN_BENCHMARK)


def write_report(report: dict, path: str) -> None:
    """The benchmark's JSON at ``path`` (folders made as needed), and where it went."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + '\n')
    print(f'wrote {out}')


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (getrusage; KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2 ** 20 if sys.platform == 'darwin' else 2 ** 10)


def device_now() -> torch.device:
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize()


def autocast(device: torch.device, precision: str):
    """bf16 autocast for ``precision == 'bf16'``, else a disabled one (fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == 'bf16')


def make_batches(count: int, batch: int, in_chans: int, img: int, classes: int, device) -> list[Tensors]:
    """``count`` fixed random batches (seeded): Gaussian images, smoothed one-hot targets, labels, data-set indices on
    the device and on the host (batch b holds samples b·B … (b+1)·B − 1, the layout a teacher cache records)."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for b in range(count):
        x = torch.randn(batch, in_chans, img, img, generator=g)
        labels = torch.randint(0, classes, (batch,), generator=g)
        targets = F.one_hot(labels, classes).float() * 0.9 + 0.1 / classes
        index = torch.arange(b * batch, (b + 1) * batch)
        batches.append((*(t.to(device) for t in (x, targets, labels, index)), index))
    return batches


def build_models(student: str, student_kwargs: dict, teacher: str, classes: int, in_chans: int, device):
    """(student, teacher model) with fixed seeds, random weights (no download), on ``device``."""
    torch.manual_seed(0)
    student_model = vitkd.create_student(student, classes, **student_kwargs)
    torch.manual_seed(1)
    teacher_model = timm.create_model(teacher, num_classes=classes, in_chans=in_chans, pretrained=False).eval()
    return student_model.to(device), teacher_model.to(device)


def adamw(module: torch.nn.Module, fused: bool):
    """timm's AdamW (``create_optimizer_v2``, the factory vitkd builds its optimizer with): lr 1e-3, decay 0.05;
    ``fused=True`` picks torch's fused CUDA kernel, else torch's default implementation for the device."""
    return create_optimizer_v2(module, 'adamw', lr=1e-3, weight_decay=0.05, **({'fused': True} if fused else {}))


def record_cache(distiller: Distiller, batches: Sequence[Tensors], classes: int, topk: int, folder: Path, device,
                 precision: str) -> TeacherCache:
    """A :class:`TeacherCache` holding the teacher's logits on ``batches`` (one complete data epoch, batch number =
    mixup seed), opened for replay."""
    n = len(batches) * batches[0][0].shape[0]
    meta = dict(num_samples=n, num_classes=classes, topk=min(topk, classes), pooled_dim=None, logits=True,
                pooled=False)
    cache = TeacherCache(folder, meta, 1, distiller.teacher_features, n, device=device)
    seeds = np.arange(n, dtype=np.uint64)
    cache.begin_epoch(0, seeds)
    with torch.no_grad(), autocast(device, precision):
        for b, (x, _, _, _, host_index) in enumerate(batches):
            cache.features(x, host_index, b, b)
    cache.end_epoch(complete=True)
    if cache.begin_epoch(0, seeds) != 'replay':
        raise RuntimeError(f'teacher cache {folder}: the recorded epoch is not complete')
    return cache


def vitkd_step(student, teacher_model, teacher_name: str, loss: str, batches: Sequence[Tensors], device,
               precision: str, *, loss_opts: Optional[dict] = None, cache_dir: Optional[Path] = None,
               cache_topk: Optional[int] = None, channels_last: Optional[bool] = None,
               fused_attention: Optional[bool] = None, compiled: bool = False, fused_adamw: bool = False,
               host_sync: bool = True, extras: Sequence[str] = STEP_EXTRAS) -> Step:
    """vitkd's training step: a :class:`Distiller` with ``loss`` (``'none'``: task CE only, no teacher), the teacher
    live or, with ``cache_dir``, replayed from a :class:`TeacherCache` recorded first (read with the batch's host
    indices, as ``vitkd.training.EpochBatches`` reads it; the read and the logit rebuild are inside the step), then
    backward, the ``extras`` and AdamW: the calls ``vitkd.engine.train_one_epoch`` makes for a step, without the accelerator
    (one process, bf16 through autocast as Accelerate applies it). As ``vitkd.run.build_run`` does, the teacher is cast
    to bf16 when the precision is bf16.

    Args:
        loss_opts: the loss's options (``--loss-opts`` as a dict, e.g. ``{'projector': 'orthogonal_cayley'}``).
        cache_topk: teacher logits the cache keeps per sample (default: all).
        channels_last: the teacher's memory format (None: vitkd's choice, channels_last for CNNs).
        fused_attention: timm's fused attention in the student (None: vitkd's choice, off on CPU as ``build_run``).
        compiled: ``--compile`` (the teacher's forward paths, and the distiller as a whole, as a run compiles it).
        fused_adamw: torch's fused AdamW kernel (CUDA).
        host_sync: read the loss on the host every step.
        extras: which of :data:`STEP_EXTRAS` the step makes (default: all, as the engine).
    """
    t = Teacher(teacher_model, teacher_name, channels_last=channels_last) if teacher_model is not None else None
    if t is not None and precision == 'bf16':
        t.cast(torch.bfloat16)
    if fused_attention is None:
        fused_attention = device.type != 'cpu'
    set_fused_attention(student, fused_attention)
    x = batches[0][0]
    classes = batches[0][1].shape[1]
    info = RunInfo(num_classes=classes, input_size=tuple(x.shape[1:]))
    distiller = Distiller(student, t, [LossEntry(create_loss(loss, **(loss_opts or {})))], info).to(device)
    module = distiller
    if compiled:
        if t is not None:
            t.compile()
        module = torch.compile(distiller)
    opt = adamw(distiller, fused_adamw)
    cache = None
    if cache_dir is not None:
        cache = record_cache(distiller, batches, classes, cache_topk or classes, cache_dir, device, precision)
    distiller.train()
    params = [p for p in distiller.parameters() if p.requires_grad]
    engine_state = SimpleNamespace(num_processes=1, scaler=None, sync_gradients=True)
    meter, guard, state = TermMeter(engine_state), NonFiniteGuard('stop', distiller, engine_state), TrainState()

    def step(batch_no: int) -> None:
        b = batch_no % len(batches)
        images, targets, labels, index, host_index = batches[b]
        with autocast(device, precision):
            feats = cache.features(images, host_index, b, b) if cache is not None else None
            batch = Batch(images, targets, labels, index=index, host_index=host_index.numpy(),
                          teacher_features=feats)
            out = module(batch)
        loss_value = out['loss']
        if host_sync:
            loss_value.item()
        loss_value.backward()
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]) \
            if 'grad_norm' in extras else None
        terms = {'loss': out['loss'], **out['terms']}
        if 'terms' in extras:
            terms['top1'] = (out['logits'].detach().argmax(-1) == labels).float().mean() * 100
            finite = meter.add(terms, images.shape[0])
        if 'guard' in extras:
            if 'terms' not in extras:
                finite = torch.isfinite(torch.stack([v.detach().float().reshape(()) for v in terms.values()])).all()
            guard.check(state, terms, finite, grad_norm, batch, opt)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state.step += 1
    return step


def timm_task_step(student, teacher_model, batches: Sequence[Tensors], device, precision: str, *,
                   compiled: bool = False, fused_adamw: bool = False, host_sync: bool = True) -> Step:
    """timm's own distillation step: ``timm.task.TokenDistillationTask(distill_type='hard', task_loss_weight=0.5)``
    with ``SoftTargetCrossEntropy`` on the same soft targets (the loss of vitkd's ``deit_hard``), the teacher wrapped
    in ``timm.task.DistillationTeacher``; ``compiled`` calls the task's own ``compile()`` (its student and teacher)."""
    from timm.task import DistillationTeacher, TokenDistillationTask
    task = TokenDistillationTask(student_model=student, teacher_model=DistillationTeacher(teacher_model, device=device),
                                 criterion=SoftTargetCrossEntropy(), distill_type='hard', task_loss_weight=0.5,
                                 device=device, verbose=False)
    task.train()
    if compiled:
        task.compile()
    opt = adamw(task.trainable_module, fused_adamw)

    def step(batch_no: int) -> None:
        images, targets = batches[batch_no % len(batches)][:2]
        with autocast(device, precision):
            out = task(images, targets)
        if host_sync:
            out['loss'].item()
        out['loss'].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


# ---- worker processes --------------------------------------------------------------------------------------------

def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()


def _one_line(error: BaseException) -> str:
    return f'{type(error).__name__}: {" ".join(str(error).split())[:300]}'


def serve(conn, threads: int, init: Optional[Callable[[], object]] = None) -> None:
    """A worker process: builds one variant at a time and times it on the parent's command.

    Commands (``conn.recv()``): ``('build', (builder, kwargs, warmup))`` calls ``builder(tmp=<a temp dir>,
    **kwargs)`` for a :data:`Step` and takes ``warmup`` untimed steps (answers None, or the error in one line: a variant
    that cannot run, e.g. out of memory, is reported, not fatal); ``('round', steps)`` times ``steps`` steps and
    answers (seconds per step, memory dict: peak RSS, minor page faults per step, on CUDA the peak allocated memory
    over the round); ``('release', None)`` drops the variant; ``('stop', None)`` ends the process.
    """
    torch.set_num_threads(threads)
    cuda_settings()
    if init is not None:
        init()
    device = device_now()
    step, done = None, 0
    with tempfile.TemporaryDirectory() as tmp:
        while True:
            command, payload = conn.recv()
            if command == 'stop':
                return
            if command in ('build', 'release'):
                step = None
                _release(device)
            if command == 'release':
                conn.send(None)
            elif command == 'build':
                builder, kwargs, warmup = payload
                try:
                    step = builder(tmp=Path(tempfile.mkdtemp(dir=tmp)), **kwargs)
                    for done in range(warmup):
                        step(done)
                    done = warmup
                    synchronize(device)
                    conn.send(None)
                except Exception as e:  # noqa: BLE001 (reported to the parent, which records the variant as failed)
                    step = None
                    _release(device)
                    conn.send(_one_line(e))
            elif command == 'round':
                synchronize(device)
                if device.type == 'cuda':
                    torch.cuda.reset_peak_memory_stats()
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                start = time.perf_counter()
                for _ in range(payload):
                    step(done)
                    done += 1
                synchronize(device)
                seconds = (time.perf_counter() - start) / payload
                memory = dict(peak_rss_mb=peak_rss_mb(), page_faults_per_step=(
                    resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / payload)
                if device.type == 'cuda':
                    memory['cuda_max_allocated_mb'] = torch.cuda.max_memory_allocated() / 2 ** 20
                conn.send((seconds, memory))


class WorkerPool:
    """Worker processes (spawned: CUDA-safe, a clean interpreter each) running :func:`serve`.

    Args:
        count: processes to start.
        threads: intra-op threads of each.
        inits: per worker, a picklable callable run first in it (e.g. a heap setting), or None.
    """

    def __init__(self, count: int, threads: int, inits: Optional[Sequence[Optional[Callable]]] = None):
        context = multiprocessing.get_context('spawn')
        self.workers = []
        for i in range(count):
            parent_end, child_end = context.Pipe()
            init = inits[i] if inits else None
            process = context.Process(target=serve, args=(child_end, threads, init), daemon=True)
            process.start()
            self.workers.append((process, parent_end))

    def build(self, jobs: dict[int, tuple[Callable, dict]], warmup: int, parallel: bool) -> dict[int, Optional[str]]:
        """Build ``{worker: (builder, kwargs)}`` and warm each up; ``parallel`` lets them build at the same time
        (nothing is timed yet), else one after another. Returns ``{worker: None or the error}``."""
        answers = {}
        for i, (builder, kwargs) in jobs.items():
            self.workers[i][1].send(('build', (builder, kwargs, warmup)))
            if not parallel:
                answers[i] = self.workers[i][1].recv()
        for i in jobs:
            if parallel:
                answers[i] = self.workers[i][1].recv()
        return answers

    def time_round(self, worker: int, steps: int) -> tuple[float, dict]:
        self.workers[worker][1].send(('round', steps))
        return self.workers[worker][1].recv()

    def release(self, workers: Sequence[int]) -> None:
        for i in workers:
            self.workers[i][1].send(('release', None))
        for i in workers:
            self.workers[i][1].recv()

    def close(self) -> None:
        for process, conn in self.workers:
            if process.is_alive():
                conn.send(('stop', None))
        for process, _ in self.workers:
            process.join(timeout=30)

    def __enter__(self) -> 'WorkerPool':
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def interleave(pool: WorkerPool, workers: dict[str, int], rounds: int, steps: int,
               deadline: Optional[float] = None) -> tuple[dict[str, list[float]], dict[str, dict]]:
    """Time the variants ``{name: worker}`` in ``rounds`` rotated rounds of ``steps`` steps each (no variant always
    first). Past ``deadline`` (``time.time()``) no new round starts once one is complete.

    Returns:
        (name → seconds per step of each round, name → the maximum of each memory figure over the rounds).
    """
    names = list(workers)
    times = {name: [] for name in names}
    memory = {name: {} for name in names}
    for r in range(rounds):
        if r and deadline is not None and time.time() > deadline:
            break
        for name in names[r % len(names):] + names[:r % len(names)]:
            seconds, mem = pool.time_round(workers[name], steps)
            times[name].append(seconds)
            for key, value in mem.items():
                memory[name][key] = max(memory[name].get(key, value), value)
    return times, memory


MIN_ROUNDS_FOR_QUARTILES = 4


def quartiles(values: Sequence[float]) -> list[float]:
    """[first quartile, third quartile] (both the value itself for one value). ``statistics.quantiles``' default
    (exclusive) method puts the quartiles of n values at ranks (n + 1)/4 and 3(n + 1)/4: the minimum and maximum for
    n ≤ 3, inside the data from :data:`MIN_ROUNDS_FOR_QUARTILES` values on."""
    return statistics.quantiles(values, n=4)[::2] if len(values) > 1 else [values[0]] * 2


def speed_ratios(times: dict[str, list[float]], pairs: Sequence[tuple[str, str]]) -> tuple[dict, dict]:
    """Speed of a over b (time of b / time of a) per round, for each pair whose variants both ran.

    Returns:
        ({'a / b': median of the per-round ratios}, {'a / b': their quartiles}).
    """
    ratios, spread = {}, {}
    for a, b in pairs:
        if times.get(a) and times.get(b):
            per_round = [tb / ta for ta, tb in zip(times[a], times[b])]
            ratios[f'{a} / {b}'] = statistics.median(per_round)
            spread[f'{a} / {b}'] = quartiles(per_round)
    return ratios, spread


def rates(times: dict[str, list[float]], batch: int) -> tuple[dict, dict]:
    """(name → median img/s over the rounds, name → [slowest, fastest] round's img/s)."""
    return ({name: batch / statistics.median(ts) for name, ts in times.items() if ts},
            {name: [batch / max(ts), batch / min(ts)] for name, ts in times.items() if ts})


def machine() -> dict:
    """What the numbers were measured on."""
    info = dict(torch=torch.__version__, timm=timm.__version__, cpu_count=os.cpu_count(), load_avg=os.getloadavg())
    if torch.cuda.is_available():
        info['gpu'] = torch.cuda.get_device_name()
    return info
