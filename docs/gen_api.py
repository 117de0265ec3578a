"""Write `docs/api.md` from the public names and docstrings of lowrank's modules.

Run `python docs/gen_api.py` after changing a public signature or docstring;
`tests/test_docs.py` fails while `docs/api.md` is out of date.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

API_PATH = Path(__file__).resolve().parent / "api.md"

SECTIONS: list[tuple[str, list[str]]] = [
    ("lowrank.forms", ["LoRA", "Tucker2", "CP", "LoHa", "LoKr", "Full", "DoRA", "recompose", "fold",
                       "as_lora", "scale_from_alpha", "alpha_from_scale", "kernel_volume"]),
    ("lowrank.conv", ["centre_tap", "check_centre_tap", "inflate", "conv_function"]),
    ("lowrank.decompose", ["svd", "tucker2", "cp", "resize", "combine", "energy_rank",
                           "ratio_rank", "budget_rank"]),
    ("lowrank.bounds", ["param_count", "max_useful_rank", "crossover_rank", "Crossover",
                        "forward_flops", "unmerged_overhead", "require_groups"]),
    ("lowrank.report", ["count_model", "ModelReport", "LayerRow"]),
    ("lowrank.nn", ["inject", "merge_and_unload", "unload", "adapter_state_dict",
                    "load_adapter_state_dict", "swap_adapter", "merge", "unmerge", "adapters",
                    "disable_adapters", "reuse_dora_factors", "set_requires_grad",
                    "count_parameters", "plan"]),
    ("lowrank.nn.config", ["AdapterConfig"]),
    ("lowrank.nn.layers", ["LowRankAdapter", "LoRALinear", "LoRAConv", "LoRAEmbedding",
                           "LoRAConv1D"]),
    ("lowrank.nn.fit", ["check_fit", "layer_sizes"]),
    ("lowrank.nn.variants", ["Variant"]),
    ("lowrank.targets", ["matches", "parse_targets"]),
    ("lowrank.kernels", ["lora_linear", "lora_dropout_mask", "LoRALinearFunction"]),
    ("lowrank.io", ["load_adapter", "save_adapter", "inspect_adapter", "convert_adapter",
                    "merge_checkpoint", "apply_adapter", "inject_adapter", "model_adapter",
                    "extract_adapter", "resize_adapter", "combine_adapters", "Adapter",
                    "Checkpoint", "CheckpointWriter", "TensorInfo", "Staging"]),
    ("lowrank.errors", ["LowRankError", "ShapeError", "RankError", "NonFiniteError",
                        "DTypeError", "DeviceError", "GeometryError", "TargetError",
                        "ArgumentError", "FileFormatError", "OutputPathError",
                        "ConversionError", "MergeError", "StateDictError"]),
]


def _signature(obj: object, name: str) -> str:
    try:
        signature = str(inspect.signature(obj))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return name
    return f"{name}{signature}"


def _entry(module_name: str, name: str) -> str:
    obj = getattr(importlib.import_module(module_name), name)
    kind = "class" if inspect.isclass(obj) else "def"
    heading = f"### `{module_name}.{name}`"
    signature = name if issubclass_error(obj) else _signature(obj, name)
    doc = inspect.getdoc(obj) or ""
    return f"{heading}\n\n```python\n{kind} {signature}\n```\n\n{doc}\n"


def issubclass_error(obj: object) -> bool:
    """True for exception classes, whose constructor signature says nothing useful."""
    return inspect.isclass(obj) and issubclass(obj, Exception)


def render() -> str:
    """The whole API page as Markdown."""
    parts = [
        "# API reference\n",
        "Generated from the docstrings by `python docs/gen_api.py`; "
        "shapes follow PyTorch's layout (`(out, in, *k)`).\n",
    ]
    for module_name, names in SECTIONS:
        module = importlib.import_module(module_name)
        summary = (inspect.getdoc(module) or "").split("\n\n")[0]
        parts.append(f"## `{module_name}`\n\n{summary}\n")
        parts.extend(_entry(module_name, name) for name in names)
    return "\n".join(parts)


if __name__ == "__main__":
    API_PATH.write_text(render(), encoding="utf-8")
    sys.stdout.write(f"wrote {API_PATH}\n")
