"""Config resolution (defaults < embedded preset < YAML < CLI), presets, recipe wiring and the run picture."""
import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from vitkd import devices
from vitkd.build import build_transforms
from vitkd.validate import scaled_lr
from vitkd.devices import make_accelerator
from vitkd.config import Config, ConfigError, load_yaml, to_yaml

from vitkd.arguments import parse_args, resolve
REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted((REPO / 'scripts' / 'configs').glob('*.yaml'))


def test_yaml_sets_defaults_and_cli_overrides_them(tmp_path):
    path = tmp_path / 'c.yaml'
    path.write_text('lr: 0.002\nepochs: 7\ndistill: [kd, deit_hard]\ndata-path: /data/x\n')
    cfg, _ = parse_args(['-c', str(path), '--epochs', '3', '--output-dir', str(tmp_path / 'o')])
    assert cfg.lr == 0.002 and cfg.epochs == 3 and cfg.distill == ['kd', 'deit_hard']
    assert cfg.dataset == 'imagefolder' and cfg.student == 'deit_s_distilled'  # no embedded preset with a data path
    assert cfg.teacher == 'regnety_160' and cfg.aa == 'rand-m9-mstd0.5-inc1'


def test_no_arguments_is_the_embedded_default():
    cfg, _ = parse_args([])
    preset = load_yaml(str(REPO / 'scripts' / 'configs' / 'embedded.yaml'))
    assert cfg.dataset == 'fashion_mnist' and cfg.student_kwargs == preset['student_kwargs']
    assert Path(cfg.teacher) == REPO / 'checkpoints' / 'fmnist_regnety_002'
    cfg, _ = parse_args(['--epochs', '1', '--student-kwargs', 'depth=2'])
    assert cfg.epochs == 1 and cfg.student_kwargs == {'depth': 2}


def test_saved_config_resolves_to_the_same_config(tmp_path):
    cfg, _ = parse_args(['--lr', '3e-4', '--distill', 'kd:0.5', '--loss-opts', 'kd.temperature=2',
                         '--data-path', '/data/imagenet', '--no-eval-teacher'])
    saved = tmp_path / 'config.yaml'
    saved.write_text(to_yaml(cfg))
    again, _ = parse_args(['-c', str(saved)])
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


def test_unknown_yaml_key_is_an_error_with_a_suggestion(tmp_path):
    path = tmp_path / 'c.yaml'
    path.write_text('learning_rate: 0.1\nepochs: 2\n')
    with pytest.raises(ConfigError, match="unknown keys: learning_rate"):
        load_yaml(str(path))
    path.write_text('epoch: 2\n')
    with pytest.raises(ConfigError, match="epoch \\(did you mean epochs\\?\\)"):
        load_yaml(str(path))


@pytest.mark.parametrize('preset', PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_builds_exactly_the_methods_weights_and_options_its_file_lists(preset):
    """The YAML read here with plain ``yaml.safe_load``: every ``distill`` item becomes one loss of that name and
    weight (1 when unwritten), in order, and every ``loss_opts`` item ``m.k=v`` lands on method m (``warmup_epochs``
    on its entry, the rest among its options) with the value the file writes."""
    from vitkd.build import build_losses
    raw = yaml.safe_load(preset.read_text())
    expected = [(item.split(':')[0], float(item.split(':')[1]) if ':' in item else 1.0) for item in raw['distill']]
    cfg = resolve({}, load_yaml(str(preset)))
    entries = build_losses(cfg)
    assert [(e.loss.name, e.weight) for e in entries] == expected
    by_name = {e.loss.name: e for e in entries}
    for opt in raw.get('loss_opts', []):
        key, value = opt.split('=', 1)
        method, name = key.split('.', 1)
        value = yaml.safe_load(value)
        entry = by_name[method]
        got = entry.warmup_epochs if name == 'warmup_epochs' else entry.loss.options()[name]
        if isinstance(value, list):
            got = list(got)
        assert got == value, f'{preset.name}: {key} is {got!r}, the file says {value!r}'


def test_lr_scales_with_the_global_batch():
    cfg = Config(lr=5e-4)
    assert scaled_lr(cfg, 1024) == pytest.approx(1e-3)  # DeiT: 5e-4 * 1024 / 512
    assert scaled_lr(Config(lr=5e-4, unscale_lr=True), 1024) == 5e-4


@pytest.mark.parametrize('argv,refused', [
    (['--lr', '1e-3', '--min-lr', '2e-3'], "--min-lr 0.002 is above --lr 0.001: the schedule would climb"),
    (['--lr', '1e-3', '--warmup-lr', '2e-3'], "--warmup-lr 0.002 is above --lr 0.001: the warm-up would descend"),
    (['--lr', '1e-3', '--min-lr', '1e-3', '--warmup-lr', '1e-3'], None),
    (['--lr', '1e-3', '--warmup-lr', '2e-3', '--warmup-epochs', '0'], None),
])
def test_min_and_warmup_lr_above_lr_are_refused(argv, refused):
    """The schedule's end and start must not exceed its peak; --min-lr and --warmup-lr are absolute, so the
    refusal says so when --lr is scaled by the global batch."""
    base = ['--distill', 'none', '--teacher', 'none', '--dataset', 'cifar10', '--data-path', '/data']
    if refused is None:
        parse_args(base + argv)
        return
    with pytest.raises(ConfigError, match=refused) as e:
        parse_args(base + argv)
    assert 'not scaled by the global batch' in str(e.value) and '\n' not in str(e.value)
    with pytest.raises(ConfigError, match=refused) as e:
        parse_args(base + argv + ['--unscale-lr'])
    assert 'not scaled' not in str(e.value)


def test_train_transform_is_wired_from_the_options():
    cfg = Config(aa='rand-m9-mstd0.5-inc1', reprob=0.25, scale=[0.3, 1.0], hflip=0.0, dataset='imagefolder')
    train_tf, eval_tf = build_transforms(cfg, (3, 32, 32), (0.5,) * 3, (0.5,) * 3)
    text = repr(train_tf)
    assert 'RandAugment' in text and 'RandomErasing' in text and 'scale=(0.3, 1.0)' in text
    assert 'RandomHorizontalFlip' not in text
    three = build_transforms(Config(three_augment=True, reprob=0.0, dataset='imagefolder'), (3, 32, 32),
                             (0.5,) * 3, (0.5,) * 3)[0]
    assert 'RandAugment' not in repr(three) and 'RandomErasing' not in repr(three)
    assert 'CenterCrop' in repr(eval_tf)


def test_run_picture_is_a_valid_png(tmp_path):
    import json
    from vitkd.plots import plot_run
    log = tmp_path / 'log.jsonl'
    lines = [{'kind': 'step', 'step': s, 'lr': 1e-3 / (s + 1), 'task': 2.0 / (s + 1), 'kd.kl': 1.0 / (s + 1)}
             for s in range(5)]
    lines += [{'kind': 'epoch', 'epoch': e, 'val_avg_top1': 50 + e, 'val_cls_top1': 48 + e, 'train_top1': 40 + e}
              for e in range(3)]
    log.write_text('\n'.join(json.dumps(l) for l in lines) + '\n')
    png = plot_run(log, tmp_path / 'curves.png')
    data = png.read_bytes()
    assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 5000


@pytest.mark.parametrize('term', [lambda s: 0.0, lambda s: -1.0 / (s + 1), lambda s: float('nan'),
                                  lambda s: 1.0 - s / 2])
def test_run_picture_of_loss_terms_without_positive_values_warns_nothing(term, tmp_path):
    """Terms at zero, negative, missing or crossing zero are drawn on a linear axis: no matplotlib warning reaches
    the user's terminal."""
    import json
    import warnings
    from vitkd.plots import plot_run
    log = tmp_path / 'log.jsonl'
    lines = [{'kind': 'step', 'step': s, 'lr': 1e-3, 'term': term(s)} for s in range(5)]
    log.write_text('\n'.join(json.dumps(l) for l in lines) + '\n')
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        png = plot_run(log, tmp_path / 'curves.png')
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_a_vit_student_gets_a_methods_vit_weight_unless_the_command_gives_one():
    """``vit_student_weight`` replaces an unset weight for ViT students only; an explicit weight always wins."""
    import timm
    from vitkd.build import build_losses
    from vitkd.losses import get_loss_class
    vit = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=1, num_classes=10)
    cnn = timm.create_model('resnet18', num_classes=10)
    tuned = [name for name in ('at', 'afd', 'crd', 'norm', 'irg') if get_loss_class(name).vit_student_weight]
    assert tuned, 'the methods measured to overwhelm a ViT student carry a ViT weight'
    name = tuned[0]
    vit_weight = get_loss_class(name).vit_student_weight
    assert 0 < vit_weight < 1
    cfg = Config(distill=[name, 'kd'])
    assert [e.weight for e in build_losses(cfg, vit)] == [vit_weight, 1.0]  # kd has no ViT weight
    assert [e.weight for e in build_losses(cfg, cnn)] == [1.0, 1.0]
    assert [e.weight for e in build_losses(cfg)] == [1.0, 1.0]
    assert [e.weight for e in build_losses(Config(distill=[f'{name}:0.5']), vit)] == [0.5]
    assert [e.weight for e in build_losses(Config(distill=[{'name': name, 'weight': 1}]), vit)] == [1.0]


def test_threads_option_sets_torch_threads_and_rejects_nonpositive():
    """``--threads N`` is the process's intra-op thread count (the table's cells pass 1); 0 is a one-line error."""
    accepted = {f.name: f for f in dataclasses.fields(Config)}['threads'].metadata['domain'].inner.describe()
    assert accepted == 'an integer >= 1'
    with pytest.raises(ConfigError, match=f'--threads must be {accepted}, got 0'):
        parse_args(['--threads', '0'])
    before = torch.get_num_threads()
    try:
        cfg, _ = parse_args(['--threads', '1', '--distill', 'none', '--teacher', 'none'])
        make_accelerator(cfg)
        assert torch.get_num_threads() == 1
        cfg, _ = parse_args(['--distill', 'none', '--teacher', 'none'])
        with pytest.MonkeyPatch.context() as mp:  # no --threads: a single CPU process takes every core it may use
            mp.setattr(devices, 'own_cores', lambda: {0, 2, 5})  # as under `taskset -c 0,2,5` on a bigger host
            make_accelerator(cfg)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
