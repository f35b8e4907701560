"""What a config does that its user may not expect, without being wrong: one line each, which
the ServerApp logs at the start of the run (:func:`flmnist.config.compose.compose_config`'s ``notes``)."""

from __future__ import annotations

from hydra.utils import get_class
from omegaconf import DictConfig, ListConfig, OmegaConf

from flmnist.strategies.asynchronous import AsyncStrategy


def _asynchronous(cfg: DictConfig) -> bool | None:
    """Whether the config's strategy is asynchronous; None for a ``_target_`` that cannot be loaded
    (reported when the strategy is built)."""
    try:
        return issubclass(get_class(cfg.strategy._target_), AsyncStrategy)
    except Exception:  # noqa: BLE001
        return None


def unused_by_strategy(cfg: DictConfig, keys: list[str]) -> list[str]:
    """One line for each setting in ``keys`` (what the user typed) that the chosen strategy's kind
    does not read: an asynchronous strategy's loop has no rounds and samples no nodes; a
    synchronous one has no asynchronous loop (except its ``update_timeout``, under a fleet)."""
    if (asynchronous := _asynchronous(cfg)) is None:
        return []
    strategy = str(cfg.strategy._target_).rsplit(".", 1)[-1]
    notes = []
    for key in dict.fromkeys(keys):
        if asynchronous and (key in ("num_rounds", "eval.every", "eval.rounds") or key.startswith("sampling.")):
            notes.append(f"{key} is not used by {strategy}, an asynchronous strategy: it runs until async_loop."
                         "max_server_updates (or max_client_updates, time_budget), async_loop.concurrency nodes training, "
                         "evaluating every async_loop.eval_every server updates")
        elif not asynchronous and key.startswith("async_loop.") and key != "async_loop.update_timeout":
            notes.append(f"{key} is not used by {strategy}, a synchronous strategy (async_loop.* is for "
                         "strategy=fedasync or fedbuff); its rounds are num_rounds, its nodes sampling.*")
    return notes


def unused_holdout(cfg: DictConfig) -> list[str]:
    """A line when a synchronous run holds data out for client evaluation that it never runs."""
    held, evaluated = OmegaConf.select(cfg, "data.holdout_fraction"), OmegaConf.select(cfg, "sampling.fraction_evaluate")
    if _asynchronous(cfg) is False and held and not evaluated:
        return [(f"data.holdout_fraction={held:g} keeps that share of each node's examples out of training for client "
                "evaluation, which sampling.fraction_evaluate=0 turns off: they are never used (data.holdout_fraction=0 "
                "trains on them)")]
    return []


def rounds_past_the_end(cfg: DictConfig) -> list[str]:
    """A shortened run (``experiment=seed002 num_rounds=5``): one line for each of ``eval.rounds``
    (and, under a synchronous strategy, ``eval.update_rounds``) that lists rounds past
    ``num_rounds``. They stay in the config, so that extending the run (``resume=DIR
    num_rounds=40``) evaluates them; the last round is evaluated anyway."""
    last = OmegaConf.select(cfg, "num_rounds")
    if isinstance(last, bool) or not isinstance(last, int) or last < 1:
        return []  # validate() names the bad num_rounds
    keys = ["eval.rounds"] + ([] if _asynchronous(cfg) else ["eval.update_rounds"])
    notes = []
    for key in keys:
        values = OmegaConf.select(cfg, key)
        if not isinstance(values, ListConfig):
            continue
        late = [r for r in values if isinstance(r, int) and not isinstance(r, bool) and r > last]
        if late:
            notes.append(f"{key} lists {', '.join(map(str, late))} past num_rounds={last}: not reached in this run "
                         "(kept for an extension with resume=; the last round is always evaluated)")
    return notes
