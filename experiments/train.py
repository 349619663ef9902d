"""The experiment entrypoint (docs/interfaces.md).

    python -m experiments.train --config=experiments/configs/NAME.py[:ARG] --workdir=DIR \
        [--config.KEY=VALUE ...] [--coordinator_address=HOST:PORT --num_processes=N --process_id=I]

With no --config the default experiment runs (experiments/configs/default.py). Running again with
the same --workdir resumes from its newest good checkpoint. Bad input (including a resume with another
config or other data) exits with status 2 and one line on stderr before anything compiles; a non-finite
loss (after `train.nan_rollbacks` rollbacks), a checkpoint that cannot be written, a workdir whose every
checkpoint is damaged and a coordinator that never answers exit with status 1 and one line.
"""

import datetime
import logging as std_logging
import os
import socket
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from experiments.training import cli

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py")

# No default file here: config_flags would apply the --config.KEY overrides at import time, outside
# the one-line error handling below. `_with_default_config` supplies the default instead. config_flags finds the
# overrides in the argv it is given (sys.argv by default): `_parse_flags` fills `_ARGV` with the arguments it parses.
_ARGV: list[str] = []
_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config); "
                                          f"default {DEFAULT_CONFIG}.", lock_config=True, sys_argv=_ARGV)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder; default: a fresh folder under ./runs/. "
                               "An existing workdir is resumed from its latest checkpoint.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-process jobs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer("heartbeat_timeout_s", 100, "Multi-process jobs: a process silent "
                                          "this long is declared dead and the others stop with an error.")
_INIT_TIMEOUT = flags.DEFINE_integer("init_timeout_s", 300, "Multi-process jobs: stop with an error if the "
                                     "coordinator does not answer, or the job has not formed, in this time.")


def _parse_flags(argv):
    """absl flag parsing, with any error (unknown or mistyped config key, bad flag) as one stderr line. A family
    named by --config.model.name (a dataset by --config.data.name) gets its own section before the other overrides of
    that section apply."""
    return cli.parse_flags(argv, _CONFIG, _ARGV)


def _initialize_distributed():
    """jax.distributed for multi-process jobs: from the flags, or detected on TPU pods and SLURM."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # collectives across CPU processes
    timeouts = dict(heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value, initialization_timeout=_INIT_TIMEOUT.value)
    if _COORDINATOR.value or _NUM_PROCESSES.value:
        if not (_COORDINATOR.value and _NUM_PROCESSES.value and _PROCESS_ID.value is not None):
            cli.fail("--coordinator_address, --num_processes and --process_id go together")
        if not 0 <= _PROCESS_ID.value < _NUM_PROCESSES.value:
            cli.fail(f"--process_id={_PROCESS_ID.value} must lie in [0, --num_processes={_NUM_PROCESSES.value})")
        if _PROCESS_ID.value != 0:
            _wait_for_coordinator(_COORDINATOR.value, _INIT_TIMEOUT.value)
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, **timeouts)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize(**timeouts)


def _wait_for_coordinator(address: str, timeout_s: float):
    """Returns once something accepts connections at HOST:PORT; a one-line error after `timeout_s`. (jax's own
    client would abort the process with a C++ stack trace when nobody answers.)"""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        cli.fail(f"--coordinator_address={address!r} must be HOST:PORT")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=1.0).close()
            return
        except OSError as e:
            if time.monotonic() > deadline:
                cli.fail(f"nobody answered at --coordinator_address={address} within --init_timeout_s={timeout_s:g} "
                      f"({e.strerror or e}); start process 0 there first, or check the address", status=1)
            time.sleep(0.5)


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; pass settings as --config.KEY=VALUE")
    # Library chatter off (orbax logs a failed write as pages of ERROR lines and asyncio tracebacks, which
    # the one-line error below replaces); our progress and warnings are printed.
    logging.set_verbosity(logging.FATAL)
    std_logging.getLogger("asyncio").setLevel(std_logging.CRITICAL)
    _initialize_distributed()

    config_name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
    workdir = _WORKDIR.value or os.path.join(
        "runs", f"{config_name}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    cli.run(_CONFIG.value, workdir)


def _with_default_config(argv):
    """argv with --config=DEFAULT_CONFIG added when the user named no config."""
    if any(a == "--config" or a.startswith("--config=") for a in argv[1:]):
        return argv
    return [argv[0], f"--config={DEFAULT_CONFIG}", *argv[1:]]


if __name__ == "__main__":
    app.run(main, argv=_with_default_config(sys.argv), flags_parser=_parse_flags)
