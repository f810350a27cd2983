"""The accepted values of an option, declared beside its default.

A method's constructor states each option's domain in its annotation, and a Config field in its metadata::

    temperature: Annotated[float, Positive()] = 4.0
    head: Annotated[str, OneOf(*HEADS)] = 'auto'
    lr: float = option(5e-4, 'base learning rate', domain=Positive())

One validator (:mod:`vitkd.validate`) reads them: ``domain.check(value)`` returns the value (as the option uses it)
or raises :class:`OutOfDomain`, whose message is what the value must be (``domain.describe()``, e.g. "a number > 0",
"one of auto, dist, cls, avg"); the validator adds which option of which method, and the value. Numbers refuse
booleans, strings, NaN and infinities; integers refuse fractions and, without an upper bound of their own, counts
beyond a C int (they overflow index arithmetic long before they mean anything). This module sits at the bottom: it
imports nothing from vitkd.
"""
from __future__ import annotations

import math
from typing import Any, Optional

__all__ = ['Domain', 'OutOfDomain', 'Real', 'Positive', 'NonNegative', 'Interval', 'Finite', 'Integer', 'OneOf',
           'Bool', 'Text', 'OrNone', 'Either', 'ListOf', 'Span', 'Kwargs', 'MAX_INT']

MAX_INT = 2 ** 31 - 1  # the largest count an option without an upper bound accepts


class OutOfDomain(ValueError):
    """A value outside its domain; the message completes "must be …" (e.g. "a number > 0")."""


class Domain:
    """The set of values an option accepts."""

    def check(self, value: Any) -> Any:
        """``value`` as the option uses it, or :class:`OutOfDomain` naming what is accepted."""
        raise NotImplementedError

    def describe(self) -> str:
        """What the option accepts, as a phrase that completes "must be …"."""
        raise NotImplementedError

    def edges(self) -> list:
        """Values on and just beyond the boundary of the domain (the fuzz test drives every option with them)."""
        return []

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self.describe()!r})'

    def _refuse(self) -> None:
        raise OutOfDomain(self.describe())


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _g(x: float) -> str:
    return str(x) if isinstance(x, int) else f'{x:g}'


class Real(Domain):
    """A finite number, optionally bounded: ``lo``/``hi`` inclusive unless ``lo_open``/``hi_open``."""

    def __init__(self, lo: Optional[float] = None, hi: Optional[float] = None, lo_open: bool = False,
                 hi_open: bool = False, kind: str = 'a number'):
        self.lo, self.hi, self.lo_open, self.hi_open, self.kind = lo, hi, lo_open, hi_open, kind

    def contains(self, value: Any) -> bool:
        if not _is_number(value) or not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

    def check(self, value: Any) -> Any:
        if not self.contains(value):
            self._refuse()
        return value

    def describe(self) -> str:
        if self.lo is not None and self.hi is not None:
            return (f'{self.kind} in {"(" if self.lo_open else "["}{_g(self.lo)}, '
                    f'{_g(self.hi)}{")" if self.hi_open else "]"}')
        if self.lo is not None:
            return f'{self.kind} {">" if self.lo_open else ">="} {_g(self.lo)}'
        if self.hi is not None:
            return f'{self.kind} {"<" if self.hi_open else "<="} {_g(self.hi)}'
        return f'a finite {self.kind.split()[-1]}'

    def edges(self) -> list:
        out = []
        for bound in (self.lo, self.hi):
            if bound is not None:
                out += [bound, bound - 0.5, bound + 0.5]
        return out


def Positive() -> Real:
    """A number > 0."""
    return Real(lo=0, lo_open=True)


def NonNegative() -> Real:
    """A number >= 0 (0 usually means off)."""
    return Real(lo=0)


def Interval(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Real:
    """A number between ``lo`` and ``hi`` (closed unless an end is open)."""
    return Real(lo, hi, lo_open, hi_open)


def Finite() -> Real:
    """Any finite number."""
    return Real()


class Integer(Real):
    """An integer (not a bool, not a fraction) within ``lo``/``hi`` (inclusive); without ``hi``, within the C int
    range."""

    def __init__(self, lo: Optional[int] = None, hi: Optional[int] = None):
        super().__init__(lo, hi, kind='an integer')
        self.cap = MAX_INT if hi is None else max(abs(hi), abs(lo or 0))

    def contains(self, value: Any) -> bool:
        return isinstance(value, int) and abs(value) <= self.cap and super().contains(value)

    def check(self, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > self.cap and super().contains(value):
            raise OutOfDomain(f'{self.describe()} and at most {self.cap}')
        return super().check(value)

    def describe(self) -> str:
        return 'an integer' if self.lo is None and self.hi is None else super().describe()

    def edges(self) -> list:
        out = []
        for bound in (self.lo, self.hi):
            if bound is not None:
                out += [bound, bound - 1, bound + 1]
        return out + [self.cap + 1, 1.5]


class OneOf(Domain):
    """One of a fixed set of names (or numbers: equal and of the same type, so ``True`` is not ``1``)."""

    def __init__(self, *names: Any):
        self.names = tuple(names)

    def check(self, value: Any) -> Any:
        if not any(type(value) is type(name) and value == name for name in self.names):
            self._refuse()
        return value

    def describe(self) -> str:
        return f'one of {", ".join(map(str, self.names))}'

    def edges(self) -> list:
        return [*self.names, f'{self.names[0]}_', '']


class Bool(Domain):
    """true or false (YAML spells them true/false, yes/no, on/off)."""

    def check(self, value: Any) -> Any:
        if not isinstance(value, bool):
            self._refuse()
        return value

    def describe(self) -> str:
        return 'true or false'

    def edges(self) -> list:
        return [True, False, 0, 1]


class Text(Domain):
    """A string: a name or a path, non-empty unless ``empty`` (what it names is checked where it is used)."""

    def __init__(self, empty: bool = False):
        self.empty = empty

    def check(self, value: Any) -> Any:
        if not isinstance(value, str) or not (self.empty or value.strip()):
            self._refuse()
        return value

    def describe(self) -> str:
        return 'a string' if self.empty else 'a non-empty string'

    def edges(self) -> list:
        return ['x', ' ', '']


class OrNone(Domain):
    """``inner`` or null (unset: the method chooses)."""

    def __init__(self, inner: Domain):
        self.inner = inner

    def check(self, value: Any) -> Any:
        if value is None:
            return None
        try:
            return self.inner.check(value)
        except OutOfDomain:
            self._refuse()

    def describe(self) -> str:
        return f'{self.inner.describe()}, or null'

    def edges(self) -> list:
        return [None, *self.inner.edges()]


class Either(Domain):
    """A value that one of ``domains`` accepts (the first that does normalises it)."""

    def __init__(self, *domains: Domain):
        self.domains = domains

    def check(self, value: Any) -> Any:
        for domain in self.domains:
            try:
                return domain.check(value)
            except OutOfDomain:
                pass
        self._refuse()

    def describe(self) -> str:
        return ' or '.join(d.describe() for d in self.domains)

    def edges(self) -> list:
        return [e for d in self.domains for e in d.edges()]


class ListOf(Domain):
    """A list of items of one domain (a YAML list, or ``[a, b]`` in ``--loss-opts``) with ``min_len`` to ``max_len``
    items; ``scalar``: a lone item stands for a list of one."""

    def __init__(self, item: Domain, min_len: int = 1, max_len: Optional[int] = None, scalar: bool = False):
        self.item, self.min_len, self.max_len, self.scalar = item, min_len, max_len, scalar

    def check(self, value: Any) -> Any:
        if self.scalar and not isinstance(value, (list, tuple)) and self.min_len <= 1:
            try:
                return self.item.check(value)
            except OutOfDomain:
                self._refuse()
        if not isinstance(value, (list, tuple)) or not self.min_len <= len(value) <= (self.max_len or len(value)):
            self._refuse()
        try:
            return type(value)(self.item.check(v) for v in value)
        except OutOfDomain:
            self._refuse()

    def describe(self) -> str:
        if self.max_len == self.min_len:
            count = f'a list of {self.min_len} {"value" if self.min_len == 1 else "values"}'
        elif self.max_len is not None:
            count = f'a list of {self.min_len} to {self.max_len} values'
        else:
            count = {0: 'a list', 1: 'a non-empty list'}.get(self.min_len, f'a list of at least {self.min_len} values')
        lone = f'{self.item.describe()}, or ' if self.scalar and self.min_len <= 1 else ''
        return f'{lone}{count}, each {self.item.describe()}'

    def edges(self) -> list:
        inner = self.item.edges()
        sizes = {max(self.min_len - 1, 0), self.min_len, self.max_len if self.max_len is not None else self.min_len + 1,
                 (self.max_len or self.min_len) + 1}
        return [[inner[0] if inner else 0] * n for n in sorted(sizes)] + [[e] * max(self.min_len, 1) for e in inner]


class Span(Domain):
    """Two numbers LOW HIGH with ``lo`` < LOW <= HIGH <= ``hi`` (a range such as a crop's area fraction)."""

    def __init__(self, lo: float, hi: float):
        self.lo, self.hi = lo, hi

    def check(self, value: Any) -> Any:
        if (not isinstance(value, (list, tuple)) or len(value) != 2 or not all(_is_number(v) for v in value)
                or not all(math.isfinite(v) for v in value) or not self.lo < value[0] <= value[1] <= self.hi):
            self._refuse()
        return value

    def describe(self) -> str:
        return f'two numbers LOW HIGH with {_g(self.lo)} < LOW <= HIGH <= {_g(self.hi)}'

    def edges(self) -> list:
        return [[self.lo, self.hi], [self.hi, self.hi], [self.hi, self.lo], [self.lo]]


class Kwargs(Domain):
    """A mapping of keyword arguments: Python-identifier keys, any values."""

    def check(self, value: Any) -> Any:
        if not isinstance(value, dict) or not all(isinstance(k, str) and k.isidentifier() for k in value):
            self._refuse()
        return value

    def describe(self) -> str:
        return 'key=value pairs with Python-identifier keys'

    def edges(self) -> list:
        return [{}, {'depth': 2}, {'1x': 2}, ['x']]
