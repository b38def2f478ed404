"""Reading a model's config without transformers' model-loading code (issue 18, memory).

transformers 5's ``LlamaConfig`` module imports ``transformers.utils.type_validators``, which
imports ``transformers.activations`` for one validator (``activation_fn_key``: is a name a
key of ``ACT2FN``). ``transformers.activations`` imports the hub-kernel integration, and with
it transformers' checkpoint loading, ``torch.distributed.tensor``, sympy and accelerate: about
60 MB of a serving node's RSS, for a config. Neither the Llama, Qwen2 nor Mistral config uses
that validator.

:func:`import_config_validators` imports ``type_validators`` once against a stand-in
``transformers.activations`` whose ``ACT2FN`` is :class:`LazyAct2Fn`: a mapping that imports
the real ``ACT2FN`` the first time anything reads it, so a config that does validate an
activation name behaves as before. The stand-in is removed from ``sys.modules`` at once:
every later ``import transformers.activations`` gets the real module. Where transformers
differs from what this expects, it falls back to the plain import.
"""

from __future__ import annotations

import importlib
import logging
import sys
import types
from collections.abc import Iterator, Mapping
from typing import Any

log = logging.getLogger(__name__)

_VALIDATORS = "transformers.utils.type_validators"
_ACTIVATIONS = "transformers.activations"


class LazyAct2Fn(Mapping[str, Any]):
    """transformers' ``ACT2FN``, imported on first use."""

    def _real(self) -> Mapping[str, Any]:
        return importlib.import_module(_ACTIVATIONS).ACT2FN  # type: ignore[no-any-return]

    def __getitem__(self, key: str) -> Any:
        return self._real()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._real())

    def __len__(self) -> int:
        return len(self._real())

    def __contains__(self, key: object) -> bool:
        return key in self._real()


def import_config_validators() -> None:
    """Import transformers' config validators without ``transformers.activations`` (see the
    module doc). Call before the first config is read; does nothing once they are imported."""
    if _VALIDATORS in sys.modules or _ACTIVATIONS in sys.modules:
        return
    stand_in = types.ModuleType(_ACTIVATIONS)
    stand_in.ACT2FN = LazyAct2Fn()  # type: ignore[attr-defined]
    sys.modules[_ACTIVATIONS] = stand_in
    try:
        importlib.import_module(_VALIDATORS)
    except ImportError as exc:  # a transformers that wants more of activations: import it as it is
        log.debug("config validators imported with transformers.activations: %s", exc)
        sys.modules.pop(_VALIDATORS, None)
    finally:
        if sys.modules.get(_ACTIVATIONS) is stand_in:
            del sys.modules[_ACTIVATIONS]
    if _VALIDATORS not in sys.modules:
        importlib.import_module(_VALIDATORS)
