"""Batched block reads through Linux's kernel asynchronous I/O (``io_submit``), called from one thread.

A batch's misses are thousands of 4 KiB reads at random offsets. Read by a pool of threads, each one
is a blocking ``preadv`` and two context switches: measured on the development VM (virtio disk,
O_DIRECT), 14 us of kernel time per read against 5.5 us when one thread submits them all and reaps
their completions in batches (and 37k against 84k reads/s). On two cores that kernel time is taken
from the training step's threads, so it is the difference between hiding the disk and slowing the
step down. ``io_submit`` is asynchronous only for O_DIRECT files (a buffered one reads inside the
call), so the store uses this reader only with ``direct_io``.

No library is needed: the four system calls go through libc's ``syscall`` with ctypes (which
releases the GIL while the kernel works), and the control blocks are one NumPy array of the kernel's
``struct iocb`` layout, filled without a Python loop.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import sys

import numpy as np

# System call numbers of io_setup, io_destroy, io_getevents and io_submit, per architecture.
_CALLS = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}

# struct iocb (linux/aio_abi.h) on a little-endian 64-bit machine: 64 bytes.
_IOCB = np.dtype([("data", "<u8"), ("key", "<u4"), ("rw_flags", "<i4"), ("opcode", "<u2"), ("reqprio", "<i2"),
                  ("fildes", "<u4"), ("buf", "<u8"), ("nbytes", "<u8"), ("offset", "<i8"), ("reserved2", "<u8"),
                  ("flags", "<u4"), ("resfd", "<u4")])
# struct io_event: the iocb's data, the iocb's address, the result (bytes read or -errno), res2.
_EVENT = np.dtype([("data", "<u8"), ("obj", "<u8"), ("res", "<i8"), ("res2", "<i8")])
_PREAD = 0  # IOCB_CMD_PREAD


class AsyncReader:
    """Reads many (offset, length) extents of one file into one buffer, ``depth`` in flight at once.

    Args:
        fd: an open file descriptor (O_DIRECT, for the reads to be asynchronous).
        depth: reads in flight at once (the kernel context's size).

    Raises:
        OSError: this machine cannot do it (not Linux x86_64/aarch64, AIO disabled, ``aio-max-nr``
            used up); the caller falls back to threads.
    """

    def __init__(self, fd: int, depth: int) -> None:
        calls = _CALLS.get(platform.machine())
        if not sys.platform.startswith("linux") or calls is None or sys.byteorder != "little":
            raise OSError(errno.ENOSYS, f"kernel AIO reads need Linux on x86_64 or aarch64 (this is "
                                        f"{sys.platform} on {platform.machine()})")
        self._setup, self._destroy, self._getevents, self._submit = calls
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.syscall.restype = ctypes.c_long
        self.fd, self.depth = fd, depth
        self._ctx = ctypes.c_ulong(0)
        if self._libc.syscall(ctypes.c_long(self._setup), ctypes.c_uint(depth), ctypes.byref(self._ctx)) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"io_setup({depth}): {os.strerror(code)}")
        self._events = np.zeros(depth, dtype=_EVENT)

    def read(self, buffer: memoryview, offsets: np.ndarray, lengths: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """Read extent i (``lengths[i]`` bytes at file offset ``offsets[i]``) into ``buffer`` at byte
        ``starts[i]``; returns [n] bytes each read got (a short one: the file ended), every read done.

        Raises:
            OSError: a read failed (after every other one in flight has finished, so none writes into
                ``buffer`` once this returns).
        """
        n = len(offsets)
        got = np.zeros(n, dtype=np.int64)
        if not n:
            return got
        base = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
        blocks = np.zeros(n, dtype=_IOCB)
        blocks["data"] = np.arange(n)
        blocks["opcode"] = _PREAD
        blocks["fildes"] = self.fd
        blocks["buf"] = base + starts.astype(np.uint64)
        blocks["nbytes"] = lengths
        blocks["offset"] = offsets
        pointers = blocks.ctypes.data + np.arange(n, dtype=np.uint64) * _IOCB.itemsize  # struct iocb *[n]
        submitted = reaped = 0
        failure: OSError | None = None
        while reaped < submitted or (submitted < n and failure is None):
            room = min(n - submitted, self.depth - (submitted - reaped))
            if room and failure is None:
                done = self._call(self._submit, self._ctx, ctypes.c_long(room),
                                  ctypes.c_void_p(pointers.ctypes.data + 8 * submitted))
                code = ctypes.get_errno() if done < 0 else 0
                if done > 0:
                    submitted += done
                elif code == errno.EINTR:
                    continue
                elif code != errno.EAGAIN or submitted == reaped:  # EAGAIN: wait for some in flight
                    failure = OSError(code or errno.EIO, f"io_submit: {os.strerror(code or errno.EIO)}")
            in_flight = submitted - reaped
            if not in_flight:
                continue
            # Wait for a quarter of those in flight: few system calls, and the queue stays busy.
            count = self._call(self._getevents, self._ctx, ctypes.c_long(max(in_flight // 4, 1)),
                               ctypes.c_long(self.depth), ctypes.c_void_p(self._events.ctypes.data), None)
            if count < 0:
                code = ctypes.get_errno()
                if code == errno.EINTR:
                    continue
                raise OSError(code, f"io_getevents: {os.strerror(code)} with {in_flight} reads in flight")
            events = self._events[:count]
            got[events["data"].astype(np.int64)] = events["res"]
            reaped += count
        if failure is not None:
            raise failure
        bad = np.flatnonzero(got < 0)
        if len(bad):
            code = int(-got[bad[0]])
            raise OSError(code, f"read of {int(lengths[bad[0]])} bytes at {int(offsets[bad[0]])}: {os.strerror(code)}")
        return got

    def _call(self, number: int, *args: object) -> int:
        return self._libc.syscall(ctypes.c_long(number), *args)

    def close(self) -> None:
        """Free the kernel context (no read is in flight between calls)."""
        if self._ctx.value:
            self._call(self._destroy, self._ctx)
            self._ctx = ctypes.c_ulong(0)
