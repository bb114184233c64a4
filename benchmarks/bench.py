"""The realistic bench: skill-bearing suspicious models x defences and controls x seeds.

Every target is a LoRA (or full) finetune that teaches a skill and carries a backdoor in 5 % of its data;
every defence and control runs on it with the paper's repair budget; rows are cached under runs/bench/, so
an interrupted run resumes and --targets runs slices. Writes results/bench/{rows.csv, table.md,
verdicts.csv}. The same as ``bdvax reproduce --preset bench``.

Usage: python benchmarks/bench.py [--targets attack:task:setting:skill,...] [--plan] [--tables]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.bench import main

if __name__ == "__main__":
    sys.exit(main())
