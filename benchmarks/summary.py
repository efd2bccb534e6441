"""The README's benchmark table: each benchmark's ratio against its limit beside its target, from the JSON files
`make bench` writes under results/benchmarks/.

Run: `.venv/bin/python benchmarks/summary.py [--dir results/benchmarks]` (prints markdown; a missing file is a
row saying so).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mvptr.config import project_root

METHODS = {"mvptr": "step_tiny_cpu.json", "simla": "step_simla_tiny_cpu.json", "semvlp": "step_semvlp_tiny_cpu.json"}


def rows(folder: Path) -> list[tuple[str, str, str, str]]:
    """(benchmark, measured, target, met) per line of the table."""
    def load(name: str) -> dict | None:
        path = folder / name
        return json.loads(path.read_text()) if path.is_file() else None

    out = []
    for method, name in METHODS.items():
        step = load(name)
        if step:
            out.append((f"{method} step FLOP/s / bare BertModel FLOP/s (tiny, batch {step['batch']}, CPU)",
                        f"{step['efficiency']:.2f} ({step['step_gflops_per_s']:.1f} / {step['bare_gflops_per_s']:.1f}"
                        " GFLOP/s)", ">= 0.85", _met(step["efficiency"] >= 0.85)))
    concepts = load("concepts.json")
    if concepts:
        out.append(("concept extraction / spaCy's nlp.pipe (same pipeline, "
                    f"{concepts['batched']['n_process']} processes)",
                    f"{concepts['vs_spacy_pipe']:.2f} ({concepts['batched']['captions_per_s']:.0f} / "
                    f"{concepts['spacy_pipe']['captions_per_s']:.0f} captions/s)", ">= 0.8",
                    _met(concepts["vs_spacy_pipe"] >= 0.8)))
    loader = load("loader.json")
    if loader:
        for shape, row in loader["shapes"].items():
            out.append((f"loader pairs/s / step consumption ({shape})",
                        f"{row['ratio']:.1f} ({row['loader_pairs_per_s']:.0f} / {row['consumed_pairs_per_s']:.0f})",
                        ">= 3", _met(row["ratio"] >= 3)))
    store = load("region_store.json")
    if store:
        out.append(("region store reads/s / numpy memmap reads/s",
                    f"{store['vs_memmap']:.2f} ({store['hdf5_store']['reads_per_s']:.0f} / "
                    f"{store['numpy_memmap']['reads_per_s']:.0f})", ">= 0.5", _met(store["vs_memmap"] >= 0.5)))
    dry = load("dryrun.json")
    if dry:
        for row in dry["rows"]:
            last = row is dry["rows"][-1]
            out.append((f"snakemake -n, {row['ablations']} ablations x {row['seeds']} seeds ({row['jobs']} jobs): "
                        f"the workflow's own seconds (less Snakemake's start, {dry['snakemake_start_s']:.1f} s here)",
                        f"{row['workflow_s']:.1f} s ({row['seconds']:.1f} s in all)", "< 10 s" if last else "",
                        _met(row["workflow_s"] < dry["target_s"]) if last else ""))
    return out


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=project_root() / "results" / "benchmarks")
    args = parser.parse_args()
    print("| benchmark | measured | target | met |\n| --- | --- | --- | --- |")
    for row in rows(args.dir):
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
