"""Frame exchange across real gloo ranks: any rank can ask for any frames, including past
its neighbours, in one batch per call."""
import pytest
import torch

import vinf_engine as vinf
from vinf_engine.layout import attention_plan
from helpers import run_ranks
from workers import batch_rank, gather_rank


@pytest.mark.parametrize("sizes,staged", [((4, 3), False), ((1, 4, 2), False),
                                          ((2, 1, 3, 1), False), ((1, 4, 2), True)])
def test_gather_frames_returns_exactly_the_wanted_frames(sizes, staged):
    # staged: every transfer through host buffers, as GPU tensors go over gloo.
    results = run_ranks(gather_rank, len(sizes), sizes, staged)
    Ft = sum(sizes)
    video = torch.arange(Ft, dtype=torch.float32)[None, :, None].expand(2, Ft, 3) * 10 + torch.arange(3.0)
    sent = received = 0
    R = len(sizes)
    expect_sum = torch.tensor([[1e-300, 3.0], [2.0 ** 60, 1.0]], dtype=torch.float64) * (R * (R + 1) // 2)
    totals = []
    for got, wants, counters, (frames, total), after in results:
        torch.testing.assert_close(got, video[:, list(wants)], rtol=0, atol=0)
        sent += counters["bytes_sent"]
        received += counters["bytes_received"]
        assert counters["collectives"] <= 1
        # Frames and sums in one launch, both exact (these frame values are bf16-exact).
        torch.testing.assert_close(frames, video[:, list(wants)].to(torch.bfloat16), rtol=0, atol=0)
        assert total.dtype == torch.float64
        torch.testing.assert_close(total, expect_sum, rtol=1e-15, atol=0)
        assert after["collectives"] - counters["collectives"] == 1
        totals.append(total)
    assert sent == received
    assert all(torch.equal(t, totals[0]) for t in totals)      # bitwise the same everywhere


def test_attention_plan_reaches_past_a_neighbour():
    lay = vinf.ClipLayout.from_sizes([3, 1, 1, 4])
    plan = attention_plan(lay, 3, 4, 2)
    assert plan.window == 4
    left = [plan.wants[3][i] for i in plan.left]
    assert left == [1, 2, 3, 4]            # frames of ranks 0, 1 and 2
    assert [plan.wants[3][i] for i in plan.glob] == list(vinf.global_frames(9, 2))
    whole = attention_plan(vinf.ClipLayout(9, 1), 0, 100, 0)
    assert whole.window == 8 and whole.left == () and whole.right == ()


@pytest.mark.parametrize("staged", [False, True])
def test_post_batch_moves_many_exchanges_in_one_launch(staged):
    sizes = (3, 1, 4)
    Ft = sum(sizes)
    video = torch.arange(Ft, dtype=torch.float32)[None, :, None].expand(2, Ft, 3) * 10 + torch.arange(3.0)
    for rank, (fa, sa, fb, sb, fc, sc, fr_a, fr_b, counters) in enumerate(
            run_ranks(batch_rank, 3, sizes, staged)):
        torch.testing.assert_close(fa, video[:, fr_a], rtol=0, atol=0)
        torch.testing.assert_close(fb, video[:, fr_b, :1].to(torch.bfloat16), rtol=0, atol=0)
        assert sb is None and fc is None
        for parts, scale in ((sa, 1.0), (sc, 10.0)):
            assert parts[rank] is None and len(parts) == 3
            for r in range(3):
                if r != rank:
                    torch.testing.assert_close(parts[r], torch.full((2, 3), scale * (r + 1),
                                                                    dtype=torch.float64))
        assert counters["collectives"] == 1 and counters["p2p_ops"] == 4     # a message per peer, each way


def test_device_backends_wait_on_the_stream_not_the_host():
    """On NCCL, Work.wait(timeout) blocks the host until the transfer ends; the data plane
    must call wait() bare there, and keep the bound on gloo, whose waits are host waits."""
    import datetime
    from vinf_engine.comm import Pending, data_plane_timeout
    t = datetime.timedelta(seconds=3)
    assert data_plane_timeout("gloo", t) == t
    assert data_plane_timeout("nccl", t) is None

    class Work:
        def __init__(self):
            self.args = None

        def wait(self, *args):
            self.args = args
            return True

    for timeout, expect in ((None, ()), (t, (t,))):
        w = Work()
        assert Pending([w], lambda: 7, timeout, "x", 0).wait() == 7
        assert w.args == expect
