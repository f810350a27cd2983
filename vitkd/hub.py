"""Push a run's exported student to the Hugging Face Hub with a model card.

The upload is the run's ``student/`` folder (timm's format: config.json + model.safetensors) plus a ``README.md``
model card written from the run's ``config.yaml`` and ``summary.json``: front matter for the Hub (library_name timm,
tags, license, datasets) and a body with the student, the teacher, the methods with their weights and options, the
recipe, the final metrics per head and how to load the model. It goes through ``huggingface_hub``
(``create_repo`` + ``upload_folder``); the token comes from where huggingface_hub looks (``HF_TOKEN``, then the
cached login) and is never printed or logged by vitkd.

    python scripts/push_to_hub.py output/run --hub-model-id org/name [--hub-private]
    python main.py ... --push-to-hub --hub-model-id org/name
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable, Optional

import yaml

from .config import Config, ConfigError, load_yaml
from .dense.models import DENSE_ARCHITECTURES
from .errors import HubError, server_failure
from .models import default_cfgs as vitkd_cfgs
from .validate import distill_spec
from .version import __version__

__all__ = ['HubPushError', 'model_card', 'teacher_description', 'push_run', 'push_run_to_hub', 'default_repo_name',
           'HUB_DATASETS', 'check_push_token']

EXPORT_DIR = 'student'
UPLOADED = ('config.json', 'model.safetensors', 'README.md')

# Hub ids of the data sets vitkd knows (an ImageFolder run names its folder instead).
HUB_DATASETS = {'fashion_mnist': 'zalando-datasets/fashion_mnist', 'cifar10': 'uoft-cs/cifar10',
                'cifar100': 'uoft-cs/cifar100'}


# A dense run's card: its Hub task tag and metric, the columns of its results table (summary keys).
DENSE_CARDS = {'detect': dict(tag='object-detection', metric='mean_average_precision',
                              columns=('mAP', 'AP50', 'AP75', 'mask_mAP', 'mask_AP50', 'mask_AP75')),
               'segment': dict(tag='image-segmentation', metric='mean_iou', columns=('mIoU', 'pixel_acc'))}


class HubPushError(HubError):
    """An upload that failed (the message says what failed and how to retry); exit code 4."""


def default_repo_name(run_dir: Path) -> str:
    """A Hub repo name from the run dir's name (letters, digits, ``-_.``; at most 96 characters)."""
    name = re.sub(r'[^A-Za-z0-9._-]+', '-', Path(run_dir).resolve().name).strip('-.') or 'vitkd-student'
    return name[:96]


def _read_run(run_dir: Path) -> tuple[Config, dict, dict]:
    try:
        cfg = Config(**load_yaml(str(run_dir / 'config.yaml')))
    except (ConfigError, TypeError) as e:
        raise HubPushError(f'{run_dir} has no usable config.yaml ({e}); is it a vitkd run dir?') from None
    summary_path = run_dir / 'summary.json'
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    export_config = json.loads((run_dir / EXPORT_DIR / 'config.json').read_text())
    return cfg, summary, export_config


def _public_name(spec: str) -> str:
    """A local path shown by its last component (the card is public; the machine's layout is not its business)."""
    return Path(spec).name if os.path.isabs(spec) or os.path.exists(spec) else spec


def teacher_description(cfg: Config) -> str:
    """The teacher by architecture and source, e.g. "`regnety_160.deit_in1k` (timm pretrained weights)",
    "`regnety_002` (local weights, not published)", "`org/name` (hf-hub:org/name)": a folder's name says neither."""
    spec = cfg.teacher
    if not spec:
        return 'none'
    if spec.startswith('hf-hub:'):
        return f'`{spec[len("hf-hub:"):]}` (Hugging Face Hub: {spec})'
    path = Path(spec)
    if path.is_dir() and (path / 'config.json').is_file():
        arch = json.loads((path / 'config.json').read_text()).get('architecture', '?')
        return f'`{arch}` (local weights in timm format, not published)'
    if spec.endswith('.safetensors') or path.exists():
        return f'`{cfg.teacher_arch or "?"}` (local safetensors weights, not published)'
    return f'`{spec}` (timm pretrained weights: `timm.create_model({spec!r}, pretrained=True)`)'


def _metric_rows(summary: dict) -> list[str]:
    rows = ['| model | head | top-1 (%) | top-5 (%) |', '|---|---|---|---|']
    teacher = summary.get('teacher') or {}
    if 'teacher_top1' in teacher:
        rows.append(f'| teacher | — | {teacher["teacher_top1"]:.2f} | {teacher["teacher_top5"]:.2f} |')
    student = summary.get('student') or {}
    for prefix, label in (('', 'student'), ('ema_', 'student (EMA)')):
        for head in ('cls', 'dist', 'avg'):
            if f'{prefix}{head}_top1' in student:
                rows.append(f'| {label} | {head} | {student[f"{prefix}{head}_top1"]:.2f} | '
                            f'{student[f"{prefix}{head}_top5"]:.2f} |')
    return rows


def _dense_metric_rows(summary: dict, task: str) -> list[str]:
    """The table of a dense run's validation metrics (percent): the columns the run reported."""
    student, teacher = summary.get('student') or {}, summary.get('teacher') or {}
    columns = [c for c in DENSE_CARDS[task]['columns'] if c in student]
    rows = [f'| model | {" | ".join(columns)} |', '|---' * (len(columns) + 1) + '|']
    if all(f'teacher_{c}' in teacher for c in columns):
        rows.append('| teacher | ' + ' | '.join(f'{teacher[f"teacher_{c}"]:.2f}' for c in columns) + ' |')
    rows.append('| student | ' + ' | '.join(f'{student[c]:.2f}' for c in columns) + ' |')
    return rows


def _dense_load_lines(repo_id: str, task: str, input_size) -> list[str]:
    """How to run a dense export: timm rebuilds the whole model (backbone, pyramid, head) once vitkd has
    registered the architecture; the input is normalised with the export's mean and std."""
    channels, size = input_size[0], input_size[-1]
    output = (["    detections = model((image - mean) / std)  # per image: 'boxes' [d, 4] x0 y0 x1 y1 in pixels, "
               "'scores' [d], 'labels' [d] (0..K-1)"] if task == 'detect' else
              ['    logits = model((image - mean) / std)  # [B, K, H, W]; classes: logits.argmax(1)'])
    return ['import timm', 'import torch', '', 'import vitkd  # registers vitkd_dense_detector / '
            'vitkd_dense_segmenter in timm', '',
            f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()",
            "mean, std = (torch.tensor(model.pretrained_cfg[k]).view(-1, 1, 1) for k in ('mean', 'std'))",
            f'image = torch.rand(1, {channels}, {size}, {size})  # values in [0, 1]; other sizes: scale the longer '
            f'side to {size}, pad right and bottom with 0',
            'with torch.no_grad():', *output, '# class names: config.json label_names']


def model_card(run_dir: Path, repo_id: str) -> str:
    """The README.md (front matter + body) for the run's exported student."""
    run_dir = Path(run_dir)
    cfg, summary, export = _read_run(run_dir)
    arch = export['architecture']
    pretrained_cfg = export.get('pretrained_cfg', {})
    methods = distill_spec(cfg).methods
    method_names = [m.name for m in methods if m.name != 'none']
    dataset = HUB_DATASETS.get(cfg.dataset) or (Path(cfg.data_path).name if cfg.data_path else cfg.dataset)
    license_ = getattr(cfg, 'hub_license', None)  # the user's choice only: no license is inferred for the weights
    dense = DENSE_CARDS.get(cfg.task) if arch in DENSE_ARCHITECTURES.values() else None
    tag, metric = (dense['tag'], dense['metric']) if dense else ('image-classification', 'accuracy')
    front = {'library_name': 'timm', **({'license': license_} if license_ else {}),
             'tags': [tag, 'timm', 'vitkd', 'knowledge-distillation', *method_names],
             'datasets': [dataset], 'metrics': [metric], 'pipeline_tag': tag}
    needs_vitkd = dense or arch.split('.')[0] in {name.split('.')[0] for name in vitkd_cfgs}
    install = f'pip install vitkd=={__version__}' if needs_vitkd else 'pip install timm'
    mode = 'L' if tuple(pretrained_cfg.get('input_size', (3,)))[0] == 1 else 'RGB'
    load = ['import timm', 'import torch', 'from PIL import Image', '',
            *(['import vitkd  # registers the VkD student architecture in timm', ''] if needs_vitkd else []),
            f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()",
            'transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))',
            f"image = Image.open('image.png').convert('{mode}')",
            'with torch.no_grad():',
            '    logits = model(transform(image).unsqueeze(0))' + (
                '  # eval mode: the mean of the cls and dist heads' if 'head_dist' in str(pretrained_cfg.get(
                    'classifier', '')) else '')]
    method_rows = ['| method | weight | options |', '|---|---|---|']
    weights = summary.get('weights', {})  # as the run resolved them (a ViT student's defaults); older runs: 1
    method_rows += [f'| {m.name} | {m.weight if m.weight is not None else weights.get(m.name, 1.0):g} | '
                    f'{", ".join(f"{k}={v}" for k, v in m.shown_options().items()) or "defaults"} |' for m in methods]
    epochs_run = summary.get('epochs_run', '?')
    teacher = teacher_description(cfg)
    recipe = [f'- data: {cfg.dataset}' + (f' ({_public_name(cfg.data_path)})' if cfg.data_path else '') +
              (f', train subset {cfg.train_subset}' if cfg.train_subset else ''),
              f'- input {tuple(pretrained_cfg.get("input_size", ()))}, mean {tuple(pretrained_cfg.get("mean", ()))}, '
              f'std {tuple(pretrained_cfg.get("std", ()))}, eval crop {pretrained_cfg.get("crop_pct")} '
              f'{pretrained_cfg.get("interpolation", "")}',
              f'- {epochs_run} of {cfg.epochs} epochs, {summary.get("steps", "?")} steps '
              f'({summary.get("stop_reason", "?")}), batch {cfg.batch_size} per process × grad-accum '
              f'{cfg.grad_accum_steps}',
              f'- optimizer {cfg.opt}, lr {cfg.lr:g}{" (unscaled)" if cfg.unscale_lr else " × global batch / 512"}, '
              f'weight decay {cfg.weight_decay:g}, schedule {cfg.sched} (warm-up {cfg.warmup_epochs:g} epochs, '
              f'min lr {cfg.min_lr:g}), clip-grad {cfg.clip_grad}',
              (f'- augmentation: horizontal flip {cfg.hflip:g}, scale jitter {list(cfg.scale_jitter)}; pyramid '
               f'strides {list(cfg.pyramid_strides)}, {cfg.pyramid_channels} channels' if dense else
               f'- augmentation: RandAugment {cfg.aa}, 3-Augment {cfg.three_augment}, colour jitter '
               f'{cfg.color_jitter:g}, random erasing {cfg.reprob:g}, mixup {cfg.mixup:g}, cutmix {cfg.cutmix:g}, '
               f'label smoothing {cfg.smoothing:g}'),
              f'- precision {cfg.mixed_precision}, seed {cfg.seed}, EMA {cfg.model_ema}'
              + (f' (decay {cfg.model_ema_decay:g})' if cfg.model_ema else '')]
    params = ', '.join(f'{k}={v}' for k, v in export.get('model_args', {}).items())
    if dense:
        load = _dense_load_lines(repo_id, cfg.task, tuple(pretrained_cfg.get('input_size', (3, 224, 224))))
    what = (f'The whole {"detector" if cfg.task == "detect" else "segmenter"} (backbone, feature pyramid and head) '
            if dense else '')
    body = [f'# {repo_id.split("/")[-1]}', '',
            f'A `{arch}` student ({params}) distilled with vitkd from the teacher {teacher}.'
            + (f' {what}is in model.safetensors.' if dense else ''), '',
            f'License: {license_ if license_ else "none given (the uploader did not set --hub-license)"}.', '',
            '## Distillation', '', *method_rows, '',
            '## Recipe', '', *recipe, '',
            '## Results (validation set, final weights)', '',
            *(_dense_metric_rows(summary, cfg.task) if dense else _metric_rows(summary)), '',
            '## How to load', '', '```bash', install, '```', '', '```python', *load, '```', '']
    return '---\n' + yaml.safe_dump(front, sort_keys=False) + '---\n\n' + '\n'.join(body)


def _retry_hint(run_dir: Path, repo_id: Optional[str], private: bool) -> str:
    cmd = f'python scripts/push_to_hub.py {run_dir}' + (f' --hub-model-id {repo_id}' if repo_id else '')
    return cmd + (' --hub-private' if private else '')


def _bound_hub_requests() -> float:
    """Give huggingface_hub's API calls (whoami, create_repo, commits) a timeout; returns it in seconds.

    Its shared HTTP client waits for ever by default: a Hub that accepts the connection and never answers would hang
    the push. huggingface_hub documents ``HF_HUB_DOWNLOAD_TIMEOUT`` (default 10 s) as the timeout of requests that
    set none; it bounds the wait for each connection and each read here, not a whole upload.
    """
    from huggingface_hub import constants, set_client_factory
    from huggingface_hub.utils._http import default_client_factory
    timeout = float(constants.HF_HUB_DOWNLOAD_TIMEOUT)

    def bounded_client():
        client = default_client_factory()
        client.timeout = timeout
        return client
    set_client_factory(bounded_client)
    return timeout


def _what_failed(error: BaseException, timeout: float) -> str:
    """The Hub's part in a failed call, in words (``answered HTTP 500 …``, timed out, closed the connection)."""
    from huggingface_hub import constants
    failure = server_failure(error)
    if failure is None:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        return f'refused it ({type(error).__name__}: {first})'
    if 'timed out' in failure:
        failure += f' after {timeout:g} s; HF_HUB_DOWNLOAD_TIMEOUT sets the wait'
    return f'({constants.ENDPOINT}) {failure}'


def check_push_token(repo_id: Optional[str]) -> None:
    """Before training, for ``--push-to-hub``: a token exists, the Hub accepts it (``whoami``) and it may write.

    A run that is to push must not train for hours and then fail on a missing or revoked token.

    Raises:
        HubPushError: no token, the Hub refused it, a read-only token, or the Hub failed while checking it (the
            message says what happened and what to do; nothing was trained or written).
    """
    import huggingface_hub
    later = ('or train without --push-to-hub and push the finished run with: python scripts/push_to_hub.py <run dir>'
             + (f' --hub-model-id {repo_id}' if repo_id else ''))
    if huggingface_hub.get_token() is None:
        raise HubPushError(f'--push-to-hub: no Hugging Face token: set HF_TOKEN or run `hf auth login`, {later}; '
                           'nothing was trained or written')
    timeout = _bound_hub_requests()
    try:
        info = huggingface_hub.HfApi(library_name='vitkd').whoami()
    except Exception as e:  # noqa: BLE001 - HTTP and network errors all become one line
        status = getattr(getattr(e, 'response', None), 'status_code', None)
        if status == 401:
            raise HubPushError(f'--push-to-hub: the Hub ({huggingface_hub.constants.ENDPOINT}) refused the token '
                               '(HTTP 401: invalid or revoked); set a valid HF_TOKEN or run `hf auth login`, '
                               f'{later}; nothing was trained or written') from None
        raise HubPushError(f'--push-to-hub: checking the token failed: the Hub {_what_failed(e, timeout)}; retry '
                           f'later, {later}; nothing was trained or written') from None
    role = ((info.get('auth') or {}).get('accessToken') or {}).get('role')
    if role == 'read':
        raise HubPushError(f'--push-to-hub: the token of {info.get("name", "this user")} is read-only; use a token '
                           f'with write access, {later}; nothing was trained or written')


def push_run(run_dir: Path, repo_id: Optional[str] = None, private: bool = False) -> str:
    """Upload ``<run_dir>/student`` with a model card; returns the repo URL.

    Args:
        run_dir: a finished vitkd run dir (config.yaml, summary.json, student/).
        repo_id: ``org/name`` or ``name`` (then the token's namespace); default: the run dir's name.
        private: create the repo as private (an existing repo keeps its visibility).

    Raises:
        HubPushError: nothing to upload, no token, or the Hub refused/failed; the local export is never modified
            except for its README.md model card.
    """
    import huggingface_hub
    run_dir = Path(run_dir)
    export = run_dir / EXPORT_DIR
    hint = _retry_hint(run_dir, repo_id, private)
    if not ((export / 'config.json').is_file() and (export / 'model.safetensors').is_file()):
        raise HubPushError(f'no exported student in {export} (config.json + model.safetensors); finish the run first')
    if huggingface_hub.get_token() is None:
        raise HubPushError('no Hugging Face token: set HF_TOKEN or run `hf auth login`, then retry: ' + hint)
    name = repo_id or default_repo_name(run_dir)
    timeout = _bound_hub_requests()
    api = huggingface_hub.HfApi(library_name='vitkd')
    try:
        url = api.create_repo(name, private=private, exist_ok=True)
        repo_id = url.repo_id
        (export / 'README.md').write_text(model_card(run_dir, repo_id))
        info = api.upload_folder(repo_id=repo_id, folder_path=str(export), allow_patterns=list(UPLOADED),
                                 commit_message=f'vitkd: {default_repo_name(run_dir)}')
    except HubPushError:
        raise
    except Exception as e:  # noqa: BLE001 - HTTP, network and validation errors all become one retry message
        raise HubPushError(f'upload of {export} to {repo_id or name} failed: the Hub {_what_failed(e, timeout)}; the '
                           f'local export is intact; retry with: {hint}') from None
    (run_dir / 'hub.json').write_text(json.dumps({'repo_id': repo_id, 'url': str(url),
                                                  'commit': getattr(info, 'oid', None)}, indent=2) + '\n')
    return str(url)


def push_run_to_hub(run_dir: Path, repo_id: Optional[str], private: bool, log: Callable[[str], None] = print) -> int:
    """:func:`push_run` for command lines: 0 on success, 4 (with the retry message on stderr) on failure."""
    import sys
    try:
        url = push_run(run_dir, repo_id, private)
    except HubPushError as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        return e.exit_code
    log(f'pushed the student to {url}')
    return 0
