"""The GPU path, shown on CPU: the launcher's precision, every model on the training device before a method probes it,
and no host read of a device value in a training step outside logging steps."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TINY = ['--student', 'deit_ti_distilled', '--student-kwargs', 'img_size=28', 'patch_size=4', 'depth=2', 'embed_dim=48',
        'num_heads=2', 'in_chans=1', '--teacher', 'regnety_002', '--no-teacher-pretrained', '--teacher-kwargs',
        'in_chans=1', '--train-subset', '0.01', '--num-workers', '0', '--batch-size', '8', '--no-eval-teacher']


class ScalarReads(TorchDispatchMode):
    """Counts ``aten._local_scalar_dense``: what ``.item()``, ``float(t)``, ``int(t)`` and ``bool(t)`` dispatch to, i.e.
    every read of a tensor's value by the host (on a GPU, a wait for every kernel queued before it).

    Reads of the optimizer's step counters are left out: torch keeps them on the host for the non-fused optimizers (no
    device wait) and on the device, without any read, for the fused CUDA ones the GPU path uses.
    """

    def __init__(self, exclude=()):
        super().__init__()
        self.count, self.exclude = 0, exclude

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and not any(args[0] is t for t in self.exclude()):
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_reads_per_step(argv, steps: int = 6) -> list[int]:
    """Build the run of ``main.py <argv>`` and train ``steps`` steps with logging only at the end; returns the host
    reads of each step (the last one is a logging step)."""
    from vitkd.engine import train_one_epoch
    from vitkd import run as runlib
    from vitkd.config import parse_args
    from vitkd.training import NonFiniteGuard
    # one loader worker: the transforms' own reads of host images happen there, as they do on a GPU machine
    cfg, _ = parse_args(argv + ['--max-steps', str(steps), '--log-every', str(steps), '--num-workers', '1'])
    accelerator = runlib.make_accelerator(cfg)
    r = runlib.build_run(cfg, accelerator)
    guard = NonFiniteGuard(cfg.nan_policy, r.distiller_unwrapped, accelerator)
    optimizer_steps = lambda: [s['step'] for s in r.optimizer.optimizer.state.values() if 'step' in s]  # noqa: E731
    per_step, mode = [], ScalarReads(optimizer_steps)

    def step_hook(last_batch, collective):
        per_step.append(mode.count - sum(per_step))
        return False
    with mode:
        train_one_epoch(r.distiller, r.batches, r.optimizer, r.scheduler, accelerator, r.state, guard, cfg.clip_grad,
                        r.ema, cfg.log_every, step_hook=step_hook)
    return per_step


@pytest.mark.parametrize('method', ['deit_hard', 'vkd', 'crd'])
def test_no_host_read_between_logging_steps(method, tmp_path):
    extra = ['--model-ema'] if method == 'deit_hard' else []
    reads = count_reads_per_step(TINY + ['--distill', method, '--output-dir', str(tmp_path / 'run')] + extra)
    assert len(reads) == 6
    assert reads[1:-1] == [0, 0, 0, 0], reads  # the first step also opens the epoch; the last one logs
    assert reads[-1] > 0  # the logging step does read (so the counter sees reads)


@pytest.mark.slow
@pytest.mark.ci_once
def test_no_host_read_between_logging_steps_on_two_processes(tmp_path):
    """DIST on 2 CPU processes under accelerate launch: the terms, the finiteness flag and the deadline are reduced
    or read only at logging steps."""
    script = tmp_path / 'count.py'
    script.write_text(f'import json, os, sys\nsys.path.insert(0, {str(REPO / "tests")!r})\n'
                      'from test_gpu_path import TINY, count_reads_per_step\n'
                      f'reads = count_reads_per_step(TINY + ["--distill", "dist", "--output-dir", {str(tmp_path)!r}])\n'
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
        assert reads[1:-1] == [0, 0, 0, 0] and reads[-1] > 0, rows


def test_models_are_on_the_training_device_before_a_method_probes_them(monkeypatch, tmp_path):
    """The meta device stands in for CUDA: student and teacher must both be there when VkD's setup runs its probe
    batch through them (a CPU student fed a probe to a device teacher fails), and every part the methods built must
    be there before the optimizer is made."""
    from vitkd import run as runlib
    from vitkd.config import parse_args
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
