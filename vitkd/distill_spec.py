"""The methods of a run: ``--distill``, ``--loss-opts`` (and DeiT's flags and presets, which stand for them) parsed
once into a typed :class:`DistillSpec` that the build, the validator, the run and the Hub card read.

Every value is checked here against the domain its method declares beside the default (``Annotated[float,
Positive()]`` in the constructor, see :mod:`vitkd.domains`), so a bad value is a one-line usage error (exit 2) naming
where it came from, the method, the option and what is accepted, before anything is built::

    --loss-opts dist.temperature=0: dist's temperature must be a number > 0

This module sits above the loss registry (it needs the methods' options) and below the build.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Collection, Mapping, Optional

import yaml

from .domains import NonNegative, OutOfDomain
from .errors import ConfigError
from .losses import LOSS_REGISTRY, LossSpecError, get_loss_class
from .losses._dense import get_dense_loss_class
from .losses.base import COMMON_OPTIONS, option_domains

__all__ = ['MethodSpec', 'DistillSpec', 'parse_distill', 'method_names', 'check_method_option', 'parse_option_value']

WEIGHT = NonNegative()  # a method's weight: a finite factor >= 0 on its terms


@dataclass(frozen=True)
class MethodSpec:
    """One method of ``--distill``.

    Attributes:
        name: the registered method.
        weight: the factor on its terms, or None when the command gives none (then the method's default for the
            student, :func:`vitkd.build.default_weight`).
        options: its constructor options as given, each inside its declared domain (the rest keep their defaults).
        warmup_epochs: epochs over which its weight ramps up from 0 (None: not given, no ramp).
        head: the student head a logit method reads (its ``head`` option or that option's default); None for methods
            without a head option.
    """
    name: str
    weight: Optional[float]
    options: Mapping[str, Any]
    warmup_epochs: Optional[float] = None
    head: Optional[str] = None

    def shown_options(self) -> dict[str, Any]:
        """The options the command gave, the warm-up included (for logs and the model card)."""
        extra = {} if self.warmup_epochs is None else {'warmup_epochs': self.warmup_epochs}
        return {**self.options, **extra}


@dataclass(frozen=True)
class DistillSpec:
    """The run's methods in ``--distill`` order (the method ``none`` adds no distillation term)."""
    methods: tuple[MethodSpec, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.methods)

    def __iter__(self):
        return iter(self.methods)

    def __len__(self) -> int:
        return len(self.methods)


def _refuse(where: str, name: str, option: str, reason: str) -> ConfigError:
    return ConfigError(f'{where}: {name}\'s {option} must be {reason}')


def parse_option_value(text: str) -> Any:
    """A ``--loss-opts`` value as YAML (``2``, ``true``, ``[1, 2]``, ``null``); number spellings YAML reads as text
    (``1e-4``, ``nan``, ``inf``) become numbers, so the option's domain judges the number, not a string."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f'{text!r} is not a YAML value ({str(e).splitlines()[0]})') from None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def method_class(name: str, task: str = 'classify') -> type:
    """The registered loss class of ``name`` for ``task``: the method itself, or its dense form for detect/segment."""
    return get_loss_class(name) if task == 'classify' else get_dense_loss_class(name)


def check_method_option(name: str, option: str, value: Any, where: str, task: str = 'classify') -> Any:
    """``value`` of ``name``'s ``option`` inside its declared domain (normalised), else a one-line error starting with
    ``where`` (how the command gave it) and naming the method, the option and what is accepted."""
    domains = {**option_domains(method_class(name, task)), **COMMON_OPTIONS}
    if option not in domains:
        raise ConfigError(f'{where}: loss {name!r} has no option {option}; its options: {", ".join(domains)}')
    try:
        return domains[option].check(value)
    except OutOfDomain as e:
        raise _refuse(where, name, option, str(e)) from None


def _known_method(name: Any, item: Any, presets: Collection[str], task: str) -> str:
    if not isinstance(name, str) or not name:
        raise ConfigError(f'--distill {item!r}: a method needs a name (see --list-losses)')
    if name not in LOSS_REGISTRY and name in presets:
        raise ConfigError(f'--distill {name}: {name} is a preset (scripts/configs/{name}.yaml), not a method; run it '
                          f'with -c {name}')
    try:
        cls = method_class(name, task)
    except LossSpecError as e:  # the registry's one line: "unknown loss … (did you mean …?); registered: …"
        raise ConfigError(f'--distill: {e}') from None
    if task == 'detect' and getattr(cls, 'needs_logits', False):
        raise ConfigError(f'--distill {name}: loss {name!r} compares per-pixel class distributions: --task segment '
                          'only (a detector has no class logits per pixel; for detection use fitnet or vkd on the '
                          'pyramid)')
    return name


def _weight(name: str, text: Any, item: Any) -> Optional[float]:
    if text is None or text == '':
        return None
    try:
        weight = float(text) if isinstance(text, str) else text
    except ValueError:
        raise ConfigError(f'--distill {item}: the weight after ":" must be a number, got {text!r}') from None
    try:
        return float(WEIGHT.check(weight))
    except OutOfDomain as e:
        raise _refuse(f'--distill {item}', name, 'weight', str(e)) from None


def _entries(distill: Any, presets: Collection[str], task: str) -> list[tuple[str, Optional[float], dict, str]]:
    """(name, weight, options given with the entry, how to name the entry) of every ``--distill`` item."""
    if isinstance(distill, str):
        distill = distill.split()
    if not isinstance(distill, (list, tuple)) or not distill:
        raise ConfigError(f'--distill takes one or more name[:weight] items (see --list-losses), got {distill!r}')
    entries = []
    for item in distill:
        if isinstance(item, dict):  # YAML form: {name: vkd, weight: 1.0, alpha: 1.0}
            options = dict(item)
            name = _known_method(options.pop('name', None), item, presets, task)
            entries.append((name, _weight(name, options.pop('weight', None), f'{name}'), options, f'--distill {name}'))
        elif isinstance(item, str):
            name, colon, weight = item.partition(':')
            name = _known_method(name, item, presets, task)
            if colon and not weight.strip():
                raise ConfigError(f'--distill {item}: nothing after ":"; give the weight ({name}:0.5) or leave out ":" '
                                  'for the method\'s default weight')
            entries.append((name, _weight(name, weight, item), {}, f'--distill {item}'))
        else:
            raise ConfigError(f'--distill {item!r}: expected name[:weight] or a mapping with a name')
    names = [name for name, *_ in entries]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f'--distill lists {", ".join(twice)} twice: give each method once (options go to '
                          '--loss-opts NAME.OPTION=VALUE)')
    return entries


def method_names(distill: Any, presets: Collection[str] = (), task: str = 'classify') -> list[str]:
    """The method names of a ``--distill`` value (checked: known methods, weights in their domain)."""
    return [name for name, *_ in _entries(distill, presets, task)]


def parse_distill(distill: Any, loss_opts: Any = (), presets: Collection[str] = (),
                  task: str = 'classify') -> DistillSpec:
    """``--distill`` items (``name[:weight]`` strings or YAML mappings) and ``--loss-opts`` items
    (``name.option=value``) → the checked :class:`DistillSpec`; ``presets``: the names ``-c`` accepts, for the hint
    when one is given as a method; ``task``: a dense task checks the methods' dense forms."""
    entries = _entries(distill, presets, task)
    if isinstance(loss_opts, str) or not isinstance(loss_opts, (list, tuple)):
        raise ConfigError(f'--loss-opts takes name.option=value items, got {loss_opts!r}')
    given: dict[str, dict[str, tuple[Any, str]]] = {}
    for name, _, options, where in entries:
        given[name] = {k: (v, f'{where} ({k}: {v!r})') for k, v in options.items()}
    for item in loss_opts:
        if not isinstance(item, str):
            raise ConfigError(f'--loss-opts {item!r}: expected name.option=value')
        key, eq, text = item.partition('=')
        name, dot, option = key.strip().partition('.')
        if not eq or not dot or not option:
            raise ConfigError(f'--loss-opts {item!r}: expected name.option=value')
        if name not in given:
            raise ConfigError(f'--loss-opts {item}: loss {name!r} is not in --distill ({", ".join(given)})')
        try:
            value = parse_option_value(text)
        except ConfigError as e:
            raise ConfigError(f'--loss-opts {item}: {e}') from None
        given[name][option] = (value, f'--loss-opts {item}')
    methods = []
    for name, weight, _, _ in entries:
        options = {option: check_method_option(name, option, value, where, task)
                   for option, (value, where) in given[name].items()}
        warmup = options.pop('warmup_epochs', None)
        parameters = inspect.signature(method_class(name, task).__init__).parameters
        head = options.get('head', parameters['head'].default) if 'head' in parameters else None
        methods.append(MethodSpec(name, weight, options, warmup, head))
    return DistillSpec(tuple(methods))

