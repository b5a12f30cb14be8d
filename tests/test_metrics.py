"""relora_ds/metrics.py: what a resumed run's metrics.jsonl keeps and what it moves aside."""
from __future__ import annotations

import json

from relora_ds.metrics import MetricsLogger


def test_resume_rewinds_later_steps_and_the_switch_logged_after_the_checkpoint(tmp_path):
    """The warm-start switch is logged with step N at the start of step N + 1, after step N's checkpoint:
    a run resumed from step N switches again, so the earlier record moves aside with the later steps
    (each record once, as before the interruption). Step N's own records stay."""
    recs = [{"step": 9, "loss": 2.0}, {"step": 10, "loss": 1.9}, {"step": 10, "event": "checkpoint"},
            {"event": "switch_to_relora", "step": 10}, {"step": 11, "loss": 1.8}, {"step": 11, "event": "reset"}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 12, "lo')
    logger = MetricsLogger(tmp_path, enabled=True, resume_step=10)
    logger.close()
    kept = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    moved = (tmp_path / MetricsLogger.REWOUND).read_text().splitlines()
    assert kept == recs[:3]
    assert [json.loads(l) for l in moved[:3]] == recs[3:] and moved[3] == '{"step": 12, "lo'
    assert logger.rewound == 4
