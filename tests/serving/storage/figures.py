"""Storage figures: what keeping a checkpoint and a job's stage outputs costs, local disk vs an S3 API server.

Sizes are the real ones at 1280x704 x 121 frames (computed from the LTX-2
component configs, DESIGN.md section 4b); the values are random. The S3 server
is moto's, a Python process on the same machine, so S3 figures measure the
client and the server's request handling, not a network.

    python -m tests.serving.storage.figures pipeline
        codec + obstore (this project's code), local disk and the S3 server
    python -m tests.serving.storage.figures served
        what the served stages do (serving.jobs.job_storage): a checkpoint taken
        from the tiny LTX-2 model's engine, its arrays at the real sizes, kept and
        read back per attempt and step (put, listing, pruning), local vs S3; and
        the bytes a job leaves in each store
    python tests/serving/storage/figures.py compare ENDPOINT_URL
        obstore vs s3fs on raw bytes against a running S3 server, plus each
        client's import time and installed size with its dependencies (run it
        in an environment that has obstore, s3fs and gcsfs; it needs nothing
        of this project)
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import json
import os
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta

import numpy as np
import obstore
import torch
from obstore.store import S3Store

from cluster.storage_config import StorageConfig
from serving.families import get_family
from serving.families.ltx2.config import LTX2ModelConfig
from serving.jobs.job_storage import JobStorage, register_stored_types
from serving.jobs.record import JobRecord
from serving.protocol import (
    AudioLatents,
    EncodedVideo,
    HostTensor,
    ImageCondition,
    PromptEmbeddings,
    RenderPlan,
    TextEmbeddings,
    VideoLatents,
    Waveform,
)
from serving.storage.codec import codec
from serving.storage.keys import artifact_key, checkpoint_key
from serving.storage.opening import open_storage
from tests.s3_server import CREDENTIALS, S3Server

__all__ = ["main"]

MB = 1_000_000
RUNS = 7


def median_s(call: Callable[[], object], runs: int = RUNS) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


# -- part A: this project's code -----------------------------------------------------------------------


def checkpoint_and_job_outputs():
    """The LTX-2 denoising checkpoint (7.3 MB) and one job's stage outputs (about 42 MB)."""
    from serving.families.ltx2.diffusion import DenoiseCheckpoint  # noqa: PLC0415 - keeps collection of `make check` fast
    from serving.families.ltx2.recipes import Guidance  # noqa: PLC0415 - keeps collection of `make check` fast

    def host(*shape, dtype=torch.float32):
        return HostTensor.of(torch.randn(*shape).to(dtype))

    codec.register(Guidance)  # as the LTX-2 family will
    codec.register(DenoiseCheckpoint)

    checkpoint = DenoiseCheckpoint(
        request_id="video_" + "ab" * 12,
        recipe="distilled",
        phase_index=0,
        step_index=4,
        finished_steps=4,
        total_steps=8,
        video_latents=host(1, 16 * 22 * 40, 128),  # packed [1,128,16,22,40]: 7.2 MB
        audio_latents=host(1, 126, 128),  # ~5 s of audio latents
        generator_state=HostTensor.of(torch.Generator().manual_seed(0).get_state()),
        sigmas=HostTensor.of(torch.linspace(1, 0, 9)),
        seed=0,
        width=1280,
        height=704,
        generated_frames=121,
        fps=24,
        guidance=Guidance(guidance_scale=3.0),
    )

    def text():  # after LTX-2's connectors: about 2 x [1, 1024, 3840] bf16 per prompt
        return TextEmbeddings(video=host(1, 1024, 3840, dtype=torch.bfloat16), audio=host(1, 1024, 3840, dtype=torch.bfloat16), mask=HostTensor.of(torch.ones(1, 1024, dtype=torch.int64)))

    outputs = {
        "prompt_embeddings": PromptEmbeddings(prompt=text(), negative=text()),
        "image_condition": ImageCondition(latents=host(1, 128, 1, 22, 40), width=1280, height=704),
        "video_latents": VideoLatents(latents=host(1, 128, 16, 22, 40)),
        "audio_latents": AudioLatents(latents=host(1, 8, 126, 16)),
        "waveform": Waveform(samples=np.random.default_rng(0).uniform(-1, 1, (2, 121 * 1000)).astype(np.float32), sample_rate=24000),
        "encoded_video": EncodedVideo(data=secrets.token_bytes(int(2.5 * MB)), num_frames=121, fps=24, width=1280, height=704),
    }
    return codec, checkpoint, outputs


def pipeline() -> None:
    os.environ.update(CREDENTIALS)
    family_codec, checkpoint, outputs = checkpoint_and_job_outputs()
    server = S3Server()
    server.start()
    try:
        server.create_bucket("figures")
        stores = {
            "local disk": open_storage(tempfile.mkdtemp(prefix="reelserve-figures-")),
            "S3 server (moto)": open_storage("s3://figures/reelserve", s3_endpoint_url=server.endpoint_url),
        }
        encoded = family_codec.encode(checkpoint)
        print(f"checkpoint: {len(encoded) / MB:.2f} MB encoded; encode {ms(median_s(lambda: family_codec.encode(checkpoint)))}, "
              f"decode {ms(median_s(lambda: family_codec.decode(encoded)))}")
        blobs = {name: family_codec.encode(value) for name, value in outputs.items()}
        total = sum(len(blob) for blob in blobs.values())
        print(f"job stage outputs: {total / MB:.1f} MB in {len(blobs)} objects: "
              + ", ".join(f"{name} {len(blob) / MB:.2f}" for name, blob in blobs.items()))
        print(f"  encode all {ms(median_s(lambda: [family_codec.encode(v) for v in outputs.values()]))}, "
              f"decode all {ms(median_s(lambda: [family_codec.decode(b) for b in blobs.values()]))}")
        print()
        print("| store | checkpoint encode+put | checkpoint get+decode | job outputs encode+put (sequential) "
              "| job outputs put (concurrent, async) | job outputs get+decode |")
        print("| --- | --- | --- | --- | --- | --- |")
        for label, storage in stores.items():
            print(measure_store(label, storage, family_codec, checkpoint, outputs, blobs))
    finally:
        server.stop(keep_data=False)


def measure_store(label: str, storage, family_codec, checkpoint, outputs: dict, blobs: dict) -> str:
    """One table row: the checkpoint and the job's outputs written and read back through ``storage``."""
    job = "video_" + "ab" * 12
    key = checkpoint_key(job, 1, 4)
    keys = {name: artifact_key(job, 1, name) for name in outputs}
    write = median_s(lambda: storage.put(key, family_codec.encode(checkpoint)))
    read = median_s(lambda: family_codec.decode(storage.get(key)))
    job_write = median_s(lambda: [storage.put(keys[n], family_codec.encode(v)) for n, v in outputs.items()])

    async def concurrent():
        await asyncio.gather(*(storage.put_async(keys[n], blob) for n, blob in blobs.items()))

    job_concurrent = median_s(lambda: asyncio.run(concurrent()))
    job_read = median_s(lambda: [family_codec.decode(storage.get(keys[n])) for n in outputs])
    return f"| {label} | {ms(write)} | {ms(read)} | {ms(job_write)} | {ms(job_concurrent)} | {ms(job_read)} |"


def served() -> None:
    from serving.families.ltx2.tiny import ensure_tiny_ltx2  # noqa: PLC0415 - keeps collection of `make check` fast

    os.environ.update(CREDENTIALS)
    config = LTX2ModelConfig.tiny(path=str(ensure_tiny_ltx2()))
    family = get_family("ltx2")
    register_stored_types(family)
    embeddings = family.stage("text_encoder").component(config).encode("a cat blinks", config.negative_prompt)
    diffusion = family.diffusion_model(config)
    plan = RenderPlan.build(width=64, height=64, fps=24, seconds=1.0, seed=0,
                            num_inference_steps=config.num_inference_steps, frame_step=8)
    diffusion.engine.add(diffusion.request("figures", embeddings, None, plan))
    diffusion.engine.step()
    diffusion.engine.step()
    tiny = diffusion.engine.checkpoint("figures")

    def host(*shape):
        return HostTensor.of(torch.randn(*shape))

    # The tiny model's checkpoint, its arrays at 1280x704 x 121 (DESIGN.md 4b): packed video latents
    # [1, 16*22*40, 128] fp32 and about 5 s of audio latents.
    checkpoint = dataclasses.replace(tiny, video_latents=host(1, 16 * 22 * 40, 128), audio_latents=host(1, 126, 128),
                                     width=1280, height=704, generated_frames=121)
    _, _, outputs = checkpoint_and_job_outputs()
    server = S3Server()
    server.start()
    try:
        server.create_bucket("figures")
        stores = {
            "local disk": StorageConfig(results_url=tempfile.mkdtemp(prefix="reelserve-figures-")),
            "S3 server (moto)": StorageConfig(results_url="s3://figures/results", artifacts_url="s3://figures/outputs",
                                              s3_endpoint_url=server.endpoint_url),
        }
        job = "video_" + "cd" * 12
        print(f"checkpoint of the tiny model at 1280x704 x 121: {len(codec_of(checkpoint)) / MB:.2f} MB")
        print("| store | keep a checkpoint (encode, put, list, drop the third newest) | resume: newest readable "
              "checkpoint (list, get, decode) | keep a job's six stage outputs |")
        print("| --- | --- | --- | --- |")
        for label, storage_config in stores.items():
            storage = JobStorage(storage_config)
            steps = iter(range(2, 2 * (RUNS + 2), 2))
            keep = median_s(lambda s=storage, k=steps: s.keep_checkpoint(job, 1, next(k), checkpoint))
            resume = median_s(lambda s=storage: s.newest_checkpoint(job, 1))
            outputs_s = median_s(lambda s=storage: [s.keep_output(job, 1, n, v) for n, v in outputs.items()])
            print(f"| {label} | {ms(keep)} | {ms(resume)} | {ms(outputs_s)} |")
            storage.remove_job(job)
        record = JobRecord(id=job, model="ltx-2", prompt="x" * 200, negative_prompt="", seconds=5.0, width=1280,
                           height=704, fps=24, seed=0, has_image=True)
        print(f"job record: {len(json.dumps(record.to_dict()))} bytes of JSON (200-character prompt)")
    finally:
        server.stop(keep_data=False)


def codec_of(value) -> bytes:
    return codec.encode(value)


# -- part B: the two client libraries on raw bytes ------------------------------------------------------


def closure_size(distribution: str) -> tuple[int, float]:
    """(packages, installed MB) of a distribution and everything it requires (extras left out)."""
    seen: set[str] = set()
    pending = [distribution]
    size = 0
    while pending:
        name = re.split(r"[\s;<>=!~\[\(]", pending.pop(), maxsplit=1)[0].lower().replace("_", "-")
        if name in seen:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        seen.add(name)
        size += sum((f.size or 0) for f in dist.files or [])
        pending += [req for req in dist.requires or [] if "extra ==" not in req]
    return len(seen), size / MB


def import_time_s(module: str) -> float:
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    runs = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout) for _ in range(3)]
    return statistics.median(runs)


def compare_clients(store, fs, bucket: str, blobs: list[bytes]) -> list[float]:
    """obstore put, s3fs put, obstore get, s3fs get of ``blobs``, in seconds."""
    keys = [f"bench/{i}" for i in range(len(blobs))]
    # One PUT per object, as serving.storage puts anything up to 64 MiB (obstore's default: 5 MB parts).
    return [
        median_s(lambda: [obstore.put(store, k, b, chunk_size=64 << 20) for k, b in zip(keys, blobs)]),
        median_s(lambda: [fs.pipe_file(f"{bucket}/{k}", b) for k, b in zip(keys, blobs)]),
        median_s(lambda: [bytes(obstore.get(store, k).bytes()) for k in keys]),
        median_s(lambda: [fs.cat_file(f"{bucket}/{k}") for k in keys]),
    ]


def compare(endpoint: str) -> None:
    import s3fs  # noqa: PLC0415 - s3fs is optional: the comparison runs only where it is installed

    credentials = {"key": "reelserve-test", "secret": "reelserve-test-secret"}
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint, "region_name": "us-east-1"}, **credentials)
    bucket = "compare-" + secrets.token_hex(4)
    fs.call_s3("create_bucket", Bucket=bucket)  # mkdir adds a location constraint moto refuses
    store = S3Store(bucket, endpoint=endpoint, allow_http=True, access_key_id=credentials["key"],
                    secret_access_key=credentials["secret"], region="us-east-1")
    print("| payload | obstore put | s3fs put | obstore get | s3fs get |")
    print("| --- | --- | --- | --- | --- |")
    for label, size in (("checkpoint 7.3 MB", int(7.3 * MB)), ("job outputs 42 MB (one object)", 42 * MB), ("42 MB as 6 objects", None)):
        if size is None:
            blobs = [secrets.token_bytes(n) for n in (int(31.5 * MB), int(7.2 * MB), int(2.5 * MB), MB, int(0.45 * MB), int(0.06 * MB))]
        else:
            blobs = [secrets.token_bytes(size)]
        print(f"| {label} | " + " | ".join(ms(t) for t in compare_clients(store, fs, bucket, blobs)) + " |")
    signed = obstore.sign(store, "GET", "bench/0", timedelta(minutes=5))
    print(f"\nobstore signs a URL without a request: {signed[:60]}...")
    print("\n| client | import time | packages | installed size |")
    print("| --- | --- | --- | --- |")
    for dist, module in (("obstore", "obstore"), ("s3fs", "s3fs"), ("gcsfs", "gcsfs")):
        packages, size = closure_size(dist)
        print(f"| {dist} | {ms(import_time_s(module))} | {packages} | {size:.0f} MB |")
    s3fs_and_gcsfs = closure_size("s3fs")[1] + closure_size("gcsfs")[1] - closure_size("fsspec")[1]
    print(f"\nfsspec for S3 and GCS together: about {s3fs_and_gcsfs:.0f} MB (shared packages counted twice)")


def main() -> None:
    if sys.argv[1:2] == ["pipeline"]:
        pipeline()
    elif sys.argv[1:2] == ["served"]:
        served()
    elif sys.argv[1:2] == ["compare"] and len(sys.argv) == 3:
        compare(sys.argv[2])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
