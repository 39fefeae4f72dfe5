"""Command line: `sana-appliance [train|config|presets]` (train is the default verb)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .config import presets as presets_mod
from .config.resolve import CliArgs, Resolved, resolve_collecting
from .core.errors import ApplianceError, ConfigError, ExitCode, StopRequested
from .run import lock as runlock
from .run import preflight

log = logging.getLogger("sana_appliance")

VERBS = ("train", "config", "presets")
COMPLETE_MARKER = "TRAINING_COMPLETE.json"  # run/runinfo.py's, read here without importing torch (tested equal)

DEMO_BANNER = """\
============================================================================
 DEMO RUN: no PRESET and no config file were given, so this trains the tiny
 built-in Sana on a generated dataset (CPU is fine, nothing is downloaded).
 To fine-tune the real Sana 1.6B, put your images and a multidatabackend.json
 in $WORKSPACE and choose a preset, e.g.:
   docker run --gpus all -e PRESET=24g -e HF_TOKEN=hf_... -v $PWD/workspace:/workspace IMAGE
 `sana-appliance presets` lists the presets.
============================================================================"""


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--preset", help="preset name (overrides env PRESET)")
    common.add_argument("--config", dest="config_path", help="config file, YAML or JSON (overrides env CONFIG_PATH)")
    common.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config key; repeatable. `--KEY=VALUE` works too",
    )
    parser = argparse.ArgumentParser(
        prog="sana-appliance",
        description="Full-rank Sana fine-tuning appliance. Verbs: train (default), config, presets.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"sana-appliance {__version__}")
    sub = parser.add_subparsers(dest="verb")
    sub.add_parser("train", parents=[common], help="train (the default verb)")
    cfg = sub.add_parser("config", parents=[common], help="print the resolved config and where each value came from")
    cfg.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_parser("presets", parents=[common], help="list the presets")
    return parser


def _split_overrides(pairs: Sequence[str]) -> list[tuple[str, str]]:
    result = []
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set learning_rate=1e-5")
        key, value = pair.split("=", 1)
        result.append((key, value))
    return result


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, CliArgs]:
    argv = list(argv)
    # No verb means train; argparse needs it spelled out to route options.
    if not any(a in VERBS for a in argv if not a.startswith("-")) and not {"-h", "--help", "--version"} & set(argv):
        argv = ["train", *argv]
    args, extra = _parser().parse_known_args(argv)
    overrides = _split_overrides(args.overrides)
    leftover = []
    i = 0
    while i < len(extra):
        token = extra[i]
        if token.startswith("--") and "=" in token:
            key, value = token[2:].split("=", 1)
            overrides.append((key, value))
        elif token.startswith("--") and i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            overrides.append((token[2:], extra[i + 1]))
            i += 1
        else:
            leftover.append(token)
        i += 1
    if leftover:
        raise ConfigError(f"unrecognised arguments: {' '.join(leftover)} (see sana-appliance --help)")
    return args, CliArgs(preset=args.preset, config_path=args.config_path, overrides=overrides)


def _print_config(resolved: Resolved, as_json: bool, warnings: Sequence[str]) -> None:
    values = resolved.redacted()
    if as_json:
        doc = {
            "preset": resolved.preset,
            "demo_fallback": resolved.demo_fallback,
            "config_path": str(resolved.config_path) if resolved.config_path else None,
            "env_file": str(resolved.env_file) if resolved.env_file else None,
            "workspace": str(resolved.workspace.root),
            "hf_home": str(resolved.workspace.hf_home),
            "keys": {k: {"value": v, "source": resolved.provenance[k]} for k, v in values.items()},
            "warnings": list(warnings),
        }
        print(json.dumps(doc, indent=2))
        return
    if resolved.demo_fallback:
        print("# DEMO: no PRESET and no config file; the demo preset applies (see `sana-appliance presets`)")
    print(f"# preset: {resolved.preset or '(none)'}")
    print(f"# config file: {resolved.config_path or '(none)'}")
    if resolved.env_file:
        print(f"# config.env: {resolved.env_file}")
    print(f"# workspace: {resolved.workspace.root}  (HF_HOME: {resolved.workspace.hf_home})")
    width = max(len(k) for k in values)
    for key, value in values.items():
        shown = json.dumps(value) if not isinstance(value, str) else value
        print(f"{key:<{width}} = {shown:<40}  # {resolved.provenance[key]}")
    for warning in warnings:
        print(f"# warning: {warning}")


def _log_config_summary(resolved: Resolved) -> None:
    """The first lines of a run's log: what was chosen and where it came from (not defaults)."""
    values = resolved.redacted()
    chosen = [k for k in values if not resolved.provenance[k].startswith("default")]
    log.info("preset %s, config file %s, workspace %s; %d keys set (all keys: `sana-appliance config`):",
             resolved.preset or "(none)", resolved.config_path or "(none)", resolved.workspace.root, len(chosen))
    for key in chosen:
        log.info("  %s = %s  [%s]", key, values[key], resolved.provenance[key])
    # Always say which data this run trains on, wherever the setting came from.
    log.info("dataset config: %s  [%s]", values["data_backend_config"], resolved.provenance["data_backend_config"])


def _print_presets() -> None:
    names = presets_mod.available()
    rows = [presets_mod.load(n) for n in names]
    width = max(len(p.name) for p in rows)
    for p in rows:
        print(f"{p.name:<{width}}  {p.description}")
        print(f"{'':<{width}}  hardware: {p.hardware}; memory: {p.memory}")
        if p.choose:
            print(f"{'':<{width}}  choose it: {p.choose}")


def _check_hub_access(resolved: Resolved) -> None:
    """With push_to_hub on, that the token is valid and may write hub_model_id (exit 3 otherwise). Skipped when
    this output's completion marker says the job is finished and already uploaded there: nothing will be pushed."""
    from .hub import access, upload

    if not access.needed(resolved):
        return
    output_dir = Path(resolved.config.output_dir)
    if (output_dir / COMPLETE_MARKER).is_file():  # run/runinfo.py imports torch: only when there is a marker
        from .run import runinfo

        record = runinfo.completion_record(output_dir, resolved.config)
        if record is not None and upload.is_done(resolved, record.get("upload")):
            return
    log.info(access.check_push_access(resolved).line)


def leave(code: int) -> None:
    """Exit the process with `code`. A process that joined a process group ends with os._exit once its output
    is flushed: torch's gloo/NCCL teardown at interpreter exit can abort ("terminate called without an active
    exception", SIGABRT) while a peer is still connected, turning a documented exit code into a crash that the
    launcher would restart."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(code))
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get("APPLIANCE_LAUNCHER_PID") and os.environ.get("RANK"):
        from .distributed.launch import bind_to_parent

        bind_to_parent()  # a worker of the appliance's launcher dies with it, even on kill -9
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for name in ("httpx", "httpx2", "httpcore"):  # one line per HTTP request would bury the run's own lines
        logging.getLogger(name).setLevel(logging.WARNING)
    # bitsandbytes on CPU says at import that an optional accelerated kernel package is absent: nothing to act on.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        args, cli = parse_args(argv)
        if args.verb == "presets":
            _print_presets()
            return ExitCode.OK
        resolved, problems = resolve_collecting(os.environ, cli)
        # Before any download or launch: disk-facing checks join the pure ones in one report.
        findings = preflight.check(resolved, training=args.verb != "config")
        if problems or findings.problems:
            raise ConfigError(problems + findings.problems)
        warnings = [*resolved.warnings, *findings.notes]
        if args.verb == "config":
            _print_config(resolved, args.json, warnings)
            return ExitCode.OK
        topology = resolved.topology
        if topology.role != "worker" or (topology.rank == 0 and not resolved.under_appliance_launcher):
            # A single process, the appliance's launcher, or rank 0 under an outside launcher speaks.
            if resolved.demo_fallback:
                print(DEMO_BANNER, file=sys.stderr, flush=True)
            for warning in warnings:
                log.warning(warning)
            _log_config_summary(resolved)
        # One run per output folder. The lock is held by the process that owns the job on this machine: a
        # single process, the appliance's launcher, or local rank 0 under an outside launcher (torchrun).
        lock = None
        if topology.role in ("single", "agent"):
            lock = runlock.acquire(Path(resolved.config.output_dir), node=topology.node_rank)
        elif topology.local_rank == 0 and not resolved.under_appliance_launcher:
            node = os.environ.get("GROUP_RANK", "")
            lock = runlock.acquire(Path(resolved.config.output_dir),
                                   node=int(node) if node.isdigit() else topology.rank // max(1, topology.local_world_size))
        try:
            pushes = resolved.config.push_to_hub or resolved.config.push_checkpoints_to_hub
            if lock is not None and pushes:  # once per job, before any download or training: may the token push?
                from .distributed.stopping import StopFlag

                check_stop = StopFlag().install()  # the check may retry for minutes while the Hub is down
                try:
                    with check_stop.immediate("the Hub access check", "nothing was downloaded or trained yet"):
                        _check_hub_access(resolved)
                finally:
                    check_stop.restore()
            if topology.role == "agent":
                from .distributed.launch import launch, process_count

                cfg = resolved.config
                count = process_count(topology.nproc_per_node)
                if count > 1 or topology.multi_node:
                    # Rank 0 may spend hub_stop_upload_s on the upload queue after a stop's checkpoint.
                    grace = 60.0 + (cfg.hub_stop_upload_s if cfg.push_to_hub else 0.0)
                    return launch(topology, count, argv, grace_s=grace, max_restarts=cfg.max_restarts,
                                  rendezvous_timeout_s=cfg.rendezvous_timeout_s,
                                  exit_wait_s=300.0 + (cfg.hub_upload_wait_s if cfg.push_to_hub else 0.0))
            from .distributed.stopping import StopFlag

            # Installed before the heavy imports, so a stop at any moment exits 143/130 with a message.
            stop = StopFlag().install()
            try:
                with stop.immediate("startup", "nothing to save yet"):
                    from .run.train import train
                train(resolved, stop)
            finally:
                stop.restore()
            return ExitCode.OK
        finally:
            if lock is not None:
                lock.release()
    except StopRequested as exc:
        print(f"sana-appliance: {exc.message}", file=sys.stderr)
        return int(exc.exit_code)
    except ApplianceError as exc:
        print(f"sana-appliance: error: {exc.message}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        print("sana-appliance: interrupted", file=sys.stderr)
        return ExitCode.SIGINT
    except Exception as exc:
        if not (os.environ.get("RANK") and os.environ.get("WORLD_SIZE")):
            raise
        from .distributed.group import is_peer_failure

        if not is_peer_failure(exc):
            raise
        # A peer died or the group broke: one line, and the launcher restarts the group (max_restarts).
        detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        print(f"sana-appliance: error: rank {os.environ.get('RANK')} lost contact with the other training processes "
              f"({type(exc).__name__}: {detail}); the launcher restarts the group from the last checkpoint "
              "(max_restarts), or the job exits 7", file=sys.stderr)
        return ExitCode.PEERS

