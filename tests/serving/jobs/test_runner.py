"""The job runner with its stages faked in this process: a real SQLite store, LTX-2's real pipeline.

As Ray Serve LLM tests its server over a mock engine, these run the durable
runner over fake stage handles (each records its calls and answers with the
hand-off receipts a real stage returns), so ordering, kept outputs, blame,
cancellation, retries and deadlines are checked in seconds without a cluster.
What only a cluster shows stays in the served tests.
"""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cluster.auth_config import CallbacksConfig, TenantConfig
from cluster.config import JobsConfig, OrchestratorConfig, RewriterConfig, StorageConfig
from serving.errors import KeptOutputLost, StageOutOfMemory
from serving.families import get_family
from serving.families.ltx2.config import LTX2ModelConfig
from serving.jobs.context import RunnerServices
from serving.jobs.events import JobEvents
from serving.jobs.job_storage import JobStorage
from serving.jobs.progress import ProgressMarks
from serving.jobs.record import PHOTO_INPUT, JobRecord, new_job_id
from serving.jobs.runner import JobRunner
from serving.jobs.sqlite_store import SQLiteJobStore
from serving.metrics import RecordingExporter, StageStats, set_exporter
from serving.protocol import DenoiseResult, Handoff, JobInput, JobStatus, StoredVideo
from serving.tenancy.webhooks import WebhookSigner, new_signing_secret, verify_webhook

MODEL = LTX2ModelConfig(name="ltx-2-test", path="/unused", stg_blocks=[1])


class ActorDiedError(Exception):
    """Named like Ray's: the replica serving a call died."""


class FakeResponse:
    """What a deployment handle's ``.remote()`` returns: awaitable once, cancellable."""

    def __init__(self, coroutine):
        self._task = asyncio.ensure_future(coroutine)
        self.cancelled = False

    def __await__(self):
        return self._task.__await__()

    def cancel(self):
        self.cancelled = True
        self._task.cancel()


class FakeStage:
    """One stage: records (method, args) and answers as the real deployment would, after ``delay_s``."""

    def __init__(self, name: str, outputs: tuple[str, ...], log: list, delay_s: float = 0.0):
        self.name, self.outputs, self.log, self.delay_s = name, outputs, log, delay_s
        self.fail_with: list[BaseException] = []  # raised by the next calls, one each
        self.calls = 0
        self.call = self  # handle.call.remote(...)
        self.ready = _Ready()  # handle.ready.remote(): the replica is up

    def remote(self, ticket, method, *args):
        self.calls += 1
        self.log.append((self.name, method, args))
        return FakeResponse(self._answer(ticket, args))

    async def _answer(self, ticket, args):
        await asyncio.sleep(self.delay_s)
        if self.fail_with:
            raise self.fail_with.pop(0)
        handoffs = tuple(Handoff(ticket.job_id, name, ref=f"{name}-ref", nbytes=10) for name in self.outputs)
        if self.name == "diffusion":
            return DenoiseResult(handoffs, finished_steps=8, total_steps=8)
        if self.name == "muxer":
            return StoredVideo(attempt=ticket.attempt, num_bytes=1234)
        return handoffs[0]


class _Ready:
    def remote(self):
        async def answer():
            return True

        return FakeResponse(answer())


class Harness:
    def __init__(self, tmp_path, slots: int = 4, tenants=None, callbacks=None, signer=None, live_diffusion=True, **jobs):
        family = get_family("ltx2")
        self.log: list = []
        self.stages = {
            spec.name: FakeStage(spec.name, tuple(o for outs in spec.methods.values() for o in outs), self.log)
            for spec in family.stages
        }
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.store = SQLiteJobStore(str(tmp_path / "jobs.sqlite3"))
        if live_diffusion:
            self.store.heartbeat("diffusion", "replica-1", {"seconds_per_token_step": 0.001}, ttl_s=3600)
        self.jobs = JobsConfig(results_dir=str(tmp_path / "results"), lease_s=2, **jobs)
        pool = ThreadPoolExecutor(max_workers=4)

        async def io(method, *args, **kwargs):
            return await asyncio.get_running_loop().run_in_executor(pool, lambda: method(*args, **kwargs))

        self.services = RunnerServices(
            store=self.store, events=JobEvents(self.store), io=io,
            storage=JobStorage(StorageConfig(results_url=self.jobs.results_dir)),
            family=family, handles=self.stages, marks=ProgressMarks(family.stages), jobs=self.jobs,
            rewriter=RewriterConfig(enabled=False), prompt_fits=lambda text: True, model_name=MODEL.name,
            stats=StageStats(stage="orchestrator", model=MODEL.name), diffusion_slots=slots,
            tenants=tenants or {}, callbacks=callbacks or CallbacksConfig(), signer=signer,
        )
        self.runner = JobRunner(self.services, MODEL, self.jobs,
                                OrchestratorConfig(poll_interval_s=0.05), frame_rule=(8, 1), owner="runner-a")

    def submit(self, **fields) -> JobRecord:
        values = dict(id=new_job_id(), model=MODEL.name, prompt="a cat", negative_prompt="", seconds=1.0, width=64,
                      height=64, fps=24, seed=7, has_image=False)
        values.update(fields)
        record = JobRecord(**values)
        assert self.store.create(record)
        return record

    async def run_until_terminal(self, job_id: str, timeout_s: float = 10.0) -> JobRecord:
        self.runner.start()
        try:
            for _ in range(int(timeout_s / 0.05)):
                record = self.store.get(job_id)
                if record.status.is_terminal:
                    return record
                await asyncio.sleep(0.05)
            raise AssertionError(f"job {job_id} did not end in {timeout_s} s: {self.store.get(job_id)}")
        finally:
            await self.runner.stop()

    def stage_order(self) -> list[str]:
        return [name for name, _, _ in self.log]


@pytest.fixture
def harness(tmp_path):
    previous = set_exporter(RecordingExporter())
    yield Harness(tmp_path)
    set_exporter(previous)


def test_an_image_to_video_job_runs_the_pipeline_in_order_and_records_everything(harness):
    record = harness.submit(has_image=True, inputs=[vars(PHOTO_INPUT)])
    final = asyncio.run(harness.run_until_terminal(record.id))

    assert final.status == JobStatus.COMPLETED and final.progress == 100 and final.attempts == 1
    assert harness.stage_order()[:2] in (["text_encoder", "image_conditioner"], ["image_conditioner", "text_encoder"])
    assert harness.stage_order()[2:] in (
        ["diffusion", "video_decoder", "audio_decoder", "muxer"], ["diffusion", "audio_decoder", "video_decoder", "muxer"]
    )
    calls = {name: args for name, _, args in harness.log}
    assert calls["image_conditioner"][0] == JobInput(record.id, "photo")  # the photo travels as a name, not bytes
    assert [a.name for a in calls["diffusion"][:2]] == ["prompt_embeddings", "image_condition"]
    assert [a.name for a in calls["muxer"]] == ["encoded_video", "waveform"]
    assert final.done_stages == ["audio_decoder", "diffusion", "image_conditioner", "muxer", "text_encoder",
                                 "video_decoder"]
    assert set(final.stage_seconds) == set(final.done_stages)
    assert (final.result_attempt, final.result_bytes, final.step, final.total_steps) == (1, 1234, 8, 8)
    assert final.expires_at == pytest.approx(final.completed_at + StorageConfig().results_ttl_s)


def test_a_takeover_skips_the_stages_an_earlier_attempt_finished(harness):
    record = harness.submit(done_stages=["text_encoder", "diffusion"], stage_seconds={"text_encoder": 1.0})
    final = asyncio.run(harness.run_until_terminal(record.id))

    assert final.status == JobStatus.COMPLETED
    assert harness.stage_order()[:1] == ["video_decoder"] or harness.stage_order()[:1] == ["audio_decoder"]
    assert "text_encoder" not in harness.stage_order() and "diffusion" not in harness.stage_order()
    decoder_args = {name: args for name, _, args in harness.log}
    kept = decoder_args["video_decoder"][0]
    assert (kept.name, kept.ref) == ("video_latents", None)  # the decoder reads diffusion's kept copy
    assert final.stage_seconds["text_encoder"] == 1.0  # an earlier attempt's timing is not overwritten


def test_a_kept_output_that_does_not_read_back_is_made_again_not_a_failure(harness):
    """The decoder finds diffusion's kept latents unreadable: diffusion runs again (resuming from its checkpoint in
    a real stage), and the decoder gets the fresh hand-off."""
    record = harness.submit(done_stages=["text_encoder", "diffusion"], stage_seconds={"text_encoder": 1.0})
    harness.stages["video_decoder"].fail_with.append(KeptOutputLost("video_latents"))
    final = asyncio.run(harness.run_until_terminal(record.id))

    assert final.status == JobStatus.COMPLETED, final.error_message
    assert harness.stages["diffusion"].calls == 1 and harness.stages["video_decoder"].calls == 2
    assert "text_encoder" not in harness.stage_order()  # what read back is not made again
    decoded = [args for name, _, args in harness.log if name == "video_decoder"]
    assert (decoded[0][0].ref, decoded[1][0].ref) == (None, "video_latents-ref")
    assert "diffusion" in final.done_stages


def test_a_failure_is_named_after_its_stage_with_a_clean_line(harness):
    harness.stages["video_decoder"].fail_with.append(StageOutOfMemory("video_decoder"))
    record = harness.submit()
    final = asyncio.run(harness.run_until_terminal(record.id))

    assert final.status == JobStatus.FAILED and final.error_code == "resource_exhausted"
    assert final.error_message.startswith("the video_decoder stage ran out of memory at 64x64")
    assert "muxer" not in harness.stage_order()


def test_a_dead_replica_is_called_again_and_twice_dead_sets_the_job_aside(tmp_path):
    previous = set_exporter(RecordingExporter())
    try:
        once = Harness(tmp_path / "once", stage_retries=1)
        once.stages["audio_decoder"].fail_with.append(ActorDiedError("the actor died"))
        first = asyncio.run(once.run_until_terminal(once.submit().id))
        assert first.status == JobStatus.COMPLETED and once.stages["audio_decoder"].calls == 2

        twice = Harness(tmp_path / "twice", stage_retries=1)
        twice.stages["diffusion"].fail_with += [ActorDiedError("died"), ActorDiedError("died again")]
        second = asyncio.run(twice.run_until_terminal(twice.submit().id))
        # Each death with the job in flight is a strike against it: after two it is set aside, not retried again.
        assert (second.status, second.error_code) == (JobStatus.FAILED, "poison_input")
        assert "broke 2 diffusion replicas" in second.error_message
    finally:
        set_exporter(previous)


def test_cancel_stops_the_call_in_flight_and_ends_the_job_cancelled(harness):
    harness.stages["diffusion"].delay_s = 30.0
    record = harness.submit()

    async def scenario():
        harness.runner.start()
        try:
            while harness.store.get(record.id).stage != "diffusion":
                await asyncio.sleep(0.02)
            harness.store.request_cancel(record.id)
            for _ in range(200):
                final = harness.store.get(record.id)
                if final.status.is_terminal:
                    return final
                await asyncio.sleep(0.05)
            raise AssertionError("the cancelled job did not end")
        finally:
            await harness.runner.stop()

    final = asyncio.run(scenario())
    assert final.status == JobStatus.CANCELLED
    assert "video_decoder" not in harness.stage_order()


def test_the_deadline_ends_a_job_whose_stage_takes_too_long(tmp_path):
    previous = set_exporter(RecordingExporter())
    try:
        harness = Harness(tmp_path, job_timeout_s=0.5)
        harness.stages["diffusion"].delay_s = 30.0
        final = asyncio.run(harness.run_until_terminal(harness.submit().id))
        assert (final.status, final.error_code) == (JobStatus.FAILED, "deadline_exceeded")
    finally:
        set_exporter(previous)


def test_a_rewrite_asked_for_without_a_rewriter_falls_back_to_the_prompt(harness):
    record = harness.submit(enhance_prompt=True)
    final = asyncio.run(harness.run_until_terminal(record.id))
    assert final.status == JobStatus.COMPLETED
    assert (final.revised_prompt, final.rewrite_fallback) == (None, "unavailable")
    encode_args = next(args for name, _, args in harness.log if name == "text_encoder")
    assert encode_args[0] == "a cat"


def test_queued_jobs_start_in_fair_share_only_into_free_slots(tmp_path):
    """Tenant a submits 8 jobs, then tenant b 1; with 2 diffusion slots b's job starts before a's third."""
    previous = set_exporter(RecordingExporter())
    try:
        tenants = {name: TenantConfig(name=name, key_sha256="0" * 63 + str(i)) for i, name in enumerate("ab")}
        harness = Harness(tmp_path, slots=2, tenants=tenants)
        harness.stages["diffusion"].delay_s = 0.3
        a_jobs = [harness.submit(tenant="a", created_at=1000.0 + i) for i in range(8)]
        b_job = harness.submit(tenant="b", created_at=2000.0)

        async def scenario():
            harness.runner.start()
            try:
                peak = 0
                while not all(harness.store.get(j.id).status.is_terminal for j in a_jobs + [b_job]):
                    running = sum(harness.store.get(j.id).attempts > 0 and not harness.store.get(j.id).status.is_terminal
                                  for j in a_jobs + [b_job])
                    peak = max(peak, running)
                    await asyncio.sleep(0.02)
                return peak
            finally:
                await harness.runner.stop()

        peak = asyncio.run(scenario())
        starts = sorted((harness.store.get(j.id).started_at, j.tenant, j.id) for j in a_jobs + [b_job])
        order = [tenant for _, tenant, _ in starts]
        assert order.index("b") < 3, order  # b's job is among the first three to start
        assert peak <= 2  # never more jobs running than diffusion has slots
    finally:
        set_exporter(previous)


def test_nothing_starts_without_a_live_diffusion_replica_and_a_queued_job_expires(tmp_path):
    previous = set_exporter(RecordingExporter())
    try:
        harness = Harness(tmp_path, live_diffusion=False)
        record = harness.submit(max_queue_wait_s=0.5)
        final = asyncio.run(harness.run_until_terminal(record.id))
        assert (final.status, final.error_code, final.attempts) == (JobStatus.EXPIRED, "queue_timeout", 0)
        assert harness.log == []
    finally:
        set_exporter(previous)


def test_a_callback_is_delivered_signed_after_two_refusals(tmp_path):
    received = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["content-length"]))
            received.append((dict(self.headers), body))
            self.send_response(503 if len(received) <= 2 else 204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/hooks/"
    secret = new_signing_secret()
    callbacks = CallbacksConfig(allowed_url_prefixes=[url], refuse_private_addresses=False, backoff_base_s=0.05,
                                backoff_cap_s=0.1)
    previous = set_exporter(RecordingExporter())
    try:
        harness = Harness(tmp_path, callbacks=callbacks, signer=WebhookSigner([secret]))
        record = harness.submit(callback_url=url + "job")

        async def scenario():
            harness.runner.start()
            try:
                for _ in range(200):
                    final = harness.store.get(record.id)
                    if final.webhook and final.webhook.get("done"):
                        return final
                    await asyncio.sleep(0.05)
                raise AssertionError(f"no delivery recorded: {harness.store.get(record.id).webhook}")
            finally:
                await harness.runner.stop()

        final = asyncio.run(scenario())
    finally:
        set_exporter(previous)
        server.shutdown()
    assert final.webhook["delivered"] is True and final.webhook["attempts"] == 3
    headers, body = received[-1]
    verify_webhook(secret, {k.lower(): v for k, v in headers.items()}, body)
    assert json.loads(body)["id"] == record.id and json.loads(body)["status"] == "completed"
    assert len({h["webhook-id"] for h, _ in received}) == 1  # one message, retried
