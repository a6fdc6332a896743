"""Finding, loading and registering plugins.

Every plugin, built-in or not, is an entry point in the group ``probescope``, and every
entry point loads, whatever its name (a third party's ``gpt2`` entry point loads beside
the built-in one). Loading one that fails to import records the failure (shown by
``probescope plugins``, and named when a run asks for something only it could have
provided) and carries on with the rest. Registration hooks are called one plugin at a
time, so each probe, renderer and adapter is attributed to the plugin and distribution
that provided it, and two plugins registering one name is an error naming both.
"""

from __future__ import annotations

import importlib.metadata
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import pluggy

from probescope.errors import PluginConflictError, PluginError, did_you_mean
from probescope.plugins import hookspecs

ENTRY_POINT_GROUP = hookspecs.PROJECT
KINDS = ("probe", "renderer", "architecture")
_HOOK_OF_KIND = {
    "probe": "register_probes",
    "renderer": "register_renderers",
    "architecture": "register_architectures",
}


@dataclass(frozen=True)
class Origin:
    """Where a plugin came from."""

    plugin: str  # plugin (entry point) name
    package: str  # distribution that declared it, or "<local>"
    version: str


@dataclass(frozen=True)
class Registered:
    """One registered probe, renderer or adapter with its origin."""

    kind: str
    name: str
    obj: Any
    origin: Origin


@dataclass(frozen=True)
class LoadFailure:
    """A plugin that could not be imported or could not register."""

    plugin: str
    package: str
    error: str
    version: str = ""

    def describe(self) -> str:
        """``plugin 'pkg' (dist 1.0) failed to load: <error>``."""
        where = " ".join(part for part in (self.package, self.version) if part)
        return f"plugin {self.plugin!r} ({where}) failed to load: {self.error}"


@dataclass
class Registry:
    """Every probe, renderer and architecture adapter available, by name."""

    manager: pluggy.PluginManager
    entries: dict[str, dict[str, Registered]] = field(
        default_factory=lambda: {kind: {} for kind in KINDS}
    )
    failures: list[LoadFailure] = field(default_factory=list)

    @property
    def hook(self) -> Any:
        """The lifecycle hooks (``dataset_produced``, ``run_finished``)."""
        return self.manager.hook

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries[kind])

    def get(self, kind: str, name: str) -> Any:
        """The registered object, or a :class:`PluginError` listing what is available."""
        try:
            return self.entries[kind][name].obj
        except KeyError:
            known = ", ".join(self.names(kind)) or "none"
            broken = "".join(f"; {failure.describe()}" for failure in self.suspects(name))
            raise PluginError(f"unknown {kind} {name!r}{did_you_mean(name, self.names(kind))}{broken}; "
                              f"available: {known}") from None

    def suspects(self, name: str) -> list[LoadFailure]:
        """The plugins that failed to load and might have provided ``name``: the one of
        that name if there is one, else all of them."""
        named = [failure for failure in self.failures if failure.plugin == name]
        return named or list(self.failures)

    def all(self, kind: str) -> list[Any]:
        return [self.entries[kind][n].obj for n in self.names(kind)]

    def add(self, kind: str, obj: Any, origin: Origin) -> None:
        name = getattr(obj, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(
                f"plugin {origin.plugin!r} ({origin.package}) registered a {kind} without a name"
            )
        existing = self.entries[kind].get(name)
        if existing is not None:
            raise PluginConflictError(
                f"{kind} {name!r} is registered twice: by plugin {existing.origin.plugin!r} "
                f"({existing.origin.package} {existing.origin.version}) and by plugin "
                f"{origin.plugin!r} ({origin.package} {origin.version}); uninstall or rename one"
            )
        self.entries[kind][name] = Registered(kind, name, obj, origin)


def new_manager() -> pluggy.PluginManager:
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    return manager


def _entry_points() -> Iterable[importlib.metadata.EntryPoint]:
    return importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)


# Distribution name and version by metadata folder. Parsing METADATA is most of the cost
# of loading the registry, and a folder's name changes with the version it holds
# (``pkg-1.0.dist-info``), so a reinstall is never served a stale answer.
_DISTRIBUTIONS: dict[str, tuple[str, str]] = {}


def _origin(ep: importlib.metadata.EntryPoint) -> Origin:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return Origin(ep.name, "<unknown>", "")
    folder = str(getattr(dist, "_path", "")) or None
    if folder is None or folder not in _DISTRIBUTIONS:
        identity = (dist.metadata["Name"], dist.version)
        if folder is None:
            return Origin(ep.name, *identity)
        _DISTRIBUTIONS[folder] = identity
    return Origin(ep.name, *_DISTRIBUTIONS[folder])


def load_registry(extra_plugins: Iterable[tuple[str, Any]] = ()) -> Registry:
    """Load every ``probescope`` entry point, plus ``extra_plugins`` given as
    ``(name, plugin_object)`` (for plugins defined in a notebook or a test), and build the
    registry.

    :raises PluginConflictError: two plugins registered the same name.
    """
    manager = new_manager()
    registry = Registry(manager)
    origins: dict[str, Origin] = {}  # pluggy's name of each plugin -> where it came from
    seen: set[tuple[str, str, str]] = set()
    for ep in _entry_points():
        origin = _origin(ep)
        # The same distribution visible twice on sys.path lists its entry points twice;
        # two distributions may each have an entry point of one name, and both load.
        if (ep.name, ep.value, origin.package) in seen:
            continue
        seen.add((ep.name, ep.value, origin.package))
        key = ep.name if ep.name not in origins else f"{ep.name} ({origin.package})"
        try:
            plugin = ep.load()
            manager.register(plugin, name=key)
        except Exception as exc:  # a broken plugin must not stop the others
            registry.failures.append(LoadFailure(ep.name, origin.package, _describe(exc), origin.version))
            continue
        origins[key] = origin
    for name, plugin in extra_plugins:
        if manager.is_registered(plugin):  # installed too, and already loaded from its entry point
            continue
        key = name if name not in origins else f"{name} (<local>)"
        manager.register(plugin, name=key)
        origins[key] = Origin(name, "<local>", "")
    for kind in KINDS:
        _register_kind(registry, kind, origins)
    return registry


def _register_kind(registry: Registry, kind: str, origins: dict[str, Origin]) -> None:
    caller = getattr(registry.manager.hook, _HOOK_OF_KIND[kind])
    # One implementation at a time, so each registration knows which plugin made it.
    for impl in reversed(caller.get_hookimpls()):
        origin = origins.get(impl.plugin_name, Origin(impl.plugin_name, "<unknown>", ""))
        register: Callable[[Any], None] = lambda obj, _o=origin: registry.add(kind, obj, _o)
        try:
            impl.function(register=register)
        except PluginConflictError:
            raise
        except Exception as exc:
            registry.failures.append(LoadFailure(origin.plugin, origin.package, _describe(exc), origin.version))


def _describe(exc: BaseException) -> str:
    last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" (at {last[0].filename}:{last[0].lineno})" if last else ""
    return f"{type(exc).__name__}: {exc}{where}"
