"""Tests of the Hugging Face classes: config, cache, generate() against the full forward pass, save/load, Trainer."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from mesa_module import MesaLM, MesaLMConfig  # noqa: E402
from mesa_module.hf import MesaCache, MesaConfig, MesaForCausalLM  # noqa: E402

VOCAB = 40
STACKS = {
    "mesa": ["mesa"] * 3,
    "softmax": ["softmax"] * 3,
    "hybrid": ["mesa", "softmax", "mesa"],
}


def make_model(stack="hybrid", seed=0, dtype=torch.float64, **overrides):
    torch.manual_seed(seed)
    config = MesaConfig(vocab_size=VOCAB, d_model=16, n_layers=3, n_heads=2, attention=STACKS[stack], **overrides)
    return MesaForCausalLM(config).to(dtype).eval()


def tokens(*shape, seed=1):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def assert_close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_config_has_every_mesa_lm_field_and_converts_both_ways():
    names = {field.name for field in dataclasses.fields(MesaConfig)}
    for field in dataclasses.fields(MesaLMConfig):
        if field.name != "gradient_checkpointing":
            assert {"tie_embeddings": "tie_word_embeddings"}.get(field.name, field.name) in names, field.name
    native = MesaLMConfig(vocab_size=50, d_model=24, n_layers=2, n_heads=3, attention=("mesa", "softmax"))
    native.tie_embeddings = False
    config = MesaConfig.from_mesa_lm_config(native, eos_token_id=3)
    assert config.attention == ["mesa", "softmax"] and config.head_dim == 8 and not config.tie_word_embeddings
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (24, 2, 3)
    assert config.eos_token_id == 3
    assert config.to_mesa_lm_config() == native


def test_config_rejects_what_mesa_lm_rejects():
    with pytest.raises(ValueError, match="attention"):
        MesaConfig(n_layers=2, attention=["mesa"])
    with pytest.raises(ValueError, match="divisible"):
        MesaConfig(d_model=10, n_heads=3)


@pytest.mark.parametrize("stack", STACKS)
def test_greedy_generate_equals_the_full_forward_pass(stack):
    model = make_model(stack)
    prompt = tokens(2, 5)
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert out.sequences.shape == (2, 11) and torch.equal(out.sequences[:, :5], prompt)
    full = model(out.sequences[:, :-1]).logits  # no cache: one pass over prompt and generated tokens
    step_logits = torch.stack(out.logits, dim=1).double()
    assert_close(step_logits, full[:, 4:], tol=1e-6)  # generate hands out float32 logits
    assert torch.equal(full[:, 4:].argmax(-1), out.sequences[:, 5:])
    assert torch.equal(out.sequences, model.model.generate(prompt, 6, temperature=0))
    assert isinstance(out.cache, MesaCache) and out.cache.get_seq_length() == 10


def test_sampling_generate_follows_the_full_forward_distribution():
    model = make_model("hybrid")
    prompt = tokens(3, 4)
    torch.manual_seed(7)
    out = model.generate(
        prompt,
        max_new_tokens=8,
        do_sample=True,
        temperature=1.3,
        top_k=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    full = model(out.sequences[:, :-1]).logits
    assert_close(torch.stack(out.logits, dim=1).double(), full[:, 3:], tol=1e-6)
    torch.manual_seed(7)
    again = model.generate(prompt, max_new_tokens=8, do_sample=True, temperature=1.3, top_k=0)
    assert torch.equal(again, out.sequences)
    # The samples are not the greedy continuation, and top_k=1 sampling is.
    greedy = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert not torch.equal(out.sequences, greedy)
    assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=True, top_k=1), greedy)


def test_beam_search_scores_equal_the_full_forward_log_probabilities():
    model = make_model("hybrid")
    prompt = tokens(2, 4)
    out = model.generate(
        prompt,
        max_new_tokens=5,
        num_beams=3,
        num_return_sequences=3,
        do_sample=False,
        length_penalty=0.0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    log_probs = F.log_softmax(model(out.sequences[:, :-1]).logits[:, 3:], dim=-1)
    chosen = log_probs.gather(-1, out.sequences[:, 4:, None])[..., 0].sum(1)
    torch.testing.assert_close(out.sequences_scores.double(), chosen, rtol=1e-5, atol=1e-5)
    assert out.sequences.shape == (6, 9) and torch.equal(out.sequences[::3, :4], prompt)


@pytest.mark.parametrize("stack", STACKS)
def test_left_padded_batch_generates_what_each_prompt_generates_alone(stack):
    model = make_model(stack)
    a, b = tokens(1, 6, seed=3), tokens(1, 3, seed=4)
    input_ids = torch.zeros(2, 6, dtype=torch.long)
    attention_mask = torch.zeros(2, 6, dtype=torch.long)
    input_ids[0], attention_mask[0] = a[0], 1
    input_ids[1, 3:], attention_mask[1, 3:] = b[0], 1
    out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(out[0, 6:], model.generate(a, max_new_tokens=5, do_sample=False)[0, 6:])
    assert torch.equal(out[1, 6:], model.generate(b, max_new_tokens=5, do_sample=False)[0, 3:])


def test_generate_without_a_cache_gives_the_same_tokens():
    model = make_model("hybrid")
    prompt = tokens(2, 5)
    cached = model.generate(prompt, max_new_tokens=5, do_sample=False)
    assert torch.equal(model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=False), cached)


@pytest.mark.parametrize("stack", STACKS)
def test_cache_carries_a_sequence_across_calls(stack):
    model = make_model(stack)
    idx = tokens(2, 9)
    full = model(idx).logits
    first = model(idx[:, :4], use_cache=True)
    assert isinstance(first.cache, MesaCache) and first.cache.get_seq_length() == 4
    second = model(idx[:, 4:], cache=first.cache, attention_mask=torch.ones(2, 9))
    assert_close(torch.cat([first.logits, second.logits], dim=1), full)
    assert second.cache is first.cache and first.cache.get_seq_length() == 9
    assert first.cache.is_linear == [kind == "mesa" for kind in STACKS[stack]]
    with pytest.raises(ValueError, match="cropped"):
        first.cache.crop(-1)


def test_save_and_load_round_trip_through_auto_classes(tmp_path):
    model = make_model("hybrid", dtype=torch.float32, eos_token_id=2)
    with torch.no_grad():
        model.model.blocks[0].attn.lambda_theta.add_(0.3)  # a value no initialisation would give
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "mesa_lm" and saved["attention"] == ["mesa", "softmax", "mesa"]
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, MesaConfig) and config.eos_token_id == 2
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, MesaForCausalLM)
    assert loaded.model.lm_head.weight is loaded.model.wte.weight
    assert loaded.model.blocks[0].attn.lambda_theta._no_weight_decay  # optimisers still leave it out of decay
    for (name, p), (_, q) in zip(model.named_parameters(), loaded.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    idx = tokens(2, 7)
    assert torch.equal(loaded(idx).logits, model(idx).logits)


def test_from_mesa_lm_copies_a_native_model():
    torch.manual_seed(0)
    native = MesaLM(MesaLMConfig(vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=2, attention=("softmax", "mesa")))
    native = native.double()
    model = MesaForCausalLM.from_mesa_lm(native, eos_token_id=1)
    assert model.config.eos_token_id == 1 and model.dtype == torch.float64
    idx = tokens(2, 6)
    assert torch.equal(model(idx).logits, native(idx)[0])


def test_loss_is_the_shifted_next_token_loss():
    model = make_model("hybrid")
    idx = tokens(2, 8)
    labels = idx.clone()
    labels[0, 5] = -100
    loss = model(idx, labels=labels).loss
    targets = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)
    assert_close(loss, model.model(idx, targets)[1])


def test_packed_position_ids_equal_separate_documents():
    model = make_model("hybrid")
    docs = [tokens(1, 5, seed=10), tokens(1, 1, seed=11), tokens(1, 7, seed=12)]
    packed = torch.cat(docs, dim=1)
    position_ids = torch.cat([torch.arange(d.shape[1]) for d in docs])[None]
    logits = model(packed, position_ids=position_ids).logits
    assert_close(logits, torch.cat([model(d).logits for d in docs], dim=1))
    offsets = torch.tensor([0, 5, 6, 13], dtype=torch.int32)
    assert_close(model(packed, cu_seq_lens_q=offsets, cu_seq_lens_k=offsets).logits, logits)
    with pytest.raises(ValueError, match="use_cache=False"):
        model(packed, position_ids=position_ids, use_cache=True)


def test_activation_checkpointing_gives_the_same_gradients():
    model = make_model("hybrid").train()
    idx = tokens(2, 9)
    model(idx, labels=idx).loss.backward()
    plain = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable()
    assert model.model.gradient_checkpointing
    model(idx, labels=idx).loss.backward()
    for name, p in model.named_parameters():
        assert_close(p.grad, plain[name])


def test_forward_rejects_what_it_cannot_do():
    model = make_model("hybrid", dtype=torch.float32)
    idx = tokens(1, 4)
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(inputs_embeds=torch.randn(1, 4, 16))
    with pytest.raises(ValueError, match="hidden states"):
        model(idx, output_hidden_states=True)
    with pytest.raises(TypeError, match="MesaCache"):
        model(idx, cache=transformers.DynamicCache())
    with pytest.raises(ValueError, match="attention_mask"):
        model(idx, attention_mask=torch.ones(1, 6))
    with pytest.raises(ValueError, match="count up by one"):
        model(idx, position_ids=torch.tensor([[0, 2, 0, 1]]))


def _trainer(model, dataset, collator, tmp_path, **args):
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=len(dataset),
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **args,
    )
    return transformers.Trainer(model=model, args=arguments, train_dataset=dataset, data_collator=collator)


def test_one_trainer_step_reports_the_model_loss_and_updates_it(tmp_path):
    model = make_model("hybrid", dtype=torch.float32).train()
    rows = tokens(4, 10, seed=20)
    dataset = [{"input_ids": row, "labels": row} for row in rows]
    with torch.no_grad():
        expected = model(rows, labels=rows).loss.item()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = _trainer(model, dataset, transformers.default_data_collator, tmp_path)
    trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(expected, rel=1e-4)
    changed = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert len(changed) == len(before)


def test_packed_trainer_step_with_data_collator_with_flattening(tmp_path):
    model = make_model("hybrid", dtype=torch.float32).train()
    docs = [tokens(n, seed=30 + n).tolist() for n in (3, 8, 5)]
    dataset = [{"input_ids": doc} for doc in docs]
    with torch.no_grad():  # token-weighted mean of the per-document next-token losses
        total = sum(model(torch.tensor([doc]), labels=torch.tensor([doc])).loss * (len(doc) - 1) for doc in docs)
        expected = (total / sum(len(doc) - 1 for doc in docs)).item()
    collator = transformers.DataCollatorWithFlattening()
    batch = collator(dataset)
    with torch.no_grad():
        assert model(**batch).loss.item() == pytest.approx(expected, rel=1e-5)
    trainer = _trainer(model, dataset, collator, tmp_path, activation_checkpointing=True)
    trainer.train()
    assert model.model.gradient_checkpointing
    assert trainer.state.log_history[0]["loss"] == pytest.approx(expected, rel=1e-4)
