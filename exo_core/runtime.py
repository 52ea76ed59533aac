"""Assembling a running node: engine, peers server, discovery, frontends (used by `exo run` and tests)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from exo_core.discovery import Discovery, DiscoveryContext
from exo_core.engine import InferenceEngine, TextEngine
from exo_core.errors import ConfigError
from exo_core.models import files
from exo_core.models.cards import DEFAULT_MODEL_ID, ModelCard, find_card
from exo_core.node.generate import Generator
from exo_core.node.node import Node
from exo_core.node.topology import DeviceCapabilities, device_capabilities
from exo_core.plugins import Registry, registry

log = structlog.get_logger("exo.runtime")

ENGINE_STOP_S = 1.0  # what stopping waits for the node's engine


_OFF = ("0", "false", "no", "off")


@dataclass
class NodeConfig:
    """Everything `exo run` can set."""

    model: str | None = None
    engine: str | None = None
    engine_options: dict[str, Any] = field(default_factory=dict)
    node_id: str | None = None
    node_host: str = "0.0.0.0"
    node_port: int | None = None  # gRPC; None = pick a free one
    link_port: int | None = None  # the peer link's listener; None = pick a free one
    advertise_address: str | None = None
    api_host: str = "127.0.0.1"
    api_port: int = 52415
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()  # browser origins (besides the API's own) that may call it
    frontends: tuple[str, ...] | None = None  # None = all registered
    discovery: str = "udp"
    discovery_config_path: str | None = None
    discovery_options: dict[str, Any] = field(default_factory=dict)
    # The join token (`--join`; an old `--cluster-secret` string works too). None: this
    # machine's key under EXO_HOME, created on first start.
    cluster_secret: str | None = None
    insecure: bool = False  # no key: plaintext peer links, unsigned announcements (open LAN)
    partitioner: str = "ring-memory-weighted"
    wait_for_peers: int = 0
    max_context: int | None = None
    step_timeout: float = 120.0
    max_concurrent_requests: int = 32  # generations the API runs at once (as many more may wait)
    rpc_timeout: float = 10.0  # deadline of every peer RPC but health checks
    capabilities: DeviceCapabilities | None = None
    models_seed_dirs: list[str] = field(default_factory=list)  # searched before downloading
    # Build the engine's kernels/graphs for this node's shards ahead of requests (EXO_WARM=0: off).
    warm: bool = field(default_factory=lambda: os.environ.get("EXO_WARM", "1").lower() not in _OFF)


def choose_engine(reg: Registry, name: str | None) -> type[InferenceEngine]:
    """The engine class by name, or the default for this machine (highest priority available)."""
    if name:
        cls = reg.engines.get(name)
        if cls is None:
            raise ConfigError(f"unknown engine {name!r}; choose one of: {', '.join(sorted(reg.engines))}")
        ok, reason = cls.available()
        if not ok:
            raise ConfigError(f"engine {name!r} cannot run here: {reason}")
        return cls
    ranked = sorted(reg.engines.values(), key=lambda c: (-c.default_priority(), c.name))
    for cls in ranked:
        if cls.default_priority() >= 0 and cls.available()[0]:
            return cls
    raise ConfigError("no engine can run here")


def choose_model(reg: Registry, model_id: str | None) -> ModelCard:
    """The card by id or alias; a hub id (hf.co/ORG/REPO[:FILE|:QUANT]) gets a card from the
    model's own metadata, registered so the API serves it under that id."""
    try:
        return find_card(reg.models, model_id or DEFAULT_MODEL_ID)
    except LookupError as exc:
        from exo_core.models.hub_cards import card_from_hub, is_hub_id

        if not model_id or not is_hub_id(model_id):
            raise ConfigError(str(exc)) from exc
        try:
            card = card_from_hub(model_id)
        except files.ModelFilesError as hub_exc:
            raise ConfigError(str(hub_exc)) from hub_exc
        reg.models[card.id] = card
        return card


def persistent_node_id() -> str:
    """A UUID kept under EXO_HOME, so a node keeps its identity across restarts."""
    path = files.exo_home() / "node_id"
    try:
        existing = path.read_text(encoding="utf-8").strip()
        if existing:
            return existing
    except OSError:
        pass
    node_id = str(uuid.uuid4())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(node_id, encoding="utf-8")
    os.replace(tmp, path)
    return node_id


class Runtime:
    """A started node with its servers; `async with Runtime(config) as rt:` in tests."""

    def __init__(self, config: NodeConfig, reg: Registry | None = None) -> None:
        self.config = config
        self.registry = reg or registry()
        self.engine_cls = choose_engine(self.registry, config.engine)
        self._served: dict[str, ModelCard] | None = None  # a text engine's, once it looked
        try:
            self.default_model = choose_model(self.registry, config.model)
        except ConfigError:
            if not issubclass(self.engine_cls, TextEngine):
                raise
            # Maybe a model the engine's servers offer: known once it has asked them (start).
            self.default_model = choose_model(self.registry, None)
        self.node: Node | None = None
        self.generator: Generator | None = None
        self.frontends: list[Any] = []
        self.warmer: Any = None  # node.warm.Warmer while warming is on
        self.memory_reporter: Any = None  # node.topology.MemoryReporter: free memory, kept current
        self.discovery: Discovery | None = None
        self.peer_tracker: Any = None  # networking.peers.PeerTracker, the discovery's peer sink
        self.server: Any = None
        self.cluster_auth: Any = None  # networking.auth.ClusterAuth unless --insecure
        self.cluster_key_created = False  # the first start on this machine made a new key

    @property
    def served_models(self) -> dict[str, ModelCard]:
        if self._served is not None:
            return self._served
        return {cid: c for cid, c in self.registry.models.items() if self.engine_cls.can_serve(c)}

    async def start(self) -> None:
        """Start everything; if any piece fails, what already started is stopped again."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        cfg = self.config
        partitioner = self.registry.partitioners.get(cfg.partitioner)
        if partitioner is None:
            raise ConfigError(
                f"unknown partitioner {cfg.partitioner!r}; choose one of: "
                f"{', '.join(sorted(self.registry.partitioners))}"
            )
        files.set_seed_dirs([Path(d) for d in cfg.models_seed_dirs])
        engine = self.engine_cls({**cfg.engine_options, "max_context": cfg.max_context})
        models = dict(self.registry.models)
        if isinstance(engine, TextEngine):
            # Whole-request engines may find models on their servers (an upstream's /v1/models).
            for card in await engine.discover_models(models):
                models[card.id] = card
            self._served = {cid: c for cid, c in models.items() if engine.serves(c)}
            if cfg.model:
                self.default_model = choose_model(
                    dataclasses.replace(self.registry, models=models), cfg.model
                )
        node_id = cfg.node_id or persistent_node_id()
        self.node = Node(
            node_id,
            engine,
            models,
            capabilities=cfg.capabilities or device_capabilities(),
            partitioner=partitioner,
            step_timeout=cfg.step_timeout,
        )
        self.node.set_served_models(sorted(self.served_models))
        if cfg.capabilities is None:  # free memory changes: keep what the node reports current
            self._start_memory_reporter(self.node)
        self.generator = Generator(self.node, max_context=cfg.max_context)
        self.node.origin.max_context = cfg.max_context  # plans are checked for this context's KV cache
        await self.node.start()
        log.info(
            "node started",
            node_id=node_id,
            engine=self.engine_cls.name,
            model=self.default_model.id,
            models=len(self.served_models),
        )
        await self._start_networking()
        if cfg.warm:
            self._start_warming()
        if cfg.wait_for_peers:  # before serving: the API answers only once the cluster is there
            await self.wait_for_peers(cfg.wait_for_peers)
        for name, frontend_cls in self._frontend_classes():
            frontend = frontend_cls(self)
            await frontend.start()
            self.frontends.append(frontend)
            log.info("frontend started", frontend=name)

    async def _start_networking(self) -> None:
        """The peer server and discovery (a single node without them still serves).

        With `--discovery-module none` and no `--node-port` the node serves alone and opens no
        peer port. A manual peers file that lists this node gives its port when none is set.
        """
        cfg = self.config
        assert self.node is not None
        if cfg.discovery in ("", "none") and cfg.node_port is None:
            return
        discovery_cls = None
        if cfg.discovery not in ("", "none"):
            discovery_cls = self.registry.discovery.get(cfg.discovery)
            if discovery_cls is None:
                raise ConfigError(
                    f"unknown discovery module {cfg.discovery!r}; choose one of: "
                    f"{', '.join(sorted([*self.registry.discovery, 'none']))}"
                )
        from exo_core.networking import server as peer_server
        from exo_core.networking.auth import ClusterAuth
        from exo_core.networking.peers import PeerTracker

        if cfg.insecure:
            log.warning(
                "--insecure: peer links are plaintext and anyone on the network can join this "
                "cluster, read prompts and answer for layers; use it only on a network you trust"
            )
        else:
            self.cluster_auth = ClusterAuth(self._cluster_key(), self.node.node_id)
        peers_file = cfg.discovery_config_path
        if cfg.node_port is None and cfg.discovery == "manual" and peers_file:
            from exo_core.networking.manual import own_entry

            entry = own_entry(peers_file, self.node.node_id)
            if entry is not None:
                cfg.node_port = entry.port
        try:
            self.server = await peer_server.start_peer_server(
                self.node,
                cfg.node_host,
                cfg.node_port,
                self.cluster_auth,
                cfg.advertise_address,
                link_port=cfg.link_port,
            )
        except peer_server.PeerServerError as exc:
            raise ConfigError(str(exc)) from None
        if discovery_cls is None:
            return
        opts = cfg.discovery_options
        timeout = float(opts.get("timeout") or 30.0)
        self.peer_tracker = PeerTracker(
            self.node,
            auth=self.cluster_auth,
            rpc_timeout=cfg.rpc_timeout,
            timeout=timeout,
            node_id_filter=opts.get("node_id_filter"),
            expire_unoffered=discovery_cls.expires_unoffered,
        )
        node = self.node

        def set_own_capabilities(caps: DeviceCapabilities) -> None:
            node.capabilities = caps

        context = DiscoveryContext(
            node_id=node.node_id,
            port=node.port,
            peers=self.peer_tracker,
            node_info=node.info,
            options=opts,
            timeout=timeout,
            peers_file=Path(peers_file) if peers_file else None,
            auth=self.cluster_auth,
            set_own_capabilities=set_own_capabilities,
        )
        self.discovery = discovery_cls(context)
        await self.discovery.start()
        await self.peer_tracker.start()
        from exo_core.models.download import set_peer_source
        from exo_core.networking.file_transfer import PeerFiles, Prefetcher, node_channels

        # downloads ask the peers for a model's bytes before the hub
        set_peer_source(PeerFiles(node_channels(node), asyncio.get_running_loop()))
        node.origin.on_plan = Prefetcher(node).plan_made  # downloads start when a plan names a node

    def _start_memory_reporter(self, node: Node) -> None:
        from exo_core.models.memory import held_bytes
        from exo_core.node.topology import MemoryReporter

        def set_caps(caps: DeviceCapabilities) -> None:
            node.capabilities = caps

        def held() -> int:  # what the engine holds counts as usable for the same models
            return held_bytes(node.engine.loaded_shards, node.models)

        self.memory_reporter = MemoryReporter(lambda: node.capabilities, set_caps, held)
        self.memory_reporter.start()

    def _start_warming(self) -> None:
        """Warm this node's shard of the default model now (when its files are here), and every
        shard a plan names this node for, in the background."""
        from exo_core.node.partitioning import NoPlanError
        from exo_core.node.warm import Warmer

        node = self.node
        assert node is not None
        if isinstance(node.engine, TextEngine):
            return  # whole-request engines have nothing to build
        self.warmer = warmer = Warmer(node)
        previous = node.origin.on_plan

        def on_plan(card: ModelCard, plan: Any) -> None:
            if previous is not None:
                previous(card, plan)
            warmer.plan_made(card, plan)

        node.origin.on_plan = on_plan
        card = self.default_model
        if not any(files.files_present(card).values()):
            return  # nothing to build from yet: the first plan starts the download, then warms
        try:
            plan = node.make_plan(card)
        except (NoPlanError, ValueError) as exc:
            log.info("not warming", model=card.id, reason=str(exc))
            return
        warmer.plan_made(card, plan)

    def _cluster_key(self) -> Any:
        """The key given (saved as this machine's from now on), or the stored one, or a new one."""
        from exo_core.networking import keys

        home = files.exo_home()
        try:
            if self.config.cluster_secret:
                key = keys.ClusterKey.from_token(self.config.cluster_secret)
                if keys.load(home) != key:
                    keys.save(home, key)
                    log.info(
                        "joined a cluster; its key is kept for the next start", cluster_key=key.fingerprint
                    )
            else:
                key, self.cluster_key_created = keys.load_or_create(home)
                if self.cluster_key_created:
                    log.info(
                        "created this cluster's key; to add a machine, run `exo token` here and "
                        "`exo run --join TOKEN` there",
                        cluster_key=key.fingerprint,
                        path=str(keys.key_path(home)),
                    )
        except (keys.ClusterKeyError, OSError) as exc:
            raise ConfigError(str(exc)) from None
        return key

    def _frontend_classes(self) -> list[tuple[str, Any]]:
        wanted = self.config.frontends
        items = sorted(self.registry.frontends.items())
        if wanted is None:
            return items
        return [(n, c) for n, c in items if n in wanted]

    async def wait_for_peers(self, count: int, timeout: float | None = None) -> None:
        """Return once `count` peers are verified (before the API starts serving)."""
        assert self.node is not None
        log.info("waiting for peers", wanted=count, have=len(self.node.peers))
        last_log = time.monotonic()
        async with asyncio.timeout(timeout):
            while len(self.node.peers) < count:
                await asyncio.sleep(0.1)
                if time.monotonic() - last_log > 10:
                    last_log = time.monotonic()
                    log.info("still waiting for peers", wanted=count, have=sorted(self.node.peers))
        log.info("peers ready", peers=sorted(self.node.peers))

    async def stop(self) -> None:
        reporter, self.memory_reporter = self.memory_reporter, None
        if reporter is not None:
            await reporter.stop()
        warmer, self.warmer = self.warmer, None
        if warmer is not None:
            await warmer.stop()
        for frontend in reversed(self.frontends):
            with contextlib.suppress(Exception):
                await frontend.stop()
        self.frontends.clear()
        discovery, self.discovery = self.discovery, None
        if discovery is not None:
            with contextlib.suppress(Exception):
                await discovery.stop()
        tracker, self.peer_tracker = self.peer_tracker, None
        if tracker is not None:
            from exo_core.models.download import set_peer_source

            set_peer_source(None)
            with contextlib.suppress(Exception):
                await tracker.stop()
        server, self.server = self.server, None
        if server is not None:
            with contextlib.suppress(Exception):
                await server.stop(0.5)
        if self.node is not None:
            try:
                # An engine busy computing (a long prefill) frees its thread only when that step
                # ends; `exo run` exits without waiting for it (cli._exit_now).
                await asyncio.wait_for(self.node.stop(), ENGINE_STOP_S)
            except TimeoutError:
                log.warning("the engine is still computing; not waiting for it", seconds=ENGINE_STOP_S)

    async def __aenter__(self) -> Runtime:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
