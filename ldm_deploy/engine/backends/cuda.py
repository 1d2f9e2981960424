"""Thin helpers over cuda-python's runtime bindings (`cuda.bindings.runtime`): error checks,
device facts, one stream, stream-ordered device arrays, and stream capture into a graph.

Why cuda-python and not pycuda: pycuda ships no binary wheels (installing it builds C++ against
a local CUDA toolkit), while cuda-python installs from wheels with the driver alone, and NVIDIA's
TensorRT samples moved to it.

UNVERIFIED: written against the documented cuda-python API (12.6+, where the modules moved to
`cuda.bindings`) and checked here only for import and signatures; nothing in this file has run
on a GPU in this project yet. `cuda` is imported lazily, inside these functions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ldm_deploy.errors import BackendUnavailable

log = logging.getLogger(__name__)


def runtime():
    """The `cuda.bindings.runtime` module (or its pre-12.6 name); BackendUnavailable if absent."""
    try:
        from cuda.bindings import runtime as rt
    except ImportError:
        try:
            from cuda import cudart as rt  # cuda-python < 12.6
        except ImportError:
            raise BackendUnavailable(
                "the tensorrt backend needs cuda-python for device memory and streams: pip install cuda-python"
            ) from None
    return rt


class CudaError(RuntimeError):
    """A CUDA runtime call failed (our bug or the device's state, not the user's input)."""


def check(result, what: str = "CUDA call"):
    """Unpack cuda-python's (error, *values) result; raise CudaError on failure."""
    rt = runtime()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != rt.cudaError_t.cudaSuccess:
        name = rt.cudaGetErrorName(err)[1]
        raise CudaError(f"{what} failed: {name.decode() if isinstance(name, bytes) else name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def gpu_count() -> int:
    """CUDA devices visible to this process; 0 without a driver or a device."""
    try:
        rt = runtime()
    except BackendUnavailable:
        return 0
    err, count = rt.cudaGetDeviceCount()
    return count if err == rt.cudaError_t.cudaSuccess else 0


@dataclass(frozen=True)
class DeviceFacts:
    name: str  # "NVIDIA H100 80GB HBM3"
    compute_capability: str  # "9.0"
    memory: int  # bytes


def device_facts(device: int = 0) -> DeviceFacts:
    rt = runtime()
    prop = check(rt.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = prop.name.split(b"\0", 1)[0].decode() if isinstance(prop.name, bytes) else str(prop.name)
    return DeviceFacts(name.strip(), f"{prop.major}.{prop.minor}", int(prop.totalGlobalMem))


class Stream:
    """A non-blocking CUDA stream: every copy, run and graph launch of a backend goes here."""

    def __init__(self):
        rt = runtime()
        self.rt = rt
        self.handle = check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreate")
        self.capturing = False  # set by Graph while it records this stream

    def __int__(self) -> int:
        return int(self.handle)

    def sync(self) -> None:
        check(self.rt.cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")


class DeviceArray:
    """A device buffer with a numpy shape and dtype; freed, stream-ordered, when dropped."""

    def __init__(self, memory: "Memory", ptr: int, shape: tuple[int, ...], dtype):
        self.memory, self.ptr = memory, ptr
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.host = None  # the source of a pending upload, kept alive until this array goes

    def __del__(self):
        try:
            self.memory.free_async(self.ptr)
        except Exception:  # interpreter shutdown: the module or the context may be gone
            pass

    def __repr__(self):
        return f"DeviceArray({self.shape}, {self.dtype}, 0x{self.ptr:x})"


class Memory:
    """Device memory on one stream. Arrays come from the stream-ordered pool (cudaMallocAsync):
    freeing one never synchronises, and the pool keeps freed memory for the next call instead
    of returning it to the driver at every synchronisation."""

    def __init__(self, stream: Stream, device: int = 0):
        rt = self.rt = runtime()
        self.stream = stream
        self.deferred: list[int] = []  # frees asked for while the stream was being captured
        try:
            from cuda.bindings import driver

            pool = check(rt.cudaDeviceGetDefaultMemPool(device), "cudaDeviceGetDefaultMemPool")
            keep = driver.cuuint64_t(2**64 - 1)
            check(rt.cudaMemPoolSetAttribute(pool, rt.cudaMemPoolAttr.cudaMemPoolAttrReleaseThreshold, keep),
                  "cudaMemPoolSetAttribute")
        except (ImportError, CudaError) as e:  # only a speed matter: say so once
            log.debug("could not keep freed device memory in the pool (%s)", e)

    def empty(self, shape, dtype=np.float32) -> DeviceArray:
        nbytes = max(int(np.prod(shape)) * np.dtype(dtype).itemsize, 1)
        ptr = check(self.rt.cudaMallocAsync(nbytes, self.stream.handle), "cudaMallocAsync")
        return DeviceArray(self, int(ptr), shape, dtype)

    def upload(self, array: np.ndarray) -> DeviceArray:
        array = np.ascontiguousarray(array)
        out = self.empty(array.shape, array.dtype)
        check(self.rt.cudaMemcpyAsync(out.ptr, array.ctypes.data, array.nbytes,
                                      self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream.handle),
              "cudaMemcpyAsync (upload)")
        out.host = array
        return out

    def download(self, array: DeviceArray) -> np.ndarray:
        host = np.empty(array.shape, array.dtype)
        check(self.rt.cudaMemcpyAsync(host.ctypes.data, array.ptr, array.nbytes,
                                      self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream.handle),
              "cudaMemcpyAsync (download)")
        self.stream.sync()
        return host

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        """Device-to-device copy on the stream (no synchronisation)."""
        check(self.rt.cudaMemcpyAsync(dst, src, nbytes, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice,
                                      self.stream.handle), "cudaMemcpyAsync (device to device)")

    def free_async(self, ptr: int) -> None:
        """Free a pool array, stream-ordered. While the stream is captured (the garbage collector
        may drop an array then) the free waits: captured, it would become part of the graph."""
        if self.stream.capturing:
            self.deferred.append(ptr)
            return
        for p in [*self.deferred, ptr]:
            self.rt.cudaFreeAsync(p, self.stream.handle)
        self.deferred = []

    def alloc(self, nbytes: int) -> int:
        """Long-lived memory (scratch, graph arenas), outside the pool."""
        return int(check(self.rt.cudaMalloc(max(nbytes, 1)), "cudaMalloc"))

    def free(self, ptr: int) -> None:
        """Free long-lived memory; the stream is drained first (cudaFree waits for the device anyway)."""
        self.stream.sync()
        check(self.rt.cudaFree(ptr), "cudaFree")


class Graph:
    """An executable CUDA graph recorded from a stream."""

    def __init__(self, stream: Stream, record) -> None:
        """Run `record()` with `stream` in capture mode; everything it enqueues on the stream
        becomes the graph. A failure inside ends the capture before re-raising."""
        rt = self.rt = runtime()
        self.stream = stream
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        check(rt.cudaStreamBeginCapture(stream.handle, mode), "cudaStreamBeginCapture")
        stream.capturing = True
        try:
            record()
        except BaseException:
            rt.cudaStreamEndCapture(stream.handle)  # leave the stream usable; the error is the cause
            raise
        finally:
            stream.capturing = False
        graph = check(rt.cudaStreamEndCapture(stream.handle), "cudaStreamEndCapture")
        try:
            self.exec = check(rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        finally:
            rt.cudaGraphDestroy(graph)

    def launch(self) -> None:
        check(self.rt.cudaGraphLaunch(self.exec, self.stream.handle), "cudaGraphLaunch")

    def destroy(self) -> None:
        self.rt.cudaGraphExecDestroy(self.exec)
