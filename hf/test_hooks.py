"""
hf/hooks.py's claims as executable checks, on tiny random-init Hugging Face models built from configs (nothing
is downloaded): the HF sampler is our sampler (GPT-2 with model.py's weights gives smd.rollout's tokens, write
log and log-probs); on GPT-2, a Llama config (RoPE, GQA, RMSNorm) and a Qwen3 config (RoPE, one KV head,
q/k norms) the masked HF learner reproduces the HF sampler, the unmasked pass is the model's own forward bit
for bit, and a hidden token cannot reach a query; under GQA a KV head's policy statistic is its query heads'
mean. More families (Qwen2, Gemma, Phi-3, OLMo-2, GPT-NeoX, OPT, CodeGen, Mistral without its sliding window)
hold the masked learner to the sampler; those the hooks cannot reach (StableLM, Falcon, Bloom, a layer that
drops the kwargs) are refused in one line, as are a shadow mask of the wrong shape and padding under the mask.
Under bf16 autocast the sampler runs and the learner follows it to bf16 rounding. Skipped, with the install
line, where transformers is not installed.
"""

import re

import pytest
import torch

from conftest import EXTRA

transformers = pytest.importorskip(
    "transformers", reason=f"the Hugging Face tests need transformers: {EXTRA}")

import hf  # noqa: E402 (after the skip: hf/hooks.py imports transformers)
import smd  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from transformers import GPT2Config, LlamaConfig, Qwen3Config  # noqa: E402

COMPRESSED = ["streaming", "h2o", "tova", "snapkv", "rkv", "random"]
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}  # max |log-prob difference| accepted per dtype
EOS = 15
BUDGET = 8          # with 41 positions per sequence, under 1/4 of it
KEEP_BUDGET = 16    # keep_prompt needs the longest prompt (11) + 1
PROMPT_LENGTHS = (3, 11, 7)  # prefill is 3 tokens; the longer prompts finish during decode

# the three families, tiny: 2 layers, width 32, vocab 16, 64 positions
CONFIGS = {
    "gpt2": lambda: GPT2Config(vocab_size=16, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                               activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                               bos_token_id=0, eos_token_id=EOS),
    "llama": lambda: LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 bos_token_id=0, eos_token_id=EOS),
    "qwen3": lambda: Qwen3Config(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                                 max_position_embeddings=64, bos_token_id=0, eos_token_id=EOS),
}


def randomize(model, seed=0, std=0.1):
    """Weights N(0, std) instead of HF's 0.02, so attention is far from uniform and hiding a key changes the
    output clearly (as test_smd.make_model does); norms keep their init."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, std)
    return model.eval()


def make_model(family, attention="sdpa", dtype=torch.float32, seed=0):
    return randomize(hf.from_config(CONFIGS[family](), attention, dtype), seed)


def prompts_of(seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 15, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def sample(rollout, model, policy, keep_prompt=False, seed=5, **kwargs):
    """Mixed prompt lengths, EOS, 30 new tokens, every sampler alike."""
    return rollout(model, prompts_of(seed), policy=policy, budget=KEEP_BUDGET if keep_prompt else BUDGET,
                   max_new_tokens=30, eos_id=EOS, generator=torch.Generator().manual_seed(seed),
                   keep_prompt=keep_prompt, **kwargs)


def max_diff(a, b, where):
    return (a - b)[where].abs().max().item()


def check_not_vacuous(r):
    """Rows end at different steps, some by EOS, and the cache did evict."""
    ends = r.response_mask.long().cumsum(1).argmax(1) + 1                  # (B,) one past each row's end
    assert (r.tokens[torch.arange(len(ends)), ends - 1] == EOS).sum() >= 1 and len(set(ends.tolist())) >= 2
    T = r.tokens.shape[1]
    assert (r.shadow_mask.attn_masks().sum(-1) < torch.arange(1, T + 1)).any(), "nothing was evicted"

# ----------------------------------------------------------------------------- the HF sampler is our sampler


def gpt2_twin(dtype):
    """model.py's GPT and an HF GPT-2 holding the same weights (Conv1D stores Linear's weight transposed)."""
    ours = GPT(GPTConfig(block_size=64, vocab_size=16, n_layer=2, n_head=2, n_embd=32))
    ours = randomize(ours).to(dtype)
    theirs = hf.from_config(CONFIGS["gpt2"](), "sdpa", dtype).eval()
    weights = {k: v.t() if v.dim() == 2 and ".c_" in k else v
               for k, v in ours.state_dict().items() if not k.startswith("lm_head")}  # lm_head is tied to wte
    missing, unexpected = theirs.load_state_dict(weights, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected
    return ours, theirs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("keep_prompt", [False, True])
@pytest.mark.parametrize("policy", COMPRESSED)
def test_hf_gpt2_sampler_gives_smd_rollouts_tokens_write_log_and_logprobs(policy, keep_prompt, dtype):
    """Not bitwise: HF's Conv1D (addmm on (in, out) weights) and our Linear sum in other orders. The
    tokens and the write log are discrete and equal; the log-probs agree to float rounding (measured 7e-7 in
    float32, 2e-15 in float64)."""
    ours, theirs = gpt2_twin(dtype)
    r_ours = sample(smd.rollout, ours, policy, keep_prompt)
    r_hf = sample(hf.rollout, theirs, policy, keep_prompt)
    check_not_vacuous(r_ours)
    assert torch.equal(r_hf.tokens, r_ours.tokens) and torch.equal(r_hf.response_mask, r_ours.response_mask)
    assert torch.equal(r_hf.shadow_mask.slot_of, r_ours.shadow_mask.slot_of)
    assert max_diff(r_hf.logprobs, r_ours.logprobs, r_ours.response_mask) <= TOL[dtype]
    assert r_hf.kv_bytes == r_ours.kv_bytes and r_hf.full_kv_bytes == r_ours.full_kv_bytes


@pytest.mark.parametrize("policy", ["h2o", "rkv"])
def test_hf_record_of_a_rollout_gives_back_its_write_log_and_logprobs(policy):
    model = make_model("llama")
    r = sample(hf.rollout, model, policy)
    rec = hf.record(model, r.tokens, list(PROMPT_LENGTHS), policy=policy, budget=BUDGET, eos_id=EOS,
                    generator=torch.Generator().manual_seed(5))
    assert torch.equal(rec.shadow_mask.slot_of, r.shadow_mask.slot_of)
    assert torch.equal(rec.logprobs[r.response_mask], r.logprobs[r.response_mask])  # one code path: bitwise

# ----------------------------------------------------------------------------- the learner replays it


@pytest.mark.parametrize("attention, dtype", [("sdpa", torch.float32), ("sdpa", torch.float64),
                                              ("eager", torch.float32)])
@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("policy", COMPRESSED)
def test_masked_hf_learner_equals_the_hf_sampler_for_every_policy(policy, family, attention, dtype):
    """float64 runs sdpa only: Llama's and Qwen3's eager attention take the softmax in float32 by design."""
    model = make_model(family, attention, dtype)
    keep_prompt = policy in ("snapkv", "rkv")  # their decode-time forms; the others evict the prompt too
    r = sample(hf.rollout, model, policy, keep_prompt)
    check_not_vacuous(r)
    lp = hf.learner_logprobs(model, r.tokens, r.shadow_mask)
    assert max_diff(lp, r.logprobs, r.response_mask) <= TOL[dtype]
    unmasked = hf.learner_logprobs(model, r.tokens)
    assert max_diff(unmasked, r.logprobs, r.response_mask) > 1e-2  # the mask matters


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", list(CONFIGS))
def test_unmasked_pass_is_bitwise_the_models_own_forward(family, attention):
    model = make_model(family, attention)
    plain = transformers.AutoModelForCausalLM.from_config(CONFIGS[family](), attn_implementation=attention)
    plain.load_state_dict(model.state_dict())
    tokens = sample(hf.rollout, model, "h2o").tokens
    assert torch.equal(hf.learner_logits(model, tokens), plain.eval()(input_ids=tokens).logits)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_a_token_the_mask_hides_cannot_change_any_other_positions_logits(family):
    """Column p hidden from every other query, in every layer and KV head: changing token p leaves every
    other position's logits exactly as they were (bitwise); without the mask later positions move."""
    model = make_model(family)
    r = sample(hf.rollout, model, "tova")
    masks = r.shadow_mask.attn_masks().clone()                             # (L, B, n_kv, T, T)
    p = 5
    masks[..., p + 1:, p] = False
    changed = r.tokens.clone()
    changed[:, p] = (changed[:, p] + 1) % 15
    others = torch.arange(r.tokens.shape[1]) != p
    before, after = hf.learner_logits(model, r.tokens, masks), hf.learner_logits(model, changed, masks)
    assert torch.equal(before[:, others], after[:, others])
    unmasked = hf.learner_logits(model, r.tokens) - hf.learner_logits(model, changed)
    assert unmasked[:, p + 1:].abs().max() > 1e-3

# ----------------------------------------------------------------------------- grouped-query attention


def test_gqa_tova_evicts_the_key_its_query_heads_attend_to_least_on_average():
    """TOVA per KV head (head_average=False): the key a decode step overwrites is the one the group's query
    heads gave the least attention on average at the step before. Checked against the attention the masked
    eager learner replays (output_attentions), in float64."""
    model = make_model("llama", "eager", torch.float64)
    r = hf.rollout(model, torch.randint(0, 15, (3, 10), generator=torch.Generator().manual_seed(0)),
                   policy="tova", budget=BUDGET, max_new_tokens=30, head_average=False,
                   generator=torch.Generator().manual_seed(0))
    out = model(input_ids=r.tokens, use_cache=False, smd_mask=r.shadow_mask, output_attentions=True)
    n_checked = 0
    for layer, att in enumerate(out.attentions):                           # (B, nh, T, T)
        B, nh, T, _ = att.shape
        mean_att = att.view(B, 2, nh // 2, T, T).mean(2)                   # (B, n_kv, T, T): heads 2j, 2j+1
        seen = r.shadow_mask.seen(layer).long()                            # (B, n_kv, T, S)
        slot_of = r.shadow_mask.slot_of[layer].long()                      # (B, n_kv, T)
        for t in range(BUDGET, r.tokens.shape[1]):                         # every write into a full cache
            held = seen[:, :, t - 1]                                       # (B, n_kv, S): what query t-1 saw
            scores = mean_att[:, :, t - 1].gather(-1, held)                # (B, n_kv, S), in slot order
            victim = scores.gather(-1, slot_of[:, :, t:t + 1])             # (B, n_kv, 1): t's slot
            assert (victim <= scores.min(-1, keepdim=True).values + 1e-12).all()
            n_checked += victim.numel()
    assert n_checked == 2 * 3 * 2 * (r.tokens.shape[1] - BUDGET)


def gqa_with_repeated_query_heads(mha):
    """A Llama with 4 query heads over 2 KV heads whose query heads 2j and 2j+1 are both mha's head j (o_proj
    halved for each copy): the same function as mha, its 2 KV heads each read by 2 identical queries."""
    config = mha.config.to_dict() | dict(num_attention_heads=4, head_dim=8)
    gqa = hf.from_config(LlamaConfig(**config), "sdpa", torch.float64).eval()
    weights = dict(mha.state_dict())
    for layer in range(2):
        attn = f"model.layers.{layer}.self_attn."
        q = weights[attn + "q_proj.weight"].view(2, 8, 32)                 # (heads, hs, C)
        weights[attn + "q_proj.weight"] = q.repeat_interleave(2, 0).reshape(32, 32)
        o = weights[attn + "o_proj.weight"].view(32, 2, 8) / 2             # (C, heads, hs)
        weights[attn + "o_proj.weight"] = o.repeat_interleave(2, 1).reshape(32, 32)
    gqa.load_state_dict(weights)
    return gqa


@pytest.mark.parametrize("policy, keep_prompt", [(p, False) for p in COMPRESSED] + [("snapkv", True),
                                                                                     ("rkv", True)])
def test_gqa_whose_query_heads_repeat_samples_exactly_as_the_mha_model(policy, keep_prompt):
    """Group statistics are means, so two identical query heads sharing a KV head count as that one head:
    R-KV's and SnapKV's window then holds the last `window` queries of both, not the last `window` rows."""
    config = CONFIGS["llama"]().to_dict() | dict(num_attention_heads=2, num_key_value_heads=2, head_dim=8)
    mha = randomize(hf.from_config(LlamaConfig(**config), "sdpa", torch.float64))
    gqa = gqa_with_repeated_query_heads(mha)
    r_mha, r_gqa = sample(hf.rollout, mha, policy, keep_prompt), sample(hf.rollout, gqa, policy, keep_prompt)
    check_not_vacuous(r_mha)
    assert torch.equal(r_gqa.tokens, r_mha.tokens)
    assert torch.equal(r_gqa.shadow_mask.slot_of, r_mha.shadow_mask.slot_of)
    assert max_diff(r_gqa.logprobs, r_mha.logprobs, r_mha.response_mask) <= TOL[torch.float64]

# ----------------------------------------------------------------------------- bad input, clear errors


def test_from_config_leaves_the_given_config_alone():
    config = CONFIGS["llama"]()
    before = config._attn_implementation
    model = hf.from_config(config, "eager")
    assert config._attn_implementation == before and model.config._attn_implementation == hf.EAGER
    with pytest.raises(ValueError, match="attention must be 'sdpa' or 'eager'"):
        hf.from_config(config, "flash_attention_2")


def test_bad_input_is_a_clear_error():
    plain = transformers.AutoModelForCausalLM.from_config(CONFIGS["llama"](), attn_implementation="sdpa")
    prompts = [[1, 2, 3]]
    with pytest.raises(ValueError, match="load it with attn_implementation=hf.SDPA"):
        hf.rollout(plain, prompts, policy="h2o", budget=8, max_new_tokens=4)
    with pytest.raises(ValueError, match="load it with attn_implementation=hf.SDPA"):
        hf.learner_logits(plain, torch.tensor(prompts))
    model = make_model("llama")
    with pytest.raises(ValueError, match="keep_prompt needs a budget"):    # the policy's own check
        hf.rollout(model, [[1] * 10], policy="rkv", budget=8, max_new_tokens=4, keep_prompt=True)
    with pytest.raises(ValueError, match="exceeds block_size 64"):         # max_position_embeddings
        hf.rollout(model, prompts, policy="h2o", budget=8, max_new_tokens=62)
    dropout = hf.from_config(GPT2Config(**CONFIGS["gpt2"]().to_dict() | dict(attn_pdrop=0.1)))
    with pytest.raises(ValueError, match="sampling with dropout on: call model.eval()"):
        hf.rollout(dropout.train(), prompts, policy="h2o", budget=8, max_new_tokens=4)
    r = hf.rollout(model, prompts, policy="h2o", budget=8, max_new_tokens=4)
    with pytest.raises(ValueError, match=r"is \(2, 1, 2, 7\); the model and tokens need \(2, 1, 2, 6\)"):
        hf.learner_logits(model, r.tokens[:, :6], r.shadow_mask)
    sliding = transformers.MistralConfig(**CONFIGS["llama"]().to_dict() | dict(sliding_window=4))
    with pytest.raises(ValueError, match="does not support attention with sliding_window"):
        hf.rollout(hf.from_config(sliding), prompts, policy="h2o", budget=8, max_new_tokens=4)

@pytest.mark.parametrize("policy", COMPRESSED)
def test_under_bf16_autocast_the_sampler_runs_and_the_masked_learner_follows_it_to_bf16_rounding(policy):
    """Under autocast a Llama's values are bf16 and its RoPE'd keys float32: smd.KVCache.update stores both
    in the cache's one dtype (before: "scatter(): Expected self.dtype to be equal to src.dtype"). Measured:
    masked gap 0.016 (bf16's spacing at these log-probs: the sampler's matmuls have other shapes), unmasked
    0.5-1.0."""
    model = make_model("llama")
    keep_prompt = policy in ("snapkv", "rkv")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = sample(hf.rollout, model, policy, keep_prompt)
        lp = hf.learner_logprobs(model, r.tokens, r.shadow_mask).float()
        unmasked = hf.learner_logprobs(model, r.tokens).float()
    check_not_vacuous(r)
    masked_gap = max_diff(lp, r.logprobs, r.response_mask)
    assert masked_gap <= 0.1 and max_diff(unmasked, r.logprobs, r.response_mask) > 0.3

# ----------------------------------------------------------------------------- more families, and refusals

SMALL = dict(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, bos_token_id=0, eos_token_id=EOS)
MORE_FAMILIES = {  # transformers 5.24.0; each through AttentionInterface, each with its own modeling file
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, num_key_value_heads=2),
    "gemma": lambda: transformers.GemmaConfig(**SMALL, num_key_value_heads=1, head_dim=8),
    "phi3": lambda: transformers.Phi3Config(**SMALL, num_key_value_heads=2, pad_token_id=EOS),
    "olmo2": lambda: transformers.Olmo2Config(**SMALL, num_key_value_heads=2, pad_token_id=EOS),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**SMALL, hidden_act="gelu"),
    "opt": lambda: transformers.OPTConfig(**SMALL, ffn_dim=64, word_embed_proj_dim=32, dropout=0.0),
    "mistral": lambda: transformers.MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=None),
    "codegen": lambda: transformers.CodeGenConfig(  # no pad id
        vocab_size=16, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64, n_ctx=64, bos_token_id=0,
        eos_token_id=EOS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
}


@pytest.mark.parametrize("family", list(MORE_FAMILIES))
def test_more_families_masked_learner_equals_the_sampler(family):
    model = randomize(hf.from_config(MORE_FAMILIES[family]()))
    r = sample(hf.rollout, model, "h2o")
    check_not_vacuous(r)
    assert max_diff(hf.learner_logprobs(model, r.tokens, r.shadow_mask), r.logprobs, r.response_mask) <= 1e-5
    assert max_diff(hf.learner_logprobs(model, r.tokens), r.logprobs, r.response_mask) > 1e-2


def test_a_family_whose_attention_bypasses_the_interface_is_refused_up_front():
    """StableLM's decoder layers call attention without the extra kwargs (transformers marks it
    _supports_attention_backend=False): unrefused, its write log was all zeros and masked = unmasked."""
    config = transformers.StableLmConfig(**SMALL, num_key_value_heads=2)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=hf.SDPA)
    with pytest.raises(ValueError, match="StableLmForCausalLM's attention does not go through"):
        hf.rollout(model, [[1, 2, 3]], policy="h2o", budget=8, max_new_tokens=4)
    with pytest.raises(ValueError, match="StableLmForCausalLM's attention does not go through"):
        hf.learner_logits(model, torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match="StableLmForCausalLM's attention does not go through"):
        hf.from_config(config)


@pytest.mark.parametrize("config, error", [
    (lambda: transformers.FalconConfig(**SMALL), "KeyError"),                  # a bare KeyError before
    (lambda: transformers.BloomConfig(**SMALL), "ValueError"),
])
def test_a_family_transformers_cannot_build_with_the_hook_is_one_line(config, error):
    with pytest.raises(ValueError, match=f"transformers cannot build .* \\({error}: .*hf cannot hook it"):
        hf.from_config(config())


def drop_smd_kwargs(layer):
    """Make one decoder layer call its attention without SMD's keyword arguments, as StableLM's do."""
    attn = layer.self_attn
    forward = attn.forward

    def without(*args, **kwargs):
        return forward(*args, **{k: v for k, v in kwargs.items() if not k.startswith("smd_")})
    attn.forward = without


def test_a_layer_that_drops_the_hooks_kwargs_is_refused_by_sampler_record_and_learner():
    model = make_model("llama")
    r = sample(hf.rollout, model, "h2o")
    drop_smd_kwargs(model.model.layers[1])
    pattern = r"LlamaForCausalLM: SMD's attention hook ran in layers \[0\] of 0..1 during"
    with pytest.raises(ValueError, match=pattern + " sampling"):
        sample(hf.rollout, model, "h2o")
    with pytest.raises(ValueError, match=pattern + " sampling"):
        hf.record(model, r.tokens, list(PROMPT_LENGTHS), policy="h2o", budget=BUDGET, eos_id=EOS)
    with pytest.raises(ValueError, match=pattern + " the masked learner pass"):
        hf.learner_logits(model, r.tokens, r.shadow_mask)


def test_a_cache_that_was_not_written_is_refused(monkeypatch):
    def update_without_writing(self, layer, k, v):
        B, nh, T, _ = k.shape
        return self.k[layer], self.v[layer], torch.ones(B, nh, T, self.budget, dtype=torch.bool)
    monkeypatch.setattr(smd.KVCache, "update", update_without_writing)
    with pytest.raises(ValueError, match="the evicting cache was not written in every layer"):
        hf.rollout(make_model("llama"), [[1, 2, 3]], policy="h2o", budget=8, max_new_tokens=4)


def test_a_shadow_mask_of_another_shape_is_refused_not_broadcast():
    """Before: one row's mask for three rows, and one KV head's for two, were broadcast."""
    model = make_model("llama")                                            # 2 layers, 2 KV heads
    r = sample(hf.rollout, model, "h2o")                                   # 3 rows
    B, T = r.tokens.shape
    masks = r.shadow_mask.attn_masks()                                     # (L, B, n_kv, T, T)
    cases = {"one row": smd.ShadowMask(r.shadow_mask.slot_of[:, :1], BUDGET),
             "one KV head": masks[:, :, :1], "one layer": masks[:1], "one position short": masks[..., :-1]}
    for name, bad in cases.items():
        with pytest.raises(ValueError, match="the model and tokens need"):
            hf.learner_logits(model, r.tokens, bad)
    with pytest.raises(ValueError, match="must be a ShadowMask or an"):
        hf.learner_logits(model, r.tokens, masks.float())


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_padding_under_the_shadow_mask_is_refused_and_left_padded_prompts_too(attention):
    """Before: model(..., attention_mask=..., smd_mask=...) dropped the attention mask silently, and a
    left-padded prompt tensor was sampled from as if its padding were prompt."""
    model = make_model("llama", attention)
    r = sample(hf.rollout, model, "h2o")
    padding = torch.ones_like(r.tokens)
    padding[0, :2] = 0
    with pytest.raises(ValueError, match="smd_mask with a padding attention_mask"):
        model(input_ids=r.tokens, attention_mask=padding, smd_mask=r.shadow_mask)
    ones = model(input_ids=r.tokens, attention_mask=torch.ones_like(r.tokens), smd_mask=r.shadow_mask).logits
    assert torch.equal(ones, hf.learner_logits(model, r.tokens, r.shadow_mask))  # no padding: the same pass
    model.config.pad_token_id = EOS
    with pytest.raises(ValueError, match=f"a row starts with pad_token_id {EOS}: left padding"):
        hf.rollout(model, torch.tensor([[EOS, EOS, 3, 4], [1, 2, 3, 4]]), policy="h2o", budget=8,
                   max_new_tokens=4)

# ----------------------------------------------------------------------------- grpo.py


def test_hf_grpo_runs_smd_steps_whose_learner_is_the_sampler_and_the_naive_one_is_not(capsys):
    from hf import grpo
    logs = grpo.main(["--n_steps=2", "--warmup_steps=20", "--prompts_per_step=2", "--n_embd=32"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert len(logs) == len(lines) == 2 and len({line.index("mismatch") for line in lines}) == 1  # aligned
    for log in logs:
        assert log["smd_max"] <= TOL[torch.float32] and log["naive_max"] > 1e-2
        assert log["grad_norm"] > 0 and log["distill_kl"] > 0


def test_every_command_in_hf_grpos_docstring_passes_its_checks():
    from hf import grpo
    commands = re.findall(r"^ *python -m hf\.grpo([^#\n]*)", grpo.__doc__, flags=re.M)
    assert len(commands) == 4
    for argv in commands:
        grpo.make_config(argv.split())
    with pytest.raises(ValueError, match="keep_prompt needs a budget"):
        grpo.make_config(["--budget=16"])
