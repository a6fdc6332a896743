"""Command-line commands for configuration and plugin authors: ``check``, ``schema``,
``new`` and ``plugins NAME``. :mod:`probescope.cli` adds them with :func:`add_parsers`;
errors follow its rules (a :class:`~probescope.errors.ProbescopeError` is a message and
an exit status: 2 for bad input, 1 for failed work)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from probescope.errors import ConfigError, PluginError, Problem


def cmd_check(args: argparse.Namespace) -> int:
    """Both stages of validation (the file, then each model's config and tokenizer), no weights."""
    from probescope import config as config_mod
    from probescope import runner
    from probescope.plugins.manager import load_registry

    registry = load_registry()
    plan = config_mod.load_plan(args.config, registry)
    prepared = runner.prepare(plan, registry)
    probes = ", ".join(task.name for task in plan.probes)
    print(f"{args.config}: valid: {len(prepared)} model(s), probes {probes}, "
          f"{len(plan.renderers)} figure(s) to {plan.output_dir}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from probescope.config_schema import dumps
    from probescope.plugins.manager import load_registry

    text = dumps(load_registry())
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}")
    else:
        sys.stdout.write(text)
    return 0


def cmd_new(args: argparse.Namespace) -> int:
    from probescope.scaffold import new_plugin

    try:
        root = new_plugin(args.kind, args.name, Path(args.output), probe=args.probe)
    except ValueError as exc:
        raise ConfigError(f"probescope new {args.kind} {args.name}", [Problem("", str(exc))]) from None
    print(f"wrote {root}")
    print(f"next: pip install -e {root} && python -m pytest {root / 'tests'}")
    return 0


def print_plugin(name: str) -> int:
    """``probescope plugins NAME``: each probe, renderer or architecture of that name."""
    from probescope.config_schema import parameter_table
    from probescope.plugins.manager import KINDS, load_registry

    registry = load_registry()
    found = [(kind, registry.entries[kind][name]) for kind in KINDS if name in registry.entries[kind]]
    if not found:
        known = ", ".join(sorted({n for kind in KINDS for n in registry.names(kind)}))
        raise PluginError(f"no probe, renderer or architecture named {name!r}; available: {known}")
    for kind, entry in found:
        if kind == "architecture":
            print(f"architecture {name}  (from {entry.origin.package} {entry.origin.version}): "
                  f"model types {', '.join(getattr(entry.obj, 'model_types', ()) or ())}")
        else:
            print(parameter_table(kind, entry.obj, entry.origin), end="")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="validate a TOML config (file, then each model's config and "
                                     "tokenizer; no weights): exit 0 when valid, 2 when not")
    p.add_argument("config", help="path of the TOML configuration")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("schema", help="print the JSON Schema of the config file, with every installed "
                                      "probe's and renderer's parameters (for editors)")
    p.add_argument("--output", "-o", help="write it to this file instead of printing it")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("new", help="write a ready-to-install plugin package with a passing test")
    p.add_argument("kind", choices=["probe", "renderer"])
    p.add_argument("name", help="the plugin's name (lower case, digits, _)")
    p.add_argument("--output", "-o", default=".", help="folder to create the package in (default: .)")
    p.add_argument("--probe", default="token_similarity",
                   help="renderer only: the probe whose datasets it draws (default: %(default)s)")
    p.set_defaults(func=cmd_new)
