"""Feature taps equal what timm's forward_features / forward_head give, for ViTs and CNNs."""
import pytest
import timm
import torch

import vitkd
from vitkd.features import TapError, TapSpec, extract


def _models():
    torch.manual_seed(0)
    return {
        'vkd': vitkd.create_student('deit_ti_distilled', 10, img_size=32, patch_size=4, depth=3, embed_dim=48,
                                    num_heads=2),
        'deit': vitkd.create_student('deit_tiny_distilled_patch16_224', 10, img_size=32, patch_size=8, depth=3,
                                     embed_dim=48, num_heads=2),
        'regnet': timm.create_model('regnety_002', num_classes=10),
        'resnet': timm.create_model('resnet18', num_classes=10),
    }


MODELS = _models()


@pytest.mark.parametrize('name', list(MODELS))
def test_taps_equal_forward_features_and_head(name):
    model = MODELS[name].eval()
    x = torch.randn(2, 3, 32, 32)
    spec = TapSpec(logits=True, pooled=True, tokens=True, blocks=(0, -1))
    with torch.no_grad():
        feats = extract(model, x, spec)
        final = model.forward_features(x)
        pooled = model.forward_head(final, pre_logits=True)
    torch.testing.assert_close(feats.pooled, pooled)
    torch.testing.assert_close(feats.head_logits, model(x))
    if name in ('vkd', 'deit'):
        torch.testing.assert_close(feats.cls_token, final[:, 0])
        torch.testing.assert_close(feats.dist_token, final[:, 1])
        torch.testing.assert_close(feats.patch_tokens, final[:, 2:])
        torch.testing.assert_close(feats.logits, model.head(final[:, 0]))
        torch.testing.assert_close(feats.logits_dist, model.head_dist(final[:, 1]))
        # final_map is the patch-token grid: token n sits at (n // w, n % w)
        b, n, d = feats.patch_tokens.shape
        w = int(n ** 0.5)
        torch.testing.assert_close(feats.final_map[:, :, 1, 2], feats.patch_tokens[:, w + 2])
        # block taps: the un-normed output of that block, computed by hand
        tokens = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        with torch.no_grad():
            for i, blk in enumerate(model.blocks):
                tokens = blk(tokens)
                if i in feats.blocks:
                    grid = tokens[:, 2:].transpose(1, 2).reshape(b, d, w, w)
                    torch.testing.assert_close(feats.blocks[i], grid)
                    torch.testing.assert_close(feats.block_prefix[i], tokens[:, :2])
        assert feats.num_blocks == 3 and set(feats.blocks) == {0, 2}
    else:
        torch.testing.assert_close(feats.final_map, final)
        assert feats.logits_dist is None
        torch.testing.assert_close(feats.blocks[feats.num_blocks - 1], final)
        assert feats.block(-1) is feats.blocks[feats.num_blocks - 1]


def test_untapped_intermediates_are_not_computed():
    model = MODELS['regnet'].eval()
    feats = extract(model, torch.randn(1, 3, 32, 32), TapSpec(logits=True))
    assert feats.blocks == {} and feats.pooled is None and feats.final_map is None


def test_out_of_range_tap_is_a_clear_error():
    with pytest.raises(TapError, match='tap index 7 is out of range.*5 taps'):
        extract(MODELS['resnet'], torch.randn(1, 3, 32, 32), TapSpec(blocks=(7,)), 'teacher')


def test_module_hooks_and_hook_fallback_for_models_without_forward_intermediates():
    model = MODELS['resnet'].eval()
    x = torch.randn(1, 3, 32, 32)
    feats = extract(model, x, TapSpec(modules=('layer2',), blocks=(2,)))
    with torch.no_grad():
        ref = model.layer2(model.layer1(model.maxpool(model.act1(model.bn1(model.conv1(x))))))
    torch.testing.assert_close(feats.modules['layer2'], ref)
    torch.testing.assert_close(feats.blocks[2], ref)

    class NoIntermediates(torch.nn.Module):  # a timm-like model that lacks forward_intermediates
        def __init__(self, inner):
            super().__init__()
            self.inner, self.feature_info = inner, [{'module': f'inner.{m["module"]}'} for m in inner.feature_info]

        def forward_features(self, x):
            return self.inner.forward_features(x)

        def forward_head(self, x, pre_logits=False):
            return self.inner.forward_head(x, pre_logits=pre_logits)

    wrapped = NoIntermediates(model)
    fallback = extract(wrapped, x, TapSpec(blocks=(2,)))
    torch.testing.assert_close(fallback.blocks[2], ref)
