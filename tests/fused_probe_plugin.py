"""Test-only `--external_plugins` file: prints, once per rank and grad mode, what the fused LM-head computation sees
inside the head's forward (the weight's shape and class), so a test can tell that the fused path ran and that the
weight was whole there (under DeepSpeed ZeRO-3 and FSDP2 it is partitioned outside the head's forward)."""

import os

import torch

from cispo_swift import fused_head

_through_head = fused_head.through_head
_seen = set()


def _probing(trainer, model, model_inputs, logits_to_keep, compute):
    def probe(head, hidden):
        grad = torch.is_grad_enabled()
        if grad not in _seen:
            _seen.add(grad)
            shape = 'x'.join(str(d) for d in head.weight.shape)
            line = f'fused-probe rank {os.environ.get("RANK", "0")} grad {int(grad)} weight {shape} '
            line += f'{type(head.weight).__name__}\n'
            # One write(2) of a short line: atomic on a pipe, so the ranks' lines never interleave (print may
            # write the text and the newline separately).
            os.write(1, line.encode())
        return compute(head, hidden)

    return _through_head(trainer, model, model_inputs, logits_to_keep, probe)


fused_head.through_head = _probing
