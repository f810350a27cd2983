"""Two CPU processes through Accelerate train exactly like one process with the doubled batch.

The end-to-end tests launch ``main.py`` with ``accelerate launch --multi_gpu --num_processes 2`` (gloo, CPU) at a
per-process batch of 8 and plain ``python main.py`` at batch 16 on a tiny ImageFolder (64 train / 22 val images, random
crop + flip on: each sample's augmentation is seeded by its index, so it does not depend on the process that loads it;
mixup off: it pairs samples inside each process's batch), and compare the logged loss terms step by step and the
exported student weights. A probe wrapped around ``vitkd.run.build_run`` records, on every rank, that the distiller is
DDP-wrapped and the teacher is not (and holds identical weights on both ranks). Students are LayerNorm-only (timm's
distilled DeiT): a BatchNorm student (the VkD conv stem) uses per-process batch statistics, as the official DDP runs do.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import vitkd  # noqa: F401  (registers students and losses)
from vitkd.distiller import LossEntry, may_leave_parameters_unused
from vitkd.losses import create_loss

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
VAL_IMAGES = 22


# ---- fast: which runs need DDP's unused-parameter search ----------------------------------------------------------

@pytest.mark.parametrize('methods,epochs,task_weight,expected', [
    ([('vkd', 1.0, 0.0)], 3, None, False),
    ([('dist', 1.0, 0.0), ('kd', 0.5, 0.0)], 3, None, False),
    ([('vkd', 0.0, 0.0)], 3, None, True),              # a zero-weight term is skipped: its projector idles
    ([('kd', 1.0, 2.0)], 3, None, True),               # epoch 0 of a linear warm-up has weight 0
    ([('kd', 1.0, 0.0)], 3, 0.0, True),                # --task-weight 0: nothing trains the cls head
    ([('fsp', 1.0, 0.0)], 3, None, True),              # the method says so (and its CE-off stage)
    ([('ft', 1.0, 0.0)], 3, None, True),
    ([('ab', 1.0, 0.0)], 3, None, True),
])
def test_unused_parameter_detection(methods, epochs, task_weight, expected):
    entries = [LossEntry(create_loss(name), weight, warmup) for name, weight, warmup in methods]
    assert may_leave_parameters_unused(entries, epochs, task_weight) is expected


def test_task_weight_zero_in_a_later_epoch_is_detected():
    # DeiT hard distillation with α = 1 keeps no task CE: found by scanning every epoch's task_weight
    assert may_leave_parameters_unused([LossEntry(create_loss('deit_hard', alpha=1.0))], 2) is True
    assert may_leave_parameters_unused([LossEntry(create_loss('deit_hard', alpha=0.5))], 2) is False


# ---- fast: Accelerate's sharding of vitkd's loader gives each step the same samples -------------------------------

def test_accelerate_sharding_of_the_epoch_sampler_keeps_the_global_batches():
    """Process p of N gets loader batches p, p+N, …: step s of N processes at batch B = step s of 1 process at N·B."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    from vitkd.data import EpochSampler
    n, per_process, world = 70, 4, 2
    sampler = EpochSampler(n, seed=3)
    sampler.set_epoch(5)
    single = list(BatchSampler(sampler, per_process * world, drop_last=True))
    shards = [list(BatchSamplerShard(BatchSampler(sampler, per_process, drop_last=True), world, p))
              for p in range(world)]
    assert len(shards[0]) == len(shards[1]) == len(single) == n // (per_process * world)
    for step, batch in enumerate(single):
        assert [key for p in range(world) for key in shards[p][step]] == batch  # same keys (index, seed), same order


# ---- end to end: accelerate launch with 2 processes ---------------------------------------------------------------

PROBE = textwrap.dedent('''
    """Runs main.py, recording on every rank what build_run built (DDP wrapping, teacher identity), the step module it
    switched to (DDP's search dropped, compiled), the pieces dynamo's DDP optimiser split each compiled graph into, and
    whether the DDP module outlived main() (its reference cycles would keep the process group alive into the
    interpreter's exit)."""
    import json, os, sys, weakref
    from pathlib import Path
    sys.path.insert(0, os.environ['VITKD_REPO'])
    import main
    import vitkd.cli
    from torch.nn.parallel import DistributedDataParallel as DDP
    build_run = vitkd.cli.build_run

    def probed(cfg, accelerator, entries=None):
        r = build_run(cfg, accelerator, entries)
        teacher_ids = {id(p) for p in r.teacher.model.parameters()}
        info = dict(rank=accelerator.process_index, world=accelerator.num_processes,
                    distiller_is_ddp=isinstance(r.distiller, DDP),
                    teacher_is_ddp=isinstance(r.teacher, DDP) or isinstance(r.teacher.model, DDP),
                    teacher_params_in_ddp=any(id(p) in teacher_ids for p in r.distiller.parameters()),
                    find_unused=getattr(r.distiller, 'find_unused_parameters', None),
                    forward_sync_buffers=getattr(r.distiller, 'forward_sync_buffers', None),
                    bucket_view=getattr(r.distiller, 'gradient_as_bucket_view', None),
                    teacher_checksum=float(sum(p.double().abs().sum() for p in r.teacher.model.parameters())))
        Path(os.environ['PROBE_OUT'], f'rank{accelerator.process_index}.json').write_text(json.dumps(info))
        built.append((accelerator.process_index, weakref.ref(r.distiller)))
        return r

    built = []
    vitkd.cli.build_run = probed
    if os.environ.get('PROBE_DDP_DEFAULTS') == 'torch':  # DDP as torch/Accelerate default it, for comparison
        from accelerate.utils import DistributedDataParallelKwargs
        from vitkd import ddp, devices, run
        devices.ddp_kwargs = lambda find_unused_parameters: DistributedDataParallelKwargs(
            find_unused_parameters=find_unused_parameters)
        ddp.sync_buffers_if_needed = run.sync_buffers_if_needed = lambda model: model
    from vitkd.ddp import StepModule
    model_for_step = StepModule.model_for_step

    def recorded(self, model, epoch):
        new = model_for_step(self, model, epoch)
        if new is not model:
            switches.append(dict(epoch=epoch, find_unused=new.find_unused_parameters,
                                 compiled=hasattr(new, '_orig_mod')))
            rank = int(os.environ.get('RANK', 0))
            Path(os.environ['PROBE_OUT'], f'switches{rank}.json').write_text(json.dumps(switches))
        return new

    switches = []

    StepModule.model_for_step = recorded
    from torch._dynamo.backends.distributed import DDPOptimizer
    split = DDPOptimizer.compile_fn
    pieces = []

    def counted(self, gm, example_inputs, **kwargs):
        compiled = split(self, gm, example_inputs, **kwargs)
        pieces.append(len(self.buckets))
        return compiled

    DDPOptimizer.compile_fn = counted
    code = main.main(sys.argv[1:])
    for rank, ref in built:
        Path(os.environ['PROBE_OUT'], f'after-rank{rank}.json').write_text(json.dumps(
            {'ddp_alive': ref() is not None, 'ddp_pieces': pieces}))
    sys.exit(code)
''')


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory) -> Path:
    """64 train images (8 classes × 8), 22 val images (8 classes × 3, two classes one short: odd), 32 px RGB."""
    root = tmp_path_factory.mktemp('imgs')
    rng = np.random.default_rng(0)
    for split, per_class in (('train', 8), ('val', 3)):
        for c in range(8):
            folder = root / split / f'class{c}'
            folder.mkdir(parents=True)
            for i in range(per_class - (split == 'val' and c >= 6)):
                base = np.zeros((32, 32, 3), np.uint8)
                base[..., c % 3] = 30 * (c + 1)
                Image.fromarray(np.clip(base + rng.integers(0, 80, (32, 32, 3)), 0, 255).astype(np.uint8)).save(
                    folder / f'{i}.png')
    return root


def _args(data: Path, out: Path, batch: int, *extra: str) -> list[str]:
    return ['--data-path', str(data), '--input-size', '32', '--student', 'deit_tiny_distilled_patch16_224',
            '--student-kwargs', 'img_size=32', 'patch_size=8', 'depth=2', 'embed_dim=32', 'num_heads=2',
            '--teacher', 'regnety_002', '--no-teacher-pretrained', '--epochs', '2', '--batch-size', str(batch),
            '--num-workers', '0', '--lr', '1e-3', '--unscale-lr', '--warmup-epochs', '0', '--aa', 'none',
            '--reprob', '0', '--color-jitter', '0', '--mixup', '0', '--cutmix', '0', '--scale', '0.5', '1',
            '--hflip', '0.5', '--log-every', '1', '--mixed-precision', 'no', '--output-dir', str(out), *extra]


#: comparisons across process counts run in float64 (see tests/float64_site/sitecustomize.py for why): weights agree to
#: ~1e-14 there, so 1e-9 is five orders of magnitude above the rounding and far below any real difference
FLOAT64_ATOL = 1e-9
#: the log records every term as float32 (vitkd.training.TermMeter): two float64 values that agree to ~1e-14 may still
#: round to neighbouring float32 numbers, so logged terms of float64 runs are compared to two float32 units (2^-22)
LOGGED_REL = 2.0 ** -22


def _env(probe_out: Path | None = None, float64: bool = False) -> dict:
    path = os.pathsep.join([str(REPO / 'tests' / 'float64_site')] * float64 + [str(REPO)])
    env = dict(os.environ, HF_HUB_OFFLINE='1', PYTHONPATH=path, OMP_WAIT_POLICY='PASSIVE', VITKD_REPO=str(REPO),
               ACCELERATE_USE_CPU='1', PYTHONUNBUFFERED='1')
    if probe_out is not None:
        env['PROBE_OUT'] = str(probe_out)
    return env


def run_one_process(args: list[str], float64: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / 'main.py'), *args], capture_output=True, text=True,
                          env=_env(float64=float64), cwd=REPO, timeout=300)


def run_two_processes(args: list[str], tmp: Path, dynamo_backend: str = 'no', float64: bool = False,
                      **env) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """``accelerate launch`` with 2 CPU processes on the probe; returns the result and each rank's probe record (with
    ``switches``: the epochs at which the run switched modules, dropping DDP's unused-parameter search or compiling)."""
    probe_out = tmp / f'probe-{len(list(tmp.glob("probe-*")))}'
    probe_out.mkdir()
    script = tmp / 'probe_main.py'
    script.write_text(PROBE)
    launcher = Path(sys.executable).with_name('accelerate')
    launch = [str(launcher), 'launch'] if launcher.exists() else [sys.executable, '-m', 'accelerate.commands.launch']
    cmd = [*launch, '--multi_gpu', '--num_processes', '2', '--num_machines', '1', '--mixed_precision', 'no',
           '--dynamo_backend', dynamo_backend, '--main_process_port', '0', '--num_cpu_threads_per_process', '1', str(script),
           *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=dict(_env(probe_out, float64), **env), cwd=REPO,
                            timeout=300)
    probes = [json.loads(p.read_text()) for p in sorted(probe_out.glob('rank*.json'))]
    for probe, after in zip(probes, sorted(probe_out.glob('after-rank*.json'))):
        probe.update(json.loads(after.read_text()))
    for rank, probe in enumerate(probes):
        switches = probe_out / f'switches{rank}.json'
        probe['switches'] = json.loads(switches.read_text()) if switches.exists() else []
    return result, probes


def step_records(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / 'log.jsonl').read_text().splitlines()) if r['kind'] == 'step']


def assert_same_weights(one: Path, two: Path) -> None:
    """The exported students of two float64 runs agree to :data:`FLOAT64_ATOL` (and are float64: the shim took)."""
    wa, wb = load_file(one / 'student' / 'model.safetensors'), load_file(two / 'student' / 'model.safetensors')
    assert set(wa) == set(wb) and {w.dtype for w in (*wa.values(), *wb.values())} == {torch.float64}
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=FLOAT64_ATOL, msg=k)


def assert_same_training(one: Path, two: Path) -> None:
    """Two float64 runs: the same logged terms at every step and the same exported weights."""
    a, b = step_records(one), step_records(two)
    assert len(a) == len(b) == 8  # 64 images / global batch 16 × 2 epochs
    for ra, rb in zip(a, b):
        terms = [k for k in ra if k not in ('kind', 'epoch', 'step', 'lr', 'img_per_s')]
        assert terms and set(terms) == set(k for k in rb if k not in ('kind', 'epoch', 'step', 'lr', 'img_per_s'))
        assert ra['step'] == rb['step'] and ra['lr'] == pytest.approx(rb['lr'], rel=1e-9)
        for k in terms:
            assert ra[k] == pytest.approx(rb[k], rel=LOGGED_REL, abs=1e-12), (ra['step'], k, ra[k], rb[k])
    assert_same_weights(one, two)
    assert abs(a[-1]['loss'] - a[0]['loss']) > 1e-2  # it trained: the curves compared are not flat


def assert_probes(probes: list[dict], find_unused: bool, forward_sync_buffers: bool = False) -> None:
    assert [p['rank'] for p in probes] == [0, 1] and all(p['world'] == 2 for p in probes)
    for p in probes:
        assert p['distiller_is_ddp'] and not p['teacher_is_ddp'] and not p['teacher_params_in_ddp']
        assert p['find_unused'] is find_unused
        assert p['ddp_alive'] is False  # collected before main() returned, while Python can still run its destructors
        assert p['forward_sync_buffers'] is forward_sync_buffers and p['bucket_view'] is True
    assert probes[0]['teacher_checksum'] == probes[1]['teacher_checksum']  # same (random) teacher on both ranks


def assert_each_val_sample_counted_once(out: Path) -> None:
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['student']['samples'] == VAL_IMAGES
    assert summary['teacher']['samples'] == VAL_IMAGES


@pytest.mark.slow
@pytest.mark.ci_once
def test_two_processes_match_one_feature_loss_vkd(image_folder, tmp_path):
    one = run_one_process(_args(image_folder, tmp_path / 'one', 16, '--distill', 'vkd'), float64=True)
    assert one.returncode == 0, one.stderr[-3000:]
    two, probes = run_two_processes(_args(image_folder, tmp_path / 'two', 8, '--distill', 'vkd'), tmp_path,
                                    float64=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert 'global batch 16' in one.stdout and 'global batch 16' in two.stdout
    assert_probes(probes, find_unused=False)
    assert_same_training(tmp_path / 'one', tmp_path / 'two')
    assert_each_val_sample_counted_once(tmp_path / 'two')


@pytest.mark.slow
@pytest.mark.ci_once
def test_two_processes_match_one_relational_loss_dist_global_scope(image_folder, tmp_path):
    one = run_one_process(_args(image_folder, tmp_path / 'one', 16, '--distill', 'dist'), float64=True)
    assert one.returncode == 0, one.stderr[-3000:]
    two, probes = run_two_processes(_args(image_folder, tmp_path / 'two', 8, '--distill', 'dist'), tmp_path,
                                    float64=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert_probes(probes, find_unused=False)
    assert_same_training(tmp_path / 'one', tmp_path / 'two')
    assert_each_val_sample_counted_once(tmp_path / 'two')
    # control: the per-process intra-class term (DIST's official scope) is a different loss on 2 processes
    local, _ = run_two_processes(_args(image_folder, tmp_path / 'local', 8, '--distill', 'dist', '--loss-opts',
                                       'dist.intra_scope=local'), tmp_path, float64=True)
    assert local.returncode == 0, local.stderr[-3000:]
    first_one, first_local = step_records(tmp_path / 'one')[0], step_records(tmp_path / 'local')[0]
    assert first_local['dist.inter'] == pytest.approx(first_one['dist.inter'], rel=LOGGED_REL)  # per-sample term
    assert abs(first_local['dist.intra'] - first_one['dist.intra']) > 1e-3


@pytest.mark.slow
def test_two_processes_with_idle_parameters_need_and_get_find_unused(image_folder, tmp_path):
    """FSP's first stage keeps the task CE off: the heads get no gradient, which plain DDP rejects."""
    args = ['--distill', 'fsp', '--epochs', '1']
    auto, probes = run_two_processes(_args(image_folder, tmp_path / 'auto', 8, *args), tmp_path)
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert_probes(probes, find_unused=True)
    off, _ = run_two_processes(_args(image_folder, tmp_path / 'off', 8, *args, '--no-ddp-find-unused'), tmp_path)
    assert off.returncode != 0 and 'find_unused_parameters' in off.stderr


@pytest.mark.slow
def test_two_processes_record_and_replay_the_teacher_cache(image_folder, tmp_path):
    """Each process writes its own file of its samples' teacher outputs; a second run replays every epoch (mixup on)."""
    cache = tmp_path / 'cache'
    mix = ['--distill', 'vkd', '--mixup', '0.8', '--cutmix', '1.0', '--teacher-cache', str(cache)]
    first, _ = run_two_processes(_args(image_folder, tmp_path / 'first', 8, *mix, '--teacher-cache-epochs', '1'),
                                 tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    for rank in (0, 1):  # one record file per process, each with its 32 samples, read back intact
        assert json.loads((cache / 'epoch_0000' / f'process_{rank:03d}.done').read_text())['records'] == 32
    second, _ = run_two_processes(_args(image_folder, tmp_path / 'second', 8, *mix), tmp_path)  # epochs from meta
    assert second.returncode == 0, second.stderr[-3000:]
    a, b = step_records(tmp_path / 'first'), step_records(tmp_path / 'second')
    assert len(a) == len(b) == 8
    for ra, rb in zip(a, b):  # first run: epoch 0 live, epoch 1 replayed; second run: both replayed
        for k in ('loss', 'task', 'vkd.repr', 'vkd.kl'):
            assert rb[k] == pytest.approx(ra[k], rel=2e-3, abs=1e-4), (ra['step'], k)


@pytest.mark.slow
def test_warm_up_searches_unused_parameters_only_for_its_first_step_and_trains_the_same(image_folder, tmp_path):
    """A linear warm-up skips its term at epoch 0 only: DDP starts with the search, is rewrapped without it at the
    next optimizer step, and the weights are bit-identical to DDP with torch's defaults (search for the whole run,
    buffers broadcast at every forward, gradients copied out of the buckets): the same sums of the same gradients.
    Against one process at the doubled batch, the usual reduction-order tolerance (assert_same_training)."""
    warm = ['--distill', 'vkd', '--loss-opts', 'vkd.warmup_epochs=1']
    one = run_one_process(_args(image_folder, tmp_path / 'one', 16, *warm))
    assert one.returncode == 0, one.stderr[-3000:]
    two, probes = run_two_processes(_args(image_folder, tmp_path / 'two', 8, *warm), tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert_probes(probes, find_unused=True)
    assert all(p['switches'] == [{'epoch': pytest.approx(1 / 4), 'find_unused': False, 'compiled': False}]
               for p in probes)  # 4 steps/epoch
    assert_same_training(tmp_path / 'one', tmp_path / 'two')
    torch_defaults, probes = run_two_processes(_args(image_folder, tmp_path / 'torch', 8, *warm, '--ddp-find-unused'),
                                               tmp_path, PROBE_DDP_DEFAULTS='torch')
    assert torch_defaults.returncode == 0, torch_defaults.stderr[-3000:]
    assert all(p['find_unused'] and p['forward_sync_buffers'] and not p['bucket_view'] and p['switches'] == []
               for p in probes)
    ours, theirs = (load_file(tmp_path / run / 'student' / 'model.safetensors') for run in ('two', 'torch'))
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    assert step_records(tmp_path / 'two') == [{**r, 'img_per_s': a['img_per_s']} for r, a in
                                             zip(step_records(tmp_path / 'torch'), step_records(tmp_path / 'two'))]


@pytest.mark.slow
def test_compiled_ddp_module_with_a_warm_up_trains_like_eager(image_folder, tmp_path):
    """``accelerate launch --dynamo_backend aot_eager`` (dynamo's graphs, its DDP optimiser and AOTAutograd's traced
    backward, without inductor's code generation). The warm-up's first step leaves the distillation head idle (a
    compiled backward would give it a zero gradient that AdamW acts on): DDP searches for unused parameters there and
    is rewrapped without the search at the second step; the ramping weight would make dynamo recompile every step
    (:mod:`vitkd.ddp`), so the module is compiled once the warm-up is over, at epoch 1. The student is wide enough
    (1.8 MB of float64 weights) that dynamo splits each graph at DDP's first bucket (1 MB), and the compiled module
    is compiled twice per process (the first step's epoch and step as constants, then as inputs). Expected: the eager
    2-process run's losses and weights, in float64 within the tolerance of the other cross-process comparisons
    (:func:`assert_same_training`)."""
    warm = ['--distill', 'vkd', '--loss-opts', 'vkd.warmup_epochs=1', '--student-kwargs', 'img_size=32',
            'patch_size=8', 'depth=2', 'embed_dim=96', 'num_heads=2']
    rewrap = {'epoch': pytest.approx(1 / 4), 'find_unused': False, 'compiled': False}
    eager, probes = run_two_processes(_args(image_folder, tmp_path / 'eager', 8, *warm), tmp_path, float64=True)
    assert eager.returncode == 0, eager.stderr[-3000:]
    assert all(p['switches'] == [rewrap] and p['ddp_pieces'] == [] for p in probes)
    compiled, probes = run_two_processes(_args(image_folder, tmp_path / 'compiled', 8, *warm), tmp_path,
                                         dynamo_backend='aot_eager', float64=True)
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    assert_probes(probes, find_unused=True)  # as built: eager DDP with the search, for the warm-up's first step
    for p in probes:
        assert p['switches'] == [rewrap, {'epoch': 1.0, 'find_unused': False, 'compiled': True}]
        assert p['ddp_pieces'] == [2, 2]  # two compilations, each graph split at DDP's first bucket
    assert_same_training(tmp_path / 'eager', tmp_path / 'compiled')
