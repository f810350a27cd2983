"""Shared tiny models and settings for the test suite (CPU, seconds per test)."""
import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')  # never touch the network; must precede huggingface_hub's import
os.environ.setdefault('HF_HUB_DISABLE_TELEMETRY', '1')
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # spinning OpenMP threads crawl on shared cores

import pytest  # noqa: E402
import torch  # noqa: E402

import vitkd  # noqa: E402,F401  (registers students and losses)
from vitkd import devices  # noqa: E402

torch.set_num_threads(2)



@pytest.fixture(scope='module')
def one_core():
    """In-process runs of a module see one core, so they train with one CPU thread and one loader worker: this
    process imported torch before main.py could set OMP_WAIT_POLICY=PASSIVE, and spinning OpenMP threads make steps
    ~10x slower on shared cores (module scope: in place before the module's run fixtures train)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(devices, 'own_cores', lambda: {0})
        yield
    torch.set_num_threads(2)


TINY_VIT = dict(img_size=32, patch_size=4, depth=2, embed_dim=48, num_heads=2)


@pytest.fixture
def tiny_vkd_student():
    """VkD student (conv stem, mean-patch dist token), 32 px, 2 blocks, width 48, 10 classes."""
    torch.manual_seed(0)
    return vitkd.create_student('deit_ti_distilled', 10, **TINY_VIT)


@pytest.fixture
def tiny_deit_student():
    """timm's distilled DeiT (learned dist token), 32 px, patch 8, 2 blocks, width 48, 10 classes."""
    torch.manual_seed(0)
    return vitkd.create_student('deit_tiny_distilled_patch16_224', 10, img_size=32, patch_size=8, depth=2,
                                embed_dim=48, num_heads=2)


@pytest.fixture
def tiny_teacher():
    """A random regnety_002 teacher with a 10-way head."""
    torch.manual_seed(1)
    return vitkd.create_teacher('regnety_002', 10, pretrained=False)
