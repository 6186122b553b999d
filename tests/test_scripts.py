"""The command line of every script: configurator.py's one parser (types, --help, one-line errors), and
each script run as a subprocess, failing before any work; every usage line of the scripts' docstrings and
README.md's python block and policies.py's example, run as printed. Then compare.py: its tables when runs
fail or the table's rows and the sweep's overlap (its runs faked), the paired statistics on a
hand-computed case, rows with settings, one absolute out_dir, reuse of a finished run (also moved); plot.py
drawing only the last comparison's runs."""
import importlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import configurator
from conftest import EXTRA
import policies
import smd
import train
import warmup
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo's root
DEFAULTS = dict(budget=26, lr=1e-5, resume=False, mode="smd", rows="full,smd", sweep_budgets=(13, 21),
                scale=(0.5,))


def script(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


# ----------------------------------------------------------------------------- configurator


def test_a_value_keeps_its_defaults_type():
    assert configurator.parse(["--budget=8", "--lr=1", "--resume=True", "--mode=tis"], DEFAULTS) == \
        dict(budget=8, lr=1.0, resume=True, mode="tis")
    assert type(configurator.parse(["--lr=1"], DEFAULTS)["lr"]) is float  # an int where a float is wanted
    assert configurator.parse(["--mode=7", "--rows="], DEFAULTS) == dict(mode="7", rows="")  # as written
    assert configurator.parse(["--rows=full,naive"], DEFAULTS) == dict(rows="full,naive")
    for text in ("16", "16,", "(16,)"):
        assert configurator.parse([f"--sweep_budgets={text}"], DEFAULTS) == dict(sweep_budgets=(16,))
    for text in ("16,24", "(16, 24)"):
        assert configurator.parse([f"--sweep_budgets={text}"], DEFAULTS) == dict(sweep_budgets=(16, 24))
    assert configurator.parse(["--scale=1,0.25"], DEFAULTS) == dict(scale=(1.0, 0.25))


@pytest.mark.parametrize("arg, message", [
    ("--bugdet=8", "unknown config key 'bugdet'; did you mean --budget\\? known: budget, lr, resume"),
    ("--budget=8.5", "--budget wants a int, got '8.5'"),
    ("--budget=True", "--budget wants a int"),                                  # a bool is not a number
    ("--lr=abc", "--lr wants a float, got 'abc'"),
    ("--resume=1", "--resume wants a bool \\(True or False\\)"),
    ("--resume=yes", "--resume wants a bool"),
    ("--sweep_budgets=16,x", "--sweep_budgets wants one int or several, comma-separated \\(default 13,21\\)"),
    ("--sweep_budgets=16.5", "--sweep_budgets wants one int"),
    ("--sweep_budgets=", "--sweep_budgets wants one int"),
    ("budget=8", "arguments look like --key=value, got 'budget=8'"),
    ("--budget", "arguments look like --key=value"),
])
def test_a_bad_flag_or_value_is_one_line_naming_what_is_allowed(arg, message):
    with pytest.raises(ValueError, match=message) as e:
        configurator.parse([arg], DEFAULTS)
    assert "\n" not in str(e.value)


def test_parse_known_leaves_other_scripts_flags_as_given():
    own, rest = configurator.parse_known(["--budget=8", "--n_steps=3", "--lr=1", "-x"], DEFAULTS)
    assert own == dict(budget=8, lr=1.0) and rest == ["--n_steps=3", "-x"]
    with pytest.raises(ValueError, match="arguments look like --key=value"):  # its own key, malformed
        configurator.parse_known(["--budget"], DEFAULTS)


SOURCE = '''from math import pi      # an imported float is not a knob
budget = 26              # KV slots per layer and head
rows = "full,smd"        # table rows, in order
sweep_budgets = (13, 21)
n_layer, n_head = 2, 4   # two knobs, one comment
CONFIG = configurator.knobs(globals())
LATER = 3                # bound after the config block: not a knob
'''


def test_knobs_and_help_come_from_the_scripts_own_assignments_and_comments(tmp_path):
    path = tmp_path / "script.py"
    path.write_text(SOURCE)
    namespace = {"__file__": str(path), "configurator": configurator}
    exec(SOURCE, namespace)
    assert namespace["CONFIG"] == dict(budget=26, rows="full,smd", sweep_budgets=(13, 21), n_layer=2,
                                       n_head=4)
    assert configurator.help_text(namespace["CONFIG"], str(path), epilog="and more").splitlines() == [
        "usage: python script.py [--key=value ...]",
        "  --budget=26            KV slots per layer and head",
        "  --rows=full,smd        table rows, in order",
        "  --sweep_budgets=13,21",
        "  --n_layer=2            two knobs, one comment",
        "  --n_head=4             two knobs, one comment",
        "and more"]


def test_cli_prints_help_or_one_error_line_and_leaves_errors_past_the_checks_alone(capsys):
    ran = []
    main = ran.append
    with pytest.raises(SystemExit) as e:
        configurator.cli(main, DEFAULTS, __file__, argv=["--budget=8", "-h"])
    assert e.value.code == 0 and "--budget=26" in capsys.readouterr().out and not ran
    with pytest.raises(SystemExit) as e:
        configurator.cli(main, DEFAULTS, __file__, argv=["--budget=x"])
    assert e.value.code == 2 and not ran
    assert capsys.readouterr().err == "error: --budget wants a int, got 'x'\n"

    def check(argv):
        raise ValueError("budget must be >= 1,\ngot 0")
    with pytest.raises(SystemExit) as e:
        configurator.cli(main, DEFAULTS, __file__, check=check, argv=["--budget=0"])
    assert e.value.code == 2 and capsys.readouterr().err == "error: budget must be >= 1, got 0\n" and not ran
    configurator.cli(main, DEFAULTS, __file__, argv=["--budget=8"])
    assert ran == [["--budget=8"]]

    def failing_main(argv):
        raise ValueError("a bug mid-run")                  # not a config error: its traceback must show
    with pytest.raises(ValueError, match="a bug mid-run"):
        configurator.cli(failing_main, DEFAULTS, __file__, argv=[])


# ----------------------------------------------------------------------------- every script, as a subprocess

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None  # hf/grpo.py's optional dependency
HAS_TRL = importlib.util.find_spec("trl") is not None  # hf/trl_smd.py's (its own tests run its command line)
MODULES = {"train": "train", "warmups": "experiments.warmups", "compare": "experiments.compare",
           "variance": "experiments.variance", "bench": "experiments.bench", "plot": "experiments.plot",
           "long_regime": "experiments.long_regime", "hf_grpo": "hf.grpo",
           "hf_trl": "hf.trl_smd"}  # name -> module
SCRIPTS = ["train", "warmups", "compare", "variance", "bench", "plot", "long_regime"] + \
    ["hf_grpo"] * HAS_TRANSFORMERS  # the scripts a page may name (hf_grpo where transformers is installed)
EACH_SCRIPT = SCRIPTS[:7] + [pytest.param("hf_grpo", marks=pytest.mark.skipif(
    not HAS_TRANSFORMERS, reason=f"hf/grpo.py needs transformers: {EXTRA}"))]
COMMENT = {"train": "KV slots per layer and head", "warmups": "copy the trained warm-up into bases/",
           "compare": "RL seeds 0 .. seeds-1",
           "variance": "batches judged per mode", "bench": "total sequence lengths T",
           "plot": "the compare.py budget whose runs to draw",
           "long_regime": "the policies, each at every budget", "hf_grpo": "KV slots per layer and KV head"}


def source_of(name):
    return os.path.join(ROOT, MODULES[name].replace(".", os.sep) + ".py")


def command_of(name):
    """The argv after `python` that starts a script from the root, as its --help's usage line says."""
    return configurator.command(source_of(name)).split()[1:]


@pytest.mark.parametrize("name", EACH_SCRIPT)
def test_help_prints_every_knob_with_its_comment(name):
    out = script(*command_of(name), "--help")
    assert out.returncode == 0 and not out.stderr, out.stderr
    assert out.stdout.startswith(f"usage: python {' '.join(command_of(name))} ")
    defaults = importlib.import_module(MODULES[name]).CONFIG
    comments = configurator.assignments(source_of(name))
    assert all(f"--{key}=" in out.stdout and comments[key] in out.stdout for key in defaults)
    assert COMMENT[name] in out.stdout
    if name in ("compare", "variance"):                   # the flags they pass on to train.py
        assert "any train.py --key=value" in out.stdout


# an unknown key, then a bad value: of the wrong type, or one the script's own checks reject; compare.py and
# variance.py hand --seedz, --lr and --k to train.py's parser, which rejects them
BAD = {"train": ["--bugdet=8", "--budget=8.5"],
       "warmups": ["--shp=True", "--budget=0"],
       "compare": ["--seedz=3", "--seeds=x", "--lr=abc", "--warmup_policies=h2o,lru"],
       "variance": ["--k=32", "--K=1", "--n_steps=1"],
       "bench": ["--lenghts=64", "--budgets=8,x"],
       "plot": ["--smoth=3", "--smooth=0"],
       "long_regime": ["--budgts=64", "--budgets=64,x", "--budgets=64"],  # the last: the arithmetic task
       "hf_grpo": ["--budgt=8", "--budget=3"]}


@pytest.mark.parametrize("name", EACH_SCRIPT)
def test_a_bad_flag_or_value_is_one_line_on_stderr_and_exit_2(name):
    procs = {arg: subprocess.Popen([sys.executable, *command_of(name), arg], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True)
             for arg in BAD[name]}  # side by side: each is mostly the import of torch
    try:
        for arg, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=120)
            assert proc.returncode == 2, (arg, stderr)
            assert stderr.startswith("error: ") and stderr.count("\n") == 1, (arg, stderr)
            assert "Traceback" not in stderr and not stdout, arg
    finally:  # a script that got past its checks is working, maybe with train.py children: stop them all
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


def check_of(name):
    """The function a script's entry runs on its arguments before any work (configurator.cli's check=)."""
    source = open(source_of(name)).read()
    found = re.search(r"configurator\.cli\(main, CONFIG, __file__, check=(\w+)", source)[1]
    return getattr(importlib.import_module(MODULES[name]), found)


@pytest.mark.parametrize("name", EACH_SCRIPT)
def test_every_command_in_a_docstring_passes_its_scripts_checks(name):
    """The usage lines a reader copies (`python <name>.py --key=value ...  # comment`) run as printed: each
    passes the checks its script makes before any work."""
    module = importlib.import_module(MODULES[name])
    check = check_of(name)
    start = re.escape(configurator.command(source_of(name)))
    commands = re.findall(rf"^ *{start}([^#\n]*)", module.__doc__, flags=re.M)
    assert commands
    for argv in (line.split() for line in commands):
        if "--help" in argv or ("--device=cuda" in argv and not torch.cuda.is_available()):
            continue
        check(argv)


@pytest.mark.parametrize("page", ["README.md", "experiments/README.md", "hf/README.md"])
def test_every_command_a_page_prints_passes_its_scripts_checks(page):
    """Each `python ...` command of a page, in a code block or inline, names a script that exists and passes
    the checks that script makes before any work (a flag renamed or a script moved fails here)."""
    text = open(os.path.join(ROOT, page)).read()
    blocks = "\n".join(re.findall(r"```\w*\n(.*?)```", text, flags=re.S))
    lines = re.findall(r"^\s*(?:\w+=\S+ )*(python [^#\n]*)", blocks, flags=re.M)
    lines += re.findall(r"^    (?:\w+=\S+ )*(python [^#\n]*)", text, flags=re.M)  # indented code blocks
    lines += re.findall(r"`(?:\w+=\S+ )*(python [^`]*)`", text)
    if not HAS_TRL and "python -m hf.trl_smd" in text:
        pytest.skip(f"the page runs hf/trl_smd.py, which needs trl: {EXTRA}")
    starts = {configurator.command(source_of(name)): name for name in SCRIPTS + ["hf_trl"] * HAS_TRL}
    checked = 0
    for line in lines:
        if line.split()[:3] == ["python", "-m", "pytest"]:
            continue
        name = next((n for start, n in starts.items() if line.split()[:len(start.split())] == start.split()),
                    None)
        assert name, f"{page}: {line!r} starts no script of this repo"
        argv = line.split()[len(configurator.command(source_of(name)).split()):]
        if "--help" in argv or ("--device=cuda" in argv and not torch.cuda.is_available()):
            continue
        check_of(name)(argv)
        checked += 1
    assert checked or page == "hf/README.md"


def test_the_readmes_code_runs_as_printed(capsys):
    """README.md's python block, the API in a dozen lines, then policies.py's docstring's, a new policy,
    used in a rollout."""
    (api,) = re.findall(r"```python\n(.*?)```", open(os.path.join(ROOT, "README.md")).read(), flags=re.S)
    new_policy = textwrap.dedent(policies.__doc__.split("never evicting position 0:\n")[1])
    exec(api, {})
    printed = capsys.readouterr().out
    assert "record == rollout: True" in printed and "gather == sampler: True" in printed
    exec(new_policy, {})
    try:
        model = GPT(GPTConfig(block_size=32, vocab_size=16, n_layer=1, n_head=2, n_embd=16))
        r = smd.rollout(model, [[1, 2, 3]], policy="keep_first_tova", budget=4, max_new_tokens=20,
                        generator=torch.Generator().manual_seed(0))
        visible = r.shadow_mask.attn_masks()                                # (L, B, nh, T, T)
        assert visible[..., 0].all() and visible.sum(-1).max() == 4      # position 0 kept, 4 slots used
    finally:
        del policies.POLICIES["keep_first_tova"]


def test_bench_runs_and_reports_budget_sized_kv_memory_per_policy_beside_its_bounds():
    args = ["--lengths=(32,48)", "--budgets=(8,)", "--batch_size=1", "--n_layer=1", "--n_embd=32",
            "--n_head=2", "--repeats=1", "--prompt_len=4", "--policies=h2o,streaming"]
    out = subprocess.run([sys.executable, "-m", "experiments.bench", *args], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()
            if line.split()[:2] in (["32", "8"], ["48", "8"])]
    sampler = [row for row in rows if row[2] in ("h2o", "streaming")]
    assert [row[2] for row in sampler] == ["h2o", "streaming"] * 2  # one row per policy, each T
    assert len(rows) == 4 + 2 * 2  # and T=32, T=48 once in each learner table
    # KV ratio, from the bytes per slot: h2o keeps K, V (2 x 16 floats), a long position and a float
    # slot_scores; streaming and the full cache that was actually run (S = T) need neither score
    per_slot, full_per_slot = 2 * 16 * 4 + 8 + 4, 2 * 16 * 4 + 8
    assert ([float(sampler[0][5]), float(sampler[2][5])]
            == [round(8 * per_slot / (T * full_per_slot), 3) for T in (32, 48)])
    assert float(sampler[1][5]) == float(sampler[1][6]) == round(8 / 32, 3)  # streaming: exactly S/T
    # the FLOP bound: per decode token 2 x (12 C^2 + 2 C slots) + 2 C V, with C = 32, V = 64
    flops = lambda slots: 12 * 32 * 32 + 2 * 32 * slots + 32 * 64
    assert float(sampler[2][10].rstrip("x")) == round(flops(48) / flops(8), 2)


def test_bench_on_a_gpu_takes_its_preset_first_then_the_other_flags(monkeypatch):
    from experiments import bench
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    cfg = bench.make_config(["--n_layer=2", "--device=cuda", "--budgets=32"])
    assert (cfg["lengths"], cfg["n_embd"]) == (bench.CUDA_PRESET["lengths"], bench.CUDA_PRESET["n_embd"])
    assert (cfg["n_layer"], cfg["budgets"]) == (2, (32,))                  # the flags, not the preset's
    assert bench.make_config(["--n_layer=2"])["lengths"] == bench.lengths  # on the CPU, no preset


# ----------------------------------------------------------------------------- compare.py's tables


# these tests' setting
OLD_LAYOUT = ["--keep_prompt=False", "--budget=26", "--sweep=True", "--sweep_rows=naive,tis,smd"]


@pytest.fixture
def fake_compare(monkeypatch):
    """compare.py with its runs faked: each summary's accuracy encodes its row and seed (0.4, 0.5, 0.6 for
    smd), and a run in `fail` raises as compare.run does when train.py exits non-zero. runs: name -> argv."""
    pytest.importorskip("scipy", reason=f"compare.py's tables need scipy: {EXTRA}")
    from experiments import compare
    import train
    runs, fail = {}, set()

    def fake_run(argv, out_dir, name):
        runs[name] = argv
        if name in fail:
            log = os.path.join(out_dir, name + ".log")
            raise RuntimeError(f"train.py exited with status 1; its log: {log}")
        cfg = train.make_config(argv)
        accuracy = {"full": 0.5, "naive": 0.2, "tis": 0.3, "sparse_rl": 0.35, "smd": 0.4}
        acc = accuracy[cfg["mode"]] + 0.1 * cfg["seed"]
        return dict(acc_full_start=0.5, acc_full=acc, acc_compressed_start=0.1, acc_compressed=acc / 2,
                    reward_start=0.4, reward_end=0.5, mismatch_k3_mean=1e-3, tis_ess_mean=None, kv_frac=0.5,
                    rl_s=10.0)
    monkeypatch.setattr(compare, "run", fake_run)
    monkeypatch.setattr(compare, "prepare_warm_up", lambda cfg: None)
    monkeypatch.setattr(compare, "warmup_table", lambda model, cfg, policies, budgets: "")
    monkeypatch.setattr(compare, "evaluate_checkpoint", lambda cfg, name, budget: 0.25)
    return compare, runs, fail


def test_compare_runs_every_row_seed_and_budget_and_reports_mean_and_sample_std(fake_compare, tmp_path):
    compare, runs, _ = fake_compare
    results = compare.main([f"--out_dir={tmp_path}", "--keep_prompt=False", "--budget=24", "--seeds=3",
                            "--sft_seeds=0,1", "--sweep=True", "--sweep_budgets=16,24"])
    calls = list(runs.values())
    assert [name for name, _ in results] == compare.rows.split(",")
    n_sweep = len(compare.sweep_rows.split(","))               # budget 24 is the table's: only 16 is new
    assert len(calls) == 2 * 3 * (len(results) + n_sweep)      # 2 warm-ups x 3 RL seeds
    assert all("--eval_split=test" in argv for argv in calls)  # reports are on the test split
    pairs = {(a, b) for argv in calls for a in argv for b in argv if a.startswith("--sft_seed=")
             and b.startswith("--seed=")}
    assert len(pairs) == 6                                     # every warm-up with every RL seed
    assert sum("--budget=16" in argv for argv in calls) == 2 * 3 * n_sweep
    smd_row = compare.table(results).splitlines()[2 + compare.rows.split(",").index("smd")].split()
    assert smd_row[:8] == ["smd", "0.500", "±", "0.000", "->", "0.500", "±", "0.089"]  # 0.4 0.5 0.6, twice
    for own in ("--seed=1", "--sft_seed=1"):
        with pytest.raises(ValueError, match="sets --s"):
            compare.main([own])
    with pytest.raises(ValueError, match="unknown rows"):
        compare.main(["--rows=full,ppo"])


def sweep_rows(stdout):
    """The budget sweep's lines, as {budget: [cells]}."""
    lines = stdout.split("budget sweep")[1].splitlines()[3:]
    return {int(line.split()[0]): re.split(r"\s{2,}", line.strip())[1:]
            for line in lines if line[:1].isdigit()}


def test_the_sweep_shows_a_dash_for_a_row_that_did_not_run_at_the_tables_budget(fake_compare, tmp_path,
                                                                                  capsys):
    compare, runs, _ = fake_compare  # the review's crash: KeyError('naive', 26, 0)
    results = compare.main([f"--out_dir={tmp_path}", *OLD_LAYOUT, "--rows=full,smd", "--sweep_budgets=13",
                            "--seeds=2", "--sft_seeds=0"])
    assert [name for name, _ in results] == ["full", "smd"]
    sweep = sweep_rows(capsys.readouterr().out)             # columns: full, naive, tis, smd
    assert sweep[26] == ["0.550 ± 0.071 / 0.250 ± 0.000", "-", "-", "0.450 ± 0.071 / 0.225 ± 0.035"]
    assert sweep[13][1] == "0.250 ± 0.071 / 0.125 ± 0.035"  # naive did run at 13
    planned = [("full", 26), ("smd", 26), ("naive", 13), ("tis", 13), ("smd", 13)]
    assert sorted(runs) == sorted(f"cmp_{n}_b{b}_w0_s{s}" for n, b in planned for s in (0, 1))


def test_a_sweep_row_whose_name_is_part_of_a_table_rows_name_still_runs(fake_compare, tmp_path, capsys):
    compare, runs, _ = fake_compare  # "smd" is in "full,smd_no_ref_kl" as a substring, not as a row
    compare.main([f"--out_dir={tmp_path}", *OLD_LAYOUT, "--rows=full,smd_no_ref_kl", "--sweep_budgets=13,26",
                  "--seeds=2", "--sft_seeds=0"])
    assert {"cmp_smd_b26_w0_s0", "cmp_smd_b26_w0_s1", "cmp_smd_no_ref_kl_b26_w0_s0"} <= set(runs)
    assert len(runs) == len(set(runs)) == 2 * (2 + 3 + 3)    # a run the table and the sweep share runs once
    assert sweep_rows(capsys.readouterr().out)[26][3] == "0.450 ± 0.071 / 0.225 ± 0.035"


def test_a_failed_run_is_reported_and_the_tables_keep_the_others(fake_compare, tmp_path, capsys):
    compare, runs, fail = fake_compare
    fail.update({"cmp_smd_b26_w0_s1", "cmp_naive_b13_w0_s0", "cmp_naive_b13_w0_s1", "cmp_naive_b13_w0_s2"})
    with pytest.raises(SystemExit) as e:  # status 1, after the tables
        compare.main([f"--out_dir={tmp_path}", *OLD_LAYOUT, "--rows=full,naive,smd", "--sweep_budgets=13",
                      "--seeds=3",
                      "--sft_seeds=0"])
    assert e.value.code.startswith("4 of 18 runs failed")
    log = os.path.join(str(tmp_path), "cmp_smd_b26_w0_s1.log")
    failure = f"RuntimeError: train.py exited with status 1; its log: {log}"
    assert f"smd budget 26 warm-up 0 seed 1: {failure}" in e.value.code
    out = capsys.readouterr().out
    assert f"budget 26 warm-up 0 seed 1 | failed: {failure}" in out
    table = {line.split("  ")[0]: line for line in out.split("over runs\n")[1].splitlines()[2:5]}
    assert table["smd (2 of 3 runs)"].split()[8:12] == ["->", "0.500", "±", "0.141"]  # seeds 0, 2: 0.4, 0.6
    assert table["naive"].split()[4:8] == ["->", "0.300", "±", "0.100"]               # 0.2, 0.3, 0.4
    sweep = sweep_rows(out)
    assert sweep[26][3] == "0.500 ± 0.141 / 0.250 ± 0.071 (2 of 3 runs)"
    assert sweep[13][1] == "-"                                           # no seed finished


def test_compare_run_raises_naming_the_log_when_train_fails(tmp_path):
    from experiments import compare
    with pytest.raises(RuntimeError, match=re.escape(f"its log: {tmp_path / 'cmp_x_b26_s0.log'}")):
        compare.run(["--mode=ppo", f"--out_dir={tmp_path}"], str(tmp_path), "cmp_x_b26_s0")
    assert "ppo" in (tmp_path / "cmp_x_b26_s0.log").read_text()


def test_sparse_rl_is_a_row_after_tis_with_its_rejection_column():
    from experiments import compare
    assert compare.ROWS["sparse_rl"] == ["--mode=sparse_rl"]
    assert compare.rows.split(",")[:4] == ["full", "naive", "tis", "sparse_rl"]
    summary = dict(acc_full_start=0.5, acc_full=0.5, acc_compressed_start=0.1, acc_compressed=0.1,
                   reward_start=0.4, reward_end=0.5, mismatch_k3_mean=1.0, tis_ess_mean=None, kv_frac=0.5,
                   rl_s=10.0)
    lines = compare.table([("sparse_rl", [dict(summary, sparse_rl_rejected_mean=r) for r in (0.25, 0.35)]),
                           ("naive", [summary, summary])]).splitlines()
    column = lines[0].index("rejected") + len("rejected")                    # right-aligned under its header
    assert lines[2][:column].endswith("0.30 ± 0.07") and lines[3][:column].endswith("-")


def test_the_warm_up_table_shows_every_policy_with_the_prompt_evictable_and_kept():
    from experiments import compare
    import train
    cfg = train.make_config(["--n_layer=1", "--n_head=2", "--n_embd=16", "--eval_problems=4"])
    text = compare.warmup_table(warmup.build_model(cfg), cfg, ["h2o", "rkv"], [13, 26], n_k3=4)
    lines = text.splitlines()[4:]                                          # after the header and the rule
    rows = {cells[0]: cells[1:] for cells in (re.split(r"\s{2,}", line.strip()) for line in lines)}
    assert list(rows) == ["h2o", "h2o, prompt kept", "rkv", "rkv, prompt kept"]
    assert rows["h2o, prompt kept"][0] == "n/a"                           # 13 < prompt 20 + 1
    accuracy_and_k3 = re.compile(r"\d\.\d{3} \(\de[-+]\d\d\)")
    assert all(accuracy_and_k3.fullmatch(c) for c in rows["h2o"] + rows["rkv"] + rows["h2o, prompt kept"][1:])


def test_the_default_budget_lies_inside_the_sweep_from_harsh_to_near_lossless():
    from experiments import compare
    import train
    assert min(compare.sweep_budgets) < train.budget < max(compare.sweep_budgets)
    assert set(compare.sweep_rows.split(",")) == {"naive", "tis", "sparse_rl", "smd"}


def test_bench_cpu_memory_peak_counts_every_allocation_alive_at_once():
    # a = 2x, b = exp(a), loss = sum(b * a) on 1M floats (4 MB each), a and b local to the loss: by hand, the
    # peak is in backward's first multiply node, where a, b and its two outputs (grad wrt b, grad wrt a) are
    # alive together, 16 MB. Booking each op's net allocation at its start read 12 MB (the node frees a and b
    # at its end, which cancelled the outputs its sub-ops allocated)
    from experiments import bench
    x = torch.randn(1_000_000, requires_grad=True)

    def loss():
        a = x * 2
        b = a.exp()
        return (b * a).sum()
    peak = bench.learner_memory(torch.nn.Linear(1, 1), loss, cuda=False)
    assert abs(peak - 16_000_000) <= 1024  # + a few scalars (the loss, its gradient)


def test_paired_statistics_on_a_hand_computed_case():
    pytest.importorskip("scipy", reason=f"compare.py's intervals need scipy: {EXTRA}")
    from experiments import compare
    # differences 0.1, 0.2, 0.1: mean 2/15, sample std 0.057735, t(2) = 4.302653 -> half-width 0.143422
    mean, half = compare.paired_difference([0.5, 0.6, 0.7], [0.4, 0.4, 0.6])
    assert mean == pytest.approx(2 / 15, abs=1e-12) and half == pytest.approx(0.143422, abs=1e-6)
    assert compare.verdict(mean, half, 3) == "not resolved at n = 3"       # [-0.010, +0.277] covers 0
    mean, half = compare.paired_difference([0.5, 0.6, 0.7, 0.8], [0.4, 0.4, 0.6, 0.7])
    assert half == pytest.approx(3.182446 * 0.05 / 2, abs=1e-7)            # d = .1 .2 .1 .1: std 0.05, t(3)
    assert compare.verdict(mean, half, 4) == "higher" and compare.verdict(-mean, half, 4) == "lower"
    assert compare.verdict(0.0, 0.0, 4) == "not resolved at n = 4"          # no difference is no verdict
    # over warm-ups: d = .1 .2 on warm-up 0 and .3 .4 on warm-up 1 -> means .15, .35: mean .25, std 0.141421,
    # t(1) = 12.706205 -> half-width 1.2706205 (the runs as independent: 4 pairs, half-width 0.2054)
    mean, half = compare.over_warm_ups([0.5, 0.6, 0.7, 0.8], [0.4, 0.4, 0.4, 0.4], [0, 0, 1, 1])
    assert mean == pytest.approx(0.25, abs=1e-12) and half == pytest.approx(1.2706205, abs=1e-7)


def test_the_paired_table_pairs_runs_by_warm_up_and_seed(fake_compare, tmp_path, capsys):
    compare, _, _ = fake_compare  # fake accuracies: smd 0.4 + 0.1 seed, naive 0.2 + 0.1 seed, on each warm-up
    compare.main([f"--out_dir={tmp_path}", "--rows=naive,smd", "--seeds=3", "--sft_seeds=0,1"])
    out = capsys.readouterr().out.split("as one observation\n")[1]
    naive = [re.split(r"\s{2,}", line.strip()) for line in out.splitlines()
             if line.startswith("naive - smd")][0]
    # paired: every difference is -0.2 exactly, so the interval is a point; pooled, the seeds' spread (std
    # 0.089 each) would have hidden nothing here but cannot resolve a 0.2 gap at n = 6 with real noise
    assert naive[1:6] == ["6", "0.300 / 0.500", "-0.200 [-0.200, -0.200]", "lower", "[-0.200, -0.200]"]


def test_compare_started_elsewhere_gives_every_run_the_same_absolute_out_dir(tmp_path, monkeypatch):
    from experiments import compare
    monkeypatch.chdir(tmp_path)  # train.py runs in the repo; its logs and warm-up must be where compare looks
    own, cfg, plan = compare.configure(["--out_dir=results", "--rows=full,smd", "--seeds=1", "--sft_seeds=0"])
    want = str(tmp_path / "results")
    assert cfg["out_dir"] == want
    assert all(train.make_config(argv)["out_dir"] == want for argv in plan.values())


def test_a_row_may_carry_train_settings_and_a_bad_one_is_rejected():
    from experiments import compare
    assert compare.row_flags("smd@distill_coef=0.3@ref_kl_coef=0") == ["--mode=smd", "--distill_coef=0.3",
                                                                      "--ref_kl_coef=0"]
    _, _, plan = compare.configure(["--rows=smd@distill_coef=0.3", "--seeds=1", "--sft_seeds=0"])
    assert all(train.make_config(argv)["distill_coef"] == 0.3 for argv in plan.values())
    for bad in ("smd@distill_coef", "smd@distill_coef=-1", "ppo@lr=1"):
        with pytest.raises(ValueError):
            compare.configure([f"--rows={bad}", "--seeds=1", "--sft_seeds=0"])


def test_plot_draws_only_the_runs_of_the_last_comparison(tmp_path):
    from experiments import plot
    for name in ("cmp_smd_b28_w0_s0", "cmp_smd_b28_w9_s9"):  # w9_s9: a log an earlier comparison left
        (tmp_path / f"{name}.jsonl").write_text('{"kind": "eval", "step": 0, "acc_full": 0.5}\n')
    (tmp_path / "compare.json").write_text(json.dumps({"budget": 28, "runs": [
        ["smd", 28, 0, 0, "cmp_smd_b28_w0_s0"]]}))
    assert len(plot.load(str(tmp_path), "smd", 28)) == 1
    (tmp_path / "compare.json").unlink()
    with pytest.raises(FileNotFoundError, match="compare.json"):
        plot.load(str(tmp_path), "smd", 28)


def test_plot_reads_each_row_at_the_report_step_of_the_committed_design():
    from experiments import plot
    steps = plot.report_steps(os.path.join(ROOT, "experiments", "design.toml"))
    assert steps["full@lr=3e-05"] == 60 and steps["smd@lr=3e-05"] == 120  # as compare.py reads them
    evals = [{"step": n, "acc_full": n / 100, "acc_compressed": n / 200} for n in (0, 60, 120)]
    runs = [{"eval": evals}, {"eval": evals[:2]}]
    assert plot.final_accuracies(runs, 60) == ([0.3, 0.3], [0.6, 0.6])
    assert plot.final_accuracies(runs) == ([0.6, 0.3], [1.2, 0.6])  # no design: each run's last evaluation
    with pytest.raises(ValueError, match="step 120"):
        plot.final_accuracies(runs, 120)  # a run that never reached its report step is not drawn as if it had


def test_compare_reuses_a_finished_run_only_when_its_config_is_exactly_the_same(tmp_path):
    from experiments import compare
    argv = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--sft_steps=2", "--n_steps=2", "--eval_problems=4",
            "--prompts_per_step=2", "--group_size=2", "--eval_also=h2o@42", f"--out_dir={tmp_path}"]
    summary = train.main(argv + ["--run_name=cmp_x"])
    reused = compare.finished(argv, str(tmp_path), "cmp_x")
    assert reused["acc_full"] == summary["acc_full"] and set(reused["transfer"]) == {"h2o@42"}
    assert compare.finished(argv + ["--lr=2e-5"], str(tmp_path), "cmp_x") is None      # another config
    assert compare.finished(argv[:-1] + ["--n_steps=3", argv[-1]], str(tmp_path), "cmp_x") is None
    assert compare.finished(argv, str(tmp_path), "cmp_y") is None                       # never ran
    moved = tmp_path / "moved"  # the same runs in another folder are still the same runs
    moved.mkdir()
    for suffix in (".pt", ".jsonl"):
        os.replace(tmp_path / f"cmp_x{suffix}", moved / f"cmp_x{suffix}")
    argv_moved = argv[:-1] + [f"--out_dir={moved}"]
    assert compare.finished(argv_moved, str(moved), "cmp_x")["acc_full"] == summary["acc_full"]


def test_the_top_level_files_import_each_other_without_a_circle():
    """The core reads top down: no top-level file imports one that imports it back, directly or not (train.py
    owns the config and warmup.py takes it; experiments/warmups.py is the warm-up's command line)."""
    import ast
    top = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")} | {"data"}
    imports = {}
    for name in top - {"data"}:
        tree = ast.parse(open(os.path.join(ROOT, name + ".py")).read())
        found = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        found |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imports[name] = {m.split(".")[0] for m in found} & top - {name}

    def reaches(start, goal, seen=()):
        return any(m == goal or (m not in seen and reaches(m, goal, seen + (m,)))
                   for m in imports.get(start, ()))
    circles = sorted(name for name in imports if reaches(name, name))
    assert not circles, f"import circles through {circles}"
