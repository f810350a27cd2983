"""The GPU path, shown on CPU: the launcher's precision, every model on the training device before a method probes it,
and no host wait for the device in a training step outside logging steps."""
import json
import os
import re
import subprocess
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import vitkd  # noqa: E402
from vitkd.centers import class_sums  # noqa: E402
from vitkd.config import preset_names  # noqa: E402
from vitkd.losses import LOSS_REGISTRY  # noqa: E402

TINY = ['--student', 'deit_ti_distilled', '--student-kwargs', 'img_size=28', 'patch_size=4', 'depth=2', 'embed_dim=48',
        'num_heads=2', 'in_chans=1', '--teacher', 'regnety_002', '--no-teacher-pretrained', '--teacher-kwargs',
        'in_chans=1', '--train-subset', '0.01', '--num-workers', '0', '--batch-size', '8', '--no-eval-teacher']


# ops whose CUDA kernel makes the host wait for the device: a value read, or an output size that depends on values
_VALUE_SIZED = {'nonzero', 'argwhere', 'masked_select', '_unique', '_unique2', 'unique_dim', 'unique_consecutive',
                'unique_dim_consecutive', 'bincount', 'equal', 'is_nonzero', 'allclose', '_linalg_check_errors'}
_HOST_COPIES = {'cpu', 'tolist'}  # Tensor methods that copy a device tensor to the host and wait for it


def _is_mask(index) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


class HostSyncs(TorchDispatchMode):
    """Counts what makes the host wait for the device on CUDA, as the step runs on CPU.

    Seen by the dispatcher (every op the step runs, whichever Python code called it):

    * ``aten._local_scalar_dense``: ``.item()``, ``float(t)``, ``int(t)``, ``bool(t)`` (an ``if`` on a tensor);
    * ops whose output size depends on the values: ``nonzero``/``argwhere``, ``masked_select``, every ``unique``,
      ``bincount``, boolean-mask ``index``/``index_put`` (``x[mask]``, ``x[mask] = v`` and their
      backward), ``repeat_interleave`` without ``output_size``;
    * value comparisons returning a Python bool (``equal``, ``allclose``, ``is_nonzero``);
    * ``_linalg_check_errors``: the info check of ``torch.linalg.solve``/``inv``/``cholesky`` (``*_ex`` skip it).

    Seen at the Python level (a :class:`torch.overrides.TorchFunctionMode` entered with this one), because a copy of
    a CPU tensor to the host is a no-op that never reaches the dispatcher: ``.cpu()``, ``.tolist()``, ``.to('cpu')``
    without ``non_blocking=True``, and host data sent to the device by ``new_tensor`` or by ``torch.tensor``/
    ``as_tensor`` with a device (a blocking copy from pageable memory).

    Not seen, because on CPU the training device *is* the host: a ``.to(device)`` or ``torch.tensor(..., device=
    device)`` whose device is a variable holding the host device (told from the training device only when written as
    the string ``'cpu'``), and a blocking ``.to(device)`` of a host tensor, which on CPU is the same call as the no-op
    ``.to(device)`` of a device tensor. The step's host-to-device copies (the batch, a replayed teacher cache) pass
    ``non_blocking=True`` from pinned memory, which ``tests/test_teacher_cache.py`` checks.

    Reads of the optimizer's step counters are left out (``exclude``): torch keeps them on the host for the non-fused
    optimizers (no device wait) and on the device, without any read, for the fused CUDA ones the GPU path uses.
    """

    def __init__(self, exclude=lambda: ()):
        super().__init__()
        self.exclude, self.seen, self.sites = exclude, [], []
        self.python_level = _HostCopies(self.record)

    def record(self, what: str) -> None:
        """One host sync: its kind in :attr:`seen`, and in :attr:`sites` the innermost caller outside torch and this
        file ('file:line', the path from its package on), which for a backward op is the ``backward`` call."""
        self.seen.append(what)
        here = Path(__file__).resolve()
        frame = next(f for f in reversed(traceback.extract_stack())
                     if '/torch/' not in f.filename and Path(f.filename).resolve() != here)
        self.sites.append(re.sub(r'^.*/(site-packages|vitkd)/', lambda m: '' if m[1] == 'site-packages' else 'vitkd/',
                                 frame.filename) + f':{frame.lineno}')

    @property
    def count(self) -> int:
        return len(self.seen)

    def __enter__(self):
        self.python_level.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        return self.python_level.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name == '_local_scalar_dense':
            if not any(args[0] is t for t in self.exclude()):
                self.record(name)
        elif name in _VALUE_SIZED:
            self.record(name)
        elif name in ('index', 'index_put', 'index_put_', '_index_put_impl_') and any(map(_is_mask, args[1])):
            self.record(f'{name} with a boolean mask')
        elif name == 'repeat_interleave' and func._overloadname != 'self_int' and kwargs.get('output_size') is None:
            self.record('repeat_interleave without output_size')
        return func(*args, **kwargs)


class _HostCopies(TorchFunctionMode):
    """The Python-level half of :class:`HostSyncs`."""

    def __init__(self, record):
        super().__init__()
        self.record = record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, '__name__', '')
        if name in _HOST_COPIES and isinstance(args[0], torch.Tensor):
            self.record(f'Tensor.{name}')
        elif name == 'to' and not kwargs.get('non_blocking', False) and not any(a is True for a in args[1:]):
            if any(isinstance(a, str) and a == 'cpu' for a in (kwargs.get('device'), *args[1:])):
                self.record("Tensor.to('cpu') blocking")
        elif name == 'new_tensor' or name in ('tensor', 'as_tensor') and kwargs.get('device') not in (None, 'cpu'):
            self.record(f'torch.{name} onto the device')
        return func(*args, **kwargs)


def count_syncs_per_step(argv, steps: int = 4, epochs: int = 1, sites: bool = False) -> list[list]:
    """Build the run of ``main.py <argv>`` (a classification or a dense run, as the command line builds it) and train
    ``epochs`` epochs of at most ``steps`` steps with logging only at the end of each; returns the host syncs of each
    step (the last one of an epoch is a logging step; the first also opens the epoch and runs the methods' one-off
    work), each a kind, or with ``sites`` a (kind, site) pair (:meth:`HostSyncs.record`)."""
    from vitkd.engine import train_one_epoch
    from vitkd.devices import make_accelerator
    from vitkd.dense.run import build_dense_run
    from vitkd.run import build_run
    from vitkd.arguments import parse_args
    from vitkd.training import NonFiniteGuard, TrainState
    # one loader worker: the transforms' own reads of host images happen there, as they do on a GPU machine
    cfg, _ = parse_args(argv + ['--max-steps', str(steps * epochs), '--log-every', str(steps), '--num-workers', '1',
                                '--epochs', str(epochs)])
    accelerator = make_accelerator(cfg)
    r = (build_run if cfg.task == 'classify' else build_dense_run)(cfg, accelerator)
    guard = NonFiniteGuard(cfg.nan_policy, r.distiller_unwrapped, accelerator)
    optimizer_steps = lambda: [s['step'] for s in r.optimizer.optimizer.state.values() if 'step' in s]  # noqa: E731
    per_step, mode = [], HostSyncs(optimizer_steps)

    def recorded() -> list:
        return list(zip(mode.seen, mode.sites)) if sites else mode.seen

    def step_hook(last_batch, collective):
        per_step.append(recorded()[sum(map(len, per_step)):])
        return False
    with mode:
        for epoch in range(epochs):
            state = r.state if epoch == 0 else TrainState(epoch=epoch, step=r.state.step, max_steps=r.state.max_steps)
            train_one_epoch(r.distiller, r.batches, r.optimizer, r.scheduler, accelerator, state, guard,
                            cfg.clip_grad, r.ema, cfg.log_every, step_hook=step_hook)
            per_step.append(recorded()[sum(map(len, per_step)):])  # closing the epoch (the cache's end_epoch)
    return per_step


def test_the_counter_sees_every_kind_of_host_sync():
    """Each construct the counter names, run once on CPU, is counted once; the sync-free forms are not."""
    x, mask, index = torch.randn(6, 3), torch.tensor([True, False] * 3), torch.tensor([0, 2])
    a = torch.randn(4, 4, dtype=torch.float64) + 4 * torch.eye(4, dtype=torch.float64)
    syncing = [lambda: x.sum().item(), lambda: bool(x.sum() > 0), lambda: x[mask], lambda: x.nonzero(),
               lambda: torch.unique(index), lambda: x.masked_select(mask[:, None]),
               lambda: x.clone().index_put_((mask,), torch.zeros(3)), lambda: torch.linalg.solve(a, a),
               lambda: x.cpu(), lambda: x.tolist(), lambda: x.to('cpu'), lambda: index.repeat_interleave(index),
               lambda: torch.bincount(index), lambda: x.new_tensor([1.0])]
    free = [lambda: x[index], lambda: x.index_put((index,), torch.zeros(2, 3)),
            lambda: torch.where(mask[:, None], x, 0), lambda: torch.linalg.solve_ex(a, a, check_errors=False),
            lambda: x.to('cpu', non_blocking=True), lambda: index.repeat_interleave(index, output_size=2),
            lambda: x.gather(0, index[:, None].expand(2, 3)), lambda: x.scatter_add(0, index[:, None].expand(2, 3),
                                                                                    x[:2]),
            lambda: x.max(), lambda: x.argsort(0)]
    for fn in syncing + free:
        with HostSyncs() as mode:
            fn()
        assert mode.count == (fn in syncing), (fn.__code__.co_firstlineno, mode.seen)


def _between_logging_steps(per_step: list[list[str]]) -> list[list[str]]:
    """The syncs of the steps that neither open an epoch nor log (per epoch: its first step, its last (logging) step
    and its closing are left out)."""
    return per_step[1:-2]


@pytest.mark.parametrize('method', sorted(set(LOSS_REGISTRY) - {'none'}))
def test_no_host_sync_between_logging_steps(method, tmp_path):
    """Every registered method's training step (forward, backward, optimizer, its own state updates) makes the host
    wait for the device at no step between logging steps; the logging step does (so the counter sees the step)."""
    extra = ['--model-ema'] if method == 'deit_hard' else []  # the EMA update runs in every step
    # a method that shares its name with a preset is run from the preset, with the tiny models and data
    chosen = (['-c', method, '--dataset', 'fashion_mnist', '--input-size', '28'] if method in preset_names() else
              ['--distill', method])
    per_step = count_syncs_per_step(chosen + TINY + ['--output-dir', str(tmp_path / 'run')] + extra)
    assert len(per_step) == 5
    assert _between_logging_steps(per_step) == [[], []], per_step
    assert per_step[-2], per_step  # the logging step reads the terms


DENSE_TINY = ['--student-kwargs', 'patch_size=8', 'depth=1', 'embed_dim=32', 'num_heads=1', '--batch-size', '4',
              '--no-eval-teacher']


@pytest.mark.parametrize('task,method', [('segment', m) for m in ('vkd', 'fitnet', 'kd', 'dist', 'nd')] +
                         [('detect', m) for m in ('vkd', 'fitnet', 'nd')])
def test_dense_steps_sync_only_inside_torchvision_s_detection_loss(task, method, tmp_path):
    """A dense step of every method with a dense form (the embedded scenes and teacher of the task, a tiny student):
    segmentation waits for the device at no step between logging steps. Detection waits only inside torchvision's
    FCOS loss, whose anchor matching selects the foreground locations with boolean masks and reads their count
    (``torchvision/models/detection/fcos.py``, ``torchvision/ops``), and in the backward of those selections (sited
    at the ``backward`` call): vitkd's own detection code adds none."""
    argv = ['-c', f'embedded_{task}', '--distill', method, *DENSE_TINY, '--output-dir', str(tmp_path / 'run')]
    per_step = count_syncs_per_step(argv, sites=True)
    assert len(per_step) == 5 and per_step[-2], per_step  # the logging step reads the terms
    middle = [sync for step in _between_logging_steps(per_step) for sync in step]
    if task == 'segment':
        assert middle == [], middle
    else:
        outside = [(kind, site) for kind, site in middle if not site.startswith('torchvision/')
                   and not (site.startswith('accelerate/accelerator.py') and 'boolean mask' in kind)]
        assert middle and outside == [], outside


def test_no_host_sync_while_the_teacher_cache_records_or_replays(tmp_path):
    """A 2-epoch run with ``--teacher-cache``: epoch 0 records data epoch 0 (the teacher's outputs go to the host in
    non-blocking copies and reach the files later), epoch 1 replays it; neither waits in its middle steps."""
    argv = TINY + ['--distill', 'vkd', 'dist', '--output-dir', str(tmp_path / 'run'), '--train-subset', '0.0006',
                   '--teacher-cache', str(tmp_path / 'cache'), '--teacher-cache-epochs', '1']
    per_step = count_syncs_per_step(argv, steps=4, epochs=2)
    record, replay = per_step[:5], per_step[5:]
    assert len(replay) == 5, per_step
    assert [_between_logging_steps(e) for e in (record, replay)] == [[[], []], [[], []]], per_step
    assert (tmp_path / 'cache' / 'epoch_0000' / 'process_000.done').exists()


def test_no_host_sync_per_batch_in_the_nd_centres_pass():
    """ND's class-centre pass (:func:`vitkd.centers.class_sums`) waits for the device only after its last batch."""
    torch.manual_seed(0)
    teacher = vitkd.create_teacher('regnety_002', 10, pretrained=False, in_chans=1)
    per_batch, mode = [], HostSyncs()

    def batches():
        for _ in range(4):
            per_batch.append(mode.count)
            yield torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    with mode:
        _, counts = class_sums(teacher, batches(), 10)
    assert per_batch == [0, 0, 0, 0], mode.seen
    assert float(counts.sum()) == 32


@pytest.mark.slow
@pytest.mark.ci_once
def test_no_host_read_between_logging_steps_on_two_processes(tmp_path):
    """DIST on 2 CPU processes under accelerate launch: the terms, the finiteness flag and the deadline are reduced
    or read only at logging steps."""
    script = tmp_path / 'count.py'
    script.write_text(f'import json, os, sys\nsys.path.insert(0, {str(REPO / "tests")!r})\n'
                      'from test_gpu_path import TINY, count_syncs_per_step\n'
                      f'reads = count_syncs_per_step(TINY + ["--distill", "dist", "--output-dir", {str(tmp_path)!r}])\n'
                      f'open(os.path.join({str(tmp_path)!r}, "reads_" + os.environ["RANK"] + ".json"), "w")'
                      '.write(json.dumps(reads))\n')
    # --multi_gpu with ACCELERATE_USE_CPU: two gloo processes (`--cpu` alone would start one process per launch)
    launch = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
              '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', '0',
              '--num_cpu_threads_per_process', '1', str(script)]
    proc = subprocess.run(launch, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, 'ACCELERATE_USE_CPU': '1', 'OMP_NUM_THREADS': '1'})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads((tmp_path / f'reads_{rank}.json').read_text()) for rank in (0, 1)]  # one file per process
    for reads in rows:
        assert _between_logging_steps(reads) == [[], []] and reads[-2], rows


def test_models_are_on_the_training_device_before_a_method_probes_them(monkeypatch, tmp_path):
    """The meta device stands in for CUDA: student and teacher must both be there when VkD's setup runs its probe
    batch through them (a CPU student fed a probe to a device teacher fails), and every part the methods built must
    be there before the optimizer is made."""
    from vitkd import run as runlib
    from vitkd.arguments import parse_args
    cfg, _ = parse_args(TINY + ['--distill', 'vkd', 'nd', '--output-dir', str(tmp_path / 'run')])
    meta = torch.device('meta')
    fake = SimpleNamespace(device=meta, num_processes=1, process_index=0, is_main_process=True,
                           is_local_main_process=True, mixed_precision='no')
    built = {}

    class Stop(Exception):
        pass

    def capture(cfg, distiller, lr, fused=False):
        built['distiller'] = distiller
        raise Stop
    monkeypatch.setattr(runlib, 'build_optimizer', capture)
    monkeypatch.setattr('vitkd.losses.nd.ND.prepare_for_run', lambda self, run: built.setdefault('run', run))
    with pytest.raises(Stop):
        runlib.build_run(cfg, fake)
    distiller = built['distiller']
    tensors = {**dict(distiller.named_parameters()), **dict(distiller.named_buffers()),
               **{f'teacher.{k}': v for k, v in distiller.teacher.state_dict().items()}}
    assert {k for k, v in tensors.items() if v.device != meta} == set()
    assert any(k.startswith('losses.vkd.') for k in tensors)  # the projector VkD built in its setup
    assert built['run'].teacher is distiller.teacher  # ND's preparation gets the run's (device) teacher


def test_launcher_precision_reaches_the_student_forward_and_the_config(tmp_path):
    """``accelerate launch --mixed_precision bf16`` without ``--mixed-precision``: the student's forward runs under
    bf16 autocast, the frozen teacher is held in bf16, and config.yaml records bf16."""
    out = tmp_path / 'run'
    record = tmp_path / 'autocast.json'
    script = tmp_path / 'probe.py'
    script.write_text(f'''import json, sys
sys.path.insert(0, {str(REPO)!r})
import torch
import main
from vitkd.distiller import Distiller
seen = []
plain = Distiller.student_features

def recorded(self, images):
    feats = plain(self, images)
    seen.append(dict(enabled=torch.is_autocast_enabled('cpu'), dtype=str(torch.get_autocast_dtype('cpu')),
                     logits=str(feats.logits.dtype), teacher=str(self.teacher.dtype)))
    return feats
Distiller.student_features = recorded
code = main.main(sys.argv[1:])
json.dump(seen, open({str(record)!r}, 'w'))
sys.exit(code)
''')
    launch = [sys.executable, '-m', 'accelerate.commands.launch', '--cpu', '--num_processes', '1', '--num_machines',
              '1', '--mixed_precision', 'bf16', '--dynamo_backend', 'no', str(script)]
    proc = subprocess.run(launch + TINY + ['--distill', 'deit_hard', '--max-steps', '2', '--output-dir', str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(record.read_text())
    assert len(seen) == 2
    assert all(s == dict(enabled=True, dtype='torch.bfloat16', logits='torch.bfloat16', teacher='torch.bfloat16')
               for s in seen), seen
    import yaml
    assert yaml.safe_load((out / 'config.yaml').read_text())['mixed_precision'] == 'bf16'
    assert 'precision bf16' in proc.stdout


def test_teacher_cast_matches_autocast_and_is_held_in_bf16():
    """A teacher cast to bf16 once gives the logits that autocast gives from its fp32 weights (the same bf16
    roundings of weights and activations), and its input re-normalisation runs before the cast."""
    import vitkd
    torch.manual_seed(0)
    teacher = vitkd.create_teacher('regnety_002', 10, pretrained=False, in_chans=1)
    teacher.set_student_normalization((0.3,), (0.4,))
    x = torch.randn(4, 1, 32, 32)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        reference = teacher.model(teacher.prepare_input(x)).float()
    teacher.cast(torch.bfloat16)
    assert teacher.dtype == torch.bfloat16 and teacher.in_scale.dtype == torch.float32
    with torch.autocast('cpu', dtype=torch.bfloat16):
        cast = teacher.model(teacher.prepare_input(x)).float()
    torch.testing.assert_close(cast, reference, atol=0.05 * reference.abs().max().item(), rtol=0)
    assert teacher.model(teacher.prepare_input(x)).dtype == torch.bfloat16  # no autocast needed (setup probes)
