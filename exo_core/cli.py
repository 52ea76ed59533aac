"""The `exo` command line (click). Plugins are loaded in main(), never at import time."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
from typing import Any, NoReturn

import click

from exo_core import __version__

RUN_HELP = """Start a node (serving the OpenAI-compatible API), or answer one prompt and exit.

MODEL is a model card id (see `exo models`); the default is the embedded smollm2-135m.
"""


CLI_HELP = """exo: one OpenAI-compatible endpoint over the devices you own.

With no subcommand, `exo [OPTIONS]` is `exo run [OPTIONS]`. Global options, accepted anywhere:
--log-format console|json (or EXO_LOG_FORMAT), EXO_LOG_LEVEL=debug|info|warning.
"""


class ExoUsageError(click.ClickException):
    """A one-line error (no usage dump, no traceback), exit code 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"exo: error: {self.format_message()}", err=True)


def _fail(exc: Exception) -> NoReturn:
    """`exo: error: EXC` on stderr, and exit code 1."""
    click.echo(f"exo: error: {exc}", err=True)
    sys.exit(1)


class DefaultRunGroup(click.Group):
    """`exo [OPTIONS]` with no subcommand runs `exo run [OPTIONS]` (what deployments already type)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "-h", "--version")):
            args = ["run", *args]
        return super().parse_args(ctx, args)


def _run_options() -> list[click.Parameter]:
    """The options of `exo run`, including the names existing deployments use."""
    opt = click.Option
    return [
        click.Argument(["model"], required=False),
        opt(["--engine", "--inference-engine", "engine"], help="Inference engine (see `exo plugins`)."),
        opt(["--prompt"], help="Answer this prompt, print it, and exit."),
        opt(["--run-model"], metavar="MODEL", help="Old form of `exo run MODEL --prompt ...`."),
        opt(["--max-tokens"], type=int, default=None, help="With --prompt: most tokens to generate."),
        opt(
            ["--temperature"],
            type=float,
            default=0.0,
            show_default=True,
            help="With --prompt: sampling temperature.",
        ),
        opt(
            ["--api-host"],
            default="127.0.0.1",
            show_default=True,
            help="Address the API listens on (0.0.0.0: every interface; then set --api-key).",
        ),
        opt(
            ["--api-port", "--chatgpt-api-port", "api_port"],
            type=int,
            default=52415,
            show_default=True,
            help="API port.",
        ),
        opt(["--api-key"], envvar="EXO_API_KEY", help="Require this bearer key on the API (or EXO_API_KEY)."),
        opt(
            ["--cors-origin", "cors_origins"],
            multiple=True,
            metavar="ORIGIN",
            help="Let web pages on this origin (e.g. http://localhost:3000) call the API; repeatable.",
        ),
        opt(["--node-id"], help="This node's id (default: a UUID kept in EXO_HOME)."),
        opt(
            ["--node-host"],
            default="0.0.0.0",
            show_default=True,
            help="Address the peer (gRPC) server listens on.",
        ),
        opt(["--node-port"], type=int, default=None, help="Peer (gRPC) port (default: a free port)."),
        opt(
            ["--link-port"],
            type=int,
            default=None,
            help="Port of the peer link (steps and tokens; default: a free port). Behind a firewall, "
            "let it through with --node-port; if peers cannot reach it, the link goes over --node-port, slower.",
        ),
        opt(
            ["--discovery-module"],
            default="udp",
            show_default=True,
            help="Peer discovery: udp, manual, tailscale, none.",
        ),
        opt(["--discovery-config-path"], type=click.Path(), help="Peers file for --discovery-module manual."),
        opt(
            ["--discovery-timeout"],
            type=float,
            default=30.0,
            show_default=True,
            help="Seconds before a silent peer is dropped.",
        ),
        opt(["--broadcast-port"], type=int, default=5678, show_default=True, help="UDP discovery port."),
        opt(
            ["--interface-type-filter"],
            default=None,
            help="UDP discovery: only these interface types (comma-separated: ethernet,wifi,thunderbolt,vpn,container,loopback).",
        ),
        opt(["--node-id-filter"], default=None, help="Only accept peers with these ids (comma-separated)."),
        opt(
            ["--join", "--cluster-secret", "cluster_secret"],
            envvar=["EXO_CLUSTER_TOKEN", "EXO_CLUSTER_SECRET"],
            metavar="TOKEN",
            help="Join the cluster of this token (`exo token` on a member prints it; or EXO_CLUSTER_TOKEN). "
            "Default: this machine's own key, created on first start.",
        ),
        opt(
            ["--insecure"],
            is_flag=True,
            help="No cluster key: plaintext peer links, and anyone on the network can join (trusted LANs only).",
        ),
        opt(
            ["--wait-for-peers"],
            type=int,
            default=0,
            show_default=True,
            help="Wait for this many peers before serving.",
        ),
        opt(
            ["--partitioner"],
            default="ring-memory-weighted",
            show_default=True,
            help="Partitioning strategy.",
        ),
        opt(["--max-context"], type=int, default=None, help="Cap the context per request (tokens)."),
        opt(
            ["--step-timeout"],
            type=float,
            default=120.0,
            show_default=True,
            help="Seconds a stage may take before it is re-planned around.",
        ),
        opt(
            ["--max-concurrent-requests"],
            type=click.IntRange(min=1),
            default=32,
            show_default=True,
            help="Generations the API runs at once; as many more wait up to 30 s, the rest get a 503.",
        ),
        opt(["--models-seed-dir"], type=click.Path(), help="Look for model files here before downloading."),
        opt(
            ["--memory-limit"],
            envvar="EXO_MEMORY_LIMIT",
            help="Memory this node offers for models (16GB, 800MB, ...), instead of what it has free.",
        ),
        opt(
            ["--warm/--no-warm"],
            envvar="EXO_WARM",
            default=True,
            show_default=True,
            help="Build the engine's kernels and graphs for this node's layers in the background at "
            "start and when a plan names this node (or EXO_WARM=0).",
        ),
        opt(
            ["--disable-tui"],
            is_flag=True,
            help="Plain logs instead of the live terminal view (also when stdout is not a terminal).",
        ),
    ]


def _serve(params: dict[str, Any], engine_option_names: set[str], discovery_option_names: set[str]) -> None:
    from exo_core.runtime import ConfigError, NodeConfig, Runtime

    if params.get("memory_limit"):
        from exo_core.node.topology import MEMORY_LIMIT_ENV, parse_memory

        try:
            parse_memory(params["memory_limit"])
        except ValueError as exc:
            raise ExoUsageError(f"--memory-limit: {exc}") from None
        os.environ[MEMORY_LIMIT_ENV] = params["memory_limit"]
    if params.get("run_model"):
        if params.get("model") and params["model"] != params["run_model"]:
            raise ExoUsageError("give the model once: MODEL or --run-model, not both")
        params["model"] = params["run_model"]
        params["prompt"] = params.get("prompt") or "Who are you?"
    discovery_options = {
        "timeout": params.get("discovery_timeout"),
        "broadcast_port": params.get("broadcast_port"),
        "interface_type_filter": _csv(params.get("interface_type_filter")),
        "node_id_filter": _csv(params.get("node_id_filter")),
        **{k: v for k, v in params.items() if k in discovery_option_names},
    }
    if params.get("insecure") and params.get("cluster_secret"):
        source = click.get_current_context().get_parameter_source("cluster_secret")
        if source == click.core.ParameterSource.COMMANDLINE:
            raise ExoUsageError("--insecure runs without a cluster key: give it or --join TOKEN, not both")
        params["cluster_secret"] = None  # a token in the environment yields to an explicit --insecure
    prompt = params.get("prompt")
    config = NodeConfig(
        model=params.get("model"),
        engine=params.get("engine"),
        engine_options={k: v for k, v in params.items() if k in engine_option_names},
        node_id=params.get("node_id"),
        node_host=params["node_host"],
        node_port=params.get("node_port"),
        link_port=params.get("link_port"),
        api_host=params["api_host"],
        api_port=params["api_port"],
        api_key=params.get("api_key"),
        cors_origins=tuple(params.get("cors_origins") or ()),
        frontends=() if prompt else None,
        discovery="none" if prompt and params["discovery_module"] == "udp" else params["discovery_module"],
        discovery_config_path=params.get("discovery_config_path"),
        discovery_options=discovery_options,
        cluster_secret=params.get("cluster_secret"),
        insecure=bool(params.get("insecure")),
        partitioner=params["partitioner"],
        wait_for_peers=params["wait_for_peers"],
        max_context=params.get("max_context"),
        step_timeout=params["step_timeout"],
        max_concurrent_requests=params["max_concurrent_requests"],
        models_seed_dirs=[params["models_seed_dir"]] if params.get("models_seed_dir") else [],
        warm=bool(params.get("warm", True)) and not prompt,  # one answer builds only what it needs
    )
    try:
        runtime = Runtime(config)
    except ConfigError as exc:
        raise ExoUsageError(str(exc)) from None
    try:
        if prompt:
            code = asyncio.run(
                _answer(runtime, prompt, params.get("max_tokens"), params["temperature"]),
                loop_factory=_loop_factory(),
            )
            _exit_now(code)
        asyncio.run(
            _serve_forever(runtime, tui=sys.stdout.isatty() and not params.get("disable_tui")),
            loop_factory=_loop_factory(),
        )
    except ConfigError as exc:
        raise ExoUsageError(str(exc)) from None
    except KeyboardInterrupt:
        pass
    except asyncio.CancelledError:  # --prompt stopped by a signal
        _exit_now(130)
    _exit_now(0)


# However long stopping takes (the engine mid-prefill, connections draining), the process is
# gone this long after SIGTERM or Ctrl-C.
STOP_DEADLINE_S = 1.5


def _exit_soon(then: Any) -> None:
    """A stop signal: arm the deadline (a daemon timer that exits the process), then `then()`."""
    global _deadline
    if _deadline is None:
        _deadline = threading.Timer(STOP_DEADLINE_S, _exit_now, (0,))
        _deadline.daemon = True
        _deadline.start()
    then()


_deadline: threading.Timer | None = None


def _loop_factory():
    """uvloop's event loop where it is installed (EXO_UVLOOP=0: asyncio's own)."""
    if os.environ.get("EXO_UVLOOP", "1") == "0":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _exit_now(code: int) -> None:
    """Exit at once, so a stop (SIGTERM, Ctrl-C) finishes within 2 s whatever the engine does:
    the runtime has stopped (it waits at most a second for the engine), and an engine thread
    still computing a prefill is not joined, as Python would at exit."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _csv(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


async def _answer(runtime: Any, prompt: str, max_tokens: int | None, temperature: float) -> int:
    """`exo run --prompt`: the same generation path as the API, printed as it streams."""
    from exo_core.models.tokenizer import TokenizerError
    from exo_core.node.generate import TextRequest
    from exo_core.node.messages import GenerationError
    from exo_core.node.sampling import SamplingParams

    loop, main = asyncio.get_running_loop(), asyncio.current_task()
    assert main is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _exit_soon, main.cancel)
    async with runtime:
        request = TextRequest(
            model=runtime.default_model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            sampling=SamplingParams(temperature=temperature),
        )
        try:
            prepared = runtime.generator.prepare(request)
            async for chunk in runtime.generator.stream(prepared):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
        except (GenerationError, TokenizerError, ValueError, OSError) as exc:
            click.echo(f"\nexo: error: {exc}", err=True)
            return 1
        sys.stdout.write("\n")
    return 0


async def _serve_forever(runtime: Any, tui: bool = False) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _exit_soon, stop.set)
    async with runtime:
        if runtime.cluster_key_created and sys.stderr.isatty():
            # On the terminal only: the token is a secret, so it never goes to the logs.
            token = runtime.cluster_auth.key.token
            click.echo(
                f"\nTo add a machine to this cluster, run there:\n\n    exo run --join {token}\n", err=True
            )
        view = None
        if tui:  # the live view: nodes, layers, requests, downloads (`exo_core.tui`)
            from exo_core.tui import live_view

            view = asyncio.create_task(live_view(runtime))
        try:
            await stop.wait()
        finally:
            if view is not None:
                view.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await view


def _plugins_command() -> click.Command:
    @click.command("plugins")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
    def plugins(as_json: bool) -> None:
        """List plugins: name, version, hooks, and any load error."""
        from exo_core.plugins import plugin_records

        records = plugin_records()
        if as_json:
            click.echo(json.dumps([r.__dict__ for r in records], indent=2))
            return
        from rich.console import Console
        from rich.table import Table

        table = Table("name", "version", "kind", "hooks", "status")
        for r in records:
            status = f"[red]error: {r.error}[/red]" if r.error else "ok"
            table.add_row(
                r.name, r.version or "-", "built-in" if r.builtin else "plugin", ", ".join(r.hooks), status
            )
        Console(width=160).print(table)

    return plugins


def _models_command() -> click.Command:
    @click.group("models", invoke_without_command=True)
    @click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
    @click.pass_context
    def models(ctx: click.Context, as_json: bool) -> None:
        """List model cards, what of each is on this node's disk, and how much; pull or remove them."""
        if ctx.invoked_subcommand is not None:
            return
        from exo_core.models.files import files_present
        from exo_core.models.store import hub_cards_on_disk, on_disk
        from exo_core.plugins import registry

        cards = sorted(registry().models.values(), key=lambda c: c.id)
        cards += hub_cards_on_disk(cards)
        rows = [
            {**c.to_dict(), "present": files_present(c), "on_disk": [d.to_dict() for d in on_disk(c)]}
            for c in cards
        ]
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        from rich.console import Console
        from rich.table import Table

        table = Table("id", "name", "layers", "sources", "on this node")
        for row in rows:
            here = ", ".join(_describe_on_disk(d) for d in row["on_disk"]) or "-"
            table.add_row(row["id"], row["name"], str(row["n_layers"]), ", ".join(row["sources"]), here)
        Console(width=160).print(table)

    @models.command("pull")
    @click.argument("model")
    @click.option("--layers", help="Only these layers, e.g. 0-15 (default: all).")
    @click.option(
        "--source",
        type=click.Choice(["gguf", "safetensors", "mlx"]),
        help="Which of the card's sources (default: the first it has of gguf, safetensors, mlx).",
    )
    def pull(model: str, layers: str | None, source: str | None) -> None:
        """Download a model (or only the files and byte ranges of some layers) into EXO_HOME.

        MODEL is a card id or a hub id (hf.co/ORG/REPO[:FILE.gguf|:QUANT]). Run it again after
        an interruption: it continues where it stopped.
        """
        from exo_core.models.files import ModelFilesError, shard_checkpoint
        from exo_core.plugins import registry
        from exo_core.runtime import ConfigError, choose_model
        from exo_core.tui import download_bars

        try:
            card = choose_model(registry(), model)
        except ConfigError as exc:
            raise ExoUsageError(str(exc)) from None
        shard = _layers_shard(card, layers)
        kinds = [source] if source else [k for k in ("gguf", "safetensors", "mlx") if k in card.sources]
        try:
            with download_bars():
                kind, path = shard_checkpoint(card, shard, kinds)
        except ModelFilesError as exc:
            _fail(exc)
        click.echo(f"{card.id} layers {shard.start_layer}-{shard.end_layer} ({kind}): {path}")

    @models.command("warm")
    @click.argument("model")
    @click.option("--layers", help="Only these layers, e.g. 0-15 (default: all).")
    @click.option("--engine", "engine_name", help="The engine to warm for (default: this machine's).")
    @click.option("--max-context", type=int, default=None, help="As `exo run --max-context` will be given.")
    def warm(model: str, layers: str | None, engine_name: str | None, max_context: int | None) -> None:
        """Build an engine's compiled kernels and graphs for a model ahead of its first requests.

        They are kept under EXO_HOME, so every later `exo run` on this machine starts warm.
        `exo run` also warms in the background by itself; this command waits until it is done.
        """
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        from exo_core.plugins import registry
        from exo_core.runtime import ConfigError, choose_engine, choose_model

        try:
            reg = registry()
            card = choose_model(reg, model)
            engine_cls = choose_engine(reg, engine_name)
        except ConfigError as exc:
            raise ExoUsageError(str(exc)) from None
        shard = _layers_shard(card, layers)

        # The options `exo run` gives the engine by default, so the graphs built are the ones it uses.
        options: dict[str, Any] = {o.name: o.default for o in engine_cls.cli_options if o.name}
        options["max_context"] = max_context

        async def build() -> None:
            engine = engine_cls(options)
            try:
                with Progress(
                    TextColumn("{task.description}"),
                    BarColumn(),
                    TextColumn("{task.fields[step]}"),
                    TimeElapsedColumn(),
                    transient=False,
                ) as bars:
                    task = bars.add_task(f"{engine_cls.name} {shard}", total=1.0, step="")
                    await engine.prepare(
                        shard, card, lambda what, done: bars.update(task, completed=done, step=what)
                    )
                    bars.update(task, completed=1.0, step="warm")
            finally:
                await engine.close()

        try:
            asyncio.run(build())
        except Exception as exc:
            _fail(exc)
        click.echo(f"{card.id} layers {shard.start_layer}-{shard.end_layer}: warm for {engine_cls.name}")

    @models.command("rm")
    @click.argument("model")
    def rm(model: str) -> None:
        """Delete a model's files from EXO_HOME (seed directories and the embedded model stay)."""
        from exo_core.models.cards import find_card
        from exo_core.models.files import ModelFilesError
        from exo_core.models.hub_cards import is_hub_id
        from exo_core.models.store import local_hub_card, remove
        from exo_core.plugins import registry

        try:
            card = local_hub_card(model) if is_hub_id(model) else find_card(registry().models, model)
        except (LookupError, ModelFilesError) as exc:
            raise ExoUsageError(str(exc)) from None
        removed = remove(card)
        if not removed:
            click.echo(f"{card.id}: nothing of it is in EXO_HOME")
        for path in removed:
            click.echo(f"removed {path}")

    return models


def _layers_shard(card: Any, layers: str | None) -> Any:
    """The shard `--layers FIRST-LAST` names (all layers without it); a usage error when bad."""
    from exo_core.models.shard import Shard

    if not layers:
        return Shard.whole(card.id, card.n_layers)
    try:
        start, _, end = layers.partition("-")
        return Shard(card.id, int(start), int(end or start), card.n_layers)
    except ValueError:
        raise ExoUsageError(f"--layers {layers!r}: give FIRST-LAST within 0-{card.n_layers - 1}") from None


def _describe_on_disk(entry: dict) -> str:
    held = f"{entry['bytes'] / 1e9:.2f} GB" if entry["bytes"] >= 1e8 else f"{entry['bytes'] / 1e6:.1f} MB"
    if not entry["complete"]:
        held += f" of {entry['size'] / 1e9:.2f} GB"
    return f"{entry['kind']} {held}"


def _token_command() -> click.Command:
    @click.command("token")
    def token() -> None:
        """Print this machine's cluster join token (creating the key on first use).

        On another machine, `exo run --join TOKEN` (or EXO_CLUSTER_TOKEN=TOKEN exo run) joins it.
        Anyone with the token can join the cluster and read its prompts: share it like a password.
        """
        from exo_core.models.files import exo_home
        from exo_core.networking import keys

        try:
            key, _ = keys.load_or_create(exo_home())
        except (keys.ClusterKeyError, OSError) as exc:
            raise ExoUsageError(str(exc)) from None
        click.echo(key.token)

    return token


def build_cli() -> click.Group:
    """The `exo` command group, with every loaded engine's and discovery module's `run` options."""
    from exo_core.plugins import pm, registry

    reg = registry()
    # Engines and discovery modules may carry their own `run` options (class attribute
    # `cli_options`); their values reach them as engine_options / discovery_options.
    plugin_params: list[click.Parameter] = []
    names: dict[str, set[str]] = {"engine": set(), "discovery": set()}
    seen: set[str] = set()
    for kind, classes in (("engine", reg.engines.values()), ("discovery", reg.discovery.values())):
        for cls in classes:
            for param in getattr(cls, "cli_options", ()):
                if param.name and param.name not in seen:
                    seen.add(param.name)
                    names[kind].add(param.name)
                    plugin_params.append(param)

    @click.group(cls=DefaultRunGroup, help=CLI_HELP)
    @click.version_option(__version__, prog_name="exo")
    def cli() -> None:
        pass

    def run(**params: Any) -> None:
        _serve(params, names["engine"], names["discovery"])

    cli.add_command(
        click.Command("run", callback=run, params=[*_run_options(), *plugin_params], help=RUN_HELP)
    )
    cli.add_command(_plugins_command())
    cli.add_command(_models_command())
    cli.add_command(_token_command())
    pm.hook.register_commands(cli=cli)
    return cli


def main(argv: list[str] | None = None) -> None:
    from exo_core.log import configure_logging
    from exo_core.plugins import load_plugins

    fmt = os.environ.get("EXO_LOG_FORMAT", "console")
    args = list(sys.argv[1:] if argv is None else argv)
    if "--log-format" in args:  # global, read before click so plugin loading logs right
        i = args.index("--log-format")
        if i + 1 < len(args):
            fmt = args[i + 1]
            del args[i : i + 2]
    configure_logging(fmt, os.environ.get("EXO_LOG_LEVEL", "info"))
    load_plugins()
    build_cli().main(args=args, prog_name="exo")


if __name__ == "__main__":
    main()
