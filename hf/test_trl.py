"""
hf/trl_smd.py's claims as executable checks, on CPU, with TRL's own GRPOTrainer loop: under TRL's left padding
of mixed prompt lengths the masked learner reproduces the sampler (float32 rounding) while the unmasked one is
far off; the write log follows its rows through TRL's shuffle, split and gradient accumulation; with
num_iterations=2 the old policy is exactly the sampler's log-probs (lr 0: ratio 1 to rounding; lr > 0: a real
ratio, clipped); gradient checkpointing changes nothing; bf16 autocast runs, with the gap bf16 allows; naive
mode leaves TRL's stock learner alone; what the integration cannot follow is refused in one line. One warm-up
serves every test (a module fixture); each run is 1-2 steps. Skipped, with the install line, without trl.
"""

import copy
import re

import pytest
import torch

from conftest import EXTRA

pytest.importorskip("trl", reason=f"the TRL tests need trl: {EXTRA}")

# TRL 1.16 still calls transformers' gradient_checkpointing* names, which 5.x deprecates
pytestmark = pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.* is deprecated:FutureWarning")

import hf  # noqa: E402
from data.arithmetic import encode, format_prompt, make_splits  # noqa: E402
from hf import trl_smd  # noqa: E402

F32_GAP = 5e-5    # float32: max |log pi_masked - log pi_sampler| accepted (measured 4e-6 - 1.1e-5)
BF16_GAP = 0.5    # bf16 autocast: the same, at bf16's 8 mantissa bits (measured 0.04 - 0.14)
FAR = 1.0         # the unmasked learner after the warm-up: measured 9-10 nats off at its worst token
BASE = ["--warmup_steps=150", "--n_steps=2"]


@pytest.fixture(scope="module")
def warmed():
    """The command's model after its warm-up, and its dataset: built once, copied by each run."""
    torch.set_num_threads(1)
    return trl_smd.warmed_up_model(trl_smd.make_config(BASE))


def run(warmed, *argv):
    cfg = trl_smd.make_config(BASE + list(argv))
    model, dataset = warmed
    return trl_smd.train(copy.deepcopy(model), dataset, cfg)


@pytest.fixture
def batches(monkeypatch):
    """Every micro-batch _compute_loss scores, as TRL hands it over (the dict, before the loss)."""
    seen, compute_loss = [], trl_smd.SMDGRPOTrainer._compute_loss

    def spy(self, model, inputs):
        seen.append({k: v.clone() if torch.is_tensor(v) else v for k, v in inputs.items()})
        return compute_loss(self, model, inputs)
    monkeypatch.setattr(trl_smd.SMDGRPOTrainer, "_compute_loss", spy)
    return seen


def logged(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]

# ----------------------------------------------------------------------------- layout


def test_the_tokenizer_built_in_code_is_the_tasks():
    tokenizer = trl_smd.arithmetic_tokenizer()
    for p in make_splits(0, 3, 0, 0)[0] + make_splits(1, 3, 0, 0, n_operands=8)[0]:
        prompt = format_prompt(p)
        assert tokenizer(prompt)["input_ids"] == encode(prompt)
        assert tokenizer.decode(encode(prompt)) == prompt


def test_trls_left_padded_rows_become_smds_layout_and_back():
    """Prompts of 3 and 1 tokens (TRL: 0 and 2 left pads), completions of 2 and 3 (1 and 0 right pads)."""
    prompt_ids = torch.tensor([[1, 2, 3], [9, 9, 4]])
    completion_ids = torch.tensor([[5, 6, 9], [7, 8, 2]])
    P_b, C_b = torch.tensor([3, 1]), torch.tensor([2, 3])
    rows = trl_smd.to_smd_layout(prompt_ids, completion_ids, P_b, C_b, 0)
    assert rows.tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 2, 0]]
    positions = torch.arange(5).expand(2, -1)
    assert trl_smd.to_completion(rows, P_b, 3)[0, :2].tolist() == [5, 6]
    assert trl_smd.to_completion(rows, P_b, 3)[1].tolist() == [7, 8, 2]
    assert trl_smd.to_completion(positions, P_b, 3).tolist() == [[3, 4, 4], [1, 2, 3]]  # past the end: last

# ----------------------------------------------------------------------------- the learner is the sampler


def test_masked_learner_is_the_sampler_under_trls_left_padding_and_the_unmasked_is_not(warmed, batches):
    trainer = run(warmed)
    lengths = torch.cat([b["smd_prompt_lengths"] for b in batches])
    assert set(lengths.tolist()) == {16, 20}                               # mixed prompts in every run
    assert all((b["prompt_mask"][:, 0] == 0).any() for b in batches)       # TRL left-padded some rows
    assert len(trainer.history) == 2
    for h in trainer.history:
        assert h["masked_max"] <= F32_GAP and h["unmasked_max"] > FAR and h["distill_kl"] > 1e-2
    # rkv@28 of a 54-token full cache: above 28/54 by R-KV's per-slot statistics (its key similarities), 0.67
    assert all(28 / 54 < f < 0.75 for f in logged(trainer, "smd/kv_fraction"))


def test_the_write_log_follows_its_rows_through_gradient_accumulation_2(warmed, batches):
    """steps_per_generation = 2: each generation is shuffled and split into 2 micro-batches; a log that
    stayed with another row would put the masked gap at the unmasked one's size."""
    trainer = run(warmed, "--gradient_accumulation_steps=2")
    assert len(batches) == 4 and all(len(b["prompt_ids"]) == 8 for b in batches)
    assert all(h["masked_max"] <= F32_GAP and h["unmasked_max"] > FAR for h in trainer.history)


def test_num_iterations_2_with_lr_0_keeps_the_sampler_as_old_policy_ratio_1(warmed, batches):
    """TRL recomputes pi_old with its own (unmasked) pass here; the ratio would then be off by e^9."""
    trainer = run(warmed, "--num_iterations=2", "--lr=0")
    assert len(batches) == 2
    for b in batches:
        assert torch.equal(b["old_per_token_logps"], b["sampling_per_token_logps"])  # exactly the sampler's
    assert all(h["masked_max"] <= F32_GAP for h in trainer.history)       # |log ratio|, both iterations
    assert logged(trainer, "clip_ratio/region_mean") == [0.0, 0.0]


def test_num_iterations_2_with_lr_above_0_gives_a_real_ratio_and_clips(warmed, batches):
    trainer = run(warmed, "--num_iterations=2", "--lr=3e-3")
    first, second = trainer.history
    assert first["masked_max"] <= F32_GAP                                 # before any update: ratio 1
    assert second["masked_max"] > 0.1                                     # after one: pi_masked moved
    assert torch.equal(batches[1]["old_per_token_logps"], batches[0]["sampling_per_token_logps"])
    assert logged(trainer, "clip_ratio/region_mean")[1] > 0               # and TRL's clip engaged


def test_gradient_checkpointing_on_and_off_give_the_same_steps(warmed):
    on = run(warmed, "--gradient_checkpointing=True", "--lr=1e-3")
    off = run(warmed, "--gradient_checkpointing=False", "--lr=1e-3")
    assert on.history == off.history                                      # bitwise: the same logs
    for p, q in zip(on.model.parameters(), off.model.parameters()):
        assert torch.equal(p, q)


def test_bf16_autocast_samples_and_learns_with_the_gap_bf16_allows(warmed):
    trainer = run(warmed, "--bf16=True")
    for h in trainer.history:
        assert h["masked_max"] <= BF16_GAP and h["unmasked_max"] > FAR
    assert trainer.history[0]["masked_k3"] < 1e-3                         # a few tokens off, not the policy


def test_naive_mode_is_trls_stock_learner_on_the_compressed_rollouts(warmed, batches):
    """No old log-probs of ours (TRL takes its own detached pass as pi_old), no KL in the loss; the gaps
    are still logged: the sampler's policy is the masked one, the learner trains the unmasked one."""
    trainer = run(warmed, "--smd_mode=naive")
    assert all("old_per_token_logps" not in b for b in batches)
    assert all(h["masked_max"] <= F32_GAP and h["unmasked_max"] > FAR for h in trainer.history)

# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("overrides, message", [
    (dict(use_vllm=True), "not vLLM: set use_vllm=False"),
    (dict(beta=0.04), "a reference-model KL .* set beta=0.0"),
    (dict(top_p=0.9), "top_p must be 1.0"),
    (dict(top_k=5), "top_k must be 0"),
    (dict(min_p=0.1), "min_p must be None"),
    (dict(repetition_penalty=1.1), "repetition_penalty must be 1.0"),
    (dict(generation_kwargs={"do_sample": False}), "generation_kwargs must be None"),
    (dict(use_liger_kernel=True), "use_liger_kernel is unsupported"),
    (dict(use_transformers_continuous_batching=True), "not paged generation"),
    (dict(smd_mode="tis"), "smd_mode must be one of"),
    (dict(policy="full"), "policy 'full' evicts nothing"),
    (dict(policy="lru"), "unknown policy"),
    (dict(budget=0), "need budget an int >= 1"),
])
def test_what_the_integration_cannot_follow_is_refused_in_one_line(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message) as error:
        trl_smd.SMDConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", bf16=False, **overrides)
    assert "\n" not in str(error.value)


def test_the_trainer_refuses_what_it_cannot_hook(warmed, tmp_path):
    model, dataset = warmed
    args = trl_smd.SMDConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", bf16=False)
    common = dict(train_dataset=dataset, processing_class=trl_smd.arithmetic_tokenizer())
    reward = trl_smd.arithmetic_reward
    with pytest.raises(ValueError, match="needs args=SMDConfig"):
        grpo_args = trl_smd.GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", bf16=False)
        trl_smd.SMDGRPOTrainer(model, reward, grpo_args, **common)
    with pytest.raises(ValueError, match="pass the model itself"):
        trl_smd.SMDGRPOTrainer("Qwen/Qwen3-0.6B", reward, args, **common)
    plain = hf.hooks.AutoModelForCausalLM.from_config(copy.deepcopy(model.config), attn_implementation="sdpa")
    with pytest.raises(ValueError, match="load it with attn_implementation=hf.SDPA"):
        trl_smd.SMDGRPOTrainer(plain, reward, args, **common)
    for name, value in (("rollout_func", lambda prompts, trainer: {}), ("tools", [len]),
                        ("environment_factory", object), ("peft_config", object())):
        with pytest.raises(ValueError, match=f"does not support {name}"):
            trl_smd.SMDGRPOTrainer(model, reward, args, **common, **{name: value})
    two_eos = copy.deepcopy(model)
    two_eos.generation_config.eos_token_id = [trl_smd.EOS_ID, 13]
    with pytest.raises(ValueError, match=r"hf.rollout stops at one eos id, the model declares \[14, 13\]"):
        trl_smd.SMDGRPOTrainer(two_eos, reward, args, **common)

# ----------------------------------------------------------------------------- the command


def test_every_command_in_the_docstring_passes_its_checks(monkeypatch, capsys):
    lines = re.findall(r"^ *(?:torchrun \S+ -m|python -m) hf\.trl_smd([^#\n]*)", trl_smd.__doc__, flags=re.M)
    assert len(lines) == 5
    for argv in lines:
        trl_smd.make_config(argv.split())
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="must split over 3 processes"):
        trl_smd.make_config([])
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ValueError, match="keep_prompt needs a budget"):
        trl_smd.make_config(["--budget=16"])
    cli = lambda argv: trl_smd.configurator.cli(trl_smd.main, trl_smd.CONFIG, trl_smd.__file__,
                                                 check=trl_smd.make_config, argv=argv)
    with pytest.raises(SystemExit) as exit_:
        cli(["--help"])
    assert exit_.value.code == 0 and "python -m hf.trl_smd [--key=value ...]" in capsys.readouterr().out
    for bad, message in (["--budgt=8"], "did you mean --budget?"), (["--smd_mode=tis"], "need smd_mode in"):
        with pytest.raises(SystemExit) as exit_:
            cli(bad)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and err.count("\n") == 1


def test_the_command_prints_one_aligned_line_a_step(warmed, capsys):
    run(warmed)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert len(lines) == 2 and len({line.index("gap masked") for line in lines}) == 1
    assert all(key in lines[0] for key in ("reward", "unmasked", "KL", "KV", "clip", "grad"))
