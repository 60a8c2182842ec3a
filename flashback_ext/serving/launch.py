"""Start and stop a local vLLM OpenAI-compatible server for an exported checkpoint.

vLLM lives in its own environment (it pins its own torch): the server runs with that
environment's python (``FLASHBACK_VLLM_PYTHON``, else ``.venv-vllm/bin/python`` of this source
tree, made by ``make vllm-env``). Waits are bounded and the server's whole process group is
killed on exit, whatever happened.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

from .transports import EngineError

__all__ = ["vllm_python", "free_port", "VLLMServer"]

_SOURCE_ROOT = Path(__file__).resolve().parents[2]


def vllm_python() -> Optional[Path]:
    """The python of the vLLM environment, or None when there is none."""
    env = os.environ.get("FLASHBACK_VLLM_PYTHON")
    path = Path(env) if env else _SOURCE_ROOT / ".venv-vllm" / "bin" / "python"
    return path if path.is_file() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """``with VLLMServer(folder) as server: ... server.url ...``: ``vllm serve`` of ``folder``
    on localhost with prefix caching and prompt-token details (the cached-token counts) on.

    ``dtype``, ``max_model_len`` and ``block_size`` go to vLLM (32 is the CPU backend's
    smallest efficient block: the prefix cache reuses whole blocks); ``threads`` sets
    ``OMP_NUM_THREADS`` and, on the CPU, binds vLLM's threads to cores ``0..threads-1``;
    ``enforce_eager=False`` lets vLLM compile its model (a minute or more of start-up here);
    ``extra_args`` are more ``vllm serve`` flags (``--tensor-parallel-size 2`` on GPUs)."""

    def __init__(self, model, *, port: Optional[int] = None, dtype: str = "float32",
                 max_model_len: int = 4096, block_size: int = 32, kv_cache_gb: int = 1,
                 threads: Optional[int] = None, enforce_eager: bool = True,
                 startup_timeout: float = 300.0,
                 extra_args: tuple = (), log_path=None, python=None) -> None:
        self.python = Path(python) if python else vllm_python()
        if self.python is None:
            raise EngineError("no vLLM environment: run `make vllm-env` (or set "
                              "FLASHBACK_VLLM_PYTHON to a python that imports vllm)")
        self.model = str(Path(model).expanduser().resolve())
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.startup_timeout = startup_timeout
        self.args = [str(self.python), "-m", "vllm.entrypoints.openai.api_server",
                     "--model", self.model, "--host", "127.0.0.1", "--port", str(self.port),
                     "--dtype", dtype, "--max-model-len", str(max_model_len),
                     "--block-size", str(block_size), "--enable-prefix-caching",
                     "--enable-prompt-tokens-details",
                     *(["--enforce-eager"] if enforce_eager else []), *extra_args]
        self.env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gb))
        if threads:
            self.env.update(OMP_NUM_THREADS=str(threads),
                            VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}")
        self.log_path = Path(log_path) if log_path else None
        self.proc: Optional[subprocess.Popen] = None
        self._log = None

    def start(self) -> "VLLMServer":
        self._log = open(self.log_path, "w") if self.log_path else None
        self.proc = subprocess.Popen(self.args, env=self.env,
                                     stdout=self._log or subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:  # whatever ends the wait (Ctrl-C too), the server must not outlive it
            deadline = time.monotonic() + self.startup_timeout
            while time.monotonic() < deadline:
                status = self.proc.poll()
                if status is not None:
                    where = f"; its log: {self.log_path}" if self.log_path else ""
                    raise EngineError(f"vllm serve {self.model} exited with status {status} "
                                      f"while starting{where}")
                if self.healthy():
                    return self
                time.sleep(1.0)
            raise EngineError(f"vllm serve {self.model} was not healthy after "
                              f"{self.startup_timeout:.0f} s")
        except BaseException:
            self.stop()
            raise

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2.0) as resp:
                return resp.status == 200
        except (OSError, ValueError):
            return False

    def stop(self) -> None:
        """Kill the server's process group (its engine core and workers too); bounded wait."""
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # workers that outlived the leader still hold the group id
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc = None

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":  # python -m flashback_ext.serving.launch EXPORT [PORT]: serve, Ctrl-C stops
    with VLLMServer(sys.argv[1], port=int(sys.argv[2]) if len(sys.argv) > 2 else None) as s:
        print(f"serving {s.model} at {s.url} (Ctrl-C stops)", flush=True)
        try:
            s.proc.wait()
        except KeyboardInterrupt:
            pass
