"""Launch flags and environment variables only agentd may set.

A deployment's `options.extra_args` and `options.env` reach the model server
verbatim. Some of them would undo what agentd guarantees:

- isolation: `--host 0.0.0.0`, `--api-key K`, `-m /etc/passwd`, `LD_PRELOAD=...`;
- the memory booking: `-ngl`, `--tensor-split`, `--ctx-size`, `-fa`, `-b`,
  `-np`, `--gpu-memory-utilization`, `CUDA_VISIBLE_DEVICES`, ... change what
  the server allocates, while placement booked what the plan says.

So each runtime plugin declares what it sets itself (hook
`agentd_reserved_launch`), agentd adds what no runtime may be given
(`CORE`), and a deploy that sets any of it is refused with INVALID_ARGUMENT
naming the argument. Where a user has a legitimate need, the hint names the
deployment option that placement books instead (`--ctx-size`).

Matching: `--flag`, `--flag=value`; `--flag_name` as `--flag-name` (llama.cpp
and vLLM both accept underscores); short flags with an attached value
(`-c4096`, `-c=4096`, argparse-style); and for programs whose parser takes
unambiguous prefixes of long options (argparse: vLLM), any prefix of a
reserved long flag (`--max-model` for `--max-model-len`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from agentd.errors import InvalidInput
from agentd.plugins.api import ReservedLaunch

GPU_HINT = "agentd chooses the GPUs from the plan; use --pin HOST:GPU,... or --exclude-gpu"

# No runtime may be given these: they change which code runs, or which devices it sees.
CORE = ReservedLaunch(
    env=("PATH", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "PYTHONSAFEPATH",
         "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "NVIDIA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES",
         "ROCR_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL", "ZE_AFFINITY_MASK"),
    env_prefixes=("LD_",),  # LD_PRELOAD, LD_LIBRARY_PATH, LD_AUDIT, ...
    hints={"CUDA_VISIBLE_DEVICES": GPU_HINT, "NVIDIA_VISIBLE_DEVICES": GPU_HINT, "HIP_VISIBLE_DEVICES": GPU_HINT,
           "ROCR_VISIBLE_DEVICES": GPU_HINT, "CUDA_DEVICE_ORDER": GPU_HINT},
)


def _long(name: str) -> str:
    return name.replace("_", "-") if name.startswith("--") else name


def reserved_flag(arg: str, reserved: ReservedLaunch) -> str | None:
    """The reserved flag `arg` sets, or None. `arg` is one element of extra_args."""
    if not arg.startswith("-") or arg == "-" or arg == "--":
        return None
    name = _long(arg.split("=", 1)[0])
    flags = [_long(f) for f in reserved.flags]
    if name in flags:
        return reserved.flags[flags.index(name)]
    if arg.startswith("--"):
        if reserved.abbreviations and len(name) > 3:
            for i, f in enumerate(flags):
                if f.startswith("--") and f.startswith(name):
                    return reserved.flags[i]
        return None
    # A short flag with its value attached: argparse takes any (-p8000, -qawq); count digits for
    # the others (-c4096), where -cb is another flag, not -c with "b".
    for i, f in enumerate(flags):
        if not f.startswith("--") and arg.startswith(f) and len(arg) > len(f) \
                and (reserved.abbreviations or arg[len(f)].isdigit()):
            return reserved.flags[i]
    return None


def reserved_variable(name: str, reserved: ReservedLaunch) -> bool:
    return name in reserved.env or any(name.startswith(p) for p in reserved.env_prefixes)


def check_launch_options(runtime: str, extra_args: Iterable[str], env: Mapping[str, str],
                         reserved: ReservedLaunch) -> None:
    """Raise InvalidInput naming the first argument or variable that only agentd may set."""
    for arg in extra_args:
        flag = reserved_flag(arg, reserved)
        if flag is not None:
            hint = reserved.hints.get(flag)
            raise InvalidInput(f"{arg!r}: {flag} is set by agentd for runtime {runtime} and may not be given"
                               + (f" ({hint})" if hint else " (it would undo isolation or the memory booking)"),
                               where="options.extra_args")
    for name in env:
        if reserved_variable(name, reserved):
            hint = reserved.hints.get(name)
            raise InvalidInput(f"{name} is set by agentd for runtime {runtime} and may not be given"
                               + (f" ({hint})" if hint else " (it would undo isolation or the memory booking)"),
                               where="options.env")
