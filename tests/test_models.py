"""Students and teachers: structure, modes, freezing, re-normalisation, Hub loading from a seeded offline cache."""
import json

import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file

import vitkd
from vitkd.models import ModelSpecError, Teacher, has_dist_head, resolve_teacher_name
from conftest import TINY_VIT


@pytest.mark.parametrize('name,params', [('deit_ti_distilled', 6_633_104), ('deit_s_distilled', 23_797_520)])
def test_vkd_student_parameter_counts_match_the_paper_code(name, params):
    model = timm.create_model(name)  # registered in timm's registry by `import vitkd`
    assert sum(p.numel() for p in model.parameters()) == params


def test_vkd_student_structure(tiny_vkd_student):
    m = tiny_vkd_student
    names = dict(m.named_parameters())
    assert 'dist_token' not in names and 'cls_token' in names
    assert m.pos_embed.shape == (1, (32 // 4) ** 2 + 2, 48)
    assert all(isinstance(b.drop_path1, nn.Identity) and isinstance(b.drop_path2, nn.Identity) for b in m.blocks)
    convs = [l for l in m.patch_embed.stem if isinstance(l, nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(7, 7), (3, 3), (3, 3)] and convs[0].stride == (2, 2)
    assert m.patch_embed.proj.kernel_size == (2, 2) and m.patch_embed.proj.bias is not None


def test_vkd_dist_token_is_mean_of_patch_embeddings(tiny_vkd_student):
    m = tiny_vkd_student.eval()
    x = torch.randn(3, 3, 32, 32)
    patches = m.patch_embed(x)  # [B, N, D]
    tokens = m._pos_embed(patches)
    expected_dist = patches.mean(1) + m.pos_embed[0, 1]
    torch.testing.assert_close(tokens[:, 1], expected_dist)
    # permuting the patch embeddings leaves the distillation token unchanged
    perm = torch.randperm(patches.shape[1])
    torch.testing.assert_close(m._pos_embed(patches[:, perm])[:, 1], tokens[:, 1])


@pytest.mark.parametrize('fixture', ['tiny_vkd_student', 'tiny_deit_student'])
def test_train_mode_returns_both_heads_and_eval_their_mean(fixture, request):
    m = request.getfixturevalue(fixture)
    x = torch.randn(2, 3, 32, 32)
    m.train()
    torch.manual_seed(0)
    z_cls, z_dist = m(x)
    feats = m.forward_features(x)
    torch.testing.assert_close(z_cls, m.head(feats[:, 0]))
    torch.testing.assert_close(z_dist, m.head_dist(feats[:, 1]))
    m.eval()
    out = m(x)
    feats = m.forward_features(x)
    torch.testing.assert_close(out, (m.head(feats[:, 0]) + m.head_dist(feats[:, 1])) / 2)
    assert has_dist_head(m)


def test_plain_timm_student_has_no_dist_head():
    m = vitkd.create_student('resnet18', 10)
    assert not has_dist_head(m)


def test_unknown_student_suggests_close_names():
    with pytest.raises(ModelSpecError, match="did you mean.*deit_small_distilled_patch16_224"):
        vitkd.create_student('deit_small_distiled_patch16_224', 10)


def test_teacher_alias_is_the_deit_teacher():
    assert resolve_teacher_name('regnety_160') == 'regnety_160.deit_in1k'
    cfg = timm.models.get_pretrained_cfg('regnety_160.deit_in1k')
    assert cfg.hf_hub_id == 'timm/regnety_160.deit_in1k' and cfg.tag == 'deit_in1k'


def test_teacher_is_frozen_and_stays_in_eval(tiny_teacher):
    t = tiny_teacher
    assert not any(p.requires_grad for p in t.parameters())
    t.train()
    assert not t.training and not any(m.training for m in t.modules())
    parent = nn.Module()
    object.__setattr__(parent, 'teacher', t)  # not a submodule: parent.train() cannot reach it
    assert 'teacher' not in dict(parent.named_modules())


def test_teacher_renormalises_student_input():
    model = timm.create_model('resnet18', num_classes=10)
    t = Teacher(model, 'test', student_mean=(0.5, 0.5, 0.5), student_std=(0.5, 0.5, 0.5))
    x = torch.randn(2, 3, 8, 8)
    pixels = x * 0.5 + 0.5  # what the student's normalisation undoes
    mean, std = torch.tensor(t.mean).view(1, 3, 1, 1), torch.tensor(t.std).view(1, 3, 1, 1)
    torch.testing.assert_close(t.prepare_input(x), (pixels - mean) / std)
    same = Teacher(model, 'test')
    assert same.prepare_input(x) is x


def _seed_hub_cache(cache, repo_id, files: dict):
    rev = 'a' * 40
    folder = cache / f'models--{repo_id.replace("/", "--")}'
    snap = folder / 'snapshots' / rev
    snap.mkdir(parents=True)
    for name, writer in files.items():
        writer(snap / name)
    (folder / 'refs').mkdir()
    (folder / 'refs' / 'main').write_text(rev)


def test_teacher_from_seeded_offline_hub_cache_by_tag(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants
    monkeypatch.setattr(hub_constants, 'HF_HUB_CACHE', str(tmp_path))
    monkeypatch.setattr(hub_constants, 'HF_HUB_OFFLINE', True)
    torch.manual_seed(3)
    source = timm.create_model('regnety_002', num_classes=1000).eval()
    _seed_hub_cache(tmp_path, 'timm/regnety_002.pycls_in1k',
                    {'model.safetensors': lambda p: save_file(source.state_dict(), str(p))})
    teacher = vitkd.create_teacher('regnety_002.pycls_in1k', 1000)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(teacher.model(x), source(x))
    assert teacher.source == 'regnety_002.pycls_in1k'


def test_teacher_from_seeded_hf_hub_repo_and_local_folder(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants
    monkeypatch.setattr(hub_constants, 'HF_HUB_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setattr(hub_constants, 'HF_HUB_OFFLINE', True)
    torch.manual_seed(4)
    source = timm.create_model('resnet18', num_classes=7).eval()
    export = tmp_path / 'export'
    timm.models.save_for_hf(source, export, safe_serialization=True)
    _seed_hub_cache(tmp_path / 'cache', 'someone/tiny-teacher', {
        name: (lambda p, name=name: p.write_bytes((export / name).read_bytes()))
        for name in ('config.json', 'model.safetensors')})
    x = torch.randn(2, 3, 32, 32)
    for spec in ('hf-hub:someone/tiny-teacher', str(export)):
        teacher = vitkd.create_teacher(spec, 7)
        with torch.no_grad():
            torch.testing.assert_close(teacher.model(x), source(x))
    with pytest.raises(ModelSpecError, match='7-way head but the data has 10'):
        vitkd.create_teacher(str(export), 10)


def test_uncached_hub_teacher_offline_is_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants
    monkeypatch.setattr(hub_constants, 'HF_HUB_CACHE', str(tmp_path))
    monkeypatch.setattr(hub_constants, 'HF_HUB_OFFLINE', True)
    with pytest.raises(ModelSpecError, match='not in the local Hub cache'):
        vitkd.create_teacher('hf-hub:nobody/missing', 10)


def test_safetensors_teacher_needs_arch_and_loads(tmp_path):
    source = timm.create_model('resnet18', num_classes=5).eval()
    path = tmp_path / 'w.safetensors'
    save_file(source.state_dict(), str(path))
    with pytest.raises(ModelSpecError, match='--teacher-arch'):
        vitkd.create_teacher(str(path), 5)
    teacher = vitkd.create_teacher(str(path), 5, arch='resnet18')
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(teacher.model(x), source(x))


def test_tiny_student_round_trips_through_save_for_hf(tmp_path, tiny_vkd_student):
    m = tiny_vkd_student.eval()
    timm.models.save_for_hf(m, tmp_path, safe_serialization=True)
    cfg = json.loads((tmp_path / 'config.json').read_text())
    assert cfg['architecture'] == 'deit_ti_distilled' and cfg['model_args']['depth'] == TINY_VIT['depth']
    again = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), m(x))


def test_stem_width_sets_the_conv_stem_and_survives_export(tmp_path):
    """``stem_width`` = channels of every stem conv (VkD: 64); timm records it and rebuilds the same student."""
    m = vitkd.create_student('deit_ti_distilled', 10, img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=2,
                             stem_width=16).eval()
    convs = [c for c in m.patch_embed.stem if isinstance(c, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 16), (16, 16), (16, 16)]
    assert m.patch_embed.proj.in_channels == 16
    default = vitkd.create_student('deit_ti_distilled', 10, img_size=32, patch_size=8, depth=2, embed_dim=48,
                                   num_heads=2)
    assert default.patch_embed.proj.in_channels == 64
    timm.models.save_for_hf(m, tmp_path, safe_serialization=True)
    assert json.loads((tmp_path / 'config.json').read_text())['model_args']['stem_width'] == 16
    again = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), m(x))
