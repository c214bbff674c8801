"""comm.all_reduce on 2 GPUs: the symmetric-memory one-shot path equals NCCL, eagerly and inside a CUDA graph.

Also a micro-benchmark (NCCL vs one-shot vs two-shot vs comm.all_reduce as shipped, us per all-reduce, eager
and 64 chained in one CUDA graph):
    PYTHONPATH=worker_image python3 tests/engine/test_gpu_comm.py --bench out.json [--commit SHA]
"""
import argparse
import datetime
import json
import os
import socket
import subprocess

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rayprism.engine import comm

KiB, MiB = 1 << 10, 1 << 20
HIDDEN = 4096  # Llama-8B's hidden size: 8 KiB is one bf16 row (batch-1 decode)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, fn, *args) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def _spawn(fn, *args) -> None:
    mp.spawn(_worker, args=(free_port(), fn, *args), nprocs=2, join=True)


def _rows(nbytes: int, dtype: torch.dtype, device, generator) -> torch.Tensor:
    return torch.randn(nbytes // dtype.itemsize // HIDDEN, HIDDEN, device=device, generator=generator).to(dtype)


def _nccl(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    dist.all_reduce(x)
    return x


def _check(rank: int) -> None:
    device = torch.device("cuda", rank)
    assert comm.setup_tensor_parallel_comm(device), "symmetric memory did not come up on 2 GPUs (see the log)"
    assert comm.setup_tensor_parallel_comm(device)  # a second ModelRunner in the process: no new rendezvous
    gen = torch.Generator(device).manual_seed(rank)
    one_shot, limit = comm.ONE_SHOT_MAX_BYTES, comm.DEFAULT_MAX_BYTES
    cases = [(n, torch.bfloat16) for n in (8 * KiB, 64 * KiB, one_shot, 2 * one_shot, limit, 2 * limit)]
    cases += [(64 * KiB, torch.float32), (2 * one_shot, torch.float32)]
    for nbytes, dtype in cases:
        x = _rows(nbytes, dtype, device, gen)
        assert comm.path_for(x) == ("one_shot" if nbytes <= one_shot else "two_shot" if nbytes <= limit else "nccl")
        torch.testing.assert_close(comm.all_reduce(x.clone()), _nccl(x))

        # Captured: two chained all-reduces (the second reads the first's output), replayed on new inputs.
        static = torch.zeros_like(x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            first = comm.all_reduce(static * 1)  # a fresh tensor: the NCCL path reduces in place
            second = comm.all_reduce(first * 0.5)
        for _ in range(3):
            static.copy_(_rows(nbytes, dtype, device, gen))
            graph.replay()
            expected = _nccl(static)
            torch.testing.assert_close(first, expected)
            torch.testing.assert_close(second, _nccl(expected * 0.5))
    # Sizes that are not a multiple of 4 bytes take NCCL.
    odd = torch.randn(3, device=device, generator=gen).to(torch.bfloat16)
    assert comm.path_for(odd) == "nccl"
    torch.testing.assert_close(comm.all_reduce(odd.clone()), _nccl(odd))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_symmetric_memory_all_reduce_matches_nccl():
    _spawn(_check)


def _check_fused_norm(rank: int) -> None:
    """all_reduce_rms_norm = NCCL all-reduce, then the residual add and RMSNorm; the same bits on both ranks;
    chained calls (the halves take turns) eagerly and in CUDA graphs of different row counts, interleaved; ranks
    out of step across the counters' int32 wrap."""
    from rayprism.engine import fused_ops

    device = torch.device("cuda", rank)
    assert comm.setup_tensor_parallel_comm(device)
    mine, shared = torch.Generator(device).manual_seed(rank), torch.Generator(device).manual_seed(99)

    def reference(x, residual, weight):
        return fused_ops.rms_norm(_nccl(x), weight, 1e-5, residual)

    def same_on_all_ranks(t):
        parts = [torch.empty_like(t) for _ in range(2)]
        dist.all_gather(parts, t)
        assert torch.equal(parts[0], parts[1])

    for dtype in (torch.bfloat16, torch.float32):
        weight = torch.randn(HIDDEN, device=device, generator=shared).to(dtype)
        for rows in (1, 3, 32, 33, 128, 129):  # 129: over FUSED_MAX_ROWS, the unfused path
            residual = torch.randn(rows, HIDDEN, device=device, generator=shared).to(dtype)
            for _ in range(3):  # consecutive calls use alternate halves
                x = torch.randn(rows, HIDDEN, device=device, generator=mine).to(dtype)
                normed, summed = comm.all_reduce_rms_norm(x, residual, weight, 1e-5)
                expected_normed, expected_summed = reference(x, residual, weight)
                torch.testing.assert_close(summed, expected_summed, rtol=0, atol=0)
                torch.testing.assert_close(normed, expected_normed)
                same_on_all_ranks(normed)
                residual = summed

    # Graphs of 1 and 33 rows, each chaining 3 fused calls (an odd count: the halves' turns run across graphs).
    graphs = {}
    weight = torch.randn(HIDDEN, device=device, generator=shared).to(torch.bfloat16)
    for rows in (1, 33):
        static_x = torch.zeros(3, rows, HIDDEN, device=device, dtype=torch.bfloat16)
        static_residual = torch.zeros(rows, HIDDEN, device=device, dtype=torch.bfloat16)
        comm.all_reduce_rms_norm(static_x[0], static_residual, weight, 1e-5)  # warm-up (compiles) before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            residual, outs = static_residual, []
            for i in range(3):
                normed, residual = comm.all_reduce_rms_norm(static_x[i], residual, weight, 1e-5)
                outs.append(normed)
        graphs[rows] = (graph, static_x, static_residual, outs)
    for rows in (1, 33, 33, 1, 1, 33):
        graph, static_x, static_residual, outs = graphs[rows]
        static_x.copy_(torch.randn(static_x.shape, device=device, generator=mine).to(torch.bfloat16))
        static_residual.copy_(torch.randn(static_residual.shape, device=device, generator=shared).to(torch.bfloat16))
        graph.replay()
        residual = static_residual
        for i in range(3):
            expected, residual = reference(static_x[i], residual, weight)
            torch.testing.assert_close(outs[i], expected)
            same_on_all_ranks(outs[i])

    # Ranks out of step, across the int32 wrap of the call counters (the flags' epochs): a graph of 64 chained
    # calls where one rank or the other sleeps before each call, so the other arrives first and must wait, and a
    # rank a call ahead writes the buffer half its peer is not reading.
    comm._fused.calls.fill_(2**31 - 5)  # every earlier call has finished on both ranks (the all_gather above)
    chain = 64
    static_x = torch.zeros(chain, 1, HIDDEN, device=device, dtype=torch.bfloat16)
    static_residual = torch.zeros(1, HIDDEN, device=device, dtype=torch.bfloat16)
    comm.all_reduce_rms_norm(static_x[0], static_residual, weight, 1e-5)  # warm-up, on both ranks
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        residual, outs = static_residual, []
        for i in range(chain):
            if i % 2 == rank:
                torch.cuda._sleep(20_000)  # ~10 us at H100/H200 clocks
            normed, residual = comm.all_reduce_rms_norm(static_x[i], residual, weight, 1e-5)
            outs.append(normed)
    for _ in range(2):
        static_x.copy_(torch.randn(static_x.shape, device=device, generator=mine).to(torch.bfloat16))
        static_residual.copy_(torch.randn(static_residual.shape, device=device, generator=shared).to(torch.bfloat16))
        graph.replay()
        residual = static_residual
        for i in range(chain):
            expected, residual = reference(static_x[i], residual, weight)
            torch.testing.assert_close(outs[i], expected)
            same_on_all_ranks(outs[i])
    assert (comm._fused.calls < 0).all(), "the counters went past the int32 wrap"

    # Batch 1: the row-parallel GEMV sends its own outputs as the call's lines (comm.row_parallel_linear), eagerly
    # and in a graph of chained layers; the partial sums are the plain GEMV's bits, so the reference is exact.
    from rayprism.engine import gemv

    w_row = (torch.randn(HIDDEN, 1024, device=device, generator=mine) * 0.05).to(torch.bfloat16)
    static_in = torch.zeros(4, 1, 1024, device=device, dtype=torch.bfloat16)
    static_residual = torch.zeros(1, HIDDEN, device=device, dtype=torch.bfloat16)

    def layers(residual):
        outs = []
        for i in range(len(static_in)):
            normed, residual = comm.all_reduce_rms_norm(comm.row_parallel_linear(static_in[i], w_row, None),
                                                        residual, weight, 1e-5)
            outs.append(normed)
        assert comm._fused.sent is None
        return outs

    def check(outs):
        residual = static_residual
        for i, got in enumerate(outs):
            expected, residual = reference(gemv.gemv(static_in[i], w_row), residual, weight)
            torch.testing.assert_close(got, expected)
            same_on_all_ranks(got)

    static_in.copy_(torch.randn(static_in.shape, device=device, generator=mine).to(torch.bfloat16))
    static_residual.copy_(torch.randn(static_residual.shape, device=device, generator=shared).to(torch.bfloat16))
    check(layers(static_residual))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = layers(static_residual)
    for _ in range(2):
        static_in.copy_(torch.randn(static_in.shape, device=device, generator=mine).to(torch.bfloat16))
        static_residual.copy_(torch.randn(static_residual.shape, device=device, generator=shared).to(torch.bfloat16))
        graph.replay()
        check(outs)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_fused_all_reduce_rms_norm_matches_unfused():
    _spawn(_check_fused_norm)


# --- micro-benchmark -------------------------------------------------------------------------------------
BENCH_SIZES = [8 * KiB, 16 * KiB, 32 * KiB, 64 * KiB, 128 * KiB, 256 * KiB, 512 * KiB, MiB, 2 * MiB, 4 * MiB,
               8 * MiB, 16 * MiB]
EAGER_ITERS, GRAPH_OPS, GRAPH_REPLAYS = 100, 64, 20


def _bench(rank: int, out_file: str, commit: str) -> None:
    device = torch.device("cuda", rank)
    assert comm.setup_tensor_parallel_comm(device)  # as shipped: the "comm" column
    import torch.distributed._symmetric_memory as symm_mem

    group = dist.group.WORLD.group_name  # the raw kernels get a buffer for every size
    buffer = symm_mem.empty(max(BENCH_SIZES), dtype=torch.uint8, device=device)
    symm_mem.rendezvous(buffer, group)

    def nccl(x):
        dist.all_reduce(x)
        return x

    def one_shot(x):
        symm = buffer[: x.nbytes].view(x.dtype).view(x.shape)
        return torch.ops.symm_mem.one_shot_all_reduce_copy_out(symm, x, "sum", group, torch.empty_like(x))

    def two_shot(x):
        symm = buffer[: x.nbytes].view(x.dtype).view(x.shape)
        symm.copy_(x)
        return torch.ops.symm_mem.two_shot_all_reduce_out(symm, "sum", group, torch.empty_like(x))

    def timed(run, iters) -> float:
        torch.cuda.synchronize()
        dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1000 / iters  # us

    rows = []
    for nbytes in BENCH_SIZES:
        x = torch.randn(nbytes // 2, device=device).to(torch.bfloat16).view(-1, HIDDEN) * 1e-20
        row = {"bytes": nbytes, "comm_path": comm.path_for(x)}
        for name, op in (("nccl", nccl), ("one_shot", one_shot), ("two_shot", two_shot), ("comm", comm.all_reduce)):
            for _ in range(10):
                op(x.clone())
            row[f"{name}_eager_us"] = round(timed(lambda: op(x), EAGER_ITERS), 2)
            static = x.clone()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                y = static
                for _ in range(GRAPH_OPS):
                    y = op(y)
            graph.replay()
            row[f"{name}_graph_us"] = round(timed(graph.replay, GRAPH_REPLAYS) / GRAPH_OPS, 2)
            del graph
        rows.append(row)
        if rank == 0:
            print(row, flush=True)
    if rank == 0:
        try:
            topology = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True).stdout
        except OSError as exc:
            topology = repr(exc)
        record = {
            "what": "all-reduce latency, 2 ranks, bf16, us per op: eager = mean of back-to-back launches; "
                    f"graph = one CUDA graph of {GRAPH_OPS} chained all-reduces, replay time / {GRAPH_OPS}",
            "machine": f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}",
            "topology": topology,
            "torch": torch.__version__,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())),
            "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "comm": {"max_bytes": comm.DEFAULT_MAX_BYTES, "one_shot_max_bytes": comm.ONE_SHOT_MAX_BYTES},
            "env": {k: os.environ.get(k) for k in
                    ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")},
            "rows": rows,
        }
        with open(out_file, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--bench", required=True, help="JSON file for the results")
    parser.add_argument("--commit", default="unknown")
    args = parser.parse_args()
    _spawn(_bench, args.bench, args.commit)
