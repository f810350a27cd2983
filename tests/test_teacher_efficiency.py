"""The teacher computes only what the losses need, in channels_last for CNNs, optionally compiled (and the student's
training pass) — same outputs."""
import numpy as np
import pytest
import timm
import torch
from accelerate import Accelerator
from PIL import Image

import vitkd
from vitkd.distiller import Distiller, LossEntry
from vitkd.features import TapSpec, extract
from vitkd.losses import Batch, RunInfo, create_loss
from vitkd.models import Teacher, set_fused_attention

torch.set_num_threads(1)


def _student():
    torch.manual_seed(0)
    return vitkd.create_student('deit_tiny_distilled_patch16_224', 10, img_size=32, patch_size=8, depth=2,
                                embed_dim=32, num_heads=2)


def _regnet(channels_last=None) -> Teacher:
    torch.manual_seed(1)
    return Teacher(timm.create_model('regnety_002', num_classes=10), 'test', channels_last=channels_last)


def _calls(model, names):
    counts = {n: 0 for n in names}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: counts.__setitem__(n, counts[n] + 1))
               for n in names]
    return counts, handles


def test_block_only_taps_stop_after_the_deepest_block():
    model = timm.create_model('regnety_002', num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    counts, handles = _calls(model, ['s2', 's3', 's4', 'head'])
    with torch.no_grad():
        early = extract(model, x, TapSpec(blocks=(1, 2)), only_requested=True)
        assert counts == {'s2': 1, 's3': 0, 's4': 0, 'head': 0}   # stages after s2 (tap 2) never ran
        full = extract(model, x, TapSpec(blocks=(1, 2)))
        assert counts == {'s2': 2, 's3': 1, 's4': 1, 'head': 1}
        by_hand = model.s2(model.s1(model.stem(x)))                  # feature 2 = stage 2 output
    for h in handles:
        h.remove()
    assert early.logits is None and full.logits is not None
    torch.testing.assert_close(early.blocks[2], by_hand)
    torch.testing.assert_close(early.blocks[1], full.blocks[1])


def test_only_requested_logits_and_pooled_match_the_model():
    model = timm.create_model('regnety_002', num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = extract(model, x, TapSpec(pooled=True), only_requested=True)
        assert feats.logits is None
        torch.testing.assert_close(feats.pooled, model.forward_features(x).mean((2, 3)))
        feats = extract(model, x, TapSpec(logits=True), only_requested=True)
        torch.testing.assert_close(feats.logits, model(x))


def test_distiller_runs_the_teacher_only_up_to_fitnets_tap():
    teacher = _regnet()
    distiller = Distiller(_student(), teacher, [LossEntry(create_loss('fitnet'))],
                          RunInfo(num_classes=10, input_size=(3, 32, 32)))
    counts, handles = _calls(teacher.model, ['s3', 's4', 'head'])
    feats = distiller.teacher_features(torch.randn(2, 3, 32, 32))
    for h in handles:
        h.remove()
    assert distiller.teacher_spec == TapSpec(blocks=(3,))
    assert counts == {'s3': 1, 's4': 0, 'head': 0} and feats.logits is None and set(feats.blocks) == {3}


def test_channels_last_teacher_gives_the_same_features_as_nchw():
    cl, ref = _regnet(), _regnet(channels_last=False)
    assert cl.channels_last and not ref.channels_last
    assert cl.model.stem.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not ref.model.stem.conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 32, 32)
    info = RunInfo(num_classes=10, input_size=(3, 32, 32))
    student = _student()
    d_cl = Distiller(student, cl, [LossEntry(create_loss('at')), LossEntry(create_loss('vkd'))], info)
    d_ref = Distiller(student, ref, [LossEntry(create_loss('at')), LossEntry(create_loss('vkd'))], info)
    f_cl, f_ref = d_cl.teacher_features(x), d_ref.teacher_features(x)
    for i, t in f_cl.blocks.items():
        assert t.is_contiguous()  # the losses get standard NCHW tensors (their .view calls need it)
        torch.testing.assert_close(t, f_ref.blocks[i], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(f_cl.logits, f_ref.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(f_cl.pooled, f_ref.pooled, atol=1e-4, rtol=1e-4)


def test_vit_teacher_stays_in_its_format():
    vit = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=1, num_classes=10)
    assert not Teacher(vit, 'vit').channels_last


def test_compiled_teacher_gives_the_same_features():
    teacher = _regnet(channels_last=False)
    distiller = Distiller(_student(), teacher, [LossEntry(create_loss('vkd'))],
                          RunInfo(num_classes=10, input_size=(3, 32, 32)))
    x = torch.randn(2, 3, 32, 32)
    before = distiller.teacher_features(x)
    teacher.compile(backend='eager')  # dynamo traces the forward paths; 'inductor' (the --compile default) too slow
    assert teacher.compiled and hasattr(teacher.model.forward_features, '_torchdynamo_orig_callable')
    cl = _regnet()
    assert cl.channels_last and cl.model.stem.conv.weight.is_contiguous(memory_format=torch.channels_last)
    cl.compile(backend='eager')  # a compiled teacher is handed to inductor in NCHW (its own layout choice is faster)
    assert not cl.channels_last and cl.model.stem.conv.weight.is_contiguous()
    after = distiller.teacher_features(x)
    torch.testing.assert_close(after.logits, before.logits)
    torch.testing.assert_close(after.pooled, before.pooled)


def _step_grads(module, distiller, x, targets, labels, epoch=0.0):
    distiller.zero_grad(set_to_none=True)
    out = module(Batch(x, targets, labels, progress=epoch))
    out['loss'].backward()
    return out, {n: p.grad.clone() for n, p in distiller.named_parameters() if p.grad is not None}


def test_compiled_module_gives_the_eager_gradients_except_to_idle_parameters():
    """The distiller compiled as a whole (``aot_eager``: dynamo's graph and AOTAutograd's traced backward, without
    inductor's code generation) gives the eager step's loss, terms and every gradient once every parameter takes part.
    At a warm-up's first step (VkD's weight 0) the distillation head computes logits the loss ignores: eager autograd
    leaves its gradient None, the compiled backward gives zeros (which AdamW would act on). Hence vitkd compiles from
    the first step that leaves no parameter idle (vitkd.ddp)."""
    distiller = Distiller(_student(), _regnet(), [LossEntry(create_loss('vkd'), warmup_epochs=1.0)],
                          RunInfo(num_classes=10, input_size=(3, 32, 32)))
    compiled = torch.compile(distiller, backend='aot_eager')
    x, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 5, 9])
    targets = torch.nn.functional.one_hot(labels, 10).float()
    _, eager_idle = _step_grads(distiller, distiller, x, targets, labels)
    _, compiled_idle = _step_grads(compiled, distiller, x, targets, labels)
    head = {'student.head_dist.weight', 'student.head_dist.bias'}
    assert not head & eager_idle.keys() and compiled_idle.keys() == eager_idle.keys() | head
    assert all(not compiled_idle[name].any() for name in head)
    eager_out, eager_grads = _step_grads(distiller, distiller, x, targets, labels, epoch=1.0)
    compiled_out, compiled_grads = _step_grads(compiled, distiller, x, targets, labels, epoch=1.0)
    torch.testing.assert_close(compiled_out['loss'], eager_out['loss'])
    assert compiled_out['terms'].keys() == eager_out['terms'].keys()
    assert compiled_grads.keys() == eager_grads.keys() == {n for n, p in distiller.named_parameters()}
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def _tiny_run_args(tmp_path, *extra):
    rng = np.random.default_rng(0)
    for split in ('train', 'val'):
        for c in range(2):
            folder = tmp_path / 'data' / split / f'c{c}'
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f'{i}.png')
    return ['--data-path', str(tmp_path / 'data'), '--input-size', '32', '--student', 'deit_tiny_distilled_patch16_224',
            '--student-kwargs', 'img_size=32', 'patch_size=8', 'depth=1', 'embed_dim=16', 'num_heads=2', '--teacher',
            'regnety_002', '--no-teacher-pretrained', '--distill', 'kd', '--batch-size', '4', '--num-workers', '0',
            *extra]


def _compiled_steps(tmp_path, monkeypatch, *args):
    """The run ``args`` builds, and what ``torch.compile`` was handed (nothing is compiled)."""
    from vitkd import run as runlib
    from vitkd.arguments import parse_args
    compiled = []
    monkeypatch.setattr(torch, 'compile', lambda fn, **kw: compiled.append(fn) or fn)
    cfg, _ = parse_args(_tiny_run_args(tmp_path, *args))
    return cfg, runlib.build_run(cfg, Accelerator(cpu=True)), compiled


def test_compile_option_reaches_the_teacher_and_the_trained_module(tmp_path, monkeypatch):
    """``--compile`` (timm's habit) compiles the teacher's forward paths at build and the trained module from the first
    step (KD leaves no parameter idle)."""
    cfg, r, compiled = _compiled_steps(tmp_path, monkeypatch, '--compile')
    assert cfg.compile_teacher and cfg.compile_student and r.teacher.compiled
    assert {fn.__name__ for fn in compiled} == {'forward_intermediates', 'forward_features', 'forward_head', 'forward'}
    assert r.step_module.model_for_step(r.distiller, 0.0) is r.distiller and compiled[-1] is r.distiller


def test_compile_student_compiles_the_module_from_the_first_step_without_idle_parameters(tmp_path, monkeypatch):
    """A warm-up leaves the distillation head idle at its first step (weight 0) and ramps its weight until epoch 2: the
    module trains eagerly until then (vitkd.ddp says why)."""
    cfg, r, compiled = _compiled_steps(tmp_path, monkeypatch, '--compile-student', '--loss-opts', 'kd.warmup_epochs=2')
    assert cfg.compile_student and not cfg.compile_teacher and not r.teacher.compiled and compiled == []
    assert r.step_module.model_for_step(r.distiller, 1.5) is r.distiller and compiled == []
    assert r.step_module.model_for_step(r.distiller, 2.0) is r.distiller and compiled == [r.distiller]


def test_unfused_attention_computes_the_same_attention():
    student = _student().eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        fused = student(x)
        assert set_fused_attention(student, False) == 2  # depth 2: one attention module per block
        manual = student(x)
        # and by hand for block 0: softmax(q kᵀ / √d) v over the heads
        attn = student.blocks[0].attn
        tokens = student._pos_embed(student.patch_embed(x))
        h = student.blocks[0].norm1(tokens)
        b, n, d = h.shape
        q, k, v = attn.qkv(h).reshape(b, n, 3, attn.num_heads, d // attn.num_heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-1, -2) / (d // attn.num_heads) ** 0.5, dim=-1)
        by_hand = attn.proj((weights @ v).transpose(1, 2).reshape(b, n, d))
        torch.testing.assert_close(attn(h), by_hand, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(manual, fused, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('precision', ['bf16', 'no'])
def test_cpu_runs_use_unfused_attention(tmp_path, precision):
    from vitkd.run import build_run
    from vitkd.arguments import parse_args
    cfg, _ = parse_args(_tiny_run_args(tmp_path, '--mixed-precision', precision))
    r = build_run(cfg, Accelerator(cpu=True))  # the decision reads cfg.mixed_precision and the device
    flags = [m.fused_attn for m in r.student.modules() if hasattr(m, 'fused_attn')]
    assert flags and not any(flags)


def test_teacher_runs_in_inference_mode_and_its_taps_train_the_student():
    teacher = _regnet()
    seen = []
    teacher.model.stem.register_forward_hook(lambda m, i, o: seen.append(torch.is_inference_mode_enabled()))
    loss = create_loss('fitnet')  # an MSE whose backward saves the teacher's map
    distiller = Distiller(_student(), teacher, [LossEntry(loss)], RunInfo(num_classes=10, input_size=(3, 32, 32)))
    x = torch.randn(4, 3, 32, 32)
    feats = distiller.teacher_features(x)
    assert seen == [True, True]  # the setup pass and this one
    tensors = [t for t in (feats.logits, feats.pooled, *feats.blocks.values(), *feats.modules.values())
               if isinstance(t, torch.Tensor)]
    assert tensors and not any(t.is_inference() for t in tensors)
    labels = torch.randint(0, 10, (4,))
    out = distiller(Batch(x, torch.nn.functional.one_hot(labels, 10).float(), labels, index=torch.arange(4)))
    out['loss'].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.student.parameters())
