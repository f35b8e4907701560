"""The node's side of ``privacy=client`` and ``privacy=local``: one ClientApp mod on train messages.

The server says what to do in each train message's ``config`` record
(:class:`~flmnist.protocol.messages.TrainSettings`: ``clipping_norm``, the key Flower's
``fixedclipping_mod`` reads, and ``local-dp-noise-multiplier``); :func:`update_dp_mod` runs after
the handler (``@app.train(mods=[update_dp_mod])`` in :mod:`flmnist.client_app`) and:

- ``privacy=client`` (a clip, no noise): clips the node's update (its model minus the model it
  was sent) to ``clipping_norm`` with Flower's own ``fixedclipping_mod``. A FedBuff reply is the
  update itself, which ``fixedclipping_mod`` cannot take (it subtracts the sent model from the
  reply), so that one is clipped here by :func:`private_update`, the same FlatClip.
- ``privacy=local`` (a clip and a noise multiplier sigma): what Flower's ``LocalDpMod`` does, the
  update clipped to ``clipping_norm`` C (the same FlatClip) and Gaussian noise added to every coordinate of the
  reply, here with std ``sigma * C`` (a Gaussian release of sensitivity C). Not ``LocalDpMod``
  itself: it takes its settings when the ClientApp is built (flmnist's come from the server in
  each message), calibrates by a per-release (epsilon, delta) with the classical bound, cannot
  take a FedBuff delta, and draws from numpy's global generator, which anything in the process
  may have seeded (with a seed the server sent, the server could subtract the noise). The noise
  here comes from a fresh generator seeded by the operating system, on every release.

The fault mod (``client.fault``) wraps this one, so a faulty node's reply is corrupted after the
clip: the server's screen must catch an update longer than the clip (:mod:`flmnist.engine.reply_path`).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

from flmnist.core.arrays import to_record, to_weights
from flmnist.engine.privacy import clip, noise
from flmnist.protocol import messages as p


def update_dp_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Clip (``privacy=client``) or clip and noise (``privacy=local``) the train reply's update."""
    config = msg.content[p.CONFIG]
    bound = float(config.get(p.CLIPPING_NORM, 0.0) or 0.0)
    sigma = float(config.get(p.LOCAL_DP_NOISE, 0.0) or 0.0)
    delta = bool(config.get(p.REPLY_DELTA, False))
    if bound <= 0:
        return call_next(msg, context)
    if sigma <= 0 and not delta:
        return fixedclipping_mod(msg, context, call_next)  # Flower's own client-side clip
    reply = call_next(msg, context)
    if reply.has_error() or not reply.has_content():
        return reply
    sent = to_weights(msg.content[p.ARRAYS])
    out = to_weights(reply.content[p.ARRAYS])
    reply.content[p.ARRAYS] = to_record(private_update(out, sent, delta, bound, sigma))
    return reply


def private_update(out: dict, sent: dict, delta: bool, bound: float, sigma: float,
                   rng: np.random.Generator | None = None) -> dict:
    """The reply's weights with the update clipped to ``bound`` and, if ``sigma`` > 0, Gaussian
    noise of std ``sigma * bound`` added to every coordinate (``out``: a model, or with ``delta``
    the update itself; ``sent``: the model the node was sent)."""
    update = clip({k: out[k] if delta else out[k] - sent[k] for k in out}, bound)  # FlatClip, as the server's
    if sigma > 0:
        update = noise(update, sigma * bound, rng or np.random.default_rng())  # fresh OS entropy: nobody else knows it
    return {k: (u if delta else sent[k] + u).astype(out[k].dtype) for k, u in update.items()}
