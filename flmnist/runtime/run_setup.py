"""Building a run: run directory, resume, recorder, hooks, fleet, reply screen and engine.

:func:`build_run` is everything the ServerApp does before training starts. It picks the
engine by the strategy's kind: Flower's round loop for a Flower strategy (guarded by
:class:`~flmnist.engine.guard.Guarded`), :class:`~flmnist.engine.async_loop.AsyncLoop` for an
:class:`~flmnist.strategies.asynchronous.AsyncStrategy`. Both share one
:class:`~flmnist.engine.reply_path.ReplyPath`.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from datetime import datetime
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.superlink.grid import InMemoryGrid
from omegaconf import DictConfig, OmegaConf

from flmnist.config.resume import check_fingerprint, fingerprint
from flmnist.config.validate import collapse_args, run_length
from flmnist.core.arrays import to_record
from flmnist.core.build import build
from flmnist.core.errors import ConfigError
from flmnist.core.run_files import atomic_write, find_checkpoint
from flmnist.engine.adaptive_privacy import wrap_adaptive
from flmnist.engine.async_loop import AsyncLoop
from flmnist.engine.base import Engine
from flmnist.engine.effect_guard import EffectGuard, equal_weights
from flmnist.engine.guard import Guarded
from flmnist.engine.identity import IdentityBook, read_registry
from flmnist.engine.local_privacy import LocalAccountant
from flmnist.engine.privacy import AsyncPrivacy, SampleAccountant, wrap_sync
from flmnist.engine.privacy import problem as privacy_problem
from flmnist.engine.reply_path import ReplyPath
from flmnist.engine.sync import SyncEngine
from flmnist.flower_patches.node_order import RegistrationOrderGrid
from flmnist.flower_patches.polling_grid import PollingGrid, poll_every
from flmnist.ml.data import load_mnist
from flmnist.ml.export import save_state_dict
from flmnist.ml.mnist_files import ensure_mnist, resolve_root
from flmnist.ml.partition import holdout_split, label_counts, node_seed
from flmnist.observers.base import RunContext
from flmnist.observers.checkpoint import CheckpointWriter, check_layout, load_checkpoint
from flmnist.observers.probe import Probes
from flmnist.observers.recorder import RunRecorder, run_label
from flmnist.observers.trackers import Trackers
from flmnist.protocol.messages import TrainSettings, simulated_node_name
from flmnist.protocol.screen import NodeLimits, ReplyScreen, ScreenSettings
from flmnist.protocol.settings import AsyncLoopSettings, PrivacySettings
from flmnist.strategies import build_strategy


def say(line: str) -> None:
    """One line to the run's log (streamed by ``flwr run --stream``)."""
    log(INFO, "%s", line)


@dataclass
class Run:
    cfg: DictConfig
    run_dir: Path
    recorder: RunRecorder
    engine: Engine
    initial: ArrayRecord
    checkpoint: dict | None

    def checkpoints_written(self) -> None:
        """The engine's last checkpoint is on disk; an error writing one is raised."""
        self.engine.path.checkpoints.wait()


def make_run_dir(cfg: DictConfig) -> Path:
    if cfg.run_dir:
        return Path(cfg.run_dir).expanduser().resolve()
    now = datetime.now()  # the flmnist command's scheme (conf/config.yaml, hydra.run.dir)
    return (Path(cfg.output_dir) / now.strftime("%Y-%m-%d") / f"{now.strftime('%H-%M-%S')}_{cfg.name}"
            ).expanduser().resolve()


def resume_config(cfg: DictConfig) -> tuple[DictConfig, dict | None]:
    """With ``resume`` set: the checkpoint and the config of the run it continues."""
    if not cfg.resume:
        return cfg, None
    path = find_checkpoint(str(cfg.resume), cfg.output_dir)
    checkpoint = check_layout(load_checkpoint(path), path)
    saved = OmegaConf.load(path.parent / "config.yaml")
    check_fingerprint(saved, checkpoint.get("config"), path.parent / "config.yaml")
    check_arrays(checkpoint.get("arrays"), build(saved.model, "model"), path)
    saved.run_dir = str(path.parent)
    saved.resume = str(path)
    say(f"Resuming {path.parent} after {checkpoint.get('kind')} step {checkpoint.get('round')}")
    return saved, checkpoint


def check_arrays(arrays, model: torch.nn.Module, path: Path) -> None:
    """The checkpoint's global model has the names and shapes of the run's model (``config.yaml``'s
    ``model``); else a ConfigError before anything is written (the nodes failed to load it, and the
    finished run's model.pt was overwritten with it)."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {str(k): tuple(np.shape(v)) for k, v in arrays.items()} if isinstance(arrays, dict) else {}
    if found != want:
        differ = sorted(set(want) ^ set(found)) or [k for k in want if want[k] != found[k]]
        raise ConfigError(f"resume: {path} holds another model than {path.parent / 'config.yaml'} names "
                          f"({type(model).__name__}; differing: {', '.join(differ[:4])}"
                          f"{' ...' if len(differ) > 4 else ''}): a checkpoint or config.yaml from another run? "
                          "Put the run's own back, or start a new run")


def partitions(cfg: DictConfig, root: Path, run_dir: Path) -> NodeLimits:
    """Examples and per-digit counts of each node's partition (printed and saved), and the
    training and held-out sizes the screen holds replies to."""
    labels = load_mnist(str(root), True)[1].numpy()
    parts = build(cfg.partition, "partition")(labels, cfg.num_nodes, cfg.seed)
    rows = [{"node": i, "examples": len(p), "digits": label_counts(labels[p])} for i, p in enumerate(parts)]
    atomic_write(run_dir / "partition_report.json", json.dumps(rows, indent=1))
    header = "node,examples," + ",".join(f"digit_{d}" for d in range(10))
    lines = [f"{r['node']},{r['examples']}," + ",".join(map(str, r["digits"])) for r in rows]
    atomic_write(run_dir / "partition_report.csv", "\n".join([header, *lines]) + "\n")
    say(f"Partition report ({len(rows)} nodes, holdout {cfg.data.holdout_fraction:.0%} per node):")
    shown = rows if len(rows) <= 20 else rows[:10] + rows[-5:]
    for r in shown:
        counts = " ".join(f"{d}:{n}" for d, n in enumerate(r["digits"]))
        say(f"  node {r['node']:>3}: {r['examples']:>6} examples | {counts}")
    if len(rows) > len(shown):
        say(f"  ... {len(rows) - len(shown)} more nodes in {run_dir / 'partition_report.csv'}")
    # each node's held-out images, as the node splits them: its evaluation counts per digit must be these
    held = [holdout_split(part, cfg.data.holdout_fraction, node_seed(cfg.seed, i))[1] for i, part in enumerate(parts)]
    return NodeLimits(tuple(len(part) - len(h) for part, h in zip(parts, held)), tuple(len(h) for h in held),
                      cfg.screen.max_examples, tuple(tuple(label_counts(labels[h])) for h in held))


def build_observers(cfg: DictConfig, context: RunContext) -> list:
    """The ``observers`` section, in order: each entry's ``_target_`` called with ``run=context``;
    an entry that is null, or whose factory returns None (turned off), adds nothing."""
    observers = []
    for name, node in (cfg.get("observers") or {}).items():
        if node is None:
            continue
        observer = build(node, f"observers.{name}", run=context)
        if observer is not None:
            observers.append(observer)
    return observers


def wait_for_nodes(grid: Grid, needed: int, timeout: float, setting: str = "num_nodes") -> None:
    """Wait until ``needed`` SuperNodes are connected, else fail saying how to fix it (``setting``:
    the one ``needed`` comes from)."""
    deadline = time.monotonic() + timeout
    while True:
        found = len(list(grid.get_node_ids()))
        if found >= needed:
            return
        if time.monotonic() > deadline:
            raise ConfigError(
                f"{setting}={needed} but only {found} SuperNode(s) connected after {timeout:.0f} s "
                f"(wait_for_nodes). In simulation pass --federation-config \"num-supernodes={needed}\" to "
                f"flwr run (the flmnist command does this); in deployment start that many SuperNodes, or lower "
                f"{setting}."
            )
        time.sleep(0.5)


def node_metrics(privacy: PrivacySettings) -> str:
    """What the nodes send beside their DP updates, for the start's privacy line."""
    if privacy.node_metrics == "withheld":
        return "; nodes send no training losses and client evaluation is off (privacy.node_metrics=withheld)"
    return "; nodes send their training losses un-noised (privacy.node_metrics=plain)"


def private(cfg: DictConfig, strategy, screen: ScreenSettings) -> PrivacySettings:
    """The ``privacy`` section, checked against the strategy; says what it does to the run."""
    privacy = PrivacySettings(**(cfg.get("privacy") or {}))
    if not privacy.on:
        if privacy.node_metrics == "withheld":
            say("No differential privacy" + node_metrics(privacy))
        return privacy
    problem = privacy_problem(privacy, strategy)
    if problem:
        raise ConfigError(problem)
    if privacy.mechanism == "dpsgd":
        say(f"Differential privacy: DP-SGD on every node (sample-level), clipping_norm {privacy.clipping_norm:g} "
            f"per image, noise_multiplier {privacy.noise_multiplier:g}, delta {privacy.target_delta:g}"
            + (f", budget epsilon {privacy.max_epsilon:g} per node" if privacy.max_epsilon is not None else "")
            + node_metrics(privacy))
        return privacy
    if privacy.target_delta >= 1.0 / cfg.num_nodes:  # (dpsgd returned above: its unit is one image)
        log(WARNING, "%s: privacy.target_delta=%g is not below 1/num_nodes (%g): epsilon at a delta that large "
            "allows revealing one node's data outright with that probability; use a delta well below %g",
            f"privacy={privacy.mechanism}", privacy.target_delta, 1.0 / cfg.num_nodes, 1.0 / cfg.num_nodes)
    if privacy.mechanism == "local":
        say(f"Differential privacy: local, every node clips its update to {privacy.clipping_norm:g} and adds noise "
            f"of std {privacy.noise_multiplier * privacy.clipping_norm:g} (noise_multiplier "
            f"{privacy.noise_multiplier:g}), delta {privacy.target_delta:g}"
            + (f", budget epsilon {privacy.max_epsilon:g} per node" if privacy.max_epsilon is not None else "")
            + node_metrics(privacy))
        return privacy
    name = f"privacy={privacy.mechanism}"
    if getattr(strategy, "weight_by_examples", False):
        strategy.weight_by_examples = False
        say(f"{name}: FedBuff averages its buffer with equal weights (weight_by_examples=false)")
    crossed = [k for k in ("max_norm_ratio", "clip_to_median", "guard_max_harm") if getattr(screen, k) is not None]
    if crossed:
        log(WARNING, "%s with screen.%s on: it judges one node's update by the others', so the "
            "reported epsilon does not bound what the models reveal", name, ", screen.".join(crossed))
    where = "on each node, checked by the server" if privacy.mechanism == "client" else "on the server"
    if privacy.mechanism == "central_adaptive":
        where = (f"the first round's, then adapted towards the {privacy.target_quantile:g} quantile of update "
                 f"norms, count_stddev {privacy.count_stddev:g}")
    say(f"Differential privacy: {privacy.mechanism}, clipping_norm {privacy.clipping_norm:g} ({where}), noise_multiplier "
        f"{privacy.noise_multiplier:g}, delta {privacy.target_delta:g}"
        + (f", budget epsilon {privacy.max_epsilon:g}" if privacy.max_epsilon is not None else "")
        + (node_metrics(privacy) if privacy.node_metrics == "withheld" else ""))
    return privacy


def evaluate_in_train(cfg: DictConfig, grid: Grid, strategy, asynchronous: bool) -> bool:
    """``sampling.client_evaluation``: whether a synchronous run's nodes evaluate the received model in
    their train reply (one exchange per round) rather than in a separate evaluate exchange.
    ``auto``: in train on real SuperNodes (where every exchange costs seconds), an exchange in
    simulation (where it costs little and the client metrics stay as they always were)."""
    how = cfg.sampling.get("client_evaluation", "auto")
    if asynchronous or not getattr(strategy, "fraction_evaluate", 0.0):
        return False
    return how == "in_train" or (how == "auto" and not isinstance(grid, InMemoryGrid))


def build_run(grid: Grid, cfg: DictConfig) -> Run:
    """Everything before training: directories, data checks, screen, hooks and the engine."""
    cfg, checkpoint = resume_config(cfg)
    torch.manual_seed(cfg.seed)  # the initial global model
    random.seed(cfg.seed)  # for anything drawing from the global generator (sync sampling has its own: SeededSampling)
    run_dir = make_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if checkpoint is None:
        atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(cfg), durable=True)
    say(f"flmnist run directory: {run_dir}")
    root = resolve_root(cfg.data.root)
    ensure_mnist(root, cfg.data.download)
    limits = partitions(cfg, root, run_dir)
    model = build(cfg.model, "model")  # the initial global model: first draw after the seed

    strategy = build_strategy(cfg.strategy)
    unit, steps = run_length(cfg)  # rounds, or server updates for an asynchronous strategy
    asynchronous = unit == "update"
    screen = ScreenSettings(**cfg.screen)
    privacy = private(cfg, strategy, screen)
    dpsgd, local = privacy.mechanism == "dpsgd", privacy.mechanism == "local"
    sent = TrainSettings.from_config(
        cfg, str(root),
        reply_delta=bool(getattr(strategy, "reply_delta", False)),
        proximal_mu=float(getattr(strategy, "proximal_mu", 0.0) or 0.0),
        dp_noise_multiplier=privacy.noise_multiplier if dpsgd else 0.0,
        dp_clipping_norm=privacy.clipping_norm if dpsgd else 0.0,
        update_clip=privacy.clipping_norm if privacy.mechanism in ("client", "local") else 0.0,
        update_noise=privacy.noise_multiplier if local else 0.0,
        evaluate_received=evaluate_in_train(cfg, grid, strategy, asynchronous),
        withhold_losses=privacy.node_metrics == "withheld",
    )
    loop = AsyncLoopSettings(**cfg.async_loop) if asynchronous else None
    trackers = Trackers([build(cfg.logger, "logger")] if cfg.get("logger") is not None else [])
    recorder = RunRecorder(run_dir, steps, cfg.target_accuracy, printer=say, unit=unit, save_tensors=save_state_dict,
                           label=run_label(cfg), trackers=trackers, **collapse_args(cfg))
    recorder.losses_withheld = sent.withhold_losses
    test_images, test_labels = load_mnist(str(root), False)
    model_fn = lambda: build(cfg.model, "model")
    context = RunContext(run_dir, test_images, test_labels, model_fn, steps, asynchronous, say, recorder.label,
                         probe=Probes(test_images, test_labels, model_fn))
    hooks = build_observers(cfg, context)
    identities = IdentityBook(read_registry(screen.registry) if screen.registry else None,
                              connected=grid.get_node_ids)
    guard = None
    if screen.guard_max_harm is not None:
        guard = EffectGuard(context.probe(cfg.eval.probe_size or 1000, cfg.eval.batch_size), screen.guard_max_harm,
                            window=screen.guard_window)
    path = ReplyPath(ReplyScreen(screen, limits), sent, hooks, recorder, cfg.checkpoint_every,
                     stop_at=cfg.target_accuracy if cfg.get("stop_at_target") else None,
                     identities=identities, guard=guard, asynchronous=asynchronous,
                     update_clip=privacy.clipping_norm if privacy.mechanism == "client" else None)
    path.run_config = fingerprint(OmegaConf.load(run_dir / "config.yaml"))  # as written: what a resume reads
    path.checkpoints = CheckpointWriter(background=True)  # (server_app.run waits for it when the engine ends)
    fleet = build(cfg.fleet, "fleet", num_nodes=cfg.num_nodes, seed=cfg.seed)
    if fleet is not None:
        devices = [f"{simulated_node_name(i)}: {fleet.profile(i).name} (speed {fleet.profile(i).speed:g})"
                   for i in range(cfg.num_nodes)]
        say(f"Simulated devices: {', '.join(devices[:20])}{' ...' if len(devices) > 20 else ''}")
    # A deployment may start with some boards down: wait for the strategy's minimum.
    least = int(getattr(strategy, "min_available_nodes", 0) or 0)
    wait_for_nodes(grid, least or cfg.num_nodes, cfg.wait_for_nodes,
                   "sampling.min_available_nodes" if least else "num_nodes")
    accountant, per_round = None, 0
    if dpsgd or local:  # each node's epsilon from the DP-SGD steps (or local DP releases) it is asked for
        accountant = (LocalAccountant if local else SampleAccountant)(privacy, sent, limits.train_examples)
        accountant.check_first_release()
    elif privacy.on and asynchronous:
        accountant = AsyncPrivacy(privacy, cfg.num_nodes)
    elif privacy.on:
        wrap = wrap_adaptive if privacy.mechanism == "central_adaptive" else wrap_sync
        strategy, accountant, per_round = wrap(strategy, privacy, cfg.num_nodes)
    if guard is not None:  # the strategy's weighting, once privacy has set it (central DP: equal weights)
        guard.equal_weights = equal_weights(strategy)
    if asynchronous:
        engine = AsyncLoop(grid, strategy, path, loop, fleet=fleet, poll_interval=cfg.poll_interval or 0.05,
                           privacy=accountant)
    else:
        guarded = Guarded(strategy, path, fleet=fleet, virtual_timeout=cfg.async_loop.update_timeout,
                          max_failed_rounds=cfg.max_failed_rounds, privacy=accountant, per_round=per_round,
                          evaluate_in_train=sent.evaluate_received)
        # Nodes in registration order (Flower's own order changes run to run), replies polled every poll_interval.
        interval = poll_every(grid, cfg.poll_interval)
        sync_grid = RegistrationOrderGrid(PollingGrid(grid, interval) if interval else grid)
        engine = SyncEngine(sync_grid, guarded, path, sent.to_record(), cfg.num_rounds, cfg.round_timeout,
                            seed=cfg.seed)
    initial = ArrayRecord(model.state_dict())
    if checkpoint is not None:
        initial = to_record({k: np.asarray(v) for k, v in checkpoint["arrays"].items()})
        recorder.restore(checkpoint["recorder"],
                         final_state={k: torch.from_numpy(np.array(v)) for k, v in checkpoint["arrays"].items()},
                         step=checkpoint["round"])
    # Last: a setup step that fails (the registry, nodes that never came, the privacy budget) leaves no tracker run open
    trackers.call("start", run_dir, run_dir.name, OmegaConf.to_container(cfg, resolve=True))
    return Run(cfg, run_dir, recorder, engine, initial, checkpoint)
