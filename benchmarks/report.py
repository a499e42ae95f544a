"""benchmarks/README.md's tables, generated from the recorded results in benchmarks/results/*.json.

Every table in that README sits between a pair of marker comments naming a benchmark kind::

    <!-- report:pipeline -->
    ...generated...
    <!-- /report:pipeline -->

and this script rewrites what is between them from the JSON files of that kind (``pipeline-cpu.json``,
``pipeline-cuda.json``, …: the kind is the file name up to its first ``-``). Each table is headed
by the machine, date and command its file records. A number is never typed into the README by
hand: a test checks that the committed file equals what this script writes.

Run from the repository root: ``python -m benchmarks.report`` (or ``python benchmarks/report.py``);
``--check`` exits 1 instead of writing when the README is out of date.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the package lives one folder up
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from generator.errors import PatchAtlasError  # noqa: E402
from generator.store.atomic import atomic_write_text  # noqa: E402

BENCHMARKS = Path(__file__).resolve().parent
README = BENCHMARKS / "README.md"
RESULTS = BENCHMARKS / "results"

_BLOCK = re.compile(r"(<!-- report:(?P<kind>[a-z_]+) -->\n)(?P<body>.*?)(<!-- /report:(?P=kind) -->)", re.S)


class ReportError(PatchAtlasError):
    """A results file or the README cannot be turned into tables; the message names which."""


# --- number formatting -------------------------------------------------------------------------

def _int(value: float) -> str:
    """Thousands apart with a space, as the rest of the project's pages write them."""
    return f"{value:,.0f}".replace(",", " ")


def _fixed(value: float, digits: int) -> str:
    return f"{value:.{digits}f}"


def _rate(value: float) -> str:
    """Rates to three significant figures, whole numbers from 100 up."""
    return _int(value) if value >= 100 else f"{value:.3g}"


def _ratio(value: float) -> str:
    return f"{value:.2f}×"


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{_int(value)} MiB"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# --- provenance: which machine, when, with what command ----------------------------------------

def _require(data: dict, path: Path, *keys: str):
    value = data
    for depth, key in enumerate(keys):
        if not isinstance(value, dict) or key not in value:
            raise ReportError(f"{path.name}: no '{'.'.join(keys[:depth + 1])}' recorded; rerun the benchmark "
                              f"with --json to record it")
        value = value[key]
    return value


def provenance(data: dict, path: Path) -> str:
    """One line: the machine (GPU, else CPU and cores), library versions, date and command."""
    machine = _require(data, path, "machine")
    device = machine.get("gpu") or f"{machine['cpu']}, {machine['cpu_cores']} cores, no GPU"
    versions = ", ".join(f"{name} {machine[name]}" for name in ("torch", "pyarrow", "sklearn") if name in machine)
    date = _require(data, path, "machine", "date").replace("T", " ")[:16] + " UTC"
    command = _require(data, path, "machine", "command")
    return f"*`results/{path.name}`*: {device}; {versions}; {date}.  \n`{command}`"


# --- one function per benchmark kind: its JSON → Markdown --------------------------------------

def pipeline_tables(data: dict, path: Path) -> str:
    """benchmarks/pipeline.py: the two extraction paths end to end, then the writer alone."""
    e2e = _require(data, path, "end_to_end")
    config = _require(data, path, "config")
    model = _require(data, path, "model")
    tuned_flags = ", ".join(flag for flag, on in (("decode on the device", config["tuned_decode"] == "device"),
                                                  ("compiled", config["tuned_compile"]),
                                                  ("streamed curves", config["tuned_curves"])) if on)
    rows = []
    for name, label in (("naive", "naive"), ("tuned", "`run_extract`")):
        run = e2e[name]
        compute = f"{run['precision']}, batch {run['batch']}" + (f", {tuned_flags}" if name == "tuned" and tuned_flags else "")
        rows.append([label, compute, f"{run['stored']}, {run['files']} files", _rate(run["img_s"]),
                     _ratio(1.0 if name == "naive" else e2e["speedup"]),
                     "n/a" if run["roofline_pct"] is None else f"{run['roofline_pct']:.1f} %",
                     _int(run["writer_mb_s"]), f"{100 * run['writer_share']:.0f} %",
                     _mib(run["rss_peak_mib"]), _mib(run["cuda_peak_mib"])])
    end_to_end = _table(["path", "compute", "stored", "img/s", "vs naive", "% roofline", "writer MB/s",
                         "time in writer", "peak RSS", "peak GPU memory"], rows)
    scope = (f"{model['architecture']} ({model['name']}, {model['gflop_per_image']:.1f} GFLOP/image), "
             f"{e2e['images']} JPEGs of {e2e['side']}×{e2e['side']}, {len(e2e['layers'])} layers × "
             f"{len(e2e['views'])} views = {e2e['tables']} tables of {_int(e2e['naive']['patch_rows'])} rows per path; "
             f"same patch rows on both paths: {'yes' if e2e['same_patch_rows'] else 'NO'}.")

    writer = _require(data, path, "writer")
    writer_rows = [[e["encoding"], e["dtype"], _int(e["write_mb_s"]), _int(round(e["write_mrows_s"] * 1e6, -3)),
                    _int(e["read_mb_s"]), _fixed(e["file_to_raw"], 3), "yes" if e["read_back_exact"] else "NO"]
                   for e in writer["encodings"]]
    writer_table = _table(["encoding", "dtype", "write MB/s", "write rows/s", "read MB/s", "file / raw",
                           "read back exactly"], writer_rows)
    par = writer["parallel"]
    writer_scope = (f"The writer alone: {_int(writer['rows'])} rows × {writer['dim']} values, fed "
                    f"{writer['batch_images']} images at a time, fastest of {writer['repeats']}. "
                    f"{par['tables']} {par['dtype']} tables on {par['tables']} threads: {_int(par['parallel_mb_s'])} MB/s, "
                    f"one after another: {_int(par['serial_mb_s'])} MB/s ({_ratio(par['speedup'])}).")
    return "\n\n".join([provenance(data, path), scope, end_to_end, writer_scope, writer_table])


def layerwise_tables(data: dict, path: Path) -> str:
    """benchmarks/layerwise_stream.py: what the layer-wise curves of unpublished layers cost."""
    seconds, img_s = _require(data, path, "seconds"), _require(data, path, "img_s")
    costs = {"publish only": "—", "fused": f"+{data['curves_cost_fused_s']:.1f} s",
             "separate": f"+{data['curves_cost_separate_s']:.1f} s"}
    labels = {"publish only": "publish only (`--layers last`)", "fused": "curves streamed from the extraction pass",
              "separate": "curves from a pass of their own"}
    rows = [[labels[run], _fixed(seconds[run], 2), _fixed(img_s[run], 2), costs[run]] for run in labels]
    scope = (f"Model `{data['model']}` on {data['images']} synthetic scenes of {data['size']} px, "
             f"{len(data['streamed_layers'])} streamed layers; streaming from the extraction pass was "
             f"{_ratio(data['fused_speedup_over_separate'])} faster than a pass of its own, and the two passes' "
             f"curves agree: {'yes' if data['curves_agree'] else 'NO'}.")
    return "\n\n".join([provenance(data, path), scope, _table(["run", "seconds", "img/s", "curves' cost"], rows)])


def probes_tables(data: dict, path: Path) -> str:
    """benchmarks/knn_scale.py: the few-shot probes at protocol size against scikit-learn."""
    config, knn, probe = (_require(data, path, key) for key in ("config", "knn", "probe"))
    ours, theirs = knn["ours"], knn["sklearn"]
    star = "*" if theirs["extrapolated"] else ""

    def peaks(a: dict, b: dict) -> str:
        return f"{_int(a['rss_peak_mib'])} / {_int(b['rss_peak_mib'])} MiB"

    rows = [
        [f"{config['k']}-NN, {_int(ours['rows'])} queries",
         f"`knn_predict` {ours['seconds']:.1f} s ({_int(ours['rows_s'])} queries/s)",
         f"{theirs['seconds']:.1f} s{star} ({_int(theirs['rows_s'])} queries/s)", _ratio(knn["speedup"]),
         f"{knn['agreement_with_sklearn']:.4f} ({_int(knn['agreement_rows'])} queries)",
         peaks(ours, theirs["peak"])],
        [f"probe fit, {_int(probe['ours']['fit']['rows'])} rows × {probe['ours']['fit']['epochs']} epochs",
         f"`LinearProbe` {probe['ours']['fit']['seconds']:.1f} s", f"{probe['sklearn']['fit']['seconds']:.1f} s",
         _ratio(probe["fit_speedup"]), "", peaks(probe["ours"]["fit"], probe["sklearn"]["fit"])],
        [f"probe predict, {_int(probe['ours']['predict']['rows'])} queries",
         f"{probe['ours']['predict']['seconds']:.2f} s", f"{probe['sklearn']['predict']['seconds']:.2f} s",
         _ratio(probe["predict_speedup"]), f"{probe['agreement_with_sklearn']:.4f}",
         peaks(probe["ours"]["predict"], probe["sklearn"]["predict"])],
    ]
    table = _table(["step", "PatchAtlas", "scikit-learn", "speed, ours ÷ scikit-learn", "agreement",
                    "peak RSS, ours / scikit-learn"], rows)
    scope = (f"{_int(config['queries'])} query × {_int(config['train'])} train rows × {config['dim']} "
             f"({config['dtype']}), {config['classes']} classes, similarity `{config['similarity']}`; "
             f"the protocol's size is {_int(config['protocol']['queries'])} queries. Accuracy on the teacher's "
             f"labels: {100 * probe['ours']['accuracy']:.1f} % (`LinearProbe`), "
             f"{100 * probe['sklearn']['accuracy']:.1f} % (scikit-learn).")
    notes = []
    if theirs["extrapolated"]:
        notes.append(f"\\* {_int(theirs['rows_timed'])} queries predicted, extrapolated to {_int(theirs['rows'])}, "
                     f"plus its {theirs['fit']['seconds']:.2f} s fit.")
    return "\n\n".join([provenance(data, path), scope, table, *notes])


RENDERERS: dict[str, Callable[[dict, Path], str]] = {
    "pipeline": pipeline_tables,
    "layerwise": layerwise_tables,
    "probes": probes_tables,
}


# --- the README ---------------------------------------------------------------------------------

def result_kind(path: Path) -> str:
    return path.stem.split("-", 1)[0]


def load_results(results: Path) -> dict[str, list[tuple[Path, dict]]]:
    """Every results file, grouped by kind, in name order; a file of no known kind is an error."""
    grouped: dict[str, list[tuple[Path, dict]]] = {}
    for path in sorted(results.glob("*.json")):
        kind = result_kind(path)
        if kind not in RENDERERS:
            raise ReportError(f"{path}: no table for results of kind '{kind}'; name the file "
                              f"<{'|'.join(RENDERERS)}>-<machine>.json or add a renderer to benchmarks/report.py")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ReportError(f"{path}: not valid JSON ({err})") from None
        grouped.setdefault(kind, []).append((path, data))
    return grouped


def render_readme(readme: str, results: dict[str, list[tuple[Path, dict]]]) -> str:
    """``readme`` with every marked block rewritten from the results of its kind."""
    kinds = [m.group("kind") for m in _BLOCK.finditer(readme)]
    for kind in kinds:
        if kind not in RENDERERS:
            raise ReportError(f"benchmarks/README.md: marker 'report:{kind}' names no benchmark kind "
                              f"(known: {', '.join(RENDERERS)})")
    unplaced = sorted(set(results) - set(kinds))
    if unplaced:
        raise ReportError(f"benchmarks/README.md has no '<!-- report:{unplaced[0]} -->' block for "
                          f"{', '.join(p.name for p, _ in results[unplaced[0]])}")

    def block(match: re.Match) -> str:
        kind = match.group("kind")
        tables = [RENDERERS[kind](data, path) for path, data in results.get(kind, [])]
        body = "\n\n".join(tables) if tables else "No recorded result yet."
        return f"{match.group(1)}{body}\n{match.group(4)}"

    return _BLOCK.sub(block, readme)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is out of date; write nothing")
    args = parser.parse_args(argv)
    current = README.read_text(encoding="utf-8")
    try:
        updated = render_readme(current, load_results(RESULTS))
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.check:
        if updated != current:
            print("benchmarks/README.md is out of date: run `python -m benchmarks.report`", file=sys.stderr)
            return 1
        return 0
    if updated != current:
        atomic_write_text(README, updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
