"""The command line: ``probescope run | render | plugins | demo | check | schema | new``.

Errors in the user's input print a message (never a traceback, unless ``--debug``) and
exit non-zero: 2 for bad input (an invalid configuration, a missing file), 1 for work that
failed, 130 when interrupted (Ctrl-C), after one line saying what was finished.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

from probescope.errors import ConfigError, Interrupted, ProbescopeError, ProbescopeWarning, describe_failure


def _parse_value(text: str) -> Any:
    """A ``--set`` value: TOML syntax (numbers, booleans, lists, quoted strings), else a bare string."""
    from probescope.config import tomllib

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def cmd_run(args: argparse.Namespace) -> int:
    from probescope import config as config_mod
    from probescope import runner
    from probescope.plugins.manager import load_registry

    registry = load_registry()
    plan = config_mod.load_plan(args.config, registry)
    outcome = runner.execute(plan, registry, raise_on_failure=False, resume=args.resume)
    for path in outcome.files:
        print(f"wrote {path}")
    if outcome.failures:
        for failure, error in zip(outcome.failures, outcome.errors):
            print(f"error: {describe_failure(failure)}", file=sys.stderr)
            if args.debug and error is not None:
                _print_traceback(error)
        return 1
    return 0


def _print_traceback(error: BaseException) -> None:
    """The full traceback of ``error`` (and its causes), indented under its error line."""
    import traceback

    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    print("  " + text.rstrip().replace("\n", "\n  "), file=sys.stderr)


def cmd_render(args: argparse.Namespace) -> int:
    from probescope.api import render

    params = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError("--set", [_problem(item)])
        params[key.strip()] = _parse_value(value.strip())
    render(args.datasets, args.renderer, args.output, **params)
    print(f"wrote {args.output}")
    return 0


def _problem(item: str):
    from probescope.errors import Problem

    return Problem("", f"expected KEY=VALUE, got {item!r}")


def cmd_plugins(args: argparse.Namespace) -> int:
    from probescope.plugins.manager import KINDS, load_registry

    if args.name:
        from probescope.commands import print_plugin

        return print_plugin(args.name)

    registry = load_registry()
    for kind in KINDS:
        print(f"{kind}s:")
        entries = registry.entries[kind]
        if not entries:
            print("  (none)")
        for name in registry.names(kind):
            entry = entries[name]
            origin = entry.origin
            description = getattr(entry.obj, "description", "")
            print(f"  {name:<22} {origin.package} {origin.version}  [{origin.plugin}]  {description}")
    if registry.failures:
        print("plugins that failed to load:")
        for failure in registry.failures:
            print(f"  {failure.plugin} ({failure.package}): {failure.error}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from probescope import config as config_mod
    from probescope import demo, runner
    from probescope.plugins.manager import load_registry

    folder = Path(args.output).resolve()
    config_path = demo.write_demo(folder, tiny=args.tiny)
    registry = load_registry()
    plan = config_mod.load_plan(config_path, registry)
    outcome = runner.execute(plan, registry)
    for path in outcome.files:
        print(f"wrote {path}")
    print(f"demo config: {config_path}  (edit it and run: probescope run {config_path})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from probescope.version import __version__

    parser = argparse.ArgumentParser(prog="probescope", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"probescope {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="print the full traceback of every failure (for debugging a plugin)")
    parser.add_argument("--library-progress", action="store_true",
                        help="also show transformers' and huggingface_hub's own progress bars and messages")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the probes and renderers of a TOML config")
    p.add_argument("config", help="path of the TOML configuration")
    p.add_argument("--resume", action="store_true",
                   help="skip datasets an earlier run left on disk for an unchanged configuration "
                        "(per its manifest.json); compute the rest")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("render", help="draw saved datasets again, without any model")
    p.add_argument("datasets", nargs="+", help="saved .nc datasets, one per model")
    p.add_argument("--renderer", "-r", required=True, help="renderer name (see: probescope plugins)")
    p.add_argument("--output", "-o", required=True, help="figure file (.png, .pdf or .svg)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="renderer parameter (TOML value)")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("plugins", help="list probes, renderers and architectures with their origin; "
                                       "with NAME, that plugin's parameters")
    p.add_argument("name", nargs="?", help="a probe, renderer or architecture: print its parameters")
    p.set_defaults(func=cmd_plugins)

    from probescope.commands import add_parsers

    add_parsers(sub)

    p = sub.add_parser("demo", help="probe a trained SmolLM2-135M and its random-weight twin, offline")
    p.add_argument("--output", "-o", default="probescope-demo", help="folder to write to (default: %(default)s)")
    p.add_argument("--tiny", action="store_true",
                   help="two small random GPT-2-shaped models instead (fast; needs no model package)")
    p.set_defaults(func=cmd_demo)
    return parser


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """``warning: message`` for probescope's own warnings; Python's format for others."""
    if issubclass(category, ProbescopeWarning):
        return f"warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


_python_format_warning = warnings.formatwarning


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    from probescope.progress import library_progress

    previous, warnings.formatwarning = warnings.formatwarning, _format_warning
    try:
        with library_progress(args.library_progress):
            return args.func(args)
    except Interrupted as exc:
        print(str(exc), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # before any work started: nothing was written
        print("interrupted: nothing written", file=sys.stderr)
        return Interrupted.exit_code
    except ProbescopeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if args.debug:
            _print_traceback(exc)
        return exc.exit_code
    except FileNotFoundError as exc:  # a file the user named (a dataset to render)
        print(f"error: {exc}", file=sys.stderr)
        if args.debug:
            _print_traceback(exc)
        return 2
    finally:
        warnings.formatwarning = previous


if __name__ == "__main__":
    sys.exit(main())
