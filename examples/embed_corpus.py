"""Embed a corpus with ordinary-looking `embeddings.create` calls, sent as one batch.

    python examples/embed_corpus.py                     # local server: the packaged model (else echo), no key
    python examples/embed_corpus.py --provider openai    # OPENAI_API_KEY set: real embeddings

Writes `embeddings.jsonl` ({"id", "embedding"} per article) next to this file or into `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from llmbatch.api import AsyncBatchClient, BatchConfig

HERE = Path(__file__).parent


async def embed(provider: str, model: str, out: Path) -> int:
    articles = [json.loads(line) for line in open(HERE / "articles.jsonl") if line.strip()]
    async with AsyncBatchClient("embed-corpus", provider=provider, config=BatchConfig(send_delay=0.5)) as client:
        # Each call looks like the SDK's; they wait together and go out as one batch.
        responses = await asyncio.gather(
            *(client.embeddings.create(model=model, input=f"{a['title']}\n{a['text']}") for a in articles)
        )
    with open(out / "embeddings.jsonl", "w") as f:
        for a, r in zip(articles, responses):
            f.write(json.dumps({"id": a["id"], "embedding": r.data[0].embedding}) + "\n")
    return len(responses)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--provider", default="local")
    ap.add_argument("--model", default=None, help="[local: all-MiniLM-L6-v2; else: text-embedding-3-small]")
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    args.model = args.model or ("all-MiniLM-L6-v2" if args.provider == "local" else "text-embedding-3-small")
    n = asyncio.run(embed(args.provider, args.model, args.out))
    print(f"{n} embeddings -> {args.out / 'embeddings.jsonl'}")


if __name__ == "__main__":
    main()
