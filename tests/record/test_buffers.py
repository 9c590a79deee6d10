"""align.record.buffers: host memory handed from one recorded step to the next."""

from __future__ import annotations

import torch

from align.record.buffers import HostBuffers


def test_a_copy_is_private_and_keeps_the_layout():
    buffers = HostBuffers()
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    copy = buffers.copy(x)
    assert torch.equal(copy, x) and copy.data_ptr() != x.data_ptr()
    assert copy.is_contiguous(memory_format=torch.channels_last) and not copy.is_contiguous()
    assert buffers.copy(x, torch.contiguous_format).is_contiguous()
    x.add_(1)  # the source changes (an in-place op of the next layer): the copy does not
    assert not torch.equal(copy, x)


def test_written_buffers_are_reused_once_and_the_untaken_freed_a_step_later():
    buffers = HostBuffers()
    step = [buffers.copy(torch.randn(8, 4)), buffers.copy(torch.randn(3))]
    pointers = {t.data_ptr() for t in step}
    buffers.give(step)  # written (a shard, during the step)
    buffers.next_step()
    assert buffers.copy(torch.randn(8, 4)).data_ptr() in pointers
    # a buffer already taken, or a shape never given: a new allocation
    assert buffers.copy(torch.randn(8, 4)).data_ptr() not in pointers
    assert buffers.copy(torch.randn(5)).data_ptr() not in pointers
    buffers.next_step()  # the (3,) buffer, which the last step did not take, is freed
    assert buffers.copy(torch.randn(3)).data_ptr() not in pointers
    mine = buffers.copy(torch.randn(6))
    buffers.give([mine])  # given back within a step: the same step takes it again
    assert buffers.copy(torch.randn(6)).data_ptr() == mine.data_ptr()


def test_views_and_device_tensors_are_never_handed_out_again():
    buffers = HostBuffers()
    base = torch.randn(4, 4)
    buffers.give([base[0], base.t()])  # views share a storage someone else holds
    assert buffers.copy(torch.randn(4)).data_ptr() != base.data_ptr()
    buffers.give([base, base])  # given twice: handed out once
    first, second = buffers.copy(torch.randn(4, 4)), buffers.copy(torch.randn(4, 4))
    assert first.data_ptr() == base.data_ptr() != second.data_ptr()
    buffers.give([second])
    buffers.clear()
    assert buffers.copy(torch.randn(4, 4)).data_ptr() != second.data_ptr()
