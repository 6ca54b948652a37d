"""The console progress bar (tqdm) and the metrics file round trip."""

import io
import math

from nfnets.training import outputs


def test_progress_bar_shows_the_fields_and_messages_on_its_stream():
    stream = io.StringIO()
    bar = outputs.ProgressBar(10, initial=2, stream=stream, min_interval_s=0)
    bar.update(5, {"loss": 0.5, "accuracy": 0.875, "images_per_sec": 1234.4})
    bar.message("resuming")
    bar.update(10, {"loss": 0.25, "accuracy": 0.9375, "images_per_sec": 1300.0})
    bar.close()
    text = stream.getvalue()
    assert "5/10" in text and "10/10" in text and "ETA" in text
    assert "loss 0.5000, acc 0.8750, 1234 img/s" in text
    assert "loss 0.2500, acc 0.9375, 1300 img/s" in text
    assert "resuming\n" in text


def test_metrics_round_trip_and_truncate(tmp_path):
    writer = outputs.MetricsWriter(str(tmp_path), tensorboard=False)
    for step in (1, 2, 3):
        writer.write(step, {"train_loss": 1.0 / step, "note": "x"})
    writer.write(4, {"train_loss": math.nan})
    writer.close()
    records = outputs.read_metrics(str(tmp_path))
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[1]["train_loss"] == 0.5 and records[3]["train_loss"] is None
    outputs.truncate_metrics(str(tmp_path), 2)
    assert [r["step"] for r in outputs.read_metrics(str(tmp_path))] == [1, 2]
