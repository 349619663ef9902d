"""experiments/training/metrics_writer.training_wall_s: a run's training time summed over the processes that ran it."""

from experiments.training import metrics_writer


def test_training_wall_s_sums_every_process_of_a_resumed_run(tmp_path):
    first = metrics_writer.MetricsWriter(str(tmp_path))
    for step, wall in ((50, 30.0), (100, 61.0), (150, 90.5)):
        first.write(step, "train", {"loss": 1.0, "wall_s": wall})
    first.write(150, "eval", {"loss": 1.0})  # events without wall_s do not count
    first.close()
    second = metrics_writer.MetricsWriter(str(tmp_path))  # resumed from the checkpoint at step 100
    for step, wall in ((150, 40.0), (200, 70.25)):
        second.write(step, "train", {"loss": 1.0, "wall_s": wall})
    second.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 250, "split": "train", "wall_s": 99')  # torn by a kill: not an event
    assert metrics_writer.training_wall_s(str(tmp_path)) == 90.5 + 70.25


def test_training_wall_s_of_one_process_is_its_last_event(tmp_path):
    writer = metrics_writer.MetricsWriter(str(tmp_path))
    for step, wall in ((1, 5.0), (2, 5.5)):
        writer.write(step, "train", {"wall_s": wall})
    writer.close()
    assert metrics_writer.training_wall_s(str(tmp_path)) == 5.5
