"""Building llama.cpp's ``llama-server`` once, from the copy PyPI ships.

There is no usable distribution package of ``llama-server``, but PyPI's
``llama-cpp-python`` source distribution vendors the whole of llama.cpp. This module
downloads that sdist with pip, builds only the ``llama-server`` target with CMake and
Ninja (both from PyPI, installed into this Python's environment when missing) and keeps
the binary at ``<cache>/llama.cpp/<version>/bin/llama-server``. Later calls find it
there and return at once.

The build takes 8-13 minutes of every core on a small machine. Several processes may
ask at the same time: one builds while the others wait on a file lock, and the binary
appears under its final name only when it is complete.

``ECHO_ENV_LLAMA_SERVER=/path/to/llama-server`` uses an existing binary instead.

Run ``python -m echo_env.launch.llamacpp_build`` to build (or find) it and print its path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from echo_env.errors import EngineError
from echo_env.launch.model import default_cache_dir
from echo_env.launch.process import exclusive_lock

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
"""The ``llama-cpp-python`` sdist whose vendored llama.cpp is built; also the cache folder's name."""

BINARY_ENV = "ECHO_ENV_LLAMA_SERVER"
"""Environment variable naming an existing ``llama-server`` binary to use instead of building one."""

CMAKE_FLAGS = (
    "-G", "Ninja",
    "-DCMAKE_BUILD_TYPE=Release",
    # This machine's instruction set: the binary is cached per machine, and --version
    # is checked before reuse, so a cache copied to an older CPU gets rebuilt.
    "-DGGML_NATIVE=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    # The prebuilt web UI is downloaded at configure time; the server needs no UI here.
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    # One self-contained binary that can be moved into the cache after the build.
    "-DBUILD_SHARED_LIBS=OFF",
)  # fmt: skip
"""CMake configure flags for a CPU-only, static, server-only build."""

_VERSION_TIMEOUT_S = 30.0
_LOG_TAIL_LINES = 25


def llama_cpp_dir(cache_dir: Path | None = None, version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """The folder one build of llama.cpp lives in (whether or not it is built yet).

    Args:
        cache_dir: The cache folder; ``None`` means :func:`default_cache_dir`.
        version: The ``llama-cpp-python`` version whose llama.cpp is built.

    Returns:
        ``<cache>/llama.cpp/<version>``.
    """
    return (cache_dir or default_cache_dir()) / "llama.cpp" / version


def cached_binary_path(cache_dir: Path | None = None, version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """Where the built ``llama-server`` is kept: ``<cache>/llama.cpp/<version>/bin/llama-server``."""
    return llama_cpp_dir(cache_dir, version) / "bin" / "llama-server"


def build_log_path(cache_dir: Path | None = None, version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """The build's log: ``<cache>/logs/llama-cpp-build-<version>.log``."""
    return (cache_dir or default_cache_dir()) / "logs" / f"llama-cpp-build-{version}.log"


def binary_version(binary: Path) -> str | None:
    """What ``binary --version`` prints, or None when it does not run.

    A binary that exists but does not run (wrong CPU, truncated file, missing library)
    must be rebuilt, not reused.

    Args:
        binary: The ``llama-server`` executable.

    Returns:
        Its version text (llama.cpp prints it on stderr), stripped; None on any failure.
    """
    if not binary.is_file():
        return None
    try:
        done = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=_VERSION_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return (done.stdout + done.stderr).strip() or "unknown"


def llama_server_binary(
    build: bool = True, cache_dir: Path | None = None, version: str = LLAMA_CPP_PYTHON_VERSION
) -> Path:
    """The ``llama-server`` binary to run: ``$ECHO_ENV_LLAMA_SERVER``, the cached build, or a new build.

    Args:
        build: Build it when it is not cached (8-13 minutes); False raises instead.
        cache_dir: The cache folder; ``None`` means :func:`default_cache_dir`.
        version: The ``llama-cpp-python`` version whose llama.cpp is built.

    Returns:
        The path of a binary that answers ``--version``.

    Raises:
        EngineError: ``$ECHO_ENV_LLAMA_SERVER`` does not name a working binary, the binary
            is not cached and ``build`` is False, or the build failed; the message names the fix.
    """
    override = os.environ.get(BINARY_ENV, "").strip()
    if override:
        path = Path(override).expanduser()
        if binary_version(path) is None:
            raise EngineError(
                f"{BINARY_ENV}={override} is not a llama-server binary that runs (`{path} --version` failed): "
                f"point it at a working llama-server, or unset it to build one with "
                f"`python -m echo_env.launch.llamacpp_build`"
            )
        return path.resolve()
    binary = cached_binary_path(cache_dir, version)
    if binary_version(binary) is not None:
        return binary
    if not build:
        raise EngineError(
            f"llama-server is not built yet ({binary} is missing or does not run): run "
            f"`python -m echo_env.launch.llamacpp_build` (8-13 minutes), or set {BINARY_ENV}=/path/to/llama-server"
        )
    return build_llama_server(cache_dir, version)


def build_llama_server(cache_dir: Path | None = None, version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """Build ``llama-server`` into the cache unless a working one is already there.

    Args:
        cache_dir: The cache folder; ``None`` means :func:`default_cache_dir`.
        version: The ``llama-cpp-python`` version whose vendored llama.cpp is built.

    Returns:
        The cached binary's path.

    Raises:
        EngineError: The download, the tools' install or the build failed; the message
            holds the log's path, its last lines and the likely fix.
    """
    binary = cached_binary_path(cache_dir, version)
    root = binary.parent.parent.parent  # <cache>/llama.cpp
    log_path = build_log_path(cache_dir, version)
    for folder in (root, log_path.parent):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EngineError(f"cannot create {folder}: {exc}; set ECHO_ENV_CACHE to a writable folder") from exc
    with exclusive_lock(root / f".{version}.lock", "building llama-server"):
        # Another process may have built it while this one waited for the lock.
        if binary_version(binary) is not None:
            return binary
        # Leftovers of a build that was killed: safe to remove, the lock is ours.
        for stale in root.glob(f".{version}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=root))
        try:
            with log_path.open("w", encoding="utf-8") as log:
                started = time.monotonic()
                _log(log, f"building llama-server from llama-cpp-python {version} in {work}")
                built = _build(work, version, log)
                _log(log, f"built in {time.monotonic() - started:.0f} s")
            if binary_version(built) is None:
                raise _build_error("the freshly built llama-server does not run (`--version` failed)", log_path)
            target = binary.parent.parent  # <cache>/llama.cpp/<version>
            staged = work / "install"
            (staged / "bin").mkdir(parents=True)
            shutil.copy2(built, staged / "bin" / "llama-server")
            if target.exists():
                # Outdated or broken: the --version check above rejected it.
                shutil.rmtree(target)
            os.rename(staged, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return binary


def _build(work: Path, version: str, log: TextIO) -> Path:
    """Download the sdist into ``work``, build llama-server there, and return the built binary."""
    cmake, ninja = _build_tools(log)
    sdist_dir = work / "sdist"
    _run(
        # Only this package as source: its build tools (scikit-build-core...) may be wheels.
        [sys.executable, "-m", "pip", "download", "--no-binary", "llama-cpp-python", "--no-deps",
         "-d", str(sdist_dir), f"llama-cpp-python=={version}"],
        log, "downloading the llama-cpp-python sdist",
        fix="check network access to PyPI (or a pip index that has llama-cpp-python's sdist)",
    )  # fmt: skip
    archives = sorted(sdist_dir.glob("llama_cpp_python-*.tar.gz")) + sorted(sdist_dir.glob("llama-cpp-python-*.tar.gz"))
    if not archives:
        raise _build_error(f"pip downloaded no llama-cpp-python sdist into {sdist_dir}", _log_file(log))
    src_root = work / "src"
    try:
        with tarfile.open(archives[0]) as tar:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4: refuse links out of the folder
                tar.extractall(src_root, filter="data")
            else:
                tar.extractall(src_root)  # an sdist pip fetched from the index, by version
    except (tarfile.TarError, OSError) as exc:
        raise _build_error(f"cannot unpack {archives[0].name}: {exc}", _log_file(log)) from exc
    sources = [p for p in src_root.glob("*/vendor/llama.cpp") if (p / "CMakeLists.txt").is_file()]
    if not sources:
        raise _build_error(f"{archives[0].name} holds no vendor/llama.cpp/CMakeLists.txt", _log_file(log))
    source = sources[0]
    build_dir = source / "build"
    jobs = str(max(1, len(os.sched_getaffinity(0))))
    _run(
        [cmake, "-S", str(source), "-B", str(build_dir), f"-DCMAKE_MAKE_PROGRAM={ninja}", *CMAKE_FLAGS],
        log, "configuring llama.cpp (cmake)",
        fix="install a C/C++ compiler (apt-get install build-essential) and read the log",
    )  # fmt: skip
    _run(
        [cmake, "--build", str(build_dir), "--target", "llama-server", "-j", jobs],
        log, "compiling llama-server",
        fix="read the log; out of memory shows as a killed compiler: stop other work and retry",
    )  # fmt: skip
    built = build_dir / "bin" / "llama-server"
    if not built.is_file():
        raise _build_error(f"the build finished but {built} is missing", _log_file(log))
    return built


def _build_tools(log: TextIO) -> tuple[str, str]:
    """Paths of cmake and ninja, pip-installing them into this environment when missing."""
    found = {tool: _find_tool(tool) for tool in ("cmake", "ninja")}
    missing = [tool for tool, path in found.items() if path is None]
    if missing:
        _run(
            [sys.executable, "-m", "pip", "install", *missing], log, f"installing {' and '.join(missing)} from PyPI",
            fix=f"install them by hand: {sys.executable} -m pip install {' '.join(missing)}",
        )  # fmt: skip
        found = {tool: _find_tool(tool) for tool in found}
    cmake, ninja = found["cmake"], found["ninja"]
    if cmake is None or ninja is None:
        raise _build_error(
            f"cmake or ninja is still missing after pip install (looked in {Path(sys.executable).parent} and PATH)",
            _log_file(log),
        )
    return cmake, ninja


def _find_tool(name: str) -> str | None:
    """The tool in this environment's bin folder (where pip puts it), else on PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def _log_file(log: TextIO) -> Path:
    return Path(log.name)


def _log(log: TextIO, message: str) -> None:
    log.write(f"### {message}\n")
    log.flush()


def _run(cmd: Sequence[str], log: TextIO, what: str, fix: str) -> None:
    _log(log, f"{what}: $ {' '.join(cmd)}")
    env = dict(os.environ)
    env.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    try:
        code = subprocess.run(
            list(cmd), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, check=False
        ).returncode
    except OSError as exc:
        raise _build_error(f"{what} failed to start ({exc}); {fix}", _log_file(log)) from exc
    if code != 0:
        raise _build_error(f"{what} failed (exit status {code}); {fix}", _log_file(log))


def _build_error(what: str, log_path: Path) -> EngineError:
    try:
        with log_path.open("r", encoding="utf-8", errors="replace") as handle:
            tail = "".join(deque(handle, maxlen=_LOG_TAIL_LINES)).rstrip()
    except OSError:
        tail = ""
    return EngineError(
        f"building llama-server failed: {what}. Retry with `python -m echo_env.launch.llamacpp_build`, "
        f"or set {BINARY_ENV}=/path/to/llama-server.\nLog: {log_path}\n--- last lines ---\n{tail}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Build (or find) llama-server and print its path.

    Args:
        argv: Ignored apart from ``-h``/``--help``; the build has no options.

    Returns:
        0 on success, 2 when the build failed (the error is printed).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    try:
        binary = llama_server_binary(build=True)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(binary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
