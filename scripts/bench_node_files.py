# Run: python scripts/bench_node_files.py --out bench_node_files.json [--mb 1,32] [--ranks 1,2,4,8]
"""A node's checkpoint as one file per rank (what ulfmpy writes) or one file per node.

The node's writer process writes every rank of its node (docs/internals.md,
"Checkpoint staging and writing"). Two layouts for what it writes:

- **per rank** (ulfmpy's): each rank's arrays in a file of its own, written
  by the writer's thread for that rank with the real writer
  (``_ckpt_writers.write_rank_file``: HDF5 allocates the datasets, the bytes
  go to their offsets with a CRC-32 per array, then fsync), all ranks' threads
  at once, as the writer runs them;
- **per node**: one file, a group per rank: one thread creates every rank's
  datasets (HDF5 calls take turns in h5py anyway), then the ranks' threads
  write their bytes at their offsets at once (the same chunked writer and
  checksum, outside HDF5), then one fsync. The manifest's virtual datasets
  would point into the groups.

Both write the same bytes from the same arrays into a fresh directory, in
alternating order, ``--repeats`` times; the figure is the median ratio
(per node / per rank) of the node's wall time, with the files and fsyncs each
layout makes. Writes JSON. Nothing here is collective.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ulfmpy import _ckpt_writers as W  # noqa: E402


def _arrays(ranks: int, mb: float) -> list[list[tuple[str, np.ndarray, dict]]]:
    n = max(1, int(mb * 2**20 / 8))
    rng = np.random.default_rng(0)
    return [[("u", rng.random(n), {"kind": "rank"}), ("t", np.array(float(r)), {"kind": "rank"})]
            for r in range(ranks)]


def per_rank(d: Path, arrays: list) -> dict:
    t0 = time.perf_counter()
    threads = [threading.Thread(target=W.write_rank_file,
                                args=(str(d / f"rank-{r:05d}.h5"), a, {"rank": r}))
               for r, a in enumerate(arrays)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    W.fsync_dir(str(d))
    return {"s": time.perf_counter() - t0, "files": len(arrays), "fsyncs": len(arrays) + 1}


def per_node(d: Path, arrays: list) -> dict:
    t0 = time.perf_counter()
    path = d / "node-00000.h5"
    places: list[list[tuple[str, int, np.ndarray]]] = []
    with h5py.File(path, "w") as f:
        for r, ranked in enumerate(arrays):
            g = f.create_group(f"rank-{r:05d}")
            g.attrs["rank"] = r
            mine = []
            for name, arr, attrs in ranked:
                if arr.nbytes >= W.DIRECT_BYTES:
                    ds = g.create_dataset(name, shape=arr.shape, dtype=arr.dtype,
                                          dcpl=W._early_dcpl())
                    mine.append((name, ds.id.get_offset(), arr))
                else:
                    ds = g.create_dataset(name, data=arr)
                    ds.attrs["checksum"] = W.crc32_hex(arr)
                for k, v in attrs.items():
                    ds.attrs[k] = v
            places.append(mine)
    sums: dict[tuple[int, str], str] = {}
    fd = os.open(path, os.O_WRONLY)

    def write(r: int) -> None:
        for name, offset, arr in places[r]:
            sums[(r, name)] = W._write_at(fd, offset, arr)

    try:
        threads = [threading.Thread(target=write, args=(r,)) for r in range(len(arrays))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        os.fsync(fd)
    finally:
        os.close(fd)
    with h5py.File(path, "r+") as f:  # the checksums, known once the bytes are written
        for (r, name), crc in sums.items():
            f[f"rank-{r:05d}/{name}"].attrs["checksum"] = crc
    W.fsync_path(str(path))
    W.fsync_dir(str(d))
    return {"s": time.perf_counter() - t0, "files": 1, "fsyncs": 3}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_node_files.json")
    ap.add_argument("--mb", default="1,32", help="state MB per rank, comma-separated")
    ap.add_argument("--ranks", default="1,2,4,8", help="ranks per node, comma-separated")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-node-files-", dir=args.dir))
    rows = []
    try:
        for mb in [float(x) for x in args.mb.split(",")]:
            for ranks in [int(x) for x in args.ranks.split(",")]:
                arrays = _arrays(ranks, mb)
                times: dict[str, list[float]] = {"per_rank": [], "per_node": []}
                info = {}
                for i in range(args.repeats):
                    order = (per_rank, per_node) if i % 2 == 0 else (per_node, per_rank)
                    for fn in order:
                        d = root / f"{fn.__name__}-{i}"
                        d.mkdir()
                        got = fn(d, arrays)
                        times[fn.__name__].append(got["s"])
                        info[fn.__name__] = {"files": got["files"], "fsyncs": got["fsyncs"]}
                        shutil.rmtree(d)
                ratios = [n / r for n, r in zip(times["per_node"], times["per_rank"])]
                row = {"mb_per_rank": mb, "ranks_per_node": ranks,
                       "per_rank_s": statistics.median(times["per_rank"]),
                       "per_node_s": statistics.median(times["per_node"]),
                       "node_over_rank": statistics.median(ratios),
                       "ratio_range": [min(ratios), max(ratios)], "layouts": info,
                       "times": times}
                rows.append(row)
                print(f"{mb:g} MB x {ranks} ranks: per rank {row['per_rank_s'] * 1e3:.1f} ms "
                      f"({ranks} files), per node {row['per_node_s'] * 1e3:.1f} ms (1 file): "
                      f"ratio {row['node_over_rank']:.2f} ({min(ratios):.2f}-{max(ratios):.2f})",
                      flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "repeats": args.repeats,
                                          "cpus": os.cpu_count()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
