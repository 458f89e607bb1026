"""The main job, end to end on one machine: `scripts/demo` (or `python -m agentd.demo`).

It starts a cluster of real `agentd serve` processes on loopback whose
simulated GPUs are too small for the model on their own, generates a tiny
llama GGUF, deploys it with the llamabox runtime through the real CLI, and
shows what happened: the placement the coordinator committed, the real
llama-server and ggml-rpc-server it started on two agents, llama.cpp's own
log confirming the layer split, and a completion through an agent's
OpenAI-compatible `/v1/completions`. Then it stops everything (drain) and
checks that nothing is left running, or, with `--keep`, leaves the cluster up
and prints how to look at it and how to stop it (`--stop DIR`).

The demo exits 0 only if every step worked; otherwise it says which step
failed, prints the agents' last log lines and keeps the directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from agentd.api.drain import request_drain
from agentd.errors import AgentdError
from agentd.runtime.standalone import kill_recorded
from agentd.security.files import private_dir
from agentd.testing.gguf import write_tiny_llama_gguf
from agentd.testing.localcluster import LocalCluster, simulated_host
from agentd.v1 import control_pb2 as pb

MiB = 1024**2
DEPLOYMENT = "tiny"
STATE_FILE = "demo.json"
# Two simulated GPUs of 0.272 GiB: the 8-layer model (about 20 MiB of weights at f32, plus KV cache and
# llama.cpp's compute buffers as the placement estimates them) fits neither alone, so it is split.
GPU_GIB = 0.272
MODEL_SHAPE = {"n_layers": 8, "hidden": 256, "ffn": 512}
SERVER_NAMES = ("llama-server", "ggml-rpc-server")


class DemoFailed(Exception):
    """A step did not do what it should; the message says what was seen."""


@dataclass
class Timings:
    clock: Callable[[], float] = time.monotonic
    rows: list[tuple[str, float]] = field(default_factory=list)

    @contextlib.contextmanager
    def step(self, number: int, total: int, title: str) -> Iterator[None]:
        print(f"\n==> [{number}/{total}] {title}", flush=True)
        t0 = self.clock()
        yield
        took = self.clock() - t0
        self.rows.append((title, took))
        print(f"    ({took:.1f} s)", flush=True)


def say(text: str = "", indent: int = 4) -> None:
    pad = " " * indent
    print("\n".join(pad + line if line else "" for line in text.rstrip("\n").split("\n")), flush=True)


def agentd_argv() -> list[str]:
    return [sys.executable, "-m", "agentd"]


def agentd_shown() -> str:
    """How a user types the CLI from this environment."""
    script = Path(sys.executable).parent / "agentd"
    return str(script) if script.exists() else f"{sys.executable} -m agentd"


def run_cli(*args: str, server: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_")}
    return subprocess.run([*agentd_argv(), *args, "--server", server], capture_output=True, text=True,
                          env=env, timeout=timeout)


def cli_ok(*args: str, server: str, timeout: float = 180) -> str:
    r = run_cli(*args, server=server, timeout=timeout)
    if r.returncode != 0:
        raise DemoFailed(f"`agentd {' '.join(args)}` exited with {r.returncode}: {(r.stderr or r.stdout).strip()}")
    return r.stdout


def free_port_block(size: int = 100, start: int = 40000, stop: int = 60000) -> tuple[int, int]:
    """A block of ports for the model servers in which the first few bind now (other runs may use 40000+)."""
    for base in range(start, stop, size):
        if all(_bindable(p) for p in range(base, base + 8)):
            return base, base + size - 1
    raise DemoFailed(f"no free block of {size} ports between {start} and {stop}")


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def model_servers(root: Path) -> list[psutil.Process]:
    """llama-server / ggml-rpc-server processes of this demo (run from, or reading files, under `root`)."""
    out = []
    for p in psutil.process_iter(["name", "cmdline", "cwd"]):
        info = p.info
        if info["name"] in SERVER_NAMES and any(
                str(x).startswith(str(root)) for x in [info["cwd"] or "", *(info["cmdline"] or [])]):
            out.append(p)
    return out


def post_json(url: str, body: dict, timeout: float = 60) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def get_json(url: str, timeout: float = 10) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


# ---------------------------------------------------------------------- the run


@dataclass
class Demo:
    root: Path
    agents: int = 2
    keep: bool = False
    created_root: bool = False
    cpu_only: bool = False  # agents without GPUs: llama-server runs the model from RAM (--allow-cpu-offload)
    timings: Timings = field(default_factory=Timings)
    cluster: LocalCluster | None = None

    @property
    def total_steps(self) -> int:
        return 5 if self.keep else 6

    def run(self) -> int:
        t0 = self.timings.clock()
        what = ("without GPUs serve a tiny llama model from RAM (llama.cpp on CPUs)" if self.cpu_only else
                "with simulated GPUs serve a tiny llama model split over llama.cpp RPC")
        print(f"agentd demo: {self.agents} agents on this machine {what}\n    directory: {self.root}", flush=True)
        try:
            model = self.make_model()
            self.start_cluster()
            assignment = self.deploy(model)
            self.show_placement(assignment)
            self.complete(assignment)
            if self.keep:
                self.save_state()
            else:
                self.stop()
        except KeyboardInterrupt:
            print("\ninterrupted; stopping the cluster", file=sys.stderr)
            self.abort()
            if self.created_root:
                shutil.rmtree(self.root, ignore_errors=True)
            return 130
        except Exception as exc:  # whatever went wrong, say so and leave nothing running
            self.fail(exc if isinstance(exc, DemoFailed | AgentdError) else f"{type(exc).__name__}: {exc}")
            return 1
        self.summary(self.timings.clock() - t0)
        if self.keep:
            self.print_keep_instructions()
        elif self.created_root:
            shutil.rmtree(self.root, ignore_errors=True)
        return 0

    # ------------------------------------------------------------------ steps

    def make_model(self) -> Path:
        with self.timings.step(1, self.total_steps, "Generate a tiny llama GGUF (random weights, gguf package)"):
            path = write_tiny_llama_gguf(self.root / "models" / "tiny-llama.gguf", **MODEL_SHAPE)
            say(f"{path}: llama, {MODEL_SHAPE['n_layers']} layers, hidden {MODEL_SHAPE['hidden']}, "
                f"{path.stat().st_size / MiB:.1f} MiB")
        return path

    def start_cluster(self) -> None:
        names = "abcdefgh"[: self.agents]
        title = (f"Start {self.agents} agents (`agentd serve --simulate`), "
                 + ("none with a GPU" if self.cpu_only else f"each with one {GPU_GIB * 1024:.0f} MiB GPU"))
        with self.timings.step(2, self.total_steps, title):
            low, high = free_port_block()
            gpus = 0 if self.cpu_only else 1
            self.cluster = LocalCluster(
                self.root / "cluster", hosts=[simulated_host(n, gpus=gpus, gpu_gib=GPU_GIB) for n in names],
                extra_env={"AGENTD_PORT_RANGE": f"[{low},{high}]"})
            self.cluster.start()
            self.cluster.wait_for_inventories()
            self.wait_for_voters()
            say(f"model servers get ports {low}-{high}\n$ agentd nodes")
            say(cli_ok("nodes", server=self.first().listen), indent=6)

    def wait_for_voters(self, timeout: float = 15.0) -> None:
        """Joining agents start as learners and are promoted once caught up; show the settled membership."""
        deadline = self.timings.clock() + timeout
        while self.timings.clock() < deadline:
            try:
                with self.first().client(timeout=2) as c:
                    members = c.status().members
                if len(members) == self.agents and all(m.voter for m in members):
                    return
            except AgentdError:
                pass
            time.sleep(0.1)

    def deploy(self, model: Path) -> dict[str, Any]:
        with self.timings.step(3, self.total_steps, "Deploy with the llamabox runtime and wait until it runs"):
            args = ["deploy", DEPLOYMENT, "--model", str(model), "--runtime", "llamabox", "--ctx-size", "256",
                    "--arg=-lv", "--arg=4", "--wait", "120"] + (["--allow-cpu-offload"] if self.cpu_only else [])
            say("$ agentd " + " ".join(args).replace(str(self.root), "$DIR"))
            t0 = self.timings.clock()
            r = run_cli(*args, server=self.first().listen)
            took = self.timings.clock() - t0
            say((r.stdout + r.stderr).strip(), indent=6)
            if r.returncode != 0:
                raise DemoFailed(f"agentd deploy exited with {r.returncode}")
            say(f"deploy -> every part RUNNING: {took:.2f} s (including the CLI's own start)")
        with self.first().client() as c:
            reply = c.call("Get", pb.GetRequest(name=DEPLOYMENT))
        (assignment,) = json.loads(reply.assignments_json)
        roles = sorted(p["role"] for p in assignment["plan"]["parts"])
        if self.cpu_only:
            main = assignment["plan"]["parts"][0]
            if roles != ["main"] or main["gpus"] or main.get("cpu_layers") != MODEL_SHAPE["n_layers"]:
                raise DemoFailed(f"expected one main server holding every layer in RAM, got {assignment['plan']}")
        elif roles != ["main", "rpc"]:
            raise DemoFailed(f"expected the model split into main + rpc, got parts {roles}")
        return assignment

    def show_placement(self, assignment: dict[str, Any]) -> None:
        with self.timings.step(4, self.total_steps, "Placement: what the coordinator committed, what runs where"):
            say("$ agentd ps")
            say(cli_ok("ps", server=self.first().listen), indent=6)
            parts, eps = assignment["plan"]["parts"], assignment["endpoints"]
            rows = [["ROLE", "HOST", "GPU", "LAYERS", "PLANNED ON GPU", "ENDPOINT"]]
            for p, ep in zip(parts, eps, strict=True):
                planned = sum(p.get("memory") or [0]) / MiB
                on_gpu = f"{planned:.0f} of {GPU_GIB * 1024:.0f} MiB" if p["gpus"] else "- (no GPU)"
                layers = str(p["layers"]) if p["gpus"] else f"{p.get('cpu_layers') or 0} in RAM"
                rows.append([p["role"], p["host"], ",".join(map(str, p["gpus"])), layers, on_gpu,
                             f"{ep['address']}:{ep['port']}"])
            say(f"plan (term {assignment['term']}, instance {assignment['deployment']}-r{assignment['replica']}-g"
                f"{assignment['generation']}):")
            say(_table(rows), indent=6)
            main = next(i for i, p in enumerate(parts) if p["role"] == "main")
            rpc = next((i for i, p in enumerate(parts) if p["role"] == "rpc"), None)
            other = next(a for a in self.cluster.agents.values() if a.name != parts[main]["host"])
            log = cli_ok("logs", f"{DEPLOYMENT}-r0", server=other.listen)
            header = log.splitlines()[0] if log else ""
            say(f"llama-server's log on {parts[main]['host']}, fetched through agent {other.name} "
                f"(`agentd logs {DEPLOYMENT}-r0`):")
            program, _, rest = header.split(": ", 2)[-1].partition(" ")
            say(f"{Path(program).name} {rest}".replace(str(self.root), "$DIR"), indent=6)
            wanted = ("offloading", "offloaded", "model buffer size", "KV buffer size")
            lines = [ln.split(" I ", 1)[-1].strip() for ln in log.splitlines() if any(w in ln for w in wanted)]
            say("\n".join(lines), indent=6)
            if rpc is None:  # --cpu-only
                expect = f"offloaded 0/{MODEL_SHAPE['n_layers'] + 1} layers to GPU"
                if not any(expect in ln for ln in lines):
                    raise DemoFailed(f"llama-server's log does not say {expect!r}: layers went elsewhere than RAM")
                say(f"=> all {MODEL_SHAPE['n_layers']} layers run from RAM in llama-server on {parts[main]['host']}, "
                    "a host without GPUs (its RAM is the runtime's device: RuntimeInfo.host_memory)")
                return
            expect = f"offloading {parts[rpc]['layers']} repeating layers to GPU"
            if not any(expect in ln for ln in lines):
                raise DemoFailed(f"llama-server's log does not say {expect!r}: the split did not happen as planned")
            say(f"=> {parts[rpc]['layers']} of {MODEL_SHAPE['n_layers']} layers run in the ggml-rpc-server on "
                f"{parts[rpc]['host']}; the other {parts[main]['layers']} stay with llama-server on "
                f"{parts[main]['host']} (simulated GPUs: in RAM)")

    def complete(self, assignment: dict[str, Any]) -> None:
        parts = assignment["plan"]["parts"]
        main_host = next(p["host"] for p in parts if p["role"] == "main")
        via = next(a for a in self.cluster.agents.values() if a.name != main_host)
        url = f"http://{via.http_listen}/v1/completions"
        with self.timings.step(5, self.total_steps, "A real completion through the OpenAI-compatible API"):
            models = get_json(f"http://{via.http_listen}/v1/models")
            ready = [m for m in models.get("data", []) if m.get("id") == DEPLOYMENT]
            body = {"model": DEPLOYMENT, "prompt": "Once upon a time", "max_tokens": 12}
            say(f"$ curl {url} -d '{json.dumps(body)}'")
            t0 = self.timings.clock()
            try:
                out = post_json(url, body)
            except urllib.error.HTTPError as exc:
                raise DemoFailed(f"POST {url}: HTTP {exc.code}: {exc.read()[:300]!r}") from None
            took = self.timings.clock() - t0
            choice = out["choices"][0]
            say(f"model {out['model']!r}, {out['usage']['completion_tokens']} tokens in {took * 1000:.0f} ms, "
                f"finish_reason {choice['finish_reason']!r}:", indent=6)
            say(f"text: {choice['text']!r}", indent=6)
            over = (f"which ran {next(p['layers'] for p in parts if p['role'] == 'rpc')} layers over RPC"
                    if any(p["role"] == "rpc" for p in parts) else "which ran every layer on its CPUs")
            say(f"(agent {via.name} proxied the request to llama-server on {main_host}, {over}; the weights are "
                "random, so the words are noise)")
            if not ready or out["usage"]["completion_tokens"] < 1:
                raise DemoFailed(f"/v1/models lists {models} and the completion was {out}")

    def stop(self) -> None:
        with self.timings.step(6, self.total_steps, "Delete the deployment and stop the agents (drain)"):
            pids = [p.pid for p in model_servers(self.root)]
            say(f"$ agentd rm {DEPLOYMENT}")
            say(cli_ok("rm", DEPLOYMENT, server=self.first().listen), indent=6)
            self.cluster.stop(drain=True)
            deadline = self.timings.clock() + 15
            while self.timings.clock() < deadline and (left := model_servers(self.root)):
                time.sleep(0.1)
            left = model_servers(self.root)
            if left:
                raise DemoFailed(f"processes left running after the stop: {[p.pid for p in left]}")
            say(f"stopped: {len(pids)} model-server processes (pids {', '.join(map(str, pids))}) and "
                f"{len(self.cluster.agents)} agents; nothing left running")

    # ------------------------------------------------------------------ endings

    def first(self):
        assert self.cluster is not None
        return next(iter(self.cluster.agents.values()))

    def summary(self, total: float) -> None:
        rows = [["STEP", "SECONDS"]] + [[title, f"{took:.1f}"] for title, took in self.timings.rows]
        rows.append(["total (wall)", f"{total:.1f}"])
        print()
        say(_table(rows), indent=0)
        print("\nOK: every step worked.", flush=True)

    def fail(self, exc: BaseException | str) -> None:
        print(f"\nFAILED: {exc}", file=sys.stderr, flush=True)
        if self.cluster is not None:
            for name, text in self.cluster.logs():
                tail = "\n".join(text.splitlines()[-12:])
                print(f"\n--- last lines of agent {name}'s log ({self.cluster.agents[name].log_file}):\n{tail}",
                      file=sys.stderr)
            for log in sorted(self.root.rglob("runtime/logs/*/*.log")):
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-8:])
                print(f"\n--- last lines of {log}:\n{tail}", file=sys.stderr)
            self.abort()
        print(f"\nlogs kept in {self.root}", file=sys.stderr)

    def abort(self) -> None:
        if self.cluster is not None:
            with contextlib.suppress(Exception):
                self.cluster.stop(drain=True)
        kill_recorded(self.root)

    def save_state(self) -> None:
        assert self.cluster is not None
        state = {"created_root": self.created_root, "agents": {
            a.name: {"pid": a.proc.pid, "listen": a.listen, "http_listen": a.http_listen,
                     "data_dir": str(a.data_dir), "log_file": str(a.log_file)}
            for a in self.cluster.agents.values()}}
        (self.root / STATE_FILE).write_text(json.dumps(state, indent=2))

    def print_keep_instructions(self) -> None:
        assert self.cluster is not None
        first = self.first()
        cmd = agentd_shown()
        pids = ", ".join(str(a.proc.pid) for a in self.cluster.agents.values())
        say(f"""
The cluster keeps running (agent pids {pids}). Look at it:
  export AGENTD_SERVER={first.listen}
  {cmd} nodes
  {cmd} ps
  {cmd} logs {DEPLOYMENT}-r0 -f
  curl -s http://{first.http_listen}/v1/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "{DEPLOYMENT}", "prompt": "Hello", "max_tokens": 8}}'
Agents' logs: {self.root / 'cluster'}/<name>.log
Stop it (drains the model servers, then stops the agents):
  {sys.executable} -m agentd.demo --stop {self.root}""", indent=0)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


# ---------------------------------------------------------------------- --stop


def stop_kept(root: Path, timeout: float = 30.0) -> int:
    """Stop a cluster left by `--keep`: drain each agent (its model servers stop first), then SIGTERM it."""
    try:
        state = json.loads((root / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        print(f"agentd demo: {root / STATE_FILE}: {exc} (is this a directory from `--keep`?)", file=sys.stderr)
        return 2
    procs = []
    for name, a in state["agents"].items():
        proc = _agent_process(a["pid"], a["data_dir"])
        if proc is None:
            print(f"agent {name}: not running")
            continue
        request_drain(Path(a["data_dir"]))
        proc.send_signal(signal.SIGTERM)
        procs.append((name, proc))
    _, alive = psutil.wait_procs([p for _, p in procs], timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    for name, p in procs:
        print(f"agent {name} (pid {p.pid}): {'killed after ' + str(timeout) + ' s' if p in alive else 'stopped'}")
    killed = kill_recorded(root)
    if killed:
        print(f"killed leftover model-server processes {killed}")
    left = model_servers(root)
    if left:
        print(f"still running: {[p.pid for p in left]}", file=sys.stderr)
        return 1
    if state.get("created_root"):
        shutil.rmtree(root, ignore_errors=True)
        print(f"removed {root}")
    print("stopped; nothing left running")
    return 0


def _agent_process(pid: int, data_dir: str) -> psutil.Process | None:
    """The agent with this pid, if it is still the `agentd serve` of this data dir (pids get reused)."""
    try:
        p = psutil.Process(pid)
        cmdline = p.cmdline()
    except psutil.Error:
        return None
    return p if "serve" in cmdline and data_dir in cmdline else None


# ---------------------------------------------------------------------- main


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, help="where the cluster keeps its data and logs (default: a new temp dir)")
    ap.add_argument("--agents", type=int, default=2, choices=[2, 3], help="how many agents (default 2)")
    ap.add_argument("--keep", action="store_true", help="leave the cluster running and print how to use and stop it")
    ap.add_argument("--stop", type=Path, metavar="DIR", help="stop a cluster that an earlier --keep left running")
    ap.add_argument("--cpu-only", action="store_true",
                    help="agents without GPUs: the model runs from RAM (deployed with --allow-cpu-offload)")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` of the demo cleans up like Ctrl-C
    if args.stop:
        return stop_kept(args.stop.resolve())
    if args.dir:
        root = args.dir.resolve()
        if (root / "cluster").exists():
            print(f"agentd demo: {root} holds an earlier demo cluster; pick another --dir, or stop and remove it",
                  file=sys.stderr)
            return 2
        private_dir(root)  # agents' logs and data dirs: the agentd user's alone
        created = False
    else:
        root = Path(tempfile.mkdtemp(prefix="agentd-demo-"))
        created = True
    return Demo(root=root, agents=args.agents, keep=args.keep, created_root=created, cpu_only=args.cpu_only).run()


if __name__ == "__main__":
    sys.exit(main())
