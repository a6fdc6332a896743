"""Running a model's one trace plan through nnsight's remote execution (NDIF).

A ``[[models]]`` entry with ``remote = true`` is not loaded here: NDIF hosts the hub
model, and each batch's traced pass (the same plan of steps the local run uses, see
:mod:`probescope.trace`) travels as an nnsight request. The server has torch,
transformers, accelerate and nnsight but not probescope, so probescope's reduction code
(and every plugin module whose reductions or site selectors the plan uses) is
registered with :func:`nnsight.register`, which ships it by value, as source, with the
request. Only what the block saves comes back: each read's reduction and the errors of
reads that failed, never an activation.

``remote = "local"`` runs the same request here instead: nnsight's local simulation
serialises the block exactly as for NDIF and deserialises it with the modules the
server would lack hidden; :class:`StrictLocalSimulation` also refuses to import them
again (an editable install would otherwise bring probescope back through its import
hook), so a reduction that was not shipped by value fails here as it would on NDIF.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable

#: Top-level packages the server has (nnsight's own list, plus the standard library).
#: Anything else the request needs must travel by value.
SERVER_PACKAGES = ("torch", "numpy", "transformers", "accelerate", "diffusers", "einops", "peft", "nnsight")


def missing_support() -> str | None:
    """Why this nnsight cannot run probescope remotely, or None."""
    import nnsight

    version = getattr(nnsight, "__version__", "?")
    if not hasattr(nnsight, "register"):
        return f"remote needs nnsight.register (ships probescope's reductions to the server); nnsight {version} has none"
    try:
        from nnsight.intervention.backends.local import LocalSimulationBackend  # noqa: F401
        from nnsight.modeling.transformers import TransformersModel  # noqa: F401
    except ImportError as exc:
        return f"remote needs nnsight's TransformersModel and local simulation backend; nnsight {version}: {exc}"
    return None


def remote_problem(mode: bool | str) -> str | None:
    """Why a model entry's ``remote`` cannot run here, or None: this nnsight lacks what
    it needs, or (``remote = true``) no NDIF API key is set."""
    missing = missing_support()
    if missing or mode != True:  # noqa: E712 - "local" needs no key
        return missing
    from nnsight import CONFIG

    if not CONFIG.API.APIKEY:
        return ("remote = true needs an NDIF API key (https://ndif.us): set the NDIF_API_KEY environment "
                "variable or run nnsight.CONFIG.set_default_api_key(KEY) once")
    return None


def unservable(task: Any, info: Any, mode: bool | str) -> list[str]:
    """Why a probe cannot run on a remote model, found from the config: a read of
    attention probabilities (eager attention is switched on where the model runs, and
    NDIF runs it as it hosts it), or a vision-language model (its processor's tensors
    are not sent)."""
    from probescope.architectures.base import ATTENTION

    problems = []
    if info.vision is not None:
        problems.append(f"remote = {mode!r} runs text models only; this one is a vision-language model")
    try:
        sites = task.probe.sites(task.params, info)
    except Exception:  # the probe's own failure is reported when it runs
        return problems
    if any(site.kind == ATTENTION for site in sites):
        problems.append(f"reads attention probabilities, which need eager attention switched on where the model "
                        f"runs; NDIF runs the model as it hosts it (remote = {mode!r}), so run this probe on a "
                        "local entry")
    return problems


def wrapper(loaded: Any) -> Any:
    """How :func:`probescope.trace.wrapped` wraps a remote model: as nnsight's
    ``TransformersModel`` (text generation), whose trace can travel. For NDIF
    (``remote = true``) it is built from the hub id and revision, on the meta device (no
    weights here; its remote key names that id, revision and task); for the local
    simulation it wraps the model loaded here."""
    from nnsight.modeling.transformers import TransformersModel

    if loaded.remote is True:
        entry = loaded.entry
        return lambda model: TransformersModel(str(entry.hub), task="text-generation", revision=entry.revision,
                                               tokenizer=loaded.tokenizer)
    return lambda model: TransformersModel(model, task="text-generation", tokenizer=loaded.tokenizer)


def backend(envoy: Any, mode: bool | str, shipped: Iterable[str]) -> Any:
    """The nnsight backend for one batch's pass: NDIF's (``True``) or the strict local
    simulation of it (``"local"``)."""
    if mode == "local":
        return strict_local_simulation(envoy, shipped)
    from nnsight.intervention.backends.remote import RemoteBackend

    return RemoteBackend(envoy.to_model_key(), env=envoy._remoteable_get_env(), blocking=True)


def shipped_modules(steps: Iterable[Any]) -> list[str]:
    """The modules whose code a plan runs inside the trace and the server lacks:
    probescope itself, and the module of every reduction, site selector and finish
    function (a third-party plugin's own)."""
    names = {"probescope"}
    for step in steps:
        for _, site, read in step.reads:
            for function in (read.reduce, site.select, site.finish):
                module = getattr(function, "__module__", None)
                root = (module or "__main__").split(".")[0]
                # __main__ (a notebook's or script's own functions) cloudpickle always ships by value
                if root != "__main__" and root not in SERVER_PACKAGES and root not in sys.stdlib_module_names:
                    names.add(module)
    return sorted(names)


def register(steps: Iterable[Any]) -> list[str]:
    """Register every module of :func:`shipped_modules` with nnsight, so the request
    carries their code by value; returns their names."""
    import nnsight

    names = shipped_modules(steps)
    for name in names:
        nnsight.register(name)
    return names


#: probescope's own dependencies that the server lacks: refused during the simulation too
CLIENT_ONLY = ("probescope", "xarray", "matplotlib", "pluggy", "netCDF4")


class _Refuse:
    """A meta path finder refusing ``roots``, as a server without them would."""

    def __init__(self, roots: Iterable[str]):
        self.roots = set(roots)

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name.split(".")[0] in self.roots:
            raise ModuleNotFoundError(f"No module named {name!r} on the server: code the request needs from it "
                                      "was not shipped by value (nnsight.register)", name=name)
        return None


def strict_local_simulation(model: Any, shipped: Iterable[str]) -> Any:
    """nnsight's local simulation backend for ``model``, made as strict as a server.

    nnsight's simulation serialises the request as for NDIF and deserialises it with
    the user's modules hidden from ``sys.modules`` and ``sys.path``; then runs it with
    everything back in place. An editable install's import hook would still load
    probescope during deserialisation, and an import inside a shipped function would
    still find it while the block runs. Here, for the whole request (deserialisation
    and the run), ``probescope``, its client-only dependencies and the ``shipped``
    plugin packages are out of ``sys.modules`` and cannot be imported at all, as on a
    server that does not have them.
    """
    from nnsight.intervention.backends.local import LocalSimulationBackend

    roots = set(CLIENT_ONLY) | {name.split(".")[0] for name in shipped}

    class StrictLocalSimulation(LocalSimulationBackend):
        def __call__(self, tracer: Any) -> None:
            self.kept_out: dict = {}
            self.finder = _Refuse(roots)
            try:
                super().__call__(tracer)  # serialise as a client, then deserialise and run
            finally:
                if self.finder in sys.meta_path:
                    sys.meta_path.remove(self.finder)
                sys.modules.update(self.kept_out)

        def _hide_local_modules(self) -> dict:  # called after serialising, before deserialising
            hidden = super()._hide_local_modules()
            self.kept_out = {name: hidden["modules"].pop(name) for name in list(hidden["modules"])
                             if name.split(".")[0] in roots}
            self.kept_out.update({name: sys.modules.pop(name) for name in list(sys.modules)
                                  if name.split(".")[0] in roots})
            sys.meta_path.insert(0, self.finder)  # kept out until the run ends, not just the deserialising
            return hidden

    return StrictLocalSimulation(model)
