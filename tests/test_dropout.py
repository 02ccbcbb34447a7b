"""FastDropout (models/dropout.py): the same dropout as nn.Dropout, drawn in fewer random numbers."""

from __future__ import annotations

import torch
from torch import nn

from tests.tiny import make_model, make_tokenizer
from tunesmith.models.adapters import attach_lora
from tunesmith.models.dropout import FastDropout, drop_mask


def test_drop_rate_is_p_in_every_slice_of_a_draw():
    torch.manual_seed(0)
    for p in (0.05, 0.3):
        mask = drop_mask((2000, 1000), p)
        assert abs(mask.float().mean().item() - p) < 0.002
        # each 64-bit draw decides four elements; the fourth slice has one bit fewer: all must be fair
        for slot in range(4):
            assert abs(mask.view(-1)[slot::4].float().mean().item() - p) < 0.003, (p, slot)
    # neighbours are independent: P(both dropped) = p^2
    mask = drop_mask((1_000_000,), 0.3)
    both = (mask[:-1] & mask[1:]).float().mean().item()
    assert abs(both - 0.09) < 0.003


def test_forward_backward_match_dropout_semantics():
    torch.manual_seed(1)
    drop = FastDropout(0.25).train()
    x = torch.randn(64, 48, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / 0.75)
    assert 0.2 < 1 - kept.float().mean().item() < 0.3
    y.sum().backward()
    assert torch.allclose(x.grad, kept.float() / 0.75)
    # reproducible under the torch seed, different from draw to draw
    torch.manual_seed(5)
    a = drop(x)
    b = drop(x)
    torch.manual_seed(5)
    assert torch.equal(drop(x), a) and not torch.equal(a, b)
    # eval: identity
    assert torch.equal(drop.eval()(x), x)


def test_autocast_masks_in_the_autocast_dtype():
    drop = FastDropout(0.1).train()
    x = torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = drop(x)
    assert y.dtype == torch.bfloat16
    kept = y != 0
    assert torch.allclose(y[kept].float(), (x.bfloat16().float() / 0.9)[kept], rtol=1e-2)
    assert drop(x).dtype == torch.float32  # no autocast: unchanged dtype


def test_attach_lora_uses_fast_dropout_and_trains():
    tok = make_tokenizer("chatml")
    torch.manual_seed(0)
    model = attach_lora(make_model(tok), r=4, alpha=8, dropout=0.05, target_modules="all-linear",
                        rslora=False, dora=False)
    drops = [d for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict)
             for d in m.lora_dropout.values()]
    assert drops and all(type(d) is FastDropout and d.p == 0.05 for d in drops)
    assert model.peft_config["default"].lora_dropout == 0.05
    ids = torch.randint(0, len(tok), (2, 12))
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n)
    # no dropout: PEFT's Identity stays
    plain = attach_lora(make_model(tok), r=4, alpha=8, dropout=0.0, target_modules="all-linear",
                        rslora=False, dora=False)
    assert not any(isinstance(m, FastDropout) for m in plain.modules())
