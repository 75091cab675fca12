"""Compiled programs shared and deferred: `ProgramCache` gives groups of the same shapes one compilation of each
program, and `Later` compiles a group's evaluate after the group is handed over (groups.CompiledAhead)."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from typing import Any, Callable

log = logging.getLogger("fusion_jax")


class ProgramCache:
    """Compiled programs by their lowered program, argument types and compiler options: the groups of one sweep
    that have the same shapes (two backbones of one feature size, both with or both without noise)
    share theirs. Thread-safe; a build that needs a program another thread is compiling waits for it, and
    compiles it itself should that compilation fail (none that failed is kept). After `close()` it compiles
    nothing more. `compiled` and `shared` count the programs compiled and those taken from another group."""

    def __init__(self):
        self._lock, self._programs, self.compiled, self.shared = threading.Lock(), {}, 0, 0
        self._closed = False

    def close(self) -> None:
        """Refuse compilations from now on (CancelledError): a build in progress stops at its next program, so
        that a sweep which ends waits for the compilations under way only."""
        with self._lock:
            self._closed = True

    def clear(self) -> None:
        """Forget the programs compiled (those compiling stay): once no group is left to build, the groups that
        use a program hold it, and it is freed with the last of them (megabytes of host memory each)."""
        with self._lock:
            for key in [key for key, future in self._programs.items() if future.done()]:
                del self._programs[key]

    @property
    def held(self) -> int:
        """How many programs the cache holds (or compiles) now."""
        with self._lock:
            return len(self._programs)

    def __call__(self, lowered: Any, options: dict | None = None) -> Any:
        # The text leaves out the arguments a program does not read (init does not read the pairs),
        # while the compiled program still checks them: the argument types are part of the key.
        key = (lowered.as_text(), str(lowered.in_tree), str(lowered.args_info),
               repr(sorted((options or {}).items())))
        while True:
            with self._lock:
                future, mine = self._programs.get(key), key not in self._programs
                if mine and self._closed:
                    raise concurrent.futures.CancelledError("the sweep has ended: no more programs compile")
                if mine:
                    future = self._programs[key] = concurrent.futures.Future()
            if mine:
                try:
                    compiled = lowered.compile(options)
                except BaseException as e:
                    with self._lock:  # not kept: a group of these shapes compiles again (memory may be free then)
                        del self._programs[key]
                    future.set_exception(e)
                    raise
                future.set_result(compiled)
                with self._lock:
                    self.compiled += 1
                return compiled
            # exception() rather than result(): raising the other group's error here would add this group's
            # frames to its traceback.
            if future.exception() is not None:  # the group that compiled it failed (out of memory?): try on our own
                continue
            compiled = future.result()
            with self._lock:
                self.shared += 1
            return compiled


class Later:
    """A program compiled after its group is handed over, by `make()`: in `compile()` (CompiledAhead
    calls it in the thread that built the group), or in the first call if none came before. A call
    waits for a compilation in progress, and compiles again where the one before it failed (out of
    memory while another group trained, say), raising that error if it fails too. `seconds`: the
    compilations' duration; `waited`: how long calls waited for them (or compiled)."""

    def __init__(self, name: str, make: Callable[[], Any]):
        self.name, self.seconds, self.waited = name, 0.0, 0.0
        self._make, self._compiled, self._lock = make, None, threading.Lock()

    def compile(self) -> None:
        """Compile, unless it is compiled or another thread is compiling it (then return at once). A failure is
        logged, and left to the first call, which tries again."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            self._compile()
        except Exception as e:  # noqa: BLE001 - not this thread's to raise: the call compiles again
            if not isinstance(e.__cause__, concurrent.futures.CancelledError):  # the sweep ended: it will not be called
                log.warning("%s: compilation failed in the background (%s); it compiles again when the group "
                            "evaluates", self.name, repr(e.__cause__ or e)[:500])
        finally:
            self._lock.release()

    def settle(self) -> None:
        """Wait for a compilation in progress in another thread (a call's), if any."""
        with self._lock:
            pass

    def _compile(self) -> None:
        """Compile under the lock, unless compiled; a failure is a RuntimeError naming the program, caused by it."""
        if self._compiled is not None:
            return
        t0 = time.perf_counter()
        try:
            self._compiled = self._make()
        except Exception as e:
            raise RuntimeError(f"{self.name}: compilation failed: {e!r}") from e
        finally:
            self.seconds += time.perf_counter() - t0
        self._make = None  # and what it holds (the lowered program)

    def __call__(self, *args):
        t0 = time.perf_counter()
        with self._lock:
            self._compile()
        self.waited += time.perf_counter() - t0
        return self._compiled(*args)
