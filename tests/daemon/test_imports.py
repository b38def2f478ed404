"""A serving node imports what it serves with, not what only tuning or the UI needs (issue 18)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO

TUNING_AND_UI = ("peft", "textual", "tui.app", "meshllm.tune.train")
"""Imported by `meshllm tune` / a training round and by the terminal UI, never by a node starting."""


def _loaded_after(code: str) -> set[str]:
    probe = f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_the_node_imports_neither_tuning_nor_ui() -> None:
    loaded = _loaded_after("import daemon.node.node, daemon.api.tune, daemon.node.tune")
    assert sorted(m for m in TUNING_AND_UI if m in loaded) == []


def test_the_command_line_imports_no_model_code_before_a_command_runs() -> None:
    loaded = _loaded_after("import daemon.cli")
    assert sorted(m for m in ("torch", "transformers", "aiortc", "peft", "textual") if m in loaded) == []


MODELLING = ("torch._dynamo", "sympy", "accelerate", "transformers.activations", "transformers.masking_utils",
             "transformers.modeling_utils", "transformers.models.llama.modeling_llama")
"""transformers' modelling code and what it pulls in (~140 MB with the config validators'
activations): only the f32 reference shard, a first start's conversion and tuning need it."""
NETWORK_MEDIA = ("aiortc", "av")
"""WebRTC and PyAV (~40 MB), imported at the first link: a node with no peer never loads them."""


def test_a_starting_node_imports_neither_modelling_code_nor_webrtc() -> None:
    loaded = _loaded_after("import daemon.node.node")
    assert sorted(m for m in MODELLING + NETWORK_MEDIA if m in loaded) == []


def test_a_quantized_runtime_serves_without_transformers_modelling_code(tiny_llama, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """An int4 node's runtime, as `meshllm up` loads it (config, tokenizer, entry pieces, then
    its layers), answering a few tokens. The cache is prepared by a first process; the second,
    a warm start, is the one checked."""
    serve = (
        "from pathlib import Path\n"
        "from meshllm.model.cache import prepare\n"
        "from meshllm.model.source import resolve\n"
        "from meshllm.model.runtime import Runtime\n"
        "from meshllm.model.sampling import SamplingParams\n"
        f"prepared = prepare(resolve({str(tiny_llama)!r}), Path({str(tmp_path)!r}))\n"
        "runtime = Runtime.load(prepared, weights='int4')\n"
        "runtime.load_span(0, runtime.num_layers)\n"
        "assert type(runtime.shard).__name__ == 'LeanShard'\n"
        "ids = runtime.engine.chat_prompt([{'role': 'user', 'content': 'hello'}])\n"
        "assert len(list(runtime.engine.generate(ids, SamplingParams(max_tokens=4)))) == 4\n"
    )
    _loaded_after(serve)  # the first start writes the int4 file
    loaded = _loaded_after(serve)
    assert sorted(m for m in MODELLING + NETWORK_MEDIA if m in loaded) == []


def test_the_config_validators_import_activations_only_when_one_is_checked() -> None:
    """meshllm.model.hfconfig: transformers' ACT2FN in its config validators is a stand-in
    that imports the real one on first use, and a later import gets the real module."""
    probe = (
        "from meshllm.model.hfconfig import import_config_validators\n"
        "import_config_validators()\n"
        "from transformers.utils import type_validators\n"
        "before = 'transformers.activations' in sys.modules\n"
        "assert 'silu' in type_validators.ACT2FN and 'nope' not in type_validators.ACT2FN\n"
        "from transformers.activations import ACT2FN, SiLUActivation\n"
        "assert isinstance(type_validators.ACT2FN['silu'], SiLUActivation)\n"
        "assert sorted(type_validators.ACT2FN) == sorted(ACT2FN) and not before\n"
    )
    assert "transformers.activations" in _loaded_after(probe)
