"""``--finetune``: a new run starts from a student's weights; only the heads (another number of classes), the input
convolution (other channels) and the position-embedding grid (another input size) may differ from the source."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import main
import vitkd
from test_export_hub import _seed_hub_cache
from vitkd.build import build_student, student_data_spec
from vitkd.export import export_model
from vitkd.arguments import parse_args
from vitkd.finetune import load_finetune_weights, open_source, use_source_architecture

SOURCE_KWARGS = dict(img_size=28, patch_size=4, depth=2, embed_dim=32, num_heads=2, in_chans=1)  # a grey 10-class VkD
DEIT_KWARGS = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=2)
FMNIST_DATA = dict(input_size=(1, 28, 28), mean=(0.286,), std=(0.353,), crop_pct=1.0, interpolation='bilinear')
RESAMPLED = ('head.', 'head_dist.', 'patch_embed.stem.0.weight', 'pos_embed')


@pytest.fixture(scope='module')
def source(tmp_path_factory) -> Path:
    """A grey 28-px, 10-class VkD student exported as a run exports it (random weights, seeded)."""
    torch.manual_seed(0)
    student = vitkd.create_student('deit_ti_distilled', 10, **SOURCE_KWARGS)
    return export_model(student, tmp_path_factory.mktemp('source') / 'student', FMNIST_DATA)


@pytest.fixture(scope='module')
def two_classes(tmp_path_factory) -> Path:
    """An RGB image folder of 2 classes (Fashion-MNIST's tops vs the rest, in shape): 8 + 4 images per class."""
    root = tmp_path_factory.mktemp('two_classes')
    rng = np.random.default_rng(0)
    for split, n in (('train', 8), ('val', 4)):
        for c in ('others', 'tops'):
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).convert('RGB').save(folder / f'{i}.png')
    return root


def _finetuned(spec, data, *extra):
    """The new run's student as build_run makes it: built for the data, then the source's weights loaded."""
    cfg, _ = parse_args(['--finetune', str(spec), '--data-path', str(data), '--teacher', 'none', '--distill', 'none',
                         *extra])
    lines = []
    src = open_source(cfg.finetune, cfg)
    use_source_architecture(cfg, src, lines.append)
    torch.manual_seed(1)
    student = build_student(cfg, num_classes=2)
    fresh = {k: v.clone() for k, v in student.state_dict().items()}
    load_finetune_weights(student, src, lines.append)
    return student, fresh, src.state, lines


def test_the_source_weights_are_loaded_except_what_the_new_task_changes(source, two_classes):
    student, fresh, state, lines = _finetuned(source, two_classes, '--input-size', '32')
    loaded = student.state_dict()
    assert loaded.keys() == state.keys()
    kept = [k for k in state if not k.startswith(RESAMPLED)]
    assert len(kept) > 20 and all(torch.equal(loaded[k], state[k]) for k in kept)
    for key in [k for k in loaded if k.startswith(('head.', 'head_dist.'))]:  # the new model's own initialisation
        assert loaded[key].shape[0] == 2 and torch.equal(loaded[key], fresh[key]), key
    assert lines[0].startswith(f'--finetune {source}: student deit_ti_distilled') and 'in_chans=3' in lines[0]
    assert lines[1] == '--finetune: re-initialised head and head_dist for 2 classes (the source has 10)'
    assert any('1 to 3 input channels' in line for line in lines) and any('position embeddings' in line
                                                                           for line in lines)


@pytest.mark.parametrize('dataset', ['fashion_mnist', 'imagefolder'])
def test_the_source_s_img_size_pair_gives_the_run_s_input_size(source, two_classes, dataset):
    """An export's config.json keeps timm's ``img_size`` as a pair; a fine-tuning run without --input-size trains at
    that size (the embedded data sets and an image folder alike)."""
    data = ['--dataset', 'fashion_mnist'] if dataset == 'fashion_mnist' else ['--data-path', str(two_classes)]
    cfg, _ = parse_args(['--finetune', str(source), '--teacher', 'none', '--distill', 'none', *data])
    use_source_architecture(cfg, open_source(cfg.finetune, cfg), lambda line: None)
    assert cfg.student_kwargs['img_size'] == [28, 28]
    channels = 1 if dataset == 'fashion_mnist' else 3
    assert student_data_spec(cfg, build_student(cfg, num_classes=10))[0] == (channels, 28, 28)


@pytest.mark.parametrize('img_size, expected', [('28', (1, 28, 28)), ('[28,28]', (1, 28, 28)),
                                                ('[28,24]', (1, 28, 24)), ('[24,28]', (1, 24, 28))])
def test_an_img_size_kwarg_as_an_int_or_a_pair_sets_the_input_size(img_size, expected):
    cfg, _ = parse_args(['--dataset', 'fashion_mnist', '--teacher', 'none', '--distill', 'none', '--student-kwargs',
                         f'img_size={img_size}', 'patch_size=4', 'depth=1', 'embed_dim=32', 'num_heads=1', 'in_chans=1'])
    student = build_student(cfg, num_classes=10)
    spec = student_data_spec(cfg, student)
    assert spec[0] == expected
    assert student.eval()(torch.zeros(2, *spec[0])).shape == (2, 10)


def _antialiased_bicubic_weights(size_in: int, size_out: int) -> np.ndarray:
    """[out, in] interpolation matrix of Pillow's resampling filter (Keys' cubic, a = -0.5), which timm's
    ``resample_abs_pos_embed`` applies (bicubic with antialias): each output pixel centre maps to (i + ½)·in/out,
    the kernel is stretched by the scale when shrinking, truncated at the border and renormalised."""
    def cubic(x, a=-0.5):
        x = abs(x)
        return ((a + 2) * x - (a + 3)) * x * x + 1 if x < 1 else (((x - 5) * x + 8) * x - 4) * a if x < 2 else 0.0
    scale = size_in / size_out
    stretch = max(scale, 1.0)
    weights = np.zeros((size_out, size_in))
    for i in range(size_out):
        centre = (i + 0.5) * scale
        lo, hi = max(int(centre - 2 * stretch + 0.5), 0), min(int(centre + 2 * stretch + 0.5), size_in)
        row = np.array([cubic((j - centre + 0.5) / stretch) for j in range(lo, hi)])
        weights[i, lo:hi] = row / row.sum()
    return weights


def test_position_embeddings_are_resampled_over_the_grid_with_the_token_entries_kept(source, two_classes):
    student, _, state, _ = _finetuned(source, two_classes, '--input-size', '32')
    old, new = state['pos_embed'], student.state_dict()['pos_embed']  # [1, 2 + 7·7, D] -> [1, 2 + 8·8, D]
    assert old.shape == (1, 2 + 49, 32) and new.shape == (1, 2 + 64, 32)
    assert torch.equal(new[:, :2], old[:, :2])  # cls and dist entries
    w = _antialiased_bicubic_weights(7, 8)  # [8, 7], separable: rows then columns
    grid = old[0, 2:].double().numpy().reshape(7, 7, 32)
    by_hand = np.einsum('ai,bj,ijd->abd', w, w, grid).reshape(64, 32)
    tolerance = 16 * torch.finfo(torch.float32).eps * old.abs().max().item()  # fp32 sums of 16 weighted terms
    np.testing.assert_allclose(new[0, 2:].double().numpy(), by_hand, rtol=0, atol=tolerance)


def test_the_input_convolution_gives_a_grey_image_s_output_on_its_three_equal_channels(source, two_classes):
    student, _, state, _ = _finetuned(source, two_classes)
    grey = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    source_weight = state['patch_embed.stem.0.weight'].double()  # [C_out, 1, 3, 3]
    source_conv = F.conv2d(grey, source_weight, stride=2, padding=1)
    new_weight = student.state_dict()['patch_embed.stem.0.weight'].double()
    assert new_weight.shape[1] == 3
    new_conv = F.conv2d(grey.expand(-1, 3, -1, -1), new_weight, stride=2, padding=1)
    # each new weight is w/3 rounded to fp32 (relative error <= eps): the sum over the window errs by at most
    # eps·Σ|w||x| (computed in fp64, so nothing else rounds)
    bound = torch.finfo(torch.float32).eps * F.conv2d(grey.abs(), source_weight.abs(), stride=2, padding=1)
    assert ((new_conv - source_conv).abs() <= bound).all()


def test_a_deit_checkpoint_file_fine_tunes_and_another_architecture_is_refused(two_classes, tmp_path, capsys):
    """DeiT's release format ({'model': state_dict}, 10 classes, 32 px) into a 2-class 48-px run; the same file as a
    student of another depth is a one-line error listing the keys (exit 2), nothing written."""
    torch.manual_seed(0)
    deit = vitkd.create_student('deit_tiny_distilled_patch16_224', 10, **DEIT_KWARGS)
    torch.save({'model': deit.state_dict()}, tmp_path / 'deit.pth')
    arch = ['--student', 'deit_tiny_distilled_patch16_224', '--student-kwargs',
            *[f'{k}={v}' for k, v in DEIT_KWARGS.items() if k != 'img_size']]
    student, _, state, lines = _finetuned(tmp_path / 'deit.pth', two_classes, '--input-size', '48', *arch)
    assert student.state_dict()['pos_embed'].shape == (1, 2 + 36, 48) and len(lines) == 2
    assert torch.equal(student.state_dict()['blocks.1.mlp.fc2.weight'], state['blocks.1.mlp.fc2.weight'])

    out = tmp_path / 'refused'
    code = main.main(['--finetune', str(tmp_path / 'deit.pth'), '--data-path', str(two_classes), '--teacher', 'none',
                      '--distill', 'none', *arch, 'depth=3', '--input-size', '32', '--batch-size', '4',
                      '--num-workers', '0', '--output-dir', str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    expected = f'error: --finetune {tmp_path / "deit.pth"} does not match VisionTransformerDistilled: missing keys: '
    assert code == 2 and len(err) == 1 and err[0].startswith(expected + 'blocks.2.')
    assert not out.exists()


def test_a_run_from_the_hub_trains_without_a_teacher_and_its_run_dir_is_a_source_too(source, two_classes, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    _seed_hub_cache(tmp_path / 'cache', 'org/grey-vkd', source)
    out = tmp_path / 'run'
    code = main.main(['--finetune', 'hf-hub:org/grey-vkd', '--data-path', str(two_classes), '--input-size', '32',
                      '--teacher', 'none', '--distill', 'none', '--epochs', '1', '--batch-size', '4', '--warmup-epochs',
                      '0', '--num-workers', '0', '--output-dir', str(out)])
    stdout = capsys.readouterr().out
    assert code == 0 and 're-initialised head and head_dist for 2 classes' in stdout
    config = (out / 'student' / 'config.json').read_text()
    assert '"num_classes": 2' in config and '"architecture": "deit_ti_distilled"' in config
    assert math.isfinite(float(stdout.split('top-1 cls ')[1].split('%')[0]))
    exported = load_file(str(out / 'student' / 'model.safetensors'))
    for spec in (out, sorted((out / 'checkpoints').glob('step_*'))[-1]):  # a run dir, a training checkpoint
        student, _, state, lines = _finetuned(spec, two_classes, '--input-size', '32')
        assert len(lines) == 1 and lines[0].startswith(f'--finetune {spec}: student deit_ti_distilled')  # no change
        assert all(torch.equal(v, exported[k]) for k, v in student.state_dict().items())
