"""vinf_engine.launch: RankPool keeps its ranks between calls, and each call starts from what a
freshly spawned rank would hold; a failing call reports every failing rank and closes the pool.
run_local, the one-shot form, is what the pool is checked against."""
import os

import pytest
import torch

from vinf_engine.launch import RankPool, run_local


def state_rank(rank, world, set_env):
    """What this rank holds on entry (then spoils it for the next call)."""
    import torch.distributed as dist
    seen = (os.getpid(), os.environ.get("VINF_POOL_PROBE"), torch.randn(2),
            torch.get_default_dtype(), torch.is_grad_enabled(), torch.get_num_threads())
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)
    os.environ["VINF_POOL_PROBE"] = set_env
    torch.set_default_dtype(torch.float64)
    torch.set_grad_enabled(False)
    torch.set_num_threads(2)
    return seen + (float(total),)


def failing_rank(rank, world):
    if rank == 1:
        raise ValueError("rank one refuses")
    return rank


def test_a_pool_runs_calls_as_fresh_ranks_would(monkeypatch):
    monkeypatch.setenv("VINF_POOL_PROBE", "parent")
    fresh = run_local(state_rank, 2, "spoiled", threads=1)
    with RankPool(2, threads=1) as pool:
        first = pool.run(state_rank, "spoiled")
        monkeypatch.setenv("VINF_POOL_PROBE", "parent, later")
        second = pool.run(state_rank, "spoiled")
    assert pool.closed
    for r in range(2):
        assert first[r][0] == second[r][0] != os.getpid()             # the same live ranks
        assert first[r][-1] == second[r][-1] == 3.0                    # their group still joined
        assert second[r][1] == "parent, later"                         # the caller's env now
        assert torch.equal(first[r][2], second[r][2])                  # seeded alike each call
        for got in (first[r], second[r]):                              # a fresh rank's state
            assert got[3:6] == fresh[r][3:6] == (torch.float32, True, 1)


def test_a_failing_call_names_the_rank_and_closes_the_pool():
    pool = RankPool(2, threads=1)
    with pytest.raises(RuntimeError, match="rank 1 failed: ValueError: rank one refuses"):
        pool.run(failing_rank)
    assert pool.closed
    with pytest.raises(RuntimeError, match="closed"):
        pool.run(failing_rank)
