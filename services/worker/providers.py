"""Which ONNX Runtime execution provider a worker runs on, and proof that it got it.

ONNX Runtime falls back to the CPU *silently* when a session asked for CUDA cannot create the
CUDA provider (a missing libcublasLt, no driver): it logs a warning on stderr and returns a
CPU session. A worker that was asked for CUDA and serves from the CPU would report healthy at
a hundredth of the speed, so here:

- `choose_providers("cuda")` first preloads CUDA/cuDNN from pip packages (ORT's
  `preload_dlls`, so `onnxruntime-gpu[cuda,cudnn]` in the venv is enough), then loads ORT's
  CUDA provider library itself and, when that fails, raises `ProviderError` naming the
  libraries that cannot be found;
- `assert_provider(session, wanted)` checks what a created session really runs on;
- "auto" picks CUDA only when that same check passes, and logs which provider and why.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import logging
import mmap
import struct
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

import onnxruntime as ort

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
PREFERENCES = ("auto", "cpu", "cuda")
INSTALL_HINT = ("install the CUDA libraries as pip packages: pip install 'onnxruntime-gpu[cuda,cudnn]' "
                "(`make run` does this on a machine where nvidia-smi exists)")


class ProviderError(RuntimeError):
    """CUDA was asked for and cannot run; the message says why (the worker refuses to start)."""


def ort_packages() -> dict[str, str]:
    """The installed pip distributions that provide the `onnxruntime` module (name → version).
    Two at once (onnxruntime and onnxruntime-gpu) overwrite each other's files."""
    found = {}
    for name in ("onnxruntime", "onnxruntime-gpu"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


@functools.lru_cache(maxsize=1)
def preload_cuda_libraries() -> tuple[str, ...]:
    """Load CUDA and cuDNN from the nvidia-* pip packages (or the system) into this process
    before a CUDA session is made; once per process. ORT's `preload_dlls` (≥ 1.21) prints what
    it failed to load; those lines are returned (and logged), not printed."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return ()
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            preload(cuda=True, cudnn=True)
    except Exception as exc:  # never fatal by itself: the probe below decides
        out.write(f"preload_dlls failed: {exc}\n")
    lines = tuple(line.strip() for line in out.getvalue().splitlines() if line.strip())
    for line in lines:
        log.debug("onnxruntime.preload_dlls: %s", line)
    return lines


def elf_needed(path: Path) -> list[str]:
    """DT_NEEDED entries (shared libraries a library links against) of a 64-bit little-endian
    ELF file; [] when it is not one. Used to name every missing CUDA library, not only the
    first one the dynamic loader stops at."""
    with open(path, "rb") as f:  # mapped, not read: the CUDA provider library is ~300 MB
        if f.read(6) != b"\x7fELF\x02\x01":
            return []
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _dt_needed(data)


def _dt_needed(data: Any) -> list[str]:
    """The DT_NEEDED strings of an ELF64 image: its SHT_DYNAMIC section, names in the linked strtab."""
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    needed = []
    for _name, sh_type, _flags, _addr, offset, size, link, _info, _align, entsize in sections:
        if sh_type != 6:  # SHT_DYNAMIC
            continue
        strtab = sections[link][4]
        for pos in range(offset, offset + size, entsize or 16):
            tag, value = struct.unpack_from("<qQ", data, pos)
            if tag == 0:
                break
            if tag == 1:  # DT_NEEDED
                end = data.find(b"\0", strtab + value)
                needed.append(data[strtab + value:end].decode())
    return needed


def _loadable(name: str) -> bool:
    try:
        ctypes.CDLL(name)
    except OSError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def cuda_unavailable_reason() -> str | None:
    """Why ONNX Runtime's CUDA provider cannot run in this process, or None when its library
    loads (with preloaded CUDA libraries). Does not need a session; cached per process."""
    available = ort.get_available_providers()
    packages = ort_packages()
    installed = ", ".join(f"{k} {v}" for k, v in packages.items()) or f"onnxruntime {ort.__version__}"
    if CUDA not in available:
        return (f"this ONNX Runtime build ({installed}) has no CUDAExecutionProvider (it has {available}); "
                "install onnxruntime-gpu instead of onnxruntime")
    preload_msgs = preload_cuda_libraries()
    capi = Path(ort.__file__).parent / "capi"
    lib = capi / "libonnxruntime_providers_cuda.so"
    if not lib.exists():  # Windows or an unusual layout: the session check decides
        return None
    try:
        ctypes.CDLL(str(capi / "libonnxruntime_providers_shared.so"), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(lib))
    except OSError as exc:
        missing = [name for name in elf_needed(lib) if not _loadable(name)]
        cuda_major = getattr(ort, "cuda_version", "")  # the CUDA version this ORT build wants
        parts = [f"ONNX Runtime's CUDA provider ({installed}) cannot load: {exc}"]
        if missing:
            parts.append("missing libraries: " + ", ".join(missing))
        if "libcuda.so.1" in missing:
            parts.append("libcuda.so.1 is the NVIDIA driver: this machine has no NVIDIA driver/GPU")
        if cuda_major:
            parts.append(f"this build wants CUDA {cuda_major}")
        if missing != ["libcuda.so.1"]:  # CUDA/cuDNN themselves are missing, not only the driver
            parts.append(INSTALL_HINT)
        if preload_msgs and not missing:
            parts.append("preload_dlls said: " + " | ".join(preload_msgs))
        return "; ".join(parts)
    return None


def choose_providers(preference: str = "auto") -> list[str]:
    """The provider list for a session: "cpu" → CPU; "cuda" → CUDA (then CPU for the few
    shape nodes ORT places there) or ProviderError saying why not; "auto" → CUDA when its
    library loads, CPU otherwise, logging which and why."""
    if preference not in PREFERENCES:
        raise ProviderError(f"provider must be one of {', '.join(PREFERENCES)}, not {preference!r}")
    if preference == "cpu":
        return [CPU]
    reason = cuda_unavailable_reason()
    if preference == "cuda":
        if reason:
            raise ProviderError(f"--provider cuda cannot run: {reason}")
        return [CUDA, CPU]
    if reason:
        log.info("provider auto: CPU, because %s", reason)
        return [CPU]
    log.info("provider auto: CUDA (ONNX Runtime's CUDA provider and its libraries load)")
    return [CUDA, CPU]


def resolve_provider(preference: str = "auto") -> str:
    """"cpu" or "cuda": what `choose_providers(preference)` picks, as an Engine's `provider`."""
    return "cuda" if choose_providers(preference)[0] == CUDA else "cpu"


def assert_provider(session: Any, wanted: str | Sequence[str]) -> None:
    """Raise ProviderError unless `session` (an InferenceSession, or anything with
    `get_providers()`, or the provider list itself) really runs on the first wanted provider —
    ORT returns a CPU session when CUDA fails to initialise, logging only a warning."""
    want = wanted if isinstance(wanted, str) else wanted[0]
    want = {"cuda": CUDA, "cpu": CPU}.get(want, want)
    actual = list(session.get_providers()) if hasattr(session, "get_providers") else (
        [session] if isinstance(session, str) else list(session))
    if actual and actual[0] == want:
        return
    reason = cuda_unavailable_reason() if want == CUDA else None
    raise ProviderError(
        f"asked ONNX Runtime for {want} but the session runs on {actual or 'nothing'} (ORT falls back "
        f"silently; its own message is in the log above)" + (f": {reason}" if reason else ""))


def create_session(model: str | Path | bytes, options: ort.SessionOptions | None,
                   preference: str = "auto") -> ort.InferenceSession:
    """An InferenceSession on the provider `preference` picks, checked to really run there."""
    providers = choose_providers(preference)
    source = model if isinstance(model, bytes) else str(model)
    session = ort.InferenceSession(source, sess_options=options, providers=providers)
    assert_provider(session, providers)
    return session
