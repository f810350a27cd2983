"""Dense runs through main.py: training with teacher and methods, checkpoint resume equal to an uninterrupted run,
the export evaluated by --eval-student to the run's own numbers, and one-line usage errors."""
import json
import shutil

import pytest
from safetensors.torch import load_file

import main
from vitkd.losses._dense import DENSE_LOSS_REGISTRY

# a 1-block ViT student and a random dense CNN teacher from the registry (the shipped teachers are tested apart)
TINY = ['--student-kwargs', 'patch_size=8', 'depth=1', 'embed_dim=48', 'num_heads=3', '--batch-size', '8',
        '--num-workers', '0', '--no-eval-teacher', '--epochs', '1', '--warmup-epochs', '0', '--pyramid-channels', '32']


def _teacher(task: str) -> list[str]:
    return ['--teacher', f'vitkd_dense_{"detector" if task == "detect" else "segmenter"}', '--no-teacher-pretrained',
            '--teacher-kwargs', 'backbone=test_resnet', 'in_chans=1', 'img_size=64', 'strides=[4, 8, 16]',
            'pyramid_channels=32']


def _student_weights(run_dir):
    return load_file(str(run_dir / 'student' / 'model.safetensors'))


def test_segment_run_resumes_exactly_and_its_export_evaluates_to_its_numbers(tmp_path):
    common = ['--task', 'segment', *_teacher('segment'), '--distill', 'vkd', 'kd:0.5', 'dist', *TINY]
    whole, part = tmp_path / 'whole', tmp_path / 'part'
    assert main.main([*common, '--max-steps', '4', '--output-dir', str(whole)]) == 0
    assert main.main([*common, '--max-steps', '2', '--output-dir', str(part)]) == 0
    assert main.main([*common, '--max-steps', '4', '--output-dir', str(part), '--resume', 'auto']) == 0
    a, b = _student_weights(whole), _student_weights(part)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # bit-identical after the resume
    summary = json.loads((whole / 'summary.json').read_text())
    assert set(summary['weights']) == {'vkd', 'kd', 'dist'} and summary['steps'] == 4
    epochs = [r for r in map(json.loads, (whole / 'log.jsonl').read_text().splitlines()) if r['kind'] == 'epoch']
    assert {f'train_{t}' for t in ('task.ce', 'vkd.repr', 'kd.kl', 'dist.inter', 'dist.intra')} <= set(epochs[-1])
    assert main.main(['--task', 'segment', '--eval-student', '--student-ckpt', str(whole), '--output-dir',
                      str(tmp_path / 'eval'), '--num-workers', '0']) == 0
    evaluated = json.loads((tmp_path / 'eval' / 'eval_student.json').read_text())['metrics']
    assert evaluated['mIoU'] == epochs[-1]['val_mIoU']  # log.jsonl keeps the run's numbers exact
    assert evaluated['pixel_acc'] == epochs[-1]['val_pixel_acc']


def test_detect_run_with_feature_methods_and_its_export(tmp_path, capsys):
    out = tmp_path / 'det'
    code = main.main(['--task', 'detect', *_teacher('detect'), '--distill', 'fitnet', 'vkd', '--max-steps', '2',
                      '--output-dir', str(out), *TINY])
    assert code == 0
    summary = json.loads((out / 'summary.json').read_text())
    assert {'mAP', 'AP50', 'AP75'} <= set(summary['student']) and summary['best']['step'] == 2
    config = json.loads((out / 'student' / 'config.json').read_text())
    assert config['architecture'] == 'vitkd_dense_detector' and config['model_args']['backbone'] == 'deit_ti_distilled'
    assert 'mAP' in capsys.readouterr().out


def test_list_losses_of_a_dense_task(capsys):
    assert main.main(['--task', 'segment', '--list-losses']) == 0
    lines = capsys.readouterr().out.splitlines()
    methods = lines[1:next(i for i, line in enumerate(lines) if line.startswith('presets'))]  # under 'methods (...)'
    assert lines[0].startswith('methods') and [line.split()[0] for line in methods] == sorted(DENSE_LOSS_REGISTRY)


@pytest.mark.parametrize('args,message', [
    (['--task', 'detect', '--distill', 'crd'], "loss 'crd' has no dense form"),
    (['--task', 'detect', '--distill', 'kd'], "'kd' compares per-pixel class distributions: --task segment only"),
    (['--task', 'segment', '--mixup', '0.5'], '--mixup 0.5: this option applies to classification'),
    (['--pyramid-channels', '32'], '--pyramid-channels 32: this option applies to dense tasks'),
    (['--task', 'detect', '--dataset', 'segfolder', '--data-path', '.'], '--dataset segfolder with --task detect'),
    (['--task', 'segment', '--scale-jitter', '1.5', '1.2'], '--scale-jitter must be two numbers LOW HIGH with 0 < LOW <= HIGH <= 4, got [1.5, 1.2]'),
    (['--task', 'segment', '--pyramid-strides', '8', '64'], 'a ViT pyramid makes strides 2, 4, 8, 16'),
    (['--task', 'segment', '--data-path', '/nonexistent/seg'], 'no classes.txt'),
    (['--task', 'track'], "argument --task: invalid choice: 'track'"),
])
def test_bad_dense_input_is_one_line_and_exit_2(args, message, tmp_path, capsys):
    out = tmp_path / 'o'
    code = main.main([*args, '--output-dir', str(out), *(_teacher('detect') if 'kd' in args else [])])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith('error: ') and '\n' not in err and message in err, err
    assert not out.exists()


@pytest.mark.parametrize('task,metrics', [('segment', ('mIoU', 'pixel_acc')), ('detect', ('mAP', 'AP50', 'AP75'))])
def test_shipped_teacher_is_the_presets_and_scores_its_training_record(task, metrics, tmp_path):
    """The embedded --task default names the shipped teacher; evaluated by --eval-student it gives the validation
    numbers its training run wrote (training.json, rounded there to 2 decimals)."""
    from vitkd.arguments import parse_args
    from vitkd.config import REPO
    cfg, _ = parse_args(['--task', task])
    teacher = REPO / 'checkpoints' / f'fmnist_dense_{task}_teacher'
    assert cfg.teacher == str(teacher) and cfg.dataset == 'fashion_mnist' and cfg.input_size == 64
    record = json.loads((teacher / 'training.json').read_text())['validation']
    assert main.main(['--task', task, '--eval-student', '--student-ckpt', str(teacher), '--output-dir',
                      str(tmp_path), '--num-workers', '0']) == 0
    evaluated = json.loads((tmp_path / 'eval_student.json').read_text())['metrics']
    assert {k: round(evaluated[k], 2) for k in metrics} == {k: round(record[k], 2) for k in metrics}


def test_coco_and_segmentation_folders_train_and_evaluate(tmp_path):
    """A run on a COCO-format set and one on a segmentation folder (RGB, letterboxed to 64 px): a step, then the
    metrics over their validation images."""
    from tests.test_dense_data import _write_coco, _write_segfolder
    coco, seg = tmp_path / 'coco', tmp_path / 'seg'
    for split in ('train', 'val'):
        _write_coco(coco, split)
    seg.mkdir()
    _write_segfolder(seg)
    shutil.copytree(seg / 'val' / 'images', seg / 'train' / 'images')
    shutil.copytree(seg / 'val' / 'masks', seg / 'train' / 'masks')
    tiny = [*TINY, '--batch-size', '1', '--input-size', '64', '--pyramid-strides', '4', '8', '16', '--teacher', 'none',
            '--distill', 'none', '--max-steps', '1']
    assert main.main(['--task', 'detect', '--data-path', str(coco), '--output-dir', str(tmp_path / 'd'), *tiny]) == 0
    assert main.main(['--task', 'segment', '--data-path', str(seg), '--output-dir', str(tmp_path / 's'), *tiny]) == 0
    detect = json.loads((tmp_path / 'd' / 'summary.json').read_text())['student']
    segment = json.loads((tmp_path / 's' / 'summary.json').read_text())['student']
    assert detect['images'] == 2 and 0 <= detect['mAP'] <= 100
    assert segment['images'] == 1 and 0 <= segment['mIoU'] <= 100
    labels = json.loads((tmp_path / 'd' / 'student' / 'config.json').read_text())['label_names']
    assert labels == ['person', 'dog']
