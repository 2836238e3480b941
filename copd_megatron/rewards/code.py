"""Code-execution reward: run the completion's program against the sample's tests.

The program is the last fenced ```` ```python ```` block of the completion (else the last
plain ```` ``` ```` block, else nothing: 0). It runs, followed by ``sample.extra["tests"]``
(Python source with ``assert`` s), in a child interpreter; the reward is 1.0 if the child
ran the tests to their end and exits with status 0, and 0.0 otherwise. Whatever the program
does (loops forever, crashes, allocates without bound, forks, tries the network, exits
early with status 0 so that the tests never run) the reward is 0 and the call returns
within about ``timeout_s`` + 1 s: this function never raises on a completion (a sample
without ``tests`` is a :class:`DataError`: bad data, not a bad completion).

Limits, in the child (``sys.executable -I``: isolated mode, no user site, no ``PYTHON*``
environment variables, a minimal environment and a fresh temporary working directory):

* wall clock: ``timeout_s``; the child leads its own process group (session), and the whole
  group is SIGKILLed on timeout and after exit, so grandchildren die too;
* address space ``RLIMIT_AS`` = ``memory_mb``, CPU time ``RLIMIT_CPU``, written file size
  ``RLIMIT_FSIZE``, no core dumps. They are set by a small harness as the child's first
  statements, before any user code, rather than in ``preexec_fn``, which the Python docs
  call unsafe when the parent has threads (reward workers may);
* early exit: a random nonce, sent on stdin (never on the command line), is written to
  stdout only after the tests finished; ``sys.exit(0)`` / ``os._exit(0)`` inside the program
  therefore fails. Code that inspects the harness' frames could still find it (best effort);
* network: ``socket.socket`` (and ``socket.create_connection``, ``socket.socketpair``) raise
  before the user code runs. This is **best effort only**: code can reach ``_socket`` or
  ``ctypes`` directly. Real isolation (no network namespace, read-only filesystem, seccomp)
  needs a sandbox on the cluster (bubblewrap/nsjail, a container, or a separate sandbox
  service); run untrusted completions only there.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from copd_megatron.data.prompts import DataError, PromptSample
from copd_megatron.rewards.registry import register_verifier

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MEMORY_MB = 512

_FENCE_RE = re.compile(r"```[ \t]*(python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)

# The child's program: limits, the network switched off, then solution and tests in one
# namespace; a nonce (read from stdin, never on the command line) is written last, so a
# program that exits early with status 0 (sys.exit(0), os._exit(0)) before the tests ran
# does not pass.
_HARNESS = """\
import os, resource, socket, sys
def _cap(kind, value):
    soft, hard = resource.getrlimit(kind)
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(kind, (value, value))
_cap(resource.RLIMIT_AS, {memory_bytes})
_cap(resource.RLIMIT_CPU, {cpu_s})
_cap(resource.RLIMIT_FSIZE, {fsize_bytes})
_cap(resource.RLIMIT_CORE, 0)
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the code verifier")
socket.socket = socket.create_connection = socket.socketpair = _no_network
def _run():
    nonce, write = sys.stdin.readline().strip(), os.write
    namespace = {{"__name__": "__main__", "__builtins__": __builtins__}}
    for name in ("solution.py", "tests.py"):
        with open(name, encoding="utf-8") as f:
            source = f.read()
        try:
            exec(compile(source, name, "exec"), namespace)
        except SystemExit:
            raise SystemExit(3)  # exiting before the tests finished is a failure, whatever the code
    sys.stdout.flush()
    write(1, ("\\n" + nonce + "\\n").encode())
_run()
"""


def extract_code(completion: str) -> str | None:
    """The last ```python block (else the last ``` block) of ``completion``, or None."""
    blocks = _FENCE_RE.findall(completion)
    if not blocks:
        return None
    python = [code for lang, code in blocks if lang]
    return (python or [code for _, code in blocks])[-1]


def run_program(source: str, tests: str = "", timeout_s: float = DEFAULT_TIMEOUT_S,
                memory_mb: int = DEFAULT_MEMORY_MB) -> bool:  # fmt: skip
    """Run ``source`` then ``tests`` in a limited child interpreter; True if both finish in time."""
    nonce = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="copd_code_") as tmp:
        Path(tmp, "solution.py").write_text(source, encoding="utf-8")
        Path(tmp, "tests.py").write_text(tests, encoding="utf-8")
        harness = _HARNESS.format(memory_bytes=memory_mb * 2**20, cpu_s=int(timeout_s) + 1, fsize_bytes=16 * 2**20)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp, "LANG": "C.UTF-8"}
        # Output goes to files (bounded by RLIMIT_FSIZE), never into this process' memory.
        with open(Path(tmp, "stdout"), "wb") as out, open(Path(tmp, "stderr"), "wb") as err:
            returncode = _run_child([sys.executable, "-I", "-c", harness], tmp, env, out, err, nonce, timeout_s)
        if returncode is None:
            return False
        tail = Path(tmp, "stdout").read_bytes()[-64:].decode(errors="replace")
        if returncode != 0:
            logger.debug("code verifier: exit %s: %s", returncode, Path(tmp, "stderr").read_bytes()[-300:])
        return returncode == 0 and tail.rstrip().endswith(nonce)


def _run_child(cmd: list[str], cwd: str, env: dict, out, err, nonce: str, timeout_s: float) -> int | None:
    """The child's exit status, or None if it could not start or ran out of time."""
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=out, stderr=err,
                                start_new_session=True)  # fmt: skip
    except OSError as e:  # e.g. no processes left: the program did not run, so it did not pass
        logger.warning("code verifier could not start a child interpreter: %s", e)
        return None
    try:
        proc.communicate(input=f"{nonce}\n".encode(), timeout=timeout_s)
        return proc.returncode
    except subprocess.TimeoutExpired:
        logger.debug("code verifier: timed out after %.1f s", time.monotonic() - t0)
        _kill_group(proc)
        proc.wait()
        return None
    finally:
        _kill_group(proc)  # grandchildren the program left behind


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the child leads its own session: pgid == pid
    except (ProcessLookupError, PermissionError):
        pass  # already gone


@register_verifier("code")
def code_reward(completion: str, sample: PromptSample) -> float:
    """1.0 if the completion's program followed by ``extra["tests"]`` exits 0; else 0.0.

    ``extra["timeout_s"]`` and ``extra["memory_mb"]`` override the defaults per sample."""
    tests = sample.extra.get("tests")
    if not isinstance(tests, str):
        raise DataError(f"sample {sample.index} ({sample.domain}): extra field 'tests' is {type(tests).__name__}; "
                        "expected Python source with asserts")  # fmt: skip
    timeout_s = sample.extra.get("timeout_s", DEFAULT_TIMEOUT_S)
    memory_mb = sample.extra.get("memory_mb", DEFAULT_MEMORY_MB)
    if not isinstance(timeout_s, (int, float)) or not isinstance(memory_mb, int) or timeout_s <= 0 or memory_mb <= 0:
        raise DataError(f"sample {sample.index} ({sample.domain}): timeout_s {timeout_s!r}, memory_mb {memory_mb!r}; "
                        "expected positive numbers")  # fmt: skip
    code = extract_code(completion)
    if code is None:
        return 0.0
    return 1.0 if run_program(code, tests, float(timeout_s), memory_mb) else 0.0
