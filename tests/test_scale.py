"""What a run at scale is made of, checked on one CPU process: DDP's settings (vitkd.ddp), the loader workers each
process gets, the validation loader, and the per-term means of a step's logged terms."""
import math
from types import SimpleNamespace

import pytest
import timm
import torch

import vitkd
from vitkd import devices
from vitkd.arguments import parse_args
from vitkd.ddp import rank_local_buffers
from vitkd.devices import cpu_share, loader_workers
from vitkd.distiller import Distiller, LossEntry, idle_parameters_until
from vitkd.losses import RunInfo, create_loss
from vitkd.models import Teacher
from vitkd.training import TermMeter

torch.set_num_threads(1)


# ---- DDP's search for unused parameters: from which epoch no step needs it --------------------------------------

@pytest.mark.parametrize('methods,task_weight,expected', [
    ([('vkd', 1.0, 0.0)], None, 0.0),                                 # every step uses every parameter
    ([('vkd', 1.0, 0.5)], None, math.nextafter(0.0, 1.0)),            # weight 0 at epoch 0 only: the first batch
    ([('vkd', 0.0, 0.0)], None, math.inf),                            # a term that never runs
    ([('kd', 1.0, 0.0)], 0.0, math.inf),                              # no task CE at all
    ([('deit_hard', 1.0, 0.0)], None, 0.0),                           # α = 0.5: the task CE always on
])
def test_idle_parameters_until(methods, task_weight, expected):
    entries = [LossEntry(create_loss(name), weight, warmup) for name, weight, warmup in methods]
    assert idle_parameters_until(entries, 3, task_weight) == expected


def test_a_task_weight_zero_epoch_keeps_the_search_until_the_next_epoch():
    class OffInEpochOne(type(create_loss('kd'))):
        def task_weight(self, epoch):
            return 0.0 if int(epoch) == 1 else 1.0

    loss = OffInEpochOne()
    assert idle_parameters_until([LossEntry(loss)], 4) == 2.0  # epoch 1's steps lie in [1, 2)
    assert idle_parameters_until([LossEntry(loss)], 1) == 0.0  # a 1-epoch run never reaches epoch 1


# ---- which buffers DDP must keep in step ---------------------------------------------------------------------------

def _distiller(method: str, student=None, **opts) -> Distiller:
    torch.manual_seed(0)
    student = student or vitkd.create_student('deit_tiny_distilled_patch16_224', 10, img_size=32, patch_size=8,
                                              depth=2, embed_dim=32, num_heads=2)
    teacher = Teacher(timm.create_model('regnety_002', num_classes=10), 'test')
    return Distiller(student, teacher, [LossEntry(create_loss(method, **opts))],
                     RunInfo(num_classes=10, input_size=(3, 32, 32), num_samples=16,
                             train_labels=torch.arange(16) % 10))


def test_constant_buffers_are_not_rank_local():
    vkd = _distiller('vkd')
    assert any('.parametrizations.' in name for name, _ in vkd.named_buffers())  # the orthogonal projector's base
    assert rank_local_buffers(vkd) == []


def test_running_statistics_are_rank_local():
    student = timm.create_model('resnet10t', num_classes=10)
    bn = rank_local_buffers(_distiller('kd', student))
    expected = {f'student.{n}' for n, m in student.named_modules() if isinstance(m, torch.nn.BatchNorm2d)
                for n in (f'{n}.running_mean', f'{n}.running_var', f'{n}.num_batches_tracked')}
    assert set(bn) == expected and expected


def test_a_methods_ignored_buffers_are_not_rank_local_its_others_are():
    crd = _distiller('crd')
    ignored = set(crd._ddp_params_and_buffers_to_ignore)
    assert ignored and not ignored & set(rank_local_buffers(crd))
    ofd = _distiller('ofd', margin='ema')
    local = rank_local_buffers(ofd)
    assert any('margin_' in name for name in local)  # running margins follow each rank's teacher maps


# ---- a step's logged terms -----------------------------------------------------------------------------------------

def test_term_meter_averages_a_term_over_the_steps_that_had_it():
    meter = TermMeter(SimpleNamespace(num_processes=1))
    t = torch.tensor
    meter.add({'loss': t(4.0), 'task': t(4.0)}, 2)  # a warm-up's first step: no vkd term
    meter.add({'loss': t(3.0), 'task': t(2.0), 'vkd.kl': t(1.0)}, 2)
    assert meter.current() == {'loss': 3.0, 'task': 2.0, 'vkd.kl': 1.0}
    meter.add({'loss': t(5.0), 'task': t(2.0), 'vkd.kl': t(3.0)}, 2)
    means = meter.means()
    assert means['loss'] == 4.0 and means['task'] == pytest.approx(8 / 3) and means['vkd.kl'] == 2.0
    assert means['samples'] == 6


# ---- loader workers ------------------------------------------------------------------------------------------------

def test_processes_sharing_cores_split_them_bound_processes_keep_theirs():
    machine = set(range(32))
    assert cpu_share(machine, [machine] * 8) == 4.0                       # accelerate launch, 8 processes
    bound = [set(range(4 * r, 4 * r + 4)) for r in range(8)]              # per-rank binding, 4 cores each
    assert cpu_share(bound[3], bound) == 4.0
    numa = [set(range(16)) if r < 4 else set(range(16, 32)) for r in range(8)]  # 4 GPUs per NUMA node
    assert cpu_share(numa[0], numa) == 4.0
    assert cpu_share({0, 1}, [{0, 1}, {1, 2}]) == 1.5                     # core 1 shared, core 0 not


@pytest.mark.parametrize('cores,slurm,per_task,expected', [
    (4.0, None, 1, 3), (1.0, None, 1, 1), (64.0, None, 1, 16), (2.5, None, 1, 1),
    (32.0, 10, 1, 9),   # Slurm allocated 10 CPUs per task without binding them: the allocation counts
    (32.0, 80, 8, 9),   # one task of 80 CPUs launching 8 processes
])
def test_loader_workers(cores, slurm, per_task, expected):
    assert loader_workers(cores, slurm, per_task) == expected


def test_default_workers_read_the_affinity_and_slurm(monkeypatch):
    accelerator = SimpleNamespace(num_processes=1)
    monkeypatch.setattr(devices.os, 'sched_getaffinity', lambda pid: set(range(12)), raising=False)
    monkeypatch.delenv('SLURM_CPUS_PER_TASK', raising=False)
    assert devices.default_num_workers(accelerator) == 11
    monkeypatch.setenv('SLURM_CPUS_PER_TASK', '6')
    assert devices.default_num_workers(accelerator) == 5


def test_validation_loader_keeps_its_workers_and_is_built_once(tmp_path):
    from vitkd.build import build_eval_loader
    cfg, _ = parse_args(['--num-workers', '2', '--batch-size', '4'])
    loader = build_eval_loader(list(range(10)), cfg)
    assert loader.persistent_workers and loader.num_workers == 2 and loader.batch_size == 6
    assert loader.pin_memory == torch.cuda.is_available()
    cfg.num_workers = 0
    assert not build_eval_loader(list(range(10)), cfg).persistent_workers
