"""``--eval-student``: a classification student that a run exported (or any timm model in timm's format), measured on
the validation set as training measured it."""
from __future__ import annotations

import json
from pathlib import Path

from accelerate import Accelerator
from timm.data import create_transform

from .build import build_eval_loader, eval_data_config, student_data_spec
from .config import Config, ConfigError
from .data import build_eval_dataset
from .evaluation import evaluate
from .export import CheckpointError, load_student
from .hf_data import HFOptions
from .models import set_fused_attention
from .rundir import eval_output_dir

__all__ = ['eval_student']


def eval_student(cfg: Config, accelerator: Accelerator) -> int:
    """--eval-student: top-1/top-5 of the cls head, the dist head and their average for ``--student-ckpt``.

    The student loads strictly (:func:`vitkd.export.load_student`); the preprocessing is the one recorded in
    its config.json (else the data set's / the student's, as in training). Prints a table and writes
    ``eval_student.json`` in the output dir. On N processes each validation sample is counted once.
    """
    if not cfg.student_ckpt:
        raise ConfigError('--eval-student needs --student-ckpt (an exported folder, a checkpoint folder, a run dir, '
                          'a .safetensors file with --student, or hf-hub:org/name)')
    val = build_eval_dataset(cfg.dataset, cfg.data_path, None, cfg.skip_corrupt,  # transform set below
                             hf=HFOptions.from_config(cfg))
    model, pretrained_cfg, source = load_student(cfg.student_ckpt, cfg, num_classes=len(val.classes))
    if model.num_classes != len(val.classes):
        raise CheckpointError(f'student {source} has a {model.num_classes}-way head, the validation set '
                              f'{len(val.classes)} classes')
    if {'input_size', 'mean', 'std'} <= set(pretrained_cfg):
        data_config = {k: pretrained_cfg[k] for k in ('input_size', 'mean', 'std', 'crop_pct', 'interpolation')
                       if k in pretrained_cfg}
    else:
        input_size, mean, std, _ = student_data_spec(cfg, model)
        data_config = eval_data_config(cfg, input_size, mean, std)
    val.dataset.transform = create_transform(tuple(data_config['input_size']), is_training=False,
                                             crop_pct=data_config.get('crop_pct', cfg.eval_crop_ratio),
                                             interpolation=data_config.get('interpolation', 'bicubic'),
                                             mean=tuple(data_config['mean']), std=tuple(data_config['std']))
    loader = build_eval_loader(val, cfg)
    loader = accelerator.prepare(loader)
    if accelerator.device.type == 'cpu':  # the attention path training evaluated with (build_run): the same numbers
        set_fused_attention(model, False)
    metrics = evaluate(model.to(accelerator.device), loader, accelerator)
    out_dir = Path(cfg.output_dir or eval_output_dir(cfg))
    report = dict(student_ckpt=cfg.student_ckpt, source=source, architecture=getattr(model, 'pretrained_cfg', {})
                  .get('architecture', type(model).__name__), num_classes=model.num_classes, dataset=cfg.dataset,
                  data_path=cfg.data_path, data_config={k: list(v) if isinstance(v, tuple) else v
                                                         for k, v in data_config.items()},
                  processes=accelerator.num_processes, metrics=metrics)
    rows = [f'{"":<6}{"top-1":>8}{"top-5":>8}'] + [f'{h:<6}{metrics[f"{h}_top1"]:>8.2f}{metrics[f"{h}_top5"]:>8.2f}'
                                                   for h in ('cls', 'dist', 'avg') if f'{h}_top1' in metrics]
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / 'eval_student.json').write_text(json.dumps(report, indent=2) + '\n')
    accelerator.print(f'student {source} on {metrics["samples"]} {cfg.dataset} validation images\n' + '\n'.join(rows))
    accelerator.print(f'wrote {out_dir / "eval_student.json"}')
    accelerator.wait_for_everyone()  # every process leaves together: none tears the group down under another
    accelerator.end_training()
    return 0
