"""Summarise every article of a JSONL file, as batches, resumably.

    python examples/summarize_articles.py                   # local server: the packaged model (else echo), no key
    python examples/summarize_articles.py --provider openai  # OPENAI_API_KEY set: real summaries

Writes `summaries.jsonl` (one record per article, in input order) next to this file, or into
`--out DIR`. Run it again and nothing is sent twice: answers come from the job store.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llmbatch.api import BatchConfig, Task

HERE = Path(__file__).parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--provider", default="local")
    ap.add_argument("--model", default=None, help="[local: SmolLM2-135M-Instruct; else: gpt-4o-mini]")
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    args.model = args.model or ("SmolLM2-135M-Instruct" if args.provider == "local" else "gpt-4o-mini")

    articles = (json.loads(line) for line in open(HERE / "articles.jsonl") if line.strip())
    task = Task(
        "summarize-articles",
        articles,
        lambda a: {
            "model": args.model,
            "messages": [
                {"role": "system", "content": "Summarise the article in one sentence."},
                {"role": "user", "content": f"{a['title']}\n\n{a['text']}"},
            ],
            "max_tokens": 80,
        },
        process=lambda a, completion: {"id": a["id"], "summary": completion.choices[0].message.content},
        sink=args.out / "summaries.jsonl",
        provider=args.provider,
        config=BatchConfig(send_delay=0.5),
    )
    report = task.run()
    print(f"{report.succeeded} summaries, {report.failed} failed -> {report.sink}")


if __name__ == "__main__":
    main()
