"""Dense tasks (detection, semantic segmentation): the dense members of the data, models, metrics and run layers.

``python main.py --task segment`` / ``--task detect`` trains a ViT student with a simple feature pyramid and a
torchvision FCOS head (detection) or a light FPN-style head (segmentation), distilled from a frozen CNN teacher of
the same form, through the same loss registry, ``--distill`` spec, loop, checkpoints and export as classification.
"""
