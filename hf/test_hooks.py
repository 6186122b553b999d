"""
hf/hooks.py's claims as executable checks, on tiny random-init Hugging Face models built from configs (nothing is
downloaded): the HF sampler is our sampler (GPT-2 with model.py's weights gives smd.rollout's tokens, write
log and log-probs); on GPT-2, a Llama config (RoPE, GQA, RMSNorm) and a Qwen3 config (RoPE, one KV head,
q/k norms) the masked HF learner reproduces the HF sampler, the unmasked pass is the model's own forward bit
for bit, and a hidden token cannot reach a query; under GQA a KV head's policy statistic is its query heads'
mean. Skipped, with the install line, where transformers is not installed.
"""

import re

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="the Hugging Face tests need transformers: pip install transformers==5.24.0")

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
    with pytest.raises(ValueError, match="shadow_mask covers 7 positions, tokens have 6"):
        hf.learner_logits(model, r.tokens[:, :6], r.shadow_mask)
    sliding = transformers.MistralConfig(**CONFIGS["llama"]().to_dict() | dict(sliding_window=4))
    with pytest.raises(ValueError, match="does not support attention with sliding_window"):
        hf.rollout(hf.from_config(sliding), prompts, policy="h2o", budget=8, max_new_tokens=4)

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
