"""``bertswarm-peer``: flags and ``BERTSWARM_*`` environment variables → ``PeerConfig`` → ``trainer.run``.

The parser is generated from the fields of ``PeerConfig``, so each setting is declared exactly once. A flag given on
the command line wins over its environment variable, which wins over the default. User errors print one line on
stderr and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import types
import typing
from collections.abc import Callable

from peer import __version__, logs
from peer.config import PeerConfig
from peer.errors import InputError, UserError
from peer.swarm import hivemind_compat  # imports no hivemind (see its docstring)

ENV_PREFIX = "BERTSWARM_"
GROUP_TITLES = {
    "swarm": "joining the swarm",
    "run": "run settings (shared by all peers via the manifest)",
    "peer": "this peer",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2 (argparse's own convention), no usage dump
        raise UserError(f"{message}; see {self.prog} --help")


def _base_type(annotation) -> tuple[type, bool]:
    """(element type, is_list) for annotations like ``int | None`` or ``list[str]``."""
    hint = annotation
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0]
        origin = typing.get_origin(hint)
    if origin is list:
        return typing.get_args(hint)[0], True
    return hint, False


PEER_DESCRIPTION = (
    "Train BERT together with volunteers. With no arguments, start a new swarm on embedded defaults; with --join, "
    "join a running swarm through any live peer."
)


def _fields(config_cls):
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        yield f, *_base_type(hints[f.name])


def build_parser(
    config_cls=PeerConfig, prog: str = "bertswarm-peer", description: str = PEER_DESCRIPTION, groups=GROUP_TITLES
) -> argparse.ArgumentParser:
    """An argparse parser generated from the fields of a config dataclass (each field: ``--name-with-dashes``)."""
    parser = _Parser(
        prog=prog,
        description=description,
        epilog=f"Every flag can also be set through an environment variable named {ENV_PREFIX} + the flag in "
        f"capitals, e.g. --join as {ENV_PREFIX}JOIN. Lists in variables are space-separated.",
    )
    parser.add_argument("--version", action="version", version=f"bertswarm {__version__}")
    groups = {name: parser.add_argument_group(title) for name, title in groups.items()}
    for f, base, is_list in _fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        group = groups[f.metadata.get("group", "peer")]
        env = ENV_PREFIX + f.name.upper()
        help_text = f"{f.metadata['help']} [env {env}]"
        # default=SUPPRESS: only flags the user actually passed appear in the namespace (needed for manifest checks)
        if base is bool:
            # --nsp / --no-nsp: a flag can also turn off what an environment variable turned on
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif is_list:
            group.add_argument(
                flag,
                action="append",
                type=base,
                default=argparse.SUPPRESS,
                help=help_text,
                metavar=f.metadata.get("metavar"),
            )
        else:
            group.add_argument(
                flag, type=base, default=argparse.SUPPRESS, help=help_text, metavar=f.metadata.get("metavar")
            )
    return parser


def _from_env(environ, config_cls) -> dict:
    values = {}
    for f, base, is_list in _fields(config_cls):
        raw = environ.get(ENV_PREFIX + f.name.upper())
        if raw is None or raw == "":
            continue
        name = ENV_PREFIX + f.name.upper()
        try:
            if base is bool:
                if raw.lower() not in ("1", "true", "yes", "0", "false", "no"):
                    raise ValueError("expected 1/0, true/false or yes/no")
                values[f.name] = raw.lower() in ("1", "true", "yes")
            elif is_list:
                values[f.name] = [base(item) for item in raw.split()]
            else:
                values[f.name] = base(raw)
        except ValueError as e:
            raise UserError(f"{name}={raw!r} is invalid ({e}); fix or unset the variable") from None
    return values


def parse_config(argv: list[str] | None = None, environ=None, parser=None, config_cls=PeerConfig):
    """The validated config and the set of settings the user set explicitly (flag or environment variable)."""
    environ = os.environ if environ is None else environ
    values = _from_env(environ, config_cls)
    values.update(vars((parser or build_parser()).parse_args(argv)))
    cfg = config_cls(**values).validate()
    return cfg, set(values)


def setup_logging(*, quiet: bool = False, verbose: bool = False, log_format: str = "text") -> None:
    """Every command's logging: stderr through ``peer.logs`` (text or JSON lines, never over the status line)."""
    logs.setup(quiet=quiet, verbose=verbose, log_format=log_format)
    logging.getLogger("transformers").setLevel(logging.WARNING)
    # hivemind's log level, its shutdown noise and warnings (hivemind_compat imports no hivemind: it must come first)
    hivemind_compat.configure_logging()


def run_command(prog: str, body: Callable[[], object], interrupted: str | None = "interrupted") -> int:
    """The frame of every bertswarm command's ``main``: runs ``body``; a :class:`UserError` becomes one line on stderr
    (``<prog>: error: ...``) and its exit code, Ctrl-C the line ``<prog>: <interrupted>`` (None: none) and 130; no
    traceback for either."""
    try:
        body()
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        if interrupted:
            print(f"{prog}: {interrupted}", file=sys.stderr, flush=True)
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["doctor"]:  # `bertswarm-peer doctor [flags]`: would a peer with these flags work here?
        from peer import doctor

        return doctor.main(argv[1:])
    if argv[:1] == ["id"]:  # `bertswarm-peer id [--state-dir DIR]`: the peer id to send a restricted run's creator
        return run_command("bertswarm-peer id", lambda: print_peer_id(argv[1:]))

    def body() -> None:
        cfg, explicit = parse_config(argv)
        setup_logging(quiet=cfg.quiet, verbose=cfg.verbose, log_format=cfg.log_format)
        check_data_flag(cfg.data)  # a wrong --data is answered at once, not after seconds of imports
        from peer.swarm import hivemind_compat

        hivemind_compat.check_version()  # before anything that subclasses hivemind's internals is imported
        from peer import trainer  # heavy imports (torch, hivemind) after the flags are known to be sane

        trainer.run(cfg, explicit)

    return run_command("bertswarm-peer", body)


def check_data_flag(data: list[str]) -> None:
    """``--data``'s text entries name readable text (:func:`peer.data.corpus.check_start`); a prepared directory is
    checked when it is opened."""
    from peer.data import corpus, shards  # light: no torch, no hivemind

    try:
        corpus.check_start([entry for entry in data if not shards.is_prepared(entry)])
    except InputError as e:
        raise e.with_flag("--data") from None


def print_peer_id(argv: list[str]) -> None:
    """This peer's id (from ``--identity`` or ``<state-dir>/identity.key``, made now if there is none yet): what a
    volunteer sends the creator of a restricted run (``--allow``)."""
    cfg, _ = parse_config(argv)
    from peer.swarm import identity

    key, _ = identity.ensure_identity(cfg.identity_path)
    print(identity.peer_id_of_public_key(key.get_public_key()).to_base58(), flush=True)


if __name__ == "__main__":
    sys.exit(main())
