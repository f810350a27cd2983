"""A dense run from a config: data, models, losses, optimizer, the epoch's batches, evaluation, ``--eval-student``.

:func:`build_dense_run` returns the same :class:`vitkd.run.Run` as classification, so ``main.py``'s loop, the
checkpoints (``--resume``, ``--save-every-steps``, preemption), the non-finite guard, the logs and the export are
shared. What differs is assembled here: the dense data sets and their loaders, the dense student (a timm backbone
under a detection or segmentation head), a teacher of the same task, the methods' dense forms, and the metrics
(COCO box AP, mIoU).

Evaluation runs the whole validation set on every process (each gets the same numbers; no gather of detections).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional

import timm
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from timm.data import resolve_data_config
from torch.utils.data import DataLoader

from ..build import build_losses, build_optimizer, build_scheduler
from ..config import Config, ConfigError
from ..data import DATASET_STATS, DataSpec, EpochSampler, seed_worker, worker_context
from ..ddp import StepModule, sync_buffers_if_needed
from ..devices import idle_parameters_until_of
from ..distiller import LossEntry
from ..export import CheckpointError, load_student
from ..losses import Batch, RunContext
from ..models import Teacher, create_teacher, set_fused_attention
from ..reports import DENSE_METRICS
from ..run import Run
from ..rundir import eval_output_dir
from ..training import EpochBatches, TrainState
from ..validate import scaled_lr
from .data import (CocoDetectionSource, DenseAugment, DenseDataset, FashionScenes, SegmentationFolderSource,
                   collate_dense, segmentation_classes)
from .distiller import DenseDistiller
from .metrics import coco_box_ap, coco_mask_ap, confusion_matrix, encode_masks, iou_from_confusion
from .models import DENSE_ARCHITECTURES, IGNORE_INDEX, DenseDetector, DenseModel, DenseSegmenter

__all__ = ['build_dense_run', 'DenseEpochBatches', 'evaluate_dense', 'eval_dense_student', 'dense_sources',
           'DEFAULT_DENSE_SIZE', 'BEST_METRIC']

DEFAULT_DENSE_SIZE = 224  # input side without --input-size (the embedded presets use 64)
BEST_METRIC = {'detect': 'mAP', 'segment': 'mIoU'}  # what checkpoints/best keeps the best of


def dense_sources(cfg: Config, size: int, channels: int):
    """(train source, val source, class names) of ``cfg.dataset`` at input side ``size``."""
    if cfg.dataset == 'fashion_mnist':
        train, val = FashionScenes('train', size, cfg.data_path), FashionScenes('val', size, cfg.data_path)
    elif cfg.dataset == 'coco':
        train, val = (CocoDetectionSource(cfg.data_path, split, size, channels) for split in ('train', 'val'))
        if train.classes != val.classes:
            raise ConfigError(f'--data-path {cfg.data_path}: the train and val annotation files list different '
                              'categories')
    else:
        train, val = (SegmentationFolderSource(cfg.data_path, split, size, channels, cfg.ignore_index)
                      for split in ('train', 'val'))
    classes = segmentation_classes(val) if cfg.task == 'segment' else list(val.classes)
    if cfg.num_classes is not None and cfg.num_classes != len(classes):
        raise ConfigError(f'--num-classes {cfg.num_classes} but the data set has {len(classes)} classes')
    return train, val, classes


def _input_channels(cfg: Config) -> int:
    return DATASET_STATS['fashion_mnist']['input_size'][0] if cfg.dataset == 'fashion_mnist' else 3


def build_dense_student(cfg: Config, num_classes: int, in_chans: int, size: int) -> DenseModel:
    """The dense student: ``cfg.student`` (a timm ViT or CNN, ``--student-kwargs`` its kwargs) under the task's
    head, built through timm's registry (so its export records how to rebuild it)."""
    kwargs = dict(backbone=cfg.student, backbone_kwargs=dict(cfg.student_kwargs), num_classes=num_classes,
                  in_chans=in_chans, img_size=size, strides=list(cfg.pyramid_strides),
                  pyramid_channels=cfg.pyramid_channels)
    if cfg.task == 'segment':
        kwargs['ignore_index'] = IGNORE_INDEX
    if cfg.drop_path:
        kwargs['backbone_kwargs'].setdefault('drop_path_rate', cfg.drop_path)
    try:
        return timm.create_model(DENSE_ARCHITECTURES[cfg.task], pretrained=False, **kwargs)
    except TypeError as e:
        raise ConfigError(f'--student {cfg.student} does not accept --student-kwargs {cfg.student_kwargs} ({e})') \
            from None


def build_dense_teacher(cfg: Config, num_classes: int, mean, std) -> Optional[Teacher]:
    """The frozen teacher through the classification loader (a save_for_hf folder, hf-hub:org/name, a weights file
    with --teacher-arch, or a registry name with --teacher-kwargs), input re-normalised from the student's stats."""
    if cfg.teacher is None:
        return None
    teacher = create_teacher(cfg.teacher, num_classes, arch=cfg.teacher_arch, pretrained=cfg.teacher_pretrained,
                             **cfg.teacher_kwargs)
    teacher.set_student_normalization(mean, std)
    return teacher


def _stats(cfg: Config, student: DenseModel) -> tuple[tuple, tuple]:
    """Normalisation: the embedded data's stats, else the backbone's pretrained config's."""
    if cfg.dataset == 'fashion_mnist':
        stats = DATASET_STATS['fashion_mnist']
        return tuple(stats['mean']), tuple(stats['std'])
    body = student.pyramid.vit if student.is_vit else student.pyramid.cnn
    data_cfg = resolve_data_config({}, model=body)
    return tuple(data_cfg['mean']), tuple(data_cfg['std'])


def _loaders(cfg: Config, train: DenseDataset, val: DenseDataset, world_size: int) -> tuple[DataLoader, DataLoader]:
    gen = torch.Generator().manual_seed(cfg.seed)
    sampler = EpochSampler(len(train), cfg.seed, 1, cfg.batch_size, world_size)
    workers = cfg.num_workers if cfg.num_workers is not None else 0
    cuda = torch.cuda.is_available()
    loader_kwargs = dict(num_workers=workers, pin_memory=cuda, multiprocessing_context=worker_context(workers),
                         collate_fn=collate_dense)
    train_loader = DataLoader(train, cfg.batch_size, sampler=sampler, drop_last=True, generator=gen,
                              worker_init_fn=seed_worker, persistent_workers=workers > 0, **loader_kwargs)
    if len(train_loader) == 0:
        raise ConfigError(f'--batch-size {cfg.batch_size} is larger than the training set ({len(train)} images)')
    val_loader = DataLoader(val, max(1, int(1.5 * cfg.batch_size)), shuffle=False, **loader_kwargs)
    return train_loader, val_loader


def _check_student_input(student: DenseModel, input_size, what: str) -> None:
    """One eval-mode pass of a [2, C, S, S] zero batch: a backbone that cannot take the data's images fails here in
    one line."""
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad():
            student.forward_head(student.forward_pyramid(torch.zeros(2, *input_size)))
    except (RuntimeError, ValueError, AssertionError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f'{what} cannot take the data\'s {"×".join(map(str, input_size))} images ({first}); check '
                          '--input-size, --pyramid-strides and the kwargs (img_size, patch_size, in_chans)') from None
    finally:
        student.train(was_training)


def build_dense_run(cfg: Config, accelerator: Accelerator, entries: Optional[list[LossEntry]] = None):
    """Data, models, losses, optimizer and schedule of a dense run, on the accelerator's device and prepared."""
    if entries is None:
        entries = build_losses(cfg)
    for e in entries:
        e.weight_given = True  # dense forms have no ViT-specific default weight: an unset weight is 1
    set_seed(cfg.seed)
    size = cfg.input_size or DEFAULT_DENSE_SIZE
    channels = _input_channels(cfg)
    train_source, val_source, classes = dense_sources(cfg, size, channels)
    student = build_dense_student(cfg, len(classes), channels, size)
    input_size = (channels, size, size)
    _check_student_input(student, input_size, f'student {cfg.student}')
    mean, std = _stats(cfg, student)
    augment = DenseAugment(cfg.hflip, cfg.scale_jitter)
    train = DenseDataset(train_source, cfg.task, mean, std, augment)
    val = DenseDataset(val_source, cfg.task, mean, std, instance_masks=True)
    train_loader, val_loader = _loaders(cfg, train, val, accelerator.num_processes)
    spec = DataSpec(num_classes=len(classes), input_size=input_size, mean=mean, std=std, classes=classes)
    teacher = build_dense_teacher(cfg, len(classes), mean, std)
    device = accelerator.device
    if device.type == 'cpu':  # CPU flash-attention backward is slow (bf16) or no faster (fp32)
        set_fused_attention(student, False)
    student.to(device)
    if teacher is not None:
        teacher.to(device)
        if accelerator.mixed_precision in ('bf16', 'fp16'):
            teacher.cast(torch.bfloat16 if accelerator.mixed_precision == 'bf16' else torch.float16)
        if cfg.compile_teacher:
            teacher.compile()
    distiller = DenseDistiller(student, teacher, entries, input_size, task_weight=cfg.task_weight).to(device)
    distiller.prepare_for_run(RunContext(cfg=cfg, teacher=teacher, spec=spec, accelerator=accelerator,
                                         train_data=DenseDataset(train_source, cfg.task, mean, std)))
    set_seed(cfg.seed + accelerator.process_index)
    steps_per_epoch = max(1, len(train_loader) // (accelerator.num_processes * cfg.grad_accum_steps))
    global_batch = cfg.batch_size * accelerator.num_processes * cfg.grad_accum_steps
    lr = scaled_lr(cfg, global_batch)
    optimizer = build_optimizer(cfg, distiller, lr, fused=device.type == 'cuda')
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    distiller, optimizer = accelerator.prepare(distiller, optimizer)
    sync_buffers_if_needed(distiller)  # DDP settings and why: vitkd.ddp
    train_loader = accelerator.prepare_data_loader(train_loader, device_placement=False)
    unwrapped = accelerator.unwrap_model(distiller, keep_torch_compile=False)
    data_config = dict(input_size=input_size, mean=mean, std=std, crop_pct=1.0, interpolation='bilinear')

    def evaluate_student(model: torch.nn.Module) -> dict:
        return evaluate_dense(model, val_loader, accelerator, classes)

    def evaluate_teacher() -> dict:
        metrics = evaluate_dense(teacher.model, val_loader, accelerator, classes, prepare=teacher.prepare_input)
        return {f'teacher_{k}': v for k, v in metrics.items()}

    return Run(student=unwrapped.student, teacher=teacher, distiller=distiller, distiller_unwrapped=unwrapped,
               optimizer=optimizer, scheduler=scheduler, train_loader=train_loader,
               batches=DenseEpochBatches(train_loader, accelerator, cfg.epochs, cfg.log_every),
               val_loader=val_loader, spec=spec, state=TrainState(max_steps=cfg.max_steps), ema=None, lr=lr,
               global_batch=global_batch, steps_per_epoch=steps_per_epoch,
               student_params=sum(p.numel() for p in unwrapped.student.parameters()), data_config=data_config,
               evaluate_student=evaluate_student, evaluate_teacher=evaluate_teacher,
               best_metric=BEST_METRIC[cfg.task],
               step_module=StepModule(accelerator, idle_parameters_until_of(cfg, entries)))


class DenseEpochBatches(EpochBatches):
    """The dense training loader as the step consumes it: :class:`vitkd.losses.Batch` on the device (the task's
    targets, no labels, no mixup, no teacher cache); the epoch order, the per-sample augmentation seeds and a
    resumed epoch's skipped batches are those of :class:`vitkd.training.EpochBatches`."""

    def __init__(self, loader, accelerator, epochs: int = 1, log_every: int = 50):
        super().__init__(loader, accelerator, mixer=None, teacher_cache=None, epochs=epochs, log_every=log_every)

    def _batches(self, state: TrainState) -> Iterator[tuple[int, Batch]]:
        device, num_batches = self.accelerator.device, len(self.loader)
        if hasattr(self.loader, 'set_epoch'):
            self.loader.set_epoch(state.epoch)
        first = state.batches_done
        loader = self.accelerator.skip_first_batches(self.loader, first) if first else self.loader
        for it, (images, targets, index) in enumerate(loader, start=first):
            if isinstance(targets, torch.Tensor):
                targets = targets.to(device, non_blocking=True)
            else:
                targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
            yield it, Batch(images=images.to(device, non_blocking=True), targets=targets,
                            index=index.to(device, non_blocking=True), host_index=index.numpy(),
                            progress=state.epoch + it / max(1, num_batches), step=state.step)

    def corrupt_images(self) -> Optional[int]:
        return None  # dense data sets fail on an unreadable image instead of skipping it


@torch.no_grad()
def evaluate_dense(model: DenseModel, loader: DataLoader, accelerator: Accelerator, classes: list[str],
                   prepare=None) -> dict:
    """COCO box AP (detection) or mIoU / pixel accuracy / per-class IoU (segmentation) of ``model`` on ``loader``.

    Args:
        model: the dense model (put in eval mode for the pass, its mode restored after).
        loader: the validation loader (host batches of ``(images, targets, index)``).
        accelerator: device and autocast.
        classes: the class names.
        prepare: maps the student-normalised images to the model's input (a teacher's re-normalisation).

    Returns:
        ``{'mAP', 'AP50', 'AP75', 'images'}`` (with ``mask_mAP``, ``mask_AP50``, ``mask_AP75`` when the validation
        set has instance masks and the model predicts them: torchvision's ``masks`` output) or
        ``{'mIoU', 'pixel_acc', 'iou_<class>' …, 'images'}``.
    """
    was_training = model.training
    model.eval()
    device = accelerator.device
    detector = isinstance(model, DenseDetector)
    confusion = torch.zeros(len(classes), len(classes), dtype=torch.int64, device=device)
    ground_truth, detections, images_seen = [], [], 0
    for images, targets, _ in loader:
        images = images.to(device, non_blocking=True)
        inputs = prepare(images) if prepare is not None else images
        with accelerator.autocast():
            outputs = model(inputs)
        images_seen += images.shape[0]
        if detector:
            ground_truth += [_with_rle(t) for t in targets]
            detections += [_with_rle({k: v.float().cpu() for k, v in d.items()}) for d in outputs]
        else:
            confusion += confusion_matrix(outputs.argmax(1), targets.to(device), len(classes), IGNORE_INDEX)
    model.train(was_training)
    if detector:
        metrics = coco_box_ap(ground_truth, detections, classes)
        if ground_truth and all('masks' in t for t in ground_truth) and all('masks' in d for d in detections):
            metrics.update(coco_mask_ap(ground_truth, detections, classes))  # a model that predicts masks
        return {**metrics, 'images': images_seen}
    result = iou_from_confusion(confusion, classes)
    per_class = {f'iou_{name}': v for name, v in result['iou'].items() if v is not None}
    return {'mIoU': result['mIoU'], 'pixel_acc': result['pixel_acc'], **per_class, 'images': images_seen}


def _with_rle(instances: dict) -> dict:
    """A target's or a detection's instance masks as COCO RLE (kept over the validation set at a few bytes each,
    not S² per instance)."""
    if 'masks' not in instances:
        return instances
    return {**instances, 'masks': encode_masks(instances['masks'])}


def eval_dense_student(cfg: Config, accelerator: Accelerator) -> int:
    """``--eval-student`` of a dense model (an export folder, a checkpoint, a run dir, hf-hub:org/name): its metrics
    on the validation set at its recorded input size and normalisation; writes ``eval_student.json``."""
    if not cfg.student_ckpt:
        raise ConfigError('--eval-student needs --student-ckpt (an exported folder, a checkpoint folder, a run dir or '
                          'hf-hub:org/name)')
    model, pretrained_cfg, source = load_student(cfg.student_ckpt, cfg)
    if not isinstance(model, DenseDetector if cfg.task == 'detect' else DenseSegmenter):
        raise CheckpointError(f'{source} is not a {DENSE_ARCHITECTURES[cfg.task]} (a --task {cfg.task} export); '
                              'evaluate it with the --task it was trained for')
    channels, size = model.in_chans, model.img_size
    _, val_source, classes = dense_sources(cfg, size, channels)
    if model.num_classes != len(classes):
        raise CheckpointError(f'{source} predicts {model.num_classes} classes, the validation set has {len(classes)}')
    mean = tuple(pretrained_cfg.get('mean') or _stats(cfg, model)[0])
    std = tuple(pretrained_cfg.get('std') or _stats(cfg, model)[1])
    val = DenseDataset(val_source, cfg.task, mean, std, instance_masks=True)
    loader = DataLoader(val, max(1, int(1.5 * cfg.batch_size)), shuffle=False, collate_fn=collate_dense,
                        num_workers=cfg.num_workers or 0)
    if accelerator.device.type == 'cpu':
        set_fused_attention(model, False)
    metrics = evaluate_dense(model.to(accelerator.device), loader, accelerator, classes)
    out_dir = Path(cfg.output_dir or eval_output_dir(cfg))
    report = dict(student_ckpt=cfg.student_ckpt, source=source, task=cfg.task, dataset=cfg.dataset,
                  data_path=cfg.data_path, num_classes=model.num_classes, input_size=[channels, size, size],
                  processes=accelerator.num_processes, metrics=metrics)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / 'eval_student.json').write_text(json.dumps(report, indent=2) + '\n')
    shown = ', '.join(f'{k} {metrics[k]:.2f}' for k in DENSE_METRICS if k in metrics)
    accelerator.print(f'student {source} on {metrics["images"]} {cfg.dataset} validation images: {shown}')
    accelerator.print(f'wrote {out_dir / "eval_student.json"}')
    accelerator.end_training()
    return 0
