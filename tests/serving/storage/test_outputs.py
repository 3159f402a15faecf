"""Stage outputs and checkpoints per attempt: overlapping attempts never share an object; the record decides."""

from __future__ import annotations

import numpy as np

from serving.protocol import AudioLatents, HostTensor, VideoLatents
from serving.storage.keys import artifact_key, checkpoint_key
from serving.storage.outputs import (
    keep_checkpoint,
    keep_output,
    kept_outputs,
    load_output,
    newest_checkpoint,
)

JOB = "video_" + "dd" * 12


def latents(value: float) -> VideoLatents:
    return VideoLatents(latents=HostTensor(array=np.full((1, 4, 2, 2, 2), value, np.float32), dtype="float32"))


def value_of(found: VideoLatents) -> float:
    return float(found.latents.array.flat[0])


def test_outputs_are_kept_per_attempt_and_read_from_the_accepted_ones(storage):
    assert keep_output(storage, JOB, 1, "video_latents", latents(1.0)) > 0
    keep_output(storage, JOB, 2, "video_latents", latents(2.0))
    keep_output(storage, JOB, 3, "video_latents", latents(3.0))  # a stale attempt the record does not accept
    assert value_of(load_output(storage, JOB, [1, 2], "video_latents", VideoLatents)) == 2.0
    assert value_of(load_output(storage, JOB, [1], "video_latents", VideoLatents)) == 1.0
    assert load_output(storage, JOB, [4], "video_latents", VideoLatents) is None
    assert load_output(storage, JOB, [1, 2], "video_latents", AudioLatents) is None  # wrong type: missing
    assert kept_outputs(storage, JOB, 2) == {"video_latents"}


def test_an_unreadable_output_counts_as_missing_and_an_older_attempt_serves(storage, caplog):
    keep_output(storage, JOB, 1, "video_latents", latents(1.0))
    storage.put(artifact_key(JOB, 2, "video_latents"), b"\x00garbage")
    assert value_of(load_output(storage, JOB, [1, 2], "video_latents", VideoLatents)) == 1.0
    assert f"{artifact_key(JOB, 2, 'video_latents')} is unreadable" in caplog.text
    assert load_output(storage, JOB, [2], "video_latents", VideoLatents) is None


def test_checkpoints_keep_the_newest_two_per_attempt(storage):
    for step in (1, 2, 3, 4):
        keep_checkpoint(storage, JOB, 1, step, latents(float(step)))
    keys = sorted(info.key for info in storage.list(f"artifacts/{JOB}/1/"))
    assert keys == [checkpoint_key(JOB, 1, 3), checkpoint_key(JOB, 1, 4)]
    assert kept_outputs(storage, JOB, 1) == set()  # checkpoints are not stage outputs


def test_a_resume_reads_the_newest_readable_checkpoint_of_the_accepted_attempts(storage):
    keep_checkpoint(storage, JOB, 1, 5, latents(5.0))
    keep_checkpoint(storage, JOB, 2, 6, latents(6.0))
    keep_checkpoint(storage, JOB, 2, 7, latents(7.0))
    keep_checkpoint(storage, JOB, 3, 8, latents(8.0))  # the stale owner kept running: not accepted
    found = newest_checkpoint(storage, JOB, [1, 2], VideoLatents)
    assert (found.attempt, found.step, value_of(found.value)) == (2, 7, 7.0)
    storage.put(checkpoint_key(JOB, 2, 7), b"truncated")  # the newest is damaged: the one before serves
    found = newest_checkpoint(storage, JOB, [1, 2], VideoLatents)
    assert (found.attempt, found.step) == (2, 6)
    assert newest_checkpoint(storage, JOB, [4], VideoLatents) is None
