"""Every option of a run, in one commented dataclass; YAML defaults (``-c``), then command-line overrides.

Resolution order (later wins): the dataclass defaults < the embedded-default preset (only when the data set is the
embedded Fashion-MNIST one) < ``-c file.yaml`` < command-line flags. The resolved config is saved as
``config.yaml`` in the run dir and is enough to re-run (``python main.py -c <run>/config.yaml``).
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .domains import (Bool, Domain, Either, Integer, Interval, Kwargs, ListOf, NonNegative, OneOf, OrNone, OutOfDomain,
                      Positive, Span, Text)
from .errors import ConfigError

__all__ = ['Config', 'ConfigError', 'option', 'flag', 'check_field', 'typed_text', 'embedded_default', 'load_yaml',
           'config_from_values', 'preset_names', 'config_path', 'to_yaml', 'REPO', 'PRESETS']

# Where the files the command reads at run time lie (the presets of ``-c NAME`` in scripts/configs/, the embedded
# default's teacher in checkpoints/): a checkout's root, or in an installed wheel the copy that pyproject.toml puts
# under vitkd/_shipped/ with the same layout.
REPO = Path(__file__).resolve().parent / '_shipped'
if not REPO.is_dir():
    REPO = REPO.parents[1]


def flag(name: str) -> str:
    """The command-line spelling of a Config field (``drop_path`` -> ``--drop-path``)."""
    return '--' + name.replace('_', '-')


def check_field(name: str, value: Any, domain: Domain) -> None:
    """``value`` of the Config field ``name`` inside its ``domain``, else a one-line error naming the flag, what is
    accepted and the value."""
    try:
        domain.check(value)
    except OutOfDomain as e:  # a set value of an optional field: what a value must be (null means unset)
        accepted = domain.inner.describe() if isinstance(domain, OrNone) and value is not None else str(e)
        raise ConfigError(f'{flag(name)} must be {accepted}, got {value!r}') from None


def typed_text(value: Any, empty: str = '(none)') -> str:
    """An option's value as a user types it: lists space-separated, dicts as key=value, None as none (``empty`` for
    an empty list or dict)."""
    if value is None:
        return 'none'
    if isinstance(value, dict):
        return ' '.join(f'{k}={v}' for k, v in value.items()) or empty
    if isinstance(value, (list, tuple)):
        return ' '.join(map(str, value)) or empty
    return str(value)


def option(default: Any, help: str, domain: Domain, aliases: tuple[str, ...] = (), nargs=None):
    """A config field: its default, its command-line help and the domain of its accepted values."""
    meta = dict(help=help, aliases=aliases, domain=domain, nargs=nargs)
    if isinstance(default, (list, dict, tuple)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Config:
    # ---- data ------------------------------------------------------------------------------------------------
    task: str = option('classify', 'what the student learns: classify (image classes), detect (boxes: a feature '
                       'pyramid under torchvision\'s FCOS head) or segment (a class per pixel: a semantic FPN head); '
                       'detect/segment without --data-path run the embedded Fashion-MNIST scenes',
                       domain=OneOf('classify', 'detect', 'segment'))
    dataset: str = option('auto', 'fashion_mnist (the embedded default; scenes of its items for --task '
                       'detect/segment), cifar10, cifar100, imagefolder, hf (a Hugging Face datasets data set), coco '
                       '(--task detect: annotations/instances_{train,val}.json + train/, val/), segfolder (--task '
                       'segment: classes.txt + {train,val}/{images,masks}/); auto = hf when --data-path is '
                       'hf-hub:org/name, coco / segfolder for --task detect / segment, imagefolder otherwise, '
                       'fashion_mnist without --data-path',
                       domain=OneOf('auto', 'fashion_mnist', 'cifar10', 'cifar100', 'imagefolder', 'hf', 'coco',
                                    'segfolder'))
    data_path: Optional[str] = option(None, 'ImageFolder root with train/ and val/ (or a torchvision root); with '
                                   '--dataset hf: a Hub id (org/name, hf-hub:org/name), a save_to_disk folder, or '
                                   'parquet files (a folder, a file or a glob)', aliases=('--data-dir',),
                                      domain=OrNone(Text()))
    hf_image_column: Optional[str] = option(None, '--dataset hf: the image column (default: the datasets.Image one, '
                                         'else image or img)', domain=OrNone(Text()))
    hf_label_column: Optional[str] = option(None, '--dataset hf: the label column (default: the ClassLabel one, else '
                                         'label)', domain=OrNone(Text()))
    train_split: str = option('train', '--dataset hf: the training split', domain=Text())
    val_split: str = option('validation', '--dataset hf: the validation split (the default falls back to val, then '
                            'test)', domain=Text())
    num_classes: Optional[int] = option(None, 'expected number of classes (checked against the data and the teacher)',
                                        domain=OrNone(Integer(lo=1)))
    train_subset: Optional[str] = option(None, 'train on a fraction (0.01) or on the files listed in a text file',
                                         domain=OrNone(Text()))
    input_size: Optional[int] = option(None, 'image side: DeiT\'s --input-size 224 or timm\'s C H W (3 224 224, square; '
                                       'the channels are the data\'s) (default: the student\'s / data set\'s)',
                                       aliases=('--img-size',), domain=OrNone(Integer(lo=1)))
    num_workers: Optional[int] = option(None, 'data loader workers per process (default: the cores the process may run '
                                        'on, shared with the other processes of the machine that may too, capped by '
                                        'SLURM_CPUS_PER_TASK, less one; 1 to 16)', aliases=('--workers', '-j'),
                                        domain=OrNone(Integer(lo=0)))
    threads: Optional[int] = option(None, 'CPU threads of each process (default: every core for a single CPU process, '
                                 'else the launcher\'s OMP_NUM_THREADS)', domain=OrNone(Integer(lo=1)))
    cpu_malloc: str = option('tuned', 'CPU runs: tuned = glibc keeps freed activation memory instead of re-faulting it '
                          'each step (vitkd/cpu_malloc.py; the process keeps its peak heap), system = glibc defaults',
                          domain=OneOf('tuned', 'system'))
    skip_corrupt: bool = option(True, 'skip (and count) unreadable images instead of failing (classification; a dense '
                                'data set fails on an unreadable image, naming it)', domain=Bool())
    ignore_index: int = option(255, '--dataset segfolder: the mask value of unlabelled pixels (0..255; the loss and '
                               'mIoU skip them)', domain=Integer(lo=0, hi=255))
    # ---- models ----------------------------------------------------------------------------------------------
    student: str = option('deit_s_distilled', 'timm student (deit_{ti,s,b}_distilled = VkD student, '
                       'deit_*_distilled_patch16_224, any timm model)', aliases=('--model', '--student-model'),
                          domain=Text())
    student_kwargs: dict = option({}, 'timm kwargs for the student, key=value (e.g. depth=4 embed_dim=96)', nargs='*',
                                  aliases=('--model-kwargs',), domain=Kwargs())
    student_pretrained: bool = option(False, 'start the student from its pretrained timm/Hub weights', domain=Bool())
    finetune: Optional[str] = option(None, 'start a new run from these student weights: export folder, run dir, '
                                     'checkpoint, hf-hub:org/name, or a DeiT/timm .pth/.safetensors (with --student); '
                                     'new heads for other classes, position embeddings resampled for another size',
                                     domain=OrNone(Text()))
    drop_path: float = option(0.0, 'stochastic depth rate of the student', domain=Interval(0, 1, hi_open=True))
    pyramid_strides: list = option([4, 8, 16, 32], '--task detect/segment: strides of the student\'s feature pyramid '
                                   '(a ViT makes patch×¼, ×½, ×1, ×2; a CNN teacher\'s stages must have them too)',
                                   nargs='+', domain=ListOf(Integer(lo=1)))
    pyramid_channels: int = option(64, '--task detect/segment: channels of every pyramid level', domain=Integer(lo=1))
    teacher: Optional[str] = option('regnety_160', 'timm name[.tag] (regnety_160 = regnety_160.deit_in1k), '
                                 'hf-hub:org/name, a save_for_hf folder, or a .safetensors file; none = no teacher',
                                    domain=OrNone(Text()))
    teacher_arch: Optional[str] = option(None, 'timm architecture of a bare .safetensors teacher',
                                         domain=OrNone(Text()))
    teacher_kwargs: dict = option({}, 'timm kwargs for the teacher, key=value', nargs='*', domain=Kwargs())
    teacher_pretrained: bool = option(True, 'load the teacher\'s weights (off only for smoke tests)', domain=Bool())
    compile_teacher: bool = option(False, 'torch.compile the teacher\'s forward (inductor; the first batches pay the '
                                   'compilation; --compile compiles teacher and student)', domain=Bool())
    compile_student: bool = option(False, 'torch.compile the trained module (student and methods\' parts; DDP-wrapped '
                                   'on several processes, so all-reduce overlaps the backward) from the first step '
                                   'that leaves no parameter idle; inductor unless the launcher\'s --dynamo_backend '
                                   'says otherwise; evaluation and export stay eager', domain=Bool())
    teacher_cache: Optional[str] = option(None, 'teacher-output cache folder: epochs not cached yet record the '
                                       'teacher\'s logits (fp16) and pooled features (bf16) per sample with their '
                                       'augmentation seeds and checksums, cached epochs replay them without running '
                                       'the teacher (see vitkd/teacher_cache.py, scripts/cache_teacher.py)',
                                       domain=OrNone(Text()))
    teacher_cache_epochs: Optional[int] = option(None, 'distinct epochs of augmentation the cache holds; epoch e '
                                              'uses data epoch e mod this (default: an existing cache\'s, else '
                                              'min(--epochs, 10): the augmentations cycle, bounding the disk)',
                                              domain=OrNone(Integer(lo=1)))
    teacher_cache_topk: int = option(10, 'teacher logits kept per sample (the rest of the probability mass spread '
                                     'uniformly, as TinyViT); >= the number of classes keeps every logit',
                                     domain=Integer(lo=1))
    # ---- distillation ----------------------------------------------------------------------------------------
    distill: list = option(['vkd'], 'methods as name[:weight] (e.g. vkd:1.0 deit_soft:0.5); see --list-losses',
                        nargs='+', domain=ListOf(Either(Text(), Kwargs())))
    loss_opts: list = option([], 'method options as name.key=value (e.g. kd.temperature=2 dkd.warmup_epochs=20)',
                          nargs='*', aliases=('--loss-opt',), domain=ListOf(Text(), min_len=0))
    task_weight: Optional[float] = option(None, 'factor on the task CE (default: product of the methods\' choice)',
                                          domain=OrNone(NonNegative()))
    # ---- schedule and optimisation ---------------------------------------------------------------------------
    epochs: int = option(300, 'training epochs', domain=Integer(lo=1))
    max_steps: Optional[int] = option(None, 'stop after this many optimizer steps', domain=OrNone(Integer(lo=1)))
    time_limit: Optional[float] = option(None, 'stop training after this many seconds (then evaluate and save)',
                                         domain=OrNone(Positive()))
    batch_size: int = option(64, 'batch per process', aliases=('-b',), domain=Integer(lo=1))
    grad_accum_steps: int = option(1, 'gradient accumulation steps', domain=Integer(lo=1))
    opt: str = option('adamw', 'timm optimizer name (create_optimizer_v2)', domain=Text())
    lr: float = option(5e-4, 'base learning rate, scaled by global batch / 512 unless --unscale-lr', domain=Positive())
    unscale_lr: bool = option(False, 'use --lr as is (no linear scaling with the global batch)', domain=Bool())
    weight_decay: float = option(0.05, 'decoupled weight decay (never on norms, biases, tokens, parametrisations)',
                                 domain=NonNegative())
    momentum: float = option(0.9, 'SGD momentum / Adam beta1 where applicable', domain=Interval(0, 1, hi_open=True))
    sched: str = option('cosine', 'timm scheduler name (create_scheduler_v2)', domain=Text())
    min_lr: float = option(1e-5, 'final learning rate of the schedule', domain=NonNegative())
    warmup_epochs: float = option(5, 'linear warm-up epochs', domain=NonNegative())
    warmup_lr: float = option(1e-6, 'learning rate at the start of the warm-up', domain=NonNegative())
    clip_grad: Optional[float] = option(None, 'clip the gradient norm to this value', domain=OrNone(Positive()))
    nan_policy: str = option('stop', 'a non-finite loss or gradient: stop the run, or skip that optimizer step; both '
                             'write <run>/nonfinite_step<N>.json (terms, step, lr, sample indices)',
                             domain=OneOf('stop', 'skip'))
    model_ema: bool = option(False, 'keep an EMA of the student (timm ModelEmaV3), evaluated beside it', domain=Bool())
    model_ema_decay: float = option(0.99996, 'EMA decay', domain=Interval(0, 1))
    mixed_precision: Optional[str] = option(None, 'no, bf16 or fp16 (fp16 needs a GPU); unset = the launcher\'s '
                                            '(accelerate launch --mixed_precision, its config file), else no',
                                            domain=OrNone(OneOf('no', 'bf16', 'fp16')))
    cuda_tf32: bool = option(True, 'CUDA: TF32 tensor cores for the fp32 matmuls and convolutions (10-bit mantissa '
                             'inputs, fp32 accumulation; what autocast leaves in fp32)', domain=Bool())
    cudnn_benchmark: bool = option(True, 'CUDA: cuDNN autotuning (picks the fastest convolution algorithms for the '
                                   'fixed input shapes of a run)', domain=Bool())
    seed: int = option(0, 'random seed (each process adds its rank)',
                       domain=Integer(lo=0, hi=2 ** 32 - 1))  # numpy.random.seed's range
    ddp_find_unused: Optional[bool] = option(None, 'DDP find_unused_parameters for multi-process runs (default: on '
                                          'when some method can leave parameters without gradient in a step)',
                                             domain=OrNone(Bool()))
    # ---- augmentation (timm) ---------------------------------------------------------------------------------
    aa: Optional[str] = option('rand-m9-mstd0.5-inc1', 'RandAugment policy (none to disable)', domain=OrNone(Text()))
    three_augment: bool = option(False, 'DeiT III 3-Augment (grayscale / solarize / blur) instead of RandAugment',
                                        aliases=('--ThreeAugment',), domain=Bool())
    color_jitter: float = option(0.3, 'colour jitter strength', domain=NonNegative())
    scale: list = option([0.08, 1.0], 'RandomResizedCrop scale range', nargs=2, domain=Span(0, 1))
    hflip: float = option(0.5, 'horizontal flip probability', domain=Interval(0, 1))
    scale_jitter: list = option([1.0, 1.0], '--task detect/segment: resize each training image by a factor drawn from '
                                '[LOW, HIGH] (0 < LOW <= HIGH <= 4), then cut or pad it back to its size; boxes and '
                                'masks move with it', nargs=2, domain=Span(0, 4))
    train_interpolation: str = option('bicubic', 'interpolation of the training crops', domain=Text())
    aug_repeats: int = option(1, 'repeated augmentation (DeiT\'s RASampler): each image R times per epoch with its own '
                              'augmentations, the copies on different processes, epoch length unchanged; DeiT uses 3, '
                              '1 = off; --repeated-aug = 3', domain=Integer(lo=1))
    reprob: float = option(0.25, 'random erasing probability', domain=Interval(0, 1))
    remode: str = option('pixel', 'random erasing mode', domain=Text(empty=True))
    recount: int = option(1, 'random erasing count', domain=Integer(lo=1))
    smoothing: float = option(0.1, 'label smoothing', domain=Interval(0, 1, hi_open=True))
    mixup: float = option(0.8, 'mixup alpha (0 = off)', domain=NonNegative())
    cutmix: float = option(1.0, 'cutmix alpha (0 = off)', domain=NonNegative())
    mixup_prob: float = option(1.0, 'probability of mixing a batch', domain=Interval(0, 1))
    mixup_switch_prob: float = option(0.5, 'probability of cutmix instead of mixup', domain=Interval(0, 1))
    mixup_mode: str = option('batch', 'timm Mixup mode', domain=OneOf('batch', 'pair', 'elem'))
    eval_crop_ratio: float = option(0.875, 'centre-crop ratio of the evaluation transform', aliases=('--crop-pct',),
                                    domain=Interval(0, 1, lo_open=True))
    # ---- run -------------------------------------------------------------------------------------------------
    output_dir: Optional[str] = option(None, 'run dir (default output/<student>-<methods>-<time>)',
                                    domain=OrNone(Text()))
    overwrite: bool = option(False, 'reuse an output dir that holds another run', domain=Bool())
    resume: Optional[str] = option(None, 'auto (newest complete checkpoint in the output dir; none yet = start) or a '
                                'checkpoint folder / run dir', domain=OrNone(Text()))
    save_every_steps: Optional[int] = option(None, 'also save a training checkpoint every N optimizer steps',
                                             domain=OrNone(Integer(lo=1)))
    keep_last: int = option(1, 'keep the newest K training checkpoints (checkpoints/best is kept apart, as hard '
                                'links when it is one of them); 1 is enough to resume: a save replaces the previous '
                                'checkpoint only once it is complete', domain=Integer(lo=1))
    log_with: Optional[str] = option(None, 'Accelerate trackers (tensorboard, wandb, mlflow, comet_ml, aim, all) beside '
                                     'the run dir\'s log.jsonl/epochs.csv; the tracker package must be installed',
                                     domain=OrNone(Text()))
    log_every: int = option(50, 'log training terms every N steps (and a progress line when stdout is not a '
                            'terminal)', aliases=('--log-interval',), domain=Integer(lo=1))
    eval_every: int = option(1, 'evaluate every N epochs', domain=Integer(lo=1))
    eval_student: bool = option(False, 'only evaluate --student-ckpt', domain=Bool())
    student_ckpt: Optional[str] = option(None, 'student to evaluate: export folder, checkpoint, .safetensors, hf-hub:id',
                                      domain=OrNone(Text()))
    eval_teacher: bool = option(True, 'report the teacher\'s own accuracy once', domain=Bool())
    push_to_hub: bool = option(False, 'upload the exported student with a model card to the Hugging Face Hub',
                               domain=Bool())
    hub_model_id: Optional[str] = option(None, 'Hub repo org/name for --push-to-hub (default: <you>/<run dir name>)',
                                         domain=OrNone(Text()))
    hub_private: bool = option(False, 'create the Hub repo as private', domain=Bool())
    hub_license: Optional[str] = option(None, 'license of the model card (a Hub license id, e.g. apache-2.0; the '
                                        'student\'s training data and teacher have their own terms); unset = the '
                                        'card says none was given', domain=OrNone(Text()))


EMBEDDED_PRESET = REPO / 'scripts' / 'configs' / 'embedded.yaml'
# the embedded default of each dense task: Fashion-MNIST scenes, the shipped dense teacher
EMBEDDED_DENSE_PRESETS = {task: REPO / 'scripts' / 'configs' / f'embedded_{task}.yaml'
                          for task in ('detect', 'segment')}


def embedded_default(task: str = 'classify') -> dict:
    """The embedded-default preset of ``task`` (``scripts/configs/embedded.yaml``, ``embedded_detect.yaml``,
    ``embedded_segment.yaml``), its teacher path made absolute."""
    preset = EMBEDDED_DENSE_PRESETS.get(task, EMBEDDED_PRESET)
    if not preset.is_file():
        raise ConfigError(f'the embedded default\'s preset {preset} is missing (a vitkd install without its '
                          'shipped files?): reinstall vitkd, or pass --data-path and --teacher')
    values = load_yaml(str(preset))
    values['teacher'] = str(REPO / values['teacher'])
    return values


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text)


def _kv(items) -> dict:
    """key=value strings (the command line's form, also accepted in YAML) or a mapping → a dict."""
    if isinstance(items, dict):
        return dict(items)
    if not isinstance(items, (list, tuple)):
        raise ConfigError(f'expected key=value pairs, got {items!r}')
    out = {}
    for item in items:
        if not isinstance(item, str) or '=' not in item:
            raise ConfigError(f'expected key=value, got {item!r}')
        k, v = item.split('=', 1)
        try:
            out[k.strip()] = _parse_value(v)
        except yaml.YAMLError as e:
            raise ConfigError(f'{item!r}: the value {v!r} is not a YAML value ({str(e).splitlines()[0]}; e.g. 28, '
                              '[28, 28], true, a_name)') from None
    return out


def load_yaml(path: str) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise ConfigError(f'cannot read config {path!r}: {e.strerror}') from None
    except UnicodeDecodeError:
        raise ConfigError(f'config {path!r} is not a text (UTF-8) file') from None
    except yaml.YAMLError as e:
        raise ConfigError(f'config {path!r} is not valid YAML: {str(e).splitlines()[0]}') from None
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ConfigError(f'config {path!r} must be a mapping of option: value (option names as keys)')
    data = {k.replace('-', '_'): v for k, v in data.items()}
    valid = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(data) - valid)
    if unknown:
        hints = [f'{u} (did you mean {m[0]}?)' if (m := difflib.get_close_matches(u, valid, 1)) else u for u in unknown]
        raise ConfigError(f'config {path!r} has unknown keys: {", ".join(hints)}')
    try:
        data = _normalise(data)
        for f in dataclasses.fields(Config):  # a bad value is refused even where the command line overrides it
            if f.name in data:
                check_field(f.name, data[f.name], f.metadata['domain'])
    except ConfigError as e:
        raise ConfigError(f'config {path!r}: {e}') from None
    return data


def config_from_values(cli: dict, yaml_values: dict) -> Config:
    """The Config of the YAML values overridden by the explicitly-set CLI values, not validated yet (the validator,
    :func:`vitkd.validate.validate`, sits above the methods this layer does not know)."""
    explicit = {**yaml_values, **{k: v for k, v in cli.items() if v is not None}}
    if isinstance(explicit.get('data_path'), str) and not explicit['data_path'].strip():
        raise ConfigError('--data-path is empty (an unset shell variable?); give the folder with train/ and val/, or '
                          'leave --data-path out for the embedded Fashion-MNIST')
    dataset, task = explicit.get('dataset', 'auto'), explicit.get('task', 'classify')
    if dataset == 'auto':
        data_path = explicit.get('data_path')
        folder = {'detect': 'coco', 'segment': 'segfolder'}.get(task, 'imagefolder')
        dataset = ('hf' if str(data_path).startswith('hf-hub:') else folder) if data_path else 'fashion_mnist'
    values = embedded_default(task) if dataset == 'fashion_mnist' and not explicit.get('data_path') else {}
    values.update(explicit)
    values['dataset'] = dataset
    values = _normalise(values)
    return Config(**values)


def _normalise(values: dict) -> dict:
    """The command line's spellings that YAML may use too: key=value lists → dicts, a ``distill`` string → its items,
    ``none`` for no teacher / no RandAugment → null."""
    values = dict(values)
    for key in ('student_kwargs', 'teacher_kwargs'):
        if key in values:
            try:
                values[key] = _kv(values[key])
            except ConfigError as e:
                raise ConfigError(f'--{key.replace("_", "-")}: {e}') from None
    if isinstance(values.get('distill'), str):
        values['distill'] = values['distill'].split()
    for key in ('teacher', 'aa'):
        if isinstance(values.get(key), str) and values[key].lower() in ('none', ''):
            values[key] = None
    return values


PRESETS = REPO / 'scripts' / 'configs'


def preset_names() -> list[str]:
    """The presets ``-c NAME`` accepts: the YAML files of ``scripts/configs/`` by stem (``kd++``, ``vkd_deit_s``)."""
    return sorted(path.stem for path in PRESETS.glob('*.yaml'))


def config_path(spec: str) -> str:
    """``-c`` value → a YAML file: an existing path as given, else the preset of that name."""
    if not spec.strip():
        raise ConfigError(f'-c {spec!r}: names no file; give a YAML file or a preset (scripts/configs/): '
                          f'{", ".join(preset_names())}')
    if Path(spec).exists() or spec.endswith(('.yaml', '.yml')) and not (PRESETS / spec).is_file():
        return spec
    name = spec[:-5] if spec.endswith('.yaml') else spec
    if (PRESETS / f'{name}.yaml').is_file():
        return str(PRESETS / f'{name}.yaml')
    raise ConfigError(f'-c {spec!r}: no such file and no preset of that name; presets (scripts/configs/): '
                      f'{", ".join(preset_names())}')


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
