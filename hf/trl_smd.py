"""
Shadow Mask Distillation inside TRL's GRPOTrainer (optional: pip install trl==1.16.0 accelerate==1.15.0), on
any Hugging Face causal LM that hf/hooks.py can hook. SMDGRPOTrainer is a GRPOTrainer with four methods
replaced and nothing in TRL patched; SMDConfig is TRL's GRPOConfig with SMD's knobs added (policy, budget,
keep_prompt, smd_mode, distill_coef). With smd_mode="smd":
  sampler   _generate_single_turn samples with hf.rollout (the evicting, recording cache), not generate();
  carry     _generate_and_score_completions puts each row's write log and lengths into TRL's batch dict, so
            TRL's shuffle, split into steps and gradient accumulation carry them with their rows, and makes
            the sampler's log-probs the old policy (TRL's own old-policy pass would be the unmasked one);
  learner   _get_per_token_logps_and_entropies runs the policy under the shadow mask (hf.learner_logits),
            with full logits (TRL's fused LM head returns the labels' log-probs only);
  loss      _compute_loss is TRL's own GRPO loss on pi_masked, plus distill_coef * KL(pi_unmasked ||
            sg(pi_masked)), and logs the sampler/learner gaps, the KV fraction and the KL as smd/* metrics.
smd_mode="naive" samples the same way and leaves TRL's stock learner and loss alone: the side-by-side.
The masked gap is float rounding where pi_old is the policy; on a step that reuses a generation
(num_iterations > 1) it is the policy's real move away from the sampler, |log ratio|.
Layout: TRL left-pads prompts (and numbers positions over the padded row); the sampler and both SMD passes
use smd.py's layout instead, each row's prompt at positions 0..P_b-1 and its completion right after, padding
on the right, so the write log is used as recorded (no shift, no padding query, the sampler's positions);
to_smd_layout lays TRL's batch (and its masks, and the sampler's log-probs) out so, to_completion maps
per-token values back. Both passes hold full (B, T, vocab) logits: fine at this vocabulary; at a real one the
KL wants a chunked loop.
Not here: vLLM or paged generation, tools, images, a reference-model KL (beta), sampling filters (top-p, ...):
each is refused in one line. `python -m hf.trl_smd` trains a tiny random-init Llama on the arithmetic task:

    python -m hf.trl_smd                               # smd, rkv@28, prompt kept, float32; ~25 s on a CPU
    python -m hf.trl_smd --smd_mode=naive              # TRL's stock learner on the same compressed rollouts
    python -m hf.trl_smd --bf16=True                   # TRL's default precision: bf16 autocast
    python -m hf.trl_smd --gradient_accumulation_steps=2 --num_iterations=2
    torchrun --nproc_per_node=2 -m hf.trl_smd --n_steps=2   # 2-process DDP (gloo) on CPU
"""

import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from datasets import Dataset
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, TrainerCallback
from transformers.trainer_callback import PrinterCallback
from trl import GRPOConfig, GRPOTrainer
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import pad

import configurator
import hf
import smd
from data.arithmetic import CHARS, EOS, EOS_ID, Problem, decode, format_prompt, make_splits, max_lengths, \
    partial_reward
from hf import grpo
from objectives import mismatch
from policies import make_policy

# -----------------------------------------------------------------------------
# config: SMD's knobs (SMDConfig's defaults and help) and the command's, any of them overridden by --key=value
policy = "rkv"              # eviction policy: streaming | h2o | tova | snapkv | rkv | random
budget = 28                 # KV slots per layer and KV head while sampling (the sequence is up to 54 tokens)
keep_prompt = True          # never evict a prompt token: the policy chooses among generated tokens only
smd_mode = "smd"            # smd: learner under the shadow mask, plus the KL | naive: TRL's stock learner
distill_coef = 0.1          # lambda: weight of KL(pi_unmasked || sg(pi_masked))
n_steps = 4                 # optimizer steps (TRL's max_steps)
prompts_per_step = 4        # problems per optimizer step, over all processes (10 and 8 operands, alternating)
group_size = 4              # completions per problem (TRL's num_generations)
gradient_accumulation_steps = 1  # micro-batches per optimizer step
num_iterations = 1          # optimizer passes over each generation (> 1: pi_old is no longer the policy)
lr = 1e-4                   # learning rate (constant)
clip_eps = 0.2              # PPO ratio clip (TRL's epsilon)
temperature = 1.0           # sampling temperature (the learner divides by the same)
bf16 = False                # bf16 autocast for rollouts and learner (TRL's default is True)
gradient_checkpointing = True  # TRL's default
warmup_steps = 150          # supervised steps on worked examples (full attention) before RL (hf.grpo.warm_up)
warmup_lr = 3e-3            # their learning rate
attention = "sdpa"          # the library attention the mask goes into: sdpa | eager
n_layer = 2                 # decoder layers of the tiny random-init Llama
n_embd = 64                 # hidden size
n_head = 4                  # query heads
n_kv_head = 2               # KV heads
seed = 0                    # weights, problems, sampling
cpu_threads = 1             # torch threads per process
CONFIG = configurator.knobs(globals())
HELP = configurator.assignments(__file__)
# -----------------------------------------------------------------------------
MODES = ("smd", "naive")


def smd_field(name):
    return field(default=CONFIG[name], metadata={"help": HELP[name]})


@dataclass
class SMDConfig(GRPOConfig):
    """GRPOConfig plus SMD's knobs, defaults and help from the block above; the rest is TRL's, and what SMD
    cannot follow is refused here in one line."""
    policy: str = smd_field("policy")
    budget: int = smd_field("budget")
    keep_prompt: bool = smd_field("keep_prompt")
    smd_mode: str = smd_field("smd_mode")
    distill_coef: float = smd_field("distill_coef")

    def __post_init__(self):
        super().__post_init__()
        if self.smd_mode not in MODES:
            raise ValueError(f"smd_mode must be one of {MODES}, got {self.smd_mode!r}")
        if self.policy == "full":
            raise ValueError("policy 'full' evicts nothing: there would be no mask to inject")
        make_policy(self.policy, keep_prompt=self.keep_prompt)  # an unknown policy: its ValueError names them
        if not isinstance(self.budget, int) or self.budget < 1 or self.distill_coef < 0:
            raise ValueError(f"need budget an int >= 1 and distill_coef >= 0, got {self.budget}, "
                             f"{self.distill_coef}")
        for key, allowed, message in REFUSED:
            if getattr(self, key) not in allowed:
                raise ValueError(message)


REFUSED = [  # (field, the values SMD supports, why): what hf.rollout cannot do, or SMD's learner would skip
    ("use_vllm", (False,), "SMD samples with hf.rollout's evicting cache, not vLLM: set use_vllm=False"),
    ("use_transformers_continuous_batching", (False,), "SMD samples with hf.rollout, not paged generation"),
    ("use_liger_kernel", (False,), "SMD's learner computes its own logits: use_liger_kernel is unsupported"),
    ("beta", (0.0,), "a reference-model KL (beta != 0) is not wired to the masked pass: set beta=0.0"),
    ("top_p", (1.0,), "hf.rollout samples by temperature only: top_p must be 1.0"),
    ("top_k", (0, None), "hf.rollout samples by temperature only: top_k must be 0"),
    ("min_p", (None,), "hf.rollout samples by temperature only: min_p must be None"),
    ("repetition_penalty", (1.0,), "hf.rollout samples by temperature only: repetition_penalty must be 1.0"),
    ("generation_kwargs", (None,), "hf.rollout samples by temperature only: generation_kwargs must be None"),
]


# -----------------------------------------------------------------------------
# TRL's layout <-> smd's layout


def to_smd_layout(prompt_part, completion_part, prompt_lengths, completion_lengths, pad_value):
    """TRL's per-token tensors, prompts (B, P) left-padded and completions (B, C) right-padded (ids, masks,
    log-probs) -> smd's rows (B, T): row b's prompt at 0..P_b-1, its completion right after, pad_value after
    that; T = max_b (P_b + C_b). Row b's smd position t is TRL's column t + P - P_b."""
    B, P = prompt_part.shape
    ends = prompt_lengths + completion_lengths                             # (B,)
    t = torch.arange(int(ends.max()), device=prompt_part.device)           # (T,)
    columns = t + (P - prompt_lengths)[:, None]                            # (B, T)
    both = torch.cat([prompt_part, completion_part.to(prompt_part.dtype)], 1)  # (B, P + C)
    rows = both.gather(1, columns.clamp(max=both.shape[1] - 1))
    return torch.where(t < ends[:, None], rows, pad_value)                 # (B, T)


def to_completion(values, prompt_lengths, C):
    """smd-layout per-token values (B, T) -> TRL's completion layout (B, C): completion token j of row b is
    at position P_b + j (past a row's end, the last position: masked out by completion_mask)."""
    at = prompt_lengths[:, None] + torch.arange(C, device=values.device)  # (B, C)
    return values.gather(1, at.clamp(max=values.shape[1] - 1))

# -----------------------------------------------------------------------------
# the trainer


class SMDGRPOTrainer(GRPOTrainer):
    """GRPOTrainer with SMD's sampler, learner and loss (see the module's docstring). history: one dict a
    micro-batch (the gaps, the KL), for summaries and tests."""

    def __init__(self, model, reward_funcs, args, **kwargs):
        if not isinstance(args, SMDConfig):
            raise ValueError("SMDGRPOTrainer needs args=SMDConfig(...) (TRL's GRPOConfig plus SMD's knobs)")
        if isinstance(model, str):
            raise ValueError("pass the model itself, loaded with attn_implementation=hf.SDPA or hf.EAGER")
        hf.check_model(model)
        for name in ("rollout_func", "tools", "environment_factory", "peft_config"):
            if kwargs.get(name) is not None:
                raise ValueError(f"SMD's integration does not support {name}")
        super().__init__(model, reward_funcs, args=args, **kwargs)
        if len(self.eos_token_ids) != 1:
            raise ValueError(f"hf.rollout stops at one eos id, the model declares {self.eos_token_ids}")
        if self._is_vlm or self.aux_loss_enabled:
            raise ValueError("SMD's learner is text-only and computes no MoE aux loss")
        self.generator = torch.Generator().manual_seed(args.seed + self.accelerator.process_index)
        self.rollout = None  # the last generation: write log (L, B, n_kv, T), lengths, log-probs, KV share
        self.batch = None    # the micro-batch _compute_loss is scoring, while it does
        self.logits = None   # its masked pass (B, T, vocab), from the learner's log-probs to the KL
        self.history = []

    # ------------------------------------------------------------------------- sampler
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations,
                              has_tool_images=False):
        if images is not None or multimodal_fields:
            raise ValueError("SMD's sampler is text-only: no images")
        a = self.args
        unwrapped = unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                                gather_deepspeed3_params=a.ds3_gather_for_generation,
                                                gradient_checkpointing_kwargs=a.gradient_checkpointing_kwargs)
        full_params = self._dist.summon_full_params(self.model_wrapped, recurse=False)  # FSDP; else a no-op
        with unwrapped as model, torch.no_grad(), full_params:
            ro = hf.rollout(model, [list(p) for p in prompt_ids], policy=a.policy, budget=a.budget,
                            max_new_tokens=self.max_completion_length, temperature=self.temperature,
                            eos_id=self.eos_token_ids[0], generator=self.generator,
                            keep_prompt=a.keep_prompt)
        response = ro.response_mask.cpu()                                  # (B, T)
        completion_ids = [row[m].tolist() for row, m in zip(ro.tokens.cpu(), response)]
        logprobs = [row[m].tolist() for row, m in zip(ro.logprobs.float().cpu(), response)]
        self.rollout = dict(slot_of=ro.shadow_mask.slot_of, prompt_lengths=[len(p) for p in prompt_ids],
                            completion_lengths=response.sum(1).tolist(), logprobs=logprobs,
                            kv_fraction=ro.kv_bytes / ro.full_kv_bytes)
        return completion_ids, logprobs

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        ro, device = self.rollout, out["prompt_ids"].device
        prompt_lengths = torch.tensor(ro["prompt_lengths"], device=device)   # (B,)
        completion_lengths = torch.tensor(ro["completion_lengths"], device=device)
        # the write log rides in the batch dict batch-first, padded to TRL's width P + C with -1 (never read:
        # no row is longer than the rollout), so TRL's shuffle and splits carry each row's log with its row
        slot_of = ro["slot_of"].to(device)                                 # (L, B, n_kv, T_rollout)
        width = out["prompt_ids"].shape[1] + out["completion_ids"].shape[1]
        log = F.pad(slot_of, (0, width - slot_of.shape[-1]), value=-1).transpose(0, 1)  # (B, L, n_kv, P + C)
        out.update(smd_write_log=log, smd_prompt_lengths=prompt_lengths,
                   smd_completion_lengths=completion_lengths)
        if self.args.smd_mode == "smd":  # pi_old is the sampler, which the masked learner is (to rounding)
            out["old_per_token_logps"] = out["sampling_per_token_logps"]
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["smd/kv_fraction"].append(ro["kv_fraction"])
        return out

    # ------------------------------------------------------------------------- learner
    def rows(self, inputs):
        """The micro-batch in smd's layout: tokens (B, T), TRL's loss mask on them (B, T) bool."""
        lengths = inputs["smd_prompt_lengths"], inputs["smd_completion_lengths"]
        pad_id = self._tokenizer.pad_token_id
        tokens = to_smd_layout(inputs["prompt_ids"], inputs["completion_ids"], *lengths, pad_id)
        loss_mask = inputs["completion_mask"] * inputs.get("tool_mask", 1)  # (B, C)
        loss_mask = to_smd_layout(torch.zeros_like(inputs["prompt_mask"]), loss_mask, *lengths, 0).bool()
        return tokens, loss_mask

    def learner_pass(self, model, inputs, tokens, masked):
        """(B, T, vocab) float32 logits of the micro-batch in smd's layout, under its shadow mask or not."""
        shadow_mask = None
        if masked:
            slot_of = inputs["smd_write_log"][..., :tokens.shape[1]].transpose(0, 1)  # (L, B, n_kv, T)
            if (slot_of < 0).any():
                raise RuntimeError("a row's write log is shorter than its tokens: the batch lost its rollout")
            shadow_mask = smd.ShadowMask(slot_of.contiguous(), self.args.budget)
        with self.accelerator.autocast():
            return hf.learner_logits(model, tokens, shadow_mask).float()

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                           batch_size=None, compute_entropy=False, compute_aux_loss=False,
                                           **multimodal):
        if self.args.smd_mode == "naive":  # TRL's stock learner, untouched
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **multimodal)
        if self.batch is None:
            # TRL's own old-policy pass (num_iterations > 1, some accumulation settings) would be unmasked:
            # another policy than the sampler. The old policy is the sampler, whose log-probs are known
            logps = [torch.tensor(lp) for lp in self.rollout["logprobs"]]
            old = pad(logps, padding_value=0.0, padding_side="right",
                      pad_to_multiple_of=self.pad_to_multiple_of)
            return old.to(input_ids.device), None, None
        tokens, _ = self.rows(self.batch)
        self.logits = self.learner_pass(model, self.batch, tokens, masked=True)  # (B, T, vocab): pi_masked
        lengths, C = self.batch["smd_prompt_lengths"], logits_to_keep
        per_token_logps = to_completion(smd.token_logprobs(self.logits, tokens, self.temperature), lengths, C)
        entropies = None
        if compute_entropy:  # of the distribution each token was drawn from: token t's, from logits t-1
            logp = F.log_softmax(self.logits[:, :-1] / self.temperature, dim=-1)  # (B, T-1, vocab)
            entropies = to_completion(F.pad(-(logp.exp() * logp).sum(-1), (1, 0)), lengths, C)
        return per_token_logps, entropies, None

    # ------------------------------------------------------------------------- loss
    def _compute_loss(self, model, inputs):
        self.batch = inputs
        try:
            loss = super()._compute_loss(model, inputs)                    # TRL's: GRPO(pi_masked) in smd
        finally:
            self.batch = None
        tokens, loss_mask = self.rows(inputs)                              # (B, T) each
        if self.args.smd_mode == "smd":
            masked, self.logits = self.logits, None                        # with grad
            unmasked = self.learner_pass(model, inputs, tokens, masked=False)  # pi_unmasked, with grad
        else:
            with torch.no_grad():
                masked = self.learner_pass(model, inputs, tokens, masked=True)
                unmasked = self.learner_pass(model, inputs, tokens, masked=False)
        kl = smd.kl_divergence(unmasked, masked.detach(), loss_mask, self.temperature)
        mode = "train" if self.model.training else "eval"
        if self.args.smd_mode == "smd":
            normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            loss = loss + self.args.distill_coef * kl / normalizer        # GRPO(masked) + lambda * KL
        self.log_gaps(mode, inputs, tokens, loss_mask, masked.detach(), unmasked.detach(), kl.detach())
        return loss

    def log_gaps(self, mode, inputs, tokens, loss_mask, masked, unmasked, kl):
        """Sampler/learner gaps over completion tokens, masked and unmasked: max |log pi_learner - log
        pi_sampler| (over processes: the max) and k3 = mean(e^r - 1 - r) (the mean), and the KL (the mean).
        NaN for a micro-batch with no token in the loss (mask_truncated_completions can empty one)."""
        lengths = inputs["smd_prompt_lengths"], inputs["smd_completion_lengths"]
        sampler = to_smd_layout(torch.zeros_like(inputs["prompt_mask"], dtype=torch.float32),
                                inputs["sampling_per_token_logps"], *lengths, 0.0)  # (B, T)
        record = dict(distill_kl=kl.item())
        for name, logits in (("masked", masked), ("unmasked", unmasked)):
            lp = smd.token_logprobs(logits, tokens, self.temperature)      # (B, T)
            gap, k3 = mismatch(lp, sampler, loss_mask) if loss_mask.any() else (float("nan"),) * 2
            record.update({f"{name}_max": gap, f"{name}_k3": k3})
        self.history.append(record)
        gathered = self.accelerator.gather(torch.tensor(list(record.values()), device=kl.device)[None])
        for key, column in zip(record, gathered.T):                   # column: (processes,)
            name = f"smd/{key.replace('_max', '_logp_difference/max')}"
            value = column.max() if key.endswith("_max") else column.mean()
            self._metrics[mode][name].append(value.item())

# -----------------------------------------------------------------------------
# the command: a few SMD GRPO steps in TRL on the arithmetic task, a tiny random-init Llama


def arithmetic_tokenizer():
    """data.arithmetic's vocabulary as a transformers tokenizer, built in code: one token per character, EOS
    also the padding; left padding, as TRL pads prompts."""
    vocab = {c: i for i, c in enumerate(CHARS)} | {EOS: EOS_ID}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=EOS))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS,
                                   padding_side="left")


def arithmetic_dataset(cfg, n=400):
    """Problems of 10 and 8 operands, alternating (prompts of 20 and 16 tokens: TRL left-pads the short ones),
    with what the reward needs as columns."""
    long, _, _ = make_splits(cfg["seed"], n // 2, 0, 0)
    short, _, _ = make_splits(cfg["seed"] + 1, n // 2, 0, 0, n_operands=8)
    rows = [dict(prompt=format_prompt(p), operands=list(p.operands), n_digits=p.n_digits)
            for pair in zip(long, short) for p in pair]
    return Dataset.from_list(rows), long


def arithmetic_reward(completion_ids, operands, n_digits, **kwargs):
    """data.arithmetic's partial credit of each completion (decode stops at EOS)."""
    return [partial_reward(Problem(tuple(o), d), decode(ids))
            for ids, o, d in zip(completion_ids, operands, n_digits)]


COLUMNS = [  # (label, TRL's log key, format) of the line printed a step; reward and KV come with a generation
    ("reward", "reward", "5.3f"), ("gap masked", "smd/masked_logp_difference/max", "7.1e"),
    ("unmasked", "smd/unmasked_logp_difference/max", "7.1e"), ("k3", "smd/unmasked_k3", "7.1e"),
    ("KL", "smd/distill_kl", "8.2e"), ("KV", "smd/kv_fraction", "4.0%"),
    ("clip", "clip_ratio/region_mean", "5.3f"), ("grad", "grad_norm", "5.2f"),
    ("s/step", "step_time", "5.2f")]


class PrintSteps(TrainerCallback):
    """One aligned line per optimizer step from TRL's logs (its names, and SMD's under smd/); "-" where a step
    logged no such value (reward and KV on a step that reused an earlier generation)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:
            cells = [f"{label} {format(logs[key], spec) if key in logs else '-':>{len(format(0.5, spec))}}"
                     for label, key, spec in COLUMNS]
            print(f"step {state.global_step:3d} | " + " | ".join(cells), flush=True)


def make_config(argv):
    """The defaults and the overrides, checked before any work (ValueError says what is allowed)."""
    cfg = dict(CONFIG, **configurator.parse(argv, CONFIG))
    for key in ("n_steps", "prompts_per_step", "gradient_accumulation_steps", "num_iterations", "n_layer",
                "n_embd", "n_head", "n_kv_head", "cpu_threads"):
        if cfg[key] < 1:
            raise ValueError(f"{key} must be >= 1, got {cfg[key]}")
    if cfg["smd_mode"] not in MODES or cfg["attention"] not in ("sdpa", "eager"):
        raise ValueError(f"need smd_mode in {MODES} and attention 'sdpa' or 'eager', got "
                         f"{cfg['smd_mode']!r}, {cfg['attention']!r}")
    if cfg["group_size"] < 2 or cfg["lr"] < 0 or not cfg["temperature"] > 0 or cfg["warmup_steps"] < 0:
        raise ValueError("need group_size >= 2, lr >= 0, temperature > 0 and warmup_steps >= 0")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if (cfg["prompts_per_step"] * cfg["group_size"]) % (world * cfg["gradient_accumulation_steps"]):
        raise ValueError(f"prompts_per_step * group_size = {cfg['prompts_per_step'] * cfg['group_size']} "
                         f"completions must split over {world} processes x "
                         f"{cfg['gradient_accumulation_steps']} micro-batches")
    if cfg["policy"] == "full":
        raise ValueError("policy 'full' evicts nothing: there would be no mask to inject")
    P, R = max_lengths()
    make_policy(cfg["policy"], keep_prompt=cfg["keep_prompt"]).check(cfg["budget"], P + R, P)
    return cfg


def trl_config(cfg, output_dir):
    """The command's knobs as TRL's config: SMDConfig = GRPOConfig + SMD's five."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    per_device = cfg["prompts_per_step"] * cfg["group_size"] // (world * cfg["gradient_accumulation_steps"])
    smd_knobs = {k: cfg[k] for k in ("policy", "budget", "keep_prompt", "smd_mode", "distill_coef")}
    return SMDConfig(
        output_dir=output_dir, max_steps=cfg["n_steps"], per_device_train_batch_size=per_device,
        gradient_accumulation_steps=cfg["gradient_accumulation_steps"], num_iterations=cfg["num_iterations"],
        num_generations=cfg["group_size"], max_completion_length=max_lengths()[1],
        temperature=cfg["temperature"], learning_rate=cfg["lr"], lr_scheduler_type="constant",
        epsilon=cfg["clip_eps"], bf16=cfg["bf16"], gradient_checkpointing=cfg["gradient_checkpointing"],
        seed=cfg["seed"], logging_steps=1, report_to="none", save_strategy="no",
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True, **smd_knobs)


def warmed_up_model(cfg):
    """The tiny random-init Llama of hf.grpo after its supervised warm-up (the same on every rank), and the
    data: -> model, dataset."""
    model = grpo.build_model(dict(cfg, dtype="float32"))               # LlamaForCausalLM, hf.SDPA, eval()
    dataset, long = arithmetic_dataset(cfg)
    t0 = time.time()
    loss = grpo.warm_up(model, long, cfg, torch.Generator().manual_seed(cfg["seed"]))
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"{type(model).__name__}: {sum(p.numel() for p in model.parameters())} weights; warm-up "
              f"{cfg['warmup_steps']} steps, loss {loss:.3f}, {time.time() - t0:.1f} s; {cfg['smd_mode']} "
              f"{cfg['policy']}@{cfg['budget']}{', prompt kept' if cfg['keep_prompt'] else ''}"
              f"{', bf16 autocast' if cfg['bf16'] else ''}")
    return model, dataset


def train(model, dataset, cfg):
    """cfg's GRPO steps in TRL on the model -> the trainer (state.log_history and history hold the logs)."""
    with tempfile.TemporaryDirectory(prefix="trl_smd-") as output_dir:
        trainer = SMDGRPOTrainer(model, arithmetic_reward, trl_config(cfg, output_dir), train_dataset=dataset,
                                 processing_class=arithmetic_tokenizer(), callbacks=[PrintSteps()])
        trainer.remove_callback(PrinterCallback)  # TRL's log dict a step: PrintSteps prints one line instead
        trainer.train()
    return trainer


def main(argv):
    cfg = make_config(argv)
    torch.set_num_threads(cfg["cpu_threads"])
    # TRL 1.16 still calls transformers' gradient_checkpointing* names, which 5.x deprecates: a warning a call
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.* is deprecated",
                            category=FutureWarning)
    model, dataset = warmed_up_model(cfg)
    t0 = time.time()
    trainer = train(model, dataset, cfg)
    seconds, accelerator = time.time() - t0, trainer.accelerator
    flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    ranks = accelerator.gather(flat[None])                                 # (processes, n_weights)
    if accelerator.is_main_process:
        print(f"train: {cfg['n_steps']} steps, {seconds:.1f} s; over all micro-batches: gap masked max "
              f"{max(h['masked_max'] for h in trainer.history):.1e}, unmasked max "
              f"{max(h['unmasked_max'] for h in trainer.history):.1e}")
        if accelerator.num_processes > 1:  # DDP: every rank must hold the same weights after the steps
            print(f"{accelerator.num_processes} processes ({accelerator.distributed_type}, "
                  f"{torch.distributed.get_backend()}): weights identical on every rank: "
                  f"{bool((ranks == ranks[0]).all())}")
    return trainer


if __name__ == "__main__":
    configurator.cli(main, CONFIG, __file__, check=make_config)
