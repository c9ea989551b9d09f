# Run: mpirun --oversubscribe -n 2 python -m mpi4py scripts/bench_checkpoint.py --mb 128
"""Checkpoint engine benchmark: exposed time, helper bandwidth, compute slowdown.

Every figure is a ratio measured in the same run on the same machine:

* **exposed**: the asynchronous save's exposed time (staging copy plus
  commit, as the loop sees it) against ``np.copyto`` of the same bytes from
  the same arrays into a preallocated buffer (target <= 1.5x); the
  synchronous save's exposed time for comparison.
* **bandwidth**: the helper's write (HDF5 + CRC-32 + fsync, with no compute
  running) against a plain sequential ``write`` + ``fsync`` of the same
  bytes into the same directory, every rank writing at once in both cases
  (target >= 0.7x).
* **slowdown**: a numpy 5-point Jacobi step on the checkpointed array while
  the helper writes, against the same steps with no write running
  (target <= 5%), as the median over rounds of (median step while the
  helper writes) / (median step just before the save).

Rank 0 writes ``bench_checkpoint.json`` and ``bench_checkpoint.png`` to
``--out`` (default ``results/checkpoint``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

from ulfmpy.checkpoint import CheckpointStore
from ulfmpy.state import Block

TARGETS = {"exposed_vs_copyto": 1.5, "bandwidth_vs_plain": 0.7, "jacobi_slowdown": 0.05}


class Jacobi:
    """A 5-point Jacobi sweep on a padded block, in preallocated buffers."""

    def __init__(self, rows: int, cols: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.u = np.zeros((rows + 2, cols + 2))
        self.u[1:-1, 1:-1] = rng.random((rows, cols))
        self.v = self.u.copy()
        self.tmp = np.empty((rows, cols))

    @property
    def interior(self) -> np.ndarray:
        return self.u[1:-1, 1:-1]

    def step(self) -> None:
        u, t = self.u, self.tmp
        np.add(u[:-2, 1:-1], u[2:, 1:-1], out=t)
        t += u[1:-1, :-2]
        t += u[1:-1, 2:]
        t *= 0.25
        self.v[1:-1, 1:-1] = t
        self.u, self.v = self.v, self.u


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def plain_write(path: Path, data: np.ndarray) -> float:
    """Sequential write + fsync of ``data``'s bytes to a new file; seconds."""
    t0 = time.perf_counter()
    with open(path, "wb") as fh:
        fh.write(memoryview(data).cast("B"))
        fh.flush()
        os.fsync(fh.fileno())
    return time.perf_counter() - t0


def streamed_write(path: Path, data: np.ndarray, chunk: int = 1 << 20,
                   writeback: int = 8 << 20) -> float:
    """Like :func:`plain_write`, with the helper's I/O pattern but no HDF5 or checksum:
    1 MiB chunks, writeback started every 8 MiB. Isolates the format's cost."""
    mv = memoryview(data).cast("B")
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        pos = started = 0
        while pos < len(mv):
            pos += os.write(fd, mv[pos:pos + chunk])
            if pos - started >= writeback:
                os.posix_fadvise(fd, started, pos - started, os.POSIX_FADV_DONTNEED)
                started = pos
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def bench(comm, args, run_dir: Path) -> dict:
    rank, size = comm.Get_rank(), comm.Get_size()
    cols = 2048
    rows = max(1, args.mb * 2**20 // (8 * cols))
    app = Jacobi(rows, cols, seed=rank)
    gshape = (rows * size, cols)

    def state():
        return {"u": Block(app.interior, gshape, (rows * rank, 0))}

    def settle():  # let the previous write drain out of the device on every rank
        comm.Barrier()
        time.sleep(args.settle)
        comm.Barrier()

    out: dict = {"rank": rank, "bytes": app.interior.nbytes}

    # 1. np.copyto of the same bytes from the same (padded, non-contiguous) array
    dst = np.empty(app.interior.shape)
    dst.fill(0)
    out["copyto_s"] = [timed(lambda: np.copyto(dst, app.interior)) for _ in range(args.repeats)]

    # 2. synchronous saves
    step = 0
    with CheckpointStore(comm, run_dir / "sync", mode="sync", keep=2) as store:
        store.prepare(state())
        for _ in range(args.repeats):
            settle()
            step += 1
            store.save(step, state())
        out["sync_exposed_s"] = [r.exposed_s for r in store.records]

    kw = {} if args.duty is None else {"helper_duty": args.duty}
    data = None

    def snapshot() -> None:  # the segment's own snapshot, taken at any boundary: not timed
        if data is not None:
            np.copyto(data["u"], app.interior)

    if args.partner and size > 1:
        # The runtime saves from the segment snapshot taken at the boundary
        # (contiguous), which it would take anyway.
        data = {"u": np.empty(app.interior.shape)}
        # Each rank's state staged in the next rank's memory and written by
        # its node's writer from there, as the runtime does by default.
        from ulfmpy.partner import holders

        kw["holders"] = holders([platform.node()] * size)
    with CheckpointStore(comm, run_dir / "async", mode="async", keep=2, **kw) as store:
        store.prepare(state())
        out["helper_affinity"] = store._helper.info()["affinity"]  # also: started up
        out["rank_affinity"] = sorted(os.sched_getaffinity(0))

        # 3. write bandwidth, no compute: plain write, streamed write and the
        #    helper's write of the same bytes, interleaved, all ranks at once;
        #    new files each time, the one before last deleted (as keep=2 does)
        contiguous = np.ascontiguousarray(app.interior)
        plain, streamed, save_call = [], [], []
        for r in range(args.bw_repeats):
            for name, fn, times in (("plain", plain_write, plain),
                                    ("streamed", streamed_write, streamed)):
                settle()
                times.append(fn(run_dir / f"{name}-{rank:05d}-{r}.bin", contiguous))
                (run_dir / f"{name}-{rank:05d}-{r - 2}.bin").unlink(missing_ok=True)
            settle()
            step += 1
            snapshot()
            save_call.append(timed(lambda s=step: store.save(s, state(), data=data)))
            store.drain()  # the rank waits: the helper writes at full speed
        del contiguous
        out.update(plain_s=plain, streamed_s=streamed, async_alone_save_call_s=save_call,
                   async_alone_exposed_s=[r.exposed_s for r in store.records],
                   helper_write_s=[r.write_s for r in store.records])

        # 4. Jacobi steps with no write, then while the helper writes; the
        #    checkpoint commits at the first boundary (poll) after its write
        for _ in range(2):  # warm up the kernel
            app.step()
        during, base, exposed, polls, writes, save_call = [], [], [], [], [], []
        for _ in range(args.repeats):
            settle()
            base.append([timed(app.step) for _ in range(3)])
            during.append([])
            step += 1
            comm.Barrier()  # the boundary's own agreement (not charged to the checkpoint)
            snapshot()
            save_call.append(timed(lambda s=step: store.save(s, state(), data=data)))
            while True:
                during[-1].append(timed(app.step))
                comm.Barrier()  # the boundary's own agreement (not charged to the checkpoint)
                rec = store.poll()  # the runtime's segment boundary
                if rec is not None:
                    break
            exposed.append(rec.exposed_s)
            polls.append(rec.commit_s)
            writes.append(rec.write_s)
        out.update(async_exposed_s=exposed, async_save_call_s=save_call, async_poll_s=polls,
                   helper_write_under_compute_s=writes, jacobi_during_s=during,
                   jacobi_base_s=base)
    return out


def summarize(per_rank: list[dict], args) -> dict:
    med = statistics.median
    r0 = per_rank[0]
    nbytes = sum(r["bytes"] for r in per_rank)
    copyto = max(med(r["copyto_s"]) for r in per_rank)
    async_exposed = med(r0["async_exposed_s"])  # records hold maxima over ranks
    async_alone = med(r0["async_alone_exposed_s"])
    save_call = max(med(r["async_save_call_s"]) for r in per_rank)
    sync_exposed = med(r0["sync_exposed_s"])
    plain = max(med(r["plain_s"]) for r in per_rank)
    streamed = max(med(r["streamed_s"]) for r in per_rank)
    helper = med(r0["helper_write_s"])
    # per round: median step while the helper writes / median step just before,
    # so drifts between rounds (other jobs, frequency) cancel; then the median round
    rounds = [med(d) / med(b) - 1.0 for r in per_rank
              for d, b in zip(r["jacobi_during_s"], r["jacobi_base_s"])]
    during = med([t for r in per_rank for d in r["jacobi_during_s"] for t in d])
    base = med([t for r in per_rank for b in r["jacobi_base_s"] for t in b])
    s = {
        "ranks": len(per_rank), "bytes_per_rank": per_rank[0]["bytes"], "bytes_total": nbytes,
        "repeats": args.repeats,
        "copyto_s": copyto,
        "async_save_call_s": save_call,
        "async_exposed_s": async_exposed,
        "async_exposed_no_compute_s": async_alone,
        "sync_exposed_s": sync_exposed,
        "exposed_vs_copyto": async_exposed / copyto,
        "save_call_vs_copyto": save_call / copyto,
        "sync_vs_async_exposed": sync_exposed / async_exposed,
        "plain_write_s": plain, "helper_write_s": helper,
        "plain_bandwidth_MBps": nbytes / plain / 1e6,
        "helper_bandwidth_MBps": nbytes / helper / 1e6,
        "bandwidth_vs_plain": plain / helper,
        "bandwidth_vs_plain_best": (max(min(r["plain_s"]) for r in per_rank)
                                    / min(r0["helper_write_s"])),
        "streamed_write_s": streamed,
        "bandwidth_vs_streamed": streamed / helper,
        "helper_duty": args.duty,
        "helper_write_under_compute_s": med(r0["helper_write_under_compute_s"]),
        "jacobi_base_step_s": base, "jacobi_during_write_step_s": during,
        "jacobi_slowdown": med(rounds),
        "jacobi_slowdown_rounds": rounds,
        "jacobi_slowdown_pooled": during / base - 1.0,
        "jacobi_steps_during_write": sum(len(d) for r in per_rank for d in r["jacobi_during_s"]),
    }
    s["pass"] = {"exposed_vs_copyto": s["exposed_vs_copyto"] <= TARGETS["exposed_vs_copyto"],
                 "bandwidth_vs_plain": s["bandwidth_vs_plain"] >= TARGETS["bandwidth_vs_plain"],
                 "jacobi_slowdown": s["jacobi_slowdown"] <= TARGETS["jacobi_slowdown"]}
    return s


def plot(s: dict, per_rank: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(14, 4.2))
    names = ["np.copyto", "async save()", "async exposed\n(save+commit)", "sync save"]
    vals = [s["copyto_s"], s["async_save_call_s"], s["async_exposed_s"], s["sync_exposed_s"]]
    ax[0].bar(names, [v * 1e3 for v in vals], color=["grey", "tab:blue", "tab:blue", "tab:red"])
    ax[0].set_ylabel("ms")
    ax[0].set_title(f"exposed time, {s['bytes_per_rank'] / 2**20:.0f} MiB/rank "
                    f"(async/copyto = {s['exposed_vs_copyto']:.2f}x)")
    ax[0].tick_params(axis="x", labelsize=8)
    ax[1].bar(["plain\nwrite+fsync", "streamed\n(helper's I/O)", "helper\n(HDF5+crc+fsync)"],
              [s["plain_bandwidth_MBps"], s["bytes_total"] / s["streamed_write_s"] / 1e6,
               s["helper_bandwidth_MBps"]], color=["grey", "silver", "tab:blue"])
    ax[1].set_ylabel("MB/s (all ranks)")
    ax[1].set_title(f"write bandwidth (helper/plain = {s['bandwidth_vs_plain']:.2f}x)")
    for r in per_rank:
        for i, (b, d) in enumerate(zip(r["jacobi_base_s"], r["jacobi_during_s"])):
            ax[2].plot([i - 0.15] * len(b), [t * 1e3 for t in b], "o", color="grey", ms=3)
            ax[2].plot([i + 0.15] * len(d), [t * 1e3 for t in d], "o", color="tab:blue", ms=3)
    ax[2].set_xlabel("round (grey: before the save; blue: helper writing)")
    ax[2].set_ylabel("Jacobi step (ms)")
    ax[2].set_title(f"compute slowdown {100 * s['jacobi_slowdown']:+.1f}%"
                    + ("" if s["helper_duty"] is None else f" (duty {s['helper_duty']})"))
    fig.suptitle(f"ulfmpy checkpoint engine, {s['ranks']} rank(s) on {platform.node()}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=128, help="state per rank in MiB (default 128)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bw-repeats", type=int, default=9,
                        help="repeats of the bandwidth comparison (this VM's disk is bimodal)")
    parser.add_argument("--duty", type=float, default=None,
                        help="helper_duty of the store (default: the store's default)")
    parser.add_argument("--partner", action="store_true",
                        help="stage each rank's state in the next rank's memory (the runtime's "
                             "default with several ranks); the exposed time is then that copy")
    parser.add_argument("--settle", type=float, default=0.3,
                        help="seconds of idle before each timed write (lets the device drain)")
    parser.add_argument("--out", default="results/checkpoint", help="directory for JSON and PNG")
    parser.add_argument("--run-dir", default=None,
                        help="where checkpoints go (default: a temporary dir under --out, removed)")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    out = Path(args.out)
    run_dir = None
    if comm.Get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        run_dir = args.run_dir or tempfile.mkdtemp(prefix="bench-run-", dir=out)
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    run_dir = Path(comm.bcast(run_dir, root=0))
    load_before = os.getloadavg()
    try:
        mine = bench(comm, args, run_dir)
    finally:
        comm.Barrier()
        if comm.Get_rank() == 0 and args.run_dir is None:
            shutil.rmtree(run_dir, ignore_errors=True)
    per_rank = comm.gather(mine, root=0)
    if comm.Get_rank() != 0:
        return 0
    s = summarize(per_rank, args)
    duty = ("" if args.duty is None else f" --duty {args.duty}") + (" --partner" if args.partner else "")
    data = {"command": f"mpirun -n {comm.Get_size()} python -m mpi4py scripts/bench_checkpoint.py "
                       f"--mb {args.mb} --repeats {args.repeats} --bw-repeats {args.bw_repeats} "
                       f"--settle {args.settle}{duty}",
            "targets": TARGETS, "summary": s, "per_rank": per_rank,
            "machine": {"node": platform.node(), "cpus": os.cpu_count(),
                        "python": platform.python_version(), "numpy": np.__version__,
                        # other jobs on the machine distort every figure: check these
                        "loadavg_before": load_before, "loadavg_after": os.getloadavg()}}
    (out / "bench_checkpoint.json").write_text(json.dumps(data, indent=2))
    plot(s, per_rank, out / "bench_checkpoint.png")
    for key in ("copyto_s", "async_save_call_s", "async_exposed_s", "sync_exposed_s",
                "exposed_vs_copyto", "sync_vs_async_exposed", "plain_bandwidth_MBps",
                "helper_bandwidth_MBps", "bandwidth_vs_plain", "bandwidth_vs_plain_best",
                "bandwidth_vs_streamed",
                "helper_write_under_compute_s", "jacobi_base_step_s",
                "jacobi_during_write_step_s", "jacobi_slowdown"):
        print(f"{key:32s} {s[key]:.4g}")
    print("pass:", s["pass"], " load average before/after:",
          data["machine"]["loadavg_before"][0], data["machine"]["loadavg_after"][0])
    print(f"wrote {out / 'bench_checkpoint.json'} and {out / 'bench_checkpoint.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
