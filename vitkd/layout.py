"""The names of a run dir's files and folders, for every module that writes or reads them.

A run dir holds ``config.yaml`` (:data:`RUN_MARKER`: the dir holds a run), ``checkpoints/step_N/`` (complete when
:data:`STATE_FILE` is written) and ``student/`` (:data:`STUDENT_DIR`: the student in timm's format, weights in
:data:`MODEL_FILE`); each checkpoint has a ``student/`` of its own. :mod:`vitkd.checkpoint` writes the checkpoints,
:mod:`vitkd.export` the student exports and reads all three kinds back, :mod:`vitkd.rundir` guards the dir.
"""

__all__ = ['RUN_MARKER', 'CHECKPOINTS', 'STATE_FILE', 'STUDENT_DIR', 'MODEL_FILE']

RUN_MARKER = 'config.yaml'
CHECKPOINTS = 'checkpoints'
STATE_FILE = 'trainer_state.json'
STUDENT_DIR = 'student'
MODEL_FILE = 'model.safetensors'
