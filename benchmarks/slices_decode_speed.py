"""SLICES-PLUS decoder speed: wall time per string (mean, median, p95, max) and decodes/s per core.

Two sets of strings, one thread: the MP-20 validation sample (``mp20_sample/val.csv``) encoded with the
default ``SlicesPlusTokenizer``, and the SLICES-PLUS paper's own generated strings
(``slices_plus_paper/crystal_system_plus_7class.csv``). The baseline is the decoder of commit
``--baseline`` (default eb251da, the state the issue measured), loaded from git into a scratch module
(its graph check through pymatgen's ``StructureGraph``, as then) and run on the same strings in the
same run; ``--no-baseline`` skips it. ``--profile K`` prints the
cProfile of the K slowest strings of our decoder.

    OMP_NUM_THREADS=1 python benchmarks/slices_decode_speed.py --n-paper 125
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import io
import logging
import pstats
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from pymatgen.core import Structure

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._machine import machine_line  # noqa: E402
from crystal_tokenizers.errors import CrystalDecodeError, CrystalEncodeError  # noqa: E402
from crystal_tokenizers.slices.codec import parse_record  # noqa: E402
from crystal_tokenizers.slices.graph import pymatgen_structure_to_graph  # noqa: E402
from crystal_tokenizers.tokenization_slices_plus import SlicesPlusTokenizer  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # ../shared/data beside the checkout
ROOT = Path(__file__).resolve().parent.parent
Decoder = Callable[[str], Structure]


def mp20_strings(n: int | None, tokenizer: SlicesPlusTokenizer) -> list[str]:
    """SLICES-PLUS strings of the first ``n`` crystals of ``mp20_sample/val.csv`` (encodable ones)."""
    table = pd.read_csv(DATA / "mp20_sample" / "val.csv")
    texts = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for cif in table.cif[:n]:
            try:
                texts.append(tokenizer.structure_to_string(Structure.from_str(cif, fmt="cif")))
            except CrystalEncodeError:
                continue
    return texts


def paper_strings(n: int | None, name: str = "crystal_system_plus_7class.csv") -> list[str]:
    """The paper's strings, ``n`` spread evenly over the file (all if None)."""
    table = pd.read_csv(DATA / "slices_plus_paper" / name)
    texts = list(table.slices_plus)
    if n is None or n >= len(texts):
        return texts
    return [texts[k] for k in np.linspace(0, len(texts) - 1, n).astype(int)]


def baseline_decoder(commit: str, tokenizer: SlicesPlusTokenizer) -> Decoder | None:
    """``string_to_structure`` as it was at ``commit`` (the old embedding module loaded from git)."""
    try:
        source = subprocess.run(["git", "show", f"{commit}:crystal_tokenizers/slices/embedding.py"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None
    path = Path(tempfile.mkdtemp()) / "_embedding_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("_embedding_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    module.structure_to_graph = pymatgen_structure_to_graph  # the graph check as it was (pymatgen's)

    def decode(text: str) -> Structure:
        record = parse_record(text)
        params = module.EmbeddingParams(time_limit_s=tokenizer.decode_time_limit_s)
        return module.embed_checked(record.graph, record.symops, tokenizer.strategy, params)

    return decode


def time_decoder(decode: Decoder, texts: list[str], profile: cProfile.Profile | None = None):
    """Wall and CPU seconds per string and the outcome (error class name or 'ok')."""
    wall, cpu, outcome = [], [], []
    for text in texts:
        start, cpu_start = time.perf_counter(), time.process_time()
        if profile is not None:
            profile.enable()
        try:
            decode(text)
            outcome.append("ok")
        except CrystalDecodeError as err:
            outcome.append(type(err).__name__)
        if profile is not None:
            profile.disable()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    return np.array(wall), np.array(cpu), outcome


def row(name: str, wall: np.ndarray, cpu: np.ndarray, outcome: list[str]) -> list[str]:
    ok = outcome.count("ok")
    slowest = np.sort(wall)[::-1]
    tail = slowest[: max(1, len(wall) // 10)].sum() / wall.sum()
    return [name, str(len(wall)), f"{ok / len(wall):.3f}", f"{wall.mean():.3f}", f"{np.median(wall):.3f}",
            f"{np.percentile(wall, 95):.3f}", f"{wall.max():.2f}", f"{tail:.2f}", f"{1 / cpu.mean():.2f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-mp20", type=int, default=None, help="crystals of mp20_sample/val.csv (all)")
    parser.add_argument("--n-paper", type=int, default=None, help="strings of the paper's 7-class file (all)")
    parser.add_argument("--baseline", default="eb251da", help="commit whose decoder is the baseline")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--profile", type=int, default=0, help="print the profile of the K slowest strings")
    parser.add_argument("--sets", default="mp20,paper", help="comma-separated: mp20, paper")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    tokenizer = SlicesPlusTokenizer()
    sets = {}
    if "mp20" in args.sets:
        sets["mp20_sample/val.csv (SLICES-PLUS)"] = mp20_strings(args.n_mp20, tokenizer)
    if "paper" in args.sets:
        sets["paper 7-class"] = paper_strings(args.n_paper)
    decoders: dict[str, Decoder] = {"ours": tokenizer.string_to_structure}
    if not args.no_baseline:
        old = baseline_decoder(args.baseline, tokenizer)
        if old is not None:
            decoders[f"baseline {args.baseline}"] = old
    header = ["strings", "decoder", "n", "decoded", "mean s", "median s", "p95 s", "max s", "slowest 10 % share",
              "decodes/s per core (CPU)"]
    lines, notes = [], []
    for set_name, texts in sets.items():
        results = {}
        for dec_name, decode in decoders.items():
            wall, cpu, outcome = time_decoder(decode, texts)
            results[dec_name] = (wall, cpu)
            lines.append([set_name, *row(dec_name, wall, cpu, outcome)])
            errors = Counter(o for o in outcome if o != "ok")
            notes.append(f"{set_name}, {dec_name}: errors {dict(errors)}")
            if args.profile and dec_name == "ours":
                slow = [texts[k] for k in np.argsort(wall)[::-1][: args.profile]]
                profile = cProfile.Profile()
                time_decoder(decode, slow, profile)
                stream = io.StringIO()
                pstats.Stats(profile, stream=stream).sort_stats("cumulative").print_stats(35)
                print(f"profile of the {len(slow)} slowest strings of {set_name}:\n{stream.getvalue()}")
        if len(results) == 2:
            (w_new, c_new), (w_old, c_old) = results["ours"], next(v for k, v in results.items() if k != "ours")
            notes.append(f"{set_name}: mean wall ratio baseline/ours {w_old.mean() / w_new.mean():.2f}, "
                         f"p95 ratio {np.percentile(w_old, 95) / np.percentile(w_new, 95):.2f}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for line in lines:
        print("| " + " | ".join(line) + " |")
    print()
    print("\n".join(notes))
    print(machine_line())


if __name__ == "__main__":
    main()
