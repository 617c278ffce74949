"""Finding a strategy by name: a built-in, ``path/to/file.py:Class`` or ``package.module:Class``."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from unus_edge.errors import StrategyError
from unus_edge.strategies._async import FedAsync, FedBuff, SSPAveraging
from unus_edge.strategies._base import AsyncStrategy, Strategy
from unus_edge.strategies._dssgd import DSSGD, DSSGDAsync
from unus_edge.strategies._fedavg import FedAvg, FedSGD
from unus_edge.strategies._fedprox import FedProx
from unus_edge.strategies._robust import RobustFedAvg, RobustFedProx

__all__ = ["BUILTIN_STRATEGIES", "load_strategy", "strategy_class"]

BUILTIN_STRATEGIES: dict[str, type[Strategy[Any]] | type[AsyncStrategy]] = {
    cls.name: cls
    for cls in (FedAvg, FedSGD, FedProx, RobustFedAvg, RobustFedProx,
                SSPAveraging, FedAsync, FedBuff, DSSGD, DSSGDAsync)
}


def strategy_class(spec: str) -> type[Strategy[Any]] | type[AsyncStrategy]:
    """The class named by ``spec`` (see the module docstring)."""
    if spec.lower() in BUILTIN_STRATEGIES:
        return BUILTIN_STRATEGIES[spec.lower()]
    location, colon, class_name = spec.rpartition(":")
    if not colon or not location or not class_name:
        raise StrategyError(
            f"unknown strategy; use one of {', '.join(sorted(BUILTIN_STRATEGIES))}, "
            "'path/to/file.py:Class' or 'package.module:Class'", strategy=spec)
    if location.endswith(".py"):
        path = Path(location)
        if not path.is_file():
            raise StrategyError(f"{path} does not exist", strategy=spec)
        module_name = f"unus_edge_user_strategy_{abs(hash(path.resolve()))}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise StrategyError(f"cannot load {path}", strategy=spec)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        try:
            module_spec.loader.exec_module(module)
        except (ImportError, SyntaxError, NameError, AttributeError, TypeError, ValueError) as error:
            raise StrategyError(f"{path} failed to import: {error}", strategy=spec) from error
    else:
        try:
            module = importlib.import_module(location)
        except ImportError as error:
            raise StrategyError(f"cannot import {location}: {error}", strategy=spec) from error
    cls = getattr(module, class_name, None)
    if not (inspect.isclass(cls) and issubclass(cls, Strategy | AsyncStrategy)):
        raise StrategyError(f"{class_name} is not a Strategy or AsyncStrategy subclass in {location}", strategy=spec)
    return cls


def load_strategy(spec: str, options: Mapping[str, Any] | None = None) -> Strategy[Any] | AsyncStrategy:
    """Instantiate the strategy ``spec`` with ``options`` as keyword arguments."""
    cls = strategy_class(spec)
    options = dict(options or {})
    accepted = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    unknown = sorted(set(options) - set(accepted) - {"self"})
    if unknown and not takes_any:
        known = sorted(name for name in accepted if name != "self")
        raise StrategyError(f"unknown option(s) {', '.join(unknown)}; {cls.__name__} accepts: "
                            f"{', '.join(known) or 'no options'}", strategy=spec)
    try:
        return cls(**options)
    except TypeError as error:
        raise StrategyError(f"bad options {options}: {error}", strategy=spec) from error
