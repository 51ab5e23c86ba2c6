"""Where users train: gradient checkpointing with a fused optimizer, and Hugging Face's Trainer with
its default optimizer (fused AdamW) and evaluation during training. The over-parameterized layers
must give the losses, gradients and evaluations of the same training without these stacks."""

import copy

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import fastrank


class _Blocks(nn.Module):
    """Two residual MLP blocks of over-parameterized layers, each optionally checkpointed."""

    def __init__(self, use_reentrant: bool | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(
            nn.Sequential(fastrank.OverparamLinear(12, 12, depth=3), nn.Tanh(), fastrank.OverparamLinear(12, 12, depth=2))
            for _ in range(2)
        )
        self.head = fastrank.OverparamLinear(12, 3, depth=2)
        self.use_reentrant = use_reentrant

    def forward(self, x):
        for block in self.blocks:
            if self.use_reentrant is None:
                x = x + block(x)
            else:
                x = x + checkpoint(block, x, use_reentrant=self.use_reentrant)
        return self.head(x)


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_gradient_checkpointing_with_fused_adamw_equals_the_unchecked_model(use_reentrant):
    plain = _Blocks(None).double()
    checked = _Blocks(use_reentrant).double()
    checked.load_state_dict(plain.state_dict())
    optimizers = [torch.optim.AdamW(m.parameters(), lr=0.05, fused=True) for m in (plain, checked)]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(9, 12, generator=gen, dtype=torch.float64, requires_grad=True)  # reentrant needs an input that requires grad
    y = torch.randn(9, 3, generator=gen, dtype=torch.float64)
    for step in range(5):
        losses = []
        for model, opt in zip((plain, checked), optimizers):
            opt.zero_grad()
            loss = (model(x) - y).square().mean()
            loss.backward()
            losses.append(loss.detach())
            grads = [p.grad.clone() for p in model.parameters()]
            opt.step()
            if model is plain:
                expected_grads = grads
        # fp64: the checkpointed forward may associate the chain differently (no grad: collapsed
        # or not), so the two differ by rounding; a stale weight moves the loss by the step.
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-12, atol=0, msg=lambda m: f"loss, step {step}: {m}")
        for j, (got, want) in enumerate(zip(grads, expected_grads)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13, msg=lambda m: f"grad {j}, step {step}: {m}")


# ---- Hugging Face Trainer --------------------------------------------------------------------

_STEPS, _EVAL_EVERY, _BATCH, _LENGTH = 6, 2, 4, 8


def _tiny_llama(transformers):
    config = transformers.LlamaConfig(
        vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=_LENGTH, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    fastrank.overparameterize(model, depth=2)  # every projection and the (untied) head
    return model


def _token_sets():
    gen = torch.Generator().manual_seed(3)
    train = torch.randint(3, 61, (_STEPS * _BATCH, _LENGTH), generator=gen)
    held_out = torch.randint(3, 61, (6, _LENGTH), generator=gen)
    return [{"input_ids": t, "labels": t} for t in train], [{"input_ids": t, "labels": t} for t in held_out]


def _trainer_run(transformers, tmp_path, optim: str | None):
    from fastrank.integrations.transformers import RankCallback

    class InOrder(transformers.Trainer):  # the hand-written loop below reads the batches in order
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    train, held_out = _token_sets()
    options = {} if optim is None else {"optim": optim}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / (optim or "default")), max_steps=_STEPS, per_device_train_batch_size=_BATCH,
        per_device_eval_batch_size=len(held_out), learning_rate=1e-2, eval_strategy="steps",
        eval_steps=_EVAL_EVERY, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
        disable_tqdm=True, seed=0, data_seed=0, **options,
    )
    model = _tiny_llama(transformers)
    trainer = InOrder(model=model, args=args, train_dataset=train, eval_dataset=held_out)
    callback = RankCallback(embeddings="model.layers.1", every=_EVAL_EVERY, background=False).attach(trainer)
    trainer.train()
    evals = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    return trainer, evals, callback.tracker.history


def _hand_run(transformers):
    """The Trainer's defaults written out: AdamW (lr 1e-2, no weight decay), linear decay to 0, gradient
    norm clipped to 1, evaluation in eval mode under no_grad every _EVAL_EVERY steps."""
    model = _tiny_llama(transformers)
    train, held_out = _token_sets()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, (_STEPS - step) / _STEPS))
    tracker = fastrank.RankTracker(model, embeddings="model.layers.1", every=_EVAL_EVERY, forwards="training")
    batch = lambda rows: torch.stack([r["input_ids"] for r in rows])  # noqa: E731
    evals = []
    model.train()
    for step in range(_STEPS):
        ids = batch(train[step * _BATCH : (step + 1) * _BATCH])
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad()
        tracker.step(record_as=step + 1)  # numbered as the Trainer's global_step
        if (step + 1) % _EVAL_EVERY == 0:
            model.eval()
            with torch.no_grad():
                ids = batch(held_out)
                evals.append(float(model(input_ids=ids, labels=ids).loss))
            model.train()
    return evals, tracker.history


def _weight_ranks(history):
    return {(row["step"], row["name"]): row["effective_rank"] for row in history if row["name"].endswith("weight")}


def test_trainer_with_its_default_fused_adamw_evaluates_and_ranks_the_trained_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    fused_trainer, fused_evals, fused_history = _trainer_run(transformers, tmp_path, None)
    assert fused_trainer.args.optim == "adamw_torch_fused"  # what a user gets without asking
    _, plain_evals, plain_history = _trainer_run(transformers, tmp_path, "adamw_torch")
    hand_evals, hand_history = _hand_run(transformers)
    assert len(fused_evals) == _STEPS // _EVAL_EVERY and len(set(fused_evals)) == len(fused_evals), fused_evals
    # fp32 rounding of the fused and foreach AdamW kernels, over a few steps; a stale weight in
    # evaluation is off by a few percent
    torch.testing.assert_close(torch.tensor(fused_evals), torch.tensor(plain_evals), rtol=2e-5, atol=0)
    torch.testing.assert_close(torch.tensor(fused_evals), torch.tensor(hand_evals), rtol=2e-5, atol=0)
    fused, plain, hand = (_weight_ranks(h) for h in (fused_history, plain_history, hand_history))
    assert fused.keys() == plain.keys() == hand.keys() and len(fused) >= 2 * 14
    assert {step for step, _ in fused} == set(range(1, _STEPS + 1, _EVAL_EVERY))  # global steps 1, 3, 5
    for key in fused:
        assert fused[key] == pytest.approx(plain[key], rel=1e-5), key
        assert fused[key] == pytest.approx(hand[key], rel=1e-5), key
    # the embedding of each measured step: the training batch's rows only, never the eval loop's
    for history in (fused_history, plain_history, hand_history):
        rows = [row for row in history if row["name"] == "model.layers.1"]
        assert [row["step"] for row in rows] == list(range(1, _STEPS + 1, _EVAL_EVERY))
        assert all(row["samples"] == _BATCH * _LENGTH for row in rows), [row["samples"] for row in rows]
    for got, want in zip(*([row for row in h if row["name"] == "model.layers.1"] for h in (fused_history, hand_history))):
        assert got["effective_rank"] == pytest.approx(want["effective_rank"], rel=1e-5)


# ---- CUDA: half-precision layers under CUDA's fused AdamW ------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_adamw_on_cuda_trains_and_evaluates_half_layers():
    # bf16 layers of depth 2 (cuBLAS under autograd: fastrank.chain._plain_half_on_cuda) and of
    # depth 3 (the kernels), trained by CUDA's fused AdamW (which bumps no version counter) with an
    # evaluation after every step: each step's gradients are the fp64 chain's at the same
    # parameters, and each evaluation, the second served from the collapse cache, is that of the
    # updated weights.
    from tolerance import assert_close

    dtype = torch.bfloat16
    torch.manual_seed(0)
    model = nn.Sequential(
        fastrank.OverparamLinear(48, 64, depth=2), nn.Tanh(), fastrank.OverparamLinear(64, 40, depth=3)
    ).to("cuda", dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    gen = torch.Generator(device="cuda").manual_seed(1)
    held_out = torch.randn(7, 48, device="cuda", generator=gen).to(dtype)
    for step in range(4):
        x = torch.randn(33, 48, device="cuda", generator=gen).to(dtype)
        model.train()
        opt.zero_grad(set_to_none=True)
        reference = copy.deepcopy(model).double()
        model(x).float().square().mean().backward()
        reference(x.double()).square().mean().backward()
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            assert_close(p.grad, q.grad, dtype, 64, steps=8, what=f"step {step}: grad {name}")
        opt.step()
        model.eval()
        with torch.no_grad():
            served = [model(held_out) for _ in range(2)]
            fresh = held_out
            for module in model:
                if isinstance(module, fastrank.OverparamLinear):
                    fresh = torch.nn.functional.linear(fresh, *module.collapsed_parameters())
                else:
                    fresh = module(fresh)
        for got in served:
            assert torch.equal(got, fresh), f"step {step}: evaluation off by {(got - fresh).abs().max():.3e}"
