"""k-NN and linear probe at the Cityscapes protocol's size, side by side with scikit-learn.

The protocol classifies 150 000 query patches (30 val images) from 113 000 labelled train
patches (72 train images) of 768-d ViT-B tokens, 19 classes: 1-NN on dot products, and a linear
probe trained with Adam (30 epochs, lr 1e-3, batches of 1 024). One run times the project's
``knn_predict`` and ``LinearProbe`` and their scikit-learn counterparts on the same data and
reports seconds, rows/s, the speed ratio, how often the predictions agree, and peak memory, as a
table and as JSON (``--json``). It also checks the chunked k-NN against an unchunked brute force
on a slice of the queries.

Data: Gaussian rows normalised to unit length, stored in ``--dtype`` (float16 by default, as the
patch tables store tokens), labelled by a random linear teacher (class = argmax of x·W) so that
a probe has something to learn. Both sides read the same values (scikit-learn as float32).

What is compared:

- k-NN: ``knn_predict`` against ``KNeighborsClassifier(n_neighbors=k, algorithm="brute")``.
  scikit-learn has no dot-product metric, but on unit rows the dot product is the cosine, so
  ``--similarity dot`` (the protocol's) and ``cosine`` are compared with ``metric="cosine"``, and
  ``l2`` with ``metric="euclidean"``: both sides rank the same neighbours. Float16 leaves the
  stored rows' norms within about 1e-5 of 1 and the two sides round their float32 sums in
  different orders, so a near tie may rarely go the other way. With k > 1 a tied vote may also
  differ: scikit-learn takes the smallest tied class, ``knn_predict`` the nearest one's.
- Linear probe: ``LinearProbe`` against ``MLPClassifier(hidden_layer_sizes=())``, which without
  a hidden layer is the same model (one linear layer, softmax cross-entropy, no weight decay)
  trained the same way (Adam with the same learning rate, batch size and epochs, reshuffled every
  epoch); only the initial weights and the batch order differ. ``LogisticRegression`` fits that
  model by L-BFGS to convergence under an L2 penalty and ``SGDClassifier`` one-vs-rest binary
  models: neither trains what ``LinearProbe`` trains. Both fit on the same train rows
  (``--probe-train``, default all) and predict every query; agreement is over every query.

Timing: the project's functions run the whole query set on ``--device``. scikit-learn (on the
CPU, all cores) predicts only the first ``--sklearn-queries`` queries and its time is
extrapolated linearly to the whole set: k-NN predictions of query rows are independent (each
needs its own row and the train bank only), so the work grows linearly with the queries. Its
fit (validating and storing the train bank) is timed once and added. k-NN agreement is measured
on those common queries. The speed ratio is scikit-learn's seconds over ours for the same work
(above 1: ours is faster). Peak memory: the CUDA allocator's peak on CUDA; on the CPU the
process's peak resident set (``resource.getrusage``), reset before each step where Linux allows
it (``/proc/self/clear_refs``), else the peak so far; both include the data already loaded.

On a CPU the default is 20 000 queries (under 2 minutes in all on 2 cores); ``--queries 150000``
runs the protocol's full size there too (about 5 minutes more). ``--threads`` sets torch's CPU
threads: on a machine shared with other processes fewer threads than cores can be faster.

Run: ``python benchmarks/knn_scale.py [--device auto|cpu|cuda] [--queries N] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import sklearn
import torch
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import command_line, format_table, machine_info, resolve_device  # noqa: E402
from generator.analyses.probes import LinearProbe, knn_predict, majority_vote  # noqa: E402
from generator.errors import PatchAtlasError  # noqa: E402
from generator.store.atomic import atomic_write_json  # noqa: E402

PROTOCOL = {"queries": 150_000, "train": 113_000, "dim": 768, "classes": 19}
CPU_QUERIES = 20_000  # the CPU default: the protocol's 150 000 take knn_predict about 5 minutes on 2 cores
SKLEARN_METRIC = {"dot": "cosine", "cosine": "cosine", "l2": "euclidean"}  # the same ranking on unit rows
BRUTE_FORCE_QUERIES = {"cuda": 2048, "cpu": 512}  # a [rows, train] float32 matrix at once
WARMUP_ROWS = 256
CPU = torch.device("cpu")


# ---------------------------------------------------------------- machine and measurement


def _reset_rss_peak() -> bool:
    """Reset the process's peak resident set to its current size (Linux 4.0+); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@contextlib.contextmanager
def measured(device: torch.device) -> Iterator[dict]:
    """Seconds and peak memory of the block, filled in when it ends (synchronised on CUDA)."""
    out: dict = {}
    scoped = _reset_rss_peak()
    rss_start = _rss_mib()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    yield out
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    out["seconds"] = time.perf_counter() - start
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out.update({"rss_peak_mib": rss_peak, "rss_increase_mib": max(0.0, rss_peak - rss_start),
                "rss_peak_scope": "step" if scoped else "process so far",
                "cuda_peak_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None})


# ---------------------------------------------------------------- data


def make_data(n_train: int, n_queries: int, dim: int, n_classes: int, *, dtype: torch.dtype,
              device: torch.device, seed: int = 0) -> dict:
    """Unit-length Gaussian rows stored in ``dtype``, labelled by a random linear teacher."""
    gen = torch.Generator(device=device).manual_seed(seed)
    teacher = torch.randn(dim, n_classes, device=device, generator=gen)

    def rows(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.normalize(torch.randn(n, dim, device=device, generator=gen), dim=1)
        return x.to(dtype), (x @ teacher).argmax(dim=1)

    train, train_y = rows(n_train)
    test, test_y = rows(n_queries)
    return {"train": train, "train_y": train_y, "test": test, "test_y": test_y}


def _numpy32(x: torch.Tensor) -> np.ndarray:
    return x.float().cpu().numpy()


# ---------------------------------------------------------------- k-NN


def brute_force_labels(train: torch.Tensor, train_y: torch.Tensor, test: torch.Tensor, *, k: int,
                       similarity: str, n_classes: int) -> torch.Tensor:
    """k-NN labels from the whole similarity matrix at once (no chunks), the same vote as knn_predict."""
    q, t = test.float(), train.float()
    if similarity == "cosine":
        q, t = F.normalize(q, dim=1), F.normalize(t, dim=1)
    sims = -torch.cdist(q, t) if similarity == "l2" else q @ t.T
    return majority_vote(train_y[sims.topk(k, dim=1).indices], n_classes)


def knn_side_by_side(data: dict, *, k: int, similarity: str, n_classes: int, sklearn_queries: int) -> dict:
    """``knn_predict`` on every query against scikit-learn's brute-force k-NN on the first ones."""
    train, train_y, test = data["train"], data["train_y"], data["test"]
    device, n_queries = test.device, test.shape[0]
    timed = min(sklearn_queries, n_queries)
    kwargs = {"k": k, "similarity": similarity, "n_classes": n_classes}
    knn_predict(train, train_y, test[:WARMUP_ROWS], **kwargs)  # thread pools, CUDA kernels
    with measured(device) as ours:
        pred = knn_predict(train, train_y, test, **kwargs)
    brute_rows = min(BRUTE_FORCE_QUERIES[device.type], n_queries)
    brute = brute_force_labels(train, train_y, test[:brute_rows], **kwargs)
    brute_agreement = float((pred[:brute_rows] == brute).float().mean())
    del brute

    x, y, q = _numpy32(train), train_y.cpu().numpy(), _numpy32(test[:timed])
    estimator = KNeighborsClassifier(n_neighbors=k, algorithm="brute", metric=SKLEARN_METRIC[similarity], n_jobs=-1)
    with measured(CPU) as fit:
        estimator.fit(x, y)
    with measured(CPU) as predict:
        sk_pred = estimator.predict(q)
    extrapolated = fit["seconds"] + predict["seconds"] * n_queries / timed
    ours.update(rows=n_queries, rows_s=n_queries / ours["seconds"], label=f"knn_predict ({device.type})",
                implementation=f"knn_predict(k={k}, similarity={similarity!r}) on {device.type}")
    sklearn_side = {
        "label": f"KNeighborsClassifier, brute, {SKLEARN_METRIC[similarity]}",
        "implementation": f"KNeighborsClassifier(n_neighbors={k}, algorithm='brute', "
                          f"metric={SKLEARN_METRIC[similarity]!r}, n_jobs=-1)",
        "rows": n_queries, "rows_timed": timed, "fit": fit, "predict_timed": predict,
        "seconds": extrapolated, "rows_s": n_queries / extrapolated,
        "extrapolated": timed < n_queries,
        "peak": {key: max(fit[key], predict[key]) for key in ("rss_peak_mib", "rss_increase_mib")},
    }
    return {"ours": ours, "sklearn": sklearn_side, "speedup": extrapolated / ours["seconds"],
            "agreement_with_sklearn": float(np.mean(pred[:timed].cpu().numpy() == sk_pred)),
            "agreement_rows": timed, "agreement_with_brute_force": brute_agreement, "brute_force_rows": brute_rows,
            "sklearn_metric": SKLEARN_METRIC[similarity]}


# ---------------------------------------------------------------- linear probe


def probe_side_by_side(data: dict, *, n_classes: int, n_train: int, epochs: int, lr: float, batch_size: int,
                       seed: int) -> dict:
    """``LinearProbe`` against a hidden-layer-free ``MLPClassifier`` on the same rows and settings."""
    train, train_y = data["train"][:n_train], data["train_y"][:n_train]
    test, test_y = data["test"], data["test_y"]
    device, n_queries = test.device, test.shape[0]
    probe = LinearProbe(n_classes=n_classes, solver="adam", weight_decay=0.0, epochs=epochs, lr=lr,
                        batch_size=batch_size, seed=seed)
    # The first fit in a process pays about a second of one-time set-up on a CPU; it is not training.
    warm = slice(0, WARMUP_ROWS)
    LinearProbe(n_classes=n_classes, solver="adam", epochs=1, batch_size=batch_size).fit(train[warm], train_y[warm])
    with measured(device) as fit:
        probe.fit(train, train_y)
    with measured(device) as predict:
        pred = probe.predict(test)

    x, y, q = _numpy32(train), train_y.cpu().numpy(), _numpy32(test)
    mlp = MLPClassifier(hidden_layer_sizes=(), solver="adam", alpha=0.0, learning_rate_init=lr, batch_size=batch_size,
                        max_iter=epochs, shuffle=True, random_state=seed, tol=0.0, n_iter_no_change=epochs + 1)
    with warnings.catch_warnings():
        # It always stops at max_iter (the epochs asked for) and warns that it did.
        warnings.simplefilter("ignore", ConvergenceWarning)
        with measured(CPU) as sk_fit:
            mlp.fit(x, y)
    with measured(CPU) as sk_predict:
        sk_pred = mlp.predict(q)
    truth = test_y.cpu().numpy()
    ours_pred = pred.cpu().numpy()
    fit.update(rows=n_train, epochs=epochs, rows_s=n_train * epochs / fit["seconds"])
    sk_fit.update(rows=n_train, epochs=int(mlp.n_iter_), rows_s=n_train * mlp.n_iter_ / sk_fit["seconds"])
    predict.update(rows=n_queries, rows_s=n_queries / predict["seconds"])
    sk_predict.update(rows=n_queries, rows_s=n_queries / sk_predict["seconds"])
    return {
        "ours": {"label": f"LinearProbe ({device.type})",
                 "implementation": f"LinearProbe(epochs={epochs}, lr={lr:g}, batch_size={batch_size}) on {device.type}",
                 "fit": fit, "predict": predict, "final_loss": probe.loss_history_[-1],
                 "accuracy": float(np.mean(ours_pred == truth))},
        "sklearn": {"label": "MLPClassifier, no hidden layer",
                    "implementation": f"MLPClassifier(hidden_layer_sizes=(), solver='adam', alpha=0, "
                                      f"learning_rate_init={lr:g}, batch_size={batch_size}, max_iter={epochs})",
                    "fit": sk_fit, "predict": sk_predict, "final_loss": float(mlp.loss_curve_[-1]),
                    "accuracy": float(np.mean(sk_pred == truth))},
        "fit_speedup": sk_fit["seconds"] / fit["seconds"],
        "predict_speedup": sk_predict["seconds"] / predict["seconds"],
        "agreement_with_sklearn": float(np.mean(ours_pred == sk_pred)), "agreement_rows": n_queries,
        "accuracy_basis": "share of queries given the linear teacher's class",
    }


# ---------------------------------------------------------------- report


def _memory(step: dict) -> str:
    if step.get("cuda_peak_mib") is not None:
        return f"{step['cuda_peak_mib']:,.0f} (CUDA)"
    return f"{step['rss_peak_mib']:,.0f} (RSS)"


def render_report(report: dict) -> str:
    m, c, knn, probe = report["machine"], report["config"], report["knn"], report["probe"]
    where = f"{m['gpu']} + " if m["gpu"] else ""
    lines = [f"machine: {where}{m['cpu']}, {m['cpu_cores']} cores, {m['torch_threads']} torch threads; "
             f"torch {m['torch']}, scikit-learn {m['sklearn']}; {m['date']}; "
             f"load {m['load_average_start'][0]:.1f} → {m['load_average_end'][0]:.1f}",
             f"data: {c['queries']:,} queries × {c['train']:,} train × {c['dim']} ({c['dtype']}, unit rows), "
             f"{c['classes']} classes from a linear teacher; device {c['device']}"]
    if c["queries"] < PROTOCOL["queries"]:
        lines.append(f"queries: {c['queries']:,}, fewer than the protocol's {PROTOCOL['queries']:,} "
                     f"({'the CPU default' if c['queries_default'] else 'as asked'}; --queries 150000 for all)")
    sk = knn["sklearn"]
    if sk["extrapolated"]:
        lines.append(f"scikit-learn k-NN: predicted {sk['rows_timed']:,} queries and extrapolated linearly to "
                     f"{sk['rows']:,} (query rows are independent), plus its fit; agreement on those "
                     f"{knn['agreement_rows']:,}")
    lines.append("")
    ours, skf = knn["ours"], sk
    rows = [
        ["k-NN predict", ours["label"], f"{ours['rows']:,}", f"{ours['seconds']:.2f}",
         f"{ours['rows_s']:,.0f}", f"{knn['speedup']:.2f}×", f"{knn['agreement_with_sklearn']:.4f}",
         _memory(ours)],
        ["", skf["label"] + (" *" if skf["extrapolated"] else ""), f"{skf['rows']:,}",
         f"{skf['seconds']:.2f}", f"{skf['rows_s']:,.0f}", "1", "", f"{skf['peak']['rss_peak_mib']:,.0f} (RSS)"],
    ]
    for step, label in (("fit", "probe fit"), ("predict", "probe predict")):
        o, s = probe["ours"][step], probe["sklearn"][step]
        unit = " row·epochs" if step == "fit" else ""
        rows.append([label, probe["ours"]["label"], f"{o['rows']:,}", f"{o['seconds']:.2f}",
                     f"{o['rows_s']:,.0f}{unit}", f"{probe[step + '_speedup']:.2f}×",
                     f"{probe['agreement_with_sklearn']:.4f}" if step == "predict" else "", _memory(o)])
        rows.append(["", probe["sklearn"]["label"], f"{s['rows']:,}", f"{s['seconds']:.2f}",
                     f"{s['rows_s']:,.0f}{unit}", "1", "", _memory(s)])
    lines.append(format_table(["step", "implementation", "rows", "seconds", "rows/s", "speed vs sklearn",
                               "agreement", "peak MiB"], rows, left=2))
    sides = (ours, skf, probe["ours"], probe["sklearn"])
    lines += ["", *(f"{side['label']}: {side['implementation']}" for side in sides),
              "speed vs sklearn: scikit-learn's seconds over ours for the same work (above 1: ours is faster)"
              + ("; * extrapolated" if skf["extrapolated"] else ""),
              f"k-NN against an unchunked brute force on {knn['brute_force_rows']:,} queries: "
              f"agreement {knn['agreement_with_brute_force']:.4f}",
              f"probe accuracy against the teacher: ours {probe['ours']['accuracy']:.3f}, scikit-learn "
              f"{probe['sklearn']['accuracy']:.3f}; final train loss {probe['ours']['final_loss']:.4f} and "
              f"{probe['sklearn']['final_loss']:.4f}"]
    return "\n".join(lines)


# ---------------------------------------------------------------- entry point


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--queries", type=int, default=None,
                        help=f"query rows (default {PROTOCOL['queries']:,} on CUDA, {CPU_QUERIES:,} on CPU)")
    parser.add_argument("--train", type=int, default=PROTOCOL["train"])
    parser.add_argument("--dim", type=int, default=PROTOCOL["dim"])
    parser.add_argument("--classes", type=int, default=PROTOCOL["classes"])
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--similarity", choices=sorted(SKLEARN_METRIC), default="dot")
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    parser.add_argument("--sklearn-queries", type=int, default=2000,
                        help="queries scikit-learn's k-NN predicts; its time is extrapolated to --queries")
    parser.add_argument("--probe-train", type=int, default=None, help="train rows of both probes (default all)")
    parser.add_argument("--probe-epochs", type=int, default=30)
    parser.add_argument("--probe-lr", type=float, default=1e-3)
    parser.add_argument("--probe-batch-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch's CPU threads (default torch's own: one per core)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    for name in ("queries", "train", "dim", "classes", "k", "sklearn_queries", "probe_train", "probe_epochs",
                 "probe_batch_size", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.probe_lr <= 0:
        parser.error(f"--probe-lr must be positive, got {args.probe_lr}")
    if args.k > args.train:
        parser.error(f"--k {args.k} is more than the {args.train} train rows")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    n_queries = args.queries or (PROTOCOL["queries"] if device.type == "cuda" else CPU_QUERIES)
    n_probe = min(args.probe_train or args.train, args.train)
    machine = machine_info(device, command_line(__file__, argv), sklearn=sklearn.__version__, numpy=np.__version__)
    data = make_data(args.train, n_queries, args.dim, args.classes, dtype=getattr(torch, args.dtype),
                     device=device, seed=args.seed)
    knn = knn_side_by_side(data, k=args.k, similarity=args.similarity, n_classes=args.classes,
                           sklearn_queries=args.sklearn_queries)
    probe = probe_side_by_side(data, n_classes=args.classes, n_train=n_probe, epochs=args.probe_epochs,
                               lr=args.probe_lr, batch_size=args.probe_batch_size, seed=args.seed)
    machine["load_average_end"] = list(os.getloadavg())
    report = {
        "machine": machine,
        "config": {"device": str(device), "queries": n_queries, "queries_default": args.queries is None,
                   "train": args.train, "dim": args.dim, "classes": args.classes, "dtype": args.dtype, "k": args.k,
                   "similarity": args.similarity, "sklearn_queries": min(args.sklearn_queries, n_queries),
                   "probe_train": n_probe, "probe_epochs": args.probe_epochs, "probe_lr": args.probe_lr,
                   "probe_batch_size": args.probe_batch_size, "seed": args.seed, "protocol": PROTOCOL},
        "data": "Gaussian rows normalised to unit length, labels = argmax of x·W for a Gaussian teacher W",
        "knn": knn,
        "probe": probe,
    }
    print(render_report(report))
    if args.json:
        atomic_write_json(args.json, report)
    return report


if __name__ == "__main__":
    try:
        main()
    except PatchAtlasError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
