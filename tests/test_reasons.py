"""The summary's rejection reasons are counted by kind (flmnist/protocol/reasons.py): a hostile node
varying a number in every reply made each rejection a reason of its own (a review)."""

from __future__ import annotations

from collections import Counter

from flmnist.protocol.reasons import MAX_KINDS, OTHER, count_reason, reason_kind


def test_rejections_that_differ_only_in_their_figures_or_quoted_text_count_as_one_kind():
    reasons: Counter = Counter()
    for n in range(200):
        count_reason(reasons, f"num-examples {20000 + n} is outside 1..15000 (partition {n % 3})")
        count_reason(reasons, f"update norm {n + 1.5:.3g}e+30 is over 100 x the median 0.{n}")
        count_reason(reasons, f"metric 'train-loss' must be a number, got str 'z{n}'")
    assert reasons == {"num-examples N is outside N..N": 200, "update norm N is over N x the median N": 200,
                       "metric '...' must be a number, got str '...'": 200}
    assert reason_kind("makes the aggregate worse on the probe set (12.3 pp: ...)") == \
        "makes the aggregate worse on the probe set"
    assert reason_kind("its dtype float64 is not float32") == "its dtype float64 is not float32"  # names keep digits


def test_the_kinds_counted_are_bounded():
    reasons: Counter = Counter()
    for n in range(3 * MAX_KINDS):
        count_reason(reasons, f"kind {chr(65 + n % 26)}{chr(65 + n // 26)} refused")
    assert len(reasons) == MAX_KINDS + 1 and reasons[OTHER] == 2 * MAX_KINDS
    assert sum(reasons.values()) == 3 * MAX_KINDS


def test_a_checkpoints_reasons_counted_as_written_are_counted_by_kind_on_resume():
    from flmnist.protocol.reasons import recounted

    saved = {f"num-examples {n} is outside 1..15000": 2 for n in range(60)} | {"claims another node's identity": 3}
    assert recounted(saved) == {"num-examples N is outside N..N": 120, "claims another node's identity": 3}


def test_what_a_node_sent_in_a_malformed_metric_makes_no_kind_of_its_own(task_identity):
    """One node's num-examples sent as lists ([1], [1, nan], [inf, 1.5], ...): the screen's reasons quoted
    the value, list lengths and nan/inf words made a kind of each, and 50 such replies took every slot
    of the table, an honest node's later rejection going under "other reasons" (a review)."""
    from test_screen import _metric, screen_train

    from flmnist.protocol import messages as p

    reasons: Counter = Counter()
    values = [[1] * k for k in range(1, 30)] + [[float("nan")] * k for k in range(1, 30)] + [[float("inf"), 1.5]]
    for value in values:
        count_reason(reasons, screen_train(_metric(p.NUM_EXAMPLES, value)).reason)
    count_reason(reasons, screen_train(_metric(p.NUM_EXAMPLES, 99)).reason)  # an honest node's figure
    assert reasons == {"metric '...' must be an integer, got list": len(values), "num-examples N is outside N..N": 1}
