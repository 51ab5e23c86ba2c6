"""The Hugging Face round trip: overparameterize a model built from its config, train it with the
Trainer and fastrank's callback, reload the Trainer's checkpoint into the plain architecture with
``fastrank.load_overparameterized``, collapse, ``save_pretrained``, and load the result in a fresh
process with plain transformers (no fastrank): the logits stay those of the trained model."""

import contextlib
import subprocess
import sys
import textwrap

import pytest
import torch

import fastrank

transformers = pytest.importorskip("transformers")

_LENGTH = 8


def _gpt2():
    config = transformers.GPT2Config(vocab_size=61, n_positions=_LENGTH, n_embd=16, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def _llama():
    config = transformers.LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=_LENGTH,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(config)


def _logits(model, tokens):
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits


_FRESH_PROCESS = textwrap.dedent("""
    import sys, torch, transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
    assert "fastrank" not in sys.modules
    with torch.no_grad():
        torch.save(model(input_ids=torch.load(sys.argv[2])).logits, sys.argv[3])
""")


def _measured(history):
    """RankTracker history rows as the callback logs them: numbers only, the step a float."""
    return sorted(({"step": float(row["step"]), "name": row["name"],
                    **{key: value for key, value in row.items() if key not in ("step", "name")
                       and isinstance(value, (int, float)) and not isinstance(value, bool)}}
                   for row in history), key=lambda row: (row["step"], row["name"]))


@pytest.mark.parametrize("build,kept", [(_gpt2, "lm_head"), (_llama, None)], ids=["gpt2", "llama"])
def test_trainer_checkpoint_reloads_collapses_and_loads_into_plain_transformers(tmp_path, build, kept):
    from fastrank.integrations.transformers import RankCallback
    from fastrank.plot import load_history

    torch.manual_seed(0)
    # GPT-2's head is tied to the embedding: kept plain, and named in the warning
    with pytest.warns(UserWarning, match=kept) if kept else contextlib.nullcontext():
        model = fastrank.overparameterize(build(), depth=2)
    gen = torch.Generator().manual_seed(1)
    train = [{"input_ids": t, "labels": t} for t in torch.randint(3, 61, (8, _LENGTH), generator=gen)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
        save_strategy="steps", save_steps=2, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train)
    callback = RankCallback(every=1, background=False).attach(trainer)
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    # what fastrank plot reads of the checkpoint's trainer_state.json: the tracker's own history
    assert len(callback.tracker.history) > 0
    assert load_history(checkpoint / "trainer_state.json") == _measured(callback.tracker.history)
    tokens = torch.randint(3, 61, (3, _LENGTH), generator=gen)
    trained = _logits(model, tokens)

    torch.manual_seed(2)  # a fresh, differently initialized plain model
    reloaded = fastrank.load_overparameterized(build(), checkpoint)
    assert isinstance(reloaded.get_submodule("lm_head" if build is _llama else "transformer.h.0.attn.c_attn"),
                      fastrank.OverparamLinear)
    torch.testing.assert_close(_logits(reloaded, tokens), trained, rtol=0, atol=0)

    fastrank.collapse(reloaded)
    collapsed = _logits(reloaded, tokens)
    torch.testing.assert_close(collapsed, trained, rtol=1e-5, atol=1e-5)  # fp32 rounding of the product
    reloaded.save_pretrained(tmp_path / "plain")
    torch.save(tokens, tmp_path / "tokens.pt")
    # cwd away from the checkout, whose kernels/ folder would shadow PyPI's kernels package
    subprocess.run([sys.executable, "-c", _FRESH_PROCESS, str(tmp_path / "plain"), str(tmp_path / "tokens.pt"),
                    str(tmp_path / "logits.pt")], check=True, cwd=tmp_path, timeout=120)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), collapsed, rtol=1e-6, atol=1e-6)

