"""The search space of a sweep.

Parameters come from `hydra.sweeper.params` (a mapping per parameter, or Hydra's sweep syntax as a
string) and from sweep overrides on the command line (`a=1,2`, `choice(...)`, `range(...)`,
`interval(...)`, `tag(log, interval(...))`, read the way hydra-optuna-sweeper reads them, except
that `range` keeps Hydra's exclusive stop and `interval` always samples floats).

A parameter may carry `when:`, a Python expression over parameters declared before it and over
the composed config (e.g. `"model.n_heads > 0"`); the parameter is sampled only when it holds.
`hydra.sweeper.constraints` are expressions every sampled combination must satisfy. Expressions
see dotted names (`model.window`) and the builtins abs/min/max/len/round; they come from the
experiment's own config, which Hydra already trusts to name classes to instantiate.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass
from types import CodeType
from typing import Any, Mapping, Sequence, Union

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from omegaconf import DictConfig, ListConfig, OmegaConf

PARAMS_KEY = "hydra.sweeper.params"
CONSTRAINTS_KEY = "hydra.sweeper.constraints"
PARAM_TYPES = ("categorical", "int", "float")
_ALLOWED_FIELDS = {
    "categorical": {"type", "choices", "when"},
    "int": {"type", "low", "high", "step", "log", "when"},
    "float": {"type", "low", "high", "step", "log", "when"},
}
_EXPRESSION_BUILTINS: dict[str, Any] = {"abs": abs, "min": min, "max": max, "len": len, "round": round}
_PLAIN_STRING = re.compile(r"[A-Za-z_][\w\-./]*")
_RESERVED_WORDS = {"true", "false", "null", "nan", "inf"}


class SweepConfigError(ValueError):
    """A malformed `hydra.sweeper.*` setting; the message names the key."""


class SearchSpaceError(SweepConfigError):
    """A malformed `hydra.sweeper.params` / `hydra.sweeper.constraints` entry."""


class _InactiveReference(Exception):
    """An expression read a parameter that this trial does not sample."""


@dataclass(frozen=True)
class Expression:
    """A compiled `when:` / constraint expression; `config_key` names it in errors."""

    source: str
    config_key: str
    code: CodeType
    names: tuple[str, ...]  # dotted names it reads, e.g. ("model.n_heads",)

    @classmethod
    def compile(cls, source: Any, config_key: str) -> Expression:
        if not isinstance(source, str) or not source.strip():
            raise SearchSpaceError(f"{config_key} must be a non-empty expression string, got {source!r}")
        try:
            tree = ast.parse(source.strip(), mode="eval")
        except SyntaxError as error:
            raise SearchSpaceError(f"{config_key}: invalid expression {source!r}: {error.msg}") from None
        names = tuple(sorted(_dotted_names(tree) - _EXPRESSION_BUILTINS.keys()))
        return cls(source.strip(), config_key, compile(tree, config_key, "eval"), names)

    def evaluate(self, values: Mapping[str, Any], inactive: set[str], config: DictConfig) -> Any:
        scope = _Scope("", values, inactive, config, self)
        try:
            return eval(self.code, {"__builtins__": _EXPRESSION_BUILTINS}, scope)  # noqa: S307
        except (_InactiveReference, SearchSpaceError):
            raise
        except Exception as error:
            raise SearchSpaceError(
                f"{self.config_key}: evaluating {self.source!r} failed: {type(error).__name__}: {error}"
            ) from error


@dataclass(frozen=True)
class CategoricalParam:
    name: str
    choices: tuple[Any, ...]
    override_key: str
    when: Expression | None = None


@dataclass(frozen=True)
class IntParam:
    name: str
    low: int
    high: int
    override_key: str
    step: int = 1
    log: bool = False
    when: Expression | None = None


@dataclass(frozen=True)
class FloatParam:
    name: str
    low: float
    high: float
    override_key: str
    step: float | None = None
    log: bool = False
    when: Expression | None = None


ParamSpec = Union[CategoricalParam, IntParam, FloatParam]


@dataclass(frozen=True)
class SearchSpace:
    params: tuple[ParamSpec, ...]  # in sampling order
    constraints: tuple[Expression, ...] = ()

    def check_names(self, config: DictConfig) -> None:
        """Fail before the first trial if an expression reads a name that nothing defines."""
        declared = {param.name for param in self.params}
        expressions = [p.when for p in self.params if p.when is not None] + list(self.constraints)
        for expression in expressions:
            for name in expression.names:
                if name in declared or any(key.startswith(name + ".") for key in declared):
                    continue
                if _select(config, name, expression) is _ABSENT:
                    raise SearchSpaceError(
                        f"{expression.config_key}: {expression.source!r} reads '{name}', which is "
                        f"neither a parameter in {PARAMS_KEY} nor a key of the composed config"
                    )

    def sample(self, trial: optuna.Trial, config: DictConfig) -> dict[str, Any]:
        """Suggest every parameter whose `when:` holds; returns {name: value} of the active ones."""
        values: dict[str, Any] = {}
        inactive: set[str] = set()
        for param in self.params:
            if param.when is not None and not _holds(param.when, values, inactive, config):
                inactive.add(param.name)
                continue
            values[param.name] = _suggest(trial, param)
        return values

    def violated_constraints(self, values: Mapping[str, Any], config: DictConfig) -> list[str]:
        """Constraints the sampled values break; one that reads an inactive parameter does not apply."""
        inactive = {p.name for p in self.params if p.name not in values}
        violated = []
        for constraint in self.constraints:
            try:
                if not constraint.evaluate(values, inactive, config):
                    violated.append(f"violates {constraint.config_key}: {constraint.source!r}")
            except _InactiveReference:
                continue
        return violated

    def first_overrides(self) -> list[str]:
        """Every parameter at its first value (a choice's first, a range's low) as an override."""
        return [f"{p.override_key}={override_value(p.choices[0] if isinstance(p, CategoricalParam) else p.low)}"
                for p in self.params]

    def override_key(self, name: str) -> str:
        return next(p.override_key for p in self.params if p.name == name)

    def grid(self) -> dict[str, list[Any]]:
        """The finite value list of every parameter, for Optuna's GridSampler."""
        return {param.name: _grid_values(param) for param in self.params}


def build_search_space(
    params: Mapping[str, Any],
    constraints: Sequence[str],
    sweep_overrides: Sequence[Override],
    fixed_keys: set[str],
) -> SearchSpace:
    """Parse `hydra.sweeper.params` + command-line sweep overrides into a SearchSpace.

    Command-line sweeps replace a configured parameter of the same name; a fixed command-line
    override (`model.n_heads=4`) removes it from the search, like hydra-optuna-sweeper does.
    """
    if not isinstance(params, Mapping):
        raise SearchSpaceError(f"{PARAMS_KEY} must be a mapping of parameter name → spec, got {params!r}")
    specs: dict[str, ParamSpec] = {}
    for key, spec in params.items():
        specs[_param_name(str(key))] = parse_param(str(key), spec)
    for override in sweep_overrides:
        param = _param_from_override(override, f"the command-line override '{override.input_line}'")
        specs[param.name] = param
    for key in fixed_keys:
        specs.pop(_param_name(key), None)
    ordered = tuple(specs.values())
    _check_when_order(ordered)
    if isinstance(constraints, str) or not isinstance(constraints, Sequence):
        raise SearchSpaceError(f"{CONSTRAINTS_KEY} must be a list of expression strings, got {constraints!r}")
    compiled = tuple(Expression.compile(c, f"{CONSTRAINTS_KEY}[{i}]") for i, c in enumerate(constraints))
    return SearchSpace(ordered, compiled)


def parse_param(key: str, spec: Any) -> ParamSpec:
    """One `hydra.sweeper.params.<key>` entry: a mapping with `type`, or Hydra sweep syntax."""
    where = f"{PARAMS_KEY}.{key}"
    if isinstance(spec, (DictConfig, ListConfig)):
        spec = OmegaConf.to_container(spec, resolve=True)
    if isinstance(spec, str):
        try:
            override = OverridesParser.create().parse_override(f"{key}={spec}")
        except Exception as error:
            raise SearchSpaceError(f"{where}: cannot parse {spec!r}: {error}") from None
        if not override.is_sweep_override():
            raise SearchSpaceError(
                f"{where}: {spec!r} is a single value; write a spec mapping with type "
                f"{'|'.join(PARAM_TYPES)} or a sweep such as choice(...), range(...), interval(...)"
            )
        return _param_from_override(override, where)
    if not isinstance(spec, Mapping):
        raise SearchSpaceError(f"{where} must be a mapping with 'type' ({'|'.join(PARAM_TYPES)}), got {spec!r}")
    kind = spec.get("type")
    if kind not in PARAM_TYPES:
        raise SearchSpaceError(f"{where}.type must be one of {list(PARAM_TYPES)}, got {kind!r}")
    unknown = set(spec) - _ALLOWED_FIELDS[kind]
    if unknown:
        raise SearchSpaceError(
            f"{where}: unknown field(s) {sorted(unknown)} for type {kind}; allowed: {sorted(_ALLOWED_FIELDS[kind])}"
        )
    when = Expression.compile(spec["when"], f"{where}.when") if spec.get("when") is not None else None
    name, override_key = _param_name(key), key
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SearchSpaceError(f"{where}.choices must be a non-empty list, got {choices!r}")
        for choice in choices:
            if choice is not None and not isinstance(choice, (bool, int, float, str)):
                raise SearchSpaceError(f"{where}.choices may hold null/bool/int/float/str only, got {choice!r}")
        return CategoricalParam(name, tuple(choices), override_key, when)
    low, high = _number(spec, "low", where), _number(spec, "high", where)
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise SearchSpaceError(f"{where}.log must be true or false, got {log!r}")
    if low > high:
        raise SearchSpaceError(f"{where}: low ({low}) must not exceed high ({high})")
    if log and low <= 0:
        raise SearchSpaceError(f"{where}: log=true needs low > 0, got low={low}")
    step = spec.get("step")
    if step is not None:
        step = _number(spec, "step", where)
        if step <= 0:
            raise SearchSpaceError(f"{where}.step must be > 0, got {step}")
        if log:
            raise SearchSpaceError(f"{where}: step and log=true cannot be combined (Optuna samples them differently)")
    if kind == "int":
        for field_name, value in (("low", low), ("high", high), ("step", step)):
            if value is not None and value != int(value):
                raise SearchSpaceError(f"{where}.{field_name} must be an integer for type int, got {value}")
        return IntParam(name, int(low), int(high), override_key, int(step or 1), log, when)
    return FloatParam(name, float(low), float(high), override_key, step, log, when)


def override_value(value: Any) -> str:
    """Render a sampled value for a Hydra override, quoting strings Hydra would re-type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if _PLAIN_STRING.fullmatch(text) and text.lower() not in _RESERVED_WORDS:
        return text
    escaped = text.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def _param_name(key: str) -> str:
    return key.lstrip("+")


def _number(spec: Mapping[str, Any], field_name: str, where: str) -> float:
    value = spec.get(field_name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SearchSpaceError(f"{where}.{field_name} must be a finite number, got {value!r}")
    return value


def _param_from_override(override: Override, where: str) -> ParamSpec:
    key = override.get_key_element()
    name = _param_name(key)
    sweep = override.value()
    if isinstance(sweep, ChoiceSweep) or (isinstance(sweep, RangeSweep) and sweep.shuffle):
        choices = tuple(override.sweep_iterator())
        for choice in choices:
            if choice is not None and not isinstance(choice, (bool, int, float, str)):
                raise SearchSpaceError(f"{where}: choices may hold null/bool/int/float/str only, got {choice!r}")
        return CategoricalParam(name, choices, key)
    if isinstance(sweep, RangeSweep):
        values = list(override.sweep_iterator())
        if not values:
            raise SearchSpaceError(f"{where}: the range is empty")
        if all(isinstance(v, int) for v in values):
            return IntParam(name, values[0], values[-1], key, step=int(sweep.step))
        return CategoricalParam(name, tuple(float(v) for v in values), key)
    if isinstance(sweep, IntervalSweep):
        unknown_tags = set(sweep.tags) - {"log"}
        if unknown_tags:
            raise SearchSpaceError(f"{where}: only the 'log' tag is understood, got {sorted(unknown_tags)}")
        assert sweep.start is not None and sweep.end is not None
        return parse_param(key, {"type": "float", "low": sweep.start, "high": sweep.end, "log": "log" in sweep.tags})
    raise SearchSpaceError(f"{where}: unsupported sweep {override.input_line!r}")


def _check_when_order(params: tuple[ParamSpec, ...]) -> None:
    """A `when:` may read only parameters sampled before it (declaration order)."""
    for index, param in enumerate(params):
        if param.when is None:
            continue
        later = {p.name for p in params[index:]}
        for name in param.when.names:
            clash = next((p for p in later if p == name or p.startswith(name + ".")), None)
            if clash is not None:
                raise SearchSpaceError(
                    f"{param.when.config_key}: {param.when.source!r} reads '{clash}', which is "
                    f"sampled at or after '{param.name}'; declare '{clash}' earlier in {PARAMS_KEY}"
                )


def _holds(expression: Expression, values: Mapping[str, Any], inactive: set[str], config: DictConfig) -> bool:
    try:
        return bool(expression.evaluate(values, inactive, config))
    except _InactiveReference:
        return False


def _suggest(trial: optuna.Trial, param: ParamSpec) -> Any:
    if isinstance(param, CategoricalParam):
        return trial.suggest_categorical(param.name, list(param.choices))
    if isinstance(param, IntParam):
        return trial.suggest_int(param.name, param.low, param.high, step=param.step, log=param.log)
    return trial.suggest_float(param.name, param.low, param.high, step=param.step, log=param.log)


def _grid_values(param: ParamSpec) -> list[Any]:
    if isinstance(param, CategoricalParam):
        return list(param.choices)
    if isinstance(param, IntParam) and not param.log:
        return list(range(param.low, param.high + 1, param.step))
    if isinstance(param, FloatParam) and param.step is not None:
        count = int(math.floor((param.high - param.low) / param.step + 1e-9)) + 1
        return [param.low + i * param.step for i in range(count)]
    raise SearchSpaceError(
        f"{PARAMS_KEY}.{param.override_key}: sampler kind grid needs a finite set of values; "
        "give it choices, or a step (and no log)"
    )


_ABSENT = object()


def _select(config: DictConfig, key: str, expression: Expression) -> Any:
    try:
        return OmegaConf.select(config, key, default=_ABSENT)
    except Exception as error:
        raise SearchSpaceError(
            f"{expression.config_key}: reading '{key}' from the config failed: {error}"
        ) from error


def _dotted_names(tree: ast.AST) -> set[str]:
    """Full dotted chains (`model.n_heads`) an expression reads."""
    names: set[str] = set()

    def chain(node: ast.AST) -> str | None:
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Attribute):
            base = chain(node.value)
            return f"{base}.{node.attr}" if base is not None else None
        return None

    def visit(node: ast.AST) -> None:
        dotted = chain(node)
        if dotted is not None:
            names.add(dotted)
            return
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


class _Scope:
    """Resolves `a.b.c` against the sampled values first, then the composed config.

    A plain class (not a Mapping) so that config keys such as `values` or `items` are not shadowed
    by methods; `eval` only needs `__getitem__` for its locals.
    """

    def __init__(
        self,
        prefix: str,
        values: Mapping[str, Any],
        inactive: set[str],
        config: DictConfig,
        expression: Expression,
    ) -> None:
        self._prefix, self._values, self._inactive = prefix, values, inactive
        self._config, self._expression = config, expression

    def _resolve(self, name: str) -> Any:
        key = f"{self._prefix}.{name}" if self._prefix else name
        if key in self._values:
            return self._values[key]
        if key in self._inactive:
            raise _InactiveReference(key)
        if any(k.startswith(key + ".") for k in (*self._values, *self._inactive)):
            return _Scope(key, self._values, self._inactive, self._config, self._expression)
        value = _select(self._config, key, self._expression)
        if value is _ABSENT:
            raise SearchSpaceError(
                f"{self._expression.config_key}: {self._expression.source!r} reads '{key}', which is "
                f"neither a parameter in {PARAMS_KEY} nor a key of the composed config"
            )
        if isinstance(value, DictConfig):
            return _Scope(key, self._values, self._inactive, self._config, self._expression)
        if isinstance(value, ListConfig):
            return OmegaConf.to_container(value, resolve=True)
        return value

    def __getitem__(self, name: str) -> Any:
        if name in _EXPRESSION_BUILTINS:
            raise KeyError(name)  # falls through to the builtins
        return self._resolve(name)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return self._resolve(name)
