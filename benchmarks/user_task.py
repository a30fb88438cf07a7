"""A user task nobody tuned a prompt for: four TREC question types, written as a new user would,
with the training file sorted by label (as exported data often is).

    .venv/bin/python benchmarks/user_task.py OUT_DIR     # writes OUT_DIR/topics4.yaml + its jsonl files

Rows are read from ../shared/data/TREC (never copied into the repository); classes description,
entity, human and location become 0..3.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from exitwise.raee.tasks import read_jsonl, resolve_data_dir

KEEP = {0: 0, 1: 1, 3: 2, 4: 3}  # TREC description, entity, human, location -> 0..3
SPEC = """name: topics4
train: train.jsonl
test: test.jsonl
template: "Question: {text}\\nTopic:"
labels: [description, thing, person, place]
"""


def make_user_task(out_dir: str | Path, data_dir: str | Path | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = resolve_data_dir(data_dir) / "TREC"
    for split in ("train", "test"):
        rows = [{"text": e.text, "label": KEEP[e.label]} for e in read_jsonl(src / f"{split}.jsonl", 6)
                if e.label in KEEP]
        if split == "train":
            rows.sort(key=lambda r: r["label"])  # label-sorted: the head of the file is one class
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "topics4.yaml").write_text(SPEC)
    return out / "topics4.yaml"


if __name__ == "__main__":
    print(make_user_task(sys.argv[1] if len(sys.argv) > 1 else "runs/topics4"))
