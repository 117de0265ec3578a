"""The `lowrank` command. Subcommands: `bounds` (one layer, or a whole model's report);
`inspect`, `convert`, `merge` for adapter files and dense checkpoints; `extract`, `resize`,
`combine` for adapters in factor space (`lowrank.io`).

    lowrank bounds --in 320 --out 320 --kernel 3 [--rank 16] [--json] [--plot FILE]
    lowrank bounds --model diffusers:UNet2DConditionModel --config unet.json \\
        --targets to_q,to_v --rank 8
    lowrank bounds --model transformers:AutoModelForCausalLM --config config.json \\
        --targets q_proj,v_proj --rank 16
    lowrank inspect ADAPTER [--base CKPT] [--component NAME] [--json]
    lowrank convert ADAPTER --to peft|kohya|lycoris|diffusers -o OUT [--base CKPT] [--rank R]
    lowrank merge BASE ADAPTER[:WEIGHT] ... -o OUT [--dtype float16] [--component unet]
    lowrank extract BASE TUNED -o OUT --rank 32 [--form tucker2] [--format kohya]
    lowrank resize ADAPTER -o OUT --rank 16 | --energy 0.99 | --ratio 0.05
    lowrank combine ADAPTER[:WEIGHT] ... -o OUT [--rank 32]

Each subcommand is a `_<name>` handler registered in `build_parser`; further subcommands
add a subparser and a handler the same way. Every bad input, the parser's included, is a
`LowRankError` that `main` prints as one line, `lowrank: error: …`, with exit status 2;
nothing is written then.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import json
import math
import os
import signal
import sys
import threading
from collections.abc import Sequence
from fractions import Fraction
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import torch
from torch import nn

from ._checks import DTYPE_NAMES
from ._termination import ENDING_SIGNALS, RECEIVED, Terminated, raise_if_terminated, terminate
from ._text import aligned, sizes_text
from .bounds import (
    ADAPTER_FORMS,
    Crossover,
    Rank,
    crossover_rank,
    max_useful_rank,
    param_count,
    unmerged_overhead,
)
from .conv import has_centre_tap
from .errors import LowRankError, TargetError
from .io import (
    FORMATS,
    combine_adapters,
    convert_adapter,
    extract_adapter,
    inspect_adapter,
    merge_checkpoint,
    resize_adapter,
)
from .io.checkpoint import WEIGHT_SUFFIXES, Checkpoint
from .io.convert import format_conversion
from .io.factor_tools import EXTRACT_FORMS, format_factor_report
from .io.files import Staging, ends_in_separator, read_json, require_outputs
from .io.formats import TRAITS, detect
from .io.report import format_report
from .report import count_model
from .targets import parse_targets

if TYPE_CHECKING:
    from matplotlib.figure import Figure


class UsageError(LowRankError, ValueError):
    """A command-line argument that cannot be used; printed as `lowrank: error: …`."""


class _Once(argparse._StoreAction):
    """argparse's store action, refusing an option given twice (`--rank 2 --rank 3`), whose
    first value argparse would drop without a word."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        given = namespace.__dict__.setdefault("_given", set())
        if self.dest in given:
            parser.error(f"{option_string or self.dest} is given twice; give it once")
        given.add(self.dest)
        super().__call__(parser, namespace, values, option_string)


class _Parser(argparse.ArgumentParser):
    """An `ArgumentParser` whose errors are `UsageError`s (argparse's own would print the
    usage and exit), so that `main` reports every bad input the same way, and whose options
    take one value each at most once (`_Once`)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.register("action", None, _Once)
        self.register("action", "store", _Once)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def _plot_file(text: str) -> Path:
    """`--plot`: a file path, so not one ending in a separator (a folder's)."""
    if ends_in_separator(text):
        raise argparse.ArgumentTypeError(
            f"{text} ends in {text[-1]!r}, which names a folder; give a file path ending in "
            f".{', .'.join(PLOT_FORMATS)}"
        )
    return Path(text)


def _kernel(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.lower().replace(",", "x").split("x"))
    except ValueError:
        sizes = ()
    if not 1 <= len(sizes) <= 3 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(
            f"kernel must be 1 to 3 positive sizes like 3, 3x3 or 3x3x3, got {text!r}"
        )
    return sizes


def _rank(text: str) -> Rank:
    try:
        parts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"rank must be an int or r_out,r_in, got {text!r}"
        ) from None
    if len(parts) > 2:
        raise argparse.ArgumentTypeError(f"rank must be an int or r_out,r_in, got {text!r}")
    if min(parts) < 1:
        raise argparse.ArgumentTypeError(f"ranks must be at least 1, got {text!r}")
    return parts[0] if len(parts) == 1 else parts


def _installed_version() -> str:
    """The version of the installed distribution (`lowrank-kernels`)."""
    try:
        return version("lowrank-kernels")
    except PackageNotFoundError:
        return "(not installed: no version recorded)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `lowrank` with every subcommand."""
    parser = _Parser(
        prog="lowrank", description="Numerics of low-rank adaptation of linear and conv weights."
    )
    parser.add_argument("--version", action="version", version=f"lowrank {_installed_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bounds = commands.add_parser(
        "bounds",
        help="parameter counts, useful ranks and crossovers of every form",
        description="For one layer (--in/--out/--kernel): parameters of every form, the "
        "largest useful rank and the crossover ranks. For a model (--model): the adapter "
        "report of lowrank.count_model, built on the meta device.",
    )
    what = bounds.add_mutually_exclusive_group(required=True)
    what.add_argument("--in", dest="in_features", type=_positive, help="input features/channels")
    what.add_argument(
        "--model",
        help="module:callable returning an nn.Module (e.g. diffusers:UNet2DConditionModel, "
        "transformers:AutoModelForCausalLM); the current directory is importable",
    )
    bounds.add_argument(
        "--out", dest="out_features", type=_positive, help="output features/channels"
    )
    bounds.add_argument(
        "--kernel", type=_kernel, help="kernel size: 3 (= 3x3), 3x3x3, 5x1; omit for linear"
    )
    bounds.add_argument(
        "--dims", type=int, choices=(1, 2, 3), help="spatial dims of a single --kernel int"
    )
    bounds.add_argument("--rank", type=_rank, help="rank, or r_out,r_in for tucker2")
    _json_option(bounds, "print JSON instead of a table")
    bounds.add_argument(
        "--plot", type=_plot_file, help="write a plot of parameters vs rank: FILE.png, .svg or .pdf"
    )
    bounds.add_argument("--config", type=Path, help="JSON config for the --model callable")
    bounds.add_argument("--targets", help="comma-separated module-name patterns (--model)")
    bounds.add_argument(
        "--targets-config", type=Path, help='JSON {"pattern": {"r": 8, ...}} (--model)'
    )
    bounds.add_argument("--form", choices=ADAPTER_FORMS, help="default lora (--model)")
    bounds.add_argument("--alpha", type=float, help="LoRA alpha (--model)")
    bounds.add_argument(
        "--dtype", choices=sorted(DTYPE_NAMES), help="adapter dtype, default float32 (--model)"
    )
    bounds.set_defaults(handler=_bounds)
    _add_file_commands(commands)
    _add_factor_commands(commands)
    return parser


def _add_file_commands(commands: argparse._SubParsersAction) -> None:
    """The `inspect`, `convert` and `merge` subparsers (`lowrank.io`)."""
    inspect = commands.add_parser(
        "inspect",
        help="what an adapter file holds: format, layers, forms, ranks, alphas, sizes",
        description="Describe a PEFT folder, kohya / LyCORIS or diffusers adapter file: its "
        "format, and per layer the form, rank, alpha, scale, ΔW shape, parameters and dtype.",
    )
    inspect.add_argument("adapter", type=Path, help="adapter file or PEFT folder")
    inspect.add_argument(
        "--base",
        action="append",
        metavar="[COMPONENT=]CKPT",
        help="base checkpoint: map kohya names to module paths and check every layer "
        "(once per component, COMPONENT=CKPT, for a pipeline adapter)",
    )
    inspect.add_argument(
        "--component",
        type=_component,
        help="the model of layers that name none (a PEFT folder's), with --base per component",
    )
    _json_option(inspect, "print JSON instead of a table")
    inspect.set_defaults(handler=_inspect)
    convert = commands.add_parser(
        "convert",
        help="an adapter file in another format (exact unless --rank approximates)",
        description="Convert an adapter between PEFT, kohya, LyCORIS and diffusers files. "
        "Scales are kept exactly; Tucker (lora_mid) layers fold exactly into LoCon where the "
        "format has no mid factor; LoHa / LoKr layers and dense weight differences (LyCORIS "
        "full) become LoRA only with --rank, and the error of each is reported.",
    )
    convert.add_argument("adapter", type=Path, help="adapter file or PEFT folder")
    convert.add_argument("--to", required=True, choices=FORMATS, help="output format")
    convert.add_argument("-o", "--out", required=True, help="output file or folder")
    convert.add_argument(
        "--base",
        action="append",
        metavar="[COMPONENT=]CKPT",
        help="base checkpoint, to map kohya names to module paths (COMPONENT=CKPT per model)",
    )
    convert.add_argument(
        "--rank", type=_positive, help="approximate LoHa / LoKr / Full layers at this rank"
    )
    convert.add_argument(
        "--component",
        type=_component,
        help="the pipeline model to write (peft), or to put component-less layers under "
        "(diffusers, default unet; any format with --base per component)",
    )
    convert.add_argument(
        "--prefix",
        help="kohya prefix of component-less layers (default: the input's, else lora_unet)",
    )
    _json_option(convert)
    convert.set_defaults(handler=_convert)
    merge = commands.add_parser(
        "merge",
        help="merge adapters into a dense checkpoint (streamed, one tensor at a time)",
        description="Write BASE + Σ weight·ΔW of every adapter as a dense checkpoint, "
        "accumulated in float32 (float64 for a float64 weight or --dtype float64, and for a "
        "float8 weight stored with a scale). BASE is a .safetensors file or a "
        "sharded checkpoint (its index or folder). OUT is a .safetensors file or a folder: "
        "the merged file under the base's name, or a sharded checkpoint's shards and index; "
        "where BASE is given as a folder (or an index), the folder's other files "
        "(config.json, tokenizer, …; not weights in other formats, not sub-folders) are copied "
        "beside them, config.json stating --dtype and, where float8 weights are written "
        "dequantized, without its quantization_config.",
    )
    merge.add_argument("base", type=Path, help="base checkpoint (.safetensors, index or folder)")
    merge.add_argument(
        "adapters", nargs="+", metavar="ADAPTER[:WEIGHT]", help="adapter and its weight (1)"
    )
    merge.add_argument(
        "-o", "--out", required=True, help="output .safetensors file, or folder (see above)"
    )
    merge.add_argument(
        "--dtype",
        choices=sorted(DTYPE_NAMES),
        help="dtype of the floating tensors (default: the base's; scaled float8 weights are "
        "written dequantized)",
    )
    merge.add_argument(
        "--component", type=_component, help="the pipeline model BASE is (unet, text_encoder, …)"
    )
    merge.add_argument(
        "--threads", type=_threads, help="CPU threads for torch (default: torch's choice)"
    )
    _json_option(merge)
    merge.set_defaults(handler=_merge)


def _json_option(parser: argparse.ArgumentParser, text: str = "print the report as JSON") -> None:
    """`--json` on the subcommand `parser` (a flag: print JSON), with `text` as its help."""
    parser.add_argument("--json", action="store_true", help=text)


def _rank_options(parser: argparse.ArgumentParser, *, required: bool, what: str) -> None:
    """`--rank N | --energy F | --ratio F`, one of them (`required`) or none."""
    rule = parser.add_mutually_exclusive_group(required=required)
    rule.add_argument("--rank", type=_positive, help=f"rank of every {what}")
    rule.add_argument(
        "--energy", type=float, help=f"smallest rank keeping this share of ‖ΔW‖² ({what})"
    )
    rule.add_argument("--ratio", type=float, help=f"keep σ_i ≥ ratio·σ₁ ({what})")


def _common_options(parser: argparse.ArgumentParser, *, base: bool) -> None:
    """`--base` (where `base`), `--component`, `--prefix`, `--threads`, `--json`."""
    if base:
        parser.add_argument(
            "--base",
            action="append",
            metavar="[COMPONENT=]CKPT",
            help="base checkpoint, to map kohya names to module paths (COMPONENT=CKPT per model)",
        )
    parser.add_argument(
        "--component",
        type=_component,
        help="the pipeline model to write (peft), or to put component-less layers under",
    )
    parser.add_argument(
        "--prefix",
        help="kohya prefix of component-less layers (default: "
        + ("the input's, else lora_unet)" if base else "lora_unet)"),
    )
    parser.add_argument(
        "--threads", type=_threads, help="CPU threads for torch (default: torch's choice)"
    )
    _json_option(parser)


def _add_factor_commands(commands: argparse._SubParsersAction) -> None:
    """The `extract`, `resize` and `combine` subparsers (`lowrank.io.factor_tools`)."""
    extract = commands.add_parser(
        "extract",
        help="an adapter from a fine-tune: the best low-rank fit of TUNED − BASE per layer",
        description="Per weight, the truncated SVD (or Tucker2 HOOI) of TUNED − BASE, with a "
        "per-layer report of rank, relative error and energy kept. Both checkpoints are "
        ".safetensors files or sharded checkpoints, read one weight at a time; layers with "
        "no difference are skipped. Embedding tables (embed_tokens, wte, word_embeddings, …) "
        "are left out and listed unless --targets names them (PEFT folders hold them as "
        "lora_embedding_A / _B; diffusers files cannot). OUT may not be, or put a .safetensors "
        "file in, a checkpoint folder given as BASE or TUNED.",
    )
    extract.add_argument("base", type=Path, help="base checkpoint (.safetensors, index or folder)")
    extract.add_argument("tuned", type=Path, help="fine-tuned checkpoint of the same model")
    extract.add_argument("-o", "--out", required=True, help="output file or folder")
    _rank_options(extract, required=True, what="layer")
    extract.add_argument(
        "--form",
        choices=EXTRACT_FORMS,
        default="lora",
        help="default lora; tucker2: HOOI on k×k convs (equal inner ranks in kohya / lycoris "
        "files)",
    )
    extract.add_argument("--conv-rank", type=_positive, help="rank of k×k convolutions")
    extract.add_argument(
        "--format", choices=FORMATS, default="peft", help="output format (default: peft, a folder)"
    )
    extract.add_argument(
        "--targets", help="comma-separated module-name patterns to extract (default: all)"
    )
    extract.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    extract.add_argument(
        "--dtype", choices=sorted(DTYPE_NAMES), help="dtype of the factors (default: TUNED's)"
    )
    extract.add_argument(
        "--whole",
        action="store_true",
        help="save changed biases and norms whole in the PEFT folder (bias, modules_to_save)",
    )
    _common_options(extract, base=False)
    extract.set_defaults(handler=_extract)
    resize = commands.add_parser(
        "resize",
        help="an adapter at a lower rank, computed from its factors (no dense ΔW)",
        description="Lower the rank of every layer to its optimal truncation (Eckart–Young) "
        "by QR of the factors and the SVD of their small core; the error of each layer is "
        "reported exactly. Tucker layers get lower, equal inner ranks by HOOI (--energy: the "
        "smallest keeping that share of the layer's ‖ΔW‖²; --ratio: per channel mode), or, "
        "with --form lora or in formats without them, fold into LoCon first. kohya metadata "
        "(ss_network_dim, conv_dim, …) follows the written ranks.",
    )
    resize.add_argument("adapter", type=Path, help="adapter file or PEFT folder")
    resize.add_argument("-o", "--out", required=True, help="output file or folder")
    _rank_options(resize, required=True, what="layer")
    resize.add_argument("--form", choices=("lora",), help="fold Tucker layers into LoCon first")
    resize.add_argument("--format", choices=FORMATS, help="output format (default: the input's)")
    _common_options(resize, base=True)
    resize.set_defaults(handler=_resize)
    combine = commands.add_parser(
        "combine",
        help="one adapter whose ΔW is exactly Σ weight·ΔW of the adapters (factors concatenated)",
        description="Concatenate the factors of every adapter per layer (up blocks scaled by "
        "weight × scale, down blocks stacked): the exact weighted sum, of rank Σ r. "
        "--rank / --energy / --ratio truncate each layer optimally in factor space and report "
        "the error. Layers in only some adapters are carried over in their own form; those "
        "only adapters of weight 0 have are dropped (and listed).",
    )
    combine.add_argument(
        "adapters", nargs="+", metavar="ADAPTER[:WEIGHT]", help="adapter and its weight (1)"
    )
    combine.add_argument("-o", "--out", required=True, help="output file or folder")
    _rank_options(combine, required=False, what="combined layer")
    combine.add_argument(
        "--format", choices=FORMATS, help="output format (default: the first adapter's)"
    )
    _common_options(combine, base=True)
    combine.set_defaults(handler=_combine)


def main(argv: Sequence[str] | None = None) -> int:
    """Run `lowrank` with `argv` (default `sys.argv[1:]`); return the exit status: 0, or 2
    after one line on stderr for a bad input or a file system error (`--help` exits 0
    through `SystemExit`); 130 after Ctrl-C, and 128 + the signal's number after SIGTERM
    (143), SIGHUP (129) or SIGQUIT (131, no core dump) where that signal was left at its
    default (one ignored or handled by the caller is left so), each once the outputs being
    written are removed (the writers' cleanup runs as the exception unwinds, and no output
    is put in place after such a signal even where its exception was swallowed on the way,
    by user code or a finalizer; the signals' previous handlers are restored at the end);
    141 when stdout is closed early (`lowrank … | head`)."""
    caught = (
        [s for s in ENDING_SIGNALS if signal.getsignal(s) is signal.SIG_DFL]
        if threading.current_thread() is threading.main_thread()
        else []
    )
    digits = getattr(sys, "get_int_max_str_digits", lambda: None)()  # Python ≥ 3.10.7
    if digits is not None:
        sys.set_int_max_str_digits(0)  # exact counts of any size are printed whole
    try:
        for signum in caught:
            signal.signal(signum, terminate)
        args, extra = build_parser().parse_known_args(argv)
        if extra:  # the command's own help lists what it takes
            raise UsageError(
                f"unrecognized arguments: {' '.join(extra)} (see lowrank {args.command} --help)"
            )
        status = args.handler(args)
        raise_if_terminated()  # a signal whose exception was swallowed on its way ends it too
        return status
    except LowRankError as err:
        print(f"lowrank: error: {_one_line(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowrank: interrupted", file=sys.stderr)
        return 130
    except Terminated as ended:
        by = "" if ended.signum == signal.SIGTERM else f" by {signal.Signals(ended.signum).name}"
        print(f"lowrank: terminated{by}", file=sys.stderr)
        return 128 + ended.signum
    except BrokenPipeError:
        _silence_stdout()
        return 141
    except OSError as err:
        if err.filename is None and err.errno not in _FILE_SYSTEM_ERRORS:
            raise  # not the file system refusing a path: a bug, with its traceback
        print(f"lowrank: error: {_one_line(str(err))}", file=sys.stderr)
        return 2
    finally:
        if digits is not None:
            sys.set_int_max_str_digits(digits)
        for signum in caught:
            signal.signal(signum, signal.SIG_DFL)
        if caught:  # only the call that installed the handlers owns what they received
            RECEIVED.clear()


_FILE_SYSTEM_ERRORS = frozenset({errno.ENOSPC, errno.ENAMETOOLONG, errno.EACCES, errno.EROFS,
                                 errno.EDQUOT, errno.EIO, errno.EFBIG})  # fmt: skip
"""`OSError`s that are the file system's answer to the user's paths and data, reported in one
line even without a file name."""


def _silence_stdout() -> None:
    """Point stdout at the null device: the reader went away, and the flush at exit must
    not raise again."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    except (OSError, ValueError):  # no file descriptor behind stdout (a test's capture)
        pass


def _one_line(text: str, limit: int = 1000) -> str:
    """`text` on one line (line breaks become spaces), cut to `limit` characters."""
    flat = " ".join(line.strip() for line in text.splitlines() if line.strip())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


LAYER_ONLY = {"out_features": "--out", "kernel": "--kernel", "dims": "--dims", "plot": "--plot"}
MODEL_ONLY = {
    "config": "--config",
    "targets": "--targets",
    "targets_config": "--targets-config",
    "form": "--form",
    "alpha": "--alpha",
    "dtype": "--dtype",
}


def _reject(args: argparse.Namespace, options: dict[str, str], mode: str) -> None:
    """Raise `UsageError` if any of `options` (argparse dest → flag) was given with `mode`."""
    given = [flag for dest, flag in options.items() if getattr(args, dest) is not None]
    if given:
        raise UsageError(f"{', '.join(given)} cannot be used with {mode}")


def _bounds(args: argparse.Namespace) -> int:
    if args.model is not None:
        _reject(args, LAYER_ONLY, "--model")
        return _model_report(args)
    _reject(args, MODEL_ONLY, "--in (only with --model)")
    if args.out_features is None:
        raise UsageError("--in needs --out")
    kernel = args.kernel or ()
    if len(kernel) == 1:
        kernel = kernel * (args.dims or 2)
    elif args.dims is not None and not kernel:
        raise UsageError(f"--dims {args.dims} needs --kernel (the kernel's sizes)")
    elif args.dims is not None and len(kernel) != args.dims:
        raise UsageError(f"--kernel {args.kernel} has {len(kernel)} sizes but --dims {args.dims}")
    summary = layer_summary(args.in_features, args.out_features, kernel, args.rank)
    if args.plot is not None:
        plot_layer(args.in_features, args.out_features, kernel, args.plot)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def _float_or_none(value: Fraction | None) -> float | None:
    """`value` as a float for JSON, None where there is none or no float holds it (the
    `_exact` field beside it always does)."""
    try:
        return None if value is None else float(value)
    except OverflowError:
        return None


def _forms_for(kernel: tuple[int, ...]) -> tuple[str, ...]:
    """Adapter forms worth listing: centre tap only on a conv with odd kernel sizes."""
    fits_centre = bool(kernel) and has_centre_tap(kernel)
    return tuple(f for f in ADAPTER_FORMS if f != "centre_tap" or fits_centre)


def _crossover(form_a: str, form_b: str, sizes: tuple) -> Crossover:
    """The pair's crossover, in the order that reads best: a finite rank if there is one."""
    crossing = crossover_rank(form_a, form_b, *sizes)
    if crossing.above is None or (crossing.rank or 0) > 0:
        return crossing
    flipped = crossover_rank(form_b, form_a, *sizes)
    return flipped if (flipped.rank or 0) > 0 or crossing.rank == 0 else crossing


def layer_summary(
    in_features: int, out_features: int, kernel: tuple[int, ...], rank: Rank | None
) -> dict[str, object]:
    """Every form's parameters (at `rank`), largest useful rank and the pairwise crossovers."""
    sizes = (in_features, out_features, kernel)
    forms = _forms_for(kernel)
    dense = param_count("dense", *sizes)
    rows = {}
    for form in forms:
        row: dict[str, object] = {"max_useful_rank": max_useful_rank(form, *sizes)}
        if rank is not None:
            fits = isinstance(rank, int) or form == "tucker2"
            row["params"] = param_count(form, *sizes, rank) if fits else None
            overhead = unmerged_overhead(form, *sizes, rank) if fits else None
            row["unmerged_flops_ratio"] = _float_or_none(overhead)
            row["unmerged_flops_ratio_exact"] = (
                f"{overhead.numerator}/{overhead.denominator}" if overhead is not None else None
            )
        rows[form] = row
    crossings = [_crossover(a, b, sizes) for i, a in enumerate(forms) for b in forms[i + 1 :]]
    return {
        "in_features": in_features,
        "out_features": out_features,
        "kernel_size": list(kernel),
        "rank": list(rank) if isinstance(rank, tuple) else rank,
        "dense_params": dense,
        "forms": rows,
        "crossovers": [
            {
                "form_a": c.form_a,
                "form_b": c.form_b,
                "rank": c.rank,
                "since": c.since,
                "above": c.above,
            }
            for c in crossings
        ],
    }


def _fixed(num: int, den: int, places: int) -> str:
    """`num / den` (`den > 0`) to `places` decimals, rounded half up, in exact integer
    arithmetic: counts of any size (a float division overflows beyond 1.8e308)."""
    scale = 10**places
    units = (2 * scale * num + den) // (2 * den)
    sign, units = ("-", -units) if units < 0 else ("", units)
    return f"{sign}{units // scale}.{units % scale:0{places}d}"


def format_summary(summary: dict) -> str:
    """`layer_summary` as a plain-text table."""
    kernel = "×".join(map(str, summary["kernel_size"])) or "none (linear)"
    dense = summary["dense_params"]
    rank = summary["rank"]
    lines = [
        f"layer {summary['in_features']} → {summary['out_features']}, kernel {kernel}: "
        f"dense weight {dense:,} parameters",
        "",
    ]
    header = ["form", "max useful rank"]
    if rank is not None:
        shown = sizes_text(rank)
        header += [f"params at r={shown}", "% of dense", "unmerged FLOPs ÷ dense"]
    table = [header]
    for form, row in summary["forms"].items():
        cells = [form, str(row["max_useful_rank"])]
        if rank is not None and row["params"] is None:
            cells += ["—"] * 3
        elif rank is not None:
            num, den = map(int, row["unmerged_flops_ratio_exact"].split("/"))
            cells += [
                f"{row['params']:,}",
                _fixed(100 * row["params"], dense, 2),
                _fixed(num, den, 4),
            ]
        table.append(cells)
    lines += aligned(table)
    lines += ["", "crossovers (Tucker2 with r_out = r_in = r):"]
    for c in summary["crossovers"]:
        lines.append("  " + str(Crossover(**c)))
    return "\n".join(lines)


STYLES = {"lora": "-", "centre_tap": ":", "tucker2": "-.", "cp": (0, (6, 2))}
MARKERS = {"lora": "o", "centre_tap": "s", "tucker2": "^", "cp": "D"}
PLOT_FORMATS = ("png", "svg", "pdf")
# Ranks drawn per curve. Every count is a quadratic in r, so a polyline through this many
# evenly spaced ranks is off the curve by under 2e-6 of the plot's height: the plot costs
# the same for a layer of any size.
PLOT_RANKS = 400


def _plot_format(path: Path) -> str:
    """The format `--plot path` asks for (its suffix); `OutputPathError` for a path that
    cannot be looked up (`require_outputs`), `UsageError` for a folder, a missing folder or
    a suffix matplotlib is not asked to write."""
    require_outputs([path])
    if path.is_dir():
        raise UsageError(f"--plot {path} is a folder; give a file such as {path / 'bounds.png'}")
    if not path.parent.is_dir():
        raise UsageError(f"--plot {path}: the folder {path.parent} does not exist")
    fmt = path.suffix.lower().removeprefix(".")
    if fmt not in PLOT_FORMATS:
        raise UsageError(
            f"--plot {path}: the file name must end in .{', .'.join(PLOT_FORMATS)}, "
            f"got {path.suffix or 'no suffix'}"
        )
    return fmt


def plot_ranks(last: int) -> list[int]:
    """The ranks a plot draws: 1 … `last`, or `PLOT_RANKS` of them evenly spaced from 1 to
    `last` (both ends included) when there are more."""
    if last <= PLOT_RANKS:
        return list(range(1, last + 1))
    step = (last - 1) / (PLOT_RANKS - 1)
    return [1 + round(i * step) for i in range(PLOT_RANKS)]


def _counts_text(count: int) -> str:
    """A parameter count for a label: with thousands separators, or 4 digits from 10¹⁵ on."""
    return f"{count:,}" if count < 10**15 else f"{count:.4g}"


def plot_layer(in_features: int, out_features: int, kernel: tuple[int, ...], path: Path) -> Figure:
    """Write a plot (PNG, SVG or PDF, by `path`'s suffix) of parameters vs rank for every
    form, with the dense weight's line; atomically, so a failure leaves no file.

    Returns the matplotlib `Figure` (one axes: a line per form through the ranks of
    `plot_ranks`, a marker at its largest useful rank, the dense count as a dashed black
    line). `UsageError` for a `path` that is a folder, in a missing folder or with another
    suffix, or for counts beyond what a float holds (1.8e308); `OutputPathError` if it
    cannot be written.
    """
    fmt = _plot_format(path)
    try:
        from matplotlib import figure as mpl_figure
        from matplotlib import ticker
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'lowrank-kernels[plot]'") from None
    sizes = (in_features, out_features, kernel)
    forms = _forms_for(kernel)
    dense = param_count("dense", *sizes)
    useful = {form: max_useful_rank(form, *sizes) for form in forms}
    widest = max(min(out_features, in_features * math.prod(kernel)), useful["lora"])
    # matplotlib draws floats (ints beyond int64 fail in numpy), exact below 2**53
    try:
        ranks = plot_ranks(math.ceil(1.25 * widest) + 1)
        curves = {form: [float(param_count(form, *sizes, r)) for r in ranks] for form in forms}
        xs, top = [float(r) for r in ranks], float(2 * dense)
    except OverflowError:
        raise UsageError(
            f"--plot: the counts of a {in_features} → {out_features} layer go beyond 1.8e308, "
            "more than a plot can draw"
        ) from None
    figure = mpl_figure.Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.add_subplot()
    for form in forms:
        label = f"{form} (useful r ≤ {_counts_text(useful[form])})"
        # drawn last, the dotted centre tap stays visible where it nearly coincides with CP
        on_top = 3 if form == "centre_tap" else 2
        line = axes.plot(
            xs, curves[form], linestyle=STYLES[form], linewidth=2, label=label, zorder=on_top
        )[0]
        if 0 < useful[form] <= ranks[-1]:
            value = float(param_count(form, *sizes, useful[form]))
            axes.plot([float(useful[form])], [value], MARKERS[form], color=line.get_color())
    axes.axhline(top / 2, color="black", linestyle="--", label=f"dense ({_counts_text(dense)})")
    kernel_text = "×".join(map(str, kernel)) or "linear"
    axes.set_title(
        f"{_counts_text(in_features)} → {_counts_text(out_features)}, kernel {kernel_text}: "
        "parameters vs rank"
    )
    axes.set_xlabel("rank r (Tucker2: r_out = r_in = r); markers: largest useful rank")
    axes.set_ylim(0, top)
    axes.set_ylabel("parameters")
    if dense < 10**15:
        axes.yaxis.set_major_formatter(ticker.StrMethodFormatter("{x:,.0f}"))
    axes.legend()
    axes.grid(alpha=0.3)
    with Staging() as staging, staging.writing(path) as temp:
        figure.savefig(temp, format=fmt, dpi=120)
    return figure


_SHOWN = 300  # characters of a message from user code (--model) in an error line


def _failure(err: BaseException) -> str:
    """`Type: message` of an exception raised by user code, on one line and cut short."""
    return _one_line(f"{type(err).__name__}: {err}", _SHOWN)


def _import_factory(spec: str) -> object:
    """The object `module:attribute` names; `UsageError` for a malformed spec, a module that
    cannot be imported (whatever it raises on import) or a missing attribute."""
    module_name, _, attribute = spec.partition(":")
    dotted = module_name.split(".") + attribute.split(".")
    if not all(part.isidentifier() for part in dotted):
        raise UsageError(f"--model must look like package.module:callable, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        factory: object = importlib.import_module(module_name)
    except (Exception, SystemExit) as err:  # the module is user code: any failure is one line
        raise UsageError(f"cannot import {module_name!r} for --model: {_failure(err)}") from None
    for part in attribute.split("."):
        try:
            factory = getattr(factory, part)
        except AttributeError:
            raise UsageError(f"{module_name!r} has no attribute {attribute!r}") from None
        except (Exception, SystemExit) as err:  # a lazy module imports on attribute access
            raise UsageError(f"cannot load {spec} for --model: {_failure(err)}") from None
    return factory


def _is_transformers(factory: object) -> bool:
    """Whether `factory` is a class of the transformers library (a model or an Auto class)."""
    return isinstance(factory, type) and factory.__module__.partition(".")[0] == "transformers"


def _transformers_model(factory: type, settings: dict[str, object], config: Path) -> nn.Module:
    """A transformers model from a `config.json` dict: the class's own config class when it
    has one (`LlamaForCausalLM`), else `AutoConfig.for_model` by the dict's `model_type`
    (`AutoModelForCausalLM`, which is then built through `from_config`). transformers'
    warnings about the config (token ids, `is_decoder`) are silenced while it builds: they
    concern running the model, not its parameter count, and would add lines to an error."""
    from transformers import AutoConfig, PretrainedConfig
    from transformers.utils import logging as transformers_logging

    config_class = getattr(factory, "config_class", None)
    own = isinstance(config_class, type) and issubclass(config_class, PretrainedConfig)
    if not own and not isinstance(settings.get("model_type"), str):
        raise UsageError(
            f'--config {config} has no "model_type" (as a transformers config.json has), '
            f"which {factory.__name__} needs to choose the model class"
        )
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        if own:
            return factory(config_class.from_dict(settings))
        return factory.from_config(AutoConfig.for_model(**settings))
    finally:
        transformers_logging.set_verbosity(verbosity)


def load_model(spec: str, config: Path | None = None) -> nn.Module:
    """Build `module:callable` on the meta device; with `config`, from that JSON file.

    A transformers class (`transformers:AutoModelForCausalLM`, `transformers:LlamaForCausalLM`)
    gets a `PretrainedConfig` made from the dict; another callable with `from_config`
    (diffusers models) gets the dict; any other is called with it as keyword arguments, or
    with none when there is no config. Whatever goes wrong (the import, the call) is a
    `UsageError` of one line naming `spec`. What user code prints goes to stderr, so that
    stdout holds only the command's own output (`--json` stays parseable).
    """
    settings = read_json(config, label="--config", error=UsageError) if config is not None else None
    if settings is not None and not isinstance(settings, dict):
        raise UsageError(f"--config {config} must hold a JSON object, got {settings!r}")
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return _built(_import_factory(spec), spec, settings, config)
    finally:
        # a termination swallowed by user code, which went on, or then failed: it outranks
        # what the factory did after
        raise_if_terminated()


def _built(
    factory: object, spec: str, settings: dict[str, object] | None, config: Path | None
) -> nn.Module:
    """`factory` called on the meta device as `load_model` describes."""
    try:
        with torch.device("meta"):
            if settings is None:
                model = factory()
            elif _is_transformers(factory):
                model = _transformers_model(factory, settings, config)
            elif hasattr(factory, "from_config"):
                model = factory.from_config(settings)
            else:
                model = factory(**settings)
    except UsageError:
        raise
    except (Exception, SystemExit) as err:  # any failure of user code is reported as one line
        raise UsageError(f"{spec} failed: {_failure(err)}") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _checked_targets(targets: object, option: str) -> list[str]:
    """The patterns of `targets` (`lowrank.targets.parse_targets`); its `TargetError`s (a
    bad regular expression, say) name `option` too."""
    try:
        return list(parse_targets(targets))  # type: ignore[arg-type]
    except TargetError as err:
        raise TargetError(f"{option}: {err}") from None


def _model_report(args: argparse.Namespace) -> int:
    if (args.targets is None) == (args.targets_config is None):
        raise UsageError("--model needs exactly one of --targets and --targets-config")
    if args.targets is not None:
        targets, option = args.targets, "--targets"
    else:
        option = "--targets-config"
        targets = read_json(args.targets_config, label=option, error=UsageError)
    _checked_targets(targets, option)
    model = load_model(args.model, args.config)
    if args.targets is not None and args.rank is None:
        raise UsageError(
            "--targets needs --rank (or --targets-config, which gives each pattern its 'r')"
        )
    report = count_model(
        model,
        targets,  # type: ignore[arg-type]  # checked by _checked_targets
        rank=args.rank,
        form=args.form or "lora",
        alpha=args.alpha,
        dtype=DTYPE_NAMES[args.dtype or "float32"],
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return 0


def _bases(given: list[str] | None) -> Path | dict[str, Path] | None:
    """`--base CKPT`, or `--base COMPONENT=CKPT` once per component."""
    if not given:
        return None
    single = given[0]
    if len(given) == 1 and ("=" not in single or "/" in single.partition("=")[0]
                            or Path(single).exists()):  # fmt: skip
        return Path(single)  # a path holding "=": one that exists, or "=" after a folder
    bases = {}
    for text in given:
        component, equals, path = text.partition("=")
        if not equals or not component or not path:
            several = "with several --base, give each" if len(given) > 1 else "give --base"
            raise UsageError(f"{several} as CKPT or COMPONENT=CKPT, got {text!r}")
        if component in bases:
            raise UsageError(f"--base {component}=… is given twice; give each component once")
        bases[component] = Path(path)
    return bases


def _inspect(args: argparse.Namespace) -> int:
    report = inspect_adapter(args.adapter, base=_bases(args.base), component=args.component)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _require_output(args: argparse.Namespace, fmt: str, *, aligns: bool = False) -> None:
    """`-o`, `--prefix` and `--component` fit the output format `fmt`: kohya and LyCORIS
    write one `.safetensors` file, PEFT a folder (diffusers either); `--prefix` names kohya
    layers only; `--component` does nothing for kohya output unless it also places the
    inputs' layers (`aligns`: the library then refuses it where it places none).
    `UsageError` otherwise."""
    is_file = Path(args.out).suffix.lower() == ".safetensors"
    one_file = TRAITS[fmt].kohya_named  # one .safetensors file; PEFT is a folder
    if one_file and not is_file:
        raise UsageError(
            f"-o {args.out}: {fmt} writes one file; give a path ending in .safetensors"
        )
    if fmt == "peft" and is_file:
        raise UsageError(
            f"-o {args.out}: peft writes a folder (adapter_model.safetensors and "
            "adapter_config.json); give a folder path, not a .safetensors file"
        )
    if args.prefix is not None and not one_file:
        raise UsageError(f"--prefix names kohya layers; it cannot be used with {fmt} output")
    if args.component is not None and one_file and not aligns:
        raise UsageError(
            f"--component picks the model written to peft or diffusers; {fmt} output takes "
            "--prefix instead"
        )


def _convert(args: argparse.Namespace) -> int:
    _require_output(args, args.to, aligns=args.base is not None)
    options = {} if args.prefix is None else {"prefix": args.prefix}
    report = convert_adapter(
        args.adapter,
        args.out,
        args.to,
        base=_bases(args.base),
        rank=args.rank,
        component=args.component,
        progress=True,
        **options,
    )
    print(json.dumps(report, indent=2) if args.json else format_conversion(report))
    return 0


def _adapter_weight(text: str) -> tuple[Path, float]:
    """`ADAPTER[:WEIGHT]`: a trailing `:number` is the weight (a path may hold other colons).

    `UsageError` for a weight that is not a finite number, or for `PATH:TEXT` where PATH
    exists, PATH:TEXT does not and TEXT is no number (a mistyped weight, not a file name).
    A file named `PATH:number` is that file, weight 1, where PATH does not exist.
    """
    path, colon, weight = text.rpartition(":")
    if not colon or (Path(text).exists() and not Path(path).exists()):
        return Path(text), 1.0
    try:
        value = float(weight)
    except ValueError:
        if Path(path).exists() and not Path(text).exists():
            raise UsageError(
                f"{text}: the weight after ':' must be a number, got {weight!r}"
            ) from None
        return Path(text), 1.0
    if not math.isfinite(value):
        raise UsageError(f"{text}: the weight after ':' must be finite, got {weight!r}")
    return Path(path), value


def _component(text: str) -> str:
    """A `--component` name: not empty (an empty one would silently mean the default)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("a component name must not be empty")
    return text.strip()


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


MAX_THREADS_PER_CPU = 4


def _threads(text: str) -> int:
    """`--threads`: a positive integer up to `MAX_THREADS_PER_CPU` per CPU this process may use
    (torch aborts the process when it cannot start the threads asked for)."""
    value = _positive(text)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    limit = MAX_THREADS_PER_CPU * (cpus or 1)
    if value > limit:
        raise argparse.ArgumentTypeError(
            f"at most {limit} ({MAX_THREADS_PER_CPU} per CPU this process may use), got {value}"
        )
    return value


def _merge(args: argparse.Namespace) -> int:
    pairs = [_adapter_weight(text) for text in args.adapters]
    is_file = Path(args.out).suffix.lower() == ".safetensors"
    if Checkpoint(args.base).sharded and is_file:
        raise UsageError(
            f"-o {args.out}: the merged checkpoint is a folder, as BASE is sharded: give a name "
            "without .safetensors"
        )
    if not is_file and Path(args.out).name.lower().endswith((*WEIGHT_SUFFIXES, ".json")):
        raise UsageError(
            f"-o {args.out}: the merged checkpoint is a file ending in .safetensors, or a "
            "folder (the merged file under the base's name, with the files of a base folder)"
        )
    out = args.out if is_file else os.path.join(args.out, "")  # a folder: the file inside
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    report = merge_checkpoint(
        args.base,
        [path for path, _ in pairs],
        out,
        weights=[weight for _, weight in pairs],
        dtype=args.dtype,
        component=args.component,
        progress=True,
    )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        merged = ", ".join(
            f"{a['adapter']} ×{a['weight']:g} ({a['layers']} layers)" for a in report["adapters"]
        )
        replaced = ", ".join(report["replaced_tensors"])
        saved = f"; {replaced} replaced by weights the adapters save" if replaced else ""
        if report["requantized_tensors"]:
            rescaled = report["rescaled_tensors"]
            saved += f"; {len(report['requantized_tensors'])} scaled float8 weights requantized"
            saved += f" ({len(rescaled)} larger scales: {_first(rescaled)})" if rescaled else ""
        if report["dequantized_tensors"] or report["dropped_tensors"]:
            dropped = report["dropped_tensors"]
            saved += (
                f"; {len(report['dequantized_tensors'])} scaled float8 weights dequantized to "
                f"{report['dtype']}, {len(dropped)} scale and marker tensors left out "
                f"({_first(dropped)})"
            )
        copied = [Path(name).name for name in report["copied_files"]]
        if report["dequantized_tensors"] and "config.json" not in copied:
            saved += ": a config.json beside the output must not keep its quantization_config"
        if copied:
            saved += f"; the model folder's {_first(copied, 5)} copied beside it"
            if report["rewritten_files"]:
                saved += " (config.json stating the output's dtype"
                saved += ", without quantization_config)" if report["dequantized_tensors"] else ")"
        print(
            f"{report['base']} + {merged} → {', '.join(report['output'])}: "
            f"{report['merged_tensors']} of {report['tensors']} tensors merged{saved}"
        )
    return 0


def _first(names: list[str], shown: int = 3) -> str:
    """The first `shown` of `names`, joined, and `…` where there are more (a merge into a
    large checkpoint may list tens of thousands)."""
    return ", ".join(names[:shown]) + (", …" if len(names) > shown else "")


def _rule(args: argparse.Namespace) -> dict[str, object]:
    return {"rank": args.rank, "energy": args.energy, "ratio": args.ratio}


def _naming(args: argparse.Namespace) -> dict[str, object]:
    """`component` and `prefix` as given (the library's defaults otherwise)."""
    return {
        "component": args.component,
        **({} if args.prefix is None else {"prefix": args.prefix}),
    }


def _print_report(args: argparse.Namespace, report: dict) -> int:
    print(json.dumps(report, indent=2) if args.json else format_factor_report(report))
    return 0


def _extract(args: argparse.Namespace) -> int:
    _require_output(args, args.format)
    targets = None if args.targets is None else _checked_targets(args.targets, "--targets")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    report = extract_adapter(
        args.base,
        args.tuned,
        args.out,
        form=args.form,
        format=args.format,
        conv_rank=args.conv_rank,
        targets=targets,
        device=args.device,
        dtype=args.dtype,
        whole=args.whole,
        progress=True,
        **_rule(args),
        **_naming(args),
    )
    return _print_report(args, report)


def _resize(args: argparse.Namespace) -> int:
    _require_output(args, args.format or detect(args.adapter), aligns=args.base is not None)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    report = resize_adapter(
        args.adapter,
        args.out,
        form=args.form,
        format=args.format,
        base=_bases(args.base),
        progress=True,
        **_rule(args),
        **_naming(args),
    )
    return _print_report(args, report)


def _combine(args: argparse.Namespace) -> int:
    pairs = [_adapter_weight(text) for text in args.adapters]
    _require_output(args, args.format or detect(pairs[0][0]), aligns=True)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    report = combine_adapters(
        [path for path, _ in pairs],
        args.out,
        weights=[weight for _, weight in pairs],
        format=args.format,
        base=_bases(args.base),
        progress=True,
        **_rule(args),
        **_naming(args),
    )
    return _print_report(args, report)


if __name__ == "__main__":
    sys.exit(main())
