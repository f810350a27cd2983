"""Dense runs on two CPU processes (``accelerate launch``, gloo) train exactly like one process at the doubled batch,
and a dense run killed mid-training and resumed with ``--resume auto`` equals the uninterrupted run bit for bit.

The data are embedded Fashion-MNIST scenes written to disk as a COCO detection set and a segmentation folder (24
training, 4 validation images at 64 px: 3 steps of global batch 8 per epoch, 2 epochs), with horizontal flips and
scale jitter on: each sample's augmentation is seeded by its index and epoch, so it does not depend on the process
that loads it, and scale jitter gives each process a different number of labelled pixels and foreground points (the
counts the task losses divide by). The comparisons run in float64 with the tolerances derived in
``tests/test_multiprocess.py`` (``tests/float64_site``): ~1e-14 of reordering against 1e-9.

Methods: fitnet, vkd and nd (detection), vkd, kd, nd and dist with ``intra_scope=global`` (segmentation); nd's class
centres come from a teacher pass split across the processes. dist's default dense scope, ``local`` (the official
segmentation form), correlates each process's own pixels: a different loss on 2 processes, so it is not compared.
The student is timm's LayerNorm-only distilled DeiT (a BatchNorm student would use per-process batch statistics);
the teacher a random dense CNN of the same task (frozen, its BatchNorm in eval mode).
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from test_kill_resume import complete_steps
from test_multinode import _descendants
from test_multiprocess import LOGGED_REL, _env, assert_same_weights, run_one_process, run_two_processes, step_records
from vitkd.dense.data import FashionScenes

REPO = Path(__file__).resolve().parents[1]
TRAIN, VAL, SIZE = 24, 4, 64
STEPS = 2 * TRAIN // 8  # 2 epochs of global batch 8


def _scene_image(scene: dict) -> np.ndarray:
    return np.repeat((scene['image'][0].numpy() * 255).round().astype(np.uint8)[..., None], 3, axis=2)


@pytest.fixture(scope='module')
def scene_sets(tmp_path_factory) -> dict:
    """``{'detect': <COCO root>, 'segment': <segmentation folder>}`` of the same scenes."""
    root = tmp_path_factory.mktemp('scenes')
    coco, seg = root / 'coco', root / 'seg'
    (coco / 'annotations').mkdir(parents=True)
    for split, count in (('train', TRAIN), ('val', VAL)):
        scenes = FashionScenes(split, SIZE, num_scenes=count)
        images, annotations = [], []
        for sub in (coco / split, seg / split / 'images', seg / split / 'masks'):
            sub.mkdir(parents=True)
        for i in range(count):
            scene = scenes[i]
            Image.fromarray(_scene_image(scene)).save(coco / split / f'{i}.png')
            Image.fromarray(_scene_image(scene)).save(seg / split / 'images' / f'{i}.png')
            Image.fromarray(scene['mask'].numpy().astype(np.uint8)).save(seg / split / 'masks' / f'{i}.png')
            images.append(dict(id=i + 1, file_name=f'{i}.png', width=SIZE, height=SIZE))
            for (x0, y0, x1, y1), label in zip(scene['boxes'].tolist(), scene['labels'].tolist()):
                annotations.append(dict(id=len(annotations) + 1, image_id=i + 1, category_id=label + 1, iscrowd=0,
                                        bbox=[x0, y0, x1 - x0, y1 - y0], area=(x1 - x0) * (y1 - y0)))
        categories = [dict(id=k + 1, name=name) for k, name in enumerate(scenes.classes)]
        (coco / 'annotations' / f'instances_{split}.json').write_text(json.dumps(
            dict(images=images, annotations=annotations, categories=categories)))
    (seg / 'classes.txt').write_text('\n'.join(['background', *FashionScenes('val', SIZE, num_scenes=1).classes]))
    return {'detect': coco, 'segment': seg}


def _args(task: str, data: Path, out: Path, batch: int, *extra: str) -> list[str]:
    teacher = f'vitkd_dense_{"detector" if task == "detect" else "segmenter"}'
    return ['--task', task, '--data-path', str(data), '--input-size', str(SIZE),
            '--student', 'deit_tiny_distilled_patch16_224', '--student-kwargs', 'patch_size=8', 'depth=1',
            'embed_dim=48', 'num_heads=3', '--pyramid-strides', '4', '8', '16', '--pyramid-channels', '32',
            '--teacher', teacher, '--no-teacher-pretrained', '--teacher-kwargs', 'backbone=test_resnet',
            'img_size=64', 'strides=[4, 8, 16]', 'pyramid_channels=32', '--epochs', '2', '--batch-size', str(batch),
            '--num-workers', '0', '--lr', '1e-3', '--unscale-lr', '--warmup-epochs', '0', '--hflip', '0.5',
            '--scale-jitter', '0.7', '1.3', '--log-every', '1', '--mixed-precision', 'no', '--no-eval-teacher',
            '--output-dir', str(out), *extra]


def _assert_same_steps(one: Path, two: Path) -> None:
    """Every logged term (the task's and the methods', means over the processes) at every step, to two float32
    units: the log stores float32 (see LOGGED_REL)."""
    a, b = step_records(one), step_records(two)
    assert [r['step'] for r in a] == [r['step'] for r in b] == list(range(1, STEPS + 1))
    skip = {'kind', 'epoch', 'step', 'lr', 'img_per_s'}
    for ra, rb in zip(a, b):
        terms = set(ra) - skip
        assert terms == set(rb) - skip and any(k.startswith('task.') for k in terms)
        for k in terms:
            assert ra[k] == pytest.approx(rb[k], rel=LOGGED_REL, abs=1e-12), (ra['step'], k, ra[k], rb[k])
    assert abs(a[-1]['loss'] - a[0]['loss']) > 1e-3  # it trained: the curves compared are not flat


def _one_and_two(task: str, data: Path, tmp: Path, *methods: str) -> tuple[Path, Path]:
    one = run_one_process(_args(task, data, tmp / 'one', 8, *methods), float64=True)
    assert one.returncode == 0, one.stderr[-3000:]
    two, _ = run_two_processes(_args(task, data, tmp / 'two', 4, *methods), tmp, float64=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert 'global batch 8' in one.stdout and 'global batch 8' in two.stdout
    return tmp / 'one', tmp / 'two'


def _launch_two(args: list[str], log: Path) -> subprocess.Popen:
    launcher = Path(sys.executable).with_name('accelerate')
    launch = [str(launcher), 'launch'] if launcher.exists() else [sys.executable, '-m', 'accelerate.commands.launch']
    cmd = [*launch, '--multi_gpu', '--num_processes', '2', '--num_machines', '1', '--mixed_precision', 'no',
           '--dynamo_backend', 'no', '--main_process_port', '0', '--num_cpu_threads_per_process', '1',
           str(REPO / 'main.py'), *args]
    return subprocess.Popen(cmd, stdout=log.open('w'), stderr=subprocess.STDOUT, env=_env(float64=True), cwd=REPO,
                            start_new_session=True)


@pytest.mark.slow
def test_two_process_detection_matches_one_and_resumes_after_a_kill_exactly(scene_sets, tmp_path):
    one, two = _one_and_two('detect', scene_sets['detect'], tmp_path, '--distill', 'fitnet', 'vkd', 'nd')
    _assert_same_steps(one, two)
    assert_same_weights(one, two)
    summaries = [json.loads((run / 'summary.json').read_text())['student'] for run in (one, two)]
    assert summaries[0]['mAP'] == pytest.approx(summaries[1]['mAP'], abs=1e-6)

    out = tmp_path / 'killed'
    args = _args('detect', scene_sets['detect'], out, 4, '--distill', 'fitnet', 'vkd', 'nd', '--save-every-steps', '1',
                 '--resume', 'auto')
    proc = _launch_two(args, tmp_path / 'killed.log')
    deadline = time.time() + 240
    while (complete_steps(out) or [0])[-1] < 2:
        assert proc.poll() is None, (tmp_path / 'killed.log').read_text()[-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    for pid in [proc.pid, *_descendants(proc.pid)]:  # the launcher and both workers
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    killed_at = complete_steps(out)[-1]
    assert 2 <= killed_at < STEPS and not (out / 'student').exists()

    resumed = _launch_two(args, tmp_path / 'resumed.log')
    assert resumed.wait(timeout=300) == 0, (tmp_path / 'resumed.log').read_text()[-3000:]
    assert f'step {killed_at}' in (tmp_path / 'resumed.log').read_text()
    a, b = load_file(two / 'student' / 'model.safetensors'), load_file(out / 'student' / 'model.safetensors')
    assert a.keys() == b.keys()
    for k in a:  # resuming restores the state exactly: no tolerance
        assert torch.equal(a[k], b[k]), k
    assert step_records(out)[-1]['step'] == STEPS


@pytest.mark.slow
@pytest.mark.ci_once
def test_two_process_segmentation_matches_one(scene_sets, tmp_path):
    one, two = _one_and_two('segment', scene_sets['segment'], tmp_path, '--distill', 'vkd', 'kd:0.5', 'nd', 'dist',
                            '--loss-opts', 'dist.intra_scope=global')
    _assert_same_steps(one, two)
    assert_same_weights(one, two)
    summaries = [json.loads((run / 'summary.json').read_text())['student'] for run in (one, two)]
    assert summaries[0]['mIoU'] == pytest.approx(summaries[1]['mIoU'], abs=1e-6)
