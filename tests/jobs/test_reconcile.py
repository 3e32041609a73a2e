"""A crash between a remote call and recording its result: the runner lists and matches by
tag instead of creating a second upload or batch (invariant: at most one batch per chunk)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from conftest import chat_line, jsonl
from llmbatch.jobs import JobRunner, JobSession, JobSettings, ingest
from llmbatch.providers._openai import OpenAIBatchProvider


def test_runner_adopts_upload_and_batch_made_before_a_crash(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = server_factory()
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(jsonl([chat_line(i) for i in range(30)]))
    settings = JobSettings(provider="openai", base_url=server.base_url, batch_size=10, poll_interval=0.05)
    session, _ = JobSession.open([inp], settings, tmp_path / "jobs", api_key="k")
    store, job_dir = session.store, session.dir
    ingest(store, [inp], settings)

    async def scenario() -> tuple[str, str]:
        provider = OpenAIBatchProvider(api_key="k", base_url=server.base_url)
        runner = JobRunner(store, job_dir, settings, provider, say=lambda m: None)
        runner.plan()
        c1, c2, _c3 = store.chunks(("planned",))
        # Chunk 1: uploaded remotely, then "killed" before the file id was recorded.
        store.move_chunk(c1.id, "uploading", ("planned",), intent_at=c1.created_at)
        orphan_upload = await provider.upload(c1.tag, runner.write_chunk_file(c1))
        # Chunk 2: batch created remotely, then "killed" before the batch id was recorded.
        file_id = await provider.upload(c2.tag, runner.write_chunk_file(c2))
        store.move_chunk(c2.id, "uploading", ("planned",), intent_at=c2.created_at)
        store.move_chunk(c2.id, "uploaded", ("uploading",), file_id=file_id)
        store.move_chunk(c2.id, "creating", ("uploaded",), intent_at=c2.created_at)
        orphan_batch = await provider.create_batch(c2.tag, runner.job_id, file_id, c2.endpoint)
        # A fresh runner (the restart) finishes the job.
        restarted = JobRunner(store, job_dir, settings, provider, say=lambda m: None)
        outcome = await restarted.run()
        await provider.aclose()
        assert outcome.code == 0, outcome.summary
        return orphan_upload, orphan_batch.id

    orphan_upload, orphan_batch = asyncio.run(scenario())
    client = server.client()
    batches = list(client.batches.list(limit=100))
    tags = [b.metadata["llmbatch_chunk"] for b in batches]
    assert len(batches) == 3 and len(set(tags)) == 3, tags
    assert orphan_batch in {b.id for b in batches}, "the batch made before the crash was adopted"
    assert orphan_upload in {b.input_file_id for b in batches}, "the upload made before the crash was adopted"
    chunk_batches = {c.batch_id for c in store.chunks()}
    assert chunk_batches == {b.id for b in batches}
    out = (tmp_path / "in.results.jsonl").read_text().splitlines()
    assert len(out) == 30
