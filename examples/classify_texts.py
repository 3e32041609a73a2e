"""Classify texts into a pydantic schema (structured outputs), as batches.

    python examples/classify_texts.py                   # local server: the packaged model (else echo), no key
    python examples/classify_texts.py --provider openai  # OPENAI_API_KEY set: real labels

The schema goes out as `response_format`; every answer is parsed and validated (the label one of
three, the confidence from 0 to 1), and an answer that does not validate is asked again with the
error shown to the model. On the local model the schema constrains its tokens (a grammar, bounds
included), so every answer validates; on the echo engine the answers are schema-shaped fixtures
(the first allowed label, the lowest confidence), not real labels.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from llmbatch.api import BatchConfig, Task

HERE = Path(__file__).parent


class Topic(BaseModel):
    topic: Literal["sports", "politics", "science"]
    # ge/le are the schema's minimum/maximum: a grammar's bounds on the local model, and a
    # validation (asked again when broken) wherever the provider does not enforce them.
    confidence: float = Field(ge=0, le=1, description="how sure the label is, from 0 to 1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--provider", default="local")
    ap.add_argument("--model", default=None, help="[local: SmolLM2-135M-Instruct; else: gpt-4o-mini]")
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    args.model = args.model or ("SmolLM2-135M-Instruct" if args.provider == "local" else "gpt-4o-mini")

    articles = [json.loads(line) for line in open(HERE / "articles.jsonl") if line.strip()]
    task = Task(
        "classify-texts",
        articles,
        lambda a: {
            "model": args.model,
            "messages": [
                {"role": "system", "content": "Classify the article's topic."},
                {"role": "user", "content": a["text"]},
            ],
            # The answer is ~25 tokens. Without a cap, a sampled run of JSON whitespace or digits
            # can go on to the context's end (2,048 tokens on the local model: a minute on a CPU).
            "max_tokens": 60,
        },
        output=Topic,
        process=lambda a, t: {"id": a["id"], "topic": t.topic, "confidence": t.confidence},
        sink=args.out / "topics.jsonl",
        provider=args.provider,
        config=BatchConfig(send_delay=0.5),
    )
    report = task.run()
    print(f"{report.succeeded} classified, {report.failed} failed -> {report.sink}")


if __name__ == "__main__":
    main()
