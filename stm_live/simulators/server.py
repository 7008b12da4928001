"""asyncio TCP server speaking the Nanonis protocol in front of a ``SimulatedController``.

* Binds 127.0.0.1 by default; accepts up to 4 connections at once (as the real controller);
  a fifth is closed at once.
* Each connection is served serially in its own task; every controller call runs on one
  worker thread (``run_in_executor``), so blocking waits never stall the event loop or the
  other connections. Rows render on the controller's own render thread, ahead of the scan
  (``SimulatedController.render_in_background``): no controller call waits on a render, so
  cheap commands answer at once while a large frame renders, and the scan clock (hence
  Scan.WaitEndOfLine) waits only for the rows an event fills.
* A cassette (``simulators/cassette.Cassette``: a recorded session), when given, answers
  each request before the controller does; what it leaves (None) goes to the controller.
* Every reply leaves through the fault layer (``faults.FaultLayer``: the scenario's
  ``faults:`` section, or ``faults=``), which may delay it, cut it, or drop the connection,
  and may refuse new connections for a while.
* Replies are header + body in one write, with every documented return field and the
  error section (``devices/protocol.py`` builds them from its command table).
* Release profiles: the server speaks the layouts of one Nanonis release
  (``nanonis_release``, default ``protocol.DEFAULT_RELEASE`` = R14718; Util.VersionGet
  reports it). Requests of older/newer clients are accepted when another documented layout
  of the command fits the body exactly (NANONIS_PROTOCOL_EXT.md §2.3); a command the
  release does not have is answered "Unknown command".
* One handler per command: a ``_h_*`` method here (scan clock, waits, tip physics), a
  module handler in ``simulators/modules.py`` (HANDLERS), or the shared plain Get/Set of
  module settings (modules.PLAIN); module handlers run on the controller thread under the
  controller lock.
* Scan.WaitEndOfLine / WaitEndOfScan return on the NEXT event after the request arrived,
  or with ``timed out = 1`` at their timeout (the line fields then repeat the last
  completed line). A stopped or paused scan raises no event: a pending wait times out.
  A timeout of -1 waits until an event, the client hanging up, or the server stopping.
  Signals.ValGet/ValsGet answer at once (no Tap delay).
* Bad input: a header that does not parse (random bytes, bad name, negative size, a body
  size over ``REQUEST_BODY_LIMIT``) closes that connection; a message left unfinished for
  ``read_timeout_s`` closes it; an unknown command, a body no layout fits, or a value out
  of range gets an error reply and the connection stays up. Other connections are
  unaffected. Util.Quit is answered, then that connection is closed ([ours]).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stm_live.devices import protocol as P
from stm_live.simulators import modules as M
from stm_live.simulators.controller import SimulatedController
from stm_live.simulators.faults import Fault, FaultLayer
from stm_live.simulators.modules import ControllerError

__all__ = ["MAX_CONNECTIONS", "RunningServer", "SimServer", "start_server_thread"]

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 4
# No request of the table needs more than a few kB (PropsSet strings); 1 MiB bounds memory.
REQUEST_BODY_LIMIT = min(P.MAX_BODY_BYTES, 1 << 20)
PROPS_LAYOUTS = (None, "r13742", "extended")  # None: the release's own layout
_MAX_BLOCK_S = 60.0  # cap on simulated blocking moves (real seconds)
_REOPEN_TRIES = 50  # a refusal's end: tries to listen again on the same port, 0.2 s apart
_READER: contextvars.ContextVar[asyncio.StreamReader] = contextvars.ContextVar("sim_reader")
_QUIT: contextvars.ContextVar[list] = contextvars.ContextVar("sim_quit")  # Util.Quit on this connection


class SimServer:
    """The protocol front end; ``start`` binds, ``close`` stops (both on the server's loop).

    ``faults``: the faults to inject (a ``FaultLayer`` or a list of ``Fault``); None takes the
    controller scenario's ``faults:`` section. ``cassette``: anything with ``answer(name,
    request message) -> reply bytes | None``, asked first (None: the controller answers).
    """

    def __init__(
        self,
        controller: SimulatedController,
        *,
        props_layout: str | None = None,
        max_connections: int = MAX_CONNECTIONS,
        read_timeout_s: float = 10.0,
        nanonis_release: int = P.DEFAULT_RELEASE,
        faults: FaultLayer | Sequence[Fault] | None = None,
        cassette=None,
    ):
        if props_layout not in PROPS_LAYOUTS:
            raise ValueError(f"props_layout must be one of {PROPS_LAYOUTS}, got {props_layout!r}")
        if nanonis_release not in P.RELEASES:
            raise ValueError(f"nanonis_release must be one of {P.RELEASES}, got {nanonis_release!r}")
        self.controller = controller
        self.props_layout = props_layout
        self.release = nanonis_release
        controller.nanonis_release = nanonis_release  # release-dependent enums (Piezo.DriftCompSet)
        if getattr(controller, "modules", None) is None:
            controller.modules = M.ModuleState()
        self.max_connections = max_connections
        self.read_timeout_s = read_timeout_s
        if faults is None:
            faults = controller.scenario.faults
        self.faults = faults if isinstance(faults, FaultLayer) else FaultLayer(faults)
        self.cassette = cassette
        self._refusing = False  # a refuse fault has closed the listener
        self._reopen: asyncio.Task | None = None  # its wait to listen again
        self._closing = False
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sim-controller")
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._ticker: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flag: asyncio.Event | None = None  # replaced and set on every controller event
        self._kick: asyncio.Event | None = None
        self.connections = 0
        self.refused = 0
        self.host = ""
        self.port = 0
        self._handlers = {name: self._handler_for(name) for name in P.LAYOUTS}

    def _handler_for(self, name: str):
        """One handler per command: a method here (waits, scan clock), a module handler
        (modules.HANDLERS), or the shared plain Get/Set of module settings (modules.PLAIN)."""
        own = getattr(self, "_h_" + name.replace(".", "_"), None)
        if own is not None:
            return own
        c = self.controller
        fn = M.HANDLERS.get(name)
        if fn is None:
            if name not in M.PLAIN:
                raise RuntimeError(f"no handler for {name}")
            fields = P.COMMANDS[name].response
            if name.endswith("Get"):

                def fn(ctrl, mods, **args):
                    return mods.plain_get(name, args, fields)
            else:

                def fn(ctrl, mods, **args):
                    mods.plain_set(name, args)

        async def handler(**args):
            def run():
                with c._lock:
                    return fn(c, c.modules, **args)

            return await self._call(run)

        return handler

    # ------------------------------------------------------------------ lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._loop = asyncio.get_running_loop()
        self._flag = asyncio.Event()
        self._kick = asyncio.Event()
        self.controller.on_event = self._from_thread(self._wake)
        self.controller.on_render = self._from_thread(self._kick.set)
        self.controller.render_in_background(True)
        self._server = await asyncio.start_server(self._accept, host, port)
        self.host, self.port = self._server.sockets[0].getsockname()[:2]
        self._ticker = asyncio.create_task(self._tick_loop())
        self.faults.start(self._refuse)

    def _from_thread(self, fn):
        """``fn`` scheduled on the server's loop from any thread (a no-op once it closed)."""
        loop = self._loop

        def call() -> None:
            try:
                loop.call_soon_threadsafe(fn)
            except RuntimeError:  # the loop closed
                pass

        return call

    async def close(self) -> None:
        self._closing = True
        self.faults.stop()
        if self._reopen is not None:
            self._reopen.cancel()
        if self._server is not None:
            self._server.close()
        tasks = [t for t in list(self._tasks) + [self._ticker] if t is not None]
        for t in tasks:
            t.cancel()
        if tasks:  # bounded: a connection stuck in a blocking controller call must not hang stop()
            await asyncio.wait(tasks, timeout=1.0)
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            except TimeoutError:
                pass
        self.controller.on_event = self.controller.on_render = None
        self.controller.render_in_background(False)
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _wake(self) -> None:
        c = self.controller
        self.faults.scan_event(c.frame_index, c.last_event.line, c.last_event.movement)
        old, self._flag = self._flag, asyncio.Event()
        old.set()

    def _refuse(self, seconds: float) -> None:
        """Stop listening for ``seconds`` (the OS refuses new connections; open ones stay)."""
        if self._server is None or self._refusing or self._closing:
            return
        self._refusing = True
        self._server.close()
        self._reopen = self._loop.create_task(self._listen_again(seconds))

    async def _listen_again(self, seconds: float) -> None:
        try:
            await asyncio.sleep(seconds)
        finally:
            self._reopen = None  # close() cancels the wait only, never a half-made listener
        try:
            for _ in range(_REOPEN_TRIES):
                if self._closing:
                    return
                try:
                    server = await asyncio.start_server(self._accept, self.host, self.port)
                except OSError as exc:  # the port is briefly taken: try again
                    log.warning("cannot listen on %s:%s again yet: %s", self.host, self.port, exc)
                    await asyncio.sleep(0.2)
                    continue
                if self._closing:
                    server.close()
                else:
                    self._server = server
                return
            log.error("simulated controller could not listen on %s:%s again", self.host, self.port)
        finally:
            self._refusing = False

    async def _call(self, fn, *args, **kwargs):
        """Run a controller method on the controller thread."""
        return await self._loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    async def _tick_loop(self) -> None:
        """Scan clock: process due end-of-line events, render ahead, sleep until the next
        event (or until rows land, or a scan action)."""
        c = self.controller

        def tick():
            c.advance()
            c.prefetch()
            return c.next_event_delay()

        while True:
            self._kick.clear()  # before the tick: a kick during it is not lost
            try:
                delay = await self._call(tick)
            except asyncio.CancelledError:
                raise
            except Exception:  # a model error must not stop the clock for every client
                log.exception("simulated scan clock failed; stopping the scan")
                await self._call(c.scan_action, "stop")
                delay = None
            sleep = 0.05 if delay is None else min(max(delay, 0.0005), 0.05)
            try:
                await asyncio.wait_for(self._kick.wait(), sleep)
            except TimeoutError:
                pass

    # ------------------------------------------------------------------ connections

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections >= self.max_connections:
            self.refused += 1
            log.warning(
                "refusing connection from %s: %d connections open (the limit)",
                writer.get_extra_info("peername"),
                self.connections,
            )
            writer.close()
            return
        self.connections += 1
        task = asyncio.current_task()
        self._tasks.add(task)
        link = self.faults.connected(writer, task)
        try:
            await self._serve(reader, writer, link)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("connection %s failed", writer.get_extra_info("peername"))
        finally:
            self.connections -= 1
            self._tasks.discard(task)
            self.faults.closed(link)
            writer.close()

    async def _read(self, reader, n: int) -> bytes:
        return await asyncio.wait_for(reader.readexactly(n), self.read_timeout_s)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link) -> None:
        peer = writer.get_extra_info("peername")
        _READER.set(reader)  # this connection's task only (contextvars are per task)
        quit_flag: list = []
        _QUIT.set(quit_flag)
        while True:
            first = await reader.read(P.HEADER_SIZE)  # idle between requests: no timeout
            if not first:
                return
            try:
                header = first + (
                    await self._read(reader, P.HEADER_SIZE - len(first)) if len(first) < P.HEADER_SIZE else b""
                )
                name, size, want_reply = P.parse_request_header(header)
                if size > REQUEST_BODY_LIMIT:
                    raise P.ProtocolError(
                        f"{name}: request body of {size} bytes exceeds the {REQUEST_BODY_LIMIT}-byte limit"
                    )
                body = await self._read(reader, size) if size else b""
            except P.ProtocolError as exc:
                log.warning("closing connection %s: %s", peer, exc)
                return
            except TimeoutError:
                log.warning("closing connection %s: message unfinished after %.1f s", peer, self.read_timeout_s)
                return
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            call = self.faults.request(link, name)
            reply = None if self.cassette is None else self.cassette.answer(name, header + body)
            if reply is None:
                reply = await self._dispatch(name, body)
            if want_reply and not await self.faults.reply(link, call, reply):
                return
            if quit_flag:  # Util.Quit: reply, then the "application" is gone for this client
                return

    async def _dispatch(self, name: str, body: bytes) -> bytes:
        try:
            command = P.command_for(name, self.release)
        except P.UnknownCommandError as exc:  # the manuals' wording for names it does not know
            return P.pack_response(name, None, error=str(exc), command=P.Command(name))
        try:
            _, args = P.decode_request_strict(name, body, self.release)
        except P.ProtocolError as exc:
            return P.pack_response(name, None, error=str(exc), command=command)
        if name == "Scan.PropsGet" and self.props_layout is not None:
            command = P.PROPS_GET_EXTENDED if self.props_layout == "extended" else P.command_for(name, 13742)
        try:
            values = await self._handlers[name](**args)
            return P.pack_response(name, values, command=command)
        except (ControllerError, ValueError, TypeError) as exc:
            return P.pack_response(name, None, error=str(exc), command=command)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("%s failed", name)
            return P.pack_response(name, None, error=f"internal error: {type(exc).__name__}: {exc}", command=command)

    async def _sleep_sim(self, sim_s: float, timeout_ms: int = -1) -> bool:
        """Sleep a simulated duration; True if ``timeout_ms`` (>= 0) cut it short."""
        real = max(0.0, sim_s) / self.controller.time_scale
        cap = _MAX_BLOCK_S if timeout_ms < 0 else min(_MAX_BLOCK_S, timeout_ms / 1000.0)
        await asyncio.sleep(min(real, cap))
        return real > cap

    async def _wait_event(self, timeout_ms: int, counter) -> bool:
        """Wait for ``counter()`` to change; False on timeout.

        Checks twice a second whether the client hung up, so an abandoned long (or -1)
        wait does not hold one of the 4 connection slots forever.
        """
        start = counter()
        deadline = None if timeout_ms < 0 else time.monotonic() + timeout_ms / 1000.0
        reader = _READER.get(None)
        while counter() == start:
            if reader is not None and reader.at_eof():
                return False
            flag = self._flag
            remaining = 0.5 if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(flag.wait(), min(remaining, 0.5))
            except TimeoutError:
                pass
        return True

    # ------------------------------------------------------------------ handlers
    # One per command of protocol.COMMANDS; arguments are the table's request fields,
    # the return value maps response field names to values.

    async def _h_Bias_Set(self, bias):
        await self._call(self.controller.bias_set, bias)

    async def _h_Bias_Get(self):
        return {"bias": self.controller.bias_get()}

    async def _h_Bias_Pulse(self, wait, width, bias, z_hold, abs_rel):
        duration = await self._call(self.controller.bias_pulse, width, bias, z_hold, abs_rel)
        if wait:
            await self._sleep_sim(duration)

    async def _h_BiasSpectr_Start(self, get_data, basename):
        """The sweep is measured on the controller thread; its duration is waited out here, so
        the other connections are answered meanwhile (BiasSpectr.StatusGet sees it running,
        BiasSpectr.Stop ends the wait)."""
        c = self.controller
        reply, seconds = await self._call(M.bias_spectr_start, c, c.modules, get_data, basename)
        state = c.modules.bs
        state["running"] = 1
        try:
            end = time.monotonic() + min(max(0.0, seconds) / c.time_scale, _MAX_BLOCK_S)
            while state["running"] and time.monotonic() < end:
                await asyncio.sleep(min(0.05, max(0.0, end - time.monotonic())))
        finally:
            state["running"] = 0
        return reply

    async def _h_Current_Get(self):
        return {"current": await self._call(self.controller.current_get)}

    async def _h_ZCtrl_OnOffSet(self, status):
        await self._call(self.controller.z_ctrl_on_off_set, bool(status))

    async def _h_ZCtrl_OnOffGet(self):
        return {"status": int(self.controller.z_ctrl_on)}

    async def _h_ZCtrl_SetpntSet(self, setpoint):
        await self._call(self.controller.z_ctrl_setpoint_set, setpoint)

    async def _h_ZCtrl_SetpntGet(self):
        return {"setpoint": self.controller.setpoint_A}

    async def _h_ZCtrl_ZPosSet(self, z):
        c = self.controller

        def set_z():
            with c._lock:
                high, low = M.HANDLERS["ZCtrl.LimitsGet"](c, c.modules).values()
                if c.modules.plain["zctrl.limits_enabled"]["enabled"] and not low <= z <= high:
                    raise ControllerError(f"Z position {z} m outside the Z limits [{low}, {high}] m")
                c.z_pos_set(z)

        await self._call(set_z)

    async def _h_ZCtrl_ZPosGet(self):
        return {"z": await self._call(self.controller.z_pos_get)}

    async def _h_ZCtrl_Withdraw(self, wait, timeout_ms):
        duration = await self._call(self.controller.withdraw)
        if wait:
            await self._sleep_sim(duration, timeout_ms)

    async def _h_ZCtrl_Home(self):
        await self._call(self.controller.home)

    async def _h_Scan_Action(self, action, direction):
        if not 0 <= action < len(P.SCAN_ACTIONS):
            raise ControllerError(f"scan action {action} outside 0..6")
        if direction not in (0, 1):
            raise ControllerError(f"scan direction {direction} must be 0 (down) or 1 (up)")
        await self._call(self.controller.scan_action, P.SCAN_ACTIONS[action], "up" if direction else "down")
        self._kick.set()

    async def _h_Scan_StatusGet(self):
        return {"status": int(self.controller.scanning)}

    async def _h_Scan_WaitEndOfScan(self, timeout_ms):
        c = self.controller
        ok = await self._wait_event(timeout_ms, lambda: c.scan_end_count)
        return {"timed_out": 0 if ok else 1, "path": c.last_scan_path if ok else ""}

    async def _h_Scan_WaitEndOfLine(self, timeout_ms):
        c = self.controller
        ok = await self._wait_event(timeout_ms, lambda: c.last_event.seq)
        e = c.last_event
        return {"timed_out": 0 if ok else 1, "line": e.line, "movement": e.movement, "pass_number": e.pass_number}

    async def _h_Scan_FrameSet(self, center_x, center_y, width, height, angle):
        await self._call(self.controller.frame_set, center_x, center_y, width, height, angle)

    async def _h_Scan_FrameGet(self):
        cx, cy, w, h, a = self.controller.frame
        return {"center_x": cx, "center_y": cy, "width": w, "height": h, "angle": a}

    async def _h_Scan_BufferSet(self, channel_indexes, pixels, lines):
        await self._call(self.controller.buffer_set, list(channel_indexes), pixels, lines)

    async def _h_Scan_BufferGet(self):
        c = self.controller
        return {"channel_indexes": np.asarray(c.channel_indexes, np.int32), "pixels": c.pixels, "lines": c.lines}

    async def _h_Scan_PropsSet(self, continuous, bouncy, autosave, series_name, comment, modules=(), autopaste=0):
        for n, v, hi in (
            ("continuous", continuous, 2),
            ("bouncy", bouncy, 2),
            ("autosave", autosave, 3),
            ("autopaste", autopaste, 3),
        ):
            if not 0 <= v <= hi:
                raise ControllerError(f"{n} value {v} outside 0..{hi}")
        await self._call(
            self.controller.props_set, continuous, bouncy, autosave, series_name, comment, modules, autopaste
        )

    async def _h_Scan_PropsGet(self):
        p = self.controller.props
        values = {k: p[k] for k in ("continuous", "bouncy", "autosave", "series_name", "comment")}
        if self.props_layout == "extended":
            values.update(modules=list(p["modules"]), autopaste=p["autopaste"])
        elif self.props_layout is None and self.release >= 14573:
            # R14573: module names, then per module its parameter names (one table row each)
            mods = list(p["modules"])
            values.update(modules=mods, **M.header_parameters(mods), autopaste=p["autopaste"] + 1)
        return values

    async def _h_Scan_SpeedSet(self, fwd_speed, bwd_speed, fwd_time, bwd_time, keep_constant, speed_ratio):
        await self._call(
            self.controller.speed_set, fwd_speed, bwd_speed, fwd_time, bwd_time, keep_constant, speed_ratio
        )

    async def _h_Scan_SpeedGet(self):
        return self.controller.speed_get()

    async def _h_Scan_FrameDataGrab(self, channel_index, data_direction):
        name, data, direction = await self._call(self.controller.frame_data, channel_index, data_direction == 1)
        return {"channel_name": name, "data": data, "scan_direction": 1 if direction == "up" else 0}

    async def _h_Scan_Save(self, wait, timeout_ms):
        await self._call(self.controller.save)
        return {"timed_out": 0}

    async def _h_FolMe_XYPosSet(self, x, y, wait):
        c = self.controller

        def move():
            with c._lock:
                duration = c.folme_xy_set(x, y)
                M.tiprec_record(c, c.modules)  # the Tip Move Recorder samples each move
                return duration

        duration = await self._call(move)
        if wait:
            await self._sleep_sim(duration)

    async def _h_FolMe_XYPosGet(self, wait_newest):
        x, y = await self._call(self.controller.tip_position)
        return {"x": x, "y": y}

    async def _h_FolMe_SpeedSet(self, speed, custom):
        await self._call(self.controller.folme_speed_set, speed, custom)

    async def _h_FolMe_SpeedGet(self):
        speed, custom = self.controller.folme_speed
        return {"speed": speed, "custom": custom}

    async def _h_TipShaper_Start(self, wait, timeout_ms):
        duration = await self._call(self.controller.tip_shaper_start)
        if wait:
            await self._sleep_sim(duration, timeout_ms)

    async def _h_TipShaper_PropsSet(self, **props):
        await self._call(self.controller.tip_shaper_props_set, **props)

    async def _h_TipShaper_PropsGet(self):
        return dict(self.controller.tip_shaper_props)

    async def _h_Signals_NamesGet(self):
        return {"names": list(self.controller.signal_names)}

    async def _h_Signals_ValGet(self, index, wait_newest):
        return {"value": await self._call(self.controller.signal_value, index)}

    async def _h_Signals_ValsGet(self, indexes, wait_newest):
        if len(indexes) > 128:
            raise ControllerError(f"{len(indexes)} signal indexes requested; at most 128")

        def read():
            return np.array([self.controller.signal_value(int(i)) for i in indexes], np.float32)

        return {"values": await self._call(read)}

    async def _h_Motor_StartMove(self, direction, steps, group, wait):
        def move():
            duration = self.controller.motor_move(direction, steps)
            axis, sign = direction // 2, (1 if direction % 2 == 0 else -1)
            self.controller.modules.motor_counters[axis] += sign * steps
            return duration

        duration = await self._call(move)
        if wait:
            await self._sleep_sim(duration)

    async def _h_Motor_PosGet(self, group=0, timeout_ms=500):
        x, y, z = self.controller.motor_position
        return {"x": x, "y": y, "z": z}

    async def _h_Util_Quit(self, use_stored, settings_name, layout_name, save_signals):
        _QUIT.get([]).append(True)  # [ours]: the simulator closes this connection, keeps serving

    async def _h_Util_VersionGet(self):
        return {
            "product": "Nanonis SPM Control Software",
            "version": "Generic 5 (stm-live simulator)",
            "host_release": self.release,
            "rt_release": self.release,
        }


# ---------------------------------------------------------------------- running it


@dataclass
class RunningServer:
    """A simulated controller served from a daemon thread (see ``start_server_thread``)."""

    host: str
    port: int
    controller: SimulatedController
    server: SimServer
    _loop: asyncio.AbstractEventLoop
    _thread: threading.Thread

    def stop(self, timeout: float = 5.0) -> None:
        """Close every connection and the listener; join the thread (bounded)."""
        if not self._thread.is_alive():
            return
        stop_loop_thread(self.server.close, self._loop, self._thread, what="simulated server", timeout=timeout)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _make_controller(scenario, replay, seed, time_scale) -> SimulatedController:
    return SimulatedController(scenario, replay=replay, seed=seed, time_scale=time_scale)


def loop_in_thread(start, *, name: str, what: str, startup_timeout_s: float):
    """Run ``start()`` (a coroutine opening a listener) on a new event loop in a daemon thread
    and keep that loop running: (what ``start`` returned, or the exception it raised; the loop;
    the thread). Raises RuntimeError if it has not started within ``startup_timeout_s``."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    outcome: list = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            outcome.append(loop.run_until_complete(start()))
        except BaseException as exc:  # reported to the caller
            outcome.append(exc)
            ready.set()
            loop.close()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            # Drain what close() left (bounded), so no task is destroyed while pending.
            leftover = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in leftover:
                t.cancel()
            if leftover:
                loop.run_until_complete(asyncio.wait(leftover, timeout=1.0))
            loop.close()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    if not ready.wait(startup_timeout_s):
        raise RuntimeError(f"{what} did not start within {startup_timeout_s} s")
    return outcome[0], loop, thread


def stop_loop_thread(close, loop, thread, *, what: str, timeout: float) -> None:
    """Undo :func:`loop_in_thread`: run ``close()`` on the loop (bounded; a failure is logged),
    stop the loop and join its thread."""
    try:
        asyncio.run_coroutine_threadsafe(close(), loop).result(timeout)
    except Exception:
        log.exception("%s did not close cleanly", what)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout)


def start_server_thread(
    *,
    scenario=None,
    replay=None,
    seed: int = 0,
    time_scale: float = 1.0,
    host: str = "127.0.0.1",
    port: int = 0,
    props_layout: str | None = None,
    read_timeout_s: float = 10.0,
    controller: SimulatedController | None = None,
    save_dir=None,
    startup_timeout_s: float = 30.0,
    nanonis_release: int = P.DEFAULT_RELEASE,
    faults: FaultLayer | Sequence[Fault] | None = None,
    cassette=None,
) -> RunningServer:
    """Start the simulated controller on ``host:port`` (0 = ephemeral) in a daemon thread.

    ``save_dir``: session folder for Scan.Save and autosave (.sxm), also Util.SessionPathSet;
    without one Scan.Save is an error. ``nanonis_release``: the release whose layouts the
    server speaks (one of ``protocol.RELEASES``). ``props_layout``: force a Scan.PropsGet
    layout ("r13742", or "extended" = what nanonisTCP 1.1.5 reads); None follows the release.
    ``faults``: faults to inject (``faults.Fault`` list or a ``FaultLayer``; ``.server.faults.fired``
    records them); None takes the scenario's ``faults:``. ``cassette``: a recorded session
    that answers first (``cassette.Cassette``).
    """
    ctrl = controller or _make_controller(scenario, replay, seed, time_scale)
    if save_dir is not None:
        ctrl.save_dir = save_dir
    server = SimServer(
        ctrl,
        props_layout=props_layout,
        read_timeout_s=read_timeout_s,
        nanonis_release=nanonis_release,
        faults=faults,
        cassette=cassette,
    )
    started, loop, thread = loop_in_thread(
        lambda: server.start(host, port),
        name=f"stm-live-sim-{port}",
        what="simulated controller",
        startup_timeout_s=startup_timeout_s,
    )
    if isinstance(started, BaseException):  # a bind error
        raise OSError(f"cannot serve the simulated controller on {host}:{port}: {started}") from started
    return RunningServer(server.host, server.port, ctrl, server, loop, thread)
