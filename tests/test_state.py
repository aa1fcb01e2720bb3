"""RunState: the one place divergence, patience, the stop and the result are decided (both
training loops keep one per run)."""

from __future__ import annotations

import math

from spectral_mup.config import build_config
from spectral_mup.train import RunState


def test_divergence_against_the_ceiling_at_the_step_it_happens():
    s = RunState(ceiling=5.0)
    assert s.check_train_loss(4.9)
    s.record_step(0.1, 4.9)
    assert not s.check_train_loss(5.1)  # above the ceiling: diverged at iteration 1
    assert (s.status, s.stop_reason, s.diverged_at, s.active) == ("diverged", "diverged", 1, False)
    assert not RunState(ceiling=5.0).check_train_loss(math.nan)


def test_val_divergence_best_and_patience():
    s = RunState(ceiling=5.0, patience=2)
    for lr, loss in ((0.1, 4.0), (0.1, 3.0)):
        s.record_step(lr, loss)
    assert s.record_eval(3.5) is None and (s.best_val, s.best_iter) == (3.5, 2)
    s.record_step(0.1, 3.0)
    assert s.record_eval(3.6) is None  # 1 iteration without improvement
    s.record_step(0.1, 3.0)
    assert s.record_eval(3.7) == "early_stop" and s.status == "ok"  # 2 >= patience
    v = RunState(ceiling=5.0)
    v.record_step(0.1, 4.0)
    assert v.record_eval(math.inf) == "diverged" and v.diverged_at == 1


def test_result_and_checkpoint_round_trip():
    cfg = build_config({"train": {"batch_size": 4, "eval_interval": 2}, "model": {"block_size": 8}})
    s = RunState.of(cfg, vocab_size=65)
    assert s.ceiling == 2.0 * math.log(65) and s.patience == 0
    for loss in (4.0, 3.0, 2.0):
        s.record_step(0.5, loss)
    s.record_eval(2.5, win_rate=0.25)
    s.finish()
    r = s.result(cfg, num_params=10, data="d", wall_time=1.0, eval_time=0.5)
    assert r["stop_reason"] == "max_iters" and r["iters"] == 3 and r["tokens"] == 3 * 4 * 8
    assert r["final_train_loss"] == 2.5  # mean of the last eval_interval = 2 losses
    assert r["best_val_loss"] == 2.5 and r["eval_time"] == 0.5 and "stacked" not in r
    assert r["history"]["win_rate"] == [[3, 0.25]]
    paused = s.result(cfg, num_params=10, data="d", wall_time=1.0, stop_reason="stop_at")
    assert paused["stop_reason"] == "stop_at" and "eval_time" not in paused
    again = RunState(ceiling=s.ceiling)
    again.load_state_dict(s.state_dict(), s.history)
    assert again == s
