"""``stm-live queue``: stm-live under bluesky-queueserver (the RE Manager, its queue in Redis).

``stm-live queue start --profile FILE`` starts Debian's ``redis-server`` (127.0.0.1, a free
port, its data in ``DATA_DIR/queue/redis``), the embedded tiled server (unless ``--tiled-uri``)
and the RE Manager with stm-live's startup module (:mod:`stm_live.queueserver`); Ctrl-C stops
them. Plans are then queued, started, paused, resumed and stopped with the queue server's own
CLI (``qserver``) and API (``bluesky_queueserver_api``): ``stm-live queue`` says how.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import typer

__all__ = ["queue_app", "QueueServices", "QueueServerError", "HOWTO"]

CONTROL_PORT, INFO_PORT = 60615, 60625  # the queue server's defaults: qserver finds them unasked

HOWTO = """\
stm-live under the Bluesky queue server (bluesky-queueserver, Redis).

Start (Redis, tiled and the RE Manager; Ctrl-C stops them):
  stm-live queue start --profile my_lab.yaml [--data-dir stm_live_data] [--tiled-uri URI]

Then, with the queue server's own CLI:
  qserver environment open                      # connects to the controller the profile names
  qserver existing plans                        # live_frame, survey, recondition_tip, ...
  qserver queue add plan '{"name": "survey", "kwargs": {"grid": [[0, 0], [6e-9, 0]],
                           "width_m": 5e-9, "pixels": 128, "lines": 128}}'
  qserver queue start
  qserver re pause                              # at the next scan line (re pause immediate: now)
  qserver status                                # re_state: paused
  qserver re metadata                           # stm_live_paused: why (a tip prompt, a give-up)
  qserver re resume                             # (a tip prompt: recondition as proposed)
  qserver re stop                               # end the paused frame, its lines kept; re abort
  qserver queue stop                            # after the running plan
  qserver environment close
  qserver-console-monitor                       # the worker's console: frames, link faults, pauses

or its Python API:
  from bluesky_queueserver_api import BPlan
  from bluesky_queueserver_api.zmq import REManagerAPI
  RM = REManagerAPI()                           # tcp://localhost:60615
  RM.environment_open(); RM.wait_for_idle()
  RM.item_add(BPlan("survey", grid=[[0, 0], [6e-9, 0]], width_m=5e-9, pixels=128, lines=128))
  RM.queue_start(); RM.re_pause(); RM.re_resume(); RM.wait_for_idle()

A plan with a bad parameter (a type, a choice, a number outside the profile's limits) is refused
when it is added, before anything reaches the controller. Watch the frames as they come:
stm-live view --data-dir DATA_DIR; the runs are in tiled in the BlueskyRun layout
(stm-live runs list --tiled-uri URI, or any tiled client).
"""

queue_app = typer.Typer(
    help="stm-live under the Bluesky queue server (bluesky-queueserver, Redis).", add_completion=False
)


class QueueServerError(OSError):
    """A queue service that cannot be started (no redis-server, a port in use, ...)."""


@queue_app.callback(invoke_without_command=True)
def queue_help(ctx: typer.Context) -> None:
    """stm-live under the Bluesky queue server: `stm-live queue` says how to use it."""
    if ctx.invoked_subcommand is None:
        typer.echo(HOWTO)


@queue_app.command("start")
def start(
    profile: Path = typer.Option(..., "--profile", help="Controller profile (YAML) the plans run on."),
    data_dir: Path = typer.Option(Path("stm_live_data"), help="Journal, tiled, Redis data, logs."),
    tiled_uri: str | None = typer.Option(
        None, help="A lab's tiled server for the runs (default: an embedded one in DATA_DIR/tiled)."
    ),
    control_port: int = typer.Option(CONTROL_PORT, help="RE Manager's control port (127.0.0.1)."),
    info_port: int = typer.Option(INFO_PORT, help="RE Manager's console/info port (127.0.0.1)."),
    live: bool = typer.Option(True, "--live/--no-live", help="Live STM-Net reconstruction in the worker."),
    tip_policy: str | None = typer.Option(None, help="off | prompt | auto (default: the profile's)."),
    device: str = typer.Option("auto", help="Torch device of the worker's networks."),
):
    """Start Redis, tiled and the RE Manager with stm-live's startup profile; Ctrl-C stops them."""
    import signal
    import threading

    try:
        services = QueueServices(
            profile,
            data_dir=data_dir,
            tiled_uri=tiled_uri,
            control_port=control_port,
            info_port=info_port,
            live=live,
            tip_policy=tip_policy,
            device=device,
        )
        services.start()
    except (ValueError, OSError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from exc
    typer.echo(
        f"RE Manager on {services.control_address} (console {services.info_address}), Redis on "
        f"127.0.0.1:{services.redis_port}; the RE Manager's log: {services.log_path}"
    )
    typer.echo(f"runs go to tiled at {services.tiled_uri}")
    typer.echo("queue plans with qserver or REManagerAPI (`stm-live queue` says how); Ctrl-C stops")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5) and services.alive():
            pass
    except KeyboardInterrupt:
        pass
    finally:
        problems = services.stop()
    for line in problems:
        typer.echo(line, err=True)
    if problems:
        raise typer.Exit(code=1)


class QueueServices:
    """Redis, tiled and the RE Manager for stm-live's startup profile, on 127.0.0.1.

    Parameters
    ----------
    profile : path
        The controller profile (YAML) the worker builds the microscope from.
    data_dir : path
        Journal and tiled (as every command), and ``queue/``: Redis's data, the lists of plans and
        permissions the RE Manager reads, its log.
    tiled_uri : str, optional
        A lab's tiled server; default an embedded one in ``data_dir/tiled``, served by this process.
    control_port, info_port : int
        The RE Manager's 0MQ ports (0: free ones).
    live, tip_policy, device
        The worker's consumers: live reconstruction, the tip policy (None: the profile's), the
        networks' torch device.
    timeout_s : float
        Bound on each service's start.
    """

    def __init__(
        self,
        profile: str | os.PathLike,
        *,
        data_dir: str | os.PathLike = "stm_live_data",
        tiled_uri: str | None = None,
        control_port: int = CONTROL_PORT,
        info_port: int = INFO_PORT,
        live: bool = True,
        tip_policy: str | None = None,
        device: str = "auto",
        timeout_s: float = 60.0,
    ):
        from stm_live.config import load_profile
        from stm_live.queueserver.environment import QueueSettings
        from stm_live.reconditioning import POLICIES

        if tip_policy is not None and tip_policy not in POLICIES:
            raise ValueError(f"--tip-policy must be one of {', '.join(POLICIES)}, not {tip_policy!r}")
        self.profile = load_profile(profile)  # a bad profile is one line now, not in the worker later
        self.data_dir = Path(data_dir).resolve()
        self.folder = self.data_dir / "queue"
        self.settings = QueueSettings(
            profile=str(self.profile.source or Path(profile).resolve()),
            data_dir=str(self.data_dir),
            tiled_uri=tiled_uri,
            live=live,
            tip_policy=tip_policy,
            device=device,
        )
        self.control_port, self.info_port = int(control_port) or _free_port(), int(info_port) or _free_port()
        self.timeout_s = float(timeout_s)
        self.log_path = self.folder / "re-manager.log"
        self.redis_port: int | None = None
        self._redis = self._manager = self._tiled_server = None
        self._tiled_uri = tiled_uri

    @property
    def control_address(self) -> str:
        return f"tcp://127.0.0.1:{self.control_port}"

    @property
    def info_address(self) -> str:
        return f"tcp://127.0.0.1:{self.info_port}"

    @property
    def tiled_uri(self) -> str | None:
        """The tiled server's URI (with the embedded server's API key)."""
        return self._tiled_uri

    def start(self) -> QueueServices:
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self._start_redis()
            if self._tiled_uri is None:
                from stm_live.store import open_tiled

                _, self._tiled_server = open_tiled(self.data_dir)
                self._tiled_uri = self._tiled_server.uri
            self.settings = dataclasses.replace(self.settings, tiled_uri=self._tiled_uri)
            self._start_manager(*self._write_lists())
        except BaseException:
            self.stop()
            raise
        return self

    # -- Redis -------------------------------------------------------------------------
    def _start_redis(self) -> None:
        import shutil
        import subprocess

        exe = shutil.which("redis-server")
        if exe is None:
            raise QueueServerError(
                "redis-server not found: the queue server keeps its queue in Redis; "
                "install Debian's redis-server (apt-get install redis-server)"
            )
        folder = self.folder / "redis"
        folder.mkdir(parents=True, exist_ok=True)
        self.redis_port = _free_port()
        log = folder / "redis.log"
        self._redis = subprocess.Popen(
            [
                exe,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.redis_port),
                "--dir",
                str(folder),
                "--dbfilename",
                "queue.rdb",
                "--save",
                "60 1",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
                "--daemonize",
                "no",
                "--logfile",
                str(log),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # a Ctrl-C is for `queue start`, which stops it in order
        self._wait("redis-server", self._redis, log, self._redis_ready)

    def _redis_ready(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(host="127.0.0.1", port=self.redis_port, socket_timeout=1.0).ping())
        except redis.exceptions.ConnectionError:
            return False

    # -- the RE Manager ----------------------------------------------------------------
    def _write_lists(self) -> tuple[Path, Path]:
        """The lists the RE Manager validates plans against before the worker exists: the plans
        and their parameters (rewritten by the worker when the environment opens), and who may
        run what (everyone: everything but names starting with "_")."""
        import yaml
        from bluesky_queueserver.manager.profile_ops import (
            existing_plans_and_devices_from_nspace,
            save_existing_plans_and_devices,
        )

        from stm_live.queueserver.plans import queue_plans

        def no_microscope():
            raise RuntimeError("plans listed without a controller")

        existing, devices, _, _ = existing_plans_and_devices_from_nspace(
            nspace=queue_plans(self.profile, no_microscope)
        )
        save_existing_plans_and_devices(
            existing_plans=existing,
            existing_devices=devices,
            file_dir=str(self.folder),
            file_name="existing_plans_and_devices.yaml",
            overwrite=True,
        )
        everyone = {
            "allowed_plans": [None],
            "forbidden_plans": [":^_"],
            "allowed_devices": [None],
            "forbidden_devices": [":^_:?.*"],
            "allowed_functions": [None],
            "forbidden_functions": [":^_"],
        }
        permissions = {
            "user_groups": {
                "root": everyone,
                "primary": {
                    "allowed_plans": [":.*"],
                    "forbidden_plans": [None],
                    "allowed_devices": [":?.*:depth=5"],
                    "forbidden_devices": [None],
                    "allowed_functions": [None],
                    "forbidden_functions": [None],
                },
            }
        }
        path = self.folder / "user_group_permissions.yaml"
        path.write_text(yaml.safe_dump(permissions, sort_keys=False))
        return self.folder / "existing_plans_and_devices.yaml", path

    def _start_manager(self, plans: Path, permissions: Path) -> None:
        import subprocess
        import sys

        from stm_live.queueserver.environment import SETTINGS_ENV

        command = [
            sys.executable,
            "-c",
            "from bluesky_queueserver.manager.start_manager import "
            "start_manager; start_manager()",  # the start-re-manager CLI of this interpreter
            "--startup-module",
            "stm_live.queueserver.startup",
            "--existing-plans-devices",
            str(plans),
            "--user-group-permissions",
            str(permissions),
            "--redis-addr",
            f"127.0.0.1:{self.redis_port}",
            "--redis-name-prefix",
            "stm_live",
            "--zmq-control-addr",
            self.control_address,
            "--zmq-info-addr",
            self.info_address,
            "--zmq-publish-console",
            "ON",
            "--update-existing-plans-devices",
            "ENVIRONMENT_OPEN",
        ]
        env = dict(os.environ, **{SETTINGS_ENV: self.settings.to_env()}, PYTHONUNBUFFERED="1")
        with open(self.log_path, "ab") as log:
            # its own session: the worker process it starts goes with it
            self._manager = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self._wait("the RE Manager", self._manager, self.log_path, self._manager_ready)

    def api(self, **kwargs):
        """A ``REManagerAPI`` on the control port (the caller closes it)."""
        from bluesky_queueserver_api.zmq import REManagerAPI

        return REManagerAPI(zmq_control_addr=self.control_address, zmq_info_addr=self.info_address, **kwargs)

    def _manager_ready(self) -> bool:
        RM = self.api(timeout_recv=1.0)
        try:
            RM.status()
            return True
        except Exception:  # not listening yet
            return False
        finally:
            RM.close()

    # -- both ---------------------------------------------------------------------------
    def _wait(self, what: str, proc, log: Path, ready) -> None:
        import time

        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise QueueServerError(f"{what} exited with status {proc.returncode}: {_tail(log)}")
            if ready():
                return
            time.sleep(0.2)
        raise QueueServerError(f"{what} did not answer within {self.timeout_s:.0f} s: {_tail(log)}")

    def alive(self) -> bool:
        return all(p is not None and p.poll() is None for p in (self._redis, self._manager))

    def stop(self, timeout: float = 30.0) -> list[str]:
        """Stop the RE Manager (and its worker), Redis and tiled; returns one line per problem."""
        import signal
        import subprocess
        import time

        problems = []
        if self._manager is not None and self._manager.poll() is None:
            try:
                RM = self.api(timeout_recv=5.0)
                try:
                    try:  # the worker finishes its consumers first: the last runs go into tiled
                        if RM.status().get("worker_environment_exists"):
                            RM.environment_close()
                            RM.wait_for_idle(timeout=timeout)
                    except Exception:  # a plan still running: it ends with the manager
                        pass
                    RM.send_request(method="manager_stop", params={"option": "safe_off"})
                finally:
                    RM.close()
            except Exception as exc:
                problems.append(f"the RE Manager did not take the stop request ({exc}); terminating it")
                self._manager.terminate()
            try:
                self._manager.wait(timeout)
            except subprocess.TimeoutExpired:
                problems.append(f"the RE Manager did not stop within {timeout:.0f} s; killed it")
        if self._manager is not None:
            # what is left of its session (a worker still closing), by the group this process made
            deadline = time.monotonic() + 10.0
            try:
                while time.monotonic() < deadline:
                    os.killpg(self._manager.pid, 0)
                    time.sleep(0.1)
                os.killpg(self._manager.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self._manager.wait(timeout)
            self._manager = None
        if self._redis is not None:
            self._redis.terminate()  # Redis saves its data and exits on SIGTERM
            try:
                self._redis.wait(timeout)
            except subprocess.TimeoutExpired:
                problems.append(f"redis-server did not stop within {timeout:.0f} s; killed it")
                self._redis.kill()
                self._redis.wait(timeout)
            self._redis = None
        if self._tiled_server is not None:
            self._tiled_server.close()
            self._tiled_server = None
        return problems

    def __enter__(self) -> QueueServices:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(log: Path, lines: int = 8) -> str:
    try:
        text = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"
