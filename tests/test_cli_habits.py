"""What a DeiT/timm user types: --help with real defaults in sections, habit flags, presets by name, names, exports."""
import dataclasses
import importlib.util
import json

import pytest
import torch

from vitkd.config import Config, preset_names
from vitkd.arguments import build_parser, parse_args
from vitkd.errors import UsageError

DATA = ['--data-path', '/nonexistent-but-unused']  # an ImageFolder run: no embedded preset replaces the defaults


def test_help_shows_every_dataclass_default_in_sections():
    text = build_parser().format_help()
    assert '(default: None)' not in text
    for section in ('data:', 'student:', 'teacher:', 'distillation:', 'optimisation:', 'augmentation:', 'run:', 'Hub:'):
        assert f'\n{section}\n' in text
    flat = ' '.join(text.split())
    for f in dataclasses.fields(Config):
        default = f.default
        if isinstance(default, (int, float, str)) and not isinstance(default, bool) and 'default' not in f.metadata[
                'help']:
            assert f'(default: {default})' in flat, f.name


@pytest.mark.parametrize('argv, field, expected', [
    (['--model', 'resnet18'], 'student', 'resnet18'),
    (['-b', '16'], 'batch_size', 16),
    (['--batch_size', '16'], 'batch_size', 16),
    (['--crop-pct', '0.9'], 'eval_crop_ratio', 0.9),
    (['--input-size', '96'], 'input_size', 96),
    (['--input-size', '3', '96', '96'], 'input_size', 96),
    (['--amp'], 'mixed_precision', 'bf16'),
    (['--repeated-aug'], 'aug_repeats', 3),
    (['--no-repeated-aug'], 'aug_repeats', 1),
    (['--teacher-model', 'regnety_002'], 'teacher', 'regnety_002'),
    (['--distillation-type', 'hard'], 'distill', ['deit_hard']),
    (['--distillation-type', 'soft'], 'distill', ['deit_soft']),
    (['--distillation-type', 'none'], 'distill', ['none']),
    (['--warmup_epochs', '2'], 'warmup_epochs', 2.0),
    (['--no_model_ema', '--model_ema'], 'model_ema', True),
    (['--model-kwargs', 'depth=2', 'embed_dim=96'], 'student_kwargs', {'depth': 2, 'embed_dim': 96}),
    (['--model_kwargs', 'depth=2'], 'student_kwargs', {'depth': 2}),
    (['--data-set', 'CIFAR'], 'dataset', 'cifar100'),
    (['--data-set', 'IMNET'], 'dataset', 'imagefolder'),
    (['--data_set', 'CIFAR', '--dataset', 'cifar100'], 'dataset', 'cifar100'),
])
def test_habit_flags_mean_what_they_mean_in_deit_and_timm(argv, field, expected):
    cfg, _ = parse_args(DATA + argv)
    assert getattr(cfg, field) == expected


def test_every_flag_has_its_underscore_spelling():
    parser = build_parser()
    flags = {s for a in parser._actions for s in a.option_strings}
    for flag in (s for s in flags if s.startswith('--') and '-' in s[2:]):
        assert '--' + flag[2:].replace('-', '_') in flags, flag


def test_distillation_alpha_and_tau_reach_the_deit_losses():
    from vitkd.validate import distill_spec
    from vitkd.distill_spec import MethodSpec
    cfg, _ = parse_args(DATA + ['--distillation-type', 'soft', '--distillation-alpha', '0.3',
                               '--distillation-tau', '2'])
    assert distill_spec(cfg).methods == (MethodSpec('deit_soft', None, {'alpha': 0.3, 'temperature': 2.0}),)


@pytest.mark.parametrize('argv, flag', [
    (['--distillation-type', 'soft', '--distillation-alpha', '2'], '--distillation-alpha 2'),
    (['--distillation-type', 'hard', '--distillation-alpha', '-0.5'], '--distillation-alpha -0.5'),
    (['--distillation-type', 'soft', '--distillation-tau', '0'], '--distillation-tau 0'),
    (['--distillation-type', 'soft', '--distillation-tau', 'nan'], '--distillation-tau nan'),
])
def test_deit_flags_out_of_their_domain_name_the_flag(argv, flag):
    with pytest.raises(UsageError) as e:
        parse_args(DATA + argv)
    assert str(e.value).startswith(flag) and 'deit_' in str(e.value) and '\n' not in str(e.value)


@pytest.mark.parametrize('name', ['norm', 'reviewkd'])
def test_a_listed_method_that_shares_a_preset_name_runs_as_the_method(name):
    from vitkd.arguments import list_methods_and_presets
    from vitkd.validate import distill_spec
    assert name in preset_names()
    cfg, _ = parse_args(DATA + ['--distill', name])
    assert distill_spec(cfg).names == (name,)
    methods, presets = list_methods_and_presets().split('presets (')
    assert f'  {name} ' in methods and f' {name} ' in f' {presets.splitlines()[1]} '


def _parses(argv) -> bool:
    try:
        parse_args(argv)
    except UsageError:
        return False
    return True


@pytest.mark.parametrize('task', ['classify', 'detect', 'segment'])
def test_list_losses_lists_what_works_for_the_task_and_nothing_else(task):
    """Each method --list-losses shows for a task passes validation with that task and every other one is refused;
    the presets shown are the ones made for the task (their own task) that pass with it."""
    from vitkd.arguments import list_methods_and_presets
    from vitkd.losses import list_losses
    from vitkd.losses._dense import list_dense_losses
    methods, presets = list_methods_and_presets(task).split('presets (')
    listed = {line.split()[0] for line in methods.splitlines()[1:]}
    data = DATA if task == 'classify' else []
    for name in {n for n, _ in list_losses()} | {n for n, _ in list_dense_losses()}:
        assert _parses(data + ['--task', task, '--distill', name]) == (name in listed), name
    shown = set(presets.splitlines()[1].split())
    for name in preset_names():
        made_for = parse_args(DATA + ['-c', name])[0].task
        assert (_parses(data + ['-c', name, '--task', task]) and made_for == task) == (name in shown), name


def test_compile_compiles_teacher_and_student_and_the_single_ones_stay():
    cfg, _ = parse_args(DATA + ['--compile'])
    assert cfg.compile_teacher and cfg.compile_student
    cfg, _ = parse_args(DATA + ['--compile', '--no-compile-student'])
    assert cfg.compile_teacher and not cfg.compile_student
    cfg, _ = parse_args(DATA + ['--compile-student'])
    assert cfg.compile_student and not cfg.compile_teacher


@pytest.mark.parametrize('argv, words', [
    (['--amp', '--mixed-precision', 'no'], ['--amp', '--mixed-precision']),
    (['--channels-last'], ['channels_last']),
    (['--teacher-path', 'https://dl.fbaipublicfiles.com/deit/regnety_160-a5fe6c6d.pth'], ['regnety_160']),
    (['--input-size', '3', '224', '200'], ['3 224 224']),
    (['--distillation-alpha', '0.2', '--distill', 'vkd'], ['--distillation-type']),
    (['--distill', 'kd++'], ['-c kd++']),
    (['-c', 'no-such-preset'], ['kd++', 'scripts/configs']),
    (['-c', ''], ["-c '': names no file", 'kd++']),
    (['--data-set', 'INAT'], ['--data-set INAT', '--dataset imagefolder']),
    (['--data-set', 'INAT19'], ['--data-set INAT19', '--dataset imagefolder']),
    (['--data-set', 'CIFAR', '--dataset', 'cifar10'], ['--data-set CIFAR contradicts --dataset cifar10']),
    (['--teacher', 'regnety_002', '--teacher-arch', 'resnet18'], ['--teacher-arch resnet18', 'bare weights file',
                                                                    '--teacher regnety_002 carries its own']),
    (['--teacher', 'none', '--distill', 'none', '--teacher-arch', 'resnet18'], ['--teacher-arch', 'has no teacher']),
    (['--distill', 'kd:'], ['--distill kd:', 'nothing after ":"', 'kd:0.5']),
    (['--distill', 'vkd', 'kd:'], ['--distill kd:', 'nothing after ":"']),
    (['--distillation-type', 'hard', '--distillation-tau', '2'], ['--distillation-tau 2.0', 'deit_hard',
                                                                  '--distillation-type soft']),
    (['--distillation-type', 'hard', '--distillation-tau', 'nan'], ['--distillation-tau nan', 'deit_hard']),
    (['--distillation-type', 'none', '--distillation-tau', '2'], ['--distillation-type soft|hard']),
])
def test_refusals_name_the_replacement(argv, words):
    with pytest.raises(UsageError) as e:
        parse_args(DATA + argv)
    assert all(w in str(e.value) for w in words) and '\n' not in str(e.value)


@pytest.mark.parametrize('typed, wrong', [('--amp-typo-x', '--mixup'), ('--model', '--model-ema')])
def test_no_misleading_nearest_match_and_no_prefixes(typed, wrong):
    parser = build_parser()
    assert parser.allow_abbrev is False
    if typed == '--model':
        assert parser.parse_args(['--model', 'x']).student == 'x'
        return
    with pytest.raises(UsageError) as e:
        parse_args([typed])
    assert wrong not in str(e.value)


@pytest.mark.parametrize('name', ['kd++', 'dist++', 'deit_tiny_hard', 'vkd_deit_s'])
def test_presets_by_the_readme_name(name, tmp_path):
    from vitkd.config import PRESETS, load_yaml
    assert name in preset_names()
    cfg, _ = parse_args(['-c', name] + DATA)
    expected = load_yaml(str(PRESETS / f'{name}.yaml'))
    assert cfg.distill == (expected['distill'].split() if isinstance(expected['distill'], str)
                           else expected['distill'])


def test_unknown_method_error_says_where_presets_live():
    from vitkd.losses.base import get_loss_class
    with pytest.raises(UsageError, match='scripts/configs'):
        get_loss_class('kdpp')


@pytest.mark.parametrize('tracker', ['tensorboard', 'wandb', 'mlflow'])
def test_log_with_a_missing_tracker_fails_at_parse_time(tracker):
    installed = importlib.util.find_spec(tracker) is not None
    if installed:
        parse_args(DATA + ['--log-with', tracker])
    else:
        with pytest.raises(UsageError, match=f'pip install {tracker}'):
            parse_args(DATA + ['--log-with', tracker])


def test_the_embedded_preset_has_no_wall_clock_cap():
    cfg, _ = parse_args([])
    assert cfg.time_limit is None


def test_short_model_name_points_first_to_timms_full_name():
    from vitkd.models import _unknown_model_error
    message = str(_unknown_model_error('deit_tiny_distilled', 'student'))
    assert message.split('did you mean: ')[1].startswith('deit_tiny_distilled_patch16_224')


def test_export_carries_label_names_and_no_source_license(tmp_path):
    import timm
    from vitkd.export import SOURCE_KEYS, check_label_names, export_model
    model = timm.create_model('deit_tiny_distilled_patch16_224', num_classes=3, img_size=32, patch_size=8, depth=1,
                              embed_dim=48, num_heads=2)
    assert model.pretrained_cfg.get('license')  # what would otherwise be copied
    names = ['cat', 'dog', 'fish']
    export_model(model, tmp_path / 'student', dict(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3,
                                                 crop_pct=1.0, interpolation='bicubic'), names)
    config = json.loads((tmp_path / 'student' / 'config.json').read_text())
    assert config['label_names'] == names
    assert not set(SOURCE_KEYS) & set(config['pretrained_cfg'])
    check_label_names(names, {0: 'cat', 1: 'dog', 2: 'fish'})
    with pytest.raises(UsageError, match='class 1'):
        check_label_names(names, ['cat', 'cow', 'fish'])


def test_card_names_the_teacher_by_architecture_and_source(tmp_path):
    from vitkd.hub import teacher_description
    folder = tmp_path / 'my_teacher_folder'
    folder.mkdir()
    (folder / 'config.json').write_text(json.dumps({'architecture': 'regnety_002'}))
    local = teacher_description(Config(teacher=str(folder)))
    assert 'regnety_002' in local and 'my_teacher_folder' not in local
    assert 'timm pretrained' in teacher_description(Config(teacher='regnety_160'))


def test_eval_dir_is_named_after_what_it_evaluates(tmp_path):
    from vitkd.rundir import eval_output_dir
    run = tmp_path / 'myrun'
    name = eval_output_dir(Config(student_ckpt=str(run / 'student'), dataset='cifar10', eval_student=True)).name
    assert name.startswith('eval-myrun_student-cifar10-')
    name = eval_output_dir(Config(student_ckpt='hf-hub:org/model', dataset='cifar10', eval_student=True)).name
    assert name.startswith('eval-org_model-cifar10-')
